"""The gateway's own pages and API on the hub origin: hub, management API, badges, sign-in routes, templates."""
