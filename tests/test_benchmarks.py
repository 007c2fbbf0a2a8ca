"""The benchmark catalogue, its downloader over the loopback Hub, and the suite it generates, end to end."""

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from huggingface_hub import HfApi
from PIL import Image

from agriclip.templates import OFFICIAL_SPELLINGS, get_templates
from evaluation.benchmarks import __main__ as benchmarks_cli
from evaluation.benchmarks import load_benchmark, write_suite
from evaluation.benchmarks.download import DOWNLOADS, file_hash
from evaluation.suite import load_suite_config

from conftest import run_as_main, run_subprocess, write_labelled_folder


# The 17 task names the official code holds (reference/agriclip-method.md section 3), spelt as there.
OFFICIAL_TASKS = (
    "Acquarium Fish",
    "Animal-2",
    "Banana Deficiency",
    "Bean Lesion",
    "Chicken Fecus",
    "CID",
    "Citrus Fruits",
    "Citrus Leaves",
    "Cow Breed",
    "DeepFish",
    "Fish Freshness",
    "Fish Species",
    "FishNet",
    "Fruits Diseases",
    "Horse Breed",
    "Soybean Weeds",
    "Supermarket Fish",
)
REPO_ROOT = Path(__file__).resolve().parent.parent
REPO_ID = "agri/colour-leaves"
TEMPLATES = ["a photo of a {} leaf."]


def test_the_bundled_catalogue_holds_what_the_sources_give_and_no_more():
    benchmark = load_benchmark("agriclip-20")
    assert benchmark.paper_tasks == 20 and len(benchmark.tasks) == 20
    named = [task for task in benchmark.tasks if task.official_name]
    assert tuple(task.official_name for task in named) == OFFICIAL_TASKS
    for task in named:
        # The task's templates are the official prompt of its official name, through the spelling aliases.
        assert get_templates(task.templates) == get_templates(
            OFFICIAL_SPELLINGS.get(task.official_name, task.official_name)
        )
    # No source names a licence, a Hub id or the unnamed tasks' classes: the catalogue says so.
    assert {task.licence for task in benchmark.tasks} == {"unknown"}
    assert all(task.hub is None for task in benchmark.tasks)
    assert [task.name for task in benchmark.tasks if task.official_name is None] == [
        "unnamed-18",
        "unnamed-19",
        "unnamed-20",
    ]
    known_classes = {task.name: task.classes for task in benchmark.tasks if task.classes}
    assert known_classes == {
        "banana-deficiency": (
            "boron", "calcium", "healthy", "iron", "magnesium", "manganese", "potassium", "sulphur", "zinc"
        )
    }  # fmt: skip
    published = {number["name"]: number["value"] for number in benchmark.published}
    assert published == {"mean_gain": 9.07, "banana_deficiency_top1": 23.55}


PROBE = """
import runpy, sys
sys.argv = ["evaluation.benchmarks", *sys.argv[1:]]
try:
    runpy.run_module("evaluation.benchmarks", run_name="__main__", alter_sys=True)
finally:
    print("HEAVY", sorted(name for name in ("torch", "transformers", "huggingface_hub") if name in sys.modules))
"""


@pytest.mark.parametrize("argv", [["--help"], ["list"], ["download", "cow-breed", "--to", "DATA"]])
def test_list_help_and_manual_steps_load_no_heavy_stack(tmp_path, argv):
    argv = [str(tmp_path) if item == "DATA" else item for item in argv]
    done = run_subprocess([sys.executable, "-c", PROBE, *argv], timeout=60, cwd=REPO_ROOT)
    assert done.returncode == 0, done.stderr
    assert "HEAVY []" in done.stdout
    if argv[0] == "download":
        assert "iamshahadat/cattle" in done.stdout and f"{tmp_path}/cow-breed/<class folder>/<image>" in done.stdout
        assert not (tmp_path / "cow-breed").exists()


def _catalogue(path, classes) -> str:
    """A catalogue of one Hub task, the colour leaves of `write_labelled_folder`."""
    hub = {"repo_id": REPO_ID, "folder": "test"}
    catalogue = {
        "name": "colours",
        "layout": "<data-root>/<task>/<class>/<image>",
        "paper_tasks": 2,
        "published": [
            {"name": "gain", "what": "a published gain", "value": 1.5, "unit": "points", "source": "a paper"},
            {"name": "top1", "task": "leaves", "what": "a published top-1", "value": 40.0, "unit": "%", "source": "x"},
        ],
        "tasks": [
            {"name": "leaves", "display_name": "Colour leaves", "templates": TEMPLATES, "classes": classes, "hub": hub},
            {"name": "other", "display_name": "Another task", "published_at": "a SharePoint folder"},
        ],
    }
    path.write_text(yaml.safe_dump(catalogue))
    return str(path)


class FailingDownloads:
    """Makes the loopback Hub refuse every file download (GET .../resolve/...) after the first `allowed`, as a
    dropped connection would stop a download part-way, until `stop`."""

    def __init__(self, hub, allowed: int):
        self.hub, self.original, served = hub, hub.server.RequestHandlerClass, []

        class Handler(self.original):
            def do_GET(self):
                if self.command == "GET" and "/resolve/" in self.path:
                    if len(served) >= allowed:
                        return self._error(403, "Forbidden", "connection dropped")
                    served.append(self.path)
                return super().do_GET()

        hub.server.RequestHandlerClass = Handler

    def stop(self):
        self.hub.server.RequestHandlerClass = self.original


def _resolved_downloads(hub) -> list[str]:
    return [r["path"] for r in hub.requests if r["method"] == "GET" and "/resolve/" in r["path"]]


def _independent_top1(model, processor, folder) -> float:
    """Zero-shot top-1 from the model's public API alone: cosine of normalised embeddings, argmax."""
    classes = sorted(path.name for path in folder.iterdir())
    with torch.no_grad():
        prompts = processor(text=[TEMPLATES[0].format(name) for name in classes], return_tensors="pt", padding=True)
        text = model.get_text_features(**prompts).pooler_output
        files = [(index, path) for index, name in enumerate(classes) for path in sorted((folder / name).iterdir())]
        pixel_values = processor(images=[Image.open(path).convert("RGB") for _, path in files], return_tensors="pt")
        image = model.get_image_features(pixel_values=pixel_values["pixel_values"]).pooler_output
        predictions = (F.normalize(image, dim=-1) @ F.normalize(text, dim=-1).T).argmax(dim=1).numpy()
    return float((predictions == np.array([index for index, _ in files])).mean())


def test_a_hub_task_downloads_resumes_verifies_lays_out_and_runs_as_a_suite(
    fake_hub, tmp_path, tiny_checkpoint, tiny_model, tiny_processor
):
    source = write_labelled_folder(tmp_path / "source", per_class=4)
    api = HfApi()
    api.create_repo(REPO_ID, repo_type="dataset")
    api.upload_folder(repo_id=REPO_ID, repo_type="dataset", folder_path=source, path_in_repo="test")
    api.upload_file(repo_id=REPO_ID, repo_type="dataset", path_or_fileobj=b"# colours\n", path_in_repo="README.md")
    first_commit = api.dataset_info(REPO_ID).sha
    catalogue = _catalogue(tmp_path / "catalogue.yaml", sorted(path.name for path in source.iterdir()))
    data_root = tmp_path / "data"
    n_files = 16

    # A download that stops after 5 files keeps them and says how to go on.
    failing = FailingDownloads(fake_hub, allowed=5)
    with pytest.raises(OSError, match=r"leaves: the download of .* stopped .*; 5 of 16 files are kept in .*resume"):
        benchmarks_cli.main(["download", "leaves", "--to", str(data_root), "--benchmark", catalogue])
    assert not (data_root / "leaves").exists()

    # The repo moves on meanwhile: the resumed download stays on the commit of its first try.
    changed = write_labelled_folder(tmp_path / "changed", per_class=4, seed=1)
    api.upload_folder(repo_id=REPO_ID, repo_type="dataset", folder_path=changed, path_in_repo="test")
    failing.stop()
    before = len(_resolved_downloads(fake_hub))
    benchmarks_cli.main(["download", "leaves", "--to", str(data_root), "--benchmark", catalogue])
    assert len(_resolved_downloads(fake_hub)) - before == n_files - 5  # only the files still missing
    laid_out = data_root / "leaves"
    assert sorted(p.relative_to(laid_out) for p in laid_out.rglob("*.png")) == sorted(
        p.relative_to(source) for p in source.rglob("*.png")
    )
    for path in source.rglob("*.png"):
        assert (laid_out / path.relative_to(source)).read_bytes() == path.read_bytes()
    record = json.loads((data_root / DOWNLOADS / "leaves.json").read_text())
    assert record["revision"] == first_commit
    red = source / "red" / "0.png"
    assert (
        record["sha256"]["test/red/0.png"] == file_hash(red, "sha256") != file_hash(changed / "red" / "0.png", "sha256")
    )

    # A file spoilt on disk is caught by its hash and fetched again.
    spoilt = data_root / DOWNLOADS / "leaves" / "test" / "red" / "0.png"
    spoilt.write_bytes(b"not the image")
    before = len(_resolved_downloads(fake_hub))
    benchmarks_cli.main(["download", "leaves", "--to", str(data_root), "--benchmark", catalogue])
    assert _resolved_downloads(fake_hub)[before:] == [f"/datasets/{REPO_ID}/resolve/{first_commit}/test/red/0.png"]
    assert (laid_out / "red" / "0.png").read_bytes() == red.read_bytes()

    # `suite` writes the suite YAML of what is there; `python -m evaluation.suite --benchmark` writes and runs it, and
    # scores as an independent computation does.
    benchmarks_cli.main(
        ["suite", "--benchmark", catalogue, "--data-root", str(data_root), "--output", str(tmp_path / "s.yaml")]
    )
    (written,) = load_suite_config(tmp_path / "s.yaml").datasets
    assert written.path.resolve() == laid_out.resolve() and written.templates == TEMPLATES
    output = tmp_path / "eval"
    argv = [
        "--benchmark",
        catalogue,
        "--data-root",
        data_root,
        "--model",
        f"agri={tiny_checkpoint}",
        "--output",
        output,
    ]
    code, stderr = run_as_main("evaluation.suite", argv)
    assert code == 0, stderr
    results = json.loads((output / "results.json").read_text())
    assert list(results["datasets"]) == ["leaves"]
    top1 = results["datasets"]["leaves"]["agri"]["top1"]
    assert top1 == pytest.approx(_independent_top1(tiny_model, tiny_processor, source))
    assert load_suite_config(output / "suite.yaml").datasets[0].path.resolve() == laid_out.resolve()
    report = (output / "benchmark.md").read_text()
    assert "**not measured in this run**" in report and "| a published gain | +1.5 points | a paper |" in report
    assert f"| agri | {100 * top1:.2f} % | {100 * top1:.2f} % |" in report
    assert "over 1 of the 2 tasks" in report and "Missing tasks (1): Another task (other)" in report


def test_a_benchmark_run_needs_its_data_root(tmp_path, tiny_checkpoint):
    argv = ["--benchmark", "agriclip-20", "--model", f"agri={tiny_checkpoint}", "--output", tmp_path / "out"]
    code, stderr = run_as_main("evaluation.suite", argv)
    assert code == 2 and "--benchmark and --data-root go together" in stderr
    code, stderr = run_as_main("evaluation.suite", [*argv, "--data-root", tmp_path])
    assert code == 9 and f"{tmp_path}: holds no task folder of agriclip-20" in stderr


def test_a_missing_or_renamed_class_folder_is_an_error_naming_it(tmp_path):
    catalogue = load_benchmark(_catalogue(tmp_path / "catalogue.yaml", ["blue", "green", "red", "yellow"]))
    data_root = tmp_path / "data"
    write_labelled_folder(data_root / "leaves", per_class=1)
    present, missing = write_suite(catalogue, data_root, tmp_path / "suite.yaml")
    assert [task.name for task in present] == ["leaves"] and [task.name for task in missing] == ["other"]
    (data_root / "leaves" / "red").rename(data_root / "leaves" / "Red")
    with pytest.raises(ValueError) as error:
        write_suite(catalogue, data_root, tmp_path / "suite.yaml")
    assert str(error.value) == (
        f"{data_root / 'leaves'}: missing class folder(s) red; folder(s) Red not a class of the task (renamed?); "
        "Colour leaves has the classes ['blue', 'green', 'red', 'yellow']"
    )
    shutil.rmtree(data_root / "leaves" / "Red")
    with pytest.raises(ValueError, match=r"leaves: missing class folder\(s\) red; Colour leaves has the classes"):
        write_suite(catalogue, data_root, tmp_path / "suite.yaml")


def test_a_hub_repo_without_a_catalogued_class_is_refused_before_it_is_laid_out(fake_hub, tmp_path):
    source = write_labelled_folder(tmp_path / "source", per_class=1)
    api = HfApi()
    api.create_repo(REPO_ID, repo_type="dataset")
    api.upload_folder(repo_id=REPO_ID, repo_type="dataset", folder_path=source, path_in_repo="test")
    catalogue = _catalogue(tmp_path / "catalogue.yaml", ["blue", "green", "purple", "red", "yellow"])
    with pytest.raises(ValueError, match=r"test: missing class folder\(s\) purple; Colour leaves has the classes"):
        benchmarks_cli.main(["download", "leaves", "--to", str(tmp_path / "data"), "--benchmark", catalogue])
    assert not (tmp_path / "data" / "leaves").exists()


def test_a_file_that_differs_from_its_catalogued_hash_is_refetched_then_refused(fake_hub, tmp_path):
    source = write_labelled_folder(tmp_path / "source", per_class=1)
    api = HfApi()
    api.create_repo(REPO_ID, repo_type="dataset")
    api.upload_folder(repo_id=REPO_ID, repo_type="dataset", folder_path=source, path_in_repo="test")
    path = tmp_path / "catalogue.yaml"
    catalogue = yaml.safe_load(Path(_catalogue(path, ["blue", "green", "red", "yellow"])).read_text())
    catalogue["tasks"][0]["hub"]["sha256"] = {"test/red/0.png": "0" * 64}
    path.write_text(yaml.safe_dump(catalogue))
    snapshot = tmp_path / "data" / DOWNLOADS / "leaves" / "test" / "red" / "0.png"
    with pytest.raises(
        ValueError, match=rf"{snapshot}: sha256 {file_hash(source / 'red' / '0.png', 'sha256')} differs "
    ):
        benchmarks_cli.main(["download", "leaves", "--to", str(tmp_path / "data"), "--benchmark", str(path)])
    red_downloads = [p for p in _resolved_downloads(fake_hub) if p.endswith("/test/red/0.png")]
    assert len(red_downloads) == 2 and not (tmp_path / "data" / "leaves").exists()
