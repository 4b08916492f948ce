"""The chart's own CRD schemas, applied by the emulator as an API server applies them: validation and pruning.

A real API server answers 422 Invalid for a custom object that breaks its structural schema (a wrong type, a
value outside an enum, a missing required field) and silently prunes fields the schema does not know — so a
field the runtime writes and the CRD lacks is lost on a cluster while a plain store keeps it. The emulator
records every pruned field (``KubeEmulator.pruned``) and fails the test at exit, and answers 400 at once when
the request asks ``fieldValidation=Strict``.

Only what the chart's CRDs use is implemented: ``type`` (with ``nullable``, ``x-kubernetes-int-or-string``,
``anyOf`` of types), ``properties``, ``additionalProperties``, ``required``, ``enum``, ``minimum``/``maximum``,
``minLength``, ``maxProperties``, ``pattern`` and ``x-kubernetes-preserve-unknown-fields``.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

CHART = Path(__file__).resolve().parents[2] / 'charts' / 'codehub-gateway' / 'crds'
Schema = dict[str, Any]
_TYPES: dict[str, tuple[type, ...]] = {'object': (dict,), 'array': (list,), 'string': (str,), 'boolean': (bool,),
                                       'integer': (int,), 'number': (int, float)}


def chart_schemas(crds: Path = CHART) -> dict[str, Schema]:
    """``{"group/version/plural": openAPIV3Schema}`` for every CRD of the chart (any Helm lines dropped)."""
    found: dict[str, Schema] = {}
    for path in sorted(crds.glob('*.yaml')):
        text = re.sub(r'\{\{-?\s*/\*.*?\*/\s*-?\}\}', '', path.read_text(), flags=re.S)
        text = '\n'.join(line for line in text.splitlines() if not line.strip().startswith('{{'))
        for doc in yaml.safe_load_all(text):
            if not doc or doc.get('kind') != 'CustomResourceDefinition':
                continue
            spec = doc['spec']
            for version in spec['versions']:
                found[f"{spec['group']}/{version['name']}/{spec['names']['plural']}"] = \
                    version['schema']['openAPIV3Schema']
    return found


def _type_ok(schema: Schema, value: Any) -> bool:
    if value is None:
        return bool(schema.get('nullable'))
    if schema.get('x-kubernetes-int-or-string'):
        return isinstance(value, int | str) and not isinstance(value, bool)
    if 'anyOf' in schema and 'type' not in schema:
        return any(_type_ok(option, value) for option in schema['anyOf'])
    wanted = schema.get('type')
    if wanted is None:
        return True
    if isinstance(value, bool) and wanted in ('integer', 'number'):
        return False
    return isinstance(value, _TYPES[wanted])


def check(schema: Schema, value: Any, path: str = '') -> tuple[Any, list[str], list[str]]:
    """(the value with unknown fields pruned, validation errors, pruned field paths)."""
    where = path or '<root>'
    if not _type_ok(schema, value):
        return value, [f'{where}: Invalid value: must be of type {schema.get("type", "int-or-string")}'], []
    errors: list[str] = []
    pruned: list[str] = []
    if value is None:
        return value, errors, pruned
    if 'enum' in schema and value not in schema['enum']:
        errors.append(f'{where}: Unsupported value: {value!r}: supported values: {schema["enum"]}')
    if isinstance(value, int | float) and not isinstance(value, bool):
        if 'minimum' in schema and value < schema['minimum']:
            errors.append(f'{where}: Invalid value: {value}: should be greater than or equal to {schema["minimum"]}')
        if 'maximum' in schema and value > schema['maximum']:
            errors.append(f'{where}: Invalid value: {value}: should be less than or equal to {schema["maximum"]}')
    if isinstance(value, str):
        if len(value) < schema.get('minLength', 0):
            errors.append(f'{where}: Invalid value: "{value}": should be at least {schema["minLength"]} chars long')
        if 'pattern' in schema and not re.search(schema['pattern'], value):
            errors.append(f'{where}: Invalid value: "{value}": should match \'{schema["pattern"]}\'')
    if isinstance(value, list) and 'items' in schema:
        items = []
        for index, item in enumerate(value):
            kept, more, cut = check(schema['items'], item, f'{path}[{index}]')
            items.append(kept)
            errors += more
            pruned += cut
        value = items
    if isinstance(value, dict):
        value, more, cut = _check_object(schema, value, path)
        errors += more
        pruned += cut
    return value, errors, pruned


def _check_object(schema: Schema, value: dict[str, Any], path: str) -> tuple[dict[str, Any], list[str], list[str]]:
    errors = [f'{path}.{key}: Required value' if path else f'{key}: Required value'
              for key in schema.get('required') or [] if key not in value]
    if 'maxProperties' in schema and len(value) > schema['maxProperties']:
        errors.append(f'{path}: Too many: {len(value)}: must have at most {schema["maxProperties"]} items')
    properties: dict[str, Schema] = schema.get('properties') or {}
    extra = schema.get('additionalProperties')
    keep_unknown = schema.get('x-kubernetes-preserve-unknown-fields') or (not properties and extra is None)
    kept: dict[str, Any] = {}
    pruned: list[str] = []
    for key, item in value.items():
        where = f'{path}.{key}' if path else key
        sub = properties.get(key, extra if isinstance(extra, dict) else None)
        if sub is None:
            if keep_unknown or extra is True:
                kept[key] = item
            else:
                pruned.append(where)
            continue
        if path == '' and key == 'metadata':
            kept[key] = item  # the API server's own field, validated by it
            continue
        kept[key], more, cut = check(sub, item, where)
        errors += more
        pruned += cut
    return kept, errors, pruned
