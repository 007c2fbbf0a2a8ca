"""Stage 2 of AgriCLIP, the work behind `python -m training.stage2_dino` (which parses the options).

DINO self-distillation of the fine-grained backbone: a student (backbone + DINO head) matches the centred, sharpened
outputs of its EMA teacher over multi-crop views (Caron et al. 2021), with the published recipes, and optionally
DINOv2's KoLeo regulariser on the student's pooled features of the global crops (`--koleo-weight`). With k-NN data, the
trained backbone is set against an untrained control of the same architecture, and `final/stage2_report.json` says
how they compare.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch
from torch.utils.data import DataLoader
from transformers import AutoModel

from agriclip.atomic import write_json_atomically
from agriclip.images import DecodeStats
from agriclip.sources import load_image_dataset, load_labelled_dataset
from evaluation.knn import knn_accuracy
from modeling_agriclip.backbones import backbone_family
from modeling_agriclip.convert import names_random_weights
from modeling_agriclip.modeling_agriclip import backbone_features, unreadable_weights_named
from training.data import ImageCollator, LabelledImageCollator
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
from training.loop import run_resumable, train_loop
from training.losses import DINOLoss, KoLeoLoss
from training.models import load_model_and_processor
from training.options import RESUME_HINT
from training.runtime import (
    CheckpointManager,
    adamw,
    dataloader_generator,
    embed_batches,
    export_atomically,
    init_run_trackers,
    process_rows,
    report_decode_stats,
    run_options,
    run_steps,
)
from training.sharding import (
    gathered_parameters,
    is_deepspeed,
    is_fsdp,
    is_zero3,
    prepare_for_sharding,
    whole_construction,
)
from training.stage2_dino import recipe_settings


RUN = "stage2_dino"
# Options that only change what the k-NN evaluation reports (see `training.runtime.run_options`).
KNN_OPTIONS = ("knn_data", "knn_bank_split", "knn_query_split", "knn_k")
# Options that decide nothing once the settings they stand for are resolved into the other options.
NEUTRAL_OPTIONS = (*KNN_OPTIONS, "recipe")
# Options added after stage-2 checkpoints were first written, each with the value that means what a checkpoint without
# it did: left out of the recorded options at that value (`checkpoint_options`), so that such a checkpoint resumes under
# it, while any other value still differs from the record and is refused.
ADDED_OPTIONS = {"photometric": "dino", "koleo_weight": 0.0}
# What stage 2 found, written into the exported checkpoint folder beside the weights it describes.
REPORT = "stage2_report.json"

# The two published recipes (DINO README): ViTs train with AdamW, the ResNet-50 with SGD.
OPTIMIZER_RECIPES = {
    "adamw": {"learning_rate": 5e-4, "weight_decay": 0.04, "weight_decay_end": 0.4},
    "sgd": {"learning_rate": 0.03, "weight_decay": 1e-4, "weight_decay_end": 1e-4},
}


class CollapseError(RuntimeError):
    """The DINO outputs collapsed (one-hot or uniform); training further would not recover."""


def checkpoint_options(args, accelerator) -> dict:
    """The options saved with each checkpoint and compared on resume (`training.runtime.run_options`), less those of
    `ADDED_OPTIONS` at the value that a checkpoint written before them stands for."""
    options = run_options(args, accelerator, neutral=NEUTRAL_OPTIONS)
    return {
        name: value for name, value in options.items() if not (name in ADDED_OPTIONS and value == ADDED_OPTIONS[name])
    }


@dataclass
class StudentLoss:
    """The loss of a training step: DINO's (with its detached collapse indicators, `training.losses.DINOLossOutput`)
    plus `koleo_weight` times `koleo`, the KoLeo terms of the global crops summed (detached; None without KoLeo)."""

    loss: torch.Tensor
    teacher_entropy: torch.Tensor
    teacher_student_kl: torch.Tensor
    koleo: torch.Tensor | None = None


class PooledFeatures:
    """Keeps the input of a DINO head at each forward: the pooled backbone features of every crop, in crop order
    (`training.dino.MultiCropWrapper`), so the KoLeo term sees what the head sees, through the student's own forward
    (under DDP too)."""

    def __init__(self, head: torch.nn.Module):
        self.features = None
        self.handle = head.register_forward_pre_hook(self.keep)

    def keep(self, module, inputs):
        self.features = inputs[0]

    def take(self) -> torch.Tensor:
        features, self.features = self.features, None
        return features


def koleo_term(koleo: KoLeoLoss, features: torch.Tensor, batch_size: int) -> torch.Tensor:
    """DINOv2's KoLeo term: the KoLeo loss of each of the 2 global crops separately (rows [0, B) and [B, 2B) of the
    pooled features), summed. Zero for a batch of fewer than 2 readable images, whose crops have no neighbour."""
    if batch_size < 2:
        return features.new_zeros((), dtype=torch.float32)
    return sum(koleo(crop) for crop in features[: 2 * batch_size].chunk(2))


def resolve_recipe(options, backbone_type: str):
    """`options` (`training.stage2_dino.DinoOptions`) with the crop scales and optimizer settings left unset taken
    from the recipe of the backbone's family (`modeling_agriclip.backbones.BACKBONE_FAMILIES`, keyed by the
    backbone's `model_type`; the settings of `--recipe` are filled in by `training.stage2_dino.apply_recipe` already; a
    learning rate it leaves unset is the optimizer's)."""
    family = backbone_family(backbone_type)
    optimizer = options.optimizer or family.optimizer
    unset = {name: value for name, value in OPTIMIZER_RECIPES[optimizer].items() if getattr(options, name) is None}
    return dataclasses.replace(
        options, crop_recipe=options.crop_recipe or family.crop_recipe, optimizer=optimizer, **unset
    )


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


def resolved_recipe(args) -> tuple[dict, dict]:
    """The `--recipe` settings the run uses and those given instead of the recipe's (`recipe_settings`), once
    `resolve_recipe` has filled in the optimizer's."""
    return recipe_settings(args, {"learning_rate": OPTIMIZER_RECIPES[args.optimizer]["learning_rate"]})


def starts_random(args) -> bool:
    """Whether the backbone starts from random weights, as the options say: --random-init, or a preset or JSON config
    file as --model (`training.models.load_model_and_processor` builds those randomly), unless --backbone loads
    weights over it. (A checkpoint folder whose backbone a previous stage left at its random initialisation does not
    say so: it counts as not random.)"""
    if getattr(args, "backbone", None):
        return False
    return bool(getattr(args, "random_init", False)) or names_random_weights(args.model)


def untrained_backbone(config, seed: int):
    """A backbone of the architecture of `config.dino_config`, built as `AgriCLIPModel` builds its `dino_model`, with
    the random initialisation of its transformers class drawn under `seed` (the global RNG is left as it was)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return backbone_family(config.dino_config).build(config.dino_config)


def knn_bank_and_queries(source, bank_split: str | None, query_split: str | None, seed: int):
    """The labelled images of the k-NN evaluation: the memory bank, the queries and the class names.

    DINO's protocol (eval_knn.py): `bank_split` of `source` (its train split) as the bank and `query_split` (its
    validation or test split) as the queries, each split an image folder of class folders or a split of a saved
    dataset (`agriclip.sources.load_labelled_dataset`). Without splits, one labelled set split in halves, seeded.
    """
    if bank_split is None:
        labelled, class_names = load_labelled_dataset(source)
        halves = labelled.train_test_split(test_size=0.5, seed=seed)
        return halves["train"], halves["test"], class_names
    bank, class_names = load_labelled_dataset(source, bank_split)
    queries, query_classes = load_labelled_dataset(source, query_split)
    if query_classes != class_names:
        raise ValueError(
            f"{source}: the k-NN bank (split {bank_split!r}) has classes {class_names} but the queries "
            f"(split {query_split!r}) have {query_classes}; both splits need the same class folders"
        )
    return bank, queries, class_names


@torch.no_grad()
def knn_evaluation(backbone, knn_sets, normalise, accelerator, k: int) -> float:
    """k-NN accuracy of the backbone's features: the queries (second loader) voted on by the memory bank (first)."""
    backbone.eval()

    def embedded(batch) -> dict[str, torch.Tensor]:
        pixel_values = normalise(batch["pixel_values"].to(accelerator.device))
        return {"features": backbone_features(backbone, pixel_values), "labels": batch["labels"]}

    bank, queries = [embed_batches(loader, accelerator, embedded) for loader in knn_sets["loaders"]]
    backbone.train()
    return knn_accuracy(
        bank["features"], bank["labels"], queries["features"], queries["labels"], knn_sets["num_classes"], k=k
    )


def run(args, resume_hint: str = RESUME_HINT) -> Path:
    """Runs stage 2 with parsed `args`; `resume_hint` says how to continue a stopped run in
    the caller's context (`training.run_all` resumes by itself)."""
    return run_resumable(args, RUN, resume_hint, train)


def train(args, accelerator, checkpoints: CheckpointManager) -> Path:
    with whole_construction(accelerator):
        model, processor = load_model_and_processor(args.model)
    config = model.config
    backbone = load_backbone(args, model)
    args = resolve_recipe(args, backbone.config.model_type)
    global_size = args.global_size or config.vision_config.image_size
    local_size = args.local_size or max(8, global_size * 3 // 7)

    feature_size = backbone_features(backbone.eval(), torch.zeros(1, 3, global_size, global_size)).shape[-1]
    backbone.train()
    head = DINOHead(
        feature_size,
        args.out_dim,
        norm_last_layer=args.norm_last_layer,
        hidden_dim=args.head_hidden_dim,
        bottleneck_dim=args.head_bottleneck_dim,
    )
    student = MultiCropWrapper(backbone, head)
    teacher = copy.deepcopy(student).requires_grad_(False)
    # The teacher's head always has a normalised last layer (DINO); only the student's may train its norm.
    # KoLeo (after the copy: the teacher keeps no features) sees the student's pooled features.
    pooled = PooledFeatures(head) if args.koleo_weight > 0 else None
    koleo = KoLeoLoss()
    augment = MultiCropAugmentation(
        args.crop_recipe,
        args.num_local_crops,
        global_size,
        local_size,
        mean=config.dino_image_mean,
        std=config.dino_image_std,
        photometric=args.photometric,
    ).to(accelerator.device)
    num_crops = 2 + args.num_local_crops

    decode_stats = DecodeStats()
    dataset = load_image_dataset(args.train_data, split=args.train_split, image_column=args.image_column)
    collate = ImageCollator(size=math.ceil(global_size * 8 / 7), stats=decode_stats)
    # drop_last: the centre averages equal-size batches from every process.
    loader = DataLoader(
        dataset,
        batch_size=args.batch_size,
        shuffle=True,
        drop_last=True,
        collate_fn=collate,
        num_workers=args.num_workers,
        generator=dataloader_generator(args.seed),
    )

    total_batch = args.batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    student = prepare_for_sharding(accelerator, student)
    params = param_groups_without_decay(student, args.weight_decay)
    if args.optimizer == "sgd":
        optimizer = torch.optim.SGD(params, lr=0, momentum=0.9)
    else:
        optimizer = adamw(params, accelerator.device, lr=0)
    student, optimizer, loader = accelerator.prepare(student, optimizer, loader)
    teacher.to(accelerator.device)
    steps_per_epoch, max_steps = run_steps(args, loader)
    # DINO counts these in epochs; an epoch is `steps_per_epoch` optimizer steps, and a warm-up stops at the run's end.
    warmup_steps = (
        min(args.warmup_epochs * steps_per_epoch, max_steps) if args.warmup_steps is None else args.warmup_steps
    )
    teacher_temp_warmup_steps = min(args.warmup_teacher_temp_epochs * steps_per_epoch, max_steps)
    freeze_last_layer_steps = args.freeze_last_layer_epochs * steps_per_epoch
    dino_loss = DINOLoss(
        args.out_dim,
        num_crops,
        max_steps,
        args.warmup_teacher_temp,
        args.teacher_temp,
        teacher_temp_warmup_steps,
        args.student_temp,
        args.center_momentum,
    ).to(accelerator.device)
    accelerator.register_for_checkpointing(teacher, dino_loss)

    # DINO's linear scaling rule: --learning-rate is per 256 images of the total batch.
    peak_lr = args.learning_rate * total_batch / 256.0
    lr_schedule = cosine_schedule(peak_lr, args.min_learning_rate, max_steps, warmup_steps)
    wd_schedule = cosine_schedule(args.weight_decay, args.weight_decay_end, max_steps)
    momentum_schedule = cosine_schedule(args.momentum_teacher, 1.0, max_steps)

    knn_sets = None
    if args.knn_data:
        bank, queries, class_names = knn_bank_and_queries(
            args.knn_data, args.knn_bank_split, args.knn_query_split, args.seed
        )
        # The processor's pixels, as zero-shot and stage 3 feed the backbone: k-NN measures the features they use.
        knn_collate = LabelledImageCollator(processor, decode_stats)
        knn_sets = {
            "num_classes": len(class_names),
            "loaders": [
                DataLoader(images, batch_size=args.batch_size, collate_fn=knn_collate) for images in (bank, queries)
            ],
        }

    # From the processor's normalisation to the backbone's, as `AgriCLIPModel.get_backbone_features` converts.
    normalise = model.dino_pixel_renorm.to(accelerator.device)
    position = checkpoints.start(args.resume, checkpoint_options(args, accelerator), args.allow_changed_config)
    if is_deepspeed(accelerator) and position.step < min(freeze_last_layer_steps, max_steps):
        # Accelerate's DeepSpeed `backward` also runs the engine's optimizer step (DeepSpeedEngineWrapper.backward),
        # so `cancel_gradients_last_layer`, which runs after the backward, would freeze nothing; and a zero gradient
        # is not DINO's skipped parameter (AdamW would still decay it and count the step).
        raise ValueError(
            f"the DINO head's last layer cannot be frozen under DeepSpeed (here for {freeze_last_layer_steps} "
            "steps): pass --freeze-last-layer-epochs 0, or train under FSDP2 (training/configs/fsdp2.yaml)"
        )
    init_run_trackers(accelerator, RUN, args, position.step, checkpoints.resumed_from)
    random_start = starts_random(args)
    initial_knn = None  # evaluated at step 0 only: a resumed run reports no start
    if knn_sets and position.step == 0:
        initial_knn = knn_evaluation(teacher.backbone, knn_sets, normalise, accelerator, args.knn_k)
        accelerator.log({"knn_top1": initial_knn}, step=0)
        accelerator.print(
            f"k-NN top-1 of the initial backbone{' (random weights)' if random_start else ''}: {initial_knn:.3f}"
        )
    collapse_window = (
        default_collapse_window(max_steps, warmup_steps) if args.collapse_window is None else args.collapse_window
    )
    recipe_values, overridden = resolved_recipe(args)
    accelerator.print(
        f"stage 2: recipe {args.recipe}: "
        + ", ".join(f"{name} {value:g}" for name, value in recipe_values.items())
        + (f"; given instead of the recipe's: {', '.join(sorted(overridden))}" if overridden else "")
        + f"; photometric {args.photometric}; KoLeo weight {args.koleo_weight:g}"
        + (" (off: the published DINO)" if pooled is None else "")
    )
    accelerator.print(
        f"stage 2: {max_steps} optimizer steps of {args.batch_size} x {accelerator.num_processes} process(es) "
        f"x {args.gradient_accumulation_steps} accumulation, {num_crops} crops ({global_size}/{local_size} px), "
        f"{args.optimizer}, on {accelerator.device}\n"
        f"stage 2: peak learning rate {peak_lr:.4g} = {args.learning_rate:g} per 256 images x {total_batch} "
        f"images / 256, after {warmup_steps} warm-up steps, cosine to {args.min_learning_rate:g}; last layer "
        f"frozen for {min(freeze_last_layer_steps, max_steps)} steps, teacher temperature warm-up "
        f"{teacher_temp_warmup_steps} steps; stopped if collapsed for {collapse_window} steps in a row"
    )
    collapse = CollapseMonitor(args.out_dim, window=collapse_window)
    last = {}  # the teacher's entropy and teacher-student KL of the last step of this segment

    def views_and_teacher(batch, step: int):
        # Only the first group decays.
        optimizer.param_groups[0]["weight_decay"] = float(wd_schedule[step])
        pixels = batch["pixel_values"].to(accelerator.device)
        rows, global_batch_size = process_rows(accelerator, len(pixels))
        crops = augment(pixels, rows=rows, global_batch_size=global_batch_size)
        with torch.no_grad():
            teacher_output = teacher(crops[:2])
        return crops, teacher_output, len(pixels)

    def student_loss(inputs) -> StudentLoss:
        crops, teacher_output, batch_size = inputs
        output = dino_loss(student(crops), teacher_output, position.step)
        if pooled is None:
            return StudentLoss(output.loss, output.teacher_entropy, output.teacher_student_kl)
        term = koleo_term(koleo, pooled.take(), batch_size)
        return StudentLoss(
            output.loss + args.koleo_weight * term, output.teacher_entropy, output.teacher_student_kl, term.detach()
        )

    def step_logs(output: StudentLoss, step: int) -> dict:
        # Under ZeRO-3 the student's parameters are partitioned: gathered for the EMA (every process joins).
        with gathered_parameters(accelerator, accelerator.unwrap_model(student)) as whole_student:
            update_teacher(whole_student, teacher, float(momentum_schedule[step]))
        # Means over the global batch, so every process logs and judges collapse on the same numbers.
        values = [output.loss.detach(), output.teacher_entropy, output.teacher_student_kl]
        if output.koleo is not None:
            values.append(output.koleo)
        loss, entropy, kl, *koleo_value = accelerator.reduce(torch.stack(values), reduction="mean").tolist()
        last.update(teacher_entropy=entropy, teacher_student_kl=kl)
        return {
            "loss": loss,
            "teacher_entropy": entropy,
            "teacher_student_kl": kl,
            **({"koleo": koleo_value[0]} if koleo_value else {}),
            "weight_decay": float(wd_schedule[step]),
            "teacher_momentum": float(momentum_schedule[step]),
            "teacher_temp": float(dino_loss.teacher_temp_schedule[step]),
        }

    def check_collapse(logs) -> None:
        message = collapse.update(logs["teacher_entropy"], logs["teacher_student_kl"])
        if message:
            raise CollapseError(
                f"{message} Stopped at step {position.step} of {max_steps}. If the run is only slow to leave its "
                f"start-up phase, give a longer --collapse-window (now {collapse_window} steps); otherwise change "
                "--teacher-temp (--warmup-teacher-temp during its warm-up), --center-momentum, --momentum-teacher, "
                "--learning-rate or --out-dim."
            )

    train_loop(
        accelerator,
        student,
        optimizer,
        loader,
        position=position,
        checkpoints=checkpoints,
        max_steps=max_steps,
        lr_schedule=lr_schedule,
        max_grad_norm=args.max_grad_norm,
        checkpoint_every=args.checkpoint_every,
        data=args.train_data,
        description="stage 2",
        prepare=views_and_teacher,
        compute_loss=student_loss,
        before_optimizer_step=lambda step: cancel_gradients_last_layer(student, step, freeze_last_layer_steps),
        step_logs=step_logs,
        check=check_collapse,
    )

    knn = None
    if knn_sets:
        final_knn = knn_evaluation(teacher.backbone, knn_sets, normalise, accelerator, args.knn_k)
        accelerator.log({"knn_top1": final_knn}, step=position.step)
        accelerator.print(f"k-NN top-1 of the trained teacher backbone: {final_knn:.3f}")
        if random_start and initial_knn is not None:
            # The start was an untrained backbone of this architecture already: it is the control.
            untrained_knn, control = initial_knn, "the random start (step 0)"
        else:
            untrained = untrained_backbone(config, args.seed).to(accelerator.device)
            untrained_knn = knn_evaluation(untrained, knn_sets, normalise, accelerator, args.knn_k)
            control = f"a fresh random initialisation (seed {args.seed})"
            del untrained
        accelerator.log({"knn_top1_untrained": untrained_knn}, step=position.step)
        knn = {"trained": final_knn, "start": initial_knn, "untrained": untrained_knn, "control": control}
    report = stage2_report(args, knn, last, position.step, max_steps)
    accelerator.print(summary_line(report))
    report_decode_stats(accelerator, decode_stats)
    final_weights = None
    if is_fsdp(accelerator) or is_zero3(accelerator):
        # The model's backbone is the student's, sharded (FSDP2) or partitioned (ZeRO-3): the export takes the
        # (full, replicated) teacher's weights and the model's own for the rest.
        final_weights = {key: value for key, value in model.state_dict().items() if not key.startswith("dino_model.")}
        final_weights |= {f"dino_model.{key}": value for key, value in teacher.backbone.state_dict().items()}
    else:
        model.dino_model.load_state_dict(teacher.backbone.state_dict())
    output_dir = Path(args.output_dir)
    backbone_processor = copy.deepcopy(processor.image_processor)
    backbone_processor.image_mean, backbone_processor.image_std = config.dino_image_mean, config.dino_image_std
    export_atomically(accelerator, output_dir / "backbone", teacher.backbone, backbone_processor)
    # The report goes into `final` with the weights it describes: both or neither.
    report_file = SimpleNamespace(save_pretrained=lambda folder: write_json_atomically(Path(folder) / REPORT, report))
    final = export_atomically(
        accelerator, output_dir / "final", model, processor, report_file, state_dict=final_weights
    )
    accelerator.print(
        f"stage 2 backbone written to {output_dir / 'backbone'} and into {final}; report: {final / REPORT}"
    )
    accelerator.end_training()
    return final


def stage2_report(args, knn: dict | None, last: dict, steps: int, max_steps: int) -> dict:
    """What `final/stage2_report.json` holds: the recipe and its resolved settings, the photometric recipe and the KoLeo
    weight (0: none, the published DINO), the k-NN top-1 of the trained
    teacher backbone, of the start (None when this segment resumed) and of the untrained control (all None without
    --knn-data), and the teacher's entropy (of at most ln(out_dim) nats) and teacher-student KL at the last step
    (None when a resumed run had no step left)."""
    values, overridden = resolved_recipe(args)
    knn = knn or {}
    return {
        "recipe": args.recipe,
        "recipe_settings": values,
        "overridden": overridden,
        "photometric": args.photometric,
        "koleo_weight": args.koleo_weight,
        "steps": steps,
        "max_steps": max_steps,
        "start_random": starts_random(args),
        "knn_data": str(args.knn_data) if args.knn_data else None,
        "knn_bank_split": args.knn_bank_split,
        "knn_query_split": args.knn_query_split,
        "knn_k": args.knn_k,
        "knn_top1_trained": knn.get("trained"),
        "knn_top1_start": knn.get("start"),
        "knn_top1_untrained": knn.get("untrained"),
        "untrained_control": knn.get("control"),
        "teacher_entropy": last.get("teacher_entropy"),
        "ln_out_dim": math.log(args.out_dim),
        "teacher_student_kl": last.get("teacher_student_kl"),
    }


def summary_line(report: dict) -> str:
    """One line of the report: the k-NN top-1 of the trained backbone against the untrained control, and where the
    teacher's entropy and KL ended."""
    parts = []
    if report["knn_top1_trained"] is not None:
        trained, untrained = report["knn_top1_trained"], report["knn_top1_untrained"]
        name = Path(report["knn_data"]).name or report["knn_data"]
        start = (
            ""
            if report["knn_top1_start"] is None or report["start_random"]
            else f", start {report['knn_top1_start']:.3f}"
        )
        control = "; the random start" if report["untrained_control"].startswith("the random start") else ""
        parts.append(
            f"k-NN top-1 ({name}): trained {trained:.3f}{start}, untrained control {untrained:.3f} "
            f"({trained - untrained:+.3f}{control})"
        )
    if report["teacher_entropy"] is not None:
        parts.append(
            f"teacher entropy {report['teacher_entropy']:.2f} of ln K = {report['ln_out_dim']:.2f} at the end, "
            f"KL {report['teacher_student_kl']:.2f}"
        )
    return f"stage 2 (recipe {report['recipe']}): " + ("; ".join(parts) or "no step run and no k-NN data")
