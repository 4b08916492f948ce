"""Smoke check: Debian Chromium driven by Playwright (Python, async) on a closed network, as root.

    python3 .ci/check-browser.py [screenshot.png]

Serves a throwaway page on 127.0.0.1, loads it as http://foo.localhost:PORT/ (Chromium maps *.localhost to
loopback itself), checks that an outside name does NOT resolve, takes a screenshot and closes. Exit 0 = OK.
"""

from __future__ import annotations

import asyncio
import http.server
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import ClassVar

from playwright.async_api import Error as PlaywrightError
from playwright.async_api import async_playwright

CHROMIUM = "/usr/bin/chromium"
# Flags from shared/COMPONENTS.md. Playwright adds --headless (new headless) and --no-sandbox itself when
# headless=True and chromium_sandbox=False (its defaults); they are listed too so the set is explicit.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    # One argv element: no shell quotes around the value.
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE localhost, EXCLUDE *.localhost, EXCLUDE 127.0.0.1",
]

PAGE = b"""<!doctype html><html><head><title>peer check</title></head>
<body style="font:24px sans-serif"><h1 id="h">Hello from foo.localhost</h1>
<script>document.getElementById('h').dataset.host = location.host;</script></body></html>"""


def check(ok: object, what: object) -> None:
    if not ok:
        raise SystemExit(f"check-browser FAILED: {what}")


class Handler(http.server.BaseHTTPRequestHandler):
    hosts: ClassVar[list[str]] = []

    def do_GET(self) -> None:
        Handler.hosts.append(self.headers.get("Host", ""))
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(PAGE)))
        self.end_headers()
        self.wfile.write(PAGE)

    def log_message(self, *args: object) -> None:
        pass


async def main(shot: Path) -> None:
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    port = srv.server_address[1]
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        with tempfile.TemporaryDirectory() as profile, tempfile.TemporaryDirectory() as home:
            async with async_playwright() as p:
                t0 = time.monotonic()
                # launch_persistent_context gives a fresh, explicit --user-data-dir.
                ctx = await p.chromium.launch_persistent_context(
                    profile,
                    executable_path=CHROMIUM,
                    headless=True,
                    args=CHROMIUM_ARGS,
                    # Chromium writes ~/.config/chromium/Crash Reports whatever the profile: keep $HOME clean.
                    env={**os.environ, "HOME": home},
                )
                t_launch = time.monotonic() - t0
                version = ctx.browser.version if ctx.browser else "?"
                page = ctx.pages[0] if ctx.pages else await ctx.new_page()
                url = f"http://foo.localhost:{port}/"
                resp = await page.goto(url, wait_until="load", timeout=15_000)
                check(resp is not None and resp.status == 200, f"GET {url}: {resp}")
                check(await page.text_content("#h") == "Hello from foo.localhost", "page text")
                check(await page.get_attribute("#h", "data-host") == f"foo.localhost:{port}", "location.host")
                # Outside names must fail fast (MAP * ~NOTFOUND), never hang.
                t1 = time.monotonic()
                other = await ctx.new_page()
                try:
                    await other.goto("http://example.com/", timeout=10_000)
                    check(False, "example.com loaded: host-resolver-rules not in force")
                except PlaywrightError as e:
                    check("ERR_NAME_NOT_RESOLVED" in str(e), e)
                t_outside = time.monotonic() - t1
                await other.close()
                await page.screenshot(path=str(shot))
                await ctx.close()
        check(Handler.hosts and all(h == f"foo.localhost:{port}" for h in Handler.hosts), Handler.hosts)
        print(
            f"OK chromium {version}: launch {t_launch:.2f}s, {url} served with Host {Handler.hosts[0]!r}, "
            f"outside name refused in {t_outside:.2f}s, screenshot {shot}"
        )
    finally:
        srv.shutdown()
        srv.server_close()


if __name__ == "__main__":
    out = Path(sys.argv[1] if len(sys.argv) > 1 else tempfile.gettempdir() + "/check-browser.png")
    asyncio.run(main(out))
