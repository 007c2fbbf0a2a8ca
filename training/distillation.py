"""Stage 2 of AgriCLIP, the work behind `python -m training.stage2_dino` (which parses the options).

DINO self-distillation of the fine-grained backbone: a student (backbone + DINO head) matches the centred, sharpened
outputs of its EMA teacher over multi-crop views (Caron et al. 2021), with the published recipes.
"""


from __future__ import annotations

import copy
import math
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import AutoModel

from evaluation.knn import knn_accuracy
from modeling_agriclip.modeling_agriclip import backbone_features, unreadable_weights_named
from agriclip.images import DecodeStats, counted
from training.data import ImageCollator, load_image_text_dataset, load_labelled_dataset
from training.dino import (
    CollapseMonitor,
    DINOHead,
    MultiCropAugmentation,
    MultiCropWrapper,
    cancel_gradients_last_layer,
    cosine_schedule,
    default_collapse_window,
    param_groups_without_decay,
    update_teacher,
)
from training.losses import DINOLoss
from training.models import load_model_and_processor
from training.options import RESUME_HINT
from training.runtime import (
    CheckpointManager,
    PreemptionGuard,
    RunLock,
    dataloader_generator,
    exit_on_sigterm,
    export_atomically,
    init_run_trackers,
    make_accelerator,
    process_rows,
    report_decode_stats,
    resumable_batches,
    run_options,
    run_steps,
    train_step,
)

RUN = "stage2_dino"
# Options that only change what the k-NN evaluation reports (see `training.runtime.run_options`).
KNN_OPTIONS = ("knn_data", "knn_bank_split", "knn_query_split", "knn_k")

# The two published recipes (DINO README): ViTs train with AdamW, the ResNet-50 with SGD.
OPTIMIZER_RECIPES = {
    "adamw": {"learning_rate": 5e-4, "weight_decay": 0.04, "weight_decay_end": 0.4},
    "sgd": {"learning_rate": 0.03, "weight_decay": 1e-4, "weight_decay_end": 1e-4},
}


class CollapseError(RuntimeError):
    """The DINO outputs collapsed (one-hot or uniform); training further would not recover."""


def resolve_recipe(args, backbone_type: str) -> None:
    """Fills the options left unset from the published recipe of the backbone type."""
    is_resnet = backbone_type == "resnet"
    args.crop_recipe = args.crop_recipe or ("resnet" if is_resnet else "vit")
    args.optimizer = args.optimizer or ("sgd" if is_resnet else "adamw")
    for name, value in OPTIMIZER_RECIPES[args.optimizer].items():
        if getattr(args, name) is None:
            setattr(args, name, value)


def load_backbone(args, model):
    """The AgriCLIP model's backbone, re-initialised with --random-init or loaded with --backbone weights."""
    backbone = model.dino_model
    if args.random_init:
        backbone.apply(backbone._init_weights)
    if args.backbone:
        with unreadable_weights_named(args.backbone):
            pretrained = AutoModel.from_pretrained(args.backbone, dtype=torch.float32, trust_remote_code=False)
        state = {k: v for k, v in pretrained.state_dict().items() if not k.startswith("pooler.")}
        try:
            backbone.load_state_dict(state)
        except RuntimeError as error:
            raise ValueError(
                f"{args.backbone} does not fit the backbone of {args.model} ({error.args[0].splitlines()[0]}); build an "
                "AgriCLIP checkpoint around it first: agriclip convert --dino ... --clip ..."
            ) from None
    return backbone


def knn_bank_and_queries(source, bank_split: str | None, query_split: str | None, seed: int):
    """The labelled images of the k-NN evaluation: the memory bank, the queries and the class names.

    DINO's protocol (eval_knn.py): `bank_split` of `source` (its train split) as the bank and `query_split` (its
    validation or test split) as the queries, each split an image folder of class folders or a split of a saved
    dataset (`training.data.load_labelled_dataset`). Without splits, one labelled set split in halves, seeded.
    """
    if bank_split is None:
        labelled, class_names = load_labelled_dataset(source)
        halves = labelled.train_test_split(test_size=0.5, seed=seed)
        return halves["train"], halves["test"], class_names
    bank, class_names = load_labelled_dataset(source, bank_split)
    queries, query_classes = load_labelled_dataset(source, query_split)
    if query_classes != class_names:
        raise ValueError(f"{source}: the k-NN bank (split {bank_split!r}) has classes {class_names} but the queries "
                         f"(split {query_split!r}) have {query_classes}; both splits need the same class folders")
    return bank, queries, class_names


@torch.no_grad()
def knn_evaluation(backbone, knn_sets, normalise, accelerator, k: int) -> float:
    """k-NN accuracy of the backbone's features: the queries (second loader) voted on by the memory bank (first)."""
    backbone.eval()
    features = []
    for loader in knn_sets["loaders"]:
        chunks, labels = [], []
        for batch in counted(loader):
            if batch is None:
                continue
            chunks.append(backbone_features(backbone, normalise(batch["pixel_values"].to(accelerator.device))))
            labels.append(batch["labels"])
        features.append((torch.cat(chunks), torch.cat(labels)))
    backbone.train()
    (bank_x, bank_y), (query_x, query_y) = features
    return knn_accuracy(bank_x, bank_y, query_x, query_y, knn_sets["num_classes"], k=k)


def run(args, resume_hint: str = RESUME_HINT) -> Path:
    """Runs stage 2 with parsed `args`; `resume_hint` says how to continue a stopped run in
    the caller's context (`training.run_all` resumes by itself)."""
    accelerator = make_accelerator(args, RUN)
    checkpoints = CheckpointManager(accelerator, args.output_dir, keep=args.keep_checkpoints, resume_hint=resume_hint)
    with RunLock(args.output_dir, accelerator.print, accelerator.is_main_process), \
            exit_on_sigterm(checkpoints.describe_saved, accelerator.print):
        return train(args, accelerator, checkpoints)


def train(args, accelerator, checkpoints: CheckpointManager) -> Path:
    model, processor = load_model_and_processor(args.model)
    config = model.config
    backbone = load_backbone(args, model)
    resolve_recipe(args, backbone.config.model_type)
    global_size = args.global_size or config.vision_config.image_size
    local_size = args.local_size or max(8, global_size * 3 // 7)

    feature_size = backbone_features(backbone.eval(), torch.zeros(1, 3, global_size, global_size)).shape[-1]
    backbone.train()
    head = DINOHead(feature_size, args.out_dim, norm_last_layer=args.norm_last_layer,
                    hidden_dim=args.head_hidden_dim, bottleneck_dim=args.head_bottleneck_dim)
    student = MultiCropWrapper(backbone, head)
    teacher = copy.deepcopy(student).requires_grad_(False)
    # The teacher's head always has a normalised last layer (DINO); only the student's may train its norm.
    augment = MultiCropAugmentation(args.crop_recipe, args.num_local_crops, global_size, local_size,
                                    mean=config.dino_image_mean, std=config.dino_image_std).to(accelerator.device)
    num_crops = 2 + args.num_local_crops

    decode_stats = DecodeStats()
    dataset = load_image_text_dataset(args.train_data, split=args.train_split, image_column=args.image_column,
                                      caption_column=args.caption_column)
    collate = ImageCollator(size=math.ceil(global_size * 8 / 7), stats=decode_stats)
    # drop_last: the centre averages equal-size batches from every process.
    loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=True, drop_last=True, collate_fn=collate,
                        num_workers=args.num_workers, generator=dataloader_generator(args.seed))

    total_batch = args.batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    params = param_groups_without_decay(student, args.weight_decay)
    if args.optimizer == "sgd":
        optimizer = torch.optim.SGD(params, lr=0, momentum=0.9)
    else:
        optimizer = torch.optim.AdamW(params, lr=0)
    student, optimizer, loader = accelerator.prepare(student, optimizer, loader)
    teacher.to(accelerator.device)
    steps_per_epoch, max_steps = run_steps(args, loader)
    # DINO counts these in epochs; an epoch is `steps_per_epoch` optimizer steps, and a warm-up stops at the run's end.
    warmup_steps = min(args.warmup_epochs * steps_per_epoch, max_steps) if args.warmup_steps is None else args.warmup_steps
    teacher_temp_warmup_steps = min(args.warmup_teacher_temp_epochs * steps_per_epoch, max_steps)
    freeze_last_layer_steps = args.freeze_last_layer_epochs * steps_per_epoch
    dino_loss = DINOLoss(args.out_dim, num_crops, max_steps, args.warmup_teacher_temp, args.teacher_temp,
                         teacher_temp_warmup_steps, args.student_temp, args.center_momentum).to(accelerator.device)
    accelerator.register_for_checkpointing(teacher, dino_loss)

    # DINO's linear scaling rule: --learning-rate is per 256 images of the total batch.
    peak_lr = args.learning_rate * total_batch / 256.0
    lr_schedule = cosine_schedule(peak_lr, args.min_learning_rate, max_steps, warmup_steps)
    wd_schedule = cosine_schedule(args.weight_decay, args.weight_decay_end, max_steps)
    momentum_schedule = cosine_schedule(args.momentum_teacher, 1.0, max_steps)

    knn_sets = None
    if args.knn_data:
        bank, queries, class_names = knn_bank_and_queries(args.knn_data, args.knn_bank_split, args.knn_query_split,
                                                          args.seed)
        knn_collate = ImageCollator(size=global_size, stats=decode_stats)
        knn_sets = {"num_classes": len(class_names), "loaders": [
            DataLoader(images, batch_size=args.batch_size, collate_fn=knn_collate) for images in (bank, queries)]}

    def normalise(pixels):
        return (pixels - augment.mean) / augment.std

    position = checkpoints.start(args.resume, run_options(args, accelerator, neutral=KNN_OPTIONS),
                                 args.allow_changed_config)
    init_run_trackers(accelerator, RUN, args, position.step, checkpoints.resumed_from)
    if knn_sets and position.step == 0:
        initial_knn = knn_evaluation(teacher.backbone, knn_sets, normalise, accelerator, args.knn_k)
        accelerator.log({"knn_top1": initial_knn}, step=0)
        accelerator.print(f"k-NN top-1 of the initial backbone: {initial_knn:.3f}")
    collapse_window = default_collapse_window(max_steps, warmup_steps) if args.collapse_window is None else args.collapse_window
    accelerator.print(f"stage 2: {max_steps} optimizer steps of {args.batch_size} x {accelerator.num_processes} process(es) "
                      f"x {args.gradient_accumulation_steps} accumulation, {num_crops} crops ({global_size}/{local_size} px), "
                      f"{args.optimizer}, on {accelerator.device}\n"
                      f"stage 2: peak learning rate {peak_lr:.4g} = {args.learning_rate:g} per 256 images x {total_batch} "
                      f"images / 256, after {warmup_steps} warm-up steps, cosine to {args.min_learning_rate:g}; last layer "
                      f"frozen for {min(freeze_last_layer_steps, max_steps)} steps, teacher temperature warm-up "
                      f"{teacher_temp_warmup_steps} steps; stopped if collapsed for {collapse_window} steps in a row")
    collapse = CollapseMonitor(args.out_dim, window=collapse_window)
    progress = tqdm(total=max_steps, initial=position.step, desc="stage 2", disable=not accelerator.is_local_main_process)
    samples, started = 0, time.perf_counter()

    with PreemptionGuard(accelerator) as preemption:
        for batch in resumable_batches(loader, accelerator, position, max_steps, args.train_data):
            # Only the first group decays.
            optimizer.param_groups[0]["weight_decay"] = float(wd_schedule[position.step])
            pixels = batch["pixel_values"].to(accelerator.device)
            rows, global_batch_size = process_rows(accelerator, len(pixels))
            crops = augment(pixels, rows=rows, global_batch_size=global_batch_size)
            with torch.no_grad():
                teacher_output = teacher(crops[:2])
            output = train_step(
                accelerator, student, optimizer, lambda: dino_loss(student(crops), teacher_output, position.step),
                float(lr_schedule[position.step]), args.max_grad_norm, position, checkpoints,
                before_optimizer_step=lambda: cancel_gradients_last_layer(student, position.step, freeze_last_layer_steps),
            )
            samples += len(batch["pixel_values"]) * accelerator.num_processes
            if not accelerator.sync_gradients:
                continue
            update_teacher(accelerator.unwrap_model(student), teacher, float(momentum_schedule[position.step]))
            position.step += 1
            progress.update(1)
            # Means over the global batch, so every process logs and judges collapse on the same numbers.
            loss, entropy, kl = accelerator.reduce(
                torch.stack([output.loss.detach(), output.teacher_entropy, output.teacher_student_kl]), reduction="mean"
            ).tolist()
            logs = {"loss": loss, "teacher_entropy": entropy, "teacher_student_kl": kl,
                    "lr": float(lr_schedule[position.step - 1]), "weight_decay": float(wd_schedule[position.step - 1]),
                    "teacher_momentum": float(momentum_schedule[position.step - 1]),
                    "teacher_temp": float(dino_loss.teacher_temp_schedule[position.step - 1]),
                    "samples_per_second": samples / (time.perf_counter() - started)}
            progress.set_postfix(loss=f"{logs['loss']:.4f}")
            accelerator.log(logs, step=position.step)
            message = collapse.update(logs["teacher_entropy"], logs["teacher_student_kl"])
            if message:
                raise CollapseError(
                    f"{message} Stopped at step {position.step} of {max_steps}. If the run is only slow to leave its "
                    f"start-up phase, give a longer --collapse-window (now {collapse_window} steps); otherwise change "
                    "--teacher-temp (--warmup-teacher-temp during its warm-up), --center-momentum, --momentum-teacher, "
                    "--learning-rate or --out-dim."
                )
            checkpoints.after_step(position, args.checkpoint_every, max_steps, preemption)
    progress.close()

    if knn_sets:
        final_knn = knn_evaluation(teacher.backbone, knn_sets, normalise, accelerator, args.knn_k)
        accelerator.log({"knn_top1": final_knn}, step=position.step)
        accelerator.print(f"k-NN top-1 of the trained teacher backbone: {final_knn:.3f}")
    report_decode_stats(accelerator, decode_stats)
    model.dino_model.load_state_dict(teacher.backbone.state_dict())
    output_dir = Path(args.output_dir)
    backbone_processor = copy.deepcopy(processor.image_processor)
    backbone_processor.image_mean, backbone_processor.image_std = config.dino_image_mean, config.dino_image_std
    export_atomically(accelerator, output_dir / "backbone", teacher.backbone, backbone_processor)
    final = export_atomically(accelerator, output_dir / "final", model, processor)
    accelerator.print(f"stage 2 backbone written to {output_dir / 'backbone'} and into {final}")
    accelerator.end_training()
    return final

