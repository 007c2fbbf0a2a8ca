"""Stage 3 of AgriCLIP: cross-model alignment of the backbone's features into CLIP's image-embedding space.

Streams the pretraining images once through the frozen backbone (stage 2) and the frozen CLIP image tower
(stage 1) and fits the linear aligner `y ≈ x Wᵀ + b` by mean squared error:

- `--method closed-form` (default): the exact MSE optimum from streamed sufficient statistics (float64, memory
  independent of the number of images, summed across processes, optional ridge);
- `--method sgd`: the paper's recipe (scalar variance normalisation to 4.5, SGD, cosine schedule) with the
  features in memory, the bias exported correctly (`--legacy-bias-scaling` reproduces the original code's).

Reports MSE and R² on a held-out split and writes the aligner into a complete AgriCLIP folder:

    python -m training.stage3_align --model runs/stage2/final --train-data data/pretrain --output-dir runs/stage3
"""

from __future__ import annotations

import argparse
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
from training.data import ImageTextCollator, load_image_text_dataset, process_shard_loader
from training.models import load_model_and_processor
from training.runtime import (
    RunLock,
    exit_on_sigterm,
    export_atomically,
    init_run_trackers,
    make_accelerator,
    parse_args,
    report_decode_stats,
)

logger = get_logger(__name__)

RUN = "stage3_align"
# How to redo a stopped stage 3, which keeps no checkpoints, when run on its own.
RESTART_HINT = "run the same command again to start it over"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="AgriCLIP folder or Hub id holding the trained CLIP image tower and backbone.")
    parser.add_argument("--train-data", required=True, help="Images to fit on (any image-caption source; captions are ignored).")
    parser.add_argument("--train-split", default="train", help="Split of --train-data to fit on.")
    parser.add_argument("--val-data", default=None, help="Held-out images for MSE and R² (default: --train-data).")
    parser.add_argument("--val-split", default="validation", help="Split of --val-data to report on.")
    parser.add_argument("--output-dir", required=True, help="Folder for the final AgriCLIP checkpoint, metrics and logs.")
    parser.add_argument("--batch-size", type=int, default=64, help="Images per process per forward pass of feature extraction.")
    parser.add_argument("--num-workers", type=int, default=0, help="DataLoader worker processes.")
    parser.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"], default=None,
                        help="Overrides the launcher's precision for feature extraction (statistics stay float64).")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the SGD recipe.")
    parser.add_argument("--feature-cache", default=None,
                        help="Folder to keep the extracted features in (safetensors per split and process); reused when present.")
    parser.add_argument("--method", choices=["closed-form", "sgd"], default="closed-form", help="How to fit the aligner.")
    parser.add_argument("--ridge", type=float, default=0.0, help="Closed form: L2 penalty on W (not on the bias).")
    sgd = parser.add_argument_group("paper's SGD recipe (--method sgd)")
    sgd.add_argument("--sgd-epochs", type=int, default=70, help="Epochs (70 in AgriCLIP).")
    sgd.add_argument("--sgd-lr", type=float, default=0.01, help="Learning rate.")
    sgd.add_argument("--sgd-momentum", type=float, default=0.9, help="SGD momentum.")
    sgd.add_argument("--sgd-weight-decay", type=float, default=5e-4, help="SGD weight decay.")
    sgd.add_argument("--sgd-batch-size", type=int, default=100, help="Feature pairs per SGD step.")
    sgd.add_argument("--sgd-t-max", type=int, default=200, help="CosineAnnealingLR T_max (epochs); 200 in the paper.")
    sgd.add_argument("--target-variance", type=float, default=4.5, help="Variance the features are scaled to.")
    sgd.add_argument("--legacy-bias-scaling", action="store_true",
                     help="Export the bias as the original code does (b' c1/c2, wrong); only to reproduce released aligners.")
    parser.add_argument("--log-with", default="auto", help="Accelerate trackers, as in the other stages.")
    return parser


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


def main(argv: list[str] | None = None, resume_hint: str = RESTART_HINT) -> Path:
    """Runs stage 3 with `argv` (default: the command line); `resume_hint` says how to redo a stopped run in the
    caller's context."""
    args = parse_args(build_parser(), argv)
    accelerator = make_accelerator(args, RUN)
    kept = f"; the features of each split extracted in full stay in {args.feature_cache}" if args.feature_cache else ""
    with RunLock(args.output_dir, accelerator.print, accelerator.is_main_process), \
            exit_on_sigterm(lambda: f"stage 3 keeps no checkpoints{kept}; {resume_hint}", accelerator.print):
        return align(args, accelerator)


def align(args, accelerator) -> Path:
    model, processor = load_model_and_processor(args.model)
    model.requires_grad_(False)
    model.eval().to(accelerator.device)

    decode_stats = DecodeStats()
    collate = ImageTextCollator(processor, decode_stats)
    train_loader = process_shard_loader(load_image_text_dataset(args.train_data, split=args.train_split), accelerator,
                                        args.batch_size, collate, args.num_workers)
    val_loader = process_shard_loader(load_image_text_dataset(args.val_data or args.train_data, split=args.val_split),
                                      accelerator, args.batch_size, collate, args.num_workers)
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


if __name__ == "__main__":
    main()
