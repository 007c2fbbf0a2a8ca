"""Where the model looked: heat maps of a zero-shot prediction, their overlays, and the pointing game that measures
them (`agriclip explain`).

For the label explained (by default the predicted one) each image gets one map per image tower that its embedding
uses, at the processed resolution (the resized and centre-cropped view the model sees), scaled to [0, 1]:

- `backbone-attention` (ViT / DINOv2 backbone, `BackboneFamily.returns_attentions`): the last layer's attention of
  the CLS token to the patch tokens, per head and averaged over heads, upsampled bilinearly from the patch grid. It
  shows what the DINO feature attends to and does not depend on the label.
- `backbone-grad-cam` (ResNet / ConvNeXt backbone): Grad-CAM (Selvaraju et al. 2017) of the explained label's
  logit: with `A` the last stage's feature map (C, h, w) and `G` the gradient of the logit w.r.t. it, the channel
  weights are `G` averaged over space, and the map is `relu(sum_k weight_k * A_k)`, upsampled bilinearly.
- `clip-grad-attention` (the CLIP image tower): the gradient-weighted attention relevance of Chefer et al. 2021
  ("Generic Attention-model Explainability"): `R = I`, then for every layer from the first to the last
  `R = R + mean_heads(relu(dA * A)) @ R`, with `A` the layer's attention weights and `dA` the gradient of the
  explained label's logit w.r.t. them; the map is the CLS row of `R` over the patch tokens, upsampled bilinearly.

The logit is the one the prediction comes from: `exp(logit_scale) * cos(image embedding, label embedding)` (plus
the bias of a SigLIP model) of the classifier's embedding, so for `"fused"` both maps explain the fused logit.
Which maps are made follows the embedding: aligned, the backbone's; clip, the CLIP tower's; fused, both.

Every map is min-max scaled per image (a constant map becomes zeros). Its location is the pixel of its maximal set
nearest that set's centroid (`peak`). The pointing game (`pointing_hit`) scores a map 1 when its maximum falls inside
a lesion mask (ties share the score), against the random-map baseline `mask.mean()`, the chance that a uniformly
random maximum falls inside.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from agriclip.atomic import atomic_open, write_json_atomically
from agriclip.images import DecodeStats
from agriclip.templates import DEFAULT_TEMPLATES

from .backbones import backbone_family
from .zero_shot import ZeroShotClassifier


BACKBONE_ATTENTION = "backbone-attention"
BACKBONE_GRAD_CAM = "backbone-grad-cam"
CLIP_GRAD_ATTENTION = "clip-grad-attention"
MAP_TYPES = (BACKBONE_ATTENTION, BACKBONE_GRAD_CAM, CLIP_GRAD_ATTENTION)

MAP_DESCRIPTIONS = {
    BACKBONE_ATTENTION: "last-layer CLS-to-patch attention of the backbone, mean over heads (label-independent)",
    BACKBONE_GRAD_CAM: "Grad-CAM of the explained logit on the backbone's last-stage feature map",
    CLIP_GRAD_ATTENTION: "gradient-weighted attention relevance (Chefer et al. 2021) of the CLIP image tower's CLS "
    "token over all layers, for the explained logit",
}

# Colour map of the overlays (matplotlib's) and the weight of the heat map over the photo.
COLORMAP = "jet"
OVERLAY_ALPHA = 0.5


def is_agriclip(model) -> bool:
    return hasattr(model, "dino_model") and hasattr(model, "aligner")


def embedding_of(classifier: ZeroShotClassifier) -> str:
    """The image embedding a classifier scores with ("clip" for a plain transformers CLIP model)."""
    return classifier.embedding or getattr(classifier.model.config, "image_embedding", None) or "clip"


def map_types(model, embedding: str) -> list[str]:
    """The maps `explain` makes for `embedding` on `model`: the backbone's for aligned (its CLS attention for a ViT or
    DINOv2, Grad-CAM for a ResNet or ConvNeXt), the CLIP tower's for clip, both for fused."""
    types = []
    if embedding in ("aligned", "fused"):
        family = backbone_family(model.config.dino_config)
        types.append(BACKBONE_ATTENTION if family.returns_attentions else BACKBONE_GRAD_CAM)
    if embedding in ("clip", "fused"):
        types.append(CLIP_GRAD_ATTENTION)
    return types


def use_eager_attention(model) -> None:
    """Switches the towers to eager attention where they run another (the same outputs; only eager returns the
    attention weights that the attention maps read)."""
    configs = [model.config.vision_config]
    if is_agriclip(model) and backbone_family(model.config.dino_config).returns_attentions:
        configs.append(model.config.dino_config)
    if any(config._attn_implementation != "eager" for config in configs):
        model.set_attn_implementation("eager")


def unit_range(maps: torch.Tensor) -> torch.Tensor:
    """Min-max scales each map (over its last two dimensions) to [0, 1]; a constant map becomes zeros."""
    flat = maps.flatten(-2)
    low, high = flat.amin(-1, keepdim=True), flat.amax(-1, keepdim=True)
    span = high - low
    scaled = torch.where(span > 0, (flat - low) / span.clamp_min(torch.finfo(flat.dtype).tiny), torch.zeros_like(flat))
    return scaled.view_as(maps)


def upsample(grid: torch.Tensor, size: tuple[int, int], mode: str = "bilinear") -> torch.Tensor:
    """Upsampling of maps (..., h, w) to (..., *size): bilinear (the drawn maps), or "nearest", each grid cell
    spread over its own pixels (the pointing game's cell maximum)."""
    leading = grid.shape[:-2]
    flat = grid.reshape(-1, 1, *grid.shape[-2:]).float()
    options = {"align_corners": False} if mode == "bilinear" else {}
    return F.interpolate(flat, size=size, mode=mode, **options).reshape(*leading, *size)


def grad_cam(features: torch.Tensor, gradients: torch.Tensor) -> torch.Tensor:
    """Grad-CAM grid maps (B, h, w) from a feature map (B, C, h, w) and the gradient of the score w.r.t. it: ReLU of
    the channels weighted by their spatially averaged gradients."""
    weights = gradients.mean(dim=(2, 3), keepdim=True)
    return torch.relu((weights * features).sum(dim=1))


def gradient_attention_relevance(attentions: Sequence[torch.Tensor], gradients: Sequence[torch.Tensor]) -> torch.Tensor:
    """Chefer et al. 2021's relevance (B, T, T) of a transformer: `R = I`, then per layer (first to last)
    `R = R + mean_heads(relu(grad * attention)) @ R`, from attentions and their gradients (B, heads, T, T) each."""
    batch, _, tokens, _ = attentions[0].shape
    relevance = torch.eye(tokens, dtype=attentions[0].dtype, device=attentions[0].device).expand(batch, -1, -1)
    for attention, gradient in zip(attentions, gradients):
        weighted = (gradient * attention).clamp(min=0).mean(dim=1)
        relevance = relevance + weighted @ relevance
    return relevance


def _patch_grid(tokens: int, size: tuple[int, int], patch_size: int) -> tuple[int, int]:
    """The (rows, columns) of patches of an image of `size`, checked against the number of patch tokens."""
    grid = (size[0] // patch_size, size[1] // patch_size)
    if grid[0] * grid[1] != tokens:
        raise ValueError(
            f"{tokens} patch tokens do not form the {grid[0]}x{grid[1]} grid of a {size[0]}x{size[1]} image in "
            f"{patch_size}-pixel patches"
        )
    return grid


@dataclass
class Explanation:
    """What `explain` computes for a batch of B images and C labels.

    Attributes:
        logits: (B, C) the logits the prediction comes from.
        probabilities: (B, C) softmax over the labels (per-label sigmoids for a SigLIP model), as `predict` scores.
        targets: (B,) the index of the label explained per image.
        maps: map type -> (B, H, W) in [0, 1] at the processed resolution.
        grids: map type -> (B, h, w) the map before upsampling and scaling (the raw CLS attention mean, Grad-CAM or
            relevance values on the patch or feature grid).
        head_maps: map type -> (B, heads, H, W) in [0, 1], per attention head (`backbone-attention` only).
    """

    logits: torch.Tensor
    probabilities: torch.Tensor
    targets: torch.Tensor
    maps: dict[str, torch.Tensor] = field(default_factory=dict)
    grids: dict[str, torch.Tensor] = field(default_factory=dict)
    head_maps: dict[str, torch.Tensor] = field(default_factory=dict)


def _image_outputs(classifier: ZeroShotClassifier, pixel_values: torch.Tensor, embedding: str, attentions: bool):
    """(image embedding before normalisation, CLIP tower output or None, backbone output or None)."""
    model = classifier.model
    if not is_agriclip(model):  # a transformers CLIPModel: its one image tower
        outputs = model.vision_model(pixel_values=pixel_values, output_attentions=attentions, return_dict=True)
        return model.visual_projection(outputs.pooler_output), outputs, None
    kwargs = {"fusion_weight": classifier.fusion_weight} if classifier.fusion_weight is not None else {}
    outputs = model.get_image_features(pixel_values, embedding=embedding, output_attentions=attentions, **kwargs)
    if embedding == "clip":
        return outputs.pooler_output, outputs, None
    if embedding == "aligned":
        return outputs.pooler_output, None, outputs
    return outputs.pooler_output, outputs.vision_model_output, outputs.backbone_model_output


def explain(
    classifier: ZeroShotClassifier,
    pixel_values: torch.Tensor,
    class_names: Sequence[str],
    templates: Sequence[str] | str = DEFAULT_TEMPLATES,
    targets: int | Sequence[int] | torch.Tensor | None = None,
) -> Explanation:
    """The maps of `map_types` for a batch of `pixel_values` (B, 3, H, W), as the classifier's processor makes them.

    `targets` is the label index explained per image (one int for all); None explains each image's predicted label.
    One forward and one backward pass; the model's weights get no gradients. The towers are switched to eager
    attention where an attention map needs it (`use_eager_attention`).
    """
    model = classifier.model
    embedding = embedding_of(classifier)
    types = map_types(model, embedding) if is_agriclip(model) else [CLIP_GRAD_ATTENTION]
    needs_attentions = BACKBONE_ATTENTION in types or CLIP_GRAD_ATTENTION in types
    if needs_attentions:
        use_eager_attention(model)
    label_embeds = classifier.label_embeddings(class_names, templates).clone().to(classifier.device)
    size = tuple(pixel_values.shape[-2:])
    with torch.enable_grad():
        pixels = pixel_values.to(classifier.device, model.dtype).detach().requires_grad_(True)
        embeds, clip_outputs, backbone_outputs = _image_outputs(classifier, pixels, embedding, needs_attentions)
        logits = classifier.logit_scale * F.normalize(embeds.float(), dim=-1) @ label_embeds.T
        if classifier.sigmoid_scores:
            logits = logits + classifier.logit_bias
        if targets is None:
            chosen = logits.detach().argmax(dim=1)
        else:
            chosen = torch.as_tensor(targets, dtype=torch.long, device=logits.device).expand(len(logits))
        inputs = {}
        if BACKBONE_GRAD_CAM in types:
            inputs[BACKBONE_GRAD_CAM] = [backbone_outputs.last_hidden_state]
        if CLIP_GRAD_ATTENTION in types:
            inputs[CLIP_GRAD_ATTENTION] = list(clip_outputs.attentions)
        flat = [tensor for tensors in inputs.values() for tensor in tensors]
        gradients = []
        if flat:
            score = logits.gather(1, chosen[:, None]).sum()  # images are independent: one backward for the batch
            gradients = torch.autograd.grad(score, flat)
    probabilities = torch.sigmoid(logits) if classifier.sigmoid_scores else logits.softmax(dim=-1)
    result = Explanation(logits.detach().cpu(), probabilities.detach().cpu(), chosen.cpu())
    start = 0
    for name, tensors in inputs.items():
        inputs[name] = (tensors, gradients[start : start + len(tensors)])
        start += len(tensors)

    if BACKBONE_ATTENTION in types:
        attention = backbone_outputs.attentions[-1].detach().float()  # (B, heads, T, T)
        cls_row = attention[:, :, 0, 1:]
        grid = _patch_grid(cls_row.shape[-1], size, model.config.dino_config.patch_size)
        heads = cls_row.unflatten(-1, grid)
        result.grids[BACKBONE_ATTENTION] = heads.mean(dim=1).cpu()
        result.head_maps[BACKBONE_ATTENTION] = unit_range(upsample(heads, size)).cpu()
    if BACKBONE_GRAD_CAM in types:
        (features,), (gradient,) = inputs[BACKBONE_GRAD_CAM]
        result.grids[BACKBONE_GRAD_CAM] = grad_cam(features.detach().float(), gradient.float()).cpu()
    if CLIP_GRAD_ATTENTION in types:
        attentions, attention_gradients = inputs[CLIP_GRAD_ATTENTION]
        relevance = gradient_attention_relevance(
            [a.detach().float() for a in attentions], [g.float() for g in attention_gradients]
        )
        cls_row = relevance[:, 0, 1:]
        grid = _patch_grid(cls_row.shape[-1], size, model.config.vision_config.patch_size)
        result.grids[CLIP_GRAD_ATTENTION] = cls_row.unflatten(-1, grid).cpu()
    for name in types:
        result.maps[name] = unit_range(upsample(result.grids[name], size))
    return result


# ---------------------------------------------------------------------------------------------------------------
# Locations, the pointing game and the processed view
# ---------------------------------------------------------------------------------------------------------------


def maximal_set(heat: np.ndarray, tolerance: float = 1e-6) -> np.ndarray:
    """The boolean mask of the pixels within `tolerance` of the map's maximum (bilinear upsampling of a coarse grid
    leaves plateaus)."""
    heat = np.asarray(heat, dtype=np.float64)
    return heat >= heat.max() - tolerance


def peak(heat: np.ndarray) -> tuple[int, int]:
    """The map's maximum as (x, y) pixel coordinates: the pixel of the maximal set nearest its centroid."""
    rows, cols = np.nonzero(maximal_set(heat))
    nearest = np.argmin((rows - rows.mean()) ** 2 + (cols - cols.mean()) ** 2)
    return int(cols[nearest]), int(rows[nearest])


def pointing_hit(heat: np.ndarray, mask: np.ndarray) -> float:
    """The pointing game on one image: the share of the map's maximal set inside `mask` (1 or 0 for a single maximum;
    ties count as a uniformly random choice among them)."""
    heat, mask = np.asarray(heat), np.asarray(mask, dtype=bool)
    if heat.shape != mask.shape:
        raise ValueError(f"the map {heat.shape} and the mask {mask.shape} differ in shape")
    return float(mask[maximal_set(heat)].mean())


def random_hit(mask: np.ndarray) -> float:
    """The random-map baseline of `pointing_hit`: the chance that a uniformly random maximum lies in `mask`."""
    return float(np.asarray(mask, dtype=bool).mean())


def processed_mask(mask: np.ndarray, image_processor) -> np.ndarray:
    """A boolean mask in an image's pixel coordinates mapped into the processed view: resized and centre-cropped by
    `image_processor` exactly as the image is (without normalisation), then thresholded at one half."""
    picture = Image.fromarray(np.asarray(mask, dtype=np.uint8) * 255).convert("RGB")
    values = image_processor(images=[picture], do_normalize=False, do_rescale=True, return_tensors="pt")
    return values["pixel_values"][0, 0].numpy() >= 0.5


def processed_view(pixel_values: torch.Tensor, image_processor) -> np.ndarray:
    """The uint8 RGB images (B, H, W, 3) that processed `pixel_values` (B, 3, H, W) show: normalisation undone."""
    values = pixel_values.detach().float().cpu()
    if getattr(image_processor, "do_normalize", False):
        mean = torch.tensor(image_processor.image_mean, dtype=values.dtype).view(1, 3, 1, 1)
        std = torch.tensor(image_processor.image_std, dtype=values.dtype).view(1, 3, 1, 1)
        values = values * std + mean
    scale = 255.0 if getattr(image_processor, "do_rescale", True) else 1.0
    return (values.clamp(0, 255.0 / scale) * scale).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def overlay(view: np.ndarray, heat: np.ndarray, alpha: float = OVERLAY_ALPHA, mark: bool = True) -> Image.Image:
    """The heat map (H, W) in [0, 1], coloured by `COLORMAP`, blended over the photo `view` (H, W, 3) uint8, with
    a small cross at its `peak` when `mark`."""
    from matplotlib import colormaps

    colours = colormaps[COLORMAP](np.clip(heat, 0, 1))[..., :3] * 255.0
    blended = (1 - alpha) * view.astype(np.float64) + alpha * colours
    image = Image.fromarray(np.clip(blended + 0.5, 0, 255).astype(np.uint8))
    if mark:
        x, y = peak(heat)
        reach = max(2, min(image.size) // 24)
        draw = ImageDraw.Draw(image)
        draw.line([(x - reach, y), (x + reach, y)], fill=(255, 255, 255))
        draw.line([(x, y - reach), (x, y + reach)], fill=(255, 255, 255))
    return image


# ---------------------------------------------------------------------------------------------------------------
# Files: `agriclip explain`
# ---------------------------------------------------------------------------------------------------------------


def output_names(files: Sequence[str]) -> dict[str, str]:
    """A distinct file stem per image: its path relative to the folder common to all of them, without the suffix,
    with folders joined by "__" (`leaf-spot/rust/0001.png` -> `leaf-spot__rust__0001`)."""
    absolute = [os.path.abspath(path) for path in files]
    root = os.path.commonpath([os.path.dirname(path) for path in absolute]) if absolute else ""
    names, used = {}, set()
    for path, full in zip(files, absolute):
        stem = "__".join(Path(os.path.relpath(full, root)).with_suffix("").parts)
        name, count = stem, 1
        while name in used:  # the same stem with another suffix (leaf.png, leaf.jpg)
            count += 1
            name = f"{stem}-{count}"
        used.add(name)
        names[path] = name
    return names


def _save_png(image: Image.Image, path: Path) -> None:
    with atomic_open(path, "wb") as handle:
        image.save(handle, format="PNG")


def _heads_strip(view: np.ndarray, heads: np.ndarray) -> Image.Image:
    """The overlays of each head's map side by side."""
    tiles = [overlay(view, head) for head in heads]
    strip = Image.new("RGB", (sum(tile.width for tile in tiles), tiles[0].height))
    for index, tile in enumerate(tiles):
        strip.paste(tile, (index * tile.width, 0))
    return strip


@dataclass
class ExplainedFiles:
    """What `explain_files` wrote: one record per readable image (its JSON document) and the decode counts."""

    results: list[dict] = field(default_factory=list)
    stats: DecodeStats = field(default_factory=DecodeStats)


def explain_files(
    classifier: ZeroShotClassifier,
    files: Sequence[str],
    class_names: Sequence[str],
    templates: Sequence[str] | str,
    output: str | os.PathLike,
    label: str | None = None,
    batch_size: int = 8,
    num_workers: int | None = None,
    header: dict | None = None,
) -> ExplainedFiles:
    """Explains each readable image of `files` (the predicted label, or `label` for all) into `output`: per image and
    map type `<name>.<map type>.png` (the overlay on the processed view; for `backbone-attention` also
    `<name>.<map type>.heads.png`, one overlay per head) and `<name>.json` (the scores of all labels, the label
    explained, each map's type, file and argmax). Unreadable files are skipped and counted in `stats`. Files are
    written whole or not at all; an OSError is a file that cannot be written."""
    from .commands import image_batches  # the batched decoding of the other commands

    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    templates = [templates] if isinstance(templates, str) else list(templates)
    target = None if label is None else list(class_names).index(label)
    names = output_names(files)
    processor = classifier.processor.image_processor
    embedding = embedding_of(classifier)
    score_kind = "sigmoid" if classifier.sigmoid_scores else "softmax"
    result = ExplainedFiles()
    for paths, pixel_values in image_batches(classifier, files, result.stats, batch_size, num_workers):
        explanation = explain(classifier, pixel_values, class_names, templates, target)
        views = processed_view(pixel_values, processor)
        for index, path in enumerate(paths):
            name = names[path]
            probabilities = explanation.probabilities[index].tolist()
            explained = int(explanation.targets[index])
            maps = []
            for map_type, heat in explanation.maps.items():
                heat = heat[index].numpy()
                file_name = f"{name}.{map_type}.png"
                _save_png(overlay(views[index], heat), output / file_name)
                x, y = peak(heat)
                record = {
                    "type": map_type,
                    "description": MAP_DESCRIPTIONS[map_type],
                    "overlay": file_name,
                    "grid": list(explanation.grids[map_type].shape[-2:]),
                    "argmax": {"x": x, "y": y},
                    # All zeros: no evidence for the label (Grad-CAM's ReLU cut every channel), no location.
                    "constant": bool(heat.max() <= 0),
                }
                if map_type in explanation.head_maps:
                    heads = explanation.head_maps[map_type][index].numpy()
                    record["heads_overlay"] = f"{name}.{map_type}.heads.png"
                    _save_png(_heads_strip(views[index], heads), output / record["heads_overlay"])
                    record["head_argmax"] = [dict(zip("xy", peak(head))) for head in heads]
                maps.append(record)
            document = {
                "image": path,
                **(header or {}),
                "embedding": embedding,
                "labels": list(class_names),
                "templates": templates,
                "score": score_kind,
                "scores": sorted(
                    ({"label": n, "score": p} for n, p in zip(class_names, probabilities)),
                    key=lambda row: -row["score"],
                ),
                "predicted": class_names[int(np.argmax(probabilities))],
                "explained": class_names[explained],
                "explained_score": probabilities[explained],
                "explained_logit": float(explanation.logits[index, explained]),
                "size": {"height": int(views[index].shape[0]), "width": int(views[index].shape[1])},
                "maps": maps,
            }
            write_json_atomically(output / f"{name}.json", document)
            result.results.append({"image": path, "json": f"{name}.json", "document": document})
    return result


__all__ = [
    "BACKBONE_ATTENTION",
    "BACKBONE_GRAD_CAM",
    "CLIP_GRAD_ATTENTION",
    "MAP_TYPES",
    "Explanation",
    "ExplainedFiles",
    "explain",
    "embedding_of",
    "explain_files",
    "grad_cam",
    "gradient_attention_relevance",
    "map_types",
    "output_names",
    "overlay",
    "peak",
    "pointing_hit",
    "processed_mask",
    "processed_view",
    "random_hit",
    "upsample",
    "use_eager_attention",
]
