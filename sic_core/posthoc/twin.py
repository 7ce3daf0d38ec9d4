"""The black-box twin: an ordinary CNN with the small B-cos encoder's shape.

What a hospital would otherwise deploy is a plain CNN explained after the fact. The twin has
the widths and strides of :class:`sic_core.encoders.SmallBcosCNN` (``w, 2w, 2w, 4w, 4w``;
strides ``2, 1, 2, 2, 1``), but ordinary convolutions with a bias, BatchNorm and ReLU, then a
global max pool (as SIC's embedder) and a linear head trained with cross-entropy. It takes
images ``x`` in ``[0, 1]`` directly (no ``[x, 1 - x]`` encoding: that exists for B-cos
networks, which have no bias).
"""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["PlainCNN"]

WIDTH_FACTORS = (1, 2, 2, 4, 4)
STRIDES = (2, 1, 2, 2, 1)


class PlainCNN(nn.Module):
    """Five 3x3 convolution blocks (BatchNorm + ReLU), global max pool, linear head.

    Parameters
    ----------
    in_channels
        Image channels (1 for grey).
    num_classes
        Logits returned by ``forward``.
    width
        Channels of the first block (as ``SmallBcosCNN``'s ``width``).

    Attributes
    ----------
    features
        ``nn.Sequential`` of the five blocks, each ``Sequential(Conv2d, BatchNorm2d, ReLU)``;
        ``features[-1]`` is the layer Grad-CAM and Eigen-CAM explain, ``features[2]`` (a
        quarter of the input size) the one IBA's bottleneck sits on.
    head
        ``nn.Linear`` from the pooled features to the logits.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 2, width: int = 32) -> None:
        super().__init__()
        blocks: list[nn.Module] = []
        previous = in_channels
        for factor, stride in zip(WIDTH_FACTORS, STRIDES, strict=True):
            out_ch = factor * width
            blocks.append(
                nn.Sequential(
                    nn.Conv2d(previous, out_ch, 3, stride=stride, padding=1),
                    nn.BatchNorm2d(out_ch),
                    nn.ReLU(),
                )
            )
            previous = out_ch
        self.features = nn.Sequential(*blocks)
        self.head = nn.Linear(previous, num_classes)
        self.in_channels = in_channels
        self.num_classes = num_classes

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``(B, num_classes)`` of images ``x (B, C, H, W)`` in ``[0, 1]``."""
        return self.head(self.features(x).amax(dim=(2, 3)))
