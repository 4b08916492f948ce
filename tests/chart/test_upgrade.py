"""``helm upgrade`` from the previous chart version (0.1.0, packaged from git in tests/chart/previous/) deletes
nothing: Helm deletes what the old release rendered and the new one does not, unless it is marked to be kept."""

from __future__ import annotations

from typing import Any

import helm_python as helm
import pytest

from tests.chart.helm import PREVIOUS_CHART, Manifest, Rendered, chart, crds, merge, render

pytestmark = pytest.mark.timeout(60)

Key = tuple[str, str, str]  # kind, namespace ("" when cluster-scoped), name


def previous() -> helm.Chart:
    return helm.Chart.load(PREVIOUS_CHART)


def keys(rendered: Rendered) -> dict[Key, Manifest]:
    return {(m["kind"], m["metadata"].get("namespace", ""), m["metadata"]["name"]): m for m in rendered.manifests}


def kept(manifest: Manifest) -> bool:
    return (manifest["metadata"].get("annotations") or {}).get("helm.sh/resource-policy") == "keep"


def deleted_by_upgrade(values: dict[str, Any], new: dict[str, Any] | None = None) -> dict[Key, Manifest]:
    """What Helm would delete: rendered before, not after (with ``new`` values added for the new version),
    and not marked helm.sh/resource-policy: keep."""
    before = keys(render(values, of=previous()))
    after = keys(render(merge(values, new or {}), upgrade=True))
    return {key: manifest for key, manifest in before.items() if key not in after and not kept(manifest)}


def test_the_previous_chart_is_the_previous_version() -> None:
    assert (previous().version, chart().version) == ("0.1.0", "0.2.0")


def test_upgrade_with_a_separate_workspace_namespace_deletes_nothing() -> None:
    # The namespace existed already, so it stays the cluster's (Helm refuses to adopt what another owner made).
    values = {"workspaces": {"namespace": "codehub-workspaces"}}
    assert deleted_by_upgrade(values, {"workspaces": {"createNamespace": False}}) == {}
    assert deleted_by_upgrade(values) == {}


def test_upgrade_with_defaults_keeps_every_kind_and_name() -> None:
    # The defaults move the workspace RBAC and policy to the new workspace namespace: same kinds and names there,
    # and only the old copies in the release namespace go (README.md, "Upgrading from 0.1").
    gone = deleted_by_upgrade({})
    after = {(kind, name) for kind, _, name in keys(render(upgrade=True))}
    assert {(kind, name) for kind, _, name in gone} <= after
    assert {(kind, namespace) for kind, namespace, _ in gone} == {
        ("Role", "codehub"), ("RoleBinding", "codehub"), ("NetworkPolicy", "codehub")}


def test_the_old_crds_stay_and_crds_dir_serves_every_version_they_had() -> None:
    before = [m for m in render(of=previous()).manifests if m["kind"] == "CustomResourceDefinition"]
    assert before, "0.1.0 rendered its CRDs as templates"
    assert all(kept(m) for m in before)  # so Helm leaves them when the templates stop rendering them
    now = {m["metadata"]["name"]: m for m in crds()}
    for old in before:
        new = now[old["metadata"]["name"]]
        served = {v["name"] for v in new["spec"]["versions"] if v["served"]}
        assert {v["name"] for v in old["spec"]["versions"]} <= served
        assert new["spec"]["names"] == old["spec"]["names"]
        assert new["spec"]["scope"] == old["spec"]["scope"]
