"""DINO building blocks for stage 2 (self-distillation with multi-crop and an EMA teacher).

Follows facebookresearch/dino (main_dino.py, utils.py, vision_transformer.DINOHead) with two changes of
engineering, not of method: the multi-crop augmentations run batched on the training device with torch
instead of per image on PIL, and the backbone is any transformers vision model reduced to pooled features
by `modeling_agriclip.modeling_agriclip.backbone_features`. Also the home of what the other stages borrow: the
per-step schedules, the parameter groups without weight decay and the batched crop-and-flip of stage 1.
"""

import math
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from itertools import groupby

import numpy as np
import torch
from torch import nn
from torch.nn.utils.parametrizations import weight_norm
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from modeling_agriclip.modeling_agriclip import backbone_features
from training.sharding import full_value


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


# DINO's utils.GaussianBlur draws PIL's radius, the standard deviation in pixels of the resized crop, from this range.
BLUR_SIGMA = (0.1, 2.0)
# 2 * ceil(3 * 2) + 1 = 13 taps: +-3 standard deviations of the largest sigma (99.7% of its mass), and wider than
# PIL's blur itself, which approximates the Gaussian by three box blurs (of radius 1.375 at sigma 2: +-5 px in all).
# The same at every crop size, since DINO's radius is in pixels of the crop.
BLUR_KERNEL_SIZE = 2 * math.ceil(3 * BLUR_SIGMA[1]) + 1
# torchvision RandomResizedCrop's aspect-ratio range, and its tries at a box inside the image before a central crop.
CROP_RATIO = (3 / 4, 4 / 3)
CROP_TRIES = 10


def random_resized_boxes(count: int, height: int, width: int, scale: tuple[float, float]) -> torch.Tensor:
    """`count` crop boxes (top, left, height, width) in pixels of a `height` x `width` image, int64 on the CPU.

    torchvision's RandomResizedCrop.get_params, as DINO crops, for all boxes at once: each box tries up to
    `CROP_TRIES` areas uniform in `scale` of the image and aspect ratios log-uniform in `CROP_RATIO`, keeps the first
    that fits, at a uniform position; a box that never fits is the central crop of the ratio nearest the image's.
    """
    uniform = torch.rand(2, CROP_TRIES, count, dtype=torch.float64)
    area = height * width * (scale[0] + (scale[1] - scale[0]) * uniform[0])
    ratio = torch.exp(math.log(CROP_RATIO[0]) + math.log(CROP_RATIO[1] / CROP_RATIO[0]) * uniform[1])
    widths, heights = (area * ratio).sqrt().round().long(), (area / ratio).sqrt().round().long()
    fits = (widths > 0) & (widths <= width) & (heights > 0) & (heights <= height)
    first = fits.long().argmax(dim=0, keepdim=True)  # the first try that fits
    crop_h, crop_w = heights.gather(0, first)[0], widths.gather(0, first)[0]
    if width / height < CROP_RATIO[0]:
        central_h, central_w = round(width / CROP_RATIO[0]), width
    elif width / height > CROP_RATIO[1]:
        central_h, central_w = height, round(height * CROP_RATIO[1])
    else:
        central_h, central_w = height, width
    fitted = fits.any(dim=0)
    crop_h, crop_w = crop_h.where(fitted, central_h), crop_w.where(fitted, central_w)
    position = torch.rand(2, count, dtype=torch.float64)
    top = (position[0] * (height - crop_h + 1)).long().where(fitted, (height - crop_h) // 2)
    left = (position[1] * (width - crop_w + 1)).long().where(fitted, (width - crop_w) // 2)
    return torch.stack([top, left, crop_h, crop_w], dim=-1)


def resized_crops(images: torch.Tensor, boxes: torch.Tensor, flip: torch.Tensor, size: int, mode: str) -> torch.Tensor:
    """The crops `boxes` (views, B, 4) of `images` (B, C, H, W), each resized to `size` x `size` with `grid_sample`'s
    `mode` and mirrored where `flip` (views, B), as (views, B, C, size, size): one `grid_sample` for all of them.

    Output pixel x of a box of width w at `left` samples the image at left + (x + 0.5) w / size on the half-pixel grid,
    where PIL's resize of the box puts it (and a mirrored crop at left + (size - x - 0.5) w / size); rows likewise. An
    image's views lie one below the other in one sampling grid, so the images are not copied per view. Taps beyond the
    image repeat its edge pixels, as PIL's resize clips them, so a flat image stays flat.
    """
    views, count = boxes.shape[:2]
    _, _, height, width = images.shape
    boxes = boxes.to(images.device, images.dtype)
    top, left, crop_h, crop_w = boxes.unbind(-1)
    fraction = (torch.arange(size, device=images.device, dtype=images.dtype) + 0.5) / size
    across = fraction.expand(views, count, size).where(~flip.to(images.device)[..., None], 1 - fraction)
    # grid_sample's coordinates run from -1 to 1 over the image's outer pixel edges (align_corners=False).
    grid = images.new_empty(count, views, size, size, 2)
    grid[..., 0] = ((left[..., None] + across * crop_w[..., None]) * (2 / width) - 1).transpose(0, 1)[:, :, None, :]
    grid[..., 1] = ((top[..., None] + fraction * crop_h[..., None]) * (2 / height) - 1).transpose(0, 1)[..., None]
    crops = nn.functional.grid_sample(
        images, grid.view(count, views * size, size, 2), mode=mode, padding_mode="border", align_corners=False
    )
    return crops.view(count, -1, views, size, size).permute(2, 0, 1, 3, 4)


def _luma(images: torch.Tensor) -> torch.Tensor:
    """ITU-R 601-2 luma (B, 1, H, W), the weights of PIL's convert("L") and of torchvision's rgb_to_grayscale."""
    red, green, blue = images.unbind(1)
    return (0.299 * red).add_(green, alpha=0.587).add_(blue, alpha=0.114).unsqueeze(1)


# torchvision's ColorJitter operations on float images, in place, each image (B, 3, H, W) with its factor (B,).
def _adjust_brightness(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return images.mul_(factor.view(-1, 1, 1, 1)).clamp_(0.0, 1.0)


def _blend(images: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    factor = factor.view(-1, 1, 1, 1)
    return images.mul_(factor).add_(other * (1.0 - factor)).clamp_(0.0, 1.0)


def _adjust_contrast(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    # Summed in float64: the order of a float32 sum depends on how many images the call holds (a lone image's sum is
    # split between threads), and an image's views must not depend on how the batch is split between processes.
    mean = _luma(images).mean(dim=(-2, -1), keepdim=True, dtype=torch.float64).to(images.dtype)
    return _blend(images, mean, factor)


def _adjust_saturation(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return _blend(images, _luma(images), factor)


def _adjust_hue(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """torchvision's adjust_hue (the HSV hue turned by `factor` of a turn) without the round trip through HSV.

    A hue turn keeps each pixel's value (its largest channel) and chroma (largest minus smallest); with the hue h in
    sixths of a turn, channel n of red, green, blue = 5, 3, 1 is value - chroma * clamp(min(k, 4 - k), 0, 1) for
    k = (n + h) mod 6, HSV-to-RGB in closed form.
    """
    red, green, blue = images.unbind(1)
    value = torch.maximum(torch.maximum(red, green), blue)
    chroma = value - torch.minimum(torch.minimum(red, green), blue)
    # torchvision's _rgb2hsv hue, in sixths of a turn: which channel is largest picks the sector. A grey pixel (no
    # chroma) has every numerator 0, so the clamped divisor leaves its hue 0.
    sixths = torch.where(
        red == value,
        green - blue,
        torch.where(green == value, (blue - red).add_(chroma, alpha=2), (red - green).add_(chroma, alpha=4)),
    )
    sixths.div_(chroma.clamp_min(torch.finfo(images.dtype).tiny)).add_(6.0 * factor.view(-1, 1, 1))
    for channel, offset in zip((red, green, blue), (5.0, 3.0, 1.0)):
        k = torch.remainder(sixths + offset, 6.0)
        torch.addcmul(value, chroma, torch.minimum(k, 4.0 - k).clamp_(0.0, 1.0), value=-1.0, out=channel)
    return images


# In the order of their factors.
_JITTER = (_adjust_brightness, _adjust_contrast, _adjust_saturation, _adjust_hue)


def _blur_weights(sigma: torch.Tensor) -> torch.Tensor:
    """The normalised Gaussian of each `sigma` (pixels) over `BLUR_KERNEL_SIZE` taps, (N, taps) in float64: computed
    for all views at once, so that a view's weights do not depend on which others a chunk blurs with it."""
    radius = BLUR_KERNEL_SIZE // 2
    taps = torch.arange(-radius, radius + 1, dtype=torch.float64)
    weights = torch.exp(-0.5 * (taps / sigma.double()[:, None]) ** 2)
    return weights / weights.sum(dim=1, keepdim=True)


def _gaussian_blur(images: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Each image blurred by its own `_blur_weights` (B, taps), rows then columns, with edge pixels repeated beyond the
    border as PIL's blur does.

    As a weighted sum of shifted copies: on the CPU a grouped convolution with one kernel per image and channel ran
    2-4x slower at 96-224 px.
    """
    _, _, height, width = images.shape
    radius = BLUR_KERNEL_SIZE // 2
    weights = weights.T[..., None, None, None]  # (taps, B, 1, 1, 1)
    padded = nn.functional.pad(images, (radius,) * 4, mode="replicate")
    rows = padded[:, :, :height] * weights[0]
    for tap in range(1, BLUR_KERNEL_SIZE):
        rows.addcmul_(padded[:, :, tap : tap + height], weights[tap])
    blurred = rows[..., :width] * weights[0]
    for tap in range(1, BLUR_KERNEL_SIZE):
        blurred.addcmul_(rows[..., tap : tap + width], weights[tap])
    return blurred


@dataclass
class ViewParams:
    """The random parameters of `views` views of each of N images: every field is (views, N, ...), on the CPU.

    `boxes` holds each crop's (top, left, height, width) in input pixels, `factors` its jitter's brightness, contrast,
    saturation and hue factors and `order` the jitter's operations (indices into those four) in the order applied;
    the rest are coins, and `sigma` the blur's standard deviation in pixels of the crop.
    """

    boxes: torch.Tensor
    flip: torch.Tensor
    jitter: torch.Tensor
    factors: torch.Tensor
    order: torch.Tensor
    grayscale: torch.Tensor
    blur: torch.Tensor
    sigma: torch.Tensor
    solarize: torch.Tensor

    def select(self, rows: torch.Tensor | slice) -> "ViewParams":
        """The parameters of the views of the images `rows` (along N)."""
        return ViewParams(*(getattr(self, field.name)[:, rows] for field in fields(self)))


def _apply_where(images: torch.Tensor, chosen: torch.Tensor, operation: Callable, *values: torch.Tensor) -> None:
    """`operation` on the `images` (N, ...) that `chosen` (N, bool, CPU) picks, with their rows of `values`, in place:
    only the chosen images are computed."""
    index = chosen.nonzero().squeeze(1)
    if len(index) == 0:
        return
    subset = operation(
        images[index.to(images.device)], *(value[index].to(images.device, images.dtype) for value in values)
    )
    images.index_copy_(0, index.to(images.device), subset)


# Pixels of views augmented at a time on the CPU: every operation's inputs and outputs then stay in the caches, and
# no intermediate is large enough for the allocator to map fresh pages for it (page faults cost more than the
# arithmetic). Other devices take the whole batch at once.
_CPU_CHUNK_PIXELS = 2**20


class _ViewGroup:
    """`count` views of `size` px of every image, the global or the local ones: their random parameters and their
    augmentation, one batched operation at a time for all of them (per chunk of images on the CPU)."""

    def __init__(
        self,
        count: int,
        size: int,
        scale: tuple[float, float],
        colour: PhotometricRecipe,
        blur_prob: Sequence[float],
        solarize_prob: Sequence[float],
    ):
        self.count, self.size, self.scale, self.colour = count, size, scale, colour
        ranges = [
            (max(0.0, 1 - colour.brightness), 1 + colour.brightness),
            (max(0.0, 1 - colour.contrast), 1 + colour.contrast),
            (max(0.0, 1 - colour.saturation), 1 + colour.saturation),
            (-colour.hue, colour.hue),
        ]
        self.low, self.high = torch.tensor(ranges, dtype=torch.float64).T
        # As torchvision's ColorJitter, an operation of no range (factor 1, or a hue turn of 0) is left out.
        self.jitter_ops = [op for op, (low, high) in enumerate(ranges) if low != high]
        self.blur_prob, self.solarize_prob = torch.tensor(blur_prob)[:, None], torch.tensor(solarize_prob)[:, None]

    def draw(self, total: int, height: int, width: int) -> ViewParams:
        """The parameters of the views of `total` images of `height` x `width`, from torch's global RNG."""
        shape = (self.count, total)
        boxes = random_resized_boxes(self.count * total, height, width, self.scale).view(*shape, 4)
        coins = torch.rand(5, *shape)
        factors = (self.low + (self.high - self.low) * torch.rand(*shape, 4, dtype=torch.float64)).float()
        order = torch.rand(*shape, 4).argsort(dim=-1)
        sigma = BLUR_SIGMA[0] + (BLUR_SIGMA[1] - BLUR_SIGMA[0]) * torch.rand(shape)
        return ViewParams(
            boxes,
            coins[0] < 0.5,
            coins[1] < self.colour.jitter_prob,
            factors,
            order,
            coins[2] < self.colour.grayscale_prob,
            coins[3] < self.blur_prob,
            sigma,
            coins[4] < self.solarize_prob,
        )

    def __call__(
        self, images: torch.Tensor, params: ViewParams, mean: torch.Tensor, std: torch.Tensor
    ) -> list[torch.Tensor]:
        batch = len(images)
        views = images.new_empty(self.count, batch, 3, self.size, self.size)
        step = max(1, _CPU_CHUNK_PIXELS // (self.count * self.size**2)) if images.device.type == "cpu" else batch
        for start in range(0, batch, step):
            chunk = slice(start, start + step)
            views[:, chunk] = self._augment(images[chunk], params.select(chunk)).sub_(mean).div_(std)
        return list(views.unbind(0))

    def _augment(self, images: torch.Tensor, params: ViewParams) -> torch.Tensor:
        views = resized_crops(images, params.boxes, params.flip, self.size, "bilinear").contiguous()
        flat = views.flatten(0, 1)
        jitter, factors, order = params.jitter.flatten(), params.factors.flatten(0, 1), params.order.flatten(0, 1)
        for step in range(4):  # each view's own order, as DINO jitters one image at a time
            for op in self.jitter_ops:
                _apply_where(flat, jitter & (order[:, step] == op), _JITTER[op], factors[:, op])
        _apply_where(flat, params.grayscale.flatten(), lambda chosen: _luma(chosen).expand_as(chosen))
        _apply_where(flat, params.blur.flatten(), _gaussian_blur, _blur_weights(params.sigma.flatten()))
        # PIL's ImageOps.solarize(threshold=128), as DINO calls it: pixels from half up are inverted.
        _apply_where(flat, params.solarize.flatten(), lambda chosen: torch.where(chosen >= 0.5, 1.0 - chosen, chosen))
        return views


class MultiCropAugmentation(nn.Module):
    """DINO multi-crop augmentation (DataAugmentationDINO), batched on the input's device.

    Input: float images (B, 3, H, W) in [0, 1]. Output: a list of 2 global crops followed by `num_local_crops` local
    crops, each (B, 3, size, size) and normalised with `mean`/`std`. Every random parameter is drawn per view from
    torch's global RNG on the CPU, all at once at the start of a call (`draw`), so `torch.manual_seed` makes the crops
    reproducible, the same on every device.

    Under several processes, pass `rows`, the indices of this process's images in the global batch, and
    `global_batch_size`: the parameters are drawn for the whole global batch on every process (which all hold the same
    RNG state) and each process augments its own rows with them. An image's crops then depend on its place in the
    global batch only, not on how the batch is split between processes.

    Per view, as in DINO: random resized crop (torchvision's boxes), horizontal flip p=0.5,
    ColorJitter(0.4, 0.4, 0.2, 0.1) p=0.8 in the view's own random order, grayscale p=0.2, Gaussian blur sigma in
    (0.1, 2) px with p=1.0 (global 1), 0.1 (global 2), 0.5 (local), solarisation p=0.2 on global 2 only: the
    `photometric="dino"` recipe (the default). `photometric="colour"` keeps the flip, the blur and the jitter of
    brightness and contrast (same ranges and probability) and leaves hue and saturation factors, grayscale and
    solarisation out (`PHOTOMETRIC_RECIPES`).

    The crops are resampled bilinearly (`resized_crops`, one call per chunk of images), where DINO resizes with PIL's
    antialiased bicubic filter. Against PIL's own crops of 1/f-noise images (natural images' spectrum) at stage 2's
    input size, bilinear views differ by about 4 grey levels of 255 (RMS) at every scale; bicubic ones without
    antialiasing by 2 on the global views and by 8 on local views downscaled 1.4-2x, at three times the cost on the
    CPU. Neither antialiases: feed images not much larger than the global crop (stage 2's collator hands 8/7 of it, so
    that local crops shrink at most about 2x).
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
            raise ValueError(
                f"MultiCropAugmentation: unknown photometric recipe {photometric!r}, expected one of "
                f"{sorted(PHOTOMETRIC_RECIPES)}"
            )
        colour = PHOTOMETRIC_RECIPES[photometric]
        if preset not in MULTICROP_PRESETS:
            raise ValueError(
                f"MultiCropAugmentation: unknown preset {preset!r}, expected one of {sorted(MULTICROP_PRESETS)}"
            )
        scales = MULTICROP_PRESETS[preset]
        self.num_local_crops = num_local_crops
        self.global_views = _ViewGroup(
            2,
            global_size,
            scales.global_crops_scale,
            colour,
            blur_prob=(1.0, 0.1),
            solarize_prob=(0.0, 0.2 if colour.solarize else 0.0),
        )
        self.local_views = _ViewGroup(
            num_local_crops,
            local_size,
            scales.local_crops_scale,
            colour,
            blur_prob=(0.5,) * num_local_crops,
            solarize_prob=(0.0,) * num_local_crops,
        )
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def draw(self, total: int, height: int, width: int) -> tuple[ViewParams, ViewParams]:
        """The parameters of the global and of the local views of `total` images of `height` x `width`."""
        return self.global_views.draw(total, height, width), self.local_views.draw(total, height, width)

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
        views = []
        for group, params in zip(
            (self.global_views, self.local_views), self.draw(global_batch_size, *images.shape[-2:])
        ):
            if group.count:
                views.extend(group(images, params.select(rows), self.mean, self.std))
        return views


class CropAndFlip(nn.Module):
    """Stage 1's training augmentation (CLIP's recipe as open_clip trains it): a bicubic random resized crop of
    `scale` of the image area, resized to `size`, then a horizontal flip with probability `flip_prob`, batched on the
    input's device (`resized_crops`, the flip folded into the crop).

    Input: the processor's output, already normalised with `mean`/`std`. Both operations are geometric and the
    bicubic weights of every output pixel sum to one, so cropping normalised pixels equals normalising cropped
    [0, 1] pixels; the bicubic overshoot is clamped to the normalised image of [0, 1], as MultiCropAugmentation
    clamps to [0, 1] before it normalises. Random parameters are drawn per image from torch's global RNG, for the
    global batch under several processes (`rows`, `global_batch_size`), as in MultiCropAugmentation.
    """

    def __init__(
        self, size: int, scale: tuple[float, float], flip_prob: float, mean: Sequence[float], std: Sequence[float]
    ):
        super().__init__()
        self.size, self.scale, self.flip_prob = size, tuple(scale), flip_prob
        mean, std = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
        self.register_buffer("low", (0.0 - mean) / std, persistent=False)
        self.register_buffer("high", (1.0 - mean) / std, persistent=False)

    @torch.no_grad()
    def forward(
        self, pixels: torch.Tensor, rows: torch.Tensor | None = None, global_batch_size: int | None = None
    ) -> torch.Tensor:
        if pixels.ndim != 4 or pixels.shape[1] != 3 or not pixels.is_floating_point():
            raise ValueError(
                f"CropAndFlip: pixels must be a float batch (B, 3, H, W), got dtype {pixels.dtype} and "
                f"shape {tuple(pixels.shape)}"
            )
        rows, global_batch_size = _rows_in_global_batch(type(self).__name__, len(pixels), rows, global_batch_size)
        boxes = random_resized_boxes(global_batch_size, *pixels.shape[-2:], self.scale)
        flip = torch.rand(global_batch_size) < self.flip_prob
        cropped = resized_crops(pixels, boxes[None, rows], flip[None, rows], self.size, "bicubic")[0]
        return cropped.clamp(self.low.to(cropped.dtype), self.high.to(cropped.dtype))


def _rows_in_global_batch(
    name: str, batch_size: int, rows: torch.Tensor | None, global_batch_size: int | None
) -> tuple[torch.Tensor, int]:
    """`rows` (on the CPU) and `global_batch_size` checked against a local batch of `batch_size` images; the batch
    itself when `rows` is None (one process)."""
    if rows is None:
        return torch.arange(batch_size), batch_size
    if global_batch_size is None or len(rows) != batch_size or rows.min() < 0 or rows.max() >= global_batch_size:
        raise ValueError(
            f"{name}: rows must give the place of each of the {batch_size} images in a global batch of "
            f"global_batch_size images, got rows {rows.tolist()} and global_batch_size {global_batch_size}"
        )
    return rows.cpu(), global_batch_size


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
        raise ValueError(
            f"cosine_schedule: warmup_steps ({warmup_steps}) must be between 0 and total_steps "
            f"({total_steps}): a warm-up (--warmup-steps) cannot outlast the run (--max-steps, or --epochs "
            "x steps per epoch)"
        )
    fraction_done = np.arange(1, warmup_steps + 1) / max(warmup_steps, 1)
    warmup = start_warmup_value + (base_value - start_warmup_value) * fraction_done
    iters = np.arange(total_steps - warmup_steps)
    cosine = final_value + 0.5 * (base_value - final_value) * (1 + np.cos(np.pi * iters / max(len(iters), 1)))
    return np.concatenate((warmup, cosine))


@torch.no_grad()
def update_teacher(student: nn.Module, teacher: nn.Module, momentum: float) -> None:
    """EMA of the student's parameters into the teacher's, in place: t = m * t + (1 - m) * s.

    Pass the unwrapped student (no DDP `module.` prefix); parameters are matched by name; a student sharded by
    FSDP2 updates the full teacher from its gathered parameters (`training.sharding.full_value`). Buffers are left
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
    # Under FSDP the student's parameters are shards (DTensors): each is gathered whole (a collective that every
    # process joins, as every process updates its own replica of the teacher).
    student_tensors = [full_value(student_params[name].detach()) for name in names]
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
            # A model built under DeepSpeed ZeRO-3 holds each weight as an empty partition; `ds_shape` is its shape.
            ndim = len(getattr(parameter, "ds_shape", parameter.shape))
            (no_decay if ndim <= 1 or holds_embeddings else decay).append(parameter)
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
