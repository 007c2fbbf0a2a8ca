"""What each layer may import: the light core and every command's help and argument errors load no heavy stack."""

import json
import sys

from conftest import run_subprocess

import agriclip
from modeling_agriclip.configuration_agriclip import IMAGE_EMBEDDINGS

HEAVY = ("torch", "transformers", "datasets", "accelerate", "peft", "evaluate", "kornia")

# (module run with -m, arguments): every command and script, with --help and with an argument error.
ENTRY_POINTS = [
    ("agriclip", ["--help"]),
    *[("agriclip", [command, "--help"])
      for command in ("predict", "classify-folder", "embed", "info", "convert", "tokenizer", "card", "publish")],
    ("agriclip", ["predict", "photo.jpg"]),  # no --labels
    ("agriclip", ["predict", "photo.jpg", "--labels", "a,b", "--model", "m", "--template", "{} with {}"]),
    *[(script, ["--help"]) for script in (
        "training.stage1_contrastive", "training.stage2_dino", "training.stage3_align", "training.lora_finetune",
        "training.run_all", "training.alive", "training.embedded", "evaluation.suite",
    )],
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
    done = run_subprocess([sys.executable, "-c", PROBE, json.dumps(HEAVY), json.dumps(ENTRY_POINTS)], timeout=120,
                          cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    assert [result["heavy"] for result in results] == [[] for _ in ENTRY_POINTS], results
    codes = [result["code"] for result in results]
    assert codes[:9] == [0] * 9 and codes[9] == 2 and codes[10] == 7  # help; missing --labels; bad template
    assert codes[11:19] == [0] * 8 and codes[19:] == [2, 2]
    assert "exactly one" in done.stderr and "the following arguments are required: --model, --output-dir" in done.stderr


def test_the_light_core_names_the_image_embeddings_the_config_accepts():
    assert agriclip.IMAGE_EMBEDDINGS == IMAGE_EMBEDDINGS
