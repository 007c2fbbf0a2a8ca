"""Zero-shot image classification with prompt ensembles and cached label embeddings.

Not Hub code: the command line and the evaluation suite use it; `pipeline("zero-shot-image-classification")`
covers the single-template case without it.

A class is represented by the prompt ensemble of CLIP (Radford et al. 2021): every template is filled with the
class name, each prompt embedding is L2-normalised, the embeddings are averaged over templates and the mean is
L2-normalised again. Images are scored by cosine similarity times `exp(model.logit_scale)`, plus `model.logit_bias`
for a model whose towers SigLIP's sigmoid loss trained (`config.contrastive_loss == "siglip"`); `predict` turns the
scores into what that objective trained them to be: a softmax over the labels given (InfoNCE), or one sigmoid per label
(SigLIP), each the probability that the image fits that label, independent of the others.

`pipeline("zero-shot-image-classification")` reads the model's `logits_per_image`, which include the bias for a SigLIP
model too, but softmaxes them over the labels (it applies sigmoids only to model types containing "siglip", which
AgriCLIP's is not): it ranks the labels as `predict` does, with softmax scores instead of the sigmoid probabilities.

The classifier works with an AgriCLIP model (any of its image embeddings: aligned backbone, CLIP image tower,
fusion) and with a plain transformers `CLIPModel`, the baseline.

Loading never runs code from the checkpoint folder unless the caller passes `trust_remote_code=True`: every
transformers load gets `trust_remote_code=False`, so transformers refuses instead of asking on stdin.
"""

import inspect
import json
import logging
import os
import warnings
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from huggingface_hub import constants as hub_constants
from huggingface_hub import try_to_load_from_cache
from huggingface_hub.utils import get_session, httpx
from PIL import Image
from transformers import AutoConfig, AutoModel, AutoProcessor, PreTrainedConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.utils import ADAPTER_CONFIG_NAME, CONFIG_NAME

from agriclip.errors import SINGLE_LABEL_WARNING, SingleLabelWarning
from agriclip.files import check_folder_files, weight_files
from agriclip.templates import DEFAULT_TEMPLATES, fill_templates

from .calibration import Calibration, probabilities
from .processing_agriclip import AgriCLIPProcessor


logger = logging.getLogger(__name__)


# What the image methods take: PIL images, one PIL image, or pre-computed `pixel_values` (N, 3, H, W).
Images = Sequence[Image.Image] | Image.Image | torch.Tensor
Templates = Sequence[str] | str

# Seconds one request to the Hub may take before a Hub id counts as out of reach (`model_source_options`).
HUB_PROBE_TIMEOUT = 5.0


def _as_embedding(output) -> torch.Tensor:
    """The projected embedding of a `get_*_features` call.

    AgriCLIP and transformers 5 `CLIPModel` return a `BaseModelOutputWithPooling` whose `pooler_output` holds the
    projected embedding; a model that returns the tensor itself (transformers 4 style) is accepted too.
    """
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def _code_files(auto_map) -> list[str]:
    """The Python files an `auto_map` points at ("module.Class", "repo--module.Class" or a list of those)."""
    references = []
    for value in (auto_map or {}).values() if isinstance(auto_map, dict) else []:
        references += value if isinstance(value, (list, tuple)) else [value]
    return sorted({str(ref).split("--")[-1].rsplit(".", 1)[0] + ".py" for ref in references if ref})


class UnavailableModelError(OSError):
    """A model source that cannot be loaded, with a message that says what to do instead."""


def _hub_unreachable(endpoint: str) -> str | None:
    """Why the Hub at `endpoint` cannot be reached in one request of `HUB_PROBE_TIMEOUT` seconds, without retries;
    None when it answers (with any HTTP status)."""
    try:
        get_session().head(endpoint, timeout=HUB_PROBE_TIMEOUT)
    except httpx.TransportError as error:
        return str(error).strip() or type(error).__name__
    return None


def adapter_base(source) -> str | None:
    """The base model that a PEFT adapter folder (adapter_config.json, no config.json: what LoRA adaptation writes)
    names; None for anything else.

    Raises:
        UnavailableModelError: for an adapter folder whose adapter_config.json names no base model.
    """
    source = str(source)
    adapter_config = os.path.join(source, ADAPTER_CONFIG_NAME)
    if not os.path.isfile(adapter_config) or os.path.isfile(os.path.join(source, CONFIG_NAME)):
        return None
    try:
        base = json.loads(open(adapter_config, encoding="utf-8").read()).get("base_model_name_or_path")
    except (OSError, ValueError, AttributeError) as error:
        raise UnavailableModelError(f"{adapter_config}: not a readable adapter config ({error})") from error
    if not base:
        raise UnavailableModelError(
            f"{adapter_config} names no base model (base_model_name_or_path): the adapter cannot be loaded without one"
        )
    return base


def model_source_options(source) -> dict:
    """Checks where `source` would load from and returns the options its `from_pretrained` calls need: `{}`, or
    `{"local_files_only": True}` for a Hub id that the Hugging Face cache holds while the Hub cannot be reached (a
    laptop in the field), said in a warning. Fails at once, saying what to do, where loading would fail late or with
    a misleading message:

    - a local folder without config.json is not a saved model (transformers asks for a `model_type` key in it),
      unless it is a PEFT adapter folder (`adapter_base`), whose base model is checked instead;
    - a Hub id in offline mode (`HF_HUB_OFFLINE=1`) that the cache does not hold;
    - a Hub id the cache does not hold while the Hub (`HF_ENDPOINT`) cannot be reached: one try of
      `HUB_PROBE_TIMEOUT` seconds, where huggingface_hub retries five times with a growing backoff.

    Anything else (a file, a Hub id that does not exist) is left to transformers, which names the problem.

    Raises:
        UnavailableModelError: an OSError naming the source.
    """
    source = str(source)
    base = adapter_base(source)
    if base is not None:
        return model_source_options(base)  # transformers loads the base, then the adapter onto it
    if os.path.isdir(source):
        if not os.path.isfile(os.path.join(source, CONFIG_NAME)):
            raise UnavailableModelError(
                f"{source} has no {CONFIG_NAME}: not a saved model folder (save it with save_pretrained, or build "
                "one with `agriclip convert`)"
            )
        return {}
    if os.path.exists(source):
        return {}
    try:
        cached = isinstance(try_to_load_from_cache(source, CONFIG_NAME), str)
    except ValueError:
        return {}  # not a Hub id either (HFValidationError): transformers says so
    if hub_constants.is_offline_mode():
        if not cached:
            raise UnavailableModelError(
                f"{source}: offline mode is on (HF_HUB_OFFLINE=1) and the Hugging Face cache "
                f"({hub_constants.HF_HUB_CACHE}) does not hold this Hub id: pass a local model folder, or load it once "
                "with network access (HF_HUB_OFFLINE unset)"
            )
        return {}
    problem = _hub_unreachable(hub_constants.ENDPOINT)
    if problem is None:
        return {}
    if cached:
        logger.warning(
            f"{source}: the Hugging Face Hub at {hub_constants.ENDPOINT} cannot be reached ({problem}); "
            "loading it from the Hugging Face cache (set HF_HUB_OFFLINE=1 to skip this check)"
        )
        return {"local_files_only": True}
    raise UnavailableModelError(
        f"{source}: the Hugging Face Hub at {hub_constants.ENDPOINT} cannot be reached ({problem}) and the Hugging Face "
        "cache does not hold this Hub id: pass a local model folder, or run where the Hub can be reached"
    )


def load_config(path, trust_remote_code: bool = False, **options) -> PreTrainedConfig:
    """`AutoConfig.from_pretrained(path)` that never runs the checkpoint's code unless `trust_remote_code=True`.

    Transformers runs a folder's code when its config.json names a model type that nothing registered provides and
    an `auto_map` points at the folder's Python files; with `trust_remote_code` unset it asks on stdin first, so
    `echo y | ...` ran it. Such a config is refused here with a message that says so.

    Raises:
        ValueError: for a model type that neither transformers nor AgriCLIP provides.
        OSError: when there is no config to read.

    `options` (from `model_source_options`) go to transformers' loaders.
    """
    if not trust_remote_code:
        config_dict, _ = PreTrainedConfig.get_config_dict(path, **options)
        model_type = config_dict.get("model_type")
        code = _code_files(config_dict.get("auto_map"))
        # Without a model type transformers guesses from the name, and refuses by itself when nothing matches.
        if model_type not in CONFIG_MAPPING and (model_type is not None or code):
            runs = (
                f"; its auto_map would run the folder's own code ({', '.join(code)}), which is never run unless "
                "trust_remote_code=True is passed"
                if code
                else ""
            )
            raise ValueError(
                f"{path}: config.json names the model type {model_type!r}, which neither AgriCLIP nor transformers "
                f"provides{runs}: use a checkpoint saved by AgriCLIP (model type 'agriclip') or a transformers CLIP "
                "checkpoint"
            )
    return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code, **options)


def _some(names, shown: int = 5) -> str:
    names = sorted(map(str, names))
    return ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")


def check_loading_info(path, model, loading_info: dict) -> None:
    """Refuses a checkpoint whose tensors do not cover the model exactly: transformers only logs missing and
    unexpected tensors (a model with 79 of 118 tensors missing would run on random weights).

    Raises:
        ValueError: naming the missing, unexpected and reshaped tensors.
    """
    missing, unexpected = loading_info["missing_keys"], loading_info["unexpected_keys"]
    mismatched = loading_info["mismatched_keys"]
    problems = []
    if missing:
        total = len(model.state_dict())
        problems.append(f"{len(missing)} of the model's {total} tensors are missing ({_some(missing)})")
    if unexpected:
        problems.append(f"{len(unexpected)} tensors are not in the model ({_some(unexpected)})")
    if mismatched:
        shapes = [f"{key} {tuple(saved)} instead of {tuple(expected)}" for key, saved, expected in mismatched]
        problems.append(f"{len(mismatched)} tensors have another shape ({_some(shapes)})")
    if problems:
        raise ValueError(
            f"{path}: the weights do not fit the model: {'; '.join(problems)}. The checkpoint is incomplete or of "
            "another model; export it again with save_pretrained"
        )


def ensemble_prompt_embeddings(prompt_embeds: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Class embeddings (C, D) from prompt embeddings in `fill_templates` order (class-major): per class the
    L2-normalised mean of the L2-normalised template embeddings. Differentiable, for an adapted text tower too."""
    prompts = F.normalize(prompt_embeds, dim=-1).unflatten(0, (num_classes, -1))
    return F.normalize(prompts.mean(dim=1), dim=-1)


class ZeroShotClassifier:
    """Scores images against class names through prompt ensembles.

    Args:
        model: an `AgriCLIPModel` or a transformers `CLIPModel` (anything with `get_text_features`,
            `get_image_features` and `logit_scale`).
        processor: the model's processor (tokenizer and image processor). An AgriCLIP processor that does not fit
            the model (another checkpoint's normalisation, image size or vocabulary) is refused here, before any
            image is scored.
        embedding: AgriCLIP's image embedding source (`"aligned"`, `"clip"` or `"fused"`); None uses
            `config.image_embedding`. Must be None for a model with a single image embedding.
        fusion_weight: the weight of the CLIP image embedding in the `"fused"` one, in [0, 1]; None uses
            `config.fusion_weight`. Only for a classifier whose image embedding is `"fused"`; the model's config is
            left as it is, so classifiers sharing the model keep their own weights.
        batch_size: images and prompts embedded per forward pass.
        device: where the model runs; None keeps the model where it is.

    Embeddings are returned L2-normalised, in float32, on the CPU. Label embeddings are cached per
    (class names, templates); the cache is shared by the classifiers `with_embedding` derives from this one,
    since text embeddings do not depend on the image embedding source.
    """

    def __init__(
        self,
        model,
        processor,
        embedding: str | None = None,
        batch_size: int = 32,
        device=None,
        fusion_weight: float | None = None,
    ):
        if embedding is not None and "embedding" not in inspect.signature(model.get_image_features).parameters:
            raise ValueError(
                f"{type(model).__name__} has a single image embedding; embedding={embedding!r} needs an AgriCLIP model."
            )
        if fusion_weight is not None:
            # A plain CLIP model has no `image_embedding`: its one embedding is its CLIP image tower.
            used = embedding or getattr(model.config, "image_embedding", "clip")
            if used != "fused":
                raise ValueError(
                    f"fusion_weight={fusion_weight} weighs the 'fused' image embedding, but this classifier uses "
                    f"{used!r}; pass embedding='fused' (with an AgriCLIP model)."
                )
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1; got {batch_size}.")
        if isinstance(processor, AgriCLIPProcessor):
            processor.check_fits(model.config)
        self.model = model.eval() if device is None else model.to(device).eval()
        self.processor = processor
        self.embedding = embedding
        self.fusion_weight = fusion_weight
        self.batch_size = batch_size
        self._label_cache: dict[tuple[tuple[str, ...], tuple[str, ...]], torch.Tensor] = {}

    @classmethod
    def from_pretrained(
        cls,
        path,
        embedding: str | None = None,
        batch_size: int = 32,
        device=None,
        trust_remote_code: bool = False,
        **kwargs,
    ):
        """Loads an AgriCLIP folder, a plain transformers CLIP folder or a LoRA adapter folder that carries its
        processor (`python -m training.lora_finetune` writes one; the base model it names loads first) from `path`.

        The checkpoint's own code runs only with `trust_remote_code=True` (see `load_config`). The weights must fit
        the model exactly (`check_loading_info`). In a local folder, FIFOs and devices are refused before anything
        is opened. `kwargs` go to `AutoModel.from_pretrained` (e.g. `dtype`).

        Raises:
            ValueError: for a folder that would run its own code, weights that do not fit, or a processor that does
                not fit the model.
            OSError: for a folder or Hub id that holds no model.
        """
        if os.path.isdir(path):
            check_folder_files(path)
            try:
                weight_files(path)
            except FileNotFoundError:
                pass  # weights in another format: transformers finds them or says what is missing
        options = model_source_options(path)  # a folder without config.json, or a Hub out of reach: at once
        # Importing this module imported the package, which registered AgriCLIP with the Auto classes.
        # A LoRA adapter folder holds no config: its base model's is the model's.
        config = load_config(adapter_base(path) or path, trust_remote_code=trust_remote_code, **options)
        # Tensors of another shape are left for `check_loading_info` to name, instead of transformers' RuntimeError.
        model, loading_info = AutoModel.from_pretrained(
            path,
            config=config,
            trust_remote_code=trust_remote_code,
            output_loading_info=True,
            # transformers does not pass local_files_only on to its lookup of a PEFT adapter.
            **{"ignore_mismatched_sizes": True, **options, "adapter_kwargs": options, **kwargs},
        )
        check_loading_info(path, model, loading_info)
        try:
            processor = AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code, **options)
        except ValueError as error:
            if trust_remote_code or "trust_remote_code" not in str(error):
                raise
            # Transformers' refusal: a processor, tokenizer or image processor file names a class that only the
            # folder's code provides.
            raise ValueError(
                f"{path}: its processor files name a processor, tokenizer or image processor class that only the "
                "folder's own code provides (auto_map), which is never run unless trust_remote_code=True is passed: "
                "use a checkpoint saved by AgriCLIP or a transformers CLIP checkpoint"
            ) from error
        return cls(model, processor, embedding=embedding, batch_size=batch_size, device=device)

    def with_embedding(self, embedding: str | None, fusion_weight: float | None = None) -> "ZeroShotClassifier":
        """A classifier on the same model and label cache that uses another image embedding source (and, for
        `"fused"`, optionally its own `fusion_weight`)."""
        sibling = type(self)(
            self.model, self.processor, embedding=embedding, batch_size=self.batch_size, fusion_weight=fusion_weight
        )
        sibling._label_cache = self._label_cache
        return sibling

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def logit_scale(self) -> float:
        return self.model.logit_scale.exp().item()

    @property
    def sigmoid_scores(self) -> bool:
        """Whether the model's towers were trained with SigLIP's sigmoid loss (`config.contrastive_loss`): its logits
        then carry `logit_bias` and read as per-label log-odds. A plain CLIP model is an InfoNCE one."""
        return getattr(self.model.config, "contrastive_loss", "infonce") == "siglip"

    @property
    def logit_bias(self) -> float:
        """The bias added to the logits: the model's `logit_bias` for a SigLIP-trained model, else 0."""
        return self.model.logit_bias.item() if self.sigmoid_scores else 0.0

    @torch.inference_mode()
    def text_embeddings(self, texts: Sequence[str]) -> torch.Tensor:
        """L2-normalised embeddings (len(texts), D) of `texts`, batched."""
        embeddings = []
        for start in range(0, len(texts), self.batch_size):
            batch = self.processor(
                text=list(texts[start : start + self.batch_size]), return_tensors="pt", padding=True, truncation=True
            )
            features = self.model.get_text_features(
                input_ids=batch["input_ids"].to(self.device), attention_mask=batch["attention_mask"].to(self.device)
            )
            embeddings.append(F.normalize(_as_embedding(features).float(), dim=-1).cpu())
        return torch.cat(embeddings)

    @torch.inference_mode()
    def label_embeddings(self, class_names: Sequence[str], templates: Templates = DEFAULT_TEMPLATES) -> torch.Tensor:
        """Class embeddings (C, D): per class, the normalised mean of the normalised template embeddings."""
        templates = (templates,) if isinstance(templates, str) else tuple(templates)
        key = (tuple(class_names), templates)
        if key not in self._label_cache:
            if not class_names or not templates:
                raise ValueError("label_embeddings needs at least one class name and one template.")
            prompts = self.text_embeddings(fill_templates(class_names, templates))
            self._label_cache[key] = ensemble_prompt_embeddings(prompts, len(class_names))
        return self._label_cache[key]

    def pixel_values(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """The processor's `pixel_values` (N, 3, H, W) of PIL images, on the CPU."""
        return self.processor(images=list(images), return_tensors="pt")["pixel_values"]

    @torch.inference_mode()
    def image_embeddings(self, images: Images) -> torch.Tensor:
        """L2-normalised image embeddings (N, D) of PIL images or of pre-computed `pixel_values` (N, 3, H, W)."""
        if isinstance(images, Image.Image):
            images = [images]
        image_kwargs = {} if self.embedding is None else {"embedding": self.embedding}
        if self.fusion_weight is not None:
            image_kwargs["fusion_weight"] = self.fusion_weight
        embeddings = []
        for start in range(0, len(images), self.batch_size):
            batch = images[start : start + self.batch_size]
            if not isinstance(batch, torch.Tensor):
                batch = self.pixel_values(batch)
            features = self.model.get_image_features(
                pixel_values=batch.to(self.device, self.model.dtype), **image_kwargs
            )
            embeddings.append(F.normalize(_as_embedding(features).float(), dim=-1).cpu())
        return torch.cat(embeddings)

    @torch.inference_mode()
    def embedding_similarities(
        self, image_embeds: torch.Tensor, class_names: Sequence[str], templates: Templates = DEFAULT_TEMPLATES
    ) -> torch.Tensor:
        """Cosine similarities (N, C) of image embeddings computed by `image_embeddings` and the class embeddings."""
        return image_embeds @ self.label_embeddings(class_names, templates).T

    @torch.inference_mode()
    def embedding_logits(
        self, image_embeds: torch.Tensor, class_names: Sequence[str], templates: Templates = DEFAULT_TEMPLATES
    ) -> torch.Tensor:
        """`logits` from image embeddings already computed by `image_embeddings`."""
        logits = self.logit_scale * image_embeds @ self.label_embeddings(class_names, templates).T
        return logits + self.logit_bias if self.sigmoid_scores else logits

    @torch.inference_mode()
    def logits(
        self, images: Images, class_names: Sequence[str], templates: Templates = DEFAULT_TEMPLATES
    ) -> torch.Tensor:
        """Cosine similarities (N, C) of images and class embeddings, scaled by `exp(model.logit_scale)`, plus
        `model.logit_bias` for a SigLIP-trained model (`sigmoid_scores`), whose logits are then per-label log-odds."""
        return self.embedding_logits(self.image_embeddings(images), class_names, templates)

    @torch.inference_mode()
    def predict(
        self,
        images: Images,
        class_names: Sequence[str],
        templates: Templates = DEFAULT_TEMPLATES,
        top_k: int = 5,
        calibration: Calibration | None = None,
    ) -> list[list[dict]]:
        """The `top_k` labels of each image with their scores, best first, as the transformers pipeline gives:
        ``[[{"label": ..., "score": ...}, ...], ...]``.

        For a model trained with InfoNCE the scores are relative to the labels given: a softmax over `class_names`
        only, summing to 1 per image. They compare those labels, never say how well an image fits one of them: a
        single label always scores 1.0 (which this warns about), and adding a label lowers the others' scores. For an
        absolute measure use `logits`.

        For a model trained with SigLIP's sigmoid loss (`sigmoid_scores`) each score is the sigmoid of its own logit,
        the probability that the image fits that label: each in [0, 1], independent of the other labels, not summing
        to 1 in general (a single label is a meaningful question then).

        A `calibration` fitted for these labels and templates (`modeling_agriclip.calibration`) divides the logits by
        its temperature (and adds its bias) first: the ranking stays, the scores are then calibrated probabilities.
        """
        if len(class_names) == 1 and not self.sigmoid_scores:
            warnings.warn(SINGLE_LABEL_WARNING.format(label=class_names[0]), SingleLabelWarning, stacklevel=2)
        return self.embedding_predictions(self.image_embeddings(images), class_names, templates, top_k, calibration)

    @torch.inference_mode()
    def embedding_predictions(
        self,
        image_embeds: torch.Tensor,
        class_names: Sequence[str],
        templates: Templates = DEFAULT_TEMPLATES,
        top_k: int = 5,
        calibration: Calibration | None = None,
    ) -> list[list[dict]]:
        """`predict` from image embeddings already computed by `image_embeddings` (without its single-label
        warning)."""
        sigmoid = self.sigmoid_scores
        logits = self.embedding_logits(image_embeds, class_names, templates)
        if calibration is not None:
            logits = calibration.apply(logits)
        scores, indices = probabilities(logits, sigmoid).topk(min(top_k, len(class_names)), dim=-1)
        return [
            [{"label": class_names[index], "score": score} for score, index in zip(row_scores, row_indices)]
            for row_scores, row_indices in zip(scores.tolist(), indices.tolist())
        ]


__all__ = [
    "UnavailableModelError",
    "ZeroShotClassifier",
    "check_loading_info",
    "model_source_options",
    "ensemble_prompt_embeddings",
    "load_config",
]
