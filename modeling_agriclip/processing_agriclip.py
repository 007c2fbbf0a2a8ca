"""AgriCLIP processor: the CLIP tokenizer and one image processor.

Hub custom code: imports only ``transformers`` and its siblings.
"""

import json
import math
from pathlib import Path

from transformers import BatchFeature, ProcessorMixin
from transformers.image_utils import PILImageResampling
from transformers.utils import is_torchvision_available


class AgriCLIPProcessor(ProcessorMixin):
    r"""
    Wraps a CLIP tokenizer and one image processor. The image processor applies the normalisation named by the
    model's `config.image_mean`/`config.image_std`; the model converts in-model for towers trained otherwise.

    Calling it tokenises with padding and truncation to the text tower's context (77 tokens for CLIP), so a long
    prompt is cut, never an error.
    """

    def __init__(self, image_processor=None, tokenizer=None, **kwargs):
        super().__init__(image_processor, tokenizer, **kwargs)

    def __call__(
        self, text=None, images=None, return_tensors=None, padding=True, truncation=True, max_length=None, **kwargs
    ):
        """Returns a `BatchFeature` with `input_ids` and `attention_mask` (when `text` is given) and `pixel_values`
        (when `images` is given)."""
        if text is None and images is None:
            raise ValueError("AgriCLIPProcessor needs `text`, `images` or both")
        encoding = {}
        if text is not None:
            max_length = max_length or self.tokenizer.model_max_length
            encoding.update(
                self.tokenizer(
                    text,
                    padding=padding,
                    truncation=truncation,
                    max_length=max_length,
                    return_tensors=return_tensors,
                    **kwargs,
                )
            )
        if images is not None:
            encoding.update(self.image_processor(images=images, return_tensors=return_tensors))
        return BatchFeature(data=encoding, tensor_type=return_tensors)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """`ProcessorMixin.from_pretrained`, whose error names the file when a JSON file of a local folder is truncated
        or corrupt: the tokenizer's JSON parser does not say which file."""
        try:
            return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        except Exception as error:
            folder = Path(pretrained_model_name_or_path, kwargs.get("subfolder", ""))
            unreadable = []
            for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
                try:
                    json.loads(path.read_text(encoding="utf-8"))
                except ValueError:
                    unreadable.append(str(path))
            if not unreadable:
                raise
            raise OSError(f"{', '.join(unreadable)}: truncated or corrupt file, cannot be loaded ({error})") from error

    def check_fits(self, config) -> None:
        """Checks, before any computation, that this processor feeds a model of `config` what it expects.

        Raises:
            ValueError: naming the fields, for token ids beyond the text tower's embedding table, images of another
                size than `vision_config.image_size`, or another normalisation than `config.image_mean`/`image_std`
                (say, a processor taken from another checkpoint).
        """
        problems = []
        vocab_size = config.text_config.vocab_size
        if len(self.tokenizer) > vocab_size:
            problems.append(
                f"the tokenizer has {len(self.tokenizer)} tokens but text_config.vocab_size is {vocab_size}"
            )
        image_processor = self.image_processor
        size = image_processor.crop_size if image_processor.do_center_crop else image_processor.size
        produced = (size.height, size.width)
        expected = config.vision_config.image_size
        if produced != (expected, expected):
            problems.append(
                f"the image processor makes {produced[0]}x{produced[1]} images but vision_config.image_size is {expected}"
            )
        if not image_processor.do_normalize:
            problems.append(
                f"the image processor does not normalise pixels; the model expects image_mean {config.image_mean}"
            )
        else:
            for name in ("image_mean", "image_std"):
                given, wanted = list(getattr(image_processor, name)), list(getattr(config, name))
                if not all(map(math.isclose, given, wanted)):
                    problems.append(f"the image processor's {name} {given} differs from the config's {wanted}")
        if problems:
            raise ValueError("the processor does not fit the model: " + "; ".join(problems))

    @classmethod
    def from_config(cls, config, tokenizer=None) -> "AgriCLIPProcessor":
        """Builds the processor an [`AgriCLIPConfig`] expects: crop to `vision_config.image_size` after a bilinear resize
        of the shorter side (the paper's preprocessing), normalised with `config.image_mean`/`image_std`.

        `tokenizer` defaults to the real CLIP BPE tokenizer rebuilt offline (`modeling_agriclip.tokenizer`).
        """
        # The PIL backend when torchvision is absent (the CPU-only install); both save as "CLIPImageProcessor".
        if is_torchvision_available():
            from transformers import CLIPImageProcessor as ImageProcessor
        else:
            from transformers import CLIPImageProcessorPil as ImageProcessor
        if tokenizer is None:
            from .tokenizer import build_clip_tokenizer

            tokenizer = build_clip_tokenizer()
        size = config.vision_config.image_size
        image_processor = ImageProcessor(
            size={"shortest_edge": size},
            crop_size={"height": size, "width": size},
            resample=PILImageResampling.BILINEAR,
            image_mean=list(config.image_mean),
            image_std=list(config.image_std),
        )
        return cls(image_processor=image_processor, tokenizer=tokenizer)


__all__ = ["AgriCLIPProcessor"]
