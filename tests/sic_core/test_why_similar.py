"""'Why similar': property perturbations of SIC's similarity, and their normalised influence."""

from __future__ import annotations

import pytest
import torch

from sic_core import create_model
from sic_core.why_similar import (
    PROPERTIES,
    WhySimilar,
    perturb,
    support_profiles,
    why_line,
    why_similar,
)


def _laplacian_energy(x: torch.Tensor) -> float:
    kernel = torch.tensor([[0.0, 1, 0], [1, -4, 1], [0, 1, 0]]).view(1, 1, 3, 3)
    return float(torch.nn.functional.conv2d(x, kernel).pow(2).mean())


def test_each_perturbation_moves_its_property_monotonically(disc_images) -> None:
    images, _, _ = disc_images(4, 32, seed=0)
    darker, brighter = perturb(images, "intensity", 1), perturb(images, "intensity", -1)
    assert darker.mean() < images.mean() < brighter.mean()
    sharper, softer = perturb(images, "contrast", 1), perturb(images, "contrast", -1)
    assert softer.std() < images.std() < sharper.std()
    sharpened, blurred = perturb(images, "texture", 1), perturb(images, "texture", -1)
    assert _laplacian_energy(blurred) < _laplacian_energy(images) < _laplacian_energy(sharpened)
    forward, backward = perturb(images, "shape", 1), perturb(images, "shape", -1)
    assert not torch.equal(forward, images) and not torch.equal(forward, backward)
    assert (forward - images).abs().mean() < 0.05  # a deformation, not a new image
    for out in (darker, brighter, sharper, softer, sharpened, blurred, forward, backward):
        assert out.shape == images.shape and out.min() >= 0 and out.max() <= 1


def test_position_moves_the_strongest_window() -> None:
    image = torch.zeros(1, 1, 32, 32)
    image[0, 0, 10:13, 10:13] = 1.0
    moved = perturb(image, "position", 1, centres=torch.tensor([[11, 11]]))
    rows, cols = torch.nonzero(moved[0, 0] > 0.5, as_tuple=True)
    assert rows.float().mean() == pytest.approx(13.0) and cols.float().mean() == pytest.approx(13.0)
    with pytest.raises(ValueError, match="centres"):
        perturb(image, "position", 1)
    with pytest.raises(ValueError, match="property"):
        perturb(image, "hue", 1)


def test_influences_are_signed_normalised_and_explain_the_model_similarity(disc_images) -> None:
    torch.manual_seed(0)
    model = create_model("bcos_cnn_small", in_channels=1, num_classes=2, n_shot=1, proj_dim=16)
    cases, _, _ = disc_images(3, 32, seed=1)
    supports, _, _ = disc_images(2, 32, seed=2)
    pairs = torch.tensor([[0, 0], [0, 1], [1, 0], [2, 1]])
    result = why_similar(model, cases, supports, pairs)
    assert result.influence.shape == (4, len(PROPERTIES))
    assert torch.allclose(result.influence.abs().sum(dim=1), torch.ones(4), atol=1e-6)
    # The similarity explained is the model's own: the support's vector is its embedding.
    with torch.no_grad():
        model.eval()
        model.set_support(model.embed(supports), torch.tensor([0, 1]))
        expected = model.similarities(model.embed(cases))
    assert torch.allclose(result.similarity, expected[pairs[:, 0], pairs[:, 1]], rtol=1e-5)
    again = why_similar(model, cases, supports, pairs)
    assert torch.equal(again.influence, result.influence)
    assert set(result.as_dict(0)) == set(PROPERTIES)


def test_support_profiles_average_the_pairs_of_each_support() -> None:
    influence = torch.tensor([[1.0, 0, 0, 0, 0], [0, 1.0, 0, 0, 0], [0, 0, -1.0, 0, 0]])
    result = WhySimilar(similarity=torch.ones(3), drop=influence, influence=influence)
    profiles = support_profiles(result, torch.tensor([0, 0, 1]), num_supports=3)
    assert torch.allclose(profiles[0], torch.tensor([0.5, 0.5, 0, 0, 0]))
    assert torch.allclose(profiles[1], torch.tensor([0, 0, -1.0, 0, 0]))
    assert profiles[2].isnan().all()


def test_why_line_names_the_two_strongest_reasons() -> None:
    line = why_line([0.05, 0.46, 0.31, -0.1, 0.08])
    assert line == "similar mainly through contrast (0.46) and texture (0.31)"
    assert why_line([-0.5, -0.5, 0, 0, 0]) == "no tested property carries this similarity"


def test_mlflow_keys_follow_the_properties() -> None:
    from sic_core.wire import WhyMetric

    assert [str(key) for key in WhyMetric] == [f"why/{p}" for p in PROPERTIES]
