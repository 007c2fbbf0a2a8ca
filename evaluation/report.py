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

from .metrics import per_class_accuracy


ZERO_SHOT_METRICS = {
    "top1": "Top-1 accuracy",
    "top5": "Top-5 accuracy",
    "mean_per_class": "Mean per-class accuracy",
    "macro_f1": "Macro-F1",
}
RECALL_DIRECTIONS = {"image_to_text": "I→T", "text_to_image": "T→I"}
# Unreadable files named per dataset in the markdown notes; results.json lists them all.
MAX_LISTED_FILES = 10
# Confusion-matrix panels per row: one per model, wrapped so many models stay legible.
CONFUSION_COLUMNS = 3
PLOT_DPI = 120


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


def render_markdown_table(results: dict, metric: str = "top1", section: dict | None = None) -> str:
    """A markdown table of one metric (in %): one row per model, one column per dataset, then the mean.

    `section` is a ``{"datasets": ..., "mean": ...}`` part of the results (default: the zero-shot results).
    """
    section = section if section is not None else results
    per_dataset = section["datasets"]
    header = ["Model"] + [_display_name(results, dataset) for dataset in per_dataset] + ["Mean"]
    rows = [
        [model]
        + [_percent(per_dataset[dataset].get(model, {}).get(metric)) for dataset in per_dataset]
        + [_percent(section["mean"].get(model, {}).get(metric))]
        for model in model_names(per_dataset)
    ]
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
    confusion matrix; – for a class without images)."""
    per_model = results["datasets"][dataset]
    class_names = results["dataset_info"][dataset]["class_names"]
    confusions = [record["confusion_matrix"] for record in per_model.values()]
    accuracies = [per_class_accuracy(confusion) for confusion in confusions]
    counts = [sum(row) for row in confusions[0]]
    rows = [
        [name, str(count)] + [_percent(model_accuracies[index]) for model_accuracies in accuracies]
        for index, (name, count) in enumerate(zip(class_names, counts))
    ]
    return _table(["Class", "Images", *per_model], rows)


def _few_shot_table(results: dict) -> str:
    few_shot = results["few_shot"]
    shots = sorted({int(k) for models in few_shot["mean"].values() for k in models})
    rows = [
        [model] + [_percent(by_k.get(str(k), {}).get("top1")) for k in shots]
        for model, by_k in few_shot["mean"].items()
    ]
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


def render_markdown_report(results: dict) -> str:
    """The whole markdown report: zero-shot tables per metric, per-class accuracy per dataset, data notes, linear
    probe, k-shot, retrieval."""
    parts = ["# Evaluation results", "All numbers are percentages."]
    if results.get("datasets"):
        parts.append("## Zero-shot classification")
        for metric, title in ZERO_SHOT_METRICS.items():
            parts += [f"### {title}", render_markdown_table(results, metric)]
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
    if results.get("retrieval"):
        parts.append("## Image-text retrieval (recall@k)")
        for dataset in results["retrieval"]["datasets"]:
            parts += [f"### {_display_name(results, dataset)}", _retrieval_table(results, dataset)]
    return "\n\n".join(parts) + "\n"


def grouped_bars_figure(results: dict, metric: str = "top1") -> Figure:
    """Grouped bar chart of a zero-shot metric: one group per dataset (and the mean), one bar per model."""
    per_dataset = results["datasets"]
    models = model_names(per_dataset)
    groups = [_display_name(results, dataset) for dataset in per_dataset] + ["Mean"]
    records = list(per_dataset.values()) + [results["mean"]]
    width = 0.8 / len(models)
    positions = np.arange(len(groups))
    figure = Figure(figsize=(max(6.0, 0.9 * len(groups) * max(1, len(models) / 2)), 4.5), layout="constrained")
    axes = figure.subplots()
    for index, model in enumerate(models):
        values = [100 * (record.get(model, {}).get(metric) or 0.0) for record in records]
        axes.bar(positions + (index - (len(models) - 1) / 2) * width, values, width, label=model)
    axes.set_xticks(positions, groups, rotation=30, ha="right")
    axes.set_ylabel(f"{ZERO_SHOT_METRICS.get(metric, metric)} (%)")
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
    figure.suptitle(_display_name(results, dataset))
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
    with ExitStack() as renames:
        # Each temporary file is renamed over its target when the stack unwinds, in reverse order of entry.
        for path, text in texts.items():
            renames.enter_context(atomic_path(path)).write_text(text, encoding="utf-8")
        for key, (path, figure) in figures.items():
            figure.savefig(renames.enter_context(atomic_path(path)), dpi=PLOT_DPI)
            paths[key] = path
    return paths
