"""A tiny scripted browser for the gateway's sign-in tests.

Python's resolver does not resolve ``*.localhost``, so every gateway host is reached at the gateway test server's
loopback address with the public name in ``Host``. Cookies are kept per host name the way browsers keep host-only
cookies (``Domain=`` widens them to subdomains), redirects are followed by hand, and a visit to the IdP hands over
to ``login_via_idp`` with its own cookie jar (the IdP's SSO session).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urljoin, urlsplit

import aiohttp
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from tests.peers.idp.fixture import login_via_idp

REDIRECTS = (301, 302, 303, 307, 308)


@dataclass
class Page:
    """One response: where it came from, its status, headers and body text."""

    url: str
    status: int
    headers: CIMultiDictProxy[str]
    text: str

    @property
    def location(self) -> str | None:
        value = self.headers.get("Location")
        return urljoin(self.url, value) if value is not None else None

    @property
    def set_cookies(self) -> list[str]:
        return list(self.headers.getall("Set-Cookie", ()))

    @property
    def content_type(self) -> str:
        return self.headers.get("Content-Type", "").partition(";")[0].strip()

    def json(self) -> Any:
        return json.loads(self.text)


@dataclass
class Cookie:
    name: str
    value: str
    host: str
    host_only: bool
    raw: str


def parse_set_cookie(raw: str, request_host: str) -> tuple[Cookie, int | None]:
    """A Set-Cookie value as a browser reads it: name, value, host-only or domain, and Max-Age."""
    first, *attributes = raw.split(";")
    name, _, value = first.partition("=")
    domain, max_age = None, None
    for attribute in attributes:
        key, _, val = attribute.partition("=")
        key = key.strip().lower()
        if key == "domain" and val.strip():
            domain = val.strip().lstrip(".").lower()
        elif key == "max-age":
            max_age = int(val.strip())
    host = domain or request_host
    return Cookie(name.strip(), value.strip(), host, domain is None, raw), max_age


@dataclass
class Browser:
    """Requests to ``*.{domain}`` for each of ``domains`` go to ``gateway`` (``http://127.0.0.1:PORT``)."""

    http: aiohttp.ClientSession
    gateway: str
    domains: Sequence[str]
    idp_http: aiohttp.ClientSession | None = None
    idp_issuer: str | None = None
    login: str = "alice"
    jar: list[Cookie] = field(default_factory=list)
    visited: list[str] = field(default_factory=list)
    idp_visits: int = 0

    def _ours(self, netloc: str) -> bool:
        return any(netloc == d or netloc.endswith("." + d) for d in self.domains)

    def cookies_for(self, host: str) -> dict[str, str]:
        out: dict[str, str] = {}
        for cookie in self.jar:
            if host == cookie.host or (not cookie.host_only and host.endswith("." + cookie.host)):
                out[cookie.name] = cookie.value
        return out

    def cookie(self, url: str, name: str) -> str | None:
        return self.cookies_for(urlsplit(url).hostname or "").get(name)

    def add_cookie(self, url: str, name: str, value: str) -> None:
        host = urlsplit(url).hostname or ""
        self._store(Cookie(name, value, host, True, f"{name}={value}"), None)

    def _store(self, cookie: Cookie, max_age: int | None) -> None:
        self.jar = [c for c in self.jar if not (c.name == cookie.name and c.host == cookie.host)]
        if max_age is None or max_age > 0:
            self.jar.append(cookie)

    async def fetch(self, method: str, url: str, *, headers: Mapping[str, str] | None = None, data: Any = None,
                    json_body: Any = None, send_cookies: bool = True) -> Page:
        """One request, no redirects followed; cookies sent and stored like a browser does."""
        parts = urlsplit(url)
        host = parts.hostname or ""
        if not self._ours(parts.netloc):
            raise AssertionError(f"the test browser only talks to the gateway, not {url}")
        out: CIMultiDict[str] = CIMultiDict(headers or {})
        out["Host"] = parts.netloc
        cookies = self.cookies_for(host) if send_cookies else {}
        if cookies and "Cookie" not in out:
            out["Cookie"] = "; ".join(f"{k}={v}" for k, v in cookies.items())
        target = self.gateway + (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        self.visited.append(url)
        async with self.http.request(method, URL(target, encoded=True), headers=out, data=data,
                                     json=json_body, allow_redirects=False) as response:
            text = await response.text(errors="replace")
            page = Page(url, response.status, response.headers, text)
        for raw in page.set_cookies:
            self._store(*parse_set_cookie(raw, host))
        return page

    async def navigate(self, url: str, *, headers: Mapping[str, str] | None = None, max_hops: int = 20) -> Page:
        """A top-level navigation: GET with browser headers, following redirects (through the IdP if needed)."""
        page = await self._walk(url, headers, max_hops, None)
        assert isinstance(page, Page)
        return page

    async def navigate_until(self, url: str, stop_before: Callable[[str], bool], *,
                             headers: Mapping[str, str] | None = None, max_hops: int = 20) -> str:
        """Follow a navigation but stop before requesting the first URL ``stop_before`` accepts; return that URL."""
        stopped = await self._walk(url, headers, max_hops, stop_before)
        assert isinstance(stopped, str), f"the navigation ended without reaching the stop: {stopped}"
        return stopped

    async def _walk(self, url: str, headers: Mapping[str, str] | None, max_hops: int,
                    stop_before: Callable[[str], bool] | None) -> Page | str:
        nav = {"Accept": "text/html,application/xhtml+xml", "Sec-Fetch-Mode": "navigate", **(headers or {})}
        for _ in range(max_hops):
            if stop_before is not None and stop_before(url):
                return url
            if self.idp_issuer is not None and _origin(url) == _origin(self.idp_issuer):
                assert self.idp_http is not None
                self.idp_visits += 1
                self.visited.append(url)
                url = await login_via_idp(self.idp_http, url, self.login, issuer=self.idp_issuer)
                continue
            page = await self.fetch("GET", url, headers=nav)
            if page.status in REDIRECTS and page.location:
                url = page.location
                continue
            return page
        raise AssertionError(f"more than {max_hops} redirects, last {url}: {self.visited[-5:]}")

    async def dev_sign_in(self, hub: str, user: str, groups: str = "", next_path: str = "/") -> Page:
        """The development sign-in form, posted from the hub's own page."""
        return await self.fetch("POST", hub + "/auth/dev", headers={"Origin": hub},
                                data={"user": user, "groups": groups, "next": next_path})


def _origin(url: str) -> tuple[str, str]:
    parts = urlsplit(url)
    return parts.scheme, parts.netloc
