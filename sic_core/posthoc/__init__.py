"""SIC against post-hoc explanations: the black-box twin, the methods, and their scores.

- :class:`PlainCNN`: the twin, an ordinary CNN with the small B-cos encoder's shape;
- :data:`METHODS` / :func:`explain_method`: the registry of every method compared with SIC
  (Captum, the grad-cam package, IBA written here), each returning ``(N, H, W)`` maps;
- :func:`score_method`: every explanation metric of :mod:`sic_core.metrics` for one method on
  one audit set, keyed as ``posthoc/<method>/<metric>`` (:mod:`sic_core.wire_posthoc`).
"""

from sic_core.posthoc.iba import FeatureStatistics, feature_statistics, information_bottleneck
from sic_core.posthoc.methods import (
    METHODS,
    PosthocMethod,
    bottleneck_layer,
    explain_method,
    feature_layer,
    integrated_gradients_completeness,
    superpixels,
)
from sic_core.posthoc.twin import PlainCNN

__all__ = [
    "METHODS",
    "FeatureStatistics",
    "PlainCNN",
    "PosthocMethod",
    "bottleneck_layer",
    "explain_method",
    "feature_layer",
    "feature_statistics",
    "information_bottleneck",
    "integrated_gradients_completeness",
    "superpixels",
]
