"""Top-k accuracy from class scores, as a local `evaluate` module that loads offline."""

import datasets
import evaluate
import numpy as np


_DESCRIPTION = """
Top-k accuracy: the fraction of examples whose reference class is among the k highest-scoring classes.
Predictions are per-class scores (logits or probabilities), one row per example. Ties at the k-th
score count in favour of the reference class: an example is a hit when fewer than k classes score
strictly higher than its reference class.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `list` of `float`): per-class scores, shape (n_examples, n_classes).
    references (`list` of `int`): reference class ids.
    k (`int`, defaults to 1): how many top classes count as a hit; must be at most n_classes.
Returns:
    top_k_accuracy (`float`): in [0, 1].
Examples:
    >>> metric = evaluate.load("evaluation/metrics/topk_accuracy")
    >>> metric.compute(predictions=[[0.1, 0.7, 0.2], [0.5, 0.1, 0.4]], references=[2, 2], k=2)
    {'top_k_accuracy': 1.0}
"""

_CITATION = ""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class TopkAccuracy(evaluate.Metric):
    """Top-k accuracy over per-class scores."""

    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Sequence(datasets.Value("float32")),
                    "references": datasets.Value("int64"),
                }
            ),
        )

    def _compute(self, predictions, references, k=1):
        scores = np.asarray(predictions, dtype=np.float64)
        references = np.asarray(references, dtype=np.int64)
        if scores.ndim != 2 or scores.shape[0] != references.shape[0]:
            raise ValueError(f"predictions must have shape (n_examples, n_classes); got {scores.shape}.")
        if not 1 <= k <= scores.shape[1]:
            raise ValueError(f"k must be between 1 and the number of classes ({scores.shape[1]}); got {k}.")
        reference_scores = scores[np.arange(len(references)), references]
        n_higher = (scores > reference_scores[:, None]).sum(axis=1)
        return {"top_k_accuracy": float((n_higher < k).mean())}
