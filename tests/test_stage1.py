"""Stage 1: contrastive training with Accelerate — learning, exact resume, multi-process parity, guards."""

import json
import shutil

import pytest
import torch
from accelerate import Accelerator
from safetensors.torch import load_file
from torch.utils.data import DataLoader

from conftest import read_metrics, run_script
from evaluation.retrieval import retrieval_recall
from modeling_agriclip import AgriCLIPConfig, AgriCLIPModel
from agriclip.images import DecodeStats, open_image
from training.data import ImageTextCollator, IndexedRows, load_image_text_dataset
from training.runtime import NonFiniteLossError
from training.contrastive import build_loaders, validation_recall
from training.stage1_contrastive import build_parser, main

RUN = "stage1_contrastive"


def run_stage1(data, output, *flags):
    return main(["--model", "tiny", "--train-data", str(data), "--output-dir", str(output), "--batch-size", "8",
                 "--log-with", "none", *flags])


def assert_same_tensors(expected: dict, actual: dict) -> None:
    """Every tensor equal bit for bit; otherwise says how many differ and by how much at most."""
    assert expected.keys() == actual.keys()
    differences = {key: (expected[key].double() - actual[key].double()).abs().max().item()
                   for key in expected if not torch.equal(expected[key], actual[key])}
    assert not differences, f"{len(differences)} of {len(expected)} tensors differ, max |diff| {max(differences.values()):.3g}"


def test_short_run_learns_and_exports(caption_folder, tmp_path):
    final = run_stage1(caption_folder, tmp_path, "--epochs", "4", "--learning-rate", "1e-3", "--checkpoint-every", "4")
    losses = [row["loss"] for row in read_metrics(tmp_path, RUN) if "loss" in row]
    assert len(losses) == 16
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 - 0.3
    assert {"config.json", "model.safetensors", "processor_config.json", "tokenizer.json"} <= {p.name for p in final.iterdir()}
    recall = read_metrics(tmp_path, RUN)[-1]
    # 16 validation pairs over 4 colours: a caption matches 4 images, so chance text-to-image R@1 is 1/16.
    assert recall["val/text_to_image_R@5"] > 0.5
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["checkpoint-12", "checkpoint-16", "checkpoint-8"]


def test_exact_resume_with_caption_variants(variant_caption_folder, tmp_path):
    """Stopped at step 3 of 6 (mid-epoch; the run crosses into epoch 1) on data with 3 caption variants per image:
    the resumed run ends with the same weights, bit for bit, although the collator prefetches the next batch
    before the checkpoint is written."""
    flags = ("--max-steps", "6", "--checkpoint-every", "3", "--learning-rate", "1e-3")
    straight = load_file(run_stage1(variant_caption_folder, tmp_path / "straight", *flags) / "model.safetensors")
    interrupted = tmp_path / "interrupted"
    run_stage1(variant_caption_folder, interrupted, *flags)
    # Simulate a run killed after step 3: only the step-3 checkpoint survives.
    shutil.rmtree(interrupted / "final")
    shutil.rmtree(interrupted / "checkpoints" / "checkpoint-6")
    resumed = load_file(run_stage1(variant_caption_folder, interrupted, *flags, "--resume") / "model.safetensors")
    assert_same_tensors(straight, resumed)


def caption_of_each_row(loader, processor) -> dict[int, str]:
    """Row index -> the caption the loader's batches hold for it (decoded back from the token ids)."""
    captions = {}
    for batch_indices, batch in zip(loader.batch_sampler, loader):
        texts = processor.batch_decode(batch["input_ids"], skip_special_tokens=True)
        captions.update(zip(batch_indices, texts))
    return captions


def test_caption_variants_depend_on_seed_epoch_and_index_only(variant_caption_folder, tiny_processor):
    """A row's variant is the same whatever batch it lands in and in DataLoader workers, changes with the epoch
    (which the training loop sets before each epoch's iterator starts its workers) and with the seed."""
    rows = IndexedRows(load_image_text_dataset(variant_caption_folder, split="train"))
    variants = {index: [text.lower() for text in rows[index]["captions"]] for index in range(len(rows))}

    def draw(seed, epoch, batch_size, num_workers=0, shuffle=False):
        collator = ImageTextCollator(tiny_processor, seed=seed)
        collator.epoch = epoch
        order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(7)).tolist() if shuffle else range(len(rows))
        loader = DataLoader(rows, batch_size=batch_size, sampler=list(order), collate_fn=collator, num_workers=num_workers)
        return caption_of_each_row(loader, tiny_processor)

    epoch_0 = draw(seed=0, epoch=0, batch_size=8)
    assert all(epoch_0[index] in variants[index] for index in variants)
    assert len({variants[index].index(text) for index, text in epoch_0.items()}) == 3  # every variant is drawn
    assert draw(seed=0, epoch=0, batch_size=5, shuffle=True) == epoch_0
    epoch_1 = draw(seed=0, epoch=1, batch_size=8)
    assert draw(seed=0, epoch=1, batch_size=3, num_workers=2, shuffle=True) == epoch_1
    assert sum(epoch_0[index] != epoch_1[index] for index in variants) > len(variants) / 3
    assert sum(epoch_0[index] != draw(seed=1, epoch=0, batch_size=8)[index] for index in variants) > len(variants) / 3
    # Without a seed (validation, feature extraction) every row keeps its `caption`, the first variant.
    fixed = caption_of_each_row(DataLoader(rows, batch_size=8, collate_fn=ImageTextCollator(tiny_processor)), tiny_processor)
    assert fixed == {index: variants[index][0] for index in variants}
    with pytest.raises(ValueError, match="row_index.*IndexedRows"):
        ImageTextCollator(tiny_processor, seed=0)([load_image_text_dataset(variant_caption_folder, split="train")[0]])


def test_validation_recall_reads_the_same_at_the_same_weights(variant_caption_folder, tiny_processor):
    """Validation pairs each image with its fixed caption: two calls at the same weights give the same recall, the
    recall of an independent computation on the `caption` column."""
    args = build_parser().parse_args(["--model", "tiny", "--train-data", str(variant_caption_folder), "--output-dir", "unused",
                                      "--batch-size", "8"])
    _, val_loader = build_loaders(args, tiny_processor, DecodeStats())
    accelerator = Accelerator(cpu=True)
    val_loader = accelerator.prepare(val_loader)
    torch.manual_seed(0)
    model = AgriCLIPModel(AgriCLIPConfig.tiny())
    first, second = (validation_recall(model, val_loader, accelerator) for _ in range(2))
    assert first == second

    pairs = load_image_text_dataset(variant_caption_folder, split="validation")
    inputs = tiny_processor(text=list(pairs["caption"]), images=[open_image(image) for image in pairs["image"]],
                            return_tensors="pt", padding=True)
    with torch.no_grad():
        images = torch.nn.functional.normalize(model.get_clip_image_features(inputs["pixel_values"]), dim=-1)
        texts = torch.nn.functional.normalize(model.get_text_features(inputs["input_ids"], inputs["attention_mask"]), dim=-1)
    expected = retrieval_recall(images, texts, torch.arange(len(texts)), ks=(1, 5))
    assert first == pytest.approx({f"val/{direction}_R@{k.removeprefix('R@')}": value
                                   for direction, values in expected.items() for k, value in values.items()}, abs=1e-6)


def test_resume_with_changed_options_is_refused_unless_allowed(caption_folder, tmp_path):
    """A resume with another batch size, learning rate or seed would silently continue a different run: refused,
    naming each difference, unless --allow-changed-config; logs/<run>/ keep a record of every segment."""
    flags = ("--max-steps", "4", "--checkpoint-every", "2", "--learning-rate", "1e-3")
    run_stage1(caption_folder, tmp_path, *flags)
    shutil.rmtree(tmp_path / "final")
    shutil.rmtree(tmp_path / "checkpoints" / "checkpoint-4")
    changed = ("--max-steps", "4", "--checkpoint-every", "1", "--learning-rate", "2e-3", "--seed", "1", "--num-workers", "1")
    with pytest.raises(ValueError) as refusal:
        main(["--model", "tiny", "--train-data", str(caption_folder), "--output-dir", str(tmp_path), "--batch-size", "4",
              "--log-with", "none", *changed, "--resume"])
    message = str(refusal.value)
    assert str(tmp_path / "checkpoints" / "checkpoint-2") in message and "--allow-changed-config" in message
    for difference in ("--batch-size: 8 -> 4", "--learning-rate: 0.001 -> 0.002", "--seed: 0 -> 1"):
        assert difference in message
    assert "num-workers" not in message and "checkpoint-every" not in message  # they do not change the result
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["checkpoint-2"]  # nothing trained

    main(["--model", "tiny", "--train-data", str(caption_folder), "--output-dir", str(tmp_path), "--batch-size", "4",
          "--log-with", "none", *changed, "--resume", "--allow-changed-config"])
    logs = tmp_path / "logs" / RUN
    segments = [json.loads(line) for line in (logs / "segments.jsonl").read_text().splitlines()]
    assert [(s["start_step"], s["resumed_from"]) for s in segments] == [(0, ""), (2, str(tmp_path / "checkpoints" / "checkpoint-2"))]
    assert [(s["options"]["batch_size"], s["options"]["learning_rate"], s["options"]["seed"]) for s in segments] == [
        (8, 1e-3, 0), (4, 2e-3, 1)]
    assert json.loads((logs / "config.json").read_text())["batch_size"] == 8  # the options the run started with
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["checkpoint-2", "checkpoint-3", "checkpoint-4"]


def test_frozen_tower_does_not_change(caption_folder, tmp_path):
    from modeling_agriclip import AgriCLIPModel, AgriCLIPConfig

    torch.manual_seed(0)
    initial = AgriCLIPModel(AgriCLIPConfig.tiny()).state_dict()
    final = run_stage1(caption_folder, tmp_path, "--max-steps", "2", "--freeze-text", "--learning-rate", "1e-3")
    trained = AgriCLIPModel.from_pretrained(final).state_dict()
    text_keys = [k for k in trained if k.startswith(("text_model.", "text_projection."))]
    assert text_keys and all(torch.equal(trained[k], initial[k]) for k in text_keys)
    assert not torch.equal(trained["visual_projection.weight"], initial["visual_projection.weight"])
    assert all(torch.equal(trained[k], initial[k]) for k in trained if k.startswith(("dino_model.", "aligner.")))


def test_nan_loss_stops_cleanly(caption_folder, tmp_path):
    with pytest.raises(NonFiniteLossError, match=r"optimizer step \d+.*last good checkpoint is .*checkpoint-1"):
        run_stage1(caption_folder, tmp_path, "--max-steps", "6", "--checkpoint-every", "1", "--learning-rate", "1e30",
                   "--max-grad-norm", "0")
    assert not (tmp_path / "final").exists()
    good = sorted((tmp_path / "checkpoints").iterdir())
    assert good and all((c / "trainer_state.json").is_file() for c in good)
    assert not any(p.name.startswith(".staging") for p in (tmp_path / "checkpoints").iterdir())


def test_config_file_values_are_overridden_by_flags(caption_folder, tmp_path):
    config = tmp_path / "stage1.yaml"
    config.write_text("max-steps: 1\nbatch_size: 4\nlearning-rate: 0.5\n")
    run_stage1(caption_folder, tmp_path / "run", "--config", str(config), "--learning-rate", "0.001")
    logged = [row for row in read_metrics(tmp_path / "run", RUN) if "lr" in row]
    assert len(logged) == 1 and logged[0]["lr"] == pytest.approx(0.001)
    config.write_text("max-step: 1\n")
    with pytest.raises(SystemExit):
        run_stage1(caption_folder, tmp_path / "bad", "--config", str(config))


def test_two_processes_match_one_on_the_same_global_batch(variant_caption_folder, tmp_path):
    """`accelerate launch` with 2 CPU processes x batch 4 equals 1 process x batch 8: losses and final weights, on
    data with 3 caption variants per image, over 5 steps (into the second epoch)."""
    common = ["training.stage1_contrastive", "--model", "tiny", "--train-data", str(variant_caption_folder),
              "--max-steps", "5", "--log-with", "none", "--learning-rate", "1e-3"]
    two = run_script([*common, "--batch-size", "4", "--output-dir", str(tmp_path / "two")], processes=2)
    assert "4 x 2 process(es)" in two.stdout, two.stderr[-3000:]
    one = run_script([*common, "--batch-size", "8", "--output-dir", str(tmp_path / "one")])
    assert "8 x 1 process(es)" in one.stdout, one.stderr[-3000:]
    losses = {name: [row["loss"] for row in read_metrics(tmp_path / name, RUN) if "loss" in row] for name in ("one", "two")}
    assert losses["one"] == pytest.approx(losses["two"], abs=1e-5)
    weights_one = load_file(tmp_path / "one" / "final" / "model.safetensors")
    weights_two = load_file(tmp_path / "two" / "final" / "model.safetensors")
    assert weights_one.keys() == weights_two.keys()
    largest = max((weights_one[key].double() - weights_two[key].double()).abs().max().item() for key in weights_one)
    for key in weights_one:
        torch.testing.assert_close(weights_one[key], weights_two[key], atol=1e-5, rtol=1e-4,
                                   msg=lambda text: f"{key}: {text} (max |diff| over all tensors {largest:.3g})")
