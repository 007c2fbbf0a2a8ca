"""Model and dataset cards: YAML that parses back, model-index equal to the evaluation JSON, data read from the run."""

import errno
import json
import shutil
from functools import partial

import datasets
import numpy as np
import pytest
import yaml
from huggingface_hub import DatasetCard, ModelCard
from huggingface_hub.repocard_data import model_index_to_eval_results
from PIL import Image

from agriclip.cli import main as agriclip
from conftest import full_disk
from model_card.card import (
    METRIC_TYPES,
    build_dataset_card,
    build_model_card,
    describe_caption_data,
    read_training_info,
    select_eval_model,
    write_dataset_card,
    write_model_card,
)
from modeling_agriclip import AgriCLIPConfig

MODELS = ("agriclip (aligned)", "agriclip (clip)", "agriclip (fused)", "clip-baseline")


def suite_results(checkpoint) -> dict:
    """Results shaped as evaluation.suite writes them: two datasets, three embeddings of the checkpoint, a baseline."""
    rng = np.random.default_rng(0)

    def record(n_classes):
        return {
            "top1": float(rng.uniform()), "top5": None if n_classes <= 5 else float(rng.uniform()),
            "mean_per_class": float(rng.uniform()), "macro_f1": float(rng.uniform()),
            "n_images": 40, "n_skipped": 0, "skipped_files": [], "empty_classes": [], "confusion_matrix": [[1]],
        }

    per_dataset = {"leaf-condition": 4, "fish-species": 8}
    results = {
        "datasets": {dataset: {model: record(n) for model in MODELS} for dataset, n in per_dataset.items()},
        "dataset_info": {
            "leaf-condition": {"display_name": "Leaf condition", "split": "test"},
            "fish-species": {"display_name": "Fish species", "split": None},
        },
        "models": {
            **{f"agriclip ({e})": {"path": str(checkpoint), "embedding": e, "model_type": "agriclip"} for e in ("aligned", "clip", "fused")},
            "clip-baseline": {"path": "/elsewhere/clip", "embedding": None, "model_type": "clip"},
        },
    }
    results["mean"] = {model: {"top1": float(np.mean([results["datasets"][d][model]["top1"] for d in per_dataset]))} for model in MODELS}
    return results


TRAINING_INFO = {
    "base_model": "openai/clip-vit-base-patch16",
    "stages": {
        "stage1_contrastive": {"learning_rate": 5e-05, "batch_size": 256, "adam_betas": [0.9, 0.98], "output_dir": "/home/me/runs", "hub_token": "secret-value"},
        "stage3_align": {"solver": "closed_form", "ridge": 0.0},
    },
    "final_metrics": {"stage1_contrastive": {"train/loss": 1.234567}},
    "data": {"name": "ALive", "hub_id": "agri/alive", "num_pairs": 600000, "splits": {"train": 570000, "validation": 30000},
             "sources": ["PlantVillage", {"name": "fish-species", "pairs": 1200, "classes": 12}]},
}


@pytest.fixture
def checkpoint(tiny_checkpoint, tmp_path):
    """A private copy of the tiny checkpoint, so writing a card does not touch the shared one."""
    return shutil.copytree(tiny_checkpoint, tmp_path / "agriclip-tiny")


def front_matter(path) -> dict:
    text = path.read_text(encoding="utf-8")
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def test_card_yaml_parses_back_and_model_index_equals_the_eval_json(checkpoint, tmp_path):
    results = suite_results(checkpoint)
    results_file = tmp_path / "results.json"
    results_file.write_text(json.dumps(results))
    path = write_model_card(checkpoint, eval_results=results_file, training_info=TRAINING_INFO, repo_id="agri/agriclip-tiny")

    assert path == checkpoint / "README.md"
    metadata = front_matter(path)
    assert metadata["license"] == "apache-2.0" and metadata["pipeline_tag"] == "zero-shot-image-classification"
    assert metadata["library_name"] == "transformers"
    assert metadata["base_model"] == "openai/clip-vit-base-patch16" and metadata["datasets"] == ["agri/alive"]
    model_name, entries = model_index_to_eval_results(metadata["model-index"])
    assert model_name == "agriclip-tiny"
    from_card = {(e.dataset_type, e.metric_type, json.dumps(e.metric_args)): e.metric_value for e in entries}
    expected = {
        (dataset, METRIC_TYPES[key][0], json.dumps(METRIC_TYPES[key][1])): record[key]
        for dataset, models in results["datasets"].items()
        for key, record in ((key, models["agriclip (aligned)"]) for key in METRIC_TYPES)
        if record[key] is not None
    }
    assert from_card == expected
    assert {e.dataset_name for e in entries} == {"Leaf condition", "Fish species"}
    assert {e.dataset_split for e in entries if e.dataset_type == "leaf-condition"} == {"test"}
    # The same through huggingface_hub's own card parser.
    assert len(ModelCard.load(path).data.eval_results) == len(expected)

    text = path.read_text()
    for model in MODELS:  # the table shows every model side by side
        assert f"| {model} |" in text
    aligned = results["datasets"]["leaf-condition"]["agriclip (aligned)"]["top1"]
    assert f"{100 * aligned:.1f}" in text
    assert "`learning_rate` | 5e-05" in text and "`adam_betas` | 0.9, 0.98" in text and "`train/loss` = 1.235" in text
    assert "output_dir" not in text and "hub_token" not in text and "secret-value" not in text
    assert "600,000 image-caption pairs" in text and "| fish-species | 12 | 1200 |" in text
    assert 'from_pretrained("agri/agriclip-tiny", revision="main")' in text and "trust_remote_code=True" in text
    assert "arXiv" in text and "9630--9639" in text and "Nawaz, Umair" in text


def test_card_without_results_or_training_info(checkpoint):
    card = build_model_card(checkpoint)
    data = yaml.safe_load(card.content.split("---\n")[1])
    assert "model-index" not in data and "base_model" not in data
    assert "No evaluation results were recorded" in card.content
    assert "not recorded in its card" in card.content
    assert 'model="<org>/<name>"' in card.content and str(checkpoint) not in card.content  # no local path leaks
    assert ModelCard(str(card)).data.license == "apache-2.0"


def test_eval_model_follows_the_checkpoint_image_embedding(tmp_path):
    results = suite_results(tmp_path)
    assert select_eval_model(results, AgriCLIPConfig.tiny(image_embedding="fused"), tmp_path) == "agriclip (fused)"
    assert select_eval_model(results, AgriCLIPConfig.tiny(), tmp_path) == "agriclip (aligned)"
    # Two evaluated folders with the same embedding: the one at the checkpoint's path wins ...
    results["models"]["other (aligned)"] = {"path": "/elsewhere", "embedding": "aligned", "model_type": "agriclip"}
    assert select_eval_model(results, AgriCLIPConfig.tiny(), tmp_path) == "agriclip (aligned)"
    # ... and when none is, the error names the candidates.
    with pytest.raises(ValueError, match=r"candidates \['agriclip \(aligned\)', 'other \(aligned\)'\].*eval_model"):
        select_eval_model(results, AgriCLIPConfig.tiny(), tmp_path / "unrelated")


def test_bad_eval_results_name_the_problem(checkpoint, tmp_path):
    broken = tmp_path / "results.json"
    broken.write_text("{not json")
    with pytest.raises(ValueError, match="results.json is not valid JSON"):
        build_model_card(checkpoint, eval_results=broken)
    with pytest.raises(ValueError, match="lacks the 'datasets' and 'mean' sections"):
        build_model_card(checkpoint, eval_results={"top1": 0.5})
    with pytest.raises(ValueError, match="model 'nope' is not in the evaluation results"):
        build_model_card(checkpoint, eval_results=suite_results(checkpoint), eval_model="nope")


def write_run(run_dir, name, flags, rows):
    logs = run_dir / "logs" / name
    logs.mkdir(parents=True)
    (logs / "config.json").write_text(json.dumps(flags))
    (logs / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))


def test_read_training_info_from_run_logs(tmp_path):
    write_run(tmp_path / "stage3", "stage3_align", {"solver": "closed_form"}, [])
    write_run(tmp_path / "stage1", "stage1_contrastive", {"learning_rate": 1e-4}, [
        {"step": 1, "train/loss": 3.0, "lr": 1e-4}, {"step": 2, "train/loss": 2.0}, {"step": 2, "val/recall@1": 0.5},
    ])
    info = read_training_info(tmp_path)
    assert list(info["stages"]) == ["stage1_contrastive", "stage3_align"]
    assert info["stages"]["stage1_contrastive"] == {"learning_rate": 1e-4}
    assert info["final_metrics"] == {"stage1_contrastive": {"train/loss": 2.0, "lr": 1e-4, "val/recall@1": 0.5}}
    write_run(tmp_path / "again", "stage3_align", {}, [])
    with pytest.raises(ValueError, match="two runs named 'stage3_align'"):
        read_training_info(tmp_path)
    with pytest.raises(FileNotFoundError, match="no training run logs"):
        read_training_info(tmp_path / "stage3" / "logs" / "stage3_align")


def test_card_command_line(checkpoint, tmp_path):
    write_run(tmp_path / "runs", "stage1_contrastive", {"learning_rate": 2e-5}, [{"step": 5, "train/loss": 0.5}])
    (tmp_path / "results.json").write_text(json.dumps(suite_results(checkpoint)))
    (tmp_path / "info.json").write_text(json.dumps({"data": {"name": "ALive-mini", "hub_id": "agri/alive-mini"}}))
    write_alive_folder(tmp_path / "alive")
    assert agriclip(["card", str(checkpoint), "--eval-results", str(tmp_path / "results.json"), "--run-dir",
                     str(tmp_path / "runs"), "--train-data", str(tmp_path / "alive"), "--training-info",
                     str(tmp_path / "info.json"), "--repo-id", "agri/cli-card"]) == 0
    text = (checkpoint / "README.md").read_text()
    assert "# cli-card" in text and "`learning_rate` | 2e-05" in text
    assert "**ALive-mini** ([`agri/alive-mini`](https://huggingface.co/datasets/agri/alive-mini)), 8 image-caption pairs" in text
    assert "| train | 6 |" in text and "| leaves | 2 | a photo of a healthy leaves | 6 |" in text
    assert len(ModelCard.load(checkpoint / "README.md").data.eval_results) == 2 * 3 + 1  # top-5 only where a dataset has > 5 classes
    # The LoRA recipe targets the tower behind the checkpoint's image embedding ("aligned": the backbone).
    assert 'target_modules=r"(?:dino_model' in text and "--towers backbone" in text


def test_describe_caption_data(tmp_path):
    data = describe_caption_data(write_alive_folder(tmp_path / "alive"), name="ALive-mini")
    assert data == {
        "name": "ALive-mini", "num_pairs": 8, "splits": {"train": 6, "validation": 2},
        "split_folders": {"train": "imagefolder/train", "validation": "imagefolder/validation"},
        "sources": [{"name": "fish", "pairs": 2, "classes": 1, "example caption": "a photo of a goby fish"},
                    {"name": "leaves", "pairs": 6, "classes": 2, "example caption": "a photo of a healthy leaves"}],
    }


def write_alive_folder(root, n_train=6, n_validation=2):
    """The layout training.alive writes: imagefolder/<split>/<shard>/<key>.png, metadata.jsonl, build_report.json,
    plus a webdataset/ folder that the card's configs must keep out of the default config."""
    rng = np.random.default_rng(0)
    sources = [("leaves", "healthy"), ("leaves", "rust"), ("fish", "goby")]
    for split, count in (("train", n_train), ("validation", n_validation)):
        rows = []
        for index in range(count):
            source, label = sources[index % len(sources)]
            (root / "imagefolder" / split / "0000").mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(root / "imagefolder" / split / "0000" / f"{index}.png")
            caption = f"a photo of a {label} {source}"
            rows.append({"file_name": f"0000/{index}.png", "caption": caption, "captions": [caption], "source": source, "label": label})
        (root / "imagefolder" / split / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    (root / "webdataset" / "train").mkdir(parents=True)
    (root / "webdataset" / "train" / "shard-0.tar").write_bytes(b"\0" * 1024)
    (root / "build_report.json").write_text(json.dumps({"decode_summary": "8 images decoded, 1 skipped.", "duplicates": [{"dropped": "x"}]}))
    return root


def test_dataset_card_describes_and_loads_the_folder(tmp_path):
    folder = write_alive_folder(tmp_path / "alive")
    path = write_dataset_card(folder, repo_id="agri/alive-mini", description="A tiny ALive build.")
    metadata = front_matter(path)
    assert metadata["configs"] == [{"config_name": "default", "data_files": [
        {"split": "train", "path": "imagefolder/train/**"}, {"split": "validation", "path": "imagefolder/validation/**"}]}]
    assert metadata["license"] == "other" and metadata["size_categories"] == "n<1K"
    assert DatasetCard.load(path).data.pretty_name == "alive-mini"
    text = path.read_text()
    assert "| train | 6 | `imagefolder/train` |" in text and "| leaves | 6 | 2 | a photo of a healthy leaves |" in text
    assert "1 skipped. 1 exact duplicate" in text and "A tiny ALive build." in text
    assert 'load_dataset("agri/alive-mini")' in text
    # The card's configs are what `load_dataset` follows (the WebDataset shard would otherwise be mixed in).
    loaded = datasets.load_dataset(str(folder), cache_dir=str(tmp_path / "cache"))
    assert {split: len(loaded[split]) for split in loaded} == {"train": 6, "validation": 2}
    assert loaded["train"][1]["caption"] == "a photo of a rust leaves" and loaded["train"][1]["image"].size == (16, 16)


def test_dataset_card_errors_name_the_folder(tmp_path):
    with pytest.raises(ValueError, match="holds no image-caption split"):
        build_dataset_card(tmp_path)
    folder = write_alive_folder(tmp_path / "alive")
    shutil.copytree(folder / "imagefolder" / "train", folder / "copy" / "train")
    with pytest.raises(ValueError, match="two folders hold split 'train'"):
        build_dataset_card(folder)


@pytest.mark.parametrize("kind", ["model", "dataset"])
def test_a_full_disk_leaves_the_previous_card_as_it_was(checkpoint, tmp_path, monkeypatch, kind):
    folder = checkpoint if kind == "model" else write_alive_folder(tmp_path / "alive")
    write = partial(write_model_card if kind == "model" else write_dataset_card, folder)
    previous = write(repo_id="agri/first").read_bytes()
    entries = sorted(folder.rglob("*"))
    full_disk(monkeypatch, folder, room=len(previous) // 2)
    with pytest.raises(OSError) as failure:
        write(repo_id="agri/second")
    monkeypatch.undo()
    assert failure.value.errno == errno.ENOSPC
    assert (folder / "README.md").read_bytes() == previous
    assert sorted(folder.rglob("*")) == entries  # no half-written temporary file left behind
    assert b"agri/second" in write(repo_id="agri/second").read_bytes()  # and the disk, freed, takes the new card
