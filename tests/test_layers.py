"""What each layer may import: packages import only the layers below them, inference loads no training, data or
card code, and the light core and every command's help and argument errors load no heavy stack."""

import ast
import json
import sys
from pathlib import Path

import pytest
from PIL import Image

import agriclip
from modeling_agriclip.configuration_agriclip import IMAGE_EMBEDDINGS

from conftest import run_subprocess


HEAVY = ("torch", "transformers", "datasets", "accelerate", "peft", "evaluate", "kornia", "onnx", "onnxruntime")

# (module run with -m, arguments): every command and script, with --help and with an argument error.
ENTRY_POINTS = [
    ("agriclip", ["--help"]),
    *[
        ("agriclip", [command, "--help"])
        for command in (
            "predict",
            "classify-folder",
            "embed",
            "info",
            "export",
            "explain",
            "index",
            "search",
            "convert",
            "tokenizer",
            "card",
            "publish",
        )
    ],
    ("agriclip", ["predict", "photo.jpg"]),  # no --labels
    ("agriclip", ["predict", "photo.jpg", "--labels", "a,b", "--model", "m", "--template", "{} with {}"]),
    *[
        (script, ["--help"])
        for script in (
            "training.stage1_contrastive",
            "training.stage2_dino",
            "training.stage3_align",
            "training.lora_finetune",
            "training.run_all",
            "training.alive",
            "training.embedded",
            "evaluation.suite",
        )
    ],
    ("training.stage1_contrastive", ["--train-data", "data"]),  # no --model, no --output-dir
    ("evaluation.suite", ["--config", "suite.yaml"]),  # no --model
]

PROBE = """
import json, runpy, sys
heavy, entries, seen = json.loads(sys.argv[1]), json.loads(sys.argv[2]), []
for module, argv in entries:
    sys.argv = [module, *argv]
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as stop:
        code = stop.code
    seen.append({"entry": [module, *argv], "code": code, "heavy": [name for name in heavy if name in sys.modules]})
print(json.dumps(seen))
"""


def test_help_and_argument_errors_load_no_heavy_stack(tmp_path):
    done = run_subprocess(
        [sys.executable, "-c", PROBE, json.dumps(HEAVY), json.dumps(ENTRY_POINTS)], timeout=120, cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    assert [result["heavy"] for result in results] == [[] for _ in ENTRY_POINTS], results
    codes = [result["code"] for result in results]
    assert codes[:13] == [0] * 13 and codes[13] == 2 and codes[14] == 7  # help; missing --labels; bad template
    assert codes[15:23] == [0] * 8 and codes[23:] == [2, 2]
    assert "exactly one" in done.stderr and "the following arguments are required: --model, --output-dir" in done.stderr


def test_the_light_core_names_the_image_embeddings_the_config_accepts():
    assert agriclip.IMAGE_EMBEDDINGS == IMAGE_EMBEDDINGS


REPO_ROOT = Path(__file__).resolve().parent.parent

# The packages bottom to top: each imports only those before it. The light core (templates, decoding, atomic files,
# errors, the data sources); the model and inference; evaluation (metrics, probes, the suite); the card builder and
# publishing; training (data collators, objectives, the stages and the end-to-end run); the demo app. `bench` and
# `tests` sit on top.
LAYERS = ("agriclip", "modeling_agriclip", "evaluation", "model_card", "training", "app")

# Inference: the model, processor, templates, image decoding, zero-shot and the `agriclip` command. The `card` and
# `publish` subcommands are dispatched by module name (agriclip.cli) and load the card builder only when run.
INFERENCE = (
    "agriclip.atomic",
    "agriclip.cli",
    "agriclip.errors",
    "agriclip.files",
    "agriclip.images",
    "agriclip.templates",
    "modeling_agriclip",
    "app.demo",  # the page a Space runs with copies of agriclip and modeling_agriclip only
)
NOT_FOR_INFERENCE = ("datasets", "agriclip.sources", "training", "evaluation", "model_card", "peft")
# The app sits on top, yet is inference: its commands read suite YAMLs (evaluation.suite), never train or build cards.
NOT_FOR_THE_APP = ("datasets", "agriclip.sources", "training", "model_card", "peft")


def imports_of(path: Path, package: str) -> list[tuple[int, str]]:
    """Every module `path` imports, at the top or inside a function, with the line: relative imports resolved."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = f"{package}.{base}".rstrip(".")
            found += [(node.lineno, base)]
            # `from agriclip import sources` imports a module too.
            found += [(node.lineno, f"{base}.{alias.name}") for alias in node.names if alias.name != "*"]
    return found


def module_imports() -> dict[str, list[tuple[int, str]]]:
    """module name -> its imports, for every module of the packages in LAYERS."""
    graph = {}
    for package in LAYERS:
        for path in sorted((REPO_ROOT / package).rglob("*.py")):
            module = ".".join(path.relative_to(REPO_ROOT).with_suffix("").parts).removesuffix(".__init__")
            graph[module] = imports_of(path, package)
    return graph


def test_every_package_imports_only_the_layers_below_it():
    graph = module_imports()
    assert len(graph) > 40 and "training.data" in graph and "agriclip.sources" in graph
    upward = {
        f"{module}:{line} imports {name.split('.')[0]}, a layer above {module.split('.')[0]}"
        for module, imports in graph.items()
        for line, name in imports
        if name.split(".")[0] in LAYERS and LAYERS.index(name.split(".")[0]) > LAYERS.index(module.split(".")[0])
    }
    assert not upward, "\n".join(sorted(upward))


def test_inference_imports_no_training_data_or_card_code():
    graph = module_imports()
    inference = [module for module in graph if module.startswith(INFERENCE)]
    assert "modeling_agriclip.zero_shot" in inference and "agriclip.cli" in inference
    leaks = [
        f"{module}:{line} imports {name}"
        for module in inference
        for line, name in graph[module]
        if any(name == banned or name.startswith(banned + ".") for banned in NOT_FOR_INFERENCE)
    ]
    assert not leaks, "\n".join(leaks)


def test_the_app_imports_no_training_data_or_card_code():
    graph = module_imports()
    app = [module for module in graph if module.split(".")[0] == "app"]
    assert {"app.demo", "app.presets", "app.space", "app.__main__"} <= set(app)
    leaks = [
        f"{module}:{line} imports {name}"
        for module in app
        for line, name in graph[module]
        if any(name == banned or name.startswith(banned + ".") for banned in NOT_FOR_THE_APP)
    ]
    assert not leaks, "\n".join(leaks)


def test_the_layering_check_sees_lazy_and_relative_imports(tmp_path):
    source = tmp_path / "runner.py"
    source.write_text("from .metrics import ece\n\ndef load():\n    from training.data import ImageCollator\n")
    assert imports_of(source, "evaluation") == [
        (1, "evaluation.metrics"),
        (1, "evaluation.metrics.ece"),
        (4, "training.data"),
        (4, "training.data.ImageCollator"),
    ]


# Runs the agriclip command with argv[1] in this process, then prints the modules of argv[2] that it loaded.
INFERENCE_PROBE = """
import json, runpy, sys
argv, banned = json.loads(sys.argv[1]), json.loads(sys.argv[2])
sys.argv = ["agriclip", *argv]
try:
    runpy.run_module("agriclip", run_name="__main__", alter_sys=True)
except SystemExit as stop:
    assert not stop.code, stop.code
print(json.dumps(sorted(name for name in sys.modules if name in banned or name.split(".")[0] in banned)))
"""


# classify-folder goes through the same code as predict past the folder walk: its run (7 s of subprocess) is slow.
@pytest.mark.parametrize("command", ["predict", pytest.param("classify-folder", marks=pytest.mark.slow)])
def test_a_prediction_loads_no_training_data_or_card_code(tmp_path, tiny_checkpoint, command):
    photo = tmp_path / "photos" / "leaf.png"
    photo.parent.mkdir()
    Image.new("RGB", (40, 30), (30, 140, 40)).save(photo)
    output = tmp_path / "predictions.csv"
    target = [str(photo)] if command == "predict" else [str(photo.parent), "--output", str(output)]
    argv = [command, *target, "--model", str(tiny_checkpoint), "--labels", "rust,healthy leaf"]
    done = run_subprocess(
        [sys.executable, "-c", INFERENCE_PROBE, json.dumps(argv), json.dumps(NOT_FOR_INFERENCE)],
        timeout=300,
        cwd=REPO_ROOT,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    answer = done.stdout if command == "predict" else output.read_text()
    assert "leaf.png" in answer and ("rust" in answer or "healthy leaf" in answer)
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []
