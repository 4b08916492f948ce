"""Debian's Chromium driven by Playwright for the browser scenarios, on loopback only: every name but
``localhost``, ``*.localhost`` and loopback addresses fails at once."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

from playwright.async_api import Browser, BrowserContext, async_playwright

CHROMIUM = Path("/usr/bin/chromium")
ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE localhost, EXCLUDE *.localhost, EXCLUDE 127.0.0.*",
]
TIMEOUT_MS = 120_000


def require_chromium() -> None:
    if not CHROMIUM.exists():
        raise RuntimeError(f"{CHROMIUM} is missing (Debian: apt-get install -y chromium)")


@contextlib.asynccontextmanager
async def chromium() -> AsyncIterator[Browser]:
    require_chromium()
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=str(CHROMIUM), args=ARGS, timeout=TIMEOUT_MS)
        try:
            yield browser
        finally:
            await browser.close()


async def fresh_context(browser: Browser, url: str, cookie: str = "") -> BrowserContext:
    """A new context (empty cache, no cookies) with ``cookie`` (``name=value``) set for ``url``'s host."""
    context = await browser.new_context(viewport={"width": 1100, "height": 760})
    context.set_default_timeout(TIMEOUT_MS)
    if cookie:
        name, _, value = cookie.partition("=")
        await context.add_cookies([{"name": name, "value": value, "url": url}])
    return context
