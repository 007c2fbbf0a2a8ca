"""DINO building blocks for stage 2 (self-distillation with multi-crop and an EMA teacher).

Follows facebookresearch/dino (main_dino.py, utils.py, vision_transformer.DINOHead) with two changes of
engineering, not of method: the multi-crop augmentations run batched on the training device with kornia
instead of per image on PIL, and the backbone is any transformers vision model reduced to pooled features
by `modeling_agriclip.modeling_agriclip.backbone_features`. Also the home of what the other stages borrow: the
per-step schedules, the parameter groups without weight decay and the batched crop-and-flip of stage 1.
"""

from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import groupby
import math

import kornia.augmentation as K
from kornia.augmentation.container.params import ParamItem
import numpy as np
import torch
from torch import nn
from torch.nn.utils.parametrizations import weight_norm
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from modeling_agriclip.modeling_agriclip import backbone_features


class DINOHead(nn.Module):
    """DINO projection head: MLP to an L2-normalised bottleneck, then a weight-normalised linear layer.

    With `norm_last_layer=True` the magnitude of every output row of the last layer is fixed to 1, so the
    logits are cosine similarities to `out_dim` prototypes; DINO found this stabilises training.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        use_bn: bool = False,
        norm_last_layer: bool = True,
        nlayers: int = 3,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
    ):
        super().__init__()
        if nlayers < 1:
            raise ValueError(f"DINOHead: nlayers must be at least 1, got {nlayers}")
        if nlayers == 1:
            self.mlp = nn.Linear(in_dim, bottleneck_dim)
        else:
            layers = []
            dims = [in_dim] + [hidden_dim] * (nlayers - 1)
            for layer_in, layer_out in zip(dims[:-1], dims[1:]):
                layers.append(nn.Linear(layer_in, layer_out))
                if use_bn:
                    layers.append(nn.BatchNorm1d(layer_out))
                layers.append(nn.GELU())
            layers.append(nn.Linear(hidden_dim, bottleneck_dim))
            self.mlp = nn.Sequential(*layers)
        self.apply(self._init_weights)
        self.last_layer = weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        # parametrizations.weight_norm stores the magnitude g as `original0` (out_dim, 1) and the direction v
        # as `original1`; the deprecated nn.utils.weight_norm called them weight_g and weight_v.
        magnitude = self.last_layer.parametrizations.weight.original0
        with torch.no_grad():
            magnitude.fill_(1.0)
        magnitude.requires_grad_(not norm_last_layer)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        hidden = nn.functional.normalize(self.mlp(features), dim=-1, p=2)
        return self.last_layer(hidden)


def cancel_gradients_last_layer(model: nn.Module, step: int, freeze_last_layer_steps: int) -> None:
    """Drop the gradients of every DINOHead's last layer during the first `freeze_last_layer_steps` optimizer steps.

    Call between `backward` and `optimizer.step`. A `None` gradient makes the optimizer skip the parameter
    entirely (no update, no weight decay), which is what DINO does to avoid early instability (for its first
    epoch: pass the epochs times the optimizer steps per epoch). Works on a DDP-wrapped model and with the
    parametrized weight norm (both magnitude and direction are covered).
    """
    if step >= freeze_last_layer_steps:
        return
    for module in model.modules():
        if isinstance(module, DINOHead):
            for parameter in module.last_layer.parameters():
                parameter.grad = None


class MultiCropWrapper(nn.Module):
    """Backbone plus head over a list of crops of different resolutions.

    Consecutive crops of the same resolution are concatenated and go through the backbone in one forward
    pass (DINO: the 2 global crops together, then all local crops together); the head then runs once on all
    pooled features. Output rows follow the order of the crops: crop i occupies rows [i*B, (i+1)*B).
    """

    def __init__(
        self,
        backbone: nn.Module,
        head: nn.Module,
        features_fn: Callable[[nn.Module, torch.Tensor], torch.Tensor] = backbone_features,
    ):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.features_fn = features_fn

    def forward(self, crops: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
        if isinstance(crops, torch.Tensor):
            crops = [crops]
        features = [
            self.features_fn(self.backbone, torch.cat(list(group)))
            for _, group in groupby(crops, key=lambda crop: tuple(crop.shape[-2:]))
        ]
        return self.head(torch.cat(features))


@dataclass(frozen=True)
class MultiCropPreset:
    """Crop-area ranges (fractions of the input image) of a published DINO recipe."""

    global_crops_scale: tuple[float, float]
    local_crops_scale: tuple[float, float]


MULTICROP_PRESETS = {
    "vit": MultiCropPreset(global_crops_scale=(0.4, 1.0), local_crops_scale=(0.05, 0.4)),
    "resnet": MultiCropPreset(global_crops_scale=(0.14, 1.0), local_crops_scale=(0.05, 0.14)),
}


@dataclass(frozen=True)
class PhotometricRecipe:
    """The colour operations of a multi-crop view: colour jitter (brightness, contrast, saturation, hue) with its
    probability, grayscale probability, and whether the second global view may be solarised."""

    brightness: float
    contrast: float
    saturation: float
    hue: float
    jitter_prob: float
    grayscale_prob: float
    solarize: bool


PHOTOMETRIC_RECIPES = {
    # DINO's (and BYOL's) recipe: colour is mostly a nuisance on ImageNet.
    "dino": PhotometricRecipe(0.4, 0.4, 0.2, 0.1, jitter_prob=0.8, grayscale_prob=0.2, solarize=True),
    # For crops, fish and livestock colour often is the diagnosis (chlorosis, rust, a halo, a coat): lighting
    # changes stay, hue and saturation shifts, grayscale and solarisation go.
    "colour": PhotometricRecipe(0.4, 0.4, 0.0, 0.0, jitter_prob=0.8, grayscale_prob=0.0, solarize=False),
}


def blur_kernel_size(crop_size: int) -> int:
    """Odd Gaussian kernel size of about 10% of the crop side (SimCLR's rule), at least 3.

    DINO blurs with PIL's radius = sigma in (0.1, 2) pixels of the resized crop; a kernel of 10% of the side
    covers 2.5 sigma of the largest sigma at 96 px and more at 224 px.
    """
    return 2 * max(1, round(0.05 * crop_size)) + 1


class MultiCropAugmentation(nn.Module):
    """DINO multi-crop augmentation (DataAugmentationDINO), batched on the input's device with kornia.

    Input: float images (B, 3, H, W) in [0, 1]. Output: a list of 2 global crops followed by
    `num_local_crops` local crops, each (B, 3, size, size) and normalised with `mean`/`std`. Every random
    parameter is drawn per image (kornia's `same_on_batch=False`) from torch's global RNG, so
    `torch.manual_seed` makes the crops reproducible.

    Under several processes, pass `rows`, the indices of this process's images in the global batch, and
    `global_batch_size`: the parameters are drawn for the whole global batch on every process (which all hold
    the same RNG state) and each process applies those of its own rows. An image's crops then depend on its
    place in the global batch only, not on how the batch is split between processes.

    Per view, as in DINO: bicubic random resized crop, horizontal flip p=0.5, ColorJitter(0.4, 0.4, 0.2, 0.1)
    p=0.8, grayscale p=0.2, Gaussian blur sigma in (0.1, 2) with p=1.0 (global 1), 0.1 (global 2), 0.5 (local),
    solarisation p=0.2 on global 2 only: the `photometric="dino"` recipe (the default). `photometric="colour"` keeps
    the flip, the blur and the jitter of brightness and contrast (same ranges and probability) and leaves hue and
    saturation factors, grayscale and solarisation out (`PHOTOMETRIC_RECIPES`). Unlike PIL, the bicubic resize does not
    antialias: feed images not much larger than the global crop (e.g. 256 px) to keep downscaling mild.
    """

    def __init__(
        self,
        preset: str = "vit",
        num_local_crops: int = 8,
        global_size: int = 224,
        local_size: int = 96,
        mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
        std: Sequence[float] = IMAGENET_DEFAULT_STD,
        photometric: str = "dino",
    ):
        super().__init__()
        if photometric not in PHOTOMETRIC_RECIPES:
            raise ValueError(f"MultiCropAugmentation: unknown photometric recipe {photometric!r}, expected one of "
                             f"{sorted(PHOTOMETRIC_RECIPES)}")
        colour = PHOTOMETRIC_RECIPES[photometric]
        if preset not in MULTICROP_PRESETS:
            raise ValueError(f"MultiCropAugmentation: unknown preset {preset!r}, expected one of {sorted(MULTICROP_PRESETS)}")
        scales = MULTICROP_PRESETS[preset]
        self.num_local_crops = num_local_crops
        self.global_crop = self._resized_crop(global_size, scales.global_crops_scale)
        self.local_crop = self._resized_crop(local_size, scales.local_crops_scale)
        self.global_color = self._flip_and_color_jitter(colour)
        self.local_color = self._flip_and_color_jitter(colour)
        self.global_1_blur = self._blur(global_size, p=1.0)
        self.global_2_blur = K.ImageSequential(
            self._blur(global_size, p=0.1),
            # Thresholds (0.5, 0.5) and no additions reproduce PIL's ImageOps.solarize(threshold=128).
            K.RandomSolarize(thresholds=0.0, additions=0.0, p=0.2 if colour.solarize else 0.0),
        )
        self.local_blur = self._blur(local_size, p=0.5)
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    @staticmethod
    def _resized_crop(size: int, scale: tuple[float, float]) -> nn.Module:
        # align_corners=False resizes on the half-pixel grid, like PIL. kornia's "slice" mode (the default)
        # resizes each crop on its own; the batched "resample" mode pads with zeros, which the bicubic taps
        # pull into the border pixels of upsampled crops (up to +12% on a flat grey image).
        return K.RandomResizedCrop((size, size), scale=scale, resample="bicubic", align_corners=False)

    @staticmethod
    def _flip_and_color_jitter(colour: PhotometricRecipe) -> nn.Module:
        return K.ImageSequential(
            K.RandomHorizontalFlip(p=0.5),
            K.ColorJitter(brightness=colour.brightness, contrast=colour.contrast, saturation=colour.saturation,
                          hue=colour.hue, p=colour.jitter_prob),
            K.RandomGrayscale(p=colour.grayscale_prob),
        )

    @staticmethod
    def _blur(size: int, p: float) -> nn.Module:
        return K.RandomGaussianBlur(blur_kernel_size(size), sigma=(0.1, 2.0), p=p)

    def _crops(self, images: torch.Tensor, crop: nn.Module, count: int, rows: torch.Tensor, total: int) -> torch.Tensor:
        # Crop each view from the full images, then run the photometric ops once on all views of this size:
        # one batched call instead of one per view, and no copy of the full-resolution batch per view.
        # Bicubic overshoots [0, 1]; PIL clips it when it writes uint8.
        return torch.cat([_apply_rows(crop, images, rows, total) for _ in range(count)]).clamp_(0.0, 1.0)

    def _normalize(self, views: torch.Tensor) -> torch.Tensor:
        return (views - self.mean) / self.std

    @torch.no_grad()
    def forward(
        self, images: torch.Tensor, rows: torch.Tensor | None = None, global_batch_size: int | None = None
    ) -> list[torch.Tensor]:
        if images.ndim != 4 or images.shape[1] != 3 or not images.is_floating_point():
            raise ValueError(
                f"MultiCropAugmentation: images must be a float batch (B, 3, H, W) in [0, 1], "
                f"got dtype {images.dtype} and shape {tuple(images.shape)}"
            )
        rows, global_batch_size = _rows_in_global_batch(type(self).__name__, len(images), rows, global_batch_size)
        global_views = self._crops(images, self.global_crop, 2, rows, global_batch_size)
        global_1, global_2 = _apply_rows(self.global_color, global_views, _view_rows(rows, global_batch_size, 2),
                                         2 * global_batch_size).chunk(2)
        views = [self._normalize(_apply_rows(self.global_1_blur, global_1, rows, global_batch_size)),
                 self._normalize(_apply_rows(self.global_2_blur, global_2, rows, global_batch_size))]
        if self.num_local_crops > 0:
            local_rows = _view_rows(rows, global_batch_size, self.num_local_crops)
            local_total = self.num_local_crops * global_batch_size
            local_views = self._crops(images, self.local_crop, self.num_local_crops, rows, global_batch_size)
            local_views = _apply_rows(self.local_color, local_views, local_rows, local_total)
            local_views = _apply_rows(self.local_blur, local_views, local_rows, local_total)
            views.extend(self._normalize(local_views).chunk(self.num_local_crops))
        return views


class CropAndFlip(nn.Module):
    """Stage 1's training augmentation (CLIP's recipe as open_clip trains it): a bicubic random resized crop of
    `scale` of the image area, resized to `size`, then a horizontal flip with probability `flip_prob`, batched on the
    input's device with kornia.

    Input: the processor's output, already normalised with `mean`/`std`. Both operations are geometric and the
    bicubic weights of every output pixel sum to one, so cropping normalised pixels equals normalising cropped
    [0, 1] pixels; the bicubic overshoot is clamped to the normalised image of [0, 1], as MultiCropAugmentation
    clamps to [0, 1] before it normalises. Random parameters are drawn per image from torch's global RNG, for the
    global batch under several processes (`rows`, `global_batch_size`), as in MultiCropAugmentation.
    """

    def __init__(self, size: int, scale: tuple[float, float], flip_prob: float, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.crop = MultiCropAugmentation._resized_crop(size, tuple(scale))
        self.flip = K.RandomHorizontalFlip(p=flip_prob)
        mean, std = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
        self.register_buffer("low", (0.0 - mean) / std, persistent=False)
        self.register_buffer("high", (1.0 - mean) / std, persistent=False)

    @torch.no_grad()
    def forward(
        self, pixels: torch.Tensor, rows: torch.Tensor | None = None, global_batch_size: int | None = None
    ) -> torch.Tensor:
        if pixels.ndim != 4 or pixels.shape[1] != 3 or not pixels.is_floating_point():
            raise ValueError(f"CropAndFlip: pixels must be a float batch (B, 3, H, W), got dtype {pixels.dtype} and "
                             f"shape {tuple(pixels.shape)}")
        rows, global_batch_size = _rows_in_global_batch(type(self).__name__, len(pixels), rows, global_batch_size)
        cropped = _apply_rows(self.crop, pixels, rows, global_batch_size)
        cropped = cropped.clamp(self.low.to(cropped.dtype), self.high.to(cropped.dtype))
        return _apply_rows(self.flip, cropped, rows, global_batch_size)


def _rows_in_global_batch(
    name: str, batch_size: int, rows: torch.Tensor | None, global_batch_size: int | None
) -> tuple[torch.Tensor, int]:
    """`rows` and `global_batch_size` checked against a local batch of `batch_size` images; the batch itself when
    `rows` is None (one process)."""
    if rows is None:
        return torch.arange(batch_size), batch_size
    if global_batch_size is None or len(rows) != batch_size or rows.min() < 0 or rows.max() >= global_batch_size:
        raise ValueError(
            f"{name}: rows must give the place of each of the {batch_size} images in a global batch of "
            f"global_batch_size images, got rows {rows.tolist()} and global_batch_size {global_batch_size}"
        )
    return rows, global_batch_size


# kornia parameters that describe the whole call rather than one image each.
_BATCH_PARAMS = {"order"}


def _apply_rows(augmentation: nn.Module, images: torch.Tensor, rows: torch.Tensor, total: int) -> torch.Tensor:
    """`augmentation` on `images` with parameters drawn for a batch of `total` images, of which `images` are `rows`."""
    params = augmentation.forward_parameters(torch.Size((total, *images.shape[1:])))
    return augmentation(images, params=_select_rows(params, rows, total, images.shape))


def _select_rows(params, rows: torch.Tensor, total: int, shape: torch.Size):
    if isinstance(params, list):  # an ImageSequential: one ParamItem per augmentation
        return [ParamItem(item.name, _select_rows(item.data, rows, total, shape)) for item in params]
    selected = {}
    for name, value in params.items():
        if name == "forward_input_shape":
            selected[name] = torch.tensor(shape)
        elif name in _BATCH_PARAMS:
            selected[name] = value
        elif isinstance(value, torch.Tensor) and value.shape[:1] == (total,):
            selected[name] = value[rows.to(value.device)]
        else:
            raise ValueError(f"kornia parameter {name!r} is not one value per image; cannot split it between processes")
    return selected


def _view_rows(rows: torch.Tensor, total: int, count: int) -> torch.Tensor:
    """Rows of this process's images in `count` views of the global batch stacked view after view."""
    return torch.cat([rows + view * total for view in range(count)])


def cosine_schedule(
    base_value: float,
    final_value: float,
    total_steps: int,
    warmup_steps: int = 0,
    start_warmup_value: float = 0.0,
) -> np.ndarray:
    """One value per optimizer step of a run of `total_steps`: a linear warm-up over the first `warmup_steps` from
    `start_warmup_value` to `base_value`, then a cosine from `base_value` to `final_value` over the rest.

    Warm-up step i (from 0) takes start + (base - start) * (i + 1) / warmup_steps: the first step already moves and
    the last one reaches `base_value`. DINO's utils.cosine_scheduler starts the warm-up at `start_warmup_value`
    itself, so a learning rate warmed up from 0 wasted the run's first step. The cosine is DINO's: step
    warmup_steps + j of the n after the warm-up takes final + (base - final) * (1 + cos(pi * j / n)) / 2, so the
    last value stops one step short of `final_value`. Stages 1 and 2 and LoRA lay their schedules over the run's
    optimizer steps (`training.runtime.run_steps`) with this function.
    """
    if not 0 <= warmup_steps <= total_steps:
        raise ValueError(f"cosine_schedule: warmup_steps ({warmup_steps}) must be between 0 and total_steps "
                         f"({total_steps}): a warm-up (--warmup-steps) cannot outlast the run (--max-steps, or --epochs "
                         "x steps per epoch)")
    fraction_done = np.arange(1, warmup_steps + 1) / max(warmup_steps, 1)
    warmup = start_warmup_value + (base_value - start_warmup_value) * fraction_done
    iters = np.arange(total_steps - warmup_steps)
    cosine = final_value + 0.5 * (base_value - final_value) * (1 + np.cos(np.pi * iters / max(len(iters), 1)))
    return np.concatenate((warmup, cosine))


@torch.no_grad()
def update_teacher(student: nn.Module, teacher: nn.Module, momentum: float) -> None:
    """EMA of the student's parameters into the teacher's, in place: t = m * t + (1 - m) * s.

    Pass the unwrapped student (no DDP `module.` prefix); parameters are matched by name. Buffers are left
    alone, as in DINO: the teacher runs in train mode, so its BatchNorm layers (ResNet) normalise with the
    statistics of the teacher's own batch and keep their own running statistics, which are what a saved
    teacher backbone uses at inference.
    """
    student_params = dict(student.named_parameters())
    teacher_params = dict(teacher.named_parameters())
    if student_params.keys() != teacher_params.keys():
        mismatch = sorted(student_params.keys() ^ teacher_params.keys())
        raise ValueError(f"update_teacher: student and teacher parameters differ by name, e.g. {mismatch[:3]}")
    names = list(teacher_params)
    teacher_tensors = [teacher_params[name].detach() for name in names]
    student_tensors = [student_params[name].detach() for name in names]
    torch._foreach_mul_(teacher_tensors, momentum)
    torch._foreach_add_(teacher_tensors, student_tensors, alpha=1.0 - momentum)


def param_groups_without_decay(model: nn.Module, weight_decay: float) -> list[dict]:
    """Optimizer parameter groups: group 0 decays with `weight_decay`, group 1 has no weight decay.

    No decay for parameters of at most one dimension (biases, norm weights, scalars such as logit_scale,
    CLIP's class_embedding, layer scales), for nn.Embedding tables, and for the tensors held directly by
    transformers `*Embeddings` modules (class/mask/register tokens, position tables); convolution weights
    inside those modules (patch embeddings) still decay. Frozen parameters are left out. Group 0 stays first
    so that a weight-decay schedule can update `optimizer.param_groups[0]` only, as DINO does.
    """
    decay, no_decay = [], []
    for module in model.modules():
        holds_embeddings = isinstance(module, nn.Embedding) or type(module).__name__.endswith("Embeddings")
        for parameter in module.parameters(recurse=False):
            if not parameter.requires_grad:
                continue
            (no_decay if parameter.ndim <= 1 or holds_embeddings else decay).append(parameter)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def teacher_entropy(teacher_probs: torch.Tensor) -> torch.Tensor:
    """Mean over samples of the entropy (nats) of the teacher's output distributions (..., out_dim)."""
    return -torch.special.xlogy(teacher_probs, teacher_probs).sum(dim=-1).mean()


def default_collapse_window(total_steps: int, warmup_steps: int, floor: int = 100) -> int:
    """Consecutive collapsed-looking steps that stop a run by default: the learning-rate warm-up plus a tenth of the
    run, and at least `floor`.

    A run starts near uniform collapse (a fresh head's outputs are close to uniform and the student barely moves
    while the learning rate warms up), and the EMA teacher follows the student only slowly; a fixed window stopped
    short runs that were merely slow to leave that phase. Runs shorter than the window are never stopped.
    """
    return max(floor, warmup_steps + math.ceil(total_steps / 10))


class CollapseMonitor:
    """Flags a collapsed DINO run from the per-step teacher entropy and teacher-student KL (DINO paper §5.3).

    One-hot collapse: one prototype dominates, the teacher entropy goes to 0. Uniform collapse: centring
    dominates, the teacher entropy goes to log(out_dim) and the student follows, so the KL goes to 0. Both
    must hold for `window` consecutive steps before the monitor reports, so a transient dip does not.
    """

    def __init__(self, out_dim: int, window: int = 100, entropy_tolerance: float = 0.02, kl_tolerance: float = 1e-3):
        self.max_entropy = math.log(out_dim)
        self.entropy_tolerance = entropy_tolerance
        self.kl_tolerance = kl_tolerance
        self.history = deque(maxlen=window)

    def update(self, teacher_entropy: float, teacher_student_kl: float) -> str | None:
        """Record one step; return a message if the last `window` steps all look collapsed, else None."""
        self.history.append((float(teacher_entropy), float(teacher_student_kl)))
        if len(self.history) < self.history.maxlen:
            return None
        entropies, kls = zip(*self.history)
        steps = len(self.history)
        low = self.entropy_tolerance * self.max_entropy
        if max(entropies) < low:
            return (
                f"DINO collapse (one-hot): teacher entropy stayed below {low:.3g} nats for {steps} steps "
                f"(last {entropies[-1]:.3g}, max possible {self.max_entropy:.3g}); the teacher puts all mass on "
                "one prototype: its sharpening outweighs the centring. A higher teacher temperature or a faster "
                "centre (lower centre momentum) counters it; the learning rate matters too."
            )
        high = (1.0 - self.entropy_tolerance) * self.max_entropy
        if min(entropies) > high and max(kls) < self.kl_tolerance:
            return (
                f"DINO collapse (uniform): teacher entropy stayed above {high:.3g} nats (log(out_dim) = "
                f"{self.max_entropy:.3g}) with teacher-student KL below {self.kl_tolerance:.3g} for {steps} steps; "
                "the outputs are uniform: the centring outweighs the sharpening. A lower teacher temperature (sharper "
                "targets) counters it; the centre momentum and the learning rate matter too."
            )
        return None
