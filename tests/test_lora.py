"""LoRA adaptation (PEFT): targeting, objectives, save/load/merge, both pipeline paths, exact resume, k-shot gains."""

import json
import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import PeftModel, get_peft_model_state_dict
from safetensors.torch import load_file
from transformers import pipeline

import training.lora
from agriclip.cli import main as agriclip_main
from agriclip.errors import ExitCode
from agriclip.images import open_image
from modeling_agriclip import AgriCLIPConfig, AgriCLIPModel, AgriCLIPProcessor
from modeling_agriclip.zero_shot import ZeroShotClassifier
from training.lora import (
    RUN,
    PromptClassifier,
    base_model_reference,
    build_lora_model,
    load_labelled_task,
    resolve_lora_targets,
    task_spec,
    tower_of,
    trainable_parameters,
)
from training.lora_finetune import LoraOptions, main
from training.options import options_from

from conftest import (
    COLOURS,
    assert_same_tensors,
    kill_before_last_checkpoint,
    read_metrics,
    run_as_main,
    run_script,
    write_labelled_folder,
)


TEMPLATE = "a photo of a {} leaf."
TOWER_PREFIX = {"text": "text_model.", "image": "vision_model.", "backbone": "dino_model."}


@pytest.fixture(scope="module")
def labelled_folder(tmp_path_factory):
    return write_labelled_folder(tmp_path_factory.mktemp("colours"))


@pytest.fixture(scope="module")
def resnet_checkpoint(tmp_path_factory, clip_tokenizer):
    torch.manual_seed(0)
    config = AgriCLIPConfig.tiny(backbone="resnet")
    path = tmp_path_factory.mktemp("agriclip-tiny-resnet")
    AgriCLIPModel(config).save_pretrained(path)
    AgriCLIPProcessor.from_config(config, tokenizer=clip_tokenizer).save_pretrained(path)
    return path


def run_lora(base, output, *flags):
    return main(["--model", str(base), "--output-dir", str(output), "--log-with", "none", "--batch-size", "8", *flags])


def classification_flags(folder, *flags):
    return ("--train-data", str(folder), "--templates", TEMPLATE, "--learning-rate", "1e-2", *flags)


@pytest.fixture(scope="module")
def adapted(tiny_checkpoint, labelled_folder, tmp_path_factory):
    """A 3-shot LoRA run on the backbone of a local base folder, with the aligner trained, merged at the end."""
    output = tmp_path_factory.mktemp("lora")
    return run_lora(
        tiny_checkpoint,
        output,
        *classification_flags(
            labelled_folder, "--shots", "3", "--max-steps", "8", "--eval-every", "4", "--train-aligner", "--merge"
        ),
    )


def results_of(output):
    return json.loads((output / "results.json").read_text())


def sample_inputs(processor, images):
    return processor(text=[TEMPLATE.format(name) for name in COLOURS], images=images, return_tensors="pt")


# ---------------------------------------------------------------------------------------------------------------
# Targets
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backbone", ["vit", "resnet"])
def test_default_targets_stay_in_their_tower(backbone):
    model = AgriCLIPModel(AgriCLIPConfig.tiny(backbone=backbone))
    modules = dict(model.named_modules())
    for tower in ("text", "image", "backbone"):
        _, matched = resolve_lora_targets(model, [tower])
        assert len(matched) == 8 and all(name.startswith(TOWER_PREFIX[tower]) for name in matched), matched
        if tower == "backbone" and backbone == "resnet":
            # No attention in a ResNet: the residual blocks' convolutions, not the stem or the shortcuts.
            assert all(isinstance(modules[name], torch.nn.Conv2d) and ".layer." in name for name in matched)
        else:
            assert {name.rsplit(".", 1)[1] for name in matched} == {
                "q_proj",
                "k_proj",
                "v_proj",
                "out_proj" if tower != "backbone" else "o_proj",
            }
    peft_model = build_lora_model(model, ["backbone"])
    lora = [name for name, _ in peft_model.named_parameters() if "lora_" in name]
    assert lora and all(name.startswith("base_model.model.dino_model.") for name in lora)
    assert all(p.requires_grad == ("lora_" in n) for n, p in peft_model.named_parameters())


def test_target_regex_errors_name_the_problem(tiny_model):
    with pytest.raises(ValueError, match=r"'q_proj' matches no module"):
        resolve_lora_targets(tiny_model, ["text"], "q_proj")
    # The bare suffix regex would also hit the CLIP image tower and the DINO backbone.
    outside = r"outside the chosen tower\(s\) \['text'\]: vision_model\.encoder\.layers\.0\.self_attn\.q_proj.*dino_model\.layers\.0\."
    with pytest.raises(ValueError, match=outside):
        resolve_lora_targets(tiny_model, ["text"], r".*\.q_proj")
    _, matched = resolve_lora_targets(tiny_model, ["text", "image", "backbone"], r".*\.q_proj")
    assert {tower_of(name) for name in matched} == {"text", "image", "backbone"}
    with pytest.raises(ValueError, match=r"matches no module of the chosen tower\(s\) \['image'\]"):
        resolve_lora_targets(tiny_model, ["text", "image"], r"text_model\..*\.q_proj")
    with pytest.raises(ValueError, match=r"outside the chosen tower.*aligner"):
        resolve_lora_targets(tiny_model, ["backbone"], r"aligner|dino_model\..*\.q_proj")
    with pytest.raises(ValueError, match="not a valid regular expression"):
        resolve_lora_targets(tiny_model, ["text"], r"text_model\.(")


def test_a_target_regex_that_matches_nothing_is_one_line_and_exit_9_from_the_command_line(
    tiny_checkpoint, labelled_folder, tmp_path
):
    """`python -m training.lora_finetune`: bad input is one `prog: error:` line on stderr and exit status 9."""
    code, err = run_as_main(
        "training.lora_finetune",
        [
            "--model",
            tiny_checkpoint,
            "--output-dir",
            tmp_path / "run",
            "--log-with",
            "none",
            "--target-modules",
            "q_proj",
            *classification_flags(labelled_folder),
        ],
    )
    assert code == ExitCode.INPUT == 9
    assert "Traceback" not in err
    assert err.splitlines()[-1].startswith(
        "python -m training.lora_finetune: error: LoRA target regex 'q_proj' "
        "matches no module of the model; it must match whole module names"
    )


def test_a_model_folder_without_config_is_named_and_what_to_do_said(labelled_folder, tmp_path):
    (tmp_path / "not-a-model").mkdir()
    code, err = run_as_main(
        "training.lora_finetune",
        [
            "--model",
            tmp_path / "not-a-model",
            "--output-dir",
            tmp_path / "run",
            "--log-with",
            "none",
            *classification_flags(labelled_folder),
        ],
    )
    assert code == ExitCode.INPUT
    assert err.splitlines()[-1] == (
        f"python -m training.lora_finetune: error: {tmp_path / 'not-a-model'} has no "
        "config.json: not a saved model folder (save it with save_pretrained, or build "
        "one with `agriclip convert`)"
    )


def test_trainable_share_is_small_on_the_paper_layout():
    """Counted on the meta device: the paper's 174M-parameter layout costs nothing to build there."""
    for towers, flags in (
        (["text"], {}),
        (["image"], {}),
        (["backbone"], {"train_aligner": True}),
        (["text", "image", "backbone"], {}),
    ):
        with torch.device("meta"):
            model = AgriCLIPModel(AgriCLIPConfig.paper())
        trainable, total = trainable_parameters(build_lora_model(model, towers, **flags))
        assert 0 < trainable / total < 0.05, (towers, trainable, total)


# ---------------------------------------------------------------------------------------------------------------
# Data and objective
# ---------------------------------------------------------------------------------------------------------------


def paths(dataset):
    return [row["path"] for row in dataset["image"]]


def labelled_task(folder, shots=3, seed=0):
    """The task a classification run on `folder` trains on and holds out, as the script resolves it."""
    args = options_from(
        LoraOptions,
        {"model": "tiny", "train_data": str(folder), "output_dir": "unused", "templates": [TEMPLATE]},
        "test",
    )
    return load_labelled_task(task_spec(args), train=True, shots=shots, seed=seed)


def test_k_shot_sample_and_held_out_half_are_seeded_and_disjoint(labelled_folder):
    task, again, other = (
        labelled_task(labelled_folder),
        labelled_task(labelled_folder),
        labelled_task(labelled_folder, seed=1),
    )
    assert paths(task.train) == paths(again.train) and paths(task.held_out) == paths(again.held_out)
    assert paths(task.train) != paths(other.train)
    assert not set(paths(task.train)) & set(paths(task.held_out))
    assert (
        np.bincount(task.train["label"]).tolist() == [3] * 4 and np.bincount(task.held_out["label"]).tolist() == [4] * 4
    )
    assert task.class_names == sorted(COLOURS) and task.templates == [TEMPLATE]


def test_prompt_classifier_matches_the_zero_shot_classifier(tiny_config, tiny_processor, sample_images):
    torch.manual_seed(0)
    peft_model = build_lora_model(AgriCLIPModel(tiny_config), ["text", "backbone"])
    names, templates = ["red", "green", "blue"], ["a photo of {}.", "a close-up photo of a {} leaf."]
    pixel_values = tiny_processor(images=sample_images, return_tensors="pt")["pixel_values"]
    expected = ZeroShotClassifier(peft_model, tiny_processor, embedding="aligned").logits(
        pixel_values, names, templates
    )
    once = PromptClassifier(peft_model, tiny_processor, names, templates, "aligned", text_adapted=False)
    every_step = PromptClassifier(peft_model, tiny_processor, names, templates, "aligned", text_adapted=True)
    with torch.no_grad():
        torch.testing.assert_close(once(pixel_values), expected, atol=1e-5, rtol=1e-5)
    logits = every_step(pixel_values)
    torch.testing.assert_close(logits.detach(), expected, atol=1e-5, rtol=1e-5)
    # Only the prompts recomputed at every forward carry gradients to the text adapters.
    logits.logsumexp(dim=1).sum().backward()
    text_lora = [p for n, p in peft_model.named_parameters() if "text_model" in n and "lora_B" in n]
    assert text_lora and all(p.grad is not None and p.grad.abs().sum() > 0 for p in text_lora)


# ---------------------------------------------------------------------------------------------------------------
# A classification run: held-out gain, adapter, merge, pipelines
# ---------------------------------------------------------------------------------------------------------------


def test_k_shot_adaptation_beats_zero_shot_on_held_out_images(
    adapted, tiny_checkpoint, tiny_processor, labelled_folder
):
    results = results_of(adapted)
    assert results["n_train"] == 12 and results["adapted"]["n_images"] == 16
    assert results["adapted"]["top1"] >= results["zero_shot"]["top1"] + 0.25, results
    assert results["embedding"] == "aligned" and results["trainable_share"] < 0.05
    logged = [(row["step"], row["eval/top1"]) for row in read_metrics(adapted, RUN) if "eval/top1" in row]
    assert [step for step, _ in logged] == [4, 8, 8] and logged[-1][1] == results["adapted"]["top1"]
    # The zero-shot figure is the base model's own: adapters and the trained aligner were off.
    task = labelled_task(labelled_folder)
    classifier = ZeroShotClassifier(AgriCLIPModel.from_pretrained(tiny_checkpoint), tiny_processor)
    scores = classifier.logits(
        [open_image(image) for image in task.held_out["image"]], task.prompt_names, task.templates
    )
    assert (scores.argmax(dim=1) == torch.tensor(task.held_out["label"])).float().mean().item() == results["zero_shot"][
        "top1"
    ]


def test_adapter_folder_records_the_base_and_targets(adapted, tiny_checkpoint):
    adapter = adapted / "adapter"
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in adapter.iterdir()}
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tiny_checkpoint.resolve())
    assert config["modules_to_save"] == ["aligner"] and config["target_modules"].startswith("(?:dino_model")
    weights = load_file(adapter / "adapter_model.safetensors")
    assert any("lora_A" in key for key in weights) and any("aligner" in key for key in weights)
    assert not any(key.startswith(("base_model.model.text_model", "base_model.model.vision_model")) for key in weights)


def test_adapter_save_load_round_trip_is_exact(adapted, tiny_checkpoint, tiny_processor, sample_images, tmp_path):
    inputs = sample_inputs(tiny_processor, sample_images)
    loaded = PeftModel.from_pretrained(AgriCLIPModel.from_pretrained(tiny_checkpoint), adapted / "adapter").eval()
    saved = load_file(adapted / "adapter" / "adapter_model.safetensors")
    state = get_peft_model_state_dict(loaded)
    assert state.keys() == saved.keys() and all(torch.equal(state[key], saved[key]) for key in saved)
    loaded.save_pretrained(tmp_path / "again")
    again = PeftModel.from_pretrained(AgriCLIPModel.from_pretrained(tiny_checkpoint), tmp_path / "again").eval()
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).logits_per_image, again(**inputs).logits_per_image)


def test_merged_model_equals_base_plus_adapter(adapted, tiny_checkpoint, tiny_processor, sample_images):
    inputs = sample_inputs(tiny_processor, sample_images)
    unmerged = PeftModel.from_pretrained(AgriCLIPModel.from_pretrained(tiny_checkpoint), adapted / "adapter").eval()
    merged = AgriCLIPModel.from_pretrained(adapted / "merged").eval()
    assert not any("lora" in key for key in merged.state_dict())
    base = AgriCLIPModel.from_pretrained(tiny_checkpoint).eval()
    with torch.no_grad():
        for embedding in ("aligned", "clip", "fused"):
            torch.testing.assert_close(
                merged(**inputs, image_embedding=embedding).logits_per_image,
                unmerged(**inputs, image_embedding=embedding).logits_per_image,
                atol=1e-5,
                rtol=0,
            )
        # The adapter did change the aligned embedding.
        assert not torch.allclose(merged(**inputs).image_embeds, base(**inputs).image_embeds, atol=1e-3)


def test_adapter_and_merged_folders_work_in_the_pipeline(adapted, tiny_checkpoint, tiny_processor, sample_images):
    labels = list(COLOURS)
    merged = AgriCLIPModel.from_pretrained(adapted / "merged").eval()
    with torch.no_grad():
        inputs = tiny_processor(
            text=[f"This is a photo of {label}." for label in labels], images=sample_images[:1], return_tensors="pt"
        )
        expected = dict(zip(labels, merged(**inputs).logits_per_image[0].softmax(-1).tolist()))
    for folder in ("adapter", "merged"):
        classify = pipeline("zero-shot-image-classification", model=str(adapted / folder))
        scores = {row["label"]: row["score"] for row in classify(sample_images[0], candidate_labels=labels)}
        assert scores == pytest.approx(expected, abs=1e-5), folder


def test_the_adapter_folder_is_a_model_folder_for_the_agriclip_command(adapted, sample_images, tmp_path, capsys):
    """The adapter folder carries the processor, so `agriclip predict --model <adapter>` runs, and predicts what
    the merged model predicts."""
    assert {"processor_config.json", "tokenizer.json"} <= {path.name for path in (adapted / "adapter").iterdir()}
    photo = tmp_path / "leaf.png"
    sample_images[0].save(photo)
    printed = {}
    for folder in ("adapter", "merged"):
        argv = ["predict", str(photo), "--labels", ",".join(COLOURS), "--model", str(adapted / folder), "--format"]
        assert agriclip_main([*argv, "json", "--num-workers", "0"]) == 0, folder
        printed[folder] = json.loads(capsys.readouterr().out)
    adapter, merged = (printed[folder]["results"][0]["predictions"] for folder in ("adapter", "merged"))
    assert [row["label"] for row in adapter] == [row["label"] for row in merged]
    assert [row["score"] for row in adapter] == pytest.approx([row["score"] for row in merged], abs=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# Other paths
# ---------------------------------------------------------------------------------------------------------------


def test_exact_resume(tiny_checkpoint, labelled_folder, tmp_path):
    flags = classification_flags(
        labelled_folder,
        "--shots",
        "3",
        "--max-steps",
        "4",
        "--checkpoint-every",
        "2",
        "--batch-size",
        "4",
        "--lora-dropout",
        "0.1",
    )
    straight = load_file(
        run_lora(tiny_checkpoint, tmp_path / "straight", *flags) / "adapter" / "adapter_model.safetensors"
    )
    interrupted = tmp_path / "interrupted"
    run_lora(tiny_checkpoint, interrupted, *flags)
    # Checkpoints hold the adapter only, not the frozen base.
    assert {p.name for p in (interrupted / "checkpoints" / "checkpoint-2").iterdir()} >= {
        "adapter_state.safetensors",
        "optimizer.bin",
    }
    assert not list((interrupted / "checkpoints" / "checkpoint-2").glob("model*.safetensors"))
    # Simulate a run killed after step 2: only the step-2 checkpoint survives (mid-epoch: 3 batches per epoch).
    kill_before_last_checkpoint(interrupted, 4, output="adapter")
    resumed = load_file(
        run_lora(tiny_checkpoint, interrupted, *flags, "--resume") / "adapter" / "adapter_model.safetensors"
    )
    assert_same_tensors(straight, resumed)


def test_resnet_backbone_with_aligner_refit(resnet_checkpoint, labelled_folder, tmp_path):
    output = run_lora(
        resnet_checkpoint,
        tmp_path,
        *classification_flags(labelled_folder, "--max-steps", "2", "--refit-aligner", "--merge"),
    )
    results = results_of(output)
    # 16 training images, 64 backbone features: the closed form fits them exactly.
    assert results["aligner_refit"]["r2"] > 0.99 and "adapted_before_refit" in results
    base = AgriCLIPModel.from_pretrained(resnet_checkpoint).state_dict()
    merged = AgriCLIPModel.from_pretrained(output / "merged").state_dict()
    # The frozen base stays in eval mode: BatchNorm statistics, which the adapter does not carry, never drift.
    statistics = [key for key in base if key.endswith(("running_mean", "running_var"))]
    assert statistics and all(torch.equal(base[key], merged[key]) for key in statistics)
    assert not torch.equal(base["aligner.weight"], merged["aligner.weight"])
    assert not torch.equal(
        base["dino_model.encoder.stages.3.layers.0.layer.1.convolution.weight"],
        merged["dino_model.encoder.stages.3.layers.0.layer.1.convolution.weight"],
    )
    adapter = load_file(output / "adapter" / "adapter_model.safetensors")
    assert torch.equal(adapter["base_model.model.aligner.weight"], merged["aligner.weight"])


class RecordingHub:
    """Stands in for `huggingface_hub.HfApi`: records what would be published, and the adapter config it held then."""

    calls = []

    def create_repo(self, repo_id, exist_ok=False):
        self.calls.append(("create_repo", repo_id))

    def upload_folder(self, repo_id, folder_path, commit_message):
        config = json.loads((Path(folder_path) / "adapter_config.json").read_text())
        self.calls.append(("upload_folder", repo_id, Path(folder_path).name, config["base_model_name_or_path"]))


def test_contrastive_on_captions_adapts_only_the_clip_image_tower(
    tiny_checkpoint, caption_folder, labelled_folder, tmp_path, capsys, monkeypatch
):
    monkeypatch.setattr("training.lora.HfApi", RecordingHub)
    output = run_lora(
        tiny_checkpoint,
        tmp_path,
        "--objective",
        "contrastive",
        "--towers",
        "image",
        "--train-data",
        str(caption_folder),
        "--eval-data",
        str(labelled_folder),
        "--templates",
        TEMPLATE,
        "--max-steps",
        "3",
        "--learning-rate",
        "1e-2",
        "--merge",
        "--base-model-id",
        "org/agriclip-tiny",
        "--push-to-hub",
        "me/agriclip-tiny-lora",
    )
    assert RecordingHub.calls == [
        ("create_repo", "me/agriclip-tiny-lora"),
        ("upload_folder", "me/agriclip-tiny-lora", "adapter", "org/agriclip-tiny"),
    ]
    printed = capsys.readouterr().out
    base = AgriCLIPModel.from_pretrained(tiny_checkpoint).state_dict()
    lora = 8 * 8 * (32 + 32)  # 8 projections of width 32, rank 8: A (8 x 32) and B (32 x 8)
    total = sum(tensor.numel() for tensor in base.values()) + lora
    assert (
        f"LoRA r=8 on 8 modules of the image tower: trainable parameters {lora:,} of {total:,} ({100 * lora / total:.3f}%)"
        in printed
    )
    assert len([row for row in read_metrics(tmp_path, RUN) if "loss" in row]) == 3
    results = results_of(output)
    assert results["embedding"] == "clip" and results["zero_shot"]["n_images"] == 32
    config = json.loads((output / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "org/agriclip-tiny"
    merged = AgriCLIPModel.from_pretrained(output / "merged").state_dict()
    changed = {key for key in base if not torch.equal(base[key], merged[key])}
    assert changed and all(key.startswith("vision_model.encoder.layers.") and "self_attn" in key for key in changed)


def test_published_adapter_never_records_a_local_path(tiny_checkpoint, labelled_folder, tmp_path, monkeypatch):
    assert base_model_reference("org/agriclip", None, publishing=True) == "org/agriclip"
    assert base_model_reference(str(tiny_checkpoint), "org/agriclip", publishing=True) == "org/agriclip"
    with pytest.raises(ValueError, match="not a Hub id"):
        base_model_reference(str(tiny_checkpoint), str(tiny_checkpoint), publishing=True)
    with pytest.raises(ValueError, match="preset 'tiny': the adapter cannot be loaded without it"):
        base_model_reference("tiny", None, publishing=True)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org" / "agriclip").mkdir(parents=True)
    with pytest.raises(ValueError, match="'org/agriclip' is a local path"):
        base_model_reference(str(tiny_checkpoint), "org/agriclip", publishing=True)
    # Refused before any training: nothing is written.
    with pytest.raises(ValueError, match=r"--push-to-hub: the adapter records the local base folder .*--base-model-id"):
        run_lora(
            tiny_checkpoint, tmp_path / "run", *classification_flags(labelled_folder, "--push-to-hub", "me/adapter")
        )
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------------------------------
# Slow: an embedded downstream task, and two processes
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_k_shot_lora_beats_zero_shot_on_an_embedded_task(tmp_path):
    """8-shot LoRA on the backbone of the tiny preset, cattle breeds (6 classes, 96 held-out images)."""
    from training.embedded import build_embedded_dataset

    data = build_embedded_dataset(tmp_path / "embedded", seed=0, image_size=64, pretrain_per_class=1, num_workers=1)
    output = main(
        [
            "--model",
            "tiny",
            "--suite",
            str(data / "suite.yaml"),
            "--task",
            "cattle-breed",
            "--shots",
            "8",
            "--output-dir",
            str(tmp_path / "run"),
            "--log-with",
            "none",
            "--epochs",
            "15",
            "--learning-rate",
            "5e-3",
        ]
    )
    results = results_of(output)
    assert results["n_train"] == 48 and results["adapted"]["n_images"] == 96 and results["trainable_share"] < 0.05
    assert results["adapted"]["top1"] >= results["zero_shot"]["top1"] + 0.1, results


@pytest.mark.slow
def test_two_processes_match_one(tiny_checkpoint, labelled_folder, tmp_path):
    """`accelerate launch` with 2 CPU processes x batch 4 equals 1 process x batch 8 (cross-entropy is a batch mean),
    the aligner re-fit over the 12 training images included: each process reads its own shard (6 + 6), where a
    prepared loader would pad the second global batch with 4 repeated images."""
    common = [
        "training.lora_finetune",
        "--model",
        str(tiny_checkpoint),
        *classification_flags(labelled_folder),
        "--shots",
        "3",
        "--max-steps",
        "1",
        "--refit-aligner",
        "--aligner-ridge",
        "0.1",
        "--log-with",
        "none",
    ]
    two = run_script([*common, "--batch-size", "4", "--output-dir", str(tmp_path / "two")], processes=2)
    assert "4 x 2 process(es)" in two.stdout, two.stderr[-3000:]
    one = run_script([*common, "--batch-size", "8", "--output-dir", str(tmp_path / "one")])
    assert "8 x 1 process(es)" in one.stdout, one.stderr[-3000:]
    weights = {name: load_file(tmp_path / name / "adapter" / "adapter_model.safetensors") for name in ("one", "two")}
    for key in weights["one"]:
        torch.testing.assert_close(weights["one"][key], weights["two"][key], atol=1e-5, rtol=1e-4)


def test_sigterm_during_the_held_out_evaluation_stops_at_once_and_says_what_is_kept(
    tiny_checkpoint, labelled_folder, tmp_path, monkeypatch, capsys, sigterm_fallback
):
    evaluate = training.lora.held_out_metrics

    def preempted_while_evaluating(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(training.lora, "held_out_metrics", preempted_while_evaluating)
    with pytest.raises(SystemExit) as exit_info:
        run_lora(tiny_checkpoint, tmp_path, *classification_flags(labelled_folder, "--shots", "2", "--max-steps", "2"))
    assert exit_info.value.code == 143
    assert (
        f"SIGTERM received: stopped; the newest checkpoint is {tmp_path / 'checkpoints' / 'checkpoint-2'}; run the "
        "same command with --resume to continue"
    ) in capsys.readouterr().out
    assert not (tmp_path / "adapter").exists() and not (tmp_path / "results.json").exists()
    assert signal.getsignal(signal.SIGTERM) is sigterm_fallback
