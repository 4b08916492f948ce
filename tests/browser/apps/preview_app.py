"""A tiny workspace app for the browser tests (standard library only, so it starts in milliseconds).

    python -m tests.browser.apps.preview_app --host H --port P [--port P2 ...] [--delay S] [--home DIR]

Every port serves the same app:
- ``/`` and any other path: an HTML page naming the workspace, the path+query it was asked for, the user the
  gateway forwarded and, if ``{home}/message.txt`` exists, its text (to prove a COLD restore brought the home back);
- ``/front``: a front end that calls ``/api/whoami`` on port 8000 of the same workspace with credentials and
  writes the outcome into ``#result`` (used by the CORS scenario);
- ``/api/whoami``: JSON ``{"user": ..., "port": ...}`` (no CORS headers of its own).

``--delay`` waits before listening, like a dev server that takes a moment to boot.
"""

from __future__ import annotations

import argparse
import html
import json
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

FRONT = """<!doctype html><html><head><meta charset="utf-8"><title>front end</title></head>
<body style="font: 18px sans-serif; padding: 1rem">
<h1 id="app">Front end on port {port}</h1>
<p>Calling <code id="api"></code> with credentials:</p>
<pre id="result">pending</pre>
<script>
// ``attempt`` names an extra request header: a new name misses the browser's preflight cache.
window.callApi = async (attempt = "1") => {{
  const api = location.protocol + "//" + location.host.replace(/^\\d+-/, "8000-") + "/api/whoami";
  document.getElementById("api").textContent = api;
  const out = document.getElementById("result");
  try {{
    const response = await fetch(api, {{
      method: "POST", credentials: "include",
      headers: {{ "Content-Type": "application/json", ["X-Attempt-" + attempt]: "yes" }},
      body: JSON.stringify({{ hello: "api" }}),
    }});
    const data = await response.json();
    out.textContent = "ok " + response.status + " " + JSON.stringify(data);
  }} catch (error) {{
    out.textContent = "rejected " + error;
  }}
  return out.textContent;
}};
</script>
</body></html>"""


def make_handler(port: int, home: Path | None) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _send(self, status: int, body: str, content_type: str) -> None:
            data = body.encode()
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(data)

        def _api(self) -> None:
            user = self.headers.get("X-Forwarded-User", "")
            self._send(200, json.dumps({"user": user, "port": port, "method": self.command}), "application/json")

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            self.rfile.read(length)
            if self.path.startswith("/api/"):
                self._api()
            else:
                self._send(404, "not found", "text/plain")

        def do_GET(self) -> None:
            if self.path.startswith("/api/"):
                self._api()
                return
            if self.path == "/front":
                self._send(200, FRONT.format(port=port), "text/html; charset=utf-8")
                return
            message = ""
            if home is not None and (home / "message.txt").is_file():
                message = (home / "message.txt").read_text().strip()
            workspace = os.environ.get("CODEHUB_WORKSPACE", "?")
            body = (
                '<!doctype html><html><head><meta charset="utf-8"><title>preview app</title></head>'
                '<body style="font: 18px sans-serif; padding: 1rem; background: #eef7ee">'
                f'<h1 id="app">App of {html.escape(workspace)} on port {port}</h1>'
                f'<p>Path: <code id="path">{html.escape(self.path)}</code></p>'
                f'<p>User: <code id="user">{html.escape(self.headers.get("X-Forwarded-User", ""))}</code></p>'
                f'<p>Home says: <code id="message">{html.escape(message)}</code></p>'
                "</body></html>"
            )
            self._send(200, body, "text/html; charset=utf-8")

        def log_message(self, format: str, *args: object) -> None:
            pass

    return Handler


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", type=int, action="append", required=True)
    parser.add_argument("--delay", type=float, default=0.0)
    parser.add_argument("--home", type=Path)
    args = parser.parse_args()
    time.sleep(args.delay)
    servers = [ThreadingHTTPServer((args.host, port), make_handler(port, args.home)) for port in args.port]
    for server in servers[1:]:
        threading.Thread(target=server.serve_forever, daemon=True).start()
    servers[0].serve_forever()


if __name__ == "__main__":
    main()
