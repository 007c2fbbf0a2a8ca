"""AgriCLIP's light core: what every part of the package shares and what a command needs before it loads a model.

Nothing here imports torch or transformers, and only `agriclip.sources` imports datasets, so that `agriclip --help`,
argument errors and the checks of a command's inputs answer at once:

- `agriclip.cli`: the `agriclip` command (also `python -m agriclip`); each subcommand loads its heavy
  implementation only once its arguments are valid;
- `agriclip.templates`: zero-shot prompt templates and the rule they follow;
- `agriclip.images`: robust image decoding (every photo becomes RGB or a counted, named skip);
- `agriclip.atomic`: files and folders written whole or not at all;
- `agriclip.files`: paths that other files name (image paths in metadata, weight shards), checked before opening;
- `agriclip.errors`: the failures and warnings of the commands and scripts, and their exit codes.
- `agriclip.sources`: the data sources that training and evaluation read (image-caption pairs and labelled
  images from image folders, CSVs, saved or Hub datasets and WebDataset shards); inference never imports it.

The model itself (config, model, processor, zero-shot classifier) is `modeling_agriclip`; importing that package
registers AgriCLIP with the transformers Auto classes.
"""

# The image embeddings zero-shot can compare with the text. `modeling_agriclip.configuration_agriclip` holds the same
# tuple (the Hub code cannot import this package); tests/test_layers.py checks that the two agree.
IMAGE_EMBEDDINGS = ("aligned", "clip", "fused")
