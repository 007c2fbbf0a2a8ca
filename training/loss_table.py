"""The one table of the contrastive losses that train the CLIP towers (stage 1's `--loss`, LoRA's contrastive
objective): registry name -> (class name in `training.losses`, one line for `--help`).

`training.losses.create_loss` builds them; `training.losses.LOSSES` maps each name to its class. This module imports
nothing, so that a script's `--help` and its argument errors list the names before torch loads. A new loss is one
class in `training.losses` (see `ImageTextLoss`) and one row here.
"""

CONTRASTIVE_LOSSES = {
    "infonce": ("ContrastiveLoss", "CLIP's symmetric InfoNCE (softmax cross-entropy over the global batch)"),
    "siglip": ("SigLIPLoss", "SigLIP's pairwise sigmoid loss with a learnable bias (Zhai et al. 2023)"),
}
