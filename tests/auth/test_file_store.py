"""The file token store as ``serve --workers`` uses it: several stores on one set of files, each a worker.

What changes on every sign-in (one-time codes) and every use (counts) must not rewrite the file of links, tokens
and consents: with 100,000 links and 100,000 tokens that rewrite stopped the event loop for 6–8 s.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from gateway.auth import store as store_module
from gateway.auth.identity import Identity
from gateway.auth.store import FileTokenStore, ShareLink


def _identity(path: Path) -> tuple[int, int]:
    stat = path.stat()
    return stat.st_ino, stat.st_mtime_ns


async def _link(store: FileTokenStore) -> ShareLink:
    link, _ = await store.create_share(workspace="ws1", port=3000, audience="anyone", people=[], created_by="alice",
                                       ttl=3600)
    return link


async def test_sign_in_codes_and_use_counts_leave_the_links_file_alone(tmp_path: Path) -> None:
    path = tmp_path / "tokens.json"
    store = FileTokenStore(path)
    link = await _link(store)
    record, _ = store.create_api_token_now(Identity("alice", "", ()), name="ci")
    before = _identity(path), path.read_bytes()
    assert await store.use_once("handoff-a", time.time() + 60)
    store.use_share(store.shares[link.id])
    store.use_api_token(store.api_tokens[record.id], time.time())
    store.flush()
    assert (_identity(path), path.read_bytes()) == before
    other = FileTokenStore(path)  # another worker sees both, from the files beside it
    assert not await other.use_once("handoff-a", time.time() + 60)
    assert other.shares[link.id].uses == 1
    assert other.api_tokens[record.id].last_used is not None


async def test_use_counts_from_every_worker_add_up_across_rewrites_of_the_links_file(tmp_path: Path) -> None:
    path = tmp_path / "tokens.json"
    first, second = FileTokenStore(path), FileTokenStore(path)
    link = await _link(first)
    for _ in range(3):
        first.use_share(first.shares[link.id])
    for _ in range(2):
        second.use_share(second.shares[link.id])
    first.flush()
    second.flush()
    assert FileTokenStore(path).shares[link.id].uses == 5
    first.use_share(first.shares[link.id])  # not written yet when the links file is rewritten below
    await second.create_share(workspace="ws2", port=3000, audience="anyone", people=[], created_by="bob", ttl=60)
    await first.revoke_share(first.shares[link.id])
    first.flush()
    second.flush()
    for store in (first, second, FileTokenStore(path)):
        assert store.shares[link.id].uses == 6, "each use counted once, whichever file was rewritten"
        assert store.shares[link.id].revoked is not None
    # A rewrite of the links file by a worker with uses not yet written, then another worker writing its own first.
    first.use_share(first.shares[link.id])
    second.use_share(second.shares[link.id])
    await first.create_share(workspace="ws3", port=3000, audience="anyone", people=[], created_by="bob", ttl=60)
    second.flush()
    first.flush()
    assert FileTokenStore(path).shares[link.id].uses == 8


def _older_version_file(path: Path, now: float) -> None:
    """Before the split one file held everything, counts and used one-time codes too."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({
        "shares": [{"id": "l1", "token_hash": "h1", "workspace": "ws1", "port": 3000, "audience": "anyone",
                    "people": [], "created_by": "alice", "created": now, "expires": now + 3600, "revoked": None,
                    "uses": 4, "last_used": now - 10}],
        "api_tokens": [], "consents": [], "used": {"handoff-old": now + 60}}))


async def test_files_of_an_older_version_keep_their_counts_and_used_codes(tmp_path: Path) -> None:
    now = time.time()
    path = tmp_path / "upgraded" / "tokens.json"
    _older_version_file(path, now)
    store = FileTokenStore(path)
    assert store.shares["l1"].uses == 4
    store.use_share(store.shares["l1"])
    store.flush()
    await store.create_share(workspace="ws2", port=3000, audience="anyone", people=[], created_by="bob", ttl=60)
    assert "used" not in json.loads(path.read_text())
    fresh = FileTokenStore(path)
    assert fresh.shares["l1"].uses == 5
    assert not await fresh.use_once("handoff-old", now + 60), "a code used before the upgrade stays used"
    path = tmp_path / "signed-in-first" / "tokens.json"
    _older_version_file(path, now)
    assert not await FileTokenStore(path).use_once("handoff-old", now + 60)


async def test_an_unreadable_file_of_used_codes_refuses_the_codes_given_out_before(tmp_path: Path) -> None:
    """Replay protection must not fail open: after a crash left the file empty, a code that was used (or might
    have been) is refused, while codes given out from then on work."""
    path = tmp_path / "tokens.json"
    first, second = FileTokenStore(path), FileTokenStore(path)
    now = time.time()
    assert await first.use_once("handoff-a", now + 50)
    (tmp_path / "tokens.used.json").write_text("")
    assert not await second.use_once("handoff-a", now + 50)
    assert not await first.use_once("handoff-b", now + 55), "given out before the file broke: maybe used"
    assert await second.use_once("handoff-c", now + 65)
    assert not await first.use_once("handoff-c", now + 65)


async def test_a_counts_line_that_is_not_one_is_skipped(tmp_path: Path) -> None:
    path = tmp_path / "tokens.json"
    store = FileTokenStore(path)
    link = await _link(store)
    store.use_share(store.shares[link.id])
    store.flush()
    with (tmp_path / "tokens.uses.jsonl").open("a") as log:
        log.write(json.dumps({"shares": {link.id: [1]}}) + '\n["not", "counts"]\n')
    other = FileTokenStore(path)
    store.use_share(store.shares[link.id])
    store.flush()
    assert other.shares[link.id].uses == 2
    assert other.find_share("chs_unknown") is None


async def test_a_long_log_of_counts_is_folded_into_the_links_file(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store_module, "LOG_LIMIT", 200)
    path = tmp_path / "tokens.json"
    first, second = FileTokenStore(path), FileTokenStore(path)
    link = await _link(first)
    for round_ in range(10):
        for store in (first, second):
            store.use_share(store.shares[link.id])
            store.flush()
        assert FileTokenStore(path).shares[link.id].uses == 2 * (round_ + 1)
    assert (tmp_path / "tokens.uses.jsonl").stat().st_size < 300
    assert json.loads(path.read_text())["shares"][0]["uses"] >= 10, "folded in"


async def test_a_use_of_a_link_looked_up_before_a_reload_counts(tmp_path: Path) -> None:
    """The fast lane carries a plan out on a later turn of the loop: the link it looked up may have been replaced
    by a reload in between."""
    path = tmp_path / "tokens.json"
    first, second = FileTokenStore(path), FileTokenStore(path)
    link = await _link(first)
    looked_up = first.shares[link.id]
    await second.create_share(workspace="ws2", port=3000, audience="anyone", people=[], created_by="bob", ttl=60)
    first.refresh()
    assert first.shares[link.id] is not looked_up
    first.use_share(looked_up)
    assert first.shares[link.id].uses == 1
    first.flush()
    assert FileTokenStore(path).shares[link.id].uses == 1


async def test_a_log_the_links_file_does_not_name_is_already_counted(tmp_path: Path) -> None:
    """A crash between writing the links file (counts folded in) and starting its new log leaves the old log:
    its counts must not be added twice, and the next batch starts the right log."""
    path = tmp_path / "tokens.json"
    first = FileTokenStore(path)
    link = await _link(first)
    second = FileTokenStore(path)
    for _ in range(3):
        first.use_share(first.shares[link.id])
    first.flush()
    assert second.shares[link.id].uses == 3
    old_log = (tmp_path / "tokens.uses.jsonl").read_bytes()
    await first.create_share(workspace="ws2", port=3000, audience="anyone", people=[], created_by="bob", ttl=60)
    (tmp_path / "tokens.uses.jsonl").write_bytes(old_log)  # as if the new log was never started
    assert second.shares[link.id].uses == 3
    second.use_share(second.shares[link.id])
    second.flush()
    for store in (first, second, FileTokenStore(path)):
        assert store.shares[link.id].uses == 4


async def test_counts_are_read_by_whole_lines_and_after_a_log_that_was_emptied(tmp_path: Path) -> None:
    path = tmp_path / "tokens.json"
    first = FileTokenStore(path)
    link = await _link(first)
    second = FileTokenStore(path)
    first.use_share(first.shares[link.id])
    first.flush()
    log = tmp_path / "tokens.uses.jsonl"
    line = json.dumps({"shares": {link.id: [2, time.time()]}}).encode() + b"\n"
    with log.open("ab") as handle:  # another worker half-way through a line when this one looks
        handle.write(line[:10])
    assert second.shares[link.id].uses == 1
    with log.open("ab") as handle:
        handle.write(line[10:])
    assert second.shares[link.id].uses == 3
    log.write_bytes(b"")  # emptied by a crash, with both workers still running: the counts it held are lost
    second.use_share(second.shares[link.id])
    second.flush()
    assert FileTokenStore(path).shares[link.id].uses == 1, "but the ones after it are not"
    log.unlink()  # removed
    second.use_share(second.shares[link.id])
    second.flush()
    assert FileTokenStore(path).shares[link.id].uses == 1, "its counts are lost, the next batch's are not"


async def test_a_log_of_counts_that_cannot_be_written_keeps_the_counts_and_the_worker(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A full disk (here: a directory where the log goes) must not end the task that flushes every 2 s, nor a lookup."""
    path = tmp_path / "tokens.json"
    store = FileTokenStore(path)
    link = await _link(store)
    token_link, token = await store.create_share(workspace="ws1", port=3000, audience="anyone", people=[],
                                                 created_by="alice", ttl=3600)
    blocker = tmp_path / "tokens.uses.jsonl"
    blocker.unlink()
    blocker.mkdir()
    assert store.find_share(token) is not None, "a log that cannot be read is not counted, and lookups go on"
    store.use_share(store.shares[link.id])
    store.flush()
    assert "use counts not written" in caplog.text
    assert len([r for r in caplog.records if "use counts not written" in r.getMessage()]) == 1
    blocker.rmdir()
    store.flush()
    assert FileTokenStore(path).shares[link.id].uses == 1, "kept, and written on the next try"
    assert FileTokenStore(path).shares[token_link.id].uses == 0
