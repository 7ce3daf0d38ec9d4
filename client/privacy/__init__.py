"""Sample-level differential privacy at a site: DP-SGD, the DP support release, the ledger."""
