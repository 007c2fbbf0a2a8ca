"""Zero-shot evaluation over many downstream datasets, with linear-probe, k-shot and retrieval evaluation.

Command line::

    python -m evaluation.suite --config suite.yaml \\
        --model agriclip=runs/final:aligned,clip,fused \\
        --model clip=checkpoints/clip-vit-base-patch16 \\
        --output reports/eval [--linear-probe] [--k-shot 1 2 4 8 16 --seeds 0 1 2]

It writes ``results.json``, ``results.md`` and ``plots/*.png`` (see `evaluation.report`) and prints the
top-1 table.

Suite YAML (paths are relative to the YAML file)::

    datasets:                                  # zero-shot classification (and linear probe / k-shot)
      - name: leaf-condition                   # identifier, unique in the file
        display_name: Leaf condition           # optional; default: name
        path: downstream/leaf-condition        # image folder (one subfolder per class) or a `save_to_disk`
                                               # folder with a ClassLabel column
        split: test                            # optional: split (subfolder) evaluated
        train_split: train                     # optional: split the linear probe / k-shot train on; without
                                               # it they use a seeded stratified half of the evaluated split
        class_names: {fungal_spots: "fungal spots"}   # optional: dataset class -> prompt class name
                                               # (default: the class name with "_" -> " ")
        templates: leaf                        # a list of "{}" templates, or a name in
                                               # training.prompts.ZERO_SHOT_TEMPLATES (default: "default")
    retrieval:                                 # image-text retrieval, optional
      - name: captions
        path: downstream/captions              # anything training.data.load_image_text_dataset reads
        split: test                            # optional

Models: ``NAME=PATH`` loads an AgriCLIP folder (its configured image embedding) or a plain transformers
CLIP folder, the baseline; ``NAME=PATH:aligned,clip,fused`` evaluates an AgriCLIP folder with each listed
image embedding source, reported as ``NAME (aligned)``, ``NAME (clip)``, ``NAME (fused)``. The model is
loaded once and text embeddings are shared across its embedding sources.

Results (``results.json``, the dictionary `run_suite` returns). Accuracies are fractions in [0, 1]::

    {
      "datasets": {DATASET: {MODEL: {
          "top1": float, "top5": float | null (null with 5 classes or fewer),
          "mean_per_class": float (over classes that have images), "macro_f1": float,
          "n_images": int (images scored), "n_skipped": int (unreadable images skipped),
          "skipped_files": [str], "empty_classes": [str] (dataset class names without images),
          "confusion_matrix": [[int]] (rows: true class, columns: predicted class)}}},
      "mean": {MODEL: {"top1", "top5" (over datasets that have it), "mean_per_class", "macro_f1",
                       "n_datasets"}},                       # unweighted mean over datasets
      "linear_probe": {"datasets": {DATASET: {MODEL: {"top1", "top5", "mean_per_class", "macro_f1",
                        "l2", "val_top1", "n_train", "n_test"}}}, "mean": {MODEL: {...}}},   # with --linear-probe
      "few_shot": {"datasets": {DATASET: {MODEL: {K: {"top1", "top1_std", "mean_per_class", "n_seeds"} | null}}},
                   "mean": {MODEL: {K: {"top1", "mean_per_class", "n_datasets"}}}},          # with --k-shot
      "retrieval": {"datasets": {DATASET: {MODEL: {"image_to_text": {"R@1", "R@5", "R@10"},
                    "text_to_image": {...}, "n_images", "n_captions", "n_skipped", "skipped_files"}}}},
      "dataset_info": {DATASET: {"display_name", "path", "split", "class_names", "prompt_names", "templates",
                                 "warnings": [str]}},   # e.g. classes whose prompts are identical
      "models": {MODEL: {"path", "embedding", "model_type"}},
      "settings": {"config", "batch_size", "device", "linear_probe", "k_shots", "seeds"}
    }

K keys are strings (JSON object keys). A k-shot entry is null when no class has more than K training
images, so no validation shots are left to choose the regularisation. Retrieval datasets' `dataset_info` holds
only "display_name", "path" and "split".

Every metric breaks ties as `argmax` does, the lowest class index first (see `evaluation.metrics`), so a model
whose scores tie is scored as always predicting the first of the tied classes. A NaN or infinite image embedding
or score is an error naming the model, its image embedding and the dataset (`evaluation.metrics.NonFiniteError`),
never a number in the results.
"""

import argparse
import logging
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from tqdm.auto import tqdm

from modeling_agriclip.configuration_agriclip import IMAGE_EMBEDDINGS
from agriclip.templates import fill_templates, get_templates
from modeling_agriclip.zero_shot import ZeroShotClassifier
from agriclip.images import DecodeStats, decode_rows
from training.data import load_image_text_dataset, load_labelled_dataset

from .linear_probe import k_shot_probe, stratified_split
from .linear_probe import linear_probe as fit_linear_probe
from .metrics import check_finite, classification_metrics, confusion_matrix
from .report import model_names, render_markdown_table, write_report
from .retrieval import group_captions, retrieval_recall


logger = logging.getLogger(__name__)

DATASET_KEYS = ("name", "display_name", "path", "split", "train_split", "class_names", "templates")
RETRIEVAL_KEYS = ("name", "display_name", "path", "split")
ZERO_SHOT_KEYS = ("top1", "top5", "mean_per_class", "macro_f1")
# The linear probe's test half when a dataset has no train split: CLIP-style probes need disjoint data.
PROBE_TEST_FRACTION = 0.5


@dataclass
class DatasetSpec:
    """One classification dataset of the suite."""

    name: str
    display_name: str
    path: Path
    split: str | None = None
    train_split: str | None = None
    class_names: dict[str, str] = field(default_factory=dict)
    templates: list[str] = field(default_factory=lambda: get_templates("default"))

    def prompt_names(self, dataset_classes: Sequence[str], where) -> list[str]:
        """The name put into the templates for each dataset class."""
        unknown = sorted(set(self.class_names) - set(dataset_classes))
        if unknown:
            raise ValueError(
                f"{where}: class_names maps {unknown}, which are not classes of {self.path} "
                f"(its classes: {list(dataset_classes)})"
            )
        return [self.class_names.get(name, name.replace("_", " ")) for name in dataset_classes]


@dataclass
class RetrievalSpec:
    """One image-caption dataset of the suite."""

    name: str
    display_name: str
    path: Path
    split: str | None = None


@dataclass
class SuiteConfig:
    """The parsed suite YAML."""

    path: Path
    datasets: list[DatasetSpec]
    retrieval: list[RetrievalSpec]


def _entries(raw: Mapping, key: str, allowed: Sequence[str], path: Path) -> list[dict]:
    entries = raw.get(key) or []
    if not isinstance(entries, list):
        raise ValueError(f"{path}: `{key}` must be a list of datasets")
    for index, entry in enumerate(entries):
        where = f"{path}: {key}[{index}]"
        if not isinstance(entry, dict):
            raise ValueError(f"{where}: expected a mapping with at least `name` and `path`")
        missing = [name for name in ("name", "path") if not entry.get(name)]
        if missing:
            raise ValueError(f"{where}: missing {missing}")
        unknown = sorted(set(entry) - set(allowed))
        if unknown:
            raise ValueError(f"{where} ({entry['name']!r}): unknown keys {unknown}; allowed: {list(allowed)}")
    return entries


def load_suite_config(path) -> SuiteConfig:
    """Reads and checks a suite YAML (format in the module docstring); errors name the file and the entry."""
    path = Path(path)
    raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    if not isinstance(raw, dict) or not set(raw) <= {"datasets", "retrieval"}:
        raise ValueError(f"{path}: expected a mapping with a `datasets` and/or a `retrieval` list")
    datasets = []
    for entry in _entries(raw, "datasets", DATASET_KEYS, path):
        where = f"{path}: dataset {entry['name']!r}"
        class_names = entry.get("class_names") or {}
        if not isinstance(class_names, dict):
            raise ValueError(f"{where}: class_names must map dataset class names to prompt class names")
        try:
            templates = get_templates(entry.get("templates", "default"))
        except (KeyError, ValueError) as error:
            raise ValueError(f"{where}: templates: {error}") from error
        datasets.append(
            DatasetSpec(
                name=str(entry["name"]),
                display_name=str(entry.get("display_name", entry["name"])),
                path=path.parent / entry["path"],
                split=entry.get("split"),
                train_split=entry.get("train_split"),
                class_names={str(key): str(value) for key, value in class_names.items()},
                templates=templates,
            )
        )
    retrieval = [
        RetrievalSpec(
            name=str(entry["name"]),
            display_name=str(entry.get("display_name", entry["name"])),
            path=path.parent / entry["path"],
            split=entry.get("split"),
        )
        for entry in _entries(raw, "retrieval", RETRIEVAL_KEYS, path)
    ]
    names = [spec.name for spec in datasets + retrieval]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(f"{path}: dataset names must be unique; repeated: {duplicates}")
    if not names:
        raise ValueError(f"{path}: no datasets listed")
    return SuiteConfig(path=path, datasets=datasets, retrieval=retrieval)


@dataclass
class ModelSpec:
    """A model folder and, for AgriCLIP, the image embedding sources to evaluate (None: the configured one)."""

    path: str
    embeddings: tuple[str | None, ...] = (None,)

    @classmethod
    def parse(cls, text: str) -> "ModelSpec":
        """``PATH`` or ``PATH:EMBEDDING[,EMBEDDING...]``."""
        head, separator, tail = text.rpartition(":")
        if not separator or Path(text).exists():
            return cls(text)
        embeddings = tuple(tail.split(","))
        unknown = [name for name in embeddings if name not in IMAGE_EMBEDDINGS]
        if unknown:
            raise ValueError(f"{text!r}: unknown image embedding(s) {unknown}; choose from {list(IMAGE_EMBEDDINGS)}")
        return cls(head, embeddings)


def parse_model_argument(argument: str) -> tuple[str, ModelSpec]:
    """``NAME=PATH[:EMBEDDING[,EMBEDDING...]]`` -> (NAME, ModelSpec)."""
    name, separator, spec = argument.partition("=")
    if not separator or not name or not spec:
        raise argparse.ArgumentTypeError(f"{argument!r}: expected NAME=PATH[:EMBEDDING[,EMBEDDING...]]")
    try:
        return name, ModelSpec.parse(spec)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from error


def load_classifiers(
    models: Mapping[str, "str | Path | ModelSpec | ZeroShotClassifier"], batch_size: int = 32, device=None
) -> tuple[dict[str, ZeroShotClassifier], dict[str, dict]]:
    """Loads each model once and derives one classifier per requested embedding source.

    Returns the classifiers by display name and a description of each (path, embedding, model type).
    """
    classifiers, info = {}, {}
    for name, model in models.items():
        if isinstance(model, ZeroShotClassifier):
            variants = [(name, model, None)]
        else:
            spec = model if isinstance(model, ModelSpec) else ModelSpec.parse(str(model))
            base = ZeroShotClassifier.from_pretrained(spec.path, batch_size=batch_size, device=device)
            variants = [
                (name if embedding is None else f"{name} ({embedding})", base.with_embedding(embedding), spec.path)
                for embedding in spec.embeddings
            ]
        for label, classifier, path in variants:
            if label in classifiers:
                raise ValueError(f"Two models are named {label!r}")
            classifiers[label] = classifier
            info[label] = {
                "path": None if path is None else str(path),
                "embedding": classifier.embedding,
                "model_type": classifier.model.config.model_type,
            }
    return classifiers, info


def _scored_by(name: str, classifier: ZeroShotClassifier, dataset: str) -> str:
    """Who gave an embedding or score, for errors: the model's display name, its image embedding, the dataset."""
    # A plain CLIP model has no `image_embedding`: its one embedding is its CLIP image tower.
    embedding = classifier.embedding or getattr(classifier.model.config, "image_embedding", "clip")
    return f"model {name!r} (image embedding {embedding!r}) on dataset {dataset!r}"


def embed_images(dataset, classifiers: Mapping[str, ZeroShotClassifier], batch_size: int, desc: str):
    """Decodes the undecoded `image` column once per batch and embeds it with every classifier.

    Unreadable images are skipped and recorded. A NaN or infinite embedding is an error naming the classifier
    and `desc`. Returns (embeddings by classifier name, the indices of the rows kept, `DecodeStats`).
    """
    stats = DecodeStats()
    chunks = {name: [] for name in classifiers}
    kept = []
    for start in tqdm(range(0, len(dataset), batch_size), desc=desc, unit="batch"):
        images = dataset[start : start + batch_size]["image"]
        decoded = decode_rows([{"image": image, "index": start + i} for i, image in enumerate(images)], stats)
        if not decoded:
            continue
        kept += [row["index"] for row, _ in decoded]
        images = [image for _, image in decoded]
        # Classifiers derived from one model share its processor: preprocess once per processor.
        pixel_values = {}
        for name, classifier in classifiers.items():
            key = id(classifier.processor)
            if key not in pixel_values:
                pixel_values[key] = classifier.pixel_values(images)
            chunks[name].append(classifier.image_embeddings(pixel_values[key]))
    if not kept:
        raise ValueError(f"{desc}: no readable image\n{stats.summary()}")
    if stats.num_skipped:
        logger.warning("%s: %s", desc, stats.summary())
    embeddings = {name: torch.cat(parts) for name, parts in chunks.items()}
    for name, classifier in classifiers.items():
        check_finite(embeddings[name], _scored_by(name, classifier, desc), "images", "image embeddings")
    return embeddings, torch.tensor(kept), stats


def _skipped_files(stats: DecodeStats) -> list[str]:
    return sorted(path for paths in stats.skipped.values() for path in paths)


def _labels(dataset, kept: torch.Tensor) -> torch.Tensor:
    return torch.tensor(list(dataset["label"]), dtype=torch.long)[kept]


def _mean_over_datasets(per_dataset: Mapping[str, Mapping[str, Mapping]], keys: Sequence[str]) -> dict:
    """Per model, the unweighted mean of each metric over the datasets that have it (None where none has)."""
    means = {}
    for model in model_names(per_dataset):
        records = [models[model] for models in per_dataset.values() if models.get(model) is not None]
        means[model] = {}
        for key in keys:
            values = [record[key] for record in records if record.get(key) is not None]
            means[model][key] = statistics.fmean(values) if values else None
        means[model]["n_datasets"] = len(records)
    return means


def _zero_shot(spec: DatasetSpec, class_names, prompt_names, features, labels, stats, classifiers) -> dict:
    n_classes = len(class_names)
    counts = torch.bincount(labels, minlength=n_classes)
    empty_classes = [class_names[index] for index in range(n_classes) if counts[index] == 0]
    if empty_classes:
        logger.warning("%s: classes without images: %s", spec.name, ", ".join(empty_classes))
    records = {}
    for name, classifier in classifiers.items():
        scores = classifier.embedding_logits(features[name], prompt_names, spec.templates)
        check_finite(scores, _scored_by(name, classifier, spec.name), "images")
        records[name] = {
            **classification_metrics(scores, labels, n_classes),
            "n_images": len(labels),
            "n_skipped": stats.num_skipped,
            "skipped_files": _skipped_files(stats),
            "empty_classes": empty_classes,
            "confusion_matrix": confusion_matrix(scores, labels, n_classes),
        }
    return records


def _identical_prompt_warnings(spec: DatasetSpec, class_names, prompt_names) -> list[str]:
    """One warning (also logged) per group of classes whose prompts are identical once the templates are filled.

    Their class embeddings are equal, so their scores tie on every image and the first of them wins every tie:
    the others can never be predicted.
    """
    classes_by_prompts = {}
    for class_name, prompt_name in zip(class_names, prompt_names):
        classes_by_prompts.setdefault(tuple(fill_templates([prompt_name], spec.templates)), []).append(class_name)
    warnings = [
        f"classes {', '.join(map(repr, classes))} have identical prompts, e.g. {prompts[0]!r}: the model cannot tell "
        f"them apart, and their ties go to {classes[0]!r}"
        for prompts, classes in classes_by_prompts.items()
        if len(classes) > 1
    ]
    for warning in warnings:
        logger.warning("%s: %s", spec.name, warning)
    return warnings


@dataclass
class ProbeData:
    """Frozen image embeddings (by classifier name) and labels that the linear probe and k-shot train and test on."""

    train_features: dict[str, torch.Tensor]
    train_labels: torch.Tensor
    test_features: dict[str, torch.Tensor]
    test_labels: torch.Tensor
    num_classes: int


def _probe_data(spec: DatasetSpec, class_names, features, labels, classifiers, batch_size, seed) -> ProbeData:
    """The dataset's `train_split` against the evaluated split, or a seeded stratified split of the latter."""
    if spec.train_split is None:
        train, test = stratified_split(labels, PROBE_TEST_FRACTION, seed)
        return ProbeData(
            {name: embeds[train] for name, embeds in features.items()},
            labels[train],
            {name: embeds[test] for name, embeds in features.items()},
            labels[test],
            len(class_names),
        )
    train_dataset, train_classes = load_labelled_dataset(spec.path, spec.train_split)
    if list(train_classes) != list(class_names):
        raise ValueError(
            f"{spec.path}: the classes of split {spec.train_split!r} ({train_classes}) differ from those of "
            f"split {spec.split!r} ({class_names})"
        )
    desc = f"{spec.name} [{spec.train_split}]"
    train_features, kept, _ = embed_images(train_dataset, classifiers, batch_size, desc)
    return ProbeData(train_features, _labels(train_dataset, kept), features, labels, len(class_names))


def _linear_probe(spec: DatasetSpec, data: ProbeData, classifiers, seed: int) -> dict:
    records = {}
    for name, classifier in classifiers.items():
        probe = fit_linear_probe(data.train_features[name], data.train_labels, data.num_classes, seed=seed)
        scores = probe.scores(data.test_features[name])
        check_finite(scores, f"the linear probe of {_scored_by(name, classifier, spec.name)}", "images")
        records[name] = {
            **classification_metrics(scores, data.test_labels, data.num_classes),
            "l2": probe.l2,
            "val_top1": probe.val_accuracy,
            "n_train": len(data.train_labels),
            "n_test": len(data.test_labels),
        }
    return records


def _few_shot(spec: DatasetSpec, data: ProbeData, classifiers, k_shots: Sequence[int], seeds: Sequence[int]) -> dict:
    counts = torch.bincount(data.train_labels, minlength=data.num_classes)
    records = {name: {} for name in classifiers}
    for k in k_shots:
        if not (counts > k).any():
            logger.warning("%s: no class has more than %d training images; %d-shot skipped", spec.name, k, k)
            for name in classifiers:
                records[name][str(k)] = None
            continue
        for name, classifier in classifiers.items():
            runs = []
            for seed in seeds:
                probe = k_shot_probe(data.train_features[name], data.train_labels, data.num_classes, k, seed)
                scores = probe.scores(data.test_features[name])
                source = f"the {k}-shot probe (seed {seed}) of {_scored_by(name, classifier, spec.name)}"
                check_finite(scores, source, "images")
                runs.append(classification_metrics(scores, data.test_labels, data.num_classes))
            top1 = [run["top1"] for run in runs]
            records[name][str(k)] = {
                "top1": statistics.fmean(top1),
                "top1_std": statistics.pstdev(top1),
                "mean_per_class": statistics.fmean(run["mean_per_class"] for run in runs),
                "n_seeds": len(runs),
            }
    return records


def _few_shot_means(few_shot_results: dict, k_shots: Sequence[int]) -> dict:
    """Per model and k, the mean over datasets of the k-shot top-1 and mean per-class accuracy."""
    means = {}
    for k in k_shots:
        per_dataset = {
            dataset: {model: by_k[str(k)] for model, by_k in models.items()}
            for dataset, models in few_shot_results.items()
        }
        for model, record in _mean_over_datasets(per_dataset, ("top1", "mean_per_class")).items():
            means.setdefault(model, {})[str(k)] = record
    return means


def _retrieval(spec: RetrievalSpec, classifiers, batch_size: int) -> dict:
    dataset = load_image_text_dataset(spec.path, **({} if spec.split is None else {"split": spec.split}))
    unique_rows, row_to_image = group_captions(list(dataset["image"]))
    # A row's caption variants (the `captions` column) are all captions of its image.
    variants = dataset["captions"] if "captions" in dataset.column_names else [None] * len(dataset)
    texts, owners = [], []
    for row, (caption, row_variants) in enumerate(zip(dataset["caption"], variants)):
        for text in row_variants or [caption]:
            texts.append(text)
            owners.append(int(row_to_image[row]))
    image_features, kept, stats = embed_images(dataset.select(unique_rows), classifiers, batch_size, spec.name)
    # Captions of unreadable images leave with them; the rest point at the kept images' new positions.
    position = torch.full((len(unique_rows),), -1, dtype=torch.long)
    position[kept] = torch.arange(len(kept))
    owners = position[torch.tensor(owners, dtype=torch.long)]
    texts = [text for text, owner in zip(texts, owners.tolist()) if owner >= 0]
    owners = owners[owners >= 0]
    records, text_features = {}, {}
    for name, classifier in classifiers.items():
        # Classifiers derived from one model embed text identically.
        key = id(classifier.model)
        if key not in text_features:
            text_features[key] = classifier.text_embeddings(texts)
        records[name] = {
            **retrieval_recall(
                image_features[name], text_features[key], owners, source=_scored_by(name, classifier, spec.name)
            ),
            "n_images": len(kept),
            "n_captions": len(texts),
            "n_skipped": stats.num_skipped,
            "skipped_files": _skipped_files(stats),
        }
    return records


def run_suite(
    config_path,
    models: Mapping[str, "str | Path | ModelSpec | ZeroShotClassifier"],
    output_dir,
    batch_size: int = 32,
    device=None,
    linear_probe: bool = False,
    k_shots: Sequence[int] = (),
    seeds: Sequence[int] = (0,),
) -> dict:
    """Runs the suite of `config_path` on every model and writes the report into `output_dir`.

    Args:
        config_path: the suite YAML (format in the module docstring).
        models: display name -> a model folder (``PATH`` or ``PATH:EMBEDDING[,...]``), a `ModelSpec`, or a
            ready `ZeroShotClassifier` (used as it is, on its device).
        output_dir: where ``results.json``, ``results.md`` and ``plots/`` go.
        batch_size: images (and prompts) per forward pass.
        device: where loaded models run; default CUDA when available, else CPU.
        linear_probe: also fit a logistic-regression probe per dataset and model.
        k_shots: also run k-shot probes for these k.
        seeds: seeds of the k-shot samples (results are averaged); the first also seeds the probe splits.

    Returns:
        The results dictionary (schema in the module docstring).
    """
    if not models:
        raise ValueError("run_suite needs at least one model")
    if not seeds:
        raise ValueError("run_suite needs at least one seed")
    config = load_suite_config(config_path)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    classifiers, models_info = load_classifiers(models, batch_size=batch_size, device=device)
    results = {"datasets": {}, "mean": {}}
    dataset_info, probe_results, few_shot_results = {}, {}, {}
    for spec in config.datasets:
        dataset, class_names = load_labelled_dataset(spec.path, spec.split)
        prompt_names = spec.prompt_names(class_names, f"{config.path}: dataset {spec.name!r}")
        warnings = _identical_prompt_warnings(spec, class_names, prompt_names)
        features, kept, stats = embed_images(dataset, classifiers, batch_size, spec.name)
        labels = _labels(dataset, kept)
        dataset_info[spec.name] = {
            "display_name": spec.display_name,
            "path": str(spec.path),
            "split": spec.split,
            "class_names": list(class_names),
            "prompt_names": prompt_names,
            "templates": spec.templates,
            "warnings": warnings,
        }
        results["datasets"][spec.name] = _zero_shot(
            spec, class_names, prompt_names, features, labels, stats, classifiers
        )
        if linear_probe or k_shots:
            data = _probe_data(spec, class_names, features, labels, classifiers, batch_size, seeds[0])
            if linear_probe:
                probe_results[spec.name] = _linear_probe(spec, data, classifiers, seeds[0])
            if k_shots:
                few_shot_results[spec.name] = _few_shot(spec, data, classifiers, k_shots, seeds)
    results["mean"] = _mean_over_datasets(results["datasets"], ZERO_SHOT_KEYS)
    if linear_probe:
        results["linear_probe"] = {
            "datasets": probe_results,
            "mean": _mean_over_datasets(probe_results, ZERO_SHOT_KEYS),
        }
    if k_shots:
        results["few_shot"] = {"datasets": few_shot_results, "mean": _few_shot_means(few_shot_results, k_shots)}
    if config.retrieval:
        results["retrieval"] = {"datasets": {}}
        for spec in config.retrieval:
            dataset_info[spec.name] = {"display_name": spec.display_name, "path": str(spec.path), "split": spec.split}
            results["retrieval"]["datasets"][spec.name] = _retrieval(spec, classifiers, batch_size)
    results["dataset_info"] = dataset_info
    results["models"] = models_info
    results["settings"] = {
        "config": str(config.path),
        "batch_size": batch_size,
        "device": str(device),
        "linear_probe": linear_probe,
        "k_shots": list(k_shots),
        "seeds": list(seeds),
    }
    write_report(results, output_dir)
    return results


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m evaluation.suite", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--config", required=True, type=Path, help="Suite YAML listing the datasets, class names and templates."
    )
    parser.add_argument(
        "--model",
        dest="models",
        action="append",
        required=True,
        type=parse_model_argument,
        metavar="NAME=PATH[:EMBEDDING[,...]]",
        help="A model to evaluate (repeat for several). PATH is an AgriCLIP or transformers CLIP folder; for "
        f"AgriCLIP, EMBEDDING in {{{','.join(IMAGE_EMBEDDINGS)}}} selects image embedding sources, each reported "
        "as 'NAME (EMBEDDING)'.",
    )
    parser.add_argument("--output", required=True, type=Path, help="Folder for results.json, results.md and plots/.")
    parser.add_argument("--batch-size", type=int, default=32, help="Images and prompts per forward pass (default: 32).")
    parser.add_argument(
        "--device", default=None, help="Device the models run on (default: cuda when available, else cpu)."
    )
    parser.add_argument(
        "--linear-probe",
        action="store_true",
        help="Also fit a logistic-regression probe on frozen image embeddings (L2 chosen on a validation split).",
    )
    parser.add_argument(
        "--k-shot",
        dest="k_shots",
        type=int,
        nargs="+",
        default=[],
        metavar="K",
        help="Also run k-shot linear probes with K training images per class, e.g. --k-shot 1 2 4 8 16.",
    )
    parser.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=[0],
        help="Seeds of the k-shot samples, averaged over; the first also seeds the probe splits (default: 0).",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> dict:
    """Runs the suite from the command line, prints the top-1 table and returns the results."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    models = {}
    for name, spec in args.models:
        if name in models:
            parser.error(f"--model: the name {name!r} is given twice")
        models[name] = spec
    results = run_suite(
        args.config,
        models,
        args.output,
        batch_size=args.batch_size,
        device=args.device,
        linear_probe=args.linear_probe,
        k_shots=args.k_shots,
        seeds=args.seeds,
    )
    print(render_markdown_table(results))
    print(f"\nReport written to {args.output}")
    return results


if __name__ == "__main__":
    main()
