"""Image-text retrieval recall@k on caption datasets, both directions.

A caption dataset may hold several captions per image (one row each, as in COCO or Flickr30k). Rows are
grouped by image (its file path, or its bytes when it has no path), so each image is ranked once:

- image-to-text: an image is a hit at k when any of its captions is among the k best-scoring captions;
- text-to-image: a caption is a hit at k when its image is among the k best-scoring images.

Images may also be grouped as interchangeable (`image_groups`): then any caption of any image of the group counts
for an image of the group, and any image of the group for a caption of one of them. Stage 1's validation groups
the image-caption pairs by caption text, so that with template captions ("a photo of a red leaf" for many images)
a retrieved caption equal to the true one is a hit, and so is any image that caption was written for.

Ties are broken as in the metric modules (`evaluation.metrics`), the way `argmax` breaks them: among equal
scores the lowest index ranks first. A query is a hit at k when fewer than k non-matches rank above its
first-ranked match, so a model whose similarities all tie does not score recall 1. NaN and infinite
similarities are an error (`NonFiniteError`).
"""

import hashlib
from collections.abc import Hashable, Iterable

import torch

from .metrics import NonFiniteError, count_nonfinite_rows


DEFAULT_RECALL_KS = (1, 5, 10)


def image_key(image: dict) -> str:
    """Identity of an undecoded `datasets` image (``{"path", "bytes"}``): the path, else a hash of the bytes."""
    if image.get("path"):
        return image["path"]
    if image.get("bytes") is not None:
        return hashlib.sha1(image["bytes"]).hexdigest()
    raise ValueError("An image has neither a path nor bytes.")


def group_by(keys: Iterable[Hashable]) -> tuple[list[int], torch.Tensor]:
    """Groups equal keys: the index of each distinct key's first occurrence (in order) and, for every key, the
    position of its group in that list."""
    position: dict[Hashable, int] = {}
    first, group = [], []
    for index, key in enumerate(keys):
        if key not in position:
            position[key] = len(first)
            first.append(index)
        group.append(position[key])
    return first, torch.tensor(group, dtype=torch.long)


def group_captions(images: list[dict]) -> tuple[list[int], torch.Tensor]:
    """Group caption rows by image.

    Returns the row index of each unique image (first occurrence, in order) and, for every row (caption),
    the position of its image in that list.
    """
    return group_by(image_key(image) for image in images)


def _hits(similarity: torch.Tensor, positive: torch.Tensor, ks: tuple[int, ...]) -> torch.Tensor:
    """Per query (row), whether a positive column ranks within each k: (n_queries, len(ks)) bool."""
    columns = torch.arange(similarity.shape[1], device=similarity.device)
    best_positive = similarity.masked_fill(~positive, float("-inf")).amax(dim=1, keepdim=True)
    # The first-ranked match: the lowest-index positive column that scores `best_positive`.
    first_match = torch.where(positive & (similarity == best_positive), columns, len(columns)).amin(dim=1, keepdim=True)
    # Only non-matches rank above the first-ranked match: a higher score, or the same score and a lower index.
    above = (similarity > best_positive) | ((similarity == best_positive) & (columns < first_match))
    return above.sum(dim=1, keepdim=True) < torch.tensor(ks, device=similarity.device)


def retrieval_recall(
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    caption_to_image: torch.Tensor,
    ks: tuple[int, ...] = DEFAULT_RECALL_KS,
    chunk_size: int = 1024,
    source: str = "the model",
    image_groups: torch.Tensor | None = None,
) -> dict:
    """Recall@k in both directions from L2-normalised embeddings.

    Args:
        image_embeds: (n_images, dim), one row per unique image.
        text_embeds: (n_captions, dim).
        caption_to_image: (n_captions,) the image of each caption.
        ks: the k of each recall@k.
        chunk_size: queries scored at once, bounding memory to chunk_size × max(n_images, n_captions).
        source: who gave the embeddings, for the error on non-finite similarities (e.g. the model and dataset).
        image_groups: (n_images,) optional group of each image: images of one group are interchangeable, so image i
            and caption j match when caption j's image is in i's group (e.g. `group_by` of the caption texts of
            image-caption pairs, so that an identical caption counts as the true one). Default: every image its
            own group.

    Returns:
        ``{"image_to_text": {"R@1": ..., ...}, "text_to_image": {...}}`` with recalls in [0, 1].

    Raises:
        NonFiniteError: when a similarity is NaN or infinite, counting the images affected.
    """
    if len(caption_to_image) != len(text_embeds):
        raise ValueError(f"caption_to_image has {len(caption_to_image)} entries for {len(text_embeds)} captions.")
    if image_groups is None:
        image_groups = torch.arange(len(image_embeds))
    elif len(image_groups) != len(image_embeds):
        raise ValueError(f"image_groups has {len(image_groups)} entries for {len(image_embeds)} images.")
    # Image i and caption j match when they share a group; a caption's group is its image's.
    groups = image_groups.to(image_embeds.device)
    caption_groups = groups[caption_to_image.to(image_embeds.device)]
    image_hits, n_nonfinite = [], 0
    for images, ids in zip(image_embeds.split(chunk_size), groups.split(chunk_size)):
        similarity = images @ text_embeds.T
        # Image-to-text rows hold every similarity, so they alone show whether any is non-finite.
        n_nonfinite += count_nonfinite_rows(similarity)
        image_hits.append(_hits(similarity, ids[:, None] == caption_groups[None, :], ks))
    if n_nonfinite:
        raise NonFiniteError(source, n_nonfinite, len(image_embeds), "images")
    image_hits = torch.cat(image_hits)
    text_hits = torch.cat(
        [
            _hits(texts @ image_embeds.T, owners[:, None] == groups[None, :], ks)
            for texts, owners in zip(text_embeds.split(chunk_size), caption_groups.split(chunk_size))
        ]
    )
    return {
        "image_to_text": {f"R@{k}": hits.float().mean().item() for k, hits in zip(ks, image_hits.T)},
        "text_to_image": {f"R@{k}": hits.float().mean().item() for k, hits in zip(ks, text_hits.T)},
    }
