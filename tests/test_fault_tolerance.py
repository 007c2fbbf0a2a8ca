"""Fault injection: kills, preemption, corrupt and truncated files, full disks, bad images, mismatched parts, and
safe loading. The whole kill-and-resume matrix over every stage is tests/kill_matrix.py (its slow test is here)."""

import ast
import contextlib
import errno
import io
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModel, CLIPConfig

import training.contrastive
from modeling_agriclip import AgriCLIPConfig, AgriCLIPModel, AgriCLIPProcessor
from modeling_agriclip.convert import convert
from modeling_agriclip.zero_shot import ZeroShotClassifier
from training.distillation import load_backbone
from training.models import load_model_and_processor
from training.runtime import (
    CheckpointManager,
    PreemptionGuard,
    RunLock,
    RunLockedError,
    UnreadableDataError,
    check_checkpoint_files,
    check_world_size,
    exit_on_sigterm,
    export_atomically,
)
from training.stage1_contrastive import main as stage1
from training.stage3_align import main as stage3

import kill_matrix
from conftest import read_metrics, run_script, run_subprocess, write_caption_folder


REPO_ROOT = Path(__file__).resolve().parent.parent
SECRET = "hf_FAULTtoleranceSENTINELtoken0123456789"
# Stage 1 with a checkpoint every optimizer step; all the runs of this file that resume compare with its result.
STAGE1_FLAGS = (
    "--batch-size",
    "8",
    "--max-steps",
    "4",
    "--checkpoint-every",
    "1",
    "--learning-rate",
    "1e-3",
    "--log-with",
    "none",
)


def run_stage1(data, output, *flags):
    return stage1(["--model", "tiny", "--train-data", str(data), "--output-dir", str(output), *STAGE1_FLAGS, *flags])


def assert_same_weights(expected_file, actual_file):
    expected, actual = load_file(expected_file), load_file(actual_file)
    assert expected.keys() == actual.keys()
    for key in expected:
        assert torch.equal(expected[key], actual[key]), key


@pytest.fixture(scope="module")
def reference(caption_folder, tmp_path_factory):
    """An uninterrupted stage-1 run, with a Hub token in the environment; returns its folder and everything it printed."""
    output = tmp_path_factory.mktemp("stage1-reference")
    printed = io.StringIO()
    with (
        pytest.MonkeyPatch.context() as patch,
        contextlib.redirect_stdout(printed),
        contextlib.redirect_stderr(printed),
    ):
        patch.setenv("HF_TOKEN", SECRET)
        patch.setenv("HUGGING_FACE_HUB_TOKEN", SECRET)
        run_stage1(caption_folder, output)
    return SimpleNamespace(output=output, final=output / "final" / "model.safetensors", printed=printed.getvalue())


# ---------------------------------------------------------------------------------------------------------------
# Kills and preemption
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.slow  # a subprocess that loads torch and a model: 7-10 s
def test_sigkill_inside_a_checkpoint_write_keeps_the_previous_one_and_resume_is_exact(
    reference, caption_folder, tmp_path
):
    workspace = tmp_path / "workspace"
    workspace.mkdir()
    argv = [
        "--model",
        "tiny",
        "--train-data",
        str(caption_folder),
        "--output-dir",
        str(tmp_path / "run"),
        *STAGE1_FLAGS,
    ]
    # Write 2 is the step-2 checkpoint: killed once its files are written, one of them cut to half.
    status = kill_matrix.run_child(
        workspace, "training.stage1_contrastive", argv, tmp_path / "child", **{kill_matrix.KILL_AT_WRITE: "2"}
    )
    assert status == -signal.SIGKILL, (tmp_path / "child.err").read_text()[-3000:]
    checkpoints = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == [".staging-checkpoint-2", "checkpoint-1"]
    check_checkpoint_files(checkpoints / "checkpoint-1")
    with pytest.raises(ValueError, match="truncated"):
        check_checkpoint_files(checkpoints / ".staging-checkpoint-2")

    final = run_stage1(caption_folder, tmp_path / "run", "--resume")
    assert_same_weights(reference.final, final / "model.safetensors")
    assert not (checkpoints / ".staging-checkpoint-2").exists()


def test_sigterm_writes_a_checkpoint_says_where_and_exits_143(
    reference, caption_folder, tmp_path, monkeypatch, capsys, sigterm_fallback
):
    save = CheckpointManager.save

    def save_then_preempt(self, position):
        saved = save(self, position)
        if position.step == 1:
            os.kill(os.getpid(), signal.SIGTERM)  # the cluster preempts the job during step 2
        return saved

    monkeypatch.setattr(CheckpointManager, "save", save_then_preempt)
    with pytest.raises(SystemExit) as exit_info:
        run_stage1(caption_folder, tmp_path)
    assert exit_info.value.code == 143
    checkpoint = tmp_path / "checkpoints" / "checkpoint-2"
    assert f"SIGTERM received: checkpoint of step 2 written to {checkpoint}" in capsys.readouterr().out
    assert not (tmp_path / "final").exists()

    monkeypatch.setattr(CheckpointManager, "save", save)
    final = run_stage1(caption_folder, tmp_path, "--resume")
    assert f"resumed from {checkpoint} at step 2" in capsys.readouterr().out
    assert_same_weights(reference.final, final / "model.safetensors")
    # The run's handlers are gone once it ends: a SIGTERM now would reach whatever handled it before.
    assert signal.getsignal(signal.SIGTERM) is sigterm_fallback


def test_sigterm_during_the_end_of_run_validation_stops_at_once_and_says_what_is_kept(
    reference, caption_folder, tmp_path, monkeypatch, capsys, sigterm_fallback
):
    validate = training.contrastive.validation_recall

    def preempted_while_validating(*args):
        os.kill(os.getpid(), signal.SIGTERM)
        return validate(*args)

    monkeypatch.setattr(training.contrastive, "validation_recall", preempted_while_validating)
    with pytest.raises(SystemExit) as exit_info:
        run_stage1(caption_folder, tmp_path)
    assert exit_info.value.code == 143
    newest = tmp_path / "checkpoints" / "checkpoint-4"
    assert (
        f"SIGTERM received: stopped; the newest checkpoint is {newest}; run the same command with --resume to continue"
    ) in capsys.readouterr().out
    assert not (tmp_path / "final").exists() and not (tmp_path / RunLock.NAME).exists()
    assert signal.getsignal(signal.SIGTERM) is sigterm_fallback

    monkeypatch.setattr(training.contrastive, "validation_recall", validate)
    final = run_stage1(caption_folder, tmp_path, "--resume")  # validates and exports from the last checkpoint
    assert_same_weights(reference.final, final / "model.safetensors")


def test_a_sigterm_after_the_last_step_check_is_passed_on_to_the_phase_after(sigterm_fallback, capsys):
    """The guard only records a SIGTERM; one that comes after the loop's last check (during the final checkpoint)
    is handed to the handler the guard replaced when the loop ends, instead of being dropped."""
    with pytest.raises(SystemExit) as exit_info:
        with exit_on_sigterm(lambda: "the final checkpoint is written"):
            with PreemptionGuard(SimpleNamespace(num_processes=1)) as preemption:
                os.kill(os.getpid(), signal.SIGTERM)
                assert preemption.requested()  # recorded, not acted upon inside the training steps
    assert exit_info.value.code == 143
    assert "SIGTERM received: stopped; the final checkpoint is written" in capsys.readouterr().out
    assert signal.getsignal(signal.SIGTERM) is sigterm_fallback


@pytest.mark.slow
def test_kill_matrix_every_stage_survives(tmp_path):
    matrix = kill_matrix.run_matrix(["1", "2", "3", "lora"], trials=3, seed=1, workspace=tmp_path)
    failed = [trial for trial in matrix.trials if not trial.survived]
    assert not failed, (
        "\n" + matrix.table() + "\n" + "\n".join(f"{t.stage} {t.mode} {t.detail}: {t.problem}" for t in failed)
    )


# ---------------------------------------------------------------------------------------------------------------
# Corrupt, truncated and tampered files
# ---------------------------------------------------------------------------------------------------------------


def truncate(path: Path) -> None:
    os.truncate(path, path.stat().st_size // 2)


def test_resume_falls_back_past_a_truncated_checkpoint_and_says_which(
    reference, caption_folder, tmp_path, caplog, capsys
):
    run = tmp_path / "run"
    shutil.copytree(reference.output, run)
    shutil.rmtree(run / "final")
    newest = run / "checkpoints" / "checkpoint-4"
    truncate(newest / "model.safetensors")  # a checkpoint copied half-way

    with pytest.raises(ValueError, match=f"{newest / 'model.safetensors'} is truncated"):
        run_stage1(caption_folder, run, "--resume", str(newest))
    with caplog.at_level(logging.WARNING):
        final = run_stage1(caption_folder, run, "--resume")
    assert f"{newest / 'model.safetensors'} is truncated" in caplog.text
    assert f"resumed from {run / 'checkpoints' / 'checkpoint-3'} at step 3" in capsys.readouterr().out
    assert_same_weights(reference.final, final / "model.safetensors")


class Trap:
    """Unpickles into a call of `Path.touch` on `marker`: stands for any code a tampered pickle would run."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


def test_a_tampered_checkpoint_pickle_is_refused_without_running_it(tmp_path, caplog):
    from accelerate import Accelerator

    from training.runtime import TrainingPosition

    accelerator = Accelerator(cpu=True)
    teacher = torch.nn.Linear(2, 2)  # stage 2 registers its teacher and loss centre like this
    accelerator.register_for_checkpointing(teacher)
    checkpoints = CheckpointManager(accelerator, tmp_path)
    saved = checkpoints.save(TrainingPosition(step=1))
    pickled = saved / "custom_checkpoint_0.pkl"
    assert pickled.is_file()
    marker = tmp_path / "code-ran"
    torch.save({"weight": Trap(marker)}, pickled)

    with caplog.at_level(logging.WARNING), pytest.raises(ValueError, match="no loadable checkpoint"):
        checkpoints.resume("latest")
    assert f"{pickled} is truncated, corrupt, or holds more than tensors" in caplog.text
    assert not marker.exists()


def test_truncated_model_and_processor_files_are_named(tiny_checkpoint, tmp_path):
    for name in ("model.safetensors", "tokenizer.json", "processor_config.json"):
        folder = tmp_path / name
        shutil.copytree(tiny_checkpoint, folder)
        truncate(folder / name)
        load = AgriCLIPModel.from_pretrained if name.endswith(".safetensors") else AgriCLIPProcessor.from_pretrained
        with pytest.raises(OSError, match=f"{folder / name}: truncated or corrupt"):
            load(folder)
    # The Auto classes (and so the zero-shot pipeline) load through the same class.
    with pytest.raises(OSError, match=f"{tmp_path / 'model.safetensors' / 'model.safetensors'}: truncated or corrupt"):
        AutoModel.from_pretrained(tmp_path / "model.safetensors")


def test_truncated_backbone_and_clip_folders_are_named_by_stage_2_and_convert(
    tiny_model, tiny_clip_checkpoint, tmp_path
):
    backbone = tmp_path / "backbone"
    tiny_model.dino_model.save_pretrained(backbone)
    clip = tmp_path / "clip"
    shutil.copytree(tiny_clip_checkpoint, clip)
    for folder in (backbone, clip):
        truncate(folder / "model.safetensors")
    with pytest.raises(OSError, match=f"{backbone / 'model.safetensors'}: truncated or corrupt"):
        load_backbone(
            SimpleNamespace(random_init=False, backbone=str(backbone), model="tiny"),
            AgriCLIPModel(AgriCLIPConfig.tiny()),
        )
    with pytest.raises(OSError, match=f"{backbone / 'model.safetensors'}: truncated or corrupt"):
        convert(dino=str(backbone), preset="tiny")
    with pytest.raises(OSError, match=f"{clip / 'model.safetensors'}: truncated or corrupt"):
        convert(clip=str(clip), preset="tiny")


def test_a_truncated_feature_cache_is_extracted_again(tiny_checkpoint, caption_folder, tmp_path, caplog):
    cache = tmp_path / "cache"
    flags = [
        "--model",
        str(tiny_checkpoint),
        "--train-data",
        str(caption_folder),
        "--log-with",
        "none",
        "--batch-size",
        "16",
        "--feature-cache",
        str(cache),
    ]
    first = load_file(stage3([*flags, "--output-dir", str(tmp_path / "first")]) / "model.safetensors")
    cached = cache / "train-0-of-1.safetensors"
    truncate(cached)
    # A write killed before its rename leaves only a temporary file, which is never read.
    (cache / ".validation-0-of-1.safetensors.tmp").write_bytes(b"half a file")
    with caplog.at_level(logging.WARNING):
        second = load_file(stage3([*flags, "--output-dir", str(tmp_path / "second")]) / "model.safetensors")
    assert f"feature cache {cached} cannot be read" in caplog.text
    assert torch.equal(first["aligner.weight"], second["aligner.weight"])
    assert torch.equal(first["aligner.bias"], second["aligner.bias"])
    load_file(cached)  # written again, whole


# ---------------------------------------------------------------------------------------------------------------
# Full disks
# ---------------------------------------------------------------------------------------------------------------


def test_disk_full_during_a_checkpoint_keeps_the_previous_one(reference, caption_folder, tmp_path, monkeypatch):
    real_save = torch.save

    def save_until_the_disk_fills(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        if ".staging-checkpoint-2" in str(f):
            truncate(Path(f))
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f))

    monkeypatch.setattr(torch, "save", save_until_the_disk_fills)
    checkpoints = tmp_path / "checkpoints"
    with pytest.raises(
        OSError,
        match=f"writing {checkpoints / 'checkpoint-2'} failed .*No space left on device.*"
        f"newest intact checkpoint is still {checkpoints / 'checkpoint-1'}",
    ) as failure:
        run_stage1(caption_folder, tmp_path)
    assert failure.value.errno == errno.ENOSPC
    # The half-written staging folder is gone (it held disk space), so nothing can mistake it for a checkpoint.
    assert sorted(p.name for p in checkpoints.iterdir()) == ["checkpoint-1"]

    monkeypatch.setattr(torch, "save", real_save)
    final = run_stage1(caption_folder, tmp_path, "--resume")
    assert_same_weights(reference.final, final / "model.safetensors")


class Savable:
    """Writes `content` to `weights.bin` in `save_pretrained`; with `fail`, half of it, then the disk is full."""

    def __init__(self, content: bytes, fail: bool = False):
        self.content, self.fail = content, fail

    def save_pretrained(self, folder):
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / "weights.bin").write_bytes(
            self.content[: len(self.content) // 2] if self.fail else self.content
        )
        if self.fail:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


SINGLE_PROCESS = SimpleNamespace(is_main_process=True, wait_for_everyone=lambda: None)


def test_disk_full_during_an_export_leaves_the_previous_one_untouched(tmp_path):
    output = export_atomically(SINGLE_PROCESS, tmp_path / "final", Savable(b"old weights"))
    with pytest.raises(
        OSError, match=f"writing {output} failed .*No space left on device.*previous {output} is untouched"
    ):
        export_atomically(SINGLE_PROCESS, output, Savable(b"new weights", fail=True))
    assert (output / "weights.bin").read_bytes() == b"old weights"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]


def test_an_export_killed_between_its_renames_does_not_block_the_next(tmp_path):
    """A kill after the new export is in place but before the previous one is removed leaves `.previous-final`."""
    output = export_atomically(SINGLE_PROCESS, tmp_path / "final", Savable(b"second"))
    (tmp_path / ".previous-final").mkdir()
    (tmp_path / ".previous-final" / "weights.bin").write_bytes(b"first")
    export_atomically(SINGLE_PROCESS, output, Savable(b"third"))
    assert (output / "weights.bin").read_bytes() == b"third"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]


# ---------------------------------------------------------------------------------------------------------------
# Bad images mid-run
# ---------------------------------------------------------------------------------------------------------------


def test_images_deleted_or_corrupted_mid_run_are_skipped_and_counted(tmp_path, monkeypatch, capsys):
    data = write_caption_folder(tmp_path / "data")
    deleted, corrupted = data / "train" / "3.png", data / "train" / "5.png"
    save = CheckpointManager.save

    def save_then_damage(self, position):
        saved = save(self, position)
        if position.step == 4:  # the end of the first epoch: the second one meets the damage
            deleted.unlink()
            corrupted.write_bytes(corrupted.read_bytes()[:100])
        return saved

    monkeypatch.setattr(CheckpointManager, "save", save_then_damage)
    final = stage1(
        [
            "--model",
            "tiny",
            "--train-data",
            str(data),
            "--output-dir",
            str(tmp_path / "run"),
            "--batch-size",
            "8",
            "--max-steps",
            "8",
            "--checkpoint-every",
            "4",
            "--log-with",
            "none",
        ]
    )
    printed = capsys.readouterr().out
    assert "skipped 2" in printed
    assert f"missing file (1): {deleted}" in printed and f"truncated (1): {corrupted}" in printed
    assert [row["step"] for row in read_metrics(tmp_path / "run", "stage1_contrastive") if "loss" in row] == list(
        range(1, 9)
    )
    assert (final / "model.safetensors").is_file()


@pytest.mark.slow
def test_a_batch_unreadable_on_one_process_only_is_skipped_by_every_process(tmp_path):
    """With one image per process, a corrupt image leaves one process an empty batch. The other process must skip
    that step too: otherwise the processes pair different steps in the all-reduce and the feature gather, and an
    epoch ends earlier on one than on the other. The summary counts the files skipped by every process."""
    data = write_caption_folder(tmp_path / "data")
    corrupted = data / "train" / "5.png"
    corrupted.write_bytes(corrupted.read_bytes()[:100])
    run = run_script(
        [
            "training.stage1_contrastive",
            "--model",
            "tiny",
            "--train-data",
            str(data),
            "--batch-size",
            "1",
            "--max-steps",
            "16",
            "--output-dir",
            str(tmp_path / "run"),
            "--log-with",
            "none",
        ],
        processes=2,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert f"truncated (1): {corrupted}" in run.stdout or f"truncated (2): {corrupted}, {corrupted}" in run.stdout, (
        run.stdout
    )
    assert "a batch is skipped on all 2 processes: 1 of them could read none of its images" in run.stderr
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file()


@pytest.mark.timeout(120)  # the loop used to spin forever on such data, growing the list of skipped files
@pytest.mark.parametrize("damage", ["all corrupt", "all deleted mid-run"])
def test_an_epoch_without_a_readable_image_stops_with_an_error_naming_the_data(damage, tmp_path, monkeypatch):
    data = write_caption_folder(tmp_path / "data")
    images = sorted((data / "train").glob("*.png"), key=lambda path: int(path.stem))
    if damage == "all corrupt":
        for image in images:
            image.write_bytes(image.read_bytes()[:100])
    else:
        save = CheckpointManager.save

        def save_then_delete(self, position):
            saved = save(self, position)
            if position.step == 4:  # the end of the first epoch
                for image in images:
                    image.unlink()
            return saved

        monkeypatch.setattr(CheckpointManager, "save", save_then_delete)
    with pytest.raises(UnreadableDataError) as failure:
        run_stage1(data, tmp_path / "run", "--max-steps", "8", "--checkpoint-every", "4")
    message = str(failure.value)
    epoch, decoded, reason = (0, 0, "truncated") if damage == "all corrupt" else (1, 32, "missing file")
    assert message.startswith(f"{data}: no batch of epoch {epoch} (4 batches) holds a readable image")
    assert f"decoded {decoded} images, skipped 32" in message and f"{reason} (32): {data / 'train'}" in message
    assert not (tmp_path / "run" / "final").exists() and not (tmp_path / "run" / RunLock.NAME).exists()


# ---------------------------------------------------------------------------------------------------------------
# Two runs on one folder, and launches that split a run
# ---------------------------------------------------------------------------------------------------------------


def write_lock(folder: Path, pid: int, hostname: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    lock = folder / RunLock.NAME
    lock.write_text(
        json.dumps(
            {
                "pid": pid,
                "hostname": hostname,
                "started": "2025-01-01T00:00:00+0000",
                "command": "python -m training.stage1_contrastive --output-dir elsewhere",
            }
        )
    )
    return lock


@pytest.mark.parametrize("holder", ["live run on this host", "run on another host"])
def test_a_second_run_on_the_same_output_folder_is_refused(holder, caption_folder, tmp_path):
    """The test process itself stands for the live run that holds the folder (its pid is alive)."""
    host = socket.gethostname() if holder == "live run on this host" else "elsewhere.example"
    lock = write_lock(tmp_path, os.getpid(), host)
    held = lock.read_text()
    expected = "is in use by another run" if holder == "live run on this host" else "is locked by a run on another host"
    with pytest.raises(
        RunLockedError,
        match=f"{tmp_path} {expected} \\(pid {os.getpid()} on {host}, started "
        "2025-01-01T00:00:00\\+0000: python -m training.stage1_contrastive",
    ):
        run_stage1(caption_folder, tmp_path)
    assert lock.read_text() == held  # the holder's lock is left alone
    assert sorted(p.name for p in tmp_path.iterdir()) == [RunLock.NAME]  # nothing else was written


def test_a_stale_lock_is_taken_over_and_each_run_releases_its_own(caption_folder, tmp_path, capsys):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # a pid that no process holds any more: the run that took the lock was killed
    lock = write_lock(tmp_path, gone.pid, socket.gethostname())
    holders = []
    save = CheckpointManager.save

    def save_and_look(self, position):
        holders.append(json.loads(lock.read_text()))
        return save(self, position)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(CheckpointManager, "save", save_and_look)
        run_stage1(caption_folder, tmp_path, "--max-steps", "1")
    assert (
        f"taking over the stale lock {lock} of a run that is gone (pid {gone.pid} on {socket.gethostname()}"
        in capsys.readouterr().out
    )
    assert holders and all(h["pid"] == os.getpid() and h["hostname"] == socket.gethostname() for h in holders)
    assert not lock.exists()
    with pytest.raises(FileNotFoundError, match="no such file or folder"):  # a failed run releases its lock too
        run_stage1(tmp_path / "missing-data", tmp_path)
    assert not lock.exists()


def test_a_world_size_that_accelerate_does_not_see_is_refused(monkeypatch):
    """WORLD_SIZE=2 from the launcher while Accelerate runs one process: each would train alone."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(
        RuntimeError,
        match="2 processes were launched together .* Accelerate runs each alone .*"
        "ACCELERATE_USE_CPU=1 .*accelerate launch --multi_gpu",
    ):
        check_world_size(SimpleNamespace(num_processes=1, distributed_type="NO"))
    check_world_size(SimpleNamespace(num_processes=2, distributed_type="MULTI_CPU"))  # a launch Accelerate sees


@pytest.mark.slow
def test_torchrun_on_cpu_without_accelerate_cpu_processes_is_refused(caption_folder, tmp_path):
    """torchrun on CPU (like an FSDP config of `accelerate launch`) initialises torch.distributed with 2 processes
    while Accelerate stays single-process: both processes refuse before writing anything."""
    env = {key: value for key, value in os.environ.items() if key != "ACCELERATE_USE_CPU"} | {"OMP_NUM_THREADS": "1"}
    run = run_subprocess(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            "-m",
            "training.stage1_contrastive",
            "--model",
            "tiny",
            "--train-data",
            str(caption_folder),
            "--max-steps",
            "1",
            "--output-dir",
            str(tmp_path / "run"),
            "--log-with",
            "none",
        ],
        env=env,
        timeout=300,
    )
    assert run.returncode != 0
    assert (
        run.stderr.count(
            "2 processes were launched together (WORLD_SIZE=2, torch.distributed initialised with 2 "
            "processes) but Accelerate runs each alone"
        )
        == 2
    ), run.stderr[-3000:]
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------------------------------
# Mismatched parts
# ---------------------------------------------------------------------------------------------------------------


def test_a_config_of_another_model_type_is_refused(tiny_checkpoint, tmp_path):
    folder = tmp_path / "clip-config"
    shutil.copytree(tiny_checkpoint, folder)
    CLIPConfig().save_pretrained(folder)
    with pytest.raises(ValueError, match="config of model type 'clip', not 'agriclip'"):
        AgriCLIPModel.from_pretrained(folder)


@pytest.mark.parametrize(
    "mismatch, message",
    [
        ("image_size", r"makes 96x96 images but vision_config.image_size is 64"),
        ("normalisation", r"image_mean \[0.481.*\] differs from the config's \[0.485"),
        ("vocabulary", r"the tokenizer has 49409 tokens but text_config.vocab_size is 49408"),
    ],
)
def test_a_processor_that_does_not_fit_the_model_is_refused_before_training_or_inference(
    mismatch, message, tiny_checkpoint, tiny_processor, caption_folder, tmp_path
):
    from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    folder = tmp_path / "mismatched"
    shutil.copytree(tiny_checkpoint, folder)
    if mismatch == "image_size":
        processor = AgriCLIPProcessor.from_config(
            AgriCLIPConfig.tiny(image_size=96), tokenizer=tiny_processor.tokenizer
        )
    elif mismatch == "normalisation":
        other = AgriCLIPConfig.tiny(image_mean=list(OPENAI_CLIP_MEAN), image_std=list(OPENAI_CLIP_STD))
        processor = AgriCLIPProcessor.from_config(other, tokenizer=tiny_processor.tokenizer)
    else:
        tokenizer = AgriCLIPProcessor.from_pretrained(tiny_checkpoint).tokenizer
        tokenizer.add_tokens(["<paddy-blast>"])
        processor = AgriCLIPProcessor(image_processor=tiny_processor.image_processor, tokenizer=tokenizer)
    processor.save_pretrained(folder)
    with pytest.raises(ValueError, match=f"{folder}: the processor does not fit the model: .*{message}"):
        load_model_and_processor(str(folder))
    with pytest.raises(ValueError, match=f"the processor does not fit the model: .*{message}"):
        ZeroShotClassifier.from_pretrained(folder)
    if mismatch == "vocabulary":
        with pytest.raises(ValueError, match=message):
            stage1(
                [
                    "--model",
                    str(folder),
                    "--train-data",
                    str(caption_folder),
                    "--output-dir",
                    str(tmp_path / "run"),
                    "--log-with",
                    "none",
                ]
            )
        assert not (tmp_path / "run" / "checkpoints").exists()


# ---------------------------------------------------------------------------------------------------------------
# Safe loading and secrets
# ---------------------------------------------------------------------------------------------------------------


def library_files():
    """The package's Python files: everything but the tests (which load only files they have just written)."""
    files = []
    for path in sorted(REPO_ROOT.rglob("*.py")):
        parts = path.relative_to(REPO_ROOT).parts
        if parts[0] != "tests" and not any(part.startswith(".") for part in parts):
            files.append(path)
    return files


def test_no_load_path_unpickles_arbitrary_code():
    unsafe = []
    files = library_files()
    assert REPO_ROOT / "modeling_agriclip" / "convert.py" in files and REPO_ROOT / "training" / "runtime.py" in files
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.Call):
                continue
            name = ast.unparse(node.func)
            keywords = {k.arg: k.value for k in node.keywords}
            safe = isinstance(keywords.get("weights_only"), ast.Constant) and keywords["weights_only"].value is True
            if name == "torch.load" and not safe:
                unsafe.append(f"{path}:{node.lineno} torch.load without weights_only=True")
            if name in ("pickle.load", "pickle.loads", "pickle.Unpickler", "dill.load", "joblib.load"):
                unsafe.append(f"{path}:{node.lineno} {name}")
            trusting = (
                isinstance(keywords.get("trust_remote_code"), ast.Constant) and keywords["trust_remote_code"].value
            )
            if trusting:
                unsafe.append(f"{path}:{node.lineno} trust_remote_code=True")
    assert not unsafe, "\n".join(unsafe)


def test_saved_folders_hold_safetensors_only(reference, tiny_checkpoint):
    for folder in (tiny_checkpoint, reference.output / "final"):
        assert (folder / "model.safetensors").is_file()
        assert not [p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".pkl", ".ckpt")]


def test_custom_code_files_import_only_torch_transformers_and_each_other(tiny_checkpoint):
    # huggingface_hub is a requirement of transformers, so it is there wherever transformers is.
    allowed = {"torch", "transformers", "huggingface_hub"} | set(sys.stdlib_module_names)
    code_files = {path.stem: path for path in tiny_checkpoint.glob("*.py")}
    assert {"configuration_agriclip", "modeling_agriclip", "processing_agriclip", "tokenizer"} <= set(code_files)
    foreign = []
    for name, path in code_files.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                modules = [node.module]
            elif isinstance(node, ast.ImportFrom):
                # A relative import must name a file the folder carries.
                if node.module not in code_files:
                    foreign.append(f"{path.name}:{node.lineno} from .{node.module}: not in the saved folder")
                continue
            else:
                continue
            foreign += [
                f"{path.name}:{node.lineno} imports {module}"
                for module in modules
                if module.split(".")[0] not in allowed
            ]
    assert not foreign, "\n".join(foreign)


def test_no_token_reaches_a_log_or_a_saved_file(reference):
    assert "stage 1:" in reference.printed  # the capture worked
    assert SECRET not in reference.printed
    leaking = [
        str(path) for path in reference.output.rglob("*") if path.is_file() and SECRET.encode() in path.read_bytes()
    ]
    assert not leaking
    logged = json.loads((reference.output / "logs" / "stage1_contrastive" / "config.json").read_text())
    assert not [key for key in logged if "token" in key.lower()]
