"""The client side of the proxy: where an upstream is, and how refused connects are retried."""

from __future__ import annotations

import asyncio
import errno
import time
from typing import NamedTuple


class Upstream(NamedTuple):
    """One port inside one workspace, as the gateway reaches it, and how it is shown to the public."""

    workspace: str
    host: str
    port: int
    public_origin: str
    tls: bool

    @property
    def scheme(self) -> str:
        return "https" if self.tls else "http"

    @property
    def origin(self) -> str:
        """As a URL names it: an IPv6 address (a pod's, on an IPv6 cluster) in brackets."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"

    @property
    def origins(self) -> tuple[str, ...]:
        """Spellings of the upstream an app may put in ``Location`` headers."""
        return (self.origin, f"{self.scheme}://localhost:{self.port}", f"{self.scheme}://127.0.0.1:{self.port}")


WAKE_CONNECT_GRACE = 2.0


class ConnectGrace:
    """Retry refused connects (and TLS connects dropped in the handshake) for a short while: used for requests
    that waited for a wake.

    The wake calls a port ready after one accepted connection, but dev servers may accept one and then refuse:
    Vite probes its port by listening briefly on the wildcard addresses before binding the real server, so the
    first real connect can land in the gap. Nothing of the request has been sent when a connect fails, so a retry
    is always safe.
    """

    def __init__(self, seconds: float) -> None:
        self._deadline = time.monotonic() + seconds
        self._delay = 0.02

    async def again(self, exc: OSError) -> bool:
        """After a failed connect: wait and say True when it is worth another try. Over TLS, the probe listener's
        drop comes inside the connect (the handshake), as asyncio's ``ConnectionResetError`` with no errno."""
        return (exc.errno == errno.ECONNREFUSED or isinstance(exc, ConnectionResetError)) and await self.wait()

    async def wait(self) -> bool:
        """Back off before the next try; False once the grace is spent."""
        if time.monotonic() + self._delay > self._deadline:
            return False
        await asyncio.sleep(self._delay)
        self._delay = min(self._delay * 2, 0.25)
        return True
