"""SIC: similarity-based interpretable classification on B-cos networks (pure PyTorch)."""
