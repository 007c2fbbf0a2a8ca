"""Weighted k-nearest-neighbour classification on frozen features (the DINO evaluation protocol, eval_knn.py)."""

import torch
import torch.nn.functional as F

from .metrics import check_finite


@torch.no_grad()
def knn_accuracy(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
) -> float:
    """Top-1 accuracy of a cosine-similarity k-NN vote weighted by `exp(similarity / temperature)`.

    Args:
        train_features: (N, D) reference features; train_labels: (N,) their class indices.
        test_features: (M, D) query features; test_labels: (M,) their class indices.
        num_classes: number of classes; k: neighbours per query (capped at N).

    Raises:
        NonFiniteError: when a vote is NaN or infinite (non-finite features, or a temperature so small that
            `exp` overflows), counting the query images affected.
    """
    train = F.normalize(train_features.float(), dim=-1)
    test = F.normalize(test_features.float(), dim=-1)
    similarity, neighbours = (test @ train.T).topk(min(k, len(train)), dim=1)
    votes = torch.zeros(len(test), num_classes, device=test.device)
    votes.scatter_add_(1, train_labels.to(test.device)[neighbours], (similarity / temperature).exp())
    check_finite(votes, "k-NN on the model's features", "query images")
    return (votes.argmax(1) == test_labels.to(test.device)).float().mean().item()
