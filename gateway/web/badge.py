"""Status badges for pull-request descriptions, where iframes are not allowed: an SVG per workspace port.

A badge only tells a phase to someone who may see the port (public ports, or a share token in the badge URL);
for everyone else, and for workspaces that do not exist, it is the same grey "unavailable" image, so badges
reveal nothing about what exists.
"""

from __future__ import annotations

import time
from html import escape

from aiohttp import web

from gateway.auth.authenticate import SHARE_PARAM, grant_of
from gateway.auth.store import ShareLink
from gateway.config import PORT_TEXT
from gateway.edge.policy import decide
from gateway.lifecycle import Phase
from gateway.server.context import GATEWAY

_COLOURS = {
    Phase.RUNNING: ("running", "#2e9d5b"), Phase.WARM: ("warm", "#d99a1e"), Phase.COLD: ("cold", "#3b7dd8"),
    Phase.STARTING: ("starting", "#8f6bd8"), Phase.RESTORING: ("starting", "#8f6bd8"),
    Phase.STOPPING: ("stopping", "#d99a1e"), Phase.ARCHIVING: ("archiving", "#3b7dd8"),
    Phase.FAILED: ("failed", "#c0392b"),
}
_UNAVAILABLE = ("unavailable", "#8a8f98")


def render(label: str, value: str, colour: str, link: str | None = None) -> str:
    """A flat two-part badge; widths from a fixed per-character estimate (no font files needed)."""
    left, right = 7 * len(label) + 12, 7 * len(value) + 12
    width = left + right
    body = (
        f'<rect width="{left}" height="20" fill="#555"/><rect x="{left}" width="{right}" height="20" '
        f'fill="{colour}"/><g fill="#fff" font-family="Verdana,DejaVu Sans,sans-serif" font-size="11" '
        f'text-anchor="middle"><text x="{left / 2}" y="14">{escape(label)}</text>'
        f'<text x="{left + right / 2}" y="14">{escape(value)}</text></g>'
    )
    if link:
        body = f'<a href="{escape(link)}" target="_blank">{body}</a>'
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="20" role="img" '
            f'aria-label="{escape(label)}: {escape(value)}"><title>{escape(label)}: {escape(value)}</title>'
            f'{body}</svg>')


async def badge(request: web.Request) -> web.Response:
    gateway = request.app[GATEWAY]
    workspace, port_text = request.match_info["workspace"], request.match_info["port"]
    state = gateway.runtime.get(workspace)
    value, colour, link = *_UNAVAILABLE, None
    if state is not None and PORT_TEXT.fullmatch(port_text):
        port = int(port_text)
        token = request.query.get(SHARE_PARAM, "")
        found: ShareLink | None = gateway.auth.store.find_share(token) if token else None
        grant = grant_of(found) if found is not None and found.active(time.time()) else None
        if decide(gateway.policy, state.spec, port, None, grant).allow:
            value, colour = _COLOURS.get(state.phase, _UNAVAILABLE)
            link = gateway.hosts.share_url(state.id, port)
    svg = render("preview", value, colour, link)
    return web.Response(text=svg, content_type="image/svg+xml",
                        headers={"Cache-Control": "max-age=5", "X-Content-Type-Options": "nosniff"})
