"""Model cards, dataset cards and Hub publishing for AgriCLIP checkpoints and ALive-style datasets."""

from .card import (
    build_dataset_card,
    build_model_card,
    describe_caption_data,
    read_training_info,
    write_dataset_card,
    write_model_card,
)

__all__ = [
    "build_dataset_card",
    "build_model_card",
    "describe_caption_data",
    "read_training_info",
    "write_dataset_card",
    "write_model_card",
]
