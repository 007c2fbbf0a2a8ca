"""Stage 1 of AgriCLIP, the work behind `python -m training.stage1_contrastive` (which parses the options).

Contrastive image-text training of the CLIP towers: the symmetric InfoNCE of CLIP on the global batch (features
gathered across processes with gradients); the backbone and the aligner stay frozen (stages 2 and 3).
"""


from __future__ import annotations

import math
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from evaluation.retrieval import retrieval_recall
from agriclip.images import DecodeStats, counted
from training.data import ImageTextCollator, IndexedRows, load_image_text_dataset
from training.dino import cosine_schedule, param_groups_without_decay
from training.losses import ContrastiveLoss
from training.models import load_model_and_processor
from training.options import RESUME_HINT
from training.runtime import (
    CheckpointManager,
    PreemptionGuard,
    RunLock,
    UnreadableDataError,
    dataloader_generator,
    decode_totals,
    exit_on_sigterm,
    export_atomically,
    init_run_trackers,
    make_accelerator,
    readable_on_every_process,
    report_decode_stats,
    resumable_batches,
    run_options,
    train_step,
)

RUN = "stage1_contrastive"
# Options that only change what validation reports (see `training.runtime.run_options`).
VALIDATION_OPTIONS = ("val_data", "val_split")


def trainable_clip(model, freeze_text: bool, freeze_image: bool) -> None:
    """Freezes everything stage 1 does not train; unused parameters would also break DDP."""
    model.requires_grad_(False)
    if not freeze_text:
        model.text_model.requires_grad_(True)
        model.text_projection.requires_grad_(True)
    if not freeze_image:
        model.vision_model.requires_grad_(True)
        model.visual_projection.requires_grad_(True)
    model.logit_scale.requires_grad_(not (freeze_text and freeze_image))


def contrastive_forward(model, batch, loss_fn: ContrastiveLoss, logit_scale: torch.Tensor) -> torch.Tensor:
    """The stage-1 loss of one batch: InfoNCE between CLIP image and text embeddings.

    The towers run through `model.forward` (the DDP wrapper's hooks need it); the global-batch loss is computed
    outside, on the gathered embeddings.
    """
    outputs = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    pixel_values=batch["pixel_values"], image_embedding="clip")
    return loss_fn(outputs.image_embeds, outputs.text_embeds, logit_scale)


@torch.no_grad()
def validation_recall(model, loader, accelerator) -> dict[str, float]:
    """Image-to-text and text-to-image recall@1/5 over the held-out pairs (pair i is image i with caption i)."""
    model.eval()
    image_embeds, text_embeds = [], []
    for batch in counted(loader):
        if not readable_on_every_process(batch, accelerator):
            continue
        images = accelerator.unwrap_model(model).get_clip_image_features(batch["pixel_values"])
        texts = accelerator.unwrap_model(model).get_text_features(batch["input_ids"], batch["attention_mask"])
        image_embeds.append(accelerator.gather_for_metrics(images))
        text_embeds.append(accelerator.gather_for_metrics(texts))
    model.train()
    if not image_embeds:
        summary = decode_totals(accelerator, loader.collate_fn.stats).summary()
        raise UnreadableDataError(f"validation: no batch of the validation pairs holds a readable image\n{summary}")
    images = torch.nn.functional.normalize(torch.cat(image_embeds).float(), dim=-1)
    texts = torch.nn.functional.normalize(torch.cat(text_embeds).float(), dim=-1)
    recall = retrieval_recall(images, texts, torch.arange(len(texts)), ks=(1, 5))
    return {f"val/{direction}_R@{k}": value for direction, values in recall.items() for k, value in
            ((key.removeprefix("R@"), v) for key, v in values.items())}


def build_loaders(args, processor, decode_stats: DecodeStats) -> tuple[DataLoader, DataLoader]:
    """The training loader (caption variants drawn from the seed, the epoch and each pair's index) and the
    validation loader (each image with its fixed caption, so recall at the same weights reads the same)."""
    train_data = IndexedRows(load_image_text_dataset(args.train_data, split=args.train_split))
    val_data = load_image_text_dataset(args.val_data or args.train_data, split=args.val_split)
    # drop_last: every process must hold the same batch size for the global-batch loss.
    train_loader = DataLoader(train_data, batch_size=args.batch_size, shuffle=True, drop_last=True,
                              collate_fn=ImageTextCollator(processor, decode_stats, seed=args.seed),
                              num_workers=args.num_workers, generator=dataloader_generator(args.seed))
    val_loader = DataLoader(val_data, batch_size=args.batch_size, collate_fn=ImageTextCollator(processor, decode_stats),
                            num_workers=args.num_workers)
    return train_loader, val_loader


def run(args, resume_hint: str = RESUME_HINT) -> Path:
    """Runs stage 1 with parsed `args`; `resume_hint` says how to continue a stopped run in the caller's context
    (`training.run_all` resumes by itself). Returns the exported folder."""
    accelerator = make_accelerator(args, RUN)
    checkpoints = CheckpointManager(accelerator, args.output_dir, keep=args.keep_checkpoints, resume_hint=resume_hint)
    with RunLock(args.output_dir, accelerator.print, accelerator.is_main_process), \
            exit_on_sigterm(checkpoints.describe_saved, accelerator.print):
        return train(args, accelerator, checkpoints)


def train(args, accelerator, checkpoints: CheckpointManager) -> Path:
    model, processor = load_model_and_processor(args.model)
    trainable_clip(model, args.freeze_text, args.freeze_image)
    model.train()

    decode_stats = DecodeStats()
    train_loader, val_loader = build_loaders(args, processor, decode_stats)

    optimizer = torch.optim.AdamW(param_groups_without_decay(model, args.weight_decay), lr=args.learning_rate,
                                  betas=tuple(args.adam_betas), eps=args.adam_eps)
    loss_fn = ContrastiveLoss()
    model, optimizer, train_loader, val_loader = accelerator.prepare(model, optimizer, train_loader, val_loader)

    logit_scale = accelerator.unwrap_model(model).logit_scale
    steps_per_epoch = math.ceil(len(train_loader) / args.gradient_accumulation_steps)
    max_steps = args.max_steps or args.epochs * steps_per_epoch
    lr_schedule = cosine_schedule(args.learning_rate, args.min_learning_rate, epochs=max_steps, iters_per_epoch=1,
                                  warmup_epochs=args.warmup_steps)

    position = checkpoints.start(args.resume, run_options(args, accelerator, neutral=VALIDATION_OPTIONS),
                                 args.allow_changed_config)
    init_run_trackers(accelerator, RUN, args, position.step, checkpoints.resumed_from)
    accelerator.print(f"stage 1: {max_steps} optimizer steps of {args.batch_size} x {accelerator.num_processes} process(es) "
                      f"x {args.gradient_accumulation_steps} accumulation on {accelerator.device}")
    progress = tqdm(total=max_steps, initial=position.step, desc="stage 1", disable=not accelerator.is_local_main_process)
    samples, started = 0, time.perf_counter()

    with PreemptionGuard(accelerator) as preemption:
        for batch in resumable_batches(train_loader, accelerator, position, max_steps, args.train_data):
            loss = train_step(accelerator, model, optimizer,
                              lambda: contrastive_forward(model, batch, loss_fn, logit_scale),
                              float(lr_schedule[position.step]), args.max_grad_norm, position, checkpoints)
            samples += len(batch["input_ids"]) * accelerator.num_processes
            if not accelerator.sync_gradients:
                continue
            position.step += 1
            progress.update(1)
            logs = {"loss": loss.item(), "lr": float(lr_schedule[position.step - 1]),
                    "temperature": (-logit_scale.detach().clamp(max=loss_fn.max_logit_scale)).exp().item(),
                    "samples_per_second": samples / (time.perf_counter() - started)}
            progress.set_postfix(loss=f"{logs['loss']:.4f}")
            if args.eval_every and position.step % args.eval_every == 0:
                logs.update(validation_recall(model, val_loader, accelerator))
            accelerator.log(logs, step=position.step)
            checkpoints.after_step(position, args.checkpoint_every, max_steps, preemption)
    progress.close()

    final_metrics = validation_recall(model, val_loader, accelerator)
    accelerator.log(final_metrics, step=position.step)
    accelerator.print(" ".join(f"{k}={v:.3f}" for k, v in final_metrics.items()))
    report_decode_stats(accelerator, decode_stats)
    output = export_atomically(accelerator, Path(args.output_dir) / "final", accelerator.unwrap_model(model), processor)
    accelerator.print(f"stage 1 model written to {output}")
    accelerator.end_training()
    return output

