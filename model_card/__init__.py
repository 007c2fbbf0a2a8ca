"""Model cards, dataset cards and Hub publishing for AgriCLIP checkpoints and ALive-style datasets.

- `model_card.card`: `build_model_card`, `write_model_card`, `build_dataset_card`, `write_dataset_card` (the
  command line: `agriclip card`);
- `model_card.publish`: the dry run and the upload (`agriclip publish`).

The package imports nothing itself.
"""
