"""Dataset loaders and batch collators shared by the training stages and the evaluation suite.

Images travel through `datasets` UNDECODED (`datasets.Image(decode=False)`, rows hold `{"path", "bytes"}`) and are
decoded in the collators with `open_image`, so that one corrupt, truncated or missing file is skipped and counted
instead of crashing an epoch, and the count names the files.
"""

from __future__ import annotations

import csv
import glob
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import datasets
import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import DataLoader

from modeling_agriclip.images import DecodeStats, decode_rows


logger = logging.getLogger(__name__)

# File suffixes treated as images in class-per-folder datasets: torchvision's ImageFolder list.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

# Folder names that `datasets` reads as splits; a labelled image folder whose subfolders are all split names is a
# split layout, not a class layout.
SPLIT_NAMES = ("train", "validation", "test")

METADATA_FILES = ("metadata.jsonl", "metadata.csv")

# Columns `load_image_text_dataset` keeps; `captions` holds an image's caption variants where the builder wrote them.
IMAGE_TEXT_COLUMNS = ("image", "caption", "captions", "source", "label")

# Fields of a WebDataset sample's `.json` that become columns.
WEBDATASET_JSON_FIELDS = ("captions", "source", "label")

# Key of the batch entry that carries the `DecodeStats` of the batch's rows (see `DecodingCollator`).
DECODE_REPORT = "decode_report"


class DecodingCollator:
    """Base of the collators: decodes the rows' images, skipping those that cannot be read, and collates the rest.

    Each batch carries the `DecodeStats` of its own rows under `DECODE_REPORT` instead of counting in `stats`
    directly: in a DataLoader worker, `stats` is the worker's copy, which never comes back. `counted(loader)`
    merges the reports into `stats` in the process that consumes the batches. A batch in which no image could be
    read holds only its report and comes out of `counted` as None.
    """

    def __init__(self, stats: DecodeStats | None = None):
        self.stats = stats if stats is not None else DecodeStats()

    def collate(self, decoded: list[tuple[Mapping, Image.Image]]) -> dict:
        raise NotImplementedError

    def __call__(self, rows: Sequence[Mapping]) -> dict:
        report = DecodeStats()
        decoded = decode_rows(rows, report)
        batch = self.collate(decoded) if decoded else {}
        batch[DECODE_REPORT] = report
        return batch


def counted(loader):
    """The batches of a DataLoader over a `DecodingCollator`, with each batch's decode report merged into the
    collator's `stats`; None for a batch in which no image could be read."""
    stats = loader.collate_fn.stats
    for batch in loader:
        stats += batch.pop(DECODE_REPORT)
        yield batch or None


class ImageTextCollator(DecodingCollator):
    """Collates `{"image", "caption"}` rows into processor inputs (input_ids, attention_mask, pixel_values).

    Rows that carry `captions` (the caption variants of an image) get one variant drawn with torch's RNG, so each
    epoch sees a different variant under a fixed seed.
    """

    def __init__(self, processor, stats: DecodeStats | None = None):
        super().__init__(stats)
        self.processor = processor

    @staticmethod
    def _caption(row: Mapping) -> str:
        variants = row.get("captions")
        if variants:
            return variants[int(torch.randint(len(variants), ()))]
        return row["caption"]

    def collate(self, decoded):
        captions = [self._caption(row) for row, _ in decoded]
        images = [image for _, image in decoded]
        return self.processor(text=captions, images=images, return_tensors="pt", padding=True, truncation=True)


class LabelledImageCollator(DecodingCollator):
    """Collates `{"image", "label"}` rows into the processor's `pixel_values` and int64 `labels`."""

    def __init__(self, processor, stats: DecodeStats | None = None):
        super().__init__(stats)
        self.processor = processor

    def collate(self, decoded):
        pixel_values = self.processor(images=[image for _, image in decoded], return_tensors="pt")["pixel_values"]
        return {"pixel_values": pixel_values, "labels": torch.tensor([row["label"] for row, _ in decoded], dtype=torch.long)}


def process_shard_loader(dataset, accelerator, batch_size: int, collate_fn, num_workers: int = 0) -> DataLoader:
    """This process's contiguous share of `dataset`, with no sample padded in or repeated (unlike a prepared
    DataLoader with even batches): statistics from several processes then sum to exactly those of one."""
    shard = dataset.shard(num_shards=accelerator.num_processes, index=accelerator.process_index, contiguous=True)
    return DataLoader(shard, batch_size=batch_size, collate_fn=collate_fn, num_workers=num_workers)


def resize_center_crop(image: Image.Image, size: int) -> Image.Image:
    """Resizes the shorter side to `size` (bicubic) and crops the centre square."""
    return ImageOps.fit(image, (size, size), method=Image.Resampling.BICUBIC, centering=(0.5, 0.5))


class ImageCollator(DecodingCollator):
    """Collates image rows into a float tensor (B, 3, size, size) in [0, 1] for the DINO stage.

    Pixels are not normalised: augmentation and normalisation run batched on the device. Returns
    `{"pixel_values": ..., "labels": ...}`, with `labels` (int64) only when every row has an integer `label`
    (labelled datasets, for k-NN evaluation).
    """

    def __init__(self, size: int, stats: DecodeStats | None = None):
        super().__init__(stats)
        self.size = size

    def collate(self, decoded):
        arrays = np.stack([np.asarray(resize_center_crop(image, self.size)) for _, image in decoded])
        batch = {"pixel_values": torch.from_numpy(arrays).permute(0, 3, 1, 2).float().div_(255.0)}
        labels = [row.get("label") for row, _ in decoded]
        if all(isinstance(label, (int, np.integer)) and not isinstance(label, bool) for label in labels):
            batch["labels"] = torch.tensor(labels, dtype=torch.long)
        return batch


def _is_saved_dataset(path: Path) -> bool:
    """True for a folder written by `Dataset.save_to_disk` or `DatasetDict.save_to_disk`."""
    return (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()


def _select_split(dataset, split: str | None, where):
    """Picks `split` from a DatasetDict; a single Dataset is its own split."""
    if not isinstance(dataset, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        return dataset
    if split is None:
        if len(dataset) == 1:
            return next(iter(dataset.values()))
        raise ValueError(f"{where} has splits {sorted(dataset)}; pass split=")
    if split not in dataset:
        raise ValueError(f"{where} has no split {split!r}; splits: {sorted(dataset)}")
    return dataset[split]


def _labelled_image_folder(root: Path) -> tuple[datasets.Dataset, list[str]]:
    """torchvision ImageFolder semantics: one subfolder per class, classes in alphabetical order, files recursive."""
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such image folder")
    classes = sorted(entry.name for entry in os.scandir(root) if entry.is_dir() and not entry.name.startswith("."))
    if not classes:
        raise ValueError(f"{root}: no class subfolders (expected one subfolder of images per class)")
    if set(classes) <= set(SPLIT_NAMES):
        raise ValueError(f"{root} holds split folders {classes}, not class folders; pass split=")
    paths, labels = [], []
    for index, name in enumerate(classes):
        files = sorted(
            str(path)
            for path in (root / name).rglob("*")
            if path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file()
        )
        if not files:
            # Kept as a class (zero-shot still scores it); evaluation reports it among the empty classes.
            logger.warning(f"{root / name}: class folder holds no image files ({' '.join(IMAGE_EXTENSIONS)})")
        paths += files
        labels += [index] * len(files)
    features = datasets.Features({"image": datasets.Image(decode=False), "label": datasets.ClassLabel(names=classes)})
    return datasets.Dataset.from_dict({"image": paths, "label": labels}, features=features), classes


def _image_column(features, preferred: str | None, where) -> str:
    if preferred is not None:
        if preferred not in features:
            raise ValueError(f"{where}: no image column {preferred!r}; columns: {sorted(features)}")
        return preferred
    if "image" in features:
        return "image"
    for name, feature in features.items():
        if isinstance(feature, datasets.Image):
            return name
    raise ValueError(f"{where}: no image column (a datasets.Image feature); columns: {sorted(features)}")


def load_labelled_dataset(source, split: str | None = None) -> tuple[datasets.Dataset, list[str]]:
    """Loads a labelled image dataset for evaluation.

    Args:
        source: an image folder with one subfolder per class (alphabetical class order, as torchvision ImageFolder),
            or a `datasets` dataset with a ClassLabel column: a folder written by `save_to_disk` or a Hub id.
        split: for an image folder, a subfolder holding the class folders (e.g. "test"); for a saved DatasetDict,
            the split (optional when there is only one).

    Returns:
        A dataset with an undecoded `image` column and an int `label` column, and the class names.
    """
    path = Path(source)
    if path.is_dir() and not _is_saved_dataset(path):
        return _labelled_image_folder(path if split is None else path / split)
    if _is_saved_dataset(path):
        dataset = _select_split(datasets.load_from_disk(str(path)), split, path)
    else:
        check_hub_id(source)
        dataset = _select_split(datasets.load_dataset(str(source), split=split), split, source)
    image_column = _image_column(dataset.features, None, path)
    label_column = "label" if isinstance(dataset.features.get("label"), datasets.ClassLabel) else None
    label_column = label_column or next(
        (name for name, feature in dataset.features.items() if isinstance(feature, datasets.ClassLabel)), None
    )
    if label_column is None:
        raise ValueError(f"{path}: no ClassLabel column; columns: {sorted(dataset.features)}")
    names = list(dataset.features[label_column].names)
    dataset = dataset.select_columns([image_column, label_column])
    dataset = dataset.rename_columns({image_column: "image", label_column: "label"})
    return dataset.cast_column("image", datasets.Image(decode=False)), names


def read_csv_rows(path: str | Path, required: Sequence[str], separator: str | None = None) -> list[dict[str, str]]:
    """Rows of a CSV/TSV file as dicts; the separator defaults to tab when the header has one, else comma."""
    with open(path, newline="", encoding="utf-8") as handle:
        header = handle.readline()
        separator = separator or ("\t" if "\t" in header else ",")
        handle.seek(0)
        reader = csv.DictReader(handle, delimiter=separator)
        missing = [name for name in required if name not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(
                f"{path}: missing column(s) {missing}; found {reader.fieldnames} with separator {separator!r}"
            )
        return list(reader)


def _load_open_clip_csv(path: Path, image_column: str, caption_column: str, separator: str | None) -> datasets.Dataset:
    """An open_clip-style CSV: one row per pair, image paths relative to the CSV file."""
    rows = read_csv_rows(path, [image_column, caption_column], separator)
    extra = [name for name in ("source", "label") if rows and name in rows[0]]
    columns = {
        "image": [str(path.parent / row[image_column]) for row in rows],
        "caption": [row[caption_column] for row in rows],
    }
    columns.update({name: [row[name] for row in rows] for name in extra})
    features = datasets.Features(
        {"image": datasets.Image(decode=False), "caption": datasets.Value("string")}
        | {name: datasets.Value("string") for name in extra}
    )
    return datasets.Dataset.from_dict(columns, features=features)


def _tar_files(source, split: str) -> list[str]:
    """Shard paths from a list, a glob, or a folder holding shards directly or in per-split subfolders."""
    if isinstance(source, (list, tuple)):
        files = [str(path) for path in source]
    elif Path(source).is_dir():
        root = Path(source) / split if (Path(source) / split).is_dir() else Path(source)
        files = sorted(str(path) for path in root.glob("*.tar"))
    else:
        files = sorted(glob.glob(str(source)))
    if not files:
        raise FileNotFoundError(f"{source}: no WebDataset .tar shards found")
    missing = [path for path in files if not os.path.isfile(path)]
    if missing:
        raise FileNotFoundError(f"WebDataset shard(s) not found: {missing}")
    return files


def _flatten_webdataset_json(row: Mapping) -> dict:
    return {name: row["json"][name] for name in WEBDATASET_JSON_FIELDS if name in row["json"]}


def check_hub_id(source) -> None:
    """A missing local path is an error here, not a Hub lookup: Hub ids are "name" or "org/name"."""
    text = str(source)
    if not Path(text).exists() and (text.startswith((".", "/", "~")) or text.count("/") > 1 or "\\" in text):
        raise FileNotFoundError(f"{text}: no such file or folder")


def _matches(folder: Path, pattern: str) -> bool:
    return next(folder.glob(pattern), None) is not None


def _source_kind(source) -> str:
    if isinstance(source, (list, tuple)):
        return "webdataset"
    text = str(source)
    path = Path(text)
    if text.endswith(".tar") or (glob.has_magic(text) and ".tar" in text):
        return "webdataset"
    if path.is_file():
        if path.suffix.lower() in (".csv", ".tsv"):
            return "csv"
        raise ValueError(f"{path}: unsupported file; expected a .csv/.tsv of image paths and captions or .tar shards")
    if path.is_dir():
        if _is_saved_dataset(path):
            return "disk"
        if any(_matches(path, pattern) for name in METADATA_FILES for pattern in (name, f"*/{name}")):
            return "imagefolder"
        if _matches(path, "*.tar") or _matches(path, "*/*.tar"):
            return "webdataset"
        return "hub"
    check_hub_id(text)
    return "hub"


def load_image_text_dataset(
    source,
    split: str = "train",
    streaming: bool = False,
    image_column: str | None = None,
    caption_column: str | None = None,
    separator: str | None = None,
):
    """Loads image-caption pairs for training.

    Args:
        source: one of
            - an image folder with `metadata.jsonl`/`metadata.csv` (`file_name` + caption), optionally in split
              subfolders (`train/`, `validation/`);
            - an open_clip-style CSV/TSV of image path and caption (paths relative to the CSV; one split);
            - a folder written by `save_to_disk`;
            - WebDataset shards: a list of .tar files, a glob, or a folder of shards (optionally in split
              subfolders), with `jpg`/`png`/... image, `txt` caption and an optional `json` of source and label;
            - a Hub dataset id (or any folder `datasets.load_dataset` reads).
        split: the split to load; CSV files and shard lists are one split each.
        streaming: return an IterableDataset (shards and Hub data are read lazily, nothing is copied to disk).
        image_column: image column; default: `filepath` for a CSV, else `image` or the first Image feature.
        caption_column: caption column; default: `title` for a CSV, `txt` for WebDataset shards, else `caption`.
        separator: CSV separator; default: tab when the header has one, else comma.

    Returns:
        A Dataset (or IterableDataset) with an undecoded `image` column, `caption`, and `captions`, `source` and
        `label` where the data has them.
    """
    kind = _source_kind(source)
    where = source
    if kind == "csv":
        dataset = _load_open_clip_csv(Path(source), image_column or "filepath", caption_column or "title", separator)
        image_column, caption_column = "image", "caption"
    elif kind == "disk":
        dataset = _select_split(datasets.load_from_disk(str(source)), split, source)
    elif kind == "webdataset":
        files = _tar_files(source, split)
        where = files[0] if len(files) == 1 else f"{files[0]} (+{len(files) - 1} shards)"
        dataset = datasets.load_dataset("webdataset", data_files={split: files}, split=split, streaming=streaming)
        metadata = dataset.features.get("json")
        if isinstance(metadata, dict):
            # Declared features survive the map, which an IterableDataset would otherwise forget.
            features = {name: f for name, f in dataset.features.items() if name != "json"}
            features |= {name: metadata[name] for name in WEBDATASET_JSON_FIELDS if name in metadata}
            dataset = dataset.map(
                _flatten_webdataset_json, remove_columns=["json"], features=datasets.Features(features)
            )
        caption_column = caption_column or "txt"
    else:
        try:
            if kind == "imagefolder":
                dataset = datasets.load_dataset("imagefolder", data_dir=str(source), split=split, streaming=streaming)
            else:
                dataset = datasets.load_dataset(str(source), split=split, streaming=streaming)
        except ValueError as error:
            if "split" in str(error).lower():
                raise ValueError(f"{source}: {error}") from error
            raise
    features = dataset.features
    if features is None:
        raise ValueError(f"{where}: the dataset does not declare its features, so its columns cannot be checked")
    image_column = _image_column(features, image_column, where)
    caption_column = caption_column or "caption"
    if caption_column not in features:
        raise ValueError(f"{where}: no caption column {caption_column!r}; columns: {sorted(features)}")
    dataset = dataset.rename_columns(
        {old: new for old, new in ((image_column, "image"), (caption_column, "caption")) if old != new}
    )
    dataset = dataset.select_columns([name for name in IMAGE_TEXT_COLUMNS if name in dataset.features])
    dataset = dataset.cast_column("image", datasets.Image(decode=False))
    if streaming and isinstance(dataset, datasets.Dataset):
        dataset = dataset.to_iterable_dataset()
    return dataset
