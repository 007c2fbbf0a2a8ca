"""Classify photos offline with an exported AgriCLIP classifier: onnxruntime, Pillow and numpy, nothing else.

`agriclip export` copies this file into the export folder as `runner.py`, beside `model.onnx` (and
`model.int8.onnx` when quantised), `labels.json` and `preprocessing.json`. On the device:

    pip install onnxruntime pillow numpy
    python runner.py photos/ --top-k 3                  # a folder (walked), files or both
    python runner.py photos/ --model model.int8.onnx --format json
    python runner.py photos/ --labels "leaf rust,healthy leaf"  # an open-vocabulary export (needs `tokenizers`)

Each photo is decoded as the `agriclip` command decodes it (EXIF orientation applied, converted to RGB), resized so
that its shorter side is the export's size, centre-cropped and normalised as `preprocessing.json` says: the steps
of the model's image processor. A file that cannot be read is skipped and named on stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def preprocess(image: Image.Image, spec: dict) -> np.ndarray:
    """The model input (3, H, W) float32 of an RGB photo: shorter side resized to `spec["shortest_edge"]` with
    `spec["resample"]` (a PIL filter number), centre crop of `spec["crop_size"]` (height, width), then
    `(pixels * spec["rescale_factor"] - mean) / std` per channel."""
    width, height = image.size
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = spec["shortest_edge"], int(spec["shortest_edge"] * long / short)
    size = (new_short, new_long) if width <= height else (new_long, new_short)
    pixels = np.asarray(image.resize(size, resample=spec["resample"]), dtype=np.float64)
    crop_height, crop_width = spec["crop_size"]
    top, left = (pixels.shape[0] - crop_height) // 2, (pixels.shape[1] - crop_width) // 2
    pixels = pixels[top : top + crop_height, left : left + crop_width]
    pixels = (pixels * spec["rescale_factor"]).astype(np.float32)
    pixels = (pixels - np.asarray(spec["image_mean"], np.float32)) / np.asarray(spec["image_std"], np.float32)
    return pixels.transpose(2, 0, 1)


def open_photo(path: str) -> Image.Image:
    """The photo at `path`, upright and RGB."""
    with Image.open(path) as image:
        image = ImageOps.exif_transpose(image)
        return image.convert("RGB")


def find_photos(inputs: list[str]) -> list[str]:
    """Image files among `inputs` (files as given; folders walked, in sorted order)."""
    found = []
    for item in inputs:
        if os.path.isdir(item):
            for root, folders, files in os.walk(item):
                folders.sort()
                found += [os.path.join(root, name) for name in sorted(files) if name.lower().endswith(IMAGE_SUFFIXES)]
        else:
            found.append(item)
    return found


def _normalised(rows: np.ndarray) -> np.ndarray:
    return rows / np.linalg.norm(rows, axis=-1, keepdims=True)


class Classifier:
    """The exported classifier in `folder`: `classify(paths)` gives each readable photo's labels, best first.

    `model` is the image graph to run (default: model.onnx, or image_encoder.onnx for an open-vocabulary export;
    its .int8.onnx twin where exported). An open-vocabulary export takes `labels` and `templates` (default: those of
    labels.json) and embeds them once with its text encoder; that needs the `tokenizers` package.
    """

    def __init__(self, folder, model: str | None = None, threads: int = 0, labels=None, templates=None):
        import onnxruntime

        folder = Path(folder)
        self.config = json.loads((folder / "labels.json").read_text(encoding="utf-8"))
        self.spec = json.loads((folder / "preprocessing.json").read_text(encoding="utf-8"))
        self.open_vocabulary = self.config.get("open_vocabulary", False)
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads

        def session(name: str):
            return onnxruntime.InferenceSession(str(folder / name), options, providers=["CPUExecutionProvider"])

        self.session = session(model or ("image_encoder.onnx" if self.open_vocabulary else "model.onnx"))
        self.labels = list(labels or self.config["labels"])
        if not self.open_vocabulary:
            if labels is not None and self.labels != self.config["labels"]:
                raise ValueError(f"{folder} is a closed-vocabulary export of {self.config['labels']}: re-export it")
            return
        if not self.labels:
            raise ValueError(f"{folder} exports no default labels: give labels")
        from tokenizers import Tokenizer

        self.tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        self.text_session = session("text_encoder.onnx")
        self.templates = list(templates or self.config["templates"])
        self.weight = self.config["logit_scale"] * self.label_embeddings(self.labels, self.templates)

    def text_embeddings(self, texts: list[str]) -> np.ndarray:
        """L2-normalised text embeddings (len(texts), D), tokenised as the model's processor tokenises them."""
        encodings = self.tokenizer.encode_batch(texts)
        inputs = {
            "input_ids": np.asarray([encoding.ids for encoding in encodings], dtype=np.int64),
            "attention_mask": np.asarray([encoding.attention_mask for encoding in encodings], dtype=np.int64),
        }
        return self.text_session.run(["text_embeds"], inputs)[0]

    def label_embeddings(self, labels: list[str], templates: list[str]) -> np.ndarray:
        """Per label, the normalised mean of its normalised template embeddings (C, D)."""
        prompts = self.text_embeddings([template.format(label) for label in labels for template in templates])
        return _normalised(_normalised(prompts).reshape(len(labels), len(templates), -1).mean(axis=1))

    def probabilities(self, pixel_values: np.ndarray) -> np.ndarray:
        """The label probabilities (N, C) of model inputs (N, 3, H, W)."""
        if not self.open_vocabulary:
            return self.session.run(["probabilities"], {"pixel_values": pixel_values})[0]
        image_embeds = self.session.run(["image_embeds"], {"pixel_values": pixel_values})[0]
        logits = image_embeds @ self.weight.T + self.config["logit_bias"]
        if self.config["scores"] == "sigmoid":
            return 1 / (1 + np.exp(-logits))
        exponentials = np.exp(logits - logits.max(axis=1, keepdims=True))
        return exponentials / exponentials.sum(axis=1, keepdims=True)

    def classify(self, paths: list[str], top_k: int = 5, batch_size: int = 32):
        """Yields `(path, [(label, probability), ...])` for each readable photo, `(path, error)` for the others."""
        for start in range(0, len(paths), batch_size):
            batch, inputs = [], []
            for path in paths[start : start + batch_size]:
                try:
                    inputs.append(preprocess(open_photo(path), self.spec))
                    batch.append(path)
                except (OSError, UnidentifiedImageError, ValueError) as error:
                    yield path, f"{type(error).__name__}: {error}"
            if not batch:
                continue
            for path, row in zip(batch, self.probabilities(np.stack(inputs))):
                best = np.argsort(-row, kind="stable")[:top_k]
                yield path, [(self.labels[index], float(row[index])) for index in best]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="+", metavar="PHOTO", help="Photo files or folders (walked).")
    parser.add_argument("--folder", default=os.path.dirname(os.path.abspath(__file__)), help="The export folder.")
    parser.add_argument(
        "--model", default=None, help="Image graph in the folder (default: model.onnx, or image_encoder.onnx)."
    )
    parser.add_argument("--labels", default=None, help="Open-vocabulary export: comma-separated labels to score.")
    parser.add_argument(
        "--template", action="append", default=None, help="Open-vocabulary export: a prompt template with {}; repeat."
    )
    parser.add_argument("--top-k", type=int, default=1, help="Labels per photo (default: 1).")
    parser.add_argument("--batch-size", type=int, default=32, help="Photos per run of the model (default: 32).")
    parser.add_argument("--threads", type=int, default=0, help="onnxruntime threads (default 0: its choice).")
    parser.add_argument("--format", choices=("csv", "json"), default="csv", help="Output format (default: csv).")
    args = parser.parse_args(argv)
    labels = [label.strip() for label in args.labels.split(",") if label.strip()] if args.labels else None
    classifier = Classifier(args.folder, args.model, args.threads, labels, args.template)
    rows, skipped = [], 0
    for path, result in classifier.classify(find_photos(args.inputs), args.top_k, args.batch_size):
        if isinstance(result, str):
            skipped += 1
            print(f"skipped {path}: {result}", file=sys.stderr)
        else:
            rows.append({"image": path, "predictions": [{"label": label, "score": score} for label, score in result]})
    if args.format == "json":
        json.dump(rows, sys.stdout, indent=2, ensure_ascii=False)
        sys.stdout.write("\n")
    else:
        sys.stdout.write("image,rank,label,score\n")
        for row in rows:
            for rank, prediction in enumerate(row["predictions"], 1):
                label = prediction["label"].replace('"', '""')
                sys.stdout.write(f'"{row["image"]}",{rank},"{label}",{prediction["score"]:.6f}\n')
    print(f"classified {len(rows)} photos, skipped {skipped}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
