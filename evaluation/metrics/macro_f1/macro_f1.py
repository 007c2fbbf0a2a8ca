"""Macro-averaged F1, as a local `evaluate` module that loads offline."""

import datasets
import evaluate
import numpy as np


_DESCRIPTION = """
Macro F1: the unweighted mean over classes of F1 = 2·TP / (2·TP + FP + FN). By default the classes are
those that occur in the references or the predictions (scikit-learn's `f1_score(average="macro")`); a
class with no true positives scores 0.

Predictions are class ids; `evaluation.metrics.classification_metrics` derives them from scores with the
ranking rule of `topk_accuracy` (the highest score, the lowest class index among equal scores), so this
metric, top-k and the confusion matrix agree on every tie.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `int`): predicted class ids.
    references (`list` of `int`): reference class ids.
    labels (`list` of `int`, optional): the classes to average over; defaults to the union of the classes
        in `references` and `predictions`.
Returns:
    macro_f1 (`float`): in [0, 1].
Examples:
    >>> metric = evaluate.load("evaluation/metrics/macro_f1")
    >>> metric.compute(predictions=[0, 0, 1, 1], references=[0, 0, 0, 1])
    {'macro_f1': 0.7333333333333334}
"""

_CITATION = ""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class MacroF1(evaluate.Metric):
    """Unweighted mean of per-class F1."""

    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions, references, labels=None):
        predictions = np.asarray(predictions, dtype=np.int64)
        references = np.asarray(references, dtype=np.int64)
        if labels is None:
            labels = np.union1d(references, predictions)
        f1 = []
        for label in np.asarray(labels, dtype=np.int64):
            true_positives = np.sum((predictions == label) & (references == label))
            false_positives = np.sum((predictions == label) & (references != label))
            false_negatives = np.sum((predictions != label) & (references == label))
            denominator = 2 * true_positives + false_positives + false_negatives
            f1.append(2 * true_positives / denominator if denominator else 0.0)
        return {"macro_f1": float(np.mean(f1))}
