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
from evaluation.metrics import HEADLINE_KEYS, METRICS
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

from conftest import full_disk


MODELS = ("agriclip (aligned)", "agriclip (clip)", "agriclip (fused)", "clip-baseline")


def suite_results(checkpoint) -> dict:
    """Results shaped as evaluation.suite writes them: two datasets, three embeddings of the checkpoint, a baseline."""
    rng = np.random.default_rng(0)

    def record(n_classes):
        # Every metric of the table (top-5 None with 5 classes or fewer), as the suite records them.
        return {
            **{
                key: None if n_classes < metric.min_classes else float(rng.uniform()) for key, metric in METRICS.items()
            },
            "n_images": 40,
            "n_skipped": 0,
            "skipped_files": [],
            "empty_classes": [],
            "confusion_matrix": [[1]],
        }

    per_dataset = {"leaf-condition": 4, "fish-species": 8}
    results = {
        "datasets": {dataset: {model: record(n) for model in MODELS} for dataset, n in per_dataset.items()},
        "dataset_info": {
            "leaf-condition": {"display_name": "Leaf condition", "split": "test"},
            "fish-species": {"display_name": "Fish species", "split": None},
        },
        "models": {
            **{
                f"agriclip ({e})": {"path": str(checkpoint), "embedding": e, "model_type": "agriclip"}
                for e in ("aligned", "clip", "fused")
            },
            "clip-baseline": {"path": "/elsewhere/clip", "embedding": None, "model_type": "clip"},
        },
    }
    results["mean"] = {
        model: {"top1": float(np.mean([results["datasets"][d][model]["top1"] for d in per_dataset]))}
        for model in MODELS
    }
    return results


TRAINING_INFO = {
    "base_model": "openai/clip-vit-base-patch16",
    "stages": {
        "stage1_contrastive": {
            "learning_rate": 5e-05,
            "batch_size": 256,
            "adam_betas": [0.9, 0.98],
            "output_dir": "/home/me/runs",
            "hub_token": "secret-value",
        },
        "stage3_align": {"solver": "closed_form", "ridge": 0.0},
    },
    "final_metrics": {"stage1_contrastive": {"train/loss": 1.234567}},
    "data": {
        "name": "ALive",
        "hub_id": "agri/alive",
        "num_pairs": 600000,
        "splits": {"train": 570000, "validation": 30000},
        "sources": ["PlantVillage", {"name": "fish-species", "pairs": 1200, "classes": 12}],
    },
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
    path = write_model_card(
        checkpoint, eval_results=results_file, training_info=TRAINING_INFO, repo_id="agri/agriclip-tiny"
    )

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


def test_every_metric_of_the_table_is_in_the_model_index(checkpoint):
    """A row of `evaluation.metrics.METRICS` is all it takes: the model-index lists it per dataset under its Hub id,
    arguments and title, the card's `metrics` its Hub id, and the headline metrics get a table."""
    results = suite_results(checkpoint)
    card = build_model_card(checkpoint, eval_results=results)
    entries = card.data.eval_results
    for key, metric in METRICS.items():
        values = [e.metric_value for e in entries if (e.metric_type, e.metric_name) == (metric.hub_type, metric.title)]
        expected = [models["agriclip (aligned)"][key] for models in results["datasets"].values()]
        assert values == [value for value in expected if value is not None] and values
        assert all(
            e.metric_args == (None if metric.hub_args is None else dict(metric.hub_args))
            for e in entries
            if e.metric_type == metric.hub_type
        )
        assert metric.hub_type in card.data.metrics
        assert (f"### {metric.title}" in card.content) == (key in HEADLINE_KEYS)
    assert "ece" in METRICS and len(entries) == sum(
        len(values)
        for values in (
            [k for k in METRICS if models["agriclip (aligned)"][k] is not None]
            for models in results["datasets"].values()
        )
    )


def test_card_without_results_or_training_info(checkpoint):
    card = build_model_card(checkpoint)
    data = yaml.safe_load(card.content.split("---\n")[1])
    assert "model-index" not in data and "base_model" not in data
    assert "No evaluation results were recorded" in card.content
    assert "not recorded in its card" in card.content
    assert 'model="<org>/<name>"' in card.content and str(checkpoint) not in card.content  # no local path leaks
    assert ModelCard(str(card)).data.license == "apache-2.0"


@pytest.mark.parametrize(
    "objective, account",
    [
        ("image-mse", "by minimising the mean squared error to the CLIP image embedding of each image"),
        ("text-mse", "by least squares onto the CLIP text embeddings of each image's captions"),
        ("contrastive", "by image-to-text InfoNCE against the CLIP text embeddings of each image's captions"),
    ],
)
def test_the_card_says_what_stage_3_fitted_and_the_fusion_weight_it_chose(checkpoint, objective, account):
    config = AgriCLIPConfig.from_pretrained(checkpoint)
    config.alignment_objective, config.fusion_weight = objective, 0.7
    config.save_pretrained(checkpoint)
    text = build_model_card(checkpoint).content
    stage3 = text.split("3. **Cross-model alignment.**")[1].split("| Part |")[0]
    assert account in " ".join(stage3.split()) and f"`alignment_objective: {objective}`" in stage3
    assert "`fusion_weight`, the CLIP share, is\n0.7)" in text


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
    write_run(
        tmp_path / "stage1",
        "stage1_contrastive",
        {"learning_rate": 1e-4},
        [
            {"step": 1, "train/loss": 3.0, "lr": 1e-4},
            {"step": 2, "train/loss": 2.0},
            {"step": 2, "val/recall@1": 0.5},
        ],
    )
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
    assert (
        agriclip(
            [
                "card",
                str(checkpoint),
                "--eval-results",
                str(tmp_path / "results.json"),
                "--run-dir",
                str(tmp_path / "runs"),
                "--train-data",
                str(tmp_path / "alive"),
                "--training-info",
                str(tmp_path / "info.json"),
                "--repo-id",
                "agri/cli-card",
            ]
        )
        == 0
    )
    text = (checkpoint / "README.md").read_text()
    assert "# cli-card" in text and "`learning_rate` | 2e-05" in text
    assert (
        "**ALive-mini** ([`agri/alive-mini`](https://huggingface.co/datasets/agri/alive-mini)), 8 image-caption pairs"
        in text
    )
    assert "| train | 6 |" in text and "| leaves | 2 | a photo of a healthy leaves | 6 |" in text
    # Every metric of the table on both datasets, but top-5 only where a dataset has > 5 classes.
    assert len(ModelCard.load(checkpoint / "README.md").data.eval_results) == 2 * (len(METRICS) - 1) + 1
    # The LoRA recipe targets the tower behind the checkpoint's image embedding ("aligned": the backbone).
    assert 'target_modules=r"(?:dino_model' in text and "--towers backbone" in text


def test_read_training_info_records_where_the_weights_started(tmp_path):
    """From the first stage's `model` flag: a preset or a JSON config file is a random start; stage 2 may replace
    the backbone's start."""
    cases = [
        ("tiny", {}, {"model": "tiny", "random": True}),
        ("my_config.json", {}, {"model": "my_config.json", "random": True}),
        ("checkpoints/from-clip", {}, {"model": "checkpoints/from-clip", "random": False}),
        (
            "checkpoints/from-clip",
            {"random_init": True},
            {"model": "checkpoints/from-clip", "random": False, "backbone": {"model": None, "random": True}},
        ),
        ("tiny", {"random_init": True}, {"model": "tiny", "random": True}),  # random all along
        (
            "tiny",
            {"backbone": "facebook/dinov2-small"},
            {"model": "tiny", "random": True, "backbone": {"model": "facebook/dinov2-small", "random": False}},
        ),
    ]
    for index, (model, stage2_flags, expected) in enumerate(cases):
        run_dir = tmp_path / str(index)
        write_run(run_dir / "stage1", "stage1_contrastive", {"model": model}, [])
        write_run(run_dir / "stage2", "stage2_dino", {"model": str(run_dir / "stage1" / "final"), **stage2_flags}, [])
        assert read_training_info(run_dir)["initialisation"] == expected, model
    write_run(tmp_path / "unrecorded", "stage1_contrastive", {"learning_rate": 1e-4}, [])
    assert "initialisation" not in read_training_info(tmp_path / "unrecorded")


def card_text(checkpoint, training_info, results=None) -> tuple[str, str]:
    """The card's text and the part of it before the model description (its opening)."""
    text = build_model_card(checkpoint, eval_results=results, training_info=training_info).content
    return text, text.split("## Model description")[0]


def test_the_card_says_plainly_that_a_demo_run_started_from_random_weights_on_synthetic_data(checkpoint, tmp_path):
    """Read from the run: the stage log's `model` (the tiny preset) and the data marked synthetic."""
    write_run(tmp_path / "run" / "stage1", "stage1_contrastive", {"model": "tiny"}, [])
    info = {**read_training_info(tmp_path / "run"), "data": {"name": "ALive-mini (embedded)", "synthetic": True}}
    text, opening = card_text(checkpoint, info, suite_results(checkpoint))
    assert "**What these numbers mean.**" in opening
    assert "started from random weights (the `tiny` preset), not from pretrained CLIP or DINO models" in opening
    assert (
        "trained on **ALive-mini (embedded)**, a synthetic dataset of procedurally drawn images (`training.embedded`), "
        "not on photos"
    ) in opening
    assert "its accuracies demonstrate that the pipeline works, not the paper's result" in opening
    assert "A CLIP dual encoder is trained from random weights" in text and "fine-tuned" not in text
    # No sentence that holds only for a CLIP start or for photos.
    assert "start from CLIP" not in text and "photographed in laboratories" not in text
    assert "drawn procedurally (`training.embedded`), not photographed" in text


def test_the_card_of_a_pretrained_start_on_real_data_says_so(checkpoint, tmp_path):
    write_run(tmp_path / "run" / "stage1", "stage1_contrastive", {"model": "checkpoints/agriclip-from-clip"}, [])
    info = {**TRAINING_INFO, **read_training_info(tmp_path / "run")}
    text, opening = card_text(checkpoint, info)
    assert (
        "**What these numbers mean.** The towers of this checkpoint started from the weights of "
        "`openai/clip-vit-base-patch16`. It was trained on **ALive**."
    ) in opening
    for claim in ("random", "synthetic", "not the paper's result"):
        assert claim not in opening
    assert "is fine-tuned on agricultural image-caption pairs" in text and "start from CLIP" in text
    # Without a base model the card names the folder the run started from.
    _, opening = card_text(checkpoint, {**info, "base_model": None})
    assert "started from the weights of `checkpoints/agriclip-from-clip`." in opening
    # Nothing recorded: no note, nothing assumed.
    _, opening = card_text(checkpoint, {})
    assert "What these numbers mean" not in opening


def test_the_card_shows_chance_levels_the_fine_grained_mean_and_any_extra_model(checkpoint):
    """Results as run_suite writes them, with a fine-grained dataset and an extra model (an equal-compute control)
    in the same run: the tables hold its row and a Chance row, and the text puts the checkpoint's means beside
    their chance levels."""
    results = suite_results(checkpoint)
    control = "clip-control (clip)"
    results["models"][control] = {"path": "/elsewhere/control", "embedding": "clip", "model_type": "agriclip"}
    for dataset, n_classes in (("leaf-condition", 4), ("fish-species", 8)):
        results["datasets"][dataset][control] = dict(results["datasets"][dataset]["clip-baseline"], top1=0.625)
        results["dataset_info"][dataset]["chance"] = {
            "top1": 1 / n_classes,
            "top5": None if n_classes <= 5 else 5 / n_classes,
            "mean_per_class": 1 / n_classes,
        }
        results["dataset_info"][dataset]["fine_grained"] = dataset == "fish-species"
    per_model = {
        model: [results["datasets"][d][model]["top1"] for d in results["datasets"]] for model in (*MODELS, control)
    }
    results["mean"] = {model: {"top1": float(np.mean(values)), "n_datasets": 2} for model, values in per_model.items()}
    results["mean_fine_grained"] = {model: {"top1": values[1], "n_datasets": 1} for model, values in per_model.items()}
    results["chance"] = {"mean": {"top1": (1 / 4 + 1 / 8) / 2}, "mean_fine_grained": {"top1": 1 / 8}}
    text = build_model_card(checkpoint, eval_results=results).content
    top1 = text.split("### Top-1 accuracy\n\n")[1].split("\n\n")[0].splitlines()
    assert top1[0] == "| Model | Leaf condition | Fish species | Mean | Fine-grained mean |"
    assert f"| {control} | 62.5 | 62.5 | 62.5 | 62.5 |" in top1
    assert top1[-1] == "| Chance | 25.0 | 12.5 | 18.8 | 12.5 |"
    aligned = per_model["agriclip (aligned)"]
    assert (
        f"agriclip (aligned): mean top-1 accuracy {100 * np.mean(aligned):.1f} % over the 2 tasks (chance 18.8 %); "
        f"{100 * aligned[1]:.1f} % over the fine-grained tasks (chance 12.5 %)."
    ) in text
    assert "The fine-grained mean is over the fine-grained tasks: Fish species." in text
    # The extra model is a row, not this checkpoint: the model-index stays the checkpoint's own.
    assert {e.metric_value for e in ModelCard(text).data.eval_results} >= set(aligned)
    assert 0.625 not in {e.metric_value for e in ModelCard(text).data.eval_results}


def test_the_card_says_which_row_is_a_baseline_and_indexes_only_the_checkpoint_s_own(checkpoint):
    """As training.run_all writes it: the checkpoint (image embedding `clip`) evaluated from its stage-3 folder beside
    an equal-compute control, an AgriCLIP folder evaluated with `clip` too. Only the name run_all passes tells them
    apart; the card names the control's row and keeps it out of the model-index."""
    config = AgriCLIPConfig.from_pretrained(checkpoint)
    config.image_embedding = "clip"
    config.save_pretrained(checkpoint)
    results = suite_results(checkpoint)
    control = "clip-control (clip)"
    for name in ("agriclip (aligned)", "agriclip (clip)", "agriclip (fused)"):
        results["models"][name]["path"] = "/run/stage3/final"
    results["models"][control] = {"path": "/run/control/final", "embedding": "clip", "model_type": "agriclip"}
    for dataset in results["datasets"]:
        results["datasets"][dataset][control] = dict(results["datasets"][dataset]["clip-baseline"], top1=0.625)
    results["mean"][control] = {"top1": 0.625, "n_datasets": 2}
    with pytest.raises(ValueError, match=r"candidates \['agriclip \(clip\)', 'clip-control \(clip\)'\]"):
        build_model_card(checkpoint, eval_results=results)
    baselines = {control: "the equal-compute CLIP control: stage 1 alone for 18 epochs"}
    text = build_model_card(
        checkpoint, eval_results=results, training_info={"baselines": baselines}, eval_model="agriclip (clip)"
    ).content
    assert f"| {control} | 62.5 | 62.5 |" in text and "the row\n**agriclip (clip)**" in text
    assert (
        "**clip-control (clip)** is the equal-compute CLIP control: stage 1 alone for 18 epochs. clip-control "
        "(clip): mean top-1 accuracy 62.5 % over the 2 tasks."
    ) in text
    own = results["datasets"]
    assert sorted(e.metric_value for e in ModelCard(text).data.eval_results) == sorted(
        own[d]["agriclip (clip)"][key]
        for d in own
        for key in METRIC_TYPES
        if own[d]["agriclip (clip)"][key] is not None
    )
    with pytest.raises(ValueError, match=r"baseline\(s\) \['clip-control \(lora\)'\] not in the evaluation results"):
        build_model_card(
            checkpoint,
            eval_results=results,
            training_info={"baselines": {"clip-control (lora)": "x"}},
            eval_model="agriclip (clip)",
        )


def test_describe_caption_data(tmp_path):
    data = describe_caption_data(write_alive_folder(tmp_path / "alive"), name="ALive-mini")
    assert data == {
        "name": "ALive-mini",
        "num_pairs": 8,
        "splits": {"train": 6, "validation": 2},
        "split_folders": {"train": "imagefolder/train", "validation": "imagefolder/validation"},
        "sources": [
            {"name": "fish", "pairs": 2, "classes": 1, "example caption": "a photo of a goby fish"},
            {"name": "leaves", "pairs": 6, "classes": 2, "example caption": "a photo of a healthy leaves"},
        ],
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
            Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(
                root / "imagefolder" / split / "0000" / f"{index}.png"
            )
            caption = f"a photo of a {label} {source}"
            rows.append(
                {
                    "file_name": f"0000/{index}.png",
                    "caption": caption,
                    "captions": [caption],
                    "source": source,
                    "label": label,
                }
            )
        (root / "imagefolder" / split / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    (root / "webdataset" / "train").mkdir(parents=True)
    (root / "webdataset" / "train" / "shard-0.tar").write_bytes(b"\0" * 1024)
    (root / "build_report.json").write_text(
        json.dumps({"decode_summary": "8 images decoded, 1 skipped.", "duplicates": [{"dropped": "x"}]})
    )
    return root


def test_dataset_card_describes_and_loads_the_folder(tmp_path):
    folder = write_alive_folder(tmp_path / "alive")
    path = write_dataset_card(folder, repo_id="agri/alive-mini", description="A tiny ALive build.")
    metadata = front_matter(path)
    assert metadata["configs"] == [
        {
            "config_name": "default",
            "data_files": [
                {"split": "train", "path": "imagefolder/train/**"},
                {"split": "validation", "path": "imagefolder/validation/**"},
            ],
        }
    ]
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


def test_the_card_shows_the_embedding_chosen_per_task_beside_the_best_fixed_one_and_chance(checkpoint):
    results = suite_results(checkpoint)
    runs = [
        {"seed": 0, "chosen": "clip", "fusion_weight": 1.0, "shots_top1": 0.5, "test_top1": 0.45, "n_shots": 16},
        {"seed": 1, "chosen": "fused@0.3", "fusion_weight": 0.3, "shots_top1": 0.5, "test_top1": 0.41, "n_shots": 16},
    ]
    fixed = {"agriclip (aligned)": 0.3, "agriclip (clip)": 0.45, "agriclip (fused)": 0.44}
    results["dataset_info"]["leaf-condition"]["chance"] = {"top1": 0.25}
    results["selection"] = {
        "shots": 4,
        "datasets": {
            "leaf-condition": {
                "agriclip": {
                    "selected": runs,
                    "test_top1": 0.43,
                    "fixed": fixed,
                    "best_fixed": "agriclip (clip)",
                    "oracle": "fused@0.8",
                    "oracle_top1": 0.47,
                    "n_test": 40,
                }
            }
        },
        "mean": {
            "agriclip": {
                "selected_top1": 0.43,
                "fixed_top1": fixed,
                "best_fixed_in_hindsight": "agriclip (clip)",
                "best_fixed_in_hindsight_top1": 0.45,
                "best_fixed_per_task_top1": 0.45,
                "oracle_top1": 0.47,
                "n_datasets": 1,
            }
        },
        "chance": {"mean": 0.25},
    }
    text = build_model_card(checkpoint, eval_results=results).content
    section = text.split("### Image embedding chosen per task from 4 shots per class", 1)[1].split("\n## ", 1)[0]
    assert "Chosen on train-split shots only" in section
    row = next(line for line in section.splitlines() if line.startswith("| Leaf condition"))
    assert [cell.strip() for cell in row.strip("|").split("|")] == [
        "Leaf condition",
        "agriclip",
        "clip, fused@0.3",
        "43.0",
        "agriclip (clip) 45.0",
        "fused@0.8 47.0",
        "25.0",
    ]
    assert "one fixed mode in hindsight: agriclip (clip) 45.0" in section
    assert (
        "Image embedding chosen per task"
        not in build_model_card(checkpoint, eval_results=suite_results(checkpoint)).content
    )
