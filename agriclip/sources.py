"""Reading the data sources that training and evaluation name: image-caption pairs and labelled images, from image
folders (with `metadata.jsonl`/`metadata.csv`, or one subfolder per class), open_clip-style CSVs, `datasets`
datasets saved to disk or on the Hub, and WebDataset shards.

Everything comes back as a `datasets.Dataset` whose images stay UNDECODED (`datasets.Image(decode=False)`, rows hold
`{"path", "bytes"}`): the collators of `training.data` and the evaluation suite decode them with
`agriclip.images.open_image`, so that one corrupt, truncated or missing file is skipped and counted instead of
crashing an epoch, and the count names the files.

Unlike the rest of the light core, this module imports `datasets` and pyarrow (never torch); the inference commands
never import it.
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
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
import pyarrow.json as pa_json
from datasets.data_files import NON_WORDS_CHARS, SPLIT_KEYWORDS, get_data_patterns

from agriclip.files import ContainedPaths, check_hub_id


logger = logging.getLogger(__name__)

# File suffixes treated as images in class-per-folder datasets: torchvision's ImageFolder list.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

# Folder names that `datasets` reads as splits; a labelled image folder whose subfolders are all split names is a
# split layout, not a class layout.
SPLIT_NAMES = ("train", "validation", "test")

METADATA_FILES = ("metadata.jsonl", "metadata.csv")


# The caption column of an image folder, a saved or Hub dataset when none is named: the first of these it has
# (`text` is the `datasets` imagefolder convention for captions).
DEFAULT_CAPTION_COLUMNS = ("caption", "text")

# Columns `load_image_text_dataset` keeps; `captions` holds an image's caption variants where the builder wrote them.
IMAGE_TEXT_COLUMNS = ("image", "caption", "captions", "source", "label")

# Columns `load_image_dataset` keeps (`label` feeds stage 2's k-NN monitor where a source has integer labels).
IMAGE_COLUMNS = ("image", "source", "label")

# Fields of a WebDataset sample's `.json` that become columns.
WEBDATASET_JSON_FIELDS = ("captions", "source", "label")


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
            str(path) for path in (root / name).rglob("*") if path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file()
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


def _load_open_clip_csv(
    path: Path, image_column: str, caption_column: str | None, separator: str | None
) -> datasets.Dataset:
    """An open_clip-style CSV: one row per image (and caption, unless `caption_column` is None), image paths relative
    to the CSV file and inside its folder."""
    rows = read_csv_rows(path, [image_column] + ([caption_column] if caption_column else []), separator)
    extra = [name for name in ("source", "label") if rows and name in rows[0]]
    image_path = ContainedPaths(path.parent)
    columns = {"image": [image_path(row[image_column], f"{path}: row {index + 2}") for index, row in enumerate(rows)]}
    features = {"image": datasets.Image(decode=False)}
    if caption_column:
        columns["caption"] = [row[caption_column] for row in rows]
        features["caption"] = datasets.Value("string")
    columns.update({name: [row[name] for row in rows] for name in extra})
    features |= {name: datasets.Value("string") for name in extra}
    return datasets.Dataset.from_dict(columns, features=datasets.Features(features))


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
        problem = caption_column and _row_caption_problem(
            {"caption": row[caption_column], "captions": row.get("captions")}
        )
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
        return datasets.Dataset(
            datasets.table.InMemoryTable(rows), info=datasets.DatasetInfo(features=features), fingerprint=listing
        )

    def locate(self, index: int) -> str:
        """ "<metadata file>: row N" of row `index` of the split last loaded (the file is read again: on error only)."""
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
        raise ValueError(
            f"{path}: no file_name column; each row names its image by file_name (relative to "
            f"{path.parent}); columns: {sorted(table.column_names)}"
        )
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


@dataclass
class _OpenedSource:
    """A source opened by `_open_source`: its rows, where errors point (`where`, the image folder's index) and the
    columns named for it so far."""

    dataset: datasets.Dataset | datasets.IterableDataset
    kind: str
    where: object
    image_folder: ImageFolderIndex | None
    image_column: str | None
    caption_column: str | None


def _open_source(
    source,
    split: str,
    streaming: bool,
    image_column: str | None,
    caption_column: str | None,
    separator: str | None,
    captions: bool = True,
) -> _OpenedSource:
    """The rows of `split` of any source the loaders read, before their columns are chosen and checked."""
    kind = _source_kind(source)
    where, image_folder = source, None
    if kind == "csv":
        dataset = _load_open_clip_csv(
            Path(source), image_column or "filepath", (caption_column or "title") if captions else None, separator
        )
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
    if dataset.features is None:
        raise ValueError(f"{where}: the dataset does not declare its features, so its columns cannot be checked")
    return _OpenedSource(dataset, kind, where, image_folder, image_column, caption_column)


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
    opened = _open_source(source, split, streaming, image_column, caption_column, separator)
    dataset, kind, where, image_folder = opened.dataset, opened.kind, opened.where, opened.image_folder
    image_column, caption_column, features = opened.image_column, opened.caption_column, opened.dataset.features
    image_column = _image_column(features, image_column, where)
    if caption_column is None:
        caption_column = _default_caption_column(features)
        if caption_column is None:
            raise ValueError(
                f"{where}: no caption column (looked for {' or '.join(map(repr, DEFAULT_CAPTION_COLUMNS))}); "
                f"columns: {sorted(features)}; name it with caption_column= (--caption-column)"
            )
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


def _plain_image_folder(root: Path, split: str) -> datasets.Dataset:
    """The image files under `root/split` (or under `root` when it has no split folders: one split whole), found
    recursively, in path order."""
    splits = sorted(entry.name for entry in os.scandir(root) if entry.is_dir() and entry.name in SPLIT_NAMES)
    if splits and split not in splits:
        raise ValueError(f"{root}: no split {split!r}; splits: {splits}")
    folder = root / split if splits else root
    files = sorted(
        str(path) for path in folder.rglob("*") if path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file()
    )
    if not files:
        raise ValueError(f"{folder}: no image files ({' '.join(IMAGE_EXTENSIONS)}) and no metadata.jsonl/metadata.csv")
    return datasets.Dataset.from_dict(
        {"image": files}, features=datasets.Features({"image": datasets.Image(decode=False)})
    )


def load_image_dataset(
    source, split: str = "train", streaming: bool = False, image_column: str | None = None, separator: str | None = None
):
    """Loads images alone, for the stages that need no text (stage 2's self-supervised training).

    Reads every source `load_image_text_dataset` reads, without needing or checking captions (a CSV needs only its
    image column), and also a folder of image files without metadata: the files under its `split` subfolder
    (`train/`, `validation/`, `test/`) where it has split folders, else all of them, found recursively.

    Returns:
        A Dataset (or IterableDataset) with an undecoded `image` column, and `source` and `label` where the data has
        them.
    """
    kind = _source_kind(source)
    if kind == "hub" and Path(source).is_dir():  # a folder that is no dataset, no image folder, no shards
        dataset = _plain_image_folder(Path(source), split)
        return dataset.to_iterable_dataset() if streaming else dataset
    opened = _open_source(source, split, streaming, image_column, None, separator, captions=False)
    dataset = opened.dataset
    image_column = _image_column(dataset.features, opened.image_column, opened.where)
    dataset = dataset.cast_column(image_column, datasets.Image(decode=False))
    if image_column != "image":
        dataset = dataset.remove_columns([name for name in ("image",) if name in dataset.features])
        dataset = dataset.rename_column(image_column, "image")
    dataset = dataset.select_columns([name for name in IMAGE_COLUMNS if name in dataset.features])
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
        return sorted(
            entry.name for entry in os.scandir(source) if entry.is_dir() and _matches(Path(entry.path), "*.tar")
        )
    if kind == "disk":
        index = Path(source) / "dataset_dict.json"
        return list(json.loads(index.read_text())["splits"]) if index.is_file() else None
    if kind == "imagefolder":
        return ImageFolderIndex(source).split_names
    if Path(source).is_dir():
        # The splits `datasets.load_dataset` resolves the folder's files to (split subfolders or file-name keywords).
        return [str(name) for name in get_data_patterns(str(source))]
    return list(datasets.get_dataset_split_names(str(source)))
