"""A benchmark run that is ended stops everything it started."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench.procs import descendants
from bench.servers import ROOT

pytestmark = [pytest.mark.timeout(180),
              pytest.mark.skipif(shutil.which("nginx") is None or shutil.which("wrk") is None,
                                 reason="the benchmark needs nginx and wrk (.ci/install)")]


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


def _command(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


@pytest.mark.parametrize("command", [
    ["bench", "--quick", "--only", "http", "--proxies", "gateway", "--connections", "8", "--duration", "60",
     "--workers", "1"],
    ["bench.ab", "--old", "HEAD", "--only", "http", "--rounds", "1", "--connections", "8", "--duration", "60"],
    ["bench.instructions", "--seconds", "60"],
    ["bench.ws_memory", "--ws", "10", "--repeats", "1"],
    ["bench", "soak", "--minutes", "1"],
], ids=["bench", "bench.ab", "bench.instructions", "bench.ws_memory", "bench soak"])
def test_a_run_ended_by_sigterm_stops_its_servers_and_gateways(tmp_path: Path, command: list[str]) -> None:
    """``timeout`` and CI runners end a run with SIGTERM, which killed the benchmark before it stopped anything: its
    nginx, echo server and gateways ran on, holding their ports (``bench.ab`` and ``bench.instructions`` did so until
    they too took SIGTERM for a Ctrl-C)."""
    out = [] if command[0] in ("bench.instructions", "bench.ws_memory") else ["--out", str(tmp_path)]
    run = subprocess.Popen([sys.executable, "-m", *command, *out],
                           cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    started: list[int] = []
    try:
        deadline = time.monotonic() + 90
        while not any("gateway serve" in _command(pid) for pid in started) and time.monotonic() < deadline:
            time.sleep(0.2)
            started = descendants(run.pid)
        assert any("gateway serve" in _command(pid) for pid in started), "the run started no gateway"
        run.send_signal(signal.SIGTERM)
        run.wait(60)
        deadline = time.monotonic() + 15
        while any(_running(pid) for pid in started) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert [_command(pid) for pid in started if _running(pid)] == []
    finally:
        run.kill()
        run.wait()
        for pid in started:
            if _running(pid):
                subprocess.run(["kill", "-9", str(pid)], check=False)
