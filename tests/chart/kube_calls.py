"""The Kubernetes API calls gateway/lifecycle/kubernetes and gateway/auth/kubernetes make, read from their source:
the RBAC the chart must grant.

Every call goes through ``KubeClient`` (one method per verb) or through the runtime's ``Informers`` (list + watch
of every kind ``register``-ed there).
A call names its kind by one of the ``Resource`` constants of ``client.py``; when it passes a variable instead, the
kinds it may be are the constants that module names (tokens.py counts uses of share links and API tokens through
one ``kind`` variable). A ``subresource=`` keyword makes the resource ``plural/subresource``. A helper that calls
verbs on a kind it is given (``WRAPPERS``) is counted where it is called, with the kind passed there.
"""

from __future__ import annotations

import ast
from pathlib import Path

from gateway.auth import kubernetes as auth_kubernetes
from gateway.lifecycle.kubernetes import client
from gateway.lifecycle.kubernetes.client import Resource

PACKAGE = Path(client.__file__).resolve().parent
PACKAGES = (PACKAGE, Path(auth_kubernetes.__file__).resolve().parent)
VERBS = {"create": "create", "get": "get", "delete": "delete", "patch": "patch", "replace": "update",
         "list": "list", "watch": "watch"}
INFORMER_VERBS = ("list", "watch")
KINDS: dict[str, Resource] = {name: value for name, value in vars(client).items() if isinstance(value, Resource)}

Rules = dict[tuple[str, str], set[str]]
# answers.create_sealed(client, KIND, ...): creates the record, and deletes it again if the cluster dropped its seal.
WRAPPERS = {"create_sealed": ("create", "delete")}


def _kinds_named(tree: ast.AST) -> set[Resource]:
    return {KINDS[node.id] for node in ast.walk(tree) if isinstance(node, ast.Name) and node.id in KINDS}


def _kinds_of(argument: ast.expr, module: ast.AST) -> set[Resource]:
    if isinstance(argument, ast.Name) and argument.id in KINDS:
        return {KINDS[argument.id]}
    return _kinds_named(module)


def _subresource(call: ast.Call) -> str | None:
    for keyword in call.keywords:
        if keyword.arg == "subresource":
            assert isinstance(keyword.value, ast.Constant), ast.dump(call)
            return str(keyword.value.value)
    return None


CLIENTS = frozenset({"client", "c"})  # how the package names a KubeClient (``c`` in its ``_call`` lambdas)
NOT_CLIENTS = frozenset({"informers"})  # dicts keyed by Resource: ``self.informers.get(SNAPSHOT)`` is no API call


def _client_calls(module: ast.AST) -> list[ast.Call]:
    """Calls of KubeClient's verbs on a client (``client.x``, ``self.client.x``, ``c.x``). A verb called with a
    Resource constant on anything else stops the derivation, so a client under a new name is never missed."""
    calls = []
    for node in ast.walk(module):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in VERBS
                and node.args):
            continue
        receiver = node.func.value
        name = receiver.attr if isinstance(receiver, ast.Attribute) else getattr(receiver, "id", "")
        first = node.args[0]
        if name in CLIENTS:
            calls.append(node)
        elif isinstance(first, ast.Name) and first.id in KINDS:
            assert name in NOT_CLIENTS, f"line {node.lineno}: {name}.{node.func.attr}({first.id}) - a client?"
    return calls


def used_rules() -> Rules:
    """(API group, resource) → verbs, for every call in the package outside the client and the informer."""
    rules: Rules = {}

    def grant(kind: Resource, resource: str, verbs: tuple[str, ...]) -> None:
        rules.setdefault((kind.group, resource), set()).update(verbs)

    for path in sorted(path for package in PACKAGES for path in package.glob("*.py")):
        module = ast.parse(path.read_text(), filename=str(path))
        if path.name in ("client.py", "informer.py"):
            continue  # the verbs themselves, and the informer's list + watch of whatever kind it is given
        for call in _client_calls(module):
            subresource = _subresource(call)
            for kind in _kinds_of(call.args[0], module):
                resource = f"{kind.plural}/{subresource}" if subresource else kind.plural
                grant(kind, resource, (VERBS[call.func.attr],))  # type: ignore[attr-defined]
        for node in ast.walk(module):
            if isinstance(node, ast.Call) and getattr(node.func, "id", "") in WRAPPERS:
                for kind in _kinds_of(node.args[1], module):
                    grant(kind, kind.plural, WRAPPERS[node.func.id])  # type: ignore[attr-defined]
            assert not (isinstance(node, ast.Call) and getattr(node.func, "id", "") == "Informer"), (
                f"{path.name} line {node.lineno}: an Informer outside the registry - register its kind instead")
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "register":
                for kind in _kinds_of(node.args[0], module):
                    grant(kind, kind.plural, INFORMER_VERBS)
            if isinstance(node, ast.Constant) and node.value == "blockOwnerDeletion":
                # an ownerReference that blocks its owner's deletion is admitted only to who may update the
                # owner's finalizers (the API server's OwnerReferencesPermissionEnforcement); owners are Workspaces
                grant(KINDS["WORKSPACE"], "workspaces/finalizers", ("update",))
    return rules


def informer_verbs() -> set[str]:
    """What an Informer itself calls on its client: the verbs every informed kind needs."""
    module = ast.parse((PACKAGE / "informer.py").read_text())
    return {VERBS[call.func.attr] for call in _client_calls(module)}  # type: ignore[attr-defined]
