"""The local `evaluate` metric modules: they load with the network off and match hand-computed values."""

import socket

import evaluate
import numpy as np
import pytest
import torch
from evaluate.loading import get_imports

from evaluation.metrics import METRIC_NAMES, METRICS_DIR, classification_metrics, load_metric


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a connection fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.mark.parametrize("name", METRIC_NAMES)
def test_metric_modules_load_offline(name, no_network):
    by_name = load_metric(name)
    by_folder = evaluate.load(str(METRICS_DIR / name))
    assert isinstance(by_name, evaluate.Metric) and type(by_folder).__name__ == type(by_name).__name__


@pytest.mark.parametrize("name", METRIC_NAMES)
def test_metric_modules_declare_one_import_per_line(name):
    # evaluate scans the script line by line: `import a, b` would hide `b` from its dependency check.
    libraries = {import_name for kind, import_name, _, _ in get_imports(str(METRICS_DIR / name / f"{name}.py"))}
    assert libraries == {"datasets", "evaluate", "numpy"}


def test_unknown_metric_name_is_an_error():
    with pytest.raises(ValueError, match="Unknown metric 'accuracy'"):
        load_metric("accuracy")


SCORES = [
    [0.1, 0.6, 0.3, 0.0],  # reference 2: second best
    [0.9, 0.05, 0.03, 0.02],  # reference 0: best
    [0.2, 0.3, 0.1, 0.4],  # reference 2: last
    [0.25, 0.25, 0.4, 0.1],  # reference 1: tied second with class 0
]
REFERENCES = [2, 0, 2, 1]


@pytest.mark.parametrize("k, expected", [(1, 1 / 4), (2, 3 / 4), (3, 3 / 4), (4, 1.0)])
def test_topk_accuracy_matches_hand_values(k, expected, no_network):
    result = load_metric("topk_accuracy").compute(predictions=SCORES, references=REFERENCES, k=k)
    assert result["top_k_accuracy"] == pytest.approx(expected)


def test_topk_accuracy_rejects_k_above_class_count():
    with pytest.raises(ValueError, match="k must be between 1 and the number of classes"):
        load_metric("topk_accuracy").compute(predictions=SCORES, references=REFERENCES, k=5)


def test_mean_per_class_accuracy_matches_hand_values(no_network):
    metric = load_metric("mean_per_class_accuracy")
    predictions = [0, 0, 1, 1, 2, 0, 2]
    references = [0, 0, 0, 1, 1, 2, 2]
    # Recalls: class 0 2/3, class 1 1/2, class 2 1/2.
    result = metric.compute(predictions=predictions, references=references)
    assert result["mean_per_class_accuracy"] == pytest.approx((2 / 3 + 1 / 2 + 1 / 2) / 3)
    assert result["per_class_accuracy"] == pytest.approx({0: 2 / 3, 1: 1 / 2, 2: 1 / 2})
    # A requested class without references is left out of the mean, not counted as 0.
    restricted = metric.compute(predictions=predictions, references=references, labels=[0, 1, 3])
    assert restricted["mean_per_class_accuracy"] == pytest.approx((2 / 3 + 1 / 2) / 2)


def test_macro_f1_matches_hand_values(no_network):
    metric = load_metric("macro_f1")
    predictions = [0, 0, 1, 1, 2, 0, 2]
    references = [0, 0, 0, 1, 1, 2, 2]
    # Class 0: TP 2, FP 1, FN 1 -> 4/6. Class 1: TP 1, FP 1, FN 1 -> 2/4. Class 2: TP 1, FP 1, FN 1 -> 2/4.
    assert metric.compute(predictions=predictions, references=references)["macro_f1"] == pytest.approx((4 / 6 + 0.5 + 0.5) / 3)
    # A predicted class that never occurs scores 0 and counts (scikit-learn's default label set).
    result = metric.compute(predictions=[0, 3], references=[0, 0])
    assert result["macro_f1"] == pytest.approx((2 / 3 + 0.0) / 2)
    assert metric.compute(predictions=[0, 3], references=[0, 0], labels=[0])["macro_f1"] == pytest.approx(2 / 3)


def test_classification_metrics_agree_with_direct_computation():
    generator = torch.Generator().manual_seed(0)
    scores = torch.randn(50, 7, generator=generator)
    labels = torch.randint(0, 7, (50,), generator=generator)
    metrics = classification_metrics(scores, labels, num_classes=7)
    predictions = scores.argmax(dim=1)
    assert metrics["top1"] == pytest.approx((predictions == labels).float().mean().item())
    top5 = (scores.topk(5, dim=1).indices == labels[:, None]).any(dim=1)
    assert metrics["top5"] == pytest.approx(top5.float().mean().item())
    recalls = [(predictions[labels == c] == c).float().mean().item() for c in labels.unique()]
    assert metrics["mean_per_class"] == pytest.approx(np.mean(recalls))
    assert 0.0 <= metrics["macro_f1"] <= 1.0


def test_classification_metrics_top5_is_none_with_five_classes_or_fewer():
    metrics = classification_metrics(torch.eye(5), torch.arange(5), num_classes=5)
    assert metrics == {"top1": 1.0, "top5": None, "mean_per_class": 1.0, "macro_f1": 1.0}
    with pytest.raises(ValueError, match=r"scores must have shape \(5, 6\)"):
        classification_metrics(torch.eye(5), torch.arange(5), num_classes=6)
