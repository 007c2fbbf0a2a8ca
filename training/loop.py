"""The training loop every stage shares (stage 1, stage 2, LoRA; stage 3 fits in closed form and needs none).

`train_loop` owns what is the same everywhere: the batches of the run from where it stands (`resumable_batches`:
exact resume, unreadable batches skipped on every process), the optimizer step under gradient accumulation with its
learning rate from the schedule (`train_step`: finite-loss check, clipping), the count of optimizer steps, the
progress bar, the throughput, the logs, preemption and the periodic checkpoints. A stage gives only what is its own,
as functions of the batch and of the step:

- `compute_loss(batch)`: the loss (or an output holding it as `.loss`) of one batch;
- `prepare(batch, step)`: what the loss reads, made from the loader's batch (stage 1's crops, stage 2's views,
  teacher output and weight decay);
- `before_optimizer_step(step)`: between clipping and the optimizer step (DINO freezes its last layer there);
- `step_logs(output, step)`: the stage's values once the optimizer has stepped (stage 2's teacher update is there),
  validation included, merged into the logged row with the learning rate and the throughput;
- `check(logs)`: a verdict on the logged row (stage 2's collapse guard raises there).

`step` is the number of optimizer steps done before the current one: the index into every schedule.

`run_resumable` starts such a run: the Accelerator, the checkpoints, the run folder's lock and the SIGTERM handler.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from accelerate import Accelerator
from tqdm.auto import tqdm

from training.runtime import (
    CheckpointManager,
    PreemptionGuard,
    RunLock,
    TrainingPosition,
    exit_on_sigterm,
    make_accelerator,
    resumable_batches,
    train_step,
)


def run_resumable(args, run_name: str, resume_hint: str, train: Callable[..., Path]) -> Path:
    """`train(args, accelerator, checkpoints)` as run `run_name` in `args.output_dir`: one run at a time in the
    folder, checkpoints kept per `args.keep_checkpoints`, and a SIGTERM answered by saying what is saved and how
    to go on (`resume_hint`, in the caller's words). Returns what `train` returns."""
    accelerator = make_accelerator(args, run_name)
    checkpoints = CheckpointManager(accelerator, args.output_dir, keep=args.keep_checkpoints, resume_hint=resume_hint)
    with (
        RunLock(args.output_dir, accelerator.print, accelerator.is_main_process),
        exit_on_sigterm(checkpoints.describe_saved, accelerator.print),
    ):
        return train(args, accelerator, checkpoints)


def loss_logs(output, step: int) -> dict:
    """The logs of a stage whose loss is all it reports."""
    return {"loss": output.item()}


def train_loop(
    accelerator: Accelerator,
    model,
    optimizer,
    loader,
    *,
    position: TrainingPosition,
    checkpoints: CheckpointManager,
    max_steps: int,
    lr_schedule: Sequence[float],
    max_grad_norm: float,
    checkpoint_every: int,
    data,
    description: str,
    compute_loss: Callable,
    prepare: Callable | None = None,
    before_optimizer_step: Callable[[int], None] | None = None,
    step_logs: Callable[[object, int], Mapping] = loss_logs,
    check: Callable[[Mapping], None] | None = None,
) -> None:
    """Trains `model` from `position` until `max_steps` optimizer steps are done, logging one row per step.

    `data` names the training data in the error of an epoch without a readable image; `description` labels the
    progress bar. The row of step n (logged at step n) holds `step_logs`' values, the learning rate the step took
    and the training samples per second of this segment (all processes). Checkpoints follow
    `checkpoints.after_step` (every `checkpoint_every` steps, at the end, and on preemption).
    """
    progress = tqdm(
        total=max_steps, initial=position.step, desc=description, disable=not accelerator.is_local_main_process
    )
    samples, started = 0, time.perf_counter()
    with PreemptionGuard(accelerator) as preemption:
        for batch in resumable_batches(loader, accelerator, position, max_steps, data):
            step = position.step
            samples += len(batch["pixel_values"]) * accelerator.num_processes
            inputs = batch if prepare is None else prepare(batch, step)
            output = train_step(
                accelerator,
                model,
                optimizer,
                lambda: compute_loss(inputs),
                float(lr_schedule[step]),
                max_grad_norm,
                position,
                checkpoints,
                before_optimizer_step=None if before_optimizer_step is None else lambda: before_optimizer_step(step),
            )
            if not accelerator.sync_gradients:
                continue
            throughput = samples / (time.perf_counter() - started)
            logs = {**step_logs(output, step), "lr": float(lr_schedule[step]), "samples_per_second": throughput}
            position.step += 1
            progress.update(1)
            progress.set_postfix(loss=f"{logs['loss']:.4f}")
            accelerator.log(logs, step=position.step)
            if check is not None:
                check(logs)
            checkpoints.after_step(position, checkpoint_every, max_steps, preemption)
    progress.close()
