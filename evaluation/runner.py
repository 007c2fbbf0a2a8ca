"""The evaluation suite's work: embeds each dataset once per model, scores zero-shot, linear-probe, k-shot and
retrieval, and writes the report. `evaluation.suite` documents the suite YAML and the results schema, and parses the
command line.
"""

import logging
import statistics
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from agriclip.images import DecodeStats, decode_rows
from agriclip.sources import load_image_text_dataset, load_labelled_dataset
from agriclip.templates import fill_templates
from modeling_agriclip.calibration import TaskFile, fit_calibration
from modeling_agriclip.commands import fusion_weight_of, hide_weight_loading_bars, model_revision, package_version
from modeling_agriclip.zero_shot import ZeroShotClassifier

from .hierarchy import hierarchy_record, load_task_hierarchy
from .linear_probe import k_shot_probe, sample_k_shot, stratified_split
from .linear_probe import linear_probe as fit_linear_probe
from .metrics import (
    CHANCE_KEYS,
    HEADLINE_KEYS,
    METRIC_KEYS,
    chance_levels,
    check_finite,
    classification_metrics,
    confusion_matrix,
)
from .reliability import abstention_record, calibration_record, fit_calibrations, fit_similarity_threshold
from .report import model_names, write_report
from .retrieval import group_captions, retrieval_recall
from .selection import FUSION_WEIGHTS, fused_features, mode_embedding, mode_name, select_embedding
from .suite import DatasetSpec, ModelSpec, RetrievalSpec, load_suite_config, parse_embedding


logger = logging.getLogger(__name__)

# Every metric of the table `evaluation.metrics.METRICS`, per dataset and in the means.
ZERO_SHOT_KEYS = METRIC_KEYS
# The k-shot results keep the headline metrics, and the spread over seeds of the first.
FEW_SHOT_KEYS = HEADLINE_KEYS
# The linear probe's test half when a dataset has no train split: CLIP-style probes need disjoint data.
PROBE_TEST_FRACTION = 0.5


def load_classifiers(
    models: Mapping[str, "str | Path | ModelSpec | ZeroShotClassifier"], batch_size: int = 32, device=None
) -> tuple[dict[str, ZeroShotClassifier], dict[str, dict]]:
    """Loads each model once and derives one classifier per requested embedding source (``fused@W``: the fused
    embedding with its own weight, the model's config left as it is for the other sources).

    Returns the classifiers by display name and a description of each (path, embedding, fusion weight, model type).
    """
    hide_weight_loading_bars()
    classifiers, info = {}, {}
    for name, model in models.items():
        if isinstance(model, ZeroShotClassifier):
            variants = [(name, model, None)]
        else:
            spec = model if isinstance(model, ModelSpec) else ModelSpec.parse(str(model))
            base = ZeroShotClassifier.from_pretrained(spec.path, batch_size=batch_size, device=device)
            variants = [
                (name, base, spec.path)
                if embedding is None
                else (f"{name} ({embedding})", base.with_embedding(*parse_embedding(embedding)), spec.path)
                for embedding in spec.embeddings
            ]
        for label, classifier, path in variants:
            if label in classifiers:
                raise ValueError(f"Two models are named {label!r}")
            classifiers[label] = classifier
            info[label] = {
                "path": None if path is None else str(path),
                "embedding": classifier.embedding,
                "fusion_weight": fusion_weight_of(classifier),
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


def _chance_of_mean(datasets: Iterable[str], dataset_info: Mapping[str, Mapping], keys: Sequence[str]) -> dict | None:
    """The chance level of a mean over `datasets`: the same mean of their chance levels (None without datasets)."""
    per_dataset = {dataset: {"chance": dataset_info[dataset]["chance"]} for dataset in datasets}
    return _mean_over_datasets(per_dataset, [key for key in keys if key in CHANCE_KEYS]).get("chance")


def _summaries(per_dataset: Mapping[str, Mapping], dataset_info: Mapping[str, Mapping], keys: Sequence[str]) -> dict:
    """A section's `mean` over every dataset, `mean_fine_grained` over the fine-grained ones (when there are some),
    and the `chance` level of each."""
    fine_grained = {dataset: models for dataset, models in per_dataset.items() if dataset_info[dataset]["fine_grained"]}
    groups = {"mean": per_dataset, **({"mean_fine_grained": fine_grained} if fine_grained else {})}
    summaries = {name: _mean_over_datasets(group, keys) for name, group in groups.items()}
    summaries["chance"] = {name: _chance_of_mean(group, dataset_info, keys) for name, group in groups.items() if group}
    return summaries


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


def probe_split(labels: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The (train, test) indices of a dataset without a `train_split`: a seeded stratified `PROBE_TEST_FRACTION` of
    each class is tested on, the rest trained on (`stratified_split`)."""
    return stratified_split(labels, PROBE_TEST_FRACTION, seed)


def load_train_split(spec: DatasetSpec, class_names: Sequence[str]):
    """The labelled images of `spec.train_split`, which must have the classes `class_names` of `spec.split`."""
    train_dataset, train_classes = load_labelled_dataset(spec.path, spec.train_split)
    if list(train_classes) != list(class_names):
        raise ValueError(
            f"{spec.path}: the classes of split {spec.train_split!r} ({train_classes}) differ from those of "
            f"split {spec.split!r} ({class_names})"
        )
    return train_dataset


def _probe_data(spec: DatasetSpec, class_names, features, labels, classifiers, batch_size, seed) -> ProbeData:
    """The dataset's `train_split` against the evaluated split, or a seeded stratified split of the latter."""
    if spec.train_split is None:
        train, test = probe_split(labels, seed)
        return ProbeData(
            {name: embeds[train] for name, embeds in features.items()},
            labels[train],
            {name: embeds[test] for name, embeds in features.items()},
            labels[test],
            len(class_names),
        )
    train_dataset = load_train_split(spec, class_names)
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
            record = {}
            for key in FEW_SHOT_KEYS:
                values = [run[key] for run in runs]
                record[key] = statistics.fmean(values)
                if key == FEW_SHOT_KEYS[0]:
                    record[f"{key}_std"] = statistics.pstdev(values)
            records[name][str(k)] = {**record, "n_seeds": len(runs)}
    return records


def _few_shot_means(few_shot_results: dict, k_shots: Sequence[int]) -> dict:
    """Per model and k, the mean over datasets of each k-shot metric (`FEW_SHOT_KEYS`)."""
    means = {}
    for k in k_shots:
        per_dataset = {
            dataset: {model: by_k[str(k)] for model, by_k in models.items()}
            for dataset, models in few_shot_results.items()
        }
        for model, record in _mean_over_datasets(per_dataset, FEW_SHOT_KEYS).items():
            means.setdefault(model, {})[str(k)] = record
    return means


def _few_shot_chance(few_shot_results: dict, dataset_info: Mapping[str, Mapping], k_shots: Sequence[int]) -> dict:
    """Per k, the chance level of the k-shot means: over the datasets that have a k-shot entry."""
    chance = {}
    for k in k_shots:
        datasets = [
            dataset
            for dataset, models in few_shot_results.items()
            if any(by_k[str(k)] is not None for by_k in models.values())
        ]
        chance[str(k)] = _chance_of_mean(datasets, dataset_info, FEW_SHOT_KEYS)
    return chance


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


@dataclass
class TaskScores:
    """One task's zero-shot logits per classifier on its probe split, kept for the sections that compare tasks
    (abstention scores other tasks' photos with this task's labels)."""

    spec: DatasetSpec
    prompt_names: list[str]
    data: ProbeData

    def logits(self, name: str, classifier: ZeroShotClassifier, features: torch.Tensor) -> torch.Tensor:
        """Logits of image `features` against this task's labels and templates."""
        scores = classifier.embedding_logits(features, self.prompt_names, self.spec.templates)
        check_finite(scores, _scored_by(name, classifier, self.spec.name), "images")
        return scores


def _calibration(task: TaskScores, classifiers, shots: Sequence[int], seeds: Sequence[int]) -> tuple[dict, dict]:
    """Per classifier: the calibration record (`evaluation.reliability`) and the fits it made, by k."""
    records, fits = {}, {}
    for name, classifier in classifiers.items():
        train_logits = task.logits(name, classifier, task.data.train_features[name])
        test_logits = task.logits(name, classifier, task.data.test_features[name])
        fits[name] = fit_calibrations(train_logits, task.data.train_labels, classifier.sigmoid_scores, shots, seeds)
        records[name] = calibration_record(test_logits, task.data.test_labels, classifier.sigmoid_scores, fits[name])
    return records, fits


def _abstention(
    task: TaskScores,
    tasks: Mapping[str, TaskScores],
    classifiers,
    fits: Mapping[str, dict],
    shots: int | None,
    seeds: Sequence[int],
) -> dict | None:
    """Per classifier, the task's test photos against the test photos of the tasks of other domains (None when
    every task shares its domain); with `shots`, the similarity threshold fitted on that many train shots per class
    of each seed too."""
    others = [other for other in tasks.values() if other.spec.domain_name != task.spec.domain_name]
    if not others:
        return None
    records = {}
    for name, classifier in classifiers.items():
        test_logits = task.logits(name, classifier, task.data.test_features[name])
        other_logits = torch.cat([task.logits(name, classifier, other.data.test_features[name]) for other in others])
        by_k = fits.get(name) or {}
        calibrations = [calibration for calibration, _ in by_k[max(by_k)]] if by_k else []
        shot_sets = []
        if shots:
            train_logits = task.logits(name, classifier, task.data.train_features[name])
            for seed in seeds:
                indices, _ = sample_k_shot(task.data.train_labels, shots, seed)
                shot_sets.append((train_logits[indices], task.data.train_labels[indices]))
        records[name] = {
            **abstention_record(
                test_logits,
                task.data.test_labels,
                other_logits,
                classifier.sigmoid_scores,
                calibrations,
                classifier.logit_scale,
                classifier.logit_bias,
                shot_sets,
            ),
            "other_tasks": [other.spec.name for other in others],
        }
    return records


def _means(
    per_dataset: Mapping[str, Mapping[str, Mapping]], read: Mapping[str, Callable[[Mapping], float | None]]
) -> dict:
    """Per model, the unweighted mean over datasets of each value `read[key](record)` (None where none has it)."""
    means = {}
    for model in model_names(per_dataset):
        records = [models[model] for models in per_dataset.values() if models.get(model) is not None]
        means[model] = {key: _fmean_or_none([get(record) for record in records]) for key, get in read.items()}
        means[model]["n_datasets"] = len(records)
    return means


def _fmean_or_none(values) -> float | None:
    values = [value for value in values if value is not None]
    return statistics.fmean(values) if values else None


def _calibration_means(per_dataset: dict, shots: Sequence[int]) -> dict:
    read = {"ece_before": lambda record: record["before"]["ece"], "nll_before": lambda record: record["before"]["nll"]}
    for k in shots:
        read[f"ece_after_{k}"] = lambda record, k=k: record["after"][str(k)]["ece"]
        read[f"nll_after_{k}"] = lambda record, k=k: record["after"][str(k)]["nll"]
    return _means(per_dataset, read)


def _top1(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 under the ranking rule of `evaluation.metrics` (argmax: the lowest index wins a tie)."""
    return float((logits.argmax(dim=1) == labels).double().mean())


def _embedding_pairs(classifiers: Mapping[str, ZeroShotClassifier]) -> dict[str, tuple[str, str, list[str]]]:
    """Per AgriCLIP model evaluated with both its aligned and its CLIP embedding: its display name (before " ("),
    the names of those two classifiers, and the names of all its classifiers (the fixed modes)."""
    by_model = {}
    for name, classifier in classifiers.items():
        by_model.setdefault(id(classifier.model), []).append(name)
    pairs = {}
    for names in by_model.values():
        modes = {classifiers[name].embedding: name for name in names if classifiers[name].fusion_weight is None}
        if "aligned" in modes and "clip" in modes:
            pairs[names[0].rsplit(" (", 1)[0]] = (modes["aligned"], modes["clip"], names)
    return pairs


def _selection(task: TaskScores, classifiers, shots: int, seeds: Sequence[int]) -> dict:
    """Per AgriCLIP model (`_embedding_pairs`): the embedding `evaluation.selection` chooses from `shots` shots
    per class of the train split for each seed, its test top-1, the test top-1 of each fixed mode the suite
    evaluates and of every candidate (the per-task oracle)."""
    data, records = task.data, {}
    for model, (aligned, clip, names) in _embedding_pairs(classifiers).items():
        classifier = classifiers[aligned]
        candidates_test = {}
        for weight in FUSION_WEIGHTS:
            features = fused_features(data.test_features[clip], data.test_features[aligned], weight)
            candidates_test[mode_name(weight)] = _top1(task.logits(model, classifier, features), data.test_labels)
        runs = []
        for seed in seeds:
            shot_indices, _ = sample_k_shot(data.train_labels, shots, seed)
            choice = select_embedding(
                classifier,
                data.train_features[clip][shot_indices],
                data.train_features[aligned][shot_indices],
                data.train_labels[shot_indices],
                task.prompt_names,
                task.spec.templates,
            )
            runs.append(
                {
                    "seed": seed,
                    "chosen": choice["chosen"],
                    "fusion_weight": choice["fusion_weight"],
                    "shots_top1": choice["candidates"][choice["chosen"]]["top1"],
                    "test_top1": candidates_test[choice["chosen"]],
                    "n_shots": len(shot_indices),
                }
            )
        fixed = {
            name: _top1(task.logits(name, classifiers[name], data.test_features[name]), data.test_labels)
            for name in names
        }
        oracle = max(candidates_test, key=candidates_test.get)
        records[model] = {
            "selected": runs,
            "test_top1": statistics.fmean(run["test_top1"] for run in runs),
            "fixed": fixed,
            "best_fixed": max(fixed, key=fixed.get),
            "candidates_test_top1": candidates_test,
            "oracle": oracle,
            "oracle_top1": candidates_test[oracle],
            "n_test": len(data.test_labels),
        }
    return records


def _selection_means(per_dataset: Mapping[str, Mapping[str, Mapping]]) -> dict:
    """Per model, over the tasks: the mean test top-1 of the per-task selection, of each fixed mode, of the best
    fixed mode per task and of the per-task oracle, and the one fixed mode best in hindsight (the best mean)."""
    means = {}
    for model in model_names(per_dataset):
        records = [models[model] for models in per_dataset.values() if model in models]
        fixed = {name: statistics.fmean(record["fixed"][name] for record in records) for name in records[0]["fixed"]}
        best = max(fixed, key=fixed.get)
        means[model] = {
            "selected_top1": statistics.fmean(record["test_top1"] for record in records),
            "fixed_top1": fixed,
            "best_fixed_in_hindsight": best,
            "best_fixed_in_hindsight_top1": fixed[best],
            "best_fixed_per_task_top1": statistics.fmean(record["fixed"][record["best_fixed"]] for record in records),
            "oracle_top1": statistics.fmean(record["oracle_top1"] for record in records),
            "n_datasets": len(records),
        }
    return means


def fit_task_file(
    config_path,
    dataset: str,
    model: str,
    shots: int,
    seed: int = 0,
    embedding: str | None = None,
    select: bool = False,
    batch_size: int = 32,
    device=None,
) -> TaskFile:
    """The task file of one suite dataset (`python -m evaluation.calibrate`): with `select`, the image embedding
    chosen from `shots` shots per class (`evaluation.selection`, the model's aligned and CLIP embeddings), then the
    temperature (and SigLIP bias) fitted on the same shots. The shots come from the dataset's train split, or the
    train half of the suite's seeded probe split."""
    config = load_suite_config(config_path)
    specs = {spec.name: spec for spec in config.datasets}
    if dataset not in specs:
        raise ValueError(f"{config.path}: no dataset {dataset!r}; its datasets: {sorted(specs)}")
    spec = specs[dataset]
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    hide_weight_loading_bars()
    base = ZeroShotClassifier.from_pretrained(model, batch_size=batch_size, device=device)
    embeddings = ("aligned", "clip") if select else (embedding,)
    classifiers = {str(name): base if name is None else base.with_embedding(name) for name in embeddings}
    dataset_rows, class_names = load_labelled_dataset(spec.path, spec.split)
    prompt_names = spec.prompt_names(class_names, f"{config.path}: dataset {spec.name!r}")
    features, kept, _ = embed_images(dataset_rows, classifiers, batch_size, spec.name)
    data = _probe_data(spec, class_names, features, _labels(dataset_rows, kept), classifiers, batch_size, seed)
    shot_indices, _ = sample_k_shot(data.train_labels, shots, seed)
    shot_labels = data.train_labels[shot_indices]
    selection, fusion_weight = None, None
    if select:
        clip, aligned = (data.train_features[name][shot_indices] for name in ("clip", "aligned"))
        selection = select_embedding(base, clip, aligned, shot_labels, prompt_names, spec.templates)
        embedding, fusion_weight = mode_embedding(selection["fusion_weight"])
        shot_features = fused_features(clip, aligned, selection["fusion_weight"])
    else:
        shot_features = data.train_features[str(embedding)][shot_indices]
    logits = base.embedding_logits(shot_features, prompt_names, spec.templates)
    calibration = fit_calibration(logits, shot_labels, base.sigmoid_scores)
    similarities = base.embedding_similarities(shot_features, prompt_names, spec.templates).amax(dim=1)
    return TaskFile(
        labels=prompt_names,
        templates=list(spec.templates),
        objective="siglip" if base.sigmoid_scores else "infonce",
        temperature=calibration.temperature,
        bias=calibration.bias,
        embedding=embedding or getattr(base.model.config, "image_embedding", None),
        fusion_weight=fusion_weight,
        model=str(model),
        revision=model_revision(base),
        shots_per_class=shots,
        seed=seed,
        selection=selection and {"on": "k-shot", "chosen": selection["chosen"], "candidates": selection["candidates"]},
        similarity_threshold=fit_similarity_threshold(similarities),
        agriclip_version=package_version(),
    )


ABSTENTION_MEAN_KEYS = (
    "auroc_max_probability",
    "auroc_calibrated",
    "auroc_max_logit",
    "top1",
    "accuracy_at_coverage",
    "other_abstained_at_threshold",
    "accuracy_at_coverage_similarity",
    "other_abstained_at_similarity_threshold",
)


def run_suite(
    config_path,
    models: Mapping[str, "str | Path | ModelSpec | ZeroShotClassifier"],
    output_dir,
    batch_size: int = 32,
    device=None,
    linear_probe: bool = False,
    k_shots: Sequence[int] = (),
    seeds: Sequence[int] = (0,),
    calibration_shots: Sequence[int] = (),
    abstention: bool = False,
    select_shots: int | None = None,
    hierarchy: bool = False,
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
        calibration_shots: also fit a temperature (and SigLIP bias) per task from k shots per class for these k, and
            report ECE and reliability bins before and after (`evaluation.reliability`).
        abstention: also score each task's test photos against those of tasks of other domains.
        select_shots: also choose each AgriCLIP model's embedding per task from this many shots per class
            (`evaluation.selection`; the model must be evaluated with its aligned and clip embeddings).
        hierarchy: also score the datasets with a `hierarchy` label file two-level, beside the flat labels.

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
    calibration_results, calibration_fits, tasks = {}, {}, {}
    selection_results, hierarchy_results = {}, {}
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
            "fine_grained": spec.fine_grained,
            "chance": chance_levels(len(class_names)),
        }
        results["datasets"][spec.name] = _zero_shot(
            spec, class_names, prompt_names, features, labels, stats, classifiers
        )
        if hierarchy and spec.hierarchy is not None:
            task_hierarchy = load_task_hierarchy(spec, class_names, prompt_names)
            hierarchy_results[spec.name] = {
                name: {
                    **hierarchy_record(classifier, features[name], labels, task_hierarchy, spec.templates),
                    "zero_shot_top1": results["datasets"][spec.name][name]["top1"],
                }
                for name, classifier in classifiers.items()
            }
        if linear_probe or k_shots or calibration_shots or abstention or select_shots:
            data = _probe_data(spec, class_names, features, labels, classifiers, batch_size, seeds[0])
            if linear_probe:
                probe_results[spec.name] = _linear_probe(spec, data, classifiers, seeds[0])
            if k_shots:
                few_shot_results[spec.name] = _few_shot(spec, data, classifiers, k_shots, seeds)
            tasks[spec.name] = TaskScores(spec, prompt_names, data)
            if calibration_shots:
                calibration_results[spec.name], calibration_fits[spec.name] = _calibration(
                    tasks[spec.name], classifiers, calibration_shots, seeds
                )
            if select_shots:
                selection_results[spec.name] = _selection(tasks[spec.name], classifiers, select_shots, seeds)
    results.update(_summaries(results["datasets"], dataset_info, ZERO_SHOT_KEYS))
    if linear_probe:
        results["linear_probe"] = {"datasets": probe_results, **_summaries(probe_results, dataset_info, ZERO_SHOT_KEYS)}
    if k_shots:
        results["few_shot"] = {
            "datasets": few_shot_results,
            "mean": _few_shot_means(few_shot_results, k_shots),
            "chance": {"mean": _few_shot_chance(few_shot_results, dataset_info, k_shots)},
        }
    if calibration_shots:
        results["calibration"] = {
            "datasets": calibration_results,
            "mean": _calibration_means(calibration_results, calibration_shots),
        }
    if abstention:
        abstention_results = {}
        for name, task in tasks.items():
            records = _abstention(
                task, tasks, classifiers, calibration_fits.get(name, {}), max(calibration_shots, default=None), seeds
            )
            if records is not None:
                abstention_results[name] = records
        read = {key: lambda record, key=key: record.get(key) for key in ABSTENTION_MEAN_KEYS}
        read |= {
            f"shot_threshold_{key}": lambda record, key=key: (record.get("shot_threshold") or {}).get(key)
            for key in ("in_task_answered", "accuracy_answered", "other_abstained")
        }
        results["abstention"] = {
            "datasets": abstention_results,
            "mean": _means(abstention_results, read),
            "chance": {
                "mean": {
                    "top1": _fmean_or_none(dataset_info[name]["chance"]["top1"] for name in abstention_results),
                    "auroc": 0.5,
                }
            },
        }
    if select_shots:
        results["selection"] = {
            "shots": select_shots,
            "datasets": selection_results,
            "mean": _selection_means(selection_results),
            "chance": {"mean": _fmean_or_none(dataset_info[name]["chance"]["top1"] for name in selection_results)},
        }
    if hierarchy:
        results["hierarchy"] = {"datasets": hierarchy_results}
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
        "calibration_shots": list(calibration_shots),
        "abstention": abstention,
        "select_shots": select_shots,
        "hierarchy": hierarchy,
    }
    write_report(results, output_dir)
    return results
