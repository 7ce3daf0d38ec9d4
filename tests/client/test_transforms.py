"""Images and masks stay aligned through preprocessing and augmentation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from client.config import PreprocessingConfig
from client.data import DataError, TrainingAugmentation
from client.data.transforms import fit_to_square, preprocess_image, scale_intensity


def _disc(height: int, width: int, row: float, col: float, radius: float) -> np.ndarray:
    rows, cols = np.mgrid[0:height, 0:width]
    return ((rows - row) ** 2 + (cols - col) ** 2 <= radius**2)[None]


def _iou(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor) -> float:
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    return float((a & b).sum() / max((a | b).sum(), 1))


@pytest.mark.parametrize(("height", "width", "size"), [(90, 60, 32), (50, 120, 64), (40, 40, 96)])
def test_preprocessing_keeps_masks_on_their_objects(height: int, width: int, size: int) -> None:
    rng = np.random.default_rng(height)
    lesion = _disc(height, width, height * 0.3, width * 0.7, min(height, width) * 0.15)
    marker = np.zeros_like(lesion)
    marker[:, height - 8 : height - 3, 2:20] = True
    raw = rng.normal(100.0, 5.0, (1, height, width)) + 900.0 * (lesion | marker)
    image, masks = preprocess_image(
        raw.astype(np.float32),
        size,
        (0.5, 99.5),
        {"lesion": lesion.astype(np.uint8), "marker": marker.astype(np.uint8)},
    )
    assert image.shape == (1, size, size) and image.dtype == np.float32
    assert masks["lesion"].shape == (1, size, size) and masks["lesion"].dtype == np.uint8
    assert set(np.unique(masks["lesion"])) <= {0, 1}
    bright = image > 0.5
    assert _iou(bright, masks["lesion"] | masks["marker"]) > 0.85
    assert _iou(bright & (masks["lesion"] > 0), masks["lesion"]) > 0.85


def test_padding_is_centred_and_black() -> None:
    image = np.ones((1, 20, 40), np.float32)
    padded, _ = fit_to_square(image, 40)
    assert padded[0, :10].max() == 0 and padded[0, 30:].max() == 0
    assert padded[0, 10:30].min() == 1


def test_a_mask_of_another_size_is_rejected() -> None:
    with pytest.raises(DataError):
        fit_to_square(np.zeros((1, 10, 10), np.float32), 8, {"lesion": np.zeros((1, 9, 10))})


def test_scaling_falls_back_to_the_full_range_and_rejects_flat_images() -> None:
    text_on_black = np.zeros((1, 100, 100), np.float32)
    text_on_black[0, 50, 50:53] = 5.0  # fewer pixels than the upper percentile
    scaled = scale_intensity(text_on_black, (0.5, 99.5))
    assert scaled.max() == 1.0 and scaled.min() == 0.0
    with pytest.raises(DataError):
        scale_intensity(np.ones((1, 8, 8), np.float32), (0.5, 99.5))


def _batch(count: int = 12, size: int = 48) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    rng = np.random.default_rng(0)
    images = np.full((count, 1, size, size), 0.1, np.float32)
    lesions = np.zeros((count, 1, size, size), np.uint8)
    for index in range(count):
        row, col = rng.uniform(12, size - 12, 2)
        lesions[index] = _disc(size, size, row, col, rng.uniform(4, 8))
    lesions[1] = 0  # an image without this finding
    images[lesions > 0] = 0.9
    return torch.from_numpy(images), {"lesion": torch.from_numpy(lesions)}


def test_augmentation_moves_masks_with_their_images() -> None:
    augment = TrainingAugmentation(
        PreprocessingConfig(augment_probability=1.0, rotate_degrees=30.0, translate_fraction=0.15),
        image_size=48,
        seed=3,
    )
    images, masks = _batch()
    out_images, out_masks = augment(images, masks)
    assert out_images.shape == images.shape and out_images.dtype == torch.float32
    assert out_masks["lesion"].dtype == torch.uint8
    assert out_images.min() >= 0 and out_images.max() <= 1
    moved = 0
    for index in range(len(images)):
        mask = out_masks["lesion"][index, 0].numpy()
        if index == 1:
            assert mask.sum() == 0
            continue
        moved += int(not np.array_equal(mask, masks["lesion"][index, 0].numpy()))
        assert _iou(out_images[index, 0].numpy() > 0.5, mask) > 0.8
    assert moved >= len(images) - 2  # the transform really moved things


def test_augmentation_is_seeded_and_can_be_switched_off() -> None:
    images, masks = _batch()
    config = PreprocessingConfig(augment_probability=1.0)
    first = TrainingAugmentation(config, image_size=48, seed=5)(images, masks)
    again = TrainingAugmentation(config, image_size=48, seed=5)(images, masks)
    other = TrainingAugmentation(config, image_size=48, seed=6)(images, masks)
    assert torch.equal(first[0], again[0]) and torch.equal(first[1]["lesion"], again[1]["lesion"])
    assert not torch.equal(first[0], other[0])
    off = TrainingAugmentation(PreprocessingConfig(augment=False), image_size=48, seed=5)
    same_images, same_masks = off(images, masks)
    assert torch.equal(same_images, images) and torch.equal(same_masks["lesion"], masks["lesion"])
