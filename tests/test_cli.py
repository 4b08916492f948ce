"""The ``codehub-gateway`` command: help, policy check/explain, key rotation, token issue, and the API commands
against a gateway listening on a real loopback port."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp import web

from gateway import cli
from gateway.app import build_app
from gateway.auth.identity import Identity
from gateway.auth.keys import KeySet
from gateway.auth.store import FileTokenStore
from gateway.context import GATEWAY
from tests.conftest import next_address, settings, workspace
from tests.peers.idp.fixture import free_loopback_port


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway", *args], capture_output=True, text=True, timeout=60,
                          env=env, check=False)


def test_help_describes_every_command_and_option() -> None:
    top = run("--help")
    assert top.returncode == 0
    for command in ("serve", "policy", "keys", "token", "workspace", "workspaces", "port", "share"):
        assert command in top.stdout
    serve = run("serve", "--help")
    for option in ("--config", "--host", "--port", "--log-level"):
        assert option in serve.stdout


def test_policy_check_names_file_and_line(tmp_path: Path) -> None:
    good = tmp_path / "good.yaml"
    good.write_text("ports:\n  default_visibility: org\n")
    bad = tmp_path / "bad.yaml"
    bad.write_text("org:\n  groups: [dev]\nports:\n  default_visibility: secret\n")
    ok = run("policy", "check", str(good))
    assert ok.returncode == 0
    assert f"{good}: ok" in ok.stdout
    failed = run("policy", "check", str(good), str(bad))
    assert failed.returncode == 1
    assert failed.stderr.strip().splitlines() == [f"{bad}:4: ports.default_visibility: Input should be 'private', "
                                                  "'org' or 'public'"]


def _config(tmp_path: Path, **extra: Any) -> Path:
    policy = tmp_path / "policy.yaml"
    policy.write_text("org:\n  email_domains: [corp.example]\n")
    data = {"policy_file": str(policy), "local": {"state_dir": str(tmp_path / "state"), "workspaces": {
        "ws1": {"owner": "alice", "collaborators": ["bob"], "command": ["sleep", "1"], "ports": {3000: "org"}}}},
        **extra}
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize(
    ("user", "url", "status", "line"),
    [
        (["--user", "carol", "--email", "carol@corp.example"], "http://3000-ws1.localhost:8080/", 0,
         "ALLOW carol → port 3000 (org) of workspace ws1: org-member"),
        (["--user", "eve", "--email", "eve@elsewhere.example"], "http://3000-ws1.localhost:8080/", 3,
         "DENY eve → port 3000 (org) of workspace ws1: not-org-member"),
        ([], "http://3000-ws1.localhost:8080/", 3, "DENY anonymous → port 3000 (org) of workspace ws1: "
                                                   "user-unauthenticated"),
        (["--user", "bob"], "http://localhost:8080/w/ws1/", 0, "ALLOW bob → the IDE of workspace ws1: collaborator"),
        (["--user", "carol", "--email", "carol@corp.example"], "http://localhost:8080/w/ws1/", 3,
         "DENY carol → the IDE of workspace ws1: ide-owner-only"),
    ],
)
def test_policy_explain(tmp_path: Path, user: list[str], url: str, status: int, line: str) -> None:
    result = run("policy", "explain", "--config", str(_config(tmp_path)), "--url", url, *user)
    assert result.returncode == status, result.stderr
    assert result.stdout.startswith(line)


def test_policy_explain_refuses_urls_that_are_not_previews(tmp_path: Path) -> None:
    result = run("policy", "explain", "--config", str(_config(tmp_path)), "--url", "http://evil.test/")
    assert result.returncode == 1
    assert "evil.test" in result.stderr


def test_keys_rotate_keeps_old_keys_verifying(tmp_path: Path) -> None:
    config = _config(tmp_path)
    first = run("keys", "rotate", "--config", str(config))
    assert first.returncode == 0, first.stderr
    keys_file = tmp_path / "state" / "signing-keys.json"
    before = KeySet.from_json(keys_file.read_text())
    token = before.sign({"sub": "alice", "iss": "i", "aud": "a", "iat": 1, "exp": 2**40})
    second = run("keys", "rotate", "--config", str(config))
    assert second.returncode == 0
    after = KeySet.from_json(keys_file.read_text())
    assert after.current.kid != before.current.kid
    assert after.current.kid in second.stdout
    assert after.verify(token, audience="a", issuer="i")["sub"] == "alice"
    assert oct(keys_file.stat().st_mode & 0o777) == "0o600"


def test_token_issue_writes_a_token_the_store_accepts(tmp_path: Path) -> None:
    config = _config(tmp_path)
    result = run("token", "issue", "--config", str(config), "--user", "alice", "--groups", "dev,ops")
    assert result.returncode == 0, result.stderr
    token = result.stdout.strip()
    record = FileTokenStore(tmp_path / "state" / "tokens.json").find_api_token(token)
    assert record is not None
    assert (record.subject, record.groups) == ("alice", ["dev", "ops"])


def test_bad_config_is_one_line_and_exit_2(tmp_path: Path) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text("timeouts: {connect: soon}\n")
    result = run("keys", "rotate", "--config", str(config))
    assert result.returncode == 2
    assert result.stderr.strip() == "config error: timeouts.connect: Input should be a valid number, unable to " \
                                    "parse string as a number"


@pytest.fixture
async def hub(tmp_path: Path) -> AsyncIterator[tuple[str, str]]:
    """A gateway on a real port with workspace ws1 (owner alice), and an API token for alice."""
    address, port = next_address(), free_loopback_port()
    config = settings(tmp_path, {"ws1": workspace(address, ports={3000: "private"})}, hub_url=f"http://localhost:{port}",
                      preview_domain=f"localhost:{port}")
    app = build_app(config)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        _record, token = await app[GATEWAY].auth.store.create_api_token(Identity("alice"), name="cli-test")
        yield f"http://localhost:{port}", token
    finally:
        await runner.cleanup()


async def _cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = await asyncio.to_thread(cli.main, list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


async def test_api_commands_against_a_running_gateway(hub: tuple[str, str], capsys: pytest.CaptureFixture[str]
                                                      ) -> None:
    url, token = hub
    auth = ["--hub", url, "--token", token]
    code, out, _ = await _cli(capsys, "workspaces", *auth)
    assert code == 0
    assert out.startswith("ws1  WARM  owner alice")
    code, out, _ = await _cli(capsys, "port", "ws1", "3000", "org", *auth)
    assert code == 0
    assert "port 3000  org" in out
    code, out, _ = await _cli(capsys, "share", "create", "ws1", "--port", "3000", "--ttl", "2h", *auth)
    assert code == 0
    assert out.strip().startswith(f"http://3000-ws1.{url.removeprefix('http://')}/?codehub_share=chs_")
    code, out, _ = await _cli(capsys, "share", "list", "ws1", "--json", *auth)
    link = json.loads(out)["shares"][0]
    assert (link["port"], link["active"]) == (3000, True)
    code, out, _ = await _cli(capsys, "share", "revoke", "ws1", link["id"], *auth)
    assert (code, out.strip()) == (0, f"revoked {link['id']}")
    code, out, _ = await _cli(capsys, "share", "list", "ws1", *auth)
    assert "revoked" in out
    code, out, _ = await _cli(capsys, "workspace", "wake", "ws1", *auth)
    assert (code, out.split()[1]) == (0, "RUNNING")
    code, out, _ = await _cli(capsys, "workspace", "stop", "ws1", *auth)
    assert (code, out.split()[1]) == (0, "WARM")


async def test_api_commands_report_errors_in_one_line(hub: tuple[str, str], capsys: pytest.CaptureFixture[str]
                                                      ) -> None:
    url, token = hub
    code, _, err = await _cli(capsys, "workspace", "status", "nope", "--hub", url, "--token", token)
    assert code == 1
    assert err.strip() == "codehub-gateway: 404: There is no workspace with that name that you can see."
    code, _, err = await _cli(capsys, "workspace", "delete", "ws1", "--hub", url, "--token", token)
    assert code == 1  # the local runtime's workspaces are declared in its settings (the cluster's can be deleted)
    assert err.strip() == ("codehub-gateway: 405: Workspaces of this gateway are declared in its configuration file, "
                           "not deleted through the API.")
    code, _, err = await _cli(capsys, "workspaces", "--hub", url, "--token", "chk_wrong")
    assert (code, err.strip()) == (1, "codehub-gateway: 401: This API token is not valid.")
    code, _, err = await _cli(capsys, "workspaces", "--hub", url)
    assert code == 1
    assert "no API token" in err
