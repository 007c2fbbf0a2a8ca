"""What `agriclip predict` adds to a zero-shot score so a farmer can act on it: a task file's calibration,
abstention ("unknown"), two-level YAML labels and the provenance header, each against an independent computation;
and a calibrated model in transformers' zero-shot pipeline."""

import importlib.metadata
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from PIL import Image
from transformers import pipeline

from agriclip.cli import main
from agriclip.errors import ExitCode
from agriclip.images import open_image
from agriclip.labels import load_hierarchy
from modeling_agriclip import AgriCLIPModel
from modeling_agriclip.calibration import UNKNOWN_LABEL, TaskFile
from modeling_agriclip.hierarchy import predict_hierarchical
from modeling_agriclip.zero_shot import ZeroShotClassifier


LABELS = ["leaf rust", "healthy leaf", "powdery mildew"]
TEMPLATES = ["a photo of {}.", "a field photo showing {}."]
TEMPERATURE = 0.05  # sharpens the tiny model's near-uniform scores, so that some photos clear a threshold and some not


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(1)
    paths = []
    for index in range(6):
        path = root / f"photo{index}.png"
        Image.fromarray(rng.integers(0, 256, (48 + 8 * index, 64, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def reference(tiny_checkpoint):
    return ZeroShotClassifier.from_pretrained(tiny_checkpoint)


@pytest.fixture(scope="module")
def task_file(tmp_path_factory, reference):
    path = tmp_path_factory.mktemp("task") / "leaf.json"
    TaskFile(
        labels=LABELS,
        templates=TEMPLATES,
        objective="infonce",
        temperature=TEMPERATURE,
        embedding=reference.embedding,
    ).save(path)
    return path


def predict_json(capsys, model, photos, *options):
    argv = ["predict", *photos, "--model", model, "--top-k", "3", "--num-workers", "0", "--format", "json", *options]
    code = main([str(arg) for arg in argv])
    captured = capsys.readouterr()
    assert code == ExitCode.OK, captured.err
    return json.loads(captured.out)


def calibrated_probabilities(reference, photos):
    logits = reference.logits([open_image(path) for path in photos], LABELS, TEMPLATES)
    return F.softmax(logits / TEMPERATURE, dim=-1)


def test_a_task_file_gives_the_softmax_of_the_logits_over_its_temperature_and_its_templates(
    capsys, tiny_checkpoint, photos, reference, task_file
):
    """No --template: the file's templates are used; the scores are softmax(logits / T) of the classifier."""
    document = predict_json(capsys, tiny_checkpoint, photos, "--labels", ",".join(LABELS), "--calibration", task_file)
    expected = calibrated_probabilities(reference, photos)
    for result, probabilities in zip(document["results"], expected):
        assert [p["label"] for p in result["predictions"]] == [
            LABELS[i] for i in probabilities.argsort(descending=True)
        ]
        scores = [p["score"] for p in result["predictions"]]
        assert scores == pytest.approx(sorted(probabilities.tolist(), reverse=True), abs=1e-5)
    assert document["templates"] == TEMPLATES
    assert document["calibration"] == {"file": str(task_file), "temperature": TEMPERATURE, "bias": 0.0}


def test_abstain_below_answers_unknown_exactly_where_the_calibrated_top_probability_is_below_it(
    capsys, tiny_checkpoint, photos, reference, task_file
):
    top = calibrated_probabilities(reference, photos).max(dim=1)
    threshold = float(top.values.median())
    assert (top.values < threshold).any() and (top.values >= threshold).any()  # both answers occur
    document = predict_json(
        capsys,
        tiny_checkpoint,
        photos,
        "--labels",
        ",".join(LABELS),
        "--calibration",
        task_file,
        "--abstain-below",
        threshold,
    )
    expected = [LABELS[index] if value >= threshold else UNKNOWN_LABEL for value, index in zip(*top)]
    assert [result["answer"] for result in document["results"]] == expected
    assert document["abstain_below"] == threshold


def test_abstain_below_adds_an_answer_column_to_the_table_and_the_csv(capsys, tiny_checkpoint, photos):
    """Without calibration the threshold reads the plain top probability; 1.0 is never reached by three labels."""
    for output_format in ("table", "csv"):
        argv = [*photos[:2], "--labels", ",".join(LABELS), "--model", tiny_checkpoint, "--num-workers", "0"]
        code = main(["predict", *map(str, argv), "--abstain-below", "1", "--format", output_format])
        out = capsys.readouterr().out
        assert code == ExitCode.OK
        header, *rows = out.splitlines()
        assert header.replace(",", " ").split()[-1] == "answer"
        assert sum(UNKNOWN_LABEL in row for row in rows) == 2  # one answer per photo, on its rank-1 row


def test_a_task_file_for_other_labels_or_a_yaml_label_file_is_refused_naming_the_file(
    capsys, tiny_checkpoint, photos, task_file, tmp_path
):
    argv = ["predict", photos[0], "--model", tiny_checkpoint, "--calibration", task_file]
    assert main([str(arg) for arg in argv + ["--labels", "leaf rust,healthy leaf"]]) == ExitCode.LABELS
    assert f"{task_file} was fitted for the labels" in capsys.readouterr().err
    labels = tmp_path / "crops.yaml"
    labels.write_text(yaml.safe_dump({"groups": {"wheat": LABELS}}))
    assert main([str(arg) for arg in argv + ["--labels-file", labels]]) == ExitCode.USAGE
    assert "cannot be used with a YAML label file" in capsys.readouterr().err


def test_a_yaml_label_file_predicts_the_group_then_labels_within_it(
    capsys, tiny_checkpoint, photos, reference, tmp_path
):
    path = tmp_path / "crops.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "levels": ["crop", "condition"],
                "templates": {"crop": ["a photo of a {} plant."]},
                "groups": {"wheat": ["wheat leaf rust", "healthy wheat"], "grape": ["grape blight", "grape esca"]},
            }
        )
    )
    document = predict_json(capsys, tiny_checkpoint, photos, "--labels-file", path)
    hierarchy = load_hierarchy(path)
    images = [open_image(photo) for photo in photos]
    # An independent computation: the group's softmax over the group prompts, then the label softmax within it.
    group_logits = reference.logits(images, hierarchy.group_names, ["a photo of a {} plant."])
    label_logits = reference.logits(images, hierarchy.labels, ["a photo of {}."])
    for image, result in enumerate(document["results"]):
        group = int(group_logits[image].argmax())
        members = [i for i, g in enumerate(hierarchy.group_of()) if g == group]
        within = F.softmax(label_logits[image, members], dim=0) * F.softmax(group_logits[image], dim=0)[group]
        order = within.argsort(descending=True)
        assert [p["label"] for p in result["predictions"]] == [hierarchy.labels[members[i]] for i in order]
        assert [p["score"] for p in result["predictions"]] == pytest.approx(within[order].tolist(), abs=1e-5)
        assert {p["group"] for p in result["predictions"]} == {hierarchy.group_names[group]}
    assert document["results"][0]["predictions"] == pytest.approx(
        predict_hierarchical(reference, images[:1], hierarchy, ["a photo of {}."], top_k=3)[0]
    )
    assert document["hierarchy"] == {
        "file": str(path),
        "levels": ["crop", "condition"],
        "groups": hierarchy.groups,
        "templates": {"crop": ["a photo of a {} plant."], "condition": ["a photo of {}."]},
    }


def test_every_prediction_records_its_provenance(capsys, tiny_checkpoint, photos, reference):
    document = predict_json(capsys, tiny_checkpoint, photos[:1], "--labels", ",".join(LABELS), "--template", "a {}.")
    assert document.pop("results")[0]["image"] == str(photos[0])
    assert document == {
        "model": str(tiny_checkpoint),
        "revision": None,  # a local folder has no Hub commit
        "embedding": reference.model.config.image_embedding,  # the checkpoint's, named
        "fusion_weight": None,
        "labels": LABELS,
        "templates": ["a {}."],
        "hierarchy": None,
        "calibration": None,
        "abstain_below": None,
        "abstain_below_similarity": None,
        "agriclip_version": importlib.metadata.version("agriclip"),
        "skipped": [],
    }


def test_a_calibrated_model_gives_the_pipeline_the_calibrated_scores(tiny_checkpoint, sample_images, tmp_path):
    """Folding T into the logit scale: the pipeline's scores become softmax(log p / T) of its uncalibrated p."""
    task = TaskFile(labels=LABELS, templates=["a photo of {}."], objective="infonce", temperature=0.3, embedding="clip")
    plain = pipeline("zero-shot-image-classification", model=str(tiny_checkpoint))
    model = AgriCLIPModel.from_pretrained(tiny_checkpoint)
    task.calibrate_model(model)
    calibrated = pipeline(
        "zero-shot-image-classification", model=model, tokenizer=plain.tokenizer, image_processor=plain.image_processor
    )
    plain.model.config.image_embedding = "clip"  # the file's embedding, uncalibrated
    for image in sample_images[:3]:
        before = {
            p["label"]: p["score"] for p in plain(image, candidate_labels=LABELS, hypothesis_template=task.templates[0])
        }
        after = {
            p["label"]: p["score"]
            for p in calibrated(image, candidate_labels=LABELS, hypothesis_template=task.templates[0])
        }
        expected = F.softmax(torch.tensor([before[label] for label in LABELS]).double().log() / 0.3, dim=0)
        assert [after[label] for label in LABELS] == pytest.approx(expected.tolist(), abs=1e-5)
    assert model.config.image_embedding == "clip"


def test_calibrate_model_refuses_what_the_pipeline_cannot_score_as_fitted(tiny_model):
    with pytest.raises(ValueError, match="fitted with 2"):
        TaskFile(labels=LABELS, templates=TEMPLATES, objective="infonce", temperature=2.0).calibrate_model(tiny_model)
    with pytest.raises(ValueError, match="SigLIP"):
        TaskFile(labels=LABELS, templates=TEMPLATES[:1], objective="siglip", temperature=2.0).calibrate_model(
            tiny_model
        )


def test_abstain_below_similarity_answers_unknown_where_the_best_label_s_cosine_is_below_it(
    capsys, tiny_checkpoint, photos, reference
):
    images = [open_image(path) for path in photos]
    # An independent cosine: the image embeddings against the prompt-ensemble label embeddings.
    cosines = reference.image_embeddings(images) @ reference.label_embeddings(LABELS, TEMPLATES).T
    best = cosines.max(dim=1)
    threshold = float(best.values.median())
    argv = ["--labels", ",".join(LABELS), *[f"--template={template}" for template in TEMPLATES]]
    document = predict_json(capsys, tiny_checkpoint, photos, *argv, "--abstain-below-similarity", threshold)
    expected = [LABELS[index] if value >= threshold else UNKNOWN_LABEL for value, index in zip(*best)]
    assert [result["answer"] for result in document["results"]] == expected
    assert UNKNOWN_LABEL in expected and set(expected) != {UNKNOWN_LABEL}
    assert [result["similarity"] for result in document["results"]] == pytest.approx(best.values.tolist(), abs=1e-5)
    assert document["abstain_below_similarity"] == threshold and document["abstain_below"] is None


def test_abstain_below_similarity_is_refused_with_a_yaml_label_file_or_out_of_range(
    capsys, tiny_checkpoint, photos, tmp_path
):
    labels = tmp_path / "crops.yaml"
    labels.write_text(yaml.safe_dump({"groups": {"wheat": LABELS}}))
    argv = ["predict", photos[0], "--model", tiny_checkpoint, "--abstain-below-similarity", "0.2"]
    assert main([str(arg) for arg in argv + ["--labels-file", labels]]) == ExitCode.USAGE
    assert "scores flat labels, not a YAML label file" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["predict", str(photos[0]), "--labels", "a,b", "--abstain-below-similarity", "1.5"])
    assert "must be a cosine similarity from -1 to 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(
            ["predict", str(photos[0]), "--labels", "a,b", "--abstain-below", "0.5", "--abstain-below-similarity", "0"]
        )
    assert "not allowed with argument" in capsys.readouterr().err


def test_a_task_file_gives_predict_its_labels_and_its_similarity_threshold(
    capsys, tiny_checkpoint, photos, reference, tmp_path
):
    images = [open_image(path) for path in photos]
    best = (reference.image_embeddings(images) @ reference.label_embeddings(LABELS, TEMPLATES).T).max(dim=1)
    threshold = float(best.values.median())
    path = tmp_path / "task.json"
    TaskFile(LABELS, TEMPLATES, "infonce", 1.0, similarity_threshold=threshold).save(path)
    document = predict_json(capsys, tiny_checkpoint, photos, "--calibration", path, "--abstain-below-similarity")
    assert document["labels"] == LABELS and document["abstain_below_similarity"] == threshold
    expected = [LABELS[index] if value >= threshold else UNKNOWN_LABEL for value, index in zip(*best)]
    assert [result["answer"] for result in document["results"]] == expected


def test_a_valueless_abstain_below_similarity_needs_a_task_file_with_a_threshold(
    capsys, tiny_checkpoint, photos, task_file
):
    base = ["predict", photos[0], "--model", tiny_checkpoint, "--abstain-below-similarity"]
    assert main([str(arg) for arg in base + ["--labels", "a,b"]]) == ExitCode.USAGE
    assert "needs a value S, or a --calibration task file" in capsys.readouterr().err
    assert main([str(arg) for arg in base + ["--calibration", task_file]]) == ExitCode.USAGE
    assert f"{task_file} records no similarity threshold" in capsys.readouterr().err
    assert main(["predict", str(photos[0]), "--model", str(tiny_checkpoint)]) == ExitCode.USAGE
    assert "give --labels or --labels-file (or --calibration" in capsys.readouterr().err
