"""Model cards for AgriCLIP checkpoints and dataset cards for ALive-style datasets (huggingface_hub `ModelCard`).

A model card is built from what a run leaves behind: the checkpoint's `config.json` and weights (what the model is),
the training stages' saved flags and last logged metrics (how it was made), the evaluation suite's `results.json`
(the evaluation tables and the `model-index` metadata), and a description of the training data.

`training_info`, the part that does not live in the checkpoint, is a plain dictionary; every key is optional::

    {
      "base_model": "openai/clip-vit-base-patch16",   # Hub id the run started from (card metadata `base_model`)
      "initialisation": {"model": "tiny", "random": True,   # the first stage's --model; a preset or a JSON config
                                                            # file is a start from random weights
                         "backbone": {"model": "facebook/dinov2-small", "random": False}},   # only when stage 2
                                                            # replaced the backbone (--backbone, --random-init)
      "stages": {                                     # run name -> the flags it ran with (`<run>/logs/<name>/config.json`)
        "stage1_contrastive": {"learning_rate": 5e-05, "batch_size": 256, ...},
        "stage2_dino": {...}, "stage3_align": {...}},
      "final_metrics": {"stage1_contrastive": {"train/loss": 1.23, ...}, ...},   # the last row of metrics.jsonl
      "data": {                                       # describe_caption_data(folder) fills it from a caption folder
        "name": "ALive", "hub_id": "org/alive",       # hub_id becomes card metadata `datasets`
        "num_pairs": 600000, "splits": {"train": 570000, "validation": 30000},
        "sources": ["PlantVillage", {"name": "fish-species", "pairs": 1200, "classes": 12}],
        "caption_strategy": "How the captions were made (replaces the default description).",
        "synthetic": False},                          # True: procedurally drawn images (training.embedded)
      "baselines": {                                  # rows of the evaluation results that are comparisons, not this
        "clip-control (clip)": "the equal-compute CLIP control: ..."}   # checkpoint: each said under the table
    }

The card's first paragraph is followed by a note that says what the evaluation numbers mean, from `initialisation`
and `data`: a start from random weights or a synthetic dataset makes them a demonstration of the pipeline, not the
paper's result. `read_training_info(run_dir)` fills `stages`, `final_metrics` and `initialisation` from a run folder,
`describe_caption_data(folder)` fills `data` from the image-caption folder the run trained on. Command line::

    agriclip card runs/final --eval-results reports/eval/results.json --run-dir runs \\
        --train-data data/alive --training-info info.json --repo-id org/agriclip
    agriclip card data/alive --dataset --repo-id org/alive
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

from huggingface_hub import DatasetCard, DatasetCardData, EvalResult, ModelCard, ModelCardData

from agriclip.atomic import atomic_path
from agriclip.errors import CLIError, ExitCode
from agriclip.files import parameter_counts
from evaluation.metrics import HEADLINE_KEYS, METRICS
from evaluation.report import (
    SELECTION_NOTE,
    ZERO_SHOT_METRICS,
    mean_summary,
    metric_heading,
    render_markdown_table,
    selection_heading,
    selection_table,
    table_legend,
)
from modeling_agriclip import AgriCLIPConfig
from modeling_agriclip.convert import names_random_weights
from modeling_agriclip.lora_targets import default_target_modules


MODEL_TEMPLATE = Path(__file__).with_name("template.md")
DATASET_TEMPLATE = Path(__file__).with_name("dataset_template.md")
CARD_NAME = "README.md"
LICENSE = "apache-2.0"
TASK = "zero-shot-image-classification"
# Code examples name the Hub repo; without one they show this, never a local path.
REPO_PLACEHOLDER = "<org>/<name>"

CITATION = """@inproceedings{nawaz2025agriclip,
  title     = {{AgriCLIP}: Adapting {CLIP} for Agriculture and Livestock via Domain-Specialized Cross-Model Alignment},
  author    = {Nawaz, Umair and Awais, Muhammad and Gani, Hanan and Naseer, Muzammal and Khan, Fahad and
               Khan, Salman and Anwer, Rao Muhammad},
  booktitle = {Proceedings of the 31st International Conference on Computational Linguistics (COLING 2025)},
  pages     = {9630--9639},
  year      = {2025},
  eprint    = {2410.01407},
  archivePrefix = {arXiv}
}"""

STAGE_TITLES = {
    "stage1_contrastive": "Stage 1: contrastive image-text training",
    "stage2_dino": "Stage 2: DINO self-distillation of the backbone",
    "stage3_align": "Stage 3: cross-model alignment",
}
# Flags that describe the machine a run used, not the recipe: left out of the card.
MACHINE_FLAGS = frozenset(
    {"output_dir", "resume", "config", "log_with", "num_workers", "checkpoint_every", "keep_checkpoints"}
)
# Flag names that may hold credentials: never written into a card, whatever their value.
SECRET_WORDS = ("token", "secret", "password")

# Zero-shot metrics of the evaluation JSON -> Hub metric id and its arguments in `model-index`, from the one table of
# metrics (`evaluation.metrics.METRICS`).
METRIC_TYPES = {
    key: (metric.hub_type, None if metric.hub_args is None else dict(metric.hub_args))
    for key, metric in METRICS.items()
}

# The image tower(s) behind each image embedding, which LoRA adapts for a farm's own photos (training.lora_finetune).
LORA_TOWERS = {"aligned": ["backbone"], "clip": ["image"], "fused": ["image", "backbone"]}

DEFAULT_CAPTION_STRATEGY = (
    "Captions follow the AgriCLIP prompt generation strategy: each source dataset's metadata (domain, subject, "
    "setting, camera) and a visual description of each class fill caption templates, and paraphrased variants add "
    "diversity, so every image is paired with several captions that name its class and describe what it looks like."
)


# ---------------------------------------------------------------------------------------------------------------
# Reading what a run left behind
# ---------------------------------------------------------------------------------------------------------------


def read_training_info(run_dir: str | Path) -> dict:
    """`{"stages": ..., "final_metrics": ..., "initialisation": ...}` from every `logs/<run name>/config.json` (and
    `metrics.jsonl`) under `run_dir`, in run-name order (stage1_..., stage2_..., stage3_...); `initialisation` (see
    `describe_initialisation`) only when the first stage recorded its `model`."""
    run_dir = Path(run_dir)
    found = {}
    for config_file in sorted(run_dir.rglob("logs/*/config.json")):
        name = config_file.parent.name
        if name in found:
            raise ValueError(f"two runs named {name!r} under {run_dir}: {found[name]} and {config_file}")
        found[name] = config_file
    if not found:
        raise FileNotFoundError(f"no training run logs (logs/<run>/config.json) under {run_dir}")
    stages, final_metrics = {}, {}
    for name in sorted(found):
        stages[name] = _read_json(found[name])
        metrics_file = found[name].with_name("metrics.jsonl")
        if metrics_file.is_file():
            rows = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
            last = {key: value for row in rows for key, value in row.items() if key != "step"}
            if last:
                final_metrics[name] = last
    initialisation = describe_initialisation(stages)
    info = {"stages": stages, "final_metrics": final_metrics}
    return {**info, "initialisation": initialisation} if initialisation else info


def describe_initialisation(stages: Mapping[str, Mapping]) -> dict | None:
    """Where a run's weights started, from its stages' flags in run order (None when the first stage recorded no
    `model`): the first stage's `model`, random when it is a preset or a JSON config file (as `training.models`
    loads them), and the backbone's own start when stage 2 replaced it (`backbone` weights, or `random_init` after
    a start that was not random)."""
    model = next(iter(stages.values()), {}).get("model")
    if model is None:
        return None
    model = str(model)
    initialisation = {"model": model, "random": names_random_weights(model)}
    dino = stages.get("stage2_dino") or {}
    if dino.get("backbone"):
        initialisation["backbone"] = {"model": str(dino["backbone"]), "random": False}
    elif dino.get("random_init") and not initialisation["random"]:
        initialisation["backbone"] = {"model": None, "random": True}
    return initialisation


def load_eval_results(eval_results: Mapping | str | Path) -> dict:
    """The evaluation suite's results (schema in `evaluation.suite`), given as the dictionary or its JSON file."""
    results = dict(eval_results) if isinstance(eval_results, Mapping) else _read_json(eval_results)
    if not isinstance(results.get("datasets"), Mapping) or not isinstance(results.get("mean"), Mapping):
        where = "the evaluation results" if isinstance(eval_results, Mapping) else str(eval_results)
        raise ValueError(f"{where} lacks the 'datasets' and 'mean' sections that evaluation.suite writes")
    return results


def select_eval_model(results: Mapping, config: AgriCLIPConfig, checkpoint_dir: str | Path) -> str:
    """The row of the evaluation results that is this checkpoint: an AgriCLIP model evaluated with the checkpoint's
    own image embedding, preferring one loaded from `checkpoint_dir` when several match."""
    models = results.get("models") or {}
    candidates = [
        name
        for name, info in models.items()
        if info.get("model_type") == config.model_type and info.get("embedding") == config.image_embedding
    ]
    here = Path(checkpoint_dir).resolve()
    from_here = [
        name for name in candidates if models[name].get("path") and Path(models[name]["path"]).resolve() == here
    ]
    if len(from_here) == 1 or len(candidates) == 1:
        return (from_here or candidates)[0]
    raise ValueError(
        f"cannot tell which evaluated model is {checkpoint_dir} (image embedding {config.image_embedding!r}): "
        f"candidates {candidates or sorted(results['mean'])}; pass eval_model=<name>"
    )


def model_index_results(results: Mapping, model: str) -> list[EvalResult]:
    """One `EvalResult` per dataset and zero-shot metric of `model`, values as fractions (as in the JSON)."""
    if not any(model in per_model for per_model in results["datasets"].values()):
        raise ValueError(f"model {model!r} is not in the evaluation results; models: {sorted(results['mean'])}")
    info = results.get("dataset_info", {})
    entries = []
    for dataset, per_model in results["datasets"].items():
        record = per_model.get(model)
        if record is None:
            continue
        for key, metric_name in ZERO_SHOT_METRICS.items():
            if record.get(key) is None:
                continue
            metric_type, metric_args = METRIC_TYPES[key]
            entries.append(
                EvalResult(
                    task_type=TASK,
                    task_name="Zero-shot image classification",
                    dataset_type=dataset,
                    dataset_name=info.get(dataset, {}).get("display_name", dataset),
                    dataset_split=info.get(dataset, {}).get("split"),
                    metric_type=metric_type,
                    metric_name=metric_name,
                    metric_args=metric_args,
                    metric_value=record[key],
                )
            )
    return entries


def baseline_notes(results: Mapping, baselines: Mapping[str, str]) -> list[str]:
    """One note per comparison row (`training_info["baselines"]`: name -> what it is), with its mean, so that the
    table says which row is a baseline and what it stands for; a baseline missing from the results is an error, not
    a comparison left out silently."""
    missing = sorted(set(baselines) - set(results["mean"]))
    if missing:
        raise ValueError(f"baseline(s) {missing} not in the evaluation results; models: {sorted(results['mean'])}")
    return [f"**{name}** is {what}. {mean_summary(results, name)}".strip() for name, what in baselines.items()]


# ---------------------------------------------------------------------------------------------------------------
# Model card
# ---------------------------------------------------------------------------------------------------------------


# What stage 3 fitted the aligner to, by `config.alignment_objective`: the card's account of the third stage.
ALIGNMENT_DESCRIPTIONS = {
    "image-mse": "by minimising the mean squared error to the CLIP image embedding of each image (the paper's objective)",
    "text-mse": "by least squares onto the CLIP text embeddings of each image's captions (their normalised mean)",
    "contrastive": (
        "by image-to-text InfoNCE against the CLIP text embeddings of each image's captions, started from the "
        "least-squares solution onto them"
    ),
}


def build_model_card(
    checkpoint_dir: str | Path,
    eval_results: Mapping | str | Path | None = None,
    training_info: Mapping | None = None,
    repo_id: str | None = None,
    eval_model: str | None = None,
    model_name: str | None = None,
) -> ModelCard:
    """The model card of the AgriCLIP checkpoint in `checkpoint_dir`.

    Args:
        checkpoint_dir: a saved AgriCLIP folder (`config.json` and safetensors weights).
        eval_results: the evaluation suite's results (dictionary or `results.json`); gives the evaluation tables and
            the `model-index` metadata.
        training_info: stages, final metrics, data and base model (schema in the module docstring).
        repo_id: the Hub repo the card is for; used in the model name and the code examples (default: the folder
            name, and a placeholder in the examples).
        eval_model: the name of this checkpoint in `eval_results` (default: found from its image embedding).
        model_name: the name in the card's title and model-index (default: the name part of `repo_id`, else the
            folder's name; a builder that writes the card into a staging folder passes the final one's).
    """
    checkpoint_dir = Path(checkpoint_dir)
    config = AgriCLIPConfig.from_pretrained(checkpoint_dir, trust_remote_code=False)
    training_info = dict(training_info or {})
    data = dict(training_info.get("data") or {})
    model_name = model_name or (repo_id or checkpoint_dir.resolve().name).split("/")[-1]

    eval_entries, eval_tables, eval_notes = None, [], []
    if eval_results is not None:
        results = load_eval_results(eval_results)
        eval_model = eval_model or select_eval_model(results, config, checkpoint_dir)
        eval_entries = model_index_results(results, eval_model)
        eval_tables = [(metric_heading(key), render_markdown_table(results, key)) for key in HEADLINE_KEYS]
        if results.get("selection"):
            eval_tables.append((selection_heading(results), f"{SELECTION_NOTE}\n\n{selection_table(results)}"))
        eval_notes = [
            note
            for note in (
                mean_summary(results, eval_model),
                *baseline_notes(results, training_info.get("baselines") or {}),
                table_legend(results),
            )
            if note
        ]

    card_data = ModelCardData(
        model_name=model_name,
        language="en",
        license=LICENSE,
        library_name="transformers",
        pipeline_tag=TASK,
        tags=["agriculture", "livestock", "fisheries", "clip", "dino", "agriclip", TASK, "custom_code"],
        base_model=training_info.get("base_model"),
        datasets=[data["hub_id"]] if data.get("hub_id") else None,
        metrics=sorted({METRIC_TYPES[key][0] for key in ZERO_SHOT_METRICS}) if eval_entries else None,
        eval_results=eval_entries or None,
    )
    lora_towers = LORA_TOWERS[config.image_embedding]
    return ModelCard.from_template(
        card_data,
        template_path=str(MODEL_TEMPLATE),
        model_name=model_name,
        repo=repo_id or REPO_PLACEHOLDER,
        architecture=_architecture(config, checkpoint_dir),
        image_embedding=config.image_embedding,
        alignment=ALIGNMENT_DESCRIPTIONS[config.alignment_objective],
        alignment_objective=config.alignment_objective,
        fusion_weight=config.fusion_weight,
        data=data,
        initialisation=training_info.get("initialisation") or {},
        numbers_note=numbers_note(training_info),
        sources_table=_sources_table(data.get("sources") or []),
        caption_strategy=data.get("caption_strategy") or DEFAULT_CAPTION_STRATEGY,
        stages=_stages(training_info.get("stages") or {}, training_info.get("final_metrics") or {}),
        eval_tables=eval_tables,
        eval_model=eval_model,
        eval_notes=eval_notes,
        lora_towers=lora_towers,
        lora_target_modules=default_target_modules(config, lora_towers),
        citation=CITATION,
    )


def write_model_card(
    checkpoint_dir: str | Path,
    eval_results: Mapping | str | Path | None = None,
    training_info: Mapping | None = None,
    repo_id: str | None = None,
    eval_model: str | None = None,
    model_name: str | None = None,
) -> Path:
    """Builds the model card (see `build_model_card`) and saves it as `checkpoint_dir/README.md`; returns its path."""
    card = build_model_card(checkpoint_dir, eval_results, training_info, repo_id, eval_model, model_name)
    path = Path(checkpoint_dir) / CARD_NAME
    _save_card(card, path)
    return path


def numbers_note(training_info: Mapping) -> str | None:
    """What the evaluation numbers mean, from where the weights started (`initialisation`) and what the training data
    was (`data`), never assumed: None when neither is recorded. A start from random weights or a synthetic dataset
    makes the accuracies a demonstration of the pipeline, not the paper's result."""
    initialisation = training_info.get("initialisation") or {}
    data = training_info.get("data") or {}
    sentences = []
    if initialisation:
        sentences.append(_start_sentence(initialisation, training_info.get("base_model")))
    if data.get("synthetic"):
        name = f"**{data['name']}**, " if data.get("name") else ""
        sentences.append(
            f"It was trained on {name}a synthetic dataset of procedurally drawn images (`training.embedded`), not on "
            "photos."
        )
    elif data.get("name"):
        sentences.append(f"It was trained on **{data['name']}**.")
    reasons = [
        reason
        for reason, applies in (
            ("random initial weights", initialisation.get("random")),
            ("synthetic training images", data.get("synthetic")),
        )
        if applies
    ]
    if reasons:
        sentences.append(
            f"With {' and '.join(reasons)}, its accuracies demonstrate that the pipeline works, not the paper's result"
            + (": they say nothing about photos of real crops, fish or livestock." if data.get("synthetic") else ".")
        )
    return " ".join(sentences) or None


def _start_sentence(initialisation: Mapping, base_model: str | None) -> str:
    """Where the towers started: random weights (naming the preset or config file) or the weights of a model."""
    model = initialisation["model"]
    if initialisation.get("random"):
        what = f"the model config `{model}`" if model.endswith(".json") else f"the `{model}` preset"
        start = f"The towers of this checkpoint started from random weights ({what}), not from pretrained CLIP or DINO models"
    else:
        start = f"The towers of this checkpoint started from the weights of `{base_model or model}`"
    backbone = initialisation.get("backbone")
    if backbone and backbone.get("random"):
        start += ", except the backbone, which stage 2 re-initialised at random"
    elif backbone:
        start += f"; the backbone from those of `{backbone['model']}` (stage 2)"
    return start + "."


def _architecture(config: AgriCLIPConfig, checkpoint_dir: Path) -> list[tuple[str, str]]:
    counts = parameter_counts(checkpoint_dir)
    text, vision, backbone = config.text_config, config.vision_config, config.dino_config
    if hasattr(backbone, "hidden_sizes"):
        backbone_shape = f"stages of depth {list(backbone.depths)}, widths {list(backbone.hidden_sizes)}"
    else:
        backbone_shape = (
            f"{backbone.num_hidden_layers} layers, width {backbone.hidden_size}, patch {backbone.patch_size}"
        )

    def millions(*parts: str) -> str:
        return f"{sum(counts[part] for part in parts) / 1e6:.2f} M parameters"

    return [
        (
            "Text encoder (CLIP)",
            f"{text.num_hidden_layers} layers, width {text.hidden_size}; {millions('text_model', 'text_projection')}",
        ),
        (
            "CLIP image encoder (stage 1)",
            f"ViT, {vision.num_hidden_layers} layers, width {vision.hidden_size}, patch {vision.patch_size}, "
            f"{vision.image_size} px; {millions('vision_model', 'visual_projection')}",
        ),
        (f"Backbone (stage 2, `{backbone.model_type}`)", f"{backbone_shape}; {millions('dino_model')}"),
        ("Aligner (stage 3)", f"linear {config.backbone_hidden_size} → {config.projection_dim}, with bias"),
        (
            "Embedding space",
            f"{config.projection_dim} dimensions; {sum(counts.values()) / 1e6:.2f} M parameters in all",
        ),
    ]


def _stages(stages: Mapping, final_metrics: Mapping) -> list[dict]:
    return [
        {
            "title": STAGE_TITLES.get(name, name),
            "settings": [
                (key, _format_value(value))
                for key, value in sorted(flags.items())
                if value is not None and key not in MACHINE_FLAGS and not _is_secret_name(key)
            ],
            "final_metrics": [
                (key, _format_value(value))
                for key, value in sorted(final_metrics.get(name, {}).items())
                if not _is_secret_name(key)
            ],
        }
        for name, flags in stages.items()
    ]


def _is_secret_name(key: str) -> bool:
    return any(word in key.lower() for word in SECRET_WORDS)


def _format_value(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(_format_value(item) for item in value)
    return str(value).replace("|", "\\|")


def _sources_table(sources: list) -> str:
    """A markdown table of the training data sources: names only, or every field the source dictionaries have."""
    rows = [source if isinstance(source, Mapping) else {"name": source} for source in sources]
    if not rows:
        return ""
    columns = ["name"] + sorted({key for row in rows for key in row} - {"name"})
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join(" --- " for _ in columns) + "|"]
    lines += ["| " + " | ".join(_format_value(row.get(column, "")) for column in columns) + " |" for row in rows]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# Dataset card
# ---------------------------------------------------------------------------------------------------------------


def find_caption_splits(dataset_dir: str | Path) -> dict[str, Path]:
    """Split name -> folder, for every `<split>/metadata.jsonl` under an ALive-style dataset folder (the
    `training.alive` output keeps them in `imagefolder/`, the embedded ALive-mini in `pretrain/`)."""
    dataset_dir = Path(dataset_dir)
    splits = {}
    for metadata in sorted(dataset_dir.rglob("metadata.jsonl")):
        split = metadata.parent.name
        if split in splits:
            raise ValueError(f"{dataset_dir}: two folders hold split {split!r}: {splits[split]} and {metadata.parent}")
        splits[split] = metadata.parent
    if not splits:
        raise ValueError(f"{dataset_dir} holds no image-caption split (a <split>/metadata.jsonl)")
    return splits


def describe_caption_data(dataset_dir: str | Path, name: str | None = None) -> dict:
    """`training_info["data"]` for an ALive-style image-caption folder, read from its splits' `metadata.jsonl`:
    `name`, `num_pairs`, pairs per split, `split_folders` (relative paths) and per source its pairs, classes and
    first caption."""
    dataset_dir = Path(dataset_dir)
    splits, folders, sources = {}, {}, {}
    for split, folder in find_caption_splits(dataset_dir).items():
        splits[split] = 0
        folders[split] = folder.relative_to(dataset_dir).as_posix()
        for line in (folder / "metadata.jsonl").read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            row = json.loads(line)
            splits[split] += 1
            source = sources.setdefault(
                row.get("source", "-"), {"pairs": 0, "labels": set(), "example": row.get("caption", "")}
            )
            source["pairs"] += 1
            source["labels"].add(row.get("label"))
    return {
        "name": name or dataset_dir.resolve().name,
        "num_pairs": sum(splits.values()),
        "splits": splits,
        "split_folders": folders,
        "sources": [
            {"name": key, "pairs": value["pairs"], "classes": len(value["labels"]), "example caption": value["example"]}
            for key, value in sorted(sources.items())
        ],
    }


def build_dataset_card(
    dataset_dir: str | Path,
    repo_id: str | None = None,
    pretty_name: str | None = None,
    description: str | None = None,
    license: str = "other",
) -> DatasetCard:
    """The dataset card of an ALive-style image-caption dataset folder.

    Splits, per-source counts, classes and example captions are read from the splits' `metadata.jsonl` files (and the
    build notes from `build_report.json` when `training.alive` wrote one). The card's `configs` metadata points
    `load_dataset(repo_id)` at the split folders, so the other formats a build may hold (WebDataset shards, a
    `save_to_disk` copy) can sit beside them in the repo.

    Args:
        dataset_dir: the dataset folder.
        repo_id: the Hub dataset repo the card is for; used in the name and the code example.
        pretty_name: the title (default: the repo or folder name).
        description: a first paragraph saying what the dataset holds.
        license: Hub license id; the default "other" says that the sources keep their own licenses.
    """
    dataset_dir = Path(dataset_dir)
    summary = describe_caption_data(dataset_dir)
    total = summary["num_pairs"]
    name = pretty_name or (repo_id or dataset_dir.resolve().name).split("/")[-1]
    report_file = dataset_dir / "build_report.json"
    build_notes = None
    if report_file.is_file():
        report = _read_json(report_file)
        build_notes = f"{report.get('decode_summary', '')} {len(report.get('duplicates', []))} exact duplicate image(s) dropped.".strip()
    card_data = DatasetCardData(
        pretty_name=name,
        language="en",
        license=license,
        task_categories=[TASK, "image-to-text"],
        size_categories=_size_category(total),
        tags=["agriculture", "livestock", "fisheries", "image-caption", "agriclip"],
        configs=[
            {
                "config_name": "default",
                "data_files": [
                    {"split": split, "path": f"{folder}/**"} for split, folder in summary["split_folders"].items()
                ],
            }
        ],
    )
    license_text = (
        "Each source dataset keeps its own license; check them before use. The captions are released with the "
        "sources' terms."
        if license == "other"
        else f"{license}, within the terms of each source dataset."
    )
    return DatasetCard.from_template(
        card_data,
        template_path=str(DATASET_TEMPLATE),
        pretty_name=name,
        description=description or f"{name}: image-caption pairs for agriculture, livestock and fisheries.",
        total=total,
        splits=[
            {"name": split, "rows": rows, "folder": summary["split_folders"][split]}
            for split, rows in summary["splits"].items()
        ],
        sources=summary["sources"],
        build_notes=build_notes,
        repo=repo_id or REPO_PLACEHOLDER,
        license_text=license_text,
        citation=CITATION,
    )


def write_dataset_card(dataset_dir: str | Path, **kwargs) -> Path:
    """Builds the dataset card (see `build_dataset_card`) and saves it as `dataset_dir/README.md`; returns its path."""
    path = Path(dataset_dir) / CARD_NAME
    _save_card(build_dataset_card(dataset_dir, **kwargs), path)
    return path


def _save_card(card: ModelCard | DatasetCard, path: Path) -> None:
    """Saves `card` whole or not at all: a full disk or a crash leaves the previous README as it was."""
    with atomic_path(path) as staging:
        card.save(staging)


def _size_category(count: int) -> str:
    """The Hub's size category label (`n<1K`, `1K<n<10K`, ...)."""
    for exponent, label in ((3, "n<1K"), (4, "1K<n<10K"), (5, "10K<n<100K"), (6, "100K<n<1M"), (7, "1M<n<10M")):
        if count < 10**exponent:
            return label
    return "n>10M"


def _read_json(path: str | Path):
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} does not exist") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from None


def run(args) -> int:
    """`agriclip card` (arguments parsed by `agriclip.cli`)."""
    try:
        if args.dataset:
            path = write_dataset_card(
                args.folder,
                repo_id=args.repo_id,
                pretty_name=args.pretty_name,
                description=args.description,
                license=args.license,
            )
        else:
            training_info = _read_json(args.training_info) if args.training_info else {}
            if args.run_dir:
                training_info = {**read_training_info(args.run_dir), **training_info}
            if args.train_data:
                training_info["data"] = {**describe_caption_data(args.train_data), **training_info.get("data", {})}
            path = write_model_card(args.folder, args.eval_results, training_info, args.repo_id, args.eval_model)
    except (OSError, ValueError) as error:
        raise CLIError(ExitCode.INPUT, str(error)) from error
    print(f"card written to {path}")
    return ExitCode.OK
