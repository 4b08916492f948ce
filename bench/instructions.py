"""Instructions per proxied request: the gateway under callgrind, a fixed load through the fast lane, its user-
space instruction count (Ir) over the requests wrk completed. Wall-clock CPU figures on a shared 2-core machine
move by ±40 % between runs; instruction counts move by about 1 %, so small changes can be compared.

    PYTHONPATH=. python -m bench.instructions [--tree OTHER_CHECKOUT] [--seconds 20]

Kernel time (the sends and receives) is not counted: compare syscalls per request with ``--strace`` (strace -c
on the gateway over the same load, without callgrind).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.http_load import run_wrk, write_script
from bench.procs import Proc, Procs, free_port, stop_on_sigterm, wait_for_port
from bench.scale import store as scale_store
from bench.servers import ROOT, Layout, SignIn, gateway_command, gateway_config, gateway_target, start_upstream_nginx

_TOTALS = re.compile(r"^(?:totals|summary):\s+(\d+)", re.MULTILINE)
_STRACE_TOTAL = re.compile(r"^[\d.]+\s+[\d.]+\s+\d+\s+(\d+)\s+(?:\d+\s+)?total$", re.MULTILINE)


def _read(path: Path) -> str:
    return path.read_text(errors="replace")


def _newest(folder: Path, pattern: str) -> Path:
    return max(folder.glob(pattern), key=lambda path: path.stat().st_mtime)


async def _control(option: str, pid: int) -> None:
    """``callgrind_control -z`` zeroes the counters, ``-d`` dumps them."""
    process = await asyncio.create_subprocess_exec("callgrind_control", option, str(pid),
                                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    if await asyncio.wait_for(process.wait(), 120) != 0:
        raise RuntimeError(f"callgrind_control {option} {pid} failed")


def _argv(config: Path) -> list[str]:
    return gateway_command(config)


def start_gateway(procs: Procs, tree: Path, argv: Sequence[str]) -> Proc:
    """The gateway of ``tree``: ``-m`` puts the working folder first on the path, before ``PYTHONPATH``, so it is
    started there (from anywhere else ``--tree`` measured the checkout the benchmark was run from)."""
    return procs.start("gateway", argv, env={"PYTHONPATH": f"{tree}:{ROOT}"}, cwd=tree)


async def measure(tree: Path, *, seconds: float, connections: int, strace: bool,
                  links: int = 0) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="codehub-instr-"))
    procs = Procs(logs=tmp)
    layout = Layout(tmp)
    try:
        upstream = start_upstream_nginx(procs, layout)
        await wait_for_port(layout.up_host, layout.http_port, upstream)
        port = free_port("127.0.0.1")
        config = gateway_config(layout, "gateway", port)
        if links:  # the store of bench.scale: share links and as many API tokens
            state = tmp / "gateway-state"
            state.mkdir(parents=True, exist_ok=True)
            (state / "tokens.json").write_text(json.dumps(scale_store(links, links, ["ws1", "wk", "hold"])))
        out = tmp / "callgrind.out"
        argv = _argv(config)
        if not strace:
            argv = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", "--dump-instr=no", *argv]
        gateway = start_gateway(procs, tree, argv)
        await wait_for_port("127.0.0.1", port, gateway, within=1800)  # a big store loads slowly under callgrind
        target = await gateway_target("gateway", layout, SignIn(layout, port))
        script = write_script(tmp, target)
        warm_up = max(1, round(seconds / 4))  # wrk takes whole seconds
        await run_wrk(target, script, connections, warm_up, [], request_timeout=30)
        pid = gateway.pid
        if strace:
            tracer = await asyncio.create_subprocess_exec(
                "strace", "-c", "-f", "-p", str(pid), "-o", str(tmp / "strace.txt"), stderr=subprocess.DEVNULL)
            await asyncio.sleep(1)
            result = await run_wrk(target, script, connections, seconds, [], request_timeout=30)
            tracer.send_signal(2)
            await asyncio.wait_for(tracer.wait(), 30)
            text = _read(tmp / "strace.txt")
            match = _STRACE_TOTAL.search(text)
            calls = int(match[1]) if match else 0
            return {"requests": result.requests, "syscalls": calls, "syscalls_per_request": calls / result.requests,
                    "table": text}
        await _control("-z", pid)
        result = await run_wrk(target, script, connections, seconds, [], request_timeout=30)
        await _control("-d", pid)
        match = _TOTALS.search(_read(_newest(tmp, "callgrind.out.*")))
        total = int(match[1]) if match else 0
        return {"requests": result.requests, "instructions": total, "per_request": total / max(1, result.requests),
                "errors": result.errors}
    finally:
        procs.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.instructions", description=__doc__.splitlines()[0])
    parser.add_argument("--tree", type=Path, default=ROOT, help="the checkout whose gateway to measure")
    parser.add_argument("--seconds", type=float, default=20.0, help="length of the counted load")
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--strace", action="store_true", help="count syscalls per request instead")
    parser.add_argument("--links", type=int, default=0, help="share links, and as many API tokens, in the store")
    args = parser.parse_args(argv)
    stop_on_sigterm()
    result = asyncio.run(measure(args.tree.resolve(), seconds=args.seconds,
                                 connections=args.connections, strace=args.strace, links=args.links))
    table = result.pop("table", None)
    print(json.dumps(result))
    if table:
        print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
