"""Tests for the stage-3 aligner core (training/aligner.py)."""

import functools
import logging
import math
import os
import socket
import threading

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from accelerate import Accelerator
from torch import nn

from bench.bench_aligner import torch_peak_bytes
from modeling_agriclip.configuration_agriclip import ALIGNMENT_OBJECTIVES as CONFIG_OBJECTIVES
from training import stage3_align
from training.aligner import (
    ALIGNMENT_OBJECTIVES,
    AlignerStatistics,
    AlignerWeights,
    AlignmentData,
    ContrastiveAlignment,
    ImageMSE,
    TextMSE,
    aligner_metrics,
    create_objective,
    fit_closed_form,
    fit_contrastive_head,
    fit_sgd_recipe,
    load_aligner_file,
    relative_ridge,
    save_aligner_file,
)
from training.losses import CaptionTargetInfoNCE

from conftest import finish_distributed_worker


D_IN, D_OUT = 24, 6


def make_features(n=600, d_in=D_IN, d_out=D_OUT, seed=0, noise=0.3, offset=5.0):
    """
    ReLU-like features and Y = X A + c + noise. The default offset gives X a mean large against its spread (where
    uncentred sums cancel); the SGD recipe diverges on such features, so its tests use `offset=0`.
    """
    generator = torch.Generator().manual_seed(seed)
    x = torch.relu(torch.randn(n, d_in, generator=generator) + 0.5) * 2.0 + offset
    a = torch.randn(d_in, d_out, generator=generator)
    y = x @ a + 3.0 + noise * torch.randn(n, d_out, generator=generator)
    return x, y


def stream(x, y, sizes):
    stats = AlignerStatistics(x.shape[1], y.shape[1])
    start = 0
    for size in sizes:
        stats.update(x[start : start + size], y[start : start + size])
        start += size
    assert start == x.shape[0]
    return stats


def assert_same_statistics(a, b, rtol=1e-11):
    assert a.n == b.n
    for key, value in a.state_dict().items():
        torch.testing.assert_close(value, b.state_dict()[key], rtol=rtol, atol=rtol, msg=key)


def numpy_lstsq(x, y):
    """Float64 reference: least squares with an intercept column; returns (W (D_out, D_in), b)."""
    design = np.concatenate([x.double().numpy(), np.ones((x.shape[0], 1))], axis=1)
    solution = np.linalg.lstsq(design, y.double().numpy(), rcond=None)[0]
    return solution[:-1].T, solution[-1]


def relative_error(actual, expected):
    return np.linalg.norm(actual.double().numpy() - expected) / np.linalg.norm(expected)


def test_closed_form_matches_numpy_lstsq():
    x, y = make_features()
    weights = fit_closed_form(stream(x, y, [1, 37, 200, 362]))
    expected_weight, expected_bias = numpy_lstsq(x, y)
    assert weights.weight.dtype == torch.float32 and weights.weight.shape == (D_OUT, D_IN)
    assert relative_error(weights.weight, expected_weight) <= 1e-6
    assert relative_error(weights.bias, expected_bias) <= 1e-6


def test_blocked_statistics_and_factorisation_equal_the_float64_normal_equations_and_keep_the_statistics():
    """600 feature dimensions: three blocks of the fit's factorisation, the last one partial; batches of one row,
    of several float64 slices and of a partial one."""
    n, d_in = 1500, 600
    x, y = make_features(n=n, d_in=d_in, d_out=8, seed=3)
    stats = stream(x, y, [1, 700, 799])
    assert torch.equal(stats.sxx, stats.sxx.mT)  # exactly symmetric: what the fit relies on
    xd, yd = x.double(), y.double()
    xc, yc = xd - xd.mean(0), yd - yd.mean(0)
    torch.testing.assert_close(stats.sxx, xc.T @ xc, rtol=1e-10, atol=1e-7)
    torch.testing.assert_close(stats.sxy, xc.T @ yc, rtol=1e-10, atol=1e-7)
    saved = stats.state_dict()
    for ridge in (0.0, 0.05):
        weights = fit_closed_form(stats, ridge=ridge)
        weight = torch.linalg.solve(xc.T @ xc / n + ridge * torch.eye(d_in, dtype=torch.float64), xc.T @ yc / n).T
        bias = yd.mean(0) - weight @ xd.mean(0)
        assert relative_error(weights.weight, weight.numpy()) <= 1e-6, ridge
        assert relative_error(weights.bias, bias.numpy()) <= 1e-6, ridge
    for key, value in stats.state_dict().items():
        assert torch.equal(value, saved[key]), key  # the factor was written into sxx and undone, bit for bit


def test_singular_features_beyond_the_first_block_fall_back_to_the_minimum_norm_solution(caplog):
    """The factorisation stops part-way, in its second block; the statistics are restored before the fallback."""
    x, y = make_features(n=1000, d_in=300, d_out=6, seed=4)
    duplicated = torch.cat([x, x[:, :2]], dim=1)
    stats = stream(duplicated, y, [1000])
    saved = stats.state_dict()
    with caplog.at_level(logging.WARNING, logger="training.aligner"):
        weights = fit_closed_form(stats)
    assert "singular" in caplog.text
    expected_weight, expected_bias = numpy_lstsq(duplicated, y)
    assert relative_error(weights.weight, expected_weight) <= 1e-6
    assert relative_error(weights.bias, expected_bias) <= 1e-6
    for key, value in stats.state_dict().items():
        assert torch.equal(value, saved[key]), key


def test_update_and_fit_allocate_no_float64_batch_nor_a_second_covariance_matrix():
    """An update converts a batch to float64 a slice at a time; the fit factors in the redundant triangle of sxx
    and solves in place: its temporaries are the solution and a block row, not D_in x D_in matrices."""
    d_in, d_out = 1024, 16
    x, y = make_features(n=2000, d_in=d_in, d_out=d_out, seed=5)
    stats = AlignerStatistics(d_in, d_out)
    assert torch_peak_bytes(lambda: stats.update(x, y)) < 8 * x.numel() / 4
    assert torch_peak_bytes(lambda: fit_closed_form(stats)) < 8 * d_in * d_in / 2


def test_streaming_merge_and_add_equal_one_pass():
    x, y = make_features()
    whole = stream(x, y, [600])
    assert_same_statistics(stream(x, y, [1, 99, 250, 13, 237]), whole)
    first, second = stream(x[:211], y[:211], [100, 111]), stream(x[211:], y[211:], [389])
    assert_same_statistics(first + second, whole)
    assert first.n == 211  # __add__ leaves its operands alone
    assert_same_statistics(first.merge(second), whole)
    assert_same_statistics(AlignerStatistics(D_IN, D_OUT).merge(whole), whole)


def test_state_dict_resumes_mid_stream(tmp_path):
    x, y = make_features()
    partial = stream(x[:250], y[:250], [125, 125])
    torch.save(partial.state_dict(), tmp_path / "stats.pt")
    resumed = AlignerStatistics(D_IN, D_OUT)
    resumed.load_state_dict(torch.load(tmp_path / "stats.pt", weights_only=True))
    resumed.update(x[250:], y[250:])
    assert_same_statistics(resumed, stream(x, y, [600]))
    with pytest.raises(ValueError, match="mean_y"):
        AlignerStatistics(D_IN, D_OUT + 1).load_state_dict(partial.state_dict())
    with pytest.raises(ValueError, match="missing keys"):
        resumed.load_state_dict({"n": torch.tensor(1)})


def test_update_rejects_bad_shapes():
    stats = AlignerStatistics(D_IN, D_OUT)
    with pytest.raises(ValueError, match="x: expected shape"):
        stats.update(torch.zeros(4, D_IN + 1), torch.zeros(4, D_OUT))
    with pytest.raises(ValueError, match="batch sizes differ"):
        stats.update(torch.zeros(4, D_IN), torch.zeros(3, D_OUT))


def _two_process_worker(rank, port, sizes, out_path):
    """One rank of a real 2-process CPU run: Accelerate initialises gloo from the torchrun-style environment."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2"
    )
    os.environ["ACCELERATE_USE_CPU"] = "1"
    torch.set_num_threads(1)
    accelerator = Accelerator(cpu=True)
    assert accelerator.num_processes == 2
    x, y = make_features()
    start = sum(sizes[:rank])
    stats = AlignerStatistics(D_IN, D_OUT, device=accelerator.device)
    stats.update(x[start : start + sizes[rank]], y[start : start + sizes[rank]])
    stats.all_reduce(lambda tensor: accelerator.reduce(tensor, reduction="sum"))
    finish_distributed_worker(stats.state_dict(), f"{out_path}.{rank}")


@pytest.mark.slow
def test_two_processes_equal_one(tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    sizes = [173, 427]
    out_path = str(tmp_path / "stats")
    mp.start_processes(_two_process_worker, args=(port, sizes, out_path), nprocs=2, start_method="spawn")
    x, y = make_features()
    whole = stream(x, y, [600])
    for rank in range(2):
        reduced = AlignerStatistics(D_IN, D_OUT)
        reduced.load_state_dict(torch.load(tmp_path / f"stats.{rank}", weights_only=True))
        assert_same_statistics(reduced, whole)


def test_all_reduce_with_simulated_processes_one_without_data():
    """Three threads stand in for three processes; the reduce function is a barrier-synchronised sum."""
    x, y = make_features()
    shards = [stream(x[:50], y[:50], [50]), AlignerStatistics(D_IN, D_OUT), stream(x[50:], y[50:], [550])]
    barrier = threading.Barrier(len(shards), timeout=60)  # a failing rank breaks the barrier instead of hanging
    slots = [None] * len(shards)

    def reduce_fn(rank, tensor):
        slots[rank] = tensor.clone()
        barrier.wait()
        total = torch.stack(slots).sum(0)
        barrier.wait()  # nobody overwrites a slot before every rank has read the sum
        return total

    threads = [
        threading.Thread(target=shard.all_reduce, args=(functools.partial(reduce_fn, rank),))
        for rank, shard in enumerate(shards)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for shard in shards:
        assert_same_statistics(shard, stream(x, y, [600]))


def test_metrics_streamed_equal_in_memory_and_match_definitions():
    x, y = make_features(n=9000)  # more rows than one float64 working chunk of aligner_metrics
    generator = torch.Generator().manual_seed(1)
    weights = AlignerWeights(
        weight=torch.randn(D_OUT, D_IN, generator=generator) * 0.1, bias=torch.randn(D_OUT, generator=generator)
    )
    in_memory = aligner_metrics(weights, x, y)
    streamed = stream(x, y, [17, 8983]).metrics(weights)
    for key in ("mse", "r2", "r2_global"):
        assert math.isclose(in_memory[key], streamed[key], rel_tol=1e-9), key
    xd, yd = x.double(), y.double()
    mse = (yd - (xd @ weights.weight.double().T + weights.bias.double())).square().mean()
    # Text-to-Concept's printed R²: 1 - MSE / (mean(Y²) - mean(Y)²)
    assert math.isclose(in_memory["r2_global"], 1 - mse / (yd.square().mean() - yd.mean() ** 2), rel_tol=1e-9)
    assert math.isclose(in_memory["mse"], mse.item(), rel_tol=1e-9)
    mean_predictor = AlignerWeights(weight=torch.zeros(D_OUT, D_IN), bias=y.double().mean(0).float())
    assert abs(aligner_metrics(mean_predictor, x, y)["r2"]) < 1e-6


def test_closed_form_beats_sgd_recipe():
    x, y = make_features(n=300, noise=1.0, offset=0.0)
    closed = aligner_metrics(fit_closed_form(stream(x, y, [300])), x, y)
    sgd = aligner_metrics(fit_sgd_recipe(x, y, epochs=10), x, y)
    assert sgd["r2"] > 0.5  # the recipe does learn
    assert closed["r2"] >= sgd["r2"]
    assert closed["mse"] <= sgd["mse"]


def reference_t2c_fit(x, y, epochs, seed, target_variance=4.5):
    """A tiny re-statement of Text-to-Concept's LinearAligner.train (the AgriCLIP code), seeded as documented."""
    xn, yn = x.numpy(), y.numpy()
    var1 = np.mean(np.square(xn.astype(np.float64))) - np.mean(xn.astype(np.float64)) ** 2
    var2 = np.mean(np.square(yn.astype(np.float64))) - np.mean(yn.astype(np.float64)) ** 2
    c1, c2 = (target_variance / var1) ** 0.5, (target_variance / var2) ** 0.5
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        linear = nn.Linear(x.shape[1], y.shape[1])
    optimizer = torch.optim.SGD(linear.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=200)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for indices in torch.randperm(x.shape[0], generator=generator).split(100):
            optimizer.zero_grad()
            F.mse_loss(linear(c1 * x[indices]), c2 * y[indices]).backward()
            optimizer.step()
        scheduler.step()
    return linear, c1, c2


def test_legacy_bias_scaling_reproduces_original_export_and_corrected_is_exact_inverse():
    x, y = make_features(n=250, offset=0.0)
    linear, c1, c2 = reference_t2c_fit(x, y, epochs=2, seed=3)
    assert abs(c1 - 1) > 0.1
    with torch.no_grad():
        original_w, original_b = linear.weight * c1 / c2, linear.bias * c1 / c2  # T2C: W*c1/c2, b*c1/c2
        scaled_prediction = linear(c1 * x) / c2

    legacy = fit_sgd_recipe(x, y, epochs=2, seed=3, legacy_bias_scaling=True)
    torch.testing.assert_close(legacy.weight, original_w, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(legacy.bias, original_b, rtol=1e-5, atol=1e-6)

    corrected = fit_sgd_recipe(x, y, epochs=2, seed=3)
    torch.testing.assert_close(corrected.weight, legacy.weight)
    torch.testing.assert_close(F.linear(x, corrected.weight, corrected.bias), scaled_prediction, rtol=1e-5, atol=1e-4)
    legacy_prediction = F.linear(x, legacy.weight, legacy.bias)
    assert (legacy_prediction - scaled_prediction).abs().max() > 1e-2


def test_legacy_and_corrected_agree_when_c1_is_one():
    x, y = make_features(n=200, offset=0.0)
    xd = x.double()
    variance = (xd.square().mean() - xd.mean() ** 2).item()
    legacy = fit_sgd_recipe(x, y, epochs=1, target_variance=variance, legacy_bias_scaling=True)
    corrected = fit_sgd_recipe(x, y, epochs=1, target_variance=variance)
    torch.testing.assert_close(legacy.bias, corrected.bias)


def test_ridge_shrinks_weight_and_leaves_bias_unpenalised():
    x, y = make_features()
    stats = stream(x, y, [600])
    norms = [fit_closed_form(stats, ridge=ridge).weight.norm().item() for ridge in (0.0, 0.1, 10.0)]
    assert norms[0] > norms[1] > norms[2]
    heavy = fit_closed_form(stats, ridge=1e9)
    assert heavy.weight.abs().max() < 1e-4
    torch.testing.assert_close(heavy.bias, y.double().mean(0).float(), rtol=1e-4, atol=1e-3)
    with pytest.raises(ValueError, match="ridge"):
        fit_closed_form(stats, ridge=-1.0)


def test_singular_features_give_minimum_norm_solution(caplog):
    x, y = make_features()
    duplicated = torch.cat([x, x[:, :3]], dim=1)
    with caplog.at_level(logging.WARNING, logger="training.aligner"):
        weights = fit_closed_form(stream(duplicated, y, [600]))
    assert "singular" in caplog.text
    assert torch.isfinite(weights.weight).all() and torch.isfinite(weights.bias).all()
    expected_weight, expected_bias = numpy_lstsq(duplicated, y)  # numpy also returns the minimum-norm solution
    assert relative_error(weights.weight, expected_weight) <= 1e-6
    assert relative_error(weights.bias, expected_bias) <= 1e-6

    reference = fit_closed_form(stream(x, y, [600]))
    reference_prediction = F.linear(x, reference.weight, reference.bias)
    dead_channel = torch.cat([x, torch.full((600, 1), 0.25)], dim=1)  # a ReLU channel that never fires
    weights = fit_closed_form(stream(dead_channel, y, [600]))
    assert weights.weight[:, -1].abs().max() < 1e-6
    torch.testing.assert_close(F.linear(dead_channel, weights.weight, weights.bias), reference_prediction)


def test_collinear_up_to_float32_rounding_is_treated_as_singular(caplog):
    """3·x in float32 is collinear with x only up to rounding: plain Cholesky accepts it and returns ~1e5 weights."""
    x, y = make_features()
    scaled_copy = torch.cat([x, 3.0 * x[:, 1:2]], dim=1)
    with caplog.at_level(logging.WARNING, logger="training.aligner"):
        weights = fit_closed_form(stream(scaled_copy, y, [600]))
    assert "singular" in caplog.text
    reference = fit_closed_form(stream(x, y, [600]))
    assert weights.weight.abs().max() < 2 * reference.weight.abs().max()
    torch.testing.assert_close(
        F.linear(scaled_copy, weights.weight, weights.bias), F.linear(x, reference.weight, reference.bias)
    )


def test_aligner_file_round_trip(tmp_path):
    weights = AlignerWeights(weight=torch.randn(4, 7), bias=torch.randn(4))
    path = tmp_path / "aligner.pth"
    save_aligner_file(weights, path)
    assert sorted(torch.load(path, weights_only=True)) == ["W", "b"]
    assert os.listdir(tmp_path) == ["aligner.pth"]  # the temporary file was renamed, not left behind
    loaded = load_aligner_file(path, expected_shape=(4, 7))
    torch.testing.assert_close(loaded.weight, weights.weight)
    torch.testing.assert_close(loaded.bias, weights.bias)


class NotATensor:
    """A custom class: pickling it makes a file that only full unpickling (code execution) can read."""


@pytest.mark.parametrize(
    "content, message",
    [
        ({"W": torch.zeros(4, 7)}, "lacks the aligner tensor"),
        ({"W": torch.zeros(4, 7), "b": torch.zeros(5)}, r"W must be \(out, in\)"),
        ({"W": torch.zeros(4, 7, 1), "b": torch.zeros(4)}, r"W must be \(out, in\)"),
        ({"W": torch.zeros(4, 6), "b": torch.zeros(4)}, "maps 6 -> 4 features, but the model needs 7 -> 4"),
        (torch.zeros(4, 7), "must hold a flat dict of tensors"),
        ({"W": NotATensor(), "b": torch.zeros(4)}, "refusing to load"),
    ],
)
def test_load_aligner_file_rejects_bad_files(tmp_path, content, message):
    path = tmp_path / "bad_aligner.pth"
    torch.save(content, path)
    with pytest.raises(ValueError, match=message) as error:
        load_aligner_file(path, expected_shape=(4, 7))
    assert str(path) in str(error.value)


# ---------------------------------------------------------------------------------------------------------------
# Alignment objectives
# ---------------------------------------------------------------------------------------------------------------


def test_the_objective_table_the_config_and_the_command_name_the_same_objectives():
    assert tuple(ALIGNMENT_OBJECTIVES) == CONFIG_OBJECTIVES == stage3_align.OBJECTIVES
    assert all(
        ALIGNMENT_OBJECTIVES[name].name == name and ALIGNMENT_OBJECTIVES[name].__doc__ for name in CONFIG_OBJECTIVES
    )
    assert isinstance(create_objective("text-mse"), TextMSE)
    with pytest.raises(ValueError, match=r"unknown alignment objective 'mse'; choose one of \['image-mse'"):
        create_objective("mse")


def test_image_mse_is_the_closed_form_or_the_sgd_recipe():
    x, y = make_features(n=300, offset=0.0)
    stats = stream(x, y, [300])
    closed = ImageMSE().fit(AlignmentData(stats), ridge=0.1)
    torch.testing.assert_close(closed.weight, fit_closed_form(stats, ridge=0.1).weight, rtol=0, atol=0)
    sgd = ImageMSE(sgd={"epochs": 2, "seed": 1})
    assert sgd.needs_features and not sgd.has_ridge
    fitted = sgd.fit(AlignmentData(stats, x=x, targets=y))
    torch.testing.assert_close(fitted.weight, fit_sgd_recipe(x, y, epochs=2, seed=1).weight, rtol=0, atol=0)


def caption_problem(n=400, variants=3, d_in=D_IN, d_out=D_OUT, seed=0):
    """Features and, per image, `variants` unit-norm text embeddings of its captions (random, correlated with x)."""
    x, _ = make_features(n=n, d_in=d_in, d_out=d_out, seed=seed)
    generator = torch.Generator().manual_seed(seed + 1)
    mapping = torch.randn(d_in, d_out, generator=generator)
    texts = F.normalize(x[:, None, :] @ mapping + 4.0 * torch.randn(n, variants, d_out, generator=generator), dim=-1)
    return x, texts


def test_text_mse_equals_least_squares_on_one_pair_per_caption_variant():
    """The caption target (mean of the normalised variants) gives the least-squares solution of one pair per variant,
    computed independently by torch.linalg.lstsq on the replicated rows; streaming in uneven batches changes nothing."""
    x, texts = caption_problem()
    targets = texts.mean(dim=1)
    weights = TextMSE().fit(AlignmentData(stream(x, targets, [7, 193, 1, 199])))
    replicated = x.double().repeat_interleave(texts.shape[1], dim=0)
    design = torch.cat([replicated, torch.ones(len(replicated), 1, dtype=torch.float64)], dim=1)
    solution = torch.linalg.lstsq(design, texts.reshape(-1, D_OUT).double()).solution
    torch.testing.assert_close(weights.weight.double(), solution[:-1].T, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(weights.bias.double(), solution[-1], rtol=1e-5, atol=1e-6)
    assert_same_statistics(stream(x, targets, [7, 193, 1, 199]), stream(x, targets, [400]))


def test_relative_ridge_is_a_fraction_of_the_mean_feature_variance():
    x, y = make_features()
    expected = x.double().var(dim=0, unbiased=False).mean().item()
    assert math.isclose(relative_ridge(stream(x, y, [600]), 0.01), 0.01 * expected, rel_tol=1e-9)
    with pytest.raises(ValueError, match="fraction must be >= 0"):
        relative_ridge(stream(x, y, [600]), -1.0)


def test_caption_target_infonce_matches_a_hand_computation_over_distinct_targets():
    generator = torch.Generator().manual_seed(0)
    images, targets = torch.randn(5, 4, generator=generator), torch.randn(5, 4, generator=generator)
    groups = torch.tensor([7, 3, 7, 9, 3])
    targets[2], targets[4] = targets[0], targets[1]  # images of one group share their captions, so their target
    loss = CaptionTargetInfoNCE()(images, targets, groups, logit_scale=math.log(10.0))
    distinct = F.normalize(targets[[0, 1, 3]], dim=-1)  # groups 7, 3, 9
    own = {7: 0, 3: 1, 9: 2}
    expected = 0.0
    for image, group in zip(F.normalize(images, dim=-1), groups.tolist()):
        logits = 10.0 * distinct @ image
        expected += -(logits[own[group]] - torch.logsumexp(logits, dim=0)) / 5
    torch.testing.assert_close(loss, expected)
    capped = CaptionTargetInfoNCE()(images, targets, groups, logit_scale=math.log(1000.0))
    torch.testing.assert_close(capped, CaptionTargetInfoNCE()(images, targets, groups, logit_scale=math.log(100.0)))
    with pytest.raises(ValueError, match="groups"):
        CaptionTargetInfoNCE()(images, targets, groups[:3], logit_scale=0.0)


def magnitude_problem(n, seed, classes=8, d_in=16, d_out=8):
    """Caption-as-class data where least squares is not enough: each image is its class direction times a magnitude
    spread over two decades (contrast, exposure), and the class targets share a large common component. Least
    squares shrinks the faint images towards the mean target; InfoNCE compares directions only."""
    fixed = torch.Generator().manual_seed(100)
    class_targets = F.normalize(
        2.0 * torch.randn(d_out, generator=fixed) + torch.randn(classes, d_out, generator=fixed), dim=-1
    )
    directions = torch.randn(classes, d_in, generator=fixed)
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(classes, (n,), generator=generator)
    magnitude = torch.empty(n).uniform_(math.log(0.1), math.log(10.0), generator=generator).exp()
    x = magnitude[:, None] * directions[labels] + 0.3 * torch.randn(n, d_in, generator=generator)
    return x, class_targets[labels], labels, class_targets


def class_accuracy(weights, x, labels, class_targets):
    """Held-out image-to-text recall@1 over the classes, by hand: the best-scoring class target is the image's."""
    scores = F.normalize(F.linear(x, weights.weight, weights.bias), dim=-1) @ F.normalize(class_targets, dim=-1).T
    return (scores.argmax(dim=1) == labels).float().mean().item()


def full_infonce(weights, x, labels, class_targets, scale):
    """The image-to-text InfoNCE over every class target, by hand."""
    logits = (
        scale * F.normalize(F.linear(x, weights.weight, weights.bias), dim=-1) @ F.normalize(class_targets, dim=-1).T
    )
    return F.cross_entropy(logits, labels).item()


def test_contrastive_head_lowers_infonce_from_the_closed_form_and_beats_least_squares_held_out():
    x, targets, labels, class_targets = magnitude_problem(800, seed=0)
    x_test, _, labels_test, _ = magnitude_problem(400, seed=1)
    start = fit_closed_form(stream(x, targets, [800]))
    fit = fit_contrastive_head(
        x, targets, labels, start, logit_scale=math.log(1 / 0.07), epochs=20, lr=1e-2, batch_size=128
    )
    scale = 1 / 0.07
    assert full_infonce(fit.weights, x, labels, class_targets, scale) < 0.5 * full_infonce(
        start, x, labels, class_targets, scale
    )
    assert fit.final_loss < 0.5 * fit.start_loss
    least_squares, contrastive = (class_accuracy(w, x_test, labels_test, class_targets) for w in (start, fit.weights))
    assert least_squares < 0.65 and contrastive > least_squares + 0.2, (least_squares, contrastive)


def test_contrastive_head_is_seeded_and_exports_onto_the_raw_features():
    x, targets, labels, _ = magnitude_problem(300, seed=0)
    start = fit_closed_form(stream(x, targets, [300]))
    runs = [
        fit_contrastive_head(x, targets, labels, start, logit_scale=2.0, epochs=2, batch_size=64, seed=seed)
        for seed in (3, 3, 4)
    ]
    assert torch.equal(runs[0].weights.weight, runs[1].weights.weight)
    assert torch.equal(runs[0].weights.bias, runs[1].weights.bias)
    assert not torch.equal(runs[0].weights.weight, runs[2].weights.weight)
    # No step taken: the head trained on standardised features comes back as the start, on the raw features.
    still = fit_contrastive_head(x, targets, labels, start, logit_scale=2.0, epochs=1, lr=0.0, batch_size=64)
    torch.testing.assert_close(
        F.linear(x, still.weights.weight, still.weights.bias),
        F.linear(x, start.weight, start.bias),
        rtol=1e-5,
        atol=1e-5,
    )
    assert math.isclose(still.start_loss, still.final_loss, rel_tol=1e-6)


def test_contrastive_objective_starts_from_the_text_mse_closed_form_with_the_given_ridge():
    x, targets, labels, _ = magnitude_problem(300, seed=0)
    stats = stream(x, targets, [300])
    objective = create_objective("contrastive", logit_scale=2.0, epochs=1, lr=0.0, batch_size=64)
    assert isinstance(objective, ContrastiveAlignment) and objective.needs_features and objective.has_ridge
    weights = objective.fit(AlignmentData(stats, x=x, targets=targets, groups=labels), ridge=1.0)
    start = fit_closed_form(stats, ridge=1.0)
    torch.testing.assert_close(
        F.linear(x, weights.weight, weights.bias), F.linear(x, start.weight, start.bias), rtol=1e-5, atol=1e-5
    )
    assert set(objective.fit_metrics()) == {"train/infonce_start", "train/infonce_final"}
