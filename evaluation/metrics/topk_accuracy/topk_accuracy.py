"""Top-k accuracy from class scores, as a local `evaluate` module that loads offline."""

import datasets
import evaluate
import numpy as np


_DESCRIPTION = """
Top-k accuracy: the fraction of examples whose reference class is among the k highest-scoring classes.
Predictions are per-class scores (logits or probabilities), one row per example.

Ties are broken as `argmax` breaks them: among equal scores the lowest class index ranks first. The rank of
the reference class is the number of classes scoring strictly higher plus the number scoring the same with a
lower index, and an example is a hit when that rank is below k. Top-1 is then exactly the accuracy of
`argmax` predictions, which mean per-class accuracy, macro-F1 and a confusion matrix count, and a model
whose scores all tie scores as if it always predicted class 0, not as a hit on every example. NaN and
infinite scores have no rank and are refused.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `list` of `float`): per-class scores, shape (n_examples, n_classes).
    references (`list` of `int`): reference class ids.
    k (`int`, defaults to 1): how many top classes count as a hit; must be at most n_classes.
Raises:
    ValueError: when a score is NaN or infinite.
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
        # A NaN compares False with everything: it would rank first, a hit for any k.
        n_nonfinite = int((~np.isfinite(scores)).any(axis=1).sum())
        if n_nonfinite:
            raise ValueError(f"predictions hold NaN or infinite scores in {n_nonfinite} of {len(scores)} rows.")
        reference_scores = scores[np.arange(len(references)), references][:, None]
        lower_index = np.arange(scores.shape[1])[None, :] < references[:, None]
        outranking = (scores > reference_scores) | ((scores == reference_scores) & lower_index)
        return {"top_k_accuracy": float((outranking.sum(axis=1) < k).mean())}
