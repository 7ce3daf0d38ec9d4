"""One module per ``python -m client`` command; ``client.cli`` registers each in one line."""
