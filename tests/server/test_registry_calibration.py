"""The registered pyfunc's probabilities are the run's calibrated ones."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import torch

from server.registry import CHECKPOINT_ARTIFACT, SicPyfuncModel
from sic_core import create_model
from sic_core.calibration import Calibration, calibrated_probabilities
from sic_core.checkpoint import save_checkpoint


def _pyfunc(tmp_path, calibration: Calibration | None):
    torch.manual_seed(0)
    model = create_model("bcos_cnn_small", in_channels=1, num_classes=2, n_shot=1, proj_dim=8)
    model.set_support(torch.rand(2, 8) + 0.1, torch.tensor([0, 1]))
    path = save_checkpoint(
        tmp_path / "model.pt",
        model,
        metadata={
            "image_size": 16,
            "calibration": calibration.to_dict() if calibration else None,
        },
    )
    wrapper = SicPyfuncModel()
    wrapper.load_context(SimpleNamespace(artifacts={CHECKPOINT_ARTIFACT: str(path)}))
    return wrapper, model.eval()


def test_probabilities_use_the_checkpointed_calibration(tmp_path) -> None:
    calibration = Calibration(slopes=(3.0, 3.0), intercepts=(0.0, 0.0), cases=50)
    wrapper, model = _pyfunc(tmp_path, calibration)
    images = torch.rand(5, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    out = wrapper.predict(None, images.numpy())
    with torch.no_grad():
        expected = calibrated_probabilities(model(images), calibration).float().numpy()
    np.testing.assert_allclose(out["probabilities"], expected, atol=1e-6)
    np.testing.assert_allclose(out["probabilities"].sum(axis=1), 1.0, atol=1e-6)


def test_a_checkpoint_without_calibration_keeps_the_sigmoids(tmp_path) -> None:
    wrapper, model = _pyfunc(tmp_path, None)
    images = torch.rand(3, 1, 16, 16, generator=torch.Generator().manual_seed(2))
    out = wrapper.predict(None, images.numpy())
    with torch.no_grad():
        expected = torch.sigmoid(model(images)).numpy()
    np.testing.assert_allclose(out["probabilities"], expected, atol=1e-6)
