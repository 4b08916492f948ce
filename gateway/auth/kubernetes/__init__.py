"""Tokens, share links, hand-off codes and consent answers kept as Kubernetes custom resources."""
