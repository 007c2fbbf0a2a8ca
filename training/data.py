"""Dataset loaders and batch collators shared by the training stages and the evaluation suite.

Images travel through `datasets` UNDECODED (`datasets.Image(decode=False)`, rows hold `{"path", "bytes"}`) and are
decoded in the collators with `open_image`, so that one corrupt, truncated or missing file is skipped and counted
instead of crashing an epoch, and the count names the files.
"""

from __future__ import annotations

import codecs
import csv
import glob
import hashlib
import io
import itertools
import json
import logging
import math
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
import pyarrow.json as pa_json
import torch
from datasets.data_files import NON_WORDS_CHARS, SPLIT_KEYWORDS, get_data_patterns
from PIL import Image, ImageOps
from torch.utils.data import DataLoader

from agriclip.files import ContainedPaths
from agriclip.files import check_hub_id
from agriclip.images import DecodeStats, DecodingCollator


logger = logging.getLogger(__name__)

# File suffixes treated as images in class-per-folder datasets: torchvision's ImageFolder list.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

# Folder names that `datasets` reads as splits; a labelled image folder whose subfolders are all split names is a
# split layout, not a class layout.
SPLIT_NAMES = ("train", "validation", "test")

METADATA_FILES = ("metadata.jsonl", "metadata.csv")

# The split a training stage validates on when none is named (see `plan_validation`).
DEFAULT_VAL_SPLIT = "validation"

# The caption column of an image folder, a saved or Hub dataset when none is named: the first of these it has
# (`text` is the `datasets` imagefolder convention for captions).
DEFAULT_CAPTION_COLUMNS = ("caption", "text")

# Columns `load_image_text_dataset` keeps; `captions` holds an image's caption variants where the builder wrote them.
IMAGE_TEXT_COLUMNS = ("image", "caption", "captions", "source", "label")

# Fields of a WebDataset sample's `.json` that become columns.
WEBDATASET_JSON_FIELDS = ("captions", "source", "label")

# Key under which `IndexedRows` gives each row its index in the dataset (see `ImageTextCollator`).
ROW_INDEX = "row_index"


class IndexedRows(torch.utils.data.Dataset):
    """The rows of a map-style dataset, each with its index in it under `ROW_INDEX`: what `ImageTextCollator`
    draws a row's caption variant from."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        return {**self.dataset[index], ROW_INDEX: index}

    def __getitems__(self, indices: list[int]) -> list[dict]:
        # The DataLoader fetches a whole batch in one call where the dataset can (`datasets` can, much faster).
        return [{**row, ROW_INDEX: index} for index, row in zip(indices, self.dataset.__getitems__(indices))]


def caption_variant(variants: Sequence[str], seed: int, epoch: int, index: int) -> str:
    """The variant of sample `index` in `epoch`: a function of these three numbers only, so that a resumed run, and
    each of N processes, draws what one uninterrupted process draws, whatever else used the random generators."""
    return variants[int(np.random.default_rng((seed, epoch, index)).integers(len(variants)))]


class ImageTextCollator(DecodingCollator):
    """Collates `{"image", "caption"}` rows into processor inputs (input_ids, attention_mask, pixel_values).

    Rows from `IndexedRows` give the batch their indices under `ROW_INDEX`. Rows that carry `captions` (the caption
    variants of an image): with a `seed` (training), each gets the variant
    `caption_variant(variants, seed, epoch, row index)`, so every epoch sees a different variant and the draw is
    exact under resume and across processes; the rows must then come from `IndexedRows`. Without a seed
    (validation, feature extraction), each row keeps its `caption` (the first variant), the same at every call.
    """

    def __init__(self, processor, stats: DecodeStats | None = None, seed: int | None = None):
        super().__init__(stats)
        self.processor = processor
        self.seed = seed

    def _caption(self, row: Mapping) -> str:
        variants = row.get("captions")
        if self.seed is None or not variants:
            return row["caption"]
        if ROW_INDEX not in row:
            raise ValueError(f"drawing a caption variant needs the row's index ({ROW_INDEX!r}): wrap the dataset in "
                             "training.data.IndexedRows, or build the collator without a seed for fixed captions")
        return caption_variant(variants, self.seed, self.epoch, row[ROW_INDEX])

    def collate(self, decoded):
        captions = [self._caption(row) for row, _ in decoded]
        images = [image for _, image in decoded]
        batch = self.processor(text=captions, images=images, return_tensors="pt", padding=True, truncation=True)
        if all(ROW_INDEX in row for row, _ in decoded):
            # Which rows the batch holds, unreadable ones skipped: what validation matches captions by.
            batch[ROW_INDEX] = torch.tensor([row[ROW_INDEX] for row, _ in decoded], dtype=torch.long)
        return batch


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


def _utf8_text(path: Path) -> str:
    """The text of a UTF-8 file (a leading byte-order mark dropped); a ValueError naming the file and row otherwise."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        row = data[: error.start].count(b"\n") + 1
        raise ValueError(
            f"{path}: row {row} is not UTF-8 text ({error.reason} at byte {error.start}); save the file as UTF-8"
        ) from None


def read_csv_rows(path: str | Path, required: Sequence[str], separator: str | None = None) -> list[dict[str, str]]:
    """Rows of a CSV/TSV file as dicts; the separator defaults to tab when the header has one, else comma.

    Raises:
        ValueError: naming the file, for text that is not UTF-8, a malformed row or a missing column.
    """
    handle = io.StringIO(_utf8_text(Path(path)), newline="")
    header = handle.readline()
    separator = separator or ("\t" if "\t" in header else ",")
    handle.seek(0)
    reader = csv.DictReader(handle, delimiter=separator)
    try:
        missing = [name for name in required if name not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(
                f"{path}: missing column(s) {missing}; found {reader.fieldnames} with separator {separator!r}"
            )
        return list(reader)
    except csv.Error as error:
        raise ValueError(f"{path}: row {reader.line_num} is not CSV ({error}); fix or rewrite the file") from error


def _load_open_clip_csv(path: Path, image_column: str, caption_column: str, separator: str | None) -> datasets.Dataset:
    """An open_clip-style CSV: one row per pair, image paths relative to the CSV file and inside its folder."""
    rows = read_csv_rows(path, [image_column, caption_column], separator)
    extra = [name for name in ("source", "label") if rows and name in rows[0]]
    image_path = ContainedPaths(path.parent)
    columns = {
        "image": [image_path(row[image_column], f"{path}: row {index + 2}") for index, row in enumerate(rows)],
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


def _matches(folder: Path, pattern: str) -> bool:
    return next(folder.glob(pattern), None) is not None


@contextmanager
def local_files_quietly():
    """Around a `datasets` load of local files: its progress bars hidden ("Downloading data: 2150 files" for files
    that are not downloaded, then "Generating train split"), and `datasets`' own setting restored after."""
    if datasets.are_progress_bars_disabled():
        yield
        return
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        datasets.enable_progress_bars()


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
        if next(_metadata_files(path), None) is not None:
            return "imagefolder"
        if _matches(path, "*.tar") or _matches(path, "*/*.tar"):
            return "webdataset"
        return "hub"
    check_hub_id(text)
    return "hub"


def _text_problem(value) -> str | None:
    """Why a caption cannot be trained on (None for a non-blank string)."""
    if value is None:
        return "null or missing"
    if not isinstance(value, str):
        return f"{value!r} ({type(value).__name__}), not text"
    return None if value.strip() else "empty"


def _row_caption_problem(row: Mapping) -> str | None:
    """What is wrong with a row's `caption` or its `captions` variants, or None."""
    problem = _text_problem(row.get("caption"))
    if problem is not None:
        return f"the caption is {problem}"
    variants = row.get("captions")
    if variants is None:
        return None
    if not isinstance(variants, (list, tuple)):
        return f"the caption variants are {variants!r}, not a list of text"
    for number, variant in enumerate(variants, start=1):
        problem = _text_problem(variant)
        if problem is not None:
            return f"caption variant {number} is {problem}"
    return None


def _caption_error(location: str, image, problem: str) -> ValueError:
    return ValueError(
        f"{location} (image {image}): {problem}; every image needs a non-empty text caption: fix the row or remove it"
    )


def _image_name(row: Mapping) -> str:
    image = row.get("image")
    if isinstance(image, Mapping):
        return image.get("path") or "<embedded bytes>"
    return str(image)


def _is_text(data_type: pa.DataType) -> bool:
    return pa.types.is_string(data_type) or pa.types.is_large_string(data_type)


def _holds_text(caption: pa.ChunkedArray, variants: pa.ChunkedArray | None) -> bool:
    """Whether the `caption` column holds strings and `captions` (if any) lists of strings."""
    if variants is None:
        return _is_text(caption.type)
    is_list = pa.types.is_list(variants.type) or pa.types.is_large_list(variants.type)
    return _is_text(caption.type) and is_list and _is_text(variants.type.value_type)


def _blank_or_null(strings) -> pa.ChunkedArray:
    """Per string: null, empty or only whitespace (nulls count as True)."""
    blank = pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(strings)), 0)
    return pc.fill_null(pc.or_kleene(pc.is_null(strings), blank), True)


def _first_bad_caption(dataset: datasets.Dataset) -> int | None:
    """Index of the first row that `_row_caption_problem` refuses: a scan of the Arrow columns, without reading the
    rows (or their images) in Python, except for a column that does not hold text at all."""
    table = dataset.with_format("arrow")
    columns = {name: table[name] for name in ("caption", "captions") if name in dataset.features}
    variants = columns.get("captions")
    if not _holds_text(columns["caption"], variants):
        # Not text at all: rare enough, and then wrong anyway, to look for the first bad row one by one.
        rows = dataset.select_columns(list(columns))
        return next((index for index, row in enumerate(rows) if _row_caption_problem(row)), None)
    first = pc.index(_blank_or_null(columns["caption"]), True).as_py()
    candidates = [first] if first >= 0 else []
    if variants is not None:
        offset = 0
        for chunk in variants.chunks:
            bad = pc.index(_blank_or_null(pc.list_flatten(chunk)), True).as_py()
            if bad >= 0:
                candidates.append(offset + pc.list_parent_indices(chunk)[bad].as_py())
                break
            offset += len(chunk)
    return min(candidates, default=None)


def _metadata_rows(path: Path) -> Iterator[tuple[int, Mapping]]:
    """(row number, row) of an image folder's `metadata.jsonl` (rows are lines) or `metadata.csv` (the header is row
    1, an empty cell is None); a ValueError naming the file and row for text that is not UTF-8 or a line that is not
    a JSON object."""
    text = _utf8_text(path)
    if path.suffix == ".csv":
        reader = csv.DictReader(io.StringIO(text, newline=""))
        try:
            for row in reader:
                # An empty cell is null, as the columnar read (and pandas) takes it.
                yield reader.line_num, {key: value if value != "" else None for key, value in row.items()}
        except csv.Error as error:
            raise ValueError(f"{path}: row {reader.line_num} is not CSV ({error}); fix or rewrite the file") from error
        return
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(
                f"{path}: row {number} is not valid JSON ({error.msg}), as in a truncated or corrupt file; fix the "
                "line or write the file again"
            ) from None
        if not isinstance(row, dict):
            raise ValueError(f"{path}: row {number} is {type(row).__name__}, not a JSON object with a file_name")
        yield number, row


def _default_caption_column(columns) -> str | None:
    """The caption column when none is named: `caption`, else `text` (the `datasets` imagefolder convention for
    captions), else None."""
    return next((name for name in DEFAULT_CAPTION_COLUMNS if name in columns), None)


def _check_metadata_file(path: Path) -> None:
    """Reads an image folder's metadata file row by row to name its first problem (text that is not UTF-8, a line
    that is not JSON, an image path outside the folder, a caption that is not text), once the columnar read has
    found that there is one."""
    image_path = ContainedPaths(path.parent)
    for number, row in _metadata_rows(path):
        where = f"{path}: row {number}"
        if "file_name" in row:
            image_path(row["file_name"], where)
        caption_column = _default_caption_column(row)
        problem = caption_column and _row_caption_problem({"caption": row[caption_column],
                                                          "captions": row.get("captions")})
        if problem:
            raise _caption_error(where, row.get("file_name"), problem)


# A folder names a split the way `datasets` reads split folders (`datasets.data_files.SPLIT_KEYWORDS`): a keyword
# alone or set off by non-word characters ("val", "train-2024", "leaf_test"); `val`, `dev`, ... name `validation`.
_SPLIT_FOLDER_NAMES = {
    split: re.compile(rf"^(.*[{NON_WORDS_CHARS}])?({'|'.join(keywords)})([{NON_WORDS_CHARS}].*)?$")
    for split, keywords in SPLIT_KEYWORDS.items()
}


def _split_of_folder(parts: Sequence[str]) -> str | None:
    """The split named by the outermost of `parts` (folder names) that names one, else None."""
    for part in parts:
        for split, pattern in _SPLIT_FOLDER_NAMES.items():
            if pattern.match(part):
                return str(split)
    return None


def _metadata_files(root: Path) -> Iterator[Path]:
    """The metadata files under `root`, at any depth, hidden files and folders skipped (as `datasets` skips them);
    each folder listed once, also when a symlink leads back up the tree."""
    folders, seen = [str(root)], set()
    while folders:
        folder = folders.pop()
        real = os.path.realpath(folder)
        if real in seen:
            continue
        seen.add(real)
        with os.scandir(folder) as entries:
            for entry in entries:
                if entry.name.startswith("."):
                    continue
                if entry.is_dir():
                    folders.append(entry.path)
                elif entry.name in METADATA_FILES:
                    yield Path(entry.path)


class ImageFolderIndex:
    """An image folder with metadata files, resolved once: which metadata files hold which split.

    The rows of such a folder are exactly the rows of its metadata files (`datasets`' imagefolder rule), so only the
    folders are walked and only the metadata files read, with Arrow's readers, and each row's image path is checked
    against the folder of the file that names it (`ContainedPaths`). `datasets.load_dataset("imagefolder")` instead
    lists and stats every file of the whole folder once per split pattern (about 90) on every load, whatever the
    split asked for: 8 s for 11,000 files here, growing with the folder.

    Splits follow `datasets`: metadata files in folders named after a split (`train/`, `validation/`, `val/`,
    `test/`, at any depth) belong to it; a folder with no such subfolder is one split, `train`. Hidden files and
    folders are skipped, as `datasets` skips them.
    """

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).absolute()
        by_split: dict[str | None, list[Path]] = {}
        for path in sorted(_metadata_files(self.root)):
            parts = path.parent.relative_to(self.root).parts
            by_split.setdefault(_split_of_folder(parts), []).append(path)
        unsplit = by_split.pop(None, [])
        self.files = by_split or ({"train": unsplit} if unsplit else {})

    @property
    def split_names(self) -> list[str]:
        return sorted(self.files)

    def load(self, split: str) -> datasets.Dataset:
        """The rows of `split`, in the order of its metadata files: `image` (undecoded; absolute, normalised paths)
        and every other column of the metadata (as `datasets` types them), each row's image path checked.

        Raises:
            ValueError: for a split the folder lacks, naming the splits it has; naming the metadata file and row of
                the first row that cannot be read or names an image outside the folder of its metadata file.
        """
        if split not in self.files:
            raise ValueError(f"{self.root}: no split {split!r}; splits: {self.split_names}")
        files = self.files[split]
        tables = [_image_rows(path, _read_metadata_table(path)) for path in files]
        self._row_offsets = (files, np.cumsum([0] + [len(table) for table in tables]))
        rows = pa.concat_tables(tables, promote_options="default")
        features = datasets.Features.from_arrow_schema(rows.schema)
        features["image"] = datasets.Image(decode=False)
        # Keyed by the listing of its metadata files, so that `datasets` does not hash every row for a fingerprint.
        stats = [(str(path), path.stat()) for path in files]
        listing = hashlib.sha256(repr([(name, stat.st_size, stat.st_mtime_ns) for name, stat in stats]).encode())
        listing = listing.hexdigest()[:16]
        return datasets.Dataset(datasets.table.InMemoryTable(rows), info=datasets.DatasetInfo(features=features),
                                fingerprint=listing)

    def locate(self, index: int) -> str:
        """"<metadata file>: row N" of row `index` of the split last loaded (the file is read again: on error only)."""
        files, offsets = self._row_offsets
        file = int(np.searchsorted(offsets, index, side="right")) - 1
        number, _ = next(itertools.islice(_metadata_rows(files[file]), index - offsets[file], None))
        return f"{files[file]}: row {number}"


def _read_metadata_table(path: Path) -> pa.Table:
    """A metadata file as an Arrow table (JSON lines or CSV, typed as `datasets` types them; an empty CSV cell is
    null); a ValueError naming the file and row when Arrow cannot read it."""
    data = path.read_bytes().removeprefix(codecs.BOM_UTF8)
    try:
        data.decode("utf-8")  # Arrow's JSON reader takes any bytes for text
        if path.suffix == ".csv":
            return pa_csv.read_csv(io.BytesIO(data), convert_options=pa_csv.ConvertOptions(strings_can_be_null=True))
        return pa_json.read_json(io.BytesIO(data))
    except (UnicodeDecodeError, pa.ArrowException) as error:
        # Arrow says what but not where (a line that is not JSON, a caption of another type than the lines before):
        # the row reader names the row.
        _check_metadata_file(path)
        raise ValueError(f"{path}: the image folder's metadata cannot be read: {error}") from error


def _image_rows(path: Path, table: pa.Table) -> pa.Table:
    """One metadata file's `table` with its `file_name` column checked and turned into the `image` column."""
    if "file_name" not in table.column_names:
        raise ValueError(f"{path}: no file_name column; each row names its image by file_name (relative to "
                         f"{path.parent}); columns: {sorted(table.column_names)}")
    names = table.column("file_name").to_pylist()
    rule = ContainedPaths(path.parent)
    if any(rule.problem(name) for name in names):
        _check_metadata_file(path)
    folder = str(path.parent)
    images = pa.StructArray.from_arrays(
        [pa.nulls(len(names), pa.binary()), pa.array([os.path.normpath(os.path.join(folder, name)) for name in names])],
        names=["bytes", "path"],
    )
    return table.drop_columns(["file_name"]).add_column(0, "image", images)


def _locator(kind: str, where, image_folder: ImageFolderIndex | None):
    """`index -> "file: row N"` for the messages of `_check_captions`: the CSV line (the header is row 1), the
    metadata file and row of an image folder, else the dataset index."""
    if kind == "csv":
        return lambda index: f"{where}: row {index + 2}"
    if image_folder is not None:
        return image_folder.locate
    return lambda index: f"{where}: dataset[{index}]"


def _check_captions(dataset: datasets.Dataset, locate) -> None:
    """Refuses a dataset with a caption that cannot be trained on, naming the file, row and image
    (`locate(index)` names the file and row of a dataset row): before training starts, rather than a tokenizer
    TypeError later."""
    index = _first_bad_caption(dataset)
    if index is not None:
        row = dataset[index]
        raise _caption_error(locate(index), _image_name(row), _row_caption_problem(row))


class _StreamedCaptionCheck:
    """`datasets.IterableDataset.map` function: the caption check of `_check_rows` on each row as it streams past
    (a stream has no column to scan; shards and Hub data are not read ahead), with the same message."""

    def __init__(self, where):
        self.where = where

    def __call__(self, row: Mapping, index: int) -> dict:
        problem = _row_caption_problem(row)
        if problem is not None:
            raise _caption_error(f"{self.where}: streamed row {index}", _image_name(row), problem)
        return {}


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
            - an image folder with `metadata.jsonl`/`metadata.csv` (`file_name` + `caption` or `text`), optionally in split
              subfolders (`train/`, `validation/`);
            - an open_clip-style CSV/TSV of image path and caption (paths relative to the CSV; one split);
            - a folder written by `save_to_disk`;
            - WebDataset shards: a list of .tar files, a glob, or a folder of shards (optionally in split
              subfolders), with `jpg`/`png`/... image, `txt` caption and an optional `json` of source and label;
            - a Hub dataset id (or any folder `datasets.load_dataset` reads).
        split: the split to load; CSV files and shard lists are one split each.
        streaming: return an IterableDataset (shards and Hub data are read lazily, nothing is copied to disk).
        image_column: image column; default: `filepath` for a CSV, else `image` or the first Image feature.
        caption_column: caption column; default: `title` for a CSV, `txt` for WebDataset shards, else `caption`, or
            `text` when there is no `caption` (the `datasets` imagefolder convention; with both, `caption` wins).
        separator: CSV separator; default: tab when the header has one, else comma.

    Returns:
        A Dataset (or IterableDataset) with an undecoded `image` column, `caption`, and `captions`, `source` and
        `label` where the data has them.

    Raises:
        ValueError: naming the file (metadata file, CSV or dataset) and the row, for metadata that is not UTF-8 or
            not JSON (a truncated file), for a null, empty or non-text caption (checked on the columns before this
            returns, or as each row streams past), and for an image path that is absolute or leads outside the
            folder of the file that names it, also through a symlink (`agriclip.files.ContainedPaths`).
    """
    kind = _source_kind(source)
    where, image_folder = source, None
    if kind == "csv":
        dataset = _load_open_clip_csv(Path(source), image_column or "filepath", caption_column or "title", separator)
        image_column, caption_column = "image", "caption"
    elif kind == "disk":
        dataset = _select_split(datasets.load_from_disk(str(source)), split, source)
    elif kind == "webdataset":
        files = _tar_files(source, split)
        where = files[0] if len(files) == 1 else f"{files[0]} (+{len(files) - 1} shards)"
        with local_files_quietly():
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
    elif kind == "imagefolder":
        # Read and checked whole, a stream too: it would otherwise meet a bad row only mid-training.
        image_folder = ImageFolderIndex(source)
        dataset = image_folder.load(split)
    else:
        try:
            dataset = datasets.load_dataset(str(source), split=split, streaming=streaming)
        except ValueError as error:
            if "split" in str(error).lower():
                raise ValueError(f"{source}: {error}") from error
            raise
    features = dataset.features
    if features is None:
        raise ValueError(f"{where}: the dataset does not declare its features, so its columns cannot be checked")
    image_column = _image_column(features, image_column, where)
    if caption_column is None:
        caption_column = _default_caption_column(features)
        if caption_column is None:
            raise ValueError(f"{where}: no caption column (looked for {' or '.join(map(repr, DEFAULT_CAPTION_COLUMNS))}); "
                             f"columns: {sorted(features)}; name it with caption_column= (--caption-column)")
    elif caption_column not in features:
        raise ValueError(f"{where}: no caption column {caption_column!r}; columns: {sorted(features)}")
    # Undecoded first: renaming the columns of a stream otherwise decodes every image (and fails on a bad one).
    dataset = dataset.cast_column(image_column, datasets.Image(decode=False))
    renames = {old: new for old, new in ((image_column, "image"), (caption_column, "caption")) if old != new}
    # A column named like the chosen one's new name (a `caption` beside the chosen `text`) gives way to it.
    clashing = [new for new in renames.values() if new in dataset.features]
    if clashing:
        dataset = dataset.remove_columns(clashing)
    dataset = dataset.rename_columns(renames)
    dataset = dataset.select_columns([name for name in IMAGE_TEXT_COLUMNS if name in dataset.features])
    if isinstance(dataset, datasets.Dataset):
        _check_captions(dataset, _locator(kind, where, image_folder))
    else:
        dataset = dataset.map(_StreamedCaptionCheck(where), with_indices=True, features=dataset.features)
    if streaming and isinstance(dataset, datasets.Dataset):
        dataset = dataset.to_iterable_dataset()
    return dataset


def split_names(source) -> list[str] | None:
    """The splits of an image-text source (as `load_image_text_dataset` reads it), found without loading it; None for
    a source that is one split whole, which any split name reads: a CSV file, a list or glob of shards, a folder of
    shards without split subfolders, a single saved Dataset. A Hub id asks the Hub for its split names."""
    kind = _source_kind(source)
    if kind == "csv":
        return None
    if kind == "webdataset":
        if isinstance(source, (list, tuple)) or not Path(source).is_dir() or _matches(Path(source), "*.tar"):
            return None
        return sorted(entry.name for entry in os.scandir(source) if entry.is_dir() and _matches(Path(entry.path), "*.tar"))
    if kind == "disk":
        index = Path(source) / "dataset_dict.json"
        return list(json.loads(index.read_text())["splits"]) if index.is_file() else None
    if kind == "imagefolder":
        return ImageFolderIndex(source).split_names
    if Path(source).is_dir():
        # The splits `datasets.load_dataset` resolves the folder's files to (split subfolders or file-name keywords).
        return [str(name) for name in get_data_patterns(str(source))]
    return list(datasets.get_dataset_split_names(str(source)))


@dataclass(frozen=True)
class ValidationPlan:
    """Where a training stage's pairs come from (see `plan_validation`): training on `train_split` of `train_data`;
    validation on `val_split` of `val_data`, or, when `held_out` is set, on that fraction of the training pairs,
    drawn with `seed` and removed from training. `notice` is the line that says so."""

    train_data: object
    train_split: str
    val_data: object
    val_split: str | None
    held_out: float | None = None
    seed: int = 0
    notice: str | None = None

    def load(self, image_column: str | None = None, caption_column: str | None = None):
        """The training and validation datasets (`load_image_text_dataset` with these columns)."""
        columns = {"image_column": image_column, "caption_column": caption_column}
        train = load_image_text_dataset(self.train_data, split=self.train_split, **columns)
        if self.held_out is None:
            return train, load_image_text_dataset(self.val_data, split=self.val_split, **columns)
        held_out = math.ceil(self.held_out * len(train))
        if not 0 < held_out < len(train):
            raise ValueError(f"{self.train_data}: {len(train)} training pairs are too few to hold {self.held_out:g} of "
                             "them out for validation and train on the rest; give --val-data or a validation split")
        order = np.random.default_rng(self.seed).permutation(len(train))
        # Sorted: each part keeps the data's order. In memory: the index mappings are small, and N processes must
        # not write the same cache file at once.
        return (train.select(np.sort(order[held_out:]), keep_in_memory=True),
                train.select(np.sort(order[:held_out]), keep_in_memory=True))


def plan_validation(train_data, train_split: str, val_data, val_split: str | None, val_fraction: float,
                    seed: int) -> ValidationPlan:
    """Decides where a training stage validates, from the split names alone (`split_names`: nothing is loaded, so a
    wrong split fails before any training work):

    - `val_split` (default `DEFAULT_VAL_SPLIT`) of `val_data` (default: the training data), when it has that split;
    - `val_data` of one split (a flat image folder, a CSV), when no `val_split` is named: all of it;
    - otherwise, when neither `val_data` nor `val_split` is named (the training data has no validation split): a
      fraction `val_fraction` of the training pairs, drawn with `seed` (the same pairs on every process and every
      resume) and removed from training, said in `notice`.

    Raises:
        ValueError: naming the source and the splits it has, for a training split it lacks, for a validation split
            named but missing (or named on a training source of one split, which would validate on the training
            pairs), and for `val_data` of several splits none of which is `DEFAULT_VAL_SPLIT`.
    """
    train_splits = split_names(train_data)
    if train_splits is not None and train_split not in train_splits:
        raise ValueError(f"{train_data}: no split {train_split!r} to train on; splits: {sorted(train_splits)}; "
                         "pass --train-split with one of them")
    plan = ValidationPlan(train_data, train_split, val_data or train_data, val_split or DEFAULT_VAL_SPLIT, seed=seed)
    splits = train_splits if val_data is None else split_names(val_data)
    if splits is not None and plan.val_split in splits:
        return plan
    if val_data is not None and (splits is None or (val_split is None and len(splits) == 1)):
        # All of --val-data: a source of one split is read whole under any split name.
        return replace(plan, val_split=splits[0]) if splits else plan
    if splits is None and val_split is not None:
        raise ValueError(f"{train_data} is one split (a CSV file or shards without split folders): validating on "
                         f"--val-split {val_split!r} would reuse the training pairs; give --val-data, or leave "
                         "--val-split out to hold out --val-fraction of the training pairs")
    if val_data is not None or val_split is not None:
        hold_out = "" if val_data else ", or leave it out to hold out --val-fraction of the training pairs"
        raise ValueError(f"{plan.val_data}: no split {plan.val_split!r} for validation; splits: {sorted(splits)}; "
                         f"pass --val-split with one of them{hold_out}")
    found = "it is one split" if splits is None else f"splits: {', '.join(sorted(splits))}"
    notice = (f"validation: {train_data} has no split {DEFAULT_VAL_SPLIT!r} ({found}), so {100 * val_fraction:g}% of "
              f"the training pairs, drawn with seed {seed}, are held out for validation and not trained on; "
              "--val-data, --val-split or --val-fraction choose otherwise")
    return replace(plan, val_data=None, val_split=None, held_out=val_fraction, notice=notice)
