"""Metrics of predictions and explanations (batched PyTorch; each docstring states its formula)."""

from sic_core.metrics.classification import auroc, balanced_accuracy

__all__ = ["auroc", "balanced_accuracy"]
