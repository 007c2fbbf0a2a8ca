"""Publishing AgriCLIP checkpoints, LoRA adapters and ALive-style datasets to the Hugging Face Hub.

Before any upload a dry run validates the folder, and a failed check stops the upload with a message naming what is
wrong. For a checkpoint: every file is present (weights, config, processor and tokenizer files, the custom-code files
that `auto_map` names and the files they import, the model card), the config, processor and model load, the weights
cover the model, the zero-shot pipeline runs on a sample image, the custom-code files load on their own and give the
package's outputs, and no file holds a Hub token. For a LoRA adapter (a folder with `adapter_config.json`): its files,
its config, and a base model given as a Hub repo id rather than a local path. For a dataset: the card, every split's
`metadata.jsonl` rows and the images they name.

The token comes from the environment (`HF_TOKEN`) or `hf auth login`, through huggingface_hub; it is never passed,
printed or written here.

Command line::

    python -m model_card.publish runs/final --repo-id org/agriclip [--revision v1.0] [--private] \\
        [--commit-message "AgriCLIP, stage 3 refit"] [--dry-run]
    python -m model_card.publish data/alive --dataset --repo-id org/alive
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import re
import sys
from pathlib import Path

import numpy as np
import torch
from huggingface_hub import DatasetCard, HfApi, ModelCard, get_token
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import DEFAULT_IGNORE_PATTERNS, filter_repo_objects, validate_repo_id
from peft import PeftConfig
from peft.utils import CONFIG_NAME as ADAPTER_CONFIG_NAME
from peft.utils import SAFETENSORS_WEIGHTS_NAME as ADAPTER_WEIGHTS_NAME
from PIL import Image
from transformers import pipeline
from transformers.dynamic_module_utils import get_class_from_dynamic_module, get_imports, get_relative_import_files
from transformers.tokenization_utils_base import FULL_TOKENIZER_FILE, TOKENIZER_CONFIG_FILE
from transformers.utils import CONFIG_NAME, PROCESSOR_NAME, SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME

from modeling_agriclip import AgriCLIPConfig, AgriCLIPModel, AgriCLIPProcessor

from .card import CARD_NAME, TASK, find_caption_splits

logger = logging.getLogger(__name__)

# Never uploaded: byte-code caches (and what huggingface_hub always leaves out: .git, .cache/huggingface).
IGNORE_PATTERNS = ["*.pyc", "__pycache__", "__pycache__/*", "*/__pycache__/*"]
# Files read when looking for secrets; weights and images are not.
TEXT_SUFFIXES = frozenset({".json", ".jsonl", ".md", ".py", ".txt", ".yaml", ".yml", ".csv", ".tsv", ".cfg", ".toml", ".jinja"})
HF_TOKEN_PATTERN = re.compile(r"hf_[A-Za-z0-9]{30,}")
SAMPLE_LABELS = ("a photo of a leaf", "a photo of a fish")
# The package the custom-code files are copies of: people who load them with trust_remote_code lack it.
PACKAGE = AgriCLIPModel.__module__.partition(".")[0]
# How far the custom-code model may drift from the package's outputs on the sample (float32 round-off only).
REMOTE_CODE_TOLERANCE = 1e-5


class PublishError(Exception):
    """The dry run found problems in a folder; the upload did not start."""

    def __init__(self, folder, problems: list[str]):
        self.problems = problems
        listed = "\n".join(f"  - {problem}" for problem in problems)
        super().__init__(f"{folder} is not ready to publish, so nothing was uploaded:\n{listed}")


# ---------------------------------------------------------------------------------------------------------------
# Dry-run checks
# ---------------------------------------------------------------------------------------------------------------


def upload_files(folder: str | Path) -> list[str]:
    """The files of `folder` (relative POSIX paths) that an upload sends."""
    folder = Path(folder)
    paths = sorted(path.relative_to(folder).as_posix() for path in folder.rglob("*") if path.is_file())
    return list(filter_repo_objects(paths, ignore_patterns=IGNORE_PATTERNS + DEFAULT_IGNORE_PATTERNS))


def find_secrets(folder: str | Path) -> list[str]:
    """Problems for text files that hold this session's Hub token or anything shaped like a Hub token."""
    folder = Path(folder)
    token = get_token()
    problems = []
    for name in upload_files(folder):
        if Path(name).suffix.lower() not in TEXT_SUFFIXES:
            continue
        text = (folder / name).read_text(encoding="utf-8", errors="ignore")
        if token and token in text:
            problems.append(f"{name} contains this session's Hugging Face token; remove it before publishing")
        elif HF_TOKEN_PATTERN.search(text):
            problems.append(f"{name} contains a string shaped like a Hugging Face token (hf_...); remove it before publishing")
    return problems


def validate_checkpoint(folder: str | Path) -> list[str]:
    """Everything wrong with an AgriCLIP checkpoint (or LoRA adapter) folder, as messages; empty when it is ready.

    File-level problems are reported together; the loading checks run only when every file is there, and the
    pipeline and custom-code checks only when the model and processor load.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return [f"{folder} is not a folder"]
    if (folder / ADAPTER_CONFIG_NAME).is_file():
        return validate_adapter(folder)
    problems = _missing_checkpoint_files(folder) + _card_problems(folder, ModelCard) + find_secrets(folder)
    if problems:
        return problems
    try:
        config = AgriCLIPConfig.from_pretrained(folder)
    except Exception as error:  # any failure to load is the finding, whatever its type
        return [f"{CONFIG_NAME} does not load: {_oneline(error)}"]
    try:
        processor = AgriCLIPProcessor.from_pretrained(folder)
    except Exception as error:
        problems.append(f"the processor ({PROCESSOR_NAME}, {TOKENIZER_CONFIG_FILE}, {FULL_TOKENIZER_FILE}) does not load: {_oneline(error)}")
    try:
        # Mismatched shapes are reported with the missing and unexpected keys rather than raised on their own.
        model, loading = AgriCLIPModel.from_pretrained(folder, output_loading_info=True, ignore_mismatched_sizes=True)
        for kind in ("missing_keys", "unexpected_keys", "mismatched_keys"):
            if loading[kind]:
                keys = sorted(str(key) for key in loading[kind])
                problems.append(f"the weights do not match the config: {len(keys)} {kind.replace('_', ' ')}, e.g. {keys[:3]}")
    except Exception as error:
        problems.append(f"the model does not load from its weights: {_oneline(error)}")
    if problems:
        return problems
    inputs = processor(text=list(SAMPLE_LABELS), images=[sample_image(config)], return_tensors="pt")
    with torch.no_grad():
        logits = model.eval()(**inputs).logits_per_image
    return _pipeline_problems(folder, config) + _remote_code_problems(folder, inputs, logits)


def validate_adapter(folder: str | Path) -> list[str]:
    """Everything wrong with a PEFT adapter folder; above all a base model that names a local path."""
    folder = Path(folder)
    problems = [f"{name} is missing" for name in (ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME, CARD_NAME) if not (folder / name).is_file()]
    problems += find_secrets(folder)
    if (folder / ADAPTER_CONFIG_NAME).is_file():
        try:
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
    """Everything wrong with an ALive-style dataset folder: its card, each split's metadata rows and their images."""
    folder = Path(folder)
    if not folder.is_dir():
        return [f"{folder} is not a folder"]
    try:
        splits = find_caption_splits(folder)
    except ValueError as error:
        return [str(error)]
    problems = _card_problems(folder, DatasetCard) + find_secrets(folder)
    for split, split_dir in splits.items():
        metadata = (split_dir / "metadata.jsonl").relative_to(folder)
        rows, missing = [], []
        for number, line in enumerate((folder / metadata).read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                problems.append(f"{metadata} line {number} is not valid JSON: {_oneline(error)}")
                continue
            absent = [key for key in ("file_name", "caption") if not row.get(key)]
            if absent:
                problems.append(f"{metadata} line {number} lacks {absent}")
            elif not (split_dir / row["file_name"]).is_file():
                missing.append(row["file_name"])
            else:
                rows.append(row)
        if missing:
            problems.append(f"{metadata} names {len(missing)} image(s) that do not exist, e.g. {missing[:3]}")
        if not rows:
            problems.append(f"{metadata} lists no usable image-caption pair")
            continue
        try:
            with Image.open(split_dir / rows[0]["file_name"]) as image:
                image.convert("RGB")
        except OSError as error:
            problems.append(f"split {split!r}: {rows[0]['file_name']} is not a readable image: {_oneline(error)}")
    return problems


def sample_image(config: AgriCLIPConfig) -> Image.Image:
    """A seeded noise photo a little larger than the model's input, so the processor resizes and crops it."""
    side = config.vision_config.image_size + 16
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (side, side + 8, 3), dtype=np.uint8))


def _missing_checkpoint_files(folder: Path) -> list[str]:
    save_processor = "save the processor with processor.save_pretrained(folder)"
    hints = {
        CONFIG_NAME: "save the model with model.save_pretrained(folder)",
        PROCESSOR_NAME: save_processor,
        TOKENIZER_CONFIG_FILE: save_processor,
        FULL_TOKENIZER_FILE: save_processor,
    }
    problems = [f"{name} is missing ({hint})" for name, hint in hints.items() if not (folder / name).is_file()]
    index = folder / SAFE_WEIGHTS_INDEX_NAME
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError) as error:
            problems.append(f"{SAFE_WEIGHTS_INDEX_NAME} does not load: {error!r}")
            shards = []
        problems += [f"{shard} is missing ({SAFE_WEIGHTS_INDEX_NAME} lists it)" for shard in shards if not (folder / shard).is_file()]
    elif not (folder / SAFE_WEIGHTS_NAME).is_file():
        problems.append(f"{SAFE_WEIGHTS_NAME} is missing (no weights in safetensors format)")
    for config_name in (CONFIG_NAME, PROCESSOR_NAME):
        if not (folder / config_name).is_file():
            continue
        try:
            auto_map = json.loads((folder / config_name).read_text()).get("auto_map") or {}
        except json.JSONDecodeError as error:
            problems.append(f"{config_name} does not load: it is not valid JSON ({error})")
            continue
        problems += _custom_code_problems(folder, config_name, auto_map)
    return problems


def _custom_code_problems(folder: Path, config_name: str, auto_map: dict) -> list[str]:
    """Custom-code files that `auto_map` names (or that they import) and that are missing or import the package."""
    problems = []
    references = [ref for value in auto_map.values() for ref in (value if isinstance(value, (list, tuple)) else [value]) if ref]
    for module in sorted({reference.split(".")[0] for reference in references}):
        path = folder / f"{module}.py"
        if not path.is_file():
            problems.append(f"{path.name} is missing ({config_name} auto_map names it; save the model and processor again)")
            continue
        try:
            needed = [Path(file) for file in get_relative_import_files(path)]
        except FileNotFoundError as error:
            problems.append(f"{path.name} imports {Path(error.filename).name}, which is missing (save the model and processor again)")
            continue
        for file in [path, *needed]:
            if PACKAGE in get_imports(file):
                problems.append(f"{file.name} imports {PACKAGE}, which people loading with trust_remote_code do not have")
    return problems


def _card_problems(folder: Path, card_class) -> list[str]:
    path = folder / CARD_NAME
    if not path.is_file():
        command = "python -m model_card.card FOLDER" + (" --dataset" if card_class is DatasetCard else "")
        return [f"{CARD_NAME} is missing (write the card with `{command}`)"]
    try:
        card_class.load(path)
    except Exception as error:
        return [f"{CARD_NAME} does not parse as a card (YAML front matter): {_oneline(error)}"]
    return []


def _pipeline_problems(folder: Path, config: AgriCLIPConfig) -> list[str]:
    try:
        classifier = pipeline(TASK, model=str(folder))
        result = classifier(sample_image(config), candidate_labels=list(SAMPLE_LABELS))
    except Exception as error:
        return [f"pipeline({TASK!r}, model=folder) fails on a sample image: {_oneline(error)}"]
    scores = [entry["score"] for entry in result]
    if sorted(entry["label"] for entry in result) != sorted(SAMPLE_LABELS) or not all(map(math.isfinite, scores)):
        return [f"pipeline({TASK!r}) gave no finite score per label on a sample image: {result}"]
    if abs(sum(scores) - 1) > 1e-4:
        return [f"pipeline({TASK!r}) scores sum to {sum(scores)}, not 1, on a sample image"]
    return []


def _remote_code_problems(folder: Path, inputs, logits: torch.Tensor) -> list[str]:
    """Loads the model class from the folder's own code files, as `trust_remote_code=True` does, and compares its
    output on the sample with the package's."""
    reference = json.loads((folder / CONFIG_NAME).read_text()).get("auto_map", {}).get("AutoModelForZeroShotImageClassification")
    if reference is None:
        return [f"{CONFIG_NAME} auto_map lacks AutoModelForZeroShotImageClassification: pipeline(..., trust_remote_code=True) cannot load it"]
    try:
        remote_class = get_class_from_dynamic_module(reference, str(folder))
        with torch.no_grad():
            remote_logits = remote_class.from_pretrained(folder).eval()(**inputs).logits_per_image
    except Exception as error:
        return [f"the custom-code files do not load the model ({reference}): {_oneline(error)}"]
    difference = (remote_logits - logits).abs().max().item()
    if not difference <= REMOTE_CODE_TOLERANCE:
        return [f"the custom-code files give other outputs than the installed package (max |difference| {difference:.3g}); save the model again"]
    return []


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
):
    """Validates `folder` and, unless `dry_run`, uploads it to the Hub repo `repo_id` in one commit.

    Args:
        folder: a checkpoint or LoRA adapter folder, or with `dataset` an ALive-style dataset folder.
        repo_id: `org/name`; the repo is created when it does not exist.
        dataset: publish to a dataset repo.
        revision: the branch to commit to, created from `main` when missing (default: `main`).
        private: create the repo private. An existing public repo is never published to with `private`.
        commit_message: the commit's title.
        dry_run: validate only.

    Returns:
        The `CommitInfo` of the upload (`commit_url`, `oid`), or None for a dry run.

    Raises:
        PublishError: the folder failed a check, or `private` was asked of an existing public repo.
    """
    folder = Path(folder)
    if not _is_repo_id(repo_id):
        raise PublishError(folder, [f"{repo_id!r} is not a Hub repo id of the form org/name"])
    problems = validate_dataset(folder) if dataset else validate_checkpoint(folder)
    if problems:
        raise PublishError(folder, problems)
    if dry_run:
        return None
    repo_type = "dataset" if dataset else "model"
    api = HfApi()
    # Without --private the Hub's default applies (an organisation may make new repos private).
    api.create_repo(repo_id, repo_type=repo_type, private=private or None, exist_ok=True)
    if private and not api.repo_info(repo_id, repo_type=repo_type).private:
        raise PublishError(folder, [f"{repo_id} already exists and is public; make it private on the Hub first, or publish without --private"])
    if revision:
        api.create_branch(repo_id, branch=revision, repo_type=repo_type, exist_ok=True)
    commit = api.upload_folder(
        folder_path=folder,
        repo_id=repo_id,
        repo_type=repo_type,
        revision=revision,
        commit_message=commit_message or f"Upload {'dataset' if dataset else 'AgriCLIP checkpoint'} {folder.resolve().name}",
        ignore_patterns=IGNORE_PATTERNS,
    )
    logger.info("published %s to %s (commit %s)", folder, repo_id, commit.oid)
    return commit


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m model_card.publish", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("folder", type=Path, help="Checkpoint or LoRA adapter folder (or, with --dataset, dataset folder).")
    parser.add_argument("--repo-id", required=True, help="The Hub repo to publish to, org/name; created when missing.")
    parser.add_argument("--dataset", action="store_true", help="Publish an ALive-style dataset folder to a dataset repo.")
    parser.add_argument("--revision", default=None, help="Branch to commit to, created from main when missing (default: main).")
    parser.add_argument("--private", action="store_true", help="Create the repo private (refused for an existing public repo).")
    parser.add_argument("--commit-message", default=None, help="Title of the commit (default: 'Upload ... <folder name>').")
    parser.add_argument("--dry-run", action="store_true", help="Only validate the folder; upload nothing.")
    return parser


def main(argv: list[str] | None = None):
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        commit = publish(
            args.folder, args.repo_id, dataset=args.dataset, revision=args.revision, private=args.private,
            commit_message=args.commit_message, dry_run=args.dry_run,
        )
    except PublishError as error:
        print(error, file=sys.stderr)
        raise SystemExit(1) from None
    if commit is None:
        print(f"dry run passed: {args.folder} is ready to publish to {args.repo_id}")
    else:
        print(f"published {args.folder} to {args.repo_id}: {commit.commit_url}")
    return commit


if __name__ == "__main__":
    main()
