"""Status badges (``/badge/{workspace}/{port}.svg``): a phase only for those who may see the port, the same grey
"unavailable" for everyone and everything else, whatever the address says."""

from __future__ import annotations

import pytest

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
