"""The kill-and-resume matrix: every training stage killed at seeded random points, then run again.

    python tests/kill_matrix.py [--stages 1 2 3 lora] [--trials N] [--seed S] [--workdir DIR]

Each stage (tiny preset, a tiny caption folder, a checkpoint every optimizer step) first runs uninterrupted: the
reference. Each trial then starts the same command as a subprocess and interrupts it in one of three ways, in turn:

- kill-time:  SIGKILL at a uniformly drawn moment of the stage's run (imports excluded);
- kill-write: SIGKILL inside the k-th write (k drawn among the writes of the reference run: a checkpoint's
  `save_state`, an export's `save_pretrained`, stage 3's feature cache), after truncating the file just written
  to half its size, as a kill in the middle of writing it would leave it;
- sigterm:    SIGTERM (cluster preemption) once a drawn checkpoint is written, so during training: the run must
  write a checkpoint, say where, and exit with 143 (or finish, had it done its last step; or, past its training
  steps, stop with 143 naming its newest checkpoint). Stage 3, which has no checkpoints, gets it at a drawn
  moment instead, and must stop with 143 saying so (or finish).

A trial survives when, after the interruption, every checkpoint left is loadable and every export present is
whole (the run lock a killed run leaves is stale: the rerun takes it over) (stage 3 has no checkpoints: its previous export must still be there, old or new, never partial), and the
rerun (`--resume` for stages 1, 2 and LoRA, the same command for stage 3) exits cleanly with exported weights equal,
tensor for tensor, to the reference's. Prints the trials and survived/total per stage; exits 1 if any trial failed.

`python tests/kill_matrix.py --child MODULE ARGS...` is the subprocess: it runs MODULE's `main(ARGS)` with the
write hooks installed (used by the matrix and by tests/test_fault_tolerance.py).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path


TESTS_DIR = Path(__file__).resolve().parent
REPO_ROOT = TESTS_DIR.parent
for _path in (str(REPO_ROOT), str(TESTS_DIR)):
    if _path not in sys.path:
        sys.path.insert(0, _path)

from training.runtime import SIGTERM_EXIT_CODE, CheckpointManager, check_checkpoint_files  # noqa: E402 (needs the path)


KILL_AT_WRITE = "AGRICLIP_KILL_AT_WRITE"  # k: the child SIGKILLs itself inside its k-th write
READY_FILE = "AGRICLIP_READY_FILE"  # the child writes its start time here once imports are done
WRITES_FILE = "AGRICLIP_WRITES_FILE"  # the child records its writes and end time here when main() returns
MODES = ("kill-time", "kill-write", "sigterm")
SIGTERM_MESSAGE = "SIGTERM received"
TIMEOUT_S = 600


# ----------------------------------------------------------------------------------------------------------------
# The child: a stage's main() with write hooks
# ----------------------------------------------------------------------------------------------------------------


def cut_in_half(target: Path) -> None:
    """Truncates a file, or the largest file of a folder, to half its size: what a kill in mid-write leaves."""
    files = [path for path in target.rglob("*") if path.is_file()] if target.is_dir() else [target]
    largest = max(files, key=lambda path: path.stat().st_size)
    os.truncate(largest, largest.stat().st_size // 2)


def install_write_hooks(kill_at: int, writes: list[str]) -> None:
    """Counts every checkpoint, export and feature-cache write in `writes`; inside write number `kill_at`, once the
    write is done, truncates the file written (the largest, for a folder) to half and SIGKILLs the process."""
    import accelerate
    import peft
    import transformers

    import training.alignment

    def hooked(owner, name, target_of):
        original = getattr(owner, name)

        def write(*args, **kwargs):
            result = original(*args, **kwargs)
            target = Path(target_of(*args, **kwargs))
            writes.append(f"{owner.__name__}.{name} {target}")
            if len(writes) == kill_at:
                cut_in_half(target)
                os.kill(os.getpid(), signal.SIGKILL)
            return result

        setattr(owner, name, write)

    hooked(accelerate.Accelerator, "save_state", lambda self, output_dir=None, *a, **k: output_dir)
    hooked(transformers.PreTrainedModel, "save_pretrained", lambda self, save_directory, *a, **k: save_directory)
    hooked(peft.PeftModel, "save_pretrained", lambda self, save_directory, *a, **k: save_directory)
    hooked(training.alignment, "save_file", lambda tensors, filename, *a, **k: filename)


def child_main(module_name: str, argv: list[str]) -> None:
    writes: list[str] = []
    install_write_hooks(int(os.environ.get(KILL_AT_WRITE, "0")), writes)
    module = importlib.import_module(module_name)
    started = time.time()
    if os.environ.get(READY_FILE):
        Path(os.environ[READY_FILE]).write_text(str(started))
    module.main(argv)
    if os.environ.get(WRITES_FILE):
        Path(os.environ[WRITES_FILE]).write_text(json.dumps({"writes": writes, "seconds": time.time() - started}))


# ----------------------------------------------------------------------------------------------------------------
# Stages
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class Stage:
    """How to run one training stage on the workspace, and which exported weight files it must reproduce."""

    name: str
    module: str
    flags: list[str]
    exports: tuple[str, ...]  # export folders, relative to the output dir
    weights: tuple[str, ...]  # weight files compared with the reference, relative to the output dir
    resumable: bool = True


def stages(workspace: Path) -> dict[str, Stage]:
    data, base = str(workspace / "data"), str(workspace / "base")
    common = ["--log-with", "none", "--checkpoint-every", "1", "--keep-checkpoints", "3"]
    return {
        "1": Stage(
            "1",
            "training.stage1_contrastive",
            [
                "--model",
                "tiny",
                "--train-data",
                data,
                "--batch-size",
                "8",
                "--max-steps",
                "6",
                "--learning-rate",
                "1e-3",
                *common,
            ],
            ("final",),
            ("final/model.safetensors",),
        ),
        "2": Stage(
            "2",
            "training.stage2_dino",
            [
                "--model",
                "tiny",
                "--train-data",
                data,
                "--batch-size",
                "8",
                "--max-steps",
                "6",
                "--epochs",
                "2",
                "--out-dim",
                "128",
                "--head-hidden-dim",
                "32",
                "--head-bottleneck-dim",
                "16",
                "--num-local-crops",
                "2",
                "--warmup-epochs",
                "1",
                *common,
            ],
            ("backbone", "final"),
            ("backbone/model.safetensors", "final/model.safetensors"),
        ),
        "3": Stage(
            "3",
            "training.stage3_align",
            ["--model", base, "--train-data", data, "--batch-size", "5", "--ridge", "0.1", "--log-with", "none"],
            ("final",),
            ("final/model.safetensors",),
            resumable=False,
        ),
        "lora": Stage(
            "lora",
            "training.lora_finetune",
            [
                "--model",
                base,
                "--objective",
                "contrastive",
                "--train-data",
                data,
                "--towers",
                "backbone",
                "--batch-size",
                "8",
                "--max-steps",
                "6",
                "--lora-dropout",
                "0.1",
                "--merge",
                *common,
            ],
            ("adapter", "merged"),
            ("adapter/adapter_model.safetensors", "merged/model.safetensors"),
        ),
    }


def prepare_workspace(workspace: Path) -> Path:
    """The tiny caption folder and a saved tiny AgriCLIP base folder (stage 3 and LoRA start from it)."""
    import torch

    from modeling_agriclip import AgriCLIPConfig, AgriCLIPModel, AgriCLIPProcessor

    from conftest import write_caption_folder

    workspace.mkdir(parents=True, exist_ok=True)
    if not (workspace / "data").is_dir():
        write_caption_folder(workspace / "data")
    if not (workspace / "base" / "model.safetensors").is_file():
        torch.manual_seed(0)
        config = AgriCLIPConfig.tiny()
        AgriCLIPModel(config).save_pretrained(workspace / "base")
        AgriCLIPProcessor.from_config(config).save_pretrained(workspace / "base")
    return workspace


def child_command(module: str, argv: list[str]) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "--child", module, *argv]


def child_env(workspace: Path, **extra: str) -> dict[str, str]:
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONUNBUFFERED": "1",
        "HF_DATASETS_CACHE": str(workspace / "datasets-cache"),
        **extra,
    }
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    return env


def start_child(workspace: Path, module: str, argv: list[str], log: Path, **extra: str) -> subprocess.Popen:
    """Starts `module.main(argv)` in a subprocess, its stdout and stderr to `<log>.out` and `<log>.err`."""
    with open(f"{log}.out", "w") as stdout, open(f"{log}.err", "w") as stderr:
        return subprocess.Popen(
            child_command(module, argv), env=child_env(workspace, **extra), cwd=REPO_ROOT, stdout=stdout, stderr=stderr
        )


def run_child(workspace: Path, module: str, argv: list[str], log: Path, **extra: str) -> int:
    """Runs `module.main(argv)` in a subprocess to its end; returns the exit status (-9 when killed by SIGKILL)."""
    return start_child(workspace, module, argv, log, **extra).wait(timeout=TIMEOUT_S)


# ----------------------------------------------------------------------------------------------------------------
# Checks
# ----------------------------------------------------------------------------------------------------------------


def load_weights(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(path)


def weights_equal(first: Path, second: Path) -> str | None:
    """None when both files hold the same tensors bit for bit, else what differs."""
    import torch

    a, b = load_weights(first), load_weights(second)
    if a.keys() != b.keys():
        return f"{second}: tensor names differ from {first}"
    different = [key for key in a if not torch.equal(a[key], b[key])]
    return f"{second}: {len(different)} tensor(s) differ, e.g. {different[0]}" if different else None


def check_after_interruption(stage: Stage, output_dir: Path, reference_dir: Path, previous: Path | None) -> str | None:
    """None when everything the interrupted run left behind is whole, else the first problem found."""

    for checkpoint in CheckpointManager(None, output_dir).checkpoints():  # those a resume would consider
        try:
            check_checkpoint_files(checkpoint)
        except ValueError as error:
            return f"checkpoint left unloadable: {error}"
    for export in stage.exports:
        folder = output_dir / export
        if not folder.exists():
            if previous is not None:
                return f"the previous export {folder} is gone"
            continue
        expected = {p.name for p in (reference_dir / export).iterdir()}
        if previous is None and {p.name for p in folder.iterdir()} != expected:
            return f"{folder} is incomplete: {sorted(expected - {p.name for p in folder.iterdir()})} missing"
    for weights in stage.weights:
        path = output_dir / weights
        if path.exists():
            try:
                load_weights(path)
            except Exception as error:  # any failure to read is the finding
                return f"{path} unreadable: {error}"
            if (
                previous is not None
                and weights_equal(previous / Path(weights).name, path)
                and weights_equal(reference_dir / weights, path)
            ):
                return f"{path} is neither the previous export nor the new one"
    return None


# ----------------------------------------------------------------------------------------------------------------
# The matrix
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class Reference:
    """The uninterrupted run of a stage: its folder, how long its main() took, and the writes it made, in order."""

    output_dir: Path
    seconds: float
    writes: list[str]


@dataclass
class Trial:
    """One interruption: how it was drawn, what the process did, and the problem found (None: survived)."""

    stage: str
    mode: str
    detail: str
    survived: bool = False
    outcome: str = ""
    problem: str | None = None


@dataclass
class Matrix:
    """The trials of a run of the matrix, tabulated as survived/total per stage and interruption."""

    trials: list[Trial] = field(default_factory=list)

    def counts(self, stage: str, mode: str | None = None) -> tuple[int, int]:
        chosen = [t for t in self.trials if t.stage == stage and (mode is None or t.mode == mode)]
        return sum(t.survived for t in chosen), len(chosen)

    def table(self) -> str:
        names = list(dict.fromkeys(t.stage for t in self.trials))
        lines = [f"{'stage':<6} " + " ".join(f"{mode:>10}" for mode in MODES) + f" {'survived/total':>15}"]
        for name in names:
            cells = []
            for mode in MODES:
                survived, total = self.counts(name, mode)
                cells.append(f"{survived}/{total}".rjust(10))
            survived, total = self.counts(name)
            lines.append(f"{name:<6} " + " ".join(cells) + f" {f'{survived}/{total}':>15}")
        return "\n".join(lines)


def run_reference(workspace: Path, stage: Stage) -> Reference:
    output_dir = workspace / f"reference-{stage.name}"
    shutil.rmtree(output_dir, ignore_errors=True)
    output_dir.mkdir(parents=True)
    record = output_dir.with_name(f"{output_dir.name}.writes.json")
    status = run_child(
        workspace,
        stage.module,
        [*stage.flags, *output_flags(stage, output_dir)],
        output_dir.with_name(f"{output_dir.name}.log"),
        **{WRITES_FILE: str(record)},
    )
    if status != 0:
        raise RuntimeError(f"the uninterrupted stage {stage.name} run failed ({status}); see {output_dir}.log.err")
    recorded = json.loads(record.read_text())
    return Reference(output_dir, recorded["seconds"], recorded["writes"])


def output_flags(stage: Stage, output_dir: Path) -> list[str]:
    flags = ["--output-dir", str(output_dir)]
    if stage.name == "3":
        flags += ["--feature-cache", str(output_dir / "feature-cache")]
    return flags


def wait_for(path: Path, process: subprocess.Popen) -> None:
    """Waits until `path` exists or the process has ended."""
    deadline = time.time() + TIMEOUT_S
    while not path.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.01)


def interrupt(
    workspace: Path, stage: Stage, reference: Reference, output_dir: Path, mode: str, rng: random.Random
) -> tuple[str, str, str | None]:
    """Runs the stage and interrupts it; returns (what was drawn, what happened, a problem or None)."""
    argv = [*stage.flags, *output_flags(stage, output_dir)]
    log = output_dir.with_name(f"{output_dir.name}.interrupted")
    if mode == "kill-write":
        k = rng.randint(1, len(reference.writes))
        status = run_child(workspace, stage.module, argv, log, **{KILL_AT_WRITE: str(k)})
        drawn = f"inside write {k}/{len(reference.writes)} ({reference.writes[k - 1].split()[0]})"
        return drawn, f"exit {status}", None if status == -signal.SIGKILL else f"exit {status}, expected a SIGKILL"
    ready = output_dir.with_name(f"{output_dir.name}.ready")
    process = start_child(workspace, stage.module, argv, log, **{READY_FILE: str(ready)})
    if mode == "sigterm" and stage.resumable:
        # Preemption matters during training: the signal comes once a drawn checkpoint (not the last) is written.
        saves = sum(write.startswith("Accelerator.save_state") for write in reference.writes)
        step = rng.randint(1, saves - 1)
        wait_for(output_dir / "checkpoints" / f"checkpoint-{step}", process)
        drawn = f"once checkpoint-{step} of {saves} is written"
    else:
        wait_for(ready, process)
        delay = rng.uniform(0, 1.1 * reference.seconds)
        time.sleep(delay)
        drawn = f"after {delay:.1f}s of {reference.seconds:.1f}s"
    process.send_signal(signal.SIGKILL if mode == "kill-time" else signal.SIGTERM)
    status = process.wait(timeout=TIMEOUT_S)
    happened = f"exit {status}"
    if mode == "kill-time":
        return drawn, happened, None if status in (0, -signal.SIGKILL) else happened
    stdout = Path(f"{log}.out").read_text()
    if status == SIGTERM_EXIT_CODE:
        line = next((line for line in stdout.splitlines() if SIGTERM_MESSAGE in line), None)
        if line is None:
            return drawn, happened, "exit 143 without saying what was saved"
        if " written to " not in line:  # stopped outside the training steps: names what it leaves
            return drawn, f"{happened}: {line}", None
        saved = Path(line.split(" written to ")[1].split(";")[0])
        return (
            drawn,
            f"{happened}: {line.split(';')[0]}",
            None if saved.is_dir() else f"the checkpoint {saved} it announced is missing",
        )
    if status == -signal.SIGTERM and all((output_dir / export).is_dir() for export in stage.exports):
        return drawn, f"{happened} once everything was written (Python restores the default handler on exit)", None
    return drawn, happened, None if status == 0 else f"{happened} on SIGTERM, without a checkpoint or a message"


def run_trial(workspace: Path, stage: Stage, reference: Reference, index: int, mode: str, rng: random.Random) -> Trial:
    output_dir = workspace / f"trial-{stage.name}-{index}"
    shutil.rmtree(output_dir, ignore_errors=True)
    output_dir.mkdir(parents=True)
    previous = None
    if not stage.resumable:
        # Stage 3 rewrites an existing export: start from one (the base folder) that must survive any kill.
        previous = workspace / "base"
        shutil.copytree(previous, output_dir / "final")
    drawn, happened, problem = interrupt(workspace, stage, reference, output_dir, mode, rng)
    trial = Trial(stage.name, mode, drawn, outcome=happened)
    problem = problem or check_after_interruption(stage, output_dir, reference.output_dir, previous)
    if problem is None:
        argv = [*stage.flags, *output_flags(stage, output_dir), *(["--resume"] if stage.resumable else [])]
        status = run_child(workspace, stage.module, argv, output_dir.with_name(f"{output_dir.name}.rerun"))
        if status != 0:
            problem = f"the rerun failed with exit {status}; see {output_dir}.rerun.err"
        else:
            problem = next(
                filter(None, (weights_equal(reference.output_dir / w, output_dir / w) for w in stage.weights)), None
            )
    trial.problem, trial.survived = problem, problem is None
    return trial


def run_matrix(stage_names, trials: int, seed: int, workspace: Path, report=print) -> Matrix:
    """Runs `trials` interruptions per stage (modes in turn, points drawn from `seed`) and returns the results."""
    prepare_workspace(workspace)
    specs = stages(workspace)
    matrix = Matrix()
    for name in stage_names:
        stage = specs[name]
        reference = run_reference(workspace, stage)
        report(f"stage {name}: reference run {reference.seconds:.1f}s, {len(reference.writes)} writes")
        rng = random.Random(f"{seed}-{name}")
        for index in range(trials):
            trial = run_trial(workspace, stage, reference, index, MODES[index % len(MODES)], rng)
            matrix.trials.append(trial)
            verdict = "survived" if trial.survived else f"FAILED: {trial.problem}"
            report(f"  stage {name} #{index} {trial.mode:<10} {trial.detail}: {trial.outcome} -> {verdict}")
    return matrix


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--stages",
        nargs="+",
        choices=["1", "2", "3", "lora"],
        default=["1", "2", "3", "lora"],
        help="Stages to interrupt.",
    )
    parser.add_argument(
        "--trials", type=int, default=6, help="Interruptions per stage (kill-time, kill-write and sigterm in turn)."
    )
    parser.add_argument("--seed", type=int, default=0, help="Seed of the kill points.")
    parser.add_argument(
        "--workdir", default=None, help="Folder for the runs (default: a temporary folder, removed afterwards)."
    )
    args = parser.parse_args(argv)
    if args.workdir:
        matrix = run_matrix(args.stages, args.trials, args.seed, Path(args.workdir))
    else:
        with tempfile.TemporaryDirectory(prefix="agriclip-kill-matrix-") as folder:
            matrix = run_matrix(args.stages, args.trials, args.seed, Path(folder))
    print("\nsurvived/total per stage and interruption:\n" + matrix.table())
    return 0 if all(t.survived for t in matrix.trials) else 1


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        child_main(sys.argv[2], sys.argv[3:])
    else:
        sys.exit(main())
