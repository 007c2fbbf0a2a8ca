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


def _checked_tensors(scores: torch.Tensor, labels: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`scores` as float32 and `labels` as int64 on the scores' device, once the shape is right, every score is
    finite and every label is a class id. float32, as the `evaluate` path stores them, so that both rank alike."""
    if scores.shape != (len(labels), num_classes):
        raise ValueError(f"scores must have shape ({len(labels)}, {num_classes}); got {tuple(scores.shape)}.")
    check_finite(scores)
    scores = scores.detach().float()
    labels = labels.detach().to(device=scores.device, dtype=torch.long)
    if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"labels must be class ids in [0, {num_classes}); got {int(labels.min())}..{int(labels.max())}.")
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


def classification_metrics(scores: torch.Tensor, labels: torch.Tensor, num_classes: int) -> dict:
    """Top-1, top-5 (None with 5 classes or fewer), mean per-class accuracy and macro-F1 of a score matrix.

    `scores` is (n_examples, num_classes); `labels` holds the reference class ids. Every metric follows the ranking
    rule of the module docstring, so top-1 is the accuracy of the predictions the other metrics score. Mean
    per-class accuracy averages over the classes that have examples; macro-F1 over the classes that are referenced
    or predicted. A NaN or infinite score raises `NonFiniteError`.

    Computed on the tensors (on their device), the per-class counts from `torch.bincount`: the same values as the
    local `evaluate` modules give (`classification_metrics_from_modules`), without their Arrow round trips of the
    score matrix, which cost seconds per call on a thousand classes.
    """
    scores, references = _checked_tensors(scores, labels, num_classes)
    n_examples = len(references)
    if not n_examples:
        raise ValueError("No reference examples for any of the requested labels.")
    ranks = reference_ranks(scores, references)
    predictions = _predicted_class_tensor(scores)
    reference_counts = torch.bincount(references, minlength=num_classes)
    predicted_counts = torch.bincount(predictions, minlength=num_classes)
    true_positives = torch.bincount(references[predictions == references], minlength=num_classes)
    # The last, per-class steps on C numbers in numpy, as the modules take them: the same float64 operations.
    reference_counts, predicted_counts, true_positives = (
        counts.cpu().numpy().astype(np.int64) for counts in (reference_counts, predicted_counts, true_positives)
    )
    has_examples = reference_counts > 0
    recalls = true_positives[has_examples] / reference_counts[has_examples]
    in_union = has_examples | (predicted_counts > 0)
    # 2·TP + FP + FN = (TP + FN) + (TP + FP): never 0 for a referenced or predicted class.
    f1 = 2 * true_positives[in_union] / (reference_counts[in_union] + predicted_counts[in_union])
    return {
        "top1": int((ranks < 1).sum()) / n_examples,
        "top5": int((ranks < TOP_K).sum()) / n_examples if num_classes > TOP_K else None,
        "mean_per_class": float(np.mean(recalls)),
        "macro_f1": float(np.mean(f1)),
    }


def classification_metrics_from_modules(scores: torch.Tensor, labels: torch.Tensor, num_classes: int) -> dict:
    """`classification_metrics` through the local `evaluate` modules (`load_metric`): the reference it is tested
    and benchmarked against (`tests/test_metrics.py`, `bench/bench_metrics.py`). Slow on large label sets: each
    call loads the modules and passes the score matrix through Arrow twice."""
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
    scores, references = _checked_tensors(scores, labels, num_classes)
    pairs = references * num_classes + _predicted_class_tensor(scores)
    return torch.bincount(pairs, minlength=num_classes**2).reshape(num_classes, num_classes).tolist()
