"""Batch collators and data plans of the training stages: what turns the rows of `agriclip.sources` into model
inputs (decoding each image with `open_image`, so that one corrupt, truncated or missing file is skipped and counted
instead of crashing an epoch), and where a stage validates.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import DataLoader

from agriclip.images import DecodeStats, DecodingCollator
from agriclip.sources import load_image_text_dataset, split_names


logger = logging.getLogger(__name__)

# The split a training stage validates on when none is named (see `plan_validation`).
DEFAULT_VAL_SPLIT = "validation"

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
            raise ValueError(
                f"drawing a caption variant needs the row's index ({ROW_INDEX!r}): wrap the dataset in "
                "training.data.IndexedRows, or build the collator without a seed for fixed captions"
            )
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
        return {
            "pixel_values": pixel_values,
            "labels": torch.tensor([row["label"] for row, _ in decoded], dtype=torch.long),
        }


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
            raise ValueError(
                f"{self.train_data}: {len(train)} training pairs are too few to hold {self.held_out:g} of "
                "them out for validation and train on the rest; give --val-data or a validation split"
            )
        order = np.random.default_rng(self.seed).permutation(len(train))
        # Sorted: each part keeps the data's order. In memory: the index mappings are small, and N processes must
        # not write the same cache file at once.
        return (
            train.select(np.sort(order[held_out:]), keep_in_memory=True),
            train.select(np.sort(order[:held_out]), keep_in_memory=True),
        )


def plan_validation(
    train_data, train_split: str, val_data, val_split: str | None, val_fraction: float, seed: int
) -> ValidationPlan:
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
        raise ValueError(
            f"{train_data}: no split {train_split!r} to train on; splits: {sorted(train_splits)}; "
            "pass --train-split with one of them"
        )
    plan = ValidationPlan(train_data, train_split, val_data or train_data, val_split or DEFAULT_VAL_SPLIT, seed=seed)
    splits = train_splits if val_data is None else split_names(val_data)
    if splits is not None and plan.val_split in splits:
        return plan
    if val_data is not None and (splits is None or (val_split is None and len(splits) == 1)):
        # All of --val-data: a source of one split is read whole under any split name.
        return replace(plan, val_split=splits[0]) if splits else plan
    if splits is None and val_split is not None:
        raise ValueError(
            f"{train_data} is one split (a CSV file or shards without split folders): validating on "
            f"--val-split {val_split!r} would reuse the training pairs; give --val-data, or leave "
            "--val-split out to hold out --val-fraction of the training pairs"
        )
    if val_data is not None or val_split is not None:
        hold_out = "" if val_data else ", or leave it out to hold out --val-fraction of the training pairs"
        raise ValueError(
            f"{plan.val_data}: no split {plan.val_split!r} for validation; splits: {sorted(splits)}; "
            f"pass --val-split with one of them{hold_out}"
        )
    found = "it is one split" if splits is None else f"splits: {', '.join(sorted(splits))}"
    notice = (
        f"validation: {train_data} has no split {DEFAULT_VAL_SPLIT!r} ({found}), so {100 * val_fraction:g}% of "
        f"the training pairs, drawn with seed {seed}, are held out for validation and not trained on; "
        "--val-data, --val-split or --val-fraction choose otherwise"
    )
    return replace(plan, val_data=None, val_split=None, held_out=val_fraction, notice=notice)
