"""Benchmarks: ratios against anchors measured on the same machine in the same run."""
