"""Scale: what 10,000 workspaces and 100,000 share links and API tokens cost the gateway, on the local runtime and
on the Kubernetes runtime (the emulated API of ``tests.kube.emulator``, kmock, with its fake kubelet).

Three gateways per runtime, each with the benchmark's ``ws1`` (nginx's 200-byte file on a private port) among:
- ``small``: 10 workspaces, no links or tokens (the reference);
- ``workspaces``: ``--scale-workspaces`` (10,000) workspaces, 1,000 of them owned by one user (``many``);
- ``everything``: the same, plus ``--scale-links`` (100,000) share links and as many API tokens in the store (the
  tokens file; on Kubernetes, ``ShareLink`` and ``ApiToken`` resources).

For each: start-up (process start to ``/readyz`` answering 200: on Kubernetes, every cache listed, the informers'
sync) and the gateway's CPU seconds by then, RSS once idle, CPU per proxied request under wrk at 64 connections
(the three alternated, medians over the repeats), and for ``many`` the time of ``GET /api/v1/workspaces`` (first
page, and every page), of ``/api/v1/hub/snapshot`` and of the hub page.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import hashlib
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

import yaml

from bench.client import fetch
from bench.http_load import run_wrk, write_script
from bench.procs import Proc, Procs, cpu_seconds, free_port, rss_bytes, wait_for_port
from bench.servers import ROOT, USER, Layout, SignIn, gateway_command, gateway_config, gateway_target, static_targets
from bench.ws_load import run_ws
from gateway.auth.kubernetes.tokens import seal_key
from gateway.auth.store import ApiToken, ShareLink
from gateway.config import Kubernetes, default_address
from gateway.lifecycle.kubernetes.objects import make_api_token, make_share_link
from tests.kube.emulator import API_TOKEN, SHARE_LINK, WORKSPACE, KubeEmulator, running_emulator
from tests.kube.kubelet import FakeKubelet

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


def _links(count: int, workspaces: list[str], now: float) -> list[ShareLink]:
    return [ShareLink(f"{index:012x}", hashlib.sha256(os.urandom(16)).hexdigest(), workspaces[index % len(workspaces)],
                      3000, "anyone", [], MANY, now, now + 86400) for index in range(count)]


def _tokens(count: int, now: float) -> list[ApiToken]:
    return [ApiToken(f"t{index:011x}", hashlib.sha256(os.urandom(16)).hexdigest(), f"user{index % 1000}",
                     f"token {index}", now) for index in range(count)]


def store(links: int, tokens: int, workspaces: list[str]) -> dict[str, Any]:
    """A tokens file as ``FileTokenStore`` writes it: share links spread over the workspaces, API tokens."""
    now = time.time()
    return {"shares": [dataclasses.asdict(link) for link in _links(links, workspaces, now)],
            "api_tokens": [dataclasses.asdict(token) for token in _tokens(tokens, now)], "used": {}, "consents": []}


def _ide_key(layout: Layout) -> Path:
    """The IDE key, as the chart mounts it: share links and API tokens are sealed with a key derived from it, and
    every replica checks each seal as its caches fill."""
    path = layout.tmp / "ide-key"
    if not path.exists():
        path.write_bytes(base64.b64encode(os.urandom(48)))
    return path


def _populate(emulator: KubeEmulator, namespace: str, layout: Layout, workspaces: int, links: int) -> None:
    """A shape's objects in its own namespace of the emulated API, as the local shape's config and tokens file;
    links and tokens sealed and links owned by their Workspace, as the gateway makes them (it takes in nothing
    else)."""
    key = seal_key(Kubernetes(ide_key_file=_ide_key(layout), namespace=namespace))
    ports = {str(layout.http_port): "private", str(layout.ws_port): "private"}
    emulator.create_object(WORKSPACE, {"metadata": {"name": "ws1"}, "spec": {"owner": USER, "ports": ports}},
                           namespace)
    others = _workspaces(workspaces - 1)
    uids = {}
    for name, spec in others.items():
        made = emulator.create_object(WORKSPACE, {"metadata": {"name": name}, "spec": {
            "owner": spec["owner"], "ports": {str(port): visibility for port, visibility in spec["ports"].items()}}},
                                      namespace)
        uids[name] = str(made["metadata"]["uid"])
    now = time.time()
    for link in _links(links, sorted(others), now):
        emulator.create_object(SHARE_LINK, make_share_link(link, uids[link.workspace], key), namespace)
    for token in _tokens(links, now):
        emulator.create_object(API_TOKEN, make_api_token(token, key), namespace)


@dataclasses.dataclass
class Shape:
    name: str
    workspaces: int
    links: int
    api_url: str = ""
    """The emulated Kubernetes API: this shape runs on the Kubernetes runtime, in namespace ``scale-{name}``."""
    port: int = 0
    proc: Proc | None = None
    sign_in: SignIn | None = None
    startup_s: float = 0.0
    startup_cpu_s: float = 0.0
    rss_idle_mb: float = 0.0
    cpu_us: list[float] = dataclasses.field(default_factory=list)
    rps: list[float] = dataclasses.field(default_factory=list)


async def _start(procs: Procs, layout: Layout, shape: Shape) -> None:
    shape.port = free_port("127.0.0.1")
    path = gateway_config(layout, f"scale-{shape.name}", shape.port)
    base = yaml.safe_load(path.read_text())
    if shape.api_url:
        made = {**base, "runtime": "kubernetes", "local": {"state_dir": base["local"]["state_dir"]},
                "kubernetes": {"api_url": shape.api_url, "namespace": f"scale-{shape.name}",
                               "ide_key_file": str(_ide_key(layout))}}
    else:
        made = with_workspaces(base, shape.workspaces)
        state = layout.tmp / f"scale-{shape.name}-state"
        state.mkdir(parents=True, exist_ok=True)
        if shape.links:
            extra = sorted(made["local"]["workspaces"].keys() - {"ws1"})
            (state / "tokens.json").write_text(json.dumps(store(shape.links, shape.links, extra)))
    path.write_text(yaml.safe_dump(made))
    started = time.monotonic()
    shape.proc = procs.start(f"scale-{shape.name}", gateway_command(path), env={"PYTHONPATH": str(ROOT)})
    await wait_for_port("127.0.0.1", shape.port, shape.proc, within=600)
    address, hub = ("127.0.0.1", shape.port), layout.hub(shape.port)
    while (await fetch(address, hub, "/readyz", wait=600)).status != 200:  # the port listens before the caches fill
        if shape.proc.popen.poll() is not None:
            raise RuntimeError(f"scale {shape.name}: the gateway exited while starting (see its log)")
        await asyncio.sleep(0.1)
    shape.startup_s = time.monotonic() - started
    shape.startup_cpu_s = cpu_seconds([shape.proc.pid])
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
    out = await _shapes(procs, layout, _three(workspaces, links), repeats, duration, say)
    async with contextlib.AsyncExitStack() as apis:  # an emulated API each: one's size does not slow another's
        shapes = _three(workspaces, links)
        for shape in shapes:
            env = await apis.enter_async_context(running_emulator(check_errors=False))
            await apis.enter_async_context(FakeKubelet(env.emulator, lambda pod: layout.up_host))
            started = time.monotonic()
            _populate(env.emulator, f"scale-{shape.name}", layout, shape.workspaces, shape.links)
            shape.api_url = env.url
            say(f"scale kubernetes {shape.name}: {time.monotonic() - started:.1f} s to create its objects")
        out["kubernetes"] = await _shapes(procs, layout, shapes, repeats, duration, say)
    if ws:
        out["websockets"] = await websockets(procs, layout, ws, say)
    return out


def _three(workspaces: int, links: int) -> list[Shape]:
    return [Shape("small", 10, 0), Shape("workspaces", workspaces, 0), Shape("everything", workspaces, links)]


async def _shapes(procs: Procs, layout: Layout, shapes: list[Shape], repeats: int, duration: float,
                  say: Any) -> dict[str, Any]:
    """The three shapes of one runtime (``small``, ``workspaces``, ``everything``), side by side."""
    runtime = "kubernetes" if shapes[0].api_url else "local"
    targets = {}
    for shape in shapes:
        await _start(procs, layout, shape)
        assert shape.sign_in is not None
        targets[shape.name] = await gateway_target(f"scale-{shape.name}", layout, shape.sign_in)
        say(f"scale {runtime} {shape.name}: {shape.workspaces} workspaces, {shape.links} links and tokens: ready in "
            f"{shape.startup_s:.1f} s ({shape.startup_cpu_s:.1f} s of CPU), {shape.rss_idle_mb:.0f} MB idle")
    for _ in range(repeats):
        for shape in shapes:
            assert shape.proc is not None
            target = targets[shape.name]
            result = await run_wrk(target, write_script(layout.tmp, target), 64, duration, [shape.proc.pid])
            if result.errors or not result.requests or result.cpu_s is None:
                raise RuntimeError(f"scale {runtime} {shape.name}: {result.errors} errors")
            shape.cpu_us.append(1e6 * result.cpu_s / result.requests)
            shape.rps.append(result.rps)
            say(f"scale {runtime} {shape.name}: {result.rps:.0f} req/s, {shape.cpu_us[-1]:.0f} µs CPU per request")
    out: dict[str, Any] = {"runtime": runtime, "workspaces": shapes[1].workspaces, "links": shapes[2].links,
                           "shapes": {}}
    for shape in shapes:
        row: dict[str, Any] = {"workspaces": shape.workspaces, "links": shape.links, "tokens": shape.links,
                               "startup_s": shape.startup_s, "startup_cpu_s": shape.startup_cpu_s,
                               "rss_idle_mb": shape.rss_idle_mb,
                               "cpu_us": statistics.median(shape.cpu_us), "rps": statistics.median(shape.rps)}
        row.update(await _many_user(shape, 20))
        say(f"scale {runtime} {shape.name}: " + ", ".join(f"{key} {value:.1f}" for key, value in row.items()
                                                           if key.endswith("_ms")))
        out["shapes"][shape.name] = row
        assert shape.proc is not None
        procs.stop(shape.proc)
    small, many, full = (out["shapes"][name] for name in ("small", "workspaces", "everything"))
    out["kb_per_workspace"] = 1024 * (many["rss_idle_mb"] - small["rss_idle_mb"]) / (many["workspaces"] - 10)
    links = full["links"]
    out["kb_per_link_and_token"] = 1024 * (full["rss_idle_mb"] - many["rss_idle_mb"]) / links if links else None
    out["cpu_x_small"] = {name: row["cpu_us"] / small["cpu_us"] for name, row in out["shapes"].items()}
    say(f"scale {runtime}: {out['kb_per_workspace']:.1f} KB per workspace, CPU per request ×small "
        + ", ".join(f"{name} {ratio:.2f}" for name, ratio in out["cpu_x_small"].items()))
    return out
