"""Helpers for the wake tests: a slow workspace app, home snapshots, process groups, SSE and metrics readers.

Workspaces here run ``slow_server.py`` through the local runtime: a real process that binds its port only
after a delay, so every wake path (held, waiting page, SSE, WebSocket) meets a port that is not there yet.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import stat
import sys
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from prometheus_client.parser import text_string_to_metric_families

from gateway.auth.identity import Identity
from gateway.lifecycle import Runtime, WorkspaceState
from gateway.lifecycle import local as local_runtime
from gateway.lifecycle.archive import restore_home
from gateway.lifecycle.idle import IdleTimers
from gateway.server.context import GATEWAY, Gateway
from tests.conftest import scrape

SLOW_SERVER = Path(__file__).with_name("slow_server.py")
PORT = 8000
BODY = "hello from the slow server"

Client = TestClient[web.Request, web.Application]


def slow_workspace(address: str, *, delay: float = 1.5, starts: Path | None = None, child: bool = False,
                   swap: float = 0.0, **extra: Any) -> dict[str, Any]:
    """A workspace whose port 8000 opens ``delay`` seconds after each start; starts are logged to ``starts``.

    Port 8000 is public: these tests are about waking, the access rules have their own tests in tests/auth.
    """
    command = [sys.executable, str(SLOW_SERVER), "--host", "{host}", "--port", str(PORT), "--delay", str(delay)]
    if child:
        command.append("--child")
    if swap:
        command += ["--swap", str(swap)]
    env = {"STARTS_FILE": str(starts)} if starts is not None else {}
    return {"owner": "alice", "command": command, "address": address, "env": env, "ports": {PORT: "public"}, **extra}


def preview(workspace: str, port: int = PORT) -> str:
    return f"{port}-{workspace}.localhost:8080"


API = {"Accept": "application/json"}
IDLE = {"to_warm": 60.0, "to_cold": 600.0, "check_every": 3600.0}
"""Idle settings for tests that drive the reaper by hand (``check_every`` an hour: it never runs by itself)."""
TIMERS = IdleTimers(IDLE["to_warm"], IDLE["to_cold"], IDLE["check_every"])
SLACK = 10.0
"""More than a test takes in real time: phase changes are stamped by the real clock, activity by the test's."""


def browser(workspace: str, port: int = PORT) -> dict[str, str]:
    return {"Host": preview(workspace, port), "Accept": "text/html,application/xhtml+xml", "Sec-Fetch-Mode": "navigate"}


def gateway_of(client: Client) -> Gateway:
    return client.app[GATEWAY]


def owner(client: Client, workspace: str, port: int = PORT) -> dict[str, str]:
    """The session cookie of alice, who owns every ``workspace()``, on that preview's host: the runtime's own words
    on a wake (why it is slow, why it failed) are told to those who run the workspace only."""
    session = gateway_of(client).auth.sessions.issue(Identity("alice"), preview(workspace, port))
    return {"Cookie": f"codehub_session={session}"}


def starts(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


# --- wakes held where the test looks -----------------------------------------------------------------------

def hold_restores(monkeypatch: pytest.MonkeyPatch) -> threading.Event:
    """Local restores of homes wait (a minute at most) until the returned event is set: a wake from COLD stays at
    its restore step while the test looks."""
    go_on = threading.Event()

    def held_restore(archive: Path, home: Path) -> None:
        go_on.wait(60)
        restore_home(archive, home)

    monkeypatch.setattr(local_runtime, "restore_home", held_restore)
    return go_on


def hold_wakes(monkeypatch: pytest.MonkeyPatch, runtime: Runtime, *names: str) -> asyncio.Event:
    """The runtime's wakes (of ``names``, or of every workspace) wait until the returned event is set."""
    go_on = asyncio.Event()
    wake = runtime.wake

    async def gated_wake(name: str) -> WorkspaceState:
        if not names or name in names:
            await go_on.wait()
        return await wake(name)

    monkeypatch.setattr(runtime, "wake", gated_wake)
    return go_on


# --- homes -------------------------------------------------------------------------------------------------

def fill_home(home: Path, *, big: int = 3 << 20, small_files: int = 20) -> None:
    """A home with every kind of entry a restore must bring back exactly."""
    home.mkdir(parents=True)
    (home / "README.md").write_text("# project\n")
    script = home / "bin" / "run.sh"
    script.parent.mkdir()
    script.write_text("#!/bin/sh\necho hi\n")
    script.chmod(0o755)
    secret = home / "secret.txt"
    secret.write_text("only me")
    secret.chmod(0o640)
    private = home / "private"
    private.mkdir()
    private.chmod(0o700)
    (private / "key").write_bytes(b"\x00\x01binary\xff")
    (home / "empty-dir" / "nested-empty").mkdir(parents=True)
    (home / "empty-file").touch()
    (home / "link-relative").symlink_to("README.md")
    (home / "bin" / "link-up").symlink_to("../secret.txt")
    (home / "link-absolute").symlink_to("/etc/hostname")
    (home / "link-dangling").symlink_to("does/not/exist")
    (home / "link-dir").symlink_to("private")
    (home / "unicode-ñ-名前.txt").write_text("ünïcödé")
    (home / ".hidden").write_text("dotfile")
    many = home / "many"
    many.mkdir()
    for i in range(small_files):
        (many / f"f{i:05d}.txt").write_text(f"file {i}\n" * (i % 7))
    with (home / "large.bin").open("wb") as handle:
        remaining = big
        while remaining > 0:
            chunk = os.urandom(min(remaining, 1 << 20))
            handle.write(chunk)
            remaining -= len(chunk)


def snapshot(home: Path) -> dict[str, tuple[Any, ...]]:
    """Everything a restore must preserve: kind, mode, content (hash), link target, file mtime (seconds)."""
    entries: dict[str, tuple[Any, ...]] = {}
    for path in sorted([home, *home.rglob("*")]):
        info = path.lstat()
        name = str(path.relative_to(home))
        mode = stat.S_IMODE(info.st_mode)
        if stat.S_ISLNK(info.st_mode):
            entries[name] = ("link", os.readlink(path))
        elif stat.S_ISDIR(info.st_mode):
            entries[name] = ("dir", oct(mode))
        else:
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            entries[name] = ("file", oct(mode), info.st_size, digest, int(info.st_mtime))
    return entries


# --- files the owner controls --------------------------------------------------------------------------

class Fifo:
    """A FIFO no one else opens, for as long as the test needs it. Should the gateway block on it (opening it
    to read or write, or reading it), a watcher thread opens it after ``patience`` seconds, which unblocks either
    side, so the test ends; ``released`` then says that it had blocked."""

    def __init__(self, path: Path, patience: float = 5.0) -> None:
        os.mkfifo(path)
        self.path, self.patience, self.released = path, patience, False
        self._done = threading.Event()
        self._watcher = threading.Thread(target=self._release, daemon=True)

    def _release(self) -> None:
        if not self._done.wait(self.patience):
            self.released = True
            fd = os.open(self.path, os.O_RDWR | os.O_NONBLOCK)  # never blocks: it is both ends
            try:
                os.write(fd, b"{}")
            finally:
                os.close(fd)

    def __enter__(self) -> Fifo:
        self._watcher.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._watcher.join()


# --- processes ---------------------------------------------------------------------------------------------

def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes in a process group, read from /proc."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(entry.name))
    return members


def recorded_pgid(state_dir: Path, workspace: str) -> int:
    record = json.loads((state_dir / "workspaces" / workspace / "run.json").read_text())
    pgid = record["pgid"]
    assert isinstance(pgid, int)
    return pgid


async def wait_gone(pgid: int, within: float = 10.0) -> None:
    """Wait (bounded) until no live process is left in the group; /proc offers nothing to wait on."""
    async with asyncio.timeout(within):
        while group_members(pgid):  # noqa: ASYNC110
            await asyncio.sleep(0.02)


# --- SSE and metrics ---------------------------------------------------------------------------------------

async def read_sse(response: aiohttp.ClientResponse) -> AsyncIterator[tuple[str, dict[str, Any]]]:
    """Parse a text/event-stream body into (event, data) pairs until the server closes it."""
    event, data = "message", ""
    async for raw in response.content:
        line = raw.decode().rstrip("\r\n")
        if not line:
            if data:
                yield event, json.loads(data)
            event, data = "message", ""
        elif line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:"):
            data += line[5:].strip()


async def sse_events(client: Client, host: str, path: str = "/_codehub/wake/events",
                     within: float = 30.0, headers: dict[str, str] | None = None) -> list[tuple[str, dict[str, Any]]]:
    events = []
    async with asyncio.timeout(within), client.get(path, headers={"Host": host, **(headers or {})}) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/event-stream")
        assert response.headers["Cache-Control"] == "no-store"
        async for item in read_sse(response):
            events.append(item)
    return events


async def metric_samples(client: Client) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of /metrics (its own listener, ``metrics.port``) keyed by (name, sorted labels)."""
    text = await scrape(client.app)
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def sample(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)
