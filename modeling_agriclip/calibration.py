"""Per-task calibration of zero-shot scores, abstention, and the task file that carries both to `agriclip predict`.

A zero-shot score is a softmax (InfoNCE) or a sigmoid (SigLIP) of `exp(logit_scale) * cos (+ logit_bias)`: the scale
was learnt on pre-training pairs, not on a farmer's ten labels, so "62 %" need not mean right 62 % of the time.
Temperature scaling (Guo et al., "On Calibration of Modern Neural Networks", ICML 2017) fits one number T per task on
a few labelled shots and divides the logits by it; the ranking, and so every accuracy, is unchanged. The fit keeps
each objective's own reading of the logits:

- InfoNCE: p = softmax(z / T) over the task's labels, fitted by the mean cross-entropy of the shots. A bias would
  cancel in the softmax, so there is none.
- SigLIP: p_c = sigmoid(z_c / T + b) per label, fitted by the mean binary cross-entropy over every (shot, label)
  pair, the shot's own label the one positive (Platt scaling, one (T, b) shared by the labels): SigLIP's `logit_bias`
  was learnt for a batch of pre-training captions, not for this task's label set.

Both objectives are convex in (1/T, b), since the logits are linear in them; the fit runs L-BFGS on log(1/T) (T stays
positive) and b, from T = 1, b = 0.

The task file (JSON, `TaskFile`) records the fitted (T, b) with what they were fitted for: the model, the image
embedding (and fusion weight), the labels and templates. `agriclip predict --calibration FILE` applies it and refuses
labels or templates it was not fitted for. `python -m evaluation.calibrate` writes it; it may also hold the image
embedding chosen per task from the shots (`selection`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from agriclip.atomic import write_json_atomically


TASK_FILE_FORMAT = "agriclip-task"
TASK_FILE_VERSION = 1
OBJECTIVES = ("infonce", "siglip")
# The answer of a prediction whose top (calibrated) probability is below `--abstain-below`.
UNKNOWN_LABEL = "unknown"


@dataclass(frozen=True)
class Calibration:
    """A fitted temperature and bias: calibrated logits are `logits / temperature + bias` (the bias is 0 for
    InfoNCE, where it would cancel in the softmax)."""

    temperature: float = 1.0
    bias: float = 0.0

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        return logits / self.temperature + self.bias


def probabilities(logits: torch.Tensor, sigmoid: bool) -> torch.Tensor:
    """What a user is shown for logits (N, C): per-label sigmoids for a SigLIP model, else a softmax over the
    labels."""
    return logits.sigmoid() if sigmoid else logits.softmax(dim=-1)


def calibration_nll(logits: torch.Tensor, labels: torch.Tensor, sigmoid: bool) -> torch.Tensor:
    """The objective a calibration minimises, on already calibrated logits: the mean cross-entropy (InfoNCE), or the
    mean binary cross-entropy over every (image, label) pair with the image's own label the positive (SigLIP)."""
    if not sigmoid:
        return F.cross_entropy(logits, labels)
    targets = F.one_hot(labels, logits.shape[1]).to(logits.dtype)
    return F.binary_cross_entropy_with_logits(logits, targets)


def fit_calibration(logits: torch.Tensor, labels: torch.Tensor, sigmoid: bool, max_iter: int = 200) -> Calibration:
    """The temperature (and, for SigLIP, the bias) minimising `calibration_nll` of labelled logits (N, C).

    L-BFGS on log(1/T) and b from T = 1, b = 0; the objective is convex in (1/T, b) (module docstring), so the
    minimum found is the one there is. A task whose shots are all of one class still fits (the logits rank them).
    """
    if len(labels) == 0:
        raise ValueError("fit_calibration needs at least one labelled image")
    logits, labels = logits.detach().double(), labels.detach().long()
    log_inverse_temperature = torch.zeros((), dtype=torch.float64, requires_grad=True)
    bias = torch.zeros((), dtype=torch.float64, requires_grad=sigmoid)
    parameters = [log_inverse_temperature] + ([bias] if sigmoid else [])
    optimizer = torch.optim.LBFGS(
        parameters,
        lr=1.0,
        max_iter=max_iter,
        tolerance_grad=1e-10,
        tolerance_change=1e-12,
        line_search_fn="strong_wolfe",
    )

    def closure():
        optimizer.zero_grad()
        loss = calibration_nll(logits * log_inverse_temperature.exp() + bias, labels, sigmoid)
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    temperature = float(log_inverse_temperature.detach().neg().exp())
    return Calibration(temperature=temperature, bias=float(bias.detach()) if sigmoid else 0.0)


def answer(top_label: str, confidence: float, threshold: float) -> str:
    """The answer to one image: its top label, or `UNKNOWN_LABEL` when its confidence (the top (calibrated)
    probability for `--abstain-below`, the top cosine similarity for `--abstain-below-similarity`) is below
    `threshold`, the photo then most likely none of the labels."""
    return top_label if confidence >= threshold else UNKNOWN_LABEL


@dataclass
class TaskFile:
    """What `agriclip predict` needs to answer one task as it was calibrated (and chosen) on its shots.

    Attributes:
        labels, templates: the label names and prompt templates the logits were computed with; a prediction with
            others is refused (the temperature was fitted for these).
        objective: "infonce" or "siglip", the model's `contrastive_loss`: how the logits are read.
        temperature, bias: the fitted `Calibration`.
        embedding, fusion_weight: the image embedding the fit (and `selection`) used; None for a plain CLIP model.
        model, revision: the checkpoint it was fitted on, as given and its Hub commit (None for a local folder).
        shots_per_class, seed: the labelled shots per class the fit drew from the task's train split, and the seed.
        selection: how `embedding` was chosen from the shots (candidates and their shot scores), or None.
        similarity_threshold: the best label's cosine similarity that keeps 90 % of the shots, what
            `--abstain-below-similarity` given no value abstains below (photos unlike the task's own); or None.
        agriclip_version: the package that wrote it.
    """

    labels: list[str]
    templates: list[str]
    objective: str
    temperature: float
    bias: float = 0.0
    embedding: str | None = None
    fusion_weight: float | None = None
    model: str | None = None
    revision: str | None = None
    shots_per_class: int | None = None
    seed: int | None = None
    selection: dict | None = None
    similarity_threshold: float | None = None
    agriclip_version: str | None = None

    @property
    def calibration(self) -> Calibration:
        return Calibration(self.temperature, self.bias)

    def save(self, path) -> None:
        """Writes the file whole or not at all (`agriclip.atomic`)."""
        write_json_atomically(path, {"format": TASK_FILE_FORMAT, "version": TASK_FILE_VERSION, **asdict(self)})

    @classmethod
    def load(cls, path) -> TaskFile:
        """Reads and checks a task file; every error names the file and the field.

        Raises:
            ValueError: for a file that is not JSON, not a task file, or whose fields are missing or malformed.
            OSError: for a file that cannot be read.
        """
        try:
            document = json.loads(Path(path).read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ValueError(f"{path}: not a JSON task file ({error})") from error
        if not isinstance(document, dict) or document.get("format") != TASK_FILE_FORMAT:
            raise ValueError(f'{path}: not an AgriCLIP task file (expected "format": {TASK_FILE_FORMAT!r})')
        if document.get("version") != TASK_FILE_VERSION:
            raise ValueError(f"{path}: task file version {document.get('version')!r}; this AgriCLIP reads version 1")
        _check_fields(path, document)
        return cls(**{key: document[key] for key in cls.__dataclass_fields__ if key in document})

    def calibrate_model(self, model) -> None:
        """Makes transformers' zero-shot pipeline score this task as `agriclip predict --calibration` does, in place:
        the model's image embedding (and fusion weight) become the file's, and the temperature is folded into its
        logit scale, since logits / T = exp(logit_scale - log T) · cos. Then call the pipeline with
        ``candidate_labels=task.labels, hypothesis_template=task.templates[0]``.

        Raises:
            ValueError: for a file fitted with several templates (the pipeline fills one), or a SigLIP task (the
                pipeline softmaxes AgriCLIP's logits rather than reading them as sigmoids: use `agriclip predict`).
        """
        if len(self.templates) != 1:
            raise ValueError(
                f"the zero-shot pipeline fills one template; this task file was fitted with {len(self.templates)}: "
                "use `agriclip predict --calibration`"
            )
        if self.objective != "infonce":
            raise ValueError(
                "the zero-shot pipeline softmaxes the logits of a SigLIP task: use `agriclip predict --calibration`"
            )
        if self.embedding is not None:
            model.config.image_embedding = self.embedding
            if self.fusion_weight is not None:
                model.config.fusion_weight = self.fusion_weight
        with torch.no_grad():
            model.logit_scale.sub_(math.log(self.temperature))

    def check_task(self, path, labels: Sequence[str], templates: Sequence[str]) -> None:
        """Refuses labels or templates other than those the file was fitted for, naming the file."""
        if sorted(labels) != sorted(self.labels):
            raise ValueError(f"{path} was fitted for the labels {self.labels}, not {list(labels)}")
        if list(templates) != list(self.templates):
            raise ValueError(f"{path} was fitted with the templates {self.templates}, not {list(templates)}")


def _check_fields(path, document: dict) -> None:
    """The required fields of a task file, with their types."""

    def fail(name: str, expected: str):
        raise ValueError(f"{path}: field {name!r} must be {expected}; got {document.get(name)!r}")

    for name in ("labels", "templates"):
        value = document.get(name)
        if not isinstance(value, list) or not value or not all(isinstance(item, str) for item in value):
            fail(name, "a non-empty list of strings")
    if document.get("objective") not in OBJECTIVES:
        fail("objective", f"one of {list(OBJECTIVES)}")
    temperature = document.get("temperature")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
        fail("temperature", "a positive number")
    bias = document.get("bias", 0.0)
    if isinstance(bias, bool) or not isinstance(bias, (int, float)) or bias != bias:
        fail("bias", "a number")
    weight = document.get("fusion_weight")
    if weight is not None and (
        isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 <= weight <= 1
    ):
        fail("fusion_weight", "null or a number from 0 to 1")
    threshold = document.get("similarity_threshold")
    if threshold is not None and (
        isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not -1 <= threshold <= 1
    ):
        fail("similarity_threshold", "null or a cosine similarity from -1 to 1")
    if document.get("embedding") not in (None, "aligned", "clip", "fused"):
        fail("embedding", "null, 'aligned', 'clip' or 'fused'")


__all__ = [
    "Calibration",
    "TaskFile",
    "UNKNOWN_LABEL",
    "answer",
    "calibration_nll",
    "fit_calibration",
    "probabilities",
]
