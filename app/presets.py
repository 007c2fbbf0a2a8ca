"""Label presets from a suite YAML: each image-folder dataset becomes a preset of the page (`app.demo.Preset`).

Its labels are the prompt names the suite gives its classes (`DatasetSpec.prompt_names`, so the page asks what the
evaluation asked), its templates the suite's, and its examples the first photo of each of its first classes.
"""

from __future__ import annotations

import logging
from pathlib import Path

from evaluation.benchmarks import class_folders
from evaluation.suite import load_suite_config
from modeling_agriclip.commands import find_images

from .demo import Preset


logger = logging.getLogger(__name__)

EXAMPLES_PER_PRESET = 3


def presets_from_suite(path: str | Path, examples_per_preset: int = EXAMPLES_PER_PRESET) -> list[Preset]:
    """The presets of the image-folder datasets of a suite YAML; a `save_to_disk` dataset is left out (the page
    shows photos from folders) and said so."""
    presets = []
    for spec in load_suite_config(path).datasets:
        folder = spec.path if spec.split is None else spec.path / spec.split
        if not folder.is_dir() or (folder / "dataset_dict.json").exists() or (folder / "state.json").exists():
            logger.warning(f"{path}: dataset {spec.name!r} ({folder}) is not an image folder; no preset for it")
            continue
        classes = class_folders(folder)
        examples = []
        for name in classes[:examples_per_preset]:
            files, _ = find_images([str(folder / name)])
            examples += files[:1]
        labels = spec.prompt_names(classes, f"{path}: dataset {spec.name!r}")
        presets.append(Preset(spec.display_name, labels, list(spec.templates), examples))
    return presets


__all__ = ["EXAMPLES_PER_PRESET", "presets_from_suite"]
