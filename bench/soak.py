"""``python -m bench soak --minutes N``: mixed load on one gateway process for N minutes, sampling what a leak
would make grow — RSS, open file descriptors, asyncio tasks, upstream pool connections — every 10 s.

Not a test: it proves nothing in a few seconds, and its figures are for the README (after warm-up, each should
stay flat). The load, all on loopback, modest on purpose so a 2-core machine can run it beside other work:
- keep-alive HTTP: 8 connections, a GET every 25 ms each (the fast lane);
- WebSocket churn: 4 loops opening a WebSocket, echoing 5 messages, closing; 16 more held open throughout;
- SSE: 4 loops reading a 3-second event stream to its end, then opening the next;
- share links: 2 loops of bearer-token requests on fresh connections, and once a minute a link created, used
  and revoked;
- the hub: its snapshot API every 2 s;
- sleep and wake: two more workspaces, each put to sleep every few seconds (every fourth time archived, COLD)
  and woken by a held request.
Results go to ``bench/results/soak-<time>.{json,png}``; the summary table is printed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from prometheus_client.parser import text_string_to_metric_families

from bench.procs import Proc, Procs, free_port, rss_bytes, stop_on_sigterm, wait_for_port
from bench.servers import ROOT, USER, Layout, SignIn, gateway_command

RESULTS = ROOT / "bench" / "results"
ADDRESSES = {"app": "127.251.0.2", "nap1": "127.251.0.3", "nap2": "127.251.0.4"}
"""Workspaces' own loopback addresses, away from the tests' (127.10-249.x.x) and the benchmark's (127.0.0.x)."""
SERIES = ("rss_mb", "fds", "tasks", "pool_idle", "pool_busy", "websockets")


@dataclass
class Sample:
    t: float
    rss_mb: float
    fds: int
    tasks: float
    pool_idle: float
    pool_busy: float
    websockets: float
    requests: float


@dataclass
class Tally:
    """Answers per load kind: ``ok`` as expected, anything else counted by what it was."""

    ok: Counter[str] = field(default_factory=Counter)
    bad: Counter[str] = field(default_factory=Counter)

    def record(self, kind: str, outcome: str | None) -> None:
        if outcome is None:
            self.ok[kind] += 1
        else:
            self.bad[f"{kind}: {outcome}"] += 1


@dataclass
class Soak:
    port: int
    metrics_port: int
    app_port: int
    sign_in: SignIn
    tally: Tally = field(default_factory=Tally)
    cookies: dict[str, str] = field(default_factory=dict)
    share_token: str = ""

    def host(self, workspace: str) -> str:
        return f"{self.app_port}-{workspace}.localhost:{self.port}"

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def headers(self, workspace: str, **extra: str) -> dict[str, str]:
        return {"Host": self.host(workspace), "Cookie": self.cookies[workspace], **extra}

    @property
    def hub(self) -> dict[str, str]:
        return {"Host": self.sign_in.hub_host, "Cookie": self.sign_in.hub_cookie,
                "Origin": f"http://{self.sign_in.hub_host}"}


def _config(tmp: Path, port: int, metrics_port: int, app_port: int) -> Path:
    command = [sys.executable, "-m", "bench.soakapp", "--host", "{host}", "--port", str(app_port)]
    workspace = {"owner": USER, "command": command, "env": {"PYTHONPATH": str(ROOT)},
                 "ports": {app_port: "private"}}
    settings = {
        "listen": {"host": "127.0.0.1", "port": port},
        "metrics": {"host": "127.0.0.1", "port": metrics_port},
        "hub_url": f"http://localhost:{port}",
        "preview_domain": f"localhost:{port}",
        "auth": {"mode": "dev"},
        "idle": {"to_warm": 86400, "to_cold": 86400, "check_every": 30},
        "local": {"state_dir": str(tmp / "state"),
                  "workspaces": {name: {**workspace, "address": address} for name, address in ADDRESSES.items()}},
    }
    path = tmp / "gateway.yaml"
    path.write_text(yaml.safe_dump(settings))
    return path


# --- load -------------------------------------------------------------------------------------------------

Outcome = Callable[[], Awaitable[str | None]]
"""One step of a load: None when it went as it should, else a few words on what went wrong."""


async def _forever(soak: Soak, kind: str | Callable[[], str], step: Outcome, pause: float,
                   also: tuple[type[BaseException], ...] = ()) -> None:
    """Run ``step`` over and over, ``pause`` apart, counting each outcome under ``kind`` (or what it says after the
    step): an error of the client or a timeout is an outcome too (its type's name), never the end of the load."""
    caught: tuple[type[BaseException], ...] = (aiohttp.ClientError, TimeoutError, *also)
    while True:
        try:
            outcome = await step()
        except caught as exc:
            outcome = type(exc).__name__
        soak.tally.record(kind if isinstance(kind, str) else kind(), outcome)
        await asyncio.sleep(pause)


def _session(connector: aiohttp.TCPConnector | None = None) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(connector=connector, cookie_jar=aiohttp.DummyCookieJar())


async def polling_get(soak: Soak, kind: str, path: str, headers: dict[str, str], pause: float,
                      connector: aiohttp.TCPConnector | None = None) -> None:
    """A GET of ``path`` every ``pause`` seconds, which must answer 200."""
    async with _session(connector) as session:
        async def step() -> str | None:
            async with session.get(soak.url(path), headers=headers) as answer:
                await answer.read()
                return None if answer.status == 200 else str(answer.status)

        await _forever(soak, kind, step, pause)


async def websocket_churn(soak: Soak) -> None:
    async with _session() as session:
        async def step() -> str | None:
            async with asyncio.timeout(30), session.ws_connect(
                    soak.url("/ws"), headers=soak.headers("app", Origin=f"http://{soak.host('app')}")) as ws:
                for i in range(5):
                    await ws.send_str(f"m{i}")
                    message = await ws.receive()
                    if message.data != f"m{i}":
                        return f"echo {message.type.name}"
            return None

        await _forever(soak, "ws", step, 0.1)


async def websocket_held(soak: Soak) -> None:
    """One WebSocket open for the whole soak, echoing a message every 5 s (each echo counted); reopened if it
    ends."""
    async with _session() as session:
        async def step() -> str | None:
            async with session.ws_connect(soak.url("/ws"),
                                          headers=soak.headers("app", Origin=f"http://{soak.host('app')}")) as ws:
                while True:
                    await ws.send_str("still here")
                    async with asyncio.timeout(30):
                        message = await ws.receive()
                    if message.data != "still here":
                        return f"ended {message.type.name}"
                    soak.tally.record("ws-held", None)
                    await asyncio.sleep(5)

        await _forever(soak, "ws-held", step, 1.0)


async def sse_streams(soak: Soak) -> None:
    async with _session() as session:
        async def step() -> str | None:
            async with asyncio.timeout(30), session.get(
                    soak.url("/sse?seconds=3"), headers=soak.headers("app", Accept="text/event-stream")) as answer:
                body = await answer.read()
            return None if answer.status == 200 and b"event: end" in body else f"{answer.status} without end"

        await _forever(soak, "sse", step, 0.05)


async def share_lifecycle(soak: Soak) -> None:
    """Once a minute: a link created, used once, revoked, then refused."""
    async with _session(aiohttp.TCPConnector(force_close=True)) as session:
        async def step() -> str | None:
            token, link = await _new_share(soak, session)
            visitor = {"Host": soak.host("app"), "Authorization": f"Bearer {token}", "Accept": "*/*"}
            async with session.get(soak.url("/"), headers=visitor) as answer:
                first = answer.status
            async with session.delete(soak.url(f"/api/v1/workspaces/app/shares/{link}"), headers=soak.hub) as answer:
                revoked = answer.status
            async with session.get(soak.url("/"), headers=visitor) as answer:
                after = answer.status
            return None if (first, revoked, after) == (200, 200, 403) else f"{first}/{revoked}/{after}"

        await _forever(soak, "share-link", step, 60.0, also=(RuntimeError,))


async def sleep_and_wake(soak: Soak, workspace: str, offset: float) -> None:
    """Put the workspace to sleep (every fourth time archived) and wake it with a held request, over and over."""
    await asyncio.sleep(offset)
    rounds = 0
    action = "stop"
    async with _session(aiohttp.TCPConnector(force_close=True)) as session:
        async def step() -> str | None:
            nonlocal rounds, action
            rounds += 1
            action = "archive" if rounds % 4 == 0 else "stop"
            async with session.post(soak.url(f"/api/v1/workspaces/{workspace}/{action}"), headers=soak.hub) as answer:
                if answer.status != 200:
                    return f"{action} {answer.status}"
            async with asyncio.timeout(120), session.get(
                    soak.url("/"), headers=soak.headers(workspace, Accept="*/*")) as answer:
                await answer.read()
                return None if answer.status == 200 else f"held {answer.status}"

        await _forever(soak, lambda: f"{action}+wake", step, 3.0)


async def _new_share(soak: Soak, session: aiohttp.ClientSession) -> tuple[str, str]:
    async with session.post(soak.url("/api/v1/workspaces/app/shares"), headers=soak.hub,
                            json={"port": soak.app_port, "audience": "anyone", "ttl": "1d"}) as answer:
        body = await answer.json()
        if answer.status != 201:
            raise RuntimeError(f"share link refused: {answer.status} {body}")
        return str(body["token"]), str(body["id"])


# --- sampling ---------------------------------------------------------------------------------------------

def _open_fds(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return -1


async def _scrape(session: aiohttp.ClientSession, port: int) -> dict[tuple[str, str], float]:
    async with session.get(f"http://127.0.0.1:{port}/metrics") as answer:
        text = await answer.text()
    values: dict[tuple[str, str], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            values[(sample.name, ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items())))] = sample.value
    return values


async def sample(soak: Soak, gateway: Proc, session: aiohttp.ClientSession, started: float) -> Sample:
    values = await _scrape(session, soak.metrics_port)
    requests = sum(value for (name, _), value in values.items() if name == "codehub_requests_total")
    return Sample(
        t=round(time.monotonic() - started, 1), rss_mb=rss_bytes([gateway.pid]) / 2**20, fds=_open_fds(gateway.pid),
        tasks=values.get(("codehub_asyncio_tasks", ""), -1), pool_idle=values.get(
            ("codehub_upstream_connections", "state=idle"), -1),
        pool_busy=values.get(("codehub_upstream_connections", "state=busy"), -1),
        websockets=values.get(("codehub_websockets_open", ""), -1), requests=requests,
    )


# --- the run ----------------------------------------------------------------------------------------------

async def run(minutes: float, every: float, warmup: float) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="codehub-soak-"))
    procs = Procs(logs=tmp)
    port, metrics_port = free_port("127.0.0.1"), free_port("127.0.0.1")
    app_port = free_port(ADDRESSES["app"])
    samples: list[Sample] = []
    soak = Soak(port, metrics_port, app_port, SignIn(Layout(tmp), port))
    print(f"soak: temporary folder {tmp}", file=sys.stderr)
    try:
        gateway = procs.start("gateway", gateway_command(_config(tmp, port, metrics_port, app_port)),
                              env={"PYTHONPATH": str(ROOT)})
        await wait_for_port("127.0.0.1", port, gateway)
        await soak.sign_in.hub()
        async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as session:
            for workspace in ADDRESSES:  # woken by a held request: it is answered once the app listens
                soak.cookies[workspace] = await soak.sign_in.preview(soak.host(workspace))
                async with session.get(soak.url("/"), headers=soak.headers(workspace, Accept="*/*")) as answer:
                    if answer.status != 200:
                        raise RuntimeError(f"{workspace} did not wake: {answer.status}")
            soak.share_token, _ = await _new_share(soak, session)
            loads = [
                *(polling_get(soak, "http", "/", soak.headers("app", Accept="*/*"), 0.025,
                              aiohttp.TCPConnector(limit=1)) for _ in range(8)),
                *(websocket_churn(soak) for _ in range(4)),
                *(websocket_held(soak) for _ in range(16)), *(sse_streams(soak) for _ in range(4)),
                *(polling_get(soak, "share", "/", {"Host": soak.host("app"), "Authorization":
                                                   f"Bearer {soak.share_token}", "Accept": "*/*"}, 0.1,
                              aiohttp.TCPConnector(force_close=True)) for _ in range(2)),
                share_lifecycle(soak), polling_get(soak, "hub", "/api/v1/hub/snapshot", soak.hub, 2.0),
                sleep_and_wake(soak, "nap1", 0.0), sleep_and_wake(soak, "nap2", 2.0),
            ]
            tasks = [asyncio.create_task(load) for load in loads]
            started = time.monotonic()
            try:
                while True:
                    if not gateway.alive():
                        raise RuntimeError(f"the gateway exited; see {gateway.log}")
                    samples.append(await sample(soak, gateway, session, started))
                    _say(samples[-1], soak.tally)
                    if time.monotonic() - started >= minutes * 60:
                        break
                    await asyncio.sleep(every - (time.monotonic() - started) % every)
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        procs.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)
    return {"settings": {"minutes": minutes, "sample_every_s": every, "warmup_min": warmup},
            "samples": [asdict(s) for s in samples], "ok": dict(soak.tally.ok), "bad": dict(soak.tally.bad),
            "summary": summarise(samples, warmup * 60)}


def _say(s: Sample, tally: Tally) -> None:
    print(f"soak t={s.t:6.0f}s rss {s.rss_mb:6.1f} MB fds {s.fds:4d} tasks {s.tasks:4.0f} pool {s.pool_idle:.0f}"
          f"/{s.pool_busy:.0f} ws {s.websockets:3.0f} requests {s.requests:9.0f} ok {sum(tally.ok.values())}"
          f" bad {sum(tally.bad.values())}", file=sys.stderr, flush=True)


def summarise(samples: Sequence[Sample], warmup_s: float) -> dict[str, dict[str, float | None]]:
    """Per series: the median of the first minute after warm-up ("start"), of the last minute ("end"), and the
    least-squares slope per hour over everything after warm-up."""
    after = [s for s in samples if s.t >= warmup_s]
    summary: dict[str, dict[str, float | None]] = {}
    for name in SERIES:
        if len(after) < 2:
            summary[name] = {"start": None, "end": None, "per_hour": None}
            continue
        t0, t_end = after[0].t, after[-1].t
        first = [float(getattr(s, name)) for s in after if s.t <= t0 + 60]
        last = [float(getattr(s, name)) for s in after if s.t >= t_end - 60]
        xs = [s.t for s in after]
        ys = [float(getattr(s, name)) for s in after]
        slope = statistics.linear_regression(xs, ys).slope if len(set(xs)) > 1 else 0.0
        summary[name] = {"start": statistics.median(first), "end": statistics.median(last),
                         "per_hour": slope * 3600}
    return summary


def markdown(results: dict[str, Any]) -> str:
    lines = ["| after warm-up | start | end | slope per hour |", "|---|---:|---:|---:|"]
    for name, row in results["summary"].items():
        if row["start"] is None:
            continue
        lines.append(f"| {name} | {row['start']:.1f} | {row['end']:.1f} | {row['per_hour']:+.2f} |")
    ok = sum(results["ok"].values())
    lines.append("")
    lines.append(f"{ok} answers as expected; unexpected: {results['bad'] or 'none'}")
    return "\n".join(lines)


def chart(results: dict[str, Any], path: Path) -> Path | None:
    """One panel per series over time, warm-up shaded (needs the ``bench`` extra: matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    samples = results["samples"]
    minutes = [s["t"] / 60 for s in samples]
    titles = {"rss_mb": "RSS (MB)", "fds": "open file descriptors", "tasks": "asyncio tasks",
              "pool": "upstream pool connections", "websockets": "WebSockets open", "rate": "requests/s"}
    fig, axes = plt.subplots(2, 3, figsize=(14, 7), sharex=True)
    for ax, key in zip(axes.flat, titles, strict=True):
        if key == "pool":
            ax.plot(minutes, [s["pool_idle"] for s in samples], label="idle")
            ax.plot(minutes, [s["pool_busy"] for s in samples], label="busy")
            ax.legend(loc="upper right", fontsize=8)
        elif key == "rate":
            rates = [0.0] + [(b["requests"] - a["requests"]) / max(b["t"] - a["t"], 1e-9)
                             for a, b in itertools.pairwise(samples)]
            ax.plot(minutes, rates)
        else:
            ax.plot(minutes, [s[key] for s in samples])
        ax.axvspan(0, results["settings"]["warmup_min"], color="0.9", label="warm-up")
        ax.set_title(titles[key], fontsize=10)
        ax.set_ylim(bottom=0)
    for ax in axes[-1]:
        ax.set_xlabel("minutes")
    fig.suptitle(f"soak: {results['settings']['minutes']:g} min of mixed load on one gateway process")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench soak", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=30.0, help="how long the load runs (default 30)")
    parser.add_argument("--every", type=float, default=10.0, help="seconds between samples (default 10)")
    parser.add_argument("--warmup", type=float, help="minutes left out of the summary (default a third of the "
                                                     "run, at most 10: RSS settled after about 9 in a 30-minute run)")
    parser.add_argument("--out", type=Path, default=RESULTS, help=f"results folder (default {RESULTS})")
    args = parser.parse_args(argv)
    stop_on_sigterm()
    warmup = args.warmup if args.warmup is not None else min(10.0, args.minutes / 3)
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    results = asyncio.run(run(args.minutes, args.every, warmup))
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    json_path = args.out / f"soak-{stamp}.json"
    json_path.write_text(json.dumps(results, indent=2))
    picture = None
    with contextlib.suppress(OSError):
        picture = chart(results, args.out / f"soak-{stamp}.png")
    print(markdown(results))
    print(f"soak: wrote {json_path}" + (f", {picture}" if picture else ""), file=sys.stderr)
    return 0
