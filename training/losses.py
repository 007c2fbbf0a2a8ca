"""Training losses: the contrastive losses of the CLIP towers on the global batch (stage 1, LoRA), chosen by name
(`create_loss`; CLIP's symmetric InfoNCE and SigLIP's sigmoid loss), InfoNCE against fixed caption targets (stage 3's
contrastive alignment), and the DINO loss and DINOv2's KoLeo regulariser (stage 2).

A new contrastive loss is one `ImageTextLoss` subclass here and one row of `training.loss_table.CONTRASTIVE_LOSSES`.
"""

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
from torch import nn

from modeling_agriclip.modeling_agriclip import clip_loss, sigmoid_loss
from training.dino import cosine_schedule, teacher_entropy
from training.loss_table import CONTRASTIVE_LOSSES


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def share_of_global_batch(local_count: int, global_count: int | None = None, device=None) -> float:
    """`world_size * local_count / global_count`: the weight of this process's mean loss that makes DDP's average of
    the processes' gradients the gradient of the global-batch mean when local batches differ in size (images
    skipped as unreadable). 1 with one process or equal batches. `global_count` is summed over the processes
    (on `device`) when not given."""
    if _world_size() == 1:
        return 1.0
    if global_count is None:
        total = torch.tensor([float(local_count)], device=device)
        dist.all_reduce(total)
        global_count = total.item()
    return local_count * _world_size() / global_count


def gather_with_grad(local: torch.Tensor) -> torch.Tensor:
    """Concatenates every process's rows in process order, keeping the autograd graph to the local rows.

    Processes may hold different numbers of rows (a batch that lost unreadable images): rows are padded to the
    largest count for the collective and the padding is dropped afterwards.
    """
    counts = [torch.zeros(1, dtype=torch.long, device=local.device) for _ in range(_world_size())]
    dist.all_gather(counts, torch.tensor([len(local)], device=local.device))
    counts = [int(count) for count in counts]
    padded = nn.functional.pad(local, (0, 0, 0, max(counts) - len(local)))
    gathered = dist_fn.all_gather(padded)
    return torch.cat([rows[:count] for rows, count in zip(gathered, counts)])


class ImageTextLoss(nn.Module):
    """Base of the contrastive losses of the CLIP towers (`training.loss_table.CONTRASTIVE_LOSSES`), on the global
    batch: `loss(image_embeds, text_embeds, logit_scale, logit_bias=None, normalized=False)`, or
    `loss.output_loss(outputs)` on an `AgriCLIPOutput`, which carries the embeddings and the model's `logit_scale` and
    `logit_bias`.

    The embeddings (batch, dim) are L2-normalised here, unless the caller passes `normalized=True` for embeddings that
    already are (`AgriCLIPModel.forward` returns them so): normalising twice only costs time. Under several processes
    the local embeddings of every process are gathered with gradients (`global_batch`), so each process computes the
    loss of the whole global batch: the value equals the single-process loss on the concatenated batch, and so do the
    gradients after DDP averages them. Local batch sizes may differ between processes (e.g. after unreadable images
    were skipped). `logit_scale` (log t) is capped at `max_logit_scale` (ln 100, CLIP's bound, which open_clip applies
    to SigLIP as well); the clamp keeps the gradient below the bound.

    A subclass sets:
        objective: the `AgriCLIPConfig.contrastive_loss` a model trained with it records, i.e. how its logits read
            at inference (`"infonce"`: softmax, no bias; `"siglip"`: sigmoid with the bias).
        logit_scale_init, logit_bias_init: the published initial log t and b, which `adopt` gives a model whose config
            records another objective; `logit_bias_init = None` for a loss without a bias (the model's `logit_bias`
            then stays frozen, and `output_loss` does not pass it).
    """

    objective: str
    logit_scale_init: float
    logit_bias_init: float | None = None

    def __init__(self, max_logit_scale: float = math.log(100.0)):
        super().__init__()
        self.max_logit_scale = max_logit_scale

    @property
    def uses_logit_bias(self) -> bool:
        return self.logit_bias_init is not None

    def output_loss(self, outputs) -> torch.Tensor:
        """The loss of a model output's L2-normalised `image_embeds` and `text_embeds`, with its `logit_scale` (and
        `logit_bias`, for a loss that uses it)."""
        return self(
            outputs.image_embeds,
            outputs.text_embeds,
            outputs.logit_scale,
            outputs.logit_bias if self.uses_logit_bias else None,
            normalized=True,
        )

    def global_batch(
        self, image_embeds: torch.Tensor, text_embeds: torch.Tensor, normalized: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The checked, L2-normalised embeddings of the global batch (every process's rows, in process order)."""
        if image_embeds.ndim != 2 or image_embeds.shape != text_embeds.shape:
            raise ValueError(
                f"{type(self).__name__}: image_embeds and text_embeds must both be (batch, dim), got "
                f"{tuple(image_embeds.shape)} and {tuple(text_embeds.shape)}"
            )
        if not normalized:
            image_embeds = nn.functional.normalize(image_embeds, dim=-1)
            text_embeds = nn.functional.normalize(text_embeds, dim=-1)
        if _world_size() > 1:
            # The backward of all_gather sums the gradients that all W processes send to each local slice.
            # Every process computes the same global loss L, so each local embedding receives W * dL/dx, and
            # DDP's division by W when it averages the parameter gradients cancels that factor: the result
            # is exactly dL/dtheta of the single-process loss. logit_scale and logit_bias are not gathered: each
            # process gets the full dL/ds from its own copy of L, and the average of W equal values is dL/ds.
            image_embeds = gather_with_grad(image_embeds)
            text_embeds = gather_with_grad(text_embeds)
        return image_embeds, text_embeds

    @torch.no_grad()
    def adopt(self, model) -> bool:
        """Makes `model` (an `AgriCLIPModel`) one that this loss trains: when its config records another objective,
        its `logit_scale` (and `logit_bias`, for a loss with a bias) start from this loss's published values and the
        config records `objective`, so the saved model's logits read the way it was trained. A model already of this
        objective keeps its learned values. Returns whether the objective changed."""
        if model.config.contrastive_loss == self.objective:
            return False
        model.logit_scale.fill_(self.logit_scale_init)
        if self.uses_logit_bias:
            model.logit_bias.fill_(self.logit_bias_init)
        model.config.contrastive_loss = self.objective
        return True


class ContrastiveLoss(ImageTextLoss):
    """Symmetric InfoNCE between image and text embeddings, with a learnable temperature, on the global batch (CLIP,
    Radford et al. 2021): the mean of the image-to-text and text-to-image cross-entropies of
    `exp(logit_scale) * cos`, each pair's own caption the positive. See `ImageTextLoss` for the inputs and the global
    batch. `logit_bias` is ignored: a shift shared by a row does not change its softmax.
    """

    objective = "infonce"
    logit_scale_init = math.log(1 / 0.07)

    def forward(
        self,
        image_embeds: torch.Tensor,
        text_embeds: torch.Tensor,
        logit_scale: torch.Tensor,
        logit_bias: torch.Tensor | None = None,
        normalized: bool = False,
    ) -> torch.Tensor:
        image_embeds, text_embeds = self.global_batch(image_embeds, text_embeds, normalized)
        scale = logit_scale.clamp(max=self.max_logit_scale).exp()
        logits_per_text = scale * text_embeds @ image_embeds.t()
        return clip_loss(logits_per_text)


class SigLIPLoss(ImageTextLoss):
    """SigLIP's pairwise sigmoid loss (Zhai et al. 2023, "Sigmoid Loss for Language Image Pre-Training") on the
    global batch of N pairs: `-1/N * sum_i sum_j log sigmoid(z_ij * (t * x_i . y_j + b))`, with x_i and y_j the
    L2-normalised image and text embeddings, z_ij = 1 for a matching pair (i = j) and -1 otherwise, the learnable
    temperature t = exp(logit_scale) (initialised at 10) and bias b = logit_bias (initialised at -10).

    Each pair is a binary classification of its own, so no softmax normalises over the batch. Under several processes
    the embeddings are gathered with gradients and every process computes the whole N x N matrix (the paper's chunked
    exchange computes the same sum with less memory): the value and, after DDP's average, the gradients equal the
    single-process ones on the global batch. See `ImageTextLoss` for the inputs.
    """

    objective = "siglip"
    logit_scale_init = math.log(10.0)
    logit_bias_init = -10.0

    def forward(
        self,
        image_embeds: torch.Tensor,
        text_embeds: torch.Tensor,
        logit_scale: torch.Tensor,
        logit_bias: torch.Tensor | None = None,
        normalized: bool = False,
    ) -> torch.Tensor:
        if logit_bias is None:
            raise ValueError("SigLIPLoss: logit_bias is needed (the model's learnable bias b)")
        image_embeds, text_embeds = self.global_batch(image_embeds, text_embeds, normalized)
        scale = logit_scale.clamp(max=self.max_logit_scale).exp()
        return sigmoid_loss(scale * text_embeds @ image_embeds.t() + logit_bias)


# Registry name -> class, from the one table (`training.loss_table`), which holds the rows.
LOSSES: dict[str, type[ImageTextLoss]] = {
    name: globals()[class_name] for name, (class_name, _) in CONTRASTIVE_LOSSES.items()
}


def create_loss(name: str, **options) -> ImageTextLoss:
    """The contrastive loss registered as `name` in `training.loss_table.CONTRASTIVE_LOSSES`, built with `options`
    (e.g. `max_logit_scale`), as open_clip's `create_loss`.

    Raises:
        ValueError: for a name the table does not hold, naming those it does.
    """
    if name not in LOSSES:
        raise ValueError(f"unknown contrastive loss {name!r}; choose one of: {', '.join(LOSSES)}")
    return LOSSES[name](**options)


class CaptionTargetInfoNCE(nn.Module):
    """Image-to-text InfoNCE of image embeddings against fixed text targets, over the distinct targets of the batch
    (stage 3's contrastive alignment; the text side is frozen, so only the image side learns).

    `groups` says which images share their captions (and so their target): the batch's targets are reduced to one
    per group, and each image's cross-entropy runs over those distinct targets with its own as the positive. An
    image is thus never pushed away from its own caption because another image of the batch has the same one, as
    template captions ("a photo of a healthy tomato leaf") make common. Image-to-text only: zero-shot classification
    ranks texts for an image. Both sides are L2-normalised here. The temperature is fixed: `logit_scale` is its log,
    capped at `max_logit_scale` as in CLIP. Computed on the local batch only (no gathering across processes).
    """

    def __init__(self, max_logit_scale: float = math.log(100.0)):
        super().__init__()
        self.max_logit_scale = max_logit_scale

    def forward(
        self, image_embeds: torch.Tensor, text_targets: torch.Tensor, groups: torch.Tensor, logit_scale: float
    ) -> torch.Tensor:
        if image_embeds.ndim != 2 or image_embeds.shape != text_targets.shape or groups.shape != image_embeds.shape[:1]:
            raise ValueError(
                "CaptionTargetInfoNCE: image_embeds and text_targets must both be (batch, dim) and groups (batch,), got "
                f"{tuple(image_embeds.shape)}, {tuple(text_targets.shape)} and {tuple(groups.shape)}"
            )
        distinct, positive = torch.unique(groups, return_inverse=True)
        rows = torch.arange(len(groups), device=groups.device)
        # One target per group: that of the group's first image in the batch.
        first = torch.full((len(distinct),), len(groups), device=groups.device).scatter_reduce(
            0, positive, rows, "amin"
        )
        texts = nn.functional.normalize(text_targets[first], dim=-1)
        scale = math.exp(min(float(logit_scale), self.max_logit_scale))
        logits = scale * nn.functional.normalize(image_embeds, dim=-1) @ texts.t()
        return nn.functional.cross_entropy(logits, positive)


@dataclass
class DINOLossOutput:
    """DINO loss with the detached collapse indicators of the same step (DINO paper §5.3, Fig. 7).

    teacher_entropy: mean entropy of the teacher's centred, sharpened distributions (nats).
    teacher_student_kl: mean KL(teacher || student) over the loss's view pairs. The cross-entropy of each
    pair is the teacher entropy plus this KL, and every teacher view enters the same number of pairs, so it
    is `loss - teacher_entropy` at no extra cost.
    """

    loss: torch.Tensor
    teacher_entropy: torch.Tensor
    teacher_student_kl: torch.Tensor


class DINOLoss(nn.Module):
    """DINO self-distillation loss with centring and sharpening (facebookresearch/dino main_dino.DINOLoss).

    `student_output` stacks the `num_crops` views by chunks of the batch, the 2 global views first, and
    `teacher_output` stacks the teacher's outputs on the same 2 global views: (num_crops * B, out_dim) and
    (2 * B, out_dim). The loss averages, over every pair of teacher global view iq and student view v != iq,
    the cross-entropy between softmax((teacher - centre) / teacher_temp) and log_softmax(student / student_temp).
    After the loss, the centre moves towards the mean teacher output of the global batch (all processes).
    Under several processes each returned value is weighted by the process's share of the global batch, so that
    the mean over processes (DDP's gradient average, a logged mean) is that of the global batch.

    The teacher temperature warms up linearly from `warmup_teacher_temp` to `teacher_temp` over the first
    `warmup_teacher_temp_steps` of the run's `num_steps` optimizer steps (`training.dino.cosine_schedule`; DINO
    steps it once per epoch), and stays at `teacher_temp` after.
    """

    def __init__(
        self,
        out_dim: int,
        num_crops: int,
        num_steps: int,
        warmup_teacher_temp: float = 0.04,
        teacher_temp: float = 0.04,
        warmup_teacher_temp_steps: int = 0,
        student_temp: float = 0.1,
        center_momentum: float = 0.9,
    ):
        super().__init__()
        if num_crops < 2:
            raise ValueError(f"DINOLoss: num_crops must count the 2 global crops, got {num_crops}")
        if warmup_teacher_temp_steps > num_steps:
            raise ValueError(
                f"DINOLoss: warmup_teacher_temp_steps ({warmup_teacher_temp_steps}) exceeds num_steps ({num_steps})"
            )
        self.num_crops = num_crops
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim))
        # A cosine from a value to itself is constant: the warm-up, then teacher_temp.
        self.teacher_temp_schedule = cosine_schedule(
            teacher_temp, teacher_temp, num_steps, warmup_teacher_temp_steps, start_warmup_value=warmup_teacher_temp
        )

    def forward(self, student_output: torch.Tensor, teacher_output: torch.Tensor, step: int) -> DINOLossOutput:
        if (
            student_output.shape[0] % self.num_crops
            or teacher_output.shape[0] * self.num_crops != 2 * student_output.shape[0]
        ):
            raise ValueError(
                f"DINOLoss: expected student_output ({self.num_crops} * B, out_dim) and teacher_output (2 * B, out_dim), "
                f"got {tuple(student_output.shape)} and {tuple(teacher_output.shape)}"
            )
        if not 0 <= step < len(self.teacher_temp_schedule):
            raise ValueError(
                f"DINOLoss: step {step} is outside the teacher temperature schedule of {len(self.teacher_temp_schedule)} steps"
            )
        # float32 whatever the autocast dtype: sums over 65,536 prototypes lose too much in half precision.
        student_log_probs = nn.functional.log_softmax(student_output.float() / self.student_temp, dim=-1)
        student_log_probs = student_log_probs.unflatten(0, (self.num_crops, -1))
        teacher_temp = float(self.teacher_temp_schedule[step])
        teacher_probs = nn.functional.softmax((teacher_output.detach().float() - self.center) / teacher_temp, dim=-1)
        teacher_probs = teacher_probs.unflatten(0, (2, -1))
        # Sum over student views v != iq of log p_v = (sum over all views) - log p_iq: every pair in two
        # elementwise products instead of a loop over 2 * (num_crops - 1) pairs.
        other_views = student_log_probs.sum(dim=0) - student_log_probs[:2]
        cross_entropy = -(teacher_probs * other_views).sum(dim=-1).mean(dim=-1).sum()
        loss = cross_entropy / (2 * (self.num_crops - 1))
        entropy = teacher_entropy(teacher_probs)
        share = share_of_global_batch(teacher_output.shape[0], global_count=self.update_center(teacher_output))
        return DINOLossOutput(
            loss=loss * share, teacher_entropy=entropy * share, teacher_student_kl=(loss.detach() - entropy) * share
        )

    @torch.no_grad()
    def update_center(self, teacher_output: torch.Tensor) -> int:
        """EMA of the centre towards the mean teacher output over the batches of all processes; returns the
        number of teacher rows of all processes."""
        rows = teacher_output.new_tensor([teacher_output.shape[0]], dtype=torch.float32)
        total = torch.cat([teacher_output.float().sum(dim=0), rows])
        if _world_size() > 1:
            dist.all_reduce(total)
        batch_center, count = total[:-1].unsqueeze(0), total[-1]
        self.center.mul_(self.center_momentum).add_(batch_center / count, alpha=1.0 - self.center_momentum)
        return int(count.item())


class KoLeoLoss(nn.Module):
    """DINOv2's KoLeo regulariser (Oquab et al. 2023, dinov2/loss/koleo_loss.py; Sablayrolles et al. 2019): the
    Kozachenko-Leonenko estimator of the differential entropy of a batch of features, negated.

    What it is for: minimising it spreads the L2-normalised features of a batch uniformly over the sphere, by pushing
    each feature away from its nearest neighbour in the batch. DINOv2 adds it to the self-distillation loss (weight
    0.1, on the student's CLS token of each global crop); it counters the features bunching together, as they do when
    the teacher's outputs stay uniform or collapse, which short runs on little data show.

    For `features` of shape (batch, dim), each row is L2-normalised (eps 1e-8), its nearest other row of the batch
    found by the largest dot product, and d_i is the distance between the two (`pairwise_distance`, eps 1e-8); the
    loss is -mean_i log(d_i + eps). A batch of identical rows gives -log(eps (sqrt(dim) + 1)), about 17 to 15 for dim
    4 to 1,000 (`pairwise_distance` adds eps to the difference); one of orthonormal rows -log(sqrt 2). The rows' own
    dot products are excluded with -inf where DINOv2 writes -1, which would let a row whose only other rows lie at
    exactly -1 (a pair x, -x) pick itself. Computed on the local batch in float32 at least, with autocast off (as
    DINOv2); the neighbours are chosen without gradient, the distances carry it.
    """

    def __init__(self, eps: float = 1e-8):
        super().__init__()
        self.eps = eps

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if features.ndim != 2 or features.shape[0] < 2:
            raise ValueError(
                f"KoLeoLoss: features must be (batch, dim) with a batch of at least 2 rows (each row needs a "
                f"neighbour), got {tuple(features.shape)}"
            )
        with torch.autocast(features.device.type, enabled=False):
            features = nn.functional.normalize(
                features.to(torch.promote_types(features.dtype, torch.float32)), p=2, dim=-1, eps=self.eps
            )
            with torch.no_grad():
                dots = features @ features.t()
                dots.fill_diagonal_(float("-inf"))
                neighbours = dots.argmax(dim=1)
            distances = nn.functional.pairwise_distance(features, features[neighbours], p=2, eps=self.eps)
            return -torch.log(distances + self.eps).mean()
