"""A workspace app with a WebSocket, for the isolation scenarios (aiohttp, which the test environment has).

    python tests/browser/apps/ws_app.py --host H --port P [--port P2 ...] --home DIR

- ``/``: a page with helpers the scenarios call from the page, as a hostile (or friendly) app would:
  ``tryWs(url)`` opens a WebSocket and resolves to its first message or ``refused``; ``tryPost(url)`` sends a
  credentialed no-cors POST (its answer is opaque: the app's record of writes tells what arrived);
  ``mintToken(hub)`` tries to create an API token on the hub as the visitor; ``readHub(hub)`` tries to read the
  visitor's workspaces from the hub's API.
- ``/ws``: sends ``user:{X-Forwarded-User}`` then echoes.
- ``POST /write``: appends ``{port} {X-Forwarded-User}`` to ``{home}/writes.txt``.
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

from aiohttp import web

PAGE = """<!doctype html><html><head><meta charset="utf-8"><title>ws app</title></head>
<body style="font: 18px sans-serif; padding: 1rem"><h1 id="app">WebSocket app on port {port}</h1>
<pre id="out"></pre>
<script>
const note = (text) => {{ document.getElementById("out").textContent += text + "\\n"; return text; }};
window.tryWs = (url) => new Promise((resolve) => {{
  let ws;
  try {{ ws = new WebSocket(url); }} catch (error) {{ resolve(note("refused " + error)); return; }}
  const timer = setTimeout(() => resolve(note("timeout")), 8000);
  ws.onmessage = (event) => {{ clearTimeout(timer); ws.close(); resolve(note("open " + event.data)); }};
  ws.onerror = () => {{ clearTimeout(timer); resolve(note("refused")); }};
}});
window.tryPost = async (url) => {{
  try {{
    await fetch(url, {{ method: "POST", mode: "no-cors", credentials: "include", body: "x=1" }});
    return note("sent");
  }} catch (error) {{ return note("failed " + error); }}
}};
window.mintToken = async (hub) => {{
  try {{
    const response = await fetch(hub + "/api/v1/tokens", {{
      method: "POST", credentials: "include", headers: {{ "Content-Type": "application/json" }},
      body: JSON.stringify({{ name: "stolen" }}) }});
    return note("answered " + response.status + " " + await response.text());
  }} catch (error) {{ return note("rejected " + error); }}
}};
window.readHub = async (hub) => {{
  try {{
    const response = await fetch(hub + "/api/v1/workspaces", {{ credentials: "include" }});
    return note("read " + response.status + " " + await response.text());
  }} catch (error) {{ return note("rejected " + error); }}
}};
</script></body></html>"""


def make_app(port: int, home: Path) -> web.Application:
    async def page(request: web.Request) -> web.Response:
        return web.Response(text=PAGE.format(port=port), content_type="text/html")

    async def socket(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        await ws.send_str(f"user:{request.headers.get('X-Forwarded-User', '')}")
        async for message in ws:
            await ws.send_str(f"echo:{message.data}")
        return ws

    async def write(request: web.Request) -> web.Response:
        await request.read()
        with (home / "writes.txt").open("a") as writes:
            writes.write(f"{port} {request.headers.get('X-Forwarded-User', '')}\n")
        return web.Response(text="written")

    app = web.Application()
    app.router.add_get("/ws", socket)
    app.router.add_post("/write", write)
    app.router.add_get("/{tail:.*}", page)
    return app


async def main(host: str, ports: list[int], home: Path) -> None:
    runners = []
    for port in ports:
        runner = web.AppRunner(make_app(port, home), access_log=None)
        await runner.setup()
        await web.TCPSite(runner, host, port).start()
        runners.append(runner)
    await asyncio.Event().wait()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", type=int, action="append", required=True)
    parser.add_argument("--home", type=Path, required=True)
    args = parser.parse_args()
    args.home.mkdir(parents=True, exist_ok=True)
    asyncio.run(main(args.host, args.port, args.home))
