"""``Expect: 100-continue``: a client that asks it holds its body back until told to go on, so that a request
refused on its head costs no upload. aiohttp answers ``100 Continue`` as it routes, before the gateway has made
the request's plan: a 1 GB upload to a private port without credentials, or to a port where nothing listens, was
sent whole only to be refused. Here the expectation is taken off the request as aiohttp makes it (the gateway
drops ``Expect`` on its way upstream anyway) and answered only where the plan lets the body in: when the gateway's
own handler is to read it, or a forwarded body's first piece is asked for (the upstream has taken the head). A
refusal, a redirect or a waiting page goes out as the final answer, with no ``100`` before it (RFC 9110 §10.1.1).
"""

from __future__ import annotations

import asyncio

from aiohttp import StreamReader, web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.http import HttpVersion11, RawRequestMessage
from aiohttp.web_protocol import RequestHandler

CONTINUE = web.RequestKey("codehub_continue", bool)
"""Whether this request's client still waits for ``100 Continue`` before it sends its body."""

_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


class RequestFactory:
    """``web.Server``'s ``request_factory``, wrapped: a request that expects ``100-continue`` is made without the
    header (so aiohttp's router does not answer it) and marked ``CONTINUE``. Any other expectation is left to
    aiohttp, which refuses it (417)."""

    def __init__(self, server: web.Server) -> None:
        self._make = server.request_factory

    def __call__(self, message: RawRequestMessage, payload: StreamReader, protocol: RequestHandler,
                 writer: AbstractStreamWriter, task: asyncio.Task[None]) -> web.BaseRequest:
        request = self._make(message, payload, protocol, writer, task)
        expect = message.headers.get("Expect")
        if expect is None or expect.lower() != "100-continue" or message.version != HttpVersion11:
            return request
        headers = request.headers.copy()
        del headers["Expect"]
        request = request.clone(headers=headers)
        request[CONTINUE] = True
        return request


async def go_on(request: web.BaseRequest) -> None:
    """Tell the client to send its body, once, if it waits to be told."""
    if request.pop(CONTINUE, False):
        await request.writer.write(_CONTINUE)
        request.writer.output_size = 0  # no part of the answer: a failure after it may still be answered


class ContinuedBody:
    """A forwarded request's body that asks the client for it on the first read (the upstream pool's), so the client
    is told to go on only once the upstream has taken the head: an upload to a port where nothing listens gets
    its 502 before a byte of it is sent."""

    __slots__ = ("_request",)

    def __init__(self, request: web.BaseRequest) -> None:
        self._request = request

    async def readany(self) -> bytes:
        await go_on(self._request)
        return await self._request.content.readany()
