"""Render charts/codehub-gateway with the real Helm SDK (PyPI ``helm-python-sdk``, Helm's Go engine through a C ABI;
offline, no ``helm`` binary) and read the result back as Kubernetes objects."""

from __future__ import annotations

import copy
import functools
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import helm_python as helm
import yaml

CHART_DIR = Path(__file__).resolve().parents[2] / "charts" / "codehub-gateway"
PREVIOUS_CHART = Path(__file__).resolve().parent / "previous" / "codehub-gateway-0.1.0.tgz"
RELEASE = "codehub"
NAMESPACE = "codehub"
WORKSPACE_NAMESPACE = "codehub-workspaces"

# What an install must always say (the chart refuses to render without it); everything else is a default.
REQUIRED: dict[str, Any] = {
    "auth": {
        "oidc": {"issuer": "https://sso.example.com/realms/main", "existingSecret": "codehub-oidc"},
        "signingKeys": {"existingSecret": "codehub-signing-keys"},
    }
}

Manifest = dict[str, Any]


def merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """Deep merge of values, like Helm's coalescing of -f files (override wins, maps merge)."""
    merged = copy.deepcopy(dict(base))
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


@functools.cache
def chart() -> helm.Chart:
    return helm.Chart.load(CHART_DIR)


def crds() -> list[Manifest]:
    """The CustomResourceDefinitions in crds/: plain YAML Helm applies on install only (never templated)."""
    found: list[Manifest] = []
    for path in sorted((CHART_DIR / "crds").glob("*.yaml")):
        found.extend(document for document in yaml.safe_load_all(path.read_text()) if document)
    return found


def crd(name: str) -> Manifest:
    (found,) = [item for item in crds() if item["metadata"]["name"] == name]
    return found


@dataclass(frozen=True)
class Rendered:
    files: dict[str, str]
    manifests: list[Manifest]

    def of_kind(self, kind: str) -> list[Manifest]:
        return [item for item in self.manifests if item["kind"] == kind]

    def one(self, kind: str, name_suffix: str = "") -> Manifest:
        found = [item for item in self.of_kind(kind) if item["metadata"]["name"].endswith(name_suffix)]
        names = [item["metadata"]["name"] for item in found]
        assert len(found) == 1, f"expected one {kind} named *{name_suffix}, found {names}"
        return found[0]

    @property
    def kinds(self) -> set[str]:
        return {item["kind"] for item in self.manifests}

    def gateway_config(self) -> dict[str, Any]:
        """The gateway settings file the chart renders (gateway.yaml in the config ConfigMap)."""
        data: dict[str, Any] = yaml.safe_load(self.one("ConfigMap", "-config")["data"]["gateway.yaml"])
        return data


def render(values: Mapping[str, Any] | None = None, *, with_required: bool = True,
           namespace: str = NAMESPACE, of: helm.Chart | None = None, upgrade: bool = False) -> Rendered:
    """Render like ``helm template codehub charts/codehub-gateway -n codehub -f values`` (schema checked too);
    ``of`` another chart (the previous version), ``upgrade`` as ``helm upgrade`` would."""
    merged = merge(REQUIRED, values or {}) if with_required else dict(values or {})
    files = (of or chart()).render(merged, name=RELEASE, namespace=namespace, is_install=not upgrade,
                                   is_upgrade=upgrade)
    manifests: list[Manifest] = []
    for path, text in sorted(files.items()):
        if not path.endswith((".yaml", ".yml")):
            continue  # NOTES.txt
        for document in yaml.safe_load_all(text):
            if document:
                assert isinstance(document, dict), f"{path}: a manifest must be a mapping"
                manifests.append(document)
    return Rendered(files=files, manifests=manifests)


def lint(values: Mapping[str, Any] | None = None, *, kube_version: str | None = None) -> dict[str, Any]:
    return helm.lint(CHART_DIR, dict(values) if values is not None else None, strict=True, namespace=NAMESPACE,
                     kube_version=kube_version)
