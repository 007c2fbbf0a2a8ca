"""Export a zero-shot classifier for offline devices: a fixed label set makes the text tower a one-off, so the
deployed model is the image path of one embedding followed by one linear layer.

`export_classifier` writes, into one folder (atomically: the whole folder or nothing):

- `model.onnx`: `pixel_values` (batch, 3, H, W), the processor's output, to `logits` (batch, C) and `probabilities`
  (batch, C): the image embedding chosen (backbone + aligner, CLIP image tower, or their fusion), L2-normalised,
  times the normalised prompt-ensemble label embeddings scaled by the logit scale, as `ZeroShotClassifier.logits`
  computes them; softmax over the labels, or per-label sigmoids for a SigLIP-trained model. Dynamic batch.
- `model.int8.onnx` with `quantize="int8"`: onnxruntime's dynamic int8 quantisation of the same graph's linear layers
  (weights int8 per output channel, activations quantised per batch; no calibration data; `INT8_OPERATORS`).
- `labels.json`: the labels in output order, the templates, the embedding, the scores' kind and the provenance
  (model, revision, package version).
- `preprocessing.json`: what the image processor does (shorter side, resampling filter, crop, rescale, mean, std).
- `runner.py`: `modeling_agriclip.onnx_runner`, which classifies photos with onnxruntime, Pillow and numpy only.

An open-vocabulary export (`open_vocabulary=True`, for users who change labels on the device) writes instead
`image_encoder.onnx` (`pixel_values` to normalised `image_embeds`; `image_encoder.int8.onnx` with int8),
`text_encoder.onnx` (`input_ids`, `attention_mask` to normalised `text_embeds`, dynamic batch and length) and the
tokenizer (`tokenizer.json`, read on the device by the `tokenizers` package); the runner then embeds the labels it
is given once, ensembling the templates as `ZeroShotClassifier.label_embeddings` does.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from agriclip.atomic import replace_folder
from modeling_agriclip.zero_shot import ZeroShotClassifier, _as_embedding


FP32_MODEL = "model.onnx"
INT8_MODEL = "model.int8.onnx"
# The graphs of an open-vocabulary export (labels chosen on the device), and its tokenizer.
OPEN_VOCABULARY_MODELS = {"image": "image_encoder.onnx", "text": "text_encoder.onnx"}
TOKENIZER = "tokenizer.json"
QUANTIZATIONS = ("int8",)
# The operators int8 quantisation rewrites: the linear layers (aligner, head, the attention and MLP projections of
# ViT and CLIP towers). Convolutions stay float32: on the demo's ResNet backbone, dynamic int8 convolutions changed
# the top-1 label of 5-11 % of the test images, static ones (calibrated on pretraining photos) of 8-14 %.
INT8_OPERATORS = ["MatMul", "Gemm"]
# What the export imports (torch's ONNX exporter needs onnxscript): `pip install 'agriclip[export]'`.
EXPORT_REQUIREMENTS = ("onnx", "onnxruntime", "onnxscript")
RUNNER = Path(__file__).with_name("onnx_runner.py")
# ONNX opset of the export: onnxruntime 1.17 and later run it.
OPSET = 18


class ImageEncoder(nn.Module):
    """`classifier`'s image path: `forward(pixel_values)` (batch, 3, H, W) gives the L2-normalised image embeddings
    (batch, D) of its embedding (`ZeroShotClassifier.image_embeddings`)."""

    def __init__(self, classifier: ZeroShotClassifier):
        super().__init__()
        self.model = classifier.model
        self.image_kwargs = {} if classifier.embedding is None else {"embedding": classifier.embedding}
        if classifier.fusion_weight is not None:
            self.image_kwargs["fusion_weight"] = classifier.fusion_weight

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        features = _as_embedding(self.model.get_image_features(pixel_values=pixel_values, **self.image_kwargs))
        return F.normalize(features, dim=-1)


class TextEncoder(nn.Module):
    """`classifier`'s text path: `forward(input_ids, attention_mask)` (batch, sequence) gives the L2-normalised text
    embeddings (batch, D) (`ZeroShotClassifier.text_embeddings`)."""

    def __init__(self, classifier: ZeroShotClassifier):
        super().__init__()
        self.model = classifier.model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        features = self.model.get_text_features(input_ids=input_ids, attention_mask=attention_mask)
        return F.normalize(_as_embedding(features), dim=-1)


class ClosedVocabularyClassifier(nn.Module):
    """The image path of `classifier`'s embedding and its label embeddings as one linear layer.

    `forward(pixel_values)` of shape (batch, 3, H, W) returns `(logits, probabilities)`, both (batch, C): the same
    numbers as `classifier.logits(pixel_values, class_names, templates)` and the softmax (or, for a SigLIP-trained
    model, the sigmoids) of them.
    """

    def __init__(self, classifier: ZeroShotClassifier, class_names: Sequence[str], templates: Sequence[str]):
        super().__init__()
        self.image_encoder = ImageEncoder(classifier)
        self.sigmoid = classifier.sigmoid_scores
        dtype = classifier.model.dtype
        label_embeds = classifier.label_embeddings(class_names, templates)
        self.register_buffer("weight", classifier.logit_scale * label_embeds.to(dtype))
        self.register_buffer("bias", torch.full((len(class_names),), classifier.logit_bias, dtype=dtype))

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = F.linear(self.image_encoder(pixel_values), self.weight, self.bias)
        return logits, (logits.sigmoid() if self.sigmoid else logits.softmax(dim=-1))


def preprocessing_spec(image_processor) -> dict:
    """What `onnx_runner.preprocess` needs to repeat the image processor's steps.

    Raises:
        ValueError: for a processor that does not resize the shorter side, centre-crop, rescale and normalise (the
            steps of CLIP's and AgriCLIP's processors), naming what differs.
    """
    size, crop = dict(image_processor.size), dict(image_processor.crop_size)
    steps = ("do_resize", "do_center_crop", "do_rescale", "do_normalize")
    missing = [step for step in steps if not getattr(image_processor, step, False)]
    if missing or "shortest_edge" not in size or not {"height", "width"} <= set(crop):
        raise ValueError(
            f"the image processor ({type(image_processor).__name__}: size {size}, crop {crop}, off: {missing}) is not "
            "a shorter-side resize + centre crop + rescale + normalise, the steps the exported runner repeats"
        )
    return {
        "shortest_edge": int(size["shortest_edge"]),
        "resample": int(image_processor.resample),
        "crop_size": [int(crop["height"]), int(crop["width"])],
        "rescale_factor": float(image_processor.rescale_factor),
        "image_mean": [float(value) for value in image_processor.image_mean],
        "image_std": [float(value) for value in image_processor.image_std],
    }


@dataclass(frozen=True)
class Export:
    """What `export_classifier` wrote: the folder and each model file's size in bytes."""

    folder: Path
    sizes: dict[str, int]


def export_onnx(
    module: nn.Module,
    inputs: dict[str, torch.Tensor],
    outputs: Sequence[str],
    path: Path,
    dynamic: dict[str, dict[int, "torch.export.Dim"]],
) -> None:
    """`module` as an ONNX graph at `path`, from the named `inputs` (examples; `dynamic` names their dynamic axes)
    to the named `outputs`."""
    # The exporter warns of every torchvision operator it cannot register when torchvision is absent: none is used.
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    torch.onnx.export(
        module,
        tuple(inputs.values()),
        str(path),
        input_names=list(inputs),
        output_names=list(outputs),
        dynamic_shapes=dynamic,
        opset_version=OPSET,
        dynamo=True,
        external_data=False,
        verbose=False,
    )


def quantize_int8(source: Path, target: Path) -> None:
    """onnxruntime's dynamic int8 quantisation of the linear layers (`INT8_OPERATORS`) of `source`, per output
    channel, into `target`."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # Its advice to run onnxruntime's shape-inference pre-processing goes to the root logger: hush it.
    root = logging.getLogger()
    level, root.level = root.level, logging.ERROR
    try:
        quantize_dynamic(
            source, target, weight_type=QuantType.QInt8, per_channel=True, op_types_to_quantize=INT8_OPERATORS
        )
    finally:
        root.setLevel(level)


def _write_graphs(classifier, class_names, templates, staging: Path, crop_size, open_vocabulary: bool) -> bool:
    """The ONNX graphs of an export into `staging`; returns whether the scores are sigmoids."""
    batch = torch.export.Dim("batch")
    pixels = {"pixel_values": torch.zeros(2, 3, *crop_size, dtype=classifier.model.dtype, device=classifier.device)}
    if not open_vocabulary:
        module = ClosedVocabularyClassifier(classifier, class_names, templates).eval()
        export_onnx(module, pixels, ["logits", "probabilities"], staging / FP32_MODEL, {"pixel_values": {0: batch}})
        return module.sigmoid
    image_path = staging / OPEN_VOCABULARY_MODELS["image"]
    export_onnx(ImageEncoder(classifier).eval(), pixels, ["image_embeds"], image_path, {"pixel_values": {0: batch}})
    tokens = classifier.processor(text=["a photo of a leaf.", "rust"], return_tensors="pt", padding=True)
    text = {name: tokens[name].to(classifier.device) for name in ("input_ids", "attention_mask")}
    sequence = torch.export.Dim("sequence", max=classifier.model.config.text_config.max_position_embeddings)
    export_onnx(
        TextEncoder(classifier).eval(),
        text,
        ["text_embeds"],
        staging / OPEN_VOCABULARY_MODELS["text"],
        {name: {0: batch, 1: sequence} for name in text},
    )
    classifier.processor.tokenizer.backend_tokenizer.save(str(staging / TOKENIZER))
    return classifier.sigmoid_scores


def export_classifier(
    classifier: ZeroShotClassifier,
    class_names: Sequence[str],
    templates: Sequence[str],
    output: str | Path,
    quantize: str | None = None,
    provenance: dict | None = None,
    open_vocabulary: bool = False,
) -> Export:
    """Writes the classifier of `class_names` (prompt ensembles of `templates`) to the folder `output`, replacing it
    whole (see the module docstring for its files). `provenance` (model, revision, ...) goes into labels.json.

    With `open_vocabulary`, the image and text encoders are exported as separate graphs (`OPEN_VOCABULARY_MODELS`)
    with the tokenizer, so that the runner can take new labels on the device (it then also needs the `tokenizers`
    package); `class_names` are then its default labels and may be empty.

    Raises:
        ValueError: for an unknown `quantize`, no `class_names` for a closed vocabulary, or an image processor the
            runner cannot repeat.
        ImportError: when onnx, onnxruntime or onnxscript is not installed, naming the extra that installs them.
    """
    if quantize is not None and quantize not in QUANTIZATIONS:
        raise ValueError(f"unknown quantisation {quantize!r}; choose from {list(QUANTIZATIONS)}")
    if not class_names and not open_vocabulary:
        raise ValueError("a closed-vocabulary export needs at least one label")
    missing = [name for name in EXPORT_REQUIREMENTS if importlib.util.find_spec(name) is None]
    if missing:
        raise ImportError(f"exporting needs {', '.join(missing)}: pip install 'agriclip[export]'")
    spec = preprocessing_spec(classifier.processor.image_processor)
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = output.with_name(f".staging-{output.name}")
    shutil.rmtree(staging, ignore_errors=True)  # a killed export's leftovers
    staging.mkdir()
    try:
        sigmoid = _write_graphs(classifier, class_names, templates, staging, spec["crop_size"], open_vocabulary)
        if quantize == "int8":
            image_model = OPEN_VOCABULARY_MODELS["image"] if open_vocabulary else FP32_MODEL
            quantize_int8(staging / image_model, staging / image_model.replace(".onnx", ".int8.onnx"))
        labels = {
            "labels": list(class_names),
            "templates": list(templates),
            "open_vocabulary": open_vocabulary,
            "embedding": classifier.embedding or getattr(classifier.model.config, "image_embedding", "clip"),
            "scores": "sigmoid" if sigmoid else "softmax",
            "logit_scale": classifier.logit_scale,
            "logit_bias": classifier.logit_bias,
            **(provenance or {}),
        }
        (staging / "labels.json").write_text(json.dumps(labels, indent=2, ensure_ascii=False) + "\n", "utf-8")
        (staging / "preprocessing.json").write_text(json.dumps(spec, indent=2) + "\n", "utf-8")
        shutil.copyfile(RUNNER, staging / "runner.py")
        sizes = {path.name: path.stat().st_size for path in sorted(staging.glob("*.onnx"))}
        replace_folder(staging, output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return Export(output, sizes)
