"""Builds an ALive-style image-caption dataset from labelled sources and their metadata files.

    python -m training.alive --config build.yaml

The config names the sources (image folders, `datasets` datasets, CSVs of path and label), each with a metadata file
that turns labels into caption variants, and the outputs (image folder, `datasets`, WebDataset shards); its keys are
documented in `training/alive_builder.py`. Every source is checked before anything is written, and a complete build
replaces the previous one whole.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from agriclip.errors import SCRIPT_EXIT_CODES, run_command


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog=f"python -m {__spec__.name}",
        description=__doc__,
        epilog=SCRIPT_EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--config", required=True, help="YAML or JSON build config (its keys: training/alive_builder.py)."
    )
    parser.add_argument("--no-progress", action="store_true", help="Do not show the progress bar.")
    args = parser.parse_args(argv)
    # The heavy stack loads only once the options are valid: --help and argument errors answer at once.
    from training.alive_builder import REPORT_NAME, BuildConfig, build_alive

    config = BuildConfig.from_file(args.config)
    report = build_alive(config, progress=not args.no_progress)
    for name, source in report["sources"].items():
        undescribed = source["classes_without_metadata"]
        print(
            f"{name}: {source['written']} written, {source['skipped']} skipped, {source['duplicates']} duplicates "
            f"of {source['images']} images" + (f"; classes without metadata: {undescribed}" if undescribed else "")
        )
    print("splits: " + ", ".join(f"{split} {count}" for split, count in sorted(report["splits"].items())))
    print(report["decode_summary"])
    for duplicate in report["duplicates"][:20]:
        print(f"  duplicate dropped: {duplicate['source']}:{duplicate['dropped']} (same pixels as {duplicate['kept']})")
    for name, path in report["outputs"].items():
        print(f"{name}: {path}")
    print(f"report: {Path(config.output_dir) / REPORT_NAME}")


if __name__ == "__main__":
    run_command(main, __spec__.name)
