"""HTTP load with wrk: fixed duration, a Lua script for the Host and Cookie headers, results as JSON."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from pathlib import Path

from bench.procs import cpu_seconds, rss_bytes
from bench.servers import Target

_DONE = """
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests":%d,"duration_us":%d,"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d,'
    .. '"p50_us":%d,"p90_us":%d,"p99_us":%d,"mean_us":%.1f}\\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.mean))
end
"""


def _lua_string(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def write_script(directory: Path, target: Target) -> Path:
    lines = [f'wrk.headers["Host"] = {_lua_string(target.host)}']
    if target.cookie:
        lines.append(f'wrk.headers["Cookie"] = {_lua_string(target.cookie)}')
    path = directory / f"wrk-{target.name}.lua"
    path.write_text("\n".join(lines) + "\n" + _DONE)
    return path


@dataclass
class HttpResult:
    target: str
    connections: int
    rps: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    errors: int
    socket_errors: int
    non_2xx: int
    requests: int
    cpu_s: float | None
    cpu_pct: float | None
    rss_mb: float | None


async def run_wrk(target: Target, script: Path, connections: int, duration: float, pids: list[int],
                  threads: int = 2, request_timeout: float = 5.0) -> HttpResult:
    """One fixed-duration wrk run; CPU and RSS are read from /proc for the proxy's processes (none for direct)."""
    url = f"http://{target.address[0]}:{target.address[1]}/"
    cpu_before = cpu_seconds(pids) if pids else None
    process = await asyncio.create_subprocess_exec(
        "wrk", "-t", str(min(threads, connections)), "-c", str(connections), "-d", f"{duration:g}s",  # wrk needs c ≥ t
        "--timeout", f"{request_timeout:g}s",
        "--latency", "-s", str(script), url,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )
    try:
        out, _ = await asyncio.wait_for(process.communicate(), duration + request_timeout + 30)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    rss = rss_bytes(pids) if pids else None
    cpu = cpu_seconds(pids) - cpu_before if cpu_before is not None else None
    text = out.decode(errors="replace")
    line = next((line for line in text.splitlines() if line.startswith("WRKJSON ")), None)
    if line is None:
        raise RuntimeError(f"wrk printed no result:\n{text}")
    data = json.loads(line[len("WRKJSON "):])
    seconds = data["duration_us"] / 1e6
    socket_errors = data["connect"] + data["read"] + data["write"] + data["timeout"]
    return HttpResult(
        target=target.name, connections=connections, rps=data["requests"] / seconds,
        p50_ms=data["p50_us"] / 1000, p90_ms=data["p90_us"] / 1000, p99_ms=data["p99_us"] / 1000,
        errors=socket_errors + data["status"], socket_errors=socket_errors, non_2xx=data["status"],
        requests=data["requests"], cpu_s=cpu, cpu_pct=None if cpu is None else 100 * cpu / seconds,
        rss_mb=None if rss is None else rss / 2**20,
    )
