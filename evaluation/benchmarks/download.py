"""Fetches a catalogue task that is published on the Hugging Face Hub and lays it out as the suite reads it.

`download_task` pins the revision (the catalogue's, else the branch's commit at the first try, recorded so that a
resumed download never mixes two commits), fetches the task's folder with `huggingface_hub.snapshot_download` into
``<data-root>/.downloads/<task>/`` (a rerun fetches only the files still missing), checks every file against the
catalogue's sha256 or the repo's own hash (refetching a file that does not match, once), checks the class folders,
and hard-links the class folders into ``<data-root>/<task>/``, which it replaces whole.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from huggingface_hub import HfApi, get_hf_file_metadata, hf_hub_download, hf_hub_url, snapshot_download
from huggingface_hub.errors import HfHubHTTPError
from huggingface_hub.utils import filter_repo_objects

from agriclip.atomic import replace_folder, write_json_atomically

from . import Task, check_task_folder


DOWNLOADS = ".downloads"
CHUNK = 1 << 20


def file_hash(path: Path, algorithm: str) -> str:
    """The sha256 of a file, or its git blob sha1 (the id the Hub gives a file not stored in LFS)."""
    digest = hashlib.new(algorithm)
    if algorithm == "sha1":
        digest.update(f"blob {path.stat().st_size}\0".encode())
    with open(path, "rb") as handle:
        while block := handle.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


def _record_path(data_root: Path, task: Task) -> Path:
    return data_root / DOWNLOADS / f"{task.name}.json"


def pinned_revision(task: Task, data_root: Path) -> str:
    """The commit this task is downloaded from: the catalogue's revision, else the one a previous (maybe interrupted)
    try recorded, else the branch `main`'s commit now, recorded before anything is fetched."""
    source = task.hub
    record_path = _record_path(data_root, task)
    record = json.loads(record_path.read_text()) if record_path.is_file() else {}
    if source.revision is not None:
        revision = source.revision
    elif record.get("repo_id") == source.repo_id and record.get("revision"):
        return record["revision"]
    else:
        revision = HfApi().dataset_info(source.repo_id, revision="main").sha
    write_json_atomically(record_path, {"repo_id": source.repo_id, "revision": revision, "sha256": {}})
    return revision


def _patterns(task: Task) -> list[str] | None:
    """The `allow_patterns` of the task's folder in the repo (None: the whole repo)."""
    return None if task.hub.folder is None else [f"{task.hub.folder.strip('/')}/*"]


def _repo_files(task: Task, revision: str) -> list[str]:
    files = HfApi().list_repo_files(task.hub.repo_id, repo_type="dataset", revision=revision)
    return sorted(filter_repo_objects(files, allow_patterns=_patterns(task)))


def expected_hash(task: Task, revision: str, filename: str) -> tuple[str, str]:
    """(algorithm, hex digest) a file must have: the catalogue's sha256, else the repo's ETag for it, which the Hub
    sets to the sha256 of an LFS file and to the git blob sha1 of any other."""
    if filename in task.hub.sha256:
        return "sha256", task.hub.sha256[filename]
    url = hf_hub_url(task.hub.repo_id, filename, repo_type="dataset", revision=revision)
    etag = get_hf_file_metadata(url).etag
    return ("sha256" if len(etag) == 64 else "sha1"), etag


def verify(task: Task, revision: str, snapshot: Path, files: list[str]) -> dict[str, str]:
    """Checks every downloaded file's hash, refetching a mismatching file once; returns {file: sha256}."""
    checked = {}
    for filename in files:
        algorithm, expected = expected_hash(task, revision, filename)
        path = snapshot / filename
        if file_hash(path, algorithm) != expected:
            hf_hub_download(
                task.hub.repo_id,
                filename,
                repo_type="dataset",
                revision=revision,
                local_dir=snapshot,
                force_download=True,
            )
            actual = file_hash(path, algorithm)
            if actual != expected:
                raise ValueError(
                    f"{path}: {algorithm} {actual} differs from {expected}, that of {filename} in "
                    f"{task.hub.repo_id}@{revision}, also when fetched again"
                )
        checked[filename] = file_hash(path, "sha256") if algorithm != "sha256" else expected
    return checked


def lay_out(task: Task, source: Path, target: Path) -> None:
    """Hard-links the class folders of `source` into a new `target` (`<data-root>/<task>`), which replaces the
    previous one only once complete."""
    classes = check_task_folder(task, source)
    staging = target.with_name(f".staging-{target.name}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    for name in classes:
        shutil.copytree(source / name, staging / name, copy_function=os.link)
    replace_folder(staging, target)


def download_task(task: Task, data_root: Path) -> Path:
    """Downloads, verifies and lays out one Hub task (see the module docstring); returns its folder."""
    if task.hub is None:
        raise ValueError(f"{task.name}: not on the Hub; see `python -m evaluation.benchmarks download {task.name}`")
    source = task.hub
    revision = pinned_revision(task, data_root)
    snapshot = data_root / DOWNLOADS / task.name
    files = _repo_files(task, revision)
    if not files:
        raise ValueError(f"{source.repo_id}@{revision}: no files under {source.folder or 'the repo root'}")
    try:
        snapshot_download(
            source.repo_id,
            repo_type="dataset",
            revision=revision,
            local_dir=snapshot,
            allow_patterns=_patterns(task),
        )
    except (HfHubHTTPError, OSError) as error:
        kept = sum(1 for name in files if (snapshot / name).is_file())
        raise OSError(
            f"{task.name}: the download of {source.repo_id}@{revision} stopped ({str(error).splitlines()[0]}); "
            f"{kept} of {len(files)} files are kept in {snapshot}: run the same command again to resume"
        ) from error
    sha256 = verify(task, revision, snapshot, files)
    write_json_atomically(
        _record_path(data_root, task), {"repo_id": source.repo_id, "revision": revision, "sha256": sha256}
    )
    target = data_root / task.name
    lay_out(task, snapshot / (source.folder or ""), target)
    return target


__all__ = ["download_task", "expected_hash", "file_hash", "lay_out", "pinned_revision", "verify"]
