"""Port labels from devcontainer.json: comments, trailing commas, ranges, and keys that name no port."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from gateway.auth.identity import Identity
from gateway.lifecycle.devcontainer import LabelFile, parse_labels, read_regular
from tests.conftest import MakeGateway, next_address, workspace
from tests.lifecycle.conftest import Fifo, gateway_of


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



@pytest.mark.parametrize("where", [".devcontainer/devcontainer.json", ".devcontainer.json"])
def test_a_fifo_gives_no_labels_and_never_blocks(tmp_path: Path, where: str) -> None:
    """The owner controls the home: a FIFO there would block the read (on the loop serving everyone) until some
    writer came, so only a regular file is read."""
    path = tmp_path / where
    path.parent.mkdir(exist_ok=True)
    with Fifo(path) as fifo:
        labels = LabelFile(tmp_path).labels()
    assert not fifo.released
    assert labels == {}


def test_a_link_to_a_fifo_gives_no_labels(tmp_path: Path) -> None:
    (tmp_path / ".devcontainer.json").symlink_to(tmp_path / "pipe")
    with Fifo(tmp_path / "pipe") as fifo:
        labels = LabelFile(tmp_path).labels()
    assert not fifo.released
    assert labels == {}


@pytest.mark.parametrize("path", ["/dev/zero", "/dev/null"])
def test_devices_are_not_read(path: str) -> None:
    """/dev/zero never ends: read whole, it would never return (the size limit was applied after the read)."""
    assert read_regular(Path(path), 1 << 20) is None


def test_a_regular_file_is_read_up_to_the_limit(tmp_path: Path) -> None:
    path = tmp_path / "big"
    path.write_bytes(b"x" * 100)
    assert read_regular(path, 10) == b"x" * 10
    assert read_regular(path, 1000) == b"x" * 100
    with pytest.raises(FileNotFoundError):
        read_regular(tmp_path / "missing", 10)


async def test_a_fifo_devcontainer_json_does_not_block_the_gateway(make_gateway: MakeGateway) -> None:
    """The hub's view of a workspace reads its devcontainer.json: the view and /healthz answer while the FIFO
    there has no writer at all."""
    client = await make_gateway(workspaces={"a": workspace(next_address(), owner="alice")})
    gateway = gateway_of(client)
    await gateway.runtime.wake("a")
    try:
        home = Path(gateway.config.local.state_dir) / "workspaces" / "a" / "home"
        (home / ".devcontainer").mkdir(parents=True)
        _record, token = await gateway.auth.store.create_api_token(Identity("alice"), name="t")
        with Fifo(home / ".devcontainer" / "devcontainer.json") as fifo:
            listing = await client.get("/api/v1/workspaces", headers={"Host": "localhost:8080",
                                                                       "Authorization": f"Bearer {token}"})
            health = await client.get("/healthz", headers={"Host": "localhost:8080"})
        assert not fifo.released, "the gateway waited for a writer to the FIFO"
        assert (listing.status, health.status) == (200, 200)
    finally:
        await gateway.runtime.stop("a")
