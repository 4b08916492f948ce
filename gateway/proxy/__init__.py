"""Moving bytes between a client and an upstream port: HTTP streaming, WebSocket relay, header hygiene."""
