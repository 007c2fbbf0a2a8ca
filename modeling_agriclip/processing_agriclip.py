"""AgriCLIP processor: the CLIP tokenizer and one image processor.

Hub custom code: imports only ``transformers`` and its siblings.
"""

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

    def __call__(self, text=None, images=None, return_tensors=None, padding=True, truncation=True, max_length=None, **kwargs):
        """Returns a `BatchFeature` with `input_ids` and `attention_mask` (when `text` is given) and `pixel_values`
        (when `images` is given)."""
        if text is None and images is None:
            raise ValueError("AgriCLIPProcessor needs `text`, `images` or both")
        encoding = {}
        if text is not None:
            max_length = max_length or self.tokenizer.model_max_length
            encoding.update(
                self.tokenizer(text, padding=padding, truncation=truncation, max_length=max_length, return_tensors=return_tensors, **kwargs)
            )
        if images is not None:
            encoding.update(self.image_processor(images=images, return_tensors=return_tensors))
        return BatchFeature(data=encoding, tensor_type=return_tensors)

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
