"""Temperature (and bias) fitting, ECE and reliability bins, the task file, and calibrated predictions."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from evaluation.metrics import ECE_BINS, METRICS, calibration_error, classification_metrics, reliability_bins
from modeling_agriclip.calibration import Calibration, TaskFile, calibration_nll, fit_calibration


def _overconfident_logits(n=400, classes=5, seed=0):
    """Logits whose softmax is far too confident: informative, scaled up 6 times."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(classes, (n,), generator=generator)
    logits = torch.randn(n, classes, generator=generator)
    logits[torch.arange(n), labels] += 1.0
    return 6.0 * logits, labels


def _grid_nll(logits, labels, sigmoid, temperatures, biases):
    """The NLL on every grid point, computed by hand in numpy (log-sum-exp and log-sigmoid written out)."""
    z, y = logits.double().numpy(), labels.numpy()
    values = np.empty((len(temperatures), len(biases)))
    for i, temperature in enumerate(temperatures):
        for j, bias in enumerate(biases):
            scaled = z / temperature + bias
            if sigmoid:
                targets = np.eye(z.shape[1])[y]
                # -log sigmoid(x) = log(1 + exp(-x)); -log(1 - sigmoid(x)) = log(1 + exp(x))
                values[i, j] = np.mean(targets * np.logaddexp(0, -scaled) + (1 - targets) * np.logaddexp(0, scaled))
            else:
                top = scaled.max(axis=1, keepdims=True)
                log_normaliser = top[:, 0] + np.log(np.exp(scaled - top).sum(axis=1))
                values[i, j] = np.mean(log_normaliser - scaled[np.arange(len(y)), y])
    return values


def test_temperature_fit_matches_a_grid_search_of_the_nll():
    logits, labels = _overconfident_logits()
    fitted = fit_calibration(logits, labels, sigmoid=False)
    temperatures = np.exp(np.linspace(np.log(0.5), np.log(40.0), 2001))
    grid = _grid_nll(logits, labels, False, temperatures, [0.0])[:, 0]
    best = temperatures[grid.argmin()]
    assert fitted.bias == 0.0
    assert fitted.temperature == pytest.approx(best, rel=3e-3)
    # The fit reaches the grid's minimum NLL and makes no grid point better.
    fitted_nll = _grid_nll(logits, labels, False, [fitted.temperature], [0.0])[0, 0]
    assert fitted_nll <= grid.min() + 1e-9
    assert fitted.temperature > 2.0  # the logits were scaled up: the fit undoes it


def test_siglip_temperature_and_bias_match_a_grid_search_of_the_binary_nll():
    logits, labels = _overconfident_logits(n=200, classes=4, seed=1)
    logits = logits - 5.0  # SigLIP logits: a negative bias, most pairs negatives
    fitted = fit_calibration(logits, labels, sigmoid=True)
    temperatures = np.exp(np.linspace(np.log(0.5), np.log(30.0), 301))
    biases = np.linspace(-6.0, 6.0, 241)
    grid = _grid_nll(logits, labels, True, temperatures, biases)
    i, j = np.unravel_index(grid.argmin(), grid.shape)
    assert fitted.temperature == pytest.approx(temperatures[i], rel=0.02)
    assert fitted.bias == pytest.approx(biases[j], abs=0.06)
    assert _grid_nll(logits, labels, True, [fitted.temperature], [fitted.bias])[0, 0] <= grid.min() + 1e-9


def test_calibration_keeps_the_ranking_and_lowers_the_nll():
    logits, labels = _overconfident_logits(seed=2)
    calibration = fit_calibration(logits[:200], labels[:200], sigmoid=False)
    held_out, held_labels = logits[200:], labels[200:]
    calibrated = calibration.apply(held_out)
    assert torch.equal(calibrated.argmax(dim=1), held_out.argmax(dim=1))
    assert calibration_nll(calibrated, held_labels, False) < calibration_nll(held_out, held_labels, False)
    before = classification_metrics(held_out, held_labels, 5)
    after = classification_metrics(calibrated, held_labels, 5)
    assert after["top1"] == before["top1"] and after["ece"] < before["ece"]


def test_ece_matches_a_computation_by_hand():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 0.0], [0.5, 0.0], [0.0, 4.0], [1.0, 1.0]])
    labels = torch.tensor([0, 0, 0, 1, 1, 1])
    # By hand: softmax top-1 confidences, correctness, the 15 bins ((m-1)/15, m/15].
    confidences = [1 / (1 + np.exp(-2)), 1 / (1 + np.exp(-1)), 1 / (1 + np.exp(-3)), 1 / (1 + np.exp(-0.5))]
    confidences += [1 / (1 + np.exp(-4)), 0.5]
    correct = [1, 0, 1, 0, 1, 0]  # the tie [1, 1] predicts class 0
    gaps = {}
    for confidence, hit in zip(confidences, correct):
        index = int(np.ceil(confidence * 15)) - 1
        gaps.setdefault(index, []).append(hit - confidence)
    expected = sum(abs(sum(values)) for values in gaps.values()) / 6
    # The suite's confidences are float32 softmaxes, so agree to float32 precision.
    assert classification_metrics(logits, labels, 2)["ece"] == pytest.approx(expected, abs=1e-7)
    bins = reliability_bins(torch.tensor(confidences), torch.tensor(correct))
    assert sum(bins["count"]) == 6 and len(bins["count"]) == ECE_BINS
    assert calibration_error(bins) == pytest.approx(expected, abs=1e-12)
    assert not METRICS["ece"].higher_is_better


def test_reliability_bins_of_several_runs_add_up():
    confidences, correct = torch.rand(50, generator=torch.Generator().manual_seed(0)), torch.rand(50) > 0.5
    first, second = reliability_bins(confidences[:20], correct[:20]), reliability_bins(confidences[20:], correct[20:])
    pooled = {key: list(np.add(first[key], second[key])) for key in first}
    assert pooled == pytest.approx(reliability_bins(confidences, correct))


def _task(**changes):
    fields = dict(labels=["rust", "healthy"], templates=["a photo of {}."], objective="infonce", temperature=2.5)
    return TaskFile(**{**fields, **changes})


def test_task_file_round_trips_and_refuses_other_labels_or_templates(tmp_path):
    path = tmp_path / "task.json"
    task = _task(embedding="fused", fusion_weight=0.3, model="m", shots_per_class=4, seed=0)
    task.save(path)
    document = json.loads(path.read_text())
    assert document["format"] == "agriclip-task" and document["version"] == 1
    loaded = TaskFile.load(path)
    assert loaded == task and loaded.calibration == Calibration(2.5, 0.0)
    loaded.check_task(path, ["healthy", "rust"], ["a photo of {}."])
    with pytest.raises(ValueError, match="task.json was fitted for the labels"):
        loaded.check_task(path, ["rust", "blight"], ["a photo of {}."])
    with pytest.raises(ValueError, match="fitted with the templates"):
        loaded.check_task(path, ["rust", "healthy"], ["{}"])


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"temperature": 0}, "temperature"),
        ({"temperature": "2"}, "temperature"),
        ({"labels": []}, "labels"),
        ({"objective": "softmax"}, "objective"),
        ({"fusion_weight": 1.5}, "fusion_weight"),
        ({"embedding": "dino"}, "embedding"),
    ],
)
def test_task_file_errors_name_the_file_and_the_field(tmp_path, change, field):
    path = tmp_path / "task.json"
    _task().save(path)
    path.write_text(json.dumps({**json.loads(path.read_text()), **change}))
    with pytest.raises(ValueError, match=f"task.json: field '{field}'"):
        TaskFile.load(path)
    path.write_text("{not json")
    with pytest.raises(ValueError, match="task.json: not a JSON task file"):
        TaskFile.load(path)


def test_calibrated_predict_divides_the_logits_by_the_temperature(tiny_model, tiny_processor, sample_images):
    from modeling_agriclip.zero_shot import ZeroShotClassifier

    classifier = ZeroShotClassifier(tiny_model, tiny_processor, embedding="aligned")
    labels, templates = ["leaf rust", "healthy leaf", "leaf spot"], ["a photo of {}."]
    calibration = Calibration(temperature=0.25)
    logits = classifier.logits(sample_images, labels, templates)
    predicted = classifier.predict(sample_images, labels, templates, top_k=3, calibration=calibration)
    expected = F.softmax(logits * 4.0, dim=-1)
    for row, probabilities in zip(predicted, expected):
        assert [item["score"] for item in row] == pytest.approx(sorted(probabilities.tolist(), reverse=True), abs=1e-6)
