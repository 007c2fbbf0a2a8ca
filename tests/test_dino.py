"""DINO building blocks: head, multi-crop wrapper and augmentation, schedules, EMA, parameter groups, collapse watch."""

import copy
import math

import kornia.augmentation as K
from kornia.color import hsv_to_rgb, rgb_to_hsv
import numpy as np
import pytest
import torch
from torch import nn
from transformers import ResNetConfig, ResNetModel, ViTConfig, ViTModel
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from training.dino import (
    MULTICROP_PRESETS,
    PHOTOMETRIC_RECIPES,
    CollapseMonitor,
    CropAndFlip,
    DINOHead,
    MultiCropAugmentation,
    MultiCropWrapper,
    cancel_gradients_last_layer,
    cosine_schedule,
    default_collapse_window,
    param_groups_without_decay,
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
    assert not torch.equal(head.last_layer.parametrizations.weight.original1, last_before["parametrizations.weight.original1"])


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
            ViTConfig(image_size=GLOBAL_SIZE, patch_size=8, hidden_size=24, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32),
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
    return MultiCropAugmentation(preset, num_local_crops=num_local_crops, global_size=GLOBAL_SIZE, local_size=LOCAL_SIZE)


def test_multicrop_augmentation_shapes_and_normalised_ranges():
    torch.manual_seed(0)
    views = _augmentation()(torch.rand(4, 3, 48, 40))
    assert [tuple(view.shape) for view in views] == [(4, 3, GLOBAL_SIZE, GLOBAL_SIZE)] * 2 + [(4, 3, LOCAL_SIZE, LOCAL_SIZE)] * 3
    mean, std = torch.tensor(IMAGENET_DEFAULT_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_DEFAULT_STD).view(1, 3, 1, 1)
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
    boxes = augmentation.local_crop._params["src"]
    assert len({tuple(box.flatten().tolist()) for box in boxes}) == len(boxes)


def test_processes_applying_their_rows_of_the_global_draw_see_the_single_process_crops():
    images = torch.rand(6, 3, 48, 48)
    augmentation = _augmentation(num_local_crops=2)
    torch.manual_seed(3)
    whole = augmentation(images)
    shards = []
    for first in (0, 2, 4):  # 3 processes of 2 images, each from the same RNG state
        torch.manual_seed(3)
        shards.append(augmentation(images[first:first + 2], rows=torch.arange(first, first + 2), global_batch_size=6))
    for view, expected in enumerate(whole):
        assert torch.equal(torch.cat([shard[view] for shard in shards]), expected)


def test_multicrop_augmentation_rejects_rows_outside_the_global_batch():
    images = torch.rand(2, 3, 48, 48)
    for rows, total in [(torch.arange(2), None), (torch.arange(3), 4), (torch.tensor([3, 4]), 4), (torch.tensor([-1, 0]), 4)]:
        with pytest.raises(ValueError, match="rows must give the place of each"):
            _augmentation()(images, rows=rows, global_batch_size=total)


def test_upsampled_crops_keep_flat_regions_flat_up_to_the_border():
    augmentation = _augmentation()
    crops = augmentation.global_crop(torch.full((8, 3, 24, 24), 0.5))  # 24 px images upsampled to 32 px crops
    torch.testing.assert_close(crops, torch.full_like(crops, 0.5))


@pytest.mark.parametrize("preset", sorted(MULTICROP_PRESETS))
def test_multicrop_presets_set_the_crop_areas(preset):
    torch.manual_seed(0)
    augmentation = _augmentation(preset, num_local_crops=1)
    side = 64
    augmentation(torch.rand(32, 3, side, side))
    scales = MULTICROP_PRESETS[preset]
    for crop, (low, high) in [(augmentation.global_crop, scales.global_crops_scale), (augmentation.local_crop, scales.local_crops_scale)]:
        boxes = crop._params["src"]  # corners (x, y): top-left, top-right, bottom-right, bottom-left (inclusive)
        widths = boxes[:, 1, 0] - boxes[:, 0, 0] + 1
        heights = boxes[:, 2, 1] - boxes[:, 1, 1] + 1
        areas = widths * heights / side**2
        # Pixel rounding moves an area by at most one row and one column.
        assert areas.min() >= low - 2 / side and areas.max() <= high + 2 / side


def test_multicrop_augmentation_rejects_bad_input_and_presets():
    with pytest.raises(ValueError, match="MultiCropAugmentation"):
        _augmentation()(torch.randint(0, 255, (2, 3, 48, 48), dtype=torch.uint8))
    with pytest.raises(ValueError, match="unknown preset"):
        MultiCropAugmentation("swin")

    with pytest.raises(ValueError, match="unknown photometric recipe 'grey'"):
        MultiCropAugmentation(photometric="grey")


# DINO's DataAugmentationDINO (main_dino.py), per view: flip p=0.5, ColorJitter(0.4, 0.4, 0.2, 0.1) with p=0.8, grayscale
# p=0.2; Gaussian blur p=1.0 (global 1), 0.1 (global 2), 0.5 (local); solarisation p=0.2 on global 2 only. The colour
# recipe keeps the lighting changes (flip, brightness and contrast jitter, blur) and drops grayscale and solarisation.
def _probabilities(photometric):
    dino = photometric == "dino"
    colour = {"RandomHorizontalFlip_0": 0.5, "ColorJitter_1": 0.8, "RandomGrayscale_2": 0.2 if dino else 0.0}
    return {"global_color": colour, "local_color": colour, "global_1_blur": 1.0,
            "global_2_blur": {"RandomGaussianBlur_0": 0.1, "RandomSolarize_1": 0.2 if dino else 0.0}, "local_blur": 0.5}


@pytest.mark.parametrize("photometric", ["dino", "colour"])
def test_photometric_recipes_draw_each_operation_with_its_probability(photometric):
    torch.manual_seed(0)
    augmentation = MultiCropAugmentation(photometric=photometric, num_local_crops=1, global_size=GLOBAL_SIZE,
                                         local_size=LOCAL_SIZE)
    draws = torch.Size((4000, 3, 8, 8))  # a probability's estimate is within 0.03 of it (4 standard deviations)
    for name, expected in _probabilities(photometric).items():
        params = getattr(augmentation, name).forward_parameters(draws)
        observed = ({item.name: item.data["batch_prob"].float().mean().item() for item in params}
                    if isinstance(params, list) else params["batch_prob"].float().mean().item())
        assert observed == pytest.approx(expected, abs=0.03), name
    solarize = augmentation.global_2_blur.forward_parameters(draws)[1].data
    # PIL's ImageOps.solarize(threshold=128), as DINO calls it: pixels of 128 and above inverted, nothing added.
    assert torch.all(solarize["thresholds"] == 0.5) and torch.all(solarize["additions"] == 0.0)


def _luma(images):
    """ITU-R 601-2 luma, as PIL's convert("L") and torchvision's rgb_to_grayscale weigh the channels."""
    return (0.299 * images[:, 0] + 0.587 * images[:, 1] + 0.114 * images[:, 2]).unsqueeze(1)


def _jitter_by_hand(images, params):
    """torchvision's ColorJitter, which DINO applies, written out in the drawn order: brightness scales the image,
    contrast blends it with its mean luma, saturation with each pixel's luma, hue turns the HSV hue by a fraction of a
    turn; every step clips to [0, 1]."""
    factors = [params[f"{name}_factor"].view(-1, 1, 1, 1) for name in ("brightness", "contrast", "saturation", "hue")]
    out = images
    for step in params["order"].tolist():
        factor = factors[step]
        if step == 0:
            out = (out * factor).clamp(0, 1)
        elif step == 1:
            mean = _luma(out).mean(dim=(-2, -1), keepdim=True)
            out = ((out - mean) * factor + mean).clamp(0, 1)
        elif step == 2:
            out = ((out - _luma(out)) * factor + _luma(out)).clamp(0, 1)
        elif (factor != 0).any():
            hsv = rgb_to_hsv(out)
            hue = torch.remainder(hsv[:, :1] + factor * 2 * math.pi, 2 * math.pi)
            out = hsv_to_rgb(torch.cat([hue, hsv[:, 1:]], dim=1))
    return out


def _forced(params, on):
    """The parameters of a flip-jitter-grayscale sequence with every image's coin of the operations `on` heads and
    of the others tails."""
    for item in params:
        item.data["batch_prob"] = torch.full_like(item.data["batch_prob"], 1.0 if item.name in on else 0.0)
    return params


@pytest.mark.parametrize("photometric", ["dino", "colour"])
def test_the_colour_jitter_of_a_recipe_is_torchvision_s_with_its_ranges(photometric):
    """The jitter forced on every image equals torchvision's, written out, with factors drawn from the recipe's
    ranges: DINO's brightness and contrast 1 +- 0.4, saturation 1 +- 0.2, hue +- 0.1 of a turn; the colour recipe's
    saturation and hue stay at their neutral values, so it changes lighting only."""
    torch.manual_seed(0)
    images = torch.rand(256, 3, 6, 6)
    sequence = MultiCropAugmentation(photometric=photometric).global_color
    params = _forced(sequence.forward_parameters(images.shape), on={"ColorJitter_1"})
    jitter = params[1].data
    torch.testing.assert_close(sequence(images, params=params), _jitter_by_hand(images, jitter), atol=2e-5, rtol=0)
    ranges = {"brightness": (0.6, 1.4), "contrast": (0.6, 1.4), "saturation": (0.8, 1.2), "hue": (-0.1, 0.1)}
    if photometric == "colour":
        ranges |= {"saturation": (1.0, 1.0), "hue": (0.0, 0.0)}
    for name, (low, high) in ranges.items():
        factor = jitter[f"{name}_factor"]
        # Within the range, and spread over it (256 uniform draws come within 2% of each end).
        assert low <= factor.min() <= low + 0.02 * (high - low) + 1e-9, name
        assert high - 0.02 * (high - low) - 1e-9 <= factor.max() <= high, name


def test_the_grayscale_and_solarisation_of_the_dino_recipe_are_pil_s():
    torch.manual_seed(0)
    images = torch.rand(8, 3, 6, 6)
    augmentation = MultiCropAugmentation(photometric="dino")
    params = _forced(augmentation.global_color.forward_parameters(images.shape), on={"RandomGrayscale_2"})
    grey = augmentation.global_color(images, params=params)
    torch.testing.assert_close(grey, _luma(images).expand(-1, 3, -1, -1), atol=1e-6, rtol=0)

    solarize = augmentation.global_2_blur[1]
    params = solarize.forward_parameters(images.shape)
    params["batch_prob"] = torch.ones_like(params["batch_prob"])
    torch.testing.assert_close(solarize(images, params=params), torch.where(images >= 0.5, 1.0 - images, images))


def _hue(pixels):
    """The hue angle of RGB pixels (B, 3, ...): unchanged by any x -> a x + b with a > 0, the same on every channel."""
    red, green, blue = pixels.unbind(1)
    return torch.atan2(math.sqrt(3) * (green - blue), 2 * red - green - blue)


def _unnormalised(view):
    mean, std = torch.tensor(IMAGENET_DEFAULT_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_DEFAULT_STD).view(1, 3, 1, 1)
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
    for view in MultiCropAugmentation(photometric="colour", num_local_crops=2, global_size=GLOBAL_SIZE,
                                      local_size=LOCAL_SIZE)(images):
        pixels = _unnormalised(view).flatten(2)  # (B, 3, pixels)
        torch.testing.assert_close(_hue(pixels), hue[:, None].expand(-1, pixels.shape[-1]), atol=1e-3, rtol=0)
        assert torch.equal(pixels.mean(dim=2).argsort(dim=1), order)

    grey = turned = 0
    views = MultiCropAugmentation(photometric="dino", num_local_crops=2, global_size=GLOBAL_SIZE,
                                  local_size=LOCAL_SIZE)(images)
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


@pytest.mark.parametrize("total_steps, warmup_steps, window", [
    (15, 0, 100), (999, 0, 100), (2000, 0, 200), (3000, 500, 800), (100_000, 10_000, 20_000)])
def test_default_collapse_window_is_the_warmup_plus_a_tenth_of_the_run_and_at_least_100(total_steps, warmup_steps, window):
    assert default_collapse_window(total_steps, warmup_steps) == window


CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


def _normalised(images):
    return (images - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(1, 3, 1, 1)


def test_crop_and_flip_of_normalised_pixels_equals_normalising_the_crops_of_unit_pixels():
    """Stage 1 augments the processor's normalised pixels: the same as cropping, clamping and flipping [0, 1] pixels
    with kornia (the same draws under the same seed), then normalising."""
    images = torch.rand(6, 3, 40, 40, generator=torch.Generator().manual_seed(1))
    augment = CropAndFlip(32, (0.3, 1.0), 0.5, CLIP_MEAN, CLIP_STD)
    torch.manual_seed(0)
    augmented = augment(_normalised(images))
    torch.manual_seed(0)
    crops = K.RandomResizedCrop((32, 32), scale=(0.3, 1.0), resample="bicubic", align_corners=False)(images)
    expected = _normalised(K.RandomHorizontalFlip(p=0.5)(crops.clamp(0.0, 1.0)))
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
