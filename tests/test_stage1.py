"""Stage 1: contrastive training with Accelerate — learning, exact resume, multi-process parity, guards."""

import json
import math
import shutil

import pytest
import torch
from accelerate import Accelerator
from safetensors.torch import load_file
from torch.utils.data import DataLoader
from transformers.modeling_outputs import BaseModelOutputWithPooling

import training.contrastive
from agriclip.images import DecodeStats, open_image
from agriclip.sources import load_image_text_dataset
from modeling_agriclip import AgriCLIPConfig, AgriCLIPModel
from training.contrastive import build_loaders, contrastive_forward, trainable_clip, validation_recall
from training.data import ImageTextCollator, IndexedRows, plan_validation
from training.dino import CropAndFlip, param_groups_without_decay
from training.losses import ContrastiveLoss
from training.options import parse_options
from training.runtime import NonFiniteLossError, adamw
from training.stage1_contrastive import ContrastiveOptions, build_parser, main

from conftest import COLOURS, assert_same_tensors, kill_before_last_checkpoint, read_metrics, run_script


RUN = "stage1_contrastive"


def run_stage1(data, output, *flags):
    return main(
        [
            "--model",
            "tiny",
            "--train-data",
            str(data),
            "--output-dir",
            str(output),
            "--batch-size",
            "8",
            "--log-with",
            "none",
            *flags,
        ]
    )


def _clip_batch(config, size=6, seed=0):
    generator = torch.Generator().manual_seed(seed)
    image = config.vision_config.image_size
    return {
        "input_ids": torch.randint(0, config.text_config.vocab_size - 2, (size, 12), generator=generator),
        "attention_mask": torch.ones(size, 12, dtype=torch.long),
        "pixel_values": torch.randn(size, 3, image, image, generator=generator),
    }


def test_contrastive_forward_matches_the_forward_with_logits_and_the_loss_that_normalises(tiny_config):
    """Stage 1's loss without the forward's thrown-away logits and without the second normalisation: the same
    loss and gradients as the path it replaced, to float rounding."""
    torch.manual_seed(0)
    model = AgriCLIPModel(tiny_config).train()
    trainable_clip(model, freeze_text=False, freeze_image=False)
    batch = _clip_batch(tiny_config)

    lean = contrastive_forward(model, batch, ContrastiveLoss())
    lean.backward()
    lean_grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    outputs = model(**batch, image_embedding="clip")  # the replaced path: logits built, then the loss normalises
    replaced = ContrastiveLoss()(outputs.image_embeds, outputs.text_embeds, model.logit_scale)
    replaced.backward()
    replaced_grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    torch.testing.assert_close(lean, replaced)
    assert lean_grads.keys() == replaced_grads.keys() and "logit_scale" in lean_grads
    for name in lean_grads:
        torch.testing.assert_close(lean_grads[name], replaced_grads[name], msg=name)

    with torch.no_grad():
        embeddings_only = model(**batch, image_embedding="clip", return_logits=False)
        full = model(**batch, image_embedding="clip", return_loss=True)
    assert embeddings_only.logits_per_text is None and embeddings_only.logits_per_image is None
    torch.testing.assert_close(embeddings_only.image_embeds, full.image_embeds, rtol=0, atol=0)
    torch.testing.assert_close(embeddings_only.text_embeds, full.text_embeds, rtol=0, atol=0)
    # return_loss still computes what it needs.
    assert model(**batch, return_loss=True, return_logits=False).loss is not None


def test_adamw_uses_a_fused_or_foreach_kernel_and_steps_as_the_for_loop_does(tiny_config):
    """`training.runtime.adamw` (stages 1 and 2, LoRA) takes torch's fused kernel on the CPU (multi-tensor `foreach`
    where none fits), and a few of its steps with weight-decay groups equal those of torch's default for-loop AdamW
    on the same parameters and gradients, to float tolerance."""
    torch.manual_seed(0)
    model = AgriCLIPModel(tiny_config)
    trainable_clip(model, freeze_text=False, freeze_image=False)
    loop_model = AgriCLIPModel(tiny_config)
    loop_model.load_state_dict(model.state_dict())
    trainable_clip(loop_model, freeze_text=False, freeze_image=False)
    settings = {"lr": 1e-3, "betas": (0.9, 0.98), "eps": 1e-6}
    lean = adamw(param_groups_without_decay(model, 0.2), "cpu", **settings)
    loop = torch.optim.AdamW(param_groups_without_decay(loop_model, 0.2), foreach=False, fused=False, **settings)
    assert all(group["fused"] for group in lean.param_groups)
    assert adamw(param_groups_without_decay(model, 0.2), "meta", **settings).param_groups[0]["foreach"]

    start = {name: parameter.detach().clone() for name, parameter in model.named_parameters()}
    generator = torch.Generator().manual_seed(1)
    for _ in range(3):
        grads = [torch.randn(p.shape, generator=generator) for p in model.parameters() if p.requires_grad]
        for optimizer, owner in ((lean, model), (loop, loop_model)):
            for parameter, grad in zip((p for p in owner.parameters() if p.requires_grad), grads):
                parameter.grad = grad.clone()
            optimizer.step()
            optimizer.zero_grad()
    for (name, parameter), loop_parameter in zip(model.named_parameters(), loop_model.parameters()):
        torch.testing.assert_close(parameter, loop_parameter, msg=name)
    assert not torch.equal(model.text_projection.weight, start["text_projection.weight"])


def test_short_run_learns_and_exports(caption_folder, tmp_path):
    final = run_stage1(caption_folder, tmp_path, "--epochs", "4", "--learning-rate", "1e-3", "--checkpoint-every", "4")
    losses = [row["loss"] for row in read_metrics(tmp_path, RUN) if "loss" in row]
    assert len(losses) == 16
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 - 0.3
    assert {"config.json", "model.safetensors", "processor_config.json", "tokenizer.json"} <= {
        p.name for p in final.iterdir()
    }
    recall = read_metrics(tmp_path, RUN)[-1]
    # 16 validation pairs over 4 colours: a caption matches 4 images, so chance text-to-image R@1 is 1/16.
    assert recall["val/text_to_image_R@5"] > 0.5
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "checkpoint-12",
        "checkpoint-16",
        "checkpoint-8",
    ]


def test_exact_resume_with_caption_variants(variant_caption_folder, tmp_path):
    """Stopped at step 3 of 6 (mid-epoch; the run crosses into epoch 1) on data with 3 caption variants per image:
    the resumed run ends with the same weights, bit for bit, although the collator prefetches the next batch
    before the checkpoint is written."""
    flags = ("--max-steps", "6", "--checkpoint-every", "3", "--learning-rate", "1e-3")
    straight = load_file(run_stage1(variant_caption_folder, tmp_path / "straight", *flags) / "model.safetensors")
    interrupted = tmp_path / "interrupted"
    run_stage1(variant_caption_folder, interrupted, *flags)
    kill_before_last_checkpoint(interrupted, 6)  # killed after step 3: only the step-3 checkpoint survives
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
        order = (
            torch.randperm(len(rows), generator=torch.Generator().manual_seed(7)).tolist()
            if shuffle
            else range(len(rows))
        )
        loader = DataLoader(
            rows, batch_size=batch_size, sampler=list(order), collate_fn=collator, num_workers=num_workers
        )
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
    fixed = caption_of_each_row(
        DataLoader(rows, batch_size=8, collate_fn=ImageTextCollator(tiny_processor)), tiny_processor
    )
    assert fixed == {index: variants[index][0] for index in variants}
    with pytest.raises(ValueError, match="row_index.*IndexedRows"):
        ImageTextCollator(tiny_processor, seed=0)([load_image_text_dataset(variant_caption_folder, split="train")[0]])


def validation_loader(data, processor, *flags):
    """Stage 1's validation loader and captions for `data`, prepared for one CPU process, and the accelerator."""
    args = parse_options(
        ContrastiveOptions,
        ["--model", "tiny", "--train-data", str(data), "--output-dir", "unused", "--batch-size", "8", *flags],
        prog="test",
    )
    validation = plan_validation(
        args.train_data, args.train_split, args.val_data, args.val_split, args.val_fraction, args.seed
    )
    _, val_loader, captions = build_loaders(args, validation, processor, DecodeStats())
    accelerator = Accelerator(cpu=True)
    return accelerator.prepare(val_loader), captions, accelerator


def recall_by_caption_text(images, texts, captions, k) -> dict[str, float]:
    """Recall@k spelled out: candidates by similarity, highest first, then by index; a hit when one of the first k
    has the query's caption text."""
    same = [[a == b for b in captions] for a in captions]

    def recall(similarity):
        hits = [
            any(same[query][column] for column in sorted(range(len(row)), key=lambda c: (-row[c], c))[:k])
            for query, row in enumerate(similarity.tolist())
        ]
        return sum(hits) / len(hits)

    return {f"val/image_to_text_R@{k}": recall(images @ texts.T), f"val/text_to_image_R@{k}": recall(texts @ images.T)}


def test_validation_recall_reads_the_same_at_the_same_weights(variant_caption_folder, tiny_processor):
    """Validation pairs each image with its fixed caption: two calls at the same weights give the same recall, the
    recall of an independent computation on the `caption` column, matching by caption text (4 captions repeat over
    the 16 pairs)."""
    val_loader, captions, accelerator = validation_loader(variant_caption_folder, tiny_processor)
    torch.manual_seed(0)
    model = AgriCLIPModel(AgriCLIPConfig.tiny())
    first, second = (validation_recall(model, val_loader, accelerator, captions) for _ in range(2))
    assert first == second

    pairs = load_image_text_dataset(variant_caption_folder, split="validation")
    assert list(pairs["caption"]) == captions and len(set(captions)) == 4
    inputs = tiny_processor(
        text=captions, images=[open_image(image) for image in pairs["image"]], return_tensors="pt", padding=True
    )
    with torch.no_grad():
        images = torch.nn.functional.normalize(
            model.get_clip_image_features(inputs["pixel_values"]).pooler_output, dim=-1
        )
        texts = torch.nn.functional.normalize(
            model.get_text_features(inputs["input_ids"], inputs["attention_mask"]).pooler_output, dim=-1
        )
    expected = recall_by_caption_text(images, texts, captions, 1) | recall_by_caption_text(images, texts, captions, 5)
    assert first == pytest.approx(expected, abs=1e-6)


class ColourOracle(torch.nn.Module):
    """A perfect model of the caption folder: the image embedding is the one-hot of the colour nearest to the image's
    mean pixel, the text embedding the one-hot of the colour its caption names."""

    def __init__(self, processor):
        super().__init__()
        token_ids = [processor.tokenizer(name, add_special_tokens=False)["input_ids"] for name in COLOURS]
        assert all(len(ids) == 1 for ids in token_ids)
        self.colour_tokens = torch.tensor([ids[0] for ids in token_ids])
        self.colours = torch.tensor(list(COLOURS.values()), dtype=torch.float) / 255
        self.mean = torch.tensor(processor.image_processor.image_mean)
        self.std = torch.tensor(processor.image_processor.image_std)

    def get_clip_image_features(self, pixel_values):
        rgb = pixel_values.mean(dim=(2, 3)) * self.std + self.mean
        one_hot = torch.nn.functional.one_hot(torch.cdist(rgb, self.colours).argmin(1), len(COLOURS)).float()
        return BaseModelOutputWithPooling(pooler_output=one_hot)  # as AgriCLIPModel's get_*_features return

    def get_text_features(self, input_ids, attention_mask):
        named = (input_ids[:, :, None] == self.colour_tokens).any(dim=1)
        assert (named.sum(1) == 1).all()
        return BaseModelOutputWithPooling(pooler_output=named.float())


def test_validation_recall_counts_a_caption_identical_to_the_true_one_as_a_hit(caption_folder, tiny_processor):
    """Template captions: 4 colours, each caption shared by 4 of the 16 validation images. A model that gets every
    colour right reads recall 1; counted as pair i <-> caption i alone, its R@1 read 1/4 (of the 4 images that tie,
    only the first ranks its own caption first)."""
    val_loader, captions, accelerator = validation_loader(caption_folder, tiny_processor)
    recall = validation_recall(ColourOracle(tiny_processor), val_loader, accelerator, captions)
    assert recall == {f"val/{direction}_R@{k}": 1.0 for direction in ("image_to_text", "text_to_image") for k in (1, 5)}


def test_a_plain_folder_without_a_validation_split_holds_out_a_seeded_fraction(caption_folder, tmp_path, capsys):
    """An image folder of one split, its captions in a column named with --caption-column: a quarter of the 32 pairs
    (drawn with the seed) validates, the other 24 train (3 steps of 8 per epoch), and one line says so. A resume
    with another fraction would train on other pairs: refused."""
    plain = tmp_path / "plain"
    shutil.copytree(caption_folder / "train", plain)
    rows = [json.loads(line) for line in (plain / "metadata.jsonl").read_text().splitlines()]
    (plain / "metadata.jsonl").write_text(
        "".join(json.dumps({"file_name": row["file_name"], "description": row["caption"]}) + "\n" for row in rows)
    )
    flags = ("--caption-column", "description", "--val-fraction", "0.25", "--learning-rate", "1e-3")
    run_stage1(plain, tmp_path / "run", *flags)
    printed = capsys.readouterr().out
    assert (
        f"validation: {plain} has no split 'validation' (splits: train), so 25% of the training pairs, drawn with "
        "seed 0, are held out for validation and not trained on"
    ) in printed
    metrics = read_metrics(tmp_path / "run", RUN)
    assert len([row for row in metrics if "loss" in row]) == 3
    assert all((8 * value).is_integer() for key, value in metrics[-1].items() if key.startswith("val/"))
    with pytest.raises(ValueError, match=r"--val-fraction: 0\.25 -> 0\.5"):
        run_stage1(plain, tmp_path / "run", *flags[:2], "--val-fraction", "0.5", "--learning-rate", "1e-3", "--resume")


def test_a_missing_validation_split_named_explicitly_fails_before_anything_loads(caption_folder, tmp_path, monkeypatch):
    monkeypatch.setattr(training.contrastive, "load_model_and_processor", lambda *args: pytest.fail("the model loaded"))
    with pytest.raises(
        ValueError,
        match=r"train: no split 'validation' for validation; splits: \['train'\]; pass "
        "--val-split with one of them, or leave it out",
    ):
        run_stage1(caption_folder / "train", tmp_path, "--val-split", "validation")


def test_resume_with_changed_options_is_refused_unless_allowed(caption_folder, tmp_path):
    """A resume with another batch size, learning rate or seed would silently continue a different run: refused,
    naming each difference, unless --allow-changed-config; logs/<run>/ keep a record of every segment."""
    flags = ("--max-steps", "4", "--checkpoint-every", "2", "--learning-rate", "1e-3")
    run_stage1(caption_folder, tmp_path, *flags)
    shutil.rmtree(tmp_path / "final")
    shutil.rmtree(tmp_path / "checkpoints" / "checkpoint-4")
    changed = (
        "--max-steps",
        "4",
        "--checkpoint-every",
        "1",
        "--learning-rate",
        "2e-3",
        "--seed",
        "1",
        "--num-workers",
        "1",
    )
    with pytest.raises(ValueError) as refusal:
        main(
            [
                "--model",
                "tiny",
                "--train-data",
                str(caption_folder),
                "--output-dir",
                str(tmp_path),
                "--batch-size",
                "4",
                "--log-with",
                "none",
                *changed,
                "--resume",
            ]
        )
    message = str(refusal.value)
    assert str(tmp_path / "checkpoints" / "checkpoint-2") in message and "--allow-changed-config" in message
    for difference in ("--batch-size: 8 -> 4", "--learning-rate: 0.001 -> 0.002", "--seed: 0 -> 1"):
        assert difference in message
    assert "num-workers" not in message and "checkpoint-every" not in message  # they do not change the result
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["checkpoint-2"]  # nothing trained

    main(
        [
            "--model",
            "tiny",
            "--train-data",
            str(caption_folder),
            "--output-dir",
            str(tmp_path),
            "--batch-size",
            "4",
            "--log-with",
            "none",
            *changed,
            "--resume",
            "--allow-changed-config",
        ]
    )
    logs = tmp_path / "logs" / RUN
    segments = [json.loads(line) for line in (logs / "segments.jsonl").read_text().splitlines()]
    assert [(s["start_step"], s["resumed_from"]) for s in segments] == [
        (0, ""),
        (2, str(tmp_path / "checkpoints" / "checkpoint-2")),
    ]
    assert [(s["options"]["batch_size"], s["options"]["learning_rate"], s["options"]["seed"]) for s in segments] == [
        (8, 1e-3, 0),
        (4, 2e-3, 1),
    ]
    assert json.loads((logs / "config.json").read_text())["batch_size"] == 8  # the options the run started with
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "checkpoint-2",
        "checkpoint-3",
        "checkpoint-4",
    ]


def test_frozen_tower_does_not_change(caption_folder, tmp_path):
    from modeling_agriclip import AgriCLIPConfig, AgriCLIPModel

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
        run_stage1(
            caption_folder,
            tmp_path,
            "--max-steps",
            "6",
            "--checkpoint-every",
            "1",
            "--learning-rate",
            "1e30",
            "--max-grad-norm",
            "0",
        )
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


@pytest.mark.slow
def test_two_processes_match_one_on_the_same_global_batch(variant_caption_folder, tmp_path):
    """`accelerate launch` with 2 CPU processes x batch 4 equals 1 process x batch 8: losses and final weights, on
    data with 3 caption variants per image, over 5 steps (into the second epoch)."""
    common = [
        "training.stage1_contrastive",
        "--model",
        "tiny",
        "--train-data",
        str(variant_caption_folder),
        "--max-steps",
        "5",
        "--log-with",
        "none",
        "--learning-rate",
        "1e-3",
    ]
    two = run_script([*common, "--batch-size", "4", "--output-dir", str(tmp_path / "two")], processes=2)
    assert "4 x 2 process(es)" in two.stdout, two.stderr[-3000:]
    one = run_script([*common, "--batch-size", "8", "--output-dir", str(tmp_path / "one")])
    assert "8 x 1 process(es)" in one.stdout, one.stderr[-3000:]
    losses = {
        name: [row["loss"] for row in read_metrics(tmp_path / name, RUN) if "loss" in row] for name in ("one", "two")
    }
    assert losses["one"] == pytest.approx(losses["two"], abs=1e-5)
    weights_one = load_file(tmp_path / "one" / "final" / "model.safetensors")
    weights_two = load_file(tmp_path / "two" / "final" / "model.safetensors")
    assert weights_one.keys() == weights_two.keys()
    largest = max((weights_one[key].double() - weights_two[key].double()).abs().max().item() for key in weights_one)
    for key in weights_one:
        torch.testing.assert_close(
            weights_one[key],
            weights_two[key],
            atol=1e-5,
            rtol=1e-4,
            msg=lambda text: f"{key}: {text} (max |diff| over all tensors {largest:.3g})",
        )


def test_schedule_spans_the_run_and_warm_up_moves_from_the_first_step(caption_folder, tmp_path, capsys):
    """The learning rate over the run's optimizer steps, by hand: 6 steps from --max-steps (into a second epoch of 4),
    else --epochs x 4 steps; warm-up step i of n takes the peak x (i + 1) / n, then a cosine to the minimum."""
    peak, low = 1e-3, 1e-4

    def cosine(j, n):
        return low + 0.5 * (peak - low) * (1 + math.cos(math.pi * j / n))

    run_stage1(
        caption_folder,
        tmp_path / "steps",
        "--max-steps",
        "6",
        "--warmup-steps",
        "2",
        "--learning-rate",
        "1e-3",
        "--min-learning-rate",
        "1e-4",
    )
    logged = [row["lr"] for row in read_metrics(tmp_path / "steps", RUN) if "lr" in row]
    assert logged == pytest.approx([peak / 2, peak] + [cosine(j, 4) for j in range(4)], rel=1e-9)
    assert "stage 1: peak learning rate 0.001 after 2 warm-up steps, cosine to 0.0001" in capsys.readouterr().out

    run_stage1(
        caption_folder, tmp_path / "epochs", "--epochs", "2", "--learning-rate", "1e-3", "--min-learning-rate", "1e-4"
    )
    logged = [row["lr"] for row in read_metrics(tmp_path / "epochs", RUN) if "lr" in row]
    assert logged == pytest.approx([cosine(j, 8) for j in range(8)], rel=1e-9)


def test_accumulation_says_each_contrastive_loss_contrasts_its_own_batch_only(caption_folder, tmp_path, capsys):
    run_stage1(caption_folder, tmp_path, "--max-steps", "1", "--gradient-accumulation-steps", "2")
    assert (
        "each forward pass contrasts its own 8 x 1 process(es) = 8 image-text pairs; the 2 accumulated passes "
        "average their gradients and add no negatives to each other's loss"
    ) in capsys.readouterr().out
    help_text = " ".join(build_parser().format_help().split())
    assert "still contrasts each pass's own batch size x processes pairs" in help_text


AUGMENT = ("--augment", "--crop-scale", "0.5", "1.0")


def test_augment_crops_the_training_images_only(caption_folder, tmp_path, monkeypatch, capsys):
    """--augment crops and flips each training batch once per forward pass (validation, here after every step, never)
    and changes what the run learns."""
    shapes, forward = [], CropAndFlip.forward

    def counted_forward(self, pixels, *args, **kwargs):
        shapes.append(tuple(pixels.shape))
        return forward(self, pixels, *args, **kwargs)

    monkeypatch.setattr(CropAndFlip, "forward", counted_forward)
    flags = ("--max-steps", "2", "--learning-rate", "1e-3", "--eval-every", "1")
    augmented = load_file(run_stage1(caption_folder, tmp_path / "augmented", *flags, *AUGMENT) / "model.safetensors")
    assert shapes == [(8, 3, 64, 64)] * 2
    assert "randomly cropped to 0.5-1 of their area and flipped with probability 0.5" in capsys.readouterr().out
    plain = load_file(run_stage1(caption_folder, tmp_path / "plain", *flags) / "model.safetensors")
    assert len(shapes) == 2
    assert not torch.equal(plain["visual_projection.weight"], augmented["visual_projection.weight"])


def test_augmented_run_resumes_exactly(caption_folder, tmp_path):
    """The crops come from the RNG state that every checkpoint saves: stopped at step 2 of 4, the resumed run ends
    with the uninterrupted run's weights, bit for bit."""
    flags = ("--max-steps", "4", "--checkpoint-every", "2", "--learning-rate", "1e-3", *AUGMENT)
    straight = load_file(run_stage1(caption_folder, tmp_path / "straight", *flags) / "model.safetensors")
    interrupted = tmp_path / "interrupted"
    run_stage1(caption_folder, interrupted, *flags)
    kill_before_last_checkpoint(interrupted, 4)
    resumed = load_file(run_stage1(caption_folder, interrupted, *flags, "--resume") / "model.safetensors")
    assert_same_tensors(straight, resumed)


@pytest.mark.slow
def test_augmented_two_processes_match_one_on_the_same_global_batch(caption_folder, tmp_path):
    """With --augment each process draws the crops of the whole global batch and applies its own rows: 2 processes
    x batch 4 equal 1 process x batch 8."""
    common = [
        "training.stage1_contrastive",
        "--model",
        "tiny",
        "--train-data",
        str(caption_folder),
        "--max-steps",
        "3",
        "--log-with",
        "none",
        "--learning-rate",
        "1e-3",
        *AUGMENT,
    ]
    two = run_script([*common, "--batch-size", "4", "--output-dir", str(tmp_path / "two")], processes=2)
    assert "4 x 2 process(es)" in two.stdout, two.stderr[-3000:]
    one = run_script([*common, "--batch-size", "8", "--output-dir", str(tmp_path / "one")])
    assert one.returncode == 0, one.stderr[-3000:]
    losses = {
        name: [row["loss"] for row in read_metrics(tmp_path / name, RUN) if "loss" in row] for name in ("one", "two")
    }
    assert len(losses["one"]) == 3 and losses["one"] == pytest.approx(losses["two"], abs=1e-5)
    weights_one = load_file(tmp_path / "one" / "final" / "model.safetensors")
    weights_two = load_file(tmp_path / "two" / "final" / "model.safetensors")
    for key in weights_one:
        torch.testing.assert_close(weights_two[key], weights_one[key], atol=1e-5, rtol=1e-4, msg=key)


def test_a_loss_adopts_a_model_of_another_objective_only():
    from training.losses import SigLIPLoss, create_loss

    model = AgriCLIPModel(AgriCLIPConfig.tiny())  # a config of its own: adopting changes it
    assert create_loss("infonce").adopt(model) is False  # already InfoNCE: its temperature is kept
    assert model.logit_scale.item() == pytest.approx(model.config.logit_scale_init_value)
    assert create_loss("siglip").adopt(model) is True
    assert model.config.contrastive_loss == "siglip"
    assert (model.logit_scale.item(), model.logit_bias.item()) == pytest.approx((math.log(10.0), -10.0))
    with torch.no_grad():
        model.logit_bias.fill_(-4.0)
    assert SigLIPLoss().adopt(model) is False and model.logit_bias.item() == -4.0  # learned values stay
    trainable_clip(model, freeze_text=False, freeze_image=False, train_bias=True)
    assert model.logit_bias.requires_grad and model.logit_scale.requires_grad
    trainable_clip(model, freeze_text=False, freeze_image=False)
    assert not model.logit_bias.requires_grad  # unused by InfoNCE: a trainable one would break DDP


def test_a_siglip_run_learns_its_bias_and_exports_a_model_that_zero_shot_reads_with_sigmoids(
    caption_folder, tmp_path, capsys, sample_images
):
    from modeling_agriclip.zero_shot import ZeroShotClassifier

    final = run_stage1(caption_folder, tmp_path, "--max-steps", "3", "--loss", "siglip", "--learning-rate", "1e-3")
    assert "--loss siglip starts from its published logit scale 2.303 and logit bias -10" in capsys.readouterr().out
    logged = [row for row in read_metrics(tmp_path, RUN) if "loss" in row]
    assert len(logged) == 3 and all(math.isfinite(row["loss"]) for row in logged)
    assert all("logit_bias" in row for row in logged)
    assert json.loads((final / "config.json").read_text())["contrastive_loss"] == "siglip"
    model = AgriCLIPModel.from_pretrained(final)
    assert model.config.contrastive_loss == "siglip"
    assert model.logit_bias.item() != -10.0 and model.logit_scale.item() != pytest.approx(math.log(10.0), abs=1e-9)
    assert model.logit_bias.item() == pytest.approx(logged[-1]["logit_bias"], abs=1e-2)

    classifier = ZeroShotClassifier.from_pretrained(final)
    labels = ["a red square", "a green square", "a blue square"]
    logits = classifier.logits(sample_images, labels)
    predictions = classifier.predict(sample_images, labels, top_k=3)
    for row, image_logits in zip(predictions, logits):
        scores = {entry["label"]: entry["score"] for entry in row}
        assert [scores[label] for label in labels] == pytest.approx(image_logits.sigmoid().tolist())
        assert all(0.0 <= score <= 1.0 for score in scores.values())
        assert sum(scores.values()) != pytest.approx(1.0, abs=1e-3)
