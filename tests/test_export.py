"""`agriclip export`: the closed-vocabulary ONNX classifier, its preprocessing spec and the runner that needs
neither torch nor transformers."""

import ast
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from agriclip.cli import main as agriclip_main
from modeling_agriclip import AgriCLIPConfig, AgriCLIPModel, AgriCLIPProcessor
from modeling_agriclip import export as export_module
from modeling_agriclip.export import ClosedVocabularyClassifier, export_classifier, preprocessing_spec
from modeling_agriclip.zero_shot import ZeroShotClassifier

from conftest import run_subprocess


LABELS = ["leaf rust", "early blight", "healthy leaf", "powdery mildew"]
TEMPLATES = ["a photo of {}.", "a close-up photo of a leaf with {}."]
RUNNER_PATH = Path(export_module.__file__).with_name("onnx_runner.py")


def load_runner(path: Path):
    """The runner file at `path` (an export's runner.py, or the package's onnx_runner.py), imported as a module."""
    spec = importlib.util.spec_from_file_location(f"runner_{path.parent.name}", path)
    runner = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(runner)
    return runner


def photos(folder: Path) -> list[Path]:
    """Readable photos of several sizes and modes and one stored rotated with an EXIF orientation; beside them an
    unreadable broken.jpg."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    paths = []
    for index, (height, width, mode) in enumerate([(80, 100, "RGB"), (64, 64, "RGB"), (121, 90, "RGB"), (47, 73, "L")]):
        image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).convert(mode)
        paths.append(folder / f"{index}.png")
        image.save(paths[-1])
    rotated = Image.fromarray(rng.integers(0, 256, (50, 70, 3), dtype=np.uint8))
    exif = rotated.getexif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to view
    paths.append(folder / "rotated.jpg")
    rotated.save(paths[-1], exif=exif, quality=95)
    (folder / "broken.jpg").write_bytes(b"not a jpeg")
    return paths


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_checkpoint):
    """The tiny checkpoint exported through the command, fused embedding, with int8."""
    folder = tmp_path_factory.mktemp("export") / "classifier"
    argv = ["export", str(tiny_checkpoint), "--labels", ",".join(LABELS), "--output", str(folder)]
    argv += [option for template in TEMPLATES for option in ("--template", template)]
    assert agriclip_main([*argv, "--embedding", "fused", "--quantize", "int8"]) == 0
    return folder


def test_the_linear_head_computes_what_the_zero_shot_classifier_computes(tiny_model, tiny_processor, sample_images):
    pixels = tiny_processor(images=sample_images, return_tensors="pt")["pixel_values"]
    for embedding in ("aligned", "clip", "fused"):
        classifier = ZeroShotClassifier(tiny_model, tiny_processor, embedding=embedding)
        head = ClosedVocabularyClassifier(classifier, LABELS, TEMPLATES)
        with torch.no_grad():
            logits, probabilities = head(pixels)
        expected = classifier.logits(pixels, LABELS, TEMPLATES)
        torch.testing.assert_close(logits, expected, atol=1e-5, rtol=0)
        torch.testing.assert_close(probabilities, expected.softmax(-1), atol=1e-6, rtol=0)


def test_the_runner_preprocesses_as_the_image_processor(tiny_processor, tmp_path):
    runner = load_runner(RUNNER_PATH)
    spec = preprocessing_spec(tiny_processor.image_processor)
    assert spec["shortest_edge"] == tiny_processor.image_processor.size["shortest_edge"]
    assert spec["image_mean"] == list(tiny_processor.image_processor.image_mean)
    for path in photos(tmp_path):
        image = runner.open_photo(str(path))
        expected = tiny_processor(images=[image], return_tensors="pt")["pixel_values"][0].numpy()
        np.testing.assert_allclose(runner.preprocess(image, spec), expected, atol=1e-6, rtol=0)
    upright = runner.open_photo(str(tmp_path / "rotated.jpg"))
    assert upright.size == (50, 70)  # the EXIF rotation was applied: 70 x 50 stored, 50 x 70 viewed


def test_onnx_probabilities_equal_pytorch_on_every_photo_and_batch_size(exported, tiny_checkpoint, tmp_path):
    runner = load_runner(exported / "runner.py")
    classifier = ZeroShotClassifier.from_pretrained(tiny_checkpoint, embedding="fused")
    readable = [str(path) for path in photos(tmp_path)]
    expected = classifier.logits([runner.open_photo(path) for path in readable], LABELS, TEMPLATES).softmax(-1).numpy()
    onnx = runner.Classifier(exported)
    for batch_size in (1, 2, 6):
        results = dict(onnx.classify([*readable, str(tmp_path / "broken.jpg")], len(LABELS), batch_size))
        assert "UnidentifiedImageError" in results.pop(str(tmp_path / "broken.jpg"))  # skipped, with the reason
        assert list(results) == readable
        for path, row in zip(readable, expected):
            scores = dict(results[path])
            assert max(scores, key=scores.get) == LABELS[int(row.argmax())]
            assert max(abs(scores[label] - row[index]) for index, label in enumerate(LABELS)) <= 1e-4


def test_the_export_folder_says_what_it_holds(exported, tiny_checkpoint):
    names = {path.name for path in exported.iterdir()}
    assert names == {"model.onnx", "model.int8.onnx", "labels.json", "preprocessing.json", "runner.py"}
    labels = json.loads((exported / "labels.json").read_text())
    assert labels["labels"] == LABELS and labels["templates"] == TEMPLATES
    assert labels["embedding"] == "fused" and labels["scores"] == "softmax" and labels["model"] == str(tiny_checkpoint)
    assert labels["logit_scale"] == pytest.approx(
        AgriCLIPModel.from_pretrained(tiny_checkpoint).logit_scale.exp().item()
    )
    assert (exported / "runner.py").read_text() == RUNNER_PATH.read_text()
    assert (exported / "model.int8.onnx").stat().st_size < (exported / "model.onnx").stat().st_size
    assert not list(exported.parent.glob(".staging-*"))


def test_the_int8_model_classifies(exported, tmp_path):
    runner = load_runner(exported / "runner.py")
    paths = [str(path) for path in photos(tmp_path)]
    results = list(runner.Classifier(exported, model="model.int8.onnx").classify(paths, top_k=len(LABELS)))
    assert len(results) == len(paths)
    for _, row in results:
        assert sum(score for _, score in row) == pytest.approx(1.0, abs=1e-4)


# Runs runner.py as a script with torch and transformers made unimportable.
BLOCKED = """
import runpy, sys
class Blocker:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "transformers", "tokenizers", "modeling_agriclip", "agriclip"):
            raise ImportError(f"{name} is blocked")
sys.meta_path.insert(0, Blocker())
sys.argv = ["runner.py", *sys.argv[1:]]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_the_runner_needs_neither_torch_nor_transformers(exported, tmp_path):
    paths = photos(tmp_path / "photos")
    done = run_subprocess(
        [sys.executable, "-c", BLOCKED, str(tmp_path / "photos"), "--format", "json", "--top-k", "2"],
        timeout=120,
        cwd=exported,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(done.stdout)
    assert [Path(row["image"]).name for row in rows] == sorted(path.name for path in paths)
    assert all(len(row["predictions"]) == 2 for row in rows)
    assert "skipped" in done.stderr and "broken.jpg" in done.stderr


def test_a_sigmoid_model_exports_per_label_sigmoids(tiny_config, tiny_processor, sample_images, tmp_path):
    config = AgriCLIPConfig.from_dict({**tiny_config.to_dict(), "contrastive_loss": "siglip"})
    torch.manual_seed(0)
    classifier = ZeroShotClassifier(AgriCLIPModel(config).eval(), tiny_processor)
    export = export_classifier(classifier, LABELS, TEMPLATES, tmp_path / "siglip")
    assert json.loads((export.folder / "labels.json").read_text())["scores"] == "sigmoid"
    pixels = tiny_processor(images=sample_images, return_tensors="pt")["pixel_values"]
    probabilities = load_runner(export.folder / "runner.py").Classifier(export.folder).probabilities(pixels.numpy())
    expected = classifier.logits(pixels, LABELS, TEMPLATES).sigmoid().numpy()
    np.testing.assert_allclose(probabilities, expected, atol=1e-5)


def test_a_failed_export_leaves_the_previous_one(tiny_model, tiny_processor, monkeypatch, tmp_path):
    target = tmp_path / "classifier"
    target.mkdir()
    (target / "labels.json").write_text("previous")

    def failing(*args):
        raise RuntimeError("exporter failed")

    monkeypatch.setattr(export_module, "export_onnx", failing)
    with pytest.raises(RuntimeError, match="exporter failed"):
        export_classifier(ZeroShotClassifier(tiny_model, tiny_processor), LABELS, TEMPLATES, target)
    assert [path.name for path in tmp_path.iterdir()] == ["classifier"]
    assert (target / "labels.json").read_text() == "previous"


def test_an_unrepeatable_image_processor_is_refused(tiny_processor):
    processor = AgriCLIPProcessor(tiny_processor.image_processor, tiny_processor.tokenizer)
    processor.image_processor.do_center_crop = False
    try:
        with pytest.raises(ValueError, match="off: \\['do_center_crop'\\]"):
            preprocessing_spec(processor.image_processor)
    finally:
        processor.image_processor.do_center_crop = True


def test_export_refuses_a_file_as_its_output_before_loading(tmp_path, capsys):
    output = tmp_path / "taken"
    output.write_text("a file")
    code = agriclip_main(["export", "no-such-model", "--labels", "a,b", "--output", str(output)])
    assert code == 8 and "is a file; the export is a folder" in capsys.readouterr().err


def test_the_runner_imports_only_onnxruntime_pillow_numpy_and_the_standard_library():
    # tokenizers: only for an open-vocabulary export, imported when one is loaded.
    allowed = {"onnxruntime", "PIL", "numpy", "tokenizers", "__future__"} | set(sys.stdlib_module_names)
    imported = set()
    for node in ast.walk(ast.parse(RUNNER_PATH.read_text())):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add(node.module.split(".")[0])
    assert {"onnxruntime", "PIL", "numpy"} <= imported <= allowed


def test_a_missing_export_dependency_is_named_with_its_install_command(
    tiny_model, tiny_processor, monkeypatch, tmp_path
):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: None if name == "onnxscript" else real(name))
    with pytest.raises(ImportError, match=r"exporting needs onnxscript: pip install 'agriclip\[export\]'"):
        export_classifier(ZeroShotClassifier(tiny_model, tiny_processor), LABELS, TEMPLATES, tmp_path / "out")
    assert not list(tmp_path.iterdir())


@pytest.fixture(scope="module")
def open_vocabulary(tmp_path_factory, tiny_checkpoint):
    folder = tmp_path_factory.mktemp("export") / "open"
    argv = ["export", str(tiny_checkpoint), "--open-vocabulary", "--output", str(folder), "--quantize", "int8"]
    assert agriclip_main(argv) == 0
    return folder


def test_an_open_vocabulary_export_scores_labels_chosen_on_the_device(open_vocabulary, tiny_checkpoint, tmp_path):
    assert {"image_encoder.onnx", "image_encoder.int8.onnx", "text_encoder.onnx", "tokenizer.json"} <= {
        path.name for path in open_vocabulary.iterdir()
    }
    runner = load_runner(open_vocabulary / "runner.py")
    with pytest.raises(ValueError, match="exports no default labels"):
        runner.Classifier(open_vocabulary)
    classifier = ZeroShotClassifier.from_pretrained(tiny_checkpoint)
    readable = [str(path) for path in photos(tmp_path)]
    images = [runner.open_photo(path) for path in readable]
    for labels, templates in ((LABELS, TEMPLATES), (["cow", "fish"], ["a photo of a {}."])):
        onnx = runner.Classifier(open_vocabulary, labels=labels, templates=templates)
        pixels = np.stack([runner.preprocess(image, onnx.spec) for image in images])
        expected = classifier.logits(images, labels, templates).softmax(-1).numpy()
        np.testing.assert_allclose(onnx.probabilities(pixels), expected, atol=1e-4)
        assert (onnx.probabilities(pixels).argmax(1) == expected.argmax(1)).all()


def test_the_device_tokenizer_gives_the_processor_s_token_ids(open_vocabulary, tiny_processor):
    runner = load_runner(open_vocabulary / "runner.py")
    onnx = runner.Classifier(open_vocabulary, labels=["a"], templates=["{}"])
    texts = ["a photo of a leaf with RUST.", "  Spaced   out  ", "early blight " * 40]  # the last is past 77 tokens
    expected = tiny_processor(text=texts, return_tensors="np", padding=True, truncation=True)
    encodings = onnx.tokenizer.encode_batch(texts)
    assert [encoding.ids for encoding in encodings] == expected["input_ids"].tolist()
    assert [encoding.attention_mask for encoding in encodings] == expected["attention_mask"].tolist()


def test_a_closed_vocabulary_export_refuses_other_labels_and_needs_labels(exported, capsys, tmp_path):
    runner = load_runner(exported / "runner.py")
    with pytest.raises(ValueError, match="closed-vocabulary export of"):
        runner.Classifier(exported, labels=["cow", "fish"])
    code = agriclip_main(["export", "some-model", "--output", str(tmp_path / "out")])
    assert code == 7 and "needs --labels or --labels-file" in capsys.readouterr().err
