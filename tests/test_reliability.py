"""AUROC, selective accuracy and the abstention record (`evaluation.reliability`), against computations by hand."""

import itertools

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from evaluation.metrics import auroc, selective_accuracy
from evaluation.reliability import COVERAGE, abstention_record
from evaluation.runner import run_suite
from modeling_agriclip.calibration import Calibration
from modeling_agriclip.zero_shot import ZeroShotClassifier


def _pairwise_auroc(positives, negatives) -> float:
    """Over every (positive, negative) pair: 1 when the positive scores higher, 1/2 on a tie."""
    wins = [1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(positives, negatives)]
    return sum(wins) / len(wins)


def _by_hand_selective(confidences, correct, coverage):
    """Sorted by confidence, highest first (the earlier example first on a tie), the first round(coverage·n) kept."""
    order = sorted(range(len(confidences)), key=lambda index: -confidences[index])
    kept = order[: max(1, round(coverage * len(confidences)))]
    return float(np.mean([correct[index] for index in kept])), float(confidences[kept[-1]])


@pytest.mark.parametrize(
    ("positives", "negatives"),
    [
        ([0.9, 0.8, 0.7], [0.1, 0.2]),  # perfect separation
        ([0.1, 0.2], [0.9, 0.8, 0.7]),  # reversed
        ([0.5, 0.5, 0.5], [0.5, 0.5]),  # all tied
        ([0.3, 0.5, 0.5, 0.9], [0.5, 0.1, 0.5, 0.9, 0.2]),  # ties across and within the two sets
        ([1.0], [2.0]),
        ([2.0, 2.0], [2.0, 1.0, 3.0]),
    ],
)
def test_auroc_equals_a_brute_force_count_of_pairs(positives, negatives):
    expected = _pairwise_auroc(positives, negatives)
    assert auroc(torch.tensor(positives), torch.tensor(negatives)) == pytest.approx(expected, abs=1e-12)


def test_auroc_of_perfect_reversed_and_tied_separations_is_1_0_and_one_half():
    high, low = torch.tensor([3.0, 4.0, 5.0]), torch.tensor([0.0, 1.0])
    assert auroc(high, low) == 1.0
    assert auroc(low, high) == 0.0
    assert auroc(torch.full((4,), 0.3), torch.full((7,), 0.3)) == 0.5


def test_auroc_matches_brute_force_on_random_scores_with_many_ties():
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        positives = torch.randint(0, 6, (int(torch.randint(1, 30, (1,), generator=generator)),), generator=generator)
        negatives = torch.randint(0, 6, (int(torch.randint(1, 30, (1,), generator=generator)),), generator=generator)
        positives, negatives = positives.double() / 5, negatives.double() / 5
        assert auroc(positives, negatives) == pytest.approx(
            _pairwise_auroc(positives.tolist(), negatives.tolist()), abs=1e-12
        )


@pytest.mark.parametrize("empty", ["positives", "negatives", "both"])
def test_auroc_refuses_empty_scores(empty):
    scores = torch.tensor([0.2, 0.4])
    positives = torch.tensor([]) if empty in ("positives", "both") else scores
    negatives = torch.tensor([]) if empty in ("negatives", "both") else scores
    with pytest.raises(ValueError, match="at least one positive and one negative"):
        auroc(positives, negatives)


@pytest.mark.parametrize("coverage", [0.1, 0.25, 0.5, 0.7, 0.9, 1.0])
def test_selective_accuracy_equals_a_computation_by_hand(coverage):
    confidences = [0.91, 0.35, 0.77, 0.77, 0.12, 0.6, 0.99, 0.5, 0.77, 0.42]
    correct = [1, 0, 0, 1, 0, 1, 1, 0, 1, 1]
    expected = _by_hand_selective(confidences, correct, coverage)
    assert selective_accuracy(torch.tensor(confidences), torch.tensor(correct).bool(), coverage) == pytest.approx(
        expected
    )


def test_selective_accuracy_at_full_coverage_is_the_accuracy_and_the_lowest_confidence():
    confidences, correct = torch.tensor([0.3, 0.9, 0.6, 0.8]), torch.tensor([True, False, True, True])
    assert selective_accuracy(confidences, correct, 1.0) == pytest.approx((0.75, 0.3))
    # Half the coverage keeps the two most confident: one right, one wrong; the threshold is the lower of them.
    assert selective_accuracy(confidences, correct, 0.5) == pytest.approx((0.5, 0.8))


@pytest.mark.parametrize("coverage", [0.0, -0.1, 1.01, 2.0])
def test_selective_accuracy_refuses_a_coverage_outside_0_to_1(coverage):
    with pytest.raises(ValueError, match="coverage must be in"):
        selective_accuracy(torch.tensor([0.5, 0.6]), torch.tensor([True, False]), coverage)


def _softmax(z: np.ndarray) -> np.ndarray:
    shifted = np.exp(z - z.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


def _synthetic_task(sigmoid: bool, seed: int = 0, n_in=60, n_other=40, classes=4):
    """In-task logits, informative but noisy (some wrong), and other-task logits, lower and flatter."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(classes, (n_in,), generator=generator)
    test = 3.0 * torch.randn(n_in, classes, generator=generator)
    test[torch.arange(n_in), labels] += 5.0
    other = 3.0 * torch.randn(n_other, classes, generator=generator) + 1.0
    if sigmoid:  # SigLIP logits carry a large negative bias
        test, other = test - 8.0, other - 8.0
    return test.double(), labels, other.double()


@pytest.mark.parametrize("sigmoid", [False, True], ids=["infonce", "siglip"])
def test_abstention_record_equals_independent_computations(sigmoid):
    test, labels, other = _synthetic_task(sigmoid)
    calibrations = [Calibration(2.5, -0.5 if sigmoid else 0.0), Calibration(0.7, 1.0 if sigmoid else 0.0)]
    scale, bias = 20.0, -3.0 if sigmoid else 0.0
    record = abstention_record(test, labels, other, sigmoid, calibrations, scale, bias)

    read = _sigmoid if sigmoid else _softmax
    z_test, z_other, y = test.numpy(), other.numpy(), labels.numpy()
    p_test, p_other = read(z_test), read(z_other)
    confidences, other_confidences = p_test.max(axis=1), p_other.max(axis=1)
    correct = p_test.argmax(axis=1) == y
    accuracy, threshold = _by_hand_selective(list(confidences), list(correct), 0.9)
    calibrated = np.mean(
        [
            _pairwise_auroc(
                read(z_test / fit.temperature + fit.bias).max(axis=1),
                read(z_other / fit.temperature + fit.bias).max(axis=1),
            )
            for fit in calibrations
        ]
    )
    assert record["auroc_max_probability"] == pytest.approx(_pairwise_auroc(confidences, other_confidences))
    assert record["auroc_max_logit"] == pytest.approx(_pairwise_auroc(z_test.max(axis=1), z_other.max(axis=1)))
    assert record["top1"] == pytest.approx(correct.mean())
    assert record["coverage"] == COVERAGE == 0.9
    assert record["accuracy_at_coverage"] == pytest.approx(accuracy)
    assert record["threshold_at_coverage"] == pytest.approx(threshold)
    assert record["other_abstained_at_threshold"] == pytest.approx(np.mean(other_confidences < threshold))
    assert record["auroc_calibrated"] == pytest.approx(calibrated)
    # The similarity rule: the best label's cosine, the logit without the scale and bias.
    similarities, other_similarities = (z_test.max(axis=1) - bias) / scale, (z_other.max(axis=1) - bias) / scale
    accuracy, threshold = _by_hand_selective(list(similarities), list(correct), 0.9)
    assert record["accuracy_at_coverage_similarity"] == pytest.approx(accuracy)
    assert record["similarity_threshold_at_coverage"] == pytest.approx(threshold)
    assert record["other_abstained_at_similarity_threshold"] == pytest.approx(np.mean(other_similarities < threshold))
    assert record["n_in_task"] == 60 and record["n_other"] == 40
    # The case has teeth: some in-task photos are wrong, some other-task photos answered, some abstained.
    assert 0 < correct.mean() < 1 and 0 < record["other_abstained_at_threshold"] < 1
    assert record["accuracy_at_coverage"] >= record["top1"]


def test_a_sigmoid_reading_ranks_photos_by_the_top_logit_whatever_the_calibration():
    """Per-label sigmoids are monotone in each logit, so the top probability, calibrated or not, orders photos as
    the top logit does: the three AUROCs coincide (a softmax's need not)."""
    test, labels, other = _synthetic_task(sigmoid=True, seed=3)
    record = abstention_record(test, labels, other, True, [Calibration(3.0, 2.0)])
    assert record["auroc_max_probability"] == pytest.approx(record["auroc_max_logit"])
    assert record["auroc_calibrated"] == pytest.approx(record["auroc_max_logit"])
    softmax_record = abstention_record(test, labels, other, False, [Calibration(3.0)])
    assert softmax_record["auroc_max_probability"] != pytest.approx(softmax_record["auroc_max_logit"])


def test_abstention_record_without_calibrations_has_no_calibrated_auroc():
    test, labels, other = _synthetic_task(sigmoid=False)
    assert "auroc_calibrated" not in abstention_record(test, labels, other, False)


def test_the_top_logit_tells_apart_other_task_photos_that_the_top_probability_cannot():
    """In-task photos of a fine-grained task look alike: close to every label (high cosines), so the softmax shares
    its mass between them. An other-task photo is far from every label but much farther from all but one: its
    softmax puts nearly all its mass on that one label, above any in-task photo. The top probability then ranks
    the other-task photos first (AUROC below chance), while the top logit, a distance to the nearest label,
    separates them perfectly."""
    generator = torch.Generator().manual_seed(0)
    scale, classes = 100.0, 5
    labels = torch.arange(40) % classes
    in_task = 0.30 + 0.01 * torch.randn(40, classes, generator=generator)
    in_task[torch.arange(40), labels] += 0.03  # the right label a little closer than the look-alikes
    other = 0.05 + 0.01 * torch.randn(30, classes, generator=generator)
    other[:, 2] += 0.12  # every other-task photo near one label only (a fish photo that is "most like" one leaf)
    test_logits, other_logits = scale * in_task, scale * other
    assert (other_logits.max(dim=1).values < test_logits.max(dim=1).values.min()).all()  # farther from every label
    record = abstention_record(test_logits, labels, other_logits, sigmoid=False, logit_scale=scale)
    top_probability = _softmax(test_logits.numpy()).max(axis=1), _softmax(other_logits.numpy()).max(axis=1)
    assert record["auroc_max_probability"] == pytest.approx(_pairwise_auroc(*top_probability))
    assert record["auroc_max_probability"] < 0.5
    assert record["auroc_max_logit"] == 1.0
    # At 90 % coverage of the in-task photos the threshold answers every other-task photo: none abstained. The
    # similarity threshold of the same coverage, a cosine, answers each of them unknown.
    assert record["other_abstained_at_threshold"] == 0.0
    assert record["other_abstained_at_similarity_threshold"] == 1.0
    assert 0.2 < record["similarity_threshold_at_coverage"] < 0.4


def test_a_similarity_threshold_fitted_on_shots_is_applied_to_the_test_photos():
    """`shot_threshold`: per seed, the best-label cosine keeping 90 % of that seed's shots (as a task file records
    it), then on the test photos the share of in-task photos answered, their top-1, and the share of other-domain
    photos answered unknown; means over the seeds."""
    test, labels, other = _synthetic_task(sigmoid=False, seed=4)
    scale = 10.0
    shots = []
    for seed in (5, 6):
        shot_logits, shot_labels, _ = _synthetic_task(sigmoid=False, seed=seed, n_in=12)
        shots.append((shot_logits, shot_labels))
    record = abstention_record(test, labels, other, False, logit_scale=scale, shots=shots)["shot_threshold"]

    best, other_best = test.numpy().max(axis=1) / scale, other.numpy().max(axis=1) / scale
    correct = test.numpy().argmax(axis=1) == labels.numpy()
    runs = []
    for shot_logits, shot_labels in shots:
        shot_correct = list(shot_logits.numpy().argmax(axis=1) == shot_labels.numpy())
        _, threshold = _by_hand_selective(list(shot_logits.numpy().max(axis=1) / scale), shot_correct, 0.9)
        answered = best >= threshold
        runs.append([threshold, answered.mean(), correct[answered].mean(), np.mean(other_best < threshold)])
    expected = np.mean(runs, axis=0)
    assert [record[key] for key in ("similarity", "in_task_answered", "accuracy_answered", "other_abstained")] == (
        pytest.approx(expected.tolist())
    )
    assert record["n_shots"] == [12, 12]
    assert 0 < record["in_task_answered"] < 1 and 0 < record["other_abstained"] < 1  # the case has teeth


def _write_task(root, classes, seed, train=4, test=3):
    rng = np.random.default_rng(seed)
    for split, count in (("train", train), ("test", test)):
        for name in classes:
            (root / split / name).mkdir(parents=True)
            for index in range(count):
                image = rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)
                Image.fromarray(image).save(root / split / name / f"{index}.png")


def test_the_suite_scores_a_task_s_photos_against_other_domains_and_fits_calibration_and_threshold(
    tmp_path, tiny_model, tiny_processor
):
    """Through `run_suite`: the leaf task's test photos against the fish task's (another domain), all with the leaf
    labels; the AUROC of the top logit equals a pairwise count over the classifier's own logits."""
    _write_task(tmp_path / "leaves", ["rust", "blight", "healthy"], seed=0)
    _write_task(tmp_path / "fish", ["carp", "eel"], seed=1)
    entries = [
        {"name": name, "path": name, "split": "test", "train_split": "train", "templates": "generic", "domain": name}
        for name in ("leaves", "fish")
    ]
    config = tmp_path / "suite.yaml"
    config.write_text(yaml.safe_dump({"datasets": entries}))
    classifier = ZeroShotClassifier(tiny_model, tiny_processor, embedding="clip")
    results = run_suite(
        config, {"agri": classifier}, tmp_path / "out", calibration_shots=[2], abstention=True, seeds=[0, 1]
    )
    record = results["abstention"]["datasets"]["leaves"]["agri"]
    assert record["other_tasks"] == ["fish"] and (record["n_in_task"], record["n_other"]) == (9, 6)

    def photos(task):
        return [Image.open(path).convert("RGB") for path in sorted((tmp_path / task / "test").rglob("*.png"))]

    names, templates = ["rust", "blight", "healthy"], results["dataset_info"]["leaves"]["templates"]
    in_task = classifier.logits(photos("leaves"), names, templates).max(dim=1).values
    other = classifier.logits(photos("fish"), names, templates).max(dim=1).values
    assert record["auroc_max_logit"] == pytest.approx(_pairwise_auroc(in_task.tolist(), other.tolist()), abs=1e-6)
    assert record["shot_threshold"]["n_shots"] == [6, 6]  # 2 shots per class, per seed
    calibration = results["calibration"]["datasets"]["leaves"]["agri"]
    assert {"before", "after"} <= set(calibration)
    report = (tmp_path / "out" / "results.md").read_text()
    assert "## Abstention on photos of other domains" in report
    assert "threshold fitted on 2 train shots per class" in report
