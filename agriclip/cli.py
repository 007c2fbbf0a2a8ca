"""The `agriclip` command (also `python -m agriclip`).

Parses and checks the arguments with the standard library alone, then imports the heavy implementation of the
subcommand (`modeling_agriclip.commands`, `modeling_agriclip.convert`, `model_card.card`, `model_card.publish`):
`--help` and every argument error answer before torch or transformers load.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from agriclip import IMAGE_EMBEDDINGS
from agriclip.errors import SINGLE_LABEL_WARNING, CLIError, ExitCode, warn
from agriclip.labels import is_hierarchy_file, load_hierarchy
from agriclip.templates import DEFAULT_TEMPLATES, ZERO_SHOT_TEMPLATES, get_templates


MODEL_ENV = "AGRICLIP_MODEL"
FORMATS = ("table", "csv", "json")
EMBEDDING_SUFFIXES = (".safetensors", ".npy")
# `--abstain-below-similarity` given no value: the threshold of the `--calibration` task file.
TASK_SIMILARITY = "task"

DESCRIPTION = f"""\
Zero-shot classification and embeddings of field photos, checkpoints and publishing, from a terminal.

  agriclip predict IMAGE... --labels "leaf rust,healthy leaf" [--template T ... | --dataset-template NAME]
  agriclip classify-folder DIR --labels-file labels.txt --output predictions.csv
  agriclip embed IMAGE... [--labels ...] --output embeddings.safetensors
  agriclip info MODEL
  agriclip export MODEL --labels "leaf rust,healthy leaf" --output DIR [--quantize int8]
  agriclip explain MODEL IMAGE... --labels "leaf rust,healthy leaf" --output DIR [--label "leaf rust"]
  agriclip index DIR --output photos.safetensors
  agriclip search photos.safetensors --text "maize leaf with rust" [--image PHOTO] --top-k 10
  agriclip convert --clip openai/clip-vit-base-patch16 --dino facebook/dino-vitb16 --output agriclip-init
  agriclip tokenizer --output DIR
  agriclip card FOLDER [--eval-results results.json --run-dir runs]
  agriclip publish FOLDER --repo-id org/name [--dry-run]

The model is an AgriCLIP or transformers CLIP folder, or a Hub id: --model, or the {MODEL_ENV} environment
variable. Images are files, folders (walked recursively) and glob patterns; unreadable images are listed on stderr
and skipped. Each label is put into every template (default {DEFAULT_TEMPLATES[0]!r}); several templates form a
prompt ensemble. Scores are softmax probabilities over the labels given, so they compare those labels only: a
single label always scores 1.0; for a model trained with SigLIP's sigmoid loss (config contrastive_loss "siglip") each
is the sigmoid probability of its own label instead. No command runs code from a model folder or asks on stdin whether
to. Every file a command writes is written whole or not at all. `agriclip COMMAND --help` describes each command.
"""

EXIT_CODES = """\
exit codes:
  0    success (unreadable images may have been skipped; they are listed on stderr)
  1    an unexpected error: a bug, please report it with the traceback
  2    usage error (bad or missing arguments, e.g. no --model and no AGRICLIP_MODEL)
  3    the model cannot be loaded (no such folder, no config.json, Hub id not reachable, a folder that would run
       its own code, weights missing, unexpected or of another shape, a corrupt or forged safetensors header)
  4    no images found
  5    images found, but none could be read
  6    the device is unknown or not available
  7    empty or invalid labels or templates (e.g. "{} with {}", "{name}", an unknown template set), found
       before the model loads
  8    the output file cannot be written (the previous file is left as it was)
  9    an input is not usable (convert: parts that cannot be read, e.g. a folder without config.json, or that do
       not fit; card: unreadable results; publish: the folder is not ready, with every problem listed)
  130  interrupted (Ctrl-C)
"""

OUTPUTS = """\
outputs:
  table  one line per image and rank, aligned for reading
  csv    columns image,rank,label,score,error: one row per image and rank (best first), then one row per
         unreadable file with the reason in error (e.g. corrupt, truncated)
  json   {"model", "revision", "embedding", "fusion_weight", "labels", "templates", "hierarchy": {"file",
         "levels", "groups", "templates"} | null, "calibration": {"file", "temperature", "bias"} | null,
         "abstain_below", "abstain_below_similarity", "agriclip_version",
         "results": [{"image", "answer" (when abstaining), "similarity" (with --abstain-below-similarity),
                      "predictions": [{"label", "score"} (+ "group", "group_score" with a YAML label file)]}],
         "skipped": [{"image", "error"}]}
  With --abstain-below (or --abstain-below-similarity), table and csv gain an answer column on each image's
  rank-1 row: its top label, or "unknown" when the top probability is below P (its best label's cosine
  similarity below S).
"""

EXPORT_OUTPUTS = """\
export writes into --output: model.onnx (input pixel_values (batch, 3, H, W) as the processor makes them; outputs
logits and probabilities (batch, labels): softmax over the labels, or per-label sigmoids for a SigLIP-trained model),
model.int8.onnx with --quantize int8 (with --open-vocabulary instead: image_encoder.onnx, text_encoder.onnx and
tokenizer.json, and image_encoder.int8.onnx), labels.json (labels in output order, templates, embedding, model and package
version), preprocessing.json (shorter side, resampling, crop, rescale, mean, std) and runner.py:
  python runner.py photos/ --top-k 3 [--model model.int8.onnx] [--format json]
"""

EMBED_OUTPUTS = """\
embed writes L2-normalised embeddings: image_embeds (one row per readable image, in the order of the files list)
and, with labels, label_embeds (one row per label). A .safetensors file holds both, with model, embedding, files,
skipped, labels and templates in its metadata; a .npy file holds one array and the metadata goes to <output>.json.
"""


EXPLAIN_OUTPUTS = """\
explain writes into --output, per readable image (named by its path below the folder common to all images, folders
joined by "__"): <name>.<map>.png, the heat map of the explained label overlaid on the processed (resized, centre-
cropped) photo, a cross at its maximum, and <name>.json: {"image", "model", "embedding", "labels", "templates",
"score", "scores": [{"label", "score"}] best first, "predicted", "explained", "explained_score", "explained_logit",
"size", "maps": [{"type", "description", "overlay", "grid", "argmax": {"x", "y"}, "constant"}]}; plus explain.json, the list of
results and skipped images. The maps follow the embedding (aligned: the backbone's; clip: the CLIP tower's; fused:
both), each min-max scaled to [0, 1]:
  backbone-attention   ViT/DINOv2 backbone: last-layer CLS-to-patch attention, mean over heads (and per head in
                       <name>.backbone-attention.heads.png); it does not depend on the label
  backbone-grad-cam    ResNet/ConvNeXt backbone: Grad-CAM of the explained logit on the last stage's feature map
  clip-grad-attention  CLIP image tower: gradient-weighted attention relevance over all layers (Chefer et al. 2021)
"""

INDEX_OUTPUTS = """\
index writes one .safetensors file: image_embeds, one L2-normalised row per readable image, and in its metadata under
"agriclip_index" a JSON document: {"format_version", "model" (a folder as its absolute path), "revision" (the Hub
commit; null for a folder), "embedding", "fusion_weight", "agriclip_version", "root" (DIR, absolute), "files":
[{"path" (below root), "size", "mtime_ns"}] in row order, "skipped": [{"image", "error"}]}.
Run it again with the same --output to update the index: only new files and files whose size or modification time
changed are embedded, files that are gone are dropped and unreadable ones are tried again; the result is the index a
fresh build writes. An index is updated only with the model (and revision) and embedding that built it: another is
refused with exit code 2; an --output that is not an index exits with 9.
"""

SEARCH_OUTPUTS = """\
search ranks the photos of INDEX by cosine similarity (in [-1, 1], not a probability) with each query: a text, or
the embedding of a query image. The search is exact: in torch, or with --backend faiss in FAISS's brute-force kNN
(IndexFlatIP's search), the same ranking (pip install "agriclip[search]"). The model is the index's; --model names it another way (a folder by
another path): another model, or a Hub model whose revision moved since the index was built, is refused with exit
code 2; a file that is not an index exits with 9.
outputs:
  table  one line per query and rank: query, rank, image, score
  csv    columns query,rank,image,score,error; then one row per unreadable query image with the reason in error
  json   {"index", "model", "revision", "embedding", "fusion_weight", "agriclip_version", "backend",
         "results": [{"query", "matches": [{"image", "score"}]}], "skipped": [{"image", "error"}]}
"""


# ---------------------------------------------------------------------------------------------------------------
# Checks that need no model: labels, templates, outputs
# ---------------------------------------------------------------------------------------------------------------


def parse_labels(labels: str | None, labels_file: str | None) -> list[str]:
    """The class names of `--labels "a,b,c"` or `--labels-file` (one per line); fails on an empty list or a
    duplicate."""
    if labels_file is not None:
        try:
            text = Path(labels_file).read_text(encoding="utf-8-sig")
        except (OSError, UnicodeDecodeError) as error:
            raise CLIError(ExitCode.LABELS, f"cannot read the labels file {labels_file}: {error}") from error
        names, source = [line.strip() for line in text.splitlines()], f"the labels file {labels_file}"
    else:
        names, source = [name.strip() for name in labels.split(",")], "--labels"
    names = [name for name in names if name]
    if not names:
        raise CLIError(
            ExitCode.LABELS, f"{source} holds no label; give at least one, e.g. --labels 'leaf rust,healthy leaf'"
        )
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise CLIError(ExitCode.LABELS, f"{source} repeats the label(s) {', '.join(map(repr, duplicates))}")
    return names


def resolve_templates(templates: Sequence[str] | None, dataset_template: str | None) -> list[str]:
    """The prompt templates of `--template` (repeatable: an ensemble) or `--dataset-template NAME`."""
    try:
        if dataset_template is not None:
            return get_templates(dataset_template)
        return get_templates(list(templates or DEFAULT_TEMPLATES))
    except KeyError as error:
        raise CLIError(ExitCode.LABELS, f"--dataset-template: {error.args[0]}") from error
    except ValueError as error:
        raise CLIError(ExitCode.LABELS, f"--template: {error}") from error


def parse_hierarchy(labels_file: str | None):
    """The two-level label file a `--labels-file` ending in .yaml or .yml is (`agriclip.labels`); None for another."""
    if labels_file is None or not is_hierarchy_file(labels_file):
        return None
    try:
        return load_hierarchy(labels_file)
    except (OSError, ValueError) as error:
        raise CLIError(ExitCode.LABELS, f"cannot read the label file {labels_file}: {error}") from error


def check_labelled(args) -> None:
    """predict and classify-folder: the labels and templates, resolved into `args.class_names`, `args.templates`,
    and a two-level label file's hierarchy into `args.hierarchy` (its labels, flat, are the class names)."""
    args.hierarchy = parse_hierarchy(args.labels_file)
    if args.hierarchy is not None and getattr(args, "abstain_below_similarity", None) is not None:
        raise CLIError(ExitCode.USAGE, "--abstain-below-similarity scores flat labels, not a YAML label file")
    if args.labels is None and args.labels_file is None:
        if getattr(args, "calibration", None) is None:
            raise CLIError(ExitCode.USAGE, "give --labels or --labels-file (or --calibration: its task file has them)")
        args.class_names = None  # the task file's (`modeling_agriclip.commands.read_task_file`)
    else:
        args.class_names = args.hierarchy.labels if args.hierarchy else parse_labels(args.labels, args.labels_file)
    args.templates = resolve_templates(args.template, args.dataset_template)
    if args.class_names is not None and len(args.class_names) == 1:
        warn(SINGLE_LABEL_WARNING.format(label=args.class_names[0]))


def check_classify_folder(args) -> None:
    if not os.path.isdir(args.folder):
        raise CLIError(ExitCode.NO_IMAGES, f"{args.folder} is not a folder")
    check_labelled(args)


def check_embed(args) -> None:
    suffix = args.output.suffix.lower()
    if suffix not in EMBEDDING_SUFFIXES:
        raise CLIError(
            ExitCode.USAGE, f"--output {args.output}: the suffix must be one of {', '.join(EMBEDDING_SUFFIXES)}"
        )
    wants_labels = args.labels is not None or args.labels_file is not None
    if not args.images and not wants_labels:
        raise CLIError(ExitCode.USAGE, "nothing to embed: give images, --labels or --labels-file")
    if suffix == ".npy" and args.images and wants_labels:
        raise CLIError(
            ExitCode.USAGE,
            "a .npy file holds one array: embed images and labels into separate files, or write .safetensors",
        )
    args.class_names = parse_labels(args.labels, args.labels_file) if wants_labels else []
    args.templates = resolve_templates(args.template, args.dataset_template)


def check_export(args) -> None:
    """export: the labels (optional for an open vocabulary: the runner's defaults) and templates, as predict checks
    them, and an output folder that is not an existing file."""
    if args.labels is None and args.labels_file is None:
        if not args.open_vocabulary:
            raise CLIError(ExitCode.LABELS, "a closed-vocabulary export needs --labels or --labels-file")
        args.class_names, args.templates = [], resolve_templates(args.template, args.dataset_template)
    else:
        check_labelled(args)
    if args.output.exists() and not args.output.is_dir():
        raise CLIError(ExitCode.OUTPUT, f"--output {args.output} is a file; the export is a folder")


def check_explain(args) -> None:
    """explain: the labels and templates as predict checks them, --label among the labels, and an output folder
    that is not an existing file."""
    check_labelled(args)
    if args.label is not None and args.label not in args.class_names:
        raise CLIError(ExitCode.LABELS, f"--label {args.label!r} is not one of the labels {args.class_names}")
    if args.output.exists() and not args.output.is_dir():
        raise CLIError(ExitCode.OUTPUT, f"--output {args.output} is a file; explain writes into a folder")


def check_index(args) -> None:
    """index: a folder to walk and a .safetensors output (a new file, or the index to update)."""
    if not os.path.isdir(args.folder):
        raise CLIError(ExitCode.NO_IMAGES, f"{args.folder} is not a folder")
    if args.output.suffix.lower() != ".safetensors":
        raise CLIError(ExitCode.USAGE, f"--output {args.output}: an index is a .safetensors file")


def check_search(args) -> None:
    if not args.index.is_file():
        raise CLIError(
            ExitCode.INPUT, f"{args.index}: no such index file (build one with: agriclip index DIR --output INDEX)"
        )


# ---------------------------------------------------------------------------------------------------------------
# Parser
# ---------------------------------------------------------------------------------------------------------------


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        default=os.environ.get(MODEL_ENV),
        help=f"AgriCLIP or transformers CLIP folder, or a Hub id (default: ${MODEL_ENV}).",
    )
    parser.add_argument(
        "--embedding",
        choices=IMAGE_EMBEDDINGS,
        default=None,
        help="AgriCLIP image embedding: the aligned backbone, the CLIP image tower, or their fusion "
        "(default: the checkpoint's image_embedding).",
    )
    parser.add_argument("--batch-size", type=_positive_int, default=32, help="Images per forward pass (default: 32).")
    parser.add_argument(
        "--num-workers",
        type=_non_negative_int,
        default=None,
        help="Processes decoding images (default: up to 4, two cores spared; 0 for a single batch).",
    )
    parser.add_argument(
        "--device", default=None, help="cpu, cuda, cuda:1, mps, ... (default: cuda, then mps, else cpu)."
    )


def _probability(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be a probability from 0 to 1, got {text}")
    return value


def _similarity(text: str) -> float | str:
    if text == TASK_SIMILARITY:  # argparse converts the option's `const` too
        return text
    value = float(text)
    if not -1.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be a cosine similarity from -1 to 1, got {text}")
    return value


def _add_prediction_options(parser: argparse.ArgumentParser) -> None:
    """predict and classify-folder: a task file's calibration, and abstention."""
    parser.add_argument(
        "--calibration",
        type=Path,
        default=None,
        metavar="FILE",
        help="Task file of `python -m evaluation.calibrate`: divides the logits by its fitted temperature (plus its "
        "bias for a SigLIP model) and uses its image embedding; its templates replace the default ones. Refused for "
        "labels or templates it was not fitted for.",
    )
    abstention = parser.add_mutually_exclusive_group()
    abstention.add_argument(
        "--abstain-below",
        type=_probability,
        default=None,
        metavar="P",
        help='Answer "unknown" for a photo whose top (calibrated, with --calibration) probability is below P: most '
        "likely none of the labels. Adds an answer column (json: an answer per image). A softmax over the labels "
        "given can be confident on a photo far from all of them: for photos of other subjects see "
        "--abstain-below-similarity.",
    )
    abstention.add_argument(
        "--abstain-below-similarity",
        type=_similarity,
        nargs="?",
        const=TASK_SIMILARITY,
        default=None,
        metavar="S",
        help='Answer "unknown" for a photo whose cosine similarity to its best label is below S (-1 to 1; json also '
        "gives each photo's similarity): a distance that falls for photos unlike every label. Given no S, the "
        "--calibration task file's threshold, which keeps 90 %% of its labelled shots. Flat labels only.",
    )


def _add_model_positional(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "model",
        nargs="?",
        default=os.environ.get(MODEL_ENV),
        metavar="MODEL",
        help=f"Checkpoint folder or Hub id (default: ${MODEL_ENV}).",
    )


def _add_label_options(parser: argparse.ArgumentParser, required: bool) -> None:
    labels = parser.add_mutually_exclusive_group(required=required)
    labels.add_argument("--labels", help='Comma-separated class names, e.g. "leaf rust,healthy leaf".')
    labels.add_argument(
        "--labels-file",
        help="Text file of class names, one per line (blank lines ignored); for predict and classify-folder also a "
        "two-level YAML label file (.yaml/.yml: groups such as crops -> their labels, templates per level; see "
        "agriclip.labels): each photo is given its group first, then a label of that group.",
    )
    templates = parser.add_mutually_exclusive_group()
    templates.add_argument(
        "--template",
        action="append",
        help="Prompt template with {} for the label; repeat for a prompt ensemble "
        f"(default: {DEFAULT_TEMPLATES[0]!r}).",
    )
    templates.add_argument(
        "--dataset-template",
        metavar="NAME",
        help=f"A registered template set: {', '.join(sorted(ZERO_SHOT_TEMPLATES))}.",
    )


def _command(commands, name: str, help: str, run: str, check=None, epilog: str | None = None, **defaults):
    """A subcommand whose `run` ("module:function", imported once the arguments are valid) does the work."""
    parser = commands.add_parser(
        name, help=help, description=help, epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.set_defaults(run=run, check=check, **defaults)
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="agriclip",
        description=DESCRIPTION,
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    predict = _command(
        commands,
        "predict",
        "Zero-shot classify images; print the top labels.",
        "modeling_agriclip.commands:run_predict",
        check_labelled,
        OUTPUTS,
        needs_model=True,
    )
    predict.add_argument("images", nargs="+", metavar="IMAGE", help="Image files, folders or glob patterns.")
    _add_label_options(predict, required=False)  # a --calibration task file holds labels too
    predict.add_argument("--top-k", type=_positive_int, default=5, help="Labels shown per image (default: 5).")
    predict.add_argument("--format", choices=FORMATS, default="table", help="Output format (default: table).")
    _add_prediction_options(predict)
    _add_model_options(predict)

    folder = _command(
        commands,
        "classify-folder",
        "Zero-shot classify every image under a folder into a file.",
        "modeling_agriclip.commands:run_classify_folder",
        check_classify_folder,
        OUTPUTS,
        needs_model=True,
    )
    folder.add_argument("folder", metavar="DIR", help="Folder walked recursively.")
    _add_label_options(folder, required=False)
    folder.add_argument("--output", type=Path, required=True, help="Predictions file (.csv or .json).")
    folder.add_argument("--top-k", type=_positive_int, default=1, help="Labels kept per image (default: 1).")
    folder.add_argument(
        "--format", choices=FORMATS, default=None, help="Output format (default: from the --output suffix, else csv)."
    )
    _add_prediction_options(folder)
    _add_model_options(folder)

    embed = _command(
        commands,
        "embed",
        "Write image and/or label embeddings to .safetensors or .npy.",
        "modeling_agriclip.commands:run_embed",
        check_embed,
        EMBED_OUTPUTS,
        needs_model=True,
    )
    embed.add_argument("images", nargs="*", metavar="IMAGE", help="Image files, folders or glob patterns.")
    _add_label_options(embed, required=False)
    embed.add_argument("--output", type=Path, required=True, help="Embeddings file (.safetensors or .npy).")
    _add_model_options(embed)

    info = _command(
        commands,
        "info",
        "Describe a checkpoint: towers, sizes, embedding mode, model card (the weights are not loaded).",
        "modeling_agriclip.commands:run_info",
        needs_model=True,
    )
    _add_model_positional(info)
    info.add_argument("--format", choices=("table", "json"), default="table", help="Output format (default: table).")

    export = _command(
        commands,
        "export",
        "Export a closed-vocabulary classifier of the labels for offline devices: the image path of the embedding "
        "and the label embeddings as one linear layer, in ONNX (dynamic batch), with labels.json, "
        "preprocessing.json and runner.py (onnxruntime, Pillow and numpy only).",
        "modeling_agriclip.commands:run_export",
        check_export,
        EXPORT_OUTPUTS,
        needs_model=True,
    )
    _add_model_positional(export)
    _add_label_options(export, required=False)
    export.add_argument("--output", type=Path, required=True, help="Folder to write the export to (replaced whole).")
    export.add_argument(
        "--open-vocabulary",
        action="store_true",
        help="Export the image and text encoders as separate graphs, with the tokenizer, so that runner.py --labels "
        "takes new labels on the device (which then also needs the tokenizers package); --labels become its defaults.",
    )
    export.add_argument("--format", choices=("onnx",), default="onnx", help="Model format (default: onnx).")
    export.add_argument(
        "--quantize",
        choices=("int8",),
        default=None,
        help="Also write model.int8.onnx, onnxruntime's dynamic int8 quantisation (default: none).",
    )
    export.add_argument(
        "--embedding",
        choices=IMAGE_EMBEDDINGS,
        default=None,
        help="AgriCLIP image embedding to export (default: the checkpoint's image_embedding).",
    )

    explain = _command(
        commands,
        "explain",
        "Show where the model looked: for the predicted (or --label) label of each image, a heat map overlaid on the "
        "processed photo (PNG) next to a JSON of the scores.",
        "modeling_agriclip.commands:run_explain",
        check_explain,
        EXPLAIN_OUTPUTS,
        needs_model=True,
    )
    _add_model_positional(explain)
    explain.add_argument("images", nargs="+", metavar="IMAGE", help="Image files, folders or glob patterns.")
    _add_label_options(explain, required=True)
    explain.add_argument("--output", type=Path, required=True, help="Folder to write the overlays and JSON files to.")
    explain.add_argument(
        "--label", default=None, help="Explain this label (one of --labels) for every image (default: the predicted)."
    )
    explain.add_argument(
        "--embedding",
        choices=IMAGE_EMBEDDINGS,
        default=None,
        help="AgriCLIP image embedding to explain (default: the checkpoint's image_embedding).",
    )
    explain.add_argument("--batch-size", type=_positive_int, default=8, help="Images per forward pass (default: 8).")
    explain.add_argument(
        "--num-workers",
        type=_non_negative_int,
        default=None,
        help="Processes decoding images (default: up to 4, two cores spared; 0 for a single batch).",
    )
    explain.add_argument(
        "--device", default=None, help="cpu, cuda, cuda:1, mps, ... (default: cuda, then mps, else cpu)."
    )

    index = _command(
        commands,
        "index",
        "Embed every image under a folder into a search index (.safetensors), or update the index with the files "
        "added, changed and removed since.",
        "modeling_agriclip.search:run_index",
        check_index,
        INDEX_OUTPUTS,
        needs_model=True,
    )
    index.add_argument("folder", metavar="DIR", help="Folder walked recursively.")
    index.add_argument("--output", type=Path, required=True, help="Index file (.safetensors), created or updated.")
    _add_model_options(index)

    search = _command(
        commands,
        "search",
        "Find the photos of an index nearest to a text or to query photos.",
        "modeling_agriclip.search:run_search",
        check_search,
        SEARCH_OUTPUTS,
    )
    search.add_argument("index", type=Path, metavar="INDEX", help="Index file written by `agriclip index`.")
    queries = search.add_mutually_exclusive_group(required=True)
    queries.add_argument("--text", action="append", help="Query text; repeat for several queries.")
    queries.add_argument(
        "--image", action="append", metavar="PHOTO", help="Query photo (file, folder or glob); repeat for several."
    )
    search.add_argument("--top-k", type=_positive_int, default=10, help="Photos shown per query (default: 10).")
    search.add_argument("--format", choices=FORMATS, default="table", help="Output format (default: table).")
    search.add_argument(
        "--backend",
        choices=("torch", "faiss"),
        default="torch",
        help="Exact search in torch, or in FAISS (default: torch; see bench/bench_search.py).",
    )
    search.add_argument(
        "--model", default=None, help="The index's model, by another path (default: the model the index names)."
    )
    search.add_argument(
        "--batch-size", type=_positive_int, default=32, help="Query photos per forward pass (default: 32)."
    )
    search.add_argument(
        "--device", default=None, help="cpu, cuda, cuda:1, mps, ... (default: cuda, then mps, else cpu)."
    )

    convert = _command(
        commands,
        "convert",
        "Build an AgriCLIP checkpoint (model + processor) from pretrained parts; a part not given "
        "comes randomly initialised from --preset. Official .pth files are read with torch.load(weights_only=True).",
        "modeling_agriclip.convert:run",
    )
    convert.add_argument("--output", required=True, help="Folder to write the AgriCLIP checkpoint to.")
    convert.add_argument(
        "--clip", help="transformers CLIP checkpoint (folder or Hub id) for the text and image towers."
    )
    convert.add_argument(
        "--dino", help="transformers ViT/DINOv2/ResNet/ConvNeXt checkpoint (folder or Hub id) for the backbone."
    )
    convert.add_argument("--official-dino", help="Official AgriCLIP DINO ResNet state dict (torchvision layout, .pth).")
    convert.add_argument("--official-aligner", help="Official AgriCLIP aligner file holding W (out, in) and b (out,).")
    convert.add_argument(
        "--preset",
        default="paper",
        help="Layout of the parts not given: tiny, tiny_<backbone> (tiny_resnet, tiny_dinov2, "
        "tiny_convnext), paper (ViT-B/16 + ResNet-50, the default) or vit_b16.",
    )
    convert.add_argument(
        "--image-embedding",
        choices=IMAGE_EMBEDDINGS,
        help="Image embedding zero-shot compares with text (default: aligned, the paper's).",
    )

    tokenizer = _command(
        commands,
        "tokenizer",
        "Write OpenAI CLIP's tokenizer, rebuilt offline from the BPE file open-clip-torch ships.",
        "modeling_agriclip.commands:run_tokenizer",
    )
    tokenizer.add_argument(
        "--output", required=True, help="Folder to write tokenizer.json and tokenizer_config.json to."
    )
    tokenizer.add_argument(
        "--bpe", default=None, help="Path of bpe_simple_vocab_16e6.txt.gz (default: open-clip-torch's)."
    )

    card = _command(
        commands,
        "card",
        "Write the model card (README.md) of a checkpoint, or with --dataset the "
        "dataset card of an ALive-style dataset folder.",
        "model_card.card:run",
    )
    card.add_argument("folder", type=Path, help="The checkpoint (or, with --dataset, dataset) folder.")
    card.add_argument("--dataset", action="store_true", help="Write a dataset card for an ALive-style dataset folder.")
    card.add_argument(
        "--repo-id", default=None, help="The Hub repo the card is for (org/name), used in names and examples."
    )
    card.add_argument("--eval-results", type=Path, default=None, help="results.json of `python -m evaluation.suite`.")
    card.add_argument(
        "--eval-model",
        default=None,
        help="This checkpoint's model name in --eval-results (default: found from its image embedding).",
    )
    card.add_argument(
        "--run-dir", type=Path, default=None, help="Folder of the training runs; their logs give the settings."
    )
    card.add_argument("--training-info", type=Path, default=None, help="JSON file of training_info (data, base_model).")
    card.add_argument(
        "--train-data", type=Path, default=None, help="The image-caption folder the model was trained on."
    )
    card.add_argument("--pretty-name", default=None, help="Dataset card title (with --dataset).")
    card.add_argument("--description", default=None, help="Dataset card first paragraph (with --dataset).")
    card.add_argument(
        "--license",
        default="other",
        help="Dataset license id (with --dataset; default: other, the sources' own licenses).",
    )

    publish = _command(
        commands,
        "publish",
        "Check a checkpoint, LoRA adapter or dataset folder and upload it to the Hub in one commit. "
        "Only an allow-list of what such a folder is goes up, never a link out of the folder, and no file whose bytes "
        "hold a token or a private key; the folder's custom-code files must equal the installed package's unless "
        "--trust-remote-code. The token comes from HF_TOKEN or `hf auth login`.",
        "model_card.publish:run",
    )
    publish.add_argument(
        "folder", type=Path, help="Checkpoint or LoRA adapter folder (or, with --dataset, dataset folder)."
    )
    publish.add_argument("--repo-id", required=True, help="The Hub repo to publish to, org/name; created when missing.")
    publish.add_argument(
        "--dataset", action="store_true", help="Publish an ALive-style dataset folder to a dataset repo."
    )
    publish.add_argument(
        "--revision", default=None, help="Branch to commit to, created from main when missing (default: main)."
    )
    publish.add_argument(
        "--private", action="store_true", help="Create the repo private (refused for an existing public repo)."
    )
    publish.add_argument(
        "--commit-message", default=None, help="Title of the commit (default: 'Upload ... <folder name>')."
    )
    publish.add_argument(
        "--dry-run", action="store_true", help="Only check the folder and print what would be uploaded."
    )
    publish.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="Run the folder's custom-code files and compare their outputs with the installed package's, where they are "
        "not the package's files (without it no code of the folder runs, and such files are refused).",
    )
    return parser


def _implementation(reference: str):
    """The function "module:function" names; the heavy stack loads here, once the arguments are valid."""
    module, _, function = reference.partition(":")
    return getattr(importlib.import_module(module), function)


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command line; returns the exit code (argparse exits with 2 on usage errors)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "needs_model", False) and not args.model:
        parser.error(f"no model given: pass --model PATH (or MODEL for info and export), or set {MODEL_ENV}")
    try:
        if args.check is not None:
            args.check(args)
        return int(_implementation(args.run)(args))
    except CLIError as error:
        print(f"agriclip: error: {error}", file=sys.stderr)
        return int(error.code)
    except KeyboardInterrupt:
        print("agriclip: interrupted", file=sys.stderr)
        return int(ExitCode.INTERRUPTED)
