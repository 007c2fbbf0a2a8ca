"""The benchmark catalogue from the command line.

    python -m evaluation.benchmarks list [--benchmark agriclip-20]
    python -m evaluation.benchmarks download NAME... --to DIR [--benchmark agriclip-20]
    python -m evaluation.benchmarks suite --data-root DIR --output suite.yaml [--benchmark agriclip-20]
    python -m evaluation.suite --benchmark agriclip-20 --data-root DIR --model ... --output reports/eval

`list` shows every task: domain, classes, where its data is published and its licence ("unknown" where no source
says). `download` fetches the tasks published on the Hugging Face Hub (revision pinned, resumable: a rerun fetches
only what is missing, every file checked against its hash) into DIR/<task>/<class>/, and prints the manual steps
for the others. `suite` writes the suite YAML of the tasks present under DIR, checking their class folders, and
names the missing ones; `evaluation.suite --benchmark` does the same and runs it.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from agriclip.errors import SCRIPT_EXIT_CODES, run_command

from . import UNKNOWN, bundled_benchmarks, load_benchmark, manual_steps, write_suite


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m evaluation.benchmarks",
        description=__doc__,
        epilog=SCRIPT_EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    catalogue = argparse.ArgumentParser(add_help=False)
    catalogue.add_argument(
        "--benchmark",
        default="agriclip-20",
        help=f"A bundled catalogue ({', '.join(bundled_benchmarks())}) or a catalogue YAML file (default: agriclip-20).",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("list", parents=[catalogue], help="Show the tasks of the catalogue.")
    download = commands.add_parser("download", parents=[catalogue], help="Fetch tasks, or print how to get them.")
    download.add_argument("names", nargs="+", metavar="NAME", help="Task names (see `list`).")
    download.add_argument("--to", required=True, type=Path, help="The data root the tasks' folders go under.")
    suite = commands.add_parser("suite", parents=[catalogue], help="Write the suite YAML of the tasks present.")
    suite.add_argument("--data-root", required=True, type=Path, help="The folder holding the tasks' folders.")
    suite.add_argument("--output", required=True, type=Path, help="The suite YAML to write.")
    return parser


def format_catalogue(benchmark) -> str:
    """One line per task: name, display name, domain, classes, where it is published, licence."""
    lines = [f"{benchmark.display_name}: {len(benchmark.tasks)} entries for the paper's {benchmark.paper_tasks} tasks"]
    for task in benchmark.tasks:
        classes = f"{len(task.classes)} classes" if task.classes else "classes unknown"
        where = f"hub:{task.hub.repo_id}" if task.hub else task.published_at or UNKNOWN
        lines.append(
            f"  {task.name:<18} {task.display_name:<28} {task.domain or UNKNOWN:<9} {classes:<15} "
            f"licence {task.licence or UNKNOWN}; {where}"
        )
    lines.append(f"layout: {benchmark.layout}")
    return "\n".join(lines)


def run_download(benchmark, names: Sequence[str], data_root: Path) -> None:
    """Downloads the Hub tasks among `names` and prints the manual steps of the others (all names checked first)."""
    tasks = [benchmark.task(name) for name in names]
    for task in tasks:
        if task.hub is None:
            print(manual_steps(task, data_root))
            continue
        # huggingface_hub loads only when something is fetched: list, suite and manual steps stay light.
        from .download import download_task

        print(f"{task.name}: {download_task(task, data_root)}")


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    benchmark = load_benchmark(args.benchmark)
    if args.command == "list":
        print(format_catalogue(benchmark))
    elif args.command == "download":
        run_download(benchmark, args.names, args.to)
    else:
        present, missing = write_suite(benchmark, args.data_root, args.output)
        print(
            f"wrote {args.output}: {len(present)} of {benchmark.paper_tasks} tasks ({', '.join(t.name for t in present)})"
        )
        if missing:
            print(f"missing ({len(missing)}): {', '.join(task.name for task in missing)}")


if __name__ == "__main__":
    run_command(main, "evaluation.benchmarks")
