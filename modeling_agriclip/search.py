"""Text-to-image and image-to-image search over a photo archive: the work behind `agriclip index` and `search`.

An index is one safetensors file: the L2-normalised image embeddings (N, D) as the tensor `image_embeds`, and in
the header (key `agriclip_index`) one JSON document with the provenance (model and revision, image embedding and
fusion weight, package version), the folder indexed and, per row, the file's path below that folder with its size
and modification time. One file, so that one rename replaces embeddings and paths together: they can never
disagree, whatever a crash interrupts. The header holds ~70 bytes per photo; safetensors reads headers of up to
100 MB, so an index holds about a million photos (larger ones are refused when written, not when read).

Re-indexing into an existing index embeds only the files that are new or whose size or modification time changed,
drops the files that are gone, and keeps the rows in folder-walk order, so the result is the index a fresh build
would write. Unreadable files are skipped, counted and tried again on the next run. An index is only ever updated
or searched with the model (id and revision) and image embedding that built it; anything else is refused, since
embeddings of two models or two embeddings are not comparable.

Search is exact: cosine similarities of the query embeddings with every row, in torch, or with `backend="faiss"` in
FAISS's brute-force `faiss.knn` (the search of its exact `IndexFlatIP`, without copying the rows into an index; the
optional extra `agriclip[search]`); `bench/bench_search.py` measures both, and where an approximate FAISS index
would pay off.
"""

from __future__ import annotations

import csv
import io
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save

from agriclip.errors import CLIError, ExitCode
from agriclip.images import DecodeStats

from .commands import (
    _report_skipped,
    _write,
    collect_images,
    display_width,
    embed_files,
    embedding_name,
    fusion_weight_of,
    load_classifier,
    model_revision,
    package_version,
    resolve_device,
    skipped_files,
)
from .zero_shot import ZeroShotClassifier


INDEX_KEY = "agriclip_index"
INDEX_FORMAT_VERSION = 1
EMBEDDINGS_KEY = "image_embeds"
# What makes embeddings comparable: an index is searched and updated only with a model that has the same.
IDENTITY_FIELDS = ("model", "revision", "embedding", "fusion_weight")
# safetensors refuses to read a header longer than this (its MAX_HEADER_SIZE).
MAX_HEADER_BYTES = 100_000_000
BACKENDS = ("torch", "faiss")
SEARCH_COLUMNS = ("query", "rank", "image", "score")


class IndexFileError(ValueError):
    """A file that is not a readable AgriCLIP index."""


# ---------------------------------------------------------------------------------------------------------------
# The index file
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class ImageIndex:
    """Image embeddings of the photos under `root`, one row per entry of `files` ({"path": below root, with "/",
    "size": bytes, "mtime_ns"}), with the `identity` ({"model", "revision", "embedding", "fusion_weight"}) of the
    model that computed them. `skipped` lists the unreadable files ({"image": path below root, "error"}) of the
    last build."""

    root: str
    files: list[dict]
    embeddings: torch.Tensor
    identity: dict
    agriclip_version: str = field(default_factory=package_version)
    skipped: list[dict] = field(default_factory=list)

    @property
    def paths(self) -> list[str]:
        """The indexed files as paths to open: each below `root`."""
        return [os.path.join(self.root, *entry["path"].split("/")) for entry in self.files]

    def to_bytes(self) -> bytes:
        """The safetensors file of the index.

        Raises:
            ValueError: for an index whose header would be too long for safetensors to read it back.
        """
        document = {
            "format_version": INDEX_FORMAT_VERSION,
            **self.identity,
            "agriclip_version": self.agriclip_version,
            "root": self.root,
            "files": self.files,
            "skipped": self.skipped,
        }
        header = json.dumps(document, ensure_ascii=False, separators=(",", ":"))
        # The header stores the document as a JSON string, escaped once more, beside the tensor's entry.
        if len(json.dumps(header, ensure_ascii=False).encode("utf-8")) + 1000 > MAX_HEADER_BYTES:
            raise ValueError(
                f"an index of {len(self.files)} files needs a longer header than safetensors reads "
                f"({MAX_HEADER_BYTES // 1_000_000} MB): index the archive's folders into separate indexes"
            )
        return save({EMBEDDINGS_KEY: self.embeddings.contiguous()}, metadata={INDEX_KEY: header})


def read_index(path: str | os.PathLike) -> ImageIndex:
    """The index written to `path` by `agriclip index`.

    Raises:
        IndexFileError: naming the file, for a file that is not an index (e.g. an `agriclip embed` output), is
            corrupt, or whose rows and files disagree.
    """
    try:
        with safe_open(path, framework="pt") as handle:
            metadata = handle.metadata() or {}
            if INDEX_KEY not in metadata:
                raise IndexFileError(f"{path} is not an AgriCLIP index (its header has no {INDEX_KEY!r} entry)")
            embeddings = handle.get_tensor(EMBEDDINGS_KEY)
        document = json.loads(metadata[INDEX_KEY])
        if document.get("format_version") != INDEX_FORMAT_VERSION:
            raise IndexFileError(
                f"{path}: index format version {document.get('format_version')!r}; this agriclip reads version "
                f"{INDEX_FORMAT_VERSION}: build the index again"
            )
        index = ImageIndex(
            root=document["root"],
            files=document["files"],
            embeddings=embeddings,
            identity={key: document[key] for key in IDENTITY_FIELDS},
            agriclip_version=document["agriclip_version"],
            skipped=document["skipped"],
        )
    except (OSError, SafetensorError, ValueError, KeyError, TypeError) as error:
        if isinstance(error, IndexFileError):
            raise
        raise IndexFileError(f"{path} is not a readable AgriCLIP index: {error}") from error
    if embeddings.ndim != 2 or len(embeddings) != len(index.files):
        raise IndexFileError(
            f"{path}: {EMBEDDINGS_KEY} has shape {tuple(embeddings.shape)} for {len(index.files)} files"
        )
    return index


# ---------------------------------------------------------------------------------------------------------------
# Model identity
# ---------------------------------------------------------------------------------------------------------------


def model_source(model: str) -> str:
    """How an index names a model: a local folder by its absolute path (so that `runs/m` and `./runs/m` are one
    model, and the index can be searched from any folder), a Hub id as it is."""
    return os.path.realpath(model) if os.path.isdir(model) else model


def model_identity(classifier: ZeroShotClassifier, model: str) -> dict:
    """What makes embeddings comparable: the model, its Hub revision (None for a local folder), the image
    embedding and, for the fused one, its fusion weight."""
    return {
        "model": model_source(model),
        "revision": model_revision(classifier),
        "embedding": embedding_name(classifier),
        "fusion_weight": fusion_weight_of(classifier),
    }


def check_same_model(index_path, index_identity: dict, identity: dict, remedy: str) -> None:
    """Refuses a model whose embeddings are not comparable with the index's (exit code 2), naming each field of
    `identity` (all of `IDENTITY_FIELDS`, or only "model" before the model loads) that differs; `remedy` says what
    to do instead."""
    differences = [
        f"{key} {value!r} instead of {index_identity[key]!r}"
        for key, value in identity.items()
        if value != index_identity[key]
    ]
    if differences:
        raise CLIError(
            ExitCode.USAGE,
            f"{index_path} was built with another model: {'; '.join(differences)}. Its embeddings are not comparable "
            f"with this model's: {remedy}",
        )


# ---------------------------------------------------------------------------------------------------------------
# Building and updating
# ---------------------------------------------------------------------------------------------------------------


def scan_folder(folder: str) -> list[dict]:
    """The image files under `folder` in walk order, as index entries: {"path" below it with "/", "size",
    "mtime_ns"}. A file that vanishes during the walk is left out, as if the walk had come later."""
    entries = []
    for path in collect_images([folder]):
        try:
            status = os.stat(path)
        except FileNotFoundError:
            continue
        relative = Path(os.path.relpath(path, folder)).as_posix()
        entries.append({"path": relative, "size": status.st_size, "mtime_ns": status.st_mtime_ns})
    return entries


@dataclass
class IndexUpdate:
    """What `update_index` did: relative paths added (new files), re-embedded (changed on disk), dropped (gone, or
    no longer readable), and the decode counts of the files it embedded."""

    added: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    stats: DecodeStats = field(default_factory=DecodeStats)

    @property
    def unchanged(self) -> bool:
        return not (self.added or self.changed or self.dropped)


def update_index(
    classifier: ZeroShotClassifier,
    identity: dict,
    folder: str,
    entries: Sequence[dict],
    previous: ImageIndex | None = None,
    batch_size: int = 32,
    num_workers: int | None = None,
    progress: bool = False,
) -> tuple[ImageIndex, IndexUpdate]:
    """The index of `entries` (`scan_folder(folder)`): the rows of `previous` whose file is unchanged (same path,
    size and modification time) are kept, the other files embedded, in walk order.

    The caller checks that `identity` is `previous`'s (`check_same_model`): rows of two models cannot be mixed.
    """
    root = os.path.abspath(folder)
    known = {} if previous is None else {entry["path"]: row for row, entry in enumerate(previous.files)}
    reused, pending = {}, []
    for entry in entries:
        row = known.get(entry["path"])
        if row is not None and previous.files[row] == entry:
            reused[entry["path"]] = row
        else:
            pending.append(entry)

    update = IndexUpdate()
    pending_paths = [os.path.join(root, *entry["path"].split("/")) for entry in pending]
    kept, embedded, update.stats = embed_files(classifier, pending_paths, batch_size, num_workers, progress)
    relative = dict(zip(pending_paths, (entry["path"] for entry in pending)))
    offset = 0 if previous is None else len(previous.embeddings)
    fresh = {relative[path]: offset + row for row, path in enumerate(kept)}

    files, rows = [], []
    for entry in entries:
        row = reused.get(entry["path"], fresh.get(entry["path"]))
        if row is not None:
            files.append(entry)
            rows.append(row)
    update.added = [path for path in fresh if path not in known]
    update.changed = [path for path in fresh if path in known]
    indexed = {entry["path"] for entry in files}
    update.dropped = [path for path in known if path not in indexed]

    stored = embedded if previous is None else torch.cat([previous.embeddings, embedded])
    embeddings = stored[torch.tensor(rows, dtype=torch.long)] if rows else stored[:0]
    skipped = [
        {"image": relative[path], "error": reason} for path, reason in skipped_files(pending_paths, update.stats)
    ]
    index = ImageIndex(root=root, files=files, embeddings=embeddings, identity=identity, skipped=skipped)
    return index, update


# ---------------------------------------------------------------------------------------------------------------
# Search
# ---------------------------------------------------------------------------------------------------------------


def import_faiss():
    """FAISS, the optional extra `agriclip[search]`, imported only when a search asks for it."""
    try:
        import faiss
    except ImportError as error:
        raise ImportError(
            f'FAISS search needs the faiss-cpu package ({error}): pip install "agriclip[search]"'
        ) from error
    return faiss


def search_embeddings(
    embeddings: torch.Tensor, queries: torch.Tensor, top_k: int, backend: str = "torch"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact cosine search: the `top_k` (at most all) best (scores, row indices), each (Q, k), best first, of the
    L2-normalised `queries` (Q, D) among the L2-normalised `embeddings` (N, D), in torch or FAISS."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    top_k = min(top_k, len(embeddings))
    queries = queries.to(embeddings.dtype)
    if backend == "faiss":
        # The kernel of FAISS's exact IndexFlatIP, on the rows where they are: an index would copy them first.
        faiss = import_faiss()
        rows, queries = np.ascontiguousarray(embeddings.numpy()), np.ascontiguousarray(queries.numpy())
        scores, indices = faiss.knn(queries, rows, top_k, metric=faiss.METRIC_INNER_PRODUCT)
        return torch.from_numpy(scores), torch.from_numpy(indices)
    return (queries @ embeddings.T).topk(top_k, dim=-1)


@dataclass
class SearchResult:
    """Per query (a text, or an image path), its matches {"image": path, "score": cosine similarity}, best first;
    `skipped` names the query images that could not be read."""

    queries: list[str]
    matches: list[list[dict]]
    skipped: list[tuple[str, str]] = field(default_factory=list)


def search_index(
    index: ImageIndex, queries: Sequence[str], query_embeds: torch.Tensor, top_k: int, backend: str = "torch"
) -> SearchResult:
    """The `top_k` photos of `index` nearest to each query embedding (row i of `query_embeds` is `queries[i]`)."""
    scores, rows = search_embeddings(index.embeddings, query_embeds, top_k, backend)
    paths = index.paths
    matches = [
        [{"image": paths[row], "score": score} for score, row in zip(row_scores, row_indices)]
        for row_scores, row_indices in zip(scores.tolist(), rows.tolist())
    ]
    return SearchResult(list(queries), matches)


def format_search_table(result: SearchResult) -> str:
    """Query, rank, image and score columns, aligned by display width."""
    rows = [SEARCH_COLUMNS] + [
        (query, str(rank), match["image"], f"{match['score']:.4f}")
        for query, matches in zip(result.queries, result.matches)
        for rank, match in enumerate(matches, start=1)
    ]
    widths = [max(display_width(row[column]) for row in rows) for column in range(len(SEARCH_COLUMNS))]
    lines = [
        "  ".join(
            text.rjust(widths[column]) if column == 1 else text + " " * (widths[column] - display_width(text))
            for column, text in enumerate(row)
        ).rstrip()
        for row in rows
    ]
    return "\n".join(lines) + "\n"


def format_search_csv(result: SearchResult) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow((*SEARCH_COLUMNS, "error"))
    for query, matches in zip(result.queries, result.matches):
        for rank, match in enumerate(matches, start=1):
            writer.writerow((query, rank, match["image"], repr(match["score"]), ""))
    for path, reason in result.skipped:
        writer.writerow((path, "", "", "", reason))
    return buffer.getvalue()


def format_search_json(result: SearchResult, header: dict) -> str:
    document = {
        **header,
        "results": [{"query": query, "matches": matches} for query, matches in zip(result.queries, result.matches)],
        "skipped": [{"image": path, "error": reason} for path, reason in result.skipped],
    }
    return json.dumps(document, indent=2, ensure_ascii=False) + "\n"


def render_search(result: SearchResult, output_format: str, header: dict) -> str:
    if output_format == "table":
        return format_search_table(result)
    if output_format == "csv":
        return format_search_csv(result)
    return format_search_json(result, header)


# ---------------------------------------------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------------------------------------------


def _read_index_argument(path) -> ImageIndex:
    try:
        return read_index(path)
    except IndexFileError as error:
        raise CLIError(ExitCode.INPUT, str(error)) from error


def run_index(args) -> ExitCode:
    """`agriclip index DIR --output INDEX`: builds the index, or brings an existing one up to date."""
    previous = _read_index_argument(args.output) if args.output.exists() else None
    remedy = "pass the index's --model and --embedding to update it, or write a new index to another --output"
    if previous is not None:  # before the model loads
        check_same_model(args.output, previous.identity, {"model": model_source(args.model)}, remedy)
    entries = scan_folder(args.folder)
    classifier = load_classifier(args.model, resolve_device(args.device), args.batch_size, args.embedding)
    identity = model_identity(classifier, args.model)
    if previous is not None:
        check_same_model(args.output, previous.identity, identity, remedy)
    index, update = update_index(
        classifier, identity, args.folder, entries, previous, args.batch_size, args.num_workers, progress=True
    )
    _report_skipped(update.stats)
    if not index.files:
        raise CLIError(ExitCode.UNREADABLE, f"none of the images could be read: {update.stats.summary()}")
    if previous is not None and update.unchanged and (index.root, index.skipped) == (previous.root, previous.skipped):
        print(f"{args.output} is up to date: {len(index.files)} images", file=sys.stderr)
        return ExitCode.OK
    try:
        data = index.to_bytes()
    except ValueError as error:
        raise CLIError(ExitCode.OUTPUT, f"cannot write {args.output}: {error}") from error
    _write({args.output: lambda handle: handle.write(data)})
    print(
        f"indexed {len(index.files)} images ({len(update.added)} new, {len(update.changed)} changed, "
        f"{len(update.dropped)} dropped, {len(index.skipped)} unreadable skipped); wrote {args.output}",
        file=sys.stderr,
    )
    return ExitCode.OK


def _query_embeddings(args, classifier: ZeroShotClassifier) -> tuple[list[str], torch.Tensor, list[tuple[str, str]]]:
    """(queries, their embeddings, unreadable query images) of `--text` or `--image`."""
    if args.text:
        return list(args.text), classifier.text_embeddings(args.text), []
    files = collect_images(args.image)
    kept, embeddings, stats = embed_files(classifier, files, args.batch_size, num_workers=0)
    if not kept:
        raise CLIError(ExitCode.UNREADABLE, f"none of the query images could be read: {stats.summary()}")
    _report_skipped(stats)
    return kept, embeddings, skipped_files(files, stats)


def run_search(args) -> ExitCode:
    """`agriclip search INDEX --text ... | --image ...`: the nearest photos of each query, with the index's model."""
    index = _read_index_argument(args.index)
    identity = index.identity
    model = identity["model"] if args.model is None else args.model
    remedy = "search it with the model that built it (omit --model), or index the photos with this model"
    check_same_model(args.index, identity, {"model": model_source(model)}, remedy)  # before the model loads
    device = resolve_device(args.device)
    classifier = load_classifier(model, device, args.batch_size, identity["embedding"], identity["fusion_weight"])
    check_same_model(args.index, identity, model_identity(classifier, model), remedy)
    queries, query_embeds, skipped = _query_embeddings(args, classifier)
    try:
        result = search_index(index, queries, query_embeds, args.top_k, args.backend)
    except ImportError as error:
        raise CLIError(ExitCode.USAGE, f"--backend faiss: {error}") from error
    result.skipped = skipped
    header = {"index": str(args.index), **identity, "agriclip_version": package_version(), "backend": args.backend}
    sys.stdout.write(render_search(result, args.format, header))
    return ExitCode.OK
