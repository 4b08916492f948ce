"""Settings and policies written with a typo, by a newcomer or by someone hostile: each is refused at load with one
line that names the file, line or key (exit 2, nothing started), or kept from doing harm where it is read again."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.auth.store import FileTokenStore
from gateway.config import ConfigError, load_config
from tests.conftest import MakeGateway, next_address, workspace
from tests.peers.idp.fixture import free_loopback_port

REPO = Path(__file__).resolve().parents[1]


def _env() -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("CODEHUB_")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    return env


def run(*args: str, cwd: Path | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway", *args], capture_output=True, text=True, timeout=timeout,
                          env=_env(), cwd=cwd, check=False)


def serve_refuses(config: Path) -> list[str]:
    """The lines ``serve --config`` printed as it exited 2 with nothing on stdout; a gateway that started instead
    (it would run until stopped) fails the test after 15 s."""
    try:
        result = run("serve", "--config", str(config), cwd=config.parent, timeout=15)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"serve started with {config.read_text()!r} instead of refusing it") from None
    assert (result.returncode, result.stdout) == (2, ""), result.stderr
    return result.stderr.splitlines()


def settings_file(tmp_path: Path, text: str = "", **extra: Any) -> Path:
    """A settings file with no workspaces on a free port, ``extra`` as YAML, then ``text`` as it is."""
    data = {"listen": {"port": free_loopback_port()}, "local": {"state_dir": str(tmp_path / "state"),
                                                               "workspaces": {}}, **extra}
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(data) + text)
    return path


# --- a key given twice ------------------------------------------------------------------------------------------

_OIDC_THEN_TTL = """\
hub_url: https://hub.example.com
preview_domain: preview.example.com
auth:
  mode: oidc
  oidc: {issuer: https://sso.example.com, client_id: hub, client_secret: s3cret}
# ... further down, months later: sign-ins should last an hour
auth:
  session_ttl: 3600
"""


def test_a_section_given_twice_is_refused_not_silently_replaced(tmp_path: Path) -> None:
    """YAML keeps the last of two equal keys without a word: a second ``auth:`` added for its ``session_ttl``
    dropped ``mode: oidc``, and the gateway (on 127.0.0.1 behind a proxy) started with development sign-in,
    where anyone signs in as anyone."""
    config = settings_file(tmp_path, _OIDC_THEN_TTL)
    line = config.read_text().splitlines().index("auth:", 10) + 1
    assert serve_refuses(config) == [f"config error: {config}:{line}: not valid YAML (auth is given twice, first "
                                     f"on line {line - 4}; the second would silently replace the first)"]


@pytest.mark.parametrize(
    ("text", "line", "key", "first"),
    [
        # a workspace's name given again for someone else: the second owner would have the first one's home
        ("local:\n  state_dir: state\n  workspaces:\n    ws1: {owner: alice, command: [x]}\n"
         "    ws1: {owner: mallory, command: [x]}\n", 5, "ws1", 4),
        ("listen: {port: 9000, port: 9001}\n", 1, "port", 1),
        ("local:\n  state_dir: state\n  workspaces:\n    ws1:\n      owner: alice\n      command: [x]\n"
         "      ports: {3000: private, 3000: public}\n", 7, "3000", 7),
        # after a merge key too: it brings keys in to be overridden, and the ones given after it are still read
        ("local:\n  state_dir: state\n  workspaces:\n    ws1: &ws {owner: alice, command: [x]}\n"
         "    ws2: {<<: *ws, owner: bob, owner: mallory}\n", 5, "owner", 5),
    ],
)
def test_a_key_given_twice_anywhere_is_refused(tmp_path: Path, text: str, line: int, key: str, first: int) -> None:
    config = tmp_path / "gateway.yaml"
    config.write_text(text)
    with pytest.raises(ConfigError) as raised:
        load_config(config, environ={})
    assert str(raised.value) == (f"config error: {config}:{line}: not valid YAML ({key} is given twice, first on "
                                 f"line {first}; the second would silently replace the first)")


@pytest.mark.parametrize(
    ("text", "line", "problem"),
    [
        ("kubernetes:\n  affinity: {[zone]: a}\n", 2, "found unhashable key"),
        ("listen: {port: 9000}\n? [a, b]\n: 1\n", 2, "found unhashable key"),
        ("listen: !!set [a, b]\n", 1, "expected a mapping node, but found sequence"),
    ],
)
def test_a_key_or_a_set_yaml_cannot_make_is_one_line(tmp_path: Path, text: str, line: int, problem: str) -> None:
    """The check for keys given twice reads every mapping before YAML builds it: a list as a key, or a set written
    as a list, is left to YAML to refuse with its own words, not a traceback from the check."""
    config = tmp_path / "gateway.yaml"
    config.write_text(text)
    with pytest.raises(ConfigError) as raised:
        load_config(config, environ={})
    assert str(raised.value) == f"config error: {config}:{line}: not valid YAML ({problem})"


def test_anchors_and_merge_keys_still_override_what_they_merge(tmp_path: Path) -> None:
    """``<<: *base`` then a key of its own is YAML's way to override: not a key given twice."""
    config = tmp_path / "gateway.yaml"
    config.write_text("local:\n  state_dir: state\n  workspaces:\n"
                      "    ws1: &ws {owner: alice, command: [sleep, '1'], ports: {3000: private}}\n"
                      "    ws2: {<<: *ws, owner: bob}\n")
    loaded = load_config(config, environ={})
    assert loaded.local.workspaces["ws2"].owner == "bob"
    assert loaded.local.workspaces["ws2"].ports == {3000: "private"}


_DENIED_THEN_DEFAULT = """\
ports:
  denied: [22, 5432]
  max_visibility: org
admins: [root]
ports:
  default_visibility: private
"""


def test_a_policy_section_given_twice_is_refused(tmp_path: Path) -> None:
    """A second ``ports:`` dropped ``denied`` and ``max_visibility``: the database port became shareable and
    ``policy check`` said ok."""
    policy = tmp_path / "policy.yaml"
    policy.write_text(_DENIED_THEN_DEFAULT)
    result = run("policy", "check", str(policy))
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr.splitlines() == [f"{policy}:5: not valid YAML: ports is given twice, first on line 1; the "
                                          "second would silently replace the first"]


# --- a policy file that is not text -----------------------------------------------------------------------------

_LATIN_1 = "# Politique d'accès\nports: {max_visibility: public}\n".encode("latin-1")


def test_a_policy_file_that_is_not_utf8_stops_serve_in_one_line(tmp_path: Path) -> None:
    """Saved by an editor in Latin-1 (an accent in a comment): ``policy check`` said so in one line, ``serve``
    printed a traceback."""
    (tmp_path / "policy.yaml").write_bytes(_LATIN_1)
    config = settings_file(tmp_path, policy_file="policy.yaml")
    assert serve_refuses(config) == [f"{tmp_path}/policy.yaml: not UTF-8 text (invalid continuation byte at byte 17)"]


async def _status_when(client: Any, host: str, wanted: int, within: float = 15.0) -> int:
    """The status an anonymous script gets from ``host``, asked until it is ``wanted`` (policy reloads are
    picked up every 2 s) or ``within`` seconds have passed."""
    deadline = time.monotonic() + within
    while True:
        async with client.get("/", headers={"Host": host, "Accept": "application/json"}) as response:
            if response.status == wanted or time.monotonic() > deadline:
                return int(response.status)
        await asyncio.sleep(0.2)


async def test_a_policy_edit_that_is_not_utf8_keeps_the_policy_and_later_edits_still_apply(
        tmp_path: Path, make_gateway: MakeGateway, caplog: pytest.LogCaptureFixture) -> None:
    """The bad edit ended the task that watches files: no later policy edit (the operator's fix, a port denied)
    and no key rotation was picked up again until a restart, and stopping the gateway printed a traceback."""
    client = await make_gateway(workspaces={"ws1": workspace(next_address(), ports={4000: "private"})},
                                policy={"ports": {"max_visibility": "public"}}, in_memory=True)
    host = "4000-ws1.localhost:8080"
    assert await _status_when(client, host, 401) == 401
    policy = tmp_path / "policy.yaml"
    policy.write_bytes(_LATIN_1)
    await asyncio.sleep(2.5)
    assert f"{policy}: not UTF-8 text" in caplog.text
    policy.write_text("# fixed\nports: {denied: [4000]}\n")
    assert await _status_when(client, host, 403) == 403


# --- numbers that pass a lower bound but cannot be used -----------------------------------------------------------

def test_an_endless_sign_in_lifetime_is_refused_at_start(tmp_path: Path) -> None:
    """``session_ttl: .inf`` (YAML's infinity) passed ``greater than 0``: the gateway started, and every sign-in
    was a 500 with a traceback in the log (a sign-in's end is a whole number of seconds)."""
    config = settings_file(tmp_path, auth={"session_ttl": float("inf")})
    assert serve_refuses(config) == ["config error: auth.session_ttl: Input should be a finite number"]


@pytest.mark.parametrize(
    ("text", "env", "key"),
    [
        ("timeouts: {connect: .inf}\n", {}, "timeouts.connect"),
        ("timeouts: {first_byte: .inf}\n", {}, "timeouts.first_byte"),  # null is "no limit"
        ("limits: {keepalive: .inf}\n", {}, "limits.keepalive"),
        ("idle: {to_warm: .inf}\n", {}, "idle.to_warm"),
        ("local: {stop_timeout: .inf}\n", {}, "local.stop_timeout"),
        ("kubernetes: {start_timeout: .inf}\n", {}, "kubernetes.start_timeout"),
        ("", {"CODEHUB_AUTH__SESSION_TTL": ".inf"}, "auth.session_ttl"),
        ("", {"CODEHUB_TIMEOUTS__SHUTDOWN": "-.inf"}, "timeouts.shutdown"),
    ],
)
def test_an_infinite_number_of_seconds_is_refused_wherever_it_is_given(tmp_path: Path, text: str,
                                                                        env: dict[str, str], key: str) -> None:
    config = tmp_path / "gateway.yaml"
    config.write_text(text)
    with pytest.raises(ConfigError) as raised:
        load_config(config, environ=env)
    assert str(raised.value).startswith(f"config error: {key}: Input should be "), raised.value


def test_a_head_limit_too_big_to_use_is_refused_at_start(tmp_path: Path) -> None:
    """``header_size`` with a few zeros too many passed: the gateway printed its URLs, then reset every connection
    (the HTTP parser takes a C ``size_t``) with a traceback per connection in the log."""
    config = settings_file(tmp_path, limits={"header_size": 10**23})
    assert serve_refuses(config) == ["config error: limits.header_size: Input should be less than or equal to "
                                     "1048576"]


@pytest.mark.parametrize(("key", "most"), [("request_line", 1 << 20), ("header_size", 1 << 20),
                                           ("header_count", 10_000)])
def test_head_limits_have_a_ceiling(tmp_path: Path, key: str, most: int) -> None:
    config = tmp_path / "gateway.yaml"
    config.write_text(f"limits: {{{key}: {most}}}\n")
    assert getattr(load_config(config, environ={}).limits, key) == most
    config.write_text(f"limits: {{{key}: {most + 1}}}\n")
    with pytest.raises(ConfigError, match=f"^config error: limits.{key}: Input should be less than or equal to "
                                          f"{most}$"):
        load_config(config, environ={})


# --- settings from the environment ------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("environ", "line"),
    [
        ({"CODEHUB_LISTEN__PROT": "9000"}, "config error: listen.prot: unknown setting, from the environment variable "
                                          "CODEHUB_LISTEN__PROT"),
        # a Service named codehub-gateway in the gateway's namespace, on a pod of one's own making
        ({"CODEHUB_GATEWAY_SERVICE_HOST": "10.96.0.10", "CODEHUB_GATEWAY_PORT": "tcp://10.96.0.10:80"},
         "config error: gateway_service_host: unknown setting, from the environment variable "
         "CODEHUB_GATEWAY_SERVICE_HOST, which Kubernetes sets for a Service named codehub-gateway: set "
         "enableServiceLinks: false in the gateway's pod"),
        ({"CODEHUB_METRICS_PORT": "9090"}, "config error: metrics_port: unknown setting, from the environment "
                                           "variable CODEHUB_METRICS_PORT"),
        ({"CODEHUB_PORT": "tcp://10.96.0.10:80"},
         "config error: port: unknown setting, from the environment variable CODEHUB_PORT, which Kubernetes sets for "
         "a Service named codehub: set enableServiceLinks: false in the gateway's pod"),
        ({"CODEHUB_PORT_8080_TCP_ADDR": "10.96.0.10"},
         "config error: port_8080_tcp_addr: unknown setting, from the environment variable CODEHUB_PORT_8080_TCP_ADDR, "
         "which Kubernetes sets for a Service named codehub: set enableServiceLinks: false in the gateway's pod"),
    ],
)
def test_an_unknown_setting_from_the_environment_names_its_variable(tmp_path: Path, environ: dict[str, str],
                                                                    line: str) -> None:
    """``config error: gateway_service_host: unknown setting`` sent people looking through a file without it."""
    config = tmp_path / "gateway.yaml"
    config.write_text("listen: {port: 9000}\n")
    with pytest.raises(ConfigError) as raised:
        load_config(config, environ=environ)
    assert str(raised.value) == line


# --- the CLI -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["", "x" * 65, "ci\x1b[2J", "ci\u202egnp.exe"])
def test_token_issue_refuses_a_name_the_hub_would_refuse(tmp_path: Path, name: str) -> None:
    """The hub's token list shows each name to its person; the API refuses one it could not show as it is (an
    escape sequence, a right-to-left override, a page of text), and ``token issue`` wrote it."""
    config = settings_file(tmp_path)
    result = run("token", "issue", "--config", str(config), "--user", "alice", "--name", name)
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr.splitlines() == ["codehub-gateway: token issue: --name must be 1 to 64 printable characters"]
    assert not (tmp_path / "state" / "tokens.json").exists()


@pytest.mark.parametrize("name", ["x", "x" * 64])
def test_token_issue_takes_a_name_as_long_or_short_as_the_hub_takes(tmp_path: Path, name: str) -> None:
    config = settings_file(tmp_path)
    result = run("token", "issue", "--config", str(config), "--user", "alice", "--name", name)
    assert result.returncode == 0, result.stderr
    record = FileTokenStore(tmp_path / "state" / "tokens.json").find_api_token(result.stdout.strip())
    assert record is not None
    assert record.name == name


# --- nesting past Python's recursion limit ------------------------------------------------------------------------

_DEEP = "[" * 100_000 + "]" * 100_000
_TOO_DEEP = "(nested more than 200 deep|exceeded maximum nesting depth)"
"""Ours, or that of a libyaml that keeps a limit of its own (Debian's: 1,000), whose scanner reads that far ahead."""


@pytest.mark.parametrize("command", ["policy", "serve"])
def test_a_file_nested_past_the_recursion_limit_is_one_line(tmp_path: Path, command: str) -> None:
    """YAML nests without end and its loaders recurse: such a policy was a RecursionError traceback, and such
    settings crashed ``serve`` with a segmentation fault (libyaml's composer recurses in C)."""
    if command == "policy":
        policy = tmp_path / "policy.yaml"
        policy.write_text(f"ports:\n  denied: {_DEEP}\n")
        result = run("policy", "check", str(policy))
        assert (result.returncode, len(result.stderr.splitlines())) == (1, 1), result.stderr
        assert re.fullmatch(rf"{re.escape(str(policy))}:2: not valid YAML: {_TOO_DEEP}\n", result.stderr)
    else:
        config = settings_file(tmp_path, f"workspace_defaults: {_DEEP}\n")
        line = len(config.read_text().splitlines())
        [refused] = serve_refuses(config)
        assert re.fullmatch(rf"config error: {re.escape(str(config))}:{line}: not valid YAML \({_TOO_DEEP}\)", refused)


def test_settings_may_nest_200_deep_however_many_collections_they_hold(tmp_path: Path) -> None:
    """The limit is on depth, counted from the file's top mapping: a pod's affinity may hold any number of lists
    side by side and nest 200 deep; one level more is refused, naming its line."""
    def nested(depth: int) -> str:
        return "[" * depth + "]" * depth

    siblings = ", ".join(["[]"] * 300)
    config = tmp_path / "gateway.yaml"
    config.write_text(f"kubernetes:\n  affinity:\n    wide: [{siblings}]\n    deep: {nested(197)}\n")
    assert load_config(config, environ={}).kubernetes.affinity is not None
    config.write_text(f"kubernetes:\n  affinity:\n    wide: [{siblings}]\n    deep: {nested(198)}\n")
    with pytest.raises(ConfigError) as raised:
        load_config(config, environ={})
    assert str(raised.value) == f"config error: {config}:4: not valid YAML (nested more than 200 deep)"


def test_a_setting_from_the_environment_nested_past_the_recursion_limit_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^config error: local\.workspaces: Input should be a valid dictionary"):
        load_config(settings_file(tmp_path), environ={"CODEHUB_LOCAL__WORKSPACES": _DEEP})


# --- the listen address -----------------------------------------------------------------------------------------

@pytest.mark.parametrize(("text", "key"), [("listen: {host: 'bad host'}", "listen.host"),
                                           ("listen: {host: 'localhost/x'}", "listen.host"),
                                           ("metrics: {host: 'a b', port: 9090}", "metrics.host"),
                                           ("listen: {port: on}", "listen.port"),
                                           ("listen: {port: 'http'}", "listen.port"),
                                           ("listen: {port: 0}", "listen.port")])
def test_a_bad_listen_address_is_named_not_the_addresses_derived_from_it(tmp_path: Path, text: str,
                                                                          key: str) -> None:
    """Unset hub and preview addresses are derived from the listen address: a bad one was reported as a bad
    ``preview_domain`` or ``hub_url``, settings the operator never wrote."""
    config = tmp_path / "gateway.yaml"
    config.write_text(text + "\n")
    with pytest.raises(ConfigError) as raised:
        load_config(config, environ={})
    assert str(raised.value).startswith(f"config error: {key}: "), raised.value


def test_serve_names_a_bad_host_given_on_its_command_line(tmp_path: Path) -> None:
    result = run("serve", "--host", "bad host", cwd=tmp_path, timeout=15)
    assert (result.returncode, result.stdout) == (2, ""), result.stderr
    assert result.stderr.startswith("config error: listen.host: "), result.stderr


@pytest.mark.parametrize(("text", "key"), [("idle: {to_warm: yes}", "idle.to_warm"),
                                           ("limits: {body: true}", "limits.body"),
                                           ("local: {workspaces: {ws1: {owner: a, command: [x], ports: {on: public}}}}",
                                            "local.workspaces.ws1.ports.1"),
                                           ("kubernetes: {api_qps: on}", "kubernetes.api_qps")])
def test_true_or_false_is_no_number(tmp_path: Path, text: str, key: str) -> None:
    """YAML reads ``yes`` and ``on`` as true, which pydantic took for 1: workspaces asleep a second after their
    last request, a 1-byte body limit, port 1 public."""
    config = tmp_path / "gateway.yaml"
    config.write_text(text + "\n")
    with pytest.raises(ConfigError) as raised:
        load_config(config, environ={})
    assert str(raised.value).startswith(f"config error: {key}: "), raised.value
    assert "not true or false" in str(raised.value)
