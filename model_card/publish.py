"""Publishing AgriCLIP checkpoints, LoRA adapters and ALive-style datasets to the Hugging Face Hub.

What goes up is an allow-list of what the folder is, never "the whole folder": the upload sends exactly the files
that the dry run prints, and every other entry (an `.env`, logs, notes, keys, training checkpoints) stays behind and
is printed as left out.
- A checkpoint: `config.json`; the weights (`model.safetensors`, or else `model.safetensors.index.json` and the shards
  it names, as transformers loads them); the processor and tokenizer files (`processor_config.json`,
  `preprocessor_config.json`, `tokenizer.json`, `tokenizer_config.json`, `special_tokens_map.json`, `vocab.json`,
  `merges.txt`, `added_tokens.json`, chat templates); the custom-code files that an `auto_map` names and the files
  they import relatively; `README.md`; and the evaluation results that `training.run_all` puts beside the card
  (`eval_results.json`).
- A LoRA adapter (a folder with `adapter_config.json`): `adapter_config.json`, `adapter_model.safetensors`, `README.md`.
- A dataset: `README.md`, `build_report.json`, each split's `metadata.jsonl` and the images its rows name, and the other
  copies `training.alive` writes (the `datasets/` folder of `save_to_disk`, the WebDataset shards
  `webdataset/<split>/shard-<n>.tar`). A row must name its image inside its split folder: `../` or an absolute path
  is a problem.

Links: nothing that resolves outside the folder is uploaded (a symbolic link to a file or folder elsewhere, or a file
under such a link). Where the allow-list names it (the weights, the card, an image that a metadata row names) that is
a problem, since the repo would be incomplete without it; anywhere else it is left out like any other entry. A link
that stays inside the folder goes up as the file it leads to.

Before any upload a dry run validates the folder, and a failed check stops the upload with a message naming what is
wrong: a file of the allow-list is missing or leads outside the folder; the bytes of a file that would go up, whatever
its name (weights and images too), hold this session's Hub token or a string shaped like a Hub, GitHub or AWS key or a
private key block; the card has no metadata, or lacks what the Hub needs (license, library_name and pipeline_tag for
a model, library_name for an adapter, license for a dataset). For a checkpoint, further: its custom-code files are the
installed package's, the config, processor and model load, the weights cover the model, and the zero-shot pipeline
runs on a sample image. For a LoRA adapter: its config, and a base model given as a Hub repo id rather than a local
path. For a dataset: every split's `metadata.jsonl` rows, the images they name, and a sample image of each split.

Custom code never runs unasked. The dry run compares each custom-code file of a checkpoint byte for byte with the
installed package's file of the same name, and a file that differs is a problem. Only `--trust-remote-code`
(`trust_remote_code=True`) lets the dry run import the folder's files, as someone who loads the repo with
`trust_remote_code=True` will, and compare what their processor and model give on the sample with the installed
package. Every other load passes `trust_remote_code=False`, so transformers never asks on stdin either.

The token comes from the environment (`HF_TOKEN`) or `hf auth login`, through huggingface_hub; it is never passed,
printed or written here.

Command line::

    agriclip publish runs/final --repo-id org/agriclip [--revision v1.0] [--private] \\
        [--commit-message "AgriCLIP, stage 3 refit"] [--dry-run] [--trust-remote-code]
    agriclip publish data/alive --dataset --repo-id org/alive
"""

from __future__ import annotations

import inspect
import json
import logging
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
import torch
from huggingface_hub import CommitOperationAdd, DatasetCard, HfApi, ModelCard, get_token
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id
from peft import PeftConfig
from peft.utils import CONFIG_NAME as ADAPTER_CONFIG_NAME
from peft.utils import SAFETENSORS_WEIGHTS_NAME as ADAPTER_WEIGHTS_NAME
from PIL import Image
from transformers import pipeline
from transformers.dynamic_module_utils import get_class_from_dynamic_module, get_imports, get_relative_imports
from transformers.models.clip.tokenization_clip import VOCAB_FILES_NAMES
from transformers.tokenization_utils_base import (
    ADDED_TOKENS_FILE,
    FULL_TOKENIZER_FILE,
    SPECIAL_TOKENS_MAP_FILE,
    TOKENIZER_CONFIG_FILE,
)
from transformers.utils import (
    CHAT_TEMPLATE_DIR,
    CHAT_TEMPLATE_FILE,
    CONFIG_NAME,
    IMAGE_PROCESSOR_NAME,
    LEGACY_PROCESSOR_CHAT_TEMPLATE_FILE,
    PROCESSOR_NAME,
    SAFE_WEIGHTS_INDEX_NAME,
    SAFE_WEIGHTS_NAME,
)

from agriclip.errors import CLIError, ExitCode
from agriclip.files import ContainedPaths, weight_files
from modeling_agriclip import AgriCLIPConfig, AgriCLIPModel, AgriCLIPProcessor
from modeling_agriclip.commands import hide_weight_loading_bars

from .card import CARD_NAME, TASK, find_caption_splits


logger = logging.getLogger(__name__)

SAVE_PROCESSOR = "save the processor with processor.save_pretrained(folder)"
# The files every checkpoint has besides its weights, custom code and card, with how to make each one.
CHECKPOINT_FILES = {
    CONFIG_NAME: "save the model with model.save_pretrained(folder)",
    PROCESSOR_NAME: SAVE_PROCESSOR,
    TOKENIZER_CONFIG_FILE: SAVE_PROCESSOR,
    FULL_TOKENIZER_FILE: SAVE_PROCESSOR,
}
# `training.run_all` puts the evaluation suite's results beside the card under this name.
EVAL_RESULTS = "eval_results.json"
# Uploaded where present: the other processor and tokenizer files transformers may save, and the evaluation results.
CHECKPOINT_EXTRAS = (
    IMAGE_PROCESSOR_NAME,
    SPECIAL_TOKENS_MAP_FILE,
    ADDED_TOKENS_FILE,
    *sorted(set(VOCAB_FILES_NAMES.values()) - {FULL_TOKENIZER_FILE}),  # vocab.json, merges.txt
    CHAT_TEMPLATE_FILE,
    LEGACY_PROCESSOR_CHAT_TEMPLATE_FILE,
    EVAL_RESULTS,
)
CHAT_TEMPLATES = re.compile(rf"{re.escape(CHAT_TEMPLATE_DIR)}/[^/]+\.jinja")
# The saved configs whose `auto_map` may name custom-code files.
AUTO_MAP_FILES = (CONFIG_NAME, PROCESSOR_NAME, TOKENIZER_CONFIG_FILE, IMAGE_PROCESSOR_NAME)
ZERO_SHOT_AUTO_CLASS = "AutoModelForZeroShotImageClassification"
ADAPTER_FILES = (ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME)
METADATA = "metadata.jsonl"
BUILD_REPORT = "build_report.json"
# The other copies `training.alive` writes: `DatasetDict.save_to_disk` under datasets/, WebDataset shards.
DATASET_COPIES = re.compile(
    r"datasets/(?:[^/]+/)?(?:dataset_dict\.json|state\.json|dataset_info\.json|data-\d+-of-\d+\.arrow)"
    r"|webdataset/[^/]+/shard-\d+\.tar"
)
# Per kind of folder: the card class, the metadata the Hub needs to list and run the repo (what model_card.card and
# PEFT write), and how to make the card.
CARD_RULES = {
    "checkpoint": (
        ModelCard,
        ("license", "library_name", "pipeline_tag"),
        "write the card with `agriclip card FOLDER`",
    ),
    "LoRA adapter": (
        ModelCard,
        ("library_name",),
        "save the adapter with peft_model.save_pretrained(folder), which writes it",
    ),
    "dataset": (DatasetCard, ("license",), "write the card with `agriclip card FOLDER --dataset`"),
}

SESSION_TOKEN = "this session's Hugging Face token"
HF_TOKEN_SHAPE = "a Hugging Face token (hf_...)"
# Credential shapes searched in the bytes of every file that would go up. Each pattern is the shortest form that is
# surely a secret, so that a window of SCAN_OVERLAP bytes across a chunk boundary sees any of them whole.
SECRET_SHAPES = {
    HF_TOKEN_SHAPE: re.compile(rb"hf_[A-Za-z0-9]{30}"),
    "a private key (-----BEGIN ... PRIVATE KEY-----)": re.compile(rb"-----BEGIN [A-Z0-9 ]{0,40}PRIVATE KEY"),
    "a GitHub token (ghp_..., github_pat_...)": re.compile(rb"gh[pousr]_[A-Za-z0-9]{36}|github_pat_[A-Za-z0-9_]{22}"),
    "an AWS access key id (AKIA...)": re.compile(rb"(?:AKIA|ASIA)[A-Z0-9]{16}"),
}
SCAN_CHUNK = 1 << 24
SCAN_OVERLAP = 256

SAMPLE_LABELS = ("a photo of a leaf", "a photo of a fish")
# The package the custom-code files are copies of: people who load them with trust_remote_code lack it.
PACKAGE = AgriCLIPModel.__module__.partition(".")[0]
PACKAGE_DIR = Path(inspect.getfile(AgriCLIPModel)).parent
# How far the custom-code model may drift from the package's outputs on the sample (float32 round-off only).
REMOTE_CODE_TOLERANCE = 1e-5


class PublishError(Exception):
    """The dry run found problems in a folder; the upload did not start."""

    def __init__(self, folder, problems: list[str]):
        self.problems = problems
        listed = "\n".join(f"  - {problem}" for problem in problems)
        super().__init__(f"{folder} is not ready to publish, so nothing was uploaded:\n{listed}")


@dataclass
class UploadPlan:
    """What publishing a folder sends and what it leaves behind.

    Attributes:
        kind: "checkpoint", "LoRA adapter" or "dataset".
        files: the files that go up, relative POSIX paths, sorted; the upload sends exactly these.
        left_out: every other entry of the folder; a folder none of whose files goes up is named once, as `name/`.
        problems: files the allow-list names that cannot go up as they are (missing, leading outside the folder,
            a metadata row naming an image outside its split).
    """

    kind: str
    files: list[str]
    left_out: list[str]
    problems: list[str]

    def describe(self) -> str:
        lines = [f"would upload {len(self.files)} file(s):", *(f"  {name}" for name in self.files)]
        if self.left_out:
            lines += [f"left out, not part of a {self.kind}:", *(f"  {name}" for name in self.left_out)]
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# What goes up
# ---------------------------------------------------------------------------------------------------------------


def plan_upload(folder: str | Path, dataset: bool = False) -> UploadPlan:
    """The allow-list of `folder` (see the module docstring): a checkpoint, a LoRA adapter or, with `dataset`, a
    dataset. Reads the configs, the weights index, the custom-code files (as text) and the metadata rows; imports and
    runs nothing of the folder."""
    root = Path(folder).resolve()
    kind = "dataset" if dataset else "LoRA adapter" if _is_adapter(root) else "checkpoint"
    entries = _walk(root)
    builder = {"checkpoint": _checkpoint_files, "LoRA adapter": _adapter_files, "dataset": _dataset_files}[kind]
    wanted, problems = builder(root, entries)
    if os.path.lexists(root / CARD_NAME):
        wanted.append(CARD_NAME)
    else:
        problems.append(f"{CARD_NAME} is missing ({CARD_RULES[kind][2]})")
    files = []
    for name in sorted(set(wanted)):
        problem = _outside_problem(root, name)
        if problem:
            problems.append(problem)
        else:
            files.append(name)
    return UploadPlan(kind, files, _left_out(entries, files), problems)


def _checkpoint_files(root: Path, entries: list[str]) -> tuple[list[str], list[str]]:
    problems = [
        f"{name} is missing ({hint})" for name, hint in CHECKPOINT_FILES.items() if not os.path.lexists(root / name)
    ]
    names = [name for name in (*CHECKPOINT_FILES, *CHECKPOINT_EXTRAS) if os.path.lexists(root / name)]
    names += [name for name in entries if CHAT_TEMPLATES.fullmatch(name)]
    weights, weight_problems = _weight_files(root)
    code, code_problems = _custom_code_files(root)
    return names + weights + code, problems + weight_problems + code_problems


def _weight_files(root: Path) -> tuple[list[str], list[str]]:
    """What `from_pretrained` loads (`agriclip.files.weight_files`), relative to `root`, with the index
    when the weights are sharded; or the problem that keeps them from loading."""
    index = [SAFE_WEIGHTS_INDEX_NAME] if os.path.lexists(root / SAFE_WEIGHTS_INDEX_NAME) else []
    try:
        files = [path.relative_to(root).as_posix() for path in weight_files(root)]
    except FileNotFoundError:
        return [], [f"{SAFE_WEIGHTS_NAME} is missing (no weights in safetensors format)"]
    except ValueError as error:  # an unreadable index, a shard outside the folder, missing or not a regular file
        return index, [_oneline(error)]
    return ([] if files == [SAFE_WEIGHTS_NAME] else index) + files, []


def _custom_code_files(root: Path) -> tuple[list[str], list[str]]:
    """The custom-code files that the configs' `auto_map`s name and, transitively, the files they import relatively.
    Reads them as text (transformers' own import parser); imports none."""
    problems, pending = [], []
    for config_name in AUTO_MAP_FILES:
        if not _inside_file(root, config_name):
            continue
        try:
            auto_map = _auto_map(root / config_name)
        except (ValueError, AttributeError) as error:
            problems.append(f"{config_name} does not load: it is not valid JSON ({error})")
            continue
        references = [
            ref
            for value in auto_map.values()
            for ref in (value if isinstance(value, (list, tuple)) else [value])
            if ref
        ]
        for module in sorted({str(reference).split(".")[0] for reference in references}):
            if not module.isidentifier():  # e.g. "org/repo--module": code from another repo
                problems.append(
                    f"{config_name} auto_map names {module!r}, which is no code file of this folder; save the model and processor again"
                )
                continue
            missing = f"{module}.py is missing ({config_name} auto_map names it; save the model and processor again)"
            pending.append((f"{module}.py", missing))
    files, seen = [], set()
    while pending:
        name, if_missing = pending.pop()
        if name in seen:
            continue
        seen.add(name)
        if not os.path.lexists(root / name):
            problems.append(if_missing)
            continue
        if not _inside_file(root, name):
            files.append(name)  # plan_upload names what is wrong with it
            continue
        try:
            imported = get_relative_imports(root / name)
        except UnicodeDecodeError:
            problems.append(f"{name} is not UTF-8 Python source; save the model and processor again")
            continue
        files.append(name)
        pending += [
            (f"{module}.py", f"{name} imports {module}.py, which is missing (save the model and processor again)")
            for module in imported
        ]
    return files, problems


def _adapter_files(root: Path, entries: list[str]) -> tuple[list[str], list[str]]:
    present = [name for name in ADAPTER_FILES if os.path.lexists(root / name)]
    return present, [f"{name} is missing" for name in ADAPTER_FILES if name not in present]


def _dataset_files(root: Path, entries: list[str]) -> tuple[list[str], list[str]]:
    """The build report, each split's metadata and the images its rows name, and the other copies of the build."""
    names = [name for name in entries if DATASET_COPIES.fullmatch(name)]
    names += [BUILD_REPORT] if os.path.lexists(root / BUILD_REPORT) else []
    try:
        splits = find_caption_splits(root)
    except ValueError as error:
        return names, [str(error)]
    problems = []
    for split_dir in splits.values():
        metadata = (split_dir / METADATA).relative_to(root).as_posix()
        names.append(metadata)
        if _inside_file(root, metadata):
            images, split_problems = _split_images(root, split_dir, metadata)
            names += images
            problems += split_problems
    return names, problems


def _split_images(root: Path, split_dir: Path, metadata: str) -> tuple[list[str], list[str]]:
    """The images the rows of a split's `metadata.jsonl` name (relative to `root`), and the problems of its rows."""
    try:
        lines = (root / metadata).read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as error:
        return [], [f"{metadata} is not UTF-8 text ({error}); write it again as UTF-8"]
    images, problems, missing = [], [], []
    inside_split = ContainedPaths(split_dir)
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            problems.append(f"{metadata} line {number} is not valid JSON: {_oneline(error)}")
            continue
        absent = [key for key in ("file_name", "caption") if not isinstance(row, dict) or not row.get(key)]
        if absent:
            problems.append(f"{metadata} line {number} lacks {absent}")
        elif (outside := inside_split.problem(row["file_name"])) is not None:
            problems.append(f"{metadata} line {number}: {outside}; copy the image into the split folder")
        elif not (split_dir / row["file_name"]).is_file():
            missing.append(row["file_name"])
        else:
            images.append((split_dir / row["file_name"]).relative_to(root).as_posix())
    if missing:
        problems.append(f"{metadata} names {len(missing)} image(s) that do not exist, e.g. {missing[:3]}")
    if not images:
        problems.append(f"{metadata} lists no usable image-caption pair")
    return images, problems


def _walk(root: Path) -> list[str]:
    """Every file, link and other non-folder entry under `root`, as relative POSIX paths; a link to a folder is an
    entry of its own, never gone into."""
    entries = []
    for directory, folders, names in os.walk(root):  # followlinks=False
        here = Path(directory)
        names += [name for name in folders if (here / name).is_symlink()]
        entries += [(here / name).relative_to(root).as_posix() for name in names]
    return sorted(entries)


def _left_out(entries: list[str], files: list[str]) -> list[str]:
    """The `entries` that do not go up; a folder that holds none of `files` is named once, as `folder/`."""
    holding = {parent for name in files for parent in PurePosixPath(name).parents}
    left = set()
    for name in set(entries) - set(files):
        folders = list(reversed(PurePosixPath(name).parents))[1:]  # outermost first, without "."
        left.add(next((f"{folder}/" for folder in folders if folder not in holding), name))
    return sorted(left)


def _inside_file(root: Path, name: str) -> bool:
    """`name` is a regular file whose real path lies inside `root` (a resolved folder)."""
    path = root / name
    return path.resolve().is_relative_to(root) and path.is_file()


def _outside_problem(root: Path, name: str) -> str | None:
    """Why the allow-listed, existing entry `name` cannot go up: it leads outside the folder, or is no regular file."""
    if not (root / name).resolve().is_relative_to(root):
        return (
            f"{name} leads outside the folder (a symbolic link, or inside a linked folder), and what lies outside is "
            "never uploaded; copy the file into the folder instead of linking it"
        )
    if not (root / name).is_file():
        return f"{name} is not a regular file (a folder, a broken link or a pipe); replace it with the file itself"
    return None


def _is_adapter(folder: Path) -> bool:
    return (folder / ADAPTER_CONFIG_NAME).is_file()


def _auto_map(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")).get("auto_map") or {}


# ---------------------------------------------------------------------------------------------------------------
# Dry-run checks
# ---------------------------------------------------------------------------------------------------------------


def find_secrets(folder: str | Path, files: list[str]) -> list[str]:
    """Problems for the `files` of `folder` whose bytes hold this session's Hub token or a string shaped like a
    credential (SECRET_SHAPES). Every file is read as bytes in overlapping chunks, whatever its name or format."""
    token = get_token()
    problems = []
    for name in files:
        for secret in _secrets_in(Path(folder) / name, token.encode() if token else None):
            what = secret if secret == SESSION_TOKEN else f"a string shaped like {secret}"
            problems.append(f"{name} contains {what}; remove it before publishing")
    return problems


def _secrets_in(path: Path, token: bytes | None) -> list[str]:
    overlap = max(SCAN_OVERLAP, len(token or b""))
    found, tail = set(), b""
    with open(path, "rb") as handle:
        while chunk := handle.read(SCAN_CHUNK):
            window = tail + chunk
            if token and token in window:
                found.add(SESSION_TOKEN)
            found.update(kind for kind, shape in SECRET_SHAPES.items() if kind not in found and shape.search(window))
            tail = window[-overlap:]
    if SESSION_TOKEN in found:
        found.discard(HF_TOKEN_SHAPE)  # the session's token has that shape: one message says it
    return [kind for kind in (SESSION_TOKEN, *SECRET_SHAPES) if kind in found]


def validate_checkpoint(folder: str | Path, trust_remote_code: bool = False) -> list[str]:
    """Everything wrong with an AgriCLIP checkpoint (or LoRA adapter) folder, as messages; empty when it is ready.

    File-level problems (the allow-list, secrets, the card, the custom-code files) are reported together; the loading
    checks run only when there are none, and the pipeline check only when the model and processor load.

    Args:
        trust_remote_code: import the folder's custom-code files and compare the processor and model they build with
            the installed package's on a sample, instead of requiring them to be the package's files byte for byte.
            This runs the folder's code.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return [f"{folder} is not a folder"]
    if _is_adapter(folder):
        return validate_adapter(folder)
    plan = plan_upload(folder)
    problems = plan.problems + _card_problems(folder, plan) + find_secrets(folder, plan.files)
    problems += _custom_code_problems(folder, plan, trust_remote_code)
    if problems:
        return problems
    try:
        config = AgriCLIPConfig.from_pretrained(folder, trust_remote_code=False)
    except Exception as error:  # any failure to load is the finding, whatever its type
        return [f"{CONFIG_NAME} does not load: {_oneline(error)}"]
    try:
        processor = AgriCLIPProcessor.from_pretrained(folder, trust_remote_code=False)
    except Exception as error:
        problems.append(
            f"the processor ({PROCESSOR_NAME}, {TOKENIZER_CONFIG_FILE}, {FULL_TOKENIZER_FILE}) does not load: {_oneline(error)}"
        )
    try:
        # Mismatched shapes are reported with the missing and unexpected keys rather than raised on their own.
        model, loading = AgriCLIPModel.from_pretrained(
            folder, output_loading_info=True, ignore_mismatched_sizes=True, trust_remote_code=False
        )
        for kind in ("missing_keys", "unexpected_keys", "mismatched_keys"):
            if loading[kind]:
                keys = sorted(str(key) for key in loading[kind])
                problems.append(
                    f"the weights do not match the config: {len(keys)} {kind.replace('_', ' ')}, e.g. {keys[:3]}"
                )
    except Exception as error:
        problems.append(f"the model does not load from its weights: {_oneline(error)}")
    if problems:
        return problems
    if ZERO_SHOT_AUTO_CLASS not in _auto_map(folder / CONFIG_NAME):
        return [
            f"{CONFIG_NAME} auto_map lacks {ZERO_SHOT_AUTO_CLASS}: pipeline(..., trust_remote_code=True) cannot load it"
        ]
    image = sample_image(config)
    inputs = processor(text=list(SAMPLE_LABELS), images=[image], return_tensors="pt")
    with torch.no_grad():
        logits = model.eval()(**inputs).logits_per_image
    problems = _pipeline_problems(folder, image)
    return problems + (_remote_code_problems(folder, image, inputs, logits) if trust_remote_code else [])


def validate_adapter(folder: str | Path) -> list[str]:
    """Everything wrong with a PEFT adapter folder; above all a base model that names a local path."""
    folder = Path(folder)
    plan = plan_upload(folder)
    problems = plan.problems + _card_problems(folder, plan) + find_secrets(folder, plan.files)
    if ADAPTER_CONFIG_NAME in plan.files:
        try:
            # Reads adapter_config.json only: PEFT runs no code from the folder.
            base = PeftConfig.from_pretrained(folder).base_model_name_or_path
        except Exception as error:
            return problems + [f"{ADAPTER_CONFIG_NAME} does not load: {_oneline(error)}"]
        if not base:
            problems.append(f"{ADAPTER_CONFIG_NAME} names no base_model_name_or_path")
        elif Path(base).expanduser().exists() or base.startswith((".", "/", "~")) or not _is_repo_id(base):
            problems.append(
                f"{ADAPTER_CONFIG_NAME}: base_model_name_or_path is {base!r}, a local path that people who download the "
                "adapter do not have; set it to the base model's Hub repo id "
                "(peft_model.peft_config['default'].base_model_name_or_path = 'org/name') and save the adapter again"
            )
    return problems


def validate_dataset(folder: str | Path) -> list[str]:
    """Everything wrong with an ALive-style dataset folder: its files, card and rows, then a sample image per split."""
    folder = Path(folder)
    if not folder.is_dir():
        return [f"{folder} is not a folder"]
    plan = plan_upload(folder, dataset=True)
    problems = plan.problems + _card_problems(folder, plan) + find_secrets(folder, plan.files)
    if problems:
        return problems
    for metadata in (name for name in plan.files if PurePosixPath(name).name == METADATA):
        split_dir = (folder / metadata).parent
        with open(folder / metadata, encoding="utf-8") as lines:
            first = json.loads(next(line for line in lines if line.strip()))["file_name"]
        try:
            with Image.open(split_dir / first) as image:
                image.convert("RGB")
        except OSError as error:
            problems.append(f"split {split_dir.name!r}: {first} is not a readable image: {_oneline(error)}")
    return problems


def sample_image(config: AgriCLIPConfig) -> Image.Image:
    """A seeded noise photo a little larger than the model's input, so the processor resizes and crops it."""
    side = config.vision_config.image_size + 16
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (side, side + 8, 3), dtype=np.uint8))


def _card_problems(folder: Path, plan: UploadPlan) -> list[str]:
    """The card must parse and carry the metadata the Hub needs for the kind of folder (CARD_RULES)."""
    if CARD_NAME not in plan.files:
        return []  # missing, or leading outside the folder: a problem of the plan already
    card_class, keys, how = CARD_RULES[plan.kind]
    try:
        metadata = card_class.load(folder / CARD_NAME).data.to_dict()
    except Exception as error:
        return [f"{CARD_NAME} does not parse as a card (YAML front matter): {_oneline(error)}"]
    if not metadata:
        return [f"{CARD_NAME} has no metadata (the YAML front matter between '---' lines); {how}"]
    missing = [key for key in keys if not metadata.get(key)]
    if missing:
        return [
            f"{CARD_NAME} lacks the metadata {missing} that a {plan.kind} card needs on the Hub; {how}, or add them to its "
            "YAML front matter"
        ]
    return []


def _custom_code_problems(folder: Path, plan: UploadPlan, trust_remote_code: bool) -> list[str]:
    """The custom-code files that go up must not import the package, and must be the installed package's files byte
    for byte unless `trust_remote_code` (then the dry run runs and compares them instead)."""
    root = folder.resolve()
    code = [name for name in plan.files if name.endswith(".py")]  # in a checkpoint's allow-list only custom code is
    problems = [
        f"{name} imports {PACKAGE}, which people loading with trust_remote_code do not have"
        for name in code
        if PACKAGE in get_imports(root / name)
    ]
    for name in code:
        installed = PACKAGE_DIR / name
        if installed.is_file() and installed.read_bytes() == (root / name).read_bytes():
            continue
        if trust_remote_code:
            logger.warning(
                "%s is not the installed package's file; running it to compare, as --trust-remote-code asks", name
            )
            continue
        what = (
            f"differs from the installed package's ({installed})"
            if installed.is_file()
            else f"is no file of the installed package {PACKAGE}"
        )
        problems.append(f"{name} {what}; save the model again, or pass --trust-remote-code to run and compare it")
    return problems


def _pipeline_problems(folder: Path, image: Image.Image) -> list[str]:
    try:
        classifier = pipeline(TASK, model=str(folder), trust_remote_code=False)
        result = classifier(image, candidate_labels=list(SAMPLE_LABELS))
    except Exception as error:
        return [f"pipeline({TASK!r}, model=folder) fails on a sample image: {_oneline(error)}"]
    scores = [entry["score"] for entry in result]
    if sorted(entry["label"] for entry in result) != sorted(SAMPLE_LABELS) or not all(map(math.isfinite, scores)):
        return [f"pipeline({TASK!r}) gave no finite score per label on a sample image: {result}"]
    if abs(sum(scores) - 1) > 1e-4:
        return [f"pipeline({TASK!r}) scores sum to {sum(scores)}, not 1, on a sample image"]
    return []


def _remote_code_problems(folder: Path, image: Image.Image, inputs, logits: torch.Tensor) -> list[str]:
    """Builds the processor and the model from the folder's own code files, as `trust_remote_code=True` does, and
    compares what they give on the sample with the installed package. This runs the folder's code."""
    problems = []
    processor_reference = _auto_map(folder / PROCESSOR_NAME).get("AutoProcessor")
    if processor_reference:
        try:
            remote_processor = get_class_from_dynamic_module(processor_reference, str(folder))
            remote_inputs = remote_processor.from_pretrained(folder, trust_remote_code=False)(
                text=list(SAMPLE_LABELS), images=[image], return_tensors="pt"
            )
        except Exception as error:
            return [f"the custom-code files do not load the processor ({processor_reference}): {_oneline(error)}"]
        absent = torch.empty(0)
        differing = sorted(
            key
            for key in {*inputs, *remote_inputs}
            if not torch.equal(inputs.get(key, absent), remote_inputs.get(key, absent))
        )
        if differing:
            problems.append(
                f"the custom-code processor gives other inputs ({differing}) than the installed package; save the processor again"
            )
    reference = _auto_map(folder / CONFIG_NAME)[ZERO_SHOT_AUTO_CLASS]
    try:
        remote_class = get_class_from_dynamic_module(reference, str(folder))
        with torch.no_grad():
            remote_logits = (
                remote_class.from_pretrained(folder, trust_remote_code=False).eval()(**inputs).logits_per_image
            )
    except Exception as error:
        return problems + [f"the custom-code files do not load the model ({reference}): {_oneline(error)}"]
    difference = (remote_logits - logits).abs().max().item()
    if not difference <= REMOTE_CODE_TOLERANCE:
        problems.append(
            f"the custom-code files give other outputs than the installed package (max |difference| {difference:.3g}); save the model again"
        )
    return problems


def _oneline(error: Exception) -> str:
    """An error message on one line, so that each problem stays one item of the list."""
    return " ".join(str(error).split())


def _is_repo_id(value: str) -> bool:
    """`org/name`, as the Hub spells repo ids."""
    if value.count("/") != 1:
        return False
    try:
        validate_repo_id(value)
    except HFValidationError:
        return False
    return True


# ---------------------------------------------------------------------------------------------------------------
# Upload
# ---------------------------------------------------------------------------------------------------------------


def publish(
    folder: str | Path,
    repo_id: str,
    dataset: bool = False,
    revision: str | None = None,
    private: bool = False,
    commit_message: str | None = None,
    dry_run: bool = False,
    trust_remote_code: bool = False,
):
    """Validates `folder` and, unless `dry_run`, uploads its allow-list (`plan_upload`) to the Hub repo `repo_id` in
    one commit.

    Args:
        folder: a checkpoint or LoRA adapter folder, or with `dataset` an ALive-style dataset folder.
        repo_id: `org/name`; the repo is created when it does not exist.
        dataset: publish to a dataset repo.
        revision: the branch to commit to, created from `main` when missing (default: `main`).
        private: create the repo private. An existing public repo is never published to with `private`.
        commit_message: the commit's title.
        dry_run: validate only.
        trust_remote_code: let the dry run import the checkpoint's custom-code files and compare their outputs with
            the installed package's, where they are not the package's files (see `validate_checkpoint`).

    Returns:
        The `CommitInfo` of the upload (`commit_url`, `oid`), or for a dry run the `UploadPlan` an upload would send.

    Raises:
        PublishError: the folder failed a check, or `private` was asked of an existing public repo.
    """
    folder = Path(folder)
    if not _is_repo_id(repo_id):
        raise PublishError(folder, [f"{repo_id!r} is not a Hub repo id of the form org/name"])
    problems = validate_dataset(folder) if dataset else validate_checkpoint(folder, trust_remote_code=trust_remote_code)
    if problems:
        raise PublishError(folder, problems)
    plan = plan_upload(folder, dataset)
    if dry_run:
        return plan
    repo_type = "dataset" if dataset else "model"
    api = HfApi()
    # Without --private the Hub's default applies (an organisation may make new repos private).
    api.create_repo(repo_id, repo_type=repo_type, private=private or None, exist_ok=True)
    if private and not api.repo_info(repo_id, repo_type=repo_type).private:
        raise PublishError(
            folder,
            [f"{repo_id} already exists and is public; make it private on the Hub first, or publish without --private"],
        )
    if revision:
        api.create_branch(repo_id, branch=revision, repo_type=repo_type, exist_ok=True)
    logger.info(
        "uploading %d file(s) of %s; left out: %s", len(plan.files), folder, ", ".join(plan.left_out) or "nothing"
    )
    commit = api.create_commit(
        repo_id,
        [CommitOperationAdd(path_in_repo=name, path_or_fileobj=folder / name) for name in plan.files],
        repo_type=repo_type,
        revision=revision,
        commit_message=commit_message
        or f"Upload {'dataset' if dataset else 'AgriCLIP checkpoint'} {folder.resolve().name}",
    )
    logger.info("published %s to %s (commit %s)", folder, repo_id, commit.oid)
    return commit


def run(args) -> int:
    """`agriclip publish` (arguments parsed by `agriclip.cli`)."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    hide_weight_loading_bars()
    try:
        result = publish(
            args.folder,
            args.repo_id,
            dataset=args.dataset,
            revision=args.revision,
            private=args.private,
            commit_message=args.commit_message,
            dry_run=args.dry_run,
            trust_remote_code=args.trust_remote_code,
        )
    except PublishError as error:
        raise CLIError(ExitCode.INPUT, str(error)) from error
    if args.dry_run:
        print(f"dry run passed: {args.folder} is ready to publish to {args.repo_id}\n{result.describe()}")
    else:
        print(f"published {args.folder} to {args.repo_id}: {result.commit_url}")
    return ExitCode.OK
