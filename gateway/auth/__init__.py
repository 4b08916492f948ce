"""Who is calling: OIDC sign-in, session cookies, the hub→preview hand-off, bearer tokens and share links."""
