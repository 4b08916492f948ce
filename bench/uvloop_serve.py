"""``python -m bench.uvloop_serve serve ...``: the gateway with uvloop's event loop, for comparisons
(``bench.instructions --uvloop``); the gateway itself serves on asyncio's loop."""

from __future__ import annotations

import asyncio
import runpy

import uvloop

if __name__ == "__main__":
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    runpy.run_module("gateway", run_name="__main__", alter_sys=True)
