"""Stage 3 of AgriCLIP, the work behind `python -m training.stage3_align` (which parses the options).

Streams the images once through the frozen backbone and the CLIP image tower and, where the caption targets are
needed, each distinct caption set once through the CLIP text tower, with a feature cache keyed by everything the
features depend on, and fits the linear aligner from the backbone's features by the objective `--objective` names
(`training.aligner.ALIGNMENT_OBJECTIVES`): onto CLIP's image embedding (the paper), or onto the CLIP text embeddings
of each image's captions (closed form, or a contrastive head).

What reads the captions: the caption targets of the validation pairs, always (the fusion weight is chosen by
image-to-text recall against them, and with them the text objectives' ridge), and those of the training pairs for
the text objectives only (`text-mse` fits onto them, `contrastive` also contrasts by their caption sets). The
training pairs of `image-mse` are read for their images alone: their captions are neither tokenised nor encoded.

Everything stage 3 chooses, it chooses on its validation pairs, never on downstream images: the validation split, or
a seeded held-out fraction of the training images, not fitted on, when the data has none
(`training.data.plan_validation`). There it picks the ridge of the closed forms (from `--ridge-grid`, unless
`--ridge` is given) and the fusion weight of the CLIP and aligned image embeddings (from `--fusion-grid`, by
image-to-text recall@1 against the images' caption targets, identical caption sets counting as one), and writes
the objective and the fusion weight into the exported config.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate.logging import get_logger
from safetensors import safe_open
from safetensors.torch import save_file

from agriclip.atomic import atomic_path
from agriclip.images import DecodeStats, DecodingCollator
from evaluation.retrieval import group_by, retrieval_recall
from modeling_agriclip.modeling_agriclip import fuse_image_embeddings
from training.aligner import (
    TARGET_TEXT,
    AlignerStatistics,
    AlignerWeights,
    AlignmentData,
    aligner_metrics,
    create_objective,
    fit_closed_form,
    relative_ridge,
)
from training.data import plan_validation, process_shard_loader
from training.models import load_model_and_processor
from training.runtime import (
    RunLock,
    UnreadableDataError,
    batch_outputs,
    decode_totals,
    exit_on_sigterm,
    export_atomically,
    init_run_trackers,
    make_accelerator,
    report_decode_stats,
)


logger = get_logger(__name__)

RUN = "stage3_align"

# The feature a target of `training.aligner` names, under its key in a batch of `extract_features` and in the cache.
TARGET_FEATURES = {"image": "y", "text": "t"}
IMAGE_FEATURES = ("x", "y")
TEXT_FEATURES = ("t", "caption_key", "label_key")

# The selection metric of the text objectives' ridge and of the fusion weight.
RECALL_KEY = "image_to_text_R@1"


def caption_variants(row: Mapping) -> list[str]:
    """An image's caption variants: its `captions`, else its one `caption`."""
    return list(row.get("captions") or [row["caption"]])


def _int64_key(value) -> int:
    digest = hashlib.sha256(json.dumps(value).encode()).digest()
    return int.from_bytes(digest[:8], "little", signed=True)


def caption_key(variants: Sequence[str]) -> int:
    """An int64 identity of a set of caption variants, the same for images whose variants are the same texts in any
    order (what validation counts as one caption and the contrastive head as one target)."""
    return _int64_key(sorted(variants))


def label_key(row: Mapping) -> int:
    """An int64 identity of an image's class: its `source` and `label` (either may be absent)."""
    return _int64_key([row.get("source"), row.get("label")])


class PairCollator(DecodingCollator):
    """Collates `{"image", "caption", "captions"}` rows into the processor's `pixel_values` and, with `captions`,
    each row's caption variants (`caption_variants`, as text: `CaptionTargets` tokenises only the caption sets it has
    not encoded yet), `caption_key` and `label_key`. Without `captions` a row's captions are not touched."""

    def __init__(self, processor, captions: bool, stats: DecodeStats | None = None):
        super().__init__(stats)
        self.processor = processor
        self.captions = captions

    def collate(self, decoded):
        images = [image for _, image in decoded]
        batch = {"pixel_values": self.processor(images=images, return_tensors="pt")["pixel_values"]}
        if self.captions:
            variants = [caption_variants(row) for row, _ in decoded]
            batch["caption_variants"] = variants
            batch["caption_key"] = torch.tensor([caption_key(captions) for captions in variants], dtype=torch.long)
            batch["label_key"] = torch.tensor([label_key(row) for row, _ in decoded], dtype=torch.long)
        return batch


class CaptionTargets:
    """
    The caption targets of one split: each distinct caption set's (`caption_key`) mean of the L2-normalised CLIP text
    embeddings of its variants, tokenised and encoded once, in the first batch that holds it, and kept for the images
    after it with the same set (in any order: the same target up to float rounding). What is kept is one
    `projection_dim` float32 vector per distinct set: at most one per image, and far fewer when captions repeat, as
    captions written from class names do.
    """

    def __init__(self, model, processor, accelerator):
        self.model = model
        self.processor = processor
        self.accelerator = accelerator
        self.targets: dict[int, torch.Tensor] = {}

    def __call__(self, variants: Sequence[Sequence[str]], keys: torch.Tensor) -> torch.Tensor:
        """The targets of a batch's rows, by their caption `variants` and `caption_key`s."""
        keys = keys.tolist()
        new = {}
        for captions, key in zip(variants, keys):
            if key not in self.targets:
                new.setdefault(key, captions)
        if new:
            device = self.accelerator.device
            texts = self.processor(
                text=[caption for captions in new.values() for caption in captions], return_tensors="pt"
            )
            with self.accelerator.autocast():
                embeddings = self.model.get_text_features(
                    texts["input_ids"].to(device), texts["attention_mask"].to(device)
                ).pooler_output
            counts = torch.tensor([len(captions) for captions in new.values()], device=device)
            owner = torch.repeat_interleave(torch.arange(len(new), device=device), counts)
            sums = embeddings.new_zeros(len(new), embeddings.shape[1], dtype=torch.float32)
            sums.index_add_(0, owner, F.normalize(embeddings.float(), dim=-1))
            self.targets.update(zip(new, sums / counts[:, None]))
        return torch.stack([self.targets[key] for key in keys])


def extract_features(model, processor, loader, accelerator, description: str, text: bool):
    """Yields per batch of this process's shard, in float32: `x`, the backbone features, `y`, the CLIP image
    embeddings, and with `text` (a loader of `PairCollator(captions=True)`), `t`, the caption targets (each image's
    mean of the L2-normalised CLIP text embeddings of its caption variants, `CaptionTargets`), and their
    `caption_key` and `label_key`."""
    targets = CaptionTargets(model, processor, accelerator) if text else None

    def features_of(batch) -> dict[str, torch.Tensor]:
        pixel_values = batch["pixel_values"].to(accelerator.device)
        with accelerator.autocast():
            x = model.get_backbone_features(pixel_values).pooler_output
            y = model.get_clip_image_features(pixel_values).pooler_output
        features = {"x": x.float(), "y": y.float()}
        if text:
            features["t"] = targets(batch["caption_variants"], batch["caption_key"])
            features["caption_key"] = batch["caption_key"].to(accelerator.device)
            features["label_key"] = batch["label_key"].to(accelerator.device)
        return features

    return batch_outputs(loader, accelerator, features_of, description=description)


@dataclass(frozen=True)
class FeatureCache:
    """A folder of extracted features, one safetensors file per split and process, and the hashes of what the
    features depend on besides the images: `image_key` for `x` and `y` (see `towers_key`), `text_key` for the caption
    targets (see `text_tower_key`)."""

    folder: Path
    image_key: str
    text_key: str


def _hash_modules(digest, modules) -> None:
    for module in modules:
        for name, tensor in module.state_dict().items():
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())


def towers_key(model, processor, accelerator) -> str:
    """Hash of the weights and buffers of both image towers and of their input renormalisation, of the image
    processor, and of the precision of the extraction: computed once per run, not per split."""
    digest = hashlib.sha256()
    _hash_modules(
        digest,
        (
            model.dino_pixel_renorm,
            model.dino_model,
            model.clip_pixel_renorm,
            model.vision_model,
            model.visual_projection,
        ),
    )
    digest.update(processor.image_processor.to_json_string().encode())
    digest.update(str(accelerator.mixed_precision).encode())
    return digest.hexdigest()


def text_tower_key(model, processor, accelerator) -> str:
    """Hash of what the caption targets depend on besides the captions: the text tower's weights, the tokenizer
    (vocabulary, merges, context length) and the precision of the extraction."""
    digest = hashlib.sha256()
    _hash_modules(digest, (model.text_model, model.text_projection))
    digest.update(processor.tokenizer._tokenizer.to_str().encode())
    digest.update(str(processor.tokenizer.model_max_length).encode())
    digest.update(str(accelerator.mixed_precision).encode())
    return digest.hexdigest()


def cached_features(model, processor, loader, accelerator, cache: FeatureCache | None, name: str, text: bool) -> dict:
    """All features of a shard in memory (`extract_features`' keys; the caption targets with `text`), read from or
    written to `cache` when given.

    A cache file records the keys it was extracted under (the towers' keys and the images of the shard: the
    `datasets` fingerprint, which follows the data files and their captions) and is used only under the same keys,
    so a cache left by another model, processor or data set is extracted again rather than silently reused; a file
    without caption targets serves the image features alone. It is written under a temporary name and renamed once
    complete; one that cannot be read (copied half-way, say) is extracted again.
    """
    path = keys = None
    wanted = IMAGE_FEATURES + (TEXT_FEATURES if text else ())
    if cache is not None:
        path = cache.folder / f"{name}-{accelerator.process_index}-of-{accelerator.num_processes}.safetensors"
        data = loader.dataset._fingerprint
        keys = {"key": hashlib.sha256(f"{cache.image_key} {data}".encode()).hexdigest()}
        if text:
            keys["text_key"] = hashlib.sha256(f"{cache.text_key} {data}".encode()).hexdigest()
    if path is not None and path.is_file():
        try:
            with safe_open(path, framework="pt") as cached:
                metadata = cached.metadata() or {}
                if all(metadata.get(field) == key for field, key in keys.items()) and set(wanted) <= set(cached.keys()):
                    return {feature: cached.get_tensor(feature) for feature in wanted}
            logger.warning(
                f"feature cache {path} was extracted from another model, processor or data, or without the "
                "caption targets; extracting again"
            )
        except Exception as error:  # truncated, corrupt, or not a feature file: it is only a cache
            logger.warning(f"feature cache {path} cannot be read ({error}); extracting the features again")
    batches = list(extract_features(model, processor, loader, accelerator, f"features ({name})", text))
    # An empty shard (more processes than images) still has the features' shapes.
    features = {
        feature: torch.cat([batch[feature].cpu() for batch in batches])
        if batches
        else _empty_feature(model.config, feature)
        for feature in wanted
    }
    if path is not None:
        with atomic_path(path) as staging:
            save_file({feature: tensor.contiguous() for feature, tensor in features.items()}, staging, metadata=keys)
    return features


def _empty_feature(config, feature: str) -> torch.Tensor:
    if feature.endswith("_key"):
        return torch.zeros(0, dtype=torch.long)
    return torch.zeros(0, config.backbone_hidden_size if feature == "x" else config.projection_dim)


def feature_statistics(model, batches, accelerator, target: str) -> AlignerStatistics:
    """Sufficient statistics over all processes of (backbone features, `target`) of `batches` (each a dict of
    `extract_features`' keys, this process's)."""
    config = model.config
    stats = AlignerStatistics(config.backbone_hidden_size, config.projection_dim, device=accelerator.device)
    for features in batches:
        stats.update(features["x"], features[TARGET_FEATURES[target]])
    return stats.all_reduce(lambda tensor: accelerator.reduce(tensor, reduction="sum"))


def streamed_statistics(
    model, processor, loader, accelerator, cache: FeatureCache | None, name: str, target: str
) -> AlignerStatistics:
    """Sufficient statistics of (backbone features, `target`) of a split over all processes, from the feature cache
    or one pass over the images (memory independent of their number)."""
    text = target == TARGET_TEXT
    if cache is not None:
        batches = [cached_features(model, processor, loader, accelerator, cache, name, text)]
    else:
        batches = extract_features(model, processor, loader, accelerator, f"statistics ({name})", text)
    return feature_statistics(model, batches, accelerator, target)


def gather_rows(accelerator, tensor: torch.Tensor) -> torch.Tensor:
    """Every process's rows in process order, on every process and on the CPU; the shards may differ in length
    (`process_shard_loader` pads nothing in, and unreadable images are skipped)."""
    if accelerator.num_processes == 1:
        return tensor.cpu()
    local = tensor.to(accelerator.device)
    counts = accelerator.gather(torch.tensor([len(local)], device=accelerator.device)).tolist()
    if max(counts) == 0:
        return tensor.cpu()
    padded = accelerator.pad_across_processes(local, dim=0)
    rows = accelerator.gather(padded).split(padded.shape[0])
    return torch.cat([chunk[:count] for chunk, count in zip(rows, counts)]).cpu()


def training_data(objective, model, processor, loader, accelerator, cache: FeatureCache | None) -> AlignmentData:
    """What `objective.fit` needs: the statistics over all processes and, for an objective that `needs_features`,
    the features of all processes, in the order one process would see them."""
    if not objective.needs_features:
        return AlignmentData(
            streamed_statistics(model, processor, loader, accelerator, cache, "train", objective.target)
        )
    features = cached_features(model, processor, loader, accelerator, cache, "train", objective.target == TARGET_TEXT)
    target = TARGET_FEATURES[objective.target]
    stats = feature_statistics(model, [features], accelerator, objective.target)
    gathered = {feature: gather_rows(accelerator, tensor) for feature, tensor in features.items()}
    return AlignmentData(stats, x=gathered["x"], targets=gathered[target], groups=gathered.get("caption_key"))


# What counts as an image's own caption in `caption_recall`, by `--validation-match`: the key of each image.
MATCH_KEYS = {"caption": "caption_key", "label": "label_key"}


def caption_recall(image_embeds: torch.Tensor, val: Mapping[str, torch.Tensor], match: str = "caption") -> float:
    """Image-to-text recall@1 of `image_embeds` (one row per validation image) against the validation images'
    caption targets, one text per distinct caption set. With `match="caption"` an image is a hit when its own
    caption set's target scores highest, so an image whose captions another image shares is not penalised for that
    image's copy; with `match="label"`, when the best-scoring caption set is one of an image of its class (its
    `source` and `label`): caption-as-class accuracy."""
    first, _ = group_by(val["caption_key"].tolist())
    _, groups = group_by(val[MATCH_KEYS[match]].tolist())
    texts = F.normalize(val["t"][first], dim=-1)
    recall = retrieval_recall(
        F.normalize(image_embeds, dim=-1),
        texts,
        torch.tensor(first),
        ks=(1,),
        image_groups=groups,
        source="stage 3's validation pairs",
    )
    return recall["image_to_text"]["R@1"]


def _aligned(weights: AlignerWeights, x: torch.Tensor) -> torch.Tensor:
    return F.linear(x, weights.weight.to(x.device), weights.bias.to(x.device))


def choose_ridge(
    objective, stats: AlignerStatistics, val: Mapping[str, torch.Tensor], grid: Sequence[float], match: str = "caption"
) -> tuple[float, dict]:
    """The ridge of `fit_closed_form` on `stats` (the training statistics) that scores best on the validation
    features `val`, from `grid` (fractions of the mean feature variance, `relative_ridge`): held-out R² onto the CLIP
    image embedding for `image-mse`, image-to-text recall@1 (`caption_recall` by `match`) for the text objectives.
    Ties go to the first in `grid`. Returns the ridge and the metrics to log: every grid value's score, and the
    choice."""
    text = objective.target == TARGET_TEXT
    metric = RECALL_KEY if text else "r2"
    scores = []
    for fraction in grid:
        weights = fit_closed_form(stats, ridge=relative_ridge(stats, fraction))
        if text:
            scores.append(caption_recall(_aligned(weights, val["x"]), val, match))
        else:
            scores.append(aligner_metrics(weights, val["x"], val["y"])["r2"])
    best = max(range(len(grid)), key=lambda index: (scores[index], -index))
    metrics = {f"val/ridge@{fraction:g}/{metric}": score for fraction, score in zip(grid, scores)}
    ridge = relative_ridge(stats, grid[best])
    metrics |= {"ridge": ridge, "ridge_fraction": grid[best], f"val/ridge_chosen/{metric}": scores[best]}
    return ridge, metrics


def choose_fusion_weight(
    weights: AlignerWeights, val: Mapping[str, torch.Tensor], grid: Sequence[float], match: str = "caption"
) -> tuple[float, dict]:
    """The CLIP weight of the fused image embedding (`fuse_image_embeddings`) from `grid` with the best image-to-text
    recall@1 on the validation features `val` (`caption_recall` by `match`); ties go to the first in `grid`. Returns
    it and the metrics to log: the recall of the aligned and the CLIP embeddings, of every fusion weight, and the
    choice."""
    aligned, clip = _aligned(weights, val["x"]), val["y"]
    scores = [caption_recall(fuse_image_embeddings(clip, aligned, weight), val, match) for weight in grid]
    best = max(range(len(grid)), key=lambda index: (scores[index], -index))
    metrics = {
        f"val/aligned/{RECALL_KEY}": caption_recall(aligned, val, match),
        f"val/clip/{RECALL_KEY}": caption_recall(clip, val, match),
    }
    metrics |= {f"val/fused@{weight:g}/{RECALL_KEY}": score for weight, score in zip(grid, scores)}
    metrics |= {"fusion_weight": grid[best], f"val/fused_chosen/{RECALL_KEY}": scores[best]}
    return grid[best], metrics


def build_objective(args, model, device):
    """The alignment objective of `--objective`, with the options of its flags (a contrastive head trains on
    `device`)."""
    options = {}
    if args.objective == "image-mse" and args.method == "sgd":
        options["sgd"] = {
            "epochs": args.sgd_epochs,
            "lr": args.sgd_lr,
            "momentum": args.sgd_momentum,
            "weight_decay": args.sgd_weight_decay,
            "batch_size": args.sgd_batch_size,
            "t_max": args.sgd_t_max,
            "target_variance": args.target_variance,
            "legacy_bias_scaling": args.legacy_bias_scaling,
            "seed": args.seed,
        }
    elif args.objective == "contrastive":
        # The temperature stage 1 learned: what zero-shot's logits are scaled by.
        options = {
            "logit_scale": model.logit_scale.item(),
            "epochs": args.contrastive_epochs,
            "lr": args.contrastive_lr,
            "batch_size": args.contrastive_batch_size,
            "seed": args.seed,
            "device": device,
        }
    return create_objective(args.objective, **options)


def run(args, resume_hint: str) -> Path:
    """Runs stage 3 with parsed `args`; `resume_hint` says how to redo a stopped run in the
    caller's context."""
    accelerator = make_accelerator(args, RUN)
    kept = f"; the features of each split extracted in full stay in {args.feature_cache}" if args.feature_cache else ""
    with (
        RunLock(args.output_dir, accelerator.print, accelerator.is_main_process),
        exit_on_sigterm(lambda: f"stage 3 keeps no checkpoints{kept}; {resume_hint}", accelerator.print),
    ):
        return align(args, accelerator)


def align(args, accelerator) -> Path:
    """Extracts the features, fits the aligner by `--objective`, chooses the ridge and the fusion weight on the
    validation pairs, logs it all and exports the model; returns the exported folder."""
    # First, from the split names alone: a missing split fails before the model and the data load.
    validation = plan_validation(
        args.train_data, args.train_split, args.val_data, args.val_split, args.val_fraction, args.seed
    )
    if validation.notice:
        accelerator.print(validation.notice)
    model, processor = load_model_and_processor(args.model)
    model.requires_grad_(False)
    model.eval().to(accelerator.device)

    objective = build_objective(args, model, accelerator.device)
    train_text = objective.target == TARGET_TEXT
    decode_stats = DecodeStats()
    train_pairs, val_pairs = validation.load(args.image_column, args.caption_column)
    if args.validation_match == "label" and "label" not in val_pairs.column_names:
        raise ValueError(
            f"--validation-match label needs a `label` column in the validation pairs; they have "
            f"{sorted(val_pairs.column_names)}: use --validation-match caption"
        )
    train_loader = process_shard_loader(
        train_pairs, accelerator, args.batch_size, PairCollator(processor, train_text, decode_stats), args.num_workers
    )
    # Validation always needs the caption targets: the fusion weight is chosen against them.
    val_loader = process_shard_loader(
        val_pairs, accelerator, args.batch_size, PairCollator(processor, True, decode_stats), args.num_workers
    )
    init_run_trackers(accelerator, RUN, args)
    cache = None
    if args.feature_cache:
        cache = FeatureCache(
            Path(args.feature_cache),
            towers_key(model, processor, accelerator),
            text_tower_key(model, processor, accelerator),
        )

    data = training_data(objective, model, processor, train_loader, accelerator, cache)
    val_features = cached_features(model, processor, val_loader, accelerator, cache, "validation", text=True)
    val = {feature: gather_rows(accelerator, tensor) for feature, tensor in val_features.items()}
    if len(val["x"]) == 0:
        summary = decode_totals(accelerator, decode_stats).summary()
        raise UnreadableDataError(f"stage 3: no validation pair holds a readable image\n{summary}")
    metrics = {"objective": objective.name}
    if objective.has_ridge:
        ridge = args.ridge
        if ridge is None:
            ridge, ridge_metrics = choose_ridge(objective, data.stats, val, args.ridge_grid, args.validation_match)
            metrics |= ridge_metrics
            accelerator.print(
                f"ridge {ridge:.4g} ({ridge_metrics['ridge_fraction']:g} x the mean feature variance) "
                "chosen on the validation pairs"
            )
        else:
            metrics["ridge"] = ridge
        weights = objective.fit(data, ridge)
    else:
        weights = objective.fit(data)
    target = TARGET_FEATURES[objective.target]
    train_metrics = (
        aligner_metrics(weights, data.x, data.targets) if data.x is not None else data.stats.metrics(weights)
    )
    metrics |= {f"train/{key}": value for key, value in train_metrics.items()}
    metrics |= {f"val/{key}": value for key, value in aligner_metrics(weights, val["x"], val[target]).items()}
    metrics |= objective.fit_metrics()
    fusion_weight, fusion_metrics = choose_fusion_weight(weights, val, args.fusion_grid, args.validation_match)
    metrics |= fusion_metrics

    accelerator.log(metrics, step=0)
    accelerator.print(
        f"objective {objective.name}: "
        + " ".join(
            f"{key}={value:.4f}" for key, value in metrics.items() if key.startswith(("train/", "val/r2", "val/mse"))
        )
    )
    accelerator.print(
        f"fusion weight {fusion_weight:g} chosen on the validation pairs: image->text R@1 "
        f"{fusion_metrics[f'val/fused_chosen/{RECALL_KEY}']:.4f} (aligned {fusion_metrics[f'val/aligned/{RECALL_KEY}']:.4f}, "
        f"clip {fusion_metrics[f'val/clip/{RECALL_KEY}']:.4f})"
    )
    report_decode_stats(accelerator, decode_stats)

    model.aligner.weight.copy_(weights.weight)
    model.aligner.bias.copy_(weights.bias)
    model.config.alignment_objective = objective.name
    model.config.fusion_weight = fusion_weight
    output = export_atomically(accelerator, Path(args.output_dir) / "final", model, processor)
    accelerator.print(f"stage 3 model written to {output}")
    accelerator.end_training()
    return output
