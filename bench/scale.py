"""Scale: what 10,000 workspaces and 100,000 share links and API tokens cost the gateway (local runtime).

Three gateways, each with the benchmark's ``ws1`` (nginx's 200-byte file on a private port) among:
- ``small``: 10 workspaces, no links or tokens (the reference);
- ``workspaces``: ``--scale-workspaces`` (10,000) workspaces, 1,000 of them owned by one user (``many``);
- ``everything``: the same, plus ``--scale-links`` (100,000) share links and as many API tokens in the store.

For each: start-up time (process start to the port accepting), RSS once idle, CPU per proxied request under
wrk at 64 connections (the three alternated, medians over the repeats), and for ``many`` the time of
``GET /api/v1/workspaces`` (first page, and every page), of ``/api/v1/hub/snapshot`` and of the hub page.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import os
import statistics
import time
from typing import Any

import yaml

from bench.client import fetch
from bench.http_load import run_wrk, write_script
from bench.procs import Proc, Procs, free_port, rss_bytes, wait_for_port
from bench.servers import ROOT, Layout, SignIn, gateway_command, gateway_config, gateway_target, static_targets
from bench.ws_load import run_ws
from gateway.config import default_address

MANY = "many"
"""The user who owns 1,000 workspaces."""
MANY_OWNS = 1000
MOST_WEBSOCKETS = 9_900
"""Relayed WebSockets one gateway process can hold here: two descriptors each (client and upstream) under the
machine's hard limit of 20,000 open files per process (``ulimit -Hn``), with room for the rest."""


def _workspaces(count: int) -> dict[str, dict[str, Any]]:
    """``count`` sleeping workspaces, 1,000 of them ``many``'s, each on a loopback address of its own from
    127.0.1.2 on: 127.0.0.x are the benchmark's own servers' (``Layout``), and the config refuses two workspaces
    on one address."""
    return {f"s{index:05d}": {"owner": MANY if index < MANY_OWNS else f"user{index % 1000}",
                              "address": default_address(_FIRST_FREE + index),
                              "command": ["sleep", "1000000"], "ports": {3000: "private", 5173: "org"}}
            for index in range(count)}


_FIRST_FREE = 253
"""``default_address``'s index of 127.0.1.2, past the 127.0.0.0/24 the benchmark's servers live in."""


def with_workspaces(base: dict[str, Any], workspaces: int) -> dict[str, Any]:
    """A shape's config: the benchmark's gateway config ``base`` with its ``ws1`` and ``workspaces - 1`` more."""
    local = base["local"]
    return {**base, "local": {**local, "workspaces": {"ws1": local["workspaces"]["ws1"],
                                                      **_workspaces(workspaces - 1)}}}


def store(links: int, tokens: int, workspaces: list[str]) -> dict[str, Any]:
    """A tokens file as ``FileTokenStore`` writes it: share links spread over the workspaces, API tokens."""
    now = time.time()
    shares: list[dict[str, Any]] = [{"id": f"{index:012x}", "token_hash": hashlib.sha256(os.urandom(16)).hexdigest(),
               "workspace": workspaces[index % len(workspaces)], "port": 3000, "audience": "anyone", "people": [],
               "created_by": MANY, "created": now, "expires": now + 86400, "revoked": None, "uses": 0,
               "last_used": None} for index in range(links)]
    api_tokens: list[dict[str, Any]] = [
                  {"id": f"t{index:011x}", "token_hash": hashlib.sha256(os.urandom(16)).hexdigest(),
                   "subject": f"user{index % 1000}", "name": f"token {index}", "created": now, "email": "",
                   "groups": [], "last_used": None, "attributes": {}} for index in range(tokens)]
    return {"shares": shares, "api_tokens": api_tokens, "used": {}, "consents": []}


@dataclasses.dataclass
class Shape:
    name: str
    workspaces: int
    links: int
    port: int = 0
    proc: Proc | None = None
    sign_in: SignIn | None = None
    startup_s: float = 0.0
    rss_idle_mb: float = 0.0
    cpu_us: list[float] = dataclasses.field(default_factory=list)
    rps: list[float] = dataclasses.field(default_factory=list)


async def _start(procs: Procs, layout: Layout, shape: Shape) -> None:
    shape.port = free_port("127.0.0.1")
    path = gateway_config(layout, f"scale-{shape.name}", shape.port)
    made = with_workspaces(yaml.safe_load(path.read_text()), shape.workspaces)
    state = layout.tmp / f"scale-{shape.name}-state"
    state.mkdir(parents=True, exist_ok=True)
    if shape.links:
        extra = sorted(made["local"]["workspaces"].keys() - {"ws1"})
        (state / "tokens.json").write_text(json.dumps(store(shape.links, shape.links, extra)))
    path.write_text(yaml.safe_dump(made))
    started = time.monotonic()
    shape.proc = procs.start(f"scale-{shape.name}", gateway_command(path),
                             env={"PYTHONPATH": str(ROOT)})
    await wait_for_port("127.0.0.1", shape.port, shape.proc, within=600)
    shape.startup_s = time.monotonic() - started
    shape.sign_in = SignIn(layout, shape.port)
    await asyncio.sleep(2)
    shape.rss_idle_mb = rss_bytes([shape.proc.pid]) / 2**20


async def _timed(address: tuple[str, int], host: str, path: str, headers: dict[str, str], times: int,
                 check: Any = None) -> float:
    """Median milliseconds to the whole answer (its status must be 200)."""
    spent = []
    for _ in range(times):
        started = time.perf_counter()
        answer = await fetch(address, host, path, headers)
        spent.append(1000 * (time.perf_counter() - started))
        if answer.status != 200:
            raise RuntimeError(f"{path}: {answer.status} {answer.body[:200]!r}")
        if check is not None:
            check(answer)
    return statistics.median(spent)


async def _many_user(shape: Shape, times: int) -> dict[str, float]:
    """The API and the hub for the user with 1,000 workspaces."""
    assert shape.sign_in is not None
    sign_in = shape.sign_in
    body = f"user={MANY}&next=/".encode()
    answer = await fetch(sign_in.address, sign_in.hub_host, "/auth/dev", {
        "Origin": f"http://{sign_in.hub_host}", "Content-Type": "application/x-www-form-urlencoded"},
        method="POST", body=body)
    cookie = f"codehub_session={answer.cookies()['codehub_session']}"
    headers = {"Cookie": cookie, "Accept": "application/json"}
    first = await _timed(sign_in.address, sign_in.hub_host, "/api/v1/workspaces", headers, times)
    started = time.perf_counter()
    cursor, seen = "", 0
    while True:
        page = await fetch(sign_in.address, sign_in.hub_host, f"/api/v1/workspaces?limit=100{cursor}", headers)
        data = json.loads(page.body)
        seen += len(data["workspaces"])
        if not data["next_cursor"]:
            break
        cursor = f"&cursor={data['next_cursor']}"
    every = 1000 * (time.perf_counter() - started)
    if seen != min(MANY_OWNS, shape.workspaces - 1):
        raise RuntimeError(f"{MANY} sees {seen} workspaces through the API")
    snapshot = await _timed(sign_in.address, sign_in.hub_host, "/api/v1/hub/snapshot", headers, max(1, times // 4))
    hub = await _timed(sign_in.address, sign_in.hub_host, "/", {"Cookie": cookie, "Accept": "text/html"},
                       max(1, times // 4))
    signing_in = []  # a browser's first visit to a preview: dev sign-in, the hand-off and its one-time code
    preview = sign_in.layout.preview(sign_in.port, sign_in.layout.http_port)
    for _ in range(max(1, times // 4)):
        started = time.perf_counter()
        await SignIn(sign_in.layout, sign_in.port).preview(preview)
        signing_in.append(1000 * (time.perf_counter() - started))
    return {"api_first_page_ms": first, "api_every_page_ms": every, "hub_snapshot_ms": snapshot, "hub_page_ms": hub,
            "sign_in_ms": statistics.median(signing_in)}


async def websockets(procs: Procs, layout: Layout, count: int, say: Any = print) -> dict[str, Any]:
    """``count`` idle relayed WebSockets on one fresh gateway process: KB each, echo p99."""
    wanted = count
    count = min(count, MOST_WEBSOCKETS)
    shape = Shape("websockets", 10, 0)
    await _start(procs, layout, shape)
    assert shape.sign_in is not None
    assert shape.proc is not None
    target = await gateway_target("scale-websockets", layout, shape.sign_in)
    result = await run_ws(target, count, [shape.proc.pid])
    procs.stop(shape.proc)
    direct = await run_ws(static_targets(layout)["direct"], count, [])  # what the echoes take without a proxy
    say(f"scale websockets: {result.opened}/{count} open, {result.kb_per_connection or 0:.1f} KB each, echo p50 "
        f"{result.echo_p50_ms:.2f} p99 {result.echo_p99_ms:.2f} ms (direct {direct.echo_p99_ms:.2f} ms), "
        f"{result.failed} failed")
    return {**dataclasses.asdict(result), "asked": wanted, "direct_echo_p99_ms": direct.echo_p99_ms}


async def scale(procs: Procs, layout: Layout, *, workspaces: int, links: int, repeats: int, duration: float,
                ws: int, say: Any = print) -> dict[str, Any]:
    shapes = [Shape("small", 10, 0), Shape("workspaces", workspaces, 0), Shape("everything", workspaces, links)]
    targets = {}
    for shape in shapes:
        await _start(procs, layout, shape)
        assert shape.sign_in is not None
        targets[shape.name] = await gateway_target(f"scale-{shape.name}", layout, shape.sign_in)
        say(f"scale {shape.name}: {shape.workspaces} workspaces, {shape.links} links and tokens: started in "
            f"{shape.startup_s:.1f} s, {shape.rss_idle_mb:.0f} MB idle")
    for _ in range(repeats):
        for shape in shapes:
            assert shape.proc is not None
            target = targets[shape.name]
            result = await run_wrk(target, write_script(layout.tmp, target), 64, duration, [shape.proc.pid])
            if result.errors or not result.requests or result.cpu_s is None:
                raise RuntimeError(f"scale {shape.name}: {result.errors} errors")
            shape.cpu_us.append(1e6 * result.cpu_s / result.requests)
            shape.rps.append(result.rps)
            say(f"scale {shape.name}: {result.rps:.0f} req/s, {shape.cpu_us[-1]:.0f} µs CPU per request")
    out: dict[str, Any] = {"workspaces": workspaces, "links": links, "shapes": {}}
    for shape in shapes:
        row: dict[str, Any] = {"workspaces": shape.workspaces, "links": shape.links, "tokens": shape.links,
                               "startup_s": shape.startup_s, "rss_idle_mb": shape.rss_idle_mb,
                               "cpu_us": statistics.median(shape.cpu_us), "rps": statistics.median(shape.rps)}
        row.update(await _many_user(shape, 20))
        say(f"scale {shape.name}: " + ", ".join(f"{key} {value:.1f}" for key, value in row.items()
                                                if key.endswith("_ms")))
        out["shapes"][shape.name] = row
        assert shape.proc is not None
        procs.stop(shape.proc)
    small, many, full = (out["shapes"][name] for name in ("small", "workspaces", "everything"))
    out["kb_per_workspace"] = 1024 * (many["rss_idle_mb"] - small["rss_idle_mb"]) / (workspaces - 10)
    out["kb_per_link_and_token"] = 1024 * (full["rss_idle_mb"] - many["rss_idle_mb"]) / links if links else None
    out["cpu_x_small"] = {name: row["cpu_us"] / small["cpu_us"] for name, row in out["shapes"].items()}
    say(f"scale: {out['kb_per_workspace']:.1f} KB per workspace, CPU per request ×small "
        + ", ".join(f"{name} {ratio:.2f}" for name, ratio in out["cpu_x_small"].items()))
    if ws:
        out["websockets"] = await websockets(procs, layout, ws, say)
    return out
