"""The process: the fast lane, aiohttp's lane, the app, serving (one process or ``--workers``) and its wiring."""
