"""The `agriclip` command: every command in every output format, agreement with `ZeroShotClassifier`, and the
error cases with their exit codes."""

import csv
import io
import json
import os
import re
import shutil
import socket
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from huggingface_hub import EvalResult, ModelCard, ModelCardData
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from agriclip import cli
from agriclip.cli import main
from agriclip.errors import CLIError, ExitCode
from agriclip.images import open_image
from agriclip.templates import get_templates
from modeling_agriclip.commands import classify_files, find_images
from modeling_agriclip.zero_shot import ZeroShotClassifier

from conftest import full_disk, run_subprocess


LABELS = ["leaf rust", "healthy leaf", "powdery mildew"]
TEMPLATES = ["a photo of {}.", "a field photo showing {}."]
READABLE = ["a.png", "b.jpg", "c.png", "sub/d.png"]  # in the order a folder walk finds them


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Four readable photos of different sizes (one in a subfolder), a corrupt and an empty image, a text file and a
    hidden macOS-style file, which the folder walk skips."""
    root = tmp_path_factory.mktemp("photos")
    (root / "sub").mkdir()
    rng = np.random.default_rng(0)
    for name, (height, width) in zip(READABLE, [(70, 90), (64, 64), (100, 80), (66, 120)]):
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(root / name)
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    (root / "empty.png").write_bytes(b"")
    (root / "notes.txt").write_text("not an image")
    (root / "._a.png").write_bytes(b"resource fork")
    return root


@pytest.fixture(scope="module")
def reference(tiny_checkpoint):
    return ZeroShotClassifier.from_pretrained(tiny_checkpoint)


def run(capsys, *argv):
    """Runs the command in-process; returns (exit code, stdout, stderr)."""
    code = main([str(arg) for arg in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def predict_args(model, *images, top_k=2):
    args = ["predict", *images, "--labels", ",".join(LABELS), "--model", model, "--top-k", top_k, "--num-workers", 0]
    return args + [option for template in TEMPLATES for option in ("--template", template)]


def expected_predictions(reference, paths, top_k=2):
    return reference.predict([open_image(path) for path in paths], LABELS, TEMPLATES, top_k=top_k)


def assert_same_predictions(rows, expected, tolerance=1e-5):
    """`rows`: per image, [(label, score), ...] best first."""
    assert len(rows) == len(expected)
    for row, want in zip(rows, expected):
        assert [label for label, _ in row] == [item["label"] for item in want]
        assert [score for _, score in row] == pytest.approx([item["score"] for item in want], abs=tolerance)


def read_csv(text):
    return list(csv.DictReader(io.StringIO(text)))


def csv_predictions(rows):
    grouped = {}
    for row in rows:
        if not row["error"]:
            grouped.setdefault(row["image"], []).append((int(row["rank"]), row["label"], float(row["score"])))
    return list(grouped), [[(label, score) for _, label, score in sorted(items)] for items in grouped.values()]


def table_predictions(text):
    lines = text.strip().splitlines()
    assert re.split(r"\s{2,}", lines[0].strip()) == ["image", "rank", "label", "score"]
    grouped = {}
    for line in lines[1:]:
        image, rank, label, score = re.split(r"\s{2,}", line.strip())
        grouped.setdefault(image, []).append((int(rank), label, float(score)))
    return list(grouped), [[(label, score) for _, label, score in sorted(items)] for items in grouped.values()]


def json_predictions(document):
    return (
        [entry["image"] for entry in document["results"]],
        [[(item["label"], item["score"]) for item in entry["predictions"]] for entry in document["results"]],
    )


# ---------------------------------------------------------------------------------------------------------------
# Finding images
# ---------------------------------------------------------------------------------------------------------------


def test_find_images_walks_folders_expands_globs_and_keeps_named_files(photos, tmp_path):
    folder = [str(photos / name) for name in READABLE[:3]]
    files, unmatched = find_images([str(photos)])
    # Folder walk: image suffixes only (broken.jpg and empty.png included: decoding decides), hidden files skipped.
    walked = ["a.png", "b.jpg", "broken.jpg", "c.png", "empty.png", "sub/d.png"]
    assert files == [str(photos / name) for name in walked]
    assert unmatched == []

    pattern = str(photos / "*.png")
    notes = str(photos / "notes.txt")
    missing = str(tmp_path / "missing.jpg")
    files, unmatched = find_images([folder[1], pattern, notes, folder[0], missing, str(tmp_path / "*.jpg")])
    # Argument order, duplicates dropped, an explicitly named file kept whatever its suffix.
    assert files == [folder[1], folder[0], str(photos / "c.png"), str(photos / "empty.png"), notes]
    assert unmatched == [missing, str(tmp_path / "*.jpg")]


def test_classify_files_computes_label_embeddings_once_and_batches_images(photos, reference, monkeypatch):
    text_calls, image_calls = [], []
    model = reference.model
    get_text, get_image = model.get_text_features, model.get_image_features
    monkeypatch.setattr(model, "get_text_features", lambda **kw: text_calls.append(1) or get_text(**kw))
    monkeypatch.setattr(
        model, "get_image_features", lambda **kw: image_calls.append(len(kw["pixel_values"])) or get_image(**kw)
    )
    classifier = ZeroShotClassifier(model, reference.processor, batch_size=2)
    files = [str(photos / name) for name in ["a.png", "broken.jpg", "b.jpg", "c.png", "sub/d.png"]]
    first = classify_files(classifier, files, ["rust", "mildew"], TEMPLATES, top_k=1, batch_size=2, num_workers=0)
    again = classify_files(classifier, files, ["rust", "mildew"], TEMPLATES, top_k=1, batch_size=2, num_workers=0)
    assert len(text_calls) == 2  # 4 prompts in batches of 2, once for both runs
    assert image_calls == [1, 2, 1] * 2  # per run: [a, broken skipped], [b, c], [d]
    assert first.files == again.files == [str(photos / name) for name in READABLE]
    assert first.stats.skipped == {"corrupt": [str(photos / "broken.jpg")]}


# ---------------------------------------------------------------------------------------------------------------
# predict, classify-folder, embed, info: outputs
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("output_format", ["table", "csv", "json"])
def test_predict_output_agrees_with_the_classifier(capsys, photos, tiny_checkpoint, reference, output_format):
    code, out, err = run(capsys, *predict_args(tiny_checkpoint, photos), "--format", output_format)
    assert code == ExitCode.OK
    paths = [str(photos / name) for name in READABLE]
    if output_format == "table":
        images, rows = table_predictions(out)
    elif output_format == "csv":
        table = read_csv(out)
        images, rows = csv_predictions(table)
        assert [(row["image"], row["error"]) for row in table if row["error"]] == [
            (str(photos / "broken.jpg"), "corrupt"),
            (str(photos / "empty.png"), "empty file"),
        ]
    else:
        document = json.loads(out)
        images, rows = json_predictions(document)
        assert document["labels"] == LABELS and document["templates"] == TEMPLATES
        assert document["embedding"] == "aligned" and document["model"] == str(tiny_checkpoint)
        assert document["skipped"] == [
            {"image": str(photos / "broken.jpg"), "error": "corrupt"},
            {"image": str(photos / "empty.png"), "error": "empty file"},
        ]
    assert images == paths
    # The table rounds scores to 4 decimals.
    assert_same_predictions(rows, expected_predictions(reference, paths), 6e-5 if output_format == "table" else 1e-5)
    assert "broken.jpg" in err and "empty.png" in err and "skipped 2" in err


@pytest.mark.parametrize(
    ("output", "output_format"),
    [("out/predictions.csv", None), ("predictions.json", None), ("predictions.txt", "table")],
)
def test_classify_folder_writes_every_format(
    capsys, photos, tiny_checkpoint, reference, tmp_path, output, output_format
):
    args = ["classify-folder", photos, "--labels-file", tmp_path / "labels.txt", "--output", tmp_path / output]
    args += ["--model", tiny_checkpoint, "--batch-size", 3, "--num-workers", 0, "--dataset-template", "leaf"]
    (tmp_path / "labels.txt").write_text("\n".join(LABELS) + "\n\n")
    code, out, err = run(capsys, *args, *(["--format", output_format] if output_format else []))
    assert code == ExitCode.OK and out == ""
    assert f"classified 4 images, skipped 2 unreadable; wrote {tmp_path / output}" in err
    text = (tmp_path / output).read_text()
    paths = [str(photos / name) for name in READABLE]
    if output.endswith(".csv"):
        table = read_csv(text)
        images, rows = csv_predictions(table)
        skipped = [row["image"] for row in table if row["error"]]
        assert skipped == [str(photos / "broken.jpg"), str(photos / "empty.png")]
    elif output.endswith(".json"):
        images, rows = json_predictions(json.loads(text))
    else:
        images, rows = table_predictions(text)
    assert images == paths
    leaf = ZeroShotClassifier(reference.model, reference.processor)
    want = leaf.predict([open_image(path) for path in paths], LABELS, get_templates("leaf"), top_k=1)
    assert_same_predictions(rows, want, 6e-5 if output_format == "table" else 1e-5)


def test_decoding_workers_give_the_same_predictions(capsys, photos, tiny_checkpoint):
    # predict_args asks for --num-workers 0; the last occurrence of an option wins.
    args = predict_args(tiny_checkpoint, photos) + ["--format", "csv", "--batch-size", 2]
    _, in_process, _ = run(capsys, *args)
    code, with_workers, err = run(capsys, *args, "--num-workers", 2)
    assert code == ExitCode.OK and "skipped 2" in err
    assert with_workers == in_process


def test_embed_safetensors_records_file_order_and_label_embeddings(
    capsys, photos, tiny_checkpoint, reference, tmp_path
):
    output = tmp_path / "embeddings.safetensors"
    images = [photos / "c.png", photos / "broken.jpg", photos / "a.png"]
    argv = ["embed", *images, "--labels", ",".join(LABELS), "--template", TEMPLATES[0], "--output", output]
    code, _, err = run(capsys, *argv, "--model", tiny_checkpoint)
    assert code == ExitCode.OK and "broken.jpg" in err
    with safe_open(output, framework="pt") as handle:
        metadata = handle.metadata()
        image_embeds, label_embeds = handle.get_tensor("image_embeds"), handle.get_tensor("label_embeds")
    files = json.loads(metadata["files"])
    assert files == [str(photos / "c.png"), str(photos / "a.png")]
    assert json.loads(metadata["skipped"]) == [{"image": str(photos / "broken.jpg"), "error": "corrupt"}]
    assert json.loads(metadata["labels"]) == LABELS and json.loads(metadata["templates"]) == TEMPLATES[:1]
    assert metadata["embedding"] == "aligned"
    expected = reference.image_embeddings([open_image(path) for path in files])
    torch.testing.assert_close(image_embeds, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(label_embeds, reference.label_embeddings(LABELS, TEMPLATES[:1]), atol=1e-5, rtol=1e-5)


def test_embed_npy_writes_the_file_order_beside_the_array(capsys, photos, tiny_checkpoint, reference, tmp_path):
    argv = ["embed", photos / "sub", photos / "b.jpg", "--output", tmp_path / "images.npy", "--embedding", "clip"]
    code, _, _ = run(capsys, *argv, "--model", tiny_checkpoint)
    assert code == ExitCode.OK
    metadata = json.loads((tmp_path / "images.npy.json").read_text())
    assert metadata["files"] == [str(photos / "sub/d.png"), str(photos / "b.jpg")] and metadata["embedding"] == "clip"
    expected = reference.with_embedding("clip").image_embeddings([open_image(path) for path in metadata["files"]])
    np.testing.assert_allclose(np.load(tmp_path / "images.npy"), expected.numpy(), atol=1e-5)

    argv = ["embed", "--labels", "rust,mildew", "--output", tmp_path / "labels.npy"]
    code, _, _ = run(capsys, *argv, "--model", tiny_checkpoint)
    assert code == ExitCode.OK
    assert json.loads((tmp_path / "labels.npy.json").read_text())["labels"] == ["rust", "mildew"]
    expected = reference.label_embeddings(["rust", "mildew"]).numpy()
    np.testing.assert_allclose(np.load(tmp_path / "labels.npy"), expected, atol=1e-5)


@pytest.fixture(scope="module")
def carded_checkpoint(tiny_checkpoint, tmp_path_factory):
    """The tiny checkpoint with a README.md model card holding metadata and two evaluation results."""
    folder = tmp_path_factory.mktemp("carded") / "agriclip-tiny"
    shutil.copytree(tiny_checkpoint, folder)
    task = "zero-shot-image-classification"
    results = [
        EvalResult(
            task_type=task,
            dataset_type=name,
            dataset_name=name,
            metric_type="accuracy",
            metric_name="Top-1",
            metric_value=value,
        )
        for name, value in (("leaf-spot", 0.8125), ("fish-species", 0.5))
    ]
    data = ModelCardData(
        model_name="agriclip-tiny", license="apache-2.0", pipeline_tag=task, tags=["agriculture"], eval_results=results
    )
    ModelCard.from_template(data, model_description="A tiny test model.").save(folder / "README.md")
    return folder


def test_info_table_and_json(capsys, carded_checkpoint, tiny_model):
    code, out, _ = run(capsys, "info", carded_checkpoint, "--format", "json")
    assert code == ExitCode.OK
    info = json.loads(out)
    config = tiny_model.config
    assert info["model_type"] == "agriclip" and info["image_embedding"] == "aligned"
    assert info["projection_dim"] == config.projection_dim
    assert info["towers"]["text"]["num_hidden_layers"] == config.text_config.num_hidden_layers
    assert info["towers"]["vision"]["image_size"] == config.vision_config.image_size
    assert info["towers"]["backbone"]["model_type"] == config.dino_config.model_type
    aligner = {"in_features": config.backbone_hidden_size, "out_features": config.projection_dim}
    assert info["towers"]["aligner"] == aligner
    assert info["parameters"]["total"] == sum(p.numel() for p in tiny_model.parameters())
    assert info["parameters"]["dino_model"] == sum(p.numel() for p in tiny_model.dino_model.parameters())
    assert info["card"]["license"] == "apache-2.0" and info["card"]["tags"] == ["agriculture"]
    assert info["card"]["eval_results"][0] == {"dataset": "leaf-spot", "metric": "Top-1", "value": 0.8125}

    code, out, _ = run(capsys, "info", carded_checkpoint)
    assert code == ExitCode.OK
    lines = {line.split()[0]: line for line in out.splitlines()}
    assert f"vit: hidden_size {config.dino_config.hidden_size}" in lines["backbone"]
    assert f"linear {config.backbone_hidden_size} -> {config.projection_dim}" in lines["aligner"]
    assert "zero-shot image embedding: aligned" in lines["embedding"]
    assert f"{info['parameters']['total'] / 1e6:.2f} M in all" in lines["parameters"]
    assert "license apache-2.0" in lines["card"]
    assert lines["evaluation"] == "evaluation 2 results: leaf-spot Top-1 0.8125; fish-species Top-1 0.5"


def test_info_on_a_clip_baseline_folder(capsys, tiny_clip_checkpoint):
    code, out, _ = run(capsys, "info", tiny_clip_checkpoint)
    assert code == ExitCode.OK
    assert "zero-shot image embedding: clip (a single image tower)" in out
    assert "backbone" not in out and "card       none (no README.md)" in out


def test_model_from_the_environment_variable(capsys, photos, tiny_checkpoint, monkeypatch):
    monkeypatch.setenv(cli.MODEL_ENV, str(tiny_checkpoint))
    code, out, _ = run(capsys, "predict", photos / "a.png", "--labels", "rust,mildew", "--format", "json")
    assert code == ExitCode.OK and json.loads(out)["model"] == str(tiny_checkpoint)


def test_a_single_label_is_warned_about_once_before_the_model_loads(capsys, photos, tiny_checkpoint):
    code, out, err = run(
        capsys, "predict", photos / "a.png", "--labels", "rust", "--model", tiny_checkpoint, "--format", "json"
    )
    assert code == ExitCode.OK and json.loads(out)["results"][0]["predictions"][0]["score"] == pytest.approx(1.0)
    assert err.count("always scores 1.0") == 1  # the classifier's own warning is not repeated
    assert (
        "agriclip: warning: a single label ('rust') always scores 1.0: scores are softmax probabilities over the "
        "labels given, relative to those labels only" in err
    )


def test_the_table_aligns_wide_file_names_and_labels(capsys, photos, tiny_checkpoint, tmp_path):
    """A CJK character takes two terminal columns: the columns line up on screen, not in characters."""
    shutil.copy(photos / "a.png", tmp_path / "a.png")
    shutil.copy(photos / "b.jpg", tmp_path / "稲の葉.jpg")  # 3 wide characters: 10 columns with ".jpg"
    code, out, _ = run(
        capsys,
        "predict",
        tmp_path / "a.png",
        tmp_path / "稲の葉.jpg",
        "--labels",
        "葉さび病,healthy",
        "--model",
        tiny_checkpoint,
        "--top-k",
        1,
    )
    assert code == ExitCode.OK
    prefix = len(str(tmp_path)) + 1
    columns = {"image": 5, "a.png": 5, "稲の葉.jpg": 10, "label": 5, "葉さび病": 8, "healthy": 7}  # counted by hand
    lines = out.splitlines()
    assert len(lines) == 3
    for line in lines:
        image, rank, label, score = re.split(r"\s{2,}", line.strip())
        name = image.rsplit("/", 1)[-1]
        width = columns[name] + (prefix if name != "image" else 0)
        # The image column is padded to the widest name (prefix + 10 columns), the label column to 8 columns.
        assert line.startswith(image + " " * (prefix + 10 - width + 2))
        assert line.split(rank + "  ", 1)[1].startswith(label + " " * (8 - columns[label] + 2) + score)


# ---------------------------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------------------------


def test_missing_model_argument_is_a_usage_error(capsys, photos, monkeypatch):
    monkeypatch.delenv(cli.MODEL_ENV, raising=False)
    with pytest.raises(SystemExit) as exit_info:
        main(["predict", str(photos), "--labels", "a,b"])
    assert exit_info.value.code == ExitCode.USAGE
    assert (
        f"no model given: pass --model PATH (or MODEL for info and export), or set {cli.MODEL_ENV}"
        in capsys.readouterr().err
    )


@pytest.mark.parametrize(
    ("labels", "message"),
    [
        (["--labels", " , ,"], "--labels holds no label"),
        (["--labels", "rust,mildew,rust"], "--labels repeats the label(s) 'rust'"),
        (["--labels-file", "{tmp}/empty.txt"], "the labels file {tmp}/empty.txt holds no label"),
        (["--labels-file", "{tmp}/missing.txt"], "cannot read the labels file {tmp}/missing.txt"),
        (["--labels", "a,b", "--template", "a photo"], "--template: template 'a photo' has no '{{}}' placeholder"),
        (["--labels", "a,b", "--dataset-template", "nope"], "--dataset-template: unknown template set 'nope'"),
    ],
)
def test_bad_labels_and_templates(capsys, photos, tiny_checkpoint, tmp_path, labels, message):
    (tmp_path / "empty.txt").write_text("\n  \n")
    labels = [argument.format(tmp=tmp_path) for argument in labels]
    code, out, err = run(capsys, "predict", photos, *labels, "--model", tiny_checkpoint)
    assert code == ExitCode.LABELS and out == ""
    assert f"agriclip: error: {message.format(tmp=tmp_path)}" in err


def test_no_images_found(capsys, tiny_checkpoint, tmp_path):
    (tmp_path / "empty-folder").mkdir()
    argv = ["predict", tmp_path / "empty-folder", tmp_path / "typo.jpg", "--labels", "a,b"]
    code, _, err = run(capsys, *argv, "--model", tiny_checkpoint)
    assert code == ExitCode.NO_IMAGES
    assert f"warning: {tmp_path / 'typo.jpg'}: no such file or folder" in err
    assert f"error: no images found in {tmp_path / 'empty-folder'} {tmp_path / 'typo.jpg'}" in err
    argv = ["classify-folder", tmp_path / "typo", "--labels", "a", "--output", tmp_path / "p.csv"]
    code, _, err = run(capsys, *argv, "--model", tiny_checkpoint)
    assert code == ExitCode.NO_IMAGES and f"{tmp_path / 'typo'} is not a folder" in err


def test_only_unreadable_images(capsys, photos, tiny_checkpoint):
    argv = ["predict", photos / "broken.jpg", photos / "notes.txt", "--labels", "a,b"]
    code, out, err = run(capsys, *argv, "--model", tiny_checkpoint)
    assert code == ExitCode.UNREADABLE and out == ""
    assert "error: none of the images could be read: decoded 0 images, skipped 2" in err
    assert f"corrupt (2): {photos / 'broken.jpg'}, {photos / 'notes.txt'}" in err
    # Named once, by the error: no warning lists them before it.
    assert err.count(str(photos / "broken.jpg")) == err.count(str(photos / "notes.txt")) == 1
    assert "warning: unreadable images were skipped" not in err


@pytest.mark.parametrize(
    ("model", "message"),
    [
        (
            "{tmp}/no-such-model",
            "cannot load the model '{model}': no such folder. Pass a local folder with --model PATH",
        ),
        # A folder that is not a saved model: said so, not transformers' "Should have a `model_type` key".
        (
            "{tmp}",
            "cannot load the model: {model} has no config.json: not a saved model folder (save it with "
            "save_pretrained, or build one with `agriclip convert`)",
        ),
        # The tests run with HF_HUB_OFFLINE=1 (conftest): said at once, instead of "We couldn't connect".
        (
            "org/not-cached",
            "cannot load the model: org/not-cached: offline mode is on (HF_HUB_OFFLINE=1) and the Hugging Face cache",
        ),
    ],
)
def test_model_that_cannot_be_loaded(capsys, photos, tmp_path, model, message):
    model = model.format(tmp=tmp_path)
    message = message.format(model=model)
    for argv in (["predict", photos, "--labels", "a,b", "--model", model], ["info", model]):
        code, _, err = run(capsys, *argv)
        assert code == ExitCode.MODEL
        assert f"agriclip: error: {message}" in err and ".." not in err


def test_an_unreachable_hub_fails_at_once_and_suggests_offline_mode(capsys, photos, monkeypatch):
    """A Hub id while the Hub cannot be reached: one try, then a message suggesting HF_HUB_OFFLINE=1, where
    huggingface_hub retried for half a minute. The endpoint is a closed local port: nothing leaves the machine."""
    import socket
    import time

    from huggingface_hub import constants

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{probe.getsockname()[1]}"  # closed once the socket is
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    started = time.monotonic()
    code, _, err = run(capsys, "predict", photos / "a.png", "--labels", "a,b", "--model", "org/not-cached")
    assert time.monotonic() - started < 10
    assert code == ExitCode.MODEL
    assert (
        f"agriclip: error: cannot load the model: org/not-cached: the Hugging Face Hub at {endpoint} cannot be "
        "reached" in err
    )
    assert (
        "the Hugging Face cache does not hold this Hub id: pass a local model folder" in err and "Retrying" not in err
    )


@pytest.mark.slow  # a subprocess that loads torch and a model: 7-10 s
def test_a_cached_hub_model_loads_from_the_cache_when_the_hub_cannot_be_reached(photos, tiny_checkpoint, tmp_path):
    """In the field: the Hub out of reach, the model in the Hugging Face cache. It loads from there, saying so."""
    import socket

    snapshot = tmp_path / "hub" / "models--org--cached" / "snapshots" / ("0" * 40)
    shutil.copytree(tiny_checkpoint, snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{probe.getsockname()[1]}"
    env = {key: value for key, value in os.environ.items() if key != "HF_HUB_OFFLINE"}
    env.update(HF_HUB_CACHE=str(tmp_path / "hub"), HF_ENDPOINT=endpoint)
    done = run_subprocess(
        [
            sys.executable,
            "-m",
            "agriclip",
            "predict",
            str(photos / "a.png"),
            "--labels",
            "a,b",
            "--model",
            "org/cached",
            "--format",
            "json",
        ],
        env=env,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "cannot be reached" in done.stderr and "loading it from the Hugging Face cache" in done.stderr
    assert [row["image"] for row in json.loads(done.stdout)["results"]] == [str(photos / "a.png")]


def test_unknown_or_unavailable_device(capsys, photos, tiny_checkpoint):
    code, _, err = run(capsys, "predict", photos, "--labels", "a,b", "--model", tiny_checkpoint, "--device", "banana")
    assert code == ExitCode.DEVICE
    assert "error: --device 'banana' is not usable here" in err and "available: cpu" in err
    if not torch.cuda.is_available():
        argv = ["predict", photos, "--labels", "a,b", "--device", "cuda"]
        code, _, err = run(capsys, *argv, "--model", tiny_checkpoint)
        assert code == ExitCode.DEVICE and "--device 'cuda' is not usable here" in err


def test_embedding_choice_needs_an_agriclip_model(capsys, photos, tiny_clip_checkpoint):
    argv = ["predict", photos / "a.png", "--labels", "a,b", "--embedding", "aligned"]
    code, _, err = run(capsys, *argv, "--model", tiny_clip_checkpoint)
    assert code == ExitCode.USAGE and "--embedding aligned: CLIPModel has a single image embedding" in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["{photos}", "--output", "{tmp}/e.pt"], "the suffix must be one of .safetensors, .npy"),
        (["--output", "{tmp}/e.npy"], "nothing to embed"),
        (["{photos}", "--labels", "a", "--output", "{tmp}/e.npy"], "a .npy file holds one array"),
    ],
)
def test_embed_usage_errors(capsys, photos, tiny_checkpoint, tmp_path, argv, message):
    argv = [argument.format(photos=photos, tmp=tmp_path) for argument in argv]
    code, _, err = run(capsys, "embed", *argv, "--model", tiny_checkpoint)
    assert code == ExitCode.USAGE and message in err


def test_unwritable_output(capsys, photos, tiny_checkpoint, tmp_path):
    (tmp_path / "a-file").write_text("")
    output = tmp_path / "a-file" / "predictions.csv"
    argv = ["classify-folder", photos / "sub", "--labels", "a,b", "--output", output]
    code, _, err = run(capsys, *argv, "--model", tiny_checkpoint)
    assert code == ExitCode.OUTPUT and f"error: cannot write {output}" in err


def test_argparse_usage_errors_exit_with_2(capsys, tiny_checkpoint):
    # top-k 0, both kinds of labels (no labels at all is a usage error too, once a --calibration file could give
    # them: tests/test_predict_options.py)
    bad = (["--labels", "a", "--top-k", "0"], ["--labels", "a", "--labels-file", "f"])
    for argv in (["predict", "x.png", *options] for options in bad):
        with pytest.raises(SystemExit) as exit_info:
            main(argv + ["--model", str(tiny_checkpoint)])
        assert exit_info.value.code == ExitCode.USAGE
    assert "--top-k: must be at least 1" in capsys.readouterr().err


@pytest.mark.slow  # a subprocess that loads torch and a model: 7-10 s
def test_module_entry_point_exit_code(tmp_path):
    """The installed entry point (`agriclip = agriclip.cli:main`) runs the same main; here through -m."""
    repo = Path(__file__).resolve().parents[1]
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(repo)}
    command = [sys.executable, "-m", "agriclip", "info", str(tmp_path / "missing-model")]
    completed = run_subprocess(command, env=environment, cwd=tmp_path, timeout=120)
    assert completed.returncode == ExitCode.MODEL
    assert f"agriclip: error: cannot load the model '{tmp_path / 'missing-model'}': no such folder" in completed.stderr


def test_scripts_report_bad_input_as_one_line_and_exit_9_and_keep_tracebacks_for_bugs(capsys, tmp_path):
    """`agriclip.errors.run_command`, every `python -m` script's entry point: the errors this package raises for bad
    input are one line; anything else, a ValueError from inside a library included, keeps its traceback."""
    import importlib

    from agriclip.errors import INPUT_ERROR_CLASSES, run_command
    from agriclip.templates import check_template
    from training.options import load_config_file
    from training.runtime import RunLock

    (tmp_path / "run").mkdir()
    (tmp_path / "run" / RunLock.NAME).write_text(json.dumps({"pid": os.getpid(), "hostname": socket.gethostname()}))
    bad_inputs = {
        "template '{} with {}' has 2": lambda: check_template("{} with {}"),
        f"config file {tmp_path / 'missing.yaml'} does not exist": lambda: load_config_file(tmp_path / "missing.yaml"),
        f"{tmp_path / 'run'} is in use by another run": lambda: RunLock(tmp_path / "run").__enter__(),
    }
    for message, failing in bad_inputs.items():
        with pytest.raises(SystemExit) as stop:
            run_command(failing, "training.example")
        assert stop.value.code == ExitCode.INPUT
        err = capsys.readouterr().err
        assert err.startswith(f"python -m training.example: error: {message}") and err.count("\n") == 1

    def cannot_load():
        raise CLIError(ExitCode.MODEL, "cannot load the model")

    with pytest.raises(SystemExit) as stop:
        run_command(cannot_load, "training.example")
    assert stop.value.code == ExitCode.MODEL
    bugs = [lambda: {}["step"], lambda: os.path.commonpath(["/absolute", "relative"]), lambda: int("x")]
    for bug in bugs:
        with pytest.raises((KeyError, ValueError)):  # raised inside Python or a library: a bug keeps its traceback
            run_command(bug, "training.example")
    # Every error the registry names exists where it says, so none silently falls back to a traceback.
    for module, names in INPUT_ERROR_CLASSES.items():
        for name in names:
            assert issubclass(getattr(importlib.import_module(module), name), Exception)


# ---------------------------------------------------------------------------------------------------------------
# Tampered and broken checkpoints: never run their code, never ask, never hang; name what is wrong
# ---------------------------------------------------------------------------------------------------------------


def edit_json(path, **changes):
    document = json.loads(path.read_text())
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(document.get(key), dict) and key != "auto_map":
            document[key].update(value)
        else:
            document[key] = value
    path.write_text(json.dumps(document))


# Each way a checkpoint can make transformers import its own Python files: a config, processor, tokenizer or image
# processor class that nothing registered provides, with an `auto_map` entry pointing at `evil.py`.
TAMPERING = {
    "config": (
        "config.json",
        {"model_type": "evil", "auto_map": {"AutoConfig": "evil.Evil", "AutoModel": "evil.Evil"}},
    ),
    "processor": (
        "processor_config.json",
        {"processor_class": "EvilProcessor", "auto_map": {"AutoProcessor": "evil.Evil"}},
    ),
    "tokenizer": (
        "tokenizer_config.json",
        {"tokenizer_class": "EvilTokenizer", "auto_map": {"AutoTokenizer": ["evil.Evil", None]}},
    ),
    "image processor": (
        "processor_config.json",
        {
            "image_processor": {
                "image_processor_type": "EvilImageProcessor",
                "auto_map": {"AutoImageProcessor": "evil.Evil"},
            }
        },
    ),
}


@pytest.fixture(scope="module")
def tampered(tiny_checkpoint, tmp_path_factory):
    """kind -> a copy of the tiny checkpoint tampered that way, whose evil.py writes MARKER beside it on import."""
    root = tmp_path_factory.mktemp("tampered")
    folders = {}
    for kind, (file, changes) in TAMPERING.items():
        folder = root / kind.replace(" ", "-")
        shutil.copytree(tiny_checkpoint, folder)
        (folder / "evil.py").write_text(f"open({str(folder / 'MARKER')!r}, 'w').write('ran')\nclass Evil: pass\n")
        edit_json(folder / file, **changes)
        if kind == "processor":
            edit_json(folder / "tokenizer_config.json", **changes)  # AutoProcessor reads either
        folders[kind] = folder
    return folders


DRIVER = """
import json, sys
from agriclip.cli import main
from modeling_agriclip.zero_shot import ZeroShotClassifier
codes = []
for argv in json.loads(sys.argv[1]):
    codes.append(main(argv))
for folder in json.loads(sys.argv[2]):
    try:
        ZeroShotClassifier.from_pretrained(folder)
        codes.append("loaded")
    except ValueError as error:
        codes.append(f"ValueError: {error}")
print(json.dumps(codes))
"""


def test_no_command_runs_a_checkpoints_code_or_asks_even_when_stdin_answers_yes(tampered, photos, tmp_path):
    """`echo y | agriclip info <folder>` ran the folder's code: transformers asked on stdin. Every command and
    `ZeroShotClassifier.from_pretrained` are run on every tampering in one process whose stdin says "y"."""
    label_args = ["--labels", "rust,mildew", "--num-workers", "0"]
    runs = [["info", str(tampered["config"])]]
    for kind, folder in tampered.items():
        runs += [
            ["predict", str(photos / "a.png"), *label_args, "--model", str(folder)],
            [
                "classify-folder",
                str(photos / "sub"),
                *label_args,
                "--output",
                str(tmp_path / "p.csv"),
                "--model",
                str(folder),
            ],
            ["embed", *label_args[:2], "--output", str(tmp_path / "e.safetensors"), "--model", str(folder)],
        ]
    repo = Path(__file__).resolve().parents[1]
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(repo)}
    completed = subprocess.run(
        [sys.executable, "-c", DRIVER, json.dumps(runs), json.dumps([str(folder) for folder in tampered.values()])],
        input="y\n" * 100,
        capture_output=True,
        text=True,
        env=environment,
        cwd=tmp_path,
        timeout=240,
    )
    assert not [str(folder) for folder in tampered.values() if (folder / "MARKER").exists()]
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "[y/N]" not in completed.stdout + completed.stderr
    codes = json.loads(completed.stdout.splitlines()[-1])
    assert codes[: len(runs)] == [ExitCode.MODEL] * len(runs)
    assert not (tmp_path / "p.csv").exists() and not (tmp_path / "e.safetensors").exists()
    errors = [line for line in completed.stderr.splitlines() if line.startswith("agriclip: error:")]
    assert len(errors) == len(runs)
    config = tampered["config"]
    config_refusal = (
        f"cannot load the model '{config}': {config}: config.json names the model type 'evil', which "
        "neither AgriCLIP nor transformers provides; its auto_map would run the folder's own code "
        "(evil.py), which is never run unless trust_remote_code=True is passed"
    )
    assert errors[0].startswith(f"agriclip: error: {config_refusal}")
    for error in errors[4:]:  # the processor, tokenizer and image-processor tamperings
        assert (
            "its processor files name a processor, tokenizer or image processor class that only the folder's own "
            "code provides (auto_map), which is never run" in error
        )
    for result, folder in zip(codes[len(runs) :], tampered.values()):
        assert result.startswith(f"ValueError: {folder}: ") and "never run unless trust_remote_code=True" in result


def drop_tensors(folder, keep, add=None):
    """Rewrites folder/model.safetensors with the tensors whose name `keep` keeps, plus `add`."""
    weights = load_file(folder / "model.safetensors")
    kept = {key: tensor for key, tensor in weights.items() if keep(key)}
    save_file({**kept, **(add or {})}, folder / "model.safetensors", metadata={"format": "pt"})


def test_a_checkpoint_with_missing_unexpected_or_reshaped_tensors_is_refused(
    capsys, photos, tiny_checkpoint, tiny_model, tmp_path
):
    folder = tmp_path / "incomplete"
    shutil.copytree(tiny_checkpoint, folder)
    text_tower = ("text_model.", "text_projection.", "logit_scale", "logit_bias")
    drop_tensors(folder, keep=lambda key: key.startswith(text_tower))  # the image towers and aligner gone
    model_keys = sorted(tiny_model.state_dict())
    missing = [key for key in model_keys if not key.startswith(text_tower)]
    code, out, err = run(capsys, "predict", photos / "a.png", "--labels", "a,b", "--model", folder)
    assert code == ExitCode.MODEL and out == ""
    shown = ", ".join(missing[:5])
    assert (
        f"agriclip: error: cannot load the model '{folder}': {folder}: the weights do not fit the model: "
        f"{len(missing)} of the model's {len(model_keys)} tensors are missing ({shown} and {len(missing) - 5} "
        "more). The checkpoint is incomplete or of another model"
    ) in err

    shutil.copytree(tiny_checkpoint, folder, dirs_exist_ok=True)
    drop_tensors(
        folder,
        keep=lambda key: key != "aligner.weight",
        add={"aligner.weight": torch.zeros(3, 3), "extra.head.weight": torch.zeros(2)},
    )
    with pytest.raises(ValueError) as failure:
        ZeroShotClassifier.from_pretrained(folder)
    assert "1 tensors are not in the model (extra.head.weight)" in str(failure.value)
    expected = tuple(tiny_model.aligner.weight.shape)
    assert f"1 tensors have another shape (aligner.weight (3, 3) instead of {expected})" in str(failure.value)


@pytest.mark.parametrize(
    ("template", "message"),
    [
        ("{} with {}", "has 2 '{}' placeholders; give exactly one"),
        ("{name}", "has the format field(s) {name}; the only field allowed is one '{}'"),
        ("a {name} with {}", "has the format field(s) {name}"),
        ("a {} leaf }", "is not a format string (Single '}' encountered in format string)"),
        ("a {0} leaf", "has the format field(s) {0}"),
    ],
)
def test_a_bad_template_exits_7_before_the_model_loads(
    capsys, photos, tiny_checkpoint, tmp_path, monkeypatch, template, message
):
    loaded = []
    monkeypatch.setattr(ZeroShotClassifier, "from_pretrained", lambda *args, **kwargs: loaded.append(args))
    for argv in (["predict", photos / "a.png"], ["embed", "--output", tmp_path / "e.safetensors"]):
        code, out, err = run(capsys, *argv, "--labels", "a,b", "--template", template, "--model", tiny_checkpoint)
        assert code == ExitCode.LABELS and out == ""
        assert f"agriclip: error: --template: template {template!r} {message}" in err
    assert loaded == []


@pytest.mark.parametrize(
    ("argv", "outputs"),
    [
        (["classify-folder", "{photos}", "--labels", "a,b", "--output", "{out}/predictions.csv"], ["predictions.csv"]),
        (["embed", "{photos}/a.png", "--labels", "a,b", "--output", "{out}/e.safetensors"], ["e.safetensors"]),
        (["embed", "{photos}/a.png", "--output", "{out}/e.npy"], ["e.npy", "e.npy.json"]),
    ],
)
def test_a_full_disk_exits_8_and_leaves_the_previous_files_as_they_were(
    capsys, photos, tiny_checkpoint, tmp_path, monkeypatch, argv, outputs
):
    out = tmp_path / "out"
    out.mkdir()
    previous = {name: f"previous {name}\n".encode() for name in outputs}
    for name, data in previous.items():
        (out / name).write_bytes(data)
    full_disk(monkeypatch, out)
    argv = [argument.format(photos=photos, out=out) for argument in argv]
    code, _, err = run(capsys, *argv, "--model", tiny_checkpoint, "--num-workers", 0)
    assert {path.name: path.read_bytes() for path in out.iterdir()} == previous  # and no temporary file left
    assert code == ExitCode.OUTPUT
    names = " and ".join(str(out / name) for name in outputs)
    assert err.splitlines()[-1] == (
        f"agriclip: error: cannot write {names}: No space left on device; any previous file is left as it was"
    )


def forged_header(path):
    """A safetensors file whose header claims a tensor far beyond the file's end."""
    header = json.dumps({"w": {"dtype": "F32", "shape": [10**6], "data_offsets": [0, 4 * 10**6]}}).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 16)


def test_info_names_a_forged_safetensors_header(capsys, tiny_checkpoint, tmp_path):
    folder = tmp_path / "forged"
    shutil.copytree(tiny_checkpoint, folder)
    forged_header(folder / "model.safetensors")
    code, out, err = run(capsys, "info", folder)
    assert code == ExitCode.MODEL and out == ""
    assert (
        f"agriclip: error: cannot read the weights of '{folder}': {folder / 'model.safetensors'}: not a readable "
        "safetensors file ("
    ) in err and "truncated, corrupt or forged" in err


def test_info_reports_an_unreadable_card_and_carries_on(capsys, carded_checkpoint, tmp_path):
    folder = tmp_path / "bad-card"
    shutil.copytree(carded_checkpoint, folder)
    (folder / "README.md").write_text("---\nlicense: [apache-2.0\ntags: {\n---\n# A card\n")
    code, out, err = run(capsys, "info", folder)
    assert code == ExitCode.OK
    card_line = next(line for line in out.splitlines() if line.startswith("card"))
    assert card_line.startswith("card       unreadable: ")
    assert f"agriclip: warning: {folder / 'README.md'}: the model card does not parse" in err
    assert "parameters" in out and "M in all" in out  # the rest of the report is there
    code, out, _ = run(capsys, "info", folder, "--format", "json")
    assert code == ExitCode.OK and set(json.loads(out)["card"]) == {"unreadable"}


FIFO_DRIVER = """
import json, sys
from agriclip.cli import main
print(json.dumps([main(argv) for argv in json.loads(sys.argv[1])]))
"""


@pytest.mark.slow  # a subprocess that loads torch and a model: 7-10 s
def test_a_fifo_in_a_checkpoint_is_never_opened(tiny_checkpoint, photos, tmp_path):
    """Opening a FIFO for reading blocks until a writer comes: forever, and inside safetensors' Rust code no signal
    interrupts it. So the commands run in a child process, killed (and the test failed) if it hangs."""
    fifos, runs = [], []
    for where in ("index", "weights", "card", "config"):
        folder = tmp_path / where
        shutil.copytree(tiny_checkpoint, folder)
        if where == "index":
            (folder / "model.safetensors").rename(folder / "model-00001-of-00002.safetensors")
            weight_map = {"aligner.weight": "model-00001-of-00002.safetensors", "logit_scale": "sub/shard.safetensors"}
            (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
            (folder / "sub").mkdir()
            fifo = folder / "sub" / "shard.safetensors"  # in a subfolder: only the index names it
        else:
            fifo = folder / {"weights": "model.safetensors", "card": "README.md", "config": "config.json"}[where]
            fifo.unlink(missing_ok=True)
        os.mkfifo(fifo)
        fifos.append(fifo)
        runs += [["info", str(folder)], ["predict", str(photos / "a.png"), "--labels", "a,b", "--model", str(folder)]]
    repo = Path(__file__).resolve().parents[1]
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(repo)}
    completed = run_subprocess(
        [sys.executable, "-c", FIFO_DRIVER, json.dumps(runs)], env=environment, cwd=tmp_path, timeout=180
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert json.loads(completed.stdout.splitlines()[-1]) == [ExitCode.MODEL] * len(runs)
    errors = [line for line in completed.stderr.splitlines() if line.startswith("agriclip: error:")]
    assert len(errors) == len(runs)
    for error, fifo in zip(errors, [fifo for fifo in fifos for _ in range(2)]):
        assert f"{fifo} is a FIFO, not a regular file: it is never opened" in error


def test_info_refuses_a_weights_index_that_names_files_outside_the_folder(capsys, tiny_checkpoint, tmp_path):
    folder = tmp_path / "escape"
    shutil.copytree(tiny_checkpoint, folder)
    (folder / "model.safetensors").unlink()  # from_pretrained reads model.safetensors before any index
    for shard, message in (("/dev/zero", "is absolute"), ("../elsewhere.safetensors", "leads outside")):
        (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"aligner.weight": shard}}))
        code, _, err = run(capsys, "info", folder)
        assert code == ExitCode.MODEL
        assert f"{folder / 'model.safetensors.index.json'}: weight_map: the shard {shard!r} {message}" in err
