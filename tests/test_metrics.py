"""The local `evaluate` metric modules: they load with the network off and match hand-computed values."""

import math
import socket

import evaluate
import numpy as np
import pytest
import torch
from evaluate.loading import get_imports

from evaluation.metrics import (
    CHANCE_KEYS,
    ECE_BINS,
    METRIC_KEYS,
    METRIC_NAMES,
    METRICS,
    METRICS_DIR,
    NonFiniteError,
    classification_metrics,
    classification_metrics_from_modules,
    confusion_matrix,
    load_metric,
    per_class_accuracy,
)


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
    [0.25, 0.25, 0.4, 0.1],  # reference 1: tied with class 0, which ranks first (the lower index): third
]
REFERENCES = [2, 0, 2, 1]


@pytest.mark.parametrize("k, expected", [(1, 1 / 4), (2, 2 / 4), (3, 3 / 4), (4, 1.0)])
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
    assert metric.compute(predictions=predictions, references=references)["macro_f1"] == pytest.approx(
        (4 / 6 + 0.5 + 0.5) / 3
    )
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


def test_per_class_accuracy_from_the_confusion_matrix_matches_the_metric_module(no_network):
    generator = torch.Generator().manual_seed(1)
    scores = torch.randn(60, 6, generator=generator)
    labels = torch.randint(0, 5, (60,), generator=generator)  # class 5 has no images
    per_class = per_class_accuracy(confusion_matrix(scores, labels, 6))
    predictions = scores.argmax(dim=1)
    direct = [(predictions[labels == c] == c).float().mean().item() for c in range(5)]
    assert per_class[:5] == pytest.approx(direct) and per_class[5] is None
    module = load_metric("mean_per_class_accuracy").compute(predictions=predictions, references=labels)
    assert per_class[:5] == pytest.approx([module["per_class_accuracy"][c] for c in range(5)])
    assert np.mean(per_class[:5]) == pytest.approx(classification_metrics(scores, labels, 6)["mean_per_class"])


def test_classification_metrics_top5_is_none_with_five_classes_or_fewer():
    metrics = classification_metrics(torch.eye(5), torch.arange(5), num_classes=5)
    # ECE: every image right, each with the softmax confidence e / (e + 4) of logits [1, 0, 0, 0, 0].
    ece = 1 - math.e / (math.e + 4)
    assert metrics == {"top1": 1.0, "top5": None, "mean_per_class": 1.0, "macro_f1": 1.0, "ece": pytest.approx(ece)}
    with pytest.raises(ValueError, match=r"scores must have shape \(5, 6\)"):
        classification_metrics(torch.eye(5), torch.arange(5), num_classes=6)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_scores_are_an_error_not_a_number(bad, no_network):
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    # An all-NaN matrix scored top-1 = 1.0: a NaN compares False, so no class "scored strictly higher".
    with pytest.raises(NonFiniteError, match=r"^the model gave non-finite scores \(6 of 6 examples\)$"):
        classification_metrics(torch.full((6, 3), bad), labels, num_classes=3)
    scores = torch.eye(3)[labels]
    scores[[1, 4], 2] = bad
    with pytest.raises(NonFiniteError, match=r"\(2 of 6 examples\)"):
        classification_metrics(scores, labels, num_classes=3)
    with pytest.raises(NonFiniteError, match=r"\(2 of 6 examples\)"):
        confusion_matrix(scores, labels, num_classes=3)
    # The metric module refuses them too, for callers that load it alone.
    with pytest.raises(ValueError, match=r"NaN or infinite scores in 2 of 6 rows"):
        load_metric("topk_accuracy").compute(predictions=scores.tolist(), references=labels.tolist(), k=1)


def _brute_force_metrics(scores: torch.Tensor, labels: torch.Tensor, num_classes: int) -> dict:
    """The ranking rule spelled out with Python's sort: by score, highest first, then by class index, lowest first."""
    ranks, predictions = [], []
    for row, label in zip(scores.tolist(), labels.tolist()):
        order = sorted(range(num_classes), key=lambda c: (-row[c], c))
        ranks.append(order.index(label))
        predictions.append(order[0])
    pairs = list(zip(labels.tolist(), predictions))
    recalls = [
        sum(predicted == c for label, predicted in pairs if label == c) / labels.tolist().count(c)
        for c in sorted(set(labels.tolist()))
    ]
    f1 = []
    for c in sorted(set(labels.tolist()) | set(predictions)):
        true_positives = sum(label == predicted == c for label, predicted in pairs)
        wrong = sum((label == c) != (predicted == c) for label, predicted in pairs)
        f1.append(2 * true_positives / (2 * true_positives + wrong))
    confusion = [[0] * num_classes for _ in range(num_classes)]
    for label, predicted in pairs:
        confusion[label][predicted] += 1
    # ECE: softmax of each row, binned by its top-1 probability into 15 bins ((m-1)/15, m/15].
    gaps = [0.0] * 15
    for row, (label, predicted) in zip(scores.tolist(), pairs):
        top = max(row)
        confidence = 1 / sum(math.exp(score - top) for score in row)
        gaps[min(max(math.ceil(confidence * 15) - 1, 0), 14)] += (label == predicted) - confidence
    return {
        "ece": sum(abs(gap) for gap in gaps) / len(pairs),
        "top1": sum(rank < 1 for rank in ranks) / len(ranks),
        "top5": sum(rank < 5 for rank in ranks) / len(ranks),
        "mean_per_class": sum(recalls) / len(recalls),
        "macro_f1": sum(f1) / len(f1),
        "confusion_matrix": confusion,
    }


@pytest.mark.parametrize("case", ["scores from {0, 1, 2}", "every score equal"])
def test_every_metric_breaks_ties_as_argmax_does(case, no_network):
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 7, (60,), generator=generator)
    if case == "every score equal":  # what prompts that all tie give
        scores = torch.full((60, 7), 0.25)
    else:
        scores = torch.randint(0, 3, (60, 7), generator=generator).float()
    expected = _brute_force_metrics(scores, labels, 7)
    metrics = classification_metrics(scores, labels, num_classes=7)
    assert {key: metrics[key] for key in ("top1", "top5", "mean_per_class", "macro_f1")} == pytest.approx(
        {key: expected[key] for key in ("top1", "top5", "mean_per_class", "macro_f1")}
    )
    assert confusion_matrix(scores, labels, num_classes=7) == expected["confusion_matrix"]
    # One rule: top-1 is the confusion matrix's diagonal share.
    assert metrics["top1"] == pytest.approx(np.trace(expected["confusion_matrix"]) / 60)
    if case == "every score equal":
        assert metrics["top1"] == pytest.approx((labels == 0).float().mean().item())
        assert metrics["top5"] == pytest.approx((labels < 5).float().mean().item())


# ---------------------------------------------------------------------------------------------------------------
# The tensor path against the `evaluate`-module path it replaced in the suite's inner loop
# ---------------------------------------------------------------------------------------------------------------


def _equivalence_case(case: str) -> tuple[torch.Tensor, torch.Tensor, int]:
    generator = torch.Generator().manual_seed(sum(map(ord, case)))
    if case == "random":
        return torch.randn(300, 12, generator=generator), torch.randint(0, 12, (300,), generator=generator), 12
    if case == "class never in the labels":  # classes 9 and 10 have no images, but are predicted
        return torch.randn(200, 11, generator=generator), torch.randint(0, 9, (200,), generator=generator), 11
    if case == "class never in the labels nor predicted":
        scores = torch.randn(200, 8, generator=generator)
        scores[:, 7] = -10.0
        return scores, torch.randint(0, 7, (200,), generator=generator), 8
    if case == "ties in scores":
        return (
            torch.randint(0, 3, (250, 9), generator=generator).float(),
            torch.randint(0, 9, (250,), generator=generator),
            9,
        )
    if case == "every score equal":
        return torch.zeros(40, 7), torch.randint(0, 7, (40,), generator=generator), 7
    if case == "3 classes, no top-5":
        return torch.randn(90, 3, generator=generator), torch.randint(0, 3, (90,), generator=generator), 3
    if case == "6 classes, top-5 just reported":
        return torch.randn(90, 6, generator=generator), torch.randint(0, 6, (90,), generator=generator), 6
    if case == "one example":
        return torch.randn(1, 8, generator=generator), torch.tensor([3]), 8
    if case == "float64 scores that tie once cast to float32":
        scores = torch.randn(120, 8, generator=generator, dtype=torch.float64)
        scores[:, 1] = scores[:, 0] + 1e-12  # distinct in float64, equal in float32 (the modules' storage type)
        return scores, torch.randint(0, 8, (120,), generator=generator), 8
    if case == "int32 labels":
        return torch.randn(100, 10, generator=generator), torch.randint(0, 10, (100,), generator=generator).int(), 10
    if case == "1,000 classes":
        labels = torch.randint(0, 1000, (3000,), generator=generator)
        # Scores leaning to the reference, so that every metric is far from 0, plus some ties.
        scores = torch.randn(3000, 1000, generator=generator)
        scores[torch.arange(3000), labels] += 2.5
        scores[:500] = scores[:500].round()
        return scores, labels, 1000
    raise AssertionError(case)


EQUIVALENCE_CASES = [
    "random",
    "class never in the labels",
    "class never in the labels nor predicted",
    "ties in scores",
    "every score equal",
    "3 classes, no top-5",
    "6 classes, top-5 just reported",
    "one example",
    "float64 scores that tie once cast to float32",
    "int32 labels",
    "1,000 classes",
]


@pytest.mark.parametrize("case", EQUIVALENCE_CASES)
def test_tensor_metrics_equal_the_evaluate_module_path(case, no_network):
    scores, labels, num_classes = _equivalence_case(case)
    fast = classification_metrics(scores, labels, num_classes)
    reference = classification_metrics_from_modules(scores, labels, num_classes)
    assert fast.keys() == reference.keys() == set(METRIC_KEYS) >= {"top1", "top5", "mean_per_class", "macro_f1", "ece"}
    # The same operations on the same counts: equal to the last bit, not only to float tolerance.
    assert fast == reference
    assert all(isinstance(value, float) for value in fast.values() if value is not None)
    assert (fast["top5"] is None) == (num_classes <= 5)


@pytest.mark.parametrize("case", ["random", "ties in scores", "every score equal", "class never in the labels"])
def test_tensor_metrics_equal_the_brute_force_ranking(case):
    scores, labels, num_classes = _equivalence_case(case)
    expected = _brute_force_metrics(scores, labels, num_classes)
    metrics = classification_metrics(scores, labels, num_classes)
    assert metrics == pytest.approx({key: expected[key] for key in metrics})
    assert confusion_matrix(scores, labels, num_classes) == expected["confusion_matrix"]


def test_tensor_metrics_chunked_ranking_matches_one_chunk(monkeypatch):
    import evaluation.metrics as metrics_module

    scores, labels, num_classes = _equivalence_case("ties in scores")
    whole = classification_metrics(scores, labels, num_classes)
    monkeypatch.setattr(metrics_module, "_RANK_CHUNK_ELEMENTS", 7 * num_classes)  # 7 rows a chunk, a ragged last one
    assert classification_metrics(scores, labels, num_classes) == whole


def test_confusion_matrix_matches_the_module_predictions():
    scores, labels, num_classes = _equivalence_case("class never in the labels")
    confusion = np.asarray(confusion_matrix(scores, labels, num_classes))
    predictions = scores.numpy().argmax(axis=1)
    expected = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(expected, (labels.numpy(), predictions), 1)
    assert (confusion == expected).all() and confusion[9:].sum() == 0 and confusion[:, 9:].sum() > 0


def test_labels_outside_the_classes_are_an_error():
    with pytest.raises(ValueError, match=r"labels must be class ids in \[0, 3\)"):
        classification_metrics(torch.eye(3), torch.tensor([0, 1, 3]), num_classes=3)
    with pytest.raises(ValueError, match=r"labels must be class ids in \[0, 3\)"):
        confusion_matrix(torch.eye(3), torch.tensor([0, -1, 2]), num_classes=3)


def test_no_examples_is_an_error_as_in_the_module_path():
    with pytest.raises(ValueError, match="No reference examples"):
        classification_metrics(torch.zeros(0, 7), torch.zeros(0, dtype=torch.long), num_classes=7)
    with pytest.raises(ValueError):  # the top-k module refuses the empty matrix first
        classification_metrics_from_modules(torch.zeros(0, 7), torch.zeros(0, dtype=torch.long), num_classes=7)


def test_classification_metrics_does_not_load_the_evaluate_modules(monkeypatch):
    import evaluation.metrics as metrics_module

    def refuse(name):
        raise AssertionError(f"classification_metrics loaded the {name} module")

    monkeypatch.setattr(metrics_module, "load_metric", refuse)
    scores, labels, num_classes = _equivalence_case("random")
    classification_metrics(scores, labels, num_classes)


# ---------------------------------------------------------------------------------------------------------------
# The table of metrics, and expected calibration error
# ---------------------------------------------------------------------------------------------------------------


def _probability_scores(rows):
    """Scores whose softmax is `rows` (probabilities): their logarithms, the logits of those probabilities."""
    return torch.tensor(rows, dtype=torch.float64).log()


def test_ece_matches_a_hand_computation():
    # (softmax probabilities, reference): confidence is the top probability, bins are ((m-1)/15, m/15].
    rows = [
        ([0.90, 0.10], 0),  # right, confidence 0.90: bin 13 (0.867, 0.933]
        ([0.90, 0.10], 1),  # wrong, 0.90: bin 13
        ([0.38, 0.62], 1),  # right, 0.62: bin 9 (0.600, 0.667]
        ([0.30, 0.70], 1),  # right, 0.70: bin 10 (0.667, 0.733]
        ([0.55, 0.45], 1),  # wrong, 0.55: bin 8 (0.533, 0.600]
        ([0.42, 0.58], 1),  # right, 0.58: bin 8
    ]
    scores = _probability_scores([p for p, _ in rows])
    labels = torch.tensor([label for _, label in rows])
    # Per bin, |B|/N * |acc - conf| = |sum(correct - confidence)| / N:
    # bin 13: |2 * (1/2 - 0.90)| = 0.80; bin 9: |1 - 0.62| = 0.38; bin 10: |1 - 0.70| = 0.30;
    # bin 8: |(0 - 0.55) + (1 - 0.58)| = 0.13 (within a bin, over- and under-confidence cancel).
    expected = (0.80 + 0.38 + 0.30 + 0.13) / 6
    assert classification_metrics(scores, labels, 2)["ece"] == pytest.approx(expected, abs=1e-6)
    # Logits up to a constant per row are the same softmax; a temperature is not.
    shifted = scores + torch.arange(6, dtype=torch.float64)[:, None]
    assert classification_metrics(shifted, labels, 2)["ece"] == pytest.approx(expected, abs=1e-6)
    assert classification_metrics(scores * 3, labels, 2)["ece"] != pytest.approx(expected, abs=1e-3)
    assert ECE_BINS == 15


def _synthetic_confidences(n: int, overconfidence: float, seed: int = 0):
    """Two-class scores whose top-1 softmax probability is p ~ U(0.5, 1), right with probability p - overconfidence."""
    generator = torch.Generator().manual_seed(seed)
    confidence = 0.5 + 0.5 * torch.rand(n, generator=generator, dtype=torch.float64)
    right = torch.rand(n, generator=generator, dtype=torch.float64) < (confidence - overconfidence)
    scores = torch.stack([confidence, 1 - confidence], dim=1).log()
    return scores, (~right).long()  # class 0 is always predicted: the reference is 0 when right, else 1


def test_ece_of_calibrated_data_is_about_zero_and_of_overconfident_data_its_gap():
    scores, labels = _synthetic_confidences(100_000, overconfidence=0.0)
    metrics = classification_metrics(scores, labels, 2)
    assert metrics["ece"] < 0.01  # sampling noise only: about sqrt(15 * 0.2 / N)
    scores, labels = _synthetic_confidences(100_000, overconfidence=0.15)
    metrics = classification_metrics(scores, labels, 2)
    # Accuracy is 0.15 below confidence in every bin (the p - 0.15 stay inside [0, 1] for p in [0.5, 1]).
    assert metrics["ece"] == pytest.approx(0.15, abs=0.01)
    assert metrics["top1"] == pytest.approx(0.75 - 0.15, abs=0.01)


def test_every_metric_of_the_table_is_computed_by_both_paths_and_described():
    scores, labels, num_classes = _equivalence_case("random")
    assert list(classification_metrics(scores, labels, num_classes)) == list(METRIC_KEYS) == list(METRICS)
    assert list(classification_metrics_from_modules(scores, labels, num_classes)) == list(METRIC_KEYS)
    for key, metric in METRICS.items():
        assert metric.key == key and metric.title and metric.hub_type
        assert (metric.chance is not None) == (key in CHANCE_KEYS)
    # Balanced accuracy is not a row of its own: for single-label data it is the mean per-class recall.
    assert "balanced_accuracy" not in METRICS and METRICS["ece"].higher_is_better is False
