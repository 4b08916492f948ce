"""``python -m bench.traced serve ...``: the gateway with a tracemalloc switch for bench.ws_memory. The first
SIGUSR1 starts tracing, each later one writes a snapshot (of what was allocated since, still alive) to
``$BENCH_TRACE_DIR/snapshot.pickle``."""

from __future__ import annotations

import gc
import os
import runpy
import signal
import tracemalloc
from pathlib import Path
from types import FrameType

FRAMES = 12


def _toggle(_signum: int, _frame: FrameType | None) -> None:
    gc.collect()
    if not tracemalloc.is_tracing():
        tracemalloc.start(FRAMES)
        return
    tracemalloc.take_snapshot().dump(str(Path(os.environ["BENCH_TRACE_DIR"]) / "snapshot.pickle"))


if __name__ == "__main__":
    signal.signal(signal.SIGUSR1, _toggle)
    runpy.run_module("gateway", run_name="__main__", alter_sys=True)
