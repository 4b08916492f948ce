"""Medians, ratios and targets from the raw runs; the Markdown table and the PNG chart."""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable
from pathlib import Path
from typing import Any

TARGET_RATIO = 1.5
TARGET_KB_PER_WS = 20.0
TARGET_HELD_MS = 50.0
TARGET_SMALL_BACKLOG = 10
"""Upstreams listening with a backlog this small (dev servers) are held to ``TARGET_SMALL_LAST_S``."""
TARGET_SMALL_LAST_S = 1.0


def _median(values: Iterable[float | None]) -> float | None:
    present = [value for value in values if value is not None and not math.isnan(value)]
    return statistics.median(present) if present else None


def summarise(results: dict[str, Any]) -> dict[str, Any]:
    http: dict[str, dict[int, dict[str, Any]]] = {}
    for run in results["http"]:
        http.setdefault(run["target"], {}).setdefault(run["connections"], {"runs": []})["runs"].append(run)
    for by_conns in http.values():
        for cell in by_conns.values():
            runs = cell.pop("runs")
            cell["n"] = len(runs)
            for key in ("rps", "p50_ms", "p99_ms", "cpu_pct", "rss_mb"):
                cell[key] = _median(run[key] for run in runs)
            cell["errors"] = sum(run["errors"] for run in runs)
    for by_conns in http.values():
        for conns, cell in by_conns.items():
            for base in ("direct", "chp"):
                ref = http.get(base, {}).get(conns)
                if ref and ref["rps"] and cell["rps"] is not None:
                    cell[f"rps_x_{base}"] = cell["rps"] / ref["rps"]
                    cell[f"p99_x_{base}"] = cell["p99_ms"] / ref["p99_ms"] if ref["p99_ms"] else None
    ws: dict[str, dict[str, Any]] = {}
    for run in results["ws"]:
        ws.setdefault(run["target"], {"runs": []})["runs"].append(run)
    for cell in ws.values():
        runs = cell.pop("runs")
        cell["n"] = len(runs)
        for key in ("handshake_p50_ms", "handshake_p99_ms", "echo_p50_ms", "echo_p99_ms", "kb_per_connection"):
            cell[key] = _median(run[key] for run in runs)
        cell["failed"] = sum(run["failed"] for run in runs)
        cell["opened"] = min(run["opened"] for run in runs)
    return {"http": http, "ws": ws, "targets": _targets(http, ws, results)}


def _targets(http: dict[str, Any], ws: dict[str, Any], results: dict[str, Any]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    chp = http.get("chp", {})
    for name in sorted(n for n in http if n.startswith("gateway")):
        for conns, cell in sorted(http[name].items()):
            ref = chp.get(conns)
            if not ref:
                continue
            ok = (cell["rps"] >= TARGET_RATIO * ref["rps"] and cell["p99_ms"] <= ref["p99_ms"]
                  and cell["errors"] == 0)
            rows.append({"target": f"{name} HTTP c={conns}: ≥{TARGET_RATIO}× chp req/s, p99 ≤ chp, no errors",
                         "value": f"{cell['rps_x_chp']:.2f}× req/s, p99 {cell['p99_ms']:.1f} vs "
                                  f"{ref['p99_ms']:.1f} ms, {cell['errors']} errors", "met": ok})
    for name in sorted(n for n in ws if n.startswith("gateway")):
        kb = ws[name]["kb_per_connection"]
        rows.append({"target": f"{name} ≤ {TARGET_KB_PER_WS:.0f} KB per idle WebSocket",
                     "value": f"{kb:.1f} KB" if kb is not None else "n/a",
                     "met": kb is not None and kb <= TARGET_KB_PER_WS and ws[name]["failed"] == 0})
    for wake in results.get("wakes") or []:
        held = wake["held_median_ms"]
        rows.append({"target": f"{wake['target']} held request served ≤ {TARGET_HELD_MS:.0f} ms after the port "
                               "accepts (median)", "value": f"{held:.1f} ms", "met": held <= TARGET_HELD_MS})
    for hold in results.get("holds") or []:
        rows.append({"target": f"{hold['target']} {hold['requests']} requests held during one wake (backlog "
                               f"{hold.get('backlog', '–')}), none failed",
                     "value": f"{hold['ok']} ok, {hold['failed']} failed", "met": hold["failed"] == 0})
        if hold.get("backlog", 0) <= TARGET_SMALL_BACKLOG:
            last = hold["last_answer_after_listen_s"]
            rows.append({"target": f"{hold['target']} backlog {hold['backlog']}: last of {hold['requests']} held "
                                   f"answered ≤ {TARGET_SMALL_LAST_S:g} s after listen", "value": f"{last:.2f} s",
                         "met": last <= TARGET_SMALL_LAST_S})
    return rows


def _f(value: float | None, digits: int = 1) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def markdown(results: dict[str, Any]) -> str:
    summary = results["summary"]
    settings, env = results["settings"], results["env"]
    out = [
        "# code-hub gateway benchmark",
        "",
        f"{env['when']} · {env['cores']} cores · Python {env['python']} · aiohttp {env['aiohttp']} · "
        f"{env['nginx']} · node {env['node']} · wrk {settings['wrk_threads']} threads, "
        f"{settings['duration_s']:g} s per run, {settings['repeats']} repeats (medians)",
        "",
        "## HTTP (200-byte file from nginx; gateway with a session cookie on a private port)",
        "",
        "| proxy | conns | req/s | ×direct | ×chp | p50 ms | p99 ms | p99 ×chp | errors | CPU % | RSS MB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, by_conns in summary["http"].items():
        for conns, cell in sorted(by_conns.items()):
            out.append(
                f"| {name} | {conns} | {_f(cell['rps'], 0)} | {_f(cell.get('rps_x_direct'), 2)} | "
                f"{_f(cell.get('rps_x_chp'), 2)} | {_f(cell['p50_ms'], 2)} | {_f(cell['p99_ms'], 2)} | "
                f"{_f(cell.get('p99_x_chp'), 2)} | {cell['errors']} | {_f(cell['cpu_pct'], 0)} | "
                f"{_f(cell['rss_mb'], 1)} |"
            )
    if summary["ws"]:
        out += ["", f"## WebSockets ({settings['ws']} concurrent relayed connections)", "",
                "| proxy | open | handshake p50 ms | p99 ms | echo p50 ms | p99 ms | KB per idle connection | failed |",
                "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for name, cell in summary["ws"].items():
            out.append(f"| {name} | {cell['opened']} | {_f(cell['handshake_p50_ms'], 2)} | "
                       f"{_f(cell['handshake_p99_ms'], 2)} | {_f(cell['echo_p50_ms'], 2)} | "
                       f"{_f(cell['echo_p99_ms'], 2)} | {_f(cell['kb_per_connection'], 1)} | {cell['failed']} |")
    if results.get("wakes"):
        out += ["", "## Wake (times after the upstream's listen())", "",
                "| gateway | rounds | held first byte median ms | max ms | waiting page `ready` median ms | failed |",
                "|---|---:|---:|---:|---:|---:|"]
        for wake in results["wakes"]:
            out.append(f"| {wake['target']} | {len(wake['held_ms'])} | {_f(wake['held_median_ms'])} | "
                       f"{_f(max(wake['held_ms'], default=None))} | {_f(wake['ready_median_ms'])} | "
                       f"{wake['failed']} |")
        out += ["", "| gateway | upstream backlog | held requests | ok | failed | sent before listen | "
                "last answer after listen s |", "|---|---:|---:|---:|---:|---:|---:|"]
        for hold in results.get("holds") or []:
            out.append(f"| {hold['target']} | {hold.get('backlog', '–')} | {hold['requests']} | {hold['ok']} | "
                       f"{hold['failed']} | "
                       f"{hold['sent_before_listen']} | {_f(hold['last_answer_after_listen_s'], 2)} |")
    out += ["", "## Targets", "", "| target | measured | met |", "|---|---|---|"]
    out += [f"| {row['target']} | {row['value']} | {'yes' if row['met'] else '**no**'} |"
            for row in summary["targets"]]
    return "\n".join(out) + "\n"


def chart(results: dict[str, Any], path: Path) -> Path | None:
    """Throughput and p99 per proxy and concurrency, as grouped bars (needs the ``bench`` extra: matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    http = results["summary"]["http"]
    if not http:
        return None
    names = list(http)
    conns = sorted({c for by_conns in http.values() for c in by_conns})
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 7), sharex=True)
    width = 0.8 / len(names)
    for index, name in enumerate(names):
        xs = [i + index * width for i in range(len(conns))]
        top.bar(xs, [http[name].get(c, {}).get("rps") or 0 for c in conns], width, label=name)
        bottom.bar(xs, [http[name].get(c, {}).get("p99_ms") or 0 for c in conns], width, label=name)
    top.set_ylabel("requests / s (median)")
    bottom.set_ylabel("p99 latency, ms (median)")
    bottom.set_yscale("log")
    bottom.set_xticks([i + width * (len(names) - 1) / 2 for i in range(len(conns))])
    bottom.set_xticklabels([f"{c} connections" for c in conns])
    top.legend(ncol=len(names), fontsize="small")
    top.set_title("code-hub gateway vs direct, nginx, configurable-http-proxy (wrk, loopback)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
