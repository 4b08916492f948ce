"""Settings: good and bad YAML and environment variables, each bad one a single line naming the key; and the
``serve`` command refusing a bad file with exit status 2 and that one line."""

from __future__ import annotations

import asyncio
import ipaddress
import os
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from gateway.config import Config, ConfigError, load_config

ROOT = Path(__file__).resolve().parents[2]
WS = "local:\n  workspaces:\n    ws1:\n      owner: alice\n      command: [sleep, '1']\n"


def load(tmp_path: Path, text: str | None, env: dict[str, str] | None = None) -> Any:
    path = None
    if text is not None:
        path = tmp_path / "gateway.yaml"
        path.write_text(text)
    return load_config(path, env or {})


@pytest.mark.parametrize(
    ("text", "env", "check"),
    [
        ("", {}, lambda c: c.listen.port == 8080 and c.local.workspaces == {}),
        (None, {}, lambda c: "demo" in c.local.workspaces),
        ("listen: {host: 0.0.0.0, port: 9000}\nauth: {allow_dev_on_network: true}\n", {},
         lambda c: (c.listen.host, c.listen.port) == ("0.0.0.0", 9000)),
        ("listen: {port: 9000}\n", {"CODEHUB_LISTEN__PORT": "9100"}, lambda c: c.listen.port == 9100),
        ("", {"CODEHUB_TIMEOUTS__READ": "2.5"}, lambda c: c.timeouts.read == 2.5),
        ("timeouts: {first_byte: null, queue: 5}\n", {},
         lambda c: (c.timeouts.first_byte, c.timeouts.queue) == (None, 5.0)),
        ("", {}, lambda c: (c.timeouts.first_byte, c.timeouts.queue) == (120.0, 60.0)),
        ("", {"CODEHUB_TRUSTED_PROXIES": "[127.0.0.0/8, '::1/128']"},
         lambda c: c.trusted_proxies == ("127.0.0.0/8", "::1/128")),
        ("", {"CODEHUB_POLICY_FILE": "/etc/codehub/policy.yaml"},
         lambda c: str(c.policy_file) == "/etc/codehub/policy.yaml"),
        ("hub_url: https://hub.example.com/\npreview_domain: Preview.Example.com.\n", {},
         lambda c: (c.hub_url, c.preview_domain, c.scheme) == ("https://hub.example.com", "preview.example.com",
                                                               "https")),
        (WS + "      ports: {3000: public, 5173: org}\n      address: 127.0.0.9\n", {},
         lambda c: c.local.workspaces["ws1"].ports == {3000: "public", 5173: "org"}),
        (None, {"HOME": "/x", "CODEHUB_CONFIG": ""}, lambda c: "demo" in c.local.workspaces),
        ("", {}, lambda c: (c.limits.header_size, c.limits.body, c.limits.connections, c.limits.keepalive)
         == (8190, 1 << 20, None, 75.0)),
        ("limits: {connections: 500, request_line: 4096, header_count: 50}\n", {"CODEHUB_LIMITS__HEAD_TIMEOUT": "3"},
         lambda c: (c.limits.connections, c.limits.request_line, c.limits.header_count, c.limits.head_timeout)
         == (500, 4096, 50, 3.0)),
        # a proxy's network may be written by one of its addresses (10.1.2.3/8 is 10.0.0.0/8); the highest port
        ("trusted_proxies: [10.1.2.3/8]\npreview_domain: 'preview.example.com:65535'\n", {},
         lambda c: (c.trusted_proxies, c.preview_domain) == (("10.1.2.3/8",), "preview.example.com:65535")),
        # the local workspaces' addresses are the local runtime's concern only
        ("runtime: kubernetes\n" + WS + "metrics: {host: 127.0.0.2, port: 9090}\n", {},
         lambda c: c.local.addresses() == {"ws1": "127.0.0.2"}),
        # the CLI's own variables are not settings; a value that is not YAML is the text as it is
        ("", {"CODEHUB_URL": "http://hub", "CODEHUB_TOKEN": "t", "CODEHUB_WORKSPACE": "ws1"},
         lambda c: c.hub_url == "http://localhost:8080"),
        # a setting is read wherever it comes among the process's other variables and the CLI's own
        ("", {"PATH": "/usr/bin", "CODEHUB_TOKEN": "t", "CODEHUB_LISTEN__PORT": "9100", "TERM": "xterm"},
         lambda c: c.listen.port == 9100),
        ("", {"CODEHUB_KUBERNETES__IMAGE": "[registry/ide:1", "CODEHUB_KUBERNETES__PRIORITY_CLASS": "a: b: c"},
         lambda c: (c.kubernetes.image, c.kubernetes.priority_class) == ("[registry/ide:1", "a: b: c")),
        # the command as written (its placeholders filled in by the runtime), and an address left null handed out
        (WS + "      address: null\n", {},
         lambda c: (c.local.workspaces["ws1"].command, c.local.addresses()) == (("sleep", "1"), {"ws1": "127.0.0.2"})),
        ("kubernetes: {namespace: team-a, storage_size: 20Gi, tmp_size: 512Mi, api_url: 'https://10.0.0.1:6443/'}\n"
         "auth: {mode: oidc, oidc: {issuer: 'https://sso.example.com/realms/main/', client_id: hub}}\n", {},
         lambda c: (c.kubernetes.namespace, c.kubernetes.storage_size, c.kubernetes.tmp_size, c.kubernetes.api_url,
                    c.auth.oidc.issuer) == ("team-a", "20Gi", "512Mi", "https://10.0.0.1:6443",
                                            "https://sso.example.com/realms/main")),
        ("kubernetes: {resources: {requests: {cpu: 500m, memory: 1Gi}}, image_digest: 'sha256:" + "0" * 64 + "'}\n", {},
         lambda c: (c.kubernetes.resources.requests, c.kubernetes.resources.limits, c.kubernetes.image_digest)
         == ({"cpu": "500m", "memory": "1Gi"}, {"cpu": "2", "memory": "4Gi"}, "sha256:" + "0" * 64)),
        # limits given alone: the requests keep their default (the row above has it the other way round)
        ("kubernetes: {resources: {limits: {cpu: '4'}}}\n", {},
         lambda c: (c.kubernetes.resources.requests, c.kubernetes.resources.limits)
         == ({"cpu": "250m", "memory": "512Mi"}, {"cpu": "4"})),
        # null is "not set", as if left out
        ("kubernetes: {api_url: null, image_digest: null}\n", {},
         lambda c: (c.kubernetes.api_url, c.kubernetes.image_digest) == (None, None)),
        # a kubeconfig is read only where it will be: not by the local runtime, nor beside in_cluster or api_url
        ("kubernetes: {kubeconfig: /nonexistent/kubeconfig}\n", {}, lambda c: c.runtime == "local"),
        ("runtime: kubernetes\nkubernetes: {kubeconfig: gateway.yaml}\n", {},  # readable (the file itself)
         lambda c: (c.runtime, c.kubernetes.kubeconfig.name) == ("kubernetes", "gateway.yaml")),
        ("runtime: kubernetes\nkubernetes: {kubeconfig: /nonexistent/kubeconfig, in_cluster: true}\n", {},
         lambda c: c.kubernetes.in_cluster),
        ("runtime: kubernetes\nkubernetes: {kubeconfig: /nonexistent/kubeconfig, api_url: 'http://127.0.0.1:8001'}\n",
         {}, lambda c: c.kubernetes.api_url == "http://127.0.0.1:8001"),
        # the file given (--config) wins over $CODEHUB_CONFIG, which names one only when none is given
        ("listen: {port: 9000}\n", {"CODEHUB_CONFIG": "/nonexistent/gateway.yaml"}, lambda c: c.listen.port == 9000),
        # the embedded demo: README's "sign in as dev" owns it, its port 8000 is public
        (None, {}, lambda c: (c.local.workspaces["demo"].owner, c.local.workspaces["demo"].ports)
         == ("dev", {8000: "public"})),
        # an IdP on plain http (a test IdP on the machine)
        ("auth: {mode: oidc, oidc: {issuer: 'http://127.0.0.1:8081/realms/dev', client_id: hub}}\n", {},
         lambda c: c.auth.oidc.issuer == "http://127.0.0.1:8081/realms/dev"),
        # only dev sign-in is kept to loopback: with the IdP's the gateway listens on every address
        ("listen: {host: 0.0.0.0}\nauth: {mode: oidc, oidc: {issuer: 'https://sso.example.com', client_id: hub}}\n",
         {}, lambda c: (c.listen.host, c.auth.mode) == ("0.0.0.0", "oidc")),
        # the lowest port; dev sign-in named as well as left out
        ("listen: {port: 1}\nauth: {mode: dev}\n", {}, lambda c: (c.listen.port, c.auth.mode) == (1, "dev")),
        # the lowest bounds of what the gateway asks of the API server are allowed
        ("kubernetes: {keep_snapshots: 1, watch_timeout: 1, api_qps: 0.5, api_burst: 1, api_concurrency: 1, "
         "list_page_size: 1}\n", {},
         lambda c: (c.kubernetes.keep_snapshots, c.kubernetes.watch_timeout, c.kubernetes.api_qps,
                    c.kubernetes.api_burst, c.kubernetes.api_concurrency, c.kubernetes.list_page_size)
         == (1, 1, 0.5, 1, 1, 1)),
    ],
)
def test_good_settings(tmp_path: Path, text: str | None, env: dict[str, str], check: Any) -> None:
    assert check(load(tmp_path, text, env))


@pytest.mark.parametrize(
    ("text", "env", "message"),
    [
        ("listen: {port: 70000}\n", {}, "listen.port: Input should be less than or equal to 65535"),
        ("lisen: {port: 80}\n", {}, "lisen: unknown setting"),
        ("listen: {port: 80, hots: x}\n", {}, "listen.hots: unknown setting"),
        ("listen: [1]\n", {}, "listen: Input should be a valid dictionary"),
        ("hub_url: ftp://hub\n", {}, "hub_url: must be an http(s) URL"),
        ("hub_url: https://hub.example.com/path\n", {}, "hub_url: must be an http(s) URL"),
        ("hub_url: 'http://'\n", {}, "hub_url: must be an http(s) URL with a host"),
        ("preview_domain: 'bad domain'\n", {}, "preview_domain: must be a host name"),
        ("preview_domain: 'localhost:99999'\n", {}, "preview_domain: must be a host name"),
        ("preview_domain: 'localhost:0'\n", {}, "preview_domain: must be a host name"),
        ("preview_domain: .example.com\n", {}, "preview_domain: must be a host name"),
        ("preview_domain: -preview.example.com\n", {}, "preview_domain: must be a host name"),
        ("preview_domain: 'localhost:65536'\n", {}, "preview_domain: must be a host name"),
        ("trusted_proxies: [nope]\n", {}, "trusted_proxies: 'nope' does not appear to be an IPv4 or IPv6 network"),
        ("listen: {host: 0.0.0.0}\n", {}, "auth.mode is dev (anyone can sign in as anyone) but listen.host 0.0.0.0"),
        ("listen: {host: dev.example.internal}\n", {},
         "auth.mode is dev (anyone can sign in as anyone) but listen.host dev.example.internal is not loopback"),
        ("auth: {mode: oidc}\n", {}, "auth.mode is oidc but auth.oidc (issuer, client_id, client_secret) is not set"),
        ("timeouts: {read: -1}\n", {}, "timeouts.read: Input should be greater than 0"),
        ("timeouts: {connect: soon}\n", {}, "timeouts.connect: Input should be a valid number"),
        ("timeouts: {first_byte: 0}\n", {}, "timeouts.first_byte: Input should be greater than 0"),
        ("timeouts: {queue: null}\n", {}, "timeouts.queue: Input should be a valid number"),
        ("runtime: docker\n", {}, "runtime: Input should be 'local' or 'kubernetes'"),
        ("max_ws_message: 0\n", {}, "max_ws_message: Input should be greater than 0"),
        ("limits: {header_size: 10}\n", {}, "limits.header_size: Input should be greater than or equal to 256"),
        ("limits: {connections: 0}\n", {}, "limits.connections: Input should be greater than or equal to 1"),
        ("limits: {request_line: 100}\n", {}, "limits.request_line: Input should be greater than or equal to 256"),
        ("limits: {header_count: 7}\n", {}, "limits.header_count: Input should be greater than or equal to 8"),
        ("limits: {body: 1000}\n", {}, "limits.body: Input should be greater than or equal to 1024"),
        ("", {"CODEHUB_LIMITS__KEEPALIVE": "0"}, "limits.keepalive: Input should be greater than 0"),
        ("limits: {conections: 5}\n", {}, "limits.conections: unknown setting"),
        ("local: {workspaces: {Bad_Id: {owner: a, command: [x]}}}\n", {},
         "local.workspaces: workspace id 'Bad_Id' must match [a-z0-9]("),
        (WS.replace("[sleep, '1']", "[]"), {}, "local.workspaces.ws1.command: must name a program to run"),
        (WS.replace("'1'", "'{port}'"), {}, "local.workspaces.ws1.command: '{port}': unknown placeholder"),
        # attribute and index access on a placeholder: only the four names themselves
        (WS.replace("'1'", "'{port}-{user}'"), {}, "'{port}-{user}': unknown placeholder 'port'; use {host}"),
        (WS.replace("'1'", "'{host.x}'"), {}, "local.workspaces.ws1.command: '{host.x}': unknown placeholder"),
        (WS.replace("'1'", "'{home[0]}'"), {}, "local.workspaces.ws1.command: '{home[0]}': unknown placeholder"),
        (WS.replace("'1'", "'{workspace.__class__}'"), {}, "'{workspace.__class__}': unknown placeholder"),
        (WS.replace("'1'", "'{}'"), {}, "local.workspaces.ws1.command: '{}': unknown placeholder"),
        (WS.replace("'1'", "'{ide_port'"), {}, "local.workspaces.ws1.command: '{ide_port': unknown placeholder"),
        (WS.replace("'1'", "'{workspace:d}'"), {}, "'{workspace:d}': unknown placeholder Unknown format code"),
        (WS + "      address: 10.0.0.1\n", {}, "local.workspaces.ws1.address: must be an IPv4 loopback address"),
        (WS + "      address: not-an-ip\n", {}, "local.workspaces.ws1.address: 'not-an-ip' does not appear"),
        (WS + "      address: '::1'\n", {}, "local.workspaces.ws1.address: must be an IPv4 loopback address"),
        (WS + "      address: 127.0.0.1\n", {}, "local.workspaces.ws1.address: 127.0.0.1 is the gateway's own"),
        (WS + "      address: 127.0.0.7\n    ws2:\n      owner: bob\n      command: [x]\n      address: 127.0.0.7\n",
         {}, "local: workspaces ws1 and ws2 both have address 127.0.0.7; each needs one of its own"),
        # ws1 has none: it is handed 127.0.0.2 by its place, the address ws2 names
        (WS + "    ws2:\n      owner: bob\n      command: [x]\n      address: 127.0.0.2\n", {},
         "local: workspaces ws1 and ws2 both have address 127.0.0.2 (ws1's handed out by its place in the list)"),
        (WS + "      address: 127.0.0.9\nlisten: {host: 127.0.0.9}\nhub_url: http://h:1\npreview_domain: h:1\n", {},
         "local.workspaces.ws1.address: 127.0.0.9 is listen.host: its ports would be the gateway's own; pick another "
         "address of 127.0.0.0/8"),
        (WS + "metrics: {host: 127.0.0.2, port: 9090}\n", {},
         "local.workspaces.ws1.address: 127.0.0.2 is metrics.host"),
        (WS + "      ports: {70000: public}\n", {}, "local.workspaces.ws1.ports.70000: Input should be less than"),
        (WS + "      ports: {3000: everyone}\n", {}, "local.workspaces.ws1.ports.3000: Input should be 'private'"),
        (WS.replace("      owner: alice\n", ""), {}, "local.workspaces.ws1.owner: Field required"),
        ("a: b: c\n", {}, "gateway.yaml:1: not valid YAML (mapping values are not allowed"),
        ("- 1\n", {}, "gateway.yaml: the top level must be a mapping of settings"),
        ("", {"CODEHUB_LISTEN__PORT": "eighty"}, "listen.port: Input should be a valid integer"),
        ("", {"CODEHUB_LISTEN": "5"}, "listen: Input should be a valid dictionary"),
        ("listen: {port: 9000}\n", {"CODEHUB_LISTEN": "5"}, "listen: Input should be a valid dictionary"),
        ("policy_file: 5\n", {}, "policy_file: Input is not a valid path"),
        ("", {"CODEHUB_BOGUS": "1"}, "bogus: unknown setting"),
        ("", {"CODEHUB_TIMEOUTS__READ": "0"}, "timeouts.read: Input should be greater than 0"),
        ("", {"CODEHUB_HUB_URL": ""}, "hub_url: must be an http(s) URL"),
        ("", {"CODEHUB_TRUSTED_PROXIES": "[300.0.0.0/8]"}, "trusted_proxies: '300.0.0.0/8' does not appear"),
        (None, {"CODEHUB_CONFIG": "/nonexistent/gateway.yaml"},
         "cannot read /nonexistent/gateway.yaml: No such file or directory"),
        ("", {"CODEHUB_LISTEN": "5", "CODEHUB_LISTEN__PORT": "9000"}, "listen.port: listen is not a section"),
        ("metrics: {port: 8080}\n", {}, "metrics.port 8080 is listen.port too; /metrics needs a port of its own"),
        ("kubernetes: {namespace: Code_Hub}\n", {},
         "kubernetes.namespace: must be a Kubernetes namespace name (lower-case letters, digits and '-')"),
        ("kubernetes: {storage_size: 10GB}\n", {}, "kubernetes.storage_size: '10GB' is not a Kubernetes quantity"),
        ("", {"CODEHUB_KUBERNETES__TMP_SIZE": "big"}, "kubernetes.tmp_size: 'big' is not a Kubernetes quantity"),
        ("kubernetes: {image_digest: 'sha256:abc'}\n", {},
         "kubernetes.image_digest: 'sha256:abc' is not an image digest like sha256:<64 hex digits>"),
        ("kubernetes: {api_url: 'ftp://k8s'}\n", {}, "kubernetes.api_url: must be the API server's URL"),
        ("kubernetes: {api_url: 'https://'}\n", {}, "kubernetes.api_url: must be the API server's URL"),
        ("kubernetes: {resources: {requests: {cpu: lots}}}\n", {},
         "kubernetes.resources.requests: resources.cpu: 'lots' is not a Kubernetes quantity like 500m, 2 or 4Gi"),
        ("kubernetes: {resources: {limits: {memory: 4GB}}}\n", {},
         "kubernetes.resources.limits: resources.memory: '4GB' is not a Kubernetes quantity"),
        ("runtime: kubernetes\nkubernetes: {kubeconfig: /nonexistent/kubeconfig}\n", {},
         "kubernetes.kubeconfig: cannot read /nonexistent/kubeconfig: No such file or directory"),
        ("auth: {mode: oidc, oidc: {issuer: sso.example.com, client_id: hub}}\n", {},
         "auth.oidc.issuer: must be the IdP's issuer URL"),
        ("auth: {mode: oidc, oidc: {issuer: 'ftp://sso.example.com', client_id: hub}}\n", {},
         "auth.oidc.issuer: must be the IdP's issuer URL"),
        ("", {"CODEHUB_AUTH__MODE": "oidc", "CODEHUB_AUTH__OIDC__ISSUER": "https://",
              "CODEHUB_AUTH__OIDC__CLIENT_ID": "x"},
         "auth.oidc.issuer: must be the IdP's issuer URL"),
    ],
)
def test_bad_settings_are_one_line_naming_the_key(tmp_path: Path, text: str | None, env: dict[str, str],
                                                  message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, text, env)
    error = str(caught.value)
    assert "\n" not in error
    assert error.startswith("config error: ")
    assert message in error, error


async def test_serve_with_a_bad_config_exits_2_with_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("listen:\n  port: 70000\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env = {key: value for key, value in env.items() if not key.startswith("CODEHUB_")}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway", "serve", "--config", str(bad), cwd=tmp_path, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(60):
        stdout, stderr = await process.communicate()
    assert process.returncode == 2
    assert stdout == b""
    assert stderr.decode().splitlines() == [
        "config error: listen.port: Input should be less than or equal to 65535"]


@pytest.mark.parametrize(
    ("text", "overrides", "hub", "previews"),
    [
        (None, {"listen": {"port": 9000}}, "http://localhost:9000", "localhost:9000"),
        (None, {"listen": {"host": "localhost", "port": 9001}}, "http://localhost:9001", "localhost:9001"),
        (None, {}, "http://localhost:8080", "localhost:8080"),
        ("listen: {port: 9002}\n", {}, "http://localhost:9002", "localhost:9002"),
        ("listen: {host: dev.example.internal, port: 9003}\nauth: {allow_dev_on_network: true}\n", {},
         "http://dev.example.internal:9003", "dev.example.internal:9003"),
        ("hub_url: https://hub.example.com\npreview_domain: preview.example.com\nlisten: {port: 9004}\n", {},
         "https://hub.example.com", "preview.example.com"),
        ("hub_url: http://localhost:7000\n", {"listen": {"port": 9005}}, "http://localhost:7000", "localhost:9005"),
        # IPv6 loopback and the IPv6 wildcard are reached as localhost, as 127.0.0.1 and 0.0.0.0 are
        (None, {"listen": {"host": "::1", "port": 9006}}, "http://localhost:9006", "localhost:9006"),
        ("listen: {host: '::', port: 9007}\nauth: {allow_dev_on_network: true}\n", {}, "http://localhost:9007",
         "localhost:9007"),
    ],
)
def test_hub_and_previews_follow_the_listen_address_unless_set(
    tmp_path: Path, text: str | None, overrides: dict[str, Any], hub: str, previews: str
) -> None:
    path = None
    if text is not None:
        path = tmp_path / "gateway.yaml"
        path.write_text(text)
    config = load_config(path, {}, overrides=overrides)
    assert (config.hub_url, config.preview_domain) == (hub, previews)


def test_a_loopback_address_other_than_localhost_needs_a_preview_domain(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(None, {}, overrides={"listen": {"host": "127.0.0.5"}})
    assert str(caught.value) == ("config error: preview_domain: previews need a host name with subdomains and "
                                 "127.0.0.5 has none; set hub_url and preview_domain (or listen on 127.0.0.1)")


@pytest.mark.parametrize(
    ("text", "env", "setting", "where"),
    [
        ("local: {state_dir: state}\n", {}, "state_dir", "etc/state"),
        ("policy_file: policy.yaml\n", {}, "policy_file", "etc/policy.yaml"),
        ("auth: {store_file: tokens.json}\n", {}, "store_file", "etc/tokens.json"),
        ("auth: {keys_file: keys.json}\n", {}, "keys_file", "etc/keys.json"),
        # the token store and the signing keys default to the state folder
        ("local: {state_dir: state}\n", {}, "keys_file", "etc/state/signing-keys.json"),
        ("local: {state_dir: state}\n", {}, "store_file", "etc/state/tokens.json"),
        # absolute paths as they are, and the environment's are not the file's
        ("local: {state_dir: state}\n", {"CODEHUB_LOCAL__STATE_DIR": "/srv/codehub"}, "state_dir", "/srv/codehub"),
        ("auth: {keys_file: /srv/keys.json}\n", {}, "keys_file", "/srv/keys.json"),
    ],
)
def test_relative_paths_in_a_config_file_are_read_from_its_folder(
    tmp_path: Path, monkeypatch: Any, text: str, env: dict[str, str], setting: str, where: str
) -> None:
    """So ``token issue --config FILE`` run from anywhere writes to the state of the gateway started with FILE."""
    folder = tmp_path / "etc"
    folder.mkdir()
    path = folder / "gateway.yaml"
    path.write_text(text)
    monkeypatch.chdir(tmp_path)
    assert getattr(load_config(path, env), setting) == tmp_path / where


def test_a_home_relative_path_in_a_config_file_does_not_depend_on_the_working_folder(
    tmp_path: Path, monkeypatch: Any
) -> None:
    path = tmp_path / "gateway.yaml"
    path.write_text("local: {state_dir: ~/codehub}\n")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    assert load_config(path, {}).state_dir.is_absolute()


@pytest.mark.parametrize(("setting", "unset"), [("preview_domain: preview.example.com", "hub_url"),
                                                ("hub_url: 'http://hub.example.com:9000'", "preview_domain")])
def test_an_unset_hub_url_or_preview_domain_follows_the_listen_port_or_is_refused(
    tmp_path: Path, setting: str, unset: str
) -> None:
    try:
        config = load(tmp_path, f"listen: {{host: 127.0.0.5, port: 9000}}\n{setting}\n")
        outcome = getattr(config, unset)
    except ConfigError as error:
        outcome = str(error)
    assert outcome.endswith(":9000") or outcome.startswith(f"config error: {unset}: "), outcome


def test_settings_cannot_be_changed_once_loaded(tmp_path: Path) -> None:
    """A reload builds a new snapshot and swaps it in: nothing may edit the one requests are reading."""
    config = load(tmp_path, "")
    with pytest.raises(ValidationError, match="frozen"):
        config.timeouts.connect = 1.0
    with pytest.raises(ValidationError, match="frozen"):
        config.runtime = "kubernetes"


@pytest.mark.parametrize(("hub", "secure"), [("https://hub.example.com", True), ("http://localhost:8080", False)])
def test_cookies_are_secure_under_an_https_hub_only(hub: str, secure: bool) -> None:
    """README: the hub URL's scheme decides cookie security (``__Host-`` and ``Secure`` under https)."""
    config = load_config(None, {}, overrides={"hub_url": hub, "preview_domain": "preview.example.com"})
    assert config.secure is secure


@pytest.mark.parametrize(
    ("hub", "previews", "uri"),
    [
        ("http://localhost:8080", "localhost:8080", "http://{{port}}-ws1.localhost:8080/"),
        ("https://hub.example.com", "preview.example.com", "https://{{port}}-ws1.preview.example.com/"),
        ("https://hub.example.com", "preview.example.com:443", "https://{{port}}-ws1.preview.example.com/"),
        ("https://hub.example.com", "preview.example.com:8443", "https://{{port}}-ws1.preview.example.com:8443/"),
        ("http://localhost", "localhost:80", "http://{{port}}-ws1.localhost/"),
        ("http://hub.example.com", "preview.example.com:443", "http://{{port}}-ws1.preview.example.com:443/"),
    ],
)
def test_code_servers_proxy_uri_is_the_workspaces_share_url(hub: str, previews: str, uri: str) -> None:
    config = load_config(None, {}, overrides={"hub_url": hub, "preview_domain": previews})
    assert config.proxy_uri("ws1") == uri


def test_ten_thousand_local_workspaces_each_get_a_loopback_address_of_their_own(tmp_path: Path) -> None:
    """Addresses left out are handed out over 127.0.0.0/16, never one ending in .0, .1 or .255."""
    from gateway.lifecycle.local import LocalRuntime

    names = [f"w{index}" for index in range(10_000)]
    config = Config.model_validate({"local": {"state_dir": str(tmp_path / "state"), "workspaces": {
        name: {"owner": "alice", "command": ["sleep", "1"]} for name in names}}})
    runtime = LocalRuntime(config.local)
    addresses = [runtime._slots[name].address for name in names]
    assert len(set(addresses)) == len(names)
    assert addresses[:2] == ["127.0.0.2", "127.0.0.3"]
    assert addresses[252:255] == ["127.0.0.254", "127.0.1.2", "127.0.1.3"]
    assert all(ipaddress.ip_address(address).is_loopback for address in addresses)
    assert not any(address.endswith((".0", ".1", ".255")) for address in addresses)


def test_more_local_workspaces_than_loopback_addresses_are_refused() -> None:
    """One address each over 127.0.0.0/16 (.2 to .254 of each of its 256 /24s): the last one gets 127.0.255.254,
    and one workspace more, which would get no address at all, is refused."""
    most = 253 * 256
    workspaces = {f"w{index}": {"owner": "a", "command": ["x"]} for index in range(most + 1)}
    with pytest.raises(ValueError, match=f"at most {most} local workspaces"):
        Config.model_validate({"local": {"workspaces": workspaces}})
    del workspaces[f"w{most}"]
    local = Config.model_validate({"local": {"workspaces": workspaces}}).local
    assert len(local.workspaces) == most
    assert local.addresses()[f"w{most - 1}"] == "127.0.255.254"


def test_the_oidc_client_secret_is_read_from_its_file_beside_the_config(tmp_path: Path, monkeypatch: Any) -> None:
    """A relative ``client_secret_file`` is the config folder's (as a mounted Secret is); the secret is the file's
    text without its trailing newline, and a file that cannot be read is one config error line, not a traceback."""
    folder = tmp_path / "etc"
    folder.mkdir()
    (folder / "oidc-secret").write_text("s3cret\n")
    path = folder / "gateway.yaml"
    monkeypatch.chdir(tmp_path)

    def secret(setting: str) -> str:
        path.write_text("auth:\n  mode: oidc\n  oidc: {issuer: 'https://sso.example.com', client_id: hub" + setting
                        + "}\n")
        oidc = load_config(path, {}).auth.oidc
        assert oidc is not None
        return oidc.secret()

    assert secret(", client_secret: inline") == "inline"
    assert secret(", client_secret_file: oidc-secret") == "s3cret"
    assert secret("") == ""
    with pytest.raises(ConfigError) as caught:
        secret(", client_secret_file: missing")
    assert str(caught.value) == "config error: auth.oidc.client_secret_file: No such file or directory"


def test_an_oidc_client_secret_file_that_is_not_text_is_one_config_error_line(tmp_path: Path) -> None:
    (tmp_path / "oidc-secret").write_bytes(b"\xff\xfe")
    path = tmp_path / "gateway.yaml"
    path.write_text("auth:\n  mode: oidc\n  oidc: {issuer: 'https://sso.example.com', client_id: hub, "
                    "client_secret_file: oidc-secret}\n")
    oidc = load_config(path, {}).auth.oidc
    assert oidc is not None
    with pytest.raises(ConfigError) as caught:
        oidc.secret()
    assert str(caught.value).startswith("config error: auth.oidc.client_secret_file: ")


def test_a_config_file_with_a_control_character_is_a_config_error_naming_the_file(tmp_path: Path) -> None:
    """PyYAML's reader refuses it before the parser has a line to point at (the error has no mark): the file is
    named without one, not an AttributeError."""
    path = tmp_path / "gateway.yaml"
    path.write_text("listen: {host: \x07}\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path, {})
    assert str(caught.value).startswith(f"config error: {path}: not valid YAML (unacceptable character #x0007: "
                                        "control characters are not allowed"), str(caught.value)


def test_a_config_file_with_a_control_character_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "gateway.yaml"
    path.write_text("listen: {host: \x07}\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path, {})
    assert "\n" not in str(caught.value), str(caught.value)


def test_a_config_file_that_is_not_yaml_is_named_with_its_problem_not_the_yaml_context(tmp_path: Path) -> None:
    """PyYAML's message starts with where it was ("while parsing a flow mapping"); the one line says what is wrong
    (libyaml and the pure-Python parser word it a little differently)."""
    path = tmp_path / "gateway.yaml"
    path.write_text("listen: {port: 1\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path, {})
    error = str(caught.value)
    assert error.startswith(f"config error: {path}:2: not valid YAML ("), error
    assert "expected ',' or '}'" in error, error
    assert error.endswith(")"), error
    assert "while parsing" not in error, error


def test_a_config_file_that_is_not_utf8_is_one_config_error_line(tmp_path: Path) -> None:
    path = tmp_path / "gateway.yaml"
    path.write_bytes(b"listen: {host: \xff}\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path, {})
    assert str(caught.value) == f"config error: {path}: not UTF-8 text (invalid start byte at byte 15)"


DOCUMENTED_DEFAULTS: list[tuple[str, Any]] = [
    # README, "Configuration": the sample file's values are the defaults, and so are the comments' "default …"
    ("listen.host", "127.0.0.1"), ("listen.port", 8080), ("metrics.host", "127.0.0.1"), ("metrics.port", None),
    ("trusted_proxies", ()),
    ("timeouts.connect", 5.0), ("timeouts.first_byte", 120.0), ("timeouts.read", None), ("timeouts.queue", 60.0),
    ("timeouts.websocket_heartbeat", 30.0), ("timeouts.shutdown", 10.0),
    ("limits.request_line", 8190), ("limits.header_size", 8190), ("limits.header_count", 100),
    ("limits.body", 1048576), ("limits.connections", None), ("limits.keepalive", 75.0),
    ("limits.head_timeout", 20.0), ("limits.body_timeout", 60.0), ("limits.send_timeout", 60.0),
    ("idle.to_warm", 1800), ("idle.to_cold", 604800), ("idle.check_every", 30),
    ("max_ws_message", 67108864),
    ("auth.mode", "dev"), ("auth.allow_dev_on_network", False), ("auth.session_ttl", 43200),
    ("auth.keys_file", None), ("auth.store_file", None),
    ("auth.oidc.scopes", ("openid", "email", "profile", "groups")), ("auth.oidc.username_claim", "sub"),
    ("auth.oidc.groups_claim", "groups"), ("auth.oidc.sign_out_at_idp", True),
    ("auth.oidc.token_auth_method", "client_secret_basic"),  # not in README: OpenID Connect Core's own default
    ("runtime", "local"), ("local.state_dir", Path(".codehub")), ("local.stop_timeout", 10.0),
    ("local.workspaces.ws1.ide_port", 13337), ("local.workspaces.ws1.env", {}),
    # README, "Kubernetes", in words; the chart's README for usage_interval
    ("kubernetes.sync_timeout", 30.0), ("kubernetes.ready_grace", 30.0), ("kubernetes.share_retention", 86400.0),
    ("kubernetes.unschedulable_grace", 120.0), ("kubernetes.bind_timeout", 180.0),
    ("kubernetes.image_pull_grace", 90.0), ("kubernetes.start_timeout", 300.0), ("kubernetes.api_qps", 20.0),
    ("kubernetes.api_burst", 40), ("kubernetes.api_concurrency", 16), ("kubernetes.list_page_size", 500),
    ("kubernetes.usage_interval", 5.0),
]


@pytest.mark.parametrize(("setting", "default"), DOCUMENTED_DEFAULTS)
def test_a_setting_left_out_has_the_default_the_readme_documents(tmp_path: Path, setting: str, default: Any) -> None:
    """Operators read the defaults in the README, not here: one that changes has to change there too. The file
    names only what has no default (a workspace's owner and command, the IdP's address and client)."""
    value: Any = load(tmp_path, WS + "auth: {oidc: {issuer: 'https://sso.example.com', client_id: hub}}\n")
    for name in setting.split("."):
        value = value[name] if isinstance(value, dict) else getattr(value, name)
    assert value == default


@pytest.mark.parametrize(
    ("section", "key", "value", "loaded"),
    [
        # what README and the chart's README name for the Kubernetes runtime, and what tunes it
        ("kubernetes", "in_cluster", True, True),
        ("kubernetes", "image", "registry.example.com/ide:1", "registry.example.com/ide:1"),
        ("kubernetes", "ide_port", 8443, 8443),
        ("kubernetes", "storage_class", "fast-ssd", "fast-ssd"),
        ("kubernetes", "snapshot_class", "csi-snapclass", "csi-snapclass"),
        ("kubernetes", "read_only_root", False, False),
        ("kubernetes", "keep_snapshots", 3, 3),
        ("kubernetes", "node_selector", {"pool": "ide"}, {"pool": "ide"}),
        ("kubernetes", "tolerations", [{"key": "gpu", "operator": "Exists"}], [{"key": "gpu", "operator": "Exists"}]),
        ("kubernetes", "affinity", {"nodeAffinity": {}}, {"nodeAffinity": {}}),
        ("kubernetes", "image_pull_secrets", ["regcred"], ["regcred"]),
        ("kubernetes", "priority_class", "ide", "ide"),
        ("kubernetes", "lease_name", "reaper-2", "reaper-2"),
        ("kubernetes", "lease_duration", 30, 30.0),
        ("kubernetes", "identity", "replica-a", "replica-a"),
        ("kubernetes", "ide_key_file", "/etc/codehub/ide/ide-key", Path("/etc/codehub/ide/ide-key")),
        ("kubernetes", "snapshot_timeout", 60, 60.0),
        ("kubernetes", "request_timeout", 5, 5.0),
        ("kubernetes", "watch_timeout", 60, 60),
        ("kubernetes", "activity_interval", 10, 10.0),
        ("kubernetes", "share_prune_interval", 60, 60.0),
        # README's sign-in section
        ("oidc", "scopes", ["openid", "email"], ("openid", "email")),
        ("oidc", "username_claim", "preferred_username", "preferred_username"),
        ("oidc", "groups_claim", "roles", "roles"),
        ("oidc", "sign_out_at_idp", False, False),
        ("oidc", "token_auth_method", "client_secret_post", "client_secret_post"),
        ("oidc", "token_auth_method", "client_secret_basic", "client_secret_basic"),
    ],
)
def test_a_setting_that_is_set_is_read(tmp_path: Path, section: str, key: str, value: Any, loaded: Any) -> None:
    """Each is a key an operator's file may hold (the chart writes most of them): one that stopped being read would
    stop start-up with "unknown setting"."""
    tree: dict[str, Any] = {"auth": {"oidc": {"issuer": "https://sso.example.com", "client_id": "hub"}}}
    (tree["auth"]["oidc"] if section == "oidc" else tree.setdefault(section, {}))[key] = value
    config = load(tmp_path, yaml.safe_dump(tree))
    assert getattr(config.auth.oidc if section == "oidc" else config.kubernetes, key) == loaded
