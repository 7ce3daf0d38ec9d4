"""The hospital side of sicfed: site configuration, site data, and the ``python -m client`` CLI.

The Flower ClientApp lives in ``client.app``; this package's modules import no Flower code,
so the data pipeline and the CLI work without a federation.
"""
