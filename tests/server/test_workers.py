"""``codehub-gateway serve --workers 2`` as a real process tree: both workers serve, lifecycle state and share
links are shared through the parent and the store file, and SIGTERM to the parent leaves nothing running."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from yarl import URL

from gateway.server.serving import WORKER_HEADER, control_socket
from tests.conftest import next_address, settings

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.timeout(120)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if int((entry / "stat").read_text().rpartition(")")[2].split()[1]) == pid:
                    found.append(int(entry.name))
    return found


def _listening_sockets(port: int) -> int:
    """LISTEN sockets on 127.0.0.1:port: one per worker under SO_REUSEPORT."""
    wanted = f"0100007F:{port:04X}"
    lines = Path("/proc/net/tcp").read_text().splitlines()[1:]
    return sum(1 for line in lines if line.split()[1] == wanted and line.split()[3] == "0A")


def _workers(parent: int) -> set[str]:
    return {str(pid) for pid in _children(parent) if b"gateway.server.serving" in _cmdline(pid)}


def _cmdline(pid: int) -> bytes:
    """Empty for a process that ended (a killed worker, reaped) between the listing and this read."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except (FileNotFoundError, ProcessLookupError):
        return b""


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return False
    return state != "Z"


@dataclass
class Served:
    process: subprocess.Popen[bytes]
    port: int
    address: str
    log: Path  # the gateway's stdout and stderr

    @property
    def hub(self) -> str:
        return f"localhost:{self.port}"

    def preview(self, port: int = 8000) -> str:
        return f"{port}-w1.localhost:{self.port}"

    async def request(self, method: str, host: str, path: str, *, worker: Callable[[str], bool] = lambda _: True,
                      **kwargs: Any) -> tuple[int, Any, str, list[str]]:
        """A request on a fresh connection, repeated until it lands on a worker ``worker`` accepts."""
        headers = {"Host": host, **kwargs.pop("headers", {})}
        connector = aiohttp.TCPConnector(force_close=True)
        async with aiohttp.ClientSession(connector=connector, cookie_jar=aiohttp.DummyCookieJar()) as session:
            for _ in range(200):
                async with session.request(method, f"http://127.0.0.1:{self.port}{path}", headers=headers,
                                           allow_redirects=False, **kwargs) as answer:
                    pid = answer.headers.get(WORKER_HEADER, "")
                    if not worker(pid):
                        continue
                    body: Any = (await answer.json() if answer.content_type == "application/json"
                                                  else await answer.text())
                    return answer.status, body, pid, answer.headers.getall("Set-Cookie", [])
        raise AssertionError("no answer from the wanted worker in 200 connections")


HTTP_SERVER = [sys.executable, "-m", "http.server", "--bind", "{host}", "8000"]


def _start(tmp_path: Path, server: list[str] = HTTP_SERVER, visibility: str = "private") -> Served:
    port, address = _free_port(), next_address()
    settings = {
        "listen": {"host": "127.0.0.1", "port": port},
        "hub_url": f"http://localhost:{port}",
        "preview_domain": f"localhost:{port}",
        "local": {"state_dir": str(tmp_path / "state"), "workspaces": {
            "w1": {"owner": "alice", "command": server, "address": address, "ports": {8000: visibility}},
        }},
    }
    config = tmp_path / "gateway.yaml"
    config.write_text(yaml.safe_dump(settings))
    log = (tmp_path / "gateway.log").open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "gateway", "serve", "--config", str(config), "--workers", "2", "--log-level", "debug"],
        stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=tmp_path,
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if _listening_sockets(port) >= 2:
            return Served(process, port, address, tmp_path / "gateway.log")
        assert process.poll() is None, (tmp_path / "gateway.log").read_text()
        time.sleep(0.1)
    process.kill()
    raise AssertionError("the gateway did not start: " + (tmp_path / "gateway.log").read_text())


def _stop(served: Served) -> None:
    if served.process.poll() is None:
        served.process.send_signal(signal.SIGTERM)
        try:
            served.process.wait(30)
        except subprocess.TimeoutExpired:
            served.process.kill()
            served.process.wait()


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    served = _start(tmp_path_factory.mktemp("workers"))
    yield served
    _stop(served)


@pytest.fixture
async def hub_cookie(served: Served) -> str:
    status, _body, _pid, cookies = await served.request(
        "POST", served.hub, "/auth/dev", data={"user": "alice", "next": "/"},
        headers={"Origin": f"http://{served.hub}"},
    )
    assert status == 303
    return next(c for c in cookies if c.startswith("codehub_session=")).partition(";")[0]


async def test_both_workers_serve(served: Served) -> None:
    assert _listening_sockets(served.port) == 2
    _, _, first, _ = await served.request("GET", served.hub, "/healthz")
    _, _, second, _ = await served.request("GET", served.hub, "/healthz", worker=lambda pid: pid != first)
    assert {first, second} == _workers(served.process.pid)


async def test_the_workers_write_the_access_log_as_bare_json_lines(served: Served) -> None:
    """Each worker's access log goes to stderr one JSON object a line (a log shipper parses them as they are),
    not through the formatted lines of the other logs."""
    path = f"/no-such-page-{os.urandom(4).hex()}"
    status, _, _, _ = await served.request("GET", served.hub, path)
    assert status == 404
    deadline = time.monotonic() + 10  # the handler writes its batch within half a second
    while not (lines := [line for line in served.log.read_text().splitlines() if path in line]):
        assert time.monotonic() < deadline, "no access log line"
        await asyncio.sleep(0.05)
    assert json.loads(lines[0])["path"] == path


HOSTILE_LOG = """
import logging
from gateway.server.serving import configure_logging
configure_logging("info")
log = logging.getLogger("gateway.lifecycle.kubernetes.runtime")
log.error("workspace %s failed to start: %s", "ws1", "Back-off\\n2026-12-06 INFO gateway: forged\\x1b[2J\\u202eok")
try:
    raise ValueError("boom")
except ValueError:
    log.exception("a bug")
"""


def test_a_log_line_cannot_be_split_or_disguised_by_what_it_quotes() -> None:
    """The gateway's own log lines quote what others chose (an event's text from the cluster, a workspace's last
    line of output, an IdP's error): a line break in it would make a line that looks like the gateway's, and an
    escape sequence or a bidi override would rewrite what a terminal shows. They are written escaped; a
    traceback keeps its lines."""
    result = subprocess.run([sys.executable, "-c", HOSTILE_LOG], capture_output=True, text=True, timeout=60,
                            check=True)
    lines = result.stderr.splitlines()
    assert lines[0].endswith(" ERROR gateway.lifecycle.kubernetes.runtime: workspace ws1 failed to start: "
                             "Back-off\\n2026-12-06 INFO gateway: forged\\x1b[2J\\u202eok"), lines
    assert lines[1].endswith(" ERROR gateway.lifecycle.kubernetes.runtime: a bug")
    assert lines[2:4] == ["Traceback (most recent call last):", '  File "<string>", line 8, in <module>']
    assert lines[-1] == "ValueError: boom"


async def test_the_control_socket_is_the_gateway_user_s_alone(served: Served) -> None:
    """Whoever can connect to the parent's control socket can wake and stop workspaces: only its owner may."""
    path = served.log.parent / "state" / "control.sock"
    assert stat.S_ISSOCK(path.stat().st_mode)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600

async def _phase_elsewhere(served: Served, cookie: str, not_on: str, wanted: str) -> str:
    """The phase another worker reports, once it shows ``wanted``: the state stream from the parent reaches
    the other worker a moment after the reply reached the first, so allow it up to five seconds."""
    deadline = time.monotonic() + 5
    while True:
        status, body, other, _ = await served.request("GET", served.hub, "/api/v1/workspaces/w1",
                                                      headers={"Cookie": cookie}, worker=lambda pid: pid != not_on)
        assert status == 200
        assert other != not_on
        if body["phase"] == wanted or time.monotonic() > deadline:
            return str(body["phase"])
        await asyncio.sleep(0.02)


async def test_a_wake_through_one_worker_is_seen_by_the_other(served: Served, hub_cookie: str) -> None:
    api = {"Cookie": hub_cookie, "Origin": f"http://{served.hub}"}
    status, body, first, _ = await served.request("POST", served.hub, "/api/v1/workspaces/w1/wake", headers=api)
    assert status == 200, body
    assert body["phase"] == "RUNNING"
    assert await _phase_elsewhere(served, hub_cookie, first, "RUNNING") == "RUNNING"
    status, body, first, _ = await served.request("POST", served.hub, "/api/v1/workspaces/w1/stop", headers=api)
    assert status == 200
    assert body["phase"] == "WARM"
    assert await _phase_elsewhere(served, hub_cookie, first, "WARM") == "WARM"


async def test_share_links_and_revocation_apply_in_every_worker(served: Served, hub_cookie: str) -> None:
    api = {"Cookie": hub_cookie, "Origin": f"http://{served.hub}"}
    status, body, creator, _ = await served.request("POST", served.hub, "/api/v1/workspaces/w1/shares",
                                                    json={"port": 8000}, headers=api)
    assert status == 201, body
    token, share_id = body["token"], body["id"]
    visitor = {"Authorization": f"Bearer {token}", "Accept": "*/*"}
    status, page, _, _ = await served.request("GET", served.preview(), "/", headers=visitor,
                                              worker=lambda pid: pid != creator)
    assert status == 200, page
    status, body, revoker, _ = await served.request("DELETE", served.hub, f"/api/v1/workspaces/w1/shares/{share_id}",
                                                    headers=api)
    assert status == 200
    assert body["revoked"]
    for wanted in (lambda pid: pid != revoker, lambda pid: pid == revoker):
        status, page, _, _ = await served.request("GET", served.preview(), "/", headers=visitor, worker=wanted)
        assert status == 403, page
        assert page["error"]["code"] == "share-revoked"


async def test_a_hand_off_code_works_once_in_total_not_once_per_worker(served: Served, hub_cookie: str) -> None:
    status, _, _, cookies = await served.request("GET", served.preview(), "/", headers={"Accept": "text/html"})
    assert status == 302
    state = next(c for c in cookies if c.startswith("codehub_handoff=")).partition(";")[0]
    code_url = await _handoff_location(served, hub_cookie, f"http://{served.preview()}/", state.partition("=")[2])
    first = await served.request("GET", served.preview(), code_url, headers={"Cookie": state})
    assert first[0] == 303
    for wanted in (lambda pid: pid != first[2], lambda pid: pid == first[2]):
        status, body, _, _ = await served.request("GET", served.preview(), code_url, worker=wanted,
                                                  headers={"Cookie": state, "Accept": "application/json"})
        assert (status, body["error"]["code"]) == (400, "handoff-replayed")


async def _handoff_location(served: Served, hub_cookie: str, target: str, state: str) -> str:
    headers = {"Host": served.hub, "Cookie": hub_cookie}
    connector = aiohttp.TCPConnector(force_close=True)
    async with (aiohttp.ClientSession(connector=connector, cookie_jar=aiohttp.DummyCookieJar()) as session,
                session.get(f"http://127.0.0.1:{served.port}/auth/handoff", headers=headers,
                            params={"target": target, "state": state}, allow_redirects=False) as answer):
        assert answer.status == 302
        return URL(answer.headers["Location"]).raw_path_qs


async def test_sigterm_to_the_parent_leaves_nothing_running(tmp_path: Path) -> None:
    served = _start(tmp_path)
    try:
        status, *_ = await served.request("GET", served.preview(), "/", headers={"Accept": "*/*"})
        assert status == 401  # private port, anonymous: the wake is not even attempted
        status, _body, _pid, cookies = await served.request(
            "POST", served.hub, "/auth/dev", data={"user": "alice"}, headers={"Origin": f"http://{served.hub}"})
        cookie = next(c for c in cookies if c.startswith("codehub_session=")).partition(";")[0]
        status, body, *_ = await served.request("POST", served.hub, "/api/v1/workspaces/w1/wake",
                                                headers={"Cookie": cookie, "Origin": f"http://{served.hub}"})
        assert status == 200
        assert body["phase"] == "RUNNING"
        tree = [served.process.pid, *_children(served.process.pid)]
        tree += [pid for parent in tree[1:] for pid in _children(parent)]
        assert len(tree) >= 4  # parent, two workers, the workspace's server
    finally:
        _stop(served)
    await asyncio.sleep(0.5)
    assert served.process.returncode == 0
    assert [pid for pid in tree if _alive(pid)] == []
    assert not (tmp_path / "state" / "control.sock").exists()


SLOW_SERVER = [sys.executable, str(ROOT / "tests" / "lifecycle" / "slow_server.py"), "--host", "{host}",
               "--port", "8000"]



async def test_sigterm_to_the_parent_lets_a_request_in_flight_finish(tmp_path: Path) -> None:
    """The parent passes SIGTERM on to the workers, which finish what is in flight (``timeouts.shutdown``) before
    they exit: a stream that is still running when the gateway is told to stop arrives whole."""
    served = _start(tmp_path, SLOW_SERVER, visibility="public")
    try:
        status, *_ = await served.request("GET", served.preview(), "/", headers={"Accept": "*/*"})
        assert status == 200  # woken
        reader, writer = await asyncio.open_connection("127.0.0.1", served.port)
        writer.write(f"GET /stream?seconds=1.5 HTTP/1.1\r\nHost: {served.preview()}\r\nConnection: close\r\n\r\n"
                     .encode())
        async with asyncio.timeout(30):
            first = await reader.readuntil(b"tick\n")  # the answer is under way
            served.process.send_signal(signal.SIGTERM)
            rest = await reader.read()
        writer.close()
        assert first.startswith(b"HTTP/1.1 200"), first
        assert rest.endswith(b"0\r\n\r\n"), rest[-200:]  # the last chunk: the stream ended, not cut
    finally:
        _stop(served)
    assert served.process.returncode == 0

async def _load(served: Served, outcomes: list[str], stop: asyncio.Event) -> None:
    """One keep-alive client sending GETs back to back on one connection, reconnecting after an error; each
    outcome is ``ok``, another status, or the name of the connection error. Raw streams, not aiohttp's client,
    which would quietly send a GET again on a connection that broke. (Which worker answered is not known: the
    fast lane does not say.)"""
    request = f"GET / HTTP/1.1\r\nHost: {served.preview()}\r\n\r\n".encode()
    writer: asyncio.StreamWriter | None = None
    while not stop.is_set():
        try:
            if writer is None:
                reader, writer = await asyncio.open_connection("127.0.0.1", served.port)
            writer.write(request)
            async with asyncio.timeout(30):
                head = await reader.readuntil(b"\r\n\r\n")
                length = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
                assert length is not None, head
                await reader.readexactly(int(length[1]))
            status = int(head.split()[1])
            outcomes.append("ok" if status == 200 else f"status {status}")
        except (OSError, asyncio.IncompleteReadError) as exc:
            outcomes.append(type(exc).__name__)
            if writer is not None:
                writer.close()
            writer = None
    if writer is not None:
        writer.close()


def _worker_of(ws: aiohttp.ClientWebSocketResponse) -> str:
    """The worker holding the WebSocket's connection: ``ss`` names the process of the gateway's end, whose peer
    port is this client's."""
    sockname = ws.get_extra_info("sockname")
    assert sockname is not None
    shown = subprocess.run(["ss", "-Htnp", "state", "established", f"( dport = :{sockname[1]} )"],
                           capture_output=True, text=True, check=True).stdout
    found = re.search(r"pid=(\d+)", shown)
    assert found is not None, shown
    return found.group(1)


async def test_a_worker_killed_under_load_is_replaced_and_the_other_keeps_its_websockets(tmp_path: Path) -> None:
    served = _start(tmp_path, SLOW_SERVER, visibility="public")
    try:
        status, *_ = await served.request("GET", served.preview(), "/", headers={"Accept": "*/*"})
        assert status == 200  # woken
        before = _workers(served.process.pid)
        async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as session:
            sockets: dict[str, list[aiohttp.ClientWebSocketResponse]] = {pid: [] for pid in before}
            for _ in range(200):
                if all(len(held) >= 3 for held in sockets.values()):
                    break
                ws = await session.ws_connect(f"http://127.0.0.1:{served.port}/ws",
                                              headers={"Host": served.preview()})
                sockets[_worker_of(ws)].append(ws)
            victim, survivor = sorted(before)
            outcomes: list[str] = []
            stop = asyncio.Event()
            load = [asyncio.create_task(_load(served, outcomes, stop)) for _ in range(16)]
            async with asyncio.timeout(30):
                while len(outcomes) < 100:  # noqa: ASYNC110 - the load is running
                    await asyncio.sleep(0.05)

            os.kill(int(victim), signal.SIGKILL)
            killed_at = len(outcomes)

            async with asyncio.timeout(60):
                while (len(_workers(served.process.pid) - before) < 1  # noqa: ASYNC110 - /proc has no events
                       or _listening_sockets(served.port) < 2):
                    await asyncio.sleep(0.05)
            replacement = (_workers(served.process.pid) - before).pop()
            status, _, pid, _ = await served.request("GET", served.hub, "/healthz",
                                                     worker=lambda pid: pid == replacement)
            assert (status, pid) == (200, replacement)
            after_restart = len(outcomes)
            async with asyncio.timeout(30):
                while outcomes[after_restart:].count("ok") < 100:  # noqa: ASYNC110 - the load goes on
                    await asyncio.sleep(0.05)
            stop.set()
            await asyncio.gather(*load)
            for n, ws in enumerate(sockets[survivor]):
                await ws.send_str(f"still there {n}")
                assert (await ws.receive(timeout=10)).data == f"echo: still there {n}"
            for ws in sockets[victim]:
                message = await ws.receive(timeout=10)
                assert message.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR)
            for ws in sockets[survivor]:
                await ws.close()
        assert _workers(served.process.pid) == {survivor, replacement}
        tally = Counter(outcomes)
        assert tally["ok"] > 0
        failures = {outcome: n for outcome, n in tally.items() if outcome != "ok"}
        # Only the killed worker's clients fail, while it dies: each once with its request in flight, and at most
        # once more if its new connection landed in the dying worker's accept queue (the kernel resets those).
        assert 0 < sum(failures.values()) <= 2 * 16, failures
        assert set(outcomes[:killed_at]) == {"ok"}
        assert set(outcomes[after_restart:]) == {"ok"}, Counter(outcomes[after_restart:])
        assert set(failures) <= {"IncompleteReadError", "ConnectionResetError", "BrokenPipeError",
                                 "ConnectionRefusedError"}, failures
        assert Counter(outcomes[:killed_at]) == Counter(ok=killed_at)
        print(f"load: {tally['ok']} answered, connection errors {failures}, {outcomes[killed_at:].count('ok')} "
              f"answered after the kill")
    finally:
        _stop(served)
    log = (tmp_path / "gateway.log").read_text()
    assert f"(pid {victim}) exited with -9; starting it again" in log
    assert "Traceback" not in log


async def test_a_sign_out_through_one_worker_ends_copies_of_its_cookies_on_the_other(served: Served) -> None:
    """Real processes on one used-keys file: the worker that took the sign-out refuses the hub's and the preview's
    cookie at once, the other once it has looked at the file (once a second), and both go on refusing."""
    status, _body, _pid, cookies = await served.request(
        "POST", served.hub, "/auth/dev", data={"user": "alice"}, headers={"Origin": f"http://{served.hub}"})
    hub = next(c for c in cookies if c.startswith("codehub_session=")).partition(";")[0]
    status, _, _, cookies = await served.request("GET", served.preview(), "/", headers={"Accept": "text/html"})
    state = next(c for c in cookies if c.startswith("codehub_handoff=")).partition(";")[0]
    code_url = await _handoff_location(served, hub, f"http://{served.preview()}/", state.partition("=")[2])
    status, _, _, cookies = await served.request("GET", served.preview(), code_url, headers={"Cookie": state})
    assert status == 303
    preview = next(c for c in cookies if c.startswith("codehub_session=")).partition(";")[0]
    copies = [(served.hub, "/api/v1/me", hub), (served.preview(), "/", preview)]
    for host, path, cookie in copies:
        status, *_ = await served.request("GET", host, path, headers={"Cookie": cookie, "Accept": "application/json"})
        assert status == 200

    status, _, took, _ = await served.request("POST", served.hub, "/auth/logout",
                                              headers={"Cookie": hub, "Origin": f"http://{served.hub}"})
    assert status == 303
    for host, path, cookie in copies:
        status, *_ = await served.request("GET", host, path, worker=lambda pid: pid == took,
                                          headers={"Cookie": cookie, "Accept": "application/json"})
        assert status == 401, (host, "at once where it was taken")
    deadline = time.monotonic() + 10
    for host, path, cookie in copies:
        while True:
            status, *_ = await served.request("GET", host, path, worker=lambda pid: pid != took,
                                              headers={"Cookie": cookie, "Accept": "application/json"})
            if status == 401 or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.2)
        assert status == 401, (host, "in the other worker once it has looked")


def test_the_control_socket_is_in_the_state_dir_unless_that_path_is_too_long_for_one(tmp_path: Path) -> None:
    """A Unix socket's path has room for about 100 bytes: a deeper state_dir puts it in the temp folder under a
    name made from the path (the same for the parent every time, another for another gateway)."""
    assert control_socket(settings(tmp_path, {})) == tmp_path.resolve() / "state" / "control.sock"
    deep = tmp_path / ("d" * 100)
    far = control_socket(settings(deep, {}))
    assert far.parent == Path(tempfile.gettempdir())
    assert len(os.fsencode(far)) < 100
    assert control_socket(settings(deep, {})) == far
    assert control_socket(settings(tmp_path / ("e" * 100), {})) != far
