"""``python -m server``: the coordinator CLI (see :mod:`server.cli`)."""

from server.cli import app

app(prog_name="python -m server")
