"""Writes a folder that a Hugging Face Space runs as is: the demo page for a model on the Hub.

    python -m app.space --model org/agriclip --output my-space [--suite suite.yaml]
    hf upload org/agriclip-demo my-space --repo-type space

The folder holds `app.py` (builds the page of `demo.py` for the model and launches it), `demo.py` (`app/demo.py`),
the `agriclip` and `modeling_agriclip` packages the page imports (copied: a Space installs `requirements.txt`, not
this repository), `requirements.txt` (this package's requirements; Gradio comes with the Space's SDK),
`README.md` whose front matter makes it a Gradio Space of the installed Gradio version, and `presets.json` with the
example photos of the presets (`--suite`). It is written whole into a staging folder, then put in place
(`agriclip.atomic.replace_folder`).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import re
import shutil
from collections.abc import Sequence
from pathlib import Path

import yaml

from agriclip.atomic import replace_folder
from agriclip.errors import SCRIPT_EXIT_CODES, run_command


PACKAGE_ROOT = Path(__file__).resolve().parent.parent
VENDORED_PACKAGES = ("agriclip", "modeling_agriclip")
EXAMPLES = "examples"

APP_PY = '''"""The AgriCLIP demo Space, written by `python -m app.space`: the page of demo.py for {model}."""

import json
from pathlib import Path

from demo import Preset, build_demo


MODEL = {model!r}

presets = [Preset(**preset) for preset in json.loads(Path("presets.json").read_text(encoding="utf-8"))]
build_demo(MODEL, presets).launch()
'''


def space_requirements() -> list[str]:
    """The requirements of this package's installed distribution, without those of its extras."""
    return [line for line in importlib.metadata.requires("agriclip") or [] if ";" not in line]


def front_matter(model: str) -> dict:
    """The Space settings (huggingface.co/docs/hub/spaces-config-reference): Gradio, this Gradio's version."""
    return {
        "title": "AgriCLIP zero-shot classification",
        "emoji": "🌾",
        "colorFrom": "green",
        "colorTo": "yellow",
        "sdk": "gradio",
        "sdk_version": importlib.metadata.version("gradio"),
        "app_file": "app.py",
        "models": [model],
        "pinned": False,
    }


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "preset"


def _copy_examples(presets, staging: Path) -> list[dict]:
    """Copies the presets' example photos into the folder; returns the presets with paths relative to it."""
    copied = []
    for index, preset in enumerate(presets):
        folder = Path(EXAMPLES) / f"{index}-{_slug(preset.name)}"
        (staging / folder).mkdir(parents=True)
        examples = []
        for number, path in enumerate(preset.examples):
            target = folder / f"{number}-{Path(path).name}"
            shutil.copyfile(path, staging / target)
            examples.append(target.as_posix())
        copied.append({**preset.to_dict(), "examples": examples})
    return copied


def write_space(model: str, output: Path, presets: Sequence = ()) -> Path:
    """Writes the Space folder for the Hub model `model` to `output` (see the module docstring)."""
    if Path(model).exists():
        raise ValueError(
            f"{model}: a Space loads its model from the Hub; give the model's Hub id (`agriclip publish` uploads a folder)"
        )
    output = Path(output)
    staging = output.with_name(f".staging-{output.name}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    for package in VENDORED_PACKAGES:
        shutil.copytree(PACKAGE_ROOT / package, staging / package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copyfile(PACKAGE_ROOT / "app" / "demo.py", staging / "demo.py")
    (staging / "app.py").write_text(APP_PY.format(model=model), encoding="utf-8")
    (staging / "requirements.txt").write_text("\n".join(space_requirements()) + "\n", encoding="utf-8")
    card = f"---\n{yaml.safe_dump(front_matter(model), sort_keys=False, allow_unicode=True)}---\n\n"
    card += f"# AgriCLIP zero-shot classification\n\nThe demo page of [{model}](https://huggingface.co/{model}).\n"
    (staging / "README.md").write_text(card, encoding="utf-8")
    presets_json = json.dumps(_copy_examples(presets, staging), indent=2, ensure_ascii=False)
    (staging / "presets.json").write_text(presets_json + "\n", encoding="utf-8")
    replace_folder(staging, output)
    return output


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m app.space",
        description=__doc__,
        epilog=SCRIPT_EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", required=True, help="The model's Hub id, e.g. org/agriclip.")
    parser.add_argument("--output", required=True, type=Path, help="The Space folder to write.")
    parser.add_argument("--suite", type=Path, help="Suite YAML whose image-folder datasets become label presets.")
    args = parser.parse_args(argv)
    # The suite's reader loads the page's stack (Gradio, torch) only when presets are asked for.
    presets = []
    if args.suite:
        from .presets import presets_from_suite

        presets = presets_from_suite(args.suite)
    print(f"wrote {write_space(args.model, args.output, presets)}")


if __name__ == "__main__":
    run_command(main, "app.space")
