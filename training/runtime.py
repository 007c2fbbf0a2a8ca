"""What every Accelerate training script of AgriCLIP shares: the Accelerator, checkpoints that are never
half-written and resume exactly, atomic exports, the run lock, SIGTERM handling and the finite-loss guard.

A script parses its options with `training.options` (flags, `--config` values), and keeps its own loop;
the loop records where it is in a `TrainingPosition`, which `CheckpointManager` saves with the accelerate state
and the run's options (a resume with other options is refused unless allowed).

A script's `main` holds the output folder's `RunLock` and runs inside `exit_on_sigterm` (SIGTERM stops at once,
saying what is saved), with a `PreemptionGuard` around its training steps (SIGTERM checkpoints at the next step).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shlex
import shutil
import signal
import socket
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.tracking import GeneralTracker, on_main_process
from accelerate.utils import (
    DataLoaderConfiguration,
    DistributedType,
    InitProcessGroupKwargs,
    ProjectConfiguration,
    gather_object,
    load,
    set_seed,
)
from safetensors import safe_open
from tqdm.auto import tqdm

from agriclip.atomic import replace_folder, write_json_atomically
from agriclip.images import DecodeStats, counted
from training.options import RESUME_HINT
from training.sharding import enable_fsdp_on_cpu, plain_class


logger = get_logger(__name__)

TRAINER_STATE = "trainer_state.json"
CHECKPOINT_PREFIX = "checkpoint-"
# The options a checkpoint was written under (`run_options`), beside its trainer state.
RUN_OPTIONS = "run_options.json"
# Exit status of a run stopped by SIGTERM, as a shell reports a process the signal killed.
SIGTERM_EXIT_CODE = 128 + signal.SIGTERM
# Options a resume may change: where a run writes and how it reports, not what it computes. Scripts add their own
# (validation and k-NN data, publishing flags) through `run_options(neutral=...)`.
RESULT_NEUTRAL_OPTIONS = frozenset(
    {
        "output_dir",
        "resume",
        "allow_changed_config",
        "log_with",
        "num_workers",
        "checkpoint_every",
        "keep_checkpoints",
        "eval_every",
    }
)


# Entries of the tracker configuration that describe the segment of a run (see `init_run_trackers`), not an option.
SEGMENT_KEYS = ("start_step", "resumed_from")


class JSONLinesTracker(GeneralTracker):
    """Appends every logged step to `<logging_dir>/<run>/metrics.jsonl`: readable without any tracker installed.

    Each start of the run, from scratch or resumed (a segment), appends its start step, the checkpoint it resumed
    from and its options to `segments.jsonl`; `config.json` holds the options the run started from scratch with and
    is never rewritten by a resume, so no segment's record is lost.
    """

    name = "jsonl"
    requires_logging_directory = True

    def __init__(self, run_name: str, logging_dir: str | os.PathLike):
        # No process-state access here: the tracker is built before the Accelerator sets up the processes.
        super().__init__(_blank=True)
        self.path = Path(logging_dir) / run_name / "metrics.jsonl"

    @property
    def tracker(self):
        return self.path

    @on_main_process
    def store_init_configuration(self, values: dict):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        options = {key: value for key, value in values.items() if key not in SEGMENT_KEYS}
        segment = {key: values[key] for key in SEGMENT_KEYS if key in values}
        record = {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **segment, "options": options}
        with open(self.path.with_name("segments.jsonl"), "a") as handle:
            handle.write(json.dumps(record) + "\n")
        if not segment.get("resumed_from"):
            write_json_atomically(self.path.with_name("config.json"), options)

    @on_main_process
    def log(self, values: dict, step: int | None = None, **kwargs):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as handle:
            handle.write(json.dumps({"step": step, **values}) + "\n")


def make_accelerator(args, run_name: str) -> Accelerator:
    """The Accelerator of a run: launcher precision unless overridden, seedable sampling for exact resume, and
    trackers (metrics.jsonl always; tensorboard when installed, or those named by --log-with)."""
    output_dir = Path(args.output_dir)
    log_with = [JSONLinesTracker(run_name, output_dir / "logs")]
    if args.log_with == "auto":
        log_with += ["tensorboard"] if importlib.util.find_spec("tensorboard") else []
    elif args.log_with != "none":
        log_with += args.log_with.split(",")
    accelerator = Accelerator(
        gradient_accumulation_steps=getattr(args, "gradient_accumulation_steps", 1),
        mixed_precision=args.mixed_precision,
        log_with=log_with,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        kwargs_handlers=deepspeed_on_cpu_kwargs(),
    )
    enable_fsdp_on_cpu(accelerator)
    check_world_size(accelerator)
    set_seed(args.seed)
    return accelerator


def deepspeed_on_cpu_kwargs() -> list[InitProcessGroupKwargs]:
    """gloo for a DeepSpeed launch (ACCELERATE_USE_DEEPSPEED=true) on a machine without CUDA; nothing otherwise.

    Accelerate 1.16 (accelerate/state.py, `PartialState.__init__`) takes the process group's backend from the device
    (`_prepare_backend`): without an accelerator it has none, so it initialises DeepSpeed's processes with no backend
    and then counts a single process (`if self.backend is None`). Given `backend="gloo"`, it initialises them over
    gloo (`deepspeed.comm.init_distributed(dist_backend="gloo")`), and DeepSpeed runs on its CPU accelerator. The
    launch must leave ACCELERATE_USE_CPU unset: with it Accelerate runs a DeepSpeed config as plain DDP (see
    training/sharding.py)."""
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true" and not torch.cuda.is_available():
        return [InitProcessGroupKwargs(backend="gloo")]
    return []


def check_world_size(accelerator: Accelerator) -> None:
    """Refuses processes that a launcher started together but Accelerate runs one by one.

    torchrun on CPU starts N processes (and may initialise torch.distributed) while Accelerate falls back to a single
    process (an FSDP2 config on CPU processes runs sharded: `training.sharding.enable_fsdp_on_cpu`; a DeepSpeed one
    runs over gloo: `deepspeed_on_cpu_kwargs`): the contrastive loss would
    still gather across processes, but gradients would not be synchronised and every process would write the same
    checkpoints.
    """
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    grouped = torch.distributed.get_world_size() if distributed else 1
    if accelerator.num_processes == 1 and max(launched, grouped) > 1:
        raise RuntimeError(
            f"{max(launched, grouped)} processes were launched together (WORLD_SIZE={launched}, torch.distributed "
            f"{'initialised with ' + str(grouped) + ' processes' if distributed else 'not initialised'}) but "
            f"Accelerate runs each alone (distributed type {accelerator.distributed_type}): gradients would not be "
            "synchronised and every process would write the same checkpoints. For CPU processes set "
            "ACCELERATE_USE_CPU=1 and launch with `accelerate launch --multi_gpu --num_processes N` or with an FSDP2 "
            "config (training/configs/fsdp2.yaml; torchrun alone leaves Accelerate single-process on CPU), or with "
            "a DeepSpeed config and ACCELERATE_USE_CPU unset; on GPUs, check that every process sees a device."
        )


def run_options(args, accelerator: Accelerator, neutral=()) -> dict:
    """The options that decide a run's result, as JSON values: every flag but `RESULT_NEUTRAL_OPTIONS` and
    `neutral`, with the number of processes and the precision Accelerate runs under (the launcher may choose
    them). Saved with each checkpoint and compared on resume."""
    options = {key: value for key, value in asdict(args).items() if key not in RESULT_NEUTRAL_OPTIONS | set(neutral)}
    options |= {"num_processes": accelerator.num_processes, "mixed_precision": str(accelerator.mixed_precision)}
    return json.loads(json.dumps(options, default=str))


def option_changes(before: dict, after: dict) -> list[str]:
    """`--name: old -> new` for each option that differs (absent on one side: `(none)`)."""

    def shown(options, key):
        return str(options[key]) if key in options else "(none)"

    def flag(key):
        return "processes" if key == "num_processes" else "--" + key.replace("_", "-")

    return [
        f"{flag(key)}: {shown(before, key)} -> {shown(after, key)}"
        for key in sorted(before.keys() | after.keys())
        if before.get(key) != after.get(key)
    ]


def init_run_trackers(
    accelerator: Accelerator,
    run_name: str,
    args,
    start_step: int = 0,
    resumed_from: str | os.PathLike | None = None,
) -> None:
    """Starts the run's trackers with its scalar options as the run configuration, the precision and number of
    processes the launcher chose, and the segment: the step it starts at and the checkpoint it resumed from (see
    `JSONLinesTracker`)."""
    config = {key: value for key, value in asdict(args).items() if isinstance(value, (int, float, str, bool))}
    config |= {"mixed_precision": str(accelerator.mixed_precision), "num_processes": accelerator.num_processes}
    config |= {"start_step": start_step, "resumed_from": str(resumed_from or "")}
    accelerator.init_trackers(run_name, config=config)


@dataclass
class TrainingPosition:
    """Where a run stands: optimizer steps done, the current epoch, and the batches of it already consumed."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0

    def next_epoch(self) -> None:
        self.epoch += 1
        self.batch_in_epoch = 0


def train_step(
    accelerator: Accelerator,
    model,
    optimizer,
    compute_loss,
    learning_rate: float,
    max_grad_norm: float,
    position: TrainingPosition,
    checkpoints: "CheckpointManager",
    before_optimizer_step=None,
):
    """One forward/backward pass under gradient accumulation; the optimizer steps when gradients are in sync.

    `compute_loss()` returns the loss, or an output that holds it as `.loss`; either is returned. The loss is
    checked before backward, so a NaN or infinite loss never reaches the weights. Gradients are clipped to
    `max_grad_norm` (0 disables); `before_optimizer_step()` runs between clipping and the step (DINO cancels the
    last layer's gradients there).
    """
    with accelerator.accumulate(model):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate
        outcome = compute_loss()
        loss = outcome if isinstance(outcome, torch.Tensor) else outcome.loss
        check_finite(loss, position, checkpoints)
        accelerator.backward(loss)
        if accelerator.sync_gradients and max_grad_norm > 0:
            # The optimizer's parameters rather than model.parameters(): walking the whole module tree every step,
            # frozen towers included, cost stage 1 2% of its throughput. Accelerate recognises an FSDP model by
            # its full parameter list.
            if accelerator.distributed_type == DistributedType.FSDP:
                parameters = model.parameters()
            else:
                parameters = [parameter for group in optimizer.param_groups for parameter in group["params"]]
            accelerator.clip_grad_norm_(parameters, max_grad_norm)
        if before_optimizer_step is not None:
            before_optimizer_step()
        optimizer.step()
        optimizer.zero_grad()
    return outcome


def readable_on_every_process(batch, accelerator: Accelerator) -> bool:
    """False when no image of this batch could be read (`agriclip.images.counted` yields None) on any process.

    All processes must skip such a batch together: one that went on would wait forever in a collective (the
    gradient all-reduce, a gather) that the skipping process never joins.
    """
    if accelerator.num_processes == 1:
        return batch is not None
    flag = torch.tensor([float(batch is None)], device=accelerator.device)
    unreadable_on = int(accelerator.reduce(flag, reduction="sum").item())
    if unreadable_on:
        logger.warning(
            f"a batch is skipped on all {accelerator.num_processes} processes: {unreadable_on} of them could "
            "read none of its images, so the readable images of the others are left out of this step"
        )
    return not unreadable_on


def batch_outputs(
    loader,
    accelerator: Accelerator,
    outputs: Callable[[dict], dict[str, torch.Tensor]],
    gather: bool = False,
    description: str | None = None,
) -> Iterator[dict[str, torch.Tensor]]:
    """Yields `outputs(batch)`, run under `torch.no_grad`, for every batch of `loader` (a DataLoader over an
    `agriclip.images.DecodingCollator`, whose decode reports `counted` merges).

    With `gather`, each output holds the rows of every process (`gather_for_metrics`: a prepared loader's padding is
    dropped), and a batch that some process could not read at all is skipped by every process
    (`readable_on_every_process`); without, the outputs are this process's own and only its unreadable batches are
    skipped. With `description`, a progress bar on the local main process counts the batches.
    """
    batches = counted(loader)
    if description is not None:
        batches = tqdm(batches, desc=description, total=len(loader), disable=not accelerator.is_local_main_process)
    for batch in batches:
        if not (readable_on_every_process(batch, accelerator) if gather else batch is not None):
            continue
        with torch.no_grad():
            result = outputs(batch)
        yield {key: accelerator.gather_for_metrics(value) for key, value in result.items()} if gather else result


def embed_batches(
    loader, accelerator: Accelerator, outputs: Callable[[dict], dict[str, torch.Tensor]], gather: bool = False
) -> dict[str, torch.Tensor]:
    """Each output of `batch_outputs` concatenated over the batches, in loader order (of every process in turn with
    `gather`); empty when no batch could be read."""
    chunks = {}
    for result in batch_outputs(loader, accelerator, outputs, gather):
        for key, value in result.items():
            chunks.setdefault(key, []).append(value)
    return {key: torch.cat(values) for key, values in chunks.items()}


def process_rows(accelerator: Accelerator, batch_size: int) -> tuple[torch.Tensor, int]:
    """Where this process's images sit in the global batch, and the global batch size.

    The prepared DataLoader hands process p the p-th of every `num_processes` consecutive batches of the sampler,
    so the global batch is the processes' batches in process order, as one process with a batch `num_processes`
    times larger would see it. Local sizes can differ once unreadable images were skipped. The augmentations draw
    their parameters for the global batch and apply this process's rows (`training.dino.MultiCropAugmentation`,
    `training.dino.CropAndFlip`).
    """
    if accelerator.num_processes == 1:
        return torch.arange(batch_size), batch_size
    sizes = accelerator.gather(torch.tensor([batch_size], device=accelerator.device)).tolist()
    first = sum(sizes[: accelerator.process_index])
    return torch.arange(first, first + batch_size), sum(sizes)


def decode_totals(accelerator: Accelerator, stats: DecodeStats) -> DecodeStats:
    """The images decoded and skipped by all processes together (every process must call it)."""
    total = DecodeStats()
    for state in gather_object([stats.to_dict()]) if accelerator.num_processes > 1 else [stats.to_dict()]:
        total += DecodeStats.from_dict(state)
    return total


def report_decode_stats(accelerator: Accelerator, stats: DecodeStats) -> None:
    """Prints, on the main process, the images decoded and skipped by all processes together."""
    total = decode_totals(accelerator, stats)
    if total.num_skipped:
        accelerator.print(total.summary())


class UnreadableDataError(RuntimeError):
    """A whole epoch held no batch with a readable image: the run cannot make progress."""


def run_steps(args, loader) -> tuple[int, int]:
    """The optimizer steps of one epoch of the prepared `loader` and of the whole run: `--max-steps` when given, else
    `--epochs` epochs (a run longer than its epochs goes on into the next). The schedules of stages 1 and 2 and LoRA
    span the run's steps (`training.dino.cosine_schedule`)."""
    steps_per_epoch = math.ceil(len(loader) / args.gradient_accumulation_steps)
    return steps_per_epoch, args.max_steps or args.epochs * steps_per_epoch


def resumable_batches(loader, accelerator: Accelerator, position: TrainingPosition, max_steps: int, data):
    """The batches of a run from `position` on, epoch after epoch, until `max_steps` optimizer steps are done.

    Counts the batches of the current epoch in `position` (the loop counts optimizer steps); a resumed run skips
    the batches its epoch had already consumed, so it sees exactly what the uninterrupted run saw. The collator
    learns the epoch before the epoch's iterator starts (its caption draws depend on it). The loader's collator
    counts the unreadable images (`agriclip.images.counted`); a batch with no readable image on some process is
    skipped by every process.

    Raises:
        UnreadableDataError: naming `data` (the training data, for the message) and the decode summary, when an
            epoch yields no batch at all: every image deleted or corrupt (the loop would otherwise spin forever).
    """
    while position.step < max_steps:
        loader.set_epoch(position.epoch)
        loader.collate_fn.epoch = position.epoch
        whole_epoch, yielded = position.batch_in_epoch == 0, False
        batches = accelerator.skip_first_batches(loader, position.batch_in_epoch) if position.batch_in_epoch else loader
        for batch in counted(batches):
            position.batch_in_epoch += 1
            if not readable_on_every_process(batch, accelerator):
                continue
            yielded = True
            yield batch
            if position.step >= max_steps:
                return
        if whole_epoch and not yielded:
            raise unreadable_epoch(loader, accelerator, position, data)
        position.next_epoch()


def unreadable_epoch(loader, accelerator: Accelerator, position: TrainingPosition, data) -> UnreadableDataError:
    """The error of an epoch that yielded no batch, with the decode summary of all processes."""
    if position.batch_in_epoch == 0:
        what = f"epoch {position.epoch} has no batch at all ({len(loader.dataset)} rows, fewer than one global batch)"
    else:
        what = f"no batch of epoch {position.epoch} ({position.batch_in_epoch} batches) holds a readable image"
    summary = decode_totals(accelerator, loader.collate_fn.stats).summary()
    return UnreadableDataError(
        f"{data}: {what}, so training cannot go on; check that the images exist and decode, then run again.\n{summary}"
    )


def dataloader_generator(seed: int) -> torch.Generator:
    """The DataLoader's own generator. Without it each new iterator (every epoch, and a resumed one) draws its
    worker seed from the global RNG, which the resumed run would then consume at a different point than the
    uninterrupted run, so augmentations and caption draws would differ after a resume."""
    return torch.Generator().manual_seed(seed)


@contextmanager
def exit_on_sigterm(saved: Callable[[], str], say: Callable[[str], None] = print):
    """SIGTERM (a cluster preempting or cancelling the job) stops the run at once with `SIGTERM_EXIT_CODE`,
    printing `saved()`: what the stop leaves and how to continue, asked when the signal comes.

    Wraps a script's whole run. Validation, k-NN, feature extraction, evaluation and exports have no point at which
    a checkpoint could be written part-way, so stopping promptly is all a preempted job can do there; the
    `PreemptionGuard` entered around the training steps instead defers the signal to the next optimizer step.
    Restores the previous handler on exit.
    """

    def stop(signum, frame):
        say(f"SIGTERM received: stopped; {saved()}")
        raise SystemExit(SIGTERM_EXIT_CODE)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        restore_sigterm_handler(previous)


def restore_sigterm_handler(previous) -> None:
    """Puts back the handler `signal.signal` returned (None: one installed outside Python, put back as the default)."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


class PreemptionGuard:
    """Around the training loop, turns SIGTERM into a checkpoint at the next optimizer step.

    `with PreemptionGuard(accelerator) as preemption:` installs a handler that only records the request: the loop
    asks `requested()` after each optimizer step (`CheckpointManager.after_step`), saves a checkpoint and exits, so
    no state is written halfway through a step. Under several processes a request seen by any process stops all
    of them at the same step. A periodic evaluation inside the loop (`--eval-every`) runs under the guard too: a
    SIGTERM during it is honoured at the end of that step, with a checkpoint. Leaving the block restores the
    previous handler (that of `exit_on_sigterm`), and a request that came after the last step's check is passed on
    to it.
    """

    def __init__(self, accelerator: Accelerator):
        self.accelerator = accelerator
        self._received = False
        self._previous = signal.SIG_DFL

    def __enter__(self) -> "PreemptionGuard":
        self._previous = signal.signal(signal.SIGTERM, self._on_signal)
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        restore_sigterm_handler(self._previous)
        if self._received and exc_type is None:
            signal.raise_signal(signal.SIGTERM)

    def _on_signal(self, signum, frame) -> None:
        self._received = True

    def requested(self) -> bool:
        if self.accelerator.num_processes == 1:
            return self._received
        flag = torch.tensor([float(self._received)], device=self.accelerator.device)
        return bool(self.accelerator.reduce(flag, reduction="sum").item())

    def stop(self, checkpoints: "CheckpointManager", position: "TrainingPosition") -> None:
        """Saves a checkpoint of `position`, says where and how to continue, and exits with `SIGTERM_EXIT_CODE`."""
        saved = checkpoints.save(position)
        self.accelerator.print(
            f"SIGTERM received: checkpoint of step {position.step} written to {saved}; {checkpoints.resume_hint}"
        )
        self.accelerator.end_training()
        raise SystemExit(SIGTERM_EXIT_CODE)


class RunLockedError(RuntimeError):
    """Another run, alive, holds the output folder."""


class RunLock:
    """`<output_dir>/run.lock`: a second run writing the same output folder while the first is alive is refused.

    `with RunLock(output_dir):` around a run; only the main process takes it (`active`), from the start of the run
    to its end. The file names its holder: pid, host, start time and command. A lock whose process is gone (same
    host, no such pid: a run killed by SIGKILL or a power cut) is stale and taken over with a message; a lock held
    by another host cannot be checked from here, so it is refused like a live one.
    """

    NAME = "run.lock"

    def __init__(self, output_dir: str | os.PathLike, say: Callable[[str], None] = print, active: bool = True):
        self.path = Path(output_dir) / self.NAME
        self.say = say
        self.active = active

    def __enter__(self) -> "RunLock":
        if self.active:
            self._acquire()
        return self

    def __exit__(self, *exc_info) -> None:
        if self.active:
            self.path.unlink(missing_ok=True)

    def _acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        holder = {
            "pid": os.getpid(),
            "hostname": socket.gethostname(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "command": shlex.join(sys.argv),
        }
        while True:
            try:
                descriptor = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                self._take_over_if_stale()
                continue
            with os.fdopen(descriptor, "w") as handle:
                json.dump(holder, handle)
            return

    def _take_over_if_stale(self) -> None:
        """Removes the lock of a run that is gone; raises `RunLockedError` naming a live (or unverifiable) holder."""
        try:
            holder = json.loads(self.path.read_text())
            pid, host = int(holder["pid"]), str(holder["hostname"])
            described = f"pid {pid} on {host}, started {holder.get('started')}: {holder.get('command')}"
        except FileNotFoundError:
            return  # released meanwhile
        except (ValueError, KeyError, TypeError):
            raise RunLockedError(
                f"{self.path} exists but names no run (being written, or damaged); if no other run "
                f"writes to {self.path.parent}, delete it"
            ) from None
        if host != socket.gethostname():
            raise RunLockedError(
                f"{self.path.parent} is locked by a run on another host ({described}), which cannot "
                f"be checked from {socket.gethostname()}; if that run is over, delete {self.path}"
            )
        if process_alive(pid):
            raise RunLockedError(
                f"{self.path.parent} is in use by another run ({described}); wait for it to end or "
                f"choose another --output-dir (if that pid is no longer the run, delete {self.path})"
            )
        self.say(f"taking over the stale lock {self.path} of a run that is gone ({described})")
        self.path.unlink(missing_ok=True)


def process_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this host (one of another user's counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; no update was applied from it."""


def check_finite(loss, position: TrainingPosition, checkpoints: "CheckpointManager") -> None:
    """Stops the run before a NaN or infinite loss can update the weights, naming the last good checkpoint."""
    if not loss.isfinite().all():
        saved = checkpoints.checkpoints()
        last = f"the last good checkpoint is {saved[0]}" if saved else "no checkpoint was written yet"
        raise NonFiniteLossError(
            f"loss is {loss.item()} at optimizer step {position.step} (epoch {position.epoch}); stopping; {last}. "
            "Lower the learning rate (resuming with a changed option needs --allow-changed-config) or check the "
            f"data, then {checkpoints.resume_hint}."
        )


class CheckpointManager:
    """Resumable checkpoints under `<output_dir>/checkpoints/checkpoint-<step>`.

    A checkpoint is written to a temporary folder and renamed into place only once complete (the rename is
    atomic), so a crash or a failed write (disk full) leaves the previous checkpoints intact. Objects registered with
    `accelerator.register_for_checkpointing` (a teacher network, a loss centre) are saved with the model,
    optimizer and random states, and `options` (`run_options`, given to `start`) beside them.

    `resume_hint` says how to continue a stopped run in the context that runs it (`RESUME_HINT` for a script run
    on its own); the messages about checkpoints end with it.
    """

    def __init__(
        self, accelerator: Accelerator, output_dir: str | os.PathLike, keep: int = 3, resume_hint: str = RESUME_HINT
    ):
        self.accelerator = accelerator
        self.directory = Path(output_dir) / "checkpoints"
        self.keep = keep
        self.resume_hint = resume_hint
        self.options: dict = {}
        self.resumed_from: Path | None = None

    def checkpoints(self) -> list[Path]:
        """Complete checkpoints, newest first."""
        if not self.directory.is_dir():
            return []
        found = [p for p in self.directory.glob(f"{CHECKPOINT_PREFIX}*") if (p / TRAINER_STATE).is_file()]
        return sorted(found, key=lambda p: int(p.name.removeprefix(CHECKPOINT_PREFIX)), reverse=True)

    def save(self, position: TrainingPosition) -> Path:
        final = self.directory / f"{CHECKPOINT_PREFIX}{position.step}"
        staging = self.directory / f".staging-{CHECKPOINT_PREFIX}{position.step}"
        if self.accelerator.is_main_process:
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
        self.accelerator.wait_for_everyone()
        intact = self.checkpoints()
        kept = f"the newest intact checkpoint is still {intact[0]}" if intact else "no earlier checkpoint exists"
        with staged_write(staging, final, kept):
            self.accelerator.save_state(str(staging))
            # Every process writes its part (its random states; its shards under FSDP) before the folder moves.
            self.accelerator.wait_for_everyone()
            if self.accelerator.is_main_process:
                write_json_atomically(staging / RUN_OPTIONS, self.options)
                write_json_atomically(staging / TRAINER_STATE, asdict(position))
        if self.accelerator.is_main_process:
            replace_folder(staging, final)
            for stale in self.checkpoints()[self.keep :]:
                shutil.rmtree(stale)
        self.accelerator.wait_for_everyone()
        return final

    def after_step(self, position: TrainingPosition, every: int, max_steps: int, preemption: "PreemptionGuard") -> None:
        """Checkpoints every `every` optimizer steps and at the last one; on SIGTERM, checkpoints and exits."""
        if preemption.requested():
            preemption.stop(self, position)
        if position.step % every == 0 or position.step == max_steps:
            self.save(position)

    def describe_saved(self) -> str:
        """What a run stopped now leaves behind, and how to continue it."""
        newest = self.checkpoints()
        if not newest:
            return "no checkpoint was written yet: the run starts from the beginning when run again"
        return f"the newest checkpoint is {newest[0]}; {self.resume_hint}"

    def start(self, source: str | None, options: dict, allow_changed: bool = False) -> TrainingPosition:
        """Where the run starts: the checkpoint `source` when given (see `resume`), else step 0.

        `options` (`run_options`) are saved with every checkpoint and compared with those of the checkpoint resumed
        from: a difference is refused unless `allow_changed` (the flag --allow-changed-config).
        """
        self.options = options
        return self.resume(source, allow_changed) if source else TrainingPosition()

    def check_options(self, checkpoint: Path, allow_changed: bool) -> None:
        """Refuses to continue `checkpoint` with other options than it was written with, listing each difference."""
        recorded = checkpoint / RUN_OPTIONS
        if not recorded.is_file():
            logger.warning(
                f"{checkpoint} does not record its options (an older version wrote it): they cannot be "
                "compared with this run's",
                main_process_only=True,
            )
            return
        changes = option_changes(json.loads(recorded.read_text()), self.options)
        if not changes:
            return
        if not allow_changed:
            raise ValueError(
                f"{checkpoint} was written with other options than this run's; resuming would silently continue a "
                "different run (checkpoint -> this run):\n  "
                + "\n  ".join(changes)
                + "\nResume with the checkpoint's options, or pass "
                "--allow-changed-config to continue with the new ones (logs/<run>/segments.jsonl records every "
                "segment)."
            )
        self.accelerator.print(
            f"resuming {checkpoint} with changed options (--allow-changed-config): " + "; ".join(changes)
        )

    def resume(self, source: str, allow_changed: bool = False) -> TrainingPosition:
        """Loads `source` (a checkpoint folder, or "latest": the newest intact one, falling back past corrupt ones)
        and checks that it was written with this run's options (`check_options`)."""
        candidates = self.checkpoints() if source == "latest" else [Path(source)]
        if not candidates:
            logger.info(f"no checkpoint in {self.directory}: starting from scratch", main_process_only=True)
            return TrainingPosition()
        for checkpoint in candidates:
            try:
                position = TrainingPosition(**json.loads((checkpoint / TRAINER_STATE).read_text()))
                check_checkpoint_files(checkpoint)
                self.accelerator.load_state(str(checkpoint))
            except Exception as error:  # a truncated or corrupt file of any kind: try the next older checkpoint
                if source != "latest":
                    raise ValueError(f"checkpoint {checkpoint} cannot be loaded: {error}") from error
                logger.warning(
                    f"checkpoint {checkpoint} cannot be loaded ({error}); trying an older one", main_process_only=True
                )
                continue
            self.check_options(checkpoint, allow_changed)
            self.resumed_from = checkpoint
            self.accelerator.print(f"resumed from {checkpoint} at step {position.step}")
            return position
        raise ValueError(f"no loadable checkpoint in {self.directory}: every one failed to load")


def check_checkpoint_files(checkpoint: Path) -> None:
    """Opens every weights and state file of a checkpoint without running pickled code, before accelerate loads it.

    Accelerate unpickles the state of objects registered for checkpointing (a DINO teacher, a loss centre) with
    `weights_only=False`; reading each pickle here first with `weights_only=True` is what keeps a tampered checkpoint
    from running code. It also names the file that a half-copied checkpoint truncated.

    Raises:
        ValueError: naming the first file that is truncated, corrupt, or holds pickled objects beyond tensors.
    """
    for path in sorted(checkpoint.iterdir()):
        try:
            if path.suffix == ".safetensors":
                with safe_open(path, framework="pt"):  # checks the header and that the data covers it
                    pass
            elif path.suffix in (".bin", ".pkl"):
                # accelerate's torch.load: weights_only=True, with the numpy types of its RNG states allowed.
                load(path, map_location="cpu", mmap=True)
        except Exception as error:
            raise ValueError(f"{path} is truncated, corrupt, or holds more than tensors: {error}") from None


@contextmanager
def staged_write(staging: Path, target: Path, kept: str):
    """Removes the staging folder of a failed write (it may have filled the disk) and re-raises the error as an
    OSError naming `target` and saying what `kept` intact."""
    try:
        yield
    except Exception as error:
        shutil.rmtree(staging, ignore_errors=True)
        reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
        raise OSError(getattr(error, "errno", None), f"writing {target} failed ({reason}); {kept}") from error


def export_atomically(
    accelerator: Accelerator, output: str | os.PathLike, *savables, state_dict: dict | None = None
) -> Path:
    """Writes `save_pretrained` objects (model, processor, ...) into `output` as a whole or not at all.

    `state_dict`: the weights the model (each `torch.nn.Module` among `savables`) writes instead of its own, such as
    the full state dict of a sharded model (`training.sharding.full_state_dict`, gathered on every process before
    this call: only the main process writes)."""
    output = Path(output)
    staging = output.with_name(f".staging-{output.name}")
    if accelerator.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)
        kept = f"the previous {output} is untouched" if output.exists() else f"nothing was written to {output}"
        with staged_write(staging, output, kept):
            for savable in savables:
                if isinstance(savable, torch.nn.Module):
                    with plain_class(savable):
                        savable.save_pretrained(staging, **({} if state_dict is None else {"state_dict": state_dict}))
                else:
                    savable.save_pretrained(staging)
        replace_folder(staging, output)
    accelerator.wait_for_everyone()
    return output


def adamw(params, device: torch.device | str | None = None, **kwargs) -> torch.optim.AdamW:
    """`torch.optim.AdamW(params, **kwargs)` on torch's fused kernel (one pass over each tensor), or on its
    multi-tensor `foreach` one where the training device (`device`, else the parameters' own) or a parameter's dtype
    has no fused kernel. torch's default on the CPU is a Python loop over the tensors: 6% of a stage-1 step, more
    under memory contention. The update is AdamW's either way, equal to the loop's to float rounding; the device and
    the dtypes decide the kernel, so a run keeps one from start to resume."""
    params = list(params)
    tensors = [tensor for group in params for tensor in (group["params"] if isinstance(group, dict) else [group])]
    supported = getattr(torch.utils._foreach_utils, "_get_fused_kernels_supported_devices", lambda: ["cpu", "cuda"])()
    fused = all(
        tensor.is_floating_point() and torch.device(device or tensor.device).type in supported for tensor in tensors
    )
    return torch.optim.AdamW(params, **({"fused": True} if fused else {"foreach": True}), **kwargs)
