"""Classification metrics as local `evaluate` modules, loadable with the network off.

Each metric lives in its own folder (``<name>/<name>.py``), the layout `evaluate.load` expects of a local
module; `evaluate.load("accuracy")` and friends would need the Hugging Face Hub.

One ranking rule for every metric: classes are ordered by score, highest first, and among equal scores the
lowest class index comes first, the order `argmax` uses. The rank of the reference class is the number of
classes scoring strictly higher plus the number scoring the same with a lower index; top-k counts rank < k, and
the predicted class (for mean per-class accuracy, macro-F1 and the confusion matrix) is the class of rank 0.
Non-finite scores have no rank: they are an error (`NonFiniteError`), not a number.
"""

from __future__ import annotations

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


def classification_metrics(scores: torch.Tensor, labels: torch.Tensor, num_classes: int) -> dict:
    """Top-1, top-5 (None with 5 classes or fewer), mean per-class accuracy and macro-F1 of a score matrix.

    `scores` is (n_examples, num_classes); `labels` holds the reference class ids. Every metric follows the ranking
    rule of the module docstring, so top-1 is the accuracy of the predictions the other metrics score. Mean
    per-class accuracy averages over the classes that have examples; macro-F1 over the classes that are referenced
    or predicted. A NaN or infinite score raises `NonFiniteError`.
    """
    scores, references = _checked_arrays(scores, labels, num_classes)
    predictions = predicted_classes(scores)
    topk = load_metric("topk_accuracy")
    return {
        "top1": topk.compute(predictions=scores, references=references, k=1)["top_k_accuracy"],
        "top5": topk.compute(predictions=scores, references=references, k=TOP_K)["top_k_accuracy"]
        if num_classes > TOP_K
        else None,
        "mean_per_class": load_metric("mean_per_class_accuracy").compute(
            predictions=predictions, references=references
        )["mean_per_class_accuracy"],
        "macro_f1": load_metric("macro_f1").compute(predictions=predictions, references=references)["macro_f1"],
    }


# The metrics `chance_levels` gives.
CHANCE_KEYS = ("top1", "top5", "mean_per_class")


def chance_levels(num_classes: int) -> dict:
    """The expected top-1, top-5 and mean per-class accuracy of a guess drawn uniformly from `num_classes` classes.

    Whatever the class balance, such a guess names each image's class with probability 1/C, so top-1 and every
    class's recall are 1/C; its top 5 hold the class with probability 5/C. Top-5 is None where
    `classification_metrics` reports none (5 classes or fewer). Macro-F1 has no such simple form and is left out.
    """
    if num_classes < 1:
        raise ValueError(f"chance levels need at least one class; got {num_classes}")
    return {
        "top1": 1 / num_classes,
        "top5": TOP_K / num_classes if num_classes > TOP_K else None,
        "mean_per_class": 1 / num_classes,
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
    scores, references = _checked_arrays(scores, labels, num_classes)
    counts = np.bincount(references * num_classes + predicted_classes(scores), minlength=num_classes**2)
    return counts.reshape(num_classes, num_classes).tolist()
