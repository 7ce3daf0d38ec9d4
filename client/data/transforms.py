"""Array transforms on ``(C, H, W)`` images and their masks, built on MONAI.

Preprocessing (cached): robust percentile scaling to [0, 1], symmetric zero padding to a
square (no distortion) and MONAI ``Resize`` with area interpolation. Masks are padded and
resized with the image in the same call and thresholded at one half, so an image and its
masks cannot drift apart. Training augmentation (never cached): MONAI ``RandAffine`` (masks
follow with nearest interpolation and the same random draw), ``RandGaussianNoise`` and
``RandAdjustContrast`` on the image only.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import numpy as np
import torch
from monai.data import get_track_meta, set_track_meta
from monai.transforms import (
    RandAdjustContrast,
    RandAffine,
    RandGaussianNoise,
    Resize,
    ScaleIntensityRange,
    SpatialPad,
)

from client.config import PreprocessingConfig, SiteConfig
from client.data.reasons import Reason
from sic_core.errors import DataError

__all__ = [
    "TrainingAugmentation",
    "fit_to_square",
    "preprocess_image",
    "scale_intensity",
    "training_augmentation",
]

#: Percentiles are taken on at most about this many pixels (a strided subsample).
_PERCENTILE_PIXELS = 1_000_000


@contextmanager
def _plain_tensors() -> Iterator[None]:
    """Switch off MONAI's metadata tracking, which costs 5x on small images here."""
    previous = get_track_meta()
    set_track_meta(False)
    try:
        yield
    finally:
        set_track_meta(previous)


def scale_intensity(image: np.ndarray, percentiles: tuple[float, float]) -> np.ndarray:
    """Map the image's percentile window to [0, 1] (clipped).

    Parameters
    ----------
    image
        float32 ``(C, H, W)`` intensities in any units.
    percentiles
        Lower and upper percentile, e.g. ``(0.5, 99.5)``; the window is shared by all channels.

    Returns
    -------
    numpy.ndarray
        float32 ``(C, H, W)`` in [0, 1].

    Raises
    ------
    DataError
        ``blank_image`` when the image has a single intensity.
    """
    step = max(1, math.ceil(math.sqrt(image[0].size / _PERCENTILE_PIXELS)))
    sample = image[:, ::step, ::step]
    low, high = np.percentile(sample, percentiles)
    if not high > low:
        # Mostly uniform images with a little content (text on black) have a degenerate
        # percentile window; their full range still carries the content.
        low, high = float(image.min()), float(image.max())
    if not high > low:
        raise DataError("every pixel has the same value", reason=Reason.BLANK_IMAGE)
    with _plain_tensors():
        scaled = ScaleIntensityRange(a_min=low, a_max=high, b_min=0.0, b_max=1.0, clip=True)(image)
    return np.asarray(scaled, dtype=np.float32)


@functools.lru_cache(maxsize=64)
def _square_pad(side: int) -> SpatialPad:
    return SpatialPad(spatial_size=(side, side), method="symmetric", mode="constant")


@functools.lru_cache(maxsize=16)
def _area_resize(size: int) -> Resize:
    return Resize(spatial_size=(size, size), mode="area")


def fit_to_square(
    image: np.ndarray, size: int, masks: Mapping[str, np.ndarray] | None = None
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Pad to a square with zeros (centred), then resize to ``size`` with area interpolation.

    Parameters
    ----------
    image
        float32 ``(C, H, W)`` in [0, 1].
    size
        Output side length.
    masks
        Optional uint8 ``(1, H, W)`` masks (nonzero = inside), same H and W as the image.

    Returns
    -------
    tuple
        float32 ``(C, size, size)`` in [0, 1] and uint8 ``(1, size, size)`` masks in {0, 1}
        (a mask pixel is set when at least half of its area was inside).
    """
    masks = dict(masks or {})
    channels, height, width = image.shape
    for name, mask in masks.items():
        if mask.shape != (1, height, width):
            raise DataError(
                f"mask '{name}' has shape {mask.shape[1:]}, the image {(height, width)}",
                reason=Reason.BAD_GEOMETRY,
            )
    stacked = np.concatenate(
        [image, *(np.asarray(mask > 0, dtype=np.float32) for mask in masks.values())], axis=0
    )
    with _plain_tensors():
        if height != width:
            stacked = _square_pad(max(height, width))(stacked)
        if max(height, width) != size:
            stacked = _area_resize(size)(stacked)
    stacked = np.asarray(stacked, dtype=np.float32)
    out_image = np.clip(stacked[:channels], 0.0, 1.0)
    out_masks = {
        name: (stacked[channels + index : channels + index + 1] >= 0.5).astype(np.uint8)
        for index, name in enumerate(masks)
    }
    return np.ascontiguousarray(out_image), out_masks


def preprocess_image(
    image: np.ndarray,
    size: int,
    percentiles: tuple[float, float],
    masks: Mapping[str, np.ndarray] | None = None,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Scale intensities, then pad and resize image and masks together.

    Parameters
    ----------
    image
        float32 ``(C, H, W)`` intensities in any units.
    size
        Output side length.
    percentiles
        Intensity window for :func:`scale_intensity`.
    masks
        Optional uint8 ``(1, H, W)`` masks.

    Returns
    -------
    tuple
        float32 ``(C, size, size)`` in [0, 1], and the masks as uint8 ``(1, size, size)``.
    """
    return fit_to_square(scale_intensity(image, percentiles), size, masks)


class TrainingAugmentation:
    """Seeded random augmentation of a batch of images and their masks.

    Parameters
    ----------
    config
        The site's preprocessing section (strengths and probability).
    image_size
        Side length of the images (translations are a fraction of it).
    seed
        Seed of the random draws; the same seed gives the same sequence of batches.
    """

    def __init__(self, config: PreprocessingConfig, *, image_size: int, seed: int) -> None:
        self.enabled = config.augment
        probability = config.augment_probability
        shift = config.translate_fraction * image_size
        self._affine = RandAffine(
            prob=probability,
            rotate_range=(math.radians(config.rotate_degrees),),
            translate_range=(shift, shift),
            scale_range=(config.scale_fraction, config.scale_fraction),
            padding_mode="zeros",
            mode="bilinear",
        )
        self._noise = RandGaussianNoise(prob=probability, mean=0.0, std=config.noise_std)
        self._contrast = RandAdjustContrast(prob=probability, gamma=config.contrast_gamma)
        seeds = np.random.SeedSequence([seed, 0x5EED]).generate_state(3)
        for transform, transform_seed in zip(
            (self._affine, self._noise, self._contrast), seeds, strict=True
        ):
            transform.set_random_state(seed=int(transform_seed))

    def __call__(
        self, images: torch.Tensor, masks: Mapping[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Augment one batch.

        Parameters
        ----------
        images
            float32 ``(N, C, S, S)`` in [0, 1].
        masks
            uint8 ``(N, 1, S, S)`` per mask name.

        Returns
        -------
        tuple
            New tensors of the same shapes and dtypes; images stay in [0, 1] and every mask
            went through exactly the geometric transform of its image.
        """
        if not self.enabled:
            return images, dict(masks)
        out_images = torch.empty_like(images)
        out_masks = {name: torch.zeros_like(mask) for name, mask in masks.items()}
        with _plain_tensors():
            for index in range(images.shape[0]):
                image = self._affine(images[index], randomize=True)
                for name, mask in masks.items():
                    if bool(mask[index].any()):
                        moved = self._affine(mask[index].float(), mode="nearest", randomize=False)
                        out_masks[name][index] = (torch.as_tensor(moved) >= 0.5).to(mask.dtype)
                image = self._noise(image)
                image = self._contrast(torch.as_tensor(image).clamp(0.0, 1.0))
                out_images[index] = torch.as_tensor(image, dtype=images.dtype).clamp(0.0, 1.0)
        return out_images, out_masks


def training_augmentation(config: SiteConfig) -> TrainingAugmentation:
    """The site's training augmentation, seeded from ``config.seed``.

    Parameters
    ----------
    config
        The site config (``preprocessing`` strengths, ``data.image_size``, ``seed``).

    Returns
    -------
    TrainingAugmentation
        Callable ``(images, masks) -> (images, masks)`` for batches; the identity when
        ``preprocessing.augment`` is false.
    """
    return TrainingAugmentation(
        config.preprocessing, image_size=config.data.image_size, seed=config.seed
    )
