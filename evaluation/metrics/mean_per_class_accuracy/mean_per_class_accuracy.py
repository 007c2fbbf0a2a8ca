"""Mean per-class accuracy (balanced accuracy), as a local `evaluate` module that loads offline."""

import datasets
import evaluate
import numpy as np


_DESCRIPTION = """
Mean per-class accuracy: the recall of every class, averaged with equal weight per class, so a large
class cannot hide a small one. Classes without reference examples have no recall and are left out of
the mean (the evaluation suite reports them separately).

Predictions are class ids; `evaluation.metrics.classification_metrics` derives them from scores with the
ranking rule of `topk_accuracy` (the highest score, the lowest class index among equal scores), so this
metric, top-k and the confusion matrix agree on every tie.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `int`): predicted class ids.
    references (`list` of `int`): reference class ids.
    labels (`list` of `int`, optional): the classes to average over; defaults to the classes present in
        `references`. A listed class without references is skipped.
Returns:
    mean_per_class_accuracy (`float`): in [0, 1].
    per_class_accuracy (`dict` of `int` to `float`): the recall of each averaged class.
Examples:
    >>> metric = evaluate.load("evaluation/metrics/mean_per_class_accuracy")
    >>> metric.compute(predictions=[0, 0, 1, 1], references=[0, 0, 0, 1])["mean_per_class_accuracy"]
    0.8333333333333333
"""

_CITATION = ""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class MeanPerClassAccuracy(evaluate.Metric):
    """Mean over classes of the per-class recall."""

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
        labels = np.unique(references) if labels is None else np.asarray(labels, dtype=np.int64)
        per_class = {}
        for label in labels:
            is_class = references == label
            if is_class.any():
                per_class[int(label)] = float((predictions[is_class] == label).mean())
        if not per_class:
            raise ValueError("No reference examples for any of the requested labels.")
        return {
            "mean_per_class_accuracy": float(np.mean(list(per_class.values()))),
            "per_class_accuracy": per_class,
        }
