"""Benchmark catalogues: the downstream tasks of a paper, where their data is published, and the suite that runs them.

A catalogue is a YAML file (`agriclip-20.yaml`, the 20 downstream tasks of AgriCLIP, is bundled) holding data only::

    name: agriclip-20
    display_name: ...
    paper_tasks: 20                          # tasks the paper evaluates, named here or not
    layout: "<data-root>/<task name>/<class folder>/<image>"
    defaults: {published_at: ..., licence: unknown}      # for tasks that do not say
    published:                               # numbers the paper or its code published (never measured here)
      - {name: mean_gain, what: ..., value: 9.07, unit: points, source: ...}
      - {name: ..., task: banana-deficiency, what: ..., value: 23.55, unit: "%", source: ...}
    tasks:
      - name: banana-deficiency              # its folder under the data root
        display_name: Banana Deficiency
        official_name: Banana Deficiency     # the official code's spelling
        domain: crops
        templates: Banana Deficiency         # a set of agriclip.templates, or a list of "{}" templates
        classes: [boron, calcium, ...]       # class folder names, where known
        images: "about 3,070-3,100"          # where known
        published_at: ...                    # where the data is published, in words
        licence: unknown
        notes: ...
        hub:                                 # only for data on the Hugging Face Hub: `download` fetches it
          repo_id: org/name                  # a dataset repo
          revision: null                     # a commit sha; null: the branch `main`, pinned at the first try
          folder: test                       # the repo folder that holds the class folders (null: its root)
          sha256: {test/boron/1.jpg: ...}    # optional; else the repo's own file hashes are checked

Anything a source does not give is left out (and shown as "unknown"): nothing in a catalogue is guessed. The module
reads YAML only, so ``python -m evaluation.benchmarks list`` and ``suite`` answer without torch; ``download`` adds
huggingface_hub (`evaluation.benchmarks.download`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from agriclip.atomic import write_text_atomically
from agriclip.templates import get_templates


CATALOGUE_FOLDER = Path(__file__).parent
TASK_KEYS = (
    "name",
    "display_name",
    "official_name",
    "domain",
    "templates",
    "classes",
    "images",
    "published_at",
    "licence",
    "notes",
    "hub",
)
HUB_KEYS = ("repo_id", "revision", "folder", "sha256")
UNKNOWN = "unknown"


@dataclass(frozen=True)
class HubSource:
    """A dataset repo on the Hub whose `folder` holds one subfolder of images per class."""

    repo_id: str
    revision: str | None = None
    folder: str | None = None
    sha256: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Task:
    """One downstream task of a catalogue; None where its sources say nothing."""

    name: str
    display_name: str
    official_name: str | None = None
    domain: str | None = None
    templates: str | list[str] = "default"
    classes: tuple[str, ...] | None = None
    images: str | None = None
    published_at: str | None = None
    licence: str | None = None
    notes: str | None = None
    hub: HubSource | None = None


@dataclass(frozen=True)
class Benchmark:
    """A parsed catalogue file."""

    name: str
    display_name: str
    paper_tasks: int
    layout: str
    tasks: list[Task]
    published: list[dict]
    path: Path

    def task(self, name: str) -> Task:
        for task in self.tasks:
            if task.name == name:
                return task
        raise ValueError(f"{self.path}: no task {name!r}; tasks: {', '.join(task.name for task in self.tasks)}")


def bundled_benchmarks() -> list[str]:
    """The names of the catalogues shipped with the package."""
    return sorted(path.stem for path in CATALOGUE_FOLDER.glob("*.yaml"))


def _hub_source(raw, where: str) -> HubSource:
    if not isinstance(raw, dict) or not raw.get("repo_id"):
        raise ValueError(f"{where}: hub must be a mapping with at least `repo_id`")
    unknown = sorted(set(raw) - set(HUB_KEYS))
    if unknown:
        raise ValueError(f"{where}: unknown hub keys {unknown}; allowed: {list(HUB_KEYS)}")
    sha256 = raw.get("sha256") or {}
    if not isinstance(sha256, dict):
        raise ValueError(f"{where}: hub.sha256 must map repo file paths to their sha256")
    return HubSource(str(raw["repo_id"]), raw.get("revision"), raw.get("folder"), dict(sha256))


def _task(raw, defaults: Mapping, where: str) -> Task:
    if not isinstance(raw, dict) or not raw.get("name"):
        raise ValueError(f"{where}: expected a mapping with at least `name`")
    where = f"{where} ({raw['name']!r})"
    unknown = sorted(set(raw) - set(TASK_KEYS))
    if unknown:
        raise ValueError(f"{where}: unknown keys {unknown}; allowed: {list(TASK_KEYS)}")
    values = {**defaults, **raw}
    try:
        get_templates(values.get("templates", "default"))
    except (KeyError, ValueError) as error:
        raise ValueError(f"{where}: templates: {error}") from error
    classes = values.get("classes")
    if classes is not None and (not isinstance(classes, list) or not classes):
        raise ValueError(f"{where}: classes must be a non-empty list of class folder names")
    return Task(
        **{key: values[key] for key in TASK_KEYS if key in values and key not in ("classes", "hub")},
        classes=None if classes is None else tuple(str(name) for name in classes),
        hub=None if values.get("hub") is None else _hub_source(values["hub"], where),
    )


def load_benchmark(name_or_path: str | os.PathLike) -> Benchmark:
    """A bundled catalogue by name (`bundled_benchmarks`) or a catalogue file; errors name the file and the entry."""
    path = Path(name_or_path)
    if not path.suffix:
        if str(name_or_path) not in bundled_benchmarks():
            raise ValueError(
                f"unknown benchmark {str(name_or_path)!r}; bundled: {', '.join(bundled_benchmarks())}, "
                "or give a catalogue YAML file"
            )
        path = CATALOGUE_FOLDER / f"{name_or_path}.yaml"
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise ValueError(f"{path}: cannot read the catalogue: {error.strerror or error}") from error
    missing = [key for key in ("name", "tasks", "layout") if not isinstance(raw, dict) or not raw.get(key)]
    if missing:
        raise ValueError(f"{path}: a catalogue needs {missing}")
    defaults = raw.get("defaults") or {}
    tasks = [_task(entry, defaults, f"{path}: tasks[{index}]") for index, entry in enumerate(raw["tasks"])]
    names = [task.name for task in tasks]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ValueError(f"{path}: task names must be unique; repeated: {repeated}")
    return Benchmark(
        name=str(raw["name"]),
        display_name=str(raw.get("display_name", raw["name"])),
        paper_tasks=int(raw.get("paper_tasks", len(tasks))),
        layout=str(raw["layout"]),
        tasks=tasks,
        published=list(raw.get("published") or []),
        path=path,
    )


def class_folders(folder: Path) -> list[str]:
    """The class subfolders of a task folder, as `agriclip.sources` reads them (hidden folders are not classes)."""
    return sorted(entry.name for entry in os.scandir(folder) if entry.is_dir() and not entry.name.startswith("."))


def check_task_folder(task: Task, folder: Path) -> list[str]:
    """The class folders of `folder`, checked against the classes the catalogue lists for `task` (where it lists
    them): a missing or renamed class folder would silently change the task, so it is an error naming the folder."""
    found = class_folders(folder)
    if not found:
        raise ValueError(f"{folder}: no class folders; {task.display_name} expects one subfolder of images per class")
    if task.classes is None:
        return found
    missing = [name for name in task.classes if name not in found]
    unexpected = [name for name in found if name not in task.classes]
    if missing or unexpected:
        problems = [f"missing class folder(s) {', '.join(missing)}"] if missing else []
        problems += [f"folder(s) {', '.join(unexpected)} not a class of the task (renamed?)"] if unexpected else []
        raise ValueError(f"{folder}: {'; '.join(problems)}; {task.display_name} has the classes {list(task.classes)}")
    return found


def present_tasks(benchmark: Benchmark, data_root: Path) -> tuple[list[Task], list[Task]]:
    """(tasks whose folder is under `data_root`, checked by `check_task_folder`; the missing ones)."""
    present, missing = [], []
    for task in benchmark.tasks:
        folder = data_root / task.name
        if folder.is_dir():
            check_task_folder(task, folder)
            present.append(task)
        else:
            missing.append(task)
    return present, missing


def suite_entries(tasks: Sequence[Task], data_root: Path, suite_folder: Path) -> list[dict]:
    """`evaluation.suite` dataset entries for `tasks`, their paths relative to the folder of the suite YAML."""
    return [
        {
            "name": task.name,
            "display_name": task.display_name,
            "path": os.path.relpath(data_root / task.name, suite_folder),
            "templates": task.templates,
        }
        for task in tasks
    ]


def write_suite(benchmark: Benchmark, data_root: Path, output: Path) -> tuple[list[Task], list[Task]]:
    """Writes the suite YAML of the tasks present under `data_root` to `output`; returns (present, missing)."""
    present, missing = present_tasks(benchmark, data_root)
    if not present:
        raise ValueError(
            f"{data_root}: holds no task folder of {benchmark.name} (expected {benchmark.layout}); "
            f"`python -m evaluation.benchmarks download NAME --to {data_root}` fetches or explains each task"
        )
    entries = suite_entries(present, Path(data_root).resolve(), Path(output).resolve().parent)
    header = f"# {benchmark.display_name}: {len(present)} of {benchmark.paper_tasks} tasks present under {data_root}.\n"
    if missing:
        header += f"# Missing: {', '.join(task.name for task in missing)}.\n"
    write_text_atomically(output, header + yaml.safe_dump({"datasets": entries}, sort_keys=False, allow_unicode=True))
    return present, missing


def manual_steps(task: Task, data_root: Path) -> str:
    """What a user does to get a task that is not on the Hub: where it is published, and the folder it goes to."""
    classes = ", ".join(task.classes) if task.classes else UNKNOWN
    lines = [
        f"{task.name} ({task.display_name}): not on the Hugging Face Hub; get it by hand.",
        f"  published at: {task.published_at or UNKNOWN}",
        f"  licence: {task.licence or UNKNOWN}",
        f"  put it at: {data_root / task.name}/<class folder>/<image>",
        f"  class folders: {classes}",
    ]
    if task.notes:
        lines.append(f"  notes: {task.notes}")
    return "\n".join(lines)


def _row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _percent(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.2f} %"


def published_comparison(benchmark: Benchmark, results: Mapping, missing: Sequence[Task]) -> str:
    """Markdown: the numbers the paper and its code published, beside this run's over the tasks it had, and the
    tasks it lacked. The published numbers are marked as such: they were not measured here."""
    evaluated = [task for task in benchmark.tasks if task.name in results["datasets"]]
    lines = [
        f"## Published numbers ({benchmark.name})",
        "",
        "Copied from the paper and the official code, **not measured in this run**:",
        "",
        _row(["published", "value", "source"]),
        _row(["---", "---:", "---"]),
    ]
    for number in benchmark.published:
        sign = "+" if number.get("unit") == "points" and number["value"] > 0 else ""
        lines.append(
            _row([number["what"], f"{sign}{number['value']} {number.get('unit', '')}".strip(), number["source"]])
        )
    tasks_with_numbers = [number["task"] for number in benchmark.published if number.get("task") in results["datasets"]]
    columns = [benchmark.task(name).display_name for name in tasks_with_numbers]
    lines += [
        "",
        f"This run, over {len(evaluated)} of the {benchmark.paper_tasks} tasks (top-1). A gain comparable with a "
        "published one is the difference of two rows over all the tasks:",
        "",
        _row(["model", "mean top-1", *(f"{name} top-1" for name in columns)]),
        _row(["---", *["---:"] * (1 + len(columns))]),
    ]
    for model, mean in results["mean"].items():
        cells = [_percent(results["datasets"][name][model]["top1"]) for name in tasks_with_numbers]
        lines.append(_row([model, _percent(mean["top1"]), *cells]))
    lines.append("")
    if missing:
        lines.append(f"Missing tasks ({len(missing)}): " + ", ".join(f"{t.display_name} ({t.name})" for t in missing))
    else:
        lines.append("No task of the catalogue is missing.")
    return "\n".join(lines) + "\n"


__all__ = [
    "Benchmark",
    "HubSource",
    "Task",
    "bundled_benchmarks",
    "check_task_folder",
    "load_benchmark",
    "manual_steps",
    "present_tasks",
    "published_comparison",
    "suite_entries",
    "write_suite",
]
