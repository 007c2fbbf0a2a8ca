"""Reports of evaluation results: a JSON file, markdown tables and matplotlib plots.

Everything here reads the results dictionary of `evaluation.suite.run_suite` (its schema is documented
there), so a report can be re-rendered from a saved ``results.json`` alone. `write_report` replaces a previous
report whole or not at all.
"""

import json
import re
from contextlib import ExitStack
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from agriclip.atomic import atomic_path

from .metrics import METRICS, per_class_accuracy


# Metric key -> title, from the one table of metrics (`evaluation.metrics.METRICS`): a table per metric.
ZERO_SHOT_METRICS = {key: metric.title for key, metric in METRICS.items()}
LOWER_IS_BETTER_NOTE = "lower is better"
RECALL_DIRECTIONS = {"image_to_text": "I→T", "text_to_image": "T→I"}
# The means a section may have (results schema in `evaluation.suite`), as their columns and plot groups are titled.
SUMMARY_COLUMNS = {"mean": "Mean", "mean_fine_grained": "Fine-grained mean"}
# The row (and plot marker) of chance levels: a uniform guess over each dataset's classes.
CHANCE_LABEL = "Chance"
CHANCE_NOTE = (
    "Chance is the accuracy of a guess drawn uniformly from a dataset's C classes: 1/C for top-1 and mean per-class "
    "accuracy, 5/C for top-5; a mean's chance is the mean of its datasets'."
)
# Unreadable files named per dataset in the markdown notes; results.json lists them all.
MAX_LISTED_FILES = 10
# Confusion-matrix panels per row: one per model, wrapped so many models stay legible.
CONFUSION_COLUMNS = 3
PLOT_DPI = 120


def metric_heading(metric: str) -> str:
    """The title of a metric's table: its title, and "(lower is better)" for an error such as ECE."""
    known = METRICS.get(metric)
    title = ZERO_SHOT_METRICS.get(metric, metric)
    return title if known is None or known.higher_is_better else f"{title} ({LOWER_IS_BETTER_NOTE})"


def _percent(value) -> str:
    return "–" if value is None else f"{100 * value:.1f}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    """A markdown table: the first column left-aligned, the numbers right-aligned."""

    def line(cells):
        return "| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |"

    alignment = "|" + "|".join([" --- "] + [" ---: "] * (len(header) - 1)) + "|"
    return "\n".join([line(header), alignment] + [line(row) for row in rows])


def _display_name(results: dict, dataset: str) -> str:
    return results.get("dataset_info", {}).get(dataset, {}).get("display_name", dataset)


def model_names(per_dataset: dict) -> list[str]:
    """Models in first-seen order across datasets."""
    return list(dict.fromkeys(model for models in per_dataset.values() for model in models))


def _summary_columns(section: dict) -> dict[str, str]:
    """The section's means shown after its datasets: key in the results -> column title."""
    return {key: title for key, title in SUMMARY_COLUMNS.items() if section.get(key) is not None}


def _chance_values(results: dict, section: dict, metric: str) -> list[float | None]:
    """The chance level of `metric` in each column of the section's table: its datasets, then its means (None
    where there is none: macro-F1, top-5 with 5 classes or fewer, reports written before chance levels were)."""
    info = results.get("dataset_info", {})
    chance = section.get("chance") or {}
    return [(info.get(dataset, {}).get("chance") or {}).get(metric) for dataset in section["datasets"]] + [
        (chance.get(key) or {}).get(metric) for key in _summary_columns(section)
    ]


def render_markdown_table(results: dict, metric: str = "top1", section: dict | None = None) -> str:
    """A markdown table of one metric (in %): one row per model, one column per dataset, then the mean (and the
    fine-grained mean when the suite marks datasets fine-grained), and a last row of chance levels where the metric
    has one.

    `section` is a ``{"datasets": ..., "mean": ...}`` part of the results (default: the zero-shot results).
    """
    section = section if section is not None else results
    per_dataset = section["datasets"]
    summaries = _summary_columns(section)
    header = ["Model"] + [_display_name(results, dataset) for dataset in per_dataset] + list(summaries.values())
    rows = [
        [model]
        + [_percent(per_dataset[dataset].get(model, {}).get(metric)) for dataset in per_dataset]
        + [_percent(section[key].get(model, {}).get(metric)) for key in summaries]
        for model in model_names(per_dataset)
    ]
    chance = _chance_values(results, section, metric)
    if any(value is not None for value in chance):
        rows.append([CHANCE_LABEL] + [_percent(value) for value in chance])
    return _table(header, rows)


def _data_notes(results: dict) -> list[str]:
    """One line per dataset warning (e.g. classes with identical prompts), skipped images or classes without images."""
    notes = []
    for dataset, models in results["datasets"].items():
        record = next(iter(models.values()))
        name = _display_name(results, dataset)
        # `warnings` is absent from reports written before it existed.
        for warning in results.get("dataset_info", {}).get(dataset, {}).get("warnings", []):
            notes.append(f"- {name}: warning: {warning}.")
        if record["n_skipped"]:
            files = ", ".join(record["skipped_files"][:MAX_LISTED_FILES])
            more = " …" if record["n_skipped"] > MAX_LISTED_FILES else ""
            notes.append(f"- {name}: skipped {record['n_skipped']} unreadable image(s): {files}{more}.")
        if record["empty_classes"]:
            classes = ", ".join(record["empty_classes"])
            notes.append(f"- {name}: classes without images (not in the mean per-class accuracy): {classes}.")
    return notes


def _per_class_table(results: dict, dataset: str) -> str:
    """One row per class of a dataset: its name, its image count and each model's accuracy on it (recall, from the
    confusion matrix; – for a class without images), then the chance level of that recall (every class's is the
    dataset's mean per-class chance) where the results record it."""
    per_model = results["datasets"][dataset]
    class_names = results["dataset_info"][dataset]["class_names"]
    chance = (results["dataset_info"][dataset].get("chance") or {}).get("mean_per_class")
    confusions = [record["confusion_matrix"] for record in per_model.values()]
    accuracies = [per_class_accuracy(confusion) for confusion in confusions]
    counts = [sum(row) for row in confusions[0]]
    rows = [
        [name, str(count)]
        + [_percent(model_accuracies[index]) for model_accuracies in accuracies]
        + ([] if chance is None else [_percent(chance)])
        for index, (name, count) in enumerate(zip(class_names, counts))
    ]
    return _table(["Class", "Images", *per_model] + ([] if chance is None else [CHANCE_LABEL]), rows)


def _few_shot_table(results: dict) -> str:
    few_shot = results["few_shot"]
    shots = sorted({int(k) for models in few_shot["mean"].values() for k in models})
    rows = [
        [model] + [_percent(by_k.get(str(k), {}).get("top1")) for k in shots]
        for model, by_k in few_shot["mean"].items()
    ]
    chance = (few_shot.get("chance") or {}).get("mean")
    if chance:
        rows.append([CHANCE_LABEL] + [_percent((chance.get(str(k)) or {}).get("top1")) for k in shots])
    return _table(["Model"] + [f"{k}-shot" for k in shots], rows)


def _retrieval_table(results: dict, dataset: str) -> str:
    per_model = results["retrieval"]["datasets"][dataset]
    recalls = list(next(iter(per_model.values()))["image_to_text"])
    header = ["Model"] + [f"{arrow} {recall}" for arrow in RECALL_DIRECTIONS.values() for recall in recalls]
    rows = [
        [model] + [_percent(record[direction][recall]) for direction in RECALL_DIRECTIONS for recall in recalls]
        for model, record in per_model.items()
    ]
    return _table(header, rows)


def _calibration_table(results: dict) -> str:
    """ECE (%) per dataset and its mean: per model, a row before temperature fitting and one per k after it."""
    calibration = results["calibration"]
    datasets = list(calibration["datasets"])
    shots = results.get("settings", {}).get("calibration_shots") or []
    rows = []
    for model, mean in calibration["mean"].items():
        records = [calibration["datasets"][dataset].get(model) for dataset in datasets]
        rows.append(
            [f"{model}, zero-shot"]
            + [_percent(record and record["before"]["ece"]) for record in records]
            + [_percent(mean["ece_before"])]
        )
        for k in shots:
            rows.append(
                [f"{model}, T fitted on {k} shots"]
                + [_percent(record and record["after"][str(k)]["ece"]) for record in records]
                + [_percent(mean[f"ece_after_{k}"])]
            )
    return _table(["Model"] + [_display_name(results, dataset) for dataset in datasets] + ["Mean"], rows)


def _abstention_table(results: dict) -> str:
    """Per model, the means over tasks of the abstention scores (`evaluation.reliability`), with chance levels."""
    abstention = results["abstention"]
    chance = (abstention.get("chance") or {}).get("mean") or {}
    columns = {
        "auroc_max_probability": "AUROC top probability",
        "auroc_calibrated": "AUROC calibrated",
        "auroc_max_logit": "AUROC top logit",
        "top1": "Top-1 (all)",
        "accuracy_at_coverage": "Top-1 at 90 % coverage",
        "other_abstained_at_threshold": "Other-domain photos answered unknown",
        "accuracy_at_coverage_similarity": "Top-1 at 90 % coverage (similarity)",
        "other_abstained_at_similarity_threshold": "Other-domain photos answered unknown (similarity)",
    }
    rows = [[model] + [_percent(mean.get(key)) for key in columns] for model, mean in abstention["mean"].items()]
    # AUROC's chance is 50 %; the accuracies' a uniform guess's; the share answered unknown has none.
    chance_of = {key: chance.get("auroc") if key.startswith("auroc") else chance.get("top1") for key in columns}
    chance_of["other_abstained_at_threshold"] = chance_of["other_abstained_at_similarity_threshold"] = None
    rows.append([CHANCE_LABEL] + [_percent(chance_of[key]) for key in columns])
    table = _table(["Model (mean over tasks)"] + list(columns.values()), rows)
    fitted = {
        "shot_threshold_in_task_answered": "In-task photos answered",
        "shot_threshold_accuracy_answered": "Their top-1",
        "shot_threshold_other_abstained": "Other-domain photos answered unknown",
    }
    means = abstention["mean"]
    if not any(mean.get(key) is not None for mean in means.values() for key in fitted):
        return table
    shots = max(results.get("settings", {}).get("calibration_shots") or [0])
    rows = [[model] + [_percent(mean.get(key)) for key in fitted] for model, mean in means.items()]
    rows.append([CHANCE_LABEL, "–", _percent(chance.get("top1")), "–"])
    return "\n\n".join(
        [
            table,
            f"--abstain-below-similarity with the threshold fitted on {shots} train shots per class (keeping 90 % of "
            "them, as `python -m evaluation.calibrate` writes it into a task file), on the test photos, mean over "
            "seeds:",
            _table(["Model (mean over tasks)"] + list(fitted.values()), rows),
        ]
    )


SELECTION_NOTE = "Chosen on train-split shots only; top-1 on the test images."


def selection_heading(results: dict) -> str:
    """The title of the per-task selection's table (report and model card)."""
    return f"Image embedding chosen per task from {results['selection']['shots']} shots per class"


def selection_table(results: dict) -> str:
    """Per dataset and model: the embeddings chosen from the shots (one per seed), the test top-1 of the choice,
    of the best fixed mode of that task in hindsight and of the best candidate (oracle); then the means and the one
    fixed mode best over all tasks in hindsight."""
    selection = results["selection"]
    info = results.get("dataset_info", {})
    rows = []
    for dataset, models in selection["datasets"].items():
        chance = (info.get(dataset, {}).get("chance") or {}).get("top1")
        for model, record in models.items():
            chosen = ", ".join(run["chosen"] for run in record["selected"])
            rows.append(
                [
                    _display_name(results, dataset),
                    model,
                    chosen,
                    _percent(record["test_top1"]),
                    f"{record['best_fixed']} {_percent(record['fixed'][record['best_fixed']])}",
                    f"{record['oracle']} {_percent(record['oracle_top1'])}",
                    _percent(chance),
                ]
            )
    for model, mean in selection["mean"].items():
        best = mean["best_fixed_in_hindsight"]
        rows.append(
            [
                "Mean",
                model,
                f"one fixed mode in hindsight: {best} {_percent(mean['best_fixed_in_hindsight_top1'])}",
                _percent(mean["selected_top1"]),
                _percent(mean["best_fixed_per_task_top1"]),
                _percent(mean["oracle_top1"]),
                _percent((selection.get("chance") or {}).get("mean")),
            ]
        )
    header = ["Task", "Model", "Chosen per seed", "Selected top-1", "Best fixed (per task)", "Oracle", CHANCE_LABEL]
    return _table(header, rows)


def _hierarchy_table(results: dict) -> str:
    """Per dataset and model: flat and two-level top-1, the group accuracy of each, and their chance levels."""
    rows = [
        [
            _display_name(results, dataset),
            model,
            _percent(record["top1_flat"]),
            _percent(record["top1_hierarchical"]),
            _percent(record["chance_top1"]),
            _percent(record["flat_group_accuracy"]),
            _percent(record["group_accuracy"]),
            _percent(record["chance_group"]),
        ]
        for dataset, models in results["hierarchy"]["datasets"].items()
        for model, record in models.items()
    ]
    header = [
        "Task",
        "Model",
        "Flat top-1",
        "Two-level top-1",
        "Chance",
        "Flat group",
        "Two-level group",
        "Group chance",
    ]
    return _table(header, rows)


def _fine_grained_datasets(results: dict) -> list[str]:
    """The classification datasets the suite marks fine-grained, by display name."""
    info = results.get("dataset_info", {})
    return [
        _display_name(results, dataset) for dataset in results["datasets"] if info.get(dataset, {}).get("fine_grained")
    ]


def table_legend(results: dict) -> str:
    """What the Chance row and the fine-grained mean are, where the results have them ("" where neither)."""
    info = results.get("dataset_info", {})
    fine_grained = _fine_grained_datasets(results)
    sentences = [CHANCE_NOTE] if any(info.get(dataset, {}).get("chance") for dataset in results["datasets"]) else []
    if fine_grained:
        sentences.append(f"The fine-grained mean is over the fine-grained tasks: {', '.join(fine_grained)}.")
    return " ".join(sentences)


def mean_summary(results: dict, model: str, metric: str = "top1") -> str:
    """`model`'s zero-shot mean of `metric` over every task, and over the fine-grained ones when there are some,
    each beside its chance level where the results record it, as one sentence."""
    clauses = []
    for key in _summary_columns(results):
        record = results[key].get(model) or {}
        if record.get(metric) is None:
            continue
        if key == "mean_fine_grained":
            tasks = "the fine-grained tasks"
        else:
            tasks = f"the {record['n_datasets']} tasks" if record.get("n_datasets") else "all tasks"
        chance = ((results.get("chance") or {}).get(key) or {}).get(metric)
        clauses.append(
            f"{_percent(record[metric])} % over {tasks}" + ("" if chance is None else f" (chance {_percent(chance)} %)")
        )
    if not clauses:
        return ""
    return f"{model}: mean {ZERO_SHOT_METRICS.get(metric, metric).lower()} " + "; ".join(clauses) + "."


def render_markdown_report(results: dict) -> str:
    """The whole markdown report: zero-shot tables per metric, per-class accuracy per dataset, data notes, linear
    probe, k-shot, retrieval."""
    parts = ["# Evaluation results", "All numbers are percentages."]
    if results.get("datasets"):
        parts += [legend for legend in (table_legend(results),) if legend] + ["## Zero-shot classification"]
        recorded = {key for models in results["datasets"].values() for record in models.values() for key in record}
        # A metric no record has (results saved before it was in `evaluation.metrics.METRICS`) gets no table.
        for metric in (key for key in ZERO_SHOT_METRICS if key in recorded):
            parts += [f"### {metric_heading(metric)}", render_markdown_table(results, metric)]
        parts += ["### Per-class accuracy", "The share of each class's images predicted as that class (its recall)."]
        for dataset in results["datasets"]:
            parts += [f"#### {_display_name(results, dataset)}", _per_class_table(results, dataset)]
        notes = _data_notes(results)
        if notes:
            parts += ["### Data notes", "\n".join(notes)]
    if results.get("linear_probe"):
        parts += ["## Linear probe (top-1)", render_markdown_table(results, "top1", results["linear_probe"])]
    if results.get("few_shot"):
        parts += ["## k-shot linear probe (top-1, mean over datasets and seeds)", _few_shot_table(results)]
    if results.get("calibration"):
        parts += [
            "## Calibration: expected calibration error (lower is better)",
            "Zero-shot, then with a temperature (and a bias for a SigLIP model) fitted on k labelled shots per class "
            "of the train split (a class with fewer train images gives them all), mean over seeds; measured on the "
            "test images. Reliability diagrams: plots/reliability_*.png.",
            _calibration_table(results),
        ]
    if results.get("abstention"):
        parts += [
            "## Abstention on photos of other domains",
            "Each task's test photos against the test photos of the tasks of other domains, all scored with the "
            "task's labels; AUROC of telling them apart (chance 50 %), and the top-1 on the 90 % of the task's "
            "photos with the highest top probability, and the share of other-domain photos the --abstain-below "
            "threshold of 90 % coverage answers unknown; then the same two for the best label's cosine similarity "
            "(--abstain-below-similarity).",
            _abstention_table(results),
        ]
    if results.get("selection"):
        parts += [
            f"## {selection_heading(results)}",
            SELECTION_NOTE,
            selection_table(results),
        ]
    if results.get("hierarchy"):
        parts += ["## Hierarchical labels (group, then label within it)", _hierarchy_table(results)]
    if results.get("retrieval"):
        parts += [
            "## Image-text retrieval (recall@k)",
            (
                "No chance row here: a random ranking's recall@k depends on how many captions (and interchangeable "
                "images) each query matches."
            ),
        ]
        for dataset in results["retrieval"]["datasets"]:
            parts += [f"### {_display_name(results, dataset)}", _retrieval_table(results, dataset)]
    return "\n\n".join(parts) + "\n"


def grouped_bars_figure(results: dict, metric: str = "top1") -> Figure:
    """Grouped bar chart of a zero-shot metric: one group per dataset (then the mean, and the fine-grained mean when
    there is one), one bar per model, and a dashed line across each group at its chance level."""
    per_dataset = results["datasets"]
    models = model_names(per_dataset)
    summaries = _summary_columns(results)
    groups = [_display_name(results, dataset) for dataset in per_dataset] + list(summaries.values())
    records = list(per_dataset.values()) + [results[key] for key in summaries]
    width = 0.8 / len(models)
    positions = np.arange(len(groups))
    figure = Figure(figsize=(max(6.0, 0.9 * len(groups) * max(1, len(models) / 2)), 4.5), layout="constrained")
    axes = figure.subplots()
    for index, model in enumerate(models):
        values = [100 * (record.get(model, {}).get(metric) or 0.0) for record in records]
        axes.bar(positions + (index - (len(models) - 1) / 2) * width, values, width, label=model)
    chance = [
        (position, 100 * value)
        for position, value in zip(positions, _chance_values(results, results, metric))
        if value is not None
    ]
    if chance:
        at, levels = zip(*chance)
        axes.hlines(
            levels,
            np.subtract(at, 0.45),
            np.add(at, 0.45),
            colors="black",
            linestyles="dashed",
            linewidth=1.2,
            label=CHANCE_LABEL,
        )
    axes.set_xticks(positions, groups, rotation=30, ha="right")
    axes.set_ylabel(f"{metric_heading(metric)} (%)")
    axes.set_ylim(0, 100)
    axes.legend(fontsize="small")
    axes.grid(axis="y", alpha=0.3)
    return figure


def confusion_matrix_figure(results: dict, dataset: str) -> Figure:
    """Row-normalised confusion matrices of one dataset, one panel per model (counts printed for small ones)."""
    per_model = results["datasets"][dataset]
    class_names = results["dataset_info"][dataset]["class_names"]
    n_classes = len(class_names)
    side = min(12.0, 2.0 + 0.35 * n_classes)
    columns = min(len(per_model), CONFUSION_COLUMNS)
    rows = -(-len(per_model) // columns)
    figure = Figure(figsize=(side * columns, side * rows), layout="constrained")
    panels = np.atleast_1d(figure.subplots(rows, columns)).flatten()
    for axes in panels[len(per_model) :]:
        axes.set_axis_off()
    for axes, (model, record) in zip(panels, per_model.items()):
        counts = np.asarray(record["confusion_matrix"], dtype=float)
        rates = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
        image = axes.imshow(rates, vmin=0, vmax=1, cmap="Blues")
        if n_classes <= 30:
            axes.set_xticks(range(n_classes), class_names, rotation=90, fontsize="small")
            axes.set_yticks(range(n_classes), class_names, fontsize="small")
        if n_classes <= 15:
            for (row, column), count in np.ndenumerate(counts):
                colour = "white" if rates[row, column] > 0.5 else "black"
                axes.text(column, row, f"{count:.0f}", ha="center", va="center", color=colour, fontsize="small")
        axes.set_xlabel("Predicted")
        axes.set_ylabel("True")
        axes.set_title(f"{model}: top-1 {_percent(record['top1'])}%", fontsize="medium")
    figure.colorbar(image, ax=list(panels[: len(per_model)]), shrink=0.8, label="Fraction of the true class")
    chance = (results["dataset_info"][dataset].get("chance") or {}).get("top1")
    figure.suptitle(
        _display_name(results, dataset) + ("" if chance is None else f" (chance top-1 {_percent(chance)}%)")
    )
    return figure


def reliability_figure(results: dict, dataset: str) -> Figure:
    """Reliability diagrams of one dataset, one panel per model: the accuracy against the mean confidence of each
    non-empty confidence bin, zero-shot and after temperature fitting with each k (the seeds' bins pooled), beside
    the diagonal of perfect calibration."""
    per_model = results["calibration"]["datasets"][dataset]
    columns = min(len(per_model), CONFUSION_COLUMNS)
    rows = -(-len(per_model) // columns)
    figure = Figure(figsize=(4.0 * columns, 4.0 * rows), layout="constrained")
    panels = np.atleast_1d(figure.subplots(rows, columns)).flatten()
    for axes in panels[len(per_model) :]:
        axes.set_axis_off()
    for axes, (model, record) in zip(panels, per_model.items()):
        curves = {f"zero-shot (ECE {_percent(record['before']['ece'])}%)": record["before"]["reliability"]}
        curves |= {
            f"T from {k} shots (ECE {_percent(after['ece'])}%)": after["reliability"]
            for k, after in record["after"].items()
        }
        axes.plot([0, 1], [0, 1], color="grey", linestyle="dashed", linewidth=1)
        for label, bins in curves.items():
            counts = np.asarray(bins["count"], dtype=float)
            shown = counts > 0
            confidence = np.asarray(bins["sum_confidence"])[shown] / counts[shown]
            accuracy = np.asarray(bins["sum_correct"])[shown] / counts[shown]
            axes.plot(confidence, accuracy, marker="o", label=label)
        axes.set_xlim(0, 1)
        axes.set_ylim(0, 1)
        axes.set_xlabel("Confidence (top probability)")
        axes.set_ylabel("Accuracy")
        axes.set_title(model, fontsize="medium")
        axes.legend(fontsize="x-small")
    figure.suptitle(f"Reliability: {_display_name(results, dataset)}")
    return figure


def _file_stem(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "dataset"


def write_report(results: dict, output_dir) -> dict[str, Path]:
    """Writes ``results.json``, ``results.md`` and ``plots/*.png`` into `output_dir`; returns their paths.

    The previous report is replaced whole or not at all: the texts and figures are built first, every file is then
    written under a temporary name beside its target (`agriclip.atomic.atomic_path`), and the renames
    follow only once all are written, ``results.json`` last. A failure (a full disk, a value JSON cannot hold)
    leaves the previous files as they were and no temporary file behind.
    """
    output_dir = Path(output_dir)
    plots_dir = output_dir / "plots"
    paths = {"json": output_dir / "results.json", "markdown": output_dir / "results.md"}
    texts = {
        # `allow_nan=False`: a NaN would be written as the non-JSON `NaN`; it is an error, not a number.
        paths["json"]: json.dumps(results, indent=2, ensure_ascii=False, allow_nan=False) + "\n",
        paths["markdown"]: render_markdown_report(results),
    }
    figures = {}
    if results.get("datasets"):
        figures["bars"] = (plots_dir / "zero_shot_top1.png", grouped_bars_figure(results))
        for dataset in results["datasets"]:
            figures[f"confusion/{dataset}"] = (
                plots_dir / f"confusion_{_file_stem(dataset)}.png",
                confusion_matrix_figure(results, dataset),
            )
    for dataset in (results.get("calibration") or {}).get("datasets", {}):
        figures[f"reliability/{dataset}"] = (
            plots_dir / f"reliability_{_file_stem(dataset)}.png",
            reliability_figure(results, dataset),
        )
    with ExitStack() as renames:
        # Each temporary file is renamed over its target when the stack unwinds, in reverse order of entry.
        for path, text in texts.items():
            renames.enter_context(atomic_path(path)).write_text(text, encoding="utf-8")
        for key, (path, figure) in figures.items():
            figure.savefig(renames.enter_context(atomic_path(path)), dpi=PLOT_DPI)
            paths[key] = path
    return paths
