"""One module per coordinator command (``python -m server <command>``)."""
