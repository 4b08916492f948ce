"""Run the demo workspace: ``python -m gateway.demo --host H --ide-port P --home DIR``."""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal

from aiohttp import web

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>demo · port 8000</title>
<meta name="color-scheme" content="light dark"></head>
<body style="font: 16px/1.5 system-ui, sans-serif; max-width: 40rem; margin: 3rem auto; padding: 0 1rem">
<h1>Hello from workspace <code>demo</code></h1>
<p>This page is served by a small web server on port 8000 inside the demo workspace, reached through the
code-hub gateway's share URL.</p>
<p>Your request arrived as <code>{host}</code>, forwarded for <code>{forwarded}</code>.</p>
</body></html>
"""

STAND_IN = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>IDE stand-in</title>
<meta name="color-scheme" content="light dark"></head>
<body style="font: 16px/1.5 system-ui, sans-serif; max-width: 40rem; margin: 3rem auto; padding: 0 1rem">
<h1>IDE stand-in</h1>
<p><strong>This is not code-server.</strong> code-server is not installed on this machine, so the demo
workspace serves this placeholder on its IDE port. Install code-server (it must be on PATH) and restart
the gateway to get the real IDE here.</p>
</body></html>
"""


async def page(request: web.Request) -> web.Response:
    text = PAGE.format(host=request.headers.get("X-Forwarded-Host", request.host),
                       forwarded=request.headers.get("X-Forwarded-For", "-"))
    return web.Response(text=text, content_type="text/html")


async def stand_in(request: web.Request) -> web.Response:
    return web.Response(text=STAND_IN, content_type="text/html")


async def serve(app: web.Application, host: str, port: int) -> web.AppRunner:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner


async def main(host: str, ide_port: int, home: str) -> None:
    site = web.Application()
    site.router.add_get("/{tail:.*}", page)
    runners = [await serve(site, host, 8000)]
    code_server = shutil.which("code-server")
    child: asyncio.subprocess.Process | None = None
    if code_server:
        child = await asyncio.create_subprocess_exec(
            code_server, "--auth", "none", "--bind-addr", f"{host}:{ide_port}", "--disable-telemetry",
            "--disable-update-check", "--user-data-dir", os.path.join(home, ".code-server"), home,
        )
    else:
        ide = web.Application()
        ide.router.add_get("/{tail:.*}", stand_in)
        runners.append(await serve(ide, host, ide_port))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    if child is not None and child.returncode is None:
        child.terminate()
        await child.wait()
    for runner in runners:
        await runner.cleanup()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--ide-port", type=int, default=13337)
    parser.add_argument("--home", default=os.getcwd())
    args = parser.parse_args()
    asyncio.run(main(args.host, args.ide_port, args.home))
