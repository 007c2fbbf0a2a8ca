"""ContrastiveLoss, SigLIPLoss, the contrastive-loss registry, DINOLoss and KoLeoLoss: hand computations, the
temperature clamp, and 2-process (gloo) equivalence."""

import math
import re
import time
from datetime import timedelta

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from modeling_agriclip.configuration_agriclip import CONTRASTIVE_LOSSES as CONFIG_CONTRASTIVE_LOSSES
from training.loss_table import CONTRASTIVE_LOSSES
from training.losses import (
    LOSSES,
    ContrastiveLoss,
    DINOLoss,
    ImageTextLoss,
    KoLeoLoss,
    SigLIPLoss,
    create_loss,
    share_of_global_batch,
)

from conftest import finish_distributed_worker


WORLD_SIZE = 2
GLOBAL_BATCH = 8
WORKER_TIMEOUT_S = 120  # a collective that waits longer has lost its peer
OUT_DIM = 16
NUM_CROPS = 4


def _reference_clip_loss(image_embeds, text_embeds, logit_scale):
    """CLIP's loss written out: mean of -log softmax on the diagonal, over rows and over columns."""
    image_embeds = image_embeds / image_embeds.norm(dim=-1, keepdim=True)
    text_embeds = text_embeds / text_embeds.norm(dim=-1, keepdim=True)
    logits = torch.as_tensor(logit_scale).exp() * image_embeds @ text_embeds.t()
    diagonal = logits.diagonal()
    image_to_text = (torch.logsumexp(logits, dim=1) - diagonal).mean()
    text_to_image = (torch.logsumexp(logits, dim=0) - diagonal).mean()
    return (image_to_text + text_to_image) / 2


def _reference_dino_loss(student_output, teacher_output, center, student_temp, teacher_temp, num_crops):
    """facebookresearch/dino main_dino.DINOLoss.forward, loop over pairs as published."""
    student_out = (student_output / student_temp).chunk(num_crops)
    teacher_out = torch.softmax((teacher_output - center) / teacher_temp, dim=-1).chunk(2)
    total, terms = 0.0, 0
    for iq, q in enumerate(teacher_out):
        for v in range(num_crops):
            if v == iq:
                continue
            total += torch.sum(-q * torch.log_softmax(student_out[v], dim=-1), dim=-1).mean()
            terms += 1
    return total / terms


def test_contrastive_loss_matches_hand_computation_and_is_symmetric():
    torch.manual_seed(0)
    image_embeds, text_embeds = torch.randn(6, 5), torch.randn(6, 5)
    logit_scale = torch.tensor(math.log(1 / 0.07))
    loss = ContrastiveLoss()(image_embeds, text_embeds, logit_scale)
    torch.testing.assert_close(loss, _reference_clip_loss(image_embeds, text_embeds, logit_scale))
    torch.testing.assert_close(ContrastiveLoss()(text_embeds, image_embeds, logit_scale), loss)
    # Scaling an embedding does not change the loss: it normalises its inputs.
    torch.testing.assert_close(ContrastiveLoss()(3.0 * image_embeds, text_embeds, logit_scale), loss)


def test_contrastive_loss_on_normalised_inputs_skips_normalising_and_matches_clip():
    """`normalized=True` (what stage 1 passes for the unit-norm embeddings of `AgriCLIPModel.forward`) gives CLIP's
    symmetric cross-entropy with the clamped temperature, and the loss and gradients of the path that normalised
    inside the loss, to float rounding."""
    torch.manual_seed(0)
    raw_images, raw_texts = torch.randn(6, 5), torch.randn(6, 5)
    for scale in (math.log(1 / 0.07), math.log(500.0)):  # below and above the clamp at 100
        images, texts = raw_images.clone().requires_grad_(), raw_texts.clone().requires_grad_()
        logit_scale = torch.tensor(scale, requires_grad=True)
        once = ContrastiveLoss()(
            nn.functional.normalize(images, dim=-1),
            nn.functional.normalize(texts, dim=-1),
            logit_scale,
            normalized=True,
        )
        once.backward()
        reference = _reference_clip_loss(raw_images, raw_texts, torch.tensor(min(scale, math.log(100.0))))
        torch.testing.assert_close(once, reference)

        twice_images, twice_texts = raw_images.clone().requires_grad_(), raw_texts.clone().requires_grad_()
        twice_scale = torch.tensor(scale, requires_grad=True)
        # The replaced path: normalised by the model, then again by the loss.
        twice = ContrastiveLoss()(
            nn.functional.normalize(twice_images, dim=-1), nn.functional.normalize(twice_texts, dim=-1), twice_scale
        )
        twice.backward()
        torch.testing.assert_close(once, twice)
        torch.testing.assert_close(images.grad, twice_images.grad)
        torch.testing.assert_close(texts.grad, twice_texts.grad)
        torch.testing.assert_close(logit_scale.grad, twice_scale.grad)
        # And the loss that normalises raw inputs itself.
        torch.testing.assert_close(ContrastiveLoss()(raw_images, raw_texts, torch.tensor(scale)), once.detach())


def test_contrastive_loss_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="ContrastiveLoss"):
        ContrastiveLoss()(torch.randn(4, 5), torch.randn(3, 5), torch.tensor(0.0))


def test_temperature_is_clamped_at_100_and_gradient_flows_below():
    torch.manual_seed(0)
    image_embeds, text_embeds = torch.randn(6, 5), torch.randn(6, 5)
    above = nn.Parameter(torch.tensor(math.log(500.0)))
    loss_above = ContrastiveLoss()(image_embeds, text_embeds, above)
    loss_above.backward()
    torch.testing.assert_close(
        loss_above, _reference_clip_loss(image_embeds, text_embeds, torch.tensor(math.log(100.0)))
    )
    assert above.grad.item() == 0.0

    below = nn.Parameter(torch.tensor(math.log(10.0)))
    ContrastiveLoss()(image_embeds, text_embeds, below).backward()
    unclamped = torch.tensor(math.log(10.0), requires_grad=True)
    _reference_clip_loss(image_embeds, text_embeds, unclamped).backward()
    assert below.grad.item() != 0.0
    torch.testing.assert_close(below.grad, unclamped.grad)


def test_dino_loss_matches_published_loop_with_centre_and_warmup():
    torch.manual_seed(0)
    batch = 3
    loss_fn = DINOLoss(
        OUT_DIM, NUM_CROPS, num_steps=5, warmup_teacher_temp=0.04, teacher_temp=0.07, warmup_teacher_temp_steps=3
    )
    # Warm-up step i of 3 takes 0.04 + 0.03 * (i + 1) / 3 (training.dino.cosine_schedule), then 0.07.
    np.testing.assert_allclose(loss_fn.teacher_temp_schedule, [0.05, 0.06, 0.07, 0.07, 0.07])
    center = torch.randn(1, OUT_DIM)
    loss_fn.center.copy_(center)
    student_output = torch.randn(NUM_CROPS * batch, OUT_DIM, requires_grad=True)
    teacher_output = torch.randn(2 * batch, OUT_DIM)

    output = loss_fn(student_output, teacher_output, step=1)

    expected = _reference_dino_loss(student_output, teacher_output, center, 0.1, 0.06, NUM_CROPS)
    torch.testing.assert_close(output.loss, expected)
    output.loss.backward()
    assert student_output.grad.abs().sum() > 0

    teacher_probs = torch.softmax((teacher_output - center) / 0.06, dim=-1)
    entropy = -(teacher_probs * teacher_probs.log()).sum(-1).mean()
    torch.testing.assert_close(output.teacher_entropy, entropy)
    student_log_probs = torch.log_softmax(student_output.detach() / 0.1, dim=-1).chunk(NUM_CROPS)
    kls = [
        (q * (q.log() - student_log_probs[v])).sum(-1).mean()
        for iq, q in enumerate(teacher_probs.chunk(2))
        for v in range(NUM_CROPS)
        if v != iq
    ]
    torch.testing.assert_close(output.teacher_student_kl, torch.stack(kls).mean())


def test_dino_centre_moves_after_the_loss_with_momentum():
    torch.manual_seed(0)
    loss_fn = DINOLoss(OUT_DIM, NUM_CROPS, num_steps=1, center_momentum=0.9)
    initial = torch.randn(1, OUT_DIM)
    loss_fn.center.copy_(initial)
    teacher_output = torch.randn(2 * 3, OUT_DIM)
    loss_fn(torch.randn(NUM_CROPS * 3, OUT_DIM), teacher_output, step=0)
    torch.testing.assert_close(loss_fn.center, 0.9 * initial + 0.1 * teacher_output.mean(dim=0, keepdim=True))
    assert not loss_fn.center.requires_grad
    assert "center" in loss_fn.state_dict()


def test_dino_loss_rejects_bad_shapes_and_steps():
    loss_fn = DINOLoss(OUT_DIM, NUM_CROPS, num_steps=2)
    with pytest.raises(ValueError, match="teacher_output"):
        loss_fn(torch.randn(NUM_CROPS * 3, OUT_DIM), torch.randn(3, OUT_DIM), step=0)
    with pytest.raises(ValueError, match="step 2"):
        loss_fn(torch.randn(NUM_CROPS * 3, OUT_DIM), torch.randn(6, OUT_DIM), step=2)


def _reference_siglip_loss(image_embeds, text_embeds, logit_scale, logit_bias):
    """Zhai et al. 2023, eq. 1 written out in float64 with a double loop: -1/|B| sum_i sum_j log sigmoid(z_ij (t x_i.y_j
    + b)), z_ij = 1 for i = j and -1 otherwise, t = exp(t'), log sigmoid(u) = -log(1 + exp(-u))."""

    def unit(row):
        norm = math.sqrt(sum(v * v for v in row))
        return [v / norm for v in row]

    x, y = [unit(row) for row in image_embeds.double().tolist()], [unit(row) for row in text_embeds.double().tolist()]
    t, b, n = math.exp(float(logit_scale)), float(logit_bias), len(x)
    total = 0.0
    for i in range(n):
        for j in range(n):
            z = 1.0 if i == j else -1.0
            total += -math.log1p(math.exp(-z * (t * sum(p * q for p, q in zip(x[i], y[j])) + b)))
    return -total / n


@pytest.mark.parametrize("logit_scale, logit_bias", [(math.log(10.0), -10.0), (1.3, 0.7), (0.0, 2.0)])
def test_siglip_loss_matches_the_published_formula_written_out(logit_scale, logit_bias):
    torch.manual_seed(0)
    image_embeds, text_embeds = torch.randn(5, 4, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64)
    loss = SigLIPLoss()(
        image_embeds,
        text_embeds,
        torch.tensor(logit_scale, dtype=torch.float64),
        torch.tensor(logit_bias, dtype=torch.float64),
    )
    assert loss.dtype == torch.float64
    expected = _reference_siglip_loss(image_embeds, text_embeds, logit_scale, logit_bias)
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    # Symmetric, and it normalises its inputs; float32 agrees to its precision.
    assert SigLIPLoss()(
        text_embeds, image_embeds, torch.tensor(logit_scale), torch.tensor(logit_bias)
    ).item() == pytest.approx(expected, rel=1e-5)
    assert SigLIPLoss()(
        3.0 * image_embeds.float(), text_embeds.float(), torch.tensor(logit_scale), torch.tensor(logit_bias)
    ).item() == pytest.approx(expected, rel=1e-5)


def test_siglip_loss_gradients_for_temperature_and_bias():
    torch.manual_seed(0)
    image_embeds = nn.functional.normalize(torch.randn(6, 4, dtype=torch.float64), dim=-1)
    text_embeds = nn.functional.normalize(torch.randn(6, 4, dtype=torch.float64), dim=-1)
    logit_scale = torch.tensor(math.log(10.0), dtype=torch.float64, requires_grad=True)
    logit_bias = torch.tensor(-10.0, dtype=torch.float64, requires_grad=True)
    loss_fn = SigLIPLoss()
    assert torch.autograd.gradcheck(
        lambda s, b, x, y: loss_fn(x, y, s, b, normalized=True),
        (logit_scale, logit_bias, image_embeds.requires_grad_(), text_embeds.requires_grad_()),
    )
    # Written out: with l_ij = t x_i.y_j + b, dL/db = -1/n sum z_ij sigmoid(-z_ij l_ij) and dL/dt' = t * the same
    # sum weighted by x_i.y_j.
    loss_fn(image_embeds, text_embeds, logit_scale, logit_bias, normalized=True).backward()
    cos = (image_embeds @ text_embeds.t()).detach()
    z = 2 * torch.eye(6, dtype=torch.float64) - 1
    weights = z * torch.sigmoid(-z * (10.0 * cos - 10.0))
    torch.testing.assert_close(logit_bias.grad, -weights.sum() / 6)
    torch.testing.assert_close(logit_scale.grad, -(10.0 * cos * weights).sum() / 6)
    # At the published start (t = 10, b = -10) the negatives are already near 0: the bias gradient is that of the
    # positives pulling b up.
    assert logit_bias.grad < 0


def test_siglip_loss_needs_the_bias_and_matching_shapes():
    with pytest.raises(ValueError, match="SigLIPLoss: logit_bias"):
        SigLIPLoss()(torch.randn(4, 5), torch.randn(4, 5), torch.tensor(0.0))
    with pytest.raises(ValueError, match="SigLIPLoss: image_embeds and text_embeds"):
        SigLIPLoss()(torch.randn(4, 5), torch.randn(3, 5), torch.tensor(0.0), torch.tensor(0.0))


def test_the_loss_registry_builds_each_loss_by_name_and_names_the_choices():
    assert list(LOSSES) == list(CONTRASTIVE_LOSSES) == ["infonce", "siglip"]
    assert LOSSES["infonce"] is ContrastiveLoss and LOSSES["siglip"] is SigLIPLoss
    for name, loss_class in LOSSES.items():
        assert issubclass(loss_class, ImageTextLoss) and loss_class.__doc__
        assert loss_class.__name__ == CONTRASTIVE_LOSSES[name][0]
        # What a model trained with it records is an objective the config (Hub code) accepts.
        assert loss_class.objective in CONFIG_CONTRASTIVE_LOSSES
        assert isinstance(create_loss(name), loss_class)
    # Every objective the config accepts has the registry entry of its name, which records it.
    assert all(LOSSES[objective].objective == objective for objective in CONFIG_CONTRASTIVE_LOSSES)
    assert create_loss("siglip", max_logit_scale=2.0).max_logit_scale == 2.0
    with pytest.raises(ValueError, match=r"unknown contrastive loss 'clip'; choose one of: infonce, siglip"):
        create_loss("clip")


def _reference_koleo(features, eps=1e-8):
    """The KoLeo loss written out: each normalised row's distance to its nearest other row, by brute force over the
    rows in plain Python, then -mean log(d + eps)."""
    rows = [row / row.norm() for row in features.double()]
    distances = [min(float((rows[i] - rows[j]).norm()) for j in range(len(rows)) if j != i) for i in range(len(rows))]
    return -sum(math.log(d + eps) for d in distances) / len(distances)


def test_koleo_loss_matches_the_nearest_neighbour_distances_written_out():
    torch.manual_seed(0)
    features = torch.randn(7, 5, requires_grad=True)
    loss = KoLeoLoss()(features)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(_reference_koleo(features.detach()), rel=1e-5)
    loss.backward()
    assert torch.isfinite(features.grad).all() and features.grad.abs().sum() > 0
    # float64 stays float64, and agrees with the brute force to its precision (cdist as a second reference).
    doubled = torch.randn(9, 4, dtype=torch.float64)
    normalised = doubled / doubled.norm(dim=1, keepdim=True)
    nearest = torch.cdist(normalised, normalised).fill_diagonal_(float("inf")).min(dim=1).values
    assert KoLeoLoss()(doubled).item() == pytest.approx(-torch.log(nearest + 1e-8).mean().item(), rel=1e-7)
    assert KoLeoLoss()(doubled).item() == pytest.approx(_reference_koleo(doubled), rel=1e-7)


def test_koleo_loss_normalises_its_rows():
    torch.manual_seed(0)
    features = torch.randn(6, 8)
    scales = torch.tensor([0.01, 0.5, 1.0, 3.0, 40.0, 1000.0]).unsqueeze(1)
    torch.testing.assert_close(KoLeoLoss()(features * scales), KoLeoLoss()(features))


def test_koleo_loss_is_larger_for_a_batch_with_a_duplicate_than_a_spread_one():
    spread = torch.eye(4)  # orthonormal: every nearest neighbour at sqrt(2)
    assert KoLeoLoss()(spread).item() == pytest.approx(-math.log(math.sqrt(2)), rel=1e-6)
    duplicated = spread.clone()
    duplicated[1] = duplicated[0]
    assert KoLeoLoss()(duplicated).item() > KoLeoLoss()(spread).item() + 5
    # All rows the same: distances of eps * sqrt(dim) (pairwise_distance adds eps to the difference) plus eps.
    assert KoLeoLoss()(torch.ones(3, 4)).item() == pytest.approx(-math.log(1e-8 * (math.sqrt(4) + 1)), rel=1e-5)


def test_koleo_loss_never_takes_a_row_as_its_own_neighbour():
    # x and -x lie at dot product -1, DINOv2's value for the diagonal: each row's neighbour is still the other one.
    pair = torch.tensor([[1.0, 2.0, 2.0], [-1.0, -2.0, -2.0]])
    assert KoLeoLoss()(pair).item() == pytest.approx(-math.log(2.0), rel=1e-6)


@pytest.mark.parametrize("shape", [(1, 5), (5,), (2, 3, 4), (0, 5)])
def test_koleo_loss_rejects_a_single_row_and_other_shapes(shape):
    with pytest.raises(ValueError, match=rf"KoLeoLoss: .*at least 2 rows.*got {re.escape(str(shape))}"):
        KoLeoLoss()(torch.randn(shape))


class _ToyDualEncoder(nn.Module):
    """Two linear towers and a learnable log temperature, enough to compare gradients."""

    def __init__(self):
        super().__init__()
        self.image_projection = nn.Linear(6, 4)
        self.text_projection = nn.Linear(5, 4)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def forward(self, images, texts):
        return self.image_projection(images), self.text_projection(texts), self.logit_scale


class _ToySigLIPEncoder(_ToyDualEncoder):
    """The toy towers with SigLIP's learnable bias, at the published start."""

    def __init__(self):
        super().__init__()
        self.logit_scale = nn.Parameter(torch.tensor(math.log(10.0)))
        self.logit_bias = nn.Parameter(torch.tensor(-10.0))

    def forward(self, images, texts):
        return *super().forward(images, texts), self.logit_bias


def _global_data():
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(GLOBAL_BATCH, 6, generator=generator, dtype=torch.float64)
    texts = torch.randn(GLOBAL_BATCH, 5, generator=generator, dtype=torch.float64)
    student = torch.randn(NUM_CROPS, GLOBAL_BATCH, OUT_DIM, generator=generator)
    teacher = torch.randn(2, GLOBAL_BATCH, OUT_DIM, generator=generator)
    return images, texts, student, teacher


def _toy_model(loss="infonce"):
    torch.manual_seed(0)
    return (_ToySigLIPEncoder() if loss == "siglip" else _ToyDualEncoder()).double()


def _distributed_worker(rank, init_file, out_dir):
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=WORLD_SIZE,
        timeout=timedelta(seconds=WORKER_TIMEOUT_S),
    )
    images, texts, student, teacher = _global_data()
    local = slice(rank * GLOBAL_BATCH // WORLD_SIZE, (rank + 1) * GLOBAL_BATCH // WORLD_SIZE)

    model = DistributedDataParallel(_toy_model())
    loss = ContrastiveLoss()(*model(images[local], texts[local]))
    loss.backward()
    # Uneven local batches (one process lost images to decoding errors): 1 row on rank 0, the rest on rank 1.
    uneven = slice(0, 1) if rank == 0 else slice(1, GLOBAL_BATCH)
    uneven_model = DistributedDataParallel(_toy_model())
    uneven_loss = ContrastiveLoss()(*uneven_model(images[uneven], texts[uneven]))
    uneven_loss.backward()
    siglip_results = {}
    for prefix, rows in (("", local), ("uneven_", uneven)):
        siglip_model = DistributedDataParallel(_toy_model("siglip"))
        siglip_loss = SigLIPLoss()(*siglip_model(images[rows], texts[rows]))
        siglip_loss.backward()
        siglip_results[prefix + "loss"] = siglip_loss.detach()
        siglip_results[prefix + "grads"] = {name: p.grad for name, p in siglip_model.module.named_parameters()}

    dino_loss = DINOLoss(OUT_DIM, NUM_CROPS, num_steps=1)
    dino_output = dino_loss(student[:, local].flatten(0, 1), teacher[:, local].flatten(0, 1), step=0)
    uneven_dino_loss = DINOLoss(OUT_DIM, NUM_CROPS, num_steps=1)
    uneven_dino_output = uneven_dino_loss(student[:, uneven].flatten(0, 1), teacher[:, uneven].flatten(0, 1), step=0)
    results = {
        "loss": loss.detach(),
        "grads": {name: p.grad for name, p in model.module.named_parameters()},
        "uneven_loss": uneven_loss.detach(),
        "uneven_grads": {name: p.grad for name, p in uneven_model.module.named_parameters()},
        "dino_loss": dino_output.loss.detach(),
        "center": dino_loss.center,
        "uneven_dino": [
            uneven_dino_output.loss.detach(),
            uneven_dino_output.teacher_entropy,
            uneven_dino_output.teacher_student_kl,
        ],
        "uneven_center": uneven_dino_loss.center,
        "uneven_share": share_of_global_batch(len(images[uneven])),
        "siglip": siglip_results,
    }
    finish_distributed_worker(results, f"{out_dir}/rank{rank}.pt")


@pytest.fixture(scope="module")
def distributed_results(tmp_path_factory):
    """Runs `_distributed_worker` in 2 CPU processes (gloo) and returns what each rank saved."""
    tmp_path = tmp_path_factory.mktemp("gloo")
    results = [tmp_path / f"rank{rank}.pt" for rank in range(WORLD_SIZE)]
    workers = mp.start_processes(
        _distributed_worker,
        args=(str(tmp_path / "rendezvous"), str(tmp_path)),
        nprocs=WORLD_SIZE,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + 2 * WORKER_TIMEOUT_S
    try:
        while not workers.join(timeout=1):  # raises if a worker failed
            if time.monotonic() > deadline:
                pytest.fail(f"the {WORLD_SIZE} gloo workers did not finish within {2 * WORKER_TIMEOUT_S} s")
    finally:
        for process in workers.processes:
            if process.is_alive():
                process.kill()
    return [torch.load(path, weights_only=True) for path in results]


def test_two_processes_match_single_process_loss_and_gradients(distributed_results):
    images, texts, _, _ = _global_data()
    model = _toy_model()
    loss = ContrastiveLoss()(*model(images, texts))
    loss.backward()
    for result in distributed_results:
        for prefix in ("", "uneven_"):
            torch.testing.assert_close(result[prefix + "loss"], loss.detach(), atol=1e-6, rtol=0)
            for name, parameter in model.named_parameters():
                torch.testing.assert_close(result[prefix + "grads"][name], parameter.grad, atol=1e-6, rtol=0)


def test_two_processes_match_single_process_siglip_loss_and_gradients(distributed_results):
    """SigLIP's loss gathers the embeddings with gradients too: each process's loss is that of the global batch, and
    DDP's average of the gradients (temperature and bias included) is the single-process gradient, for even and
    uneven local batches."""
    images, texts, _, _ = _global_data()
    model = _toy_model("siglip")
    loss = SigLIPLoss()(*model(images, texts))
    loss.backward()
    assert model.logit_bias.grad is not None
    for result in distributed_results:
        for prefix in ("", "uneven_"):
            torch.testing.assert_close(result["siglip"][prefix + "loss"], loss.detach(), atol=1e-6, rtol=0)
            for name, parameter in model.named_parameters():
                torch.testing.assert_close(result["siglip"][prefix + "grads"][name], parameter.grad, atol=1e-6, rtol=0)


def test_two_processes_share_the_dino_centre_of_the_global_batch(distributed_results):
    _, _, student, teacher = _global_data()
    centre = 0.1 * teacher.flatten(0, 1).mean(dim=0, keepdim=True)
    for rank, result in enumerate(distributed_results):
        torch.testing.assert_close(result["center"], centre)
        # The loss itself stays local: DDP averages its gradients.
        local = slice(rank * GLOBAL_BATCH // WORLD_SIZE, (rank + 1) * GLOBAL_BATCH // WORLD_SIZE)
        single = DINOLoss(OUT_DIM, NUM_CROPS, num_steps=1)
        expected = single(student[:, local].flatten(0, 1), teacher[:, local].flatten(0, 1), step=0).loss
        torch.testing.assert_close(result["dino_loss"], expected)
    assert torch.equal(distributed_results[0]["center"], distributed_results[1]["center"])


def test_uneven_dino_batches_average_to_the_global_batch(distributed_results):
    """1 image on rank 0, 7 on rank 1: the centre is the global mean, and the mean over processes of the loss,
    entropy and KL (what DDP does to the gradients, what stage 2 logs) is the single-process value."""
    _, _, student, teacher = _global_data()
    single = DINOLoss(OUT_DIM, NUM_CROPS, num_steps=1)
    expected = single(student.flatten(0, 1), teacher.flatten(0, 1), step=0)
    for index, value in enumerate((expected.loss, expected.teacher_entropy, expected.teacher_student_kl)):
        averaged = torch.stack([result["uneven_dino"][index] for result in distributed_results]).mean()
        torch.testing.assert_close(averaged, value.detach())
    for result in distributed_results:
        torch.testing.assert_close(result["uneven_center"], single.center)


def test_share_of_global_batch_is_one_without_a_process_group():
    assert share_of_global_batch(5) == 1.0 and share_of_global_batch(1, global_count=8) == 1.0


def test_share_of_global_batch_across_two_processes(distributed_results):
    # 1 and 7 rows of 8: the mean of 0.25 * mean(rank 0) and 1.75 * mean(rank 1) is the global mean.
    assert [result["uneven_share"] for result in distributed_results] == [0.25, 1.75]
