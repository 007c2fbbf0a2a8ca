"""The ALive builder: many labelled sources plus one metadata file each, into one image-caption dataset.

Each source is a class-per-folder image folder, a `datasets` dataset with a ClassLabel column (saved to disk or on
the Hub), or a CSV of image path and label. Its metadata file (YAML or JSON, see `training.prompts.DatasetMetadata`)
turns every label into caption variants. Images are decoded once: undecodable files are skipped and named in the
report, and exact duplicates (identical pixels, across or within sources) are dropped after their first occurrence.
The result is written as any of

    imagefolder/{train,validation}/<shard>/<key>.<ext> + metadata.jsonl
    datasets/                                   DatasetDict.save_to_disk (optionally pushed to the Hub)
    webdataset/{train,validation}/shard-<n>.tar  <key>.<ext>, <key>.txt (caption), <key>.json (source, label, captions)

plus `build_report.json`. Every output holds the same image bytes and rows, and `agriclip.sources.load_image_text_dataset`
reads each of them.

Every source (its path, CSV columns and image paths, labels and metadata file) is checked before anything is written,
and the build is written into `<output_dir>/.staging`: only once it is complete does it replace the previous build's
outputs and report (moved aside to `<output_dir>/.previous`, then deleted). A failure at any point leaves the previous
build as it was; other files in `output_dir` are never touched. A CSV source's image paths must stay inside the CSV's
folder (`agriclip.files.ContainedPaths`, the rule of every loader).

    python -m training.alive --config build.yaml      # the command (training/alive.py)

Config (paths relative to the config file):

    output_dir: alive
    seed: 0
    validation_fraction: 0.05
    captions_per_image: 3             # caption variants stored per image (`caption` is the first)
    variants_per_class: 32            # size of each class's caption pool the per-image variants are drawn from
    image_format: jpeg                # jpeg | png; other images are re-encoded, matching RGB files are copied as is
    jpeg_quality: 95
    formats: [imagefolder, datasets, webdataset]
    shard_size: 1000                  # images per WebDataset shard and per image-folder subfolder
    num_workers: 1                    # decoding processes
    push_to_hub: null                 # a Hub dataset repo id for the datasets output
    paraphraser_model: null           # a local transformers causal LM folder that paraphrases the captions
    sources:
      - name: tomato-leaves
        path: data/tomato             # image folder | .csv/.tsv | save_to_disk folder (relative to this file) | Hub id
        metadata: meta/tomato.yaml
        split: null                   # split of a datasets source or split subfolder of an image folder
        image_column: filepath        # CSV columns
        label_column: label
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import multiprocessing
import random
import shutil
import tarfile
import tempfile
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import yaml
from PIL import Image
from tqdm.auto import tqdm

from agriclip.atomic import replace_entries
from agriclip.files import ContainedPaths
from agriclip.images import DecodeStats, ImageDecodeError, open_image, read_image_bytes
from agriclip.sources import load_labelled_dataset, read_csv_rows

from .prompts import CaptionGenerator, DatasetMetadata, TransformersParaphraser


FORMATS = ("imagefolder", "datasets", "webdataset")
IMAGE_FORMATS = {"jpeg": ("JPEG", "jpg"), "png": ("PNG", "png")}
EXIF_ORIENTATION = 0x0112
# Records decoded per round trip to the worker pool; bounds the memory a large source holds at once.
BLOCK_SIZE = 256
REPORT_NAME = "build_report.json"
# Beside the outputs, in `output_dir` (so on the same file system, where renames are atomic).
STAGING_NAME = ".staging"


@dataclass
class SourceConfig:
    """One labelled source and the metadata file its captions come from."""

    name: str
    path: str
    metadata: str
    split: str | None = None
    image_column: str = "filepath"
    label_column: str = "label"


@dataclass
class BuildConfig:
    """What to build and where; see the module docstring for the YAML form."""

    output_dir: str
    sources: list[SourceConfig]
    seed: int = 0
    validation_fraction: float = 0.05
    captions_per_image: int = 3
    variants_per_class: int = 32
    image_format: str = "jpeg"
    jpeg_quality: int = 95
    formats: list[str] = field(default_factory=lambda: list(FORMATS))
    shard_size: int = 1000
    num_workers: int = 1
    push_to_hub: str | None = None
    paraphraser_model: str | None = None

    def __post_init__(self):
        self.sources = [s if isinstance(s, SourceConfig) else SourceConfig(**s) for s in self.sources]
        if not self.sources:
            raise ValueError("the build config lists no sources")
        names = [source.name for source in self.sources]
        if len(set(names)) != len(names):
            raise ValueError(f"source names must be unique, got {names}")
        unknown = sorted(set(self.formats) - set(FORMATS))
        if unknown:
            raise ValueError(f"unknown output format(s) {unknown}; known: {list(FORMATS)}")
        if self.image_format not in IMAGE_FORMATS:
            raise ValueError(f"image_format must be one of {sorted(IMAGE_FORMATS)}, got {self.image_format!r}")
        if not 0 <= self.validation_fraction < 1:
            raise ValueError(f"validation_fraction must be in [0, 1), got {self.validation_fraction}")

    @classmethod
    def from_file(cls, path: str | Path) -> BuildConfig:
        """Reads a YAML/JSON config; relative paths in it are resolved against the config's folder."""
        path = Path(path)
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping")
        unknown = sorted(set(data) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(f"{path}: unknown field(s) {unknown}; known: {sorted(cls.__dataclass_fields__)}")
        root = path.parent

        def resolve(value: str) -> str:
            """Relative to the config file when it exists there; anything else (a Hub id) as written."""
            return str(root / value) if (root / value).exists() else value

        sources = []
        for index, source in enumerate(data.get("sources") or []):
            unknown = sorted(set(source) - set(SourceConfig.__dataclass_fields__))
            if unknown:
                raise ValueError(f"{path}: source {index} has unknown field(s) {unknown}")
            missing = [name for name in ("name", "path", "metadata") if name not in source]
            if missing:
                raise ValueError(f"{path}: sources[{index}] lacks the field(s) {missing}")
            value = str(source["path"])
            if not (root / value).exists() and _names_a_local_path(root, value):
                raise ValueError(
                    f"{path}: sources[{index}] ({source['name']!r}): path {value!r} does not exist ({root / value}; "
                    "paths are relative to the config file): fix the path, or give a Hub dataset id ('org/name')"
                )
            sources.append({**source, "path": resolve(value), "metadata": str(root / source["metadata"])})
        data["output_dir"] = str(root / data["output_dir"])
        if data.get("paraphraser_model"):
            data["paraphraser_model"] = resolve(data["paraphraser_model"])
        try:
            return cls(**{**data, "sources": sources})
        except (TypeError, ValueError, KeyError) as error:
            raise ValueError(f"{path}: {error}") from error


def _names_a_local_path(root: Path, value: str) -> bool:
    """Whether a source path that does not exist was meant as a local path, not a Hub id ("name" or "org/name"):
    an absolute or ./ path, more than one slash, a file suffix, or a first folder that exists beside the config."""
    first, _, rest = value.partition("/")
    return (
        value.startswith((".", "/", "~"))
        or "\\" in value
        or value.count("/") > 1
        or Path(value).suffix.lower() in (".csv", ".tsv", ".tar", ".json", ".yaml")
        or bool(rest)
        and (root / first).is_dir()
    )


@dataclass
class Item:
    """One decoded image ready to write, or the reason it was dropped."""

    name: str
    digest: str | None = None
    data: bytes | None = None
    error: ImageDecodeError | None = None


def _encode(name: str, raw: bytes, image_format: str, jpeg_quality: int) -> Item:
    """Decodes to check the image and hash its pixels; keeps the file as is when it already is plain RGB in the
    output format, else re-encodes the decoded RGB image."""
    try:
        image = open_image({"path": name, "bytes": raw})
    except ImageDecodeError as error:
        return Item(name, error=error)
    digest = hashlib.sha256(f"{image.size}".encode() + image.tobytes()).hexdigest()
    pil_format, _ = IMAGE_FORMATS[image_format]
    original = Image.open(io.BytesIO(raw))
    if original.format == pil_format and original.mode == "RGB" and original.getexif().get(EXIF_ORIENTATION, 1) == 1:
        return Item(name, digest, raw)
    buffer = io.BytesIO()
    options = {"quality": jpeg_quality} if pil_format == "JPEG" else {}
    image.save(buffer, pil_format, **options)
    return Item(name, digest, buffer.getvalue())


def _encode_job(job: tuple) -> Item:
    reference, fallback_name, image_format, jpeg_quality = job
    try:
        name, raw = read_image_bytes(reference)
    except ImageDecodeError as error:
        return Item(error.path, error=error)
    return _encode(fallback_name if name == "<bytes>" else name, raw, image_format, jpeg_quality)


def open_source(source: SourceConfig) -> tuple[list[str], int, Iterator[tuple[object, str, str]]]:
    """A source's class labels, its number of images, and a lazy iterator of (image reference, name, label).

    Everything but the images is checked here: for a CSV, every row's label and image path (inside the CSV's
    folder); for a dataset, that it loads and has a ClassLabel column.

    Raises:
        ValueError: naming the source, for a path that is neither a local source nor a loadable Hub dataset, and
            naming the file and row for a bad CSV row.
    """
    path = Path(source.path)
    if path.suffix.lower() in (".csv", ".tsv") and path.is_file():
        rows = read_csv_rows(path, [source.image_column, source.label_column])
        image_path = ContainedPaths(path.parent)
        images = [image_path(row[source.image_column], f"{path}: row {index + 2}") for index, row in enumerate(rows)]
        for index, row in enumerate(rows):
            if not (row[source.label_column] or "").strip():
                raise ValueError(f"{path}: row {index + 2} has an empty {source.label_column!r}")

        def csv_records():
            for image, row in zip(images, rows):
                yield image, image, row[source.label_column].strip()

        return sorted({row[source.label_column].strip() for row in rows}), len(rows), csv_records()
    try:
        dataset, names = load_labelled_dataset(source.path, split=source.split)
    except Exception as error:  # whatever `datasets` raises (not found, offline, ...), named with the source
        if path.exists():
            raise ValueError(f"source {source.name!r} ({source.path}): {error}") from error
        raise ValueError(
            f"source {source.name!r}: {source.path!r} is not a local file or folder, and as a Hub dataset id it does "
            f"not load: {error}"
        ) from error

    def dataset_records():
        for index, row in enumerate(dataset):
            yield row["image"], row["image"].get("path") or f"{source.name}[{index}]", names[row["label"]]

    return names, len(dataset), dataset_records()


def _blocks(records: Iterator, size: int) -> Iterator[list]:
    """Consecutive lists of `size` records: bounded memory however large the source."""
    while block := list(itertools.islice(records, size)):
        yield block


class ImageFolderWriter:
    """`<split>/<shard>/<key>.<ext>` files and one `metadata.jsonl` per split."""

    def __init__(self, root: Path, extension: str, shard_size: int):
        self.root, self.extension, self.shard_size = root, extension, shard_size
        self.rows: dict[str, list[dict]] = {}

    def write(self, split: str, key: str, data: bytes, row: dict) -> None:
        rows = self.rows.setdefault(split, [])
        file_name = f"{len(rows) // self.shard_size:05d}/{key}.{self.extension}"
        (self.root / split / file_name).parent.mkdir(parents=True, exist_ok=True)
        (self.root / split / file_name).write_bytes(data)
        rows.append({"file_name": file_name, **row})

    def close(self) -> None:
        for split, rows in self.rows.items():
            with open(self.root / split / "metadata.jsonl", "w", encoding="utf-8") as handle:
                handle.writelines(json.dumps(row) + "\n" for row in rows)


class WebDatasetWriter:
    """Tar shards of `shard_size` samples per split, written with the standard library."""

    def __init__(self, root: Path, extension: str, shard_size: int):
        self.root, self.extension, self.shard_size = root, extension, shard_size
        self.counts: Counter = Counter()
        self.shards: dict[str, tarfile.TarFile] = {}

    def _add(self, shard: tarfile.TarFile, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size, info.mode = len(data), 0o644
        shard.addfile(info, io.BytesIO(data))

    def write(self, split: str, key: str, data: bytes, row: dict) -> None:
        count = self.counts[split]
        if count % self.shard_size == 0:
            if split in self.shards:
                self.shards[split].close()
            (self.root / split).mkdir(parents=True, exist_ok=True)
            self.shards[split] = tarfile.open(self.root / split / f"shard-{count // self.shard_size:05d}.tar", "w")
        shard = self.shards[split]
        self._add(shard, f"{key}.{self.extension}", data)
        self._add(shard, f"{key}.txt", row["caption"].encode("utf-8"))
        extra = {name: row[name] for name in ("source", "label", "captions")}
        self._add(shard, f"{key}.json", json.dumps(extra).encode("utf-8"))
        self.counts[split] += 1

    def close(self) -> None:
        for shard in self.shards.values():
            shard.close()


def _dataset_rows(folder: Path) -> Iterator[dict]:
    with open(folder / "metadata.jsonl", encoding="utf-8") as handle:
        for line in handle:
            row = json.loads(line)
            file_name = row.pop("file_name")
            yield {"image": {"bytes": (folder / file_name).read_bytes(), "path": file_name}, **row}


def _save_datasets(image_folder: Path, output: Path) -> None:
    """A DatasetDict with the image bytes embedded, built from the image-folder output."""
    features = datasets.Features(
        {
            "image": datasets.Image(),
            "caption": datasets.Value("string"),
            "captions": datasets.List(datasets.Value("string")),
            "source": datasets.Value("string"),
            "label": datasets.Value("string"),
        }
    )
    with tempfile.TemporaryDirectory() as cache_dir:
        # A private cache: the global one would hand back a stale build for an unchanged folder path.
        splits = {
            split.name: datasets.Dataset.from_generator(
                _dataset_rows, gen_kwargs={"folder": split}, features=features, cache_dir=cache_dir
            )
            for split in sorted(image_folder.iterdir())
            if (split / "metadata.jsonl").is_file()
        }
        datasets.DatasetDict(splits).save_to_disk(str(output))


def _caption_pools(
    config: BuildConfig, source: SourceConfig, labels: list[str], paraphraser
) -> tuple[dict[str, list[str]], list[str]]:
    """Each label's caption pool, and the labels the metadata file does not describe."""
    try:
        metadata = DatasetMetadata.from_file(source.metadata)
    except (OSError, ValueError) as error:
        raise ValueError(f"source {source.name!r}: cannot read its metadata file {source.metadata}: {error}") from error
    generator = CaptionGenerator(metadata, paraphraser)
    pools = {}
    for label in labels:
        rng = random.Random(f"{config.seed}/{source.name}/{label}")
        try:
            pools[label] = generator.captions(label, config.variants_per_class, rng)
        except ValueError as error:
            raise ValueError(f"source {source.name!r} ({source.metadata}): {error}") from error
        empty = [caption for caption in pools[label] if not caption.strip()]
        if empty or not pools[label]:
            raise ValueError(f"source {source.name!r} ({source.metadata}): empty caption for class {label!r}")
    undescribed = [label for label in labels if label not in metadata.classes]
    return pools, undescribed


def build_alive(config: BuildConfig, progress: bool = True) -> dict:
    """Builds the dataset described by `config`; returns the report (also written to `build_report.json`).

    Every source and metadata file is checked first, the build is written into `<output_dir>/.staging`, and only a
    complete build replaces the previous one (`agriclip.atomic.replace_entries`): a failure leaves the previous build as it was.
    """
    output = Path(config.output_dir)
    paraphraser = TransformersParaphraser(config.paraphraser_model) if config.paraphraser_model else None
    opened = [(source, *open_source(source)) for source in config.sources]
    pools = {source.name: _caption_pools(config, source, labels, paraphraser) for source, labels, _, _ in opened}
    staging = output / STAGING_NAME
    shutil.rmtree(staging, ignore_errors=True)  # left behind by a build that was killed
    try:
        report = _write_build(config, opened, pools, staging, progress)
        report["outputs"] = {name: str(output / name) for name in config.formats}
        (staging / REPORT_NAME).write_text(json.dumps(report, indent=2))
        replace_entries(staging, output, (*FORMATS, REPORT_NAME))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if config.push_to_hub and "datasets" in config.formats:
        # Once the build is in place: a failed upload leaves the complete local build.
        datasets.load_from_disk(str(output / "datasets")).push_to_hub(config.push_to_hub)
    return report


def _write_build(config: BuildConfig, opened: list, pools: dict, root: Path, progress: bool) -> dict:
    """Decodes, deduplicates, captions and splits the images of the opened sources into the outputs under `root`;
    returns the report without its `outputs`."""
    _, extension = IMAGE_FORMATS[config.image_format]
    # The datasets output is built from the image-folder one, which is written in any case and dropped at the end.
    image_folder = root / "imagefolder"
    image_folder.mkdir(parents=True)
    writers = [ImageFolderWriter(image_folder, extension, config.shard_size)]
    if "webdataset" in config.formats:
        writers.append(WebDatasetWriter(root / "webdataset", extension, config.shard_size))

    stats, seen = DecodeStats(), {}
    report = {"sources": {}, "duplicates": [], "splits": Counter()}
    bar = tqdm(total=sum(total for _, _, total, _ in opened), desc="ALive", unit="img", disable=not progress)
    pool = None
    if config.num_workers > 1:
        pool = ProcessPoolExecutor(config.num_workers, mp_context=multiprocessing.get_context("spawn"))
    try:
        for source, labels, total, records in opened:
            label_pools, undescribed = pools[source.name]
            counts = Counter()
            for block in _blocks(records, BLOCK_SIZE):
                jobs = [(reference, name, config.image_format, config.jpeg_quality) for reference, name, _ in block]
                items = pool.map(_encode_job, jobs, chunksize=16) if pool else map(_encode_job, jobs)
                for (_, name, label), item in zip(block, items):
                    bar.update()
                    if item.error is not None:
                        stats.record(item.error)
                        counts["skipped"] += 1
                        continue
                    stats.decoded += 1
                    if item.digest in seen:
                        report["duplicates"].append({"dropped": name, "source": source.name, "kept": seen[item.digest]})
                        counts["duplicates"] += 1
                        continue
                    seen[item.digest] = f"{source.name}:{name}"
                    rng = random.Random(f"{config.seed}/{source.name}/{item.digest}")
                    captions = rng.sample(label_pools[label], min(config.captions_per_image, len(label_pools[label])))
                    split_draw = random.Random(f"{config.seed}/split/{item.digest}").random()
                    split = "validation" if split_draw < config.validation_fraction else "train"
                    key = f"{sum(report['splits'].values()):08d}"
                    row = {"caption": captions[0], "captions": captions, "source": source.name, "label": label}
                    for writer in writers:
                        writer.write(split, key, item.data, row)
                    report["splits"][split] += 1
                    counts["written"] += 1
            report["sources"][source.name] = {
                "images": total,
                "written": counts["written"],
                "skipped": counts["skipped"],
                "duplicates": counts["duplicates"],
                "classes": len(labels),
                "classes_without_metadata": undescribed,
                "example_caption": label_pools[labels[0]][0] if labels else None,
            }
    finally:
        bar.close()
        if pool is not None:
            pool.shutdown()
    for writer in writers:
        writer.close()
    if "datasets" in config.formats:
        _save_datasets(image_folder, root / "datasets")
    if "imagefolder" not in config.formats:
        shutil.rmtree(image_folder)
    report["splits"] = dict(report["splits"])
    report["decode"] = stats.to_dict()
    report["decode_summary"] = stats.summary()
    return report
