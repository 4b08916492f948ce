"""The ``codehub-gateway`` command."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from aiohttp import web

from gateway.accesslog import AccessLogger
from gateway.config import Config, ConfigError, load_config


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="codehub-gateway",
        description="code-hub gateway: share URLs to ports inside workspaces, with sign-in, policies and wake-up.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = commands.add_parser(
        "serve", help="run the gateway",
        description="Run the gateway. Without --config it runs the embedded default: the local runtime with a "
        "demo workspace whose port 8000 is at http://8000-demo.localhost:8080/.",
    )
    serve.add_argument("--config", type=Path, help="YAML settings file (default: $CODEHUB_CONFIG, else the demo)")
    serve.add_argument("--host", help="address to listen on (setting listen.host, default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port to listen on (setting listen.port, default 8080)")
    serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                       help="log level for the gateway and the access log (default info)")
    return parser


def _load(args: argparse.Namespace) -> Config:
    config = load_config(args.config)
    listen = config.listen.model_copy(update={
        key: value for key, value in (("host", args.host), ("port", args.port)) if value is not None
    })
    return Config.model_validate({**config.model_dump(), "listen": listen.model_dump()})


def serve(args: argparse.Namespace) -> int:
    from gateway.app import build_app

    config = _load(args)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    app = build_app(config)
    print(f"code-hub gateway on {config.hub_url} (previews at {config.scheme}://PORT-WORKSPACE."
          f"{config.preview_domain}/), listening on {config.listen.host}:{config.listen.port}", file=sys.stderr)
    web.run_app(
        app, host=config.listen.host, port=config.listen.port, access_log_class=AccessLogger,
        access_log=logging.getLogger("codehub.access"), handler_cancellation=True,
        shutdown_timeout=config.timeouts.shutdown, print=None,
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "serve":
            return serve(args)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    return 1


if __name__ == "__main__":
    sys.exit(main())
