"""Classification metrics as local `evaluate` modules, loadable with the network off.

Each metric lives in its own folder (``<name>/<name>.py``), the layout `evaluate.load` expects of a local
module; `evaluate.load("accuracy")` and friends would need the Hugging Face Hub. The modules are the public
interface for callers that want `evaluate`; the suite's inner loop, `classification_metrics` (and
`confusion_matrix`), computes the same values on the score tensor directly, since the modules' Arrow round trips of
an (images x classes) matrix cost seconds per call on a thousand classes. `classification_metrics_from_modules` is
the module path, kept as the reference the tensor path is tested against.

One ranking rule for every metric: classes are ordered by score, highest first, and among equal scores the
lowest class index comes first, the order `argmax` uses. The rank of the reference class is the number of
classes scoring strictly higher plus the number scoring the same with a lower index; top-k counts rank < k, and
the predicted class (for mean per-class accuracy, macro-F1 and the confusion matrix) is the class of rank 0.
Non-finite scores have no rank: they are an error (`NonFiniteError`), not a number.

`METRICS` is the one table of classification metrics: each row (`Metric`) holds the computation on the tensors, the
title of report and card tables, the Hub metric id of the card's model-index, the chance-level rule, whether higher is
better, and the `evaluate` module (if any) of the reference path. The suite (`evaluation.runner`), the report
(`evaluation.report`) and the model card (`model_card.card`) read their metric lists, titles and Hub ids from it, so a
new metric is one function and one row here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch


if TYPE_CHECKING:
    import evaluate


METRICS_DIR = Path(__file__).resolve().parent
METRIC_NAMES = ("topk_accuracy", "mean_per_class_accuracy", "macro_f1")
# Top-k beside top-1; reported only for more classes than this, where it differs from a certainty.
TOP_K = 5


class NonFiniteError(ValueError):
    """Scores, or the embeddings they come from, holding a NaN or an infinity.

    A NaN compares False with every number, so a ranking reads it as a class outranked by nothing: a model whose
    scores were all NaN scored top-1 = 1.0. The message names who gave the values and how many rows are affected.
    """

    def __init__(self, source: str, n_nonfinite: int, n_rows: int, unit: str, what: str = "scores"):
        super().__init__(f"{source} gave non-finite {what} ({n_nonfinite} of {n_rows} {unit})")


def count_nonfinite_rows(values: torch.Tensor) -> int:
    """How many rows (one per image, caption or example) of `values` hold a NaN or an infinity."""
    return int((~torch.isfinite(values)).any(dim=1).sum())


def check_finite(values: torch.Tensor, source: str = "the model", unit: str = "examples", what: str = "scores") -> None:
    """Raises `NonFiniteError` when a row of `values` holds a NaN or an infinity, naming `source`."""
    n_nonfinite = count_nonfinite_rows(values)
    if n_nonfinite:
        raise NonFiniteError(source, n_nonfinite, len(values), unit, what)


def load_metric(name: str) -> evaluate.EvaluationModule:
    """Load one of `METRIC_NAMES` from this folder, without the Hub."""
    # Imported here, not above: `evaluate` takes seconds to import, and the training stages import this package
    # (through `evaluation.retrieval` and `evaluation.knn`) only for its finiteness checks.
    import evaluate

    if name not in METRIC_NAMES:
        raise ValueError(f"Unknown metric {name!r}; expected one of {METRIC_NAMES}.")
    return evaluate.load(str(METRICS_DIR / name / f"{name}.py"))


def predicted_classes(scores: np.ndarray) -> np.ndarray:
    """The class of rank 0 in each row under the ranking rule (module docstring): `np.argmax` returns the first
    of equal maxima, so the lowest class index wins a tie."""
    return scores.argmax(axis=1)


def _checked_arrays(scores: torch.Tensor, labels: torch.Tensor, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """`scores` and `labels` as numpy arrays, once the shape is right and every score is finite."""
    if scores.shape != (len(labels), num_classes):
        raise ValueError(f"scores must have shape ({len(labels)}, {num_classes}); got {tuple(scores.shape)}.")
    check_finite(scores)
    return scores.float().cpu().numpy(), labels.cpu().numpy()


def _checked_tensors(scores: torch.Tensor, labels: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`scores` as float32 and `labels` as int64 on the scores' device, once the shape is right, every score is
    finite and every label is a class id. float32, as the `evaluate` path stores them, so that both rank alike."""
    if scores.shape != (len(labels), num_classes):
        raise ValueError(f"scores must have shape ({len(labels)}, {num_classes}); got {tuple(scores.shape)}.")
    check_finite(scores)
    scores = scores.detach().float()
    labels = labels.detach().to(device=scores.device, dtype=torch.long)
    if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(
            f"labels must be class ids in [0, {num_classes}); got {int(labels.min())}..{int(labels.max())}."
        )
    return scores, labels


# Rows of the score matrix compared at once in `reference_ranks`: bounds its temporary (rows x classes) masks.
_RANK_CHUNK_ELEMENTS = 1 << 24


def reference_ranks(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The rank of each row's reference class under the ranking rule (module docstring): the classes scoring
    strictly higher plus those scoring the same with a lower index. Top-k counts the rows of rank below k."""
    n_classes = scores.shape[1]
    class_index = torch.arange(n_classes, device=scores.device)
    rows_per_chunk = max(1, _RANK_CHUNK_ELEMENTS // max(n_classes, 1))
    ranks = []
    for start in range(0, len(labels), rows_per_chunk):
        chunk, chunk_labels = scores[start : start + rows_per_chunk], labels[start : start + rows_per_chunk]
        reference_scores = chunk.gather(1, chunk_labels[:, None])
        lower_index = class_index[None, :] < chunk_labels[:, None]
        outranking = (chunk > reference_scores) | ((chunk == reference_scores) & lower_index)
        ranks.append(outranking.sum(dim=1))
    return torch.cat(ranks) if ranks else torch.zeros(0, dtype=torch.long, device=scores.device)


def _predicted_class_tensor(scores: torch.Tensor) -> torch.Tensor:
    """`predicted_classes` on a tensor: `torch.argmax` also returns the first of equal maxima."""
    return scores.argmax(dim=1)


class ScoreSummary:
    """One score matrix and its labels, with what the metrics are computed from, each part computed once on first
    use: the ranks of the reference classes, the predicted classes, the per-class counts and the top-1 confidences.

    Every metric of `METRICS` reads it, so ten metrics on a (10,000 x 1,000) matrix still rank it once. `scores` is
    float32 and `labels` int64 on the scores' device, as `_checked_tensors` leaves them.
    """

    def __init__(self, scores: torch.Tensor, labels: torch.Tensor, num_classes: int):
        self.scores, self.labels = _checked_tensors(scores, labels, num_classes)
        self.num_classes = num_classes
        self.n_examples = len(self.labels)
        if not self.n_examples:
            raise ValueError("No reference examples for any of the requested labels.")

    @cached_property
    def ranks(self) -> torch.Tensor:
        """The rank of each example's reference class (`reference_ranks`)."""
        return reference_ranks(self.scores, self.labels)

    @cached_property
    def predictions(self) -> torch.Tensor:
        """The predicted class of each example: its class of rank 0."""
        return _predicted_class_tensor(self.scores)

    @cached_property
    def counts(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per class, as int64 numpy arrays: its reference examples, its predictions and its true positives. The
        per-class steps on these C numbers run in numpy, as the `evaluate` modules take them: the same float64
        operations, so the same values to the last bit."""
        reference_counts = torch.bincount(self.labels, minlength=self.num_classes)
        predicted_counts = torch.bincount(self.predictions, minlength=self.num_classes)
        true_positives = torch.bincount(self.labels[self.predictions == self.labels], minlength=self.num_classes)
        return tuple(
            counts.cpu().numpy().astype(np.int64) for counts in (reference_counts, predicted_counts, true_positives)
        )

    @cached_property
    def confidences(self) -> torch.Tensor:
        """The softmax probability of each example's predicted class, the scores read as logits: exp(max score -
        logsumexp(scores)), in float32 on the matrix (a float64 copy of it would cost more than every other metric
        together), then float64. See `classification_metrics` on what the scores are."""
        scores = self.scores
        return torch.exp(scores.max(dim=1).values - torch.logsumexp(scores, dim=1)).double()


def _top_k_accuracy(k: int) -> Callable[[ScoreSummary], float]:
    """The share of examples whose reference class has rank below `k`."""

    def compute(summary: ScoreSummary) -> float:
        return int((summary.ranks < k).sum()) / summary.n_examples

    return compute


def _mean_per_class_accuracy(summary: ScoreSummary) -> float:
    """The mean recall over the classes that have examples."""
    reference_counts, _, true_positives = summary.counts
    has_examples = reference_counts > 0
    return float(np.mean(true_positives[has_examples] / reference_counts[has_examples]))


def _macro_f1(summary: ScoreSummary) -> float:
    """The mean F1 over the classes that are referenced or predicted."""
    reference_counts, predicted_counts, true_positives = summary.counts
    in_union = (reference_counts > 0) | (predicted_counts > 0)
    # 2·TP + FP + FN = (TP + FN) + (TP + FP): never 0 for a referenced or predicted class.
    return float(np.mean(2 * true_positives[in_union] / (reference_counts[in_union] + predicted_counts[in_union])))


# Equal-width confidence bins of the expected calibration error, as in Guo et al. (2017).
ECE_BINS = 15


def reliability_bins(confidences: torch.Tensor, correct: torch.Tensor) -> dict[str, list[float]]:
    """The examples binned by top-1 confidence into `ECE_BINS` equal-width bins ((m-1)/M, m/M] (a confidence of 0
    in the first): per bin its count, and the sums of its confidences and of its correct predictions. Sums, not
    means, so that bins of several runs (seeds) add up; a reliability diagram plots sum_correct / count against
    sum_confidence / count."""
    confidences, correct = confidences.double(), correct.double()
    bins = (torch.ceil(confidences * ECE_BINS).long() - 1).clamp(0, ECE_BINS - 1)
    return {
        "count": torch.bincount(bins, minlength=ECE_BINS).tolist(),
        "sum_confidence": torch.bincount(bins, weights=confidences, minlength=ECE_BINS).tolist(),
        "sum_correct": torch.bincount(bins, weights=correct, minlength=ECE_BINS).tolist(),
    }


def calibration_error(bins: Mapping[str, Sequence[float]]) -> float:
    """Expected calibration error (Guo et al., "On Calibration of Modern Neural Networks", ICML 2017) of
    `reliability_bins`: sum_b |B_b|/N · |acc(B_b) - conf(B_b)| = sum_b |sum over B_b of (correct - confidence)| / N.
    0 is perfectly calibrated."""
    gaps = np.abs(np.asarray(bins["sum_correct"]) - np.asarray(bins["sum_confidence"]))
    return float(gaps.sum() / np.sum(bins["count"]))


def _expected_calibration_error(summary: ScoreSummary) -> float:
    """`calibration_error` of the softmax confidences of the top-1 predictions."""
    correct = summary.predictions == summary.labels
    return calibration_error(reliability_bins(summary.confidences, correct))


def auroc(positive_scores: torch.Tensor, negative_scores: torch.Tensor) -> float:
    """The area under the ROC curve of telling positives from negatives by a score (higher: more likely positive):
    the probability that a random positive outscores a random negative, a tie counting half (Mann-Whitney U / n_pos
    n_neg), from the average ranks of the pooled scores. 0.5 is chance, 1 a perfect separation."""
    if not len(positive_scores) or not len(negative_scores):
        raise ValueError("AUROC needs at least one positive and one negative score")
    scores = torch.cat([positive_scores, negative_scores]).double()
    check_finite(scores[:, None], unit="scores")
    # 1-based ranks of the pooled scores, tied scores sharing the mean of theirs.
    order = scores.argsort()
    _, inverse, counts = torch.unique_consecutive(scores[order], return_inverse=True, return_counts=True)
    ranks = torch.empty_like(scores)
    ranks[order] = (counts.cumsum(0).double() - (counts.double() - 1) / 2)[inverse]
    n_pos, n_neg = len(positive_scores), len(negative_scores)
    return float((ranks[:n_pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def selective_accuracy(confidences: torch.Tensor, correct: torch.Tensor, coverage: float) -> tuple[float, float]:
    """The accuracy on the `coverage` share of examples with the highest confidence (the others abstained on), and
    the confidence threshold that keeps them (the lowest kept confidence: `--abstain-below` at that coverage)."""
    if not 0.0 < coverage <= 1.0:
        raise ValueError(f"coverage must be in (0, 1]; got {coverage}")
    kept = max(1, round(coverage * len(confidences)))
    order = torch.sort(confidences.double(), descending=True, stable=True).indices[:kept]
    return float(correct.double()[order].mean()), float(confidences.double()[order[-1]])


class ModuleInputs:
    """What the local `evaluate` modules take, for `classification_metrics_from_modules`: the scores (float32 numpy,
    as the modules store them), the predicted classes and the references; `metric(name)` loads a module once."""

    def __init__(self, scores: np.ndarray, references: np.ndarray):
        self.scores, self.references = scores, references
        self.predictions = predicted_classes(scores)
        self._loaded = {}

    def metric(self, name: str) -> evaluate.EvaluationModule:
        if name not in self._loaded:
            self._loaded[name] = load_metric(name)
        return self._loaded[name]


def _top_k_module(k: int) -> Callable[[ModuleInputs], float]:
    def compute(inputs: ModuleInputs) -> float:
        return inputs.metric("topk_accuracy").compute(predictions=inputs.scores, references=inputs.references, k=k)[
            "top_k_accuracy"
        ]

    return compute


def _class_module(name: str) -> Callable[[ModuleInputs], float]:
    """A module scoring predicted class ids, whose result is under its own name."""

    def compute(inputs: ModuleInputs) -> float:
        return inputs.metric(name).compute(predictions=inputs.predictions, references=inputs.references)[name]

    return compute


@dataclass(frozen=True)
class Metric:
    """One classification metric: everything the suite, the report and the model card need to know of it.

    Attributes:
        key: its key in the results (`evaluation.suite` documents the schema).
        title: its name in report and card tables, plot axes and the model-index `name`.
        compute: its value from a `ScoreSummary` (a float; fractions in [0, 1] are shown in %).
        hub_type: the Hub metric id of the card's model-index (`type`), and `hub_args` its arguments.
        higher_is_better: False for an error (the report says "lower is better" beside the title).
        chance: its value for a guess drawn uniformly from C classes, as a function of C; None where it has no
            closed form or none that would mean anything (`chance_levels`).
        min_classes: the value (and its chance level) is None with fewer classes than this (top-5 with 5 or fewer,
            where it is a certainty).
        module: its value through the local `evaluate` modules (`classification_metrics_from_modules`, the
            reference the tensor path is tested against); None: that path uses `compute` too.
        headline: one of the few metrics the model card shows as tables and the k-shot results keep.
    """

    key: str
    title: str
    compute: Callable[[ScoreSummary], float]
    hub_type: str
    hub_args: Mapping | None = None
    higher_is_better: bool = True
    chance: Callable[[int], float] | None = None
    min_classes: int = 1
    module: Callable[[ModuleInputs], float] | None = None
    headline: bool = False


# THE table of classification metrics: a new metric is one function above and one row here. The suite records every
# row (per dataset, and their means), the report has a table per row, the model card a model-index entry per row.
METRICS: dict[str, Metric] = {
    metric.key: metric
    for metric in (
        Metric(
            "top1",
            "Top-1 accuracy",
            _top_k_accuracy(1),
            "accuracy",
            chance=lambda c: 1 / c,
            module=_top_k_module(1),
            headline=True,
        ),
        Metric(
            "top5",
            f"Top-{TOP_K} accuracy",
            _top_k_accuracy(TOP_K),
            "top_k_accuracy",
            {"k": TOP_K},
            chance=lambda c: TOP_K / c,
            min_classes=TOP_K + 1,
            module=_top_k_module(TOP_K),
        ),
        # Also the balanced accuracy: for single-label classification, the mean recall over classes is exactly it.
        Metric(
            "mean_per_class",
            "Mean per-class accuracy",
            _mean_per_class_accuracy,
            "mean_per_class_accuracy",
            chance=lambda c: 1 / c,
            module=_class_module("mean_per_class_accuracy"),
            headline=True,
        ),
        # No chance level: macro-F1 has no simple closed form.
        Metric("macro_f1", "Macro-F1", _macro_f1, "f1", {"average": "macro"}, module=_class_module("macro_f1")),
        # No chance level: a uniform guess (equal scores) is confident 1/C and right 1/C of the time, so its ECE is
        # about 0, the best value; it is no floor to compare a model with.
        Metric(
            "ece",
            "Expected calibration error",
            _expected_calibration_error,
            "ece",
            {"n_bins": ECE_BINS},
            higher_is_better=False,
        ),
    )
}
METRIC_KEYS = tuple(METRICS)
# The metrics the model card shows as tables and the k-shot results keep.
HEADLINE_KEYS = tuple(key for key, metric in METRICS.items() if metric.headline)
# The metrics `chance_levels` gives.
CHANCE_KEYS = tuple(key for key, metric in METRICS.items() if metric.chance is not None)


def classification_metrics(scores: torch.Tensor, labels: torch.Tensor, num_classes: int) -> dict:
    """Every metric of `METRICS` of a score matrix: top-1, top-5 (None with 5 classes or fewer), mean per-class
    accuracy, macro-F1 and the expected calibration error (ECE).

    `scores` is (n_examples, num_classes) of logits; `labels` holds the reference class ids. Every metric follows
    the ranking rule of the module docstring, so top-1 is the accuracy of the predictions the other metrics score.
    Mean per-class accuracy averages over the classes that have examples; macro-F1 over the classes that are
    referenced or predicted. A NaN or infinite score raises `NonFiniteError`.

    The ranking metrics only need the order of each row; ECE reads the scores as logits, its confidences their
    softmax: the suite passes logits (zero-shot: cosine similarities times the model's `exp(logit_scale)`, as
    CLIP's `logits_per_image`; linear and k-shot probes: the classifier's logits). Log-probabilities work alike
    (the softmax ignores a constant per row); probabilities do not: pass their logarithm.

    Computed on the tensors (on their device), the per-class counts from `torch.bincount`: the same values as the
    local `evaluate` modules give (`classification_metrics_from_modules`), without their Arrow round trips of the
    score matrix, which cost seconds per call on a thousand classes.
    """
    summary = ScoreSummary(scores, labels, num_classes)
    return {
        key: metric.compute(summary) if num_classes >= metric.min_classes else None for key, metric in METRICS.items()
    }


def classification_metrics_from_modules(scores: torch.Tensor, labels: torch.Tensor, num_classes: int) -> dict:
    """`classification_metrics` through the local `evaluate` modules (`load_metric`): the reference it is tested
    and benchmarked against (`tests/test_metrics.py`, `bench/bench_metrics.py`). A metric without a module
    (`Metric.module` None, e.g. ECE) is computed as `classification_metrics` computes it. Slow on large label sets:
    each call loads the modules and passes the score matrix through Arrow twice."""
    inputs = ModuleInputs(*_checked_arrays(scores, labels, num_classes))
    summary = None
    results = {}
    for key, metric in METRICS.items():
        if num_classes < metric.min_classes:
            results[key] = None
        elif metric.module is not None:
            results[key] = metric.module(inputs)
        else:
            summary = summary or ScoreSummary(scores, labels, num_classes)
            results[key] = metric.compute(summary)
    return results


def chance_levels(num_classes: int) -> dict:
    """The metrics of `CHANCE_KEYS` for a guess drawn uniformly from `num_classes` classes (`Metric.chance`).

    Whatever the class balance, such a guess names each image's class with probability 1/C, so top-1 and every
    class's recall are 1/C; its top 5 hold the class with probability 5/C. A value is None where
    `classification_metrics` reports none (top-5 with 5 classes or fewer). Macro-F1 has no such simple form and ECE
    none that means anything; both are left out.
    """
    if num_classes < 1:
        raise ValueError(f"chance levels need at least one class; got {num_classes}")
    return {
        key: METRICS[key].chance(num_classes) if num_classes >= METRICS[key].min_classes else None
        for key in CHANCE_KEYS
    }


def per_class_accuracy(confusion: list[list[int]]) -> list[float | None]:
    """The accuracy (recall) of each class from a confusion matrix (rows: true class): its images predicted as it,
    over its images; None for a class without images. Their mean over the classes that have images is the mean
    per-class accuracy."""
    counts = np.asarray(confusion, dtype=np.int64)
    return [float(counts[index, index] / total) if total else None for index, total in enumerate(counts.sum(axis=1))]


def confusion_matrix(scores: torch.Tensor, labels: torch.Tensor, num_classes: int) -> list[list[int]]:
    """Counts of (true class, predicted class), rows the true class, the predictions those `classification_metrics`
    scores."""
    scores, references = _checked_tensors(scores, labels, num_classes)
    pairs = references * num_classes + _predicted_class_tensor(scores)
    return torch.bincount(pairs, minlength=num_classes**2).reshape(num_classes, num_classes).tolist()
