"""The file token store as ``serve --workers`` uses it: several stores on one set of files, each a worker.

What changes on every sign-in (one-time codes) and every use (counts) must not rewrite the file of links, tokens
and consents: with 100,000 links and 100,000 tokens that rewrite stopped the event loop for 6–8 s.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

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
