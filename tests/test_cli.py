"""The `agriclip` command: every command in every output format, agreement with `ZeroShotClassifier`, and the
error cases with their exit codes."""

import csv
import io
import json
import os
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from huggingface_hub import EvalResult, ModelCard, ModelCardData
from PIL import Image
from safetensors import safe_open

from conftest import run_subprocess
from modeling_agriclip import cli
from modeling_agriclip.cli import ExitCode, classify_files, find_images, main
from modeling_agriclip.zero_shot import ZeroShotClassifier
from modeling_agriclip.images import open_image


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
    want = leaf.predict([open_image(path) for path in paths], LABELS, cli.get_templates("leaf"), top_k=1)
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
            task_type=task, dataset_type=name, dataset_name=name, metric_type="accuracy", metric_name="Top-1",
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


# ---------------------------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------------------------


def test_missing_model_argument_is_a_usage_error(capsys, photos, monkeypatch):
    monkeypatch.delenv(cli.MODEL_ENV, raising=False)
    with pytest.raises(SystemExit) as exit_info:
        main(["predict", str(photos), "--labels", "a,b"])
    assert exit_info.value.code == ExitCode.USAGE
    assert f"no model given: pass --model PATH (or MODEL for info), or set {cli.MODEL_ENV}" in capsys.readouterr().err


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


@pytest.mark.parametrize(
    ("model", "reason"),
    [("{tmp}/no-such-model", "no such folder"), ("{tmp}", ""), ("org/not-cached", "")],
)
def test_model_that_cannot_be_loaded(capsys, photos, tmp_path, model, reason):
    model, reason = model.format(tmp=tmp_path), reason.format(tmp=tmp_path)
    code, _, err = run(capsys, "predict", photos, "--labels", "a,b", "--model", model)
    assert code == ExitCode.MODEL
    assert f"error: cannot load the model {model!r}: {reason}" in err
    assert "Pass a local folder with --model PATH" in err
    code, _, err = run(capsys, "info", model)
    assert code == ExitCode.MODEL and f"cannot load the model {model!r}" in err


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
    bad = (["--labels", "a", "--top-k", "0"], ["--labels", "a", "--labels-file", "f"], [])  # top-k 0, both, no labels
    for argv in (["predict", "x.png", *options] for options in bad):
        with pytest.raises(SystemExit) as exit_info:
            main(argv + ["--model", str(tiny_checkpoint)])
        assert exit_info.value.code == ExitCode.USAGE
    assert "--top-k: must be at least 1" in capsys.readouterr().err


def test_module_entry_point_exit_code(tmp_path):
    """The installed entry point (`agriclip = modeling_agriclip.cli:main`) runs the same main; here through -m."""
    repo = Path(__file__).resolve().parents[1]
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(repo)}
    command = [sys.executable, "-m", "modeling_agriclip.cli", "info", str(tmp_path / "missing-model")]
    completed = run_subprocess(command, env=environment, cwd=tmp_path, timeout=120)
    assert completed.returncode == ExitCode.MODEL
    assert f"agriclip: error: cannot load the model '{tmp_path / 'missing-model'}': no such folder" in completed.stderr
