"""The ``codehub-gateway`` command: run the gateway, check and explain policies, and talk to a running hub."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gateway.config import Config, ConfigError, load_config
from gateway.edge.policy import PolicyError

if TYPE_CHECKING:
    from gateway.auth.identity import Identity

LIST_PAGE = 500
"""Workspaces asked for per call by ``codehub-gateway workspaces`` (the API's most), which follows the pages."""


class CliError(Exception):
    """A command failed in a way the user can fix; printed as one line, exit status 1."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="codehub-gateway",
        description="code-hub gateway: share URLs to ports inside workspaces, with sign-in, policies and wake-up.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser(
        "serve", help="run the gateway",
        description="Run the gateway. Without --config it runs the embedded default: the local runtime with a "
        "demo workspace whose port 8000 is at http://8000-demo.localhost:8080/ and development sign-in.",
    )
    serve.add_argument("--config", type=Path, help="YAML settings file (default: $CODEHUB_CONFIG, else the demo)")
    serve.add_argument("--host", help="address to listen on (setting listen.host, default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port to listen on (setting listen.port, default 8080)")
    serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                       help="log level for the gateway and the access log (default info)")
    serve.add_argument("--workers", type=int, default=1, metavar="N",
                       help="worker processes sharing the port (SO_REUSEPORT), e.g. one per core (default 1); "
                       "with --log-level debug each answer names its worker in X-Codehub-Worker")

    policy = commands.add_parser("policy", help="check or explain access policies").add_subparsers(
        dest="action", required=True, metavar="ACTION")
    check = policy.add_parser("check", help="validate policy files; prints file:line: reason for the first problem")
    check.add_argument("files", nargs="+", type=Path, metavar="FILE")
    explain = policy.add_parser(
        "explain", help="print the access decision for a user and a URL, and the rule that made it",
        description="Decide as the gateway would. Workspaces (owner, collaborators, port visibility) come from "
        "--config; the policy from --policy or the config's policy_file.")
    explain.add_argument("--url", required=True, help="share URL or IDE URL, e.g. http://3000-ws1.localhost:8080/")
    explain.add_argument("--user", help="user name (omit for an anonymous visitor)")
    explain.add_argument("--email", default="", help="the user's e-mail")
    explain.add_argument("--groups", default="", help="comma-separated groups")
    explain.add_argument("--config", type=Path, help="gateway settings (workspaces, hub_url, policy_file)")
    explain.add_argument("--policy", type=Path, help="policy file (default: the config's policy_file)")

    keys = commands.add_parser("keys", help="manage the signing keys").add_subparsers(
        dest="action", required=True, metavar="ACTION")
    rotate = keys.add_parser("rotate", help="add a new signing key; old keys keep verifying until sessions expire")
    rotate.add_argument("--config", type=Path, help="gateway settings (to find auth.keys_file)")

    token = commands.add_parser("token", help="issue API tokens (operators, on the gateway's machine)")
    token_actions = token.add_subparsers(dest="action", required=True, metavar="ACTION")
    issue = token_actions.add_parser(
        "issue", help="issue a new API token for a user (into the token file, or as an ApiToken in the cluster)")
    issue.add_argument("--user", required=True)
    issue.add_argument("--email", default="")
    issue.add_argument("--groups", default="")
    issue.add_argument("--name", default="cli")
    issue.add_argument("--config", type=Path, help="gateway settings (auth.store_file, or the cluster)")
    seal = token_actions.add_parser(
        "seal", help="seal the links, tokens and consent answers a gateway from before seals made in the cluster "
                     "(once, after upgrading)")
    seal.add_argument("--config", type=Path, help="gateway settings (the cluster, kubernetes.ide_key_file)")

    def remote(group: Any, name: str, help_text: str) -> argparse.ArgumentParser:
        sub: argparse.ArgumentParser = group.add_parser(name, help=help_text, description=help_text)
        sub.add_argument("--hub", default=os.environ.get("CODEHUB_URL", "http://localhost:8080"),
                         help="hub URL (default $CODEHUB_URL or http://localhost:8080)")
        sub.add_argument("--token", default=os.environ.get("CODEHUB_TOKEN"),
                         help="API token (default $CODEHUB_TOKEN)")
        sub.add_argument("--json", action="store_true", help="print the raw JSON answer")
        return sub

    workspace = remote(commands, "workspace", "show, wake, stop, archive or delete a workspace through a running hub")
    workspace.add_argument("action", choices=["status", "wake", "stop", "archive", "delete"])
    workspace.add_argument("name")
    remote(commands, "workspaces", "list the workspaces you own or collaborate on, with their ports")
    port = remote(commands, "port",
                  "set who can see a port (private, org or public) and whether its app learns who visits")
    port.add_argument("workspace")
    port.add_argument("port", type=int)
    port.add_argument("visibility", nargs="?", choices=["private", "org", "public"])
    port.add_argument("--identity", choices=["on", "off"],
                      help="on: the app receives visitors' identity, each visitor once they agree (default off)")
    shares = commands.add_parser("share", help="create, list or revoke share links").add_subparsers(
        dest="action", required=True, metavar="ACTION")
    create = remote(shares, "create", "create a share link and print its URL (one per port for every port)")
    create.add_argument("workspace")
    create.add_argument("--port", type=int, help="one port (default: every port of the workspace)")
    create.add_argument("--audience", choices=["anyone", "org", "people"], default="anyone",
                        help="who may open it: anyone with the link, signed-in org members, or --people")
    create.add_argument("--people", default="", help="comma-separated users, e-mails or group:NAME")
    create.add_argument("--ttl", help="lifetime such as 2h, 7d or 90d (default and maximum from the policy)")
    remote(shares, "list", "list a workspace's share links: audience, expiry, uses").add_argument("workspace")
    revoke = remote(shares, "revoke", "revoke a share link (ids from 'share list')")
    revoke.add_argument("workspace")
    revoke.add_argument("id", help="link id")
    return parser


def serve(args: argparse.Namespace) -> int:
    from gateway.auth.keys import KeyFileError, load_or_create
    from gateway.server.app import build_app
    from gateway.server.serving import bind_listeners, configure_logging, run_workers, serve_app

    overrides = {"listen": {k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None}}
    config = load_config(args.config, overrides=overrides)
    configure_logging(args.log_level)
    if args.workers < 1:
        raise CliError("--workers must be at least 1")
    if config.runtime == "local":  # the folders the workspaces' own go in, made here: not a traceback later
        for folder in (config.state_dir, config.state_dir / "workspaces", config.state_dir / "archives"):
            try:
                folder.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise ConfigError(f"config error: local.state_dir: cannot use {folder}: {exc.strerror}") from None
    if config.auth.oidc is not None:
        config.auth.oidc.secret()  # read again at each sign-in (a rotated Secret takes effect); unreadable: said now
    _check_cluster(config)
    # bad settings fail here, before the banner; workers bind their own sockets, so theirs are only tried here
    listeners = bind_listeners(config, reuse_port=args.workers > 1)
    try:
        app = build_app(config) if args.workers == 1 else None
        if app is None:  # the workers' parent makes the one key set they share: a bad keys_file is said here
            load_or_create(config.keys_file, create=config.auth.keys_file is None)
    except KeyFileError as exc:
        listeners.close()
        raise ConfigError(f"config error: auth.keys_file: {exc}") from None
    print(_banner(config, args.workers), file=sys.stderr, flush=True)
    if app is not None:
        serve_app(app, config, listeners=listeners)
        return 0
    listeners.close()
    return run_workers(config, workers=args.workers, log_level=args.log_level)


def _check_cluster(config: Config) -> None:
    """Load the cluster settings (kubeconfig, or the pod's service account) once before anything starts: the
    client finds a kubeconfig that says nothing usable only when it first reaches the cluster."""
    if config.runtime != "kubernetes":
        return
    import asyncio

    from kubernetes_asyncio.config import ConfigException

    from gateway.lifecycle.kubernetes.client import connect

    async def check() -> None:
        await (await connect(config.kubernetes)).close()

    try:
        asyncio.run(check())
    except (ConfigException, OSError) as exc:  # ConfigException's text is its first argument, quoted by str()
        message = exc.args[0] if isinstance(exc, ConfigException) and exc.args else exc
        raise ConfigError(f"config error: kubernetes: {message}") from None


def _banner(config: Config, workers: int) -> str:
    """What to open: the hub, then every configured port of every local workspace (each link works)."""
    from gateway.edge.routing import Hosts

    hosts = Hosts.from_urls(config.hub_url, config.preview_domain)
    lines = [f"code-hub gateway listening on {config.listen.host}:{config.listen.port}"
             + (f" with {workers} worker processes" if workers > 1 else ""), f"  hub: {hosts.hub_url('/')}"]
    for name, ws in config.local.workspaces.items() if config.runtime == "local" else ():
        lines += [f"  {name}: {hosts.share_url(name, port)}" for port in sorted(ws.ports)]
    lines.append(f"  (any port: {config.scheme}://PORT-WORKSPACE.{config.preview_domain}/)")
    return "\n".join(lines)


def policy_check(args: argparse.Namespace) -> int:
    from gateway.edge.policy import PolicyError, load_policy

    failed = False
    for path in args.files:
        try:
            load_policy(path)
        except PolicyError as exc:
            print(exc, file=sys.stderr)
            failed = True
        else:
            print(f"{path}: ok")
    return 1 if failed else 0


def policy_explain(args: argparse.Namespace) -> int:
    from yarl import URL

    from gateway.auth.identity import Identity
    from gateway.edge.policy import Policy, decide, load_policy, visibility
    from gateway.edge.routing import Hosts, Kind, route
    from gateway.errors import GatewayError
    from gateway.lifecycle.local import configured_spec

    config = load_config(args.config)
    policy_path = args.policy or config.policy_file
    policy = load_policy(policy_path) if policy_path else Policy()
    try:
        url = URL(args.url)
    except ValueError:
        raise CliError(f"{args.url} is not a URL") from None
    try:
        target = route(url.raw_authority, url.raw_path_qs or "/", Hosts.from_urls(config.hub_url,
                                                                               config.preview_domain))
    except GatewayError as exc:
        raise CliError(f"{args.url}: {exc.message}") from None
    if target.kind not in (Kind.PREVIEW, Kind.IDE) or target.workspace is None:
        raise CliError(f"{args.url} is not a share URL or an IDE URL of this gateway")
    declared = config.local.workspaces.get(target.workspace)
    if declared is None:
        raise CliError(f"workspace {target.workspace} is not in the configuration")
    spec = configured_spec(target.workspace, declared)
    identity = None
    if args.user:
        groups = tuple(g.strip() for g in args.groups.split(",") if g.strip())
        identity = Identity(args.user, args.email, groups, args.user)
    port = target.port if target.kind is Kind.PREVIEW else None
    decision = decide(policy, spec, port, identity)
    who = identity.subject if identity else "anonymous"
    where = f"port {port} ({visibility(policy, spec, port)})" if port else "the IDE"
    verdict = "ALLOW" if decision.allow else "DENY"
    print(f"{verdict} {who} → {where} of workspace {spec.id}: {decision.reason.value} — {decision.rule}")
    return 0 if decision.allow else 3


def keys_rotate(args: argparse.Namespace) -> int:
    from gateway.auth.keys import KeyFileError, load_or_create, write_keys

    config = load_config(args.config)
    try:
        keys = load_or_create(config.keys_file, create=True)
    except KeyFileError as exc:
        raise CliError(str(exc)) from None
    rotated = keys.rotated(keep_for=config.auth.session_ttl)
    try:
        write_keys(config.keys_file, rotated)
    except OSError as exc:
        raise CliError(f"cannot write keys file {config.keys_file}: {exc.strerror}") from None
    print(f"{config.keys_file}: new signing key {rotated.current.kid}; {len(rotated.keys) - 1} older key(s) kept "
          f"(the gateway at {config.hub_url})")
    return 0


def token_issue(args: argparse.Namespace) -> int:
    from gateway.auth.identity import Identity
    from gateway.lifecycle.base import showable
    from gateway.web.api import MOST_TOKEN_NAME

    config = load_config(args.config)
    groups = tuple(g.strip() for g in args.groups.split(",") if g.strip())
    identity = Identity(args.user, args.email, groups, args.user)
    if (problem := identity.unsendable()) is not None:  # as sign-in refuses it: apps get identities in headers
        raise CliError(f"token issue: {problem} cannot be sent to apps")
    if not 1 <= len(args.name) <= MOST_TOKEN_NAME or not showable(args.name):  # as the API's NewToken: the hub shows it
        raise CliError(f"token issue: --name must be 1 to {MOST_TOKEN_NAME} printable characters")
    if config.runtime == "kubernetes":  # the replicas share tokens through the API: a file would reach none
        import asyncio

        _check_cluster(config)
        record_id, token = asyncio.run(_issue_in_cluster(config, identity, args.name))
        where = f"ApiToken {record_id} in namespace {config.kubernetes.namespace}"
    else:
        from gateway.auth.store import FileTokenStore, StoreUnavailable

        try:
            record, token = FileTokenStore(config.store_file).create_api_token_now(identity, name=args.name)
        except StoreUnavailable as exc:  # the file's own error was logged just before, with its name
            raise CliError(f"token issue: {exc.message}") from None
        where = f"token {record.id} for {args.user} written to {config.store_file} (the gateway at {config.hub_url})"
    print(token)
    print(where, file=sys.stderr)
    return 0


async def _issue_in_cluster(config: Config, identity: Identity, name: str) -> tuple[str, str]:
    from gateway.auth.kubernetes.tokens import create_api_token, seal_key
    from gateway.lifecycle.base import LifecycleError
    from gateway.lifecycle.kubernetes.client import KubeClient, connect

    api = await connect(config.kubernetes)
    try:
        client = KubeClient(api, config.kubernetes.namespace, timeout=config.kubernetes.request_timeout)
        record, _, token = await create_api_token(client, identity, name=name, key=seal_key(config.kubernetes))
    except LifecycleError as exc:
        raise CliError(exc.message) from None
    finally:
        await api.close()
    return record.id, token


def token_seal(args: argparse.Namespace) -> int:
    """What an operator runs once after upgrading: the older gateway's records carry no seal, which this one
    requires; the records in the cluster at that moment are taken for the old gateway's."""
    import asyncio

    from gateway.auth.kubernetes.tokens import Sealing, seal_key, seal_records
    from gateway.lifecycle.kubernetes.client import KubeClient, KubeError, connect

    config = load_config(args.config)
    if config.runtime != "kubernetes":
        raise CliError("token seal: only a cluster's records are sealed (runtime: kubernetes)")
    key = seal_key(config.kubernetes)
    if key is None:
        raise CliError("token seal: kubernetes.ide_key_file is not set: records are neither sealed nor checked")
    _check_cluster(config)

    async def seal() -> dict[str, Sealing]:
        api = await connect(config.kubernetes)
        try:
            client = KubeClient(api, config.kubernetes.namespace, timeout=config.kubernetes.request_timeout)
            return await seal_records(client, key)
        except KubeError as exc:
            raise CliError(f"token seal: the cluster refused: {exc}") from None
        finally:
            await api.close()

    for kind, done in asyncio.run(seal()).items():
        left = ("; left as they are (sealed otherwise, of no workspace now, or changed meanwhile): "
                + ", ".join(done.left))
        print(f"{kind}: {done.sealed} sealed, {done.already} already sealed{left if done.left else ''}")
    return 0


def _hub(hub: str) -> str:
    """``--hub`` as urllib can send to it: http.client refuses spaces and control characters, and an unparsable
    port, with exceptions that are not the network's."""
    try:
        parts = urllib.parse.urlsplit(hub)
        usable = parts.scheme in ("http", "https") and bool(parts.hostname) and parts.port != 0
    except ValueError:  # a port that is no number, or out of range
        usable = False
    if not usable or not hub.isascii() or not hub.isprintable() or " " in hub:
        raise CliError(f"--hub {hub} is not a URL like https://hub.example.com")
    return hub.rstrip("/")


def _call(args: argparse.Namespace, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
    if not args.token:
        raise CliError("no API token: pass --token or set CODEHUB_TOKEN (create one on the hub page)")
    if not args.token.isascii() or not args.token.isprintable() or " " in args.token:
        raise CliError("the API token has characters no token has")  # it goes in a header: ASCII, one line
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(
        _hub(args.hub) + path, data=data, method=method,
        headers={"Authorization": f"Bearer {args.token}", "Accept": "application/json",
                 **({"Content-Type": "application/json"} if data else {})},
    )
    try:
        with urllib.request.urlopen(request, timeout=330) as response:
            answer = response.read()
    except urllib.error.HTTPError as exc:
        try:
            message = json.loads(exc.read())["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = exc.reason
        raise CliError(f"{exc.code}: {message}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise CliError(f"cannot reach {args.hub}: {getattr(exc, 'reason', exc)}") from None
    try:
        return json.loads(answer or b"null")
    except ValueError:
        raise CliError(f"{args.hub} answered with something that is not JSON: is it a code-hub gateway?") from None


def _segment(name: str) -> str:
    """A name typed on the command line as one path segment: a space, a line break or a slash in it stays the
    name's (the API answers 404), never a request http.client refuses or one for another path."""
    return urllib.parse.quote(name, safe="")


def _print_workspace(view: dict[str, Any]) -> None:
    print(f"{view['id']}  {view['phase']}  owner {view['owner']}  IDE {view['ide_url']}")
    for port in view["ports"]:
        listening = "listening" if port["listening"] else "not listening"
        knows = f"  identity on ({port['consented']} consented)" if port["identity"] else ""
        print(f"  port {port['port']:<5} {port['visibility']:<8} {listening:<13} {port['url']}{knows}")


def remote(args: argparse.Namespace) -> int:
    if args.command == "workspaces":
        answer = _call(args, "GET", f"/api/v1/workspaces?limit={LIST_PAGE}")
        views = answer["workspaces"]
        while answer["next_cursor"]:  # every page: the CLI lists them all
            answer = _call(args, "GET", f"/api/v1/workspaces?limit={LIST_PAGE}&cursor={answer['next_cursor']}")
            views += answer["workspaces"]
        answer = {"workspaces": views}
    elif args.command == "workspace" and args.action == "delete":
        answer = _call(args, "DELETE", f"/api/v1/workspaces/{_segment(args.name)}")
        if not args.json:
            print(f"{answer['id']} deleted, with its pod, home volume and snapshots")
            return 0
        views = []
    elif args.command == "workspace":
        method, path = ("GET", "status") if args.action == "status" else ("POST", args.action)
        answer = _call(args, method, f"/api/v1/workspaces/{_segment(args.name)}/{path}")
        views = [answer]
    elif args.command == "port":
        change = {"visibility": args.visibility, "identity": {"on": True, "off": False}.get(args.identity)}
        answer = _call(args, "PUT", f"/api/v1/workspaces/{_segment(args.workspace)}/ports/{args.port}",
                       {key: value for key, value in change.items() if value is not None})
        views = [answer]
    else:
        return share(args)
    if args.json:
        print(json.dumps(answer, indent=2))
    else:
        for view in views:
            _print_workspace(view)
    return 0


def share(args: argparse.Namespace) -> int:
    base = f"/api/v1/workspaces/{_segment(args.workspace)}/shares"
    if args.action == "create":
        body: dict[str, Any] = {"audience": args.audience,
                                "people": [p.strip() for p in args.people.split(",") if p.strip()]}
        if args.port:
            body["port"] = args.port
        if args.ttl:
            body["ttl"] = args.ttl
        answer = _call(args, "POST", base, body)
        if args.json:
            print(json.dumps(answer, indent=2))
        elif "urls" in answer:
            print("\n".join(item["url"] for item in answer["urls"]) or
                  f"link {answer['id']}: {args.workspace} has no ports yet; add ?codehub_share={answer['token']} "
                  "to the URL of any of its ports")
        else:
            print(answer["url"])
        return 0
    if args.action == "revoke":
        answer = _call(args, "DELETE", f"{base}/{_segment(args.id)}")
        print(json.dumps(answer, indent=2) if args.json else f"revoked {args.id}")
        return 0
    answer = _call(args, "GET", base)
    if args.json:
        print(json.dumps(answer, indent=2))
    now = time.time()
    for link in [] if args.json else answer["shares"]:
        target = f"port {link['port']}" if link["port"] else "all ports"
        state = "active" if link["active"] else ("revoked" if link["revoked"] else "expired")
        audience = link["audience"] + (f": {', '.join(link['people'])}" if link["audience"] == "people" else "")
        expiry = (f"expires {relative_time(link['expires'], now)}" if link["active"]
                  else f"{state} {relative_time(link['revoked'] or link['expires'], now)}")
        print(f"{link['id']}  {target:<10} {state:<8} for {audience:<20} {expiry:<20} uses {link['uses']}")
    return 0


def relative_time(at: float, now: float) -> str:
    """``in 3 h`` / ``2 d ago``: what a person reads an expiry as."""
    delta = at - now
    size = abs(delta) if abs(delta) < 60 else round(abs(delta) / 60) * 60  # a day made a second ago: "1 d"
    for unit, seconds in (("d", 86400), ("h", 3600), ("min", 60)):
        if size >= seconds:
            amount = f"{size / seconds:.0f} {unit}"
            break
    else:
        amount = "less than a minute" if size >= 1 else "now"
    if amount == "now":
        return amount
    return f"in {amount}" if delta > 0 else f"{amount} ago"


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    handlers = {
        ("serve", None): serve, ("policy", "check"): policy_check, ("policy", "explain"): policy_explain,
        ("keys", "rotate"): keys_rotate, ("token", "issue"): token_issue,
        ("token", "seal"): token_seal,
    }
    handler = handlers.get((args.command, getattr(args, "action", None) if args.command in (
        "policy", "keys", "token") else None), remote)
    try:
        return handler(args)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    except PolicyError as exc:
        print(exc, file=sys.stderr)
        return 2
    except CliError as exc:
        print(f"codehub-gateway: {exc}", file=sys.stderr)
        return 1
