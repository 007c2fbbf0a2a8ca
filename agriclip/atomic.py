"""Files written whole or not at all.

Every file a command of this package writes goes through here: the content is written to a hidden temporary file
beside the target, flushed to disk, and renamed over the target (`os.replace` is atomic on one file system). A
failure at any point (disk full, a crash, Ctrl-C) leaves the previous file exactly as it was and no temporary file
behind. Imports only the standard library, so any layer may use it.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def _fsync_directory(directory: Path) -> None:
    """Makes a rename in `directory` durable (a no-op where directories cannot be opened, e.g. Windows)."""
    try:
        descriptor = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a temporary path beside `path` for a writer that wants a file name (`savefig`, `save_file`, ...).

    The temporary name keeps the suffix of `path`, so writers that choose a format by suffix choose the same one.
    When the block succeeds, the file is synced and renamed over `path`; when it fails, the temporary file is
    removed and `path` is untouched. The parent folder is created when missing.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.stem}.{secrets.token_hex(4)}.tmp{path.suffix}")
    try:
        yield staging
        with open(staging, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(staging, path)
    except BaseException:
        staging.unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)


@contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", encoding: str | None = "utf-8", newline: str | None = None):
    """`open(path, mode)` for writing ("w" or "wb") whose result replaces `path` only when the block succeeds."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open writes whole files: mode must be 'w' or 'wb', got {mode!r}")
    with atomic_path(path) as staging:
        with open(staging, mode, encoding=None if "b" in mode else encoding, newline=newline) as handle:
            yield handle


def write_text_atomically(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> None:
    with atomic_open(path, "w", encoding=encoding) as handle:
        handle.write(text)


def write_bytes_atomically(path: str | os.PathLike, data: bytes) -> None:
    with atomic_open(path, "wb") as handle:
        handle.write(data)


def write_json_atomically(path: str | os.PathLike, value, indent: int | None = 2) -> None:
    """`value` as JSON (UTF-8, non-ASCII kept as is, a final newline)."""
    write_text_atomically(path, json.dumps(value, indent=indent, ensure_ascii=False) + "\n")


def replace_folder(staging: str | os.PathLike, target: str | os.PathLike) -> None:
    """Puts the complete folder `staging` in the place of `target` (which need not exist) by two renames.

    `os.replace` cannot rename a folder over another, so `target` is first moved aside to `.previous-<name>` and
    removed once `staging` is in place. A process killed between the two renames leaves the previous folder there
    and no `target`; the next call removes it.
    """
    target = Path(target)
    previous = target.with_name(f".previous-{target.name}")
    shutil.rmtree(previous, ignore_errors=True)
    if target.exists():
        os.replace(target, previous)
    os.replace(staging, target)
    shutil.rmtree(previous, ignore_errors=True)


def replace_entries(staging: str | os.PathLike, folder: str | os.PathLike, owned) -> None:
    """Moves every entry of the complete folder `staging` into `folder`, in the place of the entries named `owned`
    there (those of a previous build, also the ones this build did not make), then removes `staging`.

    For builders that write into a folder the user may keep other files in: those stay. The previous entries are
    first moved into `folder/.previous` and removed only once the new ones are in; all renames stay inside
    `folder`. A process killed in between leaves the previous entries in `.previous`, which the next call removes.
    """
    staging, folder = Path(staging), Path(folder)
    previous = folder / ".previous"
    shutil.rmtree(previous, ignore_errors=True)
    previous.mkdir()
    for name in owned:
        if os.path.lexists(folder / name):
            os.replace(folder / name, previous / name)
    for entry in sorted(staging.iterdir()):
        os.replace(entry, folder / entry.name)
    shutil.rmtree(previous)
    shutil.rmtree(staging)


__all__ = [
    "atomic_open",
    "atomic_path",
    "replace_entries",
    "replace_folder",
    "write_bytes_atomically",
    "write_json_atomically",
    "write_text_atomically",
]
