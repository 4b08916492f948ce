"""A structured access log: one JSON object per request, on the ``codehub.access`` logger.

Query strings are left out on purpose: share tokens and hand-off codes travel there.
"""

from __future__ import annotations

import json
import logging
import time

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

from gateway.routing import Target

TARGET = web.RequestKey("codehub_target", Target)
USER = web.RequestKey("codehub_user", str)


class AccessLogger(AbstractAccessLogger):
    def log(self, request: web.BaseRequest, response: web.StreamResponse, time_taken: float) -> None:
        if not self.logger.isEnabledFor(logging.INFO):
            return
        target = request.get(TARGET)
        record = {
            "ts": round(time.time(), 3),
            "remote": request.remote,
            "method": request.method,
            "host": request.headers.get("Host", ""),
            "path": request.path,
            "status": response.status,
            "bytes": response.body_length,
            "ms": round(time_taken * 1000, 2),
            "kind": target.kind.value if target else None,
            "workspace": target.workspace if target else None,
            "port": target.port if target else None,
            "user": request.get(USER),
        }
        self.logger.info(json.dumps(record, separators=(",", ":")))
