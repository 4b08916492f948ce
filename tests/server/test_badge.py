"""Status badges (``/badge/{workspace}/{port}.svg``): a phase only for those who may see the port, the same grey
"unavailable" for everyone and everything else, whatever the address says."""

from __future__ import annotations

import time

import pytest

from gateway.server.context import GATEWAY
from tests.conftest import MakeGateway, next_address, workspace

HUB = {"Host": "localhost:8080"}


@pytest.mark.parametrize(("path", "value"), [
    ("/badge/ws1/3000.svg", "warm"),  # a public port: anyone may know it sleeps
    ("/badge/ws1/4000.svg", "unavailable"),  # a private one: nothing said
    ("/badge/nope/3000.svg", "unavailable"),  # no such workspace: the same answer
    ("/badge/ws1/%C2%B2.svg", "unavailable"),  # "²" is a digit to str.isdigit, not to int()
    pytest.param("/badge/ws1/" + "9" * 5000 + ".svg", "unavailable", id="5000-digits"),  # past int()'s limit
    ("/badge/ws1/99999.svg", "unavailable"),
])
async def test_a_badge_tells_only_what_its_viewer_may_see(make_gateway: MakeGateway, path: str, value: str) -> None:
    client = await make_gateway(workspaces={"ws1": workspace(next_address(), ports={3000: "public", 4000: "private"})})
    response = await client.get(path, headers=HUB)
    assert response.status == 200
    assert response.content_type == "image/svg+xml"
    assert f"preview: {value}</title>" in await response.text()


async def test_a_share_token_in_the_badge_url_tells_the_phase_of_the_port_it_opens(make_gateway: MakeGateway) -> None:
    """The API's embed snippet puts the share token in the badge URL: it tells the phase of a private port, with a
    link to the port, for as long as the link would open that port to anyone who holds it, and not a moment more."""
    client = await make_gateway(workspaces={"ws1": workspace(next_address(), ports={3000: "public", 4000: "private"}),
                                            "ws2": workspace(next_address(), ports={4000: "private"})})
    store = client.app[GATEWAY].auth.store
    link, token = await store.create_share(workspace="ws1", port=4000, audience="anyone", people=[],
                                           created_by="alice", ttl=3600)
    _, every_port = await store.create_share(workspace="ws1", port=None, audience="anyone", people=[],
                                             created_by="alice", ttl=3600)
    _, expired = await store.create_share(workspace="ws1", port=4000, audience="anyone", people=[],
                                          created_by="alice", ttl=3600, now=time.time() - 7200)
    _, org_only = await store.create_share(workspace="ws1", port=4000, audience="org", people=[],
                                           created_by="alice", ttl=3600)
    _, other_port = await store.create_share(workspace="ws1", port=3000, audience="anyone", people=[],
                                             created_by="alice", ttl=3600)
    _, other_workspace = await store.create_share(workspace="ws2", port=4000, audience="anyone", people=[],
                                                  created_by="alice", ttl=3600)

    async def told(path: str, token: str) -> str:
        response = await client.get(path, params={"codehub_share": token}, headers=HUB)
        assert response.status == 200
        return await response.text()

    for shown in (await told("/badge/ws1/4000.svg", token), await told("/badge/ws1/4000.svg", every_port)):
        assert "preview: warm</title>" in shown
        assert '<a href="http://4000-ws1.localhost:8080/" target="_blank">' in shown
    for token_of_another in (expired, org_only, other_port, other_workspace, "no-such-token"):
        shown = await told("/badge/ws1/4000.svg", token_of_another)
        assert "preview: unavailable</title>" in shown
        assert "<a " not in shown, "no link to a port the viewer may not open"
    await store.revoke_share(link)
    assert "preview: unavailable</title>" in await told("/badge/ws1/4000.svg", token)


async def test_a_badge_is_an_svg_drawn_the_same_way_each_time(make_gateway: MakeGateway) -> None:
    """Badges are images other sites embed: their exact drawing (widths from the text's length), a short cache, and
    no sniffing of their type into something a browser would run."""
    client = await make_gateway(workspaces={"ws1": workspace(next_address(), ports={3000: "public"})})
    shown = await client.get("/badge/ws1/3000.svg", headers=HUB)
    assert shown.headers["Cache-Control"] == "max-age=5"
    assert shown.headers["X-Content-Type-Options"] == "nosniff"
    assert await shown.text() == (
        '<svg xmlns="http://www.w3.org/2000/svg" width="101" height="20" role="img" aria-label="preview: warm">'
        '<title>preview: warm</title><a href="http://3000-ws1.localhost:8080/" target="_blank">'
        '<rect width="61" height="20" fill="#555"/><rect x="61" width="40" height="20" fill="#d99a1e"/>'
        '<g fill="#fff" font-family="Verdana,DejaVu Sans,sans-serif" font-size="11" text-anchor="middle">'
        '<text x="30.5" y="14">preview</text><text x="81.0" y="14">warm</text></g></a></svg>')
    hidden = await client.get("/badge/nope/3000.svg", headers=HUB)
    assert hidden.headers["X-Content-Type-Options"] == "nosniff"
    assert await hidden.text() == (
        '<svg xmlns="http://www.w3.org/2000/svg" width="150" height="20" role="img" aria-label="preview: unavailable">'
        '<title>preview: unavailable</title>'
        '<rect width="61" height="20" fill="#555"/><rect x="61" width="89" height="20" fill="#8a8f98"/>'
        '<g fill="#fff" font-family="Verdana,DejaVu Sans,sans-serif" font-size="11" text-anchor="middle">'
        '<text x="30.5" y="14">preview</text><text x="105.5" y="14">unavailable</text></g></svg>')
