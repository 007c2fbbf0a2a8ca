"""Stage 1 of AgriCLIP, the work behind `python -m training.stage1_contrastive` (which parses the options).

Contrastive image-text training of the CLIP towers with the loss `--loss` names (`training.losses.create_loss`: the
symmetric InfoNCE of CLIP, or SigLIP's sigmoid loss) on the global batch (features gathered across processes with
gradients); the backbone and the aligner stay frozen (stages 2 and 3). The exported config records the objective
(`contrastive_loss`), which says how zero-shot reads the model's logits.

Validation (`validation_recall`) reports recall@1 and @5 in both directions over the validation pairs, matching by
caption text: a retrieved caption that is the same text as the true one is a hit (image-to-text), and so is any image
whose caption is the query's text (text-to-image). With template captions many images share one caption, and
counting only pair i <-> caption i would read near zero for a perfect model. The pairs come from the validation
split, or from a seeded held-out fraction of the training pairs when the data has none
(`training.data.plan_validation`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from agriclip.images import DecodeStats
from evaluation.retrieval import group_by, retrieval_recall
from training.data import ROW_INDEX, ImageTextCollator, IndexedRows, ValidationPlan, plan_validation
from training.dino import CropAndFlip, cosine_schedule, param_groups_without_decay
from training.loop import run_resumable, train_loop
from training.losses import ImageTextLoss, create_loss
from training.models import load_model_and_processor
from training.options import RESUME_HINT
from training.runtime import (
    CheckpointManager,
    UnreadableDataError,
    adamw,
    dataloader_generator,
    decode_totals,
    embed_batches,
    export_atomically,
    init_run_trackers,
    process_rows,
    report_decode_stats,
    run_options,
    run_steps,
)
from training.sharding import (
    full_state_dict,
    parameter_values,
    prepare_for_sharding,
    register_feature_methods,
    whole_construction,
)


RUN = "stage1_contrastive"
# Options that only change what validation reports (see `training.runtime.run_options`), except --val-fraction when
# it holds validation pairs out of the training data, which it then changes too (see `train`).
VALIDATION_OPTIONS = ("val_data", "val_split", "val_fraction")


def trainable_clip(model, freeze_text: bool, freeze_image: bool, train_bias: bool = False) -> None:
    """Freezes everything stage 1 does not train; unused parameters would also break DDP. `logit_bias` trains only
    with `train_bias` (a loss that uses it, `ImageTextLoss.uses_logit_bias`) and a tower that trains."""
    model.requires_grad_(False)
    if not freeze_text:
        model.text_model.requires_grad_(True)
        model.text_projection.requires_grad_(True)
    if not freeze_image:
        model.vision_model.requires_grad_(True)
        model.visual_projection.requires_grad_(True)
    model.logit_scale.requires_grad_(not (freeze_text and freeze_image))
    model.logit_bias.requires_grad_(train_bias and not (freeze_text and freeze_image))


def contrastive_forward(model, batch, loss_fn: ImageTextLoss, image_embedding: str | None = "clip") -> torch.Tensor:
    """The contrastive loss of one batch: `loss_fn` between the image embedding `image_embedding` (stage 1: the
    CLIP tower's; LoRA: its objective's) and the caption embeddings, on the global batch.

    The towers run through `model.forward` (the DDP wrapper's hooks need it); the global-batch loss is computed
    outside, on the gathered embeddings, with the `logit_scale` and `logit_bias` the output carries. The forward skips
    its own logits (the loss builds those of the global batch) and its embeddings come L2-normalised, so the loss
    does not normalise them again.
    """
    outputs = model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        pixel_values=batch["pixel_values"],
        image_embedding=image_embedding,
        return_logits=False,
    )
    return loss_fn.output_loss(outputs)


def augmented(batch, augment, accelerator):
    """The training batch with its pixels cropped and flipped on the device (`CropAndFlip`, its parameters drawn for
    the global batch, so N processes see the crops of one); the batch itself without --augment."""
    if augment is None:
        return batch
    pixels = batch["pixel_values"]
    rows, global_batch_size = process_rows(accelerator, len(pixels))
    return {**batch, "pixel_values": augment(pixels, rows=rows, global_batch_size=global_batch_size)}


def run_summary(args, num_processes: int) -> str:
    """The start-up banner's account of the recipe: the peak learning rate and its schedule, what one contrastive
    loss contrasts under gradient accumulation, and the augmentation."""
    pairs = args.batch_size * num_processes
    lines = [
        f"stage 1: loss {args.loss}",
        f"stage 1: peak learning rate {args.learning_rate:g} after {args.warmup_steps} warm-up steps, cosine to "
        f"{args.min_learning_rate:g}",
        f"stage 1: each forward pass contrasts its own {args.batch_size} x {num_processes} process(es) = {pairs} "
        "image-text pairs",
    ]
    if args.gradient_accumulation_steps > 1:
        lines[-1] += (
            f"; the {args.gradient_accumulation_steps} accumulated passes average their gradients and add no "
            "negatives to each other's loss"
        )
    lines.append(
        f"stage 1: training images randomly cropped to {args.crop_scale[0]:g}-{args.crop_scale[1]:g} of their "
        f"area and flipped with probability {args.flip_prob:g}; validation images as they are"
        if args.augment
        else "stage 1: no augmentation (--augment adds random resized crops and flips)"
    )
    return "\n".join(lines)


@torch.no_grad()
def validation_recall(model, loader, accelerator, captions: Sequence[str]) -> dict[str, float]:
    """Image-to-text and text-to-image recall@1/5 over the validation pairs, matching by caption text: image i and
    caption j match when caption j is the same text as image i's caption (`retrieval_recall` with the pairs grouped
    by caption), so an identical caption counts as the true one. `captions[r]` is the caption of row r of the
    loader's `IndexedRows`, whose index each batch carries."""
    model.eval()

    def embedded(batch) -> dict[str, torch.Tensor]:
        images = accelerator.unwrap_model(model).get_clip_image_features(batch["pixel_values"]).pooler_output
        texts = (
            accelerator.unwrap_model(model).get_text_features(batch["input_ids"], batch["attention_mask"]).pooler_output
        )
        return {"images": images, "texts": texts, "rows": batch[ROW_INDEX]}

    embeds = embed_batches(loader, accelerator, embedded, gather=True)
    model.train()
    if not embeds:
        summary = decode_totals(accelerator, loader.collate_fn.stats).summary()
        raise UnreadableDataError(f"validation: no batch of the validation pairs holds a readable image\n{summary}")
    images = torch.nn.functional.normalize(embeds["images"].float(), dim=-1)
    texts = torch.nn.functional.normalize(embeds["texts"].float(), dim=-1)
    _, same_caption = group_by(captions[row] for row in embeds["rows"].tolist())
    recall = retrieval_recall(images, texts, torch.arange(len(texts)), ks=(1, 5), image_groups=same_caption)
    return {
        f"val/{direction}_R@{k}": value
        for direction, values in recall.items()
        for k, value in ((key.removeprefix("R@"), v) for key, v in values.items())
    }


def build_loaders(
    args, validation: ValidationPlan, processor, decode_stats: DecodeStats
) -> tuple[DataLoader, DataLoader, list[str]]:
    """The training loader (caption variants drawn from the seed, the epoch and each pair's index), the validation
    loader (each image with its fixed caption, so recall at the same weights reads the same) and the validation
    captions by row (what `validation_recall` matches on)."""
    train_pairs, val_pairs = validation.load(args.image_column, args.caption_column)
    train_data, val_data = IndexedRows(train_pairs), IndexedRows(val_pairs)
    # drop_last: every process must hold the same batch size for the global-batch loss.
    train_loader = DataLoader(
        train_data,
        batch_size=args.batch_size,
        shuffle=True,
        drop_last=True,
        collate_fn=ImageTextCollator(processor, decode_stats, seed=args.seed),
        num_workers=args.num_workers,
        generator=dataloader_generator(args.seed),
    )
    val_loader = DataLoader(
        val_data,
        batch_size=args.batch_size,
        collate_fn=ImageTextCollator(processor, decode_stats),
        num_workers=args.num_workers,
    )
    return train_loader, val_loader, list(val_pairs["caption"])


def run(args, resume_hint: str = RESUME_HINT) -> Path:
    """Runs stage 1 with parsed `args`; `resume_hint` says how to continue a stopped run in the caller's context
    (`training.run_all` resumes by itself). Returns the exported folder."""
    return run_resumable(args, RUN, resume_hint, train)


def train(args, accelerator, checkpoints: CheckpointManager) -> Path:
    # First, from the split names alone: a missing split fails before the model and the data load.
    validation = plan_validation(
        args.train_data, args.train_split, args.val_data, args.val_split, args.val_fraction, args.seed
    )
    if validation.notice:
        accelerator.print(validation.notice)
    with whole_construction(accelerator):
        model, processor = load_model_and_processor(args.model)
    loss_fn = create_loss(args.loss)
    if loss_fn.adopt(model):
        accelerator.print(
            f"stage 1: the model was trained with another objective; --loss {args.loss} starts from its "
            f"published logit scale {loss_fn.logit_scale_init:.4g}"
            + (f" and logit bias {loss_fn.logit_bias_init:g}" if loss_fn.uses_logit_bias else "")
        )
    trainable_clip(model, args.freeze_text, args.freeze_image, train_bias=loss_fn.uses_logit_bias)
    model = prepare_for_sharding(accelerator, model)
    model.train()

    decode_stats = DecodeStats()
    train_loader, val_loader, val_captions = build_loaders(args, validation, processor, decode_stats)

    optimizer = adamw(
        param_groups_without_decay(model, args.weight_decay),
        accelerator.device,
        lr=args.learning_rate,
        betas=args.adam_betas,
        eps=args.adam_eps,
    )
    model, optimizer, train_loader, val_loader = accelerator.prepare(model, optimizer, train_loader, val_loader)
    register_feature_methods(accelerator, model)

    # Read for the logs only: the loss takes them from the model's output.
    logit_scale, logit_bias = accelerator.unwrap_model(model).logit_scale, accelerator.unwrap_model(model).logit_bias
    _, max_steps = run_steps(args, train_loader)
    lr_schedule = cosine_schedule(args.learning_rate, args.min_learning_rate, max_steps, args.warmup_steps)
    augment = None
    if args.augment:
        image_processor = processor.image_processor
        augment = CropAndFlip(
            accelerator.unwrap_model(model).config.vision_config.image_size,
            args.crop_scale,
            args.flip_prob,
            image_processor.image_mean,
            image_processor.image_std,
        ).to(accelerator.device)

    # Held out of the training data, the validation pairs are training pairs no longer: --val-fraction then counts.
    neutral = [name for name in VALIDATION_OPTIONS if not (validation.held_out and name == "val_fraction")]
    position = checkpoints.start(
        args.resume, run_options(args, accelerator, neutral=neutral), args.allow_changed_config
    )
    init_run_trackers(accelerator, RUN, args, position.step, checkpoints.resumed_from)
    accelerator.print(
        f"stage 1: {max_steps} optimizer steps of {args.batch_size} x {accelerator.num_processes} process(es) "
        f"x {args.gradient_accumulation_steps} accumulation on {accelerator.device}"
    )
    accelerator.print(run_summary(args, accelerator.num_processes))

    def step_logs(loss, step: int) -> dict:
        # Read outside the forward, where FSDP2 and ZeRO-3 hold them sharded: `parameter_values` gathers them.
        scale, *bias = parameter_values(accelerator, logit_scale, *([logit_bias] if loss_fn.uses_logit_bias else []))
        logs = {"loss": loss.item(), "temperature": (-scale.clamp(max=loss_fn.max_logit_scale)).exp().item()}
        if bias:
            logs["logit_bias"] = bias[0].item()
        if args.eval_every and (step + 1) % args.eval_every == 0:
            logs.update(validation_recall(model, val_loader, accelerator, val_captions))
        return logs

    train_loop(
        accelerator,
        model,
        optimizer,
        train_loader,
        position=position,
        checkpoints=checkpoints,
        max_steps=max_steps,
        lr_schedule=lr_schedule,
        max_grad_norm=args.max_grad_norm,
        checkpoint_every=args.checkpoint_every,
        data=args.train_data,
        description="stage 1",
        prepare=lambda batch, step: augmented(batch, augment, accelerator),
        compute_loss=lambda batch: contrastive_forward(model, batch, loss_fn),
        step_logs=step_logs,
    )

    final_metrics = validation_recall(model, val_loader, accelerator, val_captions)
    accelerator.log(final_metrics, step=position.step)
    accelerator.print(
        "validation recall (a caption with the same text as the true one is a hit): "
        + " ".join(f"{k}={v:.3f}" for k, v in final_metrics.items())
    )
    report_decode_stats(accelerator, decode_stats)
    output = export_atomically(
        accelerator,
        Path(args.output_dir) / "final",
        accelerator.unwrap_model(model),
        processor,
        state_dict=full_state_dict(accelerator, model),
    )
    accelerator.print(f"stage 1 model written to {output}")
    accelerator.end_training()
    return output
