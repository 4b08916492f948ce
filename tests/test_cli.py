"""The ``codehub-gateway`` command: help, policy check/explain, key rotation, token issue, and the API commands
against a gateway listening on a real loopback port."""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp import web

from gateway import cli
from gateway.auth.identity import Identity
from gateway.auth.keys import KeySet
from gateway.auth.store import FileTokenStore
from gateway.config import ConfigError
from gateway.server.app import build_app
from gateway.server.context import GATEWAY
from tests.conftest import next_address, settings, workspace
from tests.peers.idp.fixture import free_loopback_port

REPO = Path(__file__).resolve().parents[1]


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
    create = run("share", "create", "--help")
    for option in ("--port", "--audience", "--people", "--ttl", "--hub", "--token"):
        assert option in create.stdout
    assert "--ttl" not in run("share", "list", "--help").stdout


def test_serve_on_another_port_prints_urls_that_work(tmp_path: Path) -> None:
    """The embedded default on ``--port P``: the hub and the demo preview it prints answer on P."""
    port = free_loopback_port()
    env = {key: value for key, value in os.environ.items() if not key.startswith("CODEHUB_")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    log = tmp_path / "serve.log"
    with log.open("wb") as output:
        process = subprocess.Popen([sys.executable, "-m", "gateway", "serve", "--port", str(port)], cwd=tmp_path,
                                   env=env, stdin=subprocess.DEVNULL, stdout=output, stderr=output)
    try:
        urls = printed_urls(log, process)
        assert urls["hub"] == f"http://localhost:{port}/"
        assert urls["demo"] == f"http://8000-demo.localhost:{port}/"
        for url, needle in ((urls["hub"], b"Sign in"), (urls["demo"], b"Hello from workspace")):
            host = url.removeprefix("http://").rstrip("/")
            status, body = _get_when_listening(port, host)
            assert status == 200, body[:300]
            assert needle in body
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)



def test_a_metrics_port_that_cannot_be_bound_lets_the_gateway_port_go(tmp_path: Path) -> None:
    """``bind_listeners`` binds both or neither: when the metrics listener fails, the gateway's socket is
    closed again (its port can be bound at once)."""
    from gateway.server.serving import bind_listeners

    port = free_loopback_port()
    config = settings(tmp_path, {}, listen={"port": port}, metrics={"host": _NOWHERE, "port": free_loopback_port()})
    with pytest.raises(ConfigError, match="metrics: cannot listen") as raised:
        bind_listeners(config)
    with socket.socket() as again:  # closed, not left to the collector: the error's traceback is still held
        again.bind(("127.0.0.1", port))
    assert raised.tb is not None

def urls_in(output: str) -> dict[str, str] | None:
    """The hub and demo ``name: URL`` lines ``serve`` prints under its first line, once it printed them."""
    urls = dict(line.strip().split(": ", 1) for line in output.splitlines()[1:3] if ": http" in line)
    return urls if len(urls) == 2 else None


def printed_urls(log: Path, process: subprocess.Popen[bytes]) -> dict[str, str]:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        assert process.poll() is None, log.read_text()
        urls = urls_in(log.read_text())
        if urls is not None:
            return urls
        time.sleep(0.05)
    raise AssertionError(f"serve printed no URLs:\n{log.read_text()}")


def _get_when_listening(port: int, host: str) -> tuple[int, bytes]:
    deadline = time.monotonic() + 20
    while True:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        try:
            connection.request("GET", "/", headers={"Host": host, "Accept": "*/*"})
            response = connection.getresponse()
            return response.status, response.read()
        except ConnectionRefusedError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
        finally:
            connection.close()


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
        (["--user", "bob"], "http://ide-ws1.localhost:8080/", 0, "ALLOW bob → the IDE of workspace ws1: collaborator"),
        (["--user", "carol", "--email", "carol@corp.example"], "http://ide-ws1.localhost:8080/", 3,
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


def test_token_issue_never_writes_over_a_store_it_cannot_read(tmp_path: Path) -> None:
    config = _config(tmp_path)
    store = tmp_path / "state" / "tokens.json"
    store.parent.mkdir(parents=True, exist_ok=True)
    store.write_text('{"shares": [')  # cut short, or edited by hand
    result = run("token", "issue", "--config", str(config), "--user", "alice")
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert f"{store} cannot be read" in result.stderr
    assert store.read_text() == '{"shares": ['


def test_token_issue_from_another_folder_uses_the_gateways_state(tmp_path: Path) -> None:
    """A relative ``state_dir`` is the config file's, wherever the command runs, and the command says which."""
    folder = tmp_path / "etc"
    folder.mkdir()
    config = folder / "gateway.yaml"
    config.write_text("hub_url: http://localhost:9100\npreview_domain: localhost:9100\nlocal: {state_dir: state}\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    result = subprocess.run([sys.executable, "-m", "gateway", "token", "issue", "--config", str(config), "--user",
                             "alice"], capture_output=True, text=True, timeout=60, cwd=elsewhere, check=False,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stderr
    store = folder / "state" / "tokens.json"
    assert FileTokenStore(store).find_api_token(result.stdout.strip()) is not None
    assert not (elsewhere / ".codehub").exists()
    assert not (elsewhere / "state").exists()
    assert f"written to {store} (the gateway at http://localhost:9100)" in result.stderr


def test_bad_config_is_one_line_and_exit_2(tmp_path: Path) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text("timeouts: {connect: soon}\n")
    result = run("keys", "rotate", "--config", str(config))
    assert result.returncode == 2
    assert result.stderr.strip() == "config error: timeouts.connect: Input should be a valid number, unable to " \
                                    "parse string as a number"


@contextlib.asynccontextmanager
async def serve_hub(tmp_path: Path, names: Sequence[str]) -> AsyncIterator[tuple[str, str]]:
    """A gateway on a real port with workspaces ``names`` (owner alice): its hub URL and an API token for alice."""
    port = free_loopback_port()
    config = settings(tmp_path, {name: workspace(next_address(), ports={3000: "private"}) for name in names},
                      hub_url=f"http://localhost:{port}", preview_domain=f"localhost:{port}")
    app = build_app(config)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        _record, token = await app[GATEWAY].auth.store.create_api_token(Identity("alice"), name="cli-test")
        yield f"http://localhost:{port}", token
    finally:
        await runner.cleanup()


@pytest.fixture
async def hub(tmp_path: Path) -> AsyncIterator[tuple[str, str]]:
    """A gateway with workspace ws1 (owner alice), and an API token for alice."""
    async with serve_hub(tmp_path, ["ws1"]) as served:
        yield served


async def _cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = await asyncio.to_thread(cli.main, list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


async def test_api_commands_against_a_running_gateway(hub: tuple[str, str], capsys: pytest.CaptureFixture[str]
                                                      ) -> None:
    url, token = hub
    auth = ["--hub", url, "--token", token]
    code, out, _ = await _cli(capsys, "workspaces", "--hub", f"{url}/", "--token", token)  # as the banner prints it
    assert code == 0
    assert out.startswith("ws1  WARM  owner alice")
    code, out, _ = await _cli(capsys, "port", "ws1", "3000", "org", *auth)
    assert code == 0
    assert out.splitlines()[1] == f"  port 3000  org      not listening {url.replace('//', '//3000-ws1.')}/"
    code, out, _ = await _cli(capsys, "port", "ws1", "3000", "--identity", "on", *auth)
    assert code == 0
    assert "port 3000  org" in out
    assert out.rstrip().endswith("identity on (0 consented)")
    code, out, _ = await _cli(capsys, "port", "ws1", "3000", "--identity", "off", *auth)
    assert code == 0
    assert "identity" not in out
    code, out, _ = await _cli(capsys, "share", "create", "ws1", "--port", "3000", "--ttl", "2h", *auth)
    assert code == 0
    assert out.strip().startswith(f"http://3000-ws1.{url.removeprefix('http://')}/?codehub_share=chs_")
    code, out, _ = await _cli(capsys, "share", "create", "ws1", "--audience", "people", "--people", "bob", *auth)
    assert (code, out.strip()) == (0, out.strip().splitlines()[0])
    assert out.startswith(f"http://3000-ws1.{url.removeprefix('http://')}/?codehub_share=chs_")  # never {port}
    code, out, _ = await _cli(capsys, "share", "list", "ws1", *auth)
    assert code == 0
    lines = out.splitlines()
    assert "all ports  active   for people: bob" in lines[0]
    assert "expires in 1 d" in lines[0]
    assert f"port 3000  active   for {'anyone':<20} expires in 2 h" in lines[1]
    code, _, err = await _cli(capsys, "share", "create", "ws1", "--ttl", "90d", *auth)
    assert (code, err.strip()) == (1, "codehub-gateway: 400: ttl: the policy allows at most 7 days.")
    code, out, _ = await _cli(capsys, "share", "list", "ws1", "--json", *auth)
    link = json.loads(out)["shares"][1]
    assert (link["port"], link["active"]) == (3000, True)
    code, out, _ = await _cli(capsys, "share", "revoke", "ws1", link["id"], *auth)
    assert (code, out.strip()) == (0, f"revoked {link['id']}")
    code, out, _ = await _cli(capsys, "share", "list", "ws1", *auth)
    assert "revoked" in out
    code, out, _ = await _cli(capsys, "workspace", "wake", "ws1", *auth)
    assert (code, out.split()[1]) == (0, "RUNNING")
    code, out, _ = await _cli(capsys, "workspace", "stop", "ws1", *auth)
    assert (code, out.split()[1]) == (0, "WARM")


async def test_a_link_for_every_port_prints_the_url_of_each(hub: tuple[str, str],
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    url, token = hub
    auth = ["--hub", url, "--token", token]
    code, _, _ = await _cli(capsys, "port", "ws1", "5173", "public", *auth)
    assert code == 0
    code, out, _ = await _cli(capsys, "share", "create", "ws1", "--audience", "people", "--people", "bob, carol",
                              *auth)
    assert code == 0
    assert [line.partition("?")[0] for line in out.splitlines()] == [url.replace("//", f"//{port}-ws1.") + "/"
                                                                     for port in (3000, 5173)]
    code, out, _ = await _cli(capsys, "share", "list", "ws1", "--json", *auth)
    assert [link["people"] for link in json.loads(out)["shares"]] == [["bob", "carol"]]
    code, out, _ = await _cli(capsys, "share", "create", "ws1", "--port", "5173", "--json", *auth)
    assert code == 0
    assert json.loads(out)["url"].startswith(url.replace("//", "//5173-ws1.") + "/?codehub_share=chs_")


@pytest.mark.parametrize(
    ("seconds", "read"),
    [
        (0, "now"), (0.5, "now"), (1, "in less than a minute"), (-30, "less than a minute ago"),
        (59.5, "in less than a minute"), (60, "in 1 min"), (3540, "in 59 min"), (3600, "in 1 h"),
        (86400 - 30, "in 1 d"), (-2 * 86400, "2 d ago"),
    ],
)
def test_share_list_says_when_a_link_expires_as_a_person_reads_it(seconds: float, read: str) -> None:
    """To the minute: a link made a moment ago for a day expires "in 1 d", not in 23 h 59 min 59 s."""
    assert cli.relative_time(1_000_000 + seconds, 1_000_000) == read


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


async def test_workspaces_lists_every_page(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """The API answers a page at a time; the command follows ``next_cursor`` to the end."""
    names = ["a1", "b2", "c3", "d4", "e5"]
    async with serve_hub(tmp_path, names) as (url, token):
        monkeypatch.setattr(cli, "LIST_PAGE", 2)
        code, out, _ = await _cli(capsys, "workspaces", "--hub", url, "--token", token)
        assert code == 0
        assert [line.split()[0] for line in out.splitlines() if not line.startswith(" ")] == names
        code, out, _ = await _cli(capsys, "workspaces", "--json", "--hub", url, "--token", token)
        assert [view["id"] for view in json.loads(out)["workspaces"]] == names


def test_token_issue_refuses_an_identity_apps_could_not_be_told(tmp_path: Path) -> None:
    """A line break in a user name would end the header that carries it to an app: sign-in refuses such a name,
    and so does the CLI, with one line and nothing written."""
    config = _config(tmp_path)
    result = run("token", "issue", "--config", str(config), "--user", "alice\r\nX-Forwarded-User: root")
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.strip().splitlines() == [
        "codehub-gateway: token issue: a user name with control characters cannot be sent to apps"]
    assert not (tmp_path / "state" / "tokens.json").exists()


def _serve_env() -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("CODEHUB_")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    return env


def _settings_file(tmp_path: Path, **settings: Any) -> Path:
    """A settings file with no workspaces (nothing to start), its state under ``tmp_path``."""
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump({"local": {"state_dir": str(tmp_path / "state"), "workspaces": {}}, **settings}))
    return path


_NAMED = {"allow_dev_on_network": True}
_NOWHERE = "no-such-host.invalid"


@pytest.mark.parametrize(
    ("case", "line"),
    [
        ("not-utf8", "config error: {config}: not UTF-8 text (invalid start byte at byte 31)"),
        ("port-in-use", "config error: listen: cannot listen on 127.0.0.1:{port}: Address already in use"),
        ("unknown-host", f"config error: listen: cannot listen on {_NOWHERE}:{{port}}: "),
        ("unknown-metrics-host", f"config error: metrics: cannot listen on {_NOWHERE}:{{port}}: "),
        ("state-dir-is-a-file", "config error: local.state_dir: cannot use {tmp}/afile: "),
        ("state-dir-holds-a-file", "config error: local.state_dir: cannot use {tmp}/state/workspaces: "),
        ("keys-file-is-a-folder", "config error: auth.keys_file: cannot read keys file {tmp}/folder: Is a directory"),
        ("keys-file-is-a-folder-workers", "config error: auth.keys_file: cannot read keys file {tmp}/folder: "),
        ("port-in-use-workers", "config error: listen: cannot listen on 127.0.0.1:{port}: Address already in use"),
        ("no-kubeconfig", "config error: kubernetes.kubeconfig: cannot read /nonexistent/kubeconfig: "),
        ("no-client-secret", "config error: auth.oidc.client_secret_file: No such file or directory"),
        ("client-secret-not-utf8", "config error: auth.oidc.client_secret_file: not UTF-8 text"),
        ("empty-kubeconfig", "config error: kubernetes: Invalid kube-config file."),
    ],
)
def test_serve_refuses_bad_settings_in_one_line(tmp_path: Path, case: str, line: str) -> None:
    """Whatever is wrong with the settings, ``serve`` says so in one line and exits 2, before its banner."""
    port = free_loopback_port()
    holder = None
    workers = ["--workers", "2"] if case.endswith("-workers") else []
    case = case.removesuffix("-workers")
    if case == "not-utf8":
        config = tmp_path / "gateway.yaml"
        config.write_bytes(b'hub_url: "http://localhost:8080\xff"\n')
    elif case == "port-in-use":
        holder = socket.create_server(("127.0.0.1", port))
        config = _settings_file(tmp_path, listen={"port": port})
    elif case == "unknown-host":
        config = _settings_file(tmp_path, listen={"host": _NOWHERE, "port": port}, auth=_NAMED,
                                hub_url="http://hub.test", preview_domain="hub.test")
    elif case == "unknown-metrics-host":
        config = _settings_file(tmp_path, listen={"port": free_loopback_port()}, metrics={"host": _NOWHERE,
                                                                                           "port": port})
    elif case == "state-dir-is-a-file":
        (tmp_path / "afile").touch()
        config = _settings_file(tmp_path, listen={"port": port}, local={"state_dir": str(tmp_path / "afile")})
    elif case == "state-dir-holds-a-file":  # where the workspaces' folders go
        (tmp_path / "state").mkdir()
        (tmp_path / "state" / "workspaces").touch()
        config = _settings_file(tmp_path, listen={"port": port})
    elif case in ("no-client-secret", "client-secret-not-utf8"):  # read at each sign-in: tried once at start
        if case == "client-secret-not-utf8":
            (tmp_path / "oidc-secret").write_bytes(b"\xff\xfe")
        config = _settings_file(tmp_path, listen={"port": port}, auth={"mode": "oidc", "oidc": {
            "issuer": "https://sso.example.com", "client_id": "hub", "client_secret_file": "oidc-secret"}})
    elif case == "keys-file-is-a-folder":
        (tmp_path / "folder").mkdir()
        config = _settings_file(tmp_path, listen={"port": port}, auth={"keys_file": str(tmp_path / "folder")})
    else:
        kubeconfig = "/nonexistent/kubeconfig"
        if case == "empty-kubeconfig":
            kubeconfig = str(tmp_path / "kubeconfig")
            Path(kubeconfig).write_text("{}\n")
        config = _settings_file(tmp_path, listen={"port": port}, runtime="kubernetes",
                                kubernetes={"kubeconfig": kubeconfig})
    try:
        result = subprocess.run([sys.executable, "-m", "gateway", "serve", "--config", str(config), *workers],
                                capture_output=True, text=True, timeout=30, env=_serve_env(), cwd=tmp_path,
                                check=False)
    finally:
        if holder is not None:
            holder.close()
    assert (result.returncode, result.stdout) == (2, ""), result.stderr
    [printed] = result.stderr.splitlines()
    assert printed.startswith(line.format(config=config, port=port, tmp=tmp_path)), printed


def test_serve_refuses_fewer_than_one_worker_in_one_line(tmp_path: Path) -> None:
    """``--workers 0`` would start no process to answer on the port, after a banner saying the gateway listens."""
    config = _settings_file(tmp_path, listen={"port": free_loopback_port()})
    result = subprocess.run([sys.executable, "-m", "gateway", "serve", "--config", str(config), "--workers", "0"],
                            capture_output=True, text=True, timeout=30, env=_serve_env(), cwd=tmp_path, check=False)
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr.splitlines() == ["codehub-gateway: --workers must be at least 1"]


@pytest.mark.parametrize("command", [["keys", "rotate"], ["policy", "explain", "--url", "http://3000-ws1.localhost/"],
                                     ["token", "issue", "--user", "alice"]])
def test_other_commands_refuse_a_settings_file_that_is_not_utf8_in_one_line(tmp_path: Path,
                                                                            command: list[str]) -> None:
    config = tmp_path / "gateway.yaml"
    config.write_bytes(b"hub_url: http://h\xc3\n")
    result = run(*command, "--config", str(config))
    assert result.returncode == 2
    assert result.stderr.splitlines() == [f"config error: {config}: not UTF-8 text (invalid continuation byte at "
                                          "byte 17)"]


@pytest.mark.parametrize(
    ("hub", "token", "line"),
    [
        ("http://local host:8080", "chk_x", "codehub-gateway: --hub http://local host:8080 is not a URL like "
                                            "https://hub.example.com"),
        ("ftp://hub.example.com", "chk_x", "codehub-gateway: --hub ftp://hub.example.com is not a URL like "
                                           "https://hub.example.com"),
        ("http://hüb.example.com", "chk_x", "codehub-gateway: --hub http://hüb.example.com is not a URL like "
                                           "https://hub.example.com"),
        # port 0 is no port to reach, and 99999 is none at all (http.client's error was a traceback)
        ("http://127.0.0.1:0", "chk_x", "codehub-gateway: --hub http://127.0.0.1:0 is not a URL like "
                                        "https://hub.example.com"),
        ("http://127.0.0.1:99999", "chk_x", "codehub-gateway: --hub http://127.0.0.1:99999 is not a URL like "
                                            "https://hub.example.com"),
        ("http://127.0.0.1:1", "a\nb", "codehub-gateway: the API token has characters no token has"),
        ("http://127.0.0.1:1", "é€", "codehub-gateway: the API token has characters no token has"),
    ],
)
async def test_api_commands_refuse_a_hub_or_token_that_cannot_be_sent(capsys: pytest.CaptureFixture[str], hub: str,
                                                                      token: str, line: str) -> None:
    code, out, err = await _cli(capsys, "workspaces", "--hub", hub, "--token", token)
    assert (code, out, err.splitlines()) == (1, "", [line])


async def test_api_commands_send_to_an_https_hub(capsys: pytest.CaptureFixture[str]) -> None:
    """An https hub is one the commands send to: with nothing listening on its port, they say they cannot reach
    it, not that it is no URL."""
    hub = f"https://127.0.0.1:{free_loopback_port()}"
    code, out, err = await _cli(capsys, "workspaces", "--hub", hub, "--token", "chk_x")
    assert (code, out) == (1, "")
    assert err.startswith(f"codehub-gateway: cannot reach {hub}: "), err


@pytest.mark.parametrize(
    ("status", "line"),
    [
        (200, "codehub-gateway: {hub} answered with something that is not JSON: is it a code-hub gateway?"),
        (502, "codehub-gateway: 502: Bad Gateway"),  # a proxy in front of the hub, with a page of its own
    ],
)
async def test_an_answer_that_is_not_json_is_one_line(capsys: pytest.CaptureFixture[str], status: int,
                                                      line: str) -> None:
    """--hub names something that is not the gateway (a dev server, a login portal, a proxy) and it answers a
    page: the command says so, or says the error's status and reason."""
    async def page(request: web.Request) -> web.Response:
        return web.Response(status=status, text="<html>not the gateway</html>", content_type="text/html")

    app = web.Application()
    app.router.add_get("/{tail:.*}", page)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_loopback_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        code, _out, err = await _cli(capsys, "workspaces", "--hub", f"http://127.0.0.1:{port}", "--token", "chk_x")
    finally:
        await runner.cleanup()
    assert (code, err.splitlines()) == (1, [line.format(hub=f"http://127.0.0.1:{port}")])


@pytest.mark.parametrize("url", ["http://[::1", "http://3000-ws1.localhost:8080:99/"])
def test_policy_explain_refuses_a_url_that_is_not_one_in_one_line(tmp_path: Path, url: str) -> None:
    result = run("policy", "explain", "--config", str(_config(tmp_path)), "--url", url)
    assert result.returncode == 1
    assert result.stderr.splitlines() == [f"codehub-gateway: {url} is not a URL"]


def test_policy_files_that_are_not_utf8_are_one_line(tmp_path: Path) -> None:
    policy = tmp_path / "bad-policy.yaml"
    policy.write_bytes(b"org: {groups: [\xff]}\n")
    checked = run("policy", "check", str(policy))
    assert (checked.returncode, checked.stderr.splitlines()) == (1, [f"{policy}: not UTF-8 text (invalid start byte "
                                                                     "at byte 15)"])
    explained = run("policy", "explain", "--config", str(_config(tmp_path)), "--policy", str(policy), "--url",
                    "http://3000-ws1.localhost:8080/")
    assert (explained.returncode, explained.stderr.splitlines()) == (2, [f"{policy}: not UTF-8 text (invalid start "
                                                                         "byte at byte 15)"])


def test_keys_rotate_never_writes_over_keys_it_cannot_read(tmp_path: Path) -> None:
    """Keys cut short, or edited by hand, are the ones sessions are signed with: rotating says so in one line and
    leaves them for the operator to mend, not a traceback."""
    config = _config(tmp_path)
    keys_file = tmp_path / "state" / "signing-keys.json"
    keys_file.parent.mkdir(parents=True)
    keys_file.write_text('{"keys": [')
    result = run("keys", "rotate", "--config", str(config))
    assert (result.returncode, result.stdout) == (1, "")
    [line] = result.stderr.splitlines()
    assert line.startswith(f"codehub-gateway: {keys_file}: not a valid keys file: "), line
    assert keys_file.read_text() == '{"keys": ['


def test_keys_rotate_that_cannot_write_the_keys_is_one_line(tmp_path: Path) -> None:
    config = _config(tmp_path)
    assert run("keys", "rotate", "--config", str(config)).returncode == 0
    (tmp_path / "state" / "signing-keys.json.tmp").mkdir()  # where the new keys are written first
    result = run("keys", "rotate", "--config", str(config))
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr.splitlines() == [f"codehub-gateway: cannot write keys file {tmp_path}/state/"
                                          "signing-keys.json: Is a directory"]


def test_token_issue_with_a_kubeconfig_that_says_nothing_is_one_line(tmp_path: Path) -> None:
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text("{}\n")
    config = _config(tmp_path, runtime="kubernetes", kubernetes={"kubeconfig": str(kubeconfig)})
    result = run("token", "issue", "--user", "alice", "--config", str(config))
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr.splitlines() == [f"config error: kubernetes: Invalid kube-config file. Expected key "
                                          f"current-context in {kubeconfig}"]


@pytest.mark.parametrize("name", ["a b", "ws1\nx", "../ws1"])
async def test_a_name_with_a_space_line_break_or_slash_is_a_name_the_api_does_not_know(
        hub: tuple[str, str], capsys: pytest.CaptureFixture[str], name: str) -> None:
    url, token = hub
    code, _out, err = await _cli(capsys, "workspace", "status", name, "--hub", url, "--token", token)
    assert (code, err.splitlines()) == (1, ["codehub-gateway: 404: There is no workspace with that name that you "
                                            "can see."])
