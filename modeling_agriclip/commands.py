"""The work behind the `agriclip` subcommands (`agriclip.cli` parses and checks their arguments first).

Batched zero-shot classification and embedding of image files, checkpoint descriptions and the tokenizer. The same
from Python: `load_classifier`, `find_images`, then `classify_files` or `embed_files` (label embeddings cached by the
`ZeroShotClassifier` across calls, images decoded by a DataLoader, unreadable files skipped and counted).

Failures are `agriclip.errors.CLIError`s with their exit code: e.g. a model folder that would run its own code, or
whose weights do not fit (3), no images (4), none readable (5), an unusable device (6), an output that cannot be
written (8: every file is written whole or not at all, so the previous one is left as it was).
"""

from __future__ import annotations

import contextlib
import csv
import glob
import importlib.metadata
import io
import json
import os
import sys
import unicodedata
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import yaml
from huggingface_hub.constants import REPOCARD_NAME
from PIL import Image
from safetensors.torch import save
from torch.utils.data import DataLoader
from tqdm import tqdm
from transformers.utils import logging as transformers_logging

from agriclip.atomic import atomic_open, write_json_atomically
from agriclip.cli import MODEL_ENV, TASK_SIMILARITY
from agriclip.errors import CLIError, ExitCode, SingleLabelWarning, warn
from agriclip.files import check_folder_files, check_hub_id, parameter_counts
from agriclip.images import DecodeStats, DecodingCollator, counted
from agriclip.labels import LabelHierarchy
from agriclip.templates import DEFAULT_TEMPLATES

from .calibration import Calibration, TaskFile, answer
from .hierarchy import hierarchy_templates, predict_hierarchical
from .tokenizer import build_clip_tokenizer
from .zero_shot import UnavailableModelError, ZeroShotClassifier, load_config, model_source_options


CSV_COLUMNS = ("image", "rank", "label", "score", "error")


# ---------------------------------------------------------------------------------------------------------------
# Inputs: images, labels, templates, device, model
# ---------------------------------------------------------------------------------------------------------------


def image_suffixes() -> frozenset[str]:
    """The file suffixes of the formats PIL can open (not the save-only ones such as .pdf)."""
    Image.init()
    return frozenset(suffix for suffix, name in Image.registered_extensions().items() if name in Image.OPEN)


def _walk(folder: str, suffixes: frozenset[str]) -> Iterator[str]:
    """Image files under `folder`, recursively, in sorted order; hidden files and folders (e.g. macOS `._` files)
    are skipped."""
    for root, folders, files in os.walk(folder):
        folders[:] = sorted(name for name in folders if not name.startswith("."))
        for name in sorted(files):
            if not name.startswith(".") and os.path.splitext(name)[1].lower() in suffixes:
                yield os.path.join(root, name)


def _expand(argument: str, suffixes: frozenset[str]) -> list[str]:
    """The image files one argument names: itself, the images under a folder, or the images a glob matches."""
    if os.path.isfile(argument):
        return [argument]
    if os.path.isdir(argument):
        return list(_walk(argument, suffixes))
    if not glob.has_magic(argument):
        return []
    files = []
    for match in sorted(glob.glob(argument, recursive=True)):
        if os.path.isdir(match):
            files += _walk(match, suffixes)
        elif os.path.splitext(match)[1].lower() in suffixes:
            files.append(match)
    return files


def find_images(inputs: Sequence[str]) -> tuple[list[str], list[str]]:
    """Expands image arguments into files, in argument order, without duplicates.

    Files named explicitly are kept whatever their suffix (decoding decides); folders are walked recursively and glob
    patterns expanded, keeping files with an image suffix. Returns (files, the inputs that name no file or folder).
    """
    suffixes = image_suffixes()
    files, unmatched, seen = [], [], set()
    for argument in map(os.path.expanduser, inputs):
        found = _expand(argument, suffixes)
        if not found and not os.path.isdir(argument):
            unmatched.append(argument)
        for path in found:
            if os.path.normpath(path) not in seen:
                seen.add(os.path.normpath(path))
                files.append(path)
    return files, unmatched


def collect_images(inputs: Sequence[str]) -> list[str]:
    """`find_images`, reporting inputs that matched nothing on stderr; fails when no file is left."""
    files, unmatched = find_images(inputs)
    for argument in unmatched:
        warn(f"{argument}: no such file or folder, or no image matches it")
    if not files:
        raise CLIError(ExitCode.NO_IMAGES, f"no images found in {' '.join(inputs)}")
    return files


def resolve_device(name: str | None) -> torch.device:
    """The device to run on: `name`, checked by allocating on it, or the best one available."""
    if name is None:
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError, NotImplementedError) as error:
        available = ["cpu"] + [f"cuda:{index}" for index in range(torch.cuda.device_count())]
        available += ["mps"] if torch.backends.mps.is_available() else []
        raise CLIError(
            ExitCode.DEVICE,
            f"--device {name!r} is not usable here ({_first_line(error)}); available: {', '.join(available)}",
        ) from error
    return device


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _cannot_load(model: str, error: BaseException | str) -> CLIError:
    reason = _first_line(error) if isinstance(error, BaseException) else error
    if isinstance(error, UnavailableModelError):
        return CLIError(ExitCode.MODEL, f"cannot load the model: {reason}")  # it names the model and what to do
    return CLIError(
        ExitCode.MODEL,
        f"cannot load the model {model!r}: {reason.rstrip('.')}. Pass a local folder with --model PATH (a saved "
        f"AgriCLIP or transformers CLIP folder) or set {MODEL_ENV}; Hub ids need network access or the Hugging Face "
        "cache",
    )


def _check_model_path(model: str) -> None:
    """A path-like model that does not exist fails here, before transformers tries it as a Hub id."""
    try:
        check_hub_id(model)
    except FileNotFoundError as error:
        raise _cannot_load(model, "no such folder") from error


def hide_weight_loading_bars() -> None:
    """Hides transformers' "Loading weights" bar, one per model load, which clutters a command's output; download
    bars of Hub files stay."""

    def factory(make, args, kwargs):
        if kwargs.get("desc") == "Loading weights":
            kwargs = {**kwargs, "disable": True}
        return make(*args, **kwargs)

    transformers_logging.set_tqdm_hook(factory)


def load_classifier(
    model: str,
    device: torch.device,
    batch_size: int,
    embedding: str | None = None,
    fusion_weight: float | None = None,
) -> ZeroShotClassifier:
    """A `ZeroShotClassifier` on `model` (an AgriCLIP or CLIP folder, or a Hub id), failing with exit code 3; with
    `embedding` (and, for "fused", optionally its `fusion_weight`) instead of the checkpoint's."""
    _check_model_path(model)
    hide_weight_loading_bars()
    try:
        classifier = ZeroShotClassifier.from_pretrained(model, batch_size=batch_size, device=device)
    except (OSError, ValueError) as error:
        raise _cannot_load(model, error) from error
    if embedding is None:
        return classifier
    try:
        return classifier.with_embedding(embedding, fusion_weight)
    except ValueError as error:
        raise CLIError(ExitCode.USAGE, f"--embedding {embedding}: {error}") from error


def embedding_name(classifier: ZeroShotClassifier) -> str | None:
    """The image embedding a classifier uses: its own, else the checkpoint's (None for a single-embedding CLIP)."""
    return classifier.embedding or getattr(classifier.model.config, "image_embedding", None)


def fusion_weight_of(classifier: ZeroShotClassifier) -> float | None:
    """The weight of the CLIP image embedding in the classifier's fused embedding; None for another embedding."""
    if embedding_name(classifier) != "fused":
        return None
    return classifier.model.config.fusion_weight if classifier.fusion_weight is None else classifier.fusion_weight


# ---------------------------------------------------------------------------------------------------------------
# Batched inference
# ---------------------------------------------------------------------------------------------------------------


class DecodeAndPreprocess(DecodingCollator):
    """DataLoader collate function: file paths to `{"paths": readable paths, "pixel_values": ...}`.

    Runs in the DataLoader worker processes, if any, so that decoding and resizing overlap with the forward passes.
    It holds only the image processor (the one `ZeroShotClassifier.pixel_values` applies), which is cheap to send to
    workers; the skipped files reach `stats` through `agriclip.images.counted`.
    """

    def __init__(self, image_processor, stats: DecodeStats | None = None):
        super().__init__(stats)
        self.image_processor = image_processor

    def __call__(self, paths: Sequence[str]) -> dict:
        return super().__call__([{"image": path} for path in paths])

    def collate(self, decoded) -> dict:
        pixel_values = self.image_processor(images=[image for _, image in decoded], return_tensors="pt")["pixel_values"]
        return {"paths": [row["image"] for row, _ in decoded], "pixel_values": pixel_values}


def default_num_workers(num_files: int, batch_size: int) -> int:
    """Decoding processes: up to 4, leaving two cores to the forward pass; none for a single batch (starting a worker
    costs more than it saves) or on a machine with two cores or fewer (a worker would compete with the forward)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if num_files <= batch_size:
        return 0
    return max(0, min(4, cores - 2))


def image_batches(
    classifier: ZeroShotClassifier,
    files: Sequence[str],
    stats: DecodeStats,
    batch_size: int = 32,
    num_workers: int | None = None,
    progress: bool = False,
) -> Iterator[tuple[list[str], torch.Tensor]]:
    """Yields (readable paths, pixel_values) batches of `files` in order, decoded and preprocessed by the DataLoader
    (in `num_workers` processes; None: `default_num_workers`). Unreadable files are skipped and recorded in
    `stats`."""
    if num_workers is None:
        num_workers = default_num_workers(len(files), batch_size)
    loader = DataLoader(
        list(files),
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=DecodeAndPreprocess(classifier.processor.image_processor, stats),
        pin_memory=classifier.device.type == "cuda",
    )
    # disable=None hides the bar when stderr is not a terminal (logs, pipes).
    seen = stats.decoded + stats.num_skipped
    with tqdm(total=len(files), unit="img", disable=None if progress else True, file=sys.stderr) as bar:
        for batch in counted(loader):
            bar.update(stats.decoded + stats.num_skipped - seen)
            seen = stats.decoded + stats.num_skipped
            if batch is not None:
                yield batch["paths"], batch["pixel_values"]


@dataclass
class Classification:
    """Predictions of `classify_files`: `predictions[i]` is the top-k `{"label", "score"}` of `files[i]`, best first;
    `answers[i]` its answer (the top label or "unknown") when the classification abstains, else None;
    `similarities[i]` its top cosine similarity to a label when it abstains by similarity, else None; `stats` counts
    the decoded images and names the skipped files per reason."""

    files: list[str] = field(default_factory=list)
    predictions: list[list[dict]] = field(default_factory=list)
    answers: list[str] | None = None
    similarities: list[float] | None = None
    stats: DecodeStats = field(default_factory=DecodeStats)


def classify_files(
    classifier: ZeroShotClassifier,
    files: Sequence[str],
    class_names: Sequence[str],
    templates: Sequence[str] = DEFAULT_TEMPLATES,
    top_k: int = 5,
    batch_size: int = 32,
    num_workers: int | None = None,
    progress: bool = False,
    calibration: Calibration | None = None,
    abstain_below: float | None = None,
    hierarchy: LabelHierarchy | None = None,
    abstain_below_similarity: float | None = None,
) -> Classification:
    """Zero-shot classifies image files in batches: the label embeddings are computed once (the classifier caches
    them across calls too), images are decoded and preprocessed by the DataLoader, and only the image tower runs per
    batch.

    `calibration` (fitted for these labels and templates) calibrates the scores; with `abstain_below` each image
    also gets an answer, "unknown" where its top score is below it (`modeling_agriclip.calibration.answer`), with
    `abstain_below_similarity` where its top cosine similarity to a label is: a distance that, unlike a softmax over
    the labels given, falls for a photo far from all of them. With a `hierarchy` (whose labels are `class_names`) the
    prediction is two-level (`modeling_agriclip.hierarchy`): the top-k labels of each image's predicted group, with
    that group.
    """
    if hierarchy is not None and abstain_below_similarity is not None:
        raise ValueError("abstention by similarity scores flat labels, not a label hierarchy")
    abstaining = abstain_below is not None or abstain_below_similarity is not None
    result = Classification(
        answers=[] if abstaining else None, similarities=None if abstain_below_similarity is None else []
    )
    for paths, pixel_values in image_batches(classifier, files, result.stats, batch_size, num_workers, progress):
        result.files += paths
        if hierarchy is None:
            image_embeds = classifier.image_embeddings(pixel_values)
            predictions = classifier.embedding_predictions(image_embeds, class_names, templates, top_k, calibration)
        else:
            predictions = predict_hierarchical(classifier, pixel_values, hierarchy, templates, top_k)
        result.predictions += predictions
        if abstain_below is not None:
            result.answers += [answer(top[0]["label"], top[0]["score"], abstain_below) for top in predictions]
        elif abstain_below_similarity is not None:
            similarities = classifier.embedding_similarities(image_embeds, class_names, templates).amax(dim=1).tolist()
            result.similarities += similarities
            result.answers += [
                answer(top[0]["label"], similarity, abstain_below_similarity)
                for top, similarity in zip(predictions, similarities)
            ]
    return result


def embed_files(
    classifier: ZeroShotClassifier,
    files: Sequence[str],
    batch_size: int = 32,
    num_workers: int | None = None,
    progress: bool = False,
) -> tuple[list[str], torch.Tensor, DecodeStats]:
    """L2-normalised image embeddings (N, D) of the readable `files`, with those files in row order and the decode
    counts."""
    stats, kept, chunks = DecodeStats(), [], []
    for paths, pixel_values in image_batches(classifier, files, stats, batch_size, num_workers, progress):
        kept += paths
        chunks.append(classifier.image_embeddings(pixel_values))
    embeddings = torch.cat(chunks) if chunks else torch.empty(0, classifier.model.config.projection_dim)
    return kept, embeddings, stats


def skipped_files(files: Sequence[str], stats: DecodeStats) -> list[tuple[str, str]]:
    """(path, reason) of each skipped file, in input order."""
    reasons = {path: reason for reason, paths in stats.skipped.items() for path in paths}
    return [(path, reasons[path]) for path in files if path in reasons]


def _report_skipped(stats: DecodeStats) -> None:
    if stats.num_skipped:
        warn(f"unreadable images were skipped: {stats.summary()}")


def _require_readable(stats: DecodeStats) -> None:
    if not stats.decoded:
        raise CLIError(ExitCode.UNREADABLE, f"none of the images could be read: {stats.summary()}")


# ---------------------------------------------------------------------------------------------------------------
# Output formats
# ---------------------------------------------------------------------------------------------------------------


def display_width(text: str) -> int:
    """The terminal columns `text` takes: two for each wide or full-width character (CJK), none for a combining
    mark, one for the others."""
    return sum(
        0 if unicodedata.combining(char) else 2 if unicodedata.east_asian_width(char) in "WF" else 1 for char in text
    )


def _answer_rows(result: Classification) -> Iterator[tuple[str, int, dict, str | None]]:
    """(image, rank, prediction, the image's answer or None) per image and rank, best first."""
    answers = result.answers if result.answers is not None else [None] * len(result.files)
    for path, predictions, image_answer in zip(result.files, result.predictions, answers):
        for rank, prediction in enumerate(predictions, start=1):
            yield path, rank, prediction, image_answer


def format_table(result: Classification) -> str:
    """Image, rank, label and score columns (then the answer, when the classification abstains), aligned by display
    width (file names and labels in CJK included)."""
    abstaining = result.answers is not None
    rows = [("image", "rank", "label", "score") + (("answer",) if abstaining else ())]
    rows += [
        (path, str(rank), prediction["label"], f"{prediction['score']:.4f}")
        + ((image_answer if rank == 1 else "",) if abstaining else ())
        for path, rank, prediction, image_answer in _answer_rows(result)
    ]
    widths = [max(display_width(row[column]) for row in rows) for column in range(len(rows[0]) - 1)]

    def padding(text: str, column: int) -> str:
        return " " * (widths[column] - display_width(text))

    def line(row) -> str:
        cells = [f"{row[0]}{padding(row[0], 0)}", f"{padding(row[1], 1)}{row[1]}"]
        cells += [f"{cell}{padding(cell, column)}" for column, cell in enumerate(row[2:-1], start=2)] + [row[-1]]
        return "  ".join(cells).rstrip()

    return "\n".join(line(row) for row in rows) + "\n"


def format_csv(result: Classification, skipped: Sequence[tuple[str, str]]) -> str:
    """`CSV_COLUMNS`, plus an `answer` column (on each image's rank-1 row) when the classification abstains."""
    abstaining = result.answers is not None
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_COLUMNS + (("answer",) if abstaining else ()))
    for path, rank, prediction, image_answer in _answer_rows(result):
        row = (path, rank, prediction["label"], repr(prediction["score"]), "")
        writer.writerow(row + ((image_answer if rank == 1 else "",) if abstaining else ()))
    for path, reason in skipped:
        writer.writerow((path, "", "", "", reason) + (("",) if abstaining else ()))
    return buffer.getvalue()


def format_json(result: Classification, skipped, header: dict) -> str:
    answers = result.answers if result.answers is not None else [None] * len(result.files)
    similarities = result.similarities if result.similarities is not None else [None] * len(result.files)
    document = {
        **header,
        "results": [
            {
                "image": path,
                **({} if image_answer is None else {"answer": image_answer}),
                **({} if similarity is None else {"similarity": similarity}),
                "predictions": predictions,
            }
            for path, predictions, image_answer, similarity in zip(
                result.files, result.predictions, answers, similarities
            )
        ],
        "skipped": [{"image": path, "error": reason} for path, reason in skipped],
    }
    return json.dumps(document, indent=2, ensure_ascii=False) + "\n"


def render(result: Classification, files: Sequence[str], output_format: str, header: dict) -> str:
    skipped = skipped_files(files, result.stats)
    if output_format == "table":
        return format_table(result)
    if output_format == "csv":
        return format_csv(result, skipped)
    return format_json(result, skipped, header)


def _write(writers: Mapping[Path, Callable[[io.BufferedWriter], object]]) -> None:
    """Writes each file by `writer(binary handle)`, whole or not at all (`agriclip.atomic`).

    All the files are written to their temporary names before any replaces its target, so that a failure (a full
    disk) leaves every previous file as it was, and no temporary file; it fails with exit code 8.
    """
    try:
        with contextlib.ExitStack() as stack:
            for path, write in writers.items():
                write(stack.enter_context(atomic_open(path, "wb")))
    except OSError as error:
        names = " and ".join(map(str, writers))
        raise CLIError(
            ExitCode.OUTPUT, f"cannot write {names}: {error.strerror or error}; any previous file is left as it was"
        ) from error


# ---------------------------------------------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------------------------------------------


def _prepare(args, images: Sequence[str], fusion_weight: float | None = None) -> tuple[ZeroShotClassifier, list[str]]:
    """Finds the images and checks the device first, then loads the model (labels and templates are checked by
    `agriclip.cli` before this module is imported)."""
    files = collect_images(images)
    device = resolve_device(args.device)
    return load_classifier(args.model, device, args.batch_size, args.embedding, fusion_weight), files


def read_task_file(args) -> TaskFile | None:
    """predict and classify-folder: the task file of `--calibration`, read before the model loads. Its templates
    stand in for the default ones, its image embedding (and fusion weight) for the checkpoint's, its similarity
    threshold for a valueless `--abstain-below-similarity`; labels, templates or an `--embedding` other than those
    it was fitted for are refused (exit code 7 and 2)."""
    if getattr(args, "calibration", None) is None:
        if getattr(args, "abstain_below_similarity", None) == TASK_SIMILARITY:
            raise CLIError(ExitCode.USAGE, "--abstain-below-similarity needs a value S, or a --calibration task file")
        return None
    if args.hierarchy is not None:
        raise CLIError(ExitCode.USAGE, "--calibration calibrates flat labels; it cannot be used with a YAML label file")
    try:
        task = TaskFile.load(args.calibration)
    except (OSError, ValueError) as error:
        raise CLIError(ExitCode.LABELS, f"--calibration: {error}") from error
    if args.template is None and args.dataset_template is None:
        args.templates = list(task.templates)
    if args.class_names is None:  # no --labels: the task file's
        args.class_names = list(task.labels)
    try:
        task.check_task(args.calibration, args.class_names, args.templates)
    except ValueError as error:
        raise CLIError(ExitCode.LABELS, f"--calibration: {error}") from error
    if args.embedding is not None and args.embedding != task.embedding:
        raise CLIError(
            ExitCode.USAGE,
            f"--embedding {args.embedding}: {args.calibration} was fitted on the {task.embedding!r} image embedding",
        )
    args.embedding = task.embedding
    if args.abstain_below_similarity == TASK_SIMILARITY:
        if task.similarity_threshold is None:
            raise CLIError(
                ExitCode.USAGE,
                f"--abstain-below-similarity: {args.calibration} records no similarity threshold (refit it with "
                "python -m evaluation.calibrate); give S",
            )
        args.abstain_below_similarity = task.similarity_threshold
    return task


def model_revision(classifier: ZeroShotClassifier) -> str | None:
    """The Hub commit the model was loaded from; None for a local folder."""
    return getattr(classifier.model.config, "_commit_hash", None)


def prediction_header(args, classifier: ZeroShotClassifier, task: TaskFile | None) -> dict:
    """The provenance a predictions file starts with: model and revision, image embedding (and fusion weight),
    labels, templates, calibration (file, temperature and bias), abstention threshold and package version."""
    calibration = None
    if task is not None:
        calibration = {"file": str(args.calibration), "temperature": task.temperature, "bias": task.bias}
    hierarchy = None
    if args.hierarchy is not None:
        group_templates, label_templates = hierarchy_templates(args.hierarchy, args.templates)
        hierarchy = {
            "file": str(args.labels_file),
            "levels": list(args.hierarchy.levels),
            "groups": args.hierarchy.groups,
            "templates": {args.hierarchy.levels[0]: group_templates, args.hierarchy.levels[1]: label_templates},
        }
    return {
        "model": args.model,
        "revision": model_revision(classifier),
        "embedding": embedding_name(classifier),
        "fusion_weight": fusion_weight_of(classifier),
        "labels": args.class_names,
        "templates": args.templates,
        "hierarchy": hierarchy,
        "calibration": calibration,
        "abstain_below": args.abstain_below,
        "abstain_below_similarity": args.abstain_below_similarity,
        "agriclip_version": package_version(),
    }


def _classify(args, images: Sequence[str], progress: bool) -> tuple[Classification, list[str], dict]:
    task = read_task_file(args)
    classifier, files = _prepare(args, images, None if task is None else task.fusion_weight)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SingleLabelWarning)  # `agriclip.cli.check_labelled` said it already
        result = classify_files(
            classifier,
            files,
            args.class_names,
            args.templates,
            args.top_k,
            args.batch_size,
            args.num_workers,
            progress,
            calibration=None if task is None else task.calibration,
            abstain_below=args.abstain_below,
            hierarchy=args.hierarchy,
            abstain_below_similarity=args.abstain_below_similarity,
        )
    _require_readable(result.stats)  # names the skipped files itself: the warning would name them twice
    _report_skipped(result.stats)
    return result, files, prediction_header(args, classifier, task)


def run_predict(args) -> ExitCode:
    result, files, header = _classify(args, args.images, progress=False)
    sys.stdout.write(render(result, files, args.format, header))
    return ExitCode.OK


def run_classify_folder(args) -> ExitCode:
    output_format = args.format or ("json" if args.output.suffix.lower() == ".json" else "csv")
    result, files, header = _classify(args, [args.folder], progress=True)
    text = render(result, files, output_format, header)
    _write({args.output: lambda handle: handle.write(text.encode("utf-8"))})
    print(
        f"classified {len(result.files)} images, skipped {result.stats.num_skipped} unreadable; wrote {args.output}",
        file=sys.stderr,
    )
    return ExitCode.OK


def run_embed(args) -> ExitCode:
    suffix = args.output.suffix.lower()
    class_names, templates = args.class_names, args.templates
    files = collect_images(args.images) if args.images else []
    classifier = load_classifier(args.model, resolve_device(args.device), args.batch_size, args.embedding)

    tensors, metadata = {}, {"model": args.model, "embedding": embedding_name(classifier)}
    if files:
        kept, embeddings, stats = embed_files(classifier, files, args.batch_size, args.num_workers, progress=True)
        _require_readable(stats)
        _report_skipped(stats)
        tensors["image_embeds"] = embeddings
        metadata["files"] = kept
        metadata["skipped"] = [{"image": path, "error": reason} for path, reason in skipped_files(files, stats)]
    if class_names:
        tensors["label_embeds"] = classifier.label_embeddings(class_names, templates)
        metadata["labels"] = class_names
        metadata["templates"] = templates

    if suffix == ".safetensors":
        header = {key: value if isinstance(value, str) else json.dumps(value) for key, value in metadata.items()}
        data = save({name: tensor.contiguous() for name, tensor in tensors.items()}, metadata=header)
        written = {args.output: lambda handle: handle.write(data)}
    else:
        (array,) = tensors.values()
        text = json.dumps(metadata, indent=2, ensure_ascii=False) + "\n"
        # Through a handle: np.save would add ".npy" to the temporary name.
        written = {
            args.output: lambda handle: np.save(handle, array.numpy()),
            args.output.with_name(args.output.name + ".json"): lambda handle: handle.write(text.encode("utf-8")),
        }
    _write(written)
    shapes = ", ".join(f"{name} {tuple(tensor.shape)}" for name, tensor in tensors.items())
    print(f"wrote {shapes} to {' and '.join(map(str, written))}", file=sys.stderr)
    return ExitCode.OK


def run_export(args) -> ExitCode:
    from modeling_agriclip.export import export_classifier

    classifier = load_classifier(args.model, torch.device("cpu"), 32, args.embedding)
    provenance = {"model": args.model, "agriclip_version": package_version()}
    revision = getattr(classifier.model.config, "_commit_hash", None)
    if revision:
        provenance["revision"] = revision
    try:
        export = export_classifier(
            classifier,
            args.class_names,
            args.templates,
            args.output,
            quantize=args.quantize,
            provenance=provenance,
            open_vocabulary=args.open_vocabulary,
        )
    except ImportError as error:
        raise CLIError(ExitCode.USAGE, str(error)) from error
    except OSError as error:
        raise CLIError(ExitCode.OUTPUT, f"cannot write {args.output}: {error}; nothing was replaced") from error
    sizes = ", ".join(f"{name} {size / 1e6:.1f} MB" for name, size in export.sizes.items())
    what = "an open-vocabulary classifier" if args.open_vocabulary else f"{len(args.class_names)} labels"
    print(f"exported {what} to {export.folder} ({sizes})", file=sys.stderr)
    return ExitCode.OK


def package_version() -> str:
    """This package's installed version ("unknown" when it runs from a source tree that was never installed)."""
    try:
        return importlib.metadata.version("agriclip")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _tower(config, *fields: str) -> dict:
    """The `fields` a sub-config has, plus its model type."""
    sizes = {name: getattr(config, name) for name in fields if hasattr(config, name)}
    return {"model_type": config.model_type} | sizes


def _read_parameter_counts(folder: Path) -> dict | None:
    """Parameters per module and in total from the safetensors headers; None for a folder without them."""
    try:
        counts = parameter_counts(folder)
    except FileNotFoundError:
        return None  # config-only folder, or weights not in safetensors
    except (OSError, ValueError) as error:
        raise CLIError(ExitCode.MODEL, f"cannot read the weights of {str(folder)!r}: {error}") from error
    return {"total": sum(counts.values()), **dict(sorted(counts.items()))} if counts else None


def _card_summary(path: Path) -> dict:
    """The metadata and evaluation results of a model card; `{"unreadable": reason}` for a card that does not parse
    (bad YAML, bad model-index, not UTF-8), which `info` reports without failing."""
    from huggingface_hub import ModelCard

    try:
        card = ModelCard.load(path)
    except (OSError, ValueError, yaml.YAMLError) as error:
        reason = _first_line(error)
        warn(f"{path}: the model card does not parse, so its metadata is not shown: {reason}")
        return {"unreadable": reason}
    data = card.data.to_dict()
    summary = {
        key: data[key]
        for key in ("model_name", "license", "pipeline_tag", "library_name", "base_model", "datasets", "tags")
        if data.get(key)
    }
    summary["eval_results"] = [
        {
            "dataset": result.dataset_name,
            "metric": result.metric_name or result.metric_type,
            "value": result.metric_value,
        }
        for result in card.data.eval_results or []
    ]
    return summary


def model_info(model: str) -> dict:
    """Towers, sizes, parameter counts, embedding mode and model card summary of a checkpoint folder (or Hub id),
    read from config.json, the safetensors headers and README.md, without loading the weights or running the
    folder's code."""
    _check_model_path(model)
    folder = Path(model)
    try:
        if folder.is_dir():
            check_folder_files(folder)
        config = load_config(model, **model_source_options(model))
    except (OSError, ValueError) as error:
        raise _cannot_load(model, error) from error
    if getattr(config, "text_config", None) is None:
        raise _cannot_load(model, f"its config.json is a {config.model_type!r} config, not an AgriCLIP or CLIP one")
    layers = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
    towers = {"text": _tower(config.text_config, *layers, "max_position_embeddings")}
    if getattr(config, "vision_config", None) is not None:
        towers["vision"] = _tower(config.vision_config, *layers, "image_size", "patch_size")
    if getattr(config, "dino_config", None) is not None:
        towers["backbone"] = _tower(config.dino_config, *layers, "hidden_sizes", "depths", "image_size", "patch_size")
        towers["aligner"] = {"in_features": config.backbone_hidden_size, "out_features": config.projection_dim}
    info = {
        "model": model,
        "model_type": config.model_type,
        "architectures": list(getattr(config, "architectures", None) or []),
        "projection_dim": config.projection_dim,
        "image_embedding": getattr(config, "image_embedding", None),
        "towers": towers,
        "parameters": None,
        "card": None,
    }
    if info["image_embedding"] == "fused":
        info["fusion_weight"] = config.fusion_weight
    if folder.is_dir():
        info["parameters"] = _read_parameter_counts(folder)
        if os.path.lexists(folder / REPOCARD_NAME):
            info["card"] = _card_summary(folder / REPOCARD_NAME)
    return info


def _tower_line(name: str, tower: dict, counts: dict | None, *prefixes: str) -> str:
    sizes = ", ".join(f"{key} {value}" for key, value in tower.items() if key != "model_type")
    line = f"{name:<10} {tower['model_type']}: {sizes}"
    if counts:
        line += f"; {sum(counts.get(prefix, 0) for prefix in prefixes) / 1e6:.2f} M parameters"
    return line


def format_info(info: dict) -> str:
    towers, counts = info["towers"], info["parameters"]
    lines = [f"model      {info['model']} ({info['model_type']}: {', '.join(info['architectures']) or '-'})"]
    lines.append(_tower_line("text", towers["text"], counts, "text_model", "text_projection"))
    if "vision" in towers:
        lines.append(_tower_line("vision", towers["vision"], counts, "vision_model", "visual_projection"))
    if "backbone" in towers:
        lines.append(_tower_line("backbone", towers["backbone"], counts, "dino_model"))
        aligner = towers["aligner"]
        lines.append(f"aligner    linear {aligner['in_features']} -> {aligner['out_features']}, with bias")
    embedding = info["image_embedding"] or "clip (a single image tower)"
    if "fusion_weight" in info:
        embedding += f" (fusion weight {info['fusion_weight']})"
    lines.append(f"embedding  {info['projection_dim']} dimensions; zero-shot image embedding: {embedding}")
    lines.append(
        f"parameters {counts['total'] / 1e6:.2f} M in all" if counts else "parameters unknown (no safetensors weights)"
    )
    card = info["card"]
    if card is None:
        lines.append("card       none (no README.md)")
    elif "unreadable" in card:
        lines.append(f"card       unreadable: {card['unreadable']}")
    else:
        fields = [
            f"{key} {', '.join(map(str, value)) if isinstance(value, list) else value}"
            for key, value in card.items()
            if key != "eval_results"
        ]
        lines.append(f"card       {'; '.join(fields) or 'no metadata'}")
        results = card["eval_results"]
        if results:
            shown = "; ".join(f"{r['dataset']} {r['metric']} {r['value']:.4g}" for r in results[:4])
            more = f" and {len(results) - 4} more" if len(results) > 4 else ""
            lines.append(f"evaluation {len(results)} results: {shown}{more}")
    return "\n".join(lines) + "\n"


def run_info(args) -> ExitCode:
    info = model_info(args.model)
    sys.stdout.write(json.dumps(info, indent=2) + "\n" if args.format == "json" else format_info(info))
    return ExitCode.OK


def run_tokenizer(args) -> ExitCode:
    build_clip_tokenizer(args.bpe).save_pretrained(args.output)
    print(f"CLIP tokenizer written to {args.output}", file=sys.stderr)
    return ExitCode.OK


def run_explain(args) -> ExitCode:
    from modeling_agriclip.explain import explain_files

    classifier, files = _prepare(args, args.images)
    header = {"model": args.model}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", SingleLabelWarning)  # `agriclip.cli.check_labelled` said it already
            result = explain_files(
                classifier,
                files,
                args.class_names,
                args.templates,
                args.output,
                label=args.label,
                batch_size=args.batch_size,
                num_workers=args.num_workers,
                header=header,
            )
        _require_readable(result.stats)  # names the skipped files itself: the warning would name them twice
        _report_skipped(result.stats)
        index = {
            **header,
            "embedding": result.results[0]["document"]["embedding"],
            "labels": args.class_names,
            "templates": args.templates,
            "results": [
                {"image": row["image"], "json": row["json"], "explained": row["document"]["explained"]}
                for row in result.results
            ],
            "skipped": [{"image": path, "error": reason} for path, reason in skipped_files(files, result.stats)],
        }
        write_json_atomically(args.output / "explain.json", index)
    except OSError as error:
        raise CLIError(ExitCode.OUTPUT, f"cannot write into {args.output}: {error.strerror or error}") from error
    print(
        f"explained {len(result.results)} images, skipped {result.stats.num_skipped} unreadable; wrote {args.output}",
        file=sys.stderr,
    )
    return ExitCode.OK
