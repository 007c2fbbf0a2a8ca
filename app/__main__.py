"""Starts the AgriCLIP demo page on this machine.

    python -m app --model runs/agriclip-demo/agriclip --suite runs/agriclip-demo/data/suite.yaml

--model is an AgriCLIP (or CLIP) folder or a Hub id; --suite offers each image-folder dataset of a suite YAML as a
label preset with example photos. The page listens on --host:--port (default 127.0.0.1:7860, this machine only).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from agriclip.errors import SCRIPT_EXIT_CODES, run_command


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m app",
        description=__doc__,
        epilog=SCRIPT_EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", required=True, help="AgriCLIP or CLIP folder, or a Hub id.")
    parser.add_argument("--suite", type=Path, help="Suite YAML whose image-folder datasets become label presets.")
    parser.add_argument("--device", help="Device the model runs on (default: cuda, then mps, then cpu).")
    parser.add_argument("--host", default="127.0.0.1", help="Address to listen on (default: 127.0.0.1).")
    parser.add_argument("--port", type=int, default=7860, help="Port to listen on (default: 7860).")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    # Gradio and torch load only once the options are valid: --help and argument errors answer at once.
    from .demo import build_demo
    from .presets import presets_from_suite

    presets = presets_from_suite(args.suite) if args.suite else []
    build_demo(args.model, presets, args.device).launch(server_name=args.host, server_port=args.port)


if __name__ == "__main__":
    run_command(main, "app")
