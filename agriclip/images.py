"""Robust image decoding: every photo becomes 8-bit RGB with its EXIF orientation, or a counted, named skip.

Used wherever images are read (training collators, evaluation, the command line); imports only PIL and numpy so
that it loads fast.
"""

from __future__ import annotations

import io
import struct
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError


# PIL's default warning threshold (1024 * 1024 * 1024 // 4 // 3 pixels), enforced here rather than through PIL's
# process-global `Image.MAX_IMAGE_PIXELS`, which any other library may change.
MAX_IMAGE_PIXELS = 89_478_485


class ImageDecodeError(ValueError):
    """An image that cannot be decoded. `reason` is one of a few short keys used to count skipped files."""

    def __init__(self, path: str, reason: str, detail: str | None = None):
        self.path = str(path)
        self.reason = reason
        self.detail = detail
        super().__init__(f"{self.path}: {reason}" + (f" ({detail})" if detail else ""))

    def __reduce__(self):
        # Rebuilt from its fields when it crosses a process boundary (decoding worker pools).
        return type(self), (self.path, self.reason, self.detail)


def read_image_bytes(source) -> tuple[str, bytes]:
    """Returns (name for messages, raw bytes) of a path, raw bytes, or a `datasets` `{"path", "bytes"}` dict."""
    if isinstance(source, Mapping):
        if source.get("bytes") is not None:
            return source.get("path") or "<bytes>", source["bytes"]
        if source.get("path") is None:
            raise ImageDecodeError("<unknown>", "missing file", "row has neither path nor bytes")
        source = source["path"]
    if isinstance(source, (bytes, bytearray)):
        return "<bytes>", bytes(source)
    path = str(source)
    try:
        with open(path, "rb") as handle:
            return path, handle.read()
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as error:
        raise ImageDecodeError(path, "missing file", error.strerror) from error


def _to_rgb(image: Image.Image) -> Image.Image:
    """Converts any PIL mode to 8-bit RGB: transparency composited on white, high bit depths scaled, not clipped."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # 16-bit samples (I is PIL's 32-bit container for 16-bit PNG and TIFF data): 65535 maps to 255.
        array = np.clip(np.asarray(image, dtype=np.float64) / 257.0, 0, 255)
        return Image.fromarray(array.round().astype(np.uint8), "L").convert("RGB")
    if image.mode == "F":
        # Floating-point images follow the [0, 1] convention of the scientific imaging libraries.
        array = np.clip(np.asarray(image, dtype=np.float64) * 255.0, 0, 255)
        return Image.fromarray(array.round().astype(np.uint8), "L").convert("RGB")
    if "transparency" in image.info and image.mode in ("P", "L", "RGB", "1"):
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "RGBa", "LA", "La", "PA"):
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, image.convert("RGBA")).convert("RGB")
    return image.convert("RGB")


def open_image(source) -> Image.Image:
    """Decodes an image to RGB with its EXIF orientation applied.

    Args:
        source: a file path, raw bytes, or a `datasets` image dict `{"path": ..., "bytes": ...}` (bytes win).

    Raises:
        ImageDecodeError: for a missing, empty, truncated or corrupt file, or one larger than `MAX_IMAGE_PIXELS`.
    """
    path, data = read_image_bytes(source)
    if not data:
        raise ImageDecodeError(path, "empty file")
    try:
        with warnings.catch_warnings():
            # The size is checked below against MAX_IMAGE_PIXELS; PIL's own warning would only repeat it.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as error:
        raise ImageDecodeError(path, "too large", str(error)) from error
    except UnidentifiedImageError as error:
        raise ImageDecodeError(path, "corrupt", "not a recognised image format") from error
    except (OSError, SyntaxError, ValueError, EOFError) as error:
        reason = "truncated" if "truncated" in str(error).lower() else "corrupt"
        raise ImageDecodeError(path, reason, str(error)) from error
    if image.width * image.height > MAX_IMAGE_PIXELS:
        raise ImageDecodeError(path, "too large", f"{image.width}x{image.height} exceeds {MAX_IMAGE_PIXELS} pixels")
    try:
        image.load()
        image = ImageOps.exif_transpose(image)
        return _to_rgb(image)
    # struct.error escapes from PIL's parser of malformed EXIF blocks.
    except (OSError, SyntaxError, ValueError, EOFError, struct.error) as error:
        reason = "truncated" if "truncated" in str(error).lower() else "corrupt"
        raise ImageDecodeError(path, reason, str(error)) from error


@dataclass
class DecodeStats:
    """Counts decoded images and the files skipped per reason.

    Mergeable with `+=`; `to_dict`/`from_dict` carry it across processes (e.g. through `gather_object`).
    """

    decoded: int = 0
    skipped: dict[str, list[str]] = field(default_factory=dict)

    def record(self, error: ImageDecodeError) -> None:
        self.skipped.setdefault(error.reason, []).append(error.path)

    @property
    def num_skipped(self) -> int:
        return sum(len(paths) for paths in self.skipped.values())

    def __iadd__(self, other: DecodeStats) -> DecodeStats:
        self.decoded += other.decoded
        for reason, paths in other.skipped.items():
            self.skipped.setdefault(reason, []).extend(paths)
        return self

    def to_dict(self) -> dict:
        return {"decoded": self.decoded, "skipped": {reason: list(paths) for reason, paths in self.skipped.items()}}

    @classmethod
    def from_dict(cls, state: Mapping) -> DecodeStats:
        return cls(decoded=int(state["decoded"]), skipped={r: list(p) for r, p in state["skipped"].items()})

    def summary(self, max_names: int = 20) -> str:
        """One line of totals, then one line per reason naming up to `max_names` files."""
        lines = [f"decoded {self.decoded} images, skipped {self.num_skipped}"]
        for reason, paths in sorted(self.skipped.items()):
            names = ", ".join(paths[:max_names])
            more = f" and {len(paths) - max_names} more" if len(paths) > max_names else ""
            lines.append(f"  {reason} ({len(paths)}): {names}{more}")
        return "\n".join(lines)


def decode_rows(rows: Sequence[Mapping], stats: DecodeStats) -> list[tuple[Mapping, Image.Image]]:
    """Decodes the `image` of each row; bad rows are recorded in `stats` and dropped."""
    decoded = []
    for row in rows:
        try:
            image = open_image(row["image"])
        except ImageDecodeError as error:
            stats.record(error)
            continue
        stats.decoded += 1
        decoded.append((row, image))
    return decoded


# Key of the batch entry that carries the `DecodeStats` of the batch's rows (see `DecodingCollator`).
DECODE_REPORT = "decode_report"


class DecodingCollator:
    """Base of the collators: decodes the rows' images, skipping those that cannot be read, and collates the rest.

    Each batch carries the `DecodeStats` of its own rows under `DECODE_REPORT` instead of counting in `stats`
    directly: in a DataLoader worker, `stats` is the worker's copy, which never comes back. `counted(loader)`
    merges the reports into `stats` in the process that consumes the batches. A batch in which no image could be
    read holds only its report and comes out of `counted` as None.

    `epoch` is the epoch of the batches being collated. The training loop (`training.runtime.resumable_batches`)
    sets it before each epoch's iterator is created, which is when DataLoader workers receive their copy of the
    collator (so `persistent_workers` would keep the first epoch's).
    """

    def __init__(self, stats: DecodeStats | None = None):
        self.stats = stats if stats is not None else DecodeStats()
        self.epoch = 0

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
