"""Running the gateway: one process, or a parent with N worker processes sharing the port (SO_REUSEPORT).

With ``--workers N`` the parent binds nothing but a Unix control socket (``{state_dir}/control.sock``) when the
runtime is local: it owns the workspace processes and the idle reaper, and workers reach them through
``RemoteRuntime``. With the Kubernetes runtime each worker runs its own runtime (state is shared through the
API) and the parent only supervises. Workers get the validated settings on stdin, die with the parent
(parent-death signal, and the control stream ending), and are restarted if they exit on their own. SIGTERM or
SIGINT to the parent stops the workers, then the workspace processes.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hashlib
import json
import logging
import os
import signal
import socket
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import uvloop
from aiohttp import web

from gateway.accesslog import BufferedLineHandler, OneLineFormatter
from gateway.config import Config, ConfigError
from gateway.lifecycle.local import dies_with
from gateway.server.fastlane import GatewayRunner
from gateway.server.listener import Acceptor, listening_sockets

log = logging.getLogger(__name__)
WORKER_HEADER = "X-Codehub-Worker"
_RESTART_AFTER = 1.0


def configure_logging(level: str) -> None:
    text = logging.StreamHandler(sys.stderr)
    text.setFormatter(OneLineFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level.upper(), handlers=[text])
    access = logging.getLogger("codehub.access")
    if not any(isinstance(handler, BufferedLineHandler) for handler in access.handlers):
        handler = BufferedLineHandler(sys.stderr.fileno())
        handler.setFormatter(logging.Formatter("%(message)s"))  # the JSON line carries its own timestamp
        access.addHandler(handler)
        access.propagate = False


@dataclass(frozen=True)
class Listeners:
    """The bound listening sockets of the gateway (``listen``) and of its metrics (``metrics``, maybe none)."""

    gateway: list[socket.socket]
    metrics: list[socket.socket]

    def close(self) -> None:
        for sock in (*self.gateway, *self.metrics):
            sock.close()


def bind_listeners(config: Config, *, reuse_port: bool = False) -> Listeners:
    """Bind ``listen`` and ``metrics`` before anything starts, so a port in use or a host that does not resolve is
    one ``config error`` line naming the setting, not a traceback after the banner."""
    gateway = _bind("listen", config.listen.host, config.listen.port, reuse_port)
    try:
        metrics = ([] if config.metrics.port is None
                   else _bind("metrics", config.metrics.host, config.metrics.port, reuse_port))
    except ConfigError:
        Listeners(gateway, []).close()
        raise
    return Listeners(gateway, metrics)


def _bind(key: str, host: str, port: int, reuse_port: bool) -> list[socket.socket]:
    try:
        return listening_sockets(host, port, reuse_port=reuse_port)
    except OSError as exc:
        raise ConfigError(f"config error: {key}: cannot listen on {host}:{port}: {exc.strerror or exc}") from None


YOUNG_COLLECTION = 10_000
"""Container objects allocated, net, between two young collections (Python's default: 700). A worker with a
thousand requests in flight holds tens of thousands of young objects that are alive, not garbage: at 700 a young
collection ran every 40 requests and walked them, and every tenth an older one walked them all again, 12.3 µs of a
request's 109 at 1,000 connections (1.2 at 64). The swing of requests in flight stays below 10,000: collections
run as garbage cycles add up (half an object a request there), every two seconds or so."""


def serve_app(app: web.Application, config: Config, *, reuse_port: bool = False,
              listeners: Listeners | None = None) -> None:
    """Serve until SIGTERM or SIGINT, on uvloop: it runs the loop, the transports and the timers in C, which took
    8 % of the instructions a proxied request costs (and the ``Acceptor`` makes up for how its servers accept).
    Without ``listeners`` (a worker) the sockets are bound here."""
    uvloop.run(_serve(app, config, listeners or bind_listeners(config, reuse_port=reuse_port)))


async def _serve(app: web.Application, config: Config, listeners: Listeners) -> None:
    runner = GatewayRunner(app, handle_signals=False, handler_cancellation=True,
                           shutdown_timeout=config.timeouts.shutdown)
    await runner.setup()
    assert runner.server is not None
    # Everything loaded so far lives as long as the process: keep it out of the collector's full passes, which
    # otherwise walk it all (about 40 ms each, several a minute under load).
    gc.freeze()
    gc.set_threshold(YOUNG_COLLECTION, *gc.get_threshold()[1:])
    metrics_runner: web.AppRunner | None = None
    loop = asyncio.get_running_loop()
    acceptors = [Acceptor(sock, runner.server) for sock in listeners.gateway]
    try:
        for acceptor in acceptors:
            acceptor.start()
        if listeners.metrics:
            from gateway.server.app import build_metrics_app

            metrics_runner = web.AppRunner(build_metrics_app(app), handle_signals=False, access_log=None)
            await metrics_runner.setup()
            for sock in listeners.metrics:
                await web.SockSite(metrics_runner, sock).start()
        stop = asyncio.Event()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        await stop.wait()
    finally:
        for acceptor in acceptors:
            acceptor.close()
        if metrics_runner is not None:
            await metrics_runner.cleanup()
        await runner.cleanup()


def run_workers(config: Config, *, workers: int, log_level: str = "info") -> int:
    """The parent of ``workers`` worker processes; returns when SIGTERM or SIGINT stopped them all."""
    return asyncio.run(_parent(config, workers, log_level))


# --- the parent --------------------------------------------------------------------------------------------

def control_socket(config: Config) -> Path:
    """``{state_dir}/control.sock``, or a name in the temp folder when that path is too long for a socket."""
    path = config.state_dir.resolve() / "control.sock"
    if len(os.fsencode(path)) < 100:
        return path
    digest = hashlib.sha256(os.fsencode(path)).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"codehub-{digest}.sock"


def _prepare_socket_path(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)


async def _parent(config: Config, workers: int, log_level: str) -> int:
    from gateway.auth.keys import load_or_create

    load_or_create(config.keys_file, create=config.auth.keys_file is None)  # one key set, before any worker reads it
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    async with contextlib.AsyncExitStack() as stack:
        activity = None
        socket_path: Path | None = None
        if config.runtime == "local":
            socket_path = control_socket(config)
            activity = await stack.enter_async_context(_control_plane(config, socket_path))
        pool = _Workers(config, workers, log_level, socket_path, activity)
        try:
            await pool.start()
            await stop.wait()
        finally:
            await pool.stop()
    return 0


@contextlib.asynccontextmanager
async def _control_plane(config: Config, socket_path: Path) -> AsyncIterator[Any]:
    """The local runtime, its idle reaper and the control API the workers use."""
    from gateway.lifecycle.idle import Activity, reap_forever
    from gateway.metrics import Metrics
    from gateway.server.control import ControlServer
    from gateway.server.wiring import make_reaper, make_runtime

    runtime = make_runtime(config)
    await runtime.start()
    activity = Activity()
    server = ControlServer(runtime, activity)
    runner = web.AppRunner(server.app(), access_log=None, handle_signals=False)
    await runner.setup()
    _prepare_socket_path(socket_path)
    site = web.UnixSite(runner, str(socket_path))
    await site.start()
    os.chmod(socket_path, 0o600)
    tasks = [asyncio.create_task(server.fan_out()),
             asyncio.create_task(reap_forever(make_reaper(config, runtime, activity, Metrics(),
                                                          busy=server.waking)))]
    try:
        yield activity
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await runner.cleanup()
        with contextlib.suppress(OSError):
            os.unlink(socket_path)
        await runtime.close()


class _Workers:
    def __init__(self, config: Config, count: int, log_level: str, socket_path: Path | None,
                 activity: Any) -> None:
        self._options = json.dumps({
            "config": config.model_dump(mode="json"), "control": str(socket_path) if socket_path else None,
            "log_level": log_level, "workers": count,
        }).encode()
        self._count = count
        self._timeout = config.timeouts.shutdown
        self._activity = activity
        self._processes: dict[int, asyncio.subprocess.Process] = {}
        self._watchers: list[asyncio.Task[None]] = []
        self._stopping = False

    async def start(self) -> None:
        for slot in range(self._count):
            self._watchers.append(asyncio.create_task(self._keep(slot)))

    async def _spawn(self) -> asyncio.subprocess.Process:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gateway.server.serving", stdin=asyncio.subprocess.PIPE,
            preexec_fn=dies_with(os.getpid()),
        )
        assert process.stdin is not None
        process.stdin.write(self._options)
        await process.stdin.drain()
        process.stdin.close()
        return process

    async def _keep(self, slot: int) -> None:
        """Run worker ``slot``; start it again if it exits while the gateway is not stopping."""
        while not self._stopping:
            started = time.monotonic()
            process = await self._spawn()
            self._processes[slot] = process
            code = await process.wait()
            if self._activity is not None:
                self._activity.forget(process.pid)
            if self._stopping:
                return
            log.error("worker %d (pid %d) exited with %s; starting it again", slot, process.pid, code)
            await asyncio.sleep(max(0.0, _RESTART_AFTER - (time.monotonic() - started)))

    async def stop(self) -> None:
        self._stopping = True
        processes = [process for process in self._processes.values() if process.returncode is None]
        for process in processes:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(asyncio.gather(*(p.wait() for p in processes)), self._timeout + 5)
        except TimeoutError:
            for process in processes:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
            await asyncio.gather(*(p.wait() for p in processes))
        for watcher in self._watchers:
            watcher.cancel()
        await asyncio.gather(*self._watchers, return_exceptions=True)


# --- a worker ----------------------------------------------------------------------------------------------

def worker_main() -> None:
    options = json.loads(sys.stdin.buffer.read())
    configure_logging(options["log_level"])
    config = Config.model_validate(options["config"])
    from gateway.lifecycle.remote import RemoteRuntime, forward_activity
    from gateway.server.app import build_app
    from gateway.server.context import GATEWAY

    remote = RemoteRuntime(Path(options["control"])) if options["control"] else None
    app = build_app(config, runtime=remote, reap=remote is None, workers=options["workers"])
    if remote is not None:
        async def report_activity(app: web.Application) -> AsyncIterator[None]:
            task = asyncio.create_task(forward_activity(remote, app[GATEWAY].activity.snapshot))
            yield
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

        app.cleanup_ctx.append(report_activity)
    if options["log_level"] == "debug":
        pid = str(os.getpid())

        async def name_worker(request: web.BaseRequest, response: web.StreamResponse) -> None:
            response.headers[WORKER_HEADER] = pid

        app.on_response_prepare.append(name_worker)
    serve_app(app, config, reuse_port=True)


if __name__ == "__main__":
    worker_main()
