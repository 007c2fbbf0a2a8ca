"""Classification metrics as local `evaluate` modules, loadable with the network off.

Each metric lives in its own folder (``<name>/<name>.py``), the layout `evaluate.load` expects of a local
module; `evaluate.load("accuracy")` and friends would need the Hugging Face Hub.
"""

from pathlib import Path

import evaluate
import torch


METRICS_DIR = Path(__file__).resolve().parent
METRIC_NAMES = ("topk_accuracy", "mean_per_class_accuracy", "macro_f1")


def load_metric(name: str) -> evaluate.EvaluationModule:
    """Load one of `METRIC_NAMES` from this folder, without the Hub."""
    if name not in METRIC_NAMES:
        raise ValueError(f"Unknown metric {name!r}; expected one of {METRIC_NAMES}.")
    return evaluate.load(str(METRICS_DIR / name / f"{name}.py"))


def classification_metrics(scores: torch.Tensor, labels: torch.Tensor, num_classes: int) -> dict:
    """Top-1, top-5 (None with 5 classes or fewer), mean per-class accuracy and macro-F1 of a score matrix.

    `scores` is (n_examples, num_classes); `labels` holds the reference class ids. Mean per-class accuracy
    averages over the classes that have examples; macro-F1 over the classes that are referenced or predicted.
    """
    if scores.shape != (len(labels), num_classes):
        raise ValueError(f"scores must have shape ({len(labels)}, {num_classes}); got {tuple(scores.shape)}.")
    scores = scores.float().cpu().numpy()
    references = labels.cpu().numpy()
    predictions = scores.argmax(axis=1)
    topk = load_metric("topk_accuracy")
    return {
        "top1": topk.compute(predictions=scores, references=references, k=1)["top_k_accuracy"],
        "top5": topk.compute(predictions=scores, references=references, k=5)["top_k_accuracy"]
        if num_classes > 5
        else None,
        "mean_per_class": load_metric("mean_per_class_accuracy").compute(
            predictions=predictions, references=references
        )["mean_per_class_accuracy"],
        "macro_f1": load_metric("macro_f1").compute(predictions=predictions, references=references)["macro_f1"],
    }
