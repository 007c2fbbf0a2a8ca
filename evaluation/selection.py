"""The image embedding of a task chosen from k labelled shots: aligned, clip, or their fusion and its weight.

AgriCLIP has three image embeddings, and which one zero-shot classifies a task best differs by task (the aligned
backbone knows leaves, the CLIP tower knows cows). The candidates are the fusions `FUSION_WEIGHTS` of the two
L2-normalised embeddings (`fuse_image_embeddings`; weight 0 is the aligned embedding, 1 the CLIP one), scored by
zero-shot top-1 on the shots; ties, frequent on a few dozen shots, go to the lower NLL once a temperature is fitted to
the shots (a proper score that still ranks candidates whose accuracies tie), then to the lower weight. The shots come
from the task's train split, never from its test images.
"""

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from modeling_agriclip.calibration import calibration_nll, fit_calibration
from modeling_agriclip.modeling_agriclip import fuse_image_embeddings
from modeling_agriclip.zero_shot import ZeroShotClassifier


# The CLIP weights of the candidate fusions: 0 is the aligned embedding, 1 the CLIP one.
FUSION_WEIGHTS = tuple(round(0.1 * step, 1) for step in range(11))


def mode_name(weight: float) -> str:
    """A candidate as the suite and the task file name it: "aligned", "clip" or "fused@W"."""
    return "aligned" if weight == 0 else "clip" if weight == 1 else f"fused@{weight:g}"


def mode_embedding(weight: float) -> tuple[str, float | None]:
    """The (embedding, fusion_weight) a classifier (and a task file) uses for a candidate."""
    return ("aligned", None) if weight == 0 else ("clip", None) if weight == 1 else ("fused", weight)


def fused_features(clip_features: torch.Tensor, aligned_features: torch.Tensor, weight: float) -> torch.Tensor:
    """The image embeddings a classifier with the candidate's fusion weight computes, from the two L2-normalised
    embeddings: the model's fusion, L2-normalised as `ZeroShotClassifier.image_embeddings` returns it."""
    return F.normalize(fuse_image_embeddings(clip_features, aligned_features, weight), dim=-1)


def select_embedding(
    classifier: ZeroShotClassifier,
    clip_features: torch.Tensor,
    aligned_features: torch.Tensor,
    labels: torch.Tensor,
    prompt_names: Sequence[str],
    templates: Sequence[str],
    weights: Sequence[float] = FUSION_WEIGHTS,
) -> dict:
    """The candidate with the best zero-shot top-1 on the labelled shots (ties: module docstring).

    Returns ``{"chosen": name, "fusion_weight": W, "candidates": {name: {"top1", "nll"}}}`` on the shots.
    """
    candidates = {}
    for weight in weights:
        logits = classifier.embedding_logits(
            fused_features(clip_features, aligned_features, weight), prompt_names, templates
        )
        calibration = fit_calibration(logits, labels, classifier.sigmoid_scores)
        candidates[mode_name(weight)] = {
            "fusion_weight": weight,
            "top1": float((logits.argmax(dim=1) == labels).double().mean()),
            "nll": float(calibration_nll(calibration.apply(logits), labels, classifier.sigmoid_scores)),
        }
    chosen = min(
        candidates,
        key=lambda name: (-candidates[name]["top1"], candidates[name]["nll"], candidates[name]["fusion_weight"]),
    )
    return {"chosen": chosen, "fusion_weight": candidates[chosen]["fusion_weight"], "candidates": candidates}
