"""The servers of one benchmark run, all on loopback: the upstreams, the gateway, nginx and
configurable-http-proxy in front of them, and the sign-in that gives the load its session cookies."""

from __future__ import annotations

import json
import os
import sys
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from bench.client import fetch
from bench.procs import Proc, Procs, free_port, wait_for_port

ROOT = Path(__file__).resolve().parent.parent
CHP = ROOT / "node_modules" / ".bin" / "configurable-http-proxy"
VITE = ROOT / "node_modules" / ".bin" / "vite"
BODY = (b"<!doctype html><title>bench</title><p>" + b"x" * 150 + b"</p>\n")[:199] + b"\n"
MODULE = b"".join(b"export const value%d = %d; // a line of a module, as Vite serves one\n" % (i, i) for i in range(28))
"""An ES module of 1.8 KB at ``/module.js`` on the upstream nginx: what a browser fetches hundreds of from a dev
server (``bench.ab --browser``)."""
USER = "bench"
SMALL_BACKLOG = 5
LARGE_BACKLOG = 4096
"""The accept backlog of Python's ``http.server``, the dev server many people start first."""
DEBIAN_VENV = ROOT / ".venv-debian"
"""Made by ``.ci/install`` on Debian's CPython (``/usr/bin/python3``), which is built with PGO and LTO."""


def gateway_python() -> str:
    """The interpreter every gateway of a benchmark runs on: ``CODEHUB_BENCH_PYTHON`` (``python -m bench
    --python``), else the ``.venv-debian`` that ``.ci/install`` made, else this one.

    Why not simply this one: a production image's CPython is built with profile-guided optimisation and link-time
    optimisation (Debian's and the official ``python`` images' are), and the ``python3`` of a developer's machine
    often is not (pyenv builds without either unless asked). Measured on one machine, the same gateway spent 17 %
    less CPU per request on Debian's build than on pyenv's; nginx, measured beside it, is an optimised build too.
    The venv's ``bin/python`` is passed as it is, not resolved: its ``pyvenv.cfg`` is found next to it."""
    chosen = os.environ.get("CODEHUB_BENCH_PYTHON")
    if chosen:
        return chosen
    venv = DEBIAN_VENV / "bin" / "python"
    return str(venv) if venv.exists() else sys.executable


def gateway_command(config: Path, module: str = "gateway") -> list[str]:
    """``serve`` with ``config`` on ``gateway_python()`` (``module``: a wrapper that runs the gateway, such as
    ``bench.traced``)."""
    return [gateway_python(), "-m", module, "serve", "--config", str(config)]


@dataclass
class Layout:
    """Addresses and ports: the upstream lives on the workspace's own loopback address, proxies on 127.0.0.1."""

    tmp: Path
    up_host: str = "127.0.0.2"
    wake_host: str = "127.0.0.3"
    hold_host: str = "127.0.0.4"
    small_host: str = "127.0.0.5"
    vite_host: str = "127.0.0.6"
    screen_host: str = "127.0.0.7"
    http_port: int = 0
    ws_port: int = 0
    wake_port: int = 0
    hold_port: int = 0
    small_port: int = 0
    vite_port: int = 0
    screen_port: int = 0
    nginx_port: int = 0
    chp_port: int = 0
    chp_api_port: int = 0
    hold_delay: float = 6.0

    def __post_init__(self) -> None:
        ports = (("http_port", self.up_host), ("ws_port", self.up_host), ("wake_port", self.wake_host),
                 ("hold_port", self.hold_host), ("small_port", self.small_host), ("vite_port", self.vite_host),
                 ("screen_port", self.screen_host), ("nginx_port", "127.0.0.1"),
                 ("chp_port", "127.0.0.1"), ("chp_api_port", "127.0.0.1"))
        for name, host in ports:
            if not getattr(self, name):
                setattr(self, name, free_port(host))

    def hub(self, gateway_port: int) -> str:
        return f"localhost:{gateway_port}"

    def preview(self, gateway_port: int, port: int, workspace: str = "ws1") -> str:
        return f"{port}-{workspace}.localhost:{gateway_port}"

    @property
    def wake_stamp(self) -> Path:
        return self.tmp / "wake.stamp"

    @property
    def hold_stamp(self) -> Path:
        return self.tmp / "hold.stamp"

    @property
    def small_stamp(self) -> Path:
        return self.tmp / "small.stamp"


@dataclass(frozen=True)
class Target:
    """How a load generator reaches the upstream through one proxy (or directly)."""

    name: str
    address: tuple[str, int]
    host: str
    ws_address: tuple[str, int]
    ws_host: str
    ws_path: str = "/ws"
    cookie: str = ""
    ws_cookie: str = ""


# --- upstream and nginx ---------------------------------------------------------------------------------------

def _nginx_conf(prefix: Path, http: str) -> str:
    return f"""worker_processes auto;
user root;
daemon off;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 20000; multi_accept on; }}
worker_rlimit_nofile 20000;
http {{
  client_body_temp_path {prefix}/body; proxy_temp_path {prefix}/proxy; fastcgi_temp_path {prefix}/fcgi;
  uwsgi_temp_path {prefix}/uwsgi; scgi_temp_path {prefix}/scgi;
  keepalive_requests 1000000;
  keepalive_timeout 75s;
{http}
}}
"""


def start_upstream_nginx(procs: Procs, layout: Layout) -> Proc:
    prefix = layout.tmp / "nginx-upstream"
    (prefix / "www").mkdir(parents=True)
    (prefix / "www" / "index.html").write_bytes(BODY)
    (prefix / "www" / "module.js").write_bytes(MODULE)
    # /module.js with the headers Vite's dev server adds to a module (its ETag, Last-Modified and length nginx's)
    http = f"""  access_log off;
  server {{
    listen {layout.up_host}:{layout.http_port} backlog=4096;
    root {prefix}/www;
    location / {{ index index.html; }}
    location = /module.js {{
      default_type text/javascript; add_header Cache-Control no-cache; add_header Vary Origin;
    }}
  }}"""
    (prefix / "nginx.conf").write_text(_nginx_conf(prefix, http))
    return procs.start("nginx-upstream", ["nginx", "-p", str(prefix), "-e", str(prefix / "error.log"),
                                          "-c", str(prefix / "nginx.conf")])


def start_proxy_nginx(procs: Procs, layout: Layout) -> Proc:
    prefix = layout.tmp / "nginx-proxy"
    prefix.mkdir(parents=True, exist_ok=True)
    http = f"""  access_log {prefix}/access.log combined buffer=64k flush=1s;
  upstream app {{ server {layout.up_host}:{layout.http_port}; keepalive 256; }}
  upstream echo {{ server {layout.up_host}:{layout.ws_port}; }}
  server {{
    listen 127.0.0.1:{layout.nginx_port} backlog=4096;
    location / {{
      proxy_pass http://app; proxy_http_version 1.1; proxy_set_header Connection "";
      proxy_set_header Host $host; proxy_set_header X-Forwarded-For $remote_addr;
    }}
    location /ws {{
      proxy_pass http://echo; proxy_http_version 1.1; proxy_read_timeout 1h;
      proxy_set_header Upgrade $http_upgrade; proxy_set_header Connection "upgrade"; proxy_set_header Host $host;
    }}
  }}"""
    (prefix / "nginx.conf").write_text(_nginx_conf(prefix, http))
    return procs.start("nginx-proxy", ["nginx", "-p", str(prefix), "-e", str(prefix / "error.log"),
                                       "-c", str(prefix / "nginx.conf")])


def start_vite_nginx(procs: Procs, layout: Layout, port: int) -> Proc:
    """nginx in front of the Vite server as one would configure it for a dev server: upstream keep-alive, and
    WebSocket upgrades (the HMR socket) on the same location."""
    prefix = layout.tmp / "nginx-vite"
    prefix.mkdir(parents=True, exist_ok=True)
    http = f"""  access_log {prefix}/access.log combined buffer=64k flush=1s;
  map $http_upgrade $connection_upgrade {{ default upgrade; '' ''; }}
  upstream vite {{ server {layout.vite_host}:{layout.vite_port}; keepalive 64; }}
  server {{
    listen 127.0.0.1:{port} backlog=4096;
    location / {{
      proxy_pass http://vite; proxy_http_version 1.1; proxy_read_timeout 1h;
      proxy_set_header Host $host; proxy_set_header X-Forwarded-For $remote_addr;
      proxy_set_header Upgrade $http_upgrade; proxy_set_header Connection $connection_upgrade;
    }}
  }}"""
    (prefix / "nginx.conf").write_text(_nginx_conf(prefix, http))
    return procs.start("nginx-vite", ["nginx", "-p", str(prefix), "-e", str(prefix / "error.log"),
                                      "-c", str(prefix / "nginx.conf")])


def start_vite(procs: Procs, name: str, project: Path, host: str, port: int) -> Proc:
    return procs.start(name, [str(VITE), str(project), "--host", host, "--port", str(port), "--strictPort",
                              "--clearScreen", "false"])


def start_echo(procs: Procs, layout: Layout) -> Proc:
    return procs.start("ws-echo", [sys.executable, "-m", "bench.echo", "--host", layout.up_host,
                                   "--port", str(layout.ws_port)], env={"PYTHONPATH": str(ROOT)})


# --- configurable-http-proxy ----------------------------------------------------------------------------------

async def start_chp(procs: Procs, layout: Layout) -> Proc:
    return await start_chp_for(procs, "chp", layout.chp_port, layout.chp_api_port,
                               f"http://{layout.up_host}:{layout.http_port}",
                               {"/ws": f"http://{layout.up_host}:{layout.ws_port}"})


async def start_chp_for(procs: Procs, name: str, port: int, api_port: int, default_target: str,
                        routes: dict[str, str] | None = None) -> Proc:
    """configurable-http-proxy on 127.0.0.1:``port`` in front of ``default_target``, with extra ``routes``."""
    if not CHP.exists():
        raise RuntimeError(f"{CHP} is missing: run `npm ci` in {ROOT}")
    token = "bench-" + os.urandom(8).hex()
    proc = procs.start(name, [str(CHP), "--ip", "127.0.0.1", "--port", str(port),
                              "--api-ip", "127.0.0.1", "--api-port", str(api_port),
                              "--default-target", default_target, "--log-level", "warn"],
                       env={"CONFIGPROXY_AUTH_TOKEN": token})
    await wait_for_port("127.0.0.1", api_port, proc)
    await wait_for_port("127.0.0.1", port, proc)
    for path, target in (routes or {}).items():
        body = json.dumps({"target": target}).encode()
        answer = await fetch(("127.0.0.1", api_port), f"127.0.0.1:{api_port}", f"/api/routes{path}",
                             {"Authorization": f"token {token}", "Content-Type": "application/json"},
                             method="POST", body=body)
        if answer.status != 201:
            raise RuntimeError(f"configurable-http-proxy refused the {path} route: {answer.status}")
    return proc


# --- the gateway ----------------------------------------------------------------------------------------------

def gateway_config(layout: Layout, name: str, port: int) -> Path:
    def slow(host_stamp: Path, port: int, delay: float, backlog: int = LARGE_BACKLOG) -> dict[str, object]:
        return {
            "owner": USER,
            "command": [sys.executable, "-m", "bench.slowserver", "--host", "{host}", "--port", str(port),
                        "--delay", str(delay), "--stamp", str(host_stamp), "--backlog", str(backlog)],
            "env": {"PYTHONPATH": str(ROOT)},
            "ports": {port: "private"},
        }

    settings = {
        "listen": {"host": "127.0.0.1", "port": port},
        "hub_url": f"http://{layout.hub(port)}",
        "preview_domain": layout.hub(port),
        "auth": {"mode": "dev"},
        "local": {
            "state_dir": str(layout.tmp / f"{name}-state"),
            "workspaces": {
                "ws1": {"owner": USER, "command": ["sleep", "1000000"], "address": layout.up_host,
                        "ports": {layout.http_port: "private", layout.ws_port: "private"}},
                "wk": {**slow(layout.wake_stamp, layout.wake_port, 0.2), "address": layout.wake_host},
                "hold": {**slow(layout.hold_stamp, layout.hold_port, layout.hold_delay), "address": layout.hold_host},
                "small": {**slow(layout.small_stamp, layout.small_port, layout.hold_delay, backlog=SMALL_BACKLOG),
                          "address": layout.small_host},
                # A Vite dev server the harness runs (bench.pageload), and one the workspace runs from its home
                # (bench.wake_screen: woken from WARM and COLD).
                "vite": {"owner": USER, "command": ["sleep", "1000000"], "address": layout.vite_host,
                         "ports": {layout.vite_port: "private"}},
                "screen": {"owner": USER, "address": layout.screen_host, "ports": {layout.screen_port: "private"},
                           "command": [str(VITE), "{home}/app", "--host", "{host}", "--port", str(layout.screen_port),
                                       "--strictPort", "--clearScreen", "false"]},
            },
        },
    }
    # 10,000 requests held through one wake are 10,000 client connections on one worker, more than half its
    # 20,000 files (the default limit, for connections that each hold an upstream one too): held ones hold none.
    settings["limits"] = {"connections": 12_000}
    path = layout.tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(settings))
    return path


async def start_gateway(procs: Procs, layout: Layout, name: str, port: int, workers: int = 1) -> Proc:
    config = gateway_config(layout, name, port)
    argv = gateway_command(config)
    if workers != 1:
        argv += ["--workers", str(workers)]
    proc = procs.start(name, argv, env={"PYTHONPATH": str(ROOT)})
    await wait_for_port("127.0.0.1", port, proc)
    return proc


@dataclass
class SignIn:
    """A dev sign-in on the hub, then the hub → preview hand-off for each preview host, as a browser does it."""

    layout: Layout
    port: int
    hub_cookie: str = ""
    previews: dict[str, str] = field(default_factory=dict)

    @property
    def address(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)

    @property
    def hub_host(self) -> str:
        return self.layout.hub(self.port)

    async def hub(self) -> str:
        if not self.hub_cookie:
            body = urllib.parse.urlencode({"user": USER, "next": "/"}).encode()
            answer = await fetch(self.address, self.hub_host, "/auth/dev", {
                "Origin": f"http://{self.hub_host}", "Content-Type": "application/x-www-form-urlencoded",
            }, method="POST", body=body)
            cookie = answer.cookies().get("codehub_session")
            if not cookie:
                raise RuntimeError(f"dev sign-in failed: {answer.status} {answer.body[:200]!r}")
            self.hub_cookie = f"codehub_session={cookie}"
        return self.hub_cookie

    async def preview(self, host: str) -> str:
        if host in self.previews:
            return self.previews[host]
        hub_cookie = await self.hub()
        first = await fetch(self.address, host, "/", {"Accept": "text/html"})
        handoff = first.header("Location")
        state = first.cookies().get("codehub_handoff")
        if first.status != 302 or not handoff or not state:
            raise RuntimeError(f"preview {host} did not send the browser to sign in: {first.status}")
        url = urllib.parse.urlsplit(handoff)
        second = await fetch(self.address, url.netloc, f"{url.path}?{url.query}", {"Cookie": hub_cookie})
        callback = urllib.parse.urlsplit(second.header("Location") or "")
        if second.status != 302 or callback.netloc != host:
            raise RuntimeError(f"the hub refused the hand-off: {second.status} {second.body[:200]!r}")
        third = await fetch(self.address, host, f"{callback.path}?{callback.query}",
                            {"Cookie": f"codehub_handoff={state}"})
        cookie = third.cookies().get("codehub_session")
        if not cookie:
            raise RuntimeError(f"the preview callback set no session: {third.status} {third.body[:200]!r}")
        self.previews[host] = f"codehub_session={cookie}"
        return self.previews[host]

    async def lifecycle(self, workspace: str, action: str) -> dict[str, object]:
        answer = await fetch(self.address, self.hub_host, f"/api/v1/workspaces/{workspace}/{action}", {
            "Cookie": await self.hub(), "Origin": f"http://{self.hub_host}",
        }, method="POST")
        if answer.status != 200:
            raise RuntimeError(f"{action} {workspace}: {answer.status} {answer.body[:200]!r}")
        result: dict[str, object] = json.loads(answer.body)
        return result


async def gateway_target(name: str, layout: Layout, sign_in: SignIn) -> Target:
    """Sign in, and wake ws1 with one held request so the measured path starts RUNNING."""
    host, ws_host = layout.preview(sign_in.port, layout.http_port), layout.preview(sign_in.port, layout.ws_port)
    cookie, ws_cookie = await sign_in.preview(host), await sign_in.preview(ws_host)
    answer = await fetch(sign_in.address, host, "/", {"Cookie": cookie, "Accept": "*/*"})
    if answer.status != 200 or answer.body != BODY:
        raise RuntimeError(f"the gateway did not serve the upstream file: {answer.status} {answer.body[:200]!r}")
    return Target(name, sign_in.address, host, sign_in.address, ws_host, "/ws", cookie, ws_cookie)


def static_targets(layout: Layout) -> dict[str, Target]:
    direct = (layout.up_host, layout.http_port)
    return {
        "direct": Target("direct", direct, f"{layout.up_host}:{layout.http_port}", (layout.up_host, layout.ws_port),
                         f"{layout.up_host}:{layout.ws_port}"),
        "nginx": Target("nginx", ("127.0.0.1", layout.nginx_port), f"localhost:{layout.nginx_port}",
                        ("127.0.0.1", layout.nginx_port), f"localhost:{layout.nginx_port}"),
        "chp": Target("chp", ("127.0.0.1", layout.chp_port), f"localhost:{layout.chp_port}",
                      ("127.0.0.1", layout.chp_port), f"localhost:{layout.chp_port}"),
    }

