"""What every Accelerate training script of AgriCLIP shares: config files with flag overrides, the Accelerator,
checkpoints that are never half-written and resume exactly, atomic exports, and the finite-loss guard.

A script builds its own parser (flags with help text), adds `add_runtime_arguments`, and keeps its own loop;
the loop records where it is in a `TrainingPosition`, which `CheckpointManager` saves with the accelerate state.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import signal
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import yaml
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.tracking import GeneralTracker, on_main_process
from accelerate.utils import (
    DataLoaderConfiguration,
    DistributedType,
    ProjectConfiguration,
    gather_object,
    load,
    set_seed,
)
from safetensors import safe_open

from modeling_agriclip.atomic import write_json_atomically
from modeling_agriclip.images import DecodeStats
from training.data import counted

logger = get_logger(__name__)

TRAINER_STATE = "trainer_state.json"
CHECKPOINT_PREFIX = "checkpoint-"


def load_config_file(path: str | os.PathLike) -> dict:
    """Reads a YAML or JSON mapping of option names (dashes or underscores) to values."""
    path = Path(path)
    try:
        values = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"config file {path} does not exist") from None
    except yaml.YAMLError as error:
        raise ValueError(f"config file {path} is neither valid YAML nor JSON: {error}") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ValueError(f"config file {path} must hold a mapping of option names to values")
    return {key.replace("-", "_"): value for key, value in values.items()}


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> argparse.Namespace:
    """Parses flags over the defaults of `--config FILE`: a flag given on the command line wins over the file."""
    parser.add_argument("--config", help="YAML or JSON file of option values; flags given on the command line override it.")
    config_path = parser.parse_known_args(argv)[0].config
    if config_path:
        values = load_config_file(config_path)
        known = {action.dest for action in parser._actions}
        unknown = sorted(set(values) - known)
        if unknown:
            parser.error(f"{config_path}: unknown option(s) {unknown}")
        parser.set_defaults(**values)
    return parser.parse_args(argv)


def add_runtime_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags every training script shares (each script sets its own defaults with `parser.set_defaults`)."""
    group = parser.add_argument_group("runtime")
    group.add_argument("--output-dir", required=True, help="Folder for checkpoints, logs and the exported model.")
    group.add_argument("--seed", type=int, default=0, help="Seed of every random number generator.")
    group.add_argument("--epochs", type=int, default=1, help="Passes over the training data.")
    group.add_argument("--max-steps", type=int, default=None, help="Stop after this many optimizer steps (overrides --epochs).")
    group.add_argument("--batch-size", type=int, default=32, help="Images per process per forward pass.")
    group.add_argument(
        "--gradient-accumulation-steps", type=int, default=1,
        help="Forward passes per optimizer step; the effective batch is batch size x processes x this.",
    )
    group.add_argument("--max-grad-norm", type=float, default=1.0, help="Clip the gradient norm to this (0 disables).")
    group.add_argument(
        "--mixed-precision", choices=["no", "fp16", "bf16"], default=None,
        help="Overrides the launcher's setting; by default `accelerate launch --mixed-precision` (or its config) decides.",
    )
    group.add_argument("--num-workers", type=int, default=0, help="DataLoader worker processes.")
    group.add_argument("--checkpoint-every", type=int, default=100, help="Save a resumable checkpoint every N optimizer steps.")
    group.add_argument("--keep-checkpoints", type=int, default=3, help="Keep only the newest N checkpoints.")
    group.add_argument(
        "--resume", nargs="?", const="latest", default=None,
        help="Resume from the newest intact checkpoint in --output-dir (or from the given checkpoint folder).",
    )
    group.add_argument(
        "--log-with", default="auto",
        help="Accelerate tracker(s), comma-separated (e.g. tensorboard,wandb); 'auto' = tensorboard when installed; 'none'.",
    )


class JSONLinesTracker(GeneralTracker):
    """Appends every logged step to `<logging_dir>/<run>/metrics.jsonl`: readable without any tracker installed."""

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
        write_json_atomically(self.path.with_name("config.json"), values)

    @on_main_process
    def log(self, values: dict, step: int | None = None, **kwargs):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as handle:
            handle.write(json.dumps({"step": step, **values}) + "\n")


def make_accelerator(args: argparse.Namespace, run_name: str) -> Accelerator:
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
    )
    set_seed(args.seed)
    return accelerator


def init_run_trackers(accelerator: Accelerator, run_name: str, args: argparse.Namespace) -> None:
    """Starts the run's trackers with its scalar options as the run configuration."""
    config = {key: value for key, value in vars(args).items() if isinstance(value, (int, float, str, bool))}
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


def train_step(accelerator: Accelerator, model, optimizer, compute_loss, learning_rate: float, max_grad_norm: float,
               position: TrainingPosition, checkpoints: "CheckpointManager", before_optimizer_step=None):
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
    """False when no image of this batch could be read (`training.data.counted` yields None) on any process.

    All processes must skip such a batch together: one that went on would wait forever in a collective (the
    gradient all-reduce, a gather) that the skipping process never joins.
    """
    if accelerator.num_processes == 1:
        return batch is not None
    flag = torch.tensor([float(batch is None)], device=accelerator.device)
    unreadable_on = int(accelerator.reduce(flag, reduction="sum").item())
    if unreadable_on:
        logger.warning(f"a batch is skipped on all {accelerator.num_processes} processes: {unreadable_on} of them could "
                       "read none of its images, so the readable images of the others are left out of this step")
    return not unreadable_on


def report_decode_stats(accelerator: Accelerator, stats: DecodeStats) -> None:
    """Prints, on the main process, the images decoded and skipped by all processes together."""
    total = DecodeStats()
    for state in gather_object([stats.to_dict()]) if accelerator.num_processes > 1 else [stats.to_dict()]:
        total += DecodeStats.from_dict(state)
    if total.num_skipped:
        accelerator.print(total.summary())


def resumable_batches(loader, accelerator: Accelerator, position: TrainingPosition, max_steps: int):
    """The batches of a run from `position` on, epoch after epoch, until `max_steps` optimizer steps are done.

    Counts the batches of the current epoch in `position` (the loop counts optimizer steps); a resumed run skips
    the batches its epoch had already consumed, so it sees exactly what the uninterrupted run saw. The loader's
    collator counts the unreadable images (`training.data.counted`); a batch with no readable image on some
    process is skipped by every process.
    """
    while position.step < max_steps:
        loader.set_epoch(position.epoch)
        batches = accelerator.skip_first_batches(loader, position.batch_in_epoch) if position.batch_in_epoch else loader
        for batch in counted(batches):
            position.batch_in_epoch += 1
            if not readable_on_every_process(batch, accelerator):
                continue
            yield batch
            if position.step >= max_steps:
                return
        position.next_epoch()


def dataloader_generator(seed: int) -> torch.Generator:
    """The DataLoader's own generator. Without it each new iterator (every epoch, and a resumed one) draws its
    worker seed from the global RNG, which the resumed run would then consume at a different point than the
    uninterrupted run, so augmentations and caption draws would differ after a resume."""
    return torch.Generator().manual_seed(seed)


class PreemptionGuard:
    """Turns SIGTERM (a cluster preempting or cancelling the job) into a checkpoint at the next optimizer step.

    The handler only records the request: the loop asks `requested()` after each optimizer step, saves a
    checkpoint and exits, so no state is written halfway through a step. Under several processes a request seen
    by any process stops all of them at the same step.
    """

    EXIT_CODE = 128 + signal.SIGTERM

    def __init__(self, accelerator: Accelerator):
        self.accelerator = accelerator
        self._received = False
        signal.signal(signal.SIGTERM, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        self._received = True

    def requested(self) -> bool:
        if self.accelerator.num_processes == 1:
            return self._received
        flag = torch.tensor([float(self._received)], device=self.accelerator.device)
        return bool(self.accelerator.reduce(flag, reduction="sum").item())

    def stop(self, checkpoints: "CheckpointManager", position: "TrainingPosition") -> None:
        """Saves a checkpoint of `position`, says where, and exits with 128 + SIGTERM."""
        saved = checkpoints.save(position)
        self.accelerator.print(
            f"SIGTERM received: checkpoint of step {position.step} written to {saved}; "
            "run the same command with --resume to continue"
        )
        self.accelerator.end_training()
        raise SystemExit(self.EXIT_CODE)


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; no update was applied from it."""


def check_finite(loss, position: TrainingPosition, checkpoints: "CheckpointManager") -> None:
    """Stops the run before a NaN or infinite loss can update the weights, naming the last good checkpoint."""
    if not loss.isfinite().all():
        saved = checkpoints.checkpoints()
        last = f"the last good checkpoint is {saved[0]}" if saved else "no checkpoint was written yet"
        raise NonFiniteLossError(
            f"loss is {loss.item()} at optimizer step {position.step} (epoch {position.epoch}); stopping; {last}. "
            "Lower the learning rate or check the data, then resume with --resume."
        )


class CheckpointManager:
    """Resumable checkpoints under `<output_dir>/checkpoints/checkpoint-<step>`.

    A checkpoint is written to a temporary folder and renamed into place only once complete (the rename is
    atomic), so a crash or a failed write (disk full) leaves the previous checkpoints intact. Objects registered with
    `accelerator.register_for_checkpointing` (a teacher network, a loss centre) are saved with the model,
    optimizer and random states.
    """

    def __init__(self, accelerator: Accelerator, output_dir: str | os.PathLike, keep: int = 3):
        self.accelerator = accelerator
        self.directory = Path(output_dir) / "checkpoints"
        self.keep = keep

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
            if self.accelerator.is_main_process:
                write_json_atomically(staging / TRAINER_STATE, asdict(position))
        if self.accelerator.is_main_process:
            shutil.rmtree(final, ignore_errors=True)
            os.replace(staging, final)
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

    def resume(self, source: str) -> TrainingPosition:
        """Loads `source` (a checkpoint folder, or "latest": the newest intact one, falling back past corrupt ones)."""
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
                logger.warning(f"checkpoint {checkpoint} cannot be loaded ({error}); trying an older one", main_process_only=True)
                continue
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


def export_atomically(accelerator: Accelerator, output: str | os.PathLike, *savables) -> Path:
    """Writes `save_pretrained` objects (model, processor, ...) into `output` as a whole or not at all."""
    output = Path(output)
    staging = output.with_name(f".staging-{output.name}")
    if accelerator.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)
        kept = f"the previous {output} is untouched" if output.exists() else f"nothing was written to {output}"
        with staged_write(staging, output, kept):
            for savable in savables:
                savable.save_pretrained(staging)
        previous = output.with_name(f".previous-{output.name}")
        # Left behind by a run killed between the two renames below; os.replace cannot overwrite a folder.
        shutil.rmtree(previous, ignore_errors=True)
        if output.exists():
            os.replace(output, previous)
        os.replace(staging, output)
        shutil.rmtree(previous, ignore_errors=True)
    accelerator.wait_for_everyone()
    return output
