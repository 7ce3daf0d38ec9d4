"""The coordinator: Flower ServerApp, SIC federation strategy, tracking and the CLI.

``server`` and ``client`` are Flower app roots run from a checkout (or staged into an app
bundle); they both import :mod:`sic_core` and never each other.
"""
