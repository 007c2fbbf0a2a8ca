"""Stage 3: fitting the aligner from streamed features, on one and two processes, closed form and SGD recipe."""

import json
import logging
import os
import shutil
import signal
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import training.alignment
from agriclip.sources import load_image_text_dataset
from model_card.card import read_training_info
from modeling_agriclip import AgriCLIPModel, AgriCLIPProcessor
from training.aligner import AlignerStatistics, AlignerWeights, TextMSE, create_objective
from training.alignment import caption_variants, choose_fusion_weight, choose_ridge
from training.stage3_align import FUSION_GRID, main

from conftest import read_metrics, run_script, write_labelled_folder


def run_stage3(model, data, output, *flags):
    return main(
        [
            "--model",
            str(model),
            "--train-data",
            str(data),
            "--output-dir",
            str(output),
            "--log-with",
            "none",
            "--batch-size",
            "5",
            *flags,
        ]
    )


def test_closed_form_equals_least_squares_on_the_extracted_features(tiny_checkpoint, caption_folder, tmp_path):
    cache = tmp_path / "features"
    final = run_stage3(tiny_checkpoint, caption_folder, tmp_path / "run", "--feature-cache", str(cache), "--ridge", "0")
    features = load_file(cache / "train-0-of-1.safetensors")
    x, y = features["x"].double().numpy(), features["y"].double().numpy()
    assert x.shape == (32, 48) and y.shape == (32, 32)
    # Reference: ordinary least squares with an intercept column (32 samples, 49 unknowns per output: minimum norm).
    design = np.hstack([x, np.ones((len(x), 1))])
    solution = np.linalg.lstsq(design, y, rcond=None)[0]
    model = AgriCLIPModel.from_pretrained(final)
    prediction = torch.from_numpy(x).float() @ model.aligner.weight.detach().T + model.aligner.bias.detach()
    np.testing.assert_allclose(prediction.numpy(), design @ solution, atol=1e-3)
    metrics = read_metrics(tmp_path / "run", "stage3_align")[0]
    assert metrics["train/r2"] > 0.99 and 0 < metrics["val/r2"] <= 1
    # The rest of the model is untouched.
    original = AgriCLIPModel.from_pretrained(tiny_checkpoint).state_dict()
    for key, value in model.state_dict().items():
        if not key.startswith("aligner."):
            assert torch.equal(value, original[key]), key


def test_a_plain_folder_without_a_validation_split_holds_out_a_seeded_fraction(
    tiny_checkpoint, caption_folder, tmp_path, capsys
):
    """An image folder of one split with `text` captions (the `datasets` convention): the aligner is fitted on 24 of
    the 32 images, exactly (least squares on those alone), and MSE/R² reported on the other 8, which one line names."""
    plain = tmp_path / "plain"
    shutil.copytree(caption_folder / "train", plain)
    rows = [json.loads(line) for line in (plain / "metadata.jsonl").read_text().splitlines()]
    (plain / "metadata.jsonl").write_text(
        "".join(json.dumps({"file_name": row["file_name"], "text": row["caption"]}) + "\n" for row in rows)
    )
    cache = tmp_path / "features"
    final = run_stage3(
        tiny_checkpoint,
        plain,
        tmp_path / "run",
        "--feature-cache",
        str(cache),
        "--val-fraction",
        "0.25",
        "--ridge",
        "0",
    )
    assert (
        f"validation: {plain} has no split 'validation' (splits: train), so 25% of the training pairs"
        in capsys.readouterr().out
    )
    train, validation = (load_file(cache / f"{name}-0-of-1.safetensors") for name in ("train", "validation"))
    assert len(train["x"]) == 24 and len(validation["x"]) == 8
    assert not (torch.cdist(train["x"], validation["x"]) == 0).any()  # disjoint
    x, y = train["x"].double().numpy(), train["y"].double().numpy()
    design = np.hstack([x, np.ones((len(x), 1))])
    model = AgriCLIPModel.from_pretrained(final)
    prediction = torch.from_numpy(x).float() @ model.aligner.weight.detach().T + model.aligner.bias.detach()
    np.testing.assert_allclose(prediction.numpy(), design @ np.linalg.lstsq(design, y, rcond=None)[0], atol=1e-3)
    assert 0 < read_metrics(tmp_path / "run", "stage3_align")[0]["val/r2"] < 1


def test_a_missing_validation_split_named_explicitly_fails_before_anything_loads(
    tiny_checkpoint, caption_folder, tmp_path, monkeypatch
):
    monkeypatch.setattr(training.alignment, "load_model_and_processor", lambda *args: pytest.fail("the model loaded"))
    with pytest.raises(
        ValueError, match=r"captions\d*: no split 'test' for validation; splits: \['train', 'validation'\]"
    ):
        run_stage3(tiny_checkpoint, caption_folder, tmp_path, "--val-split", "test")


def test_feature_cache_is_reused_for_the_same_model_and_data_only(tiny_checkpoint, caption_folder, tmp_path, caplog):
    cache = tmp_path / "cache"
    run_stage3(tiny_checkpoint, caption_folder, tmp_path / "first", "--feature-cache", str(cache))
    cached = cache / "train-0-of-1.safetensors"
    written = cached.stat().st_mtime_ns
    run_stage3(tiny_checkpoint, caption_folder, tmp_path / "again", "--feature-cache", str(cache))
    assert cached.stat().st_mtime_ns == written  # read, not extracted again

    other = tmp_path / "other-backbone"
    shutil.copytree(tiny_checkpoint, other)
    model = AgriCLIPModel.from_pretrained(tiny_checkpoint)
    with torch.no_grad():
        for parameter in model.dino_model.parameters():
            parameter.add_(0.01 * torch.randn_like(parameter))
    model.save_pretrained(other)
    with caplog.at_level(logging.WARNING):
        from_cache = load_file(
            run_stage3(other, caption_folder, tmp_path / "other", "--feature-cache", str(cache)) / "model.safetensors"
        )
    assert f"feature cache {cached} was extracted from another model, processor or data" in caplog.text
    fresh = load_file(
        run_stage3(other, caption_folder, tmp_path / "fresh", "--feature-cache", str(tmp_path / "new-cache"))
        / "model.safetensors"
    )
    assert torch.equal(from_cache["aligner.weight"], fresh["aligner.weight"])
    assert torch.equal(from_cache["aligner.bias"], fresh["aligner.bias"])


def test_sgd_recipe_and_legacy_bias_scaling(tiny_checkpoint, caption_folder, tmp_path):
    flags = (
        "--method",
        "sgd",
        "--sgd-epochs",
        "5",
        "--sgd-batch-size",
        "8",
        "--feature-cache",
        str(tmp_path / "cache"),
    )
    corrected = AgriCLIPModel.from_pretrained(run_stage3(tiny_checkpoint, caption_folder, tmp_path / "a", *flags))
    legacy = AgriCLIPModel.from_pretrained(
        run_stage3(tiny_checkpoint, caption_folder, tmp_path / "b", *flags, "--legacy-bias-scaling")
    )
    assert torch.equal(corrected.aligner.weight, legacy.aligner.weight)
    assert not torch.allclose(corrected.aligner.bias, legacy.aligner.bias)
    assert (
        read_metrics(tmp_path / "a", "stage3_align")[0]["val/r2"]
        > read_metrics(tmp_path / "b", "stage3_align")[0]["val/r2"]
    )


@pytest.mark.slow
def test_two_processes_equal_one(tiny_checkpoint, caption_folder, tmp_path):
    common = [
        "training.stage3_align",
        "--model",
        str(tiny_checkpoint),
        "--train-data",
        str(caption_folder),
        "--log-with",
        "none",
        "--batch-size",
        "5",
        "--ridge",
        "0.1",
    ]
    two = run_script([*common, "--output-dir", str(tmp_path / "two")], processes=2)
    assert two.returncode == 0, two.stderr[-3000:]
    # 32 images for 49 unknowns per output: the ridge makes the optimum unique, so the two runs can be compared.
    one = run_stage3(tiny_checkpoint, caption_folder, tmp_path / "one", "--ridge", "0.1")
    weights_one = AgriCLIPModel.from_pretrained(one).aligner
    weights_two = AgriCLIPModel.from_pretrained(tmp_path / "two" / "final").aligner
    torch.testing.assert_close(weights_two.weight, weights_one.weight, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(weights_two.bias, weights_one.bias, atol=1e-5, rtol=1e-5)


def test_sigterm_during_feature_extraction_stops_at_once_and_says_what_is_kept(
    tiny_checkpoint, caption_folder, tmp_path, monkeypatch, capsys, sigterm_fallback
):
    extract = training.alignment.extract_features

    def preempted_while_extracting(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        yield from extract(*args, **kwargs)

    monkeypatch.setattr(training.alignment, "extract_features", preempted_while_extracting)
    with pytest.raises(SystemExit) as exit_info:
        run_stage3(tiny_checkpoint, caption_folder, tmp_path / "run")
    assert exit_info.value.code == 143
    assert (
        "SIGTERM received: stopped; stage 3 keeps no checkpoints; run the same command again to start it over"
        in capsys.readouterr().out
    )
    assert not (tmp_path / "run" / "final").exists()
    assert signal.getsignal(signal.SIGTERM) is sigterm_fallback


def numpy_ridge(x, y, ridge):
    """Independent closed form: W = (Xc'Xc/n + ridge I)^-1 Xc'Yc/n, b = mean(y) - W mean(x), in float64."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    xc, yc = x - x.mean(0), y - y.mean(0)
    weight = np.linalg.solve(xc.T @ xc / len(x) + ridge * np.eye(x.shape[1]), xc.T @ yc / len(x)).T
    return weight, y.mean(0) - weight @ x.mean(0)


def numpy_r2(weight, bias, x, y):
    """1 - SSE/SST around the per-dimension mean, pooled over dimensions."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    residual = y - (x @ weight.T + bias)
    return 1 - (residual**2).sum() / ((y - y.mean(0)) ** 2).sum()


def test_text_mse_fits_least_squares_onto_the_mean_text_embedding_of_the_caption_variants(
    tiny_checkpoint, variant_caption_folder, tmp_path
):
    cache = tmp_path / "features"
    final = run_stage3(
        tiny_checkpoint,
        variant_caption_folder,
        tmp_path / "run",
        "--objective",
        "text-mse",
        "--ridge",
        "0.1",
        "--feature-cache",
        str(cache),
    )
    features = load_file(cache / "train-0-of-1.safetensors")
    # The targets, independently: each image's variants through the text tower, normalised, averaged.
    model, processor = (
        AgriCLIPModel.from_pretrained(tiny_checkpoint).eval(),
        AgriCLIPProcessor.from_pretrained(tiny_checkpoint),
    )
    rows = load_image_text_dataset(variant_caption_folder, split="train")
    assert all(len(row["captions"]) == 3 for row in rows)
    with torch.no_grad():
        expected = torch.stack(
            [
                torch.nn.functional.normalize(
                    model.get_text_features(**processor(text=row["captions"], return_tensors="pt")).pooler_output,
                    dim=-1,
                ).mean(0)
                for row in rows
            ]
        )
    torch.testing.assert_close(features["t"], expected, atol=1e-5, rtol=1e-5)
    weight, bias = numpy_ridge(features["x"], expected, 0.1)
    exported = AgriCLIPModel.from_pretrained(final)
    assert exported.config.alignment_objective == "text-mse"
    np.testing.assert_allclose(exported.aligner.weight.detach().numpy(), weight, atol=1e-4)
    np.testing.assert_allclose(exported.aligner.bias.detach().numpy(), bias, atol=1e-4)
    metrics = read_metrics(tmp_path / "run", "stage3_align")[0]
    assert metrics["objective"] == "text-mse" and metrics["ridge"] == 0.1
    assert not any(key.startswith("val/ridge@") for key in metrics)  # --ridge given: no search


def test_captions_are_encoded_only_where_used_and_each_caption_set_once_per_split(
    tiny_checkpoint, variant_caption_folder, tmp_path, monkeypatch
):
    """image-mse reads its training pairs for their images alone, and encodes the validation pairs' caption sets
    (what the fusion weight is chosen against); text-mse also its training pairs'. Either way each distinct caption
    set is tokenised and encoded once per split (the folder has 4 per split, of 3 variants, over 32 + 16 images).
    The image features do not depend on whether the captions were read, and the validation targets equal each
    image's own captions encoded alone."""
    tokenised = []
    call = AgriCLIPProcessor.__call__

    def recording(self, text=None, images=None, **kwargs):
        tokenised.extend(text or [])
        return call(self, text=text, images=images, **kwargs)

    monkeypatch.setattr(AgriCLIPProcessor, "__call__", recording)
    rows = {split: load_image_text_dataset(variant_caption_folder, split=split) for split in ("train", "validation")}
    sets = {split: {tuple(sorted(caption_variants(row))) for row in rows[split]} for split in rows}
    once = {split: Counter(caption for captions in sets[split] for caption in captions) for split in sets}
    run_stage3(
        tiny_checkpoint,
        variant_caption_folder,
        tmp_path / "image",
        "--ridge",
        "0.1",
        "--feature-cache",
        str(tmp_path / "image-features"),
    )
    assert Counter(tokenised) == once["validation"]
    tokenised.clear()
    run_stage3(
        tiny_checkpoint,
        variant_caption_folder,
        tmp_path / "text",
        "--objective",
        "text-mse",
        "--ridge",
        "0.1",
        "--feature-cache",
        str(tmp_path / "text-features"),
    )
    assert Counter(tokenised) == once["train"] + once["validation"]

    image_only, with_captions = (
        load_file(tmp_path / f"{name}-features" / "train-0-of-1.safetensors") for name in ("image", "text")
    )
    assert set(image_only) == {"x", "y"} and {"t", "caption_key"} <= set(with_captions)
    assert torch.equal(image_only["x"], with_captions["x"]) and torch.equal(image_only["y"], with_captions["y"])
    model = AgriCLIPModel.from_pretrained(tiny_checkpoint).eval()
    processor = AgriCLIPProcessor.from_pretrained(tiny_checkpoint)
    with torch.no_grad():
        expected = torch.stack(
            [
                torch.nn.functional.normalize(
                    model.get_text_features(
                        **call(processor, text=caption_variants(row), return_tensors="pt")
                    ).pooler_output,
                    dim=-1,
                ).mean(0)
                for row in rows["validation"]
            ]
        )
    validation = load_file(tmp_path / "image-features" / "validation-0-of-1.safetensors")
    torch.testing.assert_close(validation["t"], expected, atol=1e-5, rtol=1e-5)


def test_the_ridge_and_the_fusion_weight_are_chosen_on_the_validation_features(
    tiny_checkpoint, caption_folder, tmp_path
):
    """Every score logged is recomputed here from the cached validation features alone, and the choices follow."""
    cache = tmp_path / "features"
    # 32 images for 49 unknowns per output: without a ridge the optimum is not unique, so the grid leaves 0 out.
    grid = (1e-3, 1e-2, 1e-1, 1.0)
    final = run_stage3(
        tiny_checkpoint,
        caption_folder,
        tmp_path / "run",
        "--feature-cache",
        str(cache),
        "--ridge-grid",
        *map(str, grid),
    )
    train, val = (load_file(cache / f"{name}-0-of-1.safetensors") for name in ("train", "validation"))
    metrics = read_metrics(tmp_path / "run", "stage3_align")[0]
    variance = train["x"].double().var(dim=0, unbiased=False).mean().item()
    scores = []
    for fraction in grid:
        weight, bias = numpy_ridge(train["x"], train["y"], fraction * variance)
        scores.append(numpy_r2(weight, bias, val["x"], val["y"]))
        assert metrics[f"val/ridge@{fraction:g}/r2"] == pytest.approx(scores[-1], abs=1e-4)
    assert metrics["ridge_fraction"] == grid[int(np.argmax(scores))]
    weight, bias = numpy_ridge(train["x"], train["y"], metrics["ridge"])
    model = AgriCLIPModel.from_pretrained(final)
    np.testing.assert_allclose(model.aligner.weight.detach().numpy(), weight, atol=1e-4)

    captions = load_image_text_dataset(caption_folder, split="validation")["caption"]
    distinct = sorted(set(captions))
    aligned = val["x"].numpy() @ weight.T + bias

    def unit(a):
        return a / np.linalg.norm(a, axis=1, keepdims=True)

    texts = unit(np.stack([val["t"][captions.index(caption)].numpy() for caption in distinct]))
    own = np.array([distinct.index(caption) for caption in captions])
    recalls = []
    for fusion in FUSION_GRID:
        fused = unit(fusion * unit(val["y"].numpy()) + (1 - fusion) * unit(aligned))
        recalls.append(((fused @ texts.T).argmax(1) == own).mean())
        assert metrics[f"val/fused@{fusion:g}/image_to_text_R@1"] == pytest.approx(recalls[-1], abs=1e-6)
    assert metrics["fusion_weight"] == FUSION_GRID[int(np.argmax(recalls))] == model.config.fusion_weight
    assert metrics["objective"] == "image-mse" and model.config.alignment_objective == "image-mse"


def test_choose_fusion_weight_finds_a_fusion_better_than_either_embedding():
    """Two embeddings of the same captions with independent errors: their fusion ranks captions better than either,
    and the choice is the grid's best by an independent count."""
    generator = torch.Generator().manual_seed(0)
    texts = torch.nn.functional.normalize(torch.randn(10, 16, generator=generator), dim=-1)
    own = torch.arange(600) % 10
    clip = texts[own] + 0.35 * torch.randn(600, 16, generator=generator)
    aligned = texts[own] + 0.35 * torch.randn(600, 16, generator=generator)
    identity = AlignerWeights(weight=torch.eye(16), bias=torch.zeros(16))  # the aligned embedding is `x` itself
    val = {"x": aligned, "y": clip, "t": texts[own], "caption_key": own, "label_key": own}
    chosen, metrics = choose_fusion_weight(identity, val, FUSION_GRID)
    hand = [
        (
            (
                torch.nn.functional.normalize(
                    w * torch.nn.functional.normalize(clip, dim=-1)
                    + (1 - w) * torch.nn.functional.normalize(aligned, dim=-1),
                    dim=-1,
                )
                @ texts.T
            ).argmax(1)
            == own
        )
        .float()
        .mean()
        .item()
        for w in FUSION_GRID
    ]
    assert chosen == FUSION_GRID[int(np.argmax(hand))] and 0 < chosen < 1
    assert (
        max(hand)
        > max(hand[0], hand[-1])
        == max(metrics["val/aligned/image_to_text_R@1"], metrics["val/clip/image_to_text_R@1"])
    )
    assert metrics["fusion_weight"] == chosen


def test_choose_ridge_regularises_an_overfitted_fit_by_validation_r2_and_by_recall_for_text():
    generator = torch.Generator().manual_seed(0)
    mapping = torch.randn(24, 6, generator=generator)
    x_train, x_val = torch.randn(30, 24, generator=generator), torch.randn(200, 24, generator=generator)
    y_train = x_train @ mapping + 6.0 * torch.randn(30, 6, generator=generator)
    y_val = x_val @ mapping + 6.0 * torch.randn(200, 6, generator=generator)
    stats = AlignerStatistics(24, 6).update(x_train, y_train)
    grid = (0.0, 0.1, 1.0, 10.0)
    ridge, metrics = choose_ridge(create_objective("image-mse"), stats, {"x": x_val, "y": y_val}, grid)
    variance = x_train.double().var(dim=0, unbiased=False).mean().item()
    hand = [numpy_r2(*numpy_ridge(x_train, y_train, fraction * variance), x_val, y_val) for fraction in grid]
    assert metrics["ridge_fraction"] == grid[int(np.argmax(hand))] > 0
    assert ridge == pytest.approx(metrics["ridge_fraction"] * variance)
    # Text: one caption per class (one-hot targets), the class of an image the best coordinate of x A.
    labels_train, labels_val = (x_train @ mapping).argmax(1), (x_val @ mapping).argmax(1)
    text_stats = AlignerStatistics(24, 6).update(x_train, torch.eye(6)[labels_train])
    val = {"x": x_val, "t": torch.eye(6)[labels_val], "caption_key": labels_val, "label_key": labels_val}
    _, text_metrics = choose_ridge(TextMSE(), text_stats, val, grid)
    hand = []
    for fraction in grid:
        weight, bias = numpy_ridge(x_train, torch.eye(6)[labels_train], fraction * variance)
        hand.append(((x_val.numpy() @ weight.T + bias).argmax(1) == labels_val.numpy()).mean())
        assert text_metrics[f"val/ridge@{fraction:g}/image_to_text_R@1"] == pytest.approx(hand[-1], abs=1e-6)
    assert text_metrics["ridge_fraction"] == grid[int(np.argmax(hand))]


_AUDIT = {"record": None}


def _audit(event, args):
    """Reports the path of every open, scandir and listdir while a test records. Installed once, when this module
    loads: an audit hook cannot be removed."""
    record = _AUDIT["record"]
    if (
        record is not None
        and event in ("open", "os.scandir", "os.listdir")
        and args
        and isinstance(args[0], (str, os.PathLike))
    ):
        record(os.fsdecode(args[0]))


sys.addaudithook(_audit)


def test_stage3_opens_no_data_but_its_training_and_validation_pairs(tiny_checkpoint, caption_folder, tmp_path):
    """The embedded layout: pretraining pairs beside downstream tasks and their suite. Every file stage 3 opens or lists
    under that folder lies in the pretraining pairs (a Python audit hook sees every open, scandir and listdir)."""
    root = tmp_path / "data"
    shutil.copytree(caption_folder, root / "pretrain")
    write_labelled_folder(root / "downstream" / "leaf-colour")
    (root / "suite.yaml").write_text("datasets:\n  - name: leaf-colour\n    path: downstream/leaf-colour\n")
    seen = []
    _AUDIT["record"] = seen.append
    try:
        run_stage3(tiny_checkpoint, root / "pretrain", tmp_path / "run", "--objective", "text-mse")
    finally:
        _AUDIT["record"] = None
    under_root = {Path(path).resolve() for path in seen if Path(path).resolve().is_relative_to(root.resolve())}
    assert under_root and all(path.is_relative_to((root / "pretrain").resolve()) for path in under_root), under_root
    # The hook sees the images it must: every validation image was read.
    assert {path.name for path in under_root if path.parent.name == "validation"} >= {f"{i}.png" for i in range(16)}


def test_contrastive_objective_lowers_its_loss_and_is_recorded_in_config_logs_and_card(
    tiny_checkpoint, variant_caption_folder, tmp_path
):
    final = run_stage3(
        tiny_checkpoint,
        variant_caption_folder,
        tmp_path / "run",
        "--objective",
        "contrastive",
        "--contrastive-epochs",
        "5",
        "--contrastive-batch-size",
        "8",
        "--contrastive-lr",
        "0.01",
    )
    metrics = read_metrics(tmp_path / "run", "stage3_align")[0]
    assert metrics["train/infonce_final"] < metrics["train/infonce_start"]
    assert AgriCLIPModel.from_pretrained(final).config.alignment_objective == "contrastive"
    info = read_training_info(tmp_path / "run")
    assert info["stages"]["stage3_align"]["objective"] == "contrastive"
    assert info["final_metrics"]["stage3_align"]["objective"] == "contrastive"
    assert info["final_metrics"]["stage3_align"]["fusion_weight"] == metrics["fusion_weight"]


@pytest.mark.parametrize(
    "flags, message",
    [
        (
            ["--objective", "text-mse", "--method", "sgd"],
            "--method sgd is the paper's recipe for --objective image-mse",
        ),
        (["--method", "sgd", "--ridge", "0.1"], "--ridge applies to the closed forms"),
        (["--fusion-grid", "0.5", "1.5"], "a number in [0, 1] is needed, not 1.5"),
        (["--ridge-grid", "-1"], "a number >= 0 is needed, not -1"),
    ],
)
def test_options_that_cannot_apply_are_refused_before_anything_loads(
    tiny_checkpoint, caption_folder, tmp_path, capsys, monkeypatch, flags, message
):
    monkeypatch.setattr(training.alignment, "load_model_and_processor", lambda *args: pytest.fail("the model loaded"))
    with pytest.raises(SystemExit) as stop:
        run_stage3(tiny_checkpoint, caption_folder, tmp_path, *flags)
    assert stop.value.code == 2 and message in capsys.readouterr().err


def test_validation_by_label_needs_labels(tiny_checkpoint, caption_folder, tmp_path):
    with pytest.raises(ValueError, match="--validation-match label needs a `label` column in the validation pairs"):
        run_stage3(tiny_checkpoint, caption_folder, tmp_path / "run", "--validation-match", "label")


@pytest.mark.slow
def test_text_mse_on_two_processes_equals_one(tiny_checkpoint, variant_caption_folder, tmp_path):
    flags = ["--objective", "text-mse", "--ridge", "0.1"]
    two = run_script(
        [
            "training.stage3_align",
            "--model",
            str(tiny_checkpoint),
            "--train-data",
            str(variant_caption_folder),
            "--log-with",
            "none",
            "--batch-size",
            "5",
            *flags,
            "--output-dir",
            str(tmp_path / "two"),
        ],
        processes=2,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    one = AgriCLIPModel.from_pretrained(run_stage3(tiny_checkpoint, variant_caption_folder, tmp_path / "one", *flags))
    two_model = AgriCLIPModel.from_pretrained(tmp_path / "two" / "final")
    torch.testing.assert_close(two_model.aligner.weight, one.aligner.weight, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(two_model.aligner.bias, one.aligner.bias, atol=1e-5, rtol=1e-5)
    assert two_model.config.fusion_weight == one.config.fusion_weight
    metrics_one, metrics_two = (read_metrics(tmp_path / name, "stage3_align")[0] for name in ("one", "two"))
    for key, value in metrics_one.items():
        if key.startswith("val/fused@"):
            assert metrics_two[key] == pytest.approx(value, abs=1e-9), key
