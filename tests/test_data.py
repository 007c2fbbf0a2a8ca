"""Decoding of bad and unusual images, the loaders of every source kind, and the collators."""

import hashlib
import io
import json
import logging
import os
import pickle
import re
import struct
import tarfile
import zlib
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from agriclip import images
from agriclip.images import DECODE_REPORT, DecodeStats, ImageDecodeError, counted, open_image, read_image_bytes
from agriclip.sources import (
    IMAGE_TEXT_COLUMNS,
    load_image_dataset,
    load_image_text_dataset,
    load_labelled_dataset,
    split_names,
)
from training.data import ROW_INDEX, ImageCollator, ImageTextCollator, plan_validation

from conftest import write_caption_folder, write_labelled_folder


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def noisy_rgb(seed: int, size=(48, 40)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((size[1], size[0], 3)) * 255).astype(np.uint8))


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares a huge size but holds almost no data: opening it must not allocate the image."""

    def chunk(tag: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + tag + payload + struct.pack(">I", zlib.crc32(tag + payload))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    data_chunk = chunk(b"IDAT", zlib.compress(b"\0" * 64))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + data_chunk + chunk(b"IEND", b"")


# ------------------------------------------------------------------------------------------------- bad files


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "BMP", "TIFF"])
def test_truncated_file_is_reported_as_truncated(tmp_path, fmt):
    path = tmp_path / f"cut.{fmt.lower()}"
    payload = encode(noisy_rgb(0), fmt)
    path.write_bytes(payload[: len(payload) // 2])
    with pytest.raises(ImageDecodeError) as error:
        open_image(path)
    assert error.value.reason == "truncated" and error.value.path == str(path)
    assert isinstance(error.value, ValueError) and str(path) in str(error.value)


def test_corrupt_zero_byte_and_missing_files(tmp_path):
    corrupt, empty = tmp_path / "corrupt.jpg", tmp_path / "empty.png"
    corrupt.write_bytes(b"this is not an image" * 10)
    empty.write_bytes(b"")
    cases = {corrupt: "corrupt", empty: "empty file", tmp_path / "missing.jpg": "missing file"}
    for path, reason in cases.items():
        with pytest.raises(ImageDecodeError) as error:
            open_image(path)
        assert (error.value.reason, error.value.path) == (reason, str(path))
    broken = bytearray(encode(noisy_rgb(1), "PNG"))
    broken[60:200] = bytes(140)  # valid signature and header, garbage pixel data
    with pytest.raises(ImageDecodeError) as error:
        open_image(bytes(broken))
    assert error.value.reason in ("corrupt", "truncated")


def test_decompression_bomb_limits(monkeypatch):
    # Past PIL's own hard limit (2x its threshold): PIL raises before anything is decoded.
    with pytest.raises(ImageDecodeError, match="too large"):
        open_image(png_header_only(20_000, 20_000))
    # Past our limit but under PIL's hard one: our explicit check fires, still before decoding.
    with pytest.raises(ImageDecodeError, match="too large") as error:
        open_image(png_header_only(10_000, 10_000))
    assert "10000x10000" in str(error.value)
    # The module constant, not PIL's global, sets the limit.
    monkeypatch.setattr(images, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(ImageDecodeError, match="too large"):
        open_image(encode(Image.new("RGB", (20, 20)), "PNG"))
    assert open_image(encode(Image.new("RGB", (10, 10)), "PNG")).size == (10, 10)


# ------------------------------------------------------------------------------------------------- modes


def pixels(image: Image.Image) -> np.ndarray:
    assert image.mode == "RGB"
    return np.asarray(image).astype(int)


def test_cmyk_palette_and_grayscale_convert_to_rgb():
    cmyk = Image.new("CMYK", (4, 4), (0, 255, 255, 0))  # pure red
    assert (pixels(open_image(encode(cmyk, "TIFF")))[0, 0] == [255, 0, 0]).all()
    assert np.abs(pixels(open_image(encode(cmyk, "JPEG", quality=100)))[0, 0] - [255, 0, 0]).max() < 8

    palette = Image.new("P", (2, 1))
    palette.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    palette.putpixel((1, 0), 1)
    assert pixels(open_image(encode(palette, "PNG"))).tolist() == [[[10, 20, 30], [200, 100, 50]]]
    transparent = encode(palette, "PNG", transparency=0)  # index 0 is transparent: white
    assert pixels(open_image(transparent)).tolist() == [[[255, 255, 255], [200, 100, 50]]]

    gray = Image.fromarray(np.array([[0, 77, 255]], dtype=np.uint8), "L")
    assert pixels(open_image(encode(gray, "PNG"))).tolist() == [[[0] * 3, [77] * 3, [255] * 3]]
    assert pixels(open_image(encode(gray.convert("1"), "PNG")))[0, 2].tolist() == [255] * 3


def test_alpha_is_composited_on_white():
    rgba = Image.fromarray(np.array([[[255, 0, 0, 0], [255, 0, 0, 255], [0, 0, 255, 128]]], dtype=np.uint8), "RGBA")
    result = pixels(open_image(encode(rgba, "PNG")))[0]
    assert result[0].tolist() == [255, 255, 255] and result[1].tolist() == [255, 0, 0]
    assert np.abs(result[2] - [127, 127, 255]).max() <= 1
    la = Image.fromarray(np.array([[[0, 0], [0, 255]]], dtype=np.uint8), "LA")
    assert pixels(open_image(encode(la, "PNG")))[0].tolist() == [[255] * 3, [0] * 3]


def test_high_bit_depth_is_scaled_not_clipped():
    sixteen = Image.fromarray(np.array([[0, 32896, 65535]], dtype=np.uint16))
    assert pixels(open_image(encode(sixteen, "PNG")))[0, :, 0].tolist() == [0, 128, 255]
    int32 = Image.fromarray(np.array([[0, 257 * 100, 65535]], dtype=np.int32), "I")
    assert pixels(open_image(encode(int32, "TIFF")))[0, :, 0].tolist() == [0, 100, 255]
    floating = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32), "F")
    assert pixels(open_image(encode(floating, "TIFF")))[0, :, 0].tolist() == [0, 128, 255]


def test_exif_orientation_is_applied():
    photo = Image.new("RGB", (64, 32), (255, 0, 0))
    photo.paste((0, 0, 255), (32, 0, 64, 32))  # left red, right blue
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: display rotated 90 degrees clockwise
    result = open_image(encode(photo, "JPEG", quality=95, exif=exif.tobytes()))
    assert result.size == (32, 64)
    top, bottom = pixels(result)[8, 16], pixels(result)[56, 16]
    assert top[0] > 200 and top[2] < 60 and bottom[2] > 200 and bottom[0] < 60


def test_sources_path_bytes_and_datasets_dict(tmp_path):
    payload = encode(noisy_rgb(2), "PNG")
    (tmp_path / "a.png").write_bytes(payload)
    expected = np.asarray(noisy_rgb(2))
    for source in (
        tmp_path / "a.png",
        str(tmp_path / "a.png"),
        payload,
        {"path": "x.png", "bytes": payload},
        {"path": str(tmp_path / "a.png"), "bytes": None},
    ):
        assert (np.asarray(open_image(source)) == expected).all()
    assert read_image_bytes({"path": "x.png", "bytes": payload}) == ("x.png", payload)
    with pytest.raises(ImageDecodeError, match="neither path nor bytes"):
        open_image({"path": None, "bytes": None})


# ------------------------------------------------------------------------------------------------- stats


def test_decode_error_survives_pickling():
    error = pickle.loads(pickle.dumps(ImageDecodeError("a.jpg", "truncated", "12 bytes not processed")))
    assert (error.path, error.reason, error.detail) == ("a.jpg", "truncated", "12 bytes not processed")
    assert str(error) == "a.jpg: truncated (12 bytes not processed)"


def test_decode_stats_merge_roundtrip_and_summary():
    first, second = DecodeStats(decoded=5), DecodeStats(decoded=2)
    first.record(ImageDecodeError("a.jpg", "truncated"))
    second.record(ImageDecodeError("b.png", "corrupt"))
    second.record(ImageDecodeError("c.png", "truncated"))
    first += DecodeStats.from_dict(json.loads(json.dumps(second.to_dict())))
    assert first.decoded == 7 and first.num_skipped == 3
    assert first.skipped == {"truncated": ["a.jpg", "c.png"], "corrupt": ["b.png"]}
    summary = first.summary()
    assert "skipped 3" in summary and "a.jpg, c.png" in summary and "b.png" in summary
    assert "and 1 more" in first.summary(max_names=1)


# ------------------------------------------------------------------------------------------------- collators


@pytest.fixture
def image_rows(tmp_path):
    """Two good rows (one as a path, one as bytes) and three bad ones."""
    good = tmp_path / "good.png"
    good.write_bytes(encode(noisy_rgb(3, (80, 60)), "PNG"))
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "bad.jpg").write_bytes(encode(noisy_rgb(4), "JPEG")[:300])
    return [
        {"image": {"path": str(good), "bytes": None}, "caption": "a leaf with rust", "label": 0},
        {"image": {"path": str(tmp_path / "missing.png"), "bytes": None}, "caption": "x", "label": 1},
        {"image": {"path": str(tmp_path / "empty.jpg"), "bytes": None}, "caption": "x", "label": 1},
        {"image": {"path": None, "bytes": encode(noisy_rgb(5), "JPEG")}, "caption": "a fish", "label": 2},
        {"image": {"path": str(tmp_path / "bad.jpg"), "bytes": None}, "caption": "x", "label": 1},
    ]


def test_image_text_collator_skips_and_reports_with_the_batch(image_rows, tiny_processor):
    stats = DecodeStats()
    batch = ImageTextCollator(tiny_processor, stats)(image_rows)
    assert batch["pixel_values"].shape[0] == 2 and batch["input_ids"].shape[0] == 2
    assert batch["attention_mask"].shape == batch["input_ids"].shape
    expected = tiny_processor(text=["a leaf with rust", "a fish"], return_tensors="pt", padding=True)["input_ids"]
    assert torch.equal(batch["input_ids"], expected)
    report = batch[DECODE_REPORT]
    assert report.decoded == 2 and set(report.skipped) == {"missing file", "empty file", "truncated"}
    assert any(path.endswith("bad.jpg") for path in report.skipped["truncated"])
    assert stats.decoded == 0  # counted where the batch is consumed, not where it is collated


def test_skipped_images_are_counted_across_dataloader_workers(image_rows, tiny_processor):
    stats = DecodeStats()
    collator = ImageTextCollator(tiny_processor, stats)
    # The first batch (a missing and an empty file) has no image and comes out as None; the others hold one image
    # each, beside an unreadable one in the second.
    rows = [image_rows[1], image_rows[2], image_rows[0], image_rows[4], image_rows[3]]
    loader = DataLoader(rows, batch_size=2, collate_fn=collator, num_workers=2)
    batches = list(counted(loader))
    assert batches[0] is None and [len(batch["input_ids"]) for batch in batches[1:]] == [1, 1]
    assert DECODE_REPORT not in batches[1]
    assert stats.decoded == 2 and stats.num_skipped == 3
    assert any(path.endswith("bad.jpg") for path in stats.skipped["truncated"])


def test_an_image_folder_named_by_a_relative_path_loads(tmp_path, monkeypatch):
    """`datasets` gives absolute image paths; the folder's own path may be relative (the README demo's is)."""
    write_caption_folder(tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    dataset = load_image_text_dataset("data", split="train")
    assert len(dataset) == 32 and dataset[0]["image"]["path"] == str(tmp_path / "data" / "train" / "0.png")


def test_image_text_collator_draws_a_caption_variant_from_seed_epoch_and_index(image_rows):
    seen = []

    def processor(text, images, **kwargs):
        seen.extend(text)
        return {"n": len(images)}

    variants = ["variant one", "variant two", "variant three"]

    def draws(collator, index):
        seen.clear()
        for epoch in range(30):
            collator.epoch = epoch
            torch.manual_seed(1000 + epoch)  # the global RNG plays no part in the draw
            collator([{**image_rows[0], "caption": variants[0], "captions": variants, ROW_INDEX: index}])
        return list(seen)

    first = draws(ImageTextCollator(processor, seed=0), index=5)
    assert set(first) == set(variants)  # every variant is drawn over the epochs
    assert draws(ImageTextCollator(processor, seed=0), index=5) == first  # the same numbers give the same draws
    assert draws(ImageTextCollator(processor, seed=0), index=6) != first  # another sample
    assert draws(ImageTextCollator(processor, seed=1), index=5) != first  # another seed
    assert set(draws(ImageTextCollator(processor), index=5)) == {variants[0]}  # no seed: the fixed caption


def test_image_collator_resizes_crops_and_labels(image_rows):
    batch = ImageCollator(32)(image_rows)
    assert batch["pixel_values"].shape == (2, 3, 32, 32) and batch["pixel_values"].dtype == torch.float32
    assert 0.0 <= batch["pixel_values"].min() and batch["pixel_values"].max() <= 1.0
    assert batch["labels"].tolist() == [0, 2] and batch[DECODE_REPORT].num_skipped == 3
    unlabelled = ImageCollator(32)([{"image": image_rows[0]["image"], "label": "rust"}])
    assert set(unlabelled) == {"pixel_values", DECODE_REPORT}
    # The shorter side is resized, the centre kept: a wide image with a red centre stays red in the middle.
    wide = Image.new("RGB", (90, 30), (0, 0, 255))
    wide.paste((255, 0, 0), (30, 0, 60, 30))
    crop = ImageCollator(16)([{"image": encode(wide, "PNG")}])["pixel_values"][0]
    assert crop[0].min() > 0.9 and crop[2].max() < 0.1
    assert set(ImageCollator(16)([image_rows[1]])) == {DECODE_REPORT}


# ------------------------------------------------------------------------------------------------- labelled


def test_labelled_image_folder_is_alphabetical_and_undecoded(tmp_path, caplog):
    for name in ("rust", "blight", "healthy"):
        (tmp_path / "task" / name / "sub").mkdir(parents=True)
        for index in range(2):
            (tmp_path / "task" / name / "sub" / f"{index}.png").write_bytes(encode(noisy_rgb(index), "PNG"))
    (tmp_path / "task" / "rust" / "broken.jpg").write_bytes(b"")
    (tmp_path / "task" / "rust" / "notes.txt").write_text("not an image")
    dataset, names = load_labelled_dataset(tmp_path / "task")
    assert names == ["blight", "healthy", "rust"]
    assert dataset.features["label"].names == names and not dataset.features["image"].decode
    assert sorted(dataset["label"]) == [0, 0, 1, 1, 2, 2, 2]
    rows = list(dataset)  # a broken file does not break iteration: decoding happens in the collator
    batch = ImageCollator(16)(rows)
    assert batch["labels"].tolist() == [0, 0, 1, 1, 2, 2]
    assert batch[DECODE_REPORT].skipped["empty file"][0].endswith("broken.jpg")

    (tmp_path / "split" / "test" / "a").mkdir(parents=True)
    (tmp_path / "split" / "test" / "a" / "0.png").write_bytes(encode(noisy_rgb(0), "PNG"))
    (tmp_path / "split" / "train").mkdir()
    with pytest.raises(ValueError, match="split folders"):
        load_labelled_dataset(tmp_path / "split")
    assert load_labelled_dataset(tmp_path / "split", split="test")[1] == ["a"]
    (tmp_path / "task" / "empty_class").mkdir()
    with caplog.at_level(logging.WARNING, logger="agriclip.sources"):
        dataset, names = load_labelled_dataset(tmp_path / "task")
    assert "empty_class" in names and "empty_class" in caplog.text
    assert names.index("empty_class") not in dataset["label"]


def test_labelled_saved_dataset_with_other_column_names(tmp_path):
    features = datasets.Features({"img": datasets.Image(), "fine_label": datasets.ClassLabel(names=["cow", "fish"])})
    images = [{"bytes": encode(noisy_rgb(i), "PNG"), "path": None} for i in range(3)]
    saved = datasets.Dataset.from_dict({"img": images, "fine_label": [1, 0, 1]}, features=features)
    datasets.DatasetDict({"test": saved, "train": saved}).save_to_disk(str(tmp_path / "saved"))
    dataset, names = load_labelled_dataset(tmp_path / "saved", split="test")
    assert names == ["cow", "fish"] and dataset.column_names == ["image", "label"]
    assert dataset["label"] == [1, 0, 1] and not dataset.features["image"].decode
    assert (np.asarray(open_image(dataset[0]["image"])) == np.asarray(noisy_rgb(0))).all()
    with pytest.raises(ValueError, match="pass split="):
        load_labelled_dataset(tmp_path / "saved")
    datasets.Dataset.from_dict(
        {"img": images, "text": ["a"] * 3},
        features=datasets.Features({"img": datasets.Image(), "text": datasets.Value("string")}),
    ).save_to_disk(str(tmp_path / "nolabel"))
    with pytest.raises(ValueError, match="no ClassLabel column"):
        load_labelled_dataset(tmp_path / "nolabel")


# ------------------------------------------------------------------------------------------------- image-text


@pytest.fixture(scope="module")
def pairs():
    """Six image-caption pairs with source and label, as (png bytes, caption, source, label)."""
    return [
        (encode(noisy_rgb(10 + i, (24, 24)), "PNG"), f"caption number {i}", f"src{i % 2}", f"cls{i % 3}")
        for i in range(6)
    ]


def content(dataset) -> list[tuple]:
    """Order-free content of an image-text dataset: image pixels hash, caption, source, label."""
    rows = []
    for row in dataset:
        digest = hashlib.sha256(open_image(row["image"]).tobytes()).hexdigest()
        rows.append((digest, row["caption"], row.get("source"), row.get("label")))
    return sorted(rows)


def expected_content(pairs) -> list[tuple]:
    return sorted(
        (hashlib.sha256(open_image(png).tobytes()).hexdigest(), caption, source, label)
        for png, caption, source, label in pairs
    )


def write_image_folder(root, pairs, metadata="metadata.jsonl"):
    root.mkdir(parents=True)
    rows = []
    for index, (png, caption, source, label) in enumerate(pairs):
        (root / "imgs").mkdir(exist_ok=True)
        (root / "imgs" / f"{index}.png").write_bytes(png)
        rows.append({"file_name": f"imgs/{index}.png", "caption": caption, "source": source, "label": label})
    if metadata.endswith(".jsonl"):
        (root / metadata).write_text("".join(json.dumps(row) + "\n" for row in rows))
    else:
        lines = ["file_name,caption,source,label"] + [",".join(row.values()) for row in rows]
        (root / metadata).write_text("\n".join(lines) + "\n")


def write_shard(path, pairs):
    with tarfile.open(path, "w") as shard:
        for index, (png, caption, source, label) in enumerate(pairs):
            for name, payload in (
                (f"{index:04d}.png", png),
                (f"{index:04d}.txt", caption.encode()),
                (f"{index:04d}.json", json.dumps({"source": source, "label": label}).encode()),
            ):
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                shard.addfile(info, io.BytesIO(payload))


def test_image_folder_with_metadata_splits(tmp_path, pairs):
    write_image_folder(tmp_path / "alive" / "train", pairs[:4])
    write_image_folder(tmp_path / "alive" / "validation", pairs[4:])
    train = load_image_text_dataset(tmp_path / "alive", split="train")
    assert train.column_names == ["image", "caption", "source", "label"]
    assert not train.features["image"].decode
    assert content(train) == expected_content(pairs[:4])
    assert content(load_image_text_dataset(tmp_path / "alive", split="validation")) == expected_content(pairs[4:])
    streamed = load_image_text_dataset(tmp_path / "alive", split="train", streaming=True)
    assert isinstance(streamed, datasets.IterableDataset) and content(streamed) == expected_content(pairs[:4])
    with pytest.raises(ValueError, match="alive"):
        load_image_text_dataset(tmp_path / "alive", split="test")
    write_image_folder(tmp_path / "csvmeta", pairs, metadata="metadata.csv")
    assert content(load_image_text_dataset(tmp_path / "csvmeta")) == expected_content(pairs)


@pytest.mark.parametrize("separator", [",", "\t"])
def test_open_clip_csv(tmp_path, pairs, separator):
    (tmp_path / "images").mkdir()
    lines = [separator.join(["filepath", "title", "source", "label"])]
    for index, (png, caption, source, label) in enumerate(pairs):
        (tmp_path / "images" / f"{index}.png").write_bytes(png)
        lines.append(separator.join([f"images/{index}.png", caption, source, label]))
    (tmp_path / "pairs.csv").write_text("\n".join(lines) + "\n")
    assert content(load_image_text_dataset(tmp_path / "pairs.csv")) == expected_content(pairs)
    with pytest.raises(ValueError, match=r"pairs\.csv.*'text'"):
        load_image_text_dataset(tmp_path / "pairs.csv", caption_column="text")
    renamed = tmp_path / "renamed.csv"
    renamed.write_text((tmp_path / "pairs.csv").read_text().replace("filepath", "path").replace("title", "text", 1))
    dataset = load_image_text_dataset(renamed, image_column="path", caption_column="text", separator=separator)
    assert content(dataset) == expected_content(pairs)


def test_saved_dataset_and_hub_layout(tmp_path, pairs):
    features = datasets.Features(
        {
            "picture": datasets.Image(),
            "text": datasets.Value("string"),
            "source": datasets.Value("string"),
            "label": datasets.Value("string"),
            "extra": datasets.Value("int32"),
        }
    )
    columns = {
        "picture": [{"bytes": png, "path": None} for png, *_ in pairs],
        "text": [caption for _, caption, _, _ in pairs],
        "source": [source for *_, source, _ in pairs],
        "label": [label for *_, label in pairs],
        "extra": list(range(len(pairs))),
    }
    dataset = datasets.Dataset.from_dict(columns, features=features)
    datasets.DatasetDict({"train": dataset}).save_to_disk(str(tmp_path / "saved"))
    loaded = load_image_text_dataset(tmp_path / "saved", caption_column="text")
    assert loaded.column_names == ["image", "caption", "source", "label"]
    assert content(loaded) == expected_content(pairs)
    # Without a `caption` column, `text` is the caption column by default.
    assert content(load_image_text_dataset(tmp_path / "saved")) == expected_content(pairs)
    dataset.rename_column("text", "words").save_to_disk(str(tmp_path / "no-caption"))
    with pytest.raises(
        ValueError,
        match=r"no-caption: no caption column \(looked for 'caption' or 'text'\); columns: "
        r"\[.*'words'\]; name it with caption_column= \(--caption-column\)",
    ):
        load_image_text_dataset(tmp_path / "no-caption")
    # A Hub repository's layout (data/<split>-*.parquet), read by the same code path as a Hub id.
    (tmp_path / "hub" / "data").mkdir(parents=True)
    dataset.to_parquet(str(tmp_path / "hub" / "data" / "train-00000-of-00001.parquet"))
    hub = load_image_text_dataset(tmp_path / "hub", caption_column="text", streaming=True)
    assert isinstance(hub, datasets.IterableDataset) and content(hub) == expected_content(pairs)


def test_webdataset_shards(tmp_path, pairs):
    (tmp_path / "shards" / "train").mkdir(parents=True)
    write_shard(tmp_path / "shards" / "train" / "shard-00000.tar", pairs[:3])
    write_shard(tmp_path / "shards" / "train" / "shard-00001.tar", pairs[3:])
    files = [str(tmp_path / "shards" / "train" / f"shard-0000{i}.tar") for i in range(2)]
    for source in (files, str(tmp_path / "shards" / "train" / "*.tar"), tmp_path / "shards"):
        streamed = load_image_text_dataset(source, streaming=True)
        assert isinstance(streamed, datasets.IterableDataset)
        assert list(streamed.features) == ["image", "caption", "source", "label"]
        assert content(streamed) == expected_content(pairs)
    assert content(load_image_text_dataset(files[:1])) == expected_content(pairs[:3])
    with pytest.raises(FileNotFoundError, match="missing.tar"):
        load_image_text_dataset([files[0], str(tmp_path / "missing.tar")])


def write_text_caption_folder(root, pairs, metadata="metadata.jsonl", both=False):
    """`pairs` as an image folder whose metadata names captions `text`, as `datasets` image folders do; with `both`,
    each row also has a `caption` that differs from its `text`."""
    root.mkdir(parents=True)
    rows = []
    for index, (png, caption, *_) in enumerate(pairs):
        (root / f"{index}.png").write_bytes(png)
        rows.append({"file_name": f"{index}.png", "text": caption} | ({"caption": f"other {index}"} if both else {}))
    if metadata.endswith(".jsonl"):
        (root / metadata).write_text("".join(json.dumps(row) + "\n" for row in rows))
    else:
        (root / metadata).write_text(
            "".join(",".join(row) + "\n" for row in [rows[0].keys()] + [r.values() for r in rows])
        )


@pytest.mark.parametrize("metadata", ["metadata.jsonl", "metadata.csv"])
def test_an_image_folder_may_name_its_captions_text(tmp_path, pairs, metadata):
    """The `datasets` imagefolder convention `{"file_name", "text"}`: read without naming the column, loaded and
    streamed; with both columns, `caption` wins; an explicit column wins over both."""
    write_text_caption_folder(tmp_path / "text", pairs, metadata)
    captions = sorted(caption for _, caption, *_ in pairs)
    for streaming in (False, True):
        loaded = load_image_text_dataset(tmp_path / "text", streaming=streaming)
        assert sorted(row["caption"] for row in loaded) == captions
    write_text_caption_folder(tmp_path / "both", pairs, metadata, both=True)
    both = load_image_text_dataset(tmp_path / "both")
    assert sorted(both["caption"]) == sorted(f"other {index}" for index in range(len(pairs)))
    assert sorted(load_image_text_dataset(tmp_path / "both", caption_column="text")["caption"]) == captions


def test_a_bad_text_caption_of_a_stream_is_named_by_file_and_row_before_it_starts(tmp_path, pairs):
    """The check that names a stream's bad caption before training reads the `text` column too."""
    write_text_caption_folder(
        tmp_path / "data", [(png, "" if index == 2 else caption) for index, (png, caption, *_) in enumerate(pairs)]
    )
    metadata = tmp_path / "data" / "metadata.jsonl"
    with pytest.raises(ValueError, match=rf"^{metadata}: row 3 \(image \S*/data/2\.png\): the caption is empty"):
        load_image_text_dataset(tmp_path / "data", streaming=True)


def datasets_rows(folder, split) -> list[dict]:
    """The rows `datasets`' own imagefolder loader reads from `folder`, with load_image_text_dataset's columns."""
    loaded = datasets.load_dataset("imagefolder", data_dir=str(folder), split=split).cast_column(
        "image", datasets.Image(decode=False)
    )
    columns = [name for name in IMAGE_TEXT_COLUMNS if name in loaded.column_names]
    return sorted(
        (
            {name: row[name] for name in columns} | {"image": row["image"]["path"]}
            for row in loaded.select_columns(columns)
        ),
        key=lambda row: row["image"],
    )


def our_rows(dataset) -> list[dict]:
    return sorted(({**row, "image": row["image"]["path"]} for row in dataset), key=lambda row: row["image"])


@pytest.mark.parametrize("metadata", ["metadata.jsonl", "metadata.csv"])
def test_an_image_folder_index_reads_what_datasets_reads_without_listing_the_images(
    tmp_path, pairs, metadata, monkeypatch
):
    """Split folders at any depth and under `datasets`' other split names (`val/` is validation), shard
    subfolders, a nested metadata file and hidden folders: the same rows as `datasets.load_dataset("imagefolder")`,
    found without `datasets` resolving any file, and listing each folder a few times, not once per split pattern."""
    root = tmp_path / "alive"
    write_image_folder(root / "data" / "train" / "shard-0", pairs[:3], metadata)
    write_image_folder(root / "data" / "train" / "shard-1", pairs[3:5], metadata)
    write_image_folder(root / "data" / "val", pairs[5:], metadata)
    write_image_folder(root / "data" / "train" / ".cache", pairs[:1], metadata)  # hidden: skipped by both
    expected = {split: datasets_rows(root, split) for split in ("train", "validation")}
    assert [len(rows) for rows in expected.values()] == [5, 1]

    listed = []
    real_scandir = os.scandir
    monkeypatch.setattr(os, "scandir", lambda path=".": listed.append(os.fspath(path)) or real_scandir(path))
    monkeypatch.setattr(datasets, "load_dataset", lambda *args, **kwargs: pytest.fail("datasets resolved the folder"))
    assert split_names(root) == ["train", "validation"]
    for split, rows in expected.items():
        listed.clear()
        assert our_rows(load_image_text_dataset(root, split=split)) == rows
        # Each folder at most thrice: the sniff of the source's kind (up to the first metadata file), the walk, the
        # path check of its rows; `datasets` lists it once per split pattern.
        assert max(listed.count(folder) for folder in listed) <= 3
    flat = tmp_path / "flat"
    write_image_folder(flat, pairs, metadata)
    assert split_names(flat) == ["train"]
    with pytest.raises(ValueError, match=r"flat: no split 'validation'; splits: \['train'\]"):
        load_image_text_dataset(flat, split="validation")


def test_an_image_folder_without_file_names_is_named(tmp_path, pairs):
    write_image_folder(tmp_path / "data", pairs)
    metadata = tmp_path / "data" / "metadata.jsonl"
    metadata.write_text(json.dumps({"image": "imgs/0.png", "caption": "a leaf"}) + "\n")
    with pytest.raises(ValueError, match=rf"^{metadata}: no file_name column"):
        load_image_text_dataset(tmp_path / "data")


def test_split_names_are_found_without_loading(tmp_path, pairs, monkeypatch):
    write_image_folder(tmp_path / "splits" / "train", pairs[:4])
    write_image_folder(tmp_path / "splits" / "validation", pairs[4:])
    write_image_folder(tmp_path / "flat", pairs)
    (tmp_path / "shards" / "train").mkdir(parents=True)
    (tmp_path / "shards" / "test").mkdir()
    write_shard(tmp_path / "shards" / "train" / "0.tar", pairs[:3])
    write_shard(tmp_path / "shards" / "test" / "0.tar", pairs[3:])
    write_shard(tmp_path / "flat-shards.tar", pairs)
    (tmp_path / "pairs.csv").write_text("filepath,title\n")
    saved = datasets.Dataset.from_dict({"caption": ["a", "b"]})
    datasets.DatasetDict({"train": saved, "test": saved}).save_to_disk(str(tmp_path / "saved-dict"))
    saved.save_to_disk(str(tmp_path / "saved-one"))
    monkeypatch.setattr(datasets, "load_dataset", lambda *args, **kwargs: pytest.fail("the data was loaded"))
    assert sorted(split_names(tmp_path / "splits")) == ["train", "validation"]
    assert split_names(tmp_path / "flat") == ["train"]  # `datasets` names a folder without split folders `train`
    assert split_names(tmp_path / "shards") == ["test", "train"]
    assert sorted(split_names(tmp_path / "saved-dict")) == ["test", "train"]
    for one_split in ("pairs.csv", "flat-shards.tar", "saved-one"):
        assert split_names(tmp_path / one_split) is None, one_split


@pytest.fixture(scope="module")
def split_sources(tmp_path_factory, pairs):
    """Image folders of `pairs`: `splits` (train/ and validation/), `flat` (one split), `other` (train/ and test/),
    and an open_clip CSV."""
    root = tmp_path_factory.mktemp("split-sources")
    write_image_folder(root / "splits" / "train", pairs[:4])
    write_image_folder(root / "splits" / "validation", pairs[4:])
    write_image_folder(root / "flat", pairs)
    write_image_folder(root / "other" / "train", pairs[:4])
    write_image_folder(root / "other" / "test", pairs[4:])
    (root / "images").mkdir()
    lines = ["filepath,title"]
    for index, (png, caption, *_) in enumerate(pairs):
        (root / "images" / f"{index}.png").write_bytes(png)
        lines.append(f"images/{index}.png,{caption}")
    (root / "pairs.csv").write_text("\n".join(lines) + "\n")
    return root


def test_validation_comes_from_the_validation_split_or_a_seeded_held_out_fraction(split_sources, pairs):
    root = split_sources
    plan = plan_validation(root / "splits", "train", None, None, 0.5, seed=0)
    assert (plan.val_data, plan.val_split, plan.held_out, plan.notice) == (root / "splits", "validation", None, None)
    train, validation = plan.load()
    assert content(train) == expected_content(pairs[:4]) and content(validation) == expected_content(pairs[4:])

    for source in ("flat", "pairs.csv"):
        plan = plan_validation(root / source, "train", None, None, 0.5, seed=0)
        assert plan.held_out == 0.5
        assert plan.notice.startswith(f"validation: {root / source} has no split 'validation' (")
        assert (
            "50% of the training pairs, drawn with seed 0, are held out for validation and not trained on"
            in plan.notice
        )
        train, validation = plan.load()
        assert len(train) == len(validation) == 3
        captions = sorted([*train["caption"], *validation["caption"]])
        assert captions == sorted(caption for _, caption, *_ in pairs)  # disjoint, and nothing lost
        again = plan_validation(root / source, "train", None, None, 0.5, seed=0).load()[1]
        assert list(again["caption"]) == list(
            validation["caption"]
        )  # the same pairs at every call (and on every process)
    other_seeds = {
        tuple(sorted(plan_validation(root / "flat", "train", None, None, 0.5, seed=seed).load()[1]["caption"]))
        for seed in range(1, 6)
    }
    assert len(other_seeds) > 1  # drawn from the seed

    # --val-data of one split is validated on whole; of several splits, it needs --val-split.
    plan = plan_validation(root / "splits", "train", root / "flat", None, 0.5, seed=0)
    assert (plan.val_split, plan.held_out) == ("train", None) and len(plan.load()[1]) == len(pairs)
    assert plan_validation(root / "splits", "train", root / "other", "test", 0.5, seed=0).load()[1].num_rows == 2


@pytest.mark.parametrize(
    ("train", "train_split", "val_data", "val_split", "message"),
    [
        (
            "flat",
            "train",
            None,
            "validation",
            r"flat: no split 'validation' for validation; splits: \['train'\]; pass --val-split with one of them, or leave "
            r"it out to hold out --val-fraction of the training pairs$",
        ),
        (
            "splits",
            "training",
            None,
            None,
            r"splits: no split 'training' to train on; splits: \['train', 'validation'\]; pass --train-split",
        ),
        ("splits", "train", "other", None, r"other: no split 'validation' for validation; splits: \['test', 'train'\]"),
        (
            "splits",
            "train",
            "other",
            "dev",
            r"other: no split 'dev' for validation; splits: \['test', 'train'\]; pass "
            r"--val-split with one of them$",
        ),
        (
            "pairs.csv",
            "train",
            None,
            "validation",
            r"pairs\.csv is one split .*--val-split 'validation' would reuse the training pairs; give --val-data",
        ),
    ],
)
def test_a_missing_split_is_an_error_naming_the_splits_there_are(
    split_sources, train, train_split, val_data, val_split, message, monkeypatch
):
    monkeypatch.setattr(datasets, "load_dataset", lambda *args, **kwargs: pytest.fail("the data was loaded"))
    with pytest.raises(ValueError, match=message):
        plan_validation(split_sources / train, train_split, val_data and split_sources / val_data, val_split, 0.05, 0)


def test_bad_sources_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_image_text_dataset(tmp_path / "nowhere")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="notes.txt"):
        load_image_text_dataset(tmp_path / "notes.txt")
    with pytest.raises(FileNotFoundError, match="no WebDataset"):
        load_image_text_dataset(str(tmp_path / "*.tar"))


# ---------------------------------------------------------------------------------------------------------------
# Bad captions, unreadable metadata, image paths outside the data folder
# ---------------------------------------------------------------------------------------------------------------


BAD_CAPTIONS = [
    (None, "the caption is null or missing"),
    ("", "the caption is empty"),
    ("  ", "the caption is empty"),
    (7, "the caption is 7 (int), not text"),
]


def caption_rows(bad_caption, bad_index=3, count=5):
    """Image-folder metadata rows `{file_name, caption}` with one bad caption, at row `bad_index` (0-based)."""
    return [
        {"file_name": f"imgs/{index}.png", "caption": bad_caption if index == bad_index else f"leaf {index}"}
        for index in range(count)
    ]


def write_metadata_folder(root, rows, pairs, metadata="metadata.jsonl"):
    """An image folder of `pairs`' images with `rows` as its metadata file (JSON lines or CSV)."""
    write_image_folder(root, pairs[: len(rows)], metadata=metadata)
    if metadata.endswith(".jsonl"):
        (root / metadata).write_text("".join(json.dumps(row) + "\n" for row in rows))
    else:
        cells = [(row["file_name"], "" if row["caption"] is None else str(row["caption"])) for row in rows]
        (root / metadata).write_text("file_name,caption\n" + "".join(f"{name},{caption}\n" for name, caption in cells))


@pytest.mark.parametrize(("caption", "problem"), BAD_CAPTIONS)
def test_a_bad_caption_in_an_image_folder_names_the_file_row_and_image(tmp_path, pairs, caption, problem, monkeypatch):
    write_metadata_folder(tmp_path / "data", caption_rows(caption), pairs)
    # The check scans the caption column: it decodes no image.
    monkeypatch.setattr(Image, "open", lambda *args, **kwargs: pytest.fail("an image was decoded"))
    metadata = tmp_path / "data" / "metadata.jsonl"
    # JSON lines: row 4 is the fourth line, the row of imgs/3.png.
    expected = rf"^{metadata}: row 4 \(image \S*imgs/3\.png\): {re.escape(problem)}; every image needs a non-empty"
    with pytest.raises(ValueError, match=expected):
        load_image_text_dataset(tmp_path / "data")


@pytest.mark.parametrize(("caption", "problem"), [(None, "null or missing"), ("   ", "empty")])
def test_a_bad_caption_in_a_metadata_csv_names_the_file_row_and_image(tmp_path, pairs, caption, problem):
    write_metadata_folder(tmp_path / "data", caption_rows(caption, bad_index=1), pairs, metadata="metadata.csv")
    # CSV: the header is row 1, so imgs/1.png is row 3.
    with pytest.raises(ValueError, match=rf"metadata\.csv: row 3 \(image \S*imgs/1\.png\): the caption is {problem}"):
        load_image_text_dataset(tmp_path / "data")


def test_a_bad_caption_in_an_open_clip_csv_or_a_saved_dataset_is_named(tmp_path, pairs):
    (tmp_path / "images").mkdir()
    for index, (png, *_) in enumerate(pairs):
        (tmp_path / "images" / f"{index}.png").write_bytes(png)
    (tmp_path / "pairs.csv").write_text("filepath,title\nimages/0.png,a leaf\nimages/1.png,a fish\nimages/2.png,\n")
    expected = rf"pairs\.csv: row 4 \(image {tmp_path / 'images' / '2.png'}\): the caption is empty"
    with pytest.raises(ValueError, match=expected):
        load_image_text_dataset(tmp_path / "pairs.csv")

    captions = [f"caption {index}" for index in range(len(pairs))]
    variants = [[caption, "another"] for caption in captions]
    variants[4][1] = None  # a null caption variant: the collator may draw it
    features = datasets.Features(
        {
            "image": datasets.Image(),
            "caption": datasets.Value("string"),
            "captions": datasets.List(datasets.Value("string")),
        }
    )
    rows = {
        "image": [{"bytes": png, "path": f"{index}.png"} for index, (png, *_) in enumerate(pairs)],
        "caption": captions,
        "captions": variants,
    }
    datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(tmp_path / "saved"))
    with pytest.raises(ValueError, match=r"saved: dataset\[4\] \(image 4\.png\): caption variant 2 is null or missing"):
        load_image_text_dataset(tmp_path / "saved")


def test_a_bad_caption_in_a_stream_is_named_when_its_row_streams_past(tmp_path, pairs):
    # An empty .txt caption at sample 2, as a shard writer leaves for a missing one.
    write_shard(
        tmp_path / "shard.tar",
        [
            (png, "" if index == 2 else caption, source, label)
            for index, (png, caption, source, label) in enumerate(pairs)
        ],
    )
    streamed = load_image_text_dataset(str(tmp_path / "shard.tar"), streaming=True)
    rows = iter(streamed)
    assert [next(rows)["caption"] for _ in range(2)] == [pairs[0][1], pairs[1][1]]
    with pytest.raises(ValueError, match=r"shard\.tar: streamed row 2 \(image .*\): the caption is empty; "):
        next(rows)


@pytest.mark.parametrize(
    ("metadata", "payload", "message"),
    [
        ("metadata.jsonl", lambda data: data[: len(data) - 12], r"row 6 is not valid JSON .*truncated"),
        # A caption in cp1252 quotes, a caption in Latin-1: bytes that are not UTF-8.
        ("metadata.jsonl", lambda data: data.replace(b"leaf 2", b"leaf \x93two\x94"), r"row 3 is not UTF-8 text"),
        ("metadata.csv", lambda data: data.replace(b"leaf 2", "abîmée".encode("latin-1")), r"row 4 is not UTF-8"),
    ],
)
def test_truncated_or_non_utf8_metadata_names_the_file_and_row(tmp_path, pairs, metadata, payload, message):
    write_metadata_folder(tmp_path / "data", caption_rows("fine", count=6), pairs, metadata=metadata)
    path = tmp_path / "data" / metadata
    path.write_bytes(payload(path.read_bytes()))
    with pytest.raises(ValueError, match=rf"^{path}: {message}"):
        load_image_text_dataset(tmp_path / "data")


@pytest.fixture
def outside(tmp_path):
    """A file outside the data folder, and the data folder: one image, and a symlink to that outside file."""
    secret = tmp_path / "secret.png"
    secret.write_bytes(encode(noisy_rgb(1), "PNG"))
    data = tmp_path / "data"
    (data / "imgs").mkdir(parents=True)
    (data / "imgs" / "0.png").write_bytes(encode(noisy_rgb(2), "PNG"))
    (data / "imgs" / "link.png").symlink_to(secret)
    (data / "imgs" / "inside.png").symlink_to(data / "imgs" / "0.png")  # a symlink that stays inside is fine
    return data


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("/etc/shadow", r"the image path '/etc/shadow' is absolute or a URL"),
        ("../secret.png", r"the image path '../secret.png' leads outside .*data \(through '\.\.' or a symlink"),
        ("imgs/../../secret.png", r"the image path 'imgs/\.\./\.\./secret\.png' leads outside"),
        ("imgs/link.png", r"the image path 'imgs/link.png' leads outside .*to \S*secret\.png"),
    ],
)
def test_an_open_clip_csv_refuses_image_paths_outside_its_folder(outside, name, message):
    csv_file = outside / "pairs.csv"
    csv_file.write_text(f"filepath,title\nimgs/0.png,a leaf\nimgs/inside.png,the same leaf\n{name},a secret\n")
    with pytest.raises(ValueError, match=rf"^{csv_file}: row 4: {message}"):
        load_image_text_dataset(csv_file)
    csv_file.write_text("filepath,title\nimgs/0.png,a leaf\nimgs/sub/../inside.png,the same leaf\n")
    assert [row["image"]["path"] for row in load_image_text_dataset(csv_file)] == [
        str(outside / "imgs" / "0.png"),
        str(outside / "imgs" / "sub/../inside.png"),
    ]


def test_an_image_folder_refuses_the_same_paths_named_by_row(outside):
    metadata = outside / "metadata.jsonl"
    for name, message in (
        ("../secret.png", "leads outside"),
        ("/etc/shadow", "is absolute"),
        ("imgs/link.png", r"leads outside .*secret\.png"),
    ):
        rows = [{"file_name": "imgs/0.png", "caption": "a leaf"}, {"file_name": name, "caption": "a secret"}]
        metadata.write_text("".join(json.dumps(row) + "\n" for row in rows))
        # `datasets` refuses the first two itself, without naming the file; the symlink it accepts.
        with pytest.raises(ValueError, match=rf"^{metadata}: row 2: the image path '{name}' {message}"):
            load_image_text_dataset(outside)
        with pytest.raises(ValueError, match=rf"^{metadata}: row 2: the image path '{name}' {message}"):
            load_image_text_dataset(outside, streaming=True)


def _image_paths(dataset) -> list[str]:
    return [
        str(Path(row["path"]).resolve()) for row in dataset.cast_column("image", datasets.Image(decode=False))["image"]
    ]


def test_image_loader_reads_the_images_of_captioned_sources_and_of_metadata_without_captions(tmp_path):
    captioned = write_caption_folder(tmp_path / "captioned", n_train=6, n_validation=3)
    pairs = load_image_text_dataset(captioned, split="validation")
    images = load_image_dataset(captioned, split="validation")
    assert images.column_names == ["image"] and _image_paths(images) == _image_paths(pairs)
    for metadata in captioned.glob("*/metadata.jsonl"):
        rows = [json.loads(line) for line in metadata.read_text().splitlines()]
        metadata.write_text("".join(json.dumps({"file_name": row["file_name"], "label": 1}) + "\n" for row in rows))
    with pytest.raises(ValueError, match="no caption column"):
        load_image_text_dataset(captioned, split="validation")
    uncaptioned = load_image_dataset(captioned, split="validation")
    assert uncaptioned.column_names == ["image", "label"] and uncaptioned["label"] == [1, 1, 1]
    assert _image_paths(uncaptioned) == _image_paths(pairs)
    csv_file = tmp_path / "captioned" / "train" / "images.csv"
    csv_file.write_text("filepath\n0.png\n1.png\n")
    assert _image_paths(load_image_dataset(csv_file)) == [str((csv_file.parent / f"{i}.png").resolve()) for i in (0, 1)]


def test_image_loader_reads_folders_of_image_files_by_split(tmp_path):
    flat = tmp_path / "flat"
    write_labelled_folder(flat, per_class=2)
    expected = sorted(str(path.resolve()) for path in flat.rglob("*.png"))
    assert len(expected) > 2
    for split in ("train", "test"):  # one split whole: any split name reads it
        assert _image_paths(load_image_dataset(flat, split=split)) == expected
    split_layout = tmp_path / "splits"
    write_labelled_folder(split_layout / "train", per_class=2)
    write_labelled_folder(split_layout / "validation", per_class=1, seed=1)
    validation = sorted(str(path.resolve()) for path in (split_layout / "validation").rglob("*.png"))
    assert _image_paths(load_image_dataset(split_layout, split="validation")) == validation
    with pytest.raises(ValueError, match=r"no split 'test'; splits: \['train', 'validation'\]"):
        load_image_dataset(split_layout, split="test")
    (tmp_path / "empty" / "train").mkdir(parents=True)
    with pytest.raises(ValueError, match="no image files"):
        load_image_dataset(tmp_path / "empty")
