"""Port labels from devcontainer.json: comments, trailing commas, ranges, and keys that name no port."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from gateway.lifecycle.devcontainer import LabelFile, parse_labels


@pytest.mark.parametrize(
    ("text", "labels"),
    [
        ('{"portsAttributes": {"3000": {"label": "Web app"}}}', {3000: "Web app"}),
        ('// dev setup\n{"portsAttributes": {/* main */ "5173": {"label": "Vite // HMR", },},}', {5173: "Vite // HMR"}),
        ('{"portsAttributes": {"9000-9002": {"label": "Workers"}}}', {9000: "Workers", 9001: "Workers",
                                                                       9002: "Workers"}),
        ('{"portsAttributes": {"node": {"label": "by process"}, "/api.*/": {"label": "regex"}}}', {}),
        ('{"portsAttributes": {"70000": {"label": "too big"}, "3001": {"label": " "}, "3002": {}}}', {}),
        ('{"portsAttributes": {"1-65535": {"label": "everything"}}}', {}),
        ('{"portsAttributes": [1, 2]}', {}),
        ("not json at all", {}),
        ('{"forwardPorts": [3000]}', {}),
    ],
)
def test_labels_from_devcontainer_json(text: str, labels: dict[int, str]) -> None:
    assert parse_labels(text) == labels


def test_label_file_follows_edits(tmp_path: Path) -> None:
    labels = LabelFile(tmp_path)
    assert labels.labels() == {}
    (tmp_path / ".devcontainer").mkdir()
    path = tmp_path / ".devcontainer" / "devcontainer.json"
    path.write_text('{"portsAttributes": {"3000": {"label": "Web"}}}')
    assert labels.labels() == {3000: "Web"}
    path.write_text('{"portsAttributes": {"3000": {"label": "Shop front"}}}')
    os.utime(path, (1, 1))
    assert labels.labels() == {3000: "Shop front"}
    path.unlink()
    assert labels.labels() == {}
