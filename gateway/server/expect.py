"""``Expect: 100-continue``: a client that asks it holds its body back until told to go on, so that a request
refused on its head costs no upload. aiohttp answers ``100 Continue`` as it routes, before the gateway has made
the request's plan: a 1 GB upload to a private port without credentials, or to a port where nothing listens, was
sent whole only to be refused. Here the expectation is taken off the request as aiohttp makes it (the gateway
drops ``Expect`` on its way upstream anyway) and answered only where the body is wanted: a forwarded body's first
piece is asked for (the upstream has taken the head), or the gateway's own handler is about to read it (after
its checks). A refusal, a redirect or a waiting page is the final answer, with no ``100`` before it, and ends the
connection (``ends_a_held_body``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

from aiohttp import StreamReader, web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.http import HttpVersion11, RawRequestMessage
from aiohttp.web_protocol import RequestHandler
from multidict import CIMultiDict, CIMultiDictProxy

from gateway.errors import RequestTimeout
from gateway.server.context import GATEWAY
from gateway.server.refusals import Reason

CONTINUE = web.RequestKey("codehub_continue", bool)
"""Whether this request's client still waits for ``100 Continue`` before it sends its body."""

_GO_ON = b"HTTP/1.1 100 Continue\r\n\r\n"
T = TypeVar("T")


class RequestFactory:
    """``web.Server``'s ``request_factory``, wrapped: a request that expects ``100-continue`` is made without the
    header (so aiohttp's router does not answer it) and marked ``CONTINUE``. Any other expectation is left to
    aiohttp, which refuses it (417). The message is edited as it came: ``Request.clone`` would encode its headers
    again as UTF-8, which a value of Latin-1 bytes fails — and aiohttp calls this outside its own ``try``, so an
    exception here leaves the connection open and unanswered for good."""

    def __init__(self, server: web.Server) -> None:
        self._make = server.request_factory

    def __call__(self, message: RawRequestMessage, payload: StreamReader, protocol: RequestHandler,
                 writer: AbstractStreamWriter, task: asyncio.Task[None]) -> web.BaseRequest:
        expect = message.headers.get("Expect")
        if expect is None or expect.lower() != "100-continue" or message.version != HttpVersion11:
            return self._make(message, payload, protocol, writer, task)
        headers = CIMultiDict(message.headers)
        del headers["Expect"]
        request = self._make(message._replace(headers=CIMultiDictProxy(headers)), payload, protocol, writer, task)
        if message.chunked or headers.get("Content-Length", "0") != "0":  # else nothing is held back (a WebSocket
            request[CONTINUE] = True  # upgrade, a POST without a body): its connection goes on as any other's
        return request


async def go_on(request: web.BaseRequest) -> None:
    """Tell the client to send its body, once, if it waits to be told."""
    if request.pop(CONTINUE, False):
        await request.writer.write(_GO_ON)
        request.writer.output_size = 0  # no part of the answer: a failure after it may still be answered


async def read_own(request: web.Request, read: Callable[[], Awaitable[T]]) -> T:
    """``read`` a body for the gateway's own handler (bounded by ``limits.body``). One whose length says it is over
    is refused unread (413); else the client is told to go on, and the whole of it must come within
    ``limits.body_timeout`` (408): a head whose body never comes held its connection for good."""
    length = request.content_length
    if length is not None and length > request.client_max_size:
        raise web.HTTPRequestEntityTooLarge(max_size=request.client_max_size, actual_size=length)
    await go_on(request)
    within = request.app[GATEWAY].config.limits.body_timeout
    try:
        async with asyncio.timeout(within):
            return await read()
    except TimeoutError:
        raise RequestTimeout(f"The request's body did not arrive within {within:g} s.",
                             code=Reason.BODY_TIMEOUT.value) from None


async def ends_a_held_body(request: web.Request, response: web.StreamResponse) -> None:
    """``on_response_prepare``, as any answer's head goes out (a stream's too): one while the client still holds
    its body back (never told to go on, which RFC 9110 §10.1.1 lets it take as "send none"), or after its body
    stopped coming (408), ends the connection and says so — kept open, the client's next request would be read as
    that body. A client that sent no ``Expect`` sends its body whatever the answer: aiohttp reads it (its
    ``lingering_time``), and the connection serves the next request."""
    if CONTINUE in request or response.status == 408:
        response.force_close()
        response.headers["Connection"] = "close"


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
