"""Stage 3 of AgriCLIP, the work behind `python -m training.stage3_align` (which parses the options).

Streams the images once through the frozen backbone and CLIP image tower and fits the linear aligner from the
backbone's features into CLIP's image-embedding space (closed form from streamed statistics, or the paper's SGD
recipe), with a feature cache keyed by everything the features depend on. MSE and R² are reported on the
validation split, or on a seeded held-out fraction of the training images, not fitted on, when the data has none
(`training.data.plan_validation`).
"""


from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate.logging import get_logger
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from training.aligner import AlignerStatistics, aligner_metrics, fit_closed_form, fit_sgd_recipe
from agriclip.images import DecodeStats, counted
from training.data import ImageTextCollator, plan_validation, process_shard_loader
from training.models import load_model_and_processor
from training.runtime import (
    RunLock,
    exit_on_sigterm,
    export_atomically,
    init_run_trackers,
    make_accelerator,
    report_decode_stats,
)

logger = get_logger(__name__)

RUN = "stage3_align"


@torch.no_grad()
def extract_features(model, loader, accelerator, description: str):
    """Yields (backbone features, CLIP image embeddings) per batch of this process's shard, in float32."""
    for batch in tqdm(counted(loader), desc=description, total=len(loader), disable=not accelerator.is_local_main_process):
        if batch is None:
            continue
        pixel_values = batch["pixel_values"].to(accelerator.device)
        with accelerator.autocast():
            x = model.get_backbone_features(pixel_values)
            y = model.get_clip_image_features(pixel_values)
        yield x.float(), y.float()


@dataclass(frozen=True)
class FeatureCache:
    """A folder of extracted features, one safetensors file per split and process, and `towers_key`: the hash of
    what the features depend on besides the images (see `towers_key`)."""

    folder: Path
    towers_key: str


def towers_key(model, processor, accelerator) -> str:
    """Hash of the weights and buffers of both image towers and of their input renormalisation, of the image
    processor, and of the precision of the extraction: computed once per run, not per split."""
    digest = hashlib.sha256()
    for module in (model.dino_pixel_renorm, model.dino_model, model.clip_pixel_renorm, model.vision_model,
                   model.visual_projection):
        for name, tensor in module.state_dict().items():
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    digest.update(processor.image_processor.to_json_string().encode())
    digest.update(str(accelerator.mixed_precision).encode())
    return digest.hexdigest()


def cached_features(model, loader, accelerator, cache: FeatureCache | None, name: str):
    """All features of a shard in memory, read from or written to `cache` when given.

    A cache file records the key it was extracted under (the towers' key and the images of the shard: the
    `datasets` fingerprint, which follows the data files) and is used only under the same key, so a cache left by
    another model, processor or data set is extracted again rather than silently reused. It is written under a
    temporary name and renamed once complete; one that cannot be read (copied half-way, say) is extracted again.
    """
    path = key = None
    if cache is not None:
        path = cache.folder / f"{name}-{accelerator.process_index}-of-{accelerator.num_processes}.safetensors"
        key = hashlib.sha256(f"{cache.towers_key} {loader.dataset._fingerprint}".encode()).hexdigest()
    if path is not None and path.is_file():
        try:
            with safe_open(path, framework="pt") as cached:
                if (cached.metadata() or {}).get("key") == key:
                    return cached.get_tensor("x"), cached.get_tensor("y")
            logger.warning(f"feature cache {path} was extracted from another model, processor or data; extracting again")
        except Exception as error:  # truncated, corrupt, or not a feature file: it is only a cache
            logger.warning(f"feature cache {path} cannot be read ({error}); extracting the features again")
    pairs = list(extract_features(model, loader, accelerator, f"features ({name})"))
    x = torch.cat([p[0] for p in pairs]).cpu()
    y = torch.cat([p[1] for p in pairs]).cpu()
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = path.with_name(f".{path.name}.tmp")
        save_file({"x": x.contiguous(), "y": y.contiguous()}, staging, metadata={"key": key})
        staging.replace(path)
    return x, y


def streamed_statistics(model, loader, accelerator, cache: FeatureCache | None, name: str) -> AlignerStatistics:
    """Sufficient statistics of a split over all processes, from the feature cache or one pass over the images."""
    config = model.config
    stats = AlignerStatistics(config.backbone_hidden_size, config.projection_dim, device=accelerator.device)
    if cache is not None:
        stats.update(*cached_features(model, loader, accelerator, cache, name))
    else:
        for x, y in extract_features(model, loader, accelerator, f"statistics ({name})"):
            stats.update(x, y)
    return stats.all_reduce(lambda tensor: accelerator.reduce(tensor, reduction="sum"))


def run(args, resume_hint: str) -> Path:
    """Runs stage 3 with parsed `args`; `resume_hint` says how to redo a stopped run in the
    caller's context."""
    accelerator = make_accelerator(args, RUN)
    kept = f"; the features of each split extracted in full stay in {args.feature_cache}" if args.feature_cache else ""
    with RunLock(args.output_dir, accelerator.print, accelerator.is_main_process), \
            exit_on_sigterm(lambda: f"stage 3 keeps no checkpoints{kept}; {resume_hint}", accelerator.print):
        return align(args, accelerator)


def align(args, accelerator) -> Path:
    # First, from the split names alone: a missing split fails before the model and the data load.
    validation = plan_validation(args.train_data, args.train_split, args.val_data, args.val_split, args.val_fraction,
                                 args.seed)
    if validation.notice:
        accelerator.print(validation.notice)
    model, processor = load_model_and_processor(args.model)
    model.requires_grad_(False)
    model.eval().to(accelerator.device)

    decode_stats = DecodeStats()
    collate = ImageTextCollator(processor, decode_stats)
    train_pairs, val_pairs = validation.load(args.image_column, args.caption_column)
    train_loader = process_shard_loader(train_pairs, accelerator, args.batch_size, collate, args.num_workers)
    val_loader = process_shard_loader(val_pairs, accelerator, args.batch_size, collate, args.num_workers)
    init_run_trackers(accelerator, RUN, args)
    cache = None
    if args.feature_cache:
        cache = FeatureCache(Path(args.feature_cache), towers_key(model, processor, accelerator))

    if args.method == "closed-form":
        train_stats = streamed_statistics(model, train_loader, accelerator, cache, "train")
        weights = fit_closed_form(train_stats, ridge=args.ridge)
        train_metrics = train_stats.metrics(weights)
    else:
        x, y = cached_features(model, train_loader, accelerator, cache, "train")
        if accelerator.num_processes > 1:
            x, y = accelerator.gather(x.to(accelerator.device)).cpu(), accelerator.gather(y.to(accelerator.device)).cpu()
        weights = fit_sgd_recipe(
            x, y, epochs=args.sgd_epochs, lr=args.sgd_lr, momentum=args.sgd_momentum, weight_decay=args.sgd_weight_decay,
            batch_size=args.sgd_batch_size, t_max=args.sgd_t_max, target_variance=args.target_variance,
            legacy_bias_scaling=args.legacy_bias_scaling, seed=args.seed,
        )
        train_metrics = aligner_metrics(weights, x, y)
    val_metrics = streamed_statistics(model, val_loader, accelerator, cache, "validation").metrics(weights)

    metrics = {**{f"train/{k}": v for k, v in train_metrics.items()}, **{f"val/{k}": v for k, v in val_metrics.items()}}
    accelerator.log(metrics, step=0)
    accelerator.print(" ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
    report_decode_stats(accelerator, decode_stats)

    model.aligner.weight.copy_(weights.weight)
    model.aligner.bias.copy_(weights.bias)
    output = export_atomically(accelerator, Path(args.output_dir) / "final", model, processor)
    accelerator.print(f"stage 3 model written to {output}")
    accelerator.end_training()
    return output

