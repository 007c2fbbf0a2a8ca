"""LoRA adaptation of AgriCLIP, the work behind `python -m training.lora_finetune` (which parses and checks the
options; its docstring describes the towers, objectives, evaluation and outputs).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import datasets
import torch
import torch.nn.functional as F
from huggingface_hub import HfApi
from huggingface_hub.utils import HFValidationError, validate_repo_id
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import DataLoader

from agriclip.atomic import write_json_atomically
from agriclip.images import DecodeStats
from agriclip.sources import load_image_text_dataset, load_labelled_dataset
from agriclip.templates import fill_templates, get_templates
from evaluation.linear_probe import sample_k_shot
from evaluation.metrics import classification_metrics
from evaluation.runner import load_train_split, probe_split
from evaluation.suite import DatasetSpec, load_suite_config
from modeling_agriclip.convert import PRESETS
from modeling_agriclip.lora_targets import default_target_modules
from modeling_agriclip.zero_shot import ZeroShotClassifier, ensemble_prompt_embeddings
from training.aligner import TARGET_IMAGE, fit_closed_form
from training.alignment import streamed_statistics
from training.contrastive import contrastive_forward
from training.data import (
    ImageTextCollator,
    IndexedRows,
    LabelledImageCollator,
    process_shard_loader,
)
from training.dino import cosine_schedule, param_groups_without_decay
from training.loop import run_resumable, train_loop
from training.losses import create_loss, share_of_global_batch
from training.models import load_model_and_processor
from training.options import RESUME_HINT
from training.runtime import (
    CheckpointManager,
    adamw,
    dataloader_generator,
    embed_batches,
    export_atomically,
    init_run_trackers,
    report_decode_stats,
    run_options,
    run_steps,
)
from training.sharding import (
    full_state_dict,
    gathered,
    is_fsdp,
    leave_inference_mode,
    prepare_for_sharding,
    register_read_tables,
    submodule_state_dict,
    whole_construction,
)


logger = logging.getLogger(__name__)

RUN = "lora_finetune"
# Options that change what is published or written beside the adapter, not the adapter (see
# `training.runtime.run_options`).
PUBLISHING_OPTIONS = ("merge", "base_model_id", "push_to_hub")
TOWERS = ("text", "image", "backbone")
# The top-level module of AgriCLIPModel that each tower owns.
TOWER_OF_MODULE = {
    "text_model": "text",
    "text_projection": "text",
    "vision_model": "image",
    "visual_projection": "image",
    "dino_model": "backbone",
}
ALIGNED_EMBEDDINGS = ("aligned", "fused")
# Trainable weights of a checkpoint (the frozen base is not saved).
ADAPTER_STATE = "adapter_state.safetensors"
RESULTS = "results.json"


# ------------------------------------------------------------------------------------------------------------------
# Targets and the PEFT model
# ------------------------------------------------------------------------------------------------------------------


def tower_of(module_name: str) -> str | None:
    """The tower that owns a module of AgriCLIPModel (None for the aligner and the pixel re-normalisations)."""
    return TOWER_OF_MODULE.get(module_name.split(".", 1)[0])


def resolve_lora_targets(model, towers, target_modules: str | None = None) -> tuple[str, list[str]]:
    """The LoRA target regex and the module names it matches, checked against the chosen towers.

    PEFT full-matches a string `target_modules` against every module name, so the same rule is applied here.

    Raises:
        ValueError: the regex is invalid, matches no module, matches a module outside `towers` (naming them), or
            leaves a chosen tower without adapters.
    """
    unknown = sorted(set(towers) - set(TOWERS))
    if unknown:
        raise ValueError(f"unknown tower(s) {unknown}; choose from {list(TOWERS)}")
    regex = target_modules or default_target_modules(model.config, towers)
    try:
        pattern = re.compile(regex)
    except re.error as error:
        raise ValueError(f"--target-modules {regex!r} is not a valid regular expression: {error}") from None
    matched = [name for name, _ in model.named_modules() if name and pattern.fullmatch(name)]
    if not matched:
        raise ValueError(
            f"LoRA target regex {regex!r} matches no module of the model; it must match whole module names such as "
            "'text_model.encoder.layers.0.self_attn.q_proj' or 'dino_model.layers.0.attention.q_proj'"
        )
    outside = [name for name in matched if tower_of(name) not in towers]
    if outside:
        shown = ", ".join(outside[:8]) + (f" and {len(outside) - 8} more" if len(outside) > 8 else "")
        raise ValueError(
            f"LoRA target regex {regex!r} also matches {len(outside)} module(s) outside the chosen tower(s) "
            f"{list(towers)}: {shown}. Attention layers of different towers share names in transformers 5: anchor "
            "the regex on text_model., vision_model. or dino_model., or name every tower you mean in --towers."
        )
    empty = [tower for tower in towers if not any(tower_of(name) == tower for name in matched)]
    if empty:
        raise ValueError(f"LoRA target regex {regex!r} matches no module of the chosen tower(s) {empty}")
    return regex, matched


def objective_embedding(towers) -> str | None:
    """The image embedding the objective trains through: the one computed by the adapted image tower(s)."""
    if "backbone" in towers and "image" in towers:
        return "fused"
    if "backbone" in towers:
        return "aligned"
    if "image" in towers:
        return "clip"
    return None


def build_lora_model(
    model,
    towers,
    target_modules: str | None = None,
    rank: int = 8,
    alpha: float = 16.0,
    dropout: float = 0.0,
    train_aligner: bool = False,
    save_aligner: bool = False,
) -> PeftModel:
    """Wraps an AgriCLIPModel with LoRA adapters on `towers`; everything else is frozen.

    `train_aligner` trains the aligner fully; `save_aligner` keeps a frozen copy of it in the adapter (for a re-fit
    after training). Either way the aligner travels with the adapter (PEFT `modules_to_save`).
    """
    regex, _ = resolve_lora_targets(model, towers, target_modules)
    embedding = objective_embedding(towers) or model.config.image_embedding
    if train_aligner and embedding not in ALIGNED_EMBEDDINGS:
        raise ValueError(
            f"--train-aligner: the {embedding!r} image embedding the towers {list(towers)} train through does not use the aligner"
        )
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=regex,
        modules_to_save=["aligner"] if train_aligner or save_aligner else None,
    )
    peft_model = get_peft_model(model, config)
    if save_aligner and not train_aligner:
        aligner_copy(peft_model).requires_grad_(False)
    return peft_model


def aligner_copy(peft_model: PeftModel) -> nn.Linear:
    """The aligner that the adapter carries (the `modules_to_save` copy of the active adapter)."""
    return peft_model.get_base_model().aligner.modules_to_save[peft_model.active_adapter]


@torch.no_grad()
def write_into_shards(module: nn.Module, values: dict[str, torch.Tensor]) -> None:
    """Writes the whole `values` (by parameter name) into `module`'s FSDP2-sharded parameters (DTensors), each
    process its own shard."""
    from torch.distributed.tensor import distribute_tensor

    for name, parameter in module.named_parameters():
        shard = distribute_tensor(values[name].to(parameter.dtype), parameter.device_mesh, parameter.placements)
        parameter.to_local().copy_(shard.to_local())


def trainable_parameters(peft_model: PeftModel) -> tuple[int, int]:
    """(trainable, total) parameter counts, LoRA weights included in the total."""
    total = sum(parameter.numel() for parameter in peft_model.parameters())
    return sum(p.numel() for p in peft_model.parameters() if p.requires_grad), total


def adapters_train_mode(model) -> None:
    """Training mode for the adapters only: the frozen base stays in eval mode, so a ResNet backbone's BatchNorm
    statistics (which are not part of the adapter) never drift, and only LoRA dropout is active."""
    model.eval()
    for name, module in model.named_modules():
        if name.endswith("lora_dropout"):
            module.train()


def checkpoint_trainable_weights_only(accelerator) -> None:
    """Makes `save_state`/`load_state` write and read only the trainable weights (adapters, trained aligner).

    Under FSDP the checkpoint stays Accelerate's sharded one of the whole model (each process writes its shards):
    the trainable weights are shards there, which the main process alone cannot write."""
    if is_fsdp(accelerator):
        return

    def save_hook(models, weights, output_dir):
        for model in models:
            if accelerator.is_main_process:
                state = {
                    n: p.detach().cpu().contiguous()
                    for n, p in accelerator.unwrap_model(model).named_parameters()
                    if p.requires_grad
                }
                save_file(state, str(Path(output_dir) / ADAPTER_STATE))
        weights.clear()

    def load_hook(models, input_dir):
        for model in models:
            unwrapped = accelerator.unwrap_model(model)
            state = load_file(str(Path(input_dir) / ADAPTER_STATE))
            expected = {n for n, p in unwrapped.named_parameters() if p.requires_grad}
            if set(state) != expected:
                raise ValueError(
                    f"{input_dir}: the checkpoint's adapter weights ({len(state)}) do not match this run's trainable "
                    f"weights ({len(expected)}); resume with the same --towers, --target-modules and --lora-rank"
                )
            unwrapped.load_state_dict(state, strict=False)
        models.clear()

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


# ------------------------------------------------------------------------------------------------------------------
# Base model reference recorded in the adapter
# ------------------------------------------------------------------------------------------------------------------


def base_model_reference(model_argument: str, base_model_id: str | None, publishing: bool) -> str | None:
    """What adapter_config.json records as `base_model_name_or_path`.

    A Hub id when known (`--base-model-id`, or `--model` given as one); otherwise the absolute path of a local base
    folder, with a warning (such an adapter loads on this machine only); None for a randomly initialised preset.

    Raises:
        ValueError: `base_model_id` is not a Hub id, or `publishing` without a Hub id of the base.
    """
    if base_model_id is not None:
        try:
            validate_repo_id(base_model_id)
        except HFValidationError as error:
            raise ValueError(f"--base-model-id {base_model_id!r} is not a Hub id (org/name): {error}") from None
        if Path(base_model_id).exists():
            raise ValueError(
                f"--base-model-id {base_model_id!r} is a local path; a published adapter names the base by its Hub id"
            )
        return base_model_id
    if model_argument in PRESETS:
        reference = None
        message = f"the base model is the randomly initialised preset {model_argument!r}: the adapter cannot be loaded without it"
    elif Path(model_argument).exists():
        reference = str(Path(model_argument).resolve())
        message = (
            f"the adapter records the local base folder {reference}; pass --base-model-id org/name before publishing it"
        )
    else:
        return model_argument
    if publishing:
        raise ValueError(f"--push-to-hub: {message}")
    logger.warning(message)
    return reference


# ------------------------------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------------------------------


@dataclass
class LabelledTask:
    """Labelled images with the prompts of their classes: what to train on (classification) and to hold out."""

    class_names: list[str]
    prompt_names: list[str]
    templates: list[str]
    held_out: datasets.Dataset
    train: datasets.Dataset | None = None


def _labels(dataset: datasets.Dataset) -> torch.Tensor:
    return torch.tensor(dataset["label"], dtype=torch.long)


def task_spec(args) -> DatasetSpec | None:
    """The labelled task: a `--suite` entry (its splits overridable by flags), or the labelled data with --templates."""
    if args.suite:
        specs = {spec.name: spec for spec in load_suite_config(args.suite).datasets}
        if args.task not in specs:
            raise ValueError(f"{args.suite}: no dataset named {args.task!r}; datasets: {sorted(specs)}")
        spec = specs[args.task]
        return replace(spec, split=args.eval_split or spec.split, train_split=args.train_split or spec.train_split)
    path = args.train_data if args.objective == "classification" else args.eval_data
    if path is None:
        return None
    templates = args.templates[0] if len(args.templates) == 1 and "{}" not in args.templates[0] else args.templates
    return DatasetSpec(
        name=Path(path).name,
        display_name=Path(path).name,
        path=Path(path),
        split=args.eval_split,
        train_split=args.train_split if args.objective == "classification" else None,
        templates=get_templates(templates),
    )


def load_labelled_task(spec: DatasetSpec, train: bool, shots: int | None = None, seed: int = 0) -> LabelledTask:
    """Loads the held-out images of `spec` and, with `train`, the images to train on.

    Without `spec.train_split`, the evaluated split is split as the evaluation suite's probes split it
    (`probe_split`): its test part is held out and the rest trained on; `shots` keeps a seeded sample of that many images per class.
    """
    held_out, class_names = load_labelled_dataset(spec.path, spec.split)
    training = None
    if train:
        if spec.train_split is None:
            train_rows, held_out_rows = probe_split(_labels(held_out), seed)
            training, held_out = held_out.select(train_rows.tolist()), held_out.select(held_out_rows.tolist())
        else:
            training = load_train_split(spec, class_names)
        if shots:
            training = training.select(sample_k_shot(_labels(training), shots, seed)[0].tolist())
    prompt_names = spec.prompt_names(class_names, f"task {spec.name!r}")
    return LabelledTask(list(class_names), prompt_names, list(spec.templates), held_out, training)


# ------------------------------------------------------------------------------------------------------------------
# Objectives and evaluation
# ------------------------------------------------------------------------------------------------------------------


class PromptClassifier(nn.Module):
    """Scaled cosine similarities `(batch, num_classes)` of images and class-prompt embeddings: the classification
    objective's logits.

    Class embeddings are prompt ensembles. With a frozen text tower they are `ZeroShotClassifier.label_embeddings`,
    computed once; with an adapted one they are recomputed from the prompts at every forward, with gradients. The
    objective is one module so that a DDP wrapper around it sees the whole forward.
    """

    def __init__(self, model: PeftModel, processor, prompt_names, templates, embedding: str | None, text_adapted: bool):
        super().__init__()
        self.model = model
        self.embedding = embedding
        self.num_classes = len(prompt_names)
        class_embeds, input_ids, attention_mask = None, None, None
        if text_adapted:
            prompts = processor(text=fill_templates(prompt_names, templates), return_tensors="pt")
            input_ids, attention_mask = prompts["input_ids"], prompts["attention_mask"]
        else:
            # A clone: the classifier's inference-mode tensors cannot enter a graph that autograd records.
            class_embeds = ZeroShotClassifier(model, processor).label_embeddings(prompt_names, templates).clone()
            adapters_train_mode(model)
        # Buffers, so that they follow the module to the training device; derived, so not saved.
        self.register_buffer("class_embeds", class_embeds, persistent=False)
        self.register_buffer("input_ids", input_ids, persistent=False)
        self.register_buffer("attention_mask", attention_mask, persistent=False)

    def class_embeddings(self) -> torch.Tensor:
        if self.class_embeds is not None:
            return self.class_embeds
        text_embeds = self.model.get_text_features(
            input_ids=self.input_ids, attention_mask=self.attention_mask
        ).pooler_output
        return ensemble_prompt_embeddings(text_embeds, self.num_classes)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        image_embeds = F.normalize(
            self.model.get_image_features(pixel_values, embedding=self.embedding).pooler_output, dim=-1
        )
        logit_scale = self.model.get_base_model().logit_scale
        return logit_scale.exp() * image_embeds @ self.class_embeddings().t().to(image_embeds.dtype)


def held_out_metrics(peft_model, processor, loader, task: LabelledTask, embedding, accelerator) -> dict:
    """Zero-shot classification metrics of the model as it is (adapters on, or off inside `disable_adapter`)."""
    classifier = ZeroShotClassifier(peft_model, processor, embedding=embedding)

    def scored(batch) -> dict[str, torch.Tensor]:
        image_embeds = classifier.image_embeddings(batch["pixel_values"])
        logits = classifier.embedding_logits(image_embeds, task.prompt_names, task.templates)
        return {"scores": logits.to(accelerator.device), "labels": batch["labels"]}

    outputs = embed_batches(loader, accelerator, scored, gather=True)
    leave_inference_mode(accelerator, peft_model)
    adapters_train_mode(peft_model)
    labels = outputs["labels"]
    return {**classification_metrics(outputs["scores"], labels, len(task.class_names)), "n_images": len(labels)}


@torch.no_grad()
def refit_aligner(peft_model: PeftModel, loader, accelerator, ridge: float = 0.0) -> dict:
    """Stage 3 again on the adapted backbone: the closed-form least-squares aligner from its features of the
    training images to their CLIP image embeddings, written into the aligner the adapter carries. `loader` holds
    this process's shard (`process_shard_loader`), so that the statistics of all processes sum to one pass.

    Returns the fit's MSE and R² on those images.
    """
    model = peft_model.get_base_model()
    stats = streamed_statistics(model, None, loader, accelerator, None, "aligner re-fit", TARGET_IMAGE)
    weights = fit_closed_form(stats, ridge)
    aligner = aligner_copy(peft_model)
    aligner.weight.copy_(weights.weight)
    aligner.bias.copy_(weights.bias)
    return stats.metrics(weights)


# ------------------------------------------------------------------------------------------------------------------
# Script
# ------------------------------------------------------------------------------------------------------------------


def run(args, resume_hint: str = RESUME_HINT) -> Path:
    """Runs the LoRA adaptation with parsed (and checked) `args`; `resume_hint` says how to continue a stopped run
    in the caller's context."""
    base_reference = base_model_reference(args.model, args.base_model_id, publishing=bool(args.push_to_hub))
    return run_resumable(args, RUN, resume_hint, partial(adapt, base_reference=base_reference))


def adapt(args, accelerator, checkpoints: CheckpointManager, base_reference: str) -> Path:
    with whole_construction(accelerator):
        base_model, processor = load_model_and_processor(args.model)
    base_model = prepare_for_sharding(accelerator, base_model)
    embedding = objective_embedding(args.towers)
    embedding_name = embedding or base_model.config.image_embedding
    peft_model = build_lora_model(
        base_model,
        args.towers,
        args.target_modules,
        args.lora_rank,
        args.lora_alpha,
        args.lora_dropout,
        train_aligner=args.train_aligner,
        save_aligner=args.refit_aligner,
    )
    trainable, total = trainable_parameters(peft_model)
    accelerator.print(
        f"LoRA r={args.lora_rank} on {len(peft_model.targeted_module_names)} modules of the {'+'.join(args.towers)} "
        f"tower: trainable parameters {trainable:,} of {total:,} ({100 * trainable / total:.3f}%)"
    )
    adapters_train_mode(peft_model)

    decode_stats = DecodeStats()
    spec = task_spec(args)
    task = load_labelled_task(spec, args.objective == "classification", args.shots, args.seed) if spec else None
    if args.objective == "classification":
        train_data, collate = task.train, LabelledImageCollator(processor, decode_stats)
        train_rows, train_collate = train_data, collate
    else:
        train_data = load_image_text_dataset(
            args.train_data,
            split=args.train_split or "train",
            image_column=args.image_column,
            caption_column=args.caption_column,
        )
        # Training draws caption variants from the seed, the epoch and each pair's index; the re-fit needs images only.
        collate = ImageTextCollator(processor, decode_stats)
        train_rows, train_collate = IndexedRows(train_data), ImageTextCollator(processor, decode_stats, seed=args.seed)
    # The contrastive loss on the global batch needs equal batches on every process; cross-entropy does not, and a
    # k-shot set may be smaller than one batch.
    train_loader = DataLoader(
        train_rows,
        batch_size=args.batch_size,
        shuffle=True,
        collate_fn=train_collate,
        drop_last=args.objective == "contrastive",
        num_workers=args.num_workers,
        generator=dataloader_generator(args.seed),
    )
    if len(train_loader) == 0:
        raise ValueError(
            f"{args.train_data}: {len(train_data)} training pairs, fewer than one batch of {args.batch_size}"
        )
    if args.objective == "classification":
        objective = PromptClassifier(
            peft_model, processor, task.prompt_names, task.templates, embedding, "text" in args.towers
        )
    else:
        objective, loss_fn = peft_model, create_loss(base_model.config.contrastive_loss)
    optimizer = adamw(
        param_groups_without_decay(objective, args.weight_decay), accelerator.device, lr=args.learning_rate
    )
    objective, optimizer, train_loader = accelerator.prepare(objective, optimizer, train_loader)
    register_read_tables(accelerator, objective)
    checkpoint_trainable_weights_only(accelerator)
    held_out_loader = refit_loader = None
    if task is not None:
        held_out_loader = accelerator.prepare(
            DataLoader(
                task.held_out,
                batch_size=args.batch_size,
                num_workers=args.num_workers,
                collate_fn=LabelledImageCollator(processor, decode_stats),
            )
        )
    if args.refit_aligner:
        refit_loader = process_shard_loader(train_data, accelerator, args.batch_size, collate, args.num_workers)

    def compute_loss(batch) -> torch.Tensor:
        if args.objective == "classification":
            labels = batch["labels"]
            share = share_of_global_batch(len(labels), device=labels.device)
            return F.cross_entropy(objective(batch["pixel_values"]), labels) * share
        return contrastive_forward(objective, batch, loss_fn, embedding)

    _, max_steps = run_steps(args, train_loader)
    lr_schedule = cosine_schedule(args.learning_rate, args.min_learning_rate, max_steps, args.warmup_steps)
    position = checkpoints.start(
        args.resume, run_options(args, accelerator, neutral=PUBLISHING_OPTIONS), args.allow_changed_config
    )
    init_run_trackers(accelerator, RUN, args, position.step, checkpoints.resumed_from)
    accelerator.print(
        f"LoRA ({args.objective}, {embedding_name} image embedding): "
        f"{len(train_data)} training examples, {max_steps} optimizer steps of {args.batch_size} x "
        f"{accelerator.num_processes} process(es) x {args.gradient_accumulation_steps} accumulation on {accelerator.device}, "
        f"peak learning rate {args.learning_rate:g} after {args.warmup_steps} warm-up steps"
    )

    def step_logs(loss, step: int) -> dict:
        logs = {"loss": loss.item()}
        if task is not None and args.eval_every and (step + 1) % args.eval_every == 0:
            with gathered(accelerator, objective):
                metrics = held_out_metrics(peft_model, processor, held_out_loader, task, embedding, accelerator)
            logs.update({f"eval/{k}": v for k, v in metrics.items() if v is not None})
        return logs

    train_loop(
        accelerator,
        objective,
        optimizer,
        train_loader,
        position=position,
        checkpoints=checkpoints,
        max_steps=max_steps,
        lr_schedule=lr_schedule,
        max_grad_norm=args.max_grad_norm,
        checkpoint_every=args.checkpoint_every,
        data=args.train_data or spec.path,
        description="LoRA",
        compute_loss=compute_loss,
        step_logs=step_logs,
    )

    results = {
        "objective": args.objective,
        "towers": list(args.towers),
        "embedding": embedding,
        "target_modules": peft_model.peft_config["default"].target_modules,
        "lora_rank": args.lora_rank,
        "trainable_parameters": trainable,
        "total_parameters": total,
        "trainable_share": trainable / total,
        "n_train": len(train_data),
        "shots": args.shots,
        "steps": position.step,
    }
    with gathered(accelerator, objective):
        if task is not None:
            with peft_model.disable_adapter():
                results["zero_shot"] = held_out_metrics(
                    peft_model, processor, held_out_loader, task, embedding, accelerator
                )
            results["adapted"] = held_out_metrics(peft_model, processor, held_out_loader, task, embedding, accelerator)
        if args.refit_aligner:
            results["aligner_refit"] = refit_aligner(peft_model, refit_loader, accelerator, args.aligner_ridge)
            refit = {name: value.detach().clone() for name, value in aligner_copy(peft_model).named_parameters()}
            accelerator.print(
                "aligner re-fit on the adapted backbone: "
                + " ".join(f"{k}={v:.4f}" for k, v in results["aligner_refit"].items())
            )
            if task is not None:
                results["adapted_before_refit"] = results["adapted"]
                results["adapted"] = held_out_metrics(
                    peft_model, processor, held_out_loader, task, embedding, accelerator
                )
    if args.refit_aligner and is_fsdp(accelerator):
        # FSDP2's `unshard` gathers the root's parameters into buffers of their own: the re-fit wrote the aligner
        # there (the evaluation above read it), and the reshard dropped it, leaving the shards, which the adapter
        # saves, at the old aligner. The re-fit goes into the shards as well.
        write_into_shards(aligner_copy(peft_model), refit)
    if task is not None:
        final = {f"eval/{k}": v for k, v in results["adapted"].items() if v is not None}
        final |= {f"eval/zero_shot_{k}": v for k, v in results["zero_shot"].items() if v is not None}
        accelerator.log(final, step=position.step)
        accelerator.print(
            f"held-out top-1 on {results['adapted']['n_images']} images: zero-shot {results['zero_shot']['top1']:.4f} -> "
            f"adapted {results['adapted']['top1']:.4f}"
        )
    report_decode_stats(accelerator, decode_stats)

    output_dir = Path(args.output_dir)
    peft_model.peft_config["default"].base_model_name_or_path = base_reference
    # The adapter never resizes the vocabulary, so PEFT need not look the base's config up on the Hub to check it.
    # Under FSDP the adapter weights are shards: PEFT picks them out of the gathered full state dict.
    adapter_weights = submodule_state_dict(
        full_state_dict(accelerator, objective), accelerator.unwrap_model(objective), peft_model
    )
    adapter = SimpleNamespace(
        save_pretrained=partial(
            peft_model.save_pretrained,
            save_embedding_layers=False,
            **({} if adapter_weights is None else {"state_dict": adapter_weights}),
        )
    )
    # With the processor, the adapter folder is a model folder of its own (`agriclip predict --model <adapter>`).
    adapter_dir = export_atomically(accelerator, output_dir / "adapter", adapter, processor)
    accelerator.print(f"adapter written to {adapter_dir}")
    if args.push_to_hub and accelerator.is_main_process:
        # The folder just written and checked is what gets published.
        api = HfApi()
        api.create_repo(args.push_to_hub, exist_ok=True)
        api.upload_folder(
            repo_id=args.push_to_hub, folder_path=str(adapter_dir), commit_message="Upload AgriCLIP LoRA adapter"
        )
        accelerator.print(f"adapter published to {args.push_to_hub} (base model {base_reference})")
    if args.merge:
        merged_dir = export_atomically(accelerator, output_dir / "merged", peft_model.merge_and_unload(), processor)
        accelerator.print(f"merged AgriCLIP model written to {merged_dir}")
    if accelerator.is_main_process:
        write_json_atomically(output_dir / RESULTS, results)
    accelerator.end_training()
    return output_dir
