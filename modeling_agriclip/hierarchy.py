"""Two-level zero-shot prediction over a `agriclip.labels.LabelHierarchy`: the group first, then the label within it.

The group is the best-scoring group prompt ("a photo of a grape plant."); the label is then ranked among that group's
labels only, so a condition of another crop can no longer win. Each level keeps the objective's reading of the logits
(`modeling_agriclip.calibration.probabilities`): a softmax over the groups, then over the group's labels (InfoNCE), or
per-prompt sigmoids (SigLIP). A label's score is P(group) · P(label | group).
"""

from collections.abc import Sequence

import torch

from agriclip.labels import LabelHierarchy

from .calibration import probabilities
from .zero_shot import Images, ZeroShotClassifier


def two_level_probabilities(
    group_logits: torch.Tensor, label_logits: torch.Tensor, hierarchy: LabelHierarchy, sigmoid: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(the predicted group of each image (N,), the scores (N, C) of the flat labels): P(group) · P(label | group)
    for the labels of the predicted group, 0 for every other label."""
    group_probabilities = probabilities(group_logits, sigmoid)
    groups = group_probabilities.argmax(dim=1)
    group_of = torch.tensor(hierarchy.group_of(), device=label_logits.device)
    in_group = group_of[None, :] == groups[:, None]
    masked = label_logits.masked_fill(~in_group, float("-inf"))
    within = probabilities(masked, sigmoid)  # sigmoid(-inf) = 0 and softmax gives -inf 0: other groups score 0
    return groups, within * group_probabilities.gather(1, groups[:, None])


def hierarchy_templates(hierarchy: LabelHierarchy, templates: Sequence[str]) -> tuple[list[str], list[str]]:
    """The (group, label) templates: the file's for each level, else `templates`."""
    return list(hierarchy.group_templates or templates), list(hierarchy.label_templates or templates)


@torch.inference_mode()
def predict_hierarchical(
    classifier: ZeroShotClassifier,
    images: Images,
    hierarchy: LabelHierarchy,
    templates: Sequence[str],
    top_k: int = 5,
) -> list[list[dict]]:
    """Per image, the `top_k` labels of its predicted group, best first: ``{"label", "score", "group",
    "group_score"}`` (score: P(group) · P(label | group))."""
    group_templates, label_templates = hierarchy_templates(hierarchy, templates)
    image_embeds = classifier.image_embeddings(images)
    group_logits = classifier.embedding_logits(image_embeds, hierarchy.group_names, group_templates)
    label_logits = classifier.embedding_logits(image_embeds, hierarchy.labels, label_templates)
    groups, scores = two_level_probabilities(group_logits, label_logits, hierarchy, classifier.sigmoid_scores)
    group_scores = probabilities(group_logits, classifier.sigmoid_scores).gather(1, groups[:, None])[:, 0]
    names, labels = hierarchy.group_names, hierarchy.labels
    # Ranked among the group's labels only, even where a score underflows to the 0 of the other groups' labels.
    in_group = torch.tensor(hierarchy.group_of())[None, :] == groups[:, None]
    ranking = scores.masked_fill(~in_group, -1.0)
    results = []
    for group, group_score, row, key in zip(groups.tolist(), group_scores.tolist(), scores, ranking):
        _, indices = key.topk(min(top_k, len(hierarchy.groups[names[group]])))
        values = row[indices]
        results.append(
            [
                {"label": labels[index], "score": value, "group": names[group], "group_score": group_score}
                for value, index in zip(values.tolist(), indices.tolist())
            ]
        )
    return results
