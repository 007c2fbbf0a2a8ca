"""Two-level (group, then label) zero-shot scoring of a suite dataset beside its flat labels.

A dataset's `hierarchy` label file (`agriclip.labels`) groups its classes (folder names, as `class_names` keys are);
the prompts of its labels are the dataset's prompt names, those of its groups the group names. The flat prediction
ranks every label with the label templates; the two-level one (`modeling_agriclip.hierarchy`) picks the group with
the group templates first, then the best label of that group. Both are scored on the evaluated images.
"""

from collections.abc import Sequence

import torch

from agriclip.labels import LabelHierarchy, load_hierarchy
from modeling_agriclip.hierarchy import hierarchy_templates, two_level_probabilities
from modeling_agriclip.zero_shot import ZeroShotClassifier


def load_task_hierarchy(
    spec, class_names: Sequence[str], prompt_names: Sequence[str]
) -> tuple[LabelHierarchy, list[int]]:
    """The dataset's hierarchy over its prompt names, and the dataset class of each of its flat labels.

    Raises:
        ValueError: naming the file, when its labels are not exactly the dataset's classes.
    """
    hierarchy = load_hierarchy(spec.hierarchy)
    missing = sorted(set(class_names) - set(hierarchy.labels))
    unknown = sorted(set(hierarchy.labels) - set(class_names))
    if missing or unknown:
        raise ValueError(
            f"{spec.hierarchy}: the labels must be the classes of dataset {spec.name!r} ({list(class_names)}); "
            f"missing {missing}, not classes {unknown}"
        )
    classes = [list(class_names).index(label) for label in hierarchy.labels]
    prompts = {label: prompt_names[index] for label, index in zip(hierarchy.labels, classes)}
    groups = {group: [prompts[label] for label in labels] for group, labels in hierarchy.groups.items()}
    return LabelHierarchy(groups, hierarchy.levels, hierarchy.group_templates, hierarchy.label_templates), classes


def hierarchy_record(
    classifier: ZeroShotClassifier,
    features: torch.Tensor,
    labels: torch.Tensor,
    task_hierarchy: tuple[LabelHierarchy, list[int]],
    templates: Sequence[str],
) -> dict:
    """Flat and two-level top-1 on image `features`, the group accuracy of the two-level prediction and of the flat
    one (the group of its label), with their chance levels (1/C and 1/groups)."""
    hierarchy, classes = task_hierarchy
    group_templates, label_templates = hierarchy_templates(hierarchy, templates)
    group_logits = classifier.embedding_logits(features, hierarchy.group_names, group_templates)
    label_logits = classifier.embedding_logits(features, hierarchy.labels, label_templates)
    groups, scores = two_level_probabilities(group_logits, label_logits, hierarchy, classifier.sigmoid_scores)
    group_of = torch.tensor(hierarchy.group_of())
    in_group = group_of[None, :] == groups[:, None]
    two_level = scores.masked_fill(~in_group, -1.0).argmax(dim=1)
    flat = label_logits.argmax(dim=1)
    # The flat labels in hierarchy order: position j is dataset class classes[j].
    position = torch.empty(len(classes), dtype=torch.long)
    position[torch.tensor(classes)] = torch.arange(len(classes))
    targets = position[labels]
    return {
        "top1_flat": float((flat == targets).double().mean()),
        "top1_hierarchical": float((two_level == targets).double().mean()),
        "group_accuracy": float((groups == group_of[targets]).double().mean()),
        "flat_group_accuracy": float((group_of[flat] == group_of[targets]).double().mean()),
        "levels": list(hierarchy.levels),
        "n_groups": len(hierarchy.groups),
        "n_images": len(labels),
        "chance_top1": 1 / len(classes),
        "chance_group": 1 / len(hierarchy.groups),
    }
