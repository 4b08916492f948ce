"""The embedded demo workspace: a small page on port 8000 and an IDE on the IDE port.

The IDE is the real code-server when it is on PATH; otherwise a stand-in page, labelled as one, so the
IDE address (``ide-demo.localhost:8080``) can be tried without installing anything.
"""
