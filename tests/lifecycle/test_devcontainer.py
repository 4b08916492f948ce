"""Port labels from devcontainer.json: comments, trailing commas, ranges, and keys that name no port."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from gateway.auth.identity import Identity
from gateway.lifecycle.devcontainer import MOST_READ, LabelFile, parse_labels, read_regular
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
        ('{"portsAttributes": {"1-1001": {"label": "one too many"}}}', {}),  # ranges span at most 1000 ports
        ('{"portsAttributes": {"0": {"label": "no port"}, "65536": {"label": "past the last"}}}', {}),
        ('{"portsAttributes": {"65535": {"label": "the last"}}}', {65535: "the last"}),
        ('{"portsAttributes": {"3000": {"label": "%s"}}}' % ("x" * 100), {3000: "x" * 80}),  # as the hub's API keeps
        ('{"portsAttributes": {"2001-3000": {"label": "a thousand"}}}', dict.fromkeys(range(2001, 3001), "a thousand")),
        ("[]", {}),  # JSON, but not an object: nothing to ask for portsAttributes
        ('{"portsAttributes": {"3000": {"label": "<b>Web</b> & co"}}}', {3000: "<b>Web</b> & co"}),  # text, escaped
        # what the hub's own label API refuses (only printable characters) is no label from the file either:
        pytest.param('{"portsAttributes": {"3000": {"label": "\\u202eppa beW"}}}', {}, id="bidi-override"),
        pytest.param('{"portsAttributes": {"3000": {"label": "Web\\nAdmin"}}}', {}, id="newline"),
        pytest.param('{"portsAttributes": {"3000": {"label": "\\u001b[31mWeb"}}}', {}, id="terminal-escape"),
        pytest.param('{"portsAttributes": {"3000": {"label": "Web\\ud800"}}}', {}, id="lone-surrogate"),
        pytest.param('{"portsAttributes": {"3000": {"label": "Web\\u200b"}}}', {}, id="zero-width-space"),
        ('[{"portsAttributes": {"3000": {"label": "Web"}}}]', {}),
        ('"portsAttributes"', {}),
        ('{"portsAttributes": [1, 2]}', {}),
        ('{"portsAttributes": {"3000": "Web", "3001": ["Web"]}}', {}),  # attributes that are not objects
        ("not json at all", {}),
        ('{"forwardPorts": [3000]}', {}),
        ('{"portsAttributes": {"3000": {"label": "Web"}}} /* never closed', {}),
        ('{"portsAttributes": {"3000": {"label": "Web', {}),
        ('{"portsAttributes": {"3000": {"label": "Web\\', {}),
        pytest.param("[" * 100_000, {}, id="nested-arrays"),  # past the parser: RecursionError, not ValueError
        pytest.param('{"portsAttributes": ' * 100_000, {}, id="nested-objects"),
    ],
)
def test_labels_from_devcontainer_json(text: str, labels: dict[int, str]) -> None:
    assert parse_labels(text) == labels


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "text",
    ["/* " * (MOST_READ // 3), '"' + '\\"' * (MOST_READ // 2 - 1)],
    ids=["comments-never-closed", "string-never-closed"],
)
def test_a_megabyte_of_unclosed_comments_or_strings_is_read_in_one_pass(text: str) -> None:
    """The hub reads labels on the loop that serves every request: the comment and string stripper started its search
    again at each ``/*`` or quote of a megabyte that never closed, half an hour of nobody being served (the timeout
    guards a hang; one pass takes a moment)."""
    assert parse_labels(text) == {}


def test_ports_past_the_first_65535_named_are_not_read() -> None:
    """Overlapping ranges (keys made distinct by white space) named forty million ports in a megabyte, each one set
    on the loop: what is named past the size of the port space is ignored."""
    ranges = {" " * i + "1-1000": {"label": f"range {i}"} for i in range(70)}
    ranges["2000"] = {"label": "named last"}
    labels = parse_labels(json.dumps({"portsAttributes": ranges}))
    assert labels[1] == labels[1000] == "range 64"  # 65 ranges of 1000 ports fit, the 66th does not
    assert 2000 not in labels


def test_the_whole_port_space_can_be_named_once() -> None:
    ranges = {f"{first}-{min(first + 999, 65535)}": {"label": f"from {first}"} for first in range(1, 65536, 1000)}
    ranges["80"] = {"label": "named twice"}
    labels = parse_labels(json.dumps({"portsAttributes": ranges}))
    assert len(labels) == 65535
    assert (labels[1], labels[80], labels[65535]) == ("from 1", "from 1", "from 65001")


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



def test_a_file_whose_time_and_size_did_not_change_is_not_read_again(tmp_path: Path) -> None:
    """The hub asks twice a second for every workspace on its page: reading and parsing a file each time would be a
    megabyte per workspace per look, on the loop that serves everyone."""
    path = tmp_path / ".devcontainer.json"
    path.write_text('{"portsAttributes": {"3000": {"label": "Web"}}}')
    labels = LabelFile(tmp_path)
    assert labels.labels() == {3000: "Web"}
    stamp = path.stat().st_mtime_ns
    path.write_text('{"portsAttributes": {"3000": {"label": "Api"}}}')  # the same size
    os.utime(path, ns=(stamp, stamp))
    assert labels.labels() == {3000: "Web"}
    os.utime(path, ns=(stamp + 1_000_000_000, stamp + 1_000_000_000))
    assert labels.labels() == {3000: "Api"}


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


def test_a_label_file_that_fails_to_read_gives_no_labels(tmp_path: Path) -> None:
    """A link to /proc/self/mem: a regular file to stat and fstat, but reading it fails (EIO)."""
    (tmp_path / ".devcontainer.json").symlink_to("/proc/self/mem")
    assert LabelFile(tmp_path).labels() == {}


def test_reading_leaves_no_file_open(tmp_path: Path) -> None:
    """The hub reads a workspace's file at each change of it, for as long as the gateway runs."""
    (tmp_path / "file").write_text("{}")
    (tmp_path / "folder").mkdir()
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(50):
        assert read_regular(tmp_path / "file", 10) == b"{}"
        assert read_regular(tmp_path / "folder", 10) is None
    assert len(os.listdir("/proc/self/fd")) == before


def test_a_label_file_is_read_to_its_first_megabyte_and_no_further(tmp_path: Path) -> None:
    """White space first, so that the labels are whole only in exactly the bytes read; what follows breaks them.
    The megabyte is written out here: sized from ``MOST_READ``, the test would follow any change of it."""
    labels = '{"portsAttributes": {"3000": {"label": "Web"}}}'
    (tmp_path / ".devcontainer.json").write_text(" " * ((1 << 20) - len(labels)) + labels + ' "past the limit"')
    assert LabelFile(tmp_path).labels() == {3000: "Web"}


async def test_a_devcontainer_json_nested_past_the_parser_does_not_break_the_hub(make_gateway: MakeGateway) -> None:
    """json.loads raises RecursionError, not ValueError, for deep nesting: the workspace listing (the hub page and
    its feed read the same view) answered 500 to everyone who may see the workspace, its owner's admins too."""
    client = await make_gateway(workspaces={"a": workspace(next_address(), owner="alice")})
    gateway = gateway_of(client)
    home = Path(gateway.config.local.state_dir) / "workspaces" / "a" / "home"
    home.mkdir(parents=True)
    (home / ".devcontainer.json").write_text("[" * 100_000)
    _record, token = await gateway.auth.store.create_api_token(Identity("alice"), name="t")

    listing = await client.get("/api/v1/workspaces", headers={"Host": "localhost:8080",
                                                               "Authorization": f"Bearer {token}"})

    assert listing.status == 200
    assert [view["id"] for view in (await listing.json())["workspaces"]] == ["a"]


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
