"""The site's side of the federated calibration, and evaluation with calibrated probabilities."""

from __future__ import annotations

import json

import pytest
import torch
from flwr.app import ConfigRecord

from client.app import round_calibration
from client.training import calibration_statistics, evaluate_locally
from sic_core import create_model
from sic_core.calibration import Calibration, fit_calibration, raw_probabilities
from sic_core.errors import SiteError
from sic_core.metrics import balanced_accuracy, expected_calibration_error
from sic_core.support import SupportSet
from sic_core.wire import ConfigKey


def _site(seed: int, n: int = 40) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 2
    images = 0.3 * torch.rand(n, 1, 16, 16, generator=generator)
    images[labels == 1, :, 4:10, 4:10] += 0.6
    return images.clamp(0, 1), labels


@pytest.fixture
def model_and_support():
    torch.manual_seed(0)
    model = create_model("bcos_cnn_small", in_channels=1, num_classes=2, n_shot=1, proj_dim=8)
    images, labels = _site(0)
    with torch.no_grad():
        model.eval()
        vectors = torch.stack([model.embed(images[labels == c]).mean(0) for c in (0, 1)])
    support = SupportSet(
        vectors=vectors, labels=torch.tensor([0, 1]), indices=torch.tensor([-1, -1])
    )
    return model, support


def test_a_site_sends_counts_of_its_validation_cases_only(model_and_support) -> None:
    model, support = model_and_support
    train, train_labels = _site(0)
    val, val_labels = _site(1, n=30)
    histogram = calibration_statistics(model, support, train, train_labels, val, val_labels)
    assert histogram.cases == 30
    assert histogram.counts.dtype == torch.int64
    # Shuffling the cases changes nothing that is sent.
    order = torch.randperm(30, generator=torch.Generator().manual_seed(3))
    shuffled = calibration_statistics(
        model, support, train, train_labels, val[order], val_labels[order]
    )
    assert torch.equal(shuffled.counts, histogram.counts)


def test_evaluation_reports_calibrated_and_raw_ece_with_auroc_unchanged(model_and_support) -> None:
    model, support = model_and_support
    train, train_labels = _site(0)
    val, val_labels = _site(1, n=40)
    histogram = calibration_statistics(model, support, train, train_labels, val, val_labels)
    calibration = fit_calibration(histogram)
    raw = evaluate_locally(model, support, train, train_labels, val, val_labels)
    calibrated = evaluate_locally(
        model, support, train, train_labels, val, val_labels, calibration=calibration
    )
    assert calibrated.auroc == raw.auroc
    assert calibrated.expected_calibration_error_raw == raw.expected_calibration_error
    model.set_support(calibrated.local_support.vectors, calibrated.local_support.labels)
    with torch.no_grad():
        logits = model(val)
    assert raw.expected_calibration_error == pytest.approx(
        expected_calibration_error(raw_probabilities(logits), val_labels)
    )
    assert calibrated.reliability_raw == raw.reliability
    assert set(calibrated.intervals) == {
        "perf/auroc",
        "perf/auroc_global_support",
        "perf/balanced_accuracy",
        "perf/ece",
    }
    interval = calibrated.intervals["perf/auroc"]
    assert interval is not None and interval.low <= calibrated.auroc <= interval.high


def test_the_round_calibration_is_read_from_the_evaluate_config() -> None:
    calibration = Calibration(slopes=(1.5, 1.5), intercepts=(0.0, 0.0), cases=40)
    config = ConfigRecord({str(ConfigKey.CALIBRATION): json.dumps(calibration.to_dict())})
    assert round_calibration(config, 2) == calibration
    assert round_calibration(ConfigRecord({}), 2) is None
    with pytest.raises(SiteError, match="classes"):
        round_calibration(config, 3)
    bad = ConfigRecord({str(ConfigKey.CALIBRATION): json.dumps({"method": "isotonic"})})
    with pytest.raises(SiteError, match="method"):
        round_calibration(bad, 2)


def test_the_bootstrap_statistics_are_the_metrics() -> None:
    from client.training import _balanced_accuracy_of, _ece_of

    generator = torch.Generator().manual_seed(0)
    probabilities = torch.softmax(3 * torch.randn(50, 2, generator=generator), dim=1)
    labels = torch.randint(2, (50,), generator=generator)
    index = torch.randint(50, (50,), generator=generator)
    expected = expected_calibration_error(probabilities[index], labels[index])
    assert _ece_of(probabilities, labels)(index) == pytest.approx(expected, abs=1e-12)
    predicted = probabilities.argmax(dim=1)
    assert _balanced_accuracy_of(predicted, labels)(index) == pytest.approx(
        balanced_accuracy(predicted[index], labels[index]), abs=1e-12
    )
