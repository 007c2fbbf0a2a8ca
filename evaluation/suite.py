"""Zero-shot evaluation over many downstream datasets, with linear-probe, k-shot and retrieval evaluation.

Command line::

    python -m evaluation.suite --config suite.yaml \\
        --model agriclip=runs/final:aligned,clip,fused \\
        --model clip=checkpoints/clip-vit-base-patch16 \\
        --output reports/eval [--linear-probe] [--k-shot 1 2 4 8 16 --seeds 0 1 2]

It writes ``results.json``, ``results.md`` and ``plots/*.png`` (see `evaluation.report`) and prints the
top-1 table. ``--benchmark agriclip-20 --data-root DIR`` instead of ``--config`` runs a benchmark catalogue's tasks
found under DIR (`evaluation.benchmarks`), writing its ``suite.yaml`` and ``benchmark.md`` into the output folder.

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
                                               # agriclip.templates.ZERO_SHOT_TEMPLATES (default: "default")
        fine_grained: true                     # optional (default: false): counted in the fine-grained mean
        domain: leaf                           # optional (default: the name): --abstention scores a task's
                                               # photos against those of the tasks of other domains
        hierarchy: hierarchy/leaf.yaml         # optional: a two-level label file (`agriclip.labels`) over the
                                               # dataset's classes; --hierarchy scores it beside the flat labels
    retrieval:                                 # image-text retrieval, optional
      - name: captions
        path: downstream/captions              # anything agriclip.sources.load_image_text_dataset reads
        split: test                            # optional

Models: ``NAME=PATH`` loads an AgriCLIP folder (its configured image embedding) or a plain transformers
CLIP folder, the baseline; ``NAME=PATH:aligned,clip,fused`` evaluates an AgriCLIP folder with each listed
image embedding source, reported as ``NAME (aligned)``, ``NAME (clip)``, ``NAME (fused)``. ``fused@W``
weighs the CLIP image embedding by W (0 <= W <= 1) instead of the checkpoint's ``fusion_weight``, without
editing config.json: ``NAME=PATH:fused,fused@0.3`` is reported as ``NAME (fused)`` and ``NAME (fused@0.3)``.
The model is loaded once and text embeddings are shared across its embedding sources.

Results (``results.json``, the dictionary `run_suite` returns). Accuracies are fractions in [0, 1]::

    {
      "datasets": {DATASET: {MODEL: {
          "top1": float, "top5": float | null (null with 5 classes or fewer),
          "mean_per_class": float (over classes that have images), "macro_f1": float,
          "ece": float (expected calibration error, lower is better),   # a key per `evaluation.metrics.METRICS` row
          "n_images": int (images scored), "n_skipped": int (unreadable images skipped),
          "skipped_files": [str], "empty_classes": [str] (dataset class names without images),
          "confusion_matrix": [[int]] (rows: true class, columns: predicted class)}}},
      "mean": {MODEL: {"top1", "top5" (over datasets that have it), "mean_per_class", "macro_f1", "ece",
                       "n_datasets"}},                       # unweighted mean over datasets
      "mean_fine_grained": {MODEL: {...}},   # as "mean", over the `fine_grained` datasets; only when there are some
      "chance": {"mean": {"top1", "top5", "mean_per_class", "n_datasets"},
                 "mean_fine_grained": {...}},               # the chance levels of those means
      "linear_probe": {"datasets": {DATASET: {MODEL: {"top1", "top5", "mean_per_class", "macro_f1", "ece",
                        "l2", "val_top1", "n_train", "n_test"}}}, "mean": {MODEL: {...}},
                       "mean_fine_grained": {MODEL: {...}}, "chance": {...}},   # with --linear-probe
      "few_shot": {"datasets": {DATASET: {MODEL: {K: {"top1", "top1_std", "mean_per_class", "n_seeds"} | null}}},
                   "mean": {MODEL: {K: {"top1", "mean_per_class", "n_datasets"}}},
                   "chance": {"mean": {K: {"top1", "mean_per_class", "n_datasets"}}}},   # with --k-shot
      "calibration": {                                                          # with --calibrate K ...
          "datasets": {DATASET: {MODEL: {
              "objective": "infonce" | "siglip" (how the logits are read: a softmax, or per-label sigmoids),
              "before": {"ece", "nll", "reliability": {"count", "sum_confidence", "sum_correct"}},   # uncalibrated
              "after": {K: {"ece" (mean over seeds), "ece_std", "nll", "temperature", "bias" (0 for InfoNCE),
                            "n_shots" (shots the fits used, mean over seeds), "n_seeds",
                            "reliability" (the seeds' bins, summed)}}}}},
          "mean": {MODEL: {"ece_before", "nll_before", "ece_after_K", "nll_after_K" (one pair per K), "n_datasets"}}},
      "abstention": {                                                           # with --abstention
          "datasets": {DATASET: {MODEL: {            # only tasks that have tasks of another `domain`
              "auroc_max_probability" (in-task vs other-domain photos by the top probability),
              "auroc_calibrated" (the same, calibrated by each seed's fit of the largest K, averaged; with --calibrate),
              "auroc_max_logit" (by the top logit), "top1",
              "coverage" (0.9), "accuracy_at_coverage" (on the most confident 90 % of in-task photos),
              "threshold_at_coverage" (the lowest top probability kept: --abstain-below at that coverage),
              "other_abstained_at_threshold" (the share of other-domain photos below it, answered "unknown"),
              "n_in_task", "n_other", "other_tasks": [DATASET]}}},
          "mean": {MODEL: {"auroc_max_probability", "auroc_calibrated", "auroc_max_logit", "top1",
                           "accuracy_at_coverage", "other_abstained_at_threshold", "n_datasets"}},
          "chance": {"mean": {"top1" (mean 1/C of those tasks), "auroc": 0.5}}},
      "selection": {                                                            # with --select-on k-shot
          "shots": K (--select-shots, per class of the train split),
          "datasets": {DATASET: {AGRICLIP: {        # per AgriCLIP model evaluated with both :aligned and :clip, by
                                                    # its name without " (EMBEDDING)"
              "selected": [{"seed", "chosen" ("aligned" | "clip" | "fused@W"), "fusion_weight", "shots_top1",
                            "test_top1" (of the chosen mode), "n_shots"}],   # one per seed
              "test_top1" (mean over seeds), "fixed": {MODEL: top1} (each of its evaluated embeddings),
              "best_fixed" (the best of them on this task), "candidates_test_top1": {MODE: top1} (every fusion
              weight), "oracle" (the best of those on the test images), "oracle_top1", "n_test"}}},
          "mean": {AGRICLIP: {"selected_top1" (per-task selection), "fixed_top1": {MODEL: float},
                              "best_fixed_in_hindsight" (the fixed embedding with the best mean),
                              "best_fixed_in_hindsight_top1", "best_fixed_per_task_top1", "oracle_top1",
                              "n_datasets"}},
          "chance": {"mean": float (mean 1/C of the tasks)}},
      "hierarchy": {"datasets": {DATASET: {MODEL: {                            # with --hierarchy; tasks with a
          "top1_flat" (every label ranked, with the label templates),          # `hierarchy` file only
          "top1_hierarchical" (the best group, then the best label within it),
          "group_accuracy" (of the two-level prediction's group), "flat_group_accuracy" (the flat label's group),
          "levels": [str, str], "n_groups", "n_images", "chance_top1" (1/C), "chance_group" (1/groups),
          "zero_shot_top1" (the task's ordinary zero-shot top-1)}}}},
      "retrieval": {"datasets": {DATASET: {MODEL: {"image_to_text": {"R@1", "R@5", "R@10"},
                    "text_to_image": {...}, "n_images", "n_captions", "n_skipped", "skipped_files"}}}},
      "dataset_info": {DATASET: {"display_name", "path", "split", "class_names", "prompt_names", "templates",
                                 "warnings": [str],     # e.g. classes whose prompts are identical
                                 "fine_grained": bool,
                                 "chance": {"top1", "top5" | null, "mean_per_class"}}},
      "models": {MODEL: {"path", "embedding", "fusion_weight" (the weight of the CLIP image embedding in a
                         fused one, null for other embeddings), "model_type"}},
      "settings": {"config", "batch_size", "device", "linear_probe", "k_shots", "seeds", "calibration_shots",
                   "abstention", "select_shots" (null without --select-on), "hierarchy"}
    }

Chance levels are those of a guess drawn uniformly from the dataset's classes (`evaluation.metrics.chance_levels`:
1/C for top-1 and mean per-class accuracy, 5/C for top-5), and a mean's chance level is the mean of its datasets'
(for k-shot, of the datasets that have an entry for K). Retrieval has none: with several captions per image and
groups of interchangeable images, a random ranking's recall@k depends on every image's number of matches, and a
single k/n would misstate it.

Calibration, abstention and selection score the images the probes test on (the evaluated split when there is a
`train_split`, else the test half of the seeded probe split), and fit or choose on k shots per class drawn from the
train images only (`evaluation.reliability`, `evaluation.selection`); hierarchy scores every evaluated image
(`evaluation.hierarchy`). A MODE is a candidate embedding as `evaluation.selection.mode_name` names it; the MODEL
keys of `fixed` are display names such as "agriclip (aligned)".

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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from agriclip import IMAGE_EMBEDDINGS
from agriclip.atomic import write_text_atomically
from agriclip.errors import SCRIPT_EXIT_CODES, run_command
from agriclip.templates import get_templates


DATASET_KEYS = (
    "name",
    "display_name",
    "path",
    "split",
    "train_split",
    "class_names",
    "templates",
    "fine_grained",
    "domain",
    "hierarchy",
)
RETRIEVAL_KEYS = ("name", "display_name", "path", "split")


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
    fine_grained: bool = False
    domain: str | None = None
    hierarchy: Path | None = None

    @property
    def domain_name(self) -> str:
        """The domain of its photos (`domain`; default its own name): abstention's other-domain photos are those of
        the tasks of another domain."""
        return self.domain or self.name

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
        fine_grained = entry.get("fine_grained", False)
        # A string such as "no" would be truthy: only YAML's true and false are accepted.
        if not isinstance(fine_grained, bool):
            raise ValueError(f"{where}: fine_grained must be true or false; got {fine_grained!r}")
        datasets.append(
            DatasetSpec(
                name=str(entry["name"]),
                display_name=str(entry.get("display_name", entry["name"])),
                path=path.parent / entry["path"],
                split=entry.get("split"),
                train_split=entry.get("train_split"),
                class_names={str(key): str(value) for key, value in class_names.items()},
                templates=templates,
                fine_grained=fine_grained,
                domain=None if entry.get("domain") is None else str(entry["domain"]),
                hierarchy=None if entry.get("hierarchy") is None else path.parent / entry["hierarchy"],
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


def parse_embedding(text: str) -> tuple[str, float | None]:
    """An image embedding of ``--model NAME=PATH:...``: ``aligned``, ``clip``, ``fused``, or ``fused@W`` (the CLIP
    image embedding weighted by W, 0 <= W <= 1, instead of the checkpoint's ``fusion_weight``) -> (embedding, W or
    None)."""
    name, at, weight = text.partition("@")
    if name not in IMAGE_EMBEDDINGS:
        raise ValueError(
            f"unknown image embedding {text!r}; choose from {list(IMAGE_EMBEDDINGS)}, or fused@W with 0 <= W <= 1"
        )
    if not at:
        return name, None
    if name != "fused":
        raise ValueError(f"{text!r}: a weight applies to the fused embedding only, e.g. fused@0.3")
    try:
        value = float(weight)
    except ValueError:
        value = float("nan")
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{text!r}: the fusion weight must be a number from 0 to 1, e.g. fused@0.3")
    return name, value


@dataclass
class ModelSpec:
    """A model folder and, for AgriCLIP, the image embeddings to evaluate (None: the configured one), each as
    `parse_embedding` reads it and as the report names it (``fused@0.3``)."""

    path: str
    embeddings: tuple[str | None, ...] = (None,)

    @classmethod
    def parse(cls, text: str) -> "ModelSpec":
        """``PATH`` or ``PATH:EMBEDDING[,EMBEDDING...]`` (``EMBEDDING``: see `parse_embedding`)."""
        head, separator, tail = text.rpartition(":")
        if not separator or Path(text).exists():
            return cls(text)
        embeddings = []
        for item in tail.split(","):
            try:
                name, weight = parse_embedding(item)
            except ValueError as error:
                raise ValueError(f"{text!r}: {error}") from None
            embeddings.append(name if weight is None else f"{name}@{weight:g}")
        return cls(head, tuple(embeddings))


def parse_model_argument(argument: str) -> tuple[str, ModelSpec]:
    """``NAME=PATH[:EMBEDDING[,EMBEDDING...]]`` -> (NAME, ModelSpec)."""
    name, separator, spec = argument.partition("=")
    if not separator or not name or not spec:
        raise argparse.ArgumentTypeError(f"{argument!r}: expected NAME=PATH[:EMBEDDING[,EMBEDDING...]]")
    try:
        return name, ModelSpec.parse(spec)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from error


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m evaluation.suite",
        description=__doc__,
        epilog=SCRIPT_EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    config = parser.add_mutually_exclusive_group(required=True)
    config.add_argument("--config", type=Path, help="Suite YAML listing the datasets, class names and templates.")
    config.add_argument(
        "--benchmark",
        help="A benchmark catalogue (python -m evaluation.benchmarks list), run over the tasks under --data-root: "
        "its suite YAML and benchmark.md (the published numbers beside this run's, the missing tasks) go to --output.",
    )
    parser.add_argument("--data-root", type=Path, help="With --benchmark: the folder holding the tasks' folders.")
    parser.add_argument(
        "--model",
        dest="models",
        action="append",
        required=True,
        type=parse_model_argument,
        metavar="NAME=PATH[:EMBEDDING[,...]]",
        help="A model to evaluate (repeat for several). PATH is an AgriCLIP or transformers CLIP folder; for "
        f"AgriCLIP, EMBEDDING in {{{','.join(IMAGE_EMBEDDINGS)}}} selects image embedding sources, each reported "
        "as 'NAME (EMBEDDING)'; fused@W (0 <= W <= 1) weighs the CLIP image embedding by W instead of the "
        "checkpoint's fusion_weight.",
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
    parser.add_argument(
        "--calibrate",
        dest="calibration_shots",
        type=int,
        nargs="+",
        default=[],
        metavar="K",
        help="Also fit a temperature (and a bias for a SigLIP model) per task from K shots per class of the train "
        "split, and report ECE and reliability diagrams before and after, e.g. --calibrate 4 16 (mean over --seeds).",
    )
    parser.add_argument(
        "--abstention",
        action="store_true",
        help="Also score each task's test photos against the photos of tasks of other domains (`domain`): AUROC of "
        "the top probability and of the top logit, accuracy at 90%% coverage.",
    )
    parser.add_argument(
        "--select-on",
        choices=("k-shot",),
        default=None,
        help="Also choose each AgriCLIP model's image embedding and fusion weight per task from --select-shots shots "
        "per class of the train split, reported beside the best fixed embedding chosen in hindsight.",
    )
    parser.add_argument(
        "--select-shots",
        type=int,
        default=16,
        metavar="K",
        help="Shots per class --select-on k-shot chooses from (default: 16).",
    )
    parser.add_argument(
        "--hierarchy",
        action="store_true",
        help="Also score the tasks that have a `hierarchy` label file two-level (group, then label within it), "
        "beside the flat labels.",
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
    if (args.benchmark is None) != (args.data_root is None):
        parser.error("--benchmark and --data-root go together")
    if args.benchmark is not None:
        from .benchmarks import load_benchmark, published_comparison, write_suite

        benchmark = load_benchmark(args.benchmark)
        args.config = args.output / "suite.yaml"
        _, missing = write_suite(benchmark, args.data_root, args.config)
    # The heavy stack loads only once the options are valid: --help and argument errors answer at once.
    from .report import render_markdown_table
    from .runner import run_suite

    results = run_suite(
        args.config,
        models,
        args.output,
        batch_size=args.batch_size,
        device=args.device,
        linear_probe=args.linear_probe,
        k_shots=args.k_shots,
        seeds=args.seeds,
        calibration_shots=args.calibration_shots,
        abstention=args.abstention,
        select_shots=args.select_shots if args.select_on else None,
        hierarchy=args.hierarchy,
    )
    print(render_markdown_table(results))
    if args.benchmark is not None:
        comparison = published_comparison(benchmark, results, missing)
        write_text_atomically(args.output / "benchmark.md", comparison)
        print("\n" + comparison)
    print(f"\nReport written to {args.output}")
    return results


if __name__ == "__main__":
    # Under `python -m` this file runs as `__main__`, a second copy of the module: its ModelSpec is not the class
    # `evaluation.runner` imports (and checks with isinstance), so the package's own copy runs.
    from evaluation.suite import main as package_main

    run_command(package_main, __spec__.name)
