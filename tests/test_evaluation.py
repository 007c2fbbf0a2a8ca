"""The evaluation suite end to end, its error handling, and the linear probe, retrieval and report pieces."""

import argparse
import contextlib
import errno
import io
import json
import logging
import os
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from matplotlib.figure import Figure
from PIL import Image

from agriclip.errors import ExitCode
from agriclip.templates import get_templates
from evaluation.knn import knn_accuracy
from evaluation.linear_probe import (
    LinearProbe,
    fit_logistic_regression,
    k_shot_probe,
    linear_probe,
    sample_k_shot,
    select_l2,
    stratified_split,
)
from evaluation.metrics import CHANCE_KEYS, METRICS, NonFiniteError, chance_levels, classification_metrics
from evaluation.report import (
    confusion_matrix_figure,
    grouped_bars_figure,
    render_markdown_report,
    render_markdown_table,
)
from evaluation.retrieval import group_by, group_captions, retrieval_recall
from evaluation.runner import run_suite
from evaluation.suite import ModelSpec, load_suite_config, main, parse_model_argument
from modeling_agriclip.zero_shot import ZeroShotClassifier
from training.embedded import build_embedded_dataset

from conftest import run_as_main, write_caption_folder


EMBEDDED_TASKS = ("leaf-spot", "fish-species", "cattle-breed")


@pytest.fixture(scope="module")
def embedded_suite(tmp_path_factory):
    """Three embedded downstream tasks, one unreadable image among them, and their suite YAML."""
    root = build_embedded_dataset(
        tmp_path_factory.mktemp("embedded"), image_size=32, pretrain_per_class=1, downstream_per_task=12, num_workers=1
    )
    suite = yaml.safe_load((root / "suite.yaml").read_text())
    suite["datasets"] = [entry for entry in suite["datasets"] if entry["name"] in EMBEDDED_TASKS]
    config = root / "suite-three.yaml"
    config.write_text(yaml.safe_dump(suite, sort_keys=False))
    (root / "downstream" / "fish-species" / "goby" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    return config


@pytest.fixture(scope="module")
def suite_run(embedded_suite, tiny_checkpoint, tiny_clip_checkpoint, tmp_path_factory):
    """The command line over three tasks and two models (AgriCLIP with two embedding sources, a CLIP baseline).

    Returns the results, the output folder and what the command printed.
    """
    output = tmp_path_factory.mktemp("report")
    argv = [
        "--config",
        str(embedded_suite),
        "--model",
        f"agriclip={tiny_checkpoint}:aligned,clip",
        "--model",
        f"clip={tiny_clip_checkpoint}",
        "--output",
        str(output),
        "--batch-size",
        "4",
    ]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        results = main(argv)
    return results, output, printed.getvalue()


def test_suite_writes_json_markdown_and_plots(suite_run):
    results, output, printed = suite_run
    models = ["agriclip (aligned)", "agriclip (clip)", "clip"]
    saved = json.loads((output / "results.json").read_text())
    assert list(saved["datasets"]) == list(EMBEDDED_TASKS)
    for task in EMBEDDED_TASKS:
        assert list(saved["datasets"][task]) == models
        for record in saved["datasets"][task].values():
            assert 0.0 <= record["top1"] <= 1.0 and 0.0 <= record["mean_per_class"] <= 1.0
            assert 0.0 <= record["macro_f1"] <= 1.0 and record["empty_classes"] == []
        assert saved["dataset_info"][task]["warnings"] == []  # every class has its own prompts
    assert saved["models"]["agriclip (clip)"]["embedding"] == "clip"
    assert saved["models"]["clip"]["model_type"] == "clip"
    # Top-5 only where there are more than five classes: leaf-spot has 3, fish-species 8.
    assert saved["datasets"]["leaf-spot"]["clip"]["top5"] is None
    assert saved["datasets"]["fish-species"]["clip"]["top5"] >= saved["datasets"]["fish-species"]["clip"]["top1"]
    for model in models:
        top1 = [saved["datasets"][task][model]["top1"] for task in EMBEDDED_TASKS]
        assert saved["mean"][model]["top1"] == pytest.approx(np.mean(top1))
        assert saved["mean"][model]["n_datasets"] == 3
    # The unreadable image is skipped, counted and named.
    fish = saved["datasets"]["fish-species"]["clip"]
    assert fish["n_skipped"] == 1 and fish["skipped_files"][0].endswith("goby/broken.png")
    assert fish["n_images"] == sum(map(sum, fish["confusion_matrix"])) == 8
    markdown = (output / "results.md").read_text()
    assert render_markdown_table(saved) in markdown
    assert "| Model | Leaf spot diseases (fine-grained) | Fish species | Cattle breed | Mean |" in markdown
    assert "broken.png" in markdown
    assert render_markdown_table(saved) in printed
    plots = sorted(path.name for path in (output / "plots").glob("*.png"))
    assert plots == [
        "confusion_cattle-breed.png",
        "confusion_fish-species.png",
        "confusion_leaf-spot.png",
        "zero_shot_top1.png",
    ]
    for name in plots:
        with Image.open(output / "plots" / name) as image:
            assert image.format == "PNG" and image.width > 100


def test_every_metric_of_the_table_is_in_the_results_and_the_report(suite_run):
    """A row of `evaluation.metrics.METRICS` is all it takes: each dataset record and each mean holds it, the chance
    levels hold those that have one, and the report has its table, an error's titled "lower is better"."""
    results, output, _ = suite_run
    saved = json.loads((output / "results.json").read_text())
    markdown = (output / "results.md").read_text()
    for key, metric in METRICS.items():
        for task in EMBEDDED_TASKS:
            for record in saved["datasets"][task].values():
                assert key in record
                if key != "top5":  # None with 5 classes or fewer
                    assert 0.0 <= record[key] <= 1.0
            assert (key in saved["dataset_info"][task]["chance"]) == (key in CHANCE_KEYS)
        for record in saved["mean"].values():
            assert record[key] is not None
        assert (key in saved["chance"]["mean"]) == (metric.chance is not None)
        heading = metric.title if metric.higher_is_better else f"{metric.title} (lower is better)"
        table = markdown.split(f"### {heading}\n\n")[1].split("\n\n")[0]
        assert table == render_markdown_table(saved, key)
        assert ("| Chance |" in table) == (metric.chance is not None)
    assert "### Expected calibration error (lower is better)" in markdown


def _independent_predictions(model, processor, config_path, task, embedding):
    """Zero-shot predictions from the model's public API alone: cosine of normalised embeddings, argmax."""
    entry = next(e for e in yaml.safe_load(config_path.read_text())["datasets"] if e["name"] == task)
    templates = get_templates(entry["templates"])
    folder = config_path.parent / entry["path"]
    classes = sorted(path.name for path in folder.iterdir())
    with torch.no_grad():
        class_embeddings = []
        for name in classes:
            prompts = processor(
                text=[t.format(entry["class_names"][name]) for t in templates], return_tensors="pt", padding=True
            )
            text = model.get_text_features(input_ids=prompts["input_ids"], attention_mask=prompts["attention_mask"])
            text = text if isinstance(text, torch.Tensor) else text.pooler_output
            class_embeddings.append(F.normalize(F.normalize(text, dim=-1).mean(dim=0), dim=-1))
        labels, images = [], []
        for index, name in enumerate(classes):
            for path in sorted((folder / name).iterdir()):
                try:
                    images.append(Image.open(path).convert("RGB"))
                except OSError:
                    continue
                labels.append(index)
        pixel_values = processor(images=images, return_tensors="pt")["pixel_values"]
        features = model.get_image_features(
            pixel_values=pixel_values, **({} if embedding is None else {"embedding": embedding})
        )
        features = features if isinstance(features, torch.Tensor) else features.pooler_output
        predictions = (F.normalize(features, dim=-1) @ torch.stack(class_embeddings).T).argmax(dim=1)
    return np.array(labels), np.array(predictions)


@pytest.mark.parametrize("task", EMBEDDED_TASKS)
def test_zero_shot_accuracy_equals_an_independent_computation(
    suite_run, embedded_suite, tiny_model, tiny_processor, tiny_clip_baseline, task
):
    results, _, _ = suite_run
    distinct_predictions = set()
    for model_name, (model, processor, embedding) in {
        "agriclip (aligned)": (tiny_model, tiny_processor, "aligned"),
        "clip": (*tiny_clip_baseline, None),
    }.items():
        labels, predictions = _independent_predictions(model, processor, embedded_suite, task, embedding)
        distinct_predictions.add(tuple(np.unique(predictions)))
        record = results["datasets"][task][model_name]
        assert record["top1"] == pytest.approx(float((labels == predictions).mean()))
        n_classes = len(record["confusion_matrix"])
        confusion = np.zeros((n_classes, n_classes), dtype=int)
        np.add.at(confusion, (labels, predictions), 1)
        assert record["confusion_matrix"] == confusion.tolist()
    # The comparison has teeth: the random tiny models do not put every image in one class.
    assert any(len(classes) > 1 for classes in distinct_predictions)


def _write_class_folder(root, counts: dict[str, int], seed=0):
    rng = np.random.default_rng(seed)
    for name, count in counts.items():
        (root / name).mkdir(parents=True)
        for index in range(count):
            Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(root / name / f"{index}.png")
    return root


def _write_yaml(path, datasets_list, retrieval=None):
    content = {"datasets": datasets_list} | ({"retrieval": retrieval} if retrieval else {})
    path.write_text(yaml.safe_dump(content, sort_keys=False))
    return path


@pytest.fixture
def in_memory_model(tiny_model, tiny_processor):
    return {"agriclip": ZeroShotClassifier(tiny_model, tiny_processor, batch_size=8)}


def test_empty_classes_are_reported(tmp_path, in_memory_model):
    # A saved dataset whose ClassLabel names a class without rows, and an image folder whose only "dry" image is unreadable.
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=["dry", "wet", "frozen"])}
    )
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)) for _ in range(4)]
    datasets.Dataset.from_dict({"image": images, "label": [0, 0, 1, 1]}, features=features).save_to_disk(
        tmp_path / "saved"
    )
    _write_class_folder(tmp_path / "folder", {"dry": 0, "wet": 2})
    (tmp_path / "folder" / "dry" / "0.png").write_bytes(b"")
    config = _write_yaml(
        tmp_path / "suite.yaml",
        [{"name": "saved", "path": "saved", "templates": "generic"}, {"name": "folder", "path": "folder"}],
    )
    results = run_suite(config, in_memory_model, tmp_path / "out")
    assert results["datasets"]["saved"]["agriclip"]["empty_classes"] == ["frozen"]
    assert results["datasets"]["saved"]["agriclip"]["n_images"] == 4
    folder = results["datasets"]["folder"]["agriclip"]
    assert folder["empty_classes"] == ["dry"] and folder["n_skipped"] == 1 and folder["n_images"] == 2
    # Classes without images stay out of the mean per-class accuracy.
    assert folder["mean_per_class"] == folder["top1"]
    assert (
        "classes without images (not in the mean per-class accuracy): frozen"
        in (tmp_path / "out" / "results.md").read_text()
    )


def test_class_names_missing_from_the_dataset_are_a_clear_error(tmp_path, in_memory_model):
    _write_class_folder(tmp_path / "leaves", {"healthy": 1, "rust": 1})
    config = _write_yaml(
        tmp_path / "suite.yaml", [{"name": "leaves", "path": "leaves", "class_names": {"blight": "leaf blight"}}]
    )
    with pytest.raises(
        ValueError, match=r"suite.yaml: dataset 'leaves': class_names maps \['blight'\], which are not classes"
    ):
        run_suite(config, in_memory_model, tmp_path / "out")


def test_a_suite_error_from_the_command_line_is_one_line_and_exit_9(tmp_path, tiny_checkpoint):
    """`python -m evaluation.suite`: bad input is one `prog: error:` line on stderr and exit status 9, no traceback."""
    _write_class_folder(tmp_path / "leaves", {"healthy": 1, "rust": 1})
    config = _write_yaml(
        tmp_path / "suite.yaml", [{"name": "leaves", "path": "leaves", "class_names": {"blight": "x"}}]
    )
    code, err = run_as_main(
        "evaluation.suite", ["--config", config, "--model", f"agri={tiny_checkpoint}", "--output", tmp_path / "out"]
    )
    assert code == ExitCode.INPUT == 9
    assert "Traceback" not in err
    assert err.splitlines()[-1] == (
        f"python -m evaluation.suite: error: {config}: dataset 'leaves': class_names maps ['blight'], which are not "
        f"classes of {tmp_path / 'leaves'} (its classes: ['healthy', 'rust'])"
    )


def test_the_suite_shows_no_weight_loading_or_local_data_bars(tmp_path, tiny_checkpoint, monkeypatch):
    """No "Loading weights" bar per model and no "Downloading data: N files" for a local folder: nothing downloads."""
    from transformers.utils import logging as transformers_logging

    # Without the hook that an earlier command in this process may have set: the suite must set it itself.
    monkeypatch.setattr(transformers_logging, "_tqdm_hook", None)
    _write_class_folder(tmp_path / "leaves", {"healthy": 2, "rust": 2})
    write_caption_folder(tmp_path / "captions", n_train=1, n_validation=16)  # 16 files: datasets' "Downloading" bar
    config = _write_yaml(
        tmp_path / "suite.yaml",
        [{"name": "leaves", "path": "leaves"}],
        retrieval=[{"name": "captions", "path": "captions", "split": "validation"}],
    )
    code, err = run_as_main(
        "evaluation.suite",
        [
            "--config",
            config,
            "--model",
            f"agri={tiny_checkpoint}:aligned,clip",
            "--output",
            tmp_path / "out",
            "--batch-size",
            "2",
        ],
    )
    assert code == 0, err
    assert json.loads((tmp_path / "out" / "results.json").read_text())["retrieval"]["datasets"]["captions"]
    for bar in ("Loading weights", "Downloading data", "Generating validation split"):
        assert bar not in err


@pytest.mark.parametrize(
    "entry, message",
    [
        (
            {"name": "a", "path": "a", "templates": "no-such-set"},
            "dataset 'a': templates: .*unknown template set 'no-such-set'",
        ),
        ({"name": "a", "path": "a", "templates": ["a photo"]}, "dataset 'a': templates: .*placeholder"),
        ({"name": "a", "path": "a", "template": "leaf"}, r"datasets\[0\] \('a'\): unknown keys \['template'\]"),
        ({"name": "a"}, r"datasets\[0\]: missing \['path'\]"),
        ({"name": "a", "path": "a", "class_names": ["x"]}, "class_names must map"),
    ],
)
def test_suite_config_errors_name_the_file_and_entry(tmp_path, entry, message):
    config = _write_yaml(tmp_path / "suite.yaml", [entry])
    with pytest.raises(ValueError, match=f"suite.yaml: .*{message}"):
        load_suite_config(config)


def test_suite_config_defaults_and_duplicates(tmp_path):
    config = _write_yaml(tmp_path / "suite.yaml", [{"name": "a", "path": "data/a", "templates": "leaf"}])
    spec = load_suite_config(config).datasets[0]
    assert spec.display_name == "a" and spec.path == tmp_path / "data" / "a"
    assert spec.prompt_names(["fungal_spots", "rust"], "x") == ["fungal spots", "rust"]
    duplicated = _write_yaml(tmp_path / "dup.yaml", [{"name": "a", "path": "a"}, {"name": "a", "path": "b"}])
    with pytest.raises(ValueError, match=r"repeated: \['a'\]"):
        load_suite_config(duplicated)


def test_model_arguments(tmp_path):
    assert parse_model_argument("agri=runs/final") == ("agri", ModelSpec("runs/final"))
    assert parse_model_argument("agri=runs/final:aligned,fused") == (
        "agri",
        ModelSpec("runs/final", ("aligned", "fused")),
    )
    folder = tmp_path / "odd:name"
    folder.mkdir()
    assert ModelSpec.parse(str(folder)) == ModelSpec(str(folder))
    with pytest.raises(argparse.ArgumentTypeError, match="unknown image embedding"):
        parse_model_argument("agri=runs/final:dino")
    with pytest.raises(argparse.ArgumentTypeError, match="expected NAME=PATH"):
        parse_model_argument("runs/final")


def test_fusion_weight_arguments():
    assert parse_model_argument("agri=runs/final:fused@0.30,fused") == (
        "agri",
        ModelSpec("runs/final", ("fused@0.3", "fused")),
    )
    assert ModelSpec.parse("runs/final:fused@0,fused@1").embeddings == ("fused@0", "fused@1")
    for bad, message in [
        ("aligned@0.3", "a weight applies to the fused embedding only"),
        ("fused@1.5", "must be a number from 0 to 1"),
        ("fused@x", "must be a number from 0 to 1"),
        ("fused@nan", "must be a number from 0 to 1"),
        ("dino@0.3", "unknown image embedding"),
    ]:
        with pytest.raises(argparse.ArgumentTypeError, match=f"'runs/final:{bad}': .*{message}"):
            parse_model_argument(f"agri=runs/final:{bad}")


def test_a_fusion_weight_given_to_the_suite_is_used_reported_and_recorded(
    tmp_path, tiny_checkpoint, tiny_model, tiny_processor
):
    """``PATH:fused,fused@0.3,fused@1``: each variant scores with its own weight, independently computed here, while
    the checkpoint's config.json (fusion_weight 0.5) serves the plain "fused"."""
    _write_class_folder(tmp_path / "leaves", {"blight": 4, "healthy": 4, "rust": 4})
    config = _write_yaml(tmp_path / "suite.yaml", [{"name": "leaves", "path": "leaves"}])
    results = run_suite(config, {"agri": f"{tiny_checkpoint}:fused,fused@0.3,fused@1"}, tmp_path / "out")
    weights = {"agri (fused)": 0.5, "agri (fused@0.3)": 0.3, "agri (fused@1)": 1.0}
    assert results["models"] == {
        name: {"path": str(tiny_checkpoint), "embedding": "fused", "fusion_weight": weight, "model_type": "agriclip"}
        for name, weight in weights.items()
    }
    assert json.loads((tmp_path / "out" / "results.json").read_text())["models"] == results["models"]
    assert "| agri (fused@0.3) |" in (tmp_path / "out" / "results.md").read_text()
    # Independently: the fused embedding of each weight, cosines with the one-template class embeddings, argmax.
    classes = ["blight", "healthy", "rust"]
    paths = [tmp_path / "leaves" / name / f"{index}.png" for name in classes for index in range(4)]
    labels = np.repeat(np.arange(3), 4)
    with torch.no_grad():
        prompts = tiny_processor(text=[f"a photo of {name}" for name in classes], return_tensors="pt", padding=True)
        text = F.normalize(
            tiny_model.get_text_features(prompts["input_ids"], prompts["attention_mask"]).pooler_output, dim=-1
        )
        pixel_values = tiny_processor(images=[Image.open(path) for path in paths], return_tensors="pt")["pixel_values"]
        clip = F.normalize(tiny_model.get_clip_image_features(pixel_values).pooler_output, dim=-1)
        aligned = F.normalize(tiny_model.aligner(tiny_model.get_backbone_features(pixel_values).pooler_output), dim=-1)
    predictions = {}
    for name, weight in weights.items():
        predictions[name] = (F.normalize(weight * clip + (1 - weight) * aligned, dim=-1) @ text.T).argmax(dim=1).numpy()
        confusion = np.zeros((3, 3), dtype=int)
        np.add.at(confusion, (labels, predictions[name]), 1)
        record = results["datasets"]["leaves"][name]
        assert record["confusion_matrix"] == confusion.tolist()
        assert record["top1"] == pytest.approx(float((predictions[name] == labels).mean()))
    # The comparison has teeth: the weights change some prediction.
    assert len({tuple(p) for p in predictions.values()}) > 1


def test_linear_probe_and_k_shot_through_the_suite(tmp_path, in_memory_model):
    _write_class_folder(tmp_path / "leaves", {"healthy": 6, "rust": 6, "blight": 6})
    config = _write_yaml(tmp_path / "suite.yaml", [{"name": "leaves", "path": "leaves", "display_name": "Leaves"}])
    results = run_suite(config, in_memory_model, tmp_path / "out", linear_probe=True, k_shots=[1, 3], seeds=[0, 1])
    probe = results["linear_probe"]["datasets"]["leaves"]["agriclip"]
    assert probe["n_train"] == probe["n_test"] == 9 and 0.0 <= probe["top1"] <= 1.0
    assert results["linear_probe"]["mean"]["agriclip"]["top1"] == probe["top1"]
    few_shot = results["few_shot"]["datasets"]["leaves"]["agriclip"]
    assert few_shot["1"]["n_seeds"] == 2 and few_shot["1"]["top1_std"] >= 0.0
    assert few_shot["3"] is None  # 3 training images per class leave none to validate 3-shot
    markdown = (tmp_path / "out" / "results.md").read_text()
    assert "## Linear probe (top-1)" in markdown and "| Model | 1-shot | 3-shot |" in markdown


def test_retrieval_through_the_suite(tmp_path, caption_folder, in_memory_model):
    config = _write_yaml(
        tmp_path / "suite.yaml", [], retrieval=[{"name": "colours", "path": str(caption_folder), "split": "validation"}]
    )
    results = run_suite(config, in_memory_model, tmp_path / "out")
    record = results["retrieval"]["datasets"]["colours"]["agriclip"]
    assert record["n_images"] == record["n_captions"] == 16
    classifier = in_memory_model["agriclip"]
    rows = datasets.load_dataset("imagefolder", data_dir=str(caption_folder), split="validation")
    expected = retrieval_recall(
        classifier.image_embeddings(list(rows["image"])),
        classifier.text_embeddings(list(rows["caption"])),
        torch.arange(16),
    )
    assert record["image_to_text"] == pytest.approx(expected["image_to_text"])
    assert record["text_to_image"] == pytest.approx(expected["text_to_image"])
    assert "## Image-text retrieval (recall@k)" in (tmp_path / "out" / "results.md").read_text()


def test_retrieval_recall_with_several_captions_per_image():
    # Three images on unit vectors; captions 0-1 belong to image 0, caption 2 to image 1, caption 3 to image 2.
    images = torch.eye(3)
    texts = F.normalize(torch.tensor([[1.0, 0.1, 0.0], [0.0, 1.0, 0.05], [0.0, 0.9, 0.1], [0.8, 0.0, 0.3]]), dim=-1)
    owners = torch.tensor([0, 0, 1, 2])
    result = retrieval_recall(images, texts, owners, ks=(1, 2))
    # Image 0 ranks its caption 0 first; image 1 ranks image 0's caption 1 above its own caption 2 (2nd);
    # image 2 ranks its caption 3 first.
    assert result["image_to_text"] == pytest.approx({"R@1": 2 / 3, "R@2": 1.0})
    # Captions 0 and 2 find their image first; caption 1 ranks its image 0 third (behind images 1 and 2);
    # caption 3 ranks image 0 above its image 2.
    assert result["text_to_image"] == pytest.approx({"R@1": 2 / 4, "R@2": 3 / 4})
    chunked = retrieval_recall(images, texts, owners, ks=(1, 2), chunk_size=1)
    assert chunked == result


def test_group_captions_by_image():
    rows = [
        {"path": "a.png", "bytes": None},
        {"path": "b.png", "bytes": None},
        {"path": "a.png", "bytes": None},
        {"path": None, "bytes": b"x"},
    ]
    unique_rows, owners = group_captions(rows)
    assert unique_rows == [0, 1, 3] and owners.tolist() == [0, 1, 0, 2]


@pytest.mark.parametrize("case", ["coarse embeddings", "every embedding equal"])
def test_retrieval_with_groups_of_interchangeable_images_counts_any_member_as_a_match(case):
    """Images grouped (as stage 1 groups pairs by caption text): image i and caption j match when j's image is in
    i's group; the recall is the ranking rule spelled out over that relation, in chunks or not."""
    owners = torch.tensor([0, 0, 1, 2, 3, 3, 4, 5])  # 6 images, 8 captions
    groups = torch.tensor([0, 1, 0, 2, 1, 0])
    if case == "every embedding equal":
        images, texts = torch.ones(6, 2), torch.ones(8, 2)
    else:
        generator = torch.Generator().manual_seed(1)
        images = torch.randint(0, 2, (6, 3), generator=generator).float()
        texts = torch.randint(0, 2, (8, 3), generator=generator).float()
    ks = (1, 2, 5)
    result = retrieval_recall(images, texts, owners, ks=ks, chunk_size=4, image_groups=groups)
    assert retrieval_recall(images, texts, owners, ks=ks, image_groups=groups) == result
    match = groups[:, None] == groups[owners][None, :]
    for k in ks:
        assert result["image_to_text"][f"R@{k}"] == pytest.approx(_brute_force_recall(images @ texts.T, match, k))
        assert result["text_to_image"][f"R@{k}"] == pytest.approx(_brute_force_recall(texts @ images.T, match.T, k))
    if case == "every embedding equal":  # column 0 (caption 0, image 0, group 0) ranks first: groups 0 hit at R@1
        assert result["image_to_text"]["R@1"] == pytest.approx(3 / 6)
    with pytest.raises(ValueError, match="image_groups has 5 entries for 6 images"):
        retrieval_recall(images, texts, owners, image_groups=groups[:5])


def test_group_by_gives_each_key_its_first_occurrence():
    first, group = group_by(["a red leaf", "a blue leaf", "a red leaf", "a red leaf", "a fish"])
    assert first == [0, 1, 4] and group.tolist() == [0, 1, 0, 0, 2]


def _clusters(n_per_class=40, n_classes=4, dim=16, spread=0.6, noise_seed=0):
    """Gaussian clusters around fixed class centres; `noise_seed` draws another sample of the same classes."""
    centers = torch.randn(n_classes, dim, generator=torch.Generator().manual_seed(1234))
    labels = torch.arange(n_classes).repeat_interleave(n_per_class)
    noise = torch.randn(len(labels), dim, generator=torch.Generator().manual_seed(noise_seed))
    return centers[labels] + spread * noise, labels


def test_logistic_regression_reaches_the_optimum():
    features, labels = _clusters(spread=2.0)
    l2 = 1e-2
    classifier = fit_logistic_regression(features, labels, 4, l2)
    weight = classifier.weight.detach().clone().requires_grad_(True)
    bias = classifier.bias.detach().clone().requires_grad_(True)
    loss = F.cross_entropy(features @ weight.T + bias, labels) + 0.5 * l2 * weight.pow(2).sum()
    loss.backward()
    assert weight.grad.abs().max() < 1e-4 and bias.grad.abs().max() < 1e-4


def test_linear_probe_chooses_l2_on_validation_and_generalises():
    features, labels = _clusters()
    test_features, test_labels = _clusters(noise_seed=1)
    probe = linear_probe(features, labels, 4, l2_values=(1e-4, 1e-2, 1.0), seed=0)
    assert probe.l2 in (1e-4, 1e-2, 1.0) and probe.val_accuracy > 0.9
    assert (probe.scores(test_features).argmax(dim=1) == test_labels).float().mean() > 0.9
    # select_l2 keeps the L2 strength with the best validation accuracy (ties to the strongest).
    fit, val = stratified_split(labels, 0.5, seed=0)
    chosen = select_l2(features[fit], labels[fit], features[val], labels[val], 4, l2_values=(1e-3, 10.0, 1e3))
    accuracies = {
        l2: (fit_logistic_regression(features[fit], labels[fit], 4, l2)(features[val]).argmax(1) == labels[val])
        .float()
        .mean()
        .item()
        for l2 in (1e-3, 10.0, 1e3)
    }
    assert chosen.val_accuracy == max(accuracies.values())
    assert chosen.l2 == max(l2 for l2, accuracy in accuracies.items() if accuracy == chosen.val_accuracy)


def test_stratified_split_and_k_shot_sampling_are_seeded_per_class():
    labels = torch.tensor([0] * 10 + [1] * 4 + [2] * 1)
    rest, held_out = stratified_split(labels, 0.5, seed=0)
    assert sorted(torch.cat([rest, held_out]).tolist()) == list(range(15))
    assert torch.bincount(labels[held_out], minlength=3).tolist() == [5, 2, 0]
    train, val = sample_k_shot(labels, 3, seed=0)
    assert torch.bincount(labels[train], minlength=3).tolist() == [3, 3, 1]
    assert torch.bincount(labels[val], minlength=3).tolist() == [3, 1, 0]
    assert not set(train.tolist()) & set(val.tolist())
    again, _ = sample_k_shot(labels, 3, seed=0)
    other, _ = sample_k_shot(labels, 3, seed=1)
    assert torch.equal(train, again) and not torch.equal(train, other)


def test_k_shot_probe_fits_on_the_k_shots():
    features, labels = _clusters()
    probe = k_shot_probe(features, labels, 4, k=2, seed=0, l2_values=(1e-2,))
    train, _ = sample_k_shot(labels, 2, seed=0)
    expected = fit_logistic_regression(features[train], labels[train], 4, 1e-2)
    torch.testing.assert_close(probe.classifier.weight, expected.weight)


def test_markdown_table_layout():
    results = {
        "datasets": {
            "a": {"m1": {"top1": 0.5}, "m2": {"top1": 0.25}},
            "b": {"m1": {"top1": 1.0}, "m2": {"top1": None}},
        },
        "mean": {"m1": {"top1": 0.75}, "m2": {"top1": 0.25}},
        "dataset_info": {"a": {"display_name": "Set A"}, "b": {"display_name": "Set B"}},
    }
    assert render_markdown_table(results) == (
        "| Model | Set A | Set B | Mean |\n"
        "| --- | ---: | ---: | ---: |\n"
        "| m1 | 50.0 | 100.0 | 75.0 |\n"
        "| m2 | 25.0 | – | 25.0 |"
    )


def test_the_report_has_a_per_class_accuracy_table_per_dataset():
    """Per class: its image count and each model's recall, read from the confusion matrix (rows: true class)."""
    record = {"top1": 0.5, "top5": None, "mean_per_class": 0.5, "macro_f1": 0.4, "n_skipped": 0, "empty_classes": []}
    results = {
        "datasets": {
            "leaves": {
                "m1": {**record, "confusion_matrix": [[3, 1, 0], [2, 2, 0], [0, 0, 0]]},
                "m2": {**record, "confusion_matrix": [[0, 4, 0], [0, 4, 0], [0, 0, 0]]},
            }
        },
        "mean": {"m1": record, "m2": record},
        "dataset_info": {"leaves": {"display_name": "Leaves", "class_names": ["rust", "leaf | spot", "frozen"]}},
    }
    markdown = render_markdown_report(results)
    assert (
        "### Per-class accuracy\n\nThe share of each class's images predicted as that class (its recall).\n\n"
        "#### Leaves\n\n"
        "| Class | Images | m1 | m2 |\n"
        "| --- | ---: | ---: | ---: |\n"
        "| rust | 4 | 75.0 | 0.0 |\n"
        "| leaf \\| spot | 4 | 50.0 | 100.0 |\n"
        "| frozen | 0 | – | – |\n"
    ) in markdown


# ---------------------------------------------------------------------------------------------------------------
# Chance levels and the fine-grained mean
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_classes", [1, 2, 3, 5, 6, 8, 10])
def test_chance_levels_are_the_scores_of_a_uniformly_random_ranking(num_classes):
    """Every class as the reference under every cyclic shift of a ranking: the reference's rank is uniform over
    0..C-1, which is what a uniform guess gives, so the metrics score exactly the chance levels."""
    labels = torch.arange(num_classes).repeat_interleave(num_classes)
    shifts = torch.arange(num_classes).repeat(num_classes)
    scores = ((torch.arange(num_classes)[None, :] + shifts[:, None]) % num_classes).float()
    measured = classification_metrics(scores, labels, num_classes)
    chance = chance_levels(num_classes)
    assert chance["top1"] == pytest.approx(measured["top1"]) == pytest.approx(1 / num_classes)
    assert chance["mean_per_class"] == pytest.approx(measured["mean_per_class"])
    assert (chance["top5"] is None) == (measured["top5"] is None) == (num_classes <= 5)
    if measured["top5"] is not None:
        assert chance["top5"] == pytest.approx(measured["top5"]) == pytest.approx(5 / num_classes)


def test_the_suite_records_and_shows_chance_and_the_fine_grained_mean(suite_run, embedded_suite):
    """The embedded suite marks leaf-spot and cattle-breed (of the three here) fine-grained: their mean is its own
    column beside the mean over all, and each dataset and mean has its chance level, 1/C from the class folders."""
    _, output, _ = suite_run
    saved = json.loads((output / "results.json").read_text())
    folders = {
        task: [p for p in (embedded_suite.parent / "downstream" / task).iterdir() if p.is_dir()]
        for task in EMBEDDED_TASKS
    }
    for task in EMBEDDED_TASKS:
        n_classes = len(folders[task])
        assert saved["dataset_info"][task]["chance"] == {
            "top1": pytest.approx(1 / n_classes),
            "mean_per_class": pytest.approx(1 / n_classes),
            "top5": None if n_classes <= 5 else pytest.approx(5 / n_classes),
        }
    fine = ["leaf-spot", "cattle-breed"]
    assert [task for task in EMBEDDED_TASKS if saved["dataset_info"][task]["fine_grained"]] == fine
    for model in saved["mean"]:
        for key in ("top1", "mean_per_class", "macro_f1"):
            assert saved["mean_fine_grained"][model][key] == pytest.approx(
                np.mean([saved["datasets"][t][model][key] for t in fine])
            )
        assert saved["mean_fine_grained"][model]["n_datasets"] == 2
        # The mean over all datasets is unchanged by the flag.
        assert saved["mean"][model]["top1"] == pytest.approx(
            np.mean([saved["datasets"][t][model]["top1"] for t in EMBEDDED_TASKS])
        )
    assert saved["chance"]["mean"]["top1"] == pytest.approx(np.mean([1 / len(folders[t]) for t in EMBEDDED_TASKS]))
    assert saved["chance"]["mean_fine_grained"]["top1"] == pytest.approx(np.mean([1 / len(folders[t]) for t in fine]))
    # Top-5 only over the datasets with more than five classes, as the models' own top-5 mean.
    with_top5 = [t for t in EMBEDDED_TASKS if len(folders[t]) > 5]
    assert saved["chance"]["mean"]["top5"] == pytest.approx(np.mean([5 / len(folders[t]) for t in with_top5]))

    markdown = (output / "results.md").read_text()
    header = "| Model | Leaf spot diseases (fine-grained) | Fish species | Cattle breed | Mean | Fine-grained mean |"
    chance = [1 / len(folders[t]) for t in EMBEDDED_TASKS]
    chance_row = (
        "| Chance | "
        + " | ".join(f"{100 * v:.1f}" for v in chance + [np.mean(chance), np.mean([chance[0], chance[2]])])
        + " |"
    )
    top1_table = markdown.split("### Top-1 accuracy\n\n")[1].split("\n\n")[0]
    assert top1_table.splitlines()[0] == header and top1_table.splitlines()[-1] == chance_row
    assert "fine-grained tasks: Leaf spot diseases (fine-grained), Cattle breed." in markdown
    macro_f1_table = markdown.split("### Macro-F1\n\n")[1].split("\n\n")[0]
    assert "Chance" not in macro_f1_table  # macro-F1 has no closed-form chance level


def _results_with_chance() -> dict:
    """Two datasets (3 and 8 classes), one fine-grained, two models, shaped as run_suite writes them."""
    record = {"top5": None, "mean_per_class": 0.5, "macro_f1": 0.4, "n_skipped": 0, "empty_classes": []}
    return {
        "datasets": {
            "a": {
                "m1": {**record, "top1": 0.5, "confusion_matrix": [[1, 1, 0], [0, 1, 1], [0, 0, 2]]},
                "m2": {**record, "top1": 0.25, "confusion_matrix": [[2, 0, 0], [2, 0, 0], [2, 0, 0]]},
            },
            "b": {
                "m1": {**record, "top1": 1.0, "confusion_matrix": np.eye(8, dtype=int).tolist()},
                "m2": {**record, "top1": 0.75, "confusion_matrix": np.eye(8, dtype=int).tolist()},
            },
        },
        "mean": {"m1": {"top1": 0.75, "n_datasets": 2}, "m2": {"top1": 0.5, "n_datasets": 2}},
        "mean_fine_grained": {"m1": {"top1": 1.0, "n_datasets": 1}, "m2": {"top1": 0.75, "n_datasets": 1}},
        "chance": {
            "mean": {"top1": (1 / 3 + 1 / 8) / 2, "top5": 5 / 8, "mean_per_class": (1 / 3 + 1 / 8) / 2},
            "mean_fine_grained": {"top1": 1 / 8, "top5": 5 / 8, "mean_per_class": 1 / 8},
        },
        "dataset_info": {
            "a": {
                "display_name": "Set A",
                "class_names": ["x", "y", "z"],
                "fine_grained": False,
                "chance": chance_levels(3),
            },
            "b": {
                "display_name": "Set B",
                "class_names": list("abcdefgh"),
                "fine_grained": True,
                "chance": chance_levels(8),
            },
        },
    }


def test_markdown_tables_end_with_a_chance_row_and_show_the_fine_grained_mean():
    results = _results_with_chance()
    assert render_markdown_table(results) == (
        "| Model | Set A | Set B | Mean | Fine-grained mean |\n"
        "| --- | ---: | ---: | ---: | ---: |\n"
        "| m1 | 50.0 | 100.0 | 75.0 | 100.0 |\n"
        "| m2 | 25.0 | 75.0 | 50.0 | 75.0 |\n"
        "| Chance | 33.3 | 12.5 | 22.9 | 12.5 |"
    )
    # Top-5: no chance level for 3 classes, 5/8 for 8.
    assert render_markdown_table(results, "top5").splitlines()[-1] == "| Chance | – | 62.5 | 62.5 | 62.5 |"
    markdown = render_markdown_report(results)
    # Per class: the chance level of a class's recall, 1/C, as the last column.
    assert (
        "| Class | Images | m1 | m2 | Chance |\n| --- | ---: | ---: | ---: | ---: |\n| x | 2 | 50.0 | 100.0 | 33.3 |"
        in markdown
    )
    assert "| a | 1 | 100.0 | 100.0 | 12.5 |" in markdown
    assert "1/C for top-1 and mean per-class accuracy, 5/C for top-5" in markdown
    # A report written before chance levels and fine-grained flags existed renders as it did.
    for key in ("mean_fine_grained", "chance"):
        del results[key]
    for info in results["dataset_info"].values():
        del info["chance"], info["fine_grained"]
    assert render_markdown_table(results).splitlines()[0] == "| Model | Set A | Set B | Mean |"
    assert "Chance" not in render_markdown_report(results)


def test_plots_mark_the_chance_level_of_every_group():
    """One dashed segment per group, across its bars, at its chance level; the mean groups get the mean chance."""
    results = _results_with_chance()
    axes = grouped_bars_figure(results).axes[0]
    (chance,) = [collection for collection in axes.collections if collection.get_label() == "Chance"]
    assert chance.get_linestyle()[0][1] is not None  # dashed, not solid
    heights = [segment[0][1] for segment in chance.get_segments()]
    assert heights == pytest.approx([100 / 3, 100 / 8, 100 * (1 / 3 + 1 / 8) / 2, 100 / 8])
    centres = [np.mean(segment[:, 0]) for segment in chance.get_segments()]
    assert centres == pytest.approx([0, 1, 2, 3])
    assert [label.get_text() for label in axes.get_xticklabels()] == ["Set A", "Set B", "Mean", "Fine-grained mean"]
    assert "Chance" in [text.get_text() for text in axes.get_legend().get_texts()]
    # Top-5: no marker where a dataset has no top-5 chance.
    (top5,) = [c for c in grouped_bars_figure(results, "top5").axes[0].collections if c.get_label() == "Chance"]
    assert [np.mean(segment[:, 0]) for segment in top5.get_segments()] == pytest.approx([1, 2, 3])
    assert confusion_matrix_figure(results, "a").get_suptitle() == "Set A (chance top-1 33.3%)"


def test_fine_grained_is_a_boolean_defaulting_to_false(tmp_path):
    config = _write_yaml(
        tmp_path / "suite.yaml", [{"name": "a", "path": "a"}, {"name": "b", "path": "b", "fine_grained": True}]
    )
    assert [spec.fine_grained for spec in load_suite_config(config).datasets] == [False, True]
    for value in ("yes", 1, None):
        bad = _write_yaml(tmp_path / "bad.yaml", [{"name": "a", "path": "a", "fine_grained": value}])
        with pytest.raises(ValueError, match=r"bad.yaml: dataset 'a': fine_grained must be true or false"):
            load_suite_config(bad)


def test_linear_probe_and_k_shot_report_chance_and_the_fine_grained_mean(tmp_path, in_memory_model):
    _write_class_folder(tmp_path / "leaves", {"healthy": 6, "rust": 6, "blight": 6})
    _write_class_folder(tmp_path / "fish", {"goby": 4, "tuna": 4}, seed=1)
    config = _write_yaml(
        tmp_path / "suite.yaml",
        [{"name": "leaves", "path": "leaves", "fine_grained": True}, {"name": "fish", "path": "fish"}],
    )
    results = run_suite(config, in_memory_model, tmp_path / "out", linear_probe=True, k_shots=[1, 2], seeds=[0])
    probe = results["linear_probe"]
    assert probe["mean_fine_grained"]["agriclip"]["top1"] == probe["datasets"]["leaves"]["agriclip"]["top1"]
    assert probe["chance"]["mean"]["top1"] == pytest.approx((1 / 3 + 1 / 2) / 2)
    assert probe["chance"]["mean_fine_grained"]["top1"] == pytest.approx(1 / 3)
    # 1-shot: both datasets; 2-shot: only leaves has a class with more than 2 training images (fish has 2 per class).
    assert results["few_shot"]["datasets"]["fish"]["agriclip"]["2"] is None
    assert results["few_shot"]["chance"]["mean"]["1"]["top1"] == pytest.approx((1 / 3 + 1 / 2) / 2)
    assert results["few_shot"]["chance"]["mean"]["2"]["top1"] == pytest.approx(1 / 3)
    markdown = (tmp_path / "out" / "results.md").read_text()
    probe_table = markdown.split("## Linear probe (top-1)\n\n")[1].split("\n\n")[0]
    assert probe_table.splitlines()[-1] == "| Chance | 33.3 | 50.0 | 41.7 | 33.3 |"
    assert "| Model | 1-shot | 2-shot |" in markdown and "| Chance | 41.7 | 33.3 |" in markdown


# ---------------------------------------------------------------------------------------------------------------
# A broken model is an error or scores as one; a failed report keeps the previous one
# ---------------------------------------------------------------------------------------------------------------


def _poison_rows(tensor: torch.Tensor, rows, value=float("nan")) -> torch.Tensor:
    tensor = tensor.clone()
    tensor[rows] = value
    return tensor


def _poison_image_embeddings(monkeypatch, classifier):
    original = classifier.image_embeddings
    monkeypatch.setattr(classifier, "image_embeddings", lambda images: _poison_rows(original(images), [0, 1]))


def _poison_zero_shot_scores(monkeypatch, classifier):
    original = classifier.embedding_logits
    monkeypatch.setattr(
        classifier, "embedding_logits", lambda *args: _poison_rows(original(*args), [3, 4], float("inf"))
    )


def _poison_probe_scores(monkeypatch, classifier):
    original = LinearProbe.scores
    monkeypatch.setattr(LinearProbe, "scores", lambda probe, features: _poison_rows(original(probe, features), [0]))


def _poison_text_embeddings(monkeypatch, classifier):
    original = classifier.text_embeddings
    monkeypatch.setattr(classifier, "text_embeddings", lambda texts: _poison_rows(original(texts), [2]))


NAMED = r"model 'agriclip \(clip\)' \(image embedding 'clip'\) on dataset '{}' gave non-finite"


@pytest.mark.parametrize(
    "poison, options, message",
    [
        (_poison_image_embeddings, {}, NAMED.format("leaves") + r" image embeddings \(2 of 18 images\)"),
        (_poison_zero_shot_scores, {}, NAMED.format("leaves") + r" scores \(2 of 18 images\)"),
        (
            _poison_probe_scores,
            {"linear_probe": True},
            "the linear probe of " + NAMED.format("leaves") + r" scores \(1 of 9",
        ),
        (
            _poison_probe_scores,
            {"k_shots": [1]},
            r"the 1-shot probe \(seed 0\) of " + NAMED.format("leaves") + r" scores \(1 of 9",
        ),
        (_poison_text_embeddings, None, NAMED.format("colours") + r" scores \(16 of 16 images\)"),
    ],
    ids=["image-embeddings", "zero-shot", "linear-probe", "k-shot", "retrieval"],
)
def test_non_finite_values_are_an_error_naming_model_embedding_and_dataset(
    tmp_path, tiny_model, tiny_processor, caption_folder, monkeypatch, poison, options, message
):
    """`options` are run_suite's, over 18 images of 3 classes; None: a retrieval suite over 16 image-caption pairs."""
    classifier = ZeroShotClassifier(tiny_model, tiny_processor, embedding="clip", batch_size=8)
    poison(monkeypatch, classifier)
    if options is None:
        retrieval = [{"name": "colours", "path": str(caption_folder), "split": "validation"}]
        config, options = _write_yaml(tmp_path / "suite.yaml", [], retrieval=retrieval), {}
    else:
        _write_class_folder(tmp_path / "leaves", {"healthy": 6, "rust": 6, "blight": 6})
        config = _write_yaml(tmp_path / "suite.yaml", [{"name": "leaves", "path": "leaves"}])
    with pytest.raises(NonFiniteError, match=message):
        run_suite(config, {"agriclip (clip)": classifier}, tmp_path / "out", **options)
    assert not (tmp_path / "out" / "results.json").exists()


def test_prompts_that_tie_score_as_always_predicting_the_first_class_and_warn(tmp_path, in_memory_model, caplog):
    # Classes load sorted: blight (2 images), healthy (3), rust (4). All three prompt as "leaf"; in "pair" two of
    # three share a prompt.
    _write_class_folder(tmp_path / "leaves", {"blight": 2, "healthy": 3, "rust": 4})
    config = _write_yaml(
        tmp_path / "suite.yaml",
        [
            {"name": "tied", "path": "leaves", "class_names": {"blight": "leaf", "healthy": "leaf", "rust": "leaf"}},
            {"name": "pair", "path": "leaves", "class_names": {"blight": "rust"}, "templates": "generic"},
        ],
    )
    with caplog.at_level(logging.WARNING, logger="evaluation.suite"):
        results = run_suite(config, in_memory_model, tmp_path / "out")
    tied = results["datasets"]["tied"]["agriclip"]
    # Every score ties, so class 0 is predicted everywhere, by every metric alike (today's top-k: 100 %).
    assert tied["confusion_matrix"] == [[2, 0, 0], [3, 0, 0], [4, 0, 0]]
    assert tied["top1"] == pytest.approx(2 / 9)
    assert tied["mean_per_class"] == pytest.approx(1 / 3)
    assert tied["macro_f1"] == pytest.approx((2 * 2 / (2 * 2 + 7)) / 3)
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["dataset_info"]["tied"]["warnings"] == [
        "classes 'blight', 'healthy', 'rust' have identical prompts, e.g. 'a photo of leaf': the model cannot tell "
        "them apart, and their ties go to 'blight'"
    ]
    [pair_warning] = saved["dataset_info"]["pair"]["warnings"]
    assert pair_warning.startswith("classes 'blight', 'rust' have identical prompts")
    logged = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert f"tied: {saved['dataset_info']['tied']['warnings'][0]}" in logged and f"pair: {pair_warning}" in logged
    markdown = (tmp_path / "out" / "results.md").read_text()
    assert f"- tied: warning: {saved['dataset_info']['tied']['warnings'][0]}." in markdown
    assert f"- pair: warning: {pair_warning}." in markdown


def _brute_force_recall(similarity: torch.Tensor, positive: torch.Tensor, k: int) -> float:
    """The ranking rule spelled out: columns by similarity, highest first, then by index; a hit when a positive
    column is among the first k."""
    hits = []
    for row, matches in zip(similarity.tolist(), positive.tolist()):
        order = sorted(range(len(row)), key=lambda column: (-row[column], column))
        hits.append(any(matches[column] for column in order[:k]))
    return sum(hits) / len(hits)


@pytest.mark.parametrize("case", ["coarse embeddings", "every embedding equal"])
def test_retrieval_breaks_ties_as_argmax_does(case):
    owners = torch.tensor([0, 0, 1, 2, 3, 3, 4, 5])  # 6 images, 8 captions
    if case == "every embedding equal":
        images, texts = torch.ones(6, 2), torch.ones(8, 2)
    else:  # entries in {0, 1}: many equal similarities
        generator = torch.Generator().manual_seed(0)
        images = torch.randint(0, 2, (6, 3), generator=generator).float()
        texts = torch.randint(0, 2, (8, 3), generator=generator).float()
    ks = (1, 2, 5)
    result = retrieval_recall(images, texts, owners, ks=ks, chunk_size=4)
    caption_of_image = torch.arange(6)[:, None] == owners[None, :]
    for k in ks:
        assert result["image_to_text"][f"R@{k}"] == pytest.approx(
            _brute_force_recall(images @ texts.T, caption_of_image, k)
        )
        assert result["text_to_image"][f"R@{k}"] == pytest.approx(
            _brute_force_recall(texts @ images.T, caption_of_image.T, k)
        )
    if case == "every embedding equal":  # image i's first caption sits at column 0, 2, 3, 4, 6, 7: R@1 is image 0 alone
        assert result["image_to_text"]["R@1"] == pytest.approx(1 / 6)


def test_retrieval_and_knn_refuse_non_finite_values():
    images, texts = torch.eye(3), torch.eye(3)
    with pytest.raises(NonFiniteError, match=r"^the model gave non-finite scores \(3 of 3 images\)$"):
        retrieval_recall(images, _poison_rows(texts, [1]), torch.arange(3))
    with pytest.raises(NonFiniteError, match=r"^the model gave non-finite scores \(1 of 3 images\)$"):
        retrieval_recall(_poison_rows(images, [2], float("inf")), texts, torch.arange(3), chunk_size=2)
    features, labels = _clusters(n_per_class=5, n_classes=2)
    with pytest.raises(
        NonFiniteError, match=r"k-NN on the model's features gave non-finite scores \(2 of 10 query images\)"
    ):
        knn_accuracy(features, labels, _poison_rows(features, [3, 7]), labels, num_classes=2, k=3)


def _write_half_then_fill_the_disk(monkeypatch, target: str):
    """Writing the file named `target` (or atomic_path's temporary file for it) stores half of its content, then the
    disk is full."""

    def disk_full(path):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    stem, suffix = os.path.splitext(target)
    real_write_text, real_savefig = Path.write_text, Figure.savefig

    def is_target(path):  # atomic_path's temporary name: ".<stem>.<random>.tmp<suffix>"
        name = Path(path).name
        return name == target or (name.startswith(f".{stem}.") and name.endswith(f".tmp{suffix}"))

    def write_text(self, text, *args, **kwargs):
        if not is_target(self):
            return real_write_text(self, text, *args, **kwargs)
        real_write_text(self, text[: len(text) // 2], *args, **kwargs)
        disk_full(self)

    def savefig(self, path, *args, **kwargs):
        if not is_target(path):
            return real_savefig(self, path, *args, **kwargs)
        buffer = io.BytesIO()
        real_savefig(self, buffer, *args, format="png", **kwargs)
        Path(path).write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
        disk_full(path)

    monkeypatch.setattr(Path, "write_text", write_text)
    monkeypatch.setattr(Figure, "savefig", savefig)


def _files(folder: Path) -> dict[str, bytes]:
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


@pytest.mark.parametrize("target", ["results.json", "results.md", "zero_shot_top1.png", "confusion_leaves.png"])
def test_a_full_disk_leaves_the_previous_report_whole(tmp_path, in_memory_model, monkeypatch, target):
    _write_class_folder(tmp_path / "leaves", {"healthy": 2, "rust": 2})
    output = tmp_path / "out"
    run_suite(_write_yaml(tmp_path / "suite.yaml", [{"name": "leaves", "path": "leaves"}]), in_memory_model, output)
    first = _files(output)
    assert {"results.json", "results.md", "plots/zero_shot_top1.png", "plots/confusion_leaves.png"} == set(first)
    # The second run's report differs everywhere (the display name is in every file); its disk fills mid-file.
    renamed = _write_yaml(tmp_path / "renamed.yaml", [{"name": "leaves", "path": "leaves", "display_name": "Leaves"}])
    _write_half_then_fill_the_disk(monkeypatch, target)
    with pytest.raises(OSError) as failure:
        run_suite(renamed, in_memory_model, output)
    assert failure.value.errno == errno.ENOSPC
    # Every file of the first report is as it was, and no temporary file is left behind.
    assert _files(output) == first
    monkeypatch.undo()
    run_suite(renamed, in_memory_model, output)
    assert set(_files(output)) == set(first) and "| Model | Leaves | Mean |" in (output / "results.md").read_text()


def test_a_train_split_with_other_classes_is_refused_by_the_suite_and_lora_alike(tmp_path):
    """`evaluation.runner.load_train_split` is the one check, for the probes and for `training.lora`'s tasks."""
    from evaluation.runner import load_train_split
    from evaluation.suite import DatasetSpec

    _write_class_folder(tmp_path / "data" / "train", {"cow": 2, "goat": 2})
    _write_class_folder(tmp_path / "data" / "test", {"cow": 2, "sheep": 2}, seed=1)
    spec = DatasetSpec("farm", "Farm", tmp_path / "data", split="test", train_split="train")
    with pytest.raises(ValueError, match="the classes of split 'train' .* differ from those of split 'test'"):
        load_train_split(spec, ["cow", "sheep"])
    assert len(load_train_split(spec, ["cow", "goat"])) == 4
