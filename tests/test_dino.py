"""DINO building blocks: head, multi-crop wrapper and augmentation, schedules, EMA, parameter groups, collapse watch."""

import copy
import dataclasses
import math
import random

import numpy as np
import pytest
import torch
from kornia.color import hsv_to_rgb, rgb_to_hsv
from PIL import Image, ImageFilter
from torch import nn
from transformers import ResNetConfig, ResNetModel, ViTConfig, ViTModel
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from training import dino
from training.dino import (
    BLUR_KERNEL_SIZE,
    MULTICROP_PRESETS,
    CollapseMonitor,
    CropAndFlip,
    DINOHead,
    MultiCropAugmentation,
    MultiCropWrapper,
    cancel_gradients_last_layer,
    cosine_schedule,
    default_collapse_window,
    param_groups_without_decay,
    random_resized_boxes,
    resized_crops,
    teacher_entropy,
    update_teacher,
)
from training.losses import DINOLoss


GLOBAL_SIZE, LOCAL_SIZE = 32, 16


def _dino_cosine_scheduler(base_value, final_value, epochs, niter_per_ep, warmup_epochs=0, start_warmup_value=0):
    """facebookresearch/dino utils.cosine_scheduler, verbatim."""
    warmup_schedule = np.array([])
    warmup_iters = warmup_epochs * niter_per_ep
    if warmup_epochs > 0:
        warmup_schedule = np.linspace(start_warmup_value, base_value, warmup_iters)
    iters = np.arange(epochs * niter_per_ep - warmup_iters)
    schedule = final_value + 0.5 * (base_value - final_value) * (1 + np.cos(np.pi * iters / len(iters)))
    return np.concatenate((warmup_schedule, schedule))


def test_cosine_schedule_warms_up_from_the_first_step_then_follows_dino_cosine():
    lr = cosine_schedule(5e-4, 1e-6, total_steps=20, warmup_steps=5, start_warmup_value=1e-5)
    assert len(lr) == 20
    # Warm-up step i of 5 takes start + (base - start) * (i + 1) / 5: the first step already moves.
    np.testing.assert_allclose(lr[:5], [1e-5 + (5e-4 - 1e-5) * (i + 1) / 5 for i in range(5)])
    assert lr[4] == pytest.approx(5e-4) and lr[5] == pytest.approx(5e-4)
    assert np.all(np.diff(lr[:5]) > 0) and np.all(np.diff(lr[5:]) < 0)
    # After the warm-up, DINO's cosine over the remaining steps.
    np.testing.assert_allclose(lr[5:], _dino_cosine_scheduler(5e-4, 1e-6, 4, 5, 1, 1e-5)[5:])

    momentum = cosine_schedule(0.996, 1.0, total_steps=21)
    assert len(momentum) == 21 and momentum[0] == pytest.approx(0.996)
    assert 0.9999 < momentum[-1] < 1.0
    np.testing.assert_allclose(momentum, _dino_cosine_scheduler(0.996, 1.0, 3, 7))


def test_cosine_schedule_rejects_warmup_longer_than_training():
    with pytest.raises(ValueError, match="warmup_steps"):
        cosine_schedule(1.0, 0.0, total_steps=6, warmup_steps=7)


def test_update_teacher_is_an_ema_of_parameters_and_keeps_teacher_buffers():
    torch.manual_seed(0)
    student = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    teacher = copy.deepcopy(student)
    with torch.no_grad():
        for parameter in student.parameters():
            parameter.add_(torch.randn_like(parameter))
    student(torch.randn(8, 4))  # moves the student's BatchNorm running statistics only
    before = {name: tensor.clone() for name, tensor in teacher.state_dict().items()}

    update_teacher(student, teacher, momentum=0.9)

    for name, parameter in teacher.named_parameters():
        torch.testing.assert_close(parameter, 0.9 * before[name] + 0.1 * dict(student.named_parameters())[name])
    for name, buffer in teacher.named_buffers():
        assert torch.equal(buffer, before[name]), name
    assert not torch.equal(student[1].running_mean, teacher[1].running_mean)


def test_update_teacher_rejects_a_wrapped_student():
    model = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="update_teacher"):
        update_teacher(nn.Sequential(model), copy.deepcopy(model), momentum=0.5)


@pytest.mark.parametrize("nlayers,use_bn", [(1, False), (3, False), (3, True)])
def test_dino_head_output_shape(nlayers, use_bn):
    head = DINOHead(12, 50, use_bn=use_bn, nlayers=nlayers, hidden_dim=20, bottleneck_dim=8)
    assert head(torch.randn(5, 12)).shape == (5, 50)


def _train_step(head, step=0, freeze_last_layer_steps=0):
    optimizer = torch.optim.SGD([p for p in head.parameters() if p.requires_grad], lr=1.0)
    head(torch.randn(6, 12)).pow(2).sum().backward()
    cancel_gradients_last_layer(head, step, freeze_last_layer_steps)
    optimizer.step()


def test_norm_last_layer_keeps_unit_row_norms_and_the_option_frees_them():
    torch.manual_seed(0)
    head = DINOHead(12, 50, hidden_dim=20, bottleneck_dim=8, norm_last_layer=True)
    _train_step(head)
    torch.testing.assert_close(head.last_layer.weight.norm(dim=1), torch.ones(50))

    free = DINOHead(12, 50, hidden_dim=20, bottleneck_dim=8, norm_last_layer=False)
    _train_step(free)
    assert not torch.allclose(free.last_layer.weight.norm(dim=1), torch.ones(50))


def test_last_layer_is_frozen_during_the_first_steps_only():
    torch.manual_seed(0)
    head = DINOHead(12, 50, hidden_dim=20, bottleneck_dim=8, norm_last_layer=False)
    wrapped = nn.Sequential(head)
    last_before = copy.deepcopy(head.last_layer.state_dict())
    mlp_before = head.mlp[0].weight.clone()

    _train_step(wrapped, step=3, freeze_last_layer_steps=4)
    for name, tensor in head.last_layer.state_dict().items():
        assert torch.equal(tensor, last_before[name]), name
    assert not torch.equal(head.mlp[0].weight, mlp_before)

    _train_step(wrapped, step=4, freeze_last_layer_steps=4)
    assert not torch.equal(
        head.last_layer.parametrizations.weight.original1, last_before["parametrizations.weight.original1"]
    )


class _CountingBackbone(nn.Module):
    """Mean-pools pixels through a linear layer and records the batch shapes it sees."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(3, 12)
        self.calls = []

    def forward(self, pixel_values):
        self.calls.append(tuple(pixel_values.shape))
        return self.proj(pixel_values.mean(dim=(-2, -1)))


def test_multicrop_wrapper_groups_consecutive_resolutions_and_keeps_crop_order():
    torch.manual_seed(0)
    backbone = _CountingBackbone()
    wrapper = MultiCropWrapper(backbone, DINOHead(12, 10, hidden_dim=16, bottleneck_dim=8), lambda model, x: model(x))
    crops = [torch.randn(2, 3, GLOBAL_SIZE, GLOBAL_SIZE) for _ in range(2)]
    crops += [torch.randn(2, 3, LOCAL_SIZE, LOCAL_SIZE) for _ in range(3)]

    output = wrapper(crops)

    assert output.shape == (10, 10)
    assert backbone.calls == [(4, 3, GLOBAL_SIZE, GLOBAL_SIZE), (6, 3, LOCAL_SIZE, LOCAL_SIZE)]
    torch.testing.assert_close(output, torch.cat([wrapper(crop) for crop in crops]))


@pytest.mark.parametrize(
    "build_backbone",
    [
        lambda: ViTModel(
            ViTConfig(
                image_size=GLOBAL_SIZE,
                patch_size=8,
                hidden_size=24,
                num_hidden_layers=1,
                num_attention_heads=2,
                intermediate_size=32,
            ),
            add_pooling_layer=False,
        ),
        lambda: ResNetModel(ResNetConfig(layer_type="basic", depths=[1, 1], hidden_sizes=[8, 24], embedding_size=8)),
    ],
    ids=["vit", "resnet"],
)
def test_multicrop_wrapper_runs_transformers_backbones_on_both_resolutions(build_backbone):
    wrapper = MultiCropWrapper(build_backbone(), DINOHead(24, 10, hidden_dim=16, bottleneck_dim=8))
    crops = [torch.randn(2, 3, GLOBAL_SIZE, GLOBAL_SIZE)] * 2 + [torch.randn(2, 3, LOCAL_SIZE, LOCAL_SIZE)] * 3
    assert wrapper(crops).shape == (10, 10)


def _augmentation(preset="vit", num_local_crops=3):
    return MultiCropAugmentation(
        preset, num_local_crops=num_local_crops, global_size=GLOBAL_SIZE, local_size=LOCAL_SIZE
    )


def test_multicrop_augmentation_shapes_and_normalised_ranges():
    torch.manual_seed(0)
    views = _augmentation()(torch.rand(4, 3, 48, 40))
    assert [tuple(view.shape) for view in views] == [(4, 3, GLOBAL_SIZE, GLOBAL_SIZE)] * 2 + [
        (4, 3, LOCAL_SIZE, LOCAL_SIZE)
    ] * 3
    assert all(view.dtype == torch.float32 for view in views)
    mean, std = (
        torch.tensor(IMAGENET_DEFAULT_MEAN).view(1, 3, 1, 1),
        torch.tensor(IMAGENET_DEFAULT_STD).view(1, 3, 1, 1),
    )
    for view in views:
        pixels = view * std + mean
        assert pixels.min() >= -1e-6 and pixels.max() <= 1 + 1e-6
        assert pixels.std() > 0.05  # real image content, not a constant


def test_multicrop_augmentation_is_reproducible_under_a_torch_seed():
    images = torch.rand(3, 3, 48, 48)
    augmentation = _augmentation()
    torch.manual_seed(7)
    first = augmentation(images)
    torch.manual_seed(7)
    second = augmentation(images)
    torch.manual_seed(8)
    other = augmentation(images)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    assert not any(torch.equal(a, c) for a, c in zip(first, other))


def test_multicrop_augmentation_draws_per_image_crops():
    torch.manual_seed(0)
    augmentation = _augmentation(num_local_crops=2)
    views = augmentation(torch.rand(1, 3, 48, 48).expand(6, -1, -1, -1))
    for view in views:
        assert len({tuple(row.flatten().tolist()) for row in view}) == 6
    boxes = augmentation.draw(6, 48, 48)[1].boxes.flatten(0, 1)
    assert len({tuple(box.tolist()) for box in boxes}) == len(boxes)


# Pixels per chunk that split both view groups of 6 images unevenly (2 and 9 images a chunk), and the default.
@pytest.mark.parametrize("chunk_pixels", [5000, None], ids=["small-chunks", "default-chunks"])
def test_processes_applying_their_rows_of_the_global_draw_see_the_single_process_crops(chunk_pixels, monkeypatch):
    if chunk_pixels is not None:
        monkeypatch.setattr(dino, "_CPU_CHUNK_PIXELS", chunk_pixels)
    images = torch.rand(6, 3, 48, 48)
    augmentation = _augmentation(num_local_crops=2)
    torch.manual_seed(3)
    whole = augmentation(images)
    shards = []
    for first in (0, 2, 4):  # 3 processes of 2 images, each from the same RNG state
        torch.manual_seed(3)
        shards.append(augmentation(images[first : first + 2], rows=torch.arange(first, first + 2), global_batch_size=6))
    for view, expected in enumerate(whole):
        assert torch.equal(torch.cat([shard[view] for shard in shards]), expected)


def test_multicrop_augmentation_rejects_rows_outside_the_global_batch():
    images = torch.rand(2, 3, 48, 48)
    for rows, total in [
        (torch.arange(2), None),
        (torch.arange(3), 4),
        (torch.tensor([3, 4]), 4),
        (torch.tensor([-1, 0]), 4),
    ]:
        with pytest.raises(ValueError, match="rows must give the place of each"):
            _augmentation()(images, rows=rows, global_batch_size=total)


def test_multicrop_augmentation_rejects_bad_input_and_presets():
    with pytest.raises(ValueError, match="MultiCropAugmentation"):
        _augmentation()(torch.randint(0, 255, (2, 3, 48, 48), dtype=torch.uint8))
    with pytest.raises(ValueError, match="unknown preset"):
        MultiCropAugmentation("swin")

    with pytest.raises(ValueError, match="unknown photometric recipe 'grey'"):
        MultiCropAugmentation(photometric="grey")


def _torchvision_box(rng, height, width, scale, ratio=(3 / 4, 4 / 3)):
    """torchvision's RandomResizedCrop.get_params (top, left, height, width), one box at a time with Python's random."""
    for _ in range(10):
        area = height * width * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        w, h = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, height - h), rng.randint(0, width - w), h, w
    if width / height < min(ratio):
        w, h = width, round(width / min(ratio))
    elif width / height > max(ratio):
        w, h = round(height * max(ratio)), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def _ks_distance(a, b):
    """Two-sample Kolmogorov-Smirnov statistic: the largest gap between the two empirical distribution functions."""
    a, b = np.sort(a), np.sort(b)
    points = np.concatenate([a, b])
    return np.abs(
        np.searchsorted(a, points, side="right") / len(a) - np.searchsorted(b, points, side="right") / len(b)
    ).max()


@pytest.mark.parametrize("preset", sorted(MULTICROP_PRESETS))
def test_crop_boxes_are_distributed_as_torchvision_draws_them_one_at_a_time(preset):
    """Area, aspect ratio and centre of 3,000 boxes of each view group drawn at once, against 3,000 of torchvision's
    get_params: at most 0.064 apart in Kolmogorov-Smirnov distance (the 1e-5 critical value of two samples this size),
    every box inside the image and within the preset's area range."""
    torch.manual_seed(0)
    rng = random.Random(0)
    height, width, count = 48, 64, 3000
    scales = MULTICROP_PRESETS[preset]
    for scale in (scales.global_crops_scale, scales.local_crops_scale):
        ours = random_resized_boxes(count, height, width, scale).double().numpy()
        theirs = np.array([_torchvision_box(rng, height, width, scale) for _ in range(count)], dtype=np.float64)
        for boxes in (ours, theirs):
            top, left, h, w = boxes.T
            assert np.all((top >= 0) & (left >= 0) & (top + h <= height) & (left + w <= width))
        statistics = {
            "area": lambda b: b[:, 2] * b[:, 3] / (height * width),
            "log aspect": lambda b: np.log(b[:, 3] / b[:, 2]),
            "centre y": lambda b: b[:, 0] + b[:, 2] / 2,
            "centre x": lambda b: b[:, 1] + b[:, 3] / 2,
        }
        for name, statistic in statistics.items():
            assert _ks_distance(statistic(ours), statistic(theirs)) < 0.064, (scale, name)
        areas = statistics["area"](ours)
        # Pixel rounding moves an area by at most one row and one column.
        assert areas.min() >= scale[0] - 2 / height and areas.max() <= scale[1] + 2 / height


@pytest.mark.parametrize("height, width", [(20, 200), (200, 20)])
def test_a_box_that_never_fits_is_torchvision_s_central_crop(height, width):
    torch.manual_seed(0)
    expected = _torchvision_box(random.Random(0), height, width, (0.9, 1.0))
    assert sorted(expected[2:]) == [20, 27]  # the nearest ratio in (3/4, 4/3) on the short side
    assert {tuple(box.tolist()) for box in random_resized_boxes(50, height, width, (0.9, 1.0))} == {expected}


def _smooth_image(height, width):
    """A smooth uint8 RGB image (sines of 29-41 px periods): resampling filters agree on it to a few grey levels, so
    that comparing crops checks their geometry."""
    y, x = torch.meshgrid(
        torch.arange(height, dtype=torch.float64), torch.arange(width, dtype=torch.float64), indexing="ij"
    )
    waves = [0.5 + 0.3 * torch.sin(2 * math.pi * (x / 41 + y / 29) + phase) for phase in (0.0, 2.0, 4.0)]
    return (torch.stack(waves) * 255).round().to(torch.uint8)


@pytest.mark.parametrize("mode", ["bilinear", "bicubic"])
def test_crops_sample_their_boxes_where_pil_resizes_them(mode):
    """Each crop against PIL's bicubic resize of its box, as DINO makes it, and its mirror image against PIL's flip: a
    one-pixel shift of the box would be 0.05 off."""
    pixels = _smooth_image(48, 64)
    image = Image.fromarray(pixels.permute(1, 2, 0).numpy())
    boxes = torch.tensor([[3, 5, 30, 20], [0, 0, 48, 64], [10, 20, 12, 9], [7, 1, 41, 60], [20, 40, 28, 24]])
    for flip in (False, True):
        crops = resized_crops(pixels[None].float() / 255, boxes[:, None], torch.full((5, 1), flip), 32, mode)[:, 0]
        for (top, left, height, width), crop in zip(boxes.tolist(), crops):
            expected = image.resize((32, 32), Image.BICUBIC, box=(left, top, left + width, top + height))
            if flip:
                expected = expected.transpose(Image.FLIP_LEFT_RIGHT)
            expected = torch.from_numpy(np.array(expected)).permute(2, 0, 1).float() / 255
            torch.testing.assert_close(crop, expected, atol=0.015, rtol=0)


@pytest.mark.parametrize("mode", ["bilinear", "bicubic"])
def test_crops_of_a_flat_image_stay_flat_up_to_the_border(mode):
    torch.manual_seed(0)
    boxes = random_resized_boxes(16, 24, 24, (0.05, 1.0)).view(2, 8, 4)
    crops = resized_crops(torch.full((8, 3, 24, 24), 0.5), boxes, torch.rand(2, 8) < 0.5, 32, mode)  # up and down
    torch.testing.assert_close(crops, torch.full_like(crops, 0.5))


# DINO's DataAugmentationDINO (main_dino.py), per view (global 1, global 2, local): flip p=0.5, ColorJitter(0.4, 0.4,
# 0.2, 0.1) with p=0.8, grayscale p=0.2; Gaussian blur p=1.0, 0.1, 0.5; solarisation p=0.2 on global 2 only. The colour
# recipe keeps the lighting changes (flip, brightness and contrast jitter, blur) and drops grayscale and solarisation.
def _probabilities(photometric):
    dino = photometric == "dino"
    return {
        "flip": (0.5, 0.5, 0.5),
        "jitter": (0.8, 0.8, 0.8),
        "grayscale": (0.2 if dino else 0.0,) * 3,
        "blur": (1.0, 0.1, 0.5),
        "solarize": (0.0, 0.2 if dino else 0.0, 0.0),
    }


@pytest.mark.parametrize("photometric", ["dino", "colour"])
def test_photometric_recipes_draw_each_operation_with_its_probability(photometric):
    torch.manual_seed(0)
    augmentation = MultiCropAugmentation(
        photometric=photometric, num_local_crops=2, global_size=GLOBAL_SIZE, local_size=LOCAL_SIZE
    )
    global_views, local_views = augmentation.draw(4000, 8, 8)  # a probability within 0.03 (4 standard deviations)
    for name, expected in _probabilities(photometric).items():
        coins = getattr(global_views, name)
        observed = [coins[0], coins[1], getattr(local_views, name)]
        assert [coin.float().mean().item() for coin in observed] == pytest.approx(expected, abs=0.03), name


@pytest.mark.parametrize("photometric", ["dino", "colour"])
def test_jitter_factors_orders_and_blur_sigmas_are_drawn_as_torchvision_and_dino_draw_them(photometric):
    """Factors uniform on the recipe's ranges (DINO's brightness and contrast 1 +- 0.4, saturation 1 +- 0.2, hue +- 0.1
    of a turn; the colour recipe's saturation and hue neutral), each view's order of the four a uniform permutation
    (torchvision's randperm per call, one image per call in DINO), blur sigmas uniform on (0.1, 2)."""
    torch.manual_seed(0)
    params = MultiCropAugmentation(photometric=photometric).draw(2000, 8, 8)[0]  # 4,000 views
    ranges = {"brightness": (0.6, 1.4), "contrast": (0.6, 1.4), "saturation": (0.8, 1.2), "hue": (-0.1, 0.1)}
    if photometric == "colour":
        ranges |= {"saturation": (1.0, 1.0), "hue": (0.0, 0.0)}
    uniform = np.linspace(0, 1, 4000)
    for factor, (name, (low, high)) in zip(params.factors.flatten(0, 1).T, ranges.items()):
        assert low - 1e-6 <= factor.min() and factor.max() <= high + 1e-6, name
        if high > low:
            assert _ks_distance((factor.numpy() - low) / (high - low), uniform) < 0.04, name
    orders = params.order.flatten(0, 1)
    assert torch.equal(orders.sort(dim=1).values, torch.arange(4).expand_as(orders))
    assert len({tuple(order.tolist()) for order in orders}) == 24
    for step in range(4):
        assert torch.bincount(orders[:, step], minlength=4).float().div(len(orders)).sub(0.25).abs().max() < 0.03
    sigma = params.sigma.flatten().numpy()
    assert 0.1 <= sigma.min() and sigma.max() <= 2.0 and _ks_distance((sigma - 0.1) / 1.9, uniform) < 0.04


def _luma(images):
    """ITU-R 601-2 luma, as PIL's convert("L") and torchvision's rgb_to_grayscale weigh the channels."""
    return (0.299 * images[:, 0] + 0.587 * images[:, 1] + 0.114 * images[:, 2]).unsqueeze(1)


def _jitter_by_hand(images, factors, orders):
    """torchvision's ColorJitter, which DINO applies one image at a time, written out for each image in its own order:
    brightness scales the image, contrast blends it with its mean luma, saturation with each pixel's luma, hue turns
    the HSV hue by a fraction of a turn; every step clips to [0, 1]."""
    jittered = []
    for image, factor, order in zip(images, factors, orders):
        out = image[None]
        for step in order.tolist():
            if step == 0:
                out = (out * factor[0]).clamp(0, 1)
            elif step == 1:
                mean = _luma(out).mean()
                out = ((out - mean) * factor[1] + mean).clamp(0, 1)
            elif step == 2:
                out = ((out - _luma(out)) * factor[2] + _luma(out)).clamp(0, 1)
            else:
                hsv = rgb_to_hsv(out)
                hue = torch.remainder(hsv[:, :1] + factor[3] * 2 * math.pi, 2 * math.pi)
                out = hsv_to_rgb(torch.cat([hue, hsv[:, 1:]], dim=1))
        jittered.append(out[0])
    return torch.stack(jittered)


_COINS = ("flip", "jitter", "grayscale", "blur", "solarize")


def _plain(params, side, **on):
    """`params` with every crop the whole `side` x `side` image (at the views' own size: the image itself) and the coins
    of the operations `on` heads, of the others tails."""
    coins = {name: torch.full_like(getattr(params, name), name in on) for name in _COINS}
    boxes = torch.tensor([0, 0, side, side]).expand_as(params.boxes)
    return dataclasses.replace(params, boxes=boxes, **coins)


def _views(group, images, params, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0)):
    """The views (views, B, 3, size, size) of a view group from `params`, normalised with `mean` and `std`."""
    return torch.stack(group(images, params, torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)))


def test_a_whole_image_crop_is_the_image_its_flip_the_mirror_image_and_views_are_normalised_with_the_statistics():
    torch.manual_seed(0)
    images = torch.rand(4, 3, 8, 8)
    group = MultiCropAugmentation(global_size=8).global_views
    mean, std = (0.2, 0.4, 0.6), (0.5, 0.25, 0.1)
    expected = (images - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    plain = _views(group, images, _plain(group.draw(4, 8, 8), 8), mean, std)
    torch.testing.assert_close(plain, expected.expand(2, -1, -1, -1, -1), atol=1e-5, rtol=0)
    flipped = _views(group, images, _plain(group.draw(4, 8, 8), 8, flip=True), mean, std)
    torch.testing.assert_close(flipped, expected.flip(-1).expand(2, -1, -1, -1, -1), atol=1e-5, rtol=0)


@pytest.mark.parametrize("photometric", ["dino", "colour"])
def test_the_colour_jitter_of_a_recipe_is_torchvision_s_in_each_view_s_own_order(photometric):
    """The jitter forced on every view equals torchvision's, written out, with each view's drawn factors and order;
    the colour recipe's neutral saturation and hue leave those steps out."""
    torch.manual_seed(0)
    images = torch.rand(128, 3, 6, 6)
    group = MultiCropAugmentation(photometric=photometric, global_size=6).global_views
    params = _plain(group.draw(128, 6, 6), 6, jitter=True)
    expected = torch.stack([_jitter_by_hand(images, params.factors[view], params.order[view]) for view in range(2)])
    torch.testing.assert_close(_views(group, images, params), expected, atol=2e-5, rtol=0)


def test_the_grayscale_and_solarisation_of_the_dino_recipe_are_pil_s():
    torch.manual_seed(0)
    images = torch.rand(8, 3, 6, 6)
    group = MultiCropAugmentation(photometric="dino", global_size=6).global_views
    grey = _views(group, images, _plain(group.draw(8, 6, 6), 6, grayscale=True))
    torch.testing.assert_close(grey, _luma(images).expand(2, -1, 3, -1, -1), atol=1e-6, rtol=0)
    solarised = _views(group, images, _plain(group.draw(8, 6, 6), 6, solarize=True))
    # PIL's ImageOps.solarize(threshold=128), as DINO calls it: pixels from half up inverted, nothing added.
    torch.testing.assert_close(solarised, torch.where(images >= 0.5, 1.0 - images, images).expand(2, -1, -1, -1, -1))


def test_the_blur_is_a_gaussian_of_the_drawn_sigma_over_13_taps_with_pil_s_edges_and_strength():
    """Against a 2-D convolution written out in numpy (the Gaussian of each view's sigma over +-6 px, edge pixels
    repeated), and against PIL's GaussianBlur(radius=sigma), as DINO blurs: white noise keeps the same share of its
    spread under both, within 5% (PIL approximates the Gaussian by three box blurs)."""
    assert BLUR_KERNEL_SIZE == 13
    torch.manual_seed(0)
    images = torch.rand(4, 3, 20, 20)
    group = MultiCropAugmentation(global_size=20).global_views
    params = _plain(group.draw(4, 20, 20), 20, blur=True)
    blurred = _views(group, images, params)
    taps = np.arange(-6, 7)
    for view in range(2):
        for index, image in enumerate(images.double().numpy()):
            gaussian = np.exp(-0.5 * (taps / params.sigma[view, index].item()) ** 2)
            kernel = np.outer(gaussian, gaussian) / gaussian.sum() ** 2
            windows = np.lib.stride_tricks.sliding_window_view(
                np.pad(image, ((0, 0), (6, 6), (6, 6)), mode="edge"), (13, 13), axis=(1, 2)
            )
            expected = np.einsum("chwij,ij->chw", windows, kernel)
            np.testing.assert_allclose(blurred[view, index].numpy(), expected, atol=1e-5)

    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    group = MultiCropAugmentation(global_size=64).global_views
    params = _plain(group.draw(3, 64, 64), 64, blur=True)
    params.sigma[0] = torch.tensor([0.5, 1.0, 2.0])
    ours = _views(group, torch.from_numpy(noise).permute(2, 0, 1).float().div(255).expand(3, -1, -1, -1), params)[0]
    inner = slice(8, -8)  # away from the border, where the two repeat edge pixels differently
    for sigma, view in zip((0.5, 1.0, 2.0), ours):
        theirs = (
            np.asarray(Image.fromarray(noise).filter(ImageFilter.GaussianBlur(radius=sigma)), dtype=np.float64) / 255
        )
        ratio = view[:, inner, inner].std().item() / theirs[inner, inner].std()
        assert ratio == pytest.approx(1.0, abs=0.05), sigma


def _hue(pixels):
    """The hue angle of RGB pixels (B, 3, ...): unchanged by any x -> a x + b with a > 0, the same on every channel."""
    red, green, blue = pixels.unbind(1)
    return torch.atan2(math.sqrt(3) * (green - blue), 2 * red - green - blue)


def _unnormalised(view):
    mean, std = (
        torch.tensor(IMAGENET_DEFAULT_MEAN).view(1, 3, 1, 1),
        torch.tensor(IMAGENET_DEFAULT_STD).view(1, 3, 1, 1),
    )
    return view * std + mean


def _flat_coloured_images(count):
    """Images of one colour each, every channel order of (0.55, 0.4, 0.25): no jitter of the colour recipe clips them."""
    levels = torch.tensor([0.55, 0.4, 0.25])
    colours = torch.stack([levels[torch.randperm(3)] for _ in range(count)])
    return colours.view(count, 3, 1, 1).expand(-1, -1, 40, 40).contiguous()


def test_the_colour_recipe_keeps_the_hue_and_channel_order_of_every_view():
    """Flat coloured images through the whole augmentation: crops and blur keep them flat, so each view's pixels show
    what the colour operations did. The colour recipe changes lighting only (hue and channel order kept, no view grey);
    DINO's recipe greys about a fifth of the views and turns the hue of most others."""
    torch.manual_seed(0)
    images = _flat_coloured_images(48)
    hue, order = _hue(images[:, :, 0, 0]), images[:, :, 0, 0].argsort(dim=1)
    for view in MultiCropAugmentation(
        photometric="colour", num_local_crops=2, global_size=GLOBAL_SIZE, local_size=LOCAL_SIZE
    )(images):
        pixels = _unnormalised(view).flatten(2)  # (B, 3, pixels)
        torch.testing.assert_close(_hue(pixels), hue[:, None].expand(-1, pixels.shape[-1]), atol=1e-3, rtol=0)
        assert torch.equal(pixels.mean(dim=2).argsort(dim=1), order)

    grey = turned = 0
    views = MultiCropAugmentation(
        photometric="dino", num_local_crops=2, global_size=GLOBAL_SIZE, local_size=LOCAL_SIZE
    )(images)
    for view in views:
        colour = _unnormalised(view).mean(dim=(2, 3))
        is_grey = (colour.max(dim=1).values - colour.min(dim=1).values) < 1e-4
        grey += int(is_grey.sum())
        turn = torch.remainder(_hue(colour) - hue + math.pi, 2 * math.pi) - math.pi  # the shorter way round
        turned += int((turn.abs() > 0.01)[~is_grey].sum())
    assert 0.1 * 4 * 48 <= grey <= 0.3 * 4 * 48 and turned >= 0.5 * 4 * 48, (grey, turned)


def test_param_groups_skip_decay_on_norms_biases_embeddings_and_scalars(tiny_model):
    decay, no_decay = param_groups_without_decay(tiny_model, weight_decay=0.04)
    assert decay["weight_decay"] == 0.04 and no_decay["weight_decay"] == 0.0
    decay_ids, no_decay_ids = {id(p) for p in decay["params"]}, {id(p) for p in no_decay["params"]}
    assert not decay_ids & no_decay_ids
    assert decay_ids | no_decay_ids == {id(p) for p in tiny_model.parameters() if p.requires_grad}
    parameters = dict(tiny_model.named_parameters())
    for name in [
        "logit_scale",
        "aligner.bias",
        "text_model.embeddings.token_embedding.weight",
        "text_model.embeddings.position_embedding.weight",
        "vision_model.embeddings.class_embedding",
        "text_model.final_layer_norm.weight",
        "dino_model.embeddings.cls_token",
        "dino_model.embeddings.position_embeddings",
    ]:
        assert id(parameters[name]) in no_decay_ids, name
    for name in [
        "aligner.weight",
        "visual_projection.weight",
        "vision_model.embeddings.patch_embedding.weight",
        "dino_model.embeddings.patch_embeddings.projection.weight",
        "dino_model.layers.0.attention.q_proj.weight",
    ]:
        assert id(parameters[name]) in decay_ids, name


def test_param_groups_leave_out_frozen_parameters():
    head = DINOHead(12, 50, hidden_dim=20, bottleneck_dim=8, norm_last_layer=True)
    grouped = [id(p) for group in param_groups_without_decay(head, 0.1) for p in group["params"]]
    assert id(head.last_layer.parametrizations.weight.original0) not in grouped
    assert id(head.last_layer.parametrizations.weight.original1) in grouped


def _feed(monitor, entropies, kls):
    return [monitor.update(entropy, kl) for entropy, kl in zip(entropies, kls)]


def test_collapse_monitor_reports_one_hot_collapse_after_a_full_window():
    out_dim = 64
    one_hot = nn.functional.one_hot(torch.zeros(8, dtype=torch.long), out_dim).float()
    entropy = teacher_entropy(one_hot).item()
    assert entropy == 0.0
    messages = _feed(CollapseMonitor(out_dim, window=5), [entropy] * 5, [0.5] * 5)
    assert messages[:4] == [None] * 4 and "one-hot" in messages[4]


def test_collapse_monitor_reports_uniform_collapse_from_the_dino_loss():
    out_dim, batch = 64, 4
    loss_fn = DINOLoss(out_dim, num_crops=4, num_steps=1)
    monitor = CollapseMonitor(out_dim, window=3)
    messages = []
    for _ in range(3):
        output = loss_fn(torch.zeros(4 * batch, out_dim), torch.zeros(2 * batch, out_dim), step=0)
        messages.append(monitor.update(output.teacher_entropy, output.teacher_student_kl))
    assert output.teacher_entropy.item() == pytest.approx(math.log(out_dim), rel=1e-5)
    assert messages[:2] == [None, None] and "uniform" in messages[2]


def test_collapse_monitor_stays_quiet_on_healthy_or_transient_outputs():
    out_dim = 64
    torch.manual_seed(0)
    loss_fn = DINOLoss(out_dim, num_crops=4, num_steps=1)
    monitor = CollapseMonitor(out_dim, window=3)
    for _ in range(6):
        output = loss_fn(torch.randn(16, out_dim), torch.randn(8, out_dim), step=0)
        assert monitor.update(output.teacher_entropy, output.teacher_student_kl) is None
    # A one-step dip to a one-hot teacher inside the window is not a collapse.
    assert _feed(CollapseMonitor(out_dim, window=3), [2.0, 0.0, 0.0, 2.0, 0.0], [0.5] * 5) == [None] * 5


def test_cosine_schedule_of_a_short_run_reaches_its_peak_and_decays_over_the_run():
    """A 15-step run with 5 warm-up steps: step i < 5 takes peak * (i + 1) / 5, step 5 + j takes the cosine
    peak * (1 + cos(pi * j / 10)) / 2 (written out here, not DINO's code)."""
    peak = 1e-3
    lr = cosine_schedule(peak, 0.0, total_steps=15, warmup_steps=5)
    expected = [peak * (i + 1) / 5 for i in range(5)] + [peak * (1 + math.cos(math.pi * j / 10)) / 2 for j in range(10)]
    np.testing.assert_allclose(lr, expected, rtol=1e-12)
    assert lr[0] == pytest.approx(peak / 5) and lr.max() == pytest.approx(peak)


@pytest.mark.parametrize(
    "total_steps, warmup_steps, window",
    [(15, 0, 100), (999, 0, 100), (2000, 0, 200), (3000, 500, 800), (100_000, 10_000, 20_000)],
)
def test_default_collapse_window_is_the_warmup_plus_a_tenth_of_the_run_and_at_least_100(
    total_steps, warmup_steps, window
):
    assert default_collapse_window(total_steps, warmup_steps) == window


CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


def _normalised(images):
    return (images - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(1, 3, 1, 1)


def test_crop_and_flip_of_normalised_pixels_equals_normalising_the_crops_of_unit_pixels():
    """Stage 1 augments the processor's normalised pixels: the same as cropping, flipping and clamping [0, 1] pixels
    (the same draws under the same seed), then normalising."""
    images = torch.rand(6, 3, 40, 40, generator=torch.Generator().manual_seed(1))
    augment = CropAndFlip(32, (0.3, 1.0), 0.5, CLIP_MEAN, CLIP_STD)
    torch.manual_seed(0)
    augmented = augment(_normalised(images))
    torch.manual_seed(0)  # the same draws: the boxes, then the coins
    boxes, flip = random_resized_boxes(6, 40, 40, (0.3, 1.0)), torch.rand(6) < 0.5
    expected = _normalised(resized_crops(images, boxes[None], flip[None], 32, "bicubic")[0].clamp(0.0, 1.0))
    assert augmented.shape == (6, 3, 32, 32)
    torch.testing.assert_close(augmented, expected, rtol=1e-5, atol=1e-5)
    plain = _normalised(torch.nn.functional.interpolate(images, size=32, mode="bicubic", align_corners=False))
    assert all(not torch.allclose(augmented[i], plain[i], atol=1e-2) for i in range(6))  # every image is changed


def test_crop_and_flip_draws_per_image_for_the_global_batch_and_follows_the_seed():
    images = _normalised(torch.rand(6, 3, 40, 40, generator=torch.Generator().manual_seed(2)))
    augment = CropAndFlip(32, (0.3, 1.0), 0.5, CLIP_MEAN, CLIP_STD)
    torch.manual_seed(0)
    whole = augment(images)
    halves = []
    for rows in (torch.arange(0, 3), torch.arange(3, 6)):  # two processes, each from the same RNG state
        torch.manual_seed(0)
        halves.append(augment(images[rows], rows=rows, global_batch_size=6))
    torch.testing.assert_close(torch.cat(halves), whole)
    torch.manual_seed(1)
    assert not torch.allclose(augment(images), whole)
    same_image = augment(images[:1].expand(6, -1, -1, -1).contiguous())
    assert len({tuple(view.flatten()[:20].tolist()) for view in same_image}) == 6  # a crop per image
    with pytest.raises(ValueError, match="rows must give the place of each"):
        augment(images[:3], rows=torch.arange(3), global_batch_size=2)


def test_param_groups_read_the_shape_of_a_zero3_partitioned_weight():
    """Under DeepSpeed ZeRO-3 a weight is an empty partition with its shape in `ds_shape`: it still decays."""
    layer = torch.nn.Linear(4, 3)
    full_shapes = {"weight": layer.weight.shape, "bias": layer.bias.shape}
    for name, parameter in layer.named_parameters():
        parameter.data = torch.empty(0)  # what ZeRO-3 leaves on a process between gathers
        parameter.ds_shape = full_shapes[name]
    decay, no_decay = param_groups_without_decay(layer, weight_decay=0.1)
    assert decay["params"] == [layer.weight] and no_decay["params"] == [layer.bias]
