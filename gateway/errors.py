"""One error tree for everything the gateway refuses or fails to do.

Handlers raise these; a single middleware renders them as an HTML page for browsers or JSON for clients,
so no handler ever builds an error response itself and no stack trace ever reaches a user.
"""

from __future__ import annotations

from collections.abc import Mapping


class GatewayError(Exception):
    """Base of all errors shown to users: an HTTP status, a stable machine code and a readable message."""

    status: int = 500
    code: str = "internal-error"
    title: str = "Something went wrong"
    template: str = "error.html"

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
        retry: bool = False,
        cookies: tuple[str, ...] = (),
    ) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.headers = dict(headers or {})
        self.retry = retry
        self.cookies = cookies

    def document(self) -> dict[str, dict[str, str | int]]:
        """The JSON body every client that is not a browser gets: ``{"error": {"code", "message", "status"}}``."""
        return {"error": {"code": self.code, "message": self.message, "status": self.status}}


class BadRequest(GatewayError):
    status = 400
    code = "bad-request"
    title = "Bad request"


class Unauthorized(GatewayError):
    status = 401
    code = "unauthenticated"
    title = "Sign-in required"


class Forbidden(GatewayError):
    status = 403
    code = "forbidden"
    title = "Not allowed"


class NotFound(GatewayError):
    status = 404
    code = "not-found"
    title = "Not found"


class MethodNotAllowed(GatewayError):
    status = 405
    code = "method-not-allowed"
    title = "Method not allowed"


class Conflict(GatewayError):
    status = 409
    code = "conflict"
    title = "Conflict"


class RequestTimeout(GatewayError):
    status = 408
    code = "request-timeout"
    title = "Request too slow"


class PayloadTooLarge(GatewayError):
    status = 413
    code = "payload-too-large"
    title = "Request too large"


class URITooLong(GatewayError):
    status = 414
    code = "url-too-long"
    title = "Address too long"


class HeadersTooLarge(GatewayError):
    status = 431
    code = "headers-too-large"
    title = "Request headers too large"


class BadGateway(GatewayError):
    status = 502
    code = "upstream-unreachable"
    title = "Nothing is answering"


class UnsafeHeader(BadGateway):
    """A head would carry a line break or NUL (from an identity claim, an upstream, anything): it is not sent,
    as it could end the head early and smuggle a second message onto a pooled connection."""

    code = "unsafe-header"

    def __init__(self) -> None:
        super().__init__("A header held a line break or NUL character, so this message was not sent.")


class ServiceUnavailable(GatewayError):
    status = 503
    code = "unavailable"
    title = "Not available yet"


class GatewayTimeout(GatewayError):
    status = 504
    code = "upstream-timeout"
    title = "The app took too long"


class Redirect(GatewayError):
    """Not a failure: the request must continue elsewhere (sign-in, token removed from the URL)."""

    status = 303
    code = "redirect"
    title = "Redirecting"

    def __init__(self, location: str, *, cookies: tuple[str, ...] = (), status: int = 303) -> None:
        super().__init__(f"Continue at {location}", headers={"Location": location}, cookies=cookies)
        self.location = location
        self.status = status
