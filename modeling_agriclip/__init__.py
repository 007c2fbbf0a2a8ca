"""AgriCLIP: a Transformers-native vision-language model for zero-shot recognition in agriculture.

Importing the package registers AgriCLIP with the transformers Auto classes, so ``AutoModel``,
``AutoModelForZeroShotImageClassification``, ``AutoProcessor`` and
``pipeline("zero-shot-image-classification", model=...)`` load AgriCLIP folders without
``trust_remote_code``. Saved folders also carry the custom-code files and ``auto_map`` for people who never
installed the package.
"""

from transformers import AutoConfig, AutoModel, AutoModelForZeroShotImageClassification, AutoProcessor

from .configuration_agriclip import AgriCLIPConfig
from .modeling_agriclip import AgriCLIPModel, AgriCLIPOutput, AgriCLIPPreTrainedModel
from .processing_agriclip import AgriCLIPProcessor
from .zero_shot import ZeroShotClassifier


AutoConfig.register(AgriCLIPConfig.model_type, AgriCLIPConfig)
AutoModel.register(AgriCLIPConfig, AgriCLIPModel)
# The pipeline loads through this class: registering AutoModel alone is not enough.
AutoModelForZeroShotImageClassification.register(AgriCLIPConfig, AgriCLIPModel)
# Without this AutoProcessor silently returns the tokenizer alone.
AutoProcessor.register(AgriCLIPConfig, AgriCLIPProcessor)

AgriCLIPConfig.register_for_auto_class()
AgriCLIPModel.register_for_auto_class("AutoModel")
AgriCLIPProcessor.register_for_auto_class()

__all__ = [
    "AgriCLIPConfig",
    "AgriCLIPModel",
    "AgriCLIPOutput",
    "AgriCLIPPreTrainedModel",
    "AgriCLIPProcessor",
    "ZeroShotClassifier",
]
