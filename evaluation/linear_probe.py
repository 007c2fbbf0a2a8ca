"""Linear probe and k-shot evaluation on frozen image features.

The protocol follows CLIP's linear-probe evaluation (Radford et al. 2021, appendix A.3): a multinomial
logistic regression on frozen features, fitted full-batch with L-BFGS, with the L2 strength swept and
chosen on a validation split held out of the training data, then refitted on all of the training data. It is
written in torch so the package needs no scikit-learn. The objective is

    mean cross-entropy + l2 / 2 * ||W||^2        (the bias is not penalised)

which is scikit-learn's `LogisticRegression(C=1 / (l2 * n_train))`.

k-shot evaluation samples k training images per class with a seeded generator, validates the L2 strength
on up to k further images per class from the rest of the training pool, and reports the mean and spread
over seeds.
"""

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn


DEFAULT_L2_VALUES = tuple(10.0**exponent for exponent in range(-6, 3))


@dataclass
class LinearProbe:
    """A fitted probe: the classifier and how its L2 strength was chosen."""

    classifier: nn.Linear
    l2: float
    val_accuracy: float

    @torch.inference_mode()
    def scores(self, features: torch.Tensor) -> torch.Tensor:
        """Class logits (n, num_classes) for frozen features (n, dim)."""
        return self.classifier(features.float())


def fit_logistic_regression(
    features: torch.Tensor, labels: torch.Tensor, num_classes: int, l2: float, max_iter: int = 1000
) -> nn.Linear:
    """Multinomial logistic regression by full-batch L-BFGS from zeros; see the module docstring for the objective."""
    features = features.float()
    classifier = nn.Linear(features.shape[1], num_classes)
    nn.init.zeros_(classifier.weight)
    nn.init.zeros_(classifier.bias)
    optimizer = torch.optim.LBFGS(
        classifier.parameters(), lr=1.0, max_iter=max_iter, tolerance_grad=1e-6, line_search_fn="strong_wolfe"
    )

    def closure():
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(classifier(features), labels)
        loss = loss + 0.5 * l2 * classifier.weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return classifier.requires_grad_(False)


def _accuracy(classifier: nn.Linear, features: torch.Tensor, labels: torch.Tensor) -> float:
    with torch.inference_mode():
        return (classifier(features.float()).argmax(dim=1) == labels).float().mean().item()


def _shuffled_classes(labels: torch.Tensor, seed: int) -> Iterator[torch.Tensor]:
    """The example indices of each class in turn (in label order), each class's in a seeded random order: what the
    seeded per-class samples below draw from."""
    generator = torch.Generator().manual_seed(seed)
    for label in labels.unique():
        indices = (labels == label).nonzero().flatten()
        yield indices[torch.randperm(len(indices), generator=generator)]


def stratified_split(labels: torch.Tensor, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded per-class split of example indices into (rest, held_out), `fraction` of each class held out.

    Every class with at least two examples keeps at least one example on each side.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must be in (0, 1); got {fraction}.")
    rest, held_out = [], []
    for indices in _shuffled_classes(labels, seed):
        n_held_out = min(max(round(fraction * len(indices)), 1), len(indices) - 1)
        held_out.append(indices[:n_held_out])
        rest.append(indices[n_held_out:])
    return torch.cat(rest).sort().values, torch.cat(held_out).sort().values


def select_l2(
    fit_features: torch.Tensor,
    fit_labels: torch.Tensor,
    val_features: torch.Tensor,
    val_labels: torch.Tensor,
    num_classes: int,
    l2_values: tuple[float, ...] = DEFAULT_L2_VALUES,
) -> LinearProbe:
    """Fit one probe per L2 strength on the fit data and keep the one with the best validation accuracy."""
    if len(val_labels) == 0:
        raise ValueError("The validation split is empty: the L2 strength cannot be chosen.")
    best = None
    for l2 in l2_values:
        classifier = fit_logistic_regression(fit_features, fit_labels, num_classes, l2)
        probe = LinearProbe(classifier=classifier, l2=l2, val_accuracy=_accuracy(classifier, val_features, val_labels))
        # Ties go to the strongest regularisation: the simplest model that validates as well.
        if best is None or (probe.val_accuracy, probe.l2) > (best.val_accuracy, best.l2):
            best = probe
    return best


def linear_probe(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    num_classes: int,
    l2_values: tuple[float, ...] = DEFAULT_L2_VALUES,
    val_fraction: float = 0.2,
    seed: int = 0,
) -> LinearProbe:
    """CLIP's protocol: choose the L2 strength on a seeded stratified validation split of the training
    data, then refit on all of the training data with that strength."""
    fit_indices, val_indices = stratified_split(train_labels, val_fraction, seed)
    selected = select_l2(
        train_features[fit_indices],
        train_labels[fit_indices],
        train_features[val_indices],
        train_labels[val_indices],
        num_classes,
        l2_values,
    )
    classifier = fit_logistic_regression(train_features, train_labels, num_classes, selected.l2)
    return LinearProbe(classifier=classifier, l2=selected.l2, val_accuracy=selected.val_accuracy)


def sample_k_shot(labels: torch.Tensor, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded k-shot sample: (train, val) indices with k images per class each, val drawn from the rest.

    A class with fewer than 2k images keeps k (or all) for training and gives the remainder to validation.
    """
    if k < 1:
        raise ValueError(f"k must be at least 1; got {k}.")
    train, val = [], []
    for indices in _shuffled_classes(labels, seed):
        train.append(indices[:k])
        val.append(indices[k : 2 * k])
    return torch.cat(train).sort().values, torch.cat(val).sort().values


def k_shot_probe(
    features: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    k: int,
    seed: int,
    l2_values: tuple[float, ...] = DEFAULT_L2_VALUES,
) -> LinearProbe:
    """Linear probe on a seeded k-shot sample of (features, labels), its L2 strength validated on up to k
    more shots per class; the probe is fitted on the k shots alone."""
    train, val = sample_k_shot(labels, k, seed)
    return select_l2(features[train], labels[train], features[val], labels[val], num_classes, l2_values)
