"""Stage 3 numerical core: the linear aligner from backbone features into the CLIP embedding space.

The aligner is an affine map ``y ≈ x Wᵀ + b``. The paper fits it by mean squared error onto the CLIP image embedding
(Text-to-Concept style cross-model alignment). That optimum has a closed form, so the default fit streams sufficient
statistics over the data in one pass (`AlignerStatistics` + `fit_closed_form`): memory is independent of the number
of images and the statistics sum across processes. The paper's SGD recipe is kept for parity (`fit_sgd_recipe`).
The objectives stage 3 can fit by name are in one table, `ALIGNMENT_OBJECTIVES` (`create_objective`): the paper's,
least squares onto the CLIP text embeddings of each image's captions, and a contrastive head started from it
(`fit_contrastive_head`). `load_aligner_file` / `save_aligner_file` read and write the official ``{"W", "b"}``
release format.
"""

import logging
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from agriclip.atomic import atomic_open


logger = logging.getLogger(__name__)

# Rows per float64 working copy when a function walks over features held in memory.
_CHUNK_ROWS = 4096
# Rows per float64 working copy of a batch folded into `AlignerStatistics`: the largest temporary of a streamed fit,
# 256 x (D_in + D_out) doubles (5 MiB at 2048 -> 512, against the 32 MiB of sxx), and matrix products still large
# enough to run at full speed.
_UPDATE_ROWS = 256
# Side of the square blocks in which `sxx` is walked over a triangle at a time (`_mirror_lower`, the factorisation of
# `fit_closed_form`): each block's temporaries are a few 256 x 256 or 256 x D_in doubles.
_BLOCK = 256


def _blocks(size: int) -> list[tuple[int, int]]:
    return [(start, min(start + _BLOCK, size)) for start in range(0, size, _BLOCK)]


def _upper_mask(size: int, device) -> torch.Tensor:
    """The upper triangle, diagonal included, of a square block."""
    return torch.ones(size, size, dtype=torch.bool, device=device).triu_()


def _mirror_lower(matrix: torch.Tensor) -> None:
    """Overwrites the strict upper triangle of a square `matrix` by the transpose of its strict lower triangle, in
    place, a block at a time (no temporary of the matrix's size)."""
    for start, stop in _blocks(matrix.shape[0]):
        block = matrix[start:stop, start:stop]
        block.copy_(torch.where(_upper_mask(stop - start, matrix.device), block.mT, block))
        matrix[start:stop, stop:].copy_(matrix[stop:, start:stop].mT)


@dataclass(frozen=True)
class AlignerWeights:
    """
    A fitted aligner in `nn.Linear` layout: `y = x @ weight.T + bias`.

    Args:
        weight (`torch.Tensor` of shape `(out_features, in_features)`): float32 linear map.
        bias (`torch.Tensor` of shape `(out_features,)`): float32 offset.
    """

    weight: torch.Tensor
    bias: torch.Tensor


class AlignerStatistics:
    """
    Streaming sufficient statistics of the least-squares problem `Y ≈ X Wᵀ + b`.

    The statistics are kept centred, in float64: the count `n`, the means `mean_x` (D_in) and `mean_y` (D_out), the
    centred co-moments `sxx = Σ (x-μx)(x-μx)ᵀ` (D_in x D_in) and `sxy = Σ (x-μx)(y-μy)ᵀ` (D_in x D_out), and the
    per-dimension centred sum of squares `syy = Σ (y-μy)²` (D_out), which is all that MSE and R² need. Raw sums
    (`XᵀX = sxx + n μx μxᵀ`, ...) follow from them. Batches are folded in with the pairwise update of Chan, Golub and
    LeVeque (1979), so no large uncentred sum is ever formed and then cancelled: the fit keeps its precision when the
    features have a mean that is large against their spread (ReLU features do).

    `sxx` is kept exactly symmetric: batches are folded into its lower triangle only (about half the products of a
    full `XᵀX`), and every change ends by mirroring the lower triangle onto the upper. That makes the strict upper
    triangle redundant, so `fit_closed_form` can factor in it and restore it exactly instead of copying the matrix.
    A batch is converted to float64 and centred a `_UPDATE_ROWS` slice at a time, so no float64 copy of a whole batch
    is made.

    Multi-process runs accumulate locally and then call `all_reduce` once; `state_dict` / `load_state_dict` make the
    object checkpointable mid-stream (including through `accelerator.register_for_checkpointing`).

    Args:
        in_features (`int`): dimension D_in of the source features x.
        out_features (`int`): dimension D_out of the target features y.
        device (`torch.device` or `str`, *optional*): where the statistics live; under a multi-process run this must
            be a device the collective backend supports (e.g. `accelerator.device`).
    """

    def __init__(self, in_features: int, out_features: int, device: torch.device | str | None = None):
        self.in_features = in_features
        self.out_features = out_features
        factory = {"dtype": torch.float64, "device": device}
        self.n = 0
        self.mean_x = torch.zeros(in_features, **factory)
        self.mean_y = torch.zeros(out_features, **factory)
        self.sxx = torch.zeros(in_features, in_features, **factory)
        self.sxy = torch.zeros(in_features, out_features, **factory)
        self.syy = torch.zeros(out_features, **factory)

    @property
    def device(self) -> torch.device:
        return self.sxx.device

    def _shift(self, n: int, mean_x: torch.Tensor, mean_y: torch.Tensor) -> None:
        """
        Moves count, means and co-moments to those of the union with `n` more samples of means `mean_x`, `mean_y`
        (Chan et al. pairwise update), the caller having added the new samples' own centred co-moments (to the lower
        triangle of `sxx` at least); ends with `sxx` symmetric again.
        """
        total = self.n + n
        weight = self.n * n / total
        delta_x = mean_x - self.mean_x
        delta_y = mean_y - self.mean_y
        self.sxx.addr_(delta_x, delta_x, alpha=weight)
        self.sxy.addr_(delta_x, delta_y, alpha=weight)
        self.syy.add_(delta_y.square(), alpha=weight)
        self.mean_x.add_(delta_x, alpha=n / total)
        self.mean_y.add_(delta_y, alpha=n / total)
        self.n = total
        _mirror_lower(self.sxx)

    @torch.no_grad()
    def update(self, x: torch.Tensor, y: torch.Tensor) -> "AlignerStatistics":
        """
        Adds a batch of paired features.

        Args:
            x (`torch.Tensor` of shape `(batch, in_features)`): source features (any float dtype; cast to float64).
            y (`torch.Tensor` of shape `(batch, out_features)`): target features.
        """
        if x.ndim != 2 or x.shape[1] != self.in_features:
            raise ValueError(f"x: expected shape (batch, {self.in_features}), got {tuple(x.shape)}")
        if y.ndim != 2 or y.shape[1] != self.out_features:
            raise ValueError(f"y: expected shape (batch, {self.out_features}), got {tuple(y.shape)}")
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"x and y: batch sizes differ ({x.shape[0]} vs {y.shape[0]})")
        if x.shape[0] == 0:
            return self
        rows = x.shape[0]
        # One float64 buffer per side, _UPDATE_ROWS rows, refilled slice by slice for both passes over the batch
        # (a float64 `sum(dtype=...)` would convert the whole batch at once).
        x_buffer = torch.empty(min(rows, _UPDATE_ROWS), self.in_features, dtype=torch.float64, device=self.device)
        y_buffer = torch.empty(min(rows, _UPDATE_ROWS), self.out_features, dtype=torch.float64, device=self.device)

        def float64_slices():
            for start in range(0, rows, _UPDATE_ROWS):
                stop = min(start + _UPDATE_ROWS, rows)
                yield x_buffer[: stop - start].copy_(x[start:stop]), y_buffer[: stop - start].copy_(y[start:stop])

        mean_x, mean_y = torch.zeros_like(self.mean_x), torch.zeros_like(self.mean_y)
        for x_slice, y_slice in float64_slices():
            mean_x.add_(x_slice.sum(0))
            mean_y.add_(y_slice.sum(0))
        mean_x.div_(rows)
        mean_y.div_(rows)
        blocks = _blocks(self.in_features)
        for xc, yc in float64_slices():
            xc.sub_(mean_x)
            yc.sub_(mean_y)
            # The centred co-moment of the batch is the sum of its slices' products around the batch mean;
            # accumulated in place (no D_in x D_in temporary), on and below the diagonal blocks only.
            for low, high in blocks:
                self.sxx[low:high, :high].addmm_(xc[:, low:high].mT, xc[:, :high])
            self.sxy.addmm_(xc.mT, yc)
            self.syy.add_(yc.square_().sum(0))
        self._shift(x.shape[0], mean_x, mean_y)
        return self

    def merge(self, other: "AlignerStatistics") -> "AlignerStatistics":
        """Adds the statistics of `other` (e.g. another shard of the data) into these, in place."""
        if (other.in_features, other.out_features) != (self.in_features, self.out_features):
            raise ValueError(
                f"other: dimensions ({other.in_features} -> {other.out_features}) differ from "
                f"({self.in_features} -> {self.out_features})"
            )
        if other.n == 0:
            return self
        self.sxx.add_(other.sxx.to(self.device))
        self.sxy.add_(other.sxy.to(self.device))
        self.syy.add_(other.syy.to(self.device))
        self._shift(other.n, other.mean_x.to(self.device), other.mean_y.to(self.device))
        return self

    def __add__(self, other: "AlignerStatistics") -> "AlignerStatistics":
        result = AlignerStatistics(self.in_features, self.out_features, device=self.device)
        return result.merge(self).merge(other)

    @torch.no_grad()
    def all_reduce(self, reduce_fn: Callable[[torch.Tensor], torch.Tensor]) -> "AlignerStatistics":
        """
        Replaces the local statistics of every process by the statistics of all processes together, in place.

        Only sums are exchanged. First the counts and the raw sums give the global means; then each process
        re-centres its co-moments on the global means (adding `n_local · δ δᵀ` with `δ = μ_local − μ_global`, a
        correction without cancellation) and the re-centred co-moments are summed. A process that saw no data
        takes part with zeros.

        Args:
            reduce_fn (`Callable[[torch.Tensor], torch.Tensor]`): returns the element-wise sum of a tensor over all
                processes, e.g. `lambda t: accelerator.reduce(t, reduction="sum")` or a wrapper around
                `torch.distributed.all_reduce`. Every process must call `all_reduce` (it is a collective).
        """
        count = reduce_fn(torch.tensor([float(self.n)], dtype=torch.float64, device=self.device))
        total = int(count.item())
        if total == 0:
            return self
        mean_x = reduce_fn(self.mean_x * self.n) / total
        mean_y = reduce_fn(self.mean_y * self.n) / total
        delta_x = self.mean_x - mean_x
        delta_y = self.mean_y - mean_y
        self.sxx = reduce_fn(self.sxx.addr(delta_x, delta_x, alpha=self.n))
        self.sxy = reduce_fn(self.sxy.addr(delta_x, delta_y, alpha=self.n))
        self.syy = reduce_fn(self.syy.add(delta_y.square(), alpha=self.n))
        self.mean_x, self.mean_y, self.n = mean_x, mean_y, total
        _mirror_lower(self.sxx)
        return self

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors only, so that `torch.load(weights_only=True)` and safetensors can hold the checkpoint."""
        return {
            "n": torch.tensor(self.n, dtype=torch.int64),
            "mean_x": self.mean_x.clone(),
            "mean_y": self.mean_y.clone(),
            "sxx": self.sxx.clone(),
            "sxy": self.sxy.clone(),
            "syy": self.syy.clone(),
        }

    def load_state_dict(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        expected = {
            "mean_x": (self.in_features,),
            "mean_y": (self.out_features,),
            "sxx": (self.in_features, self.in_features),
            "sxy": (self.in_features, self.out_features),
            "syy": (self.out_features,),
        }
        missing = sorted({"n", *expected} - set(state_dict))
        if missing:
            raise ValueError(f"AlignerStatistics state_dict: missing keys {missing}")
        for key, shape in expected.items():
            if tuple(state_dict[key].shape) != shape:
                got = tuple(state_dict[key].shape)
                raise ValueError(f"AlignerStatistics state_dict[{key!r}]: expected shape {shape}, got {got}")
        self.n = int(state_dict["n"])
        for key in expected:
            setattr(self, key, state_dict[key].to(self.device, torch.float64).clone())
        _mirror_lower(self.sxx)

    @torch.no_grad()
    def metrics(self, weights: AlignerWeights) -> dict[str, float]:
        """
        MSE and R² of `weights` on the accumulated data, without the data (see `aligner_metrics` for definitions).

        With residuals `r = y − W x − b` and centred data, `Σ‖r‖² = Σ syy − 2 tr(W sxy) + tr(W sxx Wᵀ)
        + n ‖μy − W μx − b‖²`.
        """
        if self.n == 0:
            raise ValueError("AlignerStatistics.metrics: no data accumulated")
        weight = weights.weight.to(self.device, torch.float64)
        bias = weights.bias.to(self.device, torch.float64)
        offset = self.mean_y - weight @ self.mean_x - bias
        sse = (
            self.syy.sum()
            - 2 * (weight * self.sxy.mT).sum()
            + ((weight @ self.sxx) * weight).sum()
            + self.n * offset.square().sum()
        )
        global_sst = self.syy.sum() + self.n * (self.mean_y - self.mean_y.mean()).square().sum()
        return _metrics_from_sums(sse.item(), self.syy.sum().item(), global_sst.item(), self.n * self.out_features)


def _metrics_from_sums(sse: float, sst: float, global_sst: float, num_entries: int) -> dict[str, float]:
    """The one home of the metric definitions shared by `aligner_metrics` and `AlignerStatistics.metrics`."""
    return {"mse": sse / num_entries, "r2": 1.0 - sse / sst, "r2_global": 1.0 - sse / global_sst}


@torch.no_grad()
def aligner_metrics(weights: AlignerWeights, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """
    Fit quality of an aligner on features held in memory (computed in float64).

    Returns:
        `dict` with
        - `"mse"`: mean of the squared residuals over all `n x D_out` entries.
        - `"r2"`: the standard coefficient of determination `1 − SSE/SST`, with `SST = Σ_d Σ_i (y_id − ȳ_d)²` taken
          around the per-dimension mean of y and pooled over dimensions (scikit-learn's
          `r2_score(..., multioutput="variance_weighted")`). The mean predictor scores 0.
        - `"r2_global"`: the definition that Text-to-Concept and AgriCLIP print, `1 − MSE / var(Y)` with `var(Y)`
          the variance of all entries of Y around their single global mean (their `1 − MSE/var(c2·Y)` in the
          scaled space is the same number). It is at least `"r2"`, because SST around one scalar mean is larger.
    """
    weight, bias = weights.weight.to(x.device, torch.float64), weights.bias.to(x.device, torch.float64)
    # Row chunks keep the float64 copies small: the features may be most of the memory.
    mean_y = sum(chunk.sum(0, dtype=torch.float64) for chunk in y.split(_CHUNK_ROWS)) / y.shape[0]
    sse = sst = global_sst = 0.0
    for x_chunk, y_chunk in zip(x.split(_CHUNK_ROWS), y.split(_CHUNK_ROWS)):
        y_chunk = y_chunk.double()
        sse += (y_chunk - F.linear(x_chunk.double(), weight, bias)).square().sum().item()
        sst += (y_chunk - mean_y).square().sum().item()
        global_sst += (y_chunk - mean_y.mean()).square().sum().item()
    return _metrics_from_sums(sse, sst, global_sst, y.numel())


# A feature dimension whose variance the other dimensions explain to all but this fraction (its standard deviation to
# all but 1e-5) is collinear with them for any purpose: extracted features carry float32 (or bf16) rounding noise far
# above that, and the float64 normal equations lose about log10(1/fraction) of their 16 digits on such a dimension.
COLLINEARITY_RTOL = 1e-10


def _factor_in_upper(sxx: torch.Tensor, n: int, pivots: torch.Tensor, scale: torch.Tensor) -> bool:
    """
    Writes the upper Cholesky factor `U` of the equilibrated matrix `UᵀU = S⁻¹ (sxx/n + ridge·I) S⁻¹` into the
    upper triangle of the symmetric `sxx`, diagonal included, leaving its strict lower triangle as it was: a
    right-looking block Cholesky, whose temporaries are a block and a block row. `pivots` is the diagonal of
    `sxx/n + ridge·I`, `scale` the diagonal of `S`. Returns False, the upper triangle part-way, when a block is not
    positive definite.
    """
    device = sxx.device
    blocks = _blocks(sxx.shape[0])
    for start, stop in blocks:
        sxx[start:stop, stop:].div_(n).div_(scale[start:stop, None]).div_(scale[stop:])
        block = sxx[start:stop, start:stop]
        scaled = block / n / scale[start:stop, None] / scale[start:stop]
        block.copy_(torch.where(_upper_mask(stop - start, device), scaled, block))
    sxx.diagonal().copy_(pivots / scale / scale)
    for start, stop in blocks:
        block = sxx[start:stop, start:stop]
        upper = _upper_mask(stop - start, device)
        factor, info = torch.linalg.cholesky_ex(torch.where(upper, block, block.mT), upper=True)
        if info.item() != 0:
            return False
        block.copy_(torch.where(upper, factor, block))
        panel = sxx[start:stop, stop:]
        panel.copy_(torch.linalg.solve_triangular(factor.mT, panel, upper=False))
        for low, high in blocks:
            if low >= stop:
                rows = panel[:, low - stop : high - stop]
                sxx[low:high, high:].addmm_(rows.mT, panel[:, high - stop :], alpha=-1)
                sxx[low:high, low:high].sub_((rows.mT @ rows).triu_())
    return True


@torch.no_grad()
def fit_closed_form(stats: AlignerStatistics, ridge: float = 0.0) -> AlignerWeights:
    """
    The exact minimiser of `(1/n) Σ_i ‖y_i − W x_i − b‖² + ridge · ‖W‖²_F` (the bias is not penalised).

    With the centred covariances `Cxx = sxx/n` and `Cxy = sxy/n` of `stats`, and `A = Cxx + ridge · I`:

        Wᵀ = A⁻¹ Cxy,        b = μy − W μx

    solved in float64 by Cholesky on the equilibrated system `(S⁻¹ A S⁻¹)(S Wᵀ) = S⁻¹ Cxy`, `S = sqrt(diag(A))`,
    so that the result does not depend on the units of each feature dimension. When `A` is singular or numerically
    so (a Cholesky pivot of the equilibrated matrix at or below `COLLINEARITY_RTOL`: duplicated or constant feature
    dimensions, e.g. dead ReLU channels, or fewer samples than dimensions), a warning is logged and the
    pseudo-inverse solution of the equilibrated system is used instead (eigenvalues below `COLLINEARITY_RTOL` times
    the largest are dropped). It is the minimum-norm solution in standardised units: exactly duplicated dimensions
    get equal shares and constant ones zero weight.

    Memory: the working set of the fit is `stats` itself (sxx, D_in², and sxy, D_in x D_out, float64) and the
    solution (D_in x D_out float64). The factor needs no matrix of its own: `sxx` is exactly symmetric
    (`AlignerStatistics`), so the factor is written into its upper triangle while the lower one keeps the
    statistics, the right-hand side is solved in place, and the upper triangle is restored from the lower one
    afterwards (also on an error), leaving `stats` bit for bit as it was: the ridge grid of stage 3 refits the same
    statistics. The singular fallback builds the equilibrated matrix apart, and its eigendecomposition.

    Returns:
        `AlignerWeights` in float32 on the device of `stats`.
    """
    if stats.n == 0:
        raise ValueError("fit_closed_form: the statistics hold no data")
    if ridge < 0:
        raise ValueError(f"fit_closed_form: ridge must be >= 0, got {ridge}")
    sxx = stats.sxx
    diagonal = sxx.diagonal().clone()  # the factor's diagonal overwrites it
    pivots = diagonal / stats.n + ridge
    scale = pivots.sqrt()
    scale[scale == 0] = 1.0  # a constant dimension: its row and column are zero, any scale keeps them zero
    solution = stats.sxy / stats.n
    solution.div_(scale[:, None])  # the right-hand side S⁻¹ Cxy, solved in place
    try:
        # Cholesky "succeeds" on a numerically singular matrix with a tiny positive pivot and returns a huge,
        # meaningless solution; a pivot is the variance of a standardised dimension left unexplained by the previous
        # ones.
        factored = (
            _factor_in_upper(sxx, stats.n, pivots, scale) and sxx.diagonal().square().min().item() > COLLINEARITY_RTOL
        )
        if factored:
            torch.linalg.solve_triangular(sxx.mT, solution, upper=False, out=solution)  # Uᵀ Z = S⁻¹ Cxy
            torch.linalg.solve_triangular(sxx, solution, upper=True, out=solution)  # U (S Wᵀ) = Z
    finally:
        _mirror_lower(sxx)
        sxx.diagonal().copy_(diagonal)
    if not factored:
        logger.warning(
            "fit_closed_form: the feature covariance (%d dims, ridge=%g) is singular; using the minimum-norm "
            "pseudo-inverse solution. Constant or collinear feature dimensions cause this; a large enough ridge "
            "avoids it.",
            stats.in_features,
            ridge,
        )
        equilibrated = stats.sxx / stats.n
        equilibrated.diagonal().add_(ridge)
        equilibrated.div_(scale[:, None]).div_(scale)
        solution = torch.linalg.pinv(equilibrated, rtol=COLLINEARITY_RTOL, hermitian=True) @ solution
    weight = solution.div_(scale[:, None]).mT
    bias = stats.mean_y - weight @ stats.mean_x
    return AlignerWeights(weight=weight.to(torch.float32, memory_format=torch.contiguous_format), bias=bias.float())


def relative_ridge(stats: AlignerStatistics, fraction: float) -> float:
    """The ridge of `fit_closed_form` that is `fraction` of the mean variance of a feature dimension,
    `tr(Cxx) / D_in`: a grid of fractions means the same for features of any scale."""
    if stats.n == 0:
        raise ValueError("relative_ridge: the statistics hold no data")
    if fraction < 0:
        raise ValueError(f"relative_ridge: fraction must be >= 0, got {fraction}")
    return fraction * (stats.sxx.diagonal().sum() / (stats.n * stats.in_features)).item()


@torch.no_grad()
def variance_scales(x: torch.Tensor, y: torch.Tensor, target_variance: float = 4.5) -> tuple[float, float]:
    """
    The scalar normalisation of the paper's recipe: `c1 = sqrt(τ / var(X))`, `c2 = sqrt(τ / var(Y))`.

    `var` is taken over all entries of the matrix around their single mean (the original `mean(X²) − mean(X)²`),
    computed here in float64 in two passes over row chunks, so no float64 copy of the features is made.
    """

    def global_variance(t: torch.Tensor) -> float:
        chunks = t.split(_CHUNK_ROWS)
        mean = sum(chunk.sum(dtype=torch.float64) for chunk in chunks) / t.numel()
        return (sum(chunk.double().sub_(mean).square_().sum() for chunk in chunks) / t.numel()).item()

    return math.sqrt(target_variance / global_variance(x)), math.sqrt(target_variance / global_variance(y))


def fit_sgd_recipe(
    x: torch.Tensor,
    y: torch.Tensor,
    epochs: int = 70,
    lr: float = 0.01,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    batch_size: int = 100,
    t_max: int = 200,
    target_variance: float = 4.5,
    legacy_bias_scaling: bool = False,
    seed: int = 0,
) -> AlignerWeights:
    """
    The paper's aligner recipe (AgriCLIP `train_linear_aligner.py` on Text-to-Concept's `LinearAligner`).

    Features are scaled by the scalars of `variance_scales` and an `nn.Linear` (W′, b′) is fitted on
    `(c1·x) → (c2·y)` with MSE, SGD with momentum and weight decay, shuffled batches (the last one partial) and
    `CosineAnnealingLR(T_max)` stepped once per epoch. The layer is initialised by `nn.Linear` under
    `torch.manual_seed(seed)` inside a forked RNG (the global RNG is left untouched) and each epoch's order is
    `torch.randperm` from a CPU `torch.Generator` seeded with `seed`. Training runs on the device of `x`.

    The scaling fixes the variance, not the mean, and the mean direction dominates the curvature: with the defaults,
    SGD diverges once `mean(X)/std(X)` (over all entries) exceeds about `sqrt(42 · D_out / D_in)`, ≈ 3 for
    2048 → 512 (`lr · λ_max` passes `2 (1 + momentum)`). The closed form has no such failure.

    Export: the exact inverse of the scaling, `ŷ = (c2⁻¹)·(W′(c1·x) + b′)`, i.e. `W = W′·c1/c2` and `b = b′/c2`.

    `legacy_bias_scaling=True` exports `b = b′·c1/c2` as the original code does, only to reproduce the released
    aligners. It is wrong: the prediction becomes `c2⁻¹·(W′(c1·x) + c1·b′)`, so the bias is weighted `c1` times too
    much against the linear term, and after L2 normalisation the direction changes unless `c1 = 1` (i.e. unless
    `var(X)` happens to equal `target_variance`).
    """
    if x.ndim != 2 or y.ndim != 2 or x.shape[0] != y.shape[0]:
        raise ValueError(
            f"x, y: expected shapes (n, D_in) and (n, D_out) with equal n, got {tuple(x.shape)} and {tuple(y.shape)}"
        )
    c1, c2 = variance_scales(x, y, target_variance)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        linear = nn.Linear(x.shape[1], y.shape[1])
    linear.to(x.device)
    optimizer = torch.optim.SGD(linear.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=t_max)
    generator = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        epoch_loss = torch.zeros((), device=x.device)
        batches = torch.randperm(x.shape[0], generator=generator).to(x.device).split(batch_size)
        for indices in batches:
            loss = F.mse_loss(linear(x[indices] * c1), y[indices] * c2)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            epoch_loss += loss.detach()
        scheduler.step()
        logger.info("aligner SGD epoch %d: mean batch MSE (scaled) %.4f", epoch, epoch_loss.item() / len(batches))
    bias_scale = c1 / c2 if legacy_bias_scaling else 1 / c2
    return AlignerWeights(
        weight=(linear.weight.detach() * (c1 / c2)).contiguous(), bias=linear.bias.detach() * bias_scale
    )


def _feature_moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-dimension mean and standard deviation of features in memory (float64 over row chunks, returned as
    float32); a constant dimension gets standard deviation 1."""
    chunks = x.split(_CHUNK_ROWS)
    mean = sum(chunk.sum(0, dtype=torch.float64) for chunk in chunks) / x.shape[0]
    variance = sum((chunk.double() - mean).square().sum(0) for chunk in chunks) / x.shape[0]
    std = variance.sqrt()
    std[std == 0] = 1.0
    return mean.float(), std.float()


@dataclass(frozen=True)
class ContrastiveFit:
    """The head `fit_contrastive_head` trained, and its mean batch loss over the training pairs (in data order, the
    training batch size) at the start, the closed-form solution, and at the end."""

    weights: AlignerWeights
    start_loss: float
    final_loss: float


def fit_contrastive_head(
    x: torch.Tensor,
    targets: torch.Tensor,
    groups: torch.Tensor,
    start: AlignerWeights,
    logit_scale: float,
    epochs: int = 20,
    lr: float = 1e-3,
    batch_size: int = 256,
    seed: int = 0,
) -> ContrastiveFit:
    """
    A linear head on frozen features trained with image-to-text InfoNCE against frozen caption targets
    (`training.losses.CaptionTargetInfoNCE`: over the distinct targets of each batch, temperature `exp(logit_scale)`
    fixed), starting from `start` (the least-squares solution onto the same targets).

    AdamW without weight decay: the loss compares L2-normalised outputs, so it does not depend on the scale of the
    head, and decay would only shrink it (and so enlarge the steps). The head works on standardised features
    (per-dimension mean and standard deviation of `x`), so that Adam's step means the same for every feature
    dimension, and is exported back onto the raw features: `y = x Wᵀ + b`. Each epoch's order is `torch.randperm`
    from a CPU `torch.Generator` seeded with `seed`; training runs on the device of `x`, deterministically.

    Args:
        x (`torch.Tensor` of shape `(n, D_in)`): backbone features.
        targets (`torch.Tensor` of shape `(n, D_out)`): each image's caption target (normalised in the loss).
        groups (`torch.Tensor` of shape `(n,)`): int64, equal for images with the same captions.
    """
    from training.losses import CaptionTargetInfoNCE  # transformers-heavy; the rest of this module needs only torch

    if x.ndim != 2 or targets.shape != (x.shape[0], start.weight.shape[0]) or groups.shape != x.shape[:1]:
        raise ValueError(
            f"x, targets, groups: expected shapes (n, {start.weight.shape[1]}), (n, {start.weight.shape[0]}) and (n,), "
            f"got {tuple(x.shape)}, {tuple(targets.shape)} and {tuple(groups.shape)}"
        )
    if epochs < 1 or batch_size < 2:
        raise ValueError(
            f"fit_contrastive_head: epochs must be >= 1 and batch_size >= 2, got {epochs} and {batch_size}"
        )
    mean, std = (moment.to(x.device) for moment in _feature_moments(x))
    linear = nn.Linear(x.shape[1], targets.shape[1]).to(x.device)
    with torch.no_grad():
        weight = start.weight.to(x.device, torch.float32)
        linear.weight.copy_(weight * std)
        linear.bias.copy_(start.bias.to(x.device, torch.float32) + weight @ mean)
    loss_fn = CaptionTargetInfoNCE()

    def batch_loss(indices: torch.Tensor) -> torch.Tensor:
        return loss_fn(linear((x[indices] - mean) / std), targets[indices], groups[indices], logit_scale)

    @torch.no_grad()
    def mean_loss() -> float:
        batches = torch.arange(x.shape[0], device=x.device).split(batch_size)
        return sum(batch_loss(indices).item() * len(indices) for indices in batches) / x.shape[0]

    start_loss = mean_loss()
    optimizer = torch.optim.AdamW(linear.parameters(), lr=lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        epoch_loss = torch.zeros((), device=x.device)
        batches = torch.randperm(x.shape[0], generator=generator).to(x.device).split(batch_size)
        for indices in batches:
            loss = batch_loss(indices)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            epoch_loss += loss.detach()
        logger.info("contrastive head epoch %d: mean batch InfoNCE %.4f", epoch, epoch_loss.item() / len(batches))
    final_loss = mean_loss()
    with torch.no_grad():
        weight = linear.weight / std
        bias = linear.bias - weight @ mean
    return ContrastiveFit(AlignerWeights(weight=weight.contiguous(), bias=bias), start_loss, final_loss)


# ---------------------------------------------------------------------------------------------------------------
# Alignment objectives: what stage 3 fits the aligner to, by name (`create_objective`, as open_clip's create_loss).
# ---------------------------------------------------------------------------------------------------------------

# What an objective fits the backbone features onto: the CLIP image embedding of each image, or its caption target
# (the mean of the L2-normalised CLIP text embeddings of its caption variants).
TARGET_IMAGE, TARGET_TEXT = "image", "text"


@dataclass(frozen=True)
class AlignmentData:
    """The training pairs of an objective: `stats`, the `AlignerStatistics` of (features, targets) over all
    processes, and, for an objective that `needs_features`, the features themselves (`x`, `targets`, and `groups`:
    int64, equal for images with the same captions), the same on every process."""

    stats: AlignerStatistics
    x: torch.Tensor | None = None
    targets: torch.Tensor | None = None
    groups: torch.Tensor | None = None


class ImageMSE:
    """
    `image-mse`, the paper's objective: least squares onto the CLIP image embedding of each image. The closed form
    from the streamed statistics (`fit_closed_form`, with a ridge), or, given `sgd` (keyword arguments of
    `fit_sgd_recipe`), the paper's SGD recipe on the features in memory (no ridge: it has weight decay).
    """

    name = "image-mse"
    target = TARGET_IMAGE

    def __init__(self, sgd: Mapping | None = None):
        self.sgd = dict(sgd) if sgd is not None else None

    @property
    def needs_features(self) -> bool:
        return self.sgd is not None

    @property
    def has_ridge(self) -> bool:
        return self.sgd is None

    def fit(self, data: AlignmentData, ridge: float = 0.0) -> AlignerWeights:
        if self.sgd is not None:
            return fit_sgd_recipe(data.x, data.targets, **self.sgd)
        return fit_closed_form(data.stats, ridge=ridge)

    def fit_metrics(self) -> dict[str, float]:
        return {}


class TextMSE:
    """
    `text-mse`: least squares onto each image's caption target, the mean of the L2-normalised CLIP text embeddings
    of its caption variants, in closed form from the streamed statistics (`fit_closed_form`, with a ridge). With the
    same number of variants per image this is least squares on one pair per variant: `Σ_v ‖t_v − ŷ‖²` is
    `V ‖t̄ − ŷ‖²` plus a constant.
    """

    name = "text-mse"
    target = TARGET_TEXT
    needs_features = False
    has_ridge = True

    def fit(self, data: AlignmentData, ridge: float = 0.0) -> AlignerWeights:
        return fit_closed_form(data.stats, ridge=ridge)

    def fit_metrics(self) -> dict[str, float]:
        return {}


class ContrastiveAlignment:
    """
    `contrastive`: a linear head trained with image-to-text InfoNCE against the caption targets
    (`fit_contrastive_head`), started from the `text-mse` closed form with the same ridge: for when least squares,
    which weighs every output coordinate alike, is not what ranks an image's own caption first. The features are
    in memory, the same on every process, so N processes fit what one does; the head trains on `device` (default:
    where the features are). `fit_metrics` gives the InfoNCE of the last fit at its start and end.
    """

    name = "contrastive"
    target = TARGET_TEXT
    needs_features = True
    has_ridge = True

    def __init__(self, logit_scale: float, device: torch.device | str | None = None, **head_options):
        """`head_options`: `epochs`, `lr`, `batch_size` and `seed` of `fit_contrastive_head`."""
        self.options = {"logit_scale": logit_scale, **head_options}
        self.device = device
        self.result: ContrastiveFit | None = None

    def fit(self, data: AlignmentData, ridge: float = 0.0) -> AlignerWeights:
        start = fit_closed_form(data.stats, ridge=ridge)
        device = self.device if self.device is not None else data.x.device
        x, targets, groups = (tensor.to(device) for tensor in (data.x, data.targets, data.groups))
        self.result = fit_contrastive_head(x, targets, groups, start, **self.options)
        return AlignerWeights(weight=self.result.weights.weight.cpu(), bias=self.result.weights.bias.cpu())

    def fit_metrics(self) -> dict[str, float]:
        if self.result is None:
            return {}
        return {"train/infonce_start": self.result.start_loss, "train/infonce_final": self.result.final_loss}


# The one table of objectives; `modeling_agriclip.configuration_agriclip.ALIGNMENT_OBJECTIVES` (which the Hub code
# validates a config against) and `training.stage3_align.OBJECTIVES` (the light command) name the same, in order.
ALIGNMENT_OBJECTIVES = {objective.name: objective for objective in (ImageMSE, TextMSE, ContrastiveAlignment)}


def create_objective(name: str, **options):
    """The alignment objective `name` of `ALIGNMENT_OBJECTIVES`, built with its `options`."""
    if name not in ALIGNMENT_OBJECTIVES:
        raise ValueError(f"unknown alignment objective {name!r}; choose one of {list(ALIGNMENT_OBJECTIVES)}")
    return ALIGNMENT_OBJECTIVES[name](**options)


def load_aligner_file(path: str | os.PathLike, expected_shape: tuple[int, int] | None = None) -> AlignerWeights:
    """
    Reads an aligner in the official AgriCLIP / Text-to-Concept release format: a `torch.save`d dict with tensors
    `W` of shape `(D_out, D_in)` and `b` of shape `(D_out,)` (`y = x Wᵀ + b`).

    The format has one home, `modeling_agriclip.convert.load_official_aligner`: it reads with
    `torch.load(weights_only=True)` (a file that needs pickled code is refused, never executed) and raises a
    `ValueError` naming the file for missing keys or mismatched shapes.

    Args:
        path (`str` or `os.PathLike`): the `.pth` file.
        expected_shape (`tuple[int, int]`, *optional*): the `(D_out, D_in)` that `W` must have, e.g. `(512, 2048)`
            for the released DINO ResNet-50 → CLIP ViT-B aligners.
    """
    # Imported here: modeling_agriclip.convert pulls in transformers, and the numerical core above needs only torch
    # (every process of a multi-process fit, and each spawned test worker, imports this module).
    from modeling_agriclip.convert import load_official_aligner

    out_features, in_features = expected_shape if expected_shape is not None else (None, None)
    weight, bias = load_official_aligner(path, in_features=in_features, out_features=out_features)
    return AlignerWeights(weight=weight.contiguous(), bias=bias.contiguous())


def save_aligner_file(weights: AlignerWeights, path: str | os.PathLike) -> None:
    """Writes `weights` in the official `{"W", "b"}` format, atomically (a temporary file renamed over `path`)."""
    with atomic_open(path, "wb") as handle:
        torch.save({"W": weights.weight.detach().cpu().float(), "b": weights.bias.detach().cpu().float()}, handle)
