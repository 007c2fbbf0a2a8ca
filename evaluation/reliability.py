"""Whether a zero-shot score can be acted on: calibration from k shots, and abstention on photos of other tasks.

Both read a task's zero-shot logits as the user sees them (`modeling_agriclip.calibration.probabilities`: a softmax
for InfoNCE, per-label sigmoids for SigLIP), on the images the suite tests on; the shots come from the task's train
split (or the train half `evaluation.runner.probe_split` leaves), never from the test images.

- Calibration: the expected calibration error, the NLL and the reliability bins before temperature scaling and after
  it, the temperature (and SigLIP bias) fitted on k labelled shots per class (`fit_calibration`, shots drawn as the
  k-shot probes draw them, `sample_k_shot`), as the mean over seeds; the bins of the seeds are pooled.
- Abstention: the task's test photos (in-task) against the test photos of tasks of other domains (fish photos for a
  leaf task; `domain` in the suite YAML), all scored against the task's labels. The AUROC of telling them apart by
  the top probability (uncalibrated, and calibrated by the fits of the largest k), and by the top logit (the best
  label's cosine similarity, scaled: a distance-based score that ignores the other labels); the accuracy on the
  `COVERAGE` share of in-task photos the top probability is most confident on, the `--abstain-below` threshold that
  keeps them, and the share of other-domain photos that threshold answers "unknown"; the same three for the best
  label's cosine similarity (the `--abstain-below-similarity` rule). These thresholds are read off the test photos
  (an operating point); `shot_threshold` is the rule as a user gets it: the similarity threshold fitted on k train
  shots per class (as `python -m evaluation.calibrate` writes it into a task file), applied to the test photos.
"""

import statistics
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from modeling_agriclip.calibration import Calibration, calibration_nll, fit_calibration, probabilities

from .linear_probe import sample_k_shot
from .metrics import auroc, calibration_error, reliability_bins, selective_accuracy


# The share of in-task photos answered in "accuracy at coverage".
COVERAGE = 0.9


def fit_calibrations(
    train_logits: torch.Tensor, train_labels: torch.Tensor, sigmoid: bool, shots: Sequence[int], seeds: Sequence[int]
) -> dict[int, list[tuple[Calibration, int]]]:
    """Per k, one (fitted `Calibration`, number of shots used) per seed, from k shots per class of the train
    logits (fewer for a class with fewer images)."""
    fits = {}
    for k in shots:
        fits[k] = []
        for seed in seeds:
            indices, _ = sample_k_shot(train_labels, k, seed)
            fits[k].append((fit_calibration(train_logits[indices], train_labels[indices], sigmoid), len(indices)))
    return fits


def calibration_stats(logits: torch.Tensor, labels: torch.Tensor, sigmoid: bool) -> dict:
    """ECE, NLL and reliability bins of (calibrated) logits, their top-1 confidences as the user sees them."""
    confidences, predictions = probabilities(logits, sigmoid).max(dim=1)
    bins = reliability_bins(confidences, predictions == labels)
    return {"ece": calibration_error(bins), "nll": float(calibration_nll(logits, labels, sigmoid)), "reliability": bins}


def calibration_record(
    test_logits: torch.Tensor, test_labels: torch.Tensor, sigmoid: bool, fits: Mapping[int, list]
) -> dict:
    """ECE and NLL on the test images before and after temperature fitting with each k (mean over seeds, and the
    spread of the ECE), with the mean fitted temperature and bias and the pooled reliability bins."""
    record = {
        "objective": "siglip" if sigmoid else "infonce",
        "before": calibration_stats(test_logits, test_labels, sigmoid),
    }
    record["after"] = {}
    for k, runs in fits.items():
        stats = [calibration_stats(calibration.apply(test_logits), test_labels, sigmoid) for calibration, _ in runs]
        eces = [run["ece"] for run in stats]
        record["after"][str(k)] = {
            "ece": statistics.fmean(eces),
            "ece_std": statistics.pstdev(eces),
            "nll": statistics.fmean(run["nll"] for run in stats),
            "temperature": statistics.fmean(calibration.temperature for calibration, _ in runs),
            "bias": statistics.fmean(calibration.bias for calibration, _ in runs),
            "n_shots": statistics.fmean(n for _, n in runs),
            "n_seeds": len(runs),
            "reliability": {
                key: np.sum([run["reliability"][key] for run in stats], axis=0).tolist()
                for key in stats[0]["reliability"]
            },
        }
    return record


def _abstention_scores(logits: torch.Tensor, sigmoid: bool, calibration: Calibration | None = None):
    """Per photo the top probability (calibrated when a calibration is given) and the predicted class."""
    calibrated = logits if calibration is None else calibration.apply(logits)
    return probabilities(calibrated, sigmoid).max(dim=1)


def fit_similarity_threshold(shot_similarities: torch.Tensor) -> float:
    """The best-label cosine similarity that keeps `COVERAGE` of the labelled shots (`selective_accuracy`'s
    threshold): what a task file records for `--abstain-below-similarity`."""
    _, threshold = selective_accuracy(shot_similarities, torch.ones_like(shot_similarities, dtype=torch.bool), COVERAGE)
    return threshold


def _mean_or_none(values) -> float | None:
    values = [value for value in values if value is not None]
    return statistics.fmean(values) if values else None


def abstention_record(
    test_logits: torch.Tensor,
    test_labels: torch.Tensor,
    other_logits: torch.Tensor,
    sigmoid: bool,
    calibrations: Sequence[Calibration] = (),
    logit_scale: float = 1.0,
    logit_bias: float = 0.0,
    shots: Sequence[tuple[torch.Tensor, torch.Tensor]] = (),
) -> dict:
    """In-task test photos against other-domain photos (module docstring); `calibrations`: one fit per seed of the
    largest k, whose AUROCs are averaged; `logit_scale` and `logit_bias`: what the logits are the cosine
    similarities scaled by and shifted by (`ZeroShotClassifier.logit_scale`, `.logit_bias`); `shots`: the (logits,
    labels) of the train shots of each seed, from which `shot_threshold` fits the similarity threshold a task file
    records (keeping `COVERAGE` of the shots) and applies it to the test photos, means over seeds."""

    def best_similarity(logits: torch.Tensor) -> torch.Tensor:
        return (logits.max(dim=1).values - logit_bias) / logit_scale

    confidences, predictions = _abstention_scores(test_logits, sigmoid)
    other_confidences, _ = _abstention_scores(other_logits, sigmoid)
    correct = predictions == test_labels
    accuracy, threshold = selective_accuracy(confidences, correct, COVERAGE)
    similarities, other_similarities = best_similarity(test_logits), best_similarity(other_logits)
    similarity_accuracy, similarity_threshold = selective_accuracy(similarities, correct, COVERAGE)
    record = {
        "auroc_max_probability": auroc(confidences, other_confidences),
        "auroc_max_logit": auroc(test_logits.max(dim=1).values, other_logits.max(dim=1).values),
        "top1": float(correct.double().mean()),
        "coverage": COVERAGE,
        "accuracy_at_coverage": accuracy,
        "threshold_at_coverage": threshold,
        "other_abstained_at_threshold": float((other_confidences < threshold).double().mean()),
        "accuracy_at_coverage_similarity": similarity_accuracy,
        "similarity_threshold_at_coverage": similarity_threshold,
        "other_abstained_at_similarity_threshold": float((other_similarities < similarity_threshold).double().mean()),
        "n_in_task": len(test_labels),
        "n_other": len(other_logits),
    }
    if shots:
        runs = []
        for shot_logits, _ in shots:
            fitted = fit_similarity_threshold(best_similarity(shot_logits))
            answered = similarities >= fitted
            runs.append(
                {
                    "similarity": fitted,
                    "in_task_answered": float(answered.double().mean()),
                    "accuracy_answered": float(correct[answered].double().mean()) if answered.any() else None,
                    "other_abstained": float((other_similarities < fitted).double().mean()),
                }
            )
        record["shot_threshold"] = {key: _mean_or_none(run[key] for run in runs) for key in runs[0]}
        record["shot_threshold"]["n_shots"] = [len(labels) for _, labels in shots]
    if calibrations:
        record["auroc_calibrated"] = statistics.fmean(
            auroc(_abstention_scores(test_logits, sigmoid, fit)[0], _abstention_scores(other_logits, sigmoid, fit)[0])
            for fit in calibrations
        )
    return record
