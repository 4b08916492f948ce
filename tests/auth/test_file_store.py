"""The file token store as ``serve --workers`` uses it: several stores on one set of files, each a worker.

What changes on every sign-in (one-time codes) and every use (counts) must not rewrite the file of links, tokens
and consents: with 100,000 links and 100,000 tokens that rewrite stopped the event loop for 6–8 s.
"""

from __future__ import annotations

import errno
import fcntl
import gc
import json
import math
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from gateway.auth import store as store_module
from gateway.auth.identity import Identity
from gateway.auth.sessions import SignIn
from gateway.auth.store import Consent, FileTokenStore, ShareLink, StoreUnavailable


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


async def test_used_codes_of_an_older_version_stay_in_the_links_file_while_their_own_cannot_be_read(
        tmp_path: Path) -> None:
    """They move to the used-codes file with the first change; when that file cannot be read then (here: a
    directory where it goes) they stay where they were, and a code used before the upgrade stays used."""
    now = time.time()
    path = tmp_path / "tokens.json"
    _older_version_file(path, now)
    used = tmp_path / "tokens.used.json"
    used.mkdir()
    await _link(FileTokenStore(path))
    assert json.loads(path.read_text())["used"] == {"handoff-old": now + 60}
    used.rmdir()
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


async def test_a_file_of_used_codes_nested_past_the_parser_is_one_that_cannot_be_read(tmp_path: Path) -> None:
    """``[[[…`` makes the parser raise RecursionError, not ValueError: every sign-in to a preview answered 500, and
    for good, as nothing then replaced the file. It is a file that cannot be read, like an empty one: the codes
    given out before are refused, the later ones work; and a change to the links file still goes through."""
    path = tmp_path / "tokens.json"
    now = time.time()
    _older_version_file(path, now)  # with used codes of its own, which a change moves to the used-codes file
    (tmp_path / "tokens.used.json").write_text("[" * 100_000)
    store = FileTokenStore(path)
    assert not await store.use_once("handoff-a", now + 50), "given out before the file broke: maybe used"
    assert await store.use_once("handoff-c", now + 65)
    assert not await FileTokenStore(path).use_once("handoff-c", now + 65)
    (tmp_path / "tokens.used.json").write_text("[" * 100_000)
    await _link(FileTokenStore(path))
    assert not await FileTokenStore(path).use_once("handoff-old", now + 60), "still used"


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


async def test_counts_of_a_revoked_token_do_not_cost_the_rest_of_their_batch(tmp_path: Path) -> None:
    """A worker's batch may name a token another worker revoked since (its record is gone, unlike a link's), or a
    link the file no longer has (put back from a backup): the rest of the line still counts, in every worker, and
    the worker whose batch it is reloads the file as it did."""
    path = tmp_path / "tokens.json"
    first = FileTokenStore(path)
    link, token = await first.create_share(workspace="ws1", port=3000, audience="anyone", people=[],
                                           created_by="alice", ttl=3600)
    record, _ = first.create_api_token_now(Identity("alice", "", ()), name="ci")
    second = FileTokenStore(path)
    first.use_api_token(first.api_tokens[record.id], time.time())
    first.use_share(first.shares[link.id])
    await second.revoke_api_token(second.api_tokens[record.id])
    assert first.find_share(token) is not None, "reloaded, with counts for a token it no longer has"
    assert first.shares[link.id].uses == 1
    first.flush()
    with (tmp_path / "tokens.uses.jsonl").open("a") as log:
        log.write(json.dumps({"shares": {"gone": [7, time.time()], link.id: [2, time.time()]}}) + "\n")
    for store in (first, second, FileTokenStore(path)):
        assert store.shares[link.id].uses == 3
        assert record.id not in store.api_tokens


async def test_a_worker_lists_the_links_and_tokens_another_made(tmp_path: Path) -> None:
    """The hub lists a workspace's links from the index by workspace, which a reload builds again, and a person's
    tokens from the map of tokens, which a lookup by hub cookie never reloads on its own."""
    path = tmp_path / "tokens.json"
    first, second = FileTokenStore(path), FileTokenStore(path)
    now = time.time()
    older, _ = await first.create_share(workspace="ws1", port=3000, audience="anyone", people=[], created_by="alice",
                                        ttl=3600, now=now - 1)
    newer, _ = await first.create_share(workspace="ws1", port=None, audience="anyone", people=[], created_by="alice",
                                        ttl=3600, now=now)
    await first.create_share(workspace="ws2", port=3000, audience="anyone", people=[], created_by="bob", ttl=60)
    assert (older.created, older.expires) == (now - 1, now - 1 + 3600)
    assert [link.id for link in second.shares_of("ws1")] == [newer.id, older.id]
    assert [link.id for link in FileTokenStore(path).shares_of("ws1")] == [newer.id, older.id]
    record, _ = first.create_api_token_now(Identity("alice", "", ()), name="ci")
    assert list(second.api_tokens) == [record.id]
    await first.revoke_api_token(record)
    assert list(second.api_tokens) == []


async def test_a_revoke_through_one_worker_refuses_the_token_and_link_in_every_other(tmp_path: Path) -> None:
    """Someone who holds a revoked token or link gets nothing from the next request, whichever worker takes it;
    and a link looked up before the revoke (a plan still being carried out) reads as revoked too."""
    path = tmp_path / "tokens.json"
    first, second = FileTokenStore(path), FileTokenStore(path)
    record, secret = first.create_api_token_now(Identity("alice", "", ()), name="ci")
    _, token = await first.create_share(workspace="ws1", port=3000, audience="anyone", people=[],
                                        created_by="alice", ttl=3600)
    assert second.find_api_token(secret) is not None
    held = second.find_share(token)
    assert held is not None
    await first.revoke_api_token(first.api_tokens[record.id])
    assert second.find_api_token(secret) is None
    await first.create_share(workspace="ws2", port=3000, audience="anyone", people=[], created_by="bob", ttl=60)
    at = time.time()
    revoked = await second.revoke_share(held, now=at)  # ``second`` reads the file again first: ``held`` is old
    assert revoked is not held
    assert revoked.revoked == held.revoked == at
    assert not revoked.active(time.time())
    assert not held.active(time.time())
    found = first.find_share(token)
    assert found is not None
    assert not found.active(time.time())


async def test_a_log_left_without_its_links_file_is_no_error(tmp_path: Path) -> None:
    """The links file removed (to start again) and its log left beside it: a worker starts, and the links made
    from then on count from nothing."""
    path = tmp_path / "tokens.json"
    first = FileTokenStore(path)
    link = await _link(first)
    for _ in range(3):
        first.use_share(first.shares[link.id])
    first.flush()
    path.unlink()
    store = FileTokenStore(path)
    assert store.shares == {}
    made = await _link(store)
    store.use_share(store.shares[made.id])
    store.flush()
    assert FileTokenStore(path).shares[made.id].uses == 1


async def test_a_reload_leaves_the_garbage_collector_as_it_found_it(tmp_path: Path) -> None:
    """It is paused while the records are built (a reload of 200,000 spent a third of its time in it): left
    off, every cycle the process makes after its first reload would be garbage for good."""
    path = tmp_path / "tokens.json"
    writer, reader = FileTokenStore(path), FileTokenStore(path)
    try:
        for enabled in (True, False):
            gc.enable() if enabled else gc.disable()
            await _link(writer)
            assert reader.shares_of("ws1")
            assert gc.isenabled() is enabled
    finally:
        gc.enable()


async def test_a_store_without_a_file_keeps_everything_in_memory() -> None:
    """``FileTokenStore(None)``: no file, no lock, no log; the same answers, for one process."""
    store = FileTokenStore(None)
    link, token = await store.create_share(workspace="ws1", port=3000, audience="anyone", people=[],
                                           created_by="alice", ttl=3600)
    record, secret = store.create_api_token_now(Identity("alice", "", ()), name="ci")
    assert (store.find_share(token), store.find_api_token(secret)) == (link, record)
    store.use_share(link)
    store.flush()
    assert store.shares[link.id].uses == 1
    assert await store.use_once("handoff-a", time.time() + 60)
    assert not await store.use_once("handoff-a", time.time() + 60)
    await store.revoke_share(link)
    await store.revoke_api_token(record)
    assert not store.shares[link.id].active(time.time())
    assert store.find_api_token(secret) is None


async def test_counts_still_batched_are_written_on_close(tmp_path: Path) -> None:
    """A worker stopping writes what it counted since its last batch."""
    path = tmp_path / "tokens.json"
    store = FileTokenStore(path)
    link = await _link(store)
    store.use_share(store.shares[link.id])
    await store.close()
    assert FileTokenStore(path).shares[link.id].uses == 1


async def test_the_files_are_made_with_their_folder_and_for_their_owner_only(tmp_path: Path) -> None:
    """They hold token hashes and who used what: made readable by their owner alone, in a state folder that need
    not be there yet."""
    path = tmp_path / "state" / "new" / "tokens.json"
    store = FileTokenStore(path)
    link = await _link(store)
    assert await store.use_once("handoff-a", time.time() + 60)
    store.use_share(store.shares[link.id])
    store.flush()
    made = {name: os.stat(path.parent / name).st_mode & 0o777 for name in os.listdir(path.parent)}
    assert made == dict.fromkeys(["tokens.json", "tokens.json.lock", "tokens.used.json", "tokens.uses.jsonl"], 0o600)


def _waiting_for_lock(inode: int) -> bool:
    """Someone waits for a flock on this inode (``/proc/locks`` lists waiters with ``->``)."""
    return any(line.split()[1] == "->" and line.split()[6].endswith(f":{inode}")
               for line in Path("/proc/locks").read_text().splitlines())


def test_a_writer_waits_for_the_lock_and_then_reads_what_the_holder_wrote(tmp_path: Path) -> None:
    """What keeps two workers from writing over each other's changes: the writer takes ``flock`` on the lock file
    and only then reads the file. Here the test holds the lock (as another worker would), changes the file while
    the writer waits, and lets go: both changes are kept."""
    path = tmp_path / "tokens.json"
    store = FileTokenStore(path)
    store.create_api_token_now(Identity("alice", "", ()), name="first")
    lock = os.open(tmp_path / "tokens.json.lock", os.O_RDWR)
    fcntl.flock(lock, fcntl.LOCK_EX)
    made: list[str] = []
    writer = threading.Thread(target=lambda: made.append(
        store.create_api_token_now(Identity("bob", "", ()), name="waited")[0].id))
    try:
        writer.start()
        while writer.is_alive() and not _waiting_for_lock(os.fstat(lock).st_ino):
            writer.join(0.01)
        assert writer.is_alive(), "the writer went on without the lock"
        data = json.loads(path.read_text())
        data["api_tokens"].append({**data["api_tokens"][0], "id": "other", "token_hash": "h", "name": "other"})
        path.write_text(json.dumps(data))
    finally:
        os.close(lock)
        writer.join()
    assert sorted(token.name for token in FileTokenStore(path).api_tokens.values()) == ["first", "other", "waited"]


async def test_a_batch_with_nothing_new_writes_nothing(tmp_path: Path) -> None:
    """Batches go every 2 s from every worker: one with no use since the last writes no line, and a use is
    counted at the time the request was decided (``use_share``'s ``now``), once."""
    path = tmp_path / "tokens.json"
    store = FileTokenStore(path)
    link = await _link(store)
    record, _ = store.create_api_token_now(Identity("alice", "", ()), name="ci")
    store.use_share(store.shares[link.id], 1_000.0)
    store.use_api_token(store.api_tokens[record.id], 2_000.0)
    store.flush()
    log = tmp_path / "tokens.uses.jsonl"
    written = log.read_bytes()
    store.flush()
    assert log.read_bytes() == written
    fresh = FileTokenStore(path)
    assert (fresh.shares[link.id].uses, fresh.shares[link.id].last_used) == (1, 1_000.0)
    assert fresh.api_tokens[record.id].last_used == 2_000.0


def test_a_link_is_expired_from_its_expiry_on() -> None:
    link = ShareLink(id="l1", token_hash="h", workspace="ws1", port=3000, audience="anyone", people=[],
                     created_by="alice", created=1_000.0, expires=2_000.0)
    assert link.active(1_999.999)
    assert not link.active(2_000.0)
    link.revoked = 1_500.0
    assert not link.active(1_600.0)


async def test_answers_on_the_consent_page_read_back_with_their_time(tmp_path: Path) -> None:
    path = tmp_path / "tokens.json"
    store = FileTokenStore(path)
    before = time.time()
    now_given = Consent.answer("bob", "ws1", 3000, owner="alice", share=True, claims=["email"], now=1_000.0)
    clock = Consent.answer("carol", "ws1", 3000, owner="alice", share=False, claims=[])
    for consent in (now_given, clock):
        await store.record_consent(consent)
    fresh = FileTokenStore(path).consents
    assert fresh[now_given.id].at == 1_000.0
    assert before <= fresh[clock.id].at <= time.time()
    assert fresh[clock.id].of("alice")
    assert not fresh[clock.id].of("mallory")


async def test_an_answer_withdrawn_through_one_worker_no_longer_applies_in_another(tmp_path: Path) -> None:
    """A visitor who takes back "share" must not be named to the app by whichever worker takes its next request:
    every worker reads the answers from the file, as it reads the links."""
    path = tmp_path / "tokens.json"
    first, second = FileTokenStore(path), FileTokenStore(path)
    consent = Consent.answer("bob", "ws1", 3000, owner="alice", share=True, claims=["email"])
    assert second.consents == {}
    await first.record_consent(consent)
    assert second.consents[consent.id].share
    await first.withdraw_consent(consent)
    assert consent.id not in second.consents


async def test_a_second_revoke_keeps_the_time_of_the_first(tmp_path: Path) -> None:
    path = tmp_path / "tokens.json"
    store = FileTokenStore(path)
    link = await _link(store)
    await store.revoke_share(store.shares[link.id], now=1_000.0)
    again = await FileTokenStore(path).revoke_share(link, now=2_000.0)
    assert again.revoked == FileTokenStore(path).shares[link.id].revoked == 1_000.0


async def test_a_code_that_expires_at_the_reset_was_given_out_before_it(tmp_path: Path) -> None:
    """After the used-codes file could not be read, codes expiring up to a hand-off's life from then may have
    been used: the reset time itself included."""
    store = FileTokenStore(tmp_path / "tokens.json")
    reset = time.time() + 30
    (tmp_path / "tokens.used.json").write_text(json.dumps({"": reset}))
    assert not await store.use_once("handoff-a", reset)
    assert await store.use_once("handoff-b", reset + 1)


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


async def test_a_log_of_counts_is_folded_only_once_it_is_past_its_limit(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "tokens.json"
    store = FileTokenStore(path)
    link = await _link(store)
    store.use_share(store.shares[link.id])
    store.flush()
    monkeypatch.setattr(store_module, "LOG_LIMIT", (tmp_path / "tokens.uses.jsonl").stat().st_size)
    before = _identity(path)
    store.use_share(store.shares[link.id])
    store.flush()
    assert _identity(path) == before, "at its limit: appended to"
    store.use_share(store.shares[link.id])
    store.flush()
    assert _identity(path) != before, "past it: folded in"
    assert FileTokenStore(path).shares[link.id].uses == 3


async def test_a_use_of_a_token_shows_in_its_worker_before_and_after_a_reload(tmp_path: Path) -> None:
    """The hub lists a person's tokens with their last use as its worker holds them: a use not yet written shows
    there at once, and still after another worker's change made this one read the file again."""
    path = tmp_path / "tokens.json"
    first, second = FileTokenStore(path), FileTokenStore(path)
    record, _ = first.create_api_token_now(Identity("alice", "", ()), name="ci")
    first.use_api_token(first.api_tokens[record.id], 1_000.0)
    assert first.api_tokens[record.id].last_used == 1_000.0
    await _link(second)
    assert first.api_tokens[record.id].last_used == 1_000.0, "read again, with the batch not yet written"
    first.flush()
    assert first.api_tokens[record.id].last_used == FileTokenStore(path).api_tokens[record.id].last_used == 1_000.0


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
    first.use_share(looked_up, 1_000.0)
    assert (first.shares[link.id].uses, first.shares[link.id].last_used) == (1, 1_000.0)
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


def _unreadable_log(monkeypatch: pytest.MonkeyPatch) -> None:
    """The log refuses to be read (EIO, EACCES). Mocked: as root here no real file refuses its owner."""
    real = Path.open

    def open_(self: Path, *args: Any, **kwargs: Any) -> Any:
        if self.name.endswith(".uses.jsonl"):
            raise OSError(errno.EIO, "Input/output error")
        return real(self, *args, **kwargs)
    monkeypatch.setattr(Path, "open", open_)


async def test_a_log_that_cannot_be_read_is_neither_replaced_nor_skipped_by_a_writer(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "tokens.json"
    first = FileTokenStore(path)
    link = await _link(first)
    second, third = FileTokenStore(path), FileTokenStore(path)
    for _ in range(5):
        second.use_share(second.shares[link.id])
    second.flush()
    first.refresh()
    for _ in range(2):
        second.use_share(second.shares[link.id])
    second.flush()  # two lines ``first`` has not read
    with monkeypatch.context() as patch:
        _unreadable_log(patch)
        third.use_share(third.shares[link.id])  # fresh records: it would start the log over, dropping the 7
        third.flush()
        first.use_share(first.shares[link.id])  # would append after the line it knows, and skip the 2
        first.flush()
    second.use_share(second.shares[link.id])
    second.flush()
    third.flush()
    first.flush()
    assert FileTokenStore(path).shares[link.id].uses == 10
    assert first.shares[link.id].uses == 10
    await first.create_share(workspace="ws2", port=3000, audience="anyone", people=[], created_by="bob", ttl=60)
    assert FileTokenStore(path).shares[link.id].uses == 10, "and the same once folded into the links file"


async def test_a_batch_cut_short_is_not_joined_to_the_next(tmp_path: Path) -> None:
    """A full disk, or a worker killed, part way through appending a batch leaves half a line at the end."""
    path = tmp_path / "tokens.json"
    first, second = FileTokenStore(path), FileTokenStore(path)
    link = await _link(first)
    first.use_share(first.shares[link.id])
    first.flush()
    with (tmp_path / "tokens.uses.jsonl").open("ab") as log:
        log.write(b'{"shares": {"' + link.id.encode() + b'": [3, ')
    for _ in range(2):
        second.use_share(second.shares[link.id])
    second.flush()
    first.use_share(first.shares[link.id])
    first.flush()
    for store in (first, second, FileTokenStore(path)):
        assert store.shares[link.id].uses == 4


def _fold_with_no_room_for_a_log(patch: pytest.MonkeyPatch) -> None:
    """The next batch folds the log into the links file (the log is "long"), and the disk then has no room for the
    new log: mocked for that one file, as a real disk cannot be made full for one file only."""
    real = store_module._replace

    def replace(target: Path, text: str) -> None:
        if target.name.endswith(".uses.jsonl"):
            raise OSError(errno.ENOSPC, "No space left on device")
        real(target, text)
    patch.setattr(store_module, "LOG_LIMIT", 0)
    patch.setattr(store_module, "_replace", replace)


async def test_a_fold_whose_new_log_cannot_be_started_counts_each_use_once(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The links file was replaced with the counts folded in (replacing frees the old copy's space), then the disk
    had no room for the new log. Mocked for that one file: a real disk cannot be made full for one file only."""
    path = tmp_path / "tokens.json"
    first, second = FileTokenStore(path), FileTokenStore(path)
    link = await _link(first)
    first.use_share(first.shares[link.id])
    with monkeypatch.context() as patch:
        _fold_with_no_room_for_a_log(patch)
        first.flush()
        made = await _link(first)  # done, though the log could not be started again: the link is given out
    assert FileTokenStore(path).shares[made.id].revoked is None
    first.flush()
    second.use_share(second.shares[link.id])
    second.flush()
    first.use_share(first.shares[link.id])
    first.flush()
    for store in (first, second, FileTokenStore(path)):
        assert store.shares[link.id].uses == 3


async def test_a_fold_whose_new_log_cannot_be_started_has_the_next_batch_start_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """The same worker's next batch must not go to the old log, whose first line names the links file before the
    fold: every other worker skips such a log as already counted."""
    path = tmp_path / "tokens.json"
    store = FileTokenStore(path)
    link = await _link(store)
    store.use_share(store.shares[link.id])
    with monkeypatch.context() as patch:
        _fold_with_no_room_for_a_log(patch)
        store.flush()
    assert "not started" in caplog.text
    store.use_share(store.shares[link.id])
    store.flush()
    assert FileTokenStore(path).shares[link.id].uses == 2


_ON_A_FULL_DISK = """
import asyncio, json, os, sys
from pathlib import Path
from gateway.auth.store import FileTokenStore, StoreUnavailable
folder = Path(sys.argv[1])
first, second = FileTokenStore(folder / "tokens.json"), FileTokenStore(folder / "tokens.json")
async def links():
    return [(await first.create_share(workspace="ws1", port=3000, audience="anyone", people=[], created_by="a",
                                      ttl=3600))[0] for _ in range(120)]
made = asyncio.run(links())
second.refresh()
fd = os.open(folder / "filler", os.O_WRONLY | os.O_CREAT)
try:
    while True:
        os.write(fd, bytes(4096))
except OSError:
    pass
os.close(fd)
for link in made:
    first.use_share(first.shares[link.id])
first.flush()  # 120 counts: more than the room left, so part of the line is on disk
cut_short = not (folder / "tokens.uses.jsonl").read_bytes().endswith(b"\\n")
try:
    asyncio.run(first.create_share(workspace="ws2", port=3000, audience="anyone", people=[], created_by="a", ttl=60))
except StoreUnavailable:
    pass
leftovers = sorted(path.name for path in folder.glob("*.tmp"))
unsaved = [link.id for link in first.shares.values() if link.workspace == "ws2"]
os.unlink(folder / "filler")
second.use_share(second.shares[made[0].id])
second.flush()
first.flush()
totals = [sum(link.uses for link in store.shares.values())
          for store in (first, second, FileTokenStore(folder / "tokens.json"))]
print(json.dumps({"cut_short": cut_short, "leftovers": leftovers, "unsaved": unsaved, "totals": totals}))
"""


def test_a_full_disk_loses_no_count_and_leaves_nothing_behind(tmp_path: Path) -> None:
    """A real full disk: a 512 KiB tmpfs, in a mount namespace of the script's own (``unshare --mount``)."""
    folder = tmp_path / "data"
    folder.mkdir()
    unshare = shutil.which("unshare")
    assert unshare is not None, "util-linux's unshare is part of the base system"
    script = f'mount -t tmpfs -o size=512k codehub-full "{folder}" && exec "$0" "$@"'
    done = subprocess.run([unshare, "--mount", "--propagation", "private", "sh", "-c", script, sys.executable,
                           "-c", _ON_A_FULL_DISK, str(folder)], capture_output=True, text=True, timeout=60,
                          cwd=Path(__file__).parents[2], check=False)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["cut_short"], "the disk filled part way through a batch, as meant"
    assert result["leftovers"] == [], "a links file that could not be written is not left half-written"
    assert result["unsaved"] == [], "a link that could not be saved is not kept by the worker that made it"
    assert result["totals"] == [121, 121, 121]
    assert "use counts not written" in done.stderr


async def test_a_log_that_cannot_be_read_stops_no_revoke_and_no_sign_in(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Counts are statistics: a writer that cannot read them goes on (they may be lost), and only the batch of counts
    waits for the log."""
    path = tmp_path / "tokens.json"
    first, second = FileTokenStore(path), FileTokenStore(path)
    link = await _link(first)
    second.use_share(second.shares[link.id])
    second.flush()
    with monkeypatch.context() as patch:
        _unreadable_log(patch)
        assert await first.use_once("handoff-a", time.time() + 60)
        await first.revoke_share(first.shares[link.id])
        await _link(first)
    assert FileTokenStore(path).shares[link.id].revoked is not None
    assert not await second.use_once("handoff-a", time.time() + 60)


async def test_a_links_file_that_cannot_be_read_is_never_written_over_nor_trusted(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Emptied, as a crash before the data reached the disk can leave it, or edited into something this version
    does not read. Writing what a worker holds would undo what others changed (a revoke); a new process holds
    nothing at all. And what a worker holds may lack a revoke: share links and tokens answer 503 until it is mended."""
    path = tmp_path / "tokens.json"
    first, second = FileTokenStore(path), FileTokenStore(path)
    link, token = await first.create_share(workspace="ws1", port=3000, audience="anyone", people=[],
                                           created_by="alice", ttl=3600)
    held = first.shares[link.id]
    first.use_share(held)
    first.flush()
    for _ in range(3):
        second.use_share(second.shares[link.id])
        second.flush()
    await second.create_share(workspace="ws2", port=3000, audience="anyone", people=[], created_by="bob", ttl=60)
    for _ in range(2):  # in the new log, which ``first`` cannot know goes with the file it cannot read
        second.use_share(second.shares[link.id])
        second.flush()
    good = path.read_bytes()
    record = json.loads(good)["shares"][0]
    for broken in ("", '{"shares": [', json.dumps({"shares": [{**record, "revokd": 1}]}), "[" * 100_000):
        path.write_text(broken)
        caplog.clear()
        first.use_share(held)
        first.flush()  # kept
        for _ in range(3):
            with pytest.raises(StoreUnavailable) as refused:
                first.find_share(token)
            assert (refused.value.status, refused.value.retry) == (503, True), "a reload may find it mended"
        with pytest.raises(StoreUnavailable):
            await first.revoke_share(held)
        fresh = FileTokenStore(path)  # a worker or the CLI starting: it starts, and answers 503
        with pytest.raises(StoreUnavailable):
            fresh.create_api_token_now(Identity("alice", "", ()), name="ci")
        assert path.read_text() == broken
        assert len([r for r in caplog.records if "answer 503" in r.getMessage()]) == 2, "once per process"
    path.write_text(json.dumps({"shares": [{**record, "revoked": time.time(), "uses": None}]}))
    first.use_share(held)  # counts not yet written, which the reload adds to a record it cannot add to
    with pytest.raises(StoreUnavailable):
        first.find_share(token)
    with pytest.raises(StoreUnavailable):
        first.find_share(token)  # not the records half loaded: the link would be active, its revoke unseen
    assert await first.use_once("handoff-a", time.time() + 60), "a sign-in needs nothing of that file"
    path.write_bytes(good)
    first.flush()
    assert FileTokenStore(path).shares[link.id].uses == 11
    assert first.find_share(token) is not None


async def test_a_line_of_counts_this_version_cannot_read_is_skipped_once(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "tokens.json"
    first = FileTokenStore(path)
    link, token = await first.create_share(workspace="ws1", port=3000, audience="anyone", people=[],
                                           created_by="alice", ttl=3600)
    first.use_share(first.shares[link.id])
    first.flush()
    used_at = first.shares[link.id].last_used
    with (tmp_path / "tokens.uses.jsonl").open("ab") as log:
        for line in ([1e400, 0], [1, 1e400]):  # too many uses; a last use of Infinity, which no hub could show
            log.write(json.dumps({"shares": {link.id: line}}).encode() + b"\n")
        log.write(json.dumps({"shares": {link.id: [5, 1]}, "tokens": {"t": "soon"}}).encode() + b"\n")  # none of it
        log.write(b"[" * 100_000 + b"\n")
    second = FileTokenStore(path)
    for _ in range(3):
        assert second.find_share(token) is not None
    assert second.shares[link.id].uses == 1
    assert second.shares[link.id].last_used == used_at
    assert len([r for r in caplog.records if "a line of use counts skipped" in r.getMessage()]) == 4


async def test_a_broken_links_file_costs_only_the_requests_that_carry_a_token_of_ours(tmp_path: Path) -> None:
    """An app's own bearer token (or any text in the share parameter) is no lookup: its requests go on while the
    file cannot be read; a token of ours is 503 then."""
    path = tmp_path / "tokens.json"
    store = FileTokenStore(path)
    await _link(store)
    path.write_text("{")
    assert store.find_share("app-token") is None
    assert store.find_api_token("app-token") is None
    assert store.find_api_token("chs_a-share-token-is-no-api-token") is None
    for lookup, token in ((store.find_share, "chs_x"), (store.find_api_token, "chk_x")):
        with pytest.raises(StoreUnavailable):
            lookup(token)


async def test_a_store_whose_folder_is_a_file_is_unavailable_and_says_so_once(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A stat that fails for another reason than "no such file" (here ENOTDIR) is not an empty store."""
    (tmp_path / "state").write_text("")
    store = FileTokenStore(tmp_path / "state" / "tokens.json")
    for _ in range(3):
        with pytest.raises(StoreUnavailable) as refused:
            store.find_share("chs_x")
        assert refused.value.retry, "a look a moment later may find it mended"
    with pytest.raises(StoreUnavailable):
        await _link(store)
    assert len([r for r in caplog.records if "answer 503" in r.getMessage()]) == 2, "once per failure"


async def test_a_change_that_could_not_write_the_first_links_file_is_not_kept(tmp_path: Path) -> None:
    """With a file, a change that cannot be written goes when the file is read again; with none yet there was
    nothing to read it away from: the link (or token) the caller was told was not made stayed in the worker, shown
    on its hub, and went into the file with the next change that could be written."""
    path = tmp_path / "tokens.json"
    store = FileTokenStore(path)
    blocker = tmp_path / f"tokens.json.{os.getpid()}.tmp"  # where the file is written first: it cannot be, as on
    blocker.mkdir()  # a full disk
    with pytest.raises(StoreUnavailable):
        await _link(store)
    with pytest.raises(StoreUnavailable):
        store.create_api_token_now(Identity("alice", "", ()), name="ci")
    assert (store.shares, store.shares_of("ws1"), store.api_tokens) == ({}, [], {})
    blocker.rmdir()
    made = await store.create_share(workspace="ws2", port=3000, audience="anyone", people=[], created_by="bob",
                                    ttl=60)
    fresh = FileTokenStore(path)
    assert (list(fresh.shares), fresh.api_tokens) == ([made[0].id], {})
    blocker.mkdir()  # and with the file there: the change goes as the file is read again
    with pytest.raises(StoreUnavailable):
        await _link(store)
    assert (list(store.shares), store.shares_of("ws1")) == ([made[0].id], [])


async def test_a_sign_in_code_that_cannot_be_recorded_is_not_admitted(tmp_path: Path) -> None:
    store = FileTokenStore(tmp_path / "tokens.json")
    (tmp_path / "tokens.used.json").mkdir()  # cannot be replaced, as on a full disk
    with pytest.raises(StoreUnavailable):
        await store.use_once("handoff-a", time.time() + 60)
    assert not [name for name in os.listdir(tmp_path) if name.endswith(".tmp")], "nothing half-written left behind"


async def test_a_broken_links_file_is_parsed_once_and_each_breakage_said_once(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """Lookups come with every share-link request, and the file may be 55 MB: its bytes are parsed once, not per
    lookup. It is said once per breakage, and again when it breaks again after a mend."""
    path = tmp_path / "tokens.json"
    store = FileTokenStore(path)
    await _link(store)
    good = path.read_bytes()
    reads: list[Path] = []
    real = Path.read_text

    def counted(self: Path, *args: Any, **kwargs: Any) -> str:
        reads.append(self)
        return real(self, *args, **kwargs)
    monkeypatch.setattr(Path, "read_text", counted)
    for _ in range(2):
        path.write_text("")
        for _ in range(3):
            with pytest.raises(StoreUnavailable):
                store.find_share("chs_x")
        path.write_bytes(good)
        assert store.find_share("chs_x") is None
    assert reads.count(path) == 4, "each version of the file read once"
    assert len([r for r in caplog.records if "answer 503" in r.getMessage()]) == 2


_WRONG_TYPES = [  # a field of a record, edited by hand into what this version cannot use
    ("shares", "people", 5), ("shares", "people", ["alice", 5]), ("shares", "expires", "soon"),
    ("shares", "expires", float("inf")), ("shares", "port", "3000"), ("shares", "port", True),
    ("shares", "uses", 1.5), ("shares", "revoked", "yes"), ("shares", "workspace", None), ("shares", "created", True),
    ("api_tokens", "groups", "admins"), ("api_tokens", "attributes", {"team": 1}), ("api_tokens", "created", None),
    ("consents", "share", 1), ("consents", "claims", "email"),
]


@pytest.mark.parametrize(("kind", "field", "value"), _WRONG_TYPES)
async def test_a_record_edited_into_the_wrong_types_is_refused_and_named(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, kind: str, field: str, value: object) -> None:
    """Each of these once loaded, and the first request that used the field answered 500 with a traceback (a
    list of people that is a number), or a JSON the hub cannot parse (an expiry of Infinity). Refused as a
    whole file, as one that does not parse: skipping the record would let the next writer drop it."""
    path = tmp_path / "tokens.json"
    store = FileTokenStore(path)
    _, token = await store.create_share(workspace="ws1", port=3000, audience="people", people=["alice"],
                                           created_by="alice", ttl=3600)
    store.create_api_token_now(Identity("alice", "", ()), name="ci")
    await store.record_consent(Consent.answer("bob", "ws1", 3000, owner="alice", share=True, claims=["email"]))
    data = json.loads(path.read_text())
    data[kind][0][field] = value
    path.write_text(json.dumps(data))
    caplog.clear()
    with pytest.raises(StoreUnavailable):
        store.find_share(token)
    said = [r.getMessage() for r in caplog.records if "answer 503" in r.getMessage()]
    assert len(said) == 1, said
    assert f": {field} is not " in said[0], said


async def test_times_stored_as_whole_numbers_load(tmp_path: Path) -> None:
    """JSON has one kind of number: a time written as ``1700000000`` (by hand, or by another writer) is a time,
    not a file to refuse whole."""
    path = tmp_path / "tokens.json"
    store = FileTokenStore(path)
    _, token = await store.create_share(workspace="ws1", port=3000, audience="anyone", people=[],
                                        created_by="alice", ttl=3600)
    data = json.loads(path.read_text())
    data["shares"][0].update(created=1_700_000_000, expires=int(time.time()) + 3600)
    path.write_text(json.dumps(data))
    found = FileTokenStore(path).find_share(token)
    assert found is not None
    assert found.active(time.time())


async def test_a_link_stored_with_an_expiry_of_nan_loads_expired(tmp_path: Path) -> None:
    """What a ``ttl`` of NaN made before durations had to be finite: it never granted anything (``now < NaN`` is
    false), and the hub, which embeds it as JSON, could not be drawn for anyone who sees the workspace."""
    path = tmp_path / "tokens.json"
    store = FileTokenStore(path)
    _, token = await store.create_share(workspace="ws1", port=3000, audience="anyone", people=[],
                                        created_by="alice", ttl=3600)
    data = json.loads(path.read_text())
    data["shares"][0]["expires"] = float("nan")
    path.write_text(json.dumps(data))
    found = FileTokenStore(path).find_share(token)
    assert found is not None
    assert not found.active(time.time())
    assert found.expires == found.created, "expired when it was made, not in 1970"
    json.loads(json.dumps(found.public()), parse_constant=pytest.fail)


async def test_used_codes_an_older_version_kept_must_be_times(tmp_path: Path) -> None:
    path = tmp_path / "tokens.json"
    _older_version_file(path, time.time())
    data = json.loads(path.read_text())
    data["used"] = {"handoff-a": "later"}
    path.write_text(json.dumps(data))
    with pytest.raises(StoreUnavailable):
        FileTokenStore(path).find_share("chs_x")


async def test_links_expired_over_a_day_ago_are_forgotten_with_the_next_new_link(tmp_path: Path) -> None:
    """As the Kubernetes store's leader deletes them (``kubernetes.share_retention``): otherwise every link ever
    made stays in the file that each change rewrites whole, and in the hub of everyone who sees the workspace."""
    path = tmp_path / "tokens.json"
    store = FileTokenStore(path)
    now = time.time()
    _, old_token = await store.create_share(workspace="ws1", port=3000, audience="anyone", people=[],
                                            created_by="alice", ttl=60, now=now - store_module.SHARE_RETENTION - 61)
    recent, _ = await store.create_share(workspace="ws1", port=3000, audience="anyone", people=[],
                                         created_by="alice", ttl=60, now=now - store_module.SHARE_RETENTION + 30)
    revoked = await store.revoke_share(await _link(store))

    new = await _link(store)

    assert set(store.shares) == {recent.id, revoked.id, new.id}
    assert store.find_share(old_token) is None
    assert [link.id for link in store.shares_of("ws1")] == [new.id, revoked.id, recent.id]
    assert set(FileTokenStore(path).shares) == {recent.id, revoked.id, new.id}  # and from the file


async def test_a_sign_out_through_one_worker_ends_the_sign_in_in_every_other(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """At once in the worker that took it, in the others at their next look at the used-keys file (once a second,
    not a ``stat`` per request); the file's sign-ins end with their time, and one lost with the file (unreadable,
    started over) still holds where it was seen, and everywhere else with every sign-in from before the loss."""
    path = tmp_path / "tokens.json"
    took, other = FileTokenStore(path), FileTokenStore(path)
    now = time.time()
    assert other.ended_sign_ins == took.ended_sign_ins == {}
    assert other.ended_sign_ins.before == -math.inf, "no file yet is no file lost: every sign-in still opens"
    await took.end_sign_in(SignIn("a" * 32, now + 3600))
    await took.end_sign_in(SignIn("b" * 32, now + 1))  # ends by itself before the other looks
    assert "a" * 32 in took.ended_sign_ins
    assert other.ended_sign_ins == {}, "looked less than a second ago"
    monkeypatch.setattr(store_module, "ENDED_READ_EVERY", 0.0)
    other._ended_next = 0.0
    with monkeypatch.context() as later:
        later.setattr(time, "time", lambda: now + 2)
        assert list(other.ended_sign_ins) == ["a" * 32]
    reads: list[None] = []

    def parse_used() -> dict[str, float]:
        reads.append(None)
        return {}

    monkeypatch.setattr(other, "_parse_used", parse_used)
    assert list(other.ended_sign_ins) == ["a" * 32]
    assert not reads, "the file did not change: not read again"
    monkeypatch.undo()
    monkeypatch.setattr(store_module, "ENDED_READ_EVERY", 0.0)
    assert await other.use_once("handoff-x", now + 60), "a sign-out is no one-time code of anyone's"
    (tmp_path / "tokens.used.json").write_text("{")
    caplog.clear()
    for _ in range(3):
        assert list(other.ended_sign_ins) == ["a" * 32]
    assert len([r for r in caplog.records if r.levelname == "ERROR"]) == 1, "said once, not once a look"
    fresh = FileTokenStore(path).ended_sign_ins
    assert "a" * 32 not in fresh
    assert fresh.before >= now + 3600, "lost with the file: every sign-in from before ends"
    (tmp_path / "tokens.used.json").write_text("{}")
    with monkeypatch.context() as later:
        later.setattr(time, "time", lambda: now + 3601)
        assert other.ended_sign_ins == {}, "past the sign-in's own end"


async def test_a_used_keys_file_started_again_by_a_sign_in_ends_every_earlier_sign_in_everywhere(
        tmp_path: Path) -> None:
    """The file cut short and a sign-in's code the next to write it: which sign-ins were signed out went with it,
    so a worker that never saw it broken ends every sign-in from before too (or one signed out opens there)."""
    path = tmp_path / "tokens.json"
    took = FileTokenStore(path, session_ttl=3600)
    now = time.time()
    await took.end_sign_in(SignIn("a" * 32, now + 3600))
    (tmp_path / "tokens.used.json").write_text("")
    await took.use_once("handoff-x", now + 60)
    assert FileTokenStore(path, session_ttl=3600).ended_sign_ins.before >= now + 3600


async def test_a_used_keys_file_that_cannot_be_read_for_now_keeps_the_sign_outs_known(tmp_path: Path) -> None:
    """An OSError (no descriptors left; here a folder where the file goes) is no file lost: the sign-outs known
    still hold, no other sign-in ends, and every request with a session goes on to the next look."""
    path = tmp_path / "tokens.json"
    took = FileTokenStore(path)
    await took.end_sign_in(SignIn("a" * 32, time.time() + 3600))
    used = tmp_path / "tokens.used.json"
    used.unlink()
    used.mkdir()
    fresh = FileTokenStore(path)
    assert (list(took.ended_sign_ins), list(fresh.ended_sign_ins)) == (["a" * 32], [])
    assert took.ended_sign_ins.before == fresh.ended_sign_ins.before == -math.inf
