"""``python -m bench [--quick]``: start everything on loopback, measure, write bench/results/, stop everything."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

from bench import report
from bench.http_load import run_wrk, write_script
from bench.procs import Proc, Procs, free_port, stop_on_sigterm, wait_for_port
from bench.servers import (
    ROOT,
    Layout,
    SignIn,
    Target,
    gateway_python,
    gateway_target,
    start_chp,
    start_echo,
    start_gateway,
    start_proxy_nginx,
    start_upstream_nginx,
    static_targets,
)
from bench.wake import held_burst, wake_rounds
from bench.ws_load import WsResult, run_ws

RESULTS = ROOT / "bench" / "results"
PARTS = ("http", "ws", "wake", "page", "screen", "scale")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="short smoke run (1 repeat, 3 s, fewer connections)")
    parser.add_argument("--duration", type=float, help="seconds per wrk run (default 10; quick 3)")
    parser.add_argument("--repeats", type=int, help="runs of each configuration (default 3; quick 1)")
    parser.add_argument("--connections", help="wrk concurrencies, comma-separated (default 64,256,1000)")
    parser.add_argument("--ws", type=int, help="concurrent WebSockets (default 1000; quick 200)")
    parser.add_argument("--wakes", type=int, help="wake rounds (default 20; quick 5)")
    parser.add_argument("--held", type=int, help="requests held during one wake (default 10000; quick 1000)")
    parser.add_argument("--held-small", type=int, default=1000,
                        help="requests held during one wake of a server with a backlog of 5 (default 1000)")
    parser.add_argument("--rounds", type=int,
                        help="browser rounds: page loads and HMR (default 7; quick 3), wakes to screen (half)")
    parser.add_argument("--scale-workspaces", type=int, help="workspaces in the scale part (default 10000; quick 2000)")
    parser.add_argument("--scale-links", type=int,
                        help="share links, and as many API tokens, in the scale part (default 100000; quick 20000)")
    parser.add_argument("--scale-ws", type=int, help="idle relayed WebSockets on one worker (default 10000, capped "
                        "at 9900 by the file limit; quick 2000)")
    parser.add_argument("--workers", default="1,2", help="gateway --workers values to measure (default 1,2)")
    parser.add_argument("--only", default=",".join(PARTS), help=f"parts to run: {', '.join(PARTS)} (default all)")
    parser.add_argument("--proxies", default="gateway,nginx,chp,relay",
                        help="proxies besides direct (default all; relay, a bare byte relay, in page loads only)")
    parser.add_argument("--out", type=Path, default=RESULTS, help=f"results folder (default {RESULTS})")
    parser.add_argument("--python", help="interpreter the gateways run on (default: the .venv-debian that .ci/install "
                        "made on Debian's CPython, else this one)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder with configs and logs")
    return parser


@dataclasses.dataclass
class Proxy:
    """One measured configuration: how to (re)start it and which processes are its own."""

    name: str
    start: Callable[[], Awaitable[Proc | None]]
    proc: Proc | None = None
    target: Target | None = None
    sign_in: SignIn | None = None

    def pids(self) -> list[int]:
        return self.proc.own_tree() if self.proc is not None else []


def _env() -> dict[str, Any]:
    def version(argv: Sequence[str]) -> str:
        try:
            out = subprocess.run(argv, capture_output=True, text=True, timeout=10)
        except OSError:
            return "missing"
        return (out.stdout + out.stderr).strip().splitlines()[0] if (out.stdout + out.stderr).strip() else "?"

    import aiohttp

    python = gateway_python()
    return {
        "python": f"{version([python, '--version']).removeprefix('Python ')} ({python})",
        "aiohttp": aiohttp.__version__, "cores": len(_affinity()),
        "nginx": version(["nginx", "-v"]), "wrk": version(["wrk", "-v"]), "node": version(["node", "-v"]),
        "kernel": platform.release(), "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _affinity() -> set[int]:
    import os

    return os.sched_getaffinity(0)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    quick = args.quick
    duration = args.duration or (3.0 if quick else 10.0)
    repeats = args.repeats or (1 if quick else 3)
    connections = [int(c) for c in (args.connections or "64,256,1000").split(",")]
    ws_count = args.ws or (200 if quick else 1000)
    wakes = args.wakes or (5 if quick else 20)
    held = args.held or (1000 if quick else 10000)
    rounds = args.rounds or (3 if quick else 7)
    parts = set(args.only.split(","))
    wanted = set(args.proxies.split(","))
    workers = [int(w) for w in args.workers.split(",")] if "gateway" in wanted else []
    tmp = Path(tempfile.mkdtemp(prefix="codehub-bench-"))
    procs = Procs(logs=tmp)
    layout = Layout(tmp, hold_delay=2.0 if quick else 6.0)
    results: dict[str, Any] = {
        "settings": {"duration_s": duration, "repeats": repeats, "connections": connections, "ws": ws_count,
                     "wakes": wakes, "held": held, "held_small": args.held_small, "workers": workers,
                     "rounds": rounds,
                     "wrk_threads": 2},
        "env": _env(), "http": [], "ws": [], "wake": None, "hold": None,
    }
    print(f"bench: temporary folder {tmp}", file=sys.stderr)
    try:
        upstream = start_upstream_nginx(procs, layout)
        echo = start_echo(procs, layout)
        await wait_for_port(layout.up_host, layout.http_port, upstream)
        await wait_for_port(layout.up_host, layout.ws_port, echo)
        proxies = _proxies(procs, layout, wanted, workers)
        for proxy in proxies.values():
            await _restart(procs, proxy)
        if "http" in parts:
            for rep in range(repeats):
                for conns in connections:
                    for proxy in proxies.values():
                        assert proxy.target is not None
                        script = write_script(tmp, proxy.target)
                        result = await run_wrk(proxy.target, script, conns, duration, proxy.pids())
                        results["http"].append({**dataclasses.asdict(result), "repeat": rep})
                        _say(f"http {proxy.name:10} c={conns:<5} {result.rps:9.0f} req/s p50 {result.p50_ms:7.2f}"
                             f" ms p99 {result.p99_ms:7.2f} ms errors {result.errors}"
                             + (f" cpu {1e6 * result.cpu_s / result.requests:.0f} µs/req"
                                if result.cpu_s is not None and result.requests else ""))
        if "ws" in parts:
            for rep in range(repeats):
                for proxy in proxies.values():
                    await _restart(procs, proxy)
                    assert proxy.target is not None
                    ws: WsResult = await run_ws(proxy.target, ws_count, proxy.pids())
                    results["ws"].append({**dataclasses.asdict(ws), "repeat": rep})
                    _say(f"ws   {proxy.name:10} open {ws.opened}/{ws.connections} handshake p50 "
                         f"{ws.handshake_p50_ms:.2f} p99 {ws.handshake_p99_ms:.2f} ms echo p50 {ws.echo_p50_ms:.2f}"
                         f" p99 {ws.echo_p99_ms:.2f} ms {ws.kb_per_connection or 0:.1f} KB/conn")
        if "wake" in parts and "gateway" in wanted:
            for proxy in proxies.values():
                if not proxy.name.startswith("gateway"):
                    continue
                sign_in = proxy.sign_in
                assert sign_in is not None
                wake = await wake_rounds(sign_in, layout, wakes)
                _say(f"wake {proxy.name}: held first byte {wake.held_median_ms:.1f} ms after listen (median of "
                     f"{len(wake.held_ms)}), ready event {wake.ready_median_ms:.1f} ms, failed {wake.failed}")
                results.setdefault("wakes", []).append({
                    "target": proxy.name, **dataclasses.asdict(wake), "held_median_ms": wake.held_median_ms,
                    "ready_median_ms": wake.ready_median_ms})
                for count, small in ((held, False), (args.held_small, True)):
                    hold = await held_burst(sign_in, layout, count, small=small)
                    _say(f"hold {proxy.name} backlog {hold.backlog}: {hold.ok}/{hold.requests} ok, "
                         f"{hold.sent_before_listen} sent before listen, last answer "
                         f"{hold.last_answer_after_listen_s:.2f} s after listen {hold.statuses}")
                    results.setdefault("holds", []).append({"target": proxy.name, **dataclasses.asdict(hold)})
        if "page" in parts:
            from bench.pageload import page_loads

            sign_ins = {name: proxy.sign_in for name, proxy in proxies.items() if proxy.sign_in is not None}
            results["page"] = await page_loads(procs, layout, sign_ins, wanted, rounds, say=_say)
        if "screen" in parts:
            from bench.wake_screen import wakes_to_screen

            for name, proxy in proxies.items():
                if proxy.sign_in is not None:
                    results.setdefault("screen", []).append(
                        await wakes_to_screen(layout, proxy.sign_in, name, max(1, rounds // 2), say=_say))
        if "scale" in parts and "gateway" in wanted:
            from bench.scale import scale

            workspaces = args.scale_workspaces or (2000 if quick else 10_000)
            results["scale"] = await scale(procs, layout, workspaces=workspaces,
                                           links=args.scale_links or (20_000 if quick else 100_000),
                                           repeats=repeats, duration=duration,
                                           ws=args.scale_ws or (2000 if quick else 10_000), say=_say)
    finally:
        procs.stop_all()
        if args.keep:
            print(f"bench: kept {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    return results


def _proxies(procs: Procs, layout: Layout, wanted: set[str], workers: list[int]) -> dict[str, Proxy]:
    statics = static_targets(layout)
    proxies = {"direct": Proxy("direct", _nothing, target=statics["direct"])}
    for count in workers:
        name = "gateway" if count == 1 else f"gateway-w{count}"
        port = free_port("127.0.0.1")
        sign_in = SignIn(layout, port)
        proxy = Proxy(name, _nothing, sign_in=sign_in)

        async def start(name: str = name, port: int = port, count: int = count, sign_in: SignIn = sign_in,
                        proxy: Proxy = proxy) -> Proc:
            proc = await start_gateway(procs, layout, name, port, count)
            proxy.target = await gateway_target(name, layout, sign_in)
            return proc

        proxy.start = start
        proxies[name] = proxy
    if "nginx" in wanted:
        async def nginx() -> Proc:
            proc = start_proxy_nginx(procs, layout)
            await wait_for_port("127.0.0.1", layout.nginx_port, proc)
            return proc

        proxies["nginx"] = Proxy("nginx", nginx, target=statics["nginx"])
    if "chp" in wanted:
        proxies["chp"] = Proxy("chp", lambda: start_chp(procs, layout), target=statics["chp"])
    return proxies


async def _nothing() -> None:
    return None


async def _restart(procs: Procs, proxy: Proxy) -> None:
    if proxy.proc is not None:
        procs.stop(proxy.proc)
        proxy.proc = None
    proxy.proc = await proxy.start()


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.python:
        os.environ["CODEHUB_BENCH_PYTHON"] = args.python  # the parts that run in processes of their own read it too
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    for tool in ("nginx", "wrk"):
        if shutil.which(tool) is None:
            print(f"bench: {tool} is missing (Debian: apt-get install -y nginx-light wrk)", file=sys.stderr)
            return 2
    stop_on_sigterm()
    results = asyncio.run(run(args))
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    summary = report.summarise(results)
    results["summary"] = summary
    json_path = args.out / f"bench-{stamp}.json"
    json_path.write_text(json.dumps(results, indent=2, default=str))
    markdown = report.markdown(results)
    (args.out / f"bench-{stamp}.md").write_text(markdown)
    chart = report.chart(results, args.out / f"bench-{stamp}.png")
    print(markdown)
    print(f"bench: wrote {json_path}, {json_path.with_suffix('.md')}" + (f", {chart}" if chart else ""),
          file=sys.stderr)
    return 0
