"""Files that other files name: image paths in metadata rows, weight shards in a safetensors index.

Such names come from data a user may not have written (a downloaded dataset, a tampered checkpoint), so they are
checked before anything is opened: an image path must stay inside the folder of the file that names it (the rule of
every loader), and only regular files are opened (a FIFO or a device would block or never end). Imports only the
standard library and safetensors, so any layer may use it.
"""

from __future__ import annotations

import json
import math
import os
import stat
from collections import Counter
from pathlib import Path

from safetensors import SafetensorError, safe_open


# The names transformers saves weights under (`transformers.utils.SAFE_WEIGHTS_NAME` and `SAFE_WEIGHTS_INDEX_NAME`),
# spelled out so that this module does not import transformers.
SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"


class ContainedPaths:
    """Resolves the image paths that a metadata file (or CSV) names against `root`, the folder holding that file.

    A name must be a relative path that stays inside `root`, also once symlinks are followed: an absolute path, a
    URL, `..` climbing out of `root` or a symlink leading out of it is refused. This is the rule `datasets`
    applies to the `file_name` of an image folder's metadata (there without the symlink check), applied to every
    loader. Each folder is resolved and listed once (its symlinks, by one `scandir`), so that checking the many
    files of a folder needs no system call per file.
    """

    def __init__(self, root: str | os.PathLike, what: str = "image path"):
        self.root = Path(root)
        self.what = what
        self._real_root = os.path.realpath(self.root)
        self._folders: dict[str, tuple[bool, frozenset | None]] = {}

    def _inside(self, real: str) -> bool:
        return real == self._real_root or real.startswith(self._real_root.rstrip(os.sep) + os.sep)

    def _folder(self, folder: str) -> tuple[bool, frozenset | None]:
        """Whether `folder` lies inside `root` once resolved, and the names of the symlinks in it (None when it
        cannot be listed)."""
        if folder not in self._folders:
            try:
                links = frozenset(entry.name for entry in os.scandir(folder) if entry.is_symlink())
            except OSError:
                links = None
            self._folders[folder] = (self._inside(os.path.realpath(folder)), links)
        return self._folders[folder]

    def problem(self, name) -> str | None:
        """Why `name` is refused, or None when `root / name` stays inside `root`."""
        if not isinstance(name, str) or not name.strip():
            return f"the {self.what} is {name!r}; give a path relative to {self.root}"
        if "://" in name or os.path.isabs(name) or os.path.splitdrive(name)[0]:
            return f"the {self.what} {name!r} is absolute or a URL; it must be relative to {self.root}"
        path = os.path.normpath(os.path.join(self.root, name))
        folder, file = os.path.split(path)
        inside, links = self._folder(folder)
        if inside and links is not None and file not in links:
            return None
        real = os.path.realpath(path)
        if self._inside(real):
            return None
        return (
            f"the {self.what} {name!r} leads outside {self.root} (through '..' or a symlink, to {real}); it must "
            "stay inside the folder of the file that names it"
        )

    def __call__(self, name: str, where: str) -> str:
        """The path `root/name` (a string: loaders check millions), or a ValueError that starts with `where` (the file
        and row that named it)."""
        problem = self.problem(name)
        if problem is not None:
            raise ValueError(f"{where}: {problem}")
        return os.path.join(self.root, name)


def check_regular_file(path: str | os.PathLike) -> None:
    """Checks, without opening it, that `path` is a regular file (following symlinks).

    Raises:
        FileNotFoundError: when nothing is there.
        ValueError: for a FIFO, a device, a socket or a folder, which this package never opens as a file.
    """
    mode = os.stat(path).st_mode
    if not stat.S_ISREG(mode):
        kind = "a folder" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else "a device or socket"
        raise ValueError(f"{path} is {kind}, not a regular file: it is never opened; replace it with the real file")


def check_folder_files(folder: str | os.PathLike) -> None:
    """Checks that every entry of a model folder is a regular file or a folder before transformers opens any of
    them (an AutoConfig or tokenizer load opens files by name, and a FIFO there would block it forever).

    Raises:
        ValueError: naming the first entry that is a FIFO, a device or a socket.
    """
    for entry in sorted(os.scandir(folder), key=lambda entry: entry.name):
        try:
            if not entry.is_dir():
                check_regular_file(entry.path)
        except FileNotFoundError:
            continue  # a dangling symlink: transformers reports it as missing if it needs it


def weight_files(folder: str | os.PathLike) -> list[Path]:
    """The safetensors files of a checkpoint folder, in the order `from_pretrained` looks for them:
    `model.safetensors`, else the shards its index names.

    Each is checked to be a regular file inside the folder before anything opens it.

    Raises:
        FileNotFoundError: when the folder has neither an index nor `model.safetensors`.
        ValueError: naming the file, for an unreadable index, a shard outside the folder, or a non-regular file.
    """
    folder = Path(folder)
    index = folder / SAFE_WEIGHTS_INDEX_NAME
    if os.path.lexists(folder / SAFE_WEIGHTS_NAME) or not os.path.lexists(index):
        check_regular_file(folder / SAFE_WEIGHTS_NAME)
        return [folder / SAFE_WEIGHTS_NAME]
    check_regular_file(index)
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        shards = sorted(set(weight_map.values()), key=str)
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise ValueError(
            f"{index}: not a safetensors index (JSON with a weight_map of tensor names to files): {error!r}; "
            "export the checkpoint again with save_pretrained"
        ) from error
    names = ContainedPaths(folder, what="shard")
    files = [Path(names(name, f"{index}: weight_map")) for name in shards]
    for path in files:
        try:
            check_regular_file(path)
        except FileNotFoundError as error:
            raise ValueError(f"{index} names {path.name}, which is missing: the checkpoint is incomplete") from error
    return files


def parameter_counts(checkpoint_dir: str | os.PathLike) -> Counter:
    """Parameters per top-level module (`text_model`, `dino_model`, `aligner`, ...) read from the safetensors
    headers, without loading the weights.

    Raises:
        FileNotFoundError: when the folder holds no safetensors weights (a config-only folder).
        ValueError: naming the file, for a forged or corrupt header and for the cases of `weight_files`.
    """
    counts = Counter()
    for path in weight_files(checkpoint_dir):
        try:
            with safe_open(path, framework="pt") as weights:
                for key in weights.keys():
                    counts[key.split(".")[0]] += math.prod(weights.get_slice(key).get_shape())
        except SafetensorError as error:
            raise ValueError(
                f"{path}: not a readable safetensors file ({error}): it is truncated, corrupt or forged; export the "
                "checkpoint again with save_pretrained"
            ) from error
    return counts


def check_hub_id(source) -> None:
    """A missing local path is an error here, not a Hub lookup: Hub ids are "name" or "org/name"."""
    text = str(source)
    if not Path(text).exists() and (text.startswith((".", "/", "~")) or text.count("/") > 1 or "\\" in text):
        raise FileNotFoundError(f"{text}: no such file or folder")


__all__ = [
    "ContainedPaths",
    "SAFE_WEIGHTS_INDEX_NAME",
    "SAFE_WEIGHTS_NAME",
    "check_folder_files",
    "check_hub_id",
    "check_regular_file",
    "parameter_counts",
    "weight_files",
]
