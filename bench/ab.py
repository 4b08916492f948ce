"""``python -m bench.ab``: the same measurements of two versions of the gateway, alternated, so that a change's
effect can be told apart from this machine's drift (wall-clock throughput moves by up to 40 % from run to run).

Each version is a git ref (exported with ``git archive``) or ``.`` (this working tree). Both gateways run side by
side (one worker each) in front of the same upstreams, and each round measures both, in ABBA order so that a trend
over the run weighs on both alike. Reported: medians over the rounds and the median of the per-round ratios
new/old (what a round's noise does to both cancels in its ratio).

- ``http``: wrk against each gateway (req/s, p99, CPU µs per request), as ``python -m bench`` runs it.
- ``hold``: ``--held`` requests held through one wake of a workspace whose server listens after 6 s (backlog 4096),
  the time from ``listen()`` to the last answer.
- ``instructions``: each gateway runs under valgrind (callgrind) and gets exactly ``--requests`` keep-alive GETs
  at each concurrency between a reset and a dump of its counters: instructions per proxied request, the same to
  within about 1 % on every run whatever else the machine is doing, where wall-clock figures are not. With
  ``--browser`` each GET is a module request as Chromium sends one in the page-load part (its fifteen headers), for
  a 1.8 KB module with the headers Vite's dev server answers with.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from bench.http_load import run_wrk, write_script
from bench.procs import Proc, Procs, cpu_seconds, free_port, stop_on_sigterm, wait_for_port
from bench.servers import (
    ROOT,
    Layout,
    SignIn,
    gateway_command,
    gateway_config,
    gateway_python,
    gateway_target,
    start_upstream_nginx,
)
from bench.wake import held_burst

RESULTS = ROOT / "bench" / "results"
_VALGRIND_START = 600.0
"""Seconds a gateway under valgrind may take to listen (Python runs some 50 times slower there)."""


@dataclass
class Side:
    """One version of the gateway: where its code is, and its process once started."""

    label: str
    ref: str
    tree: Path
    port: int = 0
    proc: Proc | None = None
    sign_in: SignIn | None = None
    figures: dict[str, list[float]] = field(default_factory=dict)

    def add(self, key: str, value: float) -> None:
        self.figures.setdefault(key, []).append(value)


def export(ref: str, into: Path) -> Path:
    """The gateway's code at ``ref``: this working tree for ``.``, a folder that holds a ``gateway`` package as it
    is (a copy with a probe in it, say), else a ``git archive`` of the commit."""
    if ref == ".":
        return ROOT
    if (Path(ref) / "gateway").is_dir():
        return Path(ref).resolve()
    tree = into / ref.replace("/", "_").replace("~", "_")
    tree.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", ref, "gateway", "policies"],
                             capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
    return tree


async def start(procs: Procs, layout: Layout, side: Side, *, valgrind: Path | None = None) -> None:
    side.port = free_port("127.0.0.1")
    config = gateway_config(layout, side.label, side.port)
    if valgrind is not None:  # its loop runs ~50 times slower: a connect seen 5 s late is no timeout of the app's
        settings = yaml.safe_load(config.read_text())
        settings["timeouts"] = {"connect": 300}  # a key every version knows
        settings.pop("limits")  # 64 connections at most here; versions before bd55d55 refuse the key
        config.write_text(yaml.safe_dump(settings))
    argv = gateway_command(config)
    if valgrind is not None:
        argv = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={valgrind}", *argv]
    side.proc = procs.start(side.label, argv, env={"PYTHONPATH": str(side.tree), "PYTHONHASHSEED": "0"},
                            cwd=side.tree)  # ``-m`` puts the working folder first on the path
    await wait_for_port("127.0.0.1", side.port, side.proc, within=_VALGRIND_START if valgrind else 20.0)
    side.sign_in = SignIn(layout, side.port)


async def http_rounds(sides: Sequence[Side], layout: Layout, tmp: Path, rounds: int, connections: Sequence[int],
                      duration: float) -> None:
    targets = {side.label: await gateway_target(side.label, layout, _signed(side)) for side in sides}
    for number in range(rounds):
        for conns in connections:
            for side in _abba(sides, number):
                assert side.proc is not None
                target = targets[side.label]
                result = await run_wrk(target, write_script(tmp, target), conns, duration, side.proc.own_tree())
                side.add(f"http c={conns} req/s", result.rps)
                side.add(f"http c={conns} p99 ms", result.p99_ms)
                if result.cpu_s is not None and result.requests:
                    side.add(f"http c={conns} CPU µs/req", 1e6 * result.cpu_s / result.requests)
                side.add(f"http c={conns} errors", result.errors)
                _say(f"round {number} {side.label} c={conns}: {result.rps:.0f} req/s p99 {result.p99_ms:.1f} ms "
                     f"errors {result.errors}")


async def hold_rounds(sides: Sequence[Side], layout: Layout, rounds: int, held: int, small: bool) -> None:
    """``small``: to the server that listens with ``http.server``'s backlog of 5 (else 4096)."""
    name = f"hold {held}" + (" backlog 5" if small else "")
    for number in range(rounds):
        for side in _abba(sides, number):
            assert side.proc is not None
            pids = side.proc.own_tree()
            cpu = cpu_seconds(pids)
            hold = await held_burst(_signed(side), layout, held, small=small)
            side.add(f"{name} last answer s", hold.last_answer_after_listen_s)
            side.add(f"{name} gateway CPU s", cpu_seconds(pids) - cpu)
            side.add(f"{name} not 200", hold.failed)
            _say(f"round {number} {side.label}: {hold.ok}/{hold.requests} ok, last answer "
                 f"{hold.last_answer_after_listen_s:.2f} s after listen" + (f" {hold.statuses}" if hold.failed else ""))


async def instructions(sides: Sequence[Side], procs: Procs, layout: Layout, tmp: Path, requests: int,
                       concurrencies: Sequence[int], rounds: int, held: int, browser: bool = False) -> None:
    """One gateway at a time under callgrind (two would share the cores and only slow each other down); with
    ``held``, also the cost of one request held through a wake: (a burst of ``held`` - a burst of 1) / (held - 1),
    which cancels the wake and the stop themselves."""
    for number in range(rounds):
        for side in _abba(sides, number):
            out = tmp / f"callgrind-{side.label}-{number}"
            await start(procs, layout, side, valgrind=out)
            assert side.proc is not None
            try:
                target = await gateway_target(side.label, layout, _signed(side))
                shape = browser_request if browser else plain_request
                raw = shape(target.host, target.cookie or "")
                name = "browser req" if browser else "req"
                for concurrency in concurrencies:
                    await keepalive_load(target.address, raw, max(requests // 10, concurrency),
                                         concurrency)  # warm: imports, caches, connections
                    _callgrind(side.proc.pid, "-z")
                    await keepalive_load(target.address, raw, requests, concurrency)
                    _callgrind(side.proc.pid, "-d")
                    count = _dumped_instructions(out)
                    side.add(f"instructions/{name} c={concurrency}", count / requests)
                    _say(f"round {number} {side.label} c={concurrency}: {count / requests:,.0f} instructions/request")
                if held:
                    one = await _held_instructions(side, layout, out, 1)
                    many = await _held_instructions(side, layout, out, held)
                    side.add(f"instructions/held request ({held} held)", (many - one) / (held - 1))
                    _say(f"round {number} {side.label} {held} held: {(many - one) / (held - 1):,.0f} "
                         "instructions/request")
            finally:
                procs.stop(side.proc)
                side.proc = None
                _remove_dumps(out)


async def _held_instructions(side: Side, layout: Layout, out: Path, count: int) -> int:
    """Instructions for ``count`` requests held through one wake, the wake and the stop included (the caller
    takes the difference of two counts, which leaves the cost of one held request)."""
    assert side.proc is not None
    _callgrind(side.proc.pid, "-z")
    hold = await held_burst(_signed(side), layout, count)
    _callgrind(side.proc.pid, "-d")
    if hold.failed:
        raise RuntimeError(f"{hold.failed} of {count} held requests failed under callgrind: {hold.statuses}")
    return _dumped_instructions(out)


async def pool_rounds(sides: Sequence[Side], procs: Procs, tmp: Path, rounds: int, requests: int,
                      concurrency: int | None, callgrind: bool) -> None:
    """``bench.pool_burst`` against one upstream (backlog 4096), each version's pool in turn; under callgrind the
    count per request is (a burst of ``requests`` - a burst of 1) / (requests - 1), which cancels start-up."""
    host = "127.0.0.6"
    port = free_port(host)
    stamp = tmp / "pool.stamp"
    upstream = procs.start("pool-upstream", [sys.executable, "-m", "bench.slowserver", "--host", host, "--port",
                                             str(port), "--delay", "0", "--stamp", str(stamp)],
                           env={"PYTHONPATH": str(ROOT)})
    await wait_for_port(host, port, upstream)
    name = f"pool, {requests} at once" if concurrency is None else f"pool, {requests} by {concurrency}"
    try:
        for number in range(rounds):
            for side in _abba(sides, number):
                if callgrind:
                    one = await _burst_instructions(side, tmp, host, port, 1, concurrency)
                    many = await _burst_instructions(side, tmp, host, port, requests, concurrency)
                    side.add(f"{name}: instructions/req", (many - one) / (requests - 1))
                    _say(f"round {number} {side.label}: {(many - one) / (requests - 1):,.0f} instructions/request")
                else:
                    result = json.loads(await _burst(side, host, port, requests, concurrency))
                    side.add(f"{name}: CPU s", result["cpu_s"])
                    side.add(f"{name}: wall s", result["wall_s"])
                    _say(f"round {number} {side.label}: CPU {result['cpu_s']:.3f} s, wall {result['wall_s']:.3f} s")
    finally:
        procs.stop(upstream)


async def _burst(side: Side, host: str, port: int, requests: int, concurrency: int | None,
                 prefix: Sequence[str] = ()) -> str:
    """One ``bench.pool_burst`` run with this side's gateway package first on the path (bench from here)."""
    steady = ["--concurrency", str(concurrency)] if concurrency is not None else []
    if prefix:
        steady += ["--connect-timeout", "300", "--queue-timeout", "3600"]
    process = await asyncio.create_subprocess_exec(
        *prefix, gateway_python(), "-m", "bench.pool_burst", "--host", host, "--port", str(port),
        "--requests", str(requests),
        *steady,
        env={**os.environ, "PYTHONPATH": f"{side.tree}{os.pathsep}{ROOT}", "PYTHONHASHSEED": "0"}, cwd=side.tree,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await process.communicate()
    if process.returncode:
        raise RuntimeError(f"bench.pool_burst failed for {side.label}: {err.decode()[-2000:]}")
    return out.decode().strip().splitlines()[-1]


async def _burst_instructions(side: Side, tmp: Path, host: str, port: int, requests: int,
                              concurrency: int | None) -> int:
    out = tmp / f"callgrind-pool-{side.label}"
    await _burst(side, host, port, requests, concurrency,
                 ("valgrind", "--tool=callgrind", f"--callgrind-out-file={out}"))
    text = out.read_text()
    out.unlink()
    return int(next(line for line in text.splitlines() if line.startswith("summary:")).split()[1])


def _callgrind(pid: int, command: str) -> None:
    subprocess.run(["callgrind_control", command, str(pid)], capture_output=True, check=True, timeout=120)


def _dumped_instructions(out: Path) -> int:
    """Instructions counted between the last reset and the dump just taken (callgrind numbers its dumps)."""
    dumps = sorted(out.parent.glob(f"{out.name}.*"), key=lambda path: int(path.suffix[1:]))
    text = dumps[-1].read_text()
    line = next(line for line in text.splitlines() if line.startswith("summary:"))
    _remove_dumps(out)
    return int(line.split()[1])


def _remove_dumps(out: Path) -> None:
    for dump in out.parent.glob(f"{out.name}*"):
        dump.unlink()


def plain_request(host: str, cookie: str) -> bytes:
    return f"GET / HTTP/1.1\r\nHost: {host}\r\nCookie: {cookie}\r\nAccept: */*\r\n\r\n".encode()


def browser_request(host: str, cookie: str) -> bytes:
    """One of a page load's module requests, headers as Chromium (headless, Linux) sends them over HTTP/1.1."""
    return (f"GET /module.js HTTP/1.1\r\nHost: {host}\r\nConnection: keep-alive\r\n"
            'sec-ch-ua-platform: "Linux"\r\n'
            "User-Agent: Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) "
            "HeadlessChrome/156.0.0.0 Safari/537.36\r\n"
            'sec-ch-ua: "Chromium";v="156", "Not-A.Brand";v="24", "HeadlessChrome";v="156"\r\n'
            "sec-ch-ua-mobile: ?0\r\nAccept: */*\r\nSec-Fetch-Site: same-origin\r\nSec-Fetch-Mode: cors\r\n"
            f"Sec-Fetch-Dest: script\r\nReferer: http://{host}/src/m0042.js\r\n"
            "Accept-Encoding: gzip, deflate, br, zstd\r\nAccept-Language: en-US,en;q=0.9\r\n"
            f"Cookie: {cookie}\r\n\r\n").encode()


async def keepalive_load(address: tuple[str, int], raw: bytes, total: int, concurrency: int) -> None:
    """Exactly ``total`` requests ``raw`` over ``concurrency`` kept-alive connections; every answer must be a 200."""
    left = [total]

    async def connection() -> None:
        reader, writer = await asyncio.open_connection(*address)
        try:
            while left[0] > 0:
                left[0] -= 1
                writer.write(raw)
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 300)
                if not head.startswith(b"HTTP/1.1 200 "):
                    raise RuntimeError(f"the gateway answered {head[:80]!r}")
                length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                              if line.lower().startswith(b"content-length:"))
                await reader.readexactly(length)
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    await asyncio.gather(*(connection() for _ in range(concurrency)))


def _signed(side: Side) -> SignIn:
    assert side.sign_in is not None
    return side.sign_in


def _abba(sides: Sequence[Side], number: int) -> Sequence[Side]:
    return sides if number % 2 == 0 else list(reversed(sides))


def summary(old: Side, new: Side) -> list[dict[str, Any]]:
    rows = []
    for key, before in old.figures.items():
        after = new.figures.get(key, [])
        ratios = [b / a for a, b in zip(before, after, strict=False) if a]
        rows.append({
            "figure": key, "old_median": statistics.median(before), "new_median": statistics.median(after),
            "old_range": [min(before), max(before)], "new_range": [min(after), max(after)],
            "ratio_median": statistics.median(ratios) if ratios else None,
            "ratio_range": [min(ratios), max(ratios)] if ratios else None, "rounds": len(before),
        })
    return rows


def markdown(old: Side, new: Side, rows: list[dict[str, Any]]) -> str:
    lines = [f"old = `{old.ref}`, new = `{new.ref}`; medians over rounds [min–max]; new/old per round",
             "", "| figure | old | new | new/old (median [min–max]) |", "|---|---:|---:|---:|"]
    for row in rows:
        ratio = (f"{row['ratio_median']:.3f} [{row['ratio_range'][0]:.3f}–{row['ratio_range'][1]:.3f}]"
                 if row["ratio_median"] is not None else "–")
        lines.append(f"| {row['figure']} ({row['rounds']} rounds) | {_num(row['old_median'])} "
                     f"[{_num(row['old_range'][0])}–{_num(row['old_range'][1])}] | {_num(row['new_median'])} "
                     f"[{_num(row['new_range'][0])}–{_num(row['new_range'][1])}] | {ratio} |")
    return "\n".join(lines) + "\n"


def _num(value: float) -> str:
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.2f}"


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.ab", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--old", required=True, help="git ref of the version to compare against")
    parser.add_argument("--new", default=".", help="git ref, or . for this working tree (default)")
    parser.add_argument("--only", default="http,hold",
                        help="parts: http, hold, instructions, pool (default http,hold)")
    parser.add_argument("--rounds", type=int, default=10, help="rounds of each part (default 10)")
    parser.add_argument("--connections", default="64,256", help="wrk concurrencies (default 64,256)")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per wrk run (default 5)")
    parser.add_argument("--held", type=int, default=10000, help="requests held through a wake (default 10000)")
    parser.add_argument("--small", action="store_true", help="hold: to a server with a backlog of 5")
    parser.add_argument("--requests", type=int, default=2000, help="requests counted under callgrind (2000)")
    parser.add_argument("--concurrency", default="1,64", help="concurrencies under callgrind (default 1,64)")
    parser.add_argument("--browser", action="store_true",
                        help="instructions: module requests as Chromium sends them, not bare GETs")
    parser.add_argument("--held-instructions", type=int, default=0,
                        help="requests held through one wake under callgrind (default 0: none; 200 fit)")
    parser.add_argument("--burst", type=int, default=10000, help="requests in one pool burst (default 10000)")
    parser.add_argument("--pool-concurrency", type=int, help="pool: requests at a time (default: all at once)")
    parser.add_argument("--callgrind", action="store_true", help="pool: count instructions instead of CPU time")
    parser.add_argument("--out", type=Path, default=RESULTS, help=f"results folder (default {RESULTS})")
    return parser


async def run(args: argparse.Namespace) -> tuple[Side, Side]:
    parts = set(args.only.split(","))
    tmp = Path(tempfile.mkdtemp(prefix="codehub-ab-"))
    procs = Procs(logs=tmp)
    old, new = (Side(label, ref, export(ref, tmp)) for label, ref in (("old", args.old), ("new", args.new)))
    layout = Layout(tmp)
    _say(f"bench.ab: temporary folder {tmp}")
    try:
        upstream = start_upstream_nginx(procs, layout)
        await wait_for_port(layout.up_host, layout.http_port, upstream)
        if parts & {"http", "hold"}:
            for side in (old, new):
                await start(procs, layout, side)
            if "http" in parts:
                await http_rounds((old, new), layout, tmp, args.rounds,
                                  [int(c) for c in args.connections.split(",")], args.duration)
            if "hold" in parts:
                await hold_rounds((old, new), layout, args.rounds, args.held, args.small)
            for side in (old, new):
                if side.proc is not None:
                    procs.stop(side.proc)
                    side.proc = None
        if "pool" in parts:
            await pool_rounds((old, new), procs, tmp, args.rounds, args.burst, args.pool_concurrency, args.callgrind)
        if "instructions" in parts:
            await instructions((old, new), procs, layout, tmp, args.requests,
                               [int(c) for c in args.concurrency.split(",")], args.rounds, args.held_instructions,
                               args.browser)
    finally:
        procs.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)
    return old, new


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # ten thousand held requests, both ends here
    stop_on_sigterm()
    old, new = asyncio.run(run(args))
    rows = summary(old, new)
    text = markdown(old, new, rows)
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (args.out / f"ab-{stamp}.json").write_text(json.dumps(
        {"old": old.ref, "new": new.ref, "settings": vars(args), "rows": rows,
         "figures": {"old": old.figures, "new": new.figures}}, indent=2, default=str))
    (args.out / f"ab-{stamp}.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
