"""The embedded procedural dataset: determinism, layout, captions, held-out pairs, disjointness, learnability."""

import hashlib

import numpy as np
import pytest
import yaml
from PIL import Image

from agriclip.images import open_image
from agriclip.sources import load_image_text_dataset, load_labelled_dataset
from agriclip.templates import get_templates
from training.embedded import (
    CONDITIONS,
    HELD_OUT_PAIRS,
    build_embedded_dataset,
    downstream_tasks,
    draw,
    main,
    pretraining_sources,
)
from training.prompts import DatasetMetadata


SMALL = {"image_size": 64, "pretrain_per_class": 2, "downstream_per_task": 16, "num_workers": 1}


def tree_digest(root) -> dict:
    files = (path for path in root.rglob("*") if path.is_file())
    return {str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest() for path in files}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return build_embedded_dataset(tmp_path_factory.mktemp("embedded"), seed=0, **SMALL)


def test_build_is_deterministic_by_seed(built, tmp_path):
    again = build_embedded_dataset(tmp_path / "again", seed=0, **SMALL)
    assert tree_digest(built) == tree_digest(again)
    other = build_embedded_dataset(tmp_path / "other", seed=1, **SMALL)
    first, second = tree_digest(built), tree_digest(other)
    images = [name for name in first if name.endswith(".png")]
    assert set(first) == set(second)
    assert sum(first[name] != second[name] for name in images) == len(images)


def test_suite_config_format(built):
    suite = yaml.safe_load((built / "suite.yaml").read_text())
    names = [entry["name"] for entry in suite["datasets"]]
    assert names == ["leaf-condition", "leaf-spot", "crop-condition", "fish-species", "cattle-breed"]
    for entry in suite["datasets"]:
        assert set(entry) - {"hierarchy"} == {
            "name",
            "display_name",
            "path",
            "class_names",
            "templates",
            "fine_grained",
            "domain",
        }
        assert get_templates(entry["templates"])
        dataset, classes = load_labelled_dataset(built / entry["path"])
        assert sorted(entry["class_names"]) == classes and len(dataset) >= len(classes)
        assert all(isinstance(name, str) and name for name in entry["class_names"].values())


def test_the_suite_names_each_task_s_domain_and_groups_crop_condition_by_crop(built):
    """Abstention scores a task's photos against the other domains' ones; the two-level labels of crop-condition are
    its crops, each with the conditions of that crop's class folders."""
    from evaluation.hierarchy import load_task_hierarchy
    from evaluation.suite import load_suite_config

    specs = load_suite_config(built / "suite.yaml").datasets
    assert [spec.domain_name for spec in specs] == ["plant disease"] * 3 + ["fish species", "cattle breed"]
    assert [spec.name for spec in specs if spec.hierarchy is not None] == ["crop-condition"]
    spec = specs[2]
    folders = sorted(path.name for path in spec.path.iterdir())
    hierarchy, classes = load_task_hierarchy(spec, folders, [spec.class_names[folder] for folder in folders])
    assert hierarchy.levels == ("crop", "condition") and sorted(hierarchy.groups) == [
        "bean",
        "grape",
        "maize",
        "tomato",
    ]
    for crop, prompts in hierarchy.groups.items():
        assert len(prompts) == 2 and all(prompt.startswith(f"a {crop} leaf with ") for prompt in prompts)
    assert sorted(classes) == list(range(len(folders)))


def test_the_fine_grained_tasks_are_marked_in_the_suite(built):
    """Leaf spots (spot size and halo colour), cattle breeds (coat on one body shape) and crop-condition pairs
    (held-out combinations of seen crops and conditions) are the fine-grained tasks; the evaluation suite reads the
    flags."""
    from evaluation.suite import load_suite_config

    marked = [spec.name for spec in load_suite_config(built / "suite.yaml").datasets if spec.fine_grained]
    assert marked == ["leaf-spot", "crop-condition", "cattle-breed"]


def test_pretraining_split_reads_back_with_class_details(built):
    sources = {source.name: source.metadata for source in pretraining_sources()}
    for split, per_class in (("train", 1), ("validation", 1)):
        dataset = load_image_text_dataset(built / "pretrain", split=split)
        assert dataset.column_names == ["image", "caption", "captions", "source", "label"]
        assert len(dataset) == per_class * sum(len(m.classes) for m in sources.values())
        for row in dataset:
            meta = sources[row["source"]]
            cls = meta.class_metadata(row["label"])
            assert row["caption"] == row["captions"][0] and len(row["captions"]) == 3
            for caption in row["captions"]:
                assert cls.name in caption and meta.subject.split()[-1] in caption
                assert any(cue in caption for cue in cls.description)
            assert open_image(row["image"]).size == (64, 64)
    # The metadata written next to the data is what the captions come from.
    written = DatasetMetadata.from_file(built / "sources" / "fish-species.yaml")
    assert written == sources["fish-species"]


def test_held_out_pairs_never_appear_in_pretraining(built):
    rows = list(load_image_text_dataset(built / "pretrain", split="train"))
    rows += list(load_image_text_dataset(built / "pretrain", split="validation"))
    pairs = {(row["source"], row["label"]) for row in rows}
    captions = " ".join(caption for row in rows for caption in row["captions"])
    for crop, condition in HELD_OUT_PAIRS:
        assert (f"{crop}-leaves", condition) not in pairs
        assert f"{crop} leaf with {CONDITIONS[condition].name}" not in captions
        assert f"{crop} leaf" in captions and CONDITIONS[condition].name in captions  # both parts are seen
    _, classes = load_labelled_dataset(built / "downstream" / "crop-condition")
    assert {f"{crop}_{condition}" for crop, condition in HELD_OUT_PAIRS} <= set(classes)


def test_downstream_images_are_disjoint_from_pretraining(built):
    def pixel_digests(paths):
        return {hashlib.sha256(np.asarray(Image.open(p)).tobytes()).hexdigest() for p in paths}

    pretrain = pixel_digests((built / "pretrain").rglob("*.png"))
    downstream = pixel_digests((built / "downstream").rglob("*.png"))
    assert pretrain and downstream and not pretrain & downstream


def histogram(image: np.ndarray) -> np.ndarray:
    """A 512-bin colour histogram of the image seen at 64x64."""
    small = np.asarray(Image.fromarray(image).resize((64, 64), Image.Resampling.BICUBIC)).astype(int) // 32
    counts = np.bincount((small[..., 0] * 64 + small[..., 1] * 8 + small[..., 2]).ravel(), minlength=512)
    return np.sqrt(counts / counts.sum())


@pytest.mark.parametrize("task_name", ["leaf-spot", "fish-species", "cattle-breed"])
def test_classes_are_learnable_at_64_pixels(task_name):
    """A ridge classifier on colour histograms separates the classes: the class is in the pixels, and for
    leaf-spot it is in the spot size and halo colour alone."""
    task = next(task for task in downstream_tasks() if task.name == task_name)
    features, labels = {}, {}
    for split, offset, count in (("train", 0, 12), ("test", 1, 8)):
        rows = [
            (histogram(draw(drawings, np.random.default_rng([offset, index, n]), 96)), index)
            for index, drawings in enumerate(task.drawings.values())
            for n in range(count)
        ]
        features[split] = np.array([np.append(x, 1.0) for x, _ in rows])
        labels[split] = np.array([y for _, y in rows])
    targets = np.eye(len(task.drawings))[labels["train"]]
    gram = features["train"].T @ features["train"] + 0.1 * np.eye(features["train"].shape[1])
    weights = np.linalg.solve(gram, features["train"].T @ targets)
    accuracy = ((features["test"] @ weights).argmax(1) == labels["test"]).mean()
    assert accuracy >= 0.7, accuracy


def test_cli_prints_where_things_went(tmp_path, capsys):
    main(
        [
            "--output",
            str(tmp_path / "cli"),
            "--seed",
            "3",
            "--image-size",
            "32",
            "--pretrain-per-class",
            "1",
            "--downstream-per-task",
            "8",
            "--num-workers",
            "1",
        ]
    )
    out = capsys.readouterr().out
    assert str(tmp_path / "cli" / "suite.yaml") in out and str(tmp_path / "cli" / "pretrain" / "train") in out
    assert "held-out" in out and (tmp_path / "cli" / "embedded.json").is_file()


@pytest.mark.slow
def test_parallel_build_matches_serial(built, tmp_path):
    parallel = build_embedded_dataset(tmp_path / "parallel", seed=0, **{**SMALL, "num_workers": 2})
    assert tree_digest(parallel) == tree_digest(built)
