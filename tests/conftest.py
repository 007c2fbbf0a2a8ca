"""Shared fixtures: tiny AgriCLIP models built from configs (nothing is downloaded)."""

import builtins
import contextlib
import errno
import io
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPProcessor

from modeling_agriclip import AgriCLIPConfig, AgriCLIPModel, AgriCLIPProcessor
from modeling_agriclip.tokenizer import build_clip_tokenizer

# The loopback Hub's fixture, for every test module that asks for `fake_hub`.
from hub_server import fake_hub  # noqa: F401, E402


@pytest.fixture(scope="session")
def clip_tokenizer():
    return build_clip_tokenizer()


@pytest.fixture(scope="session")
def tiny_config():
    return AgriCLIPConfig.tiny()


@pytest.fixture(scope="session")
def tiny_model(tiny_config):
    torch.manual_seed(0)
    return AgriCLIPModel(tiny_config).eval()


@pytest.fixture(scope="session")
def tiny_processor(tiny_config, clip_tokenizer):
    return AgriCLIPProcessor.from_config(tiny_config, tokenizer=clip_tokenizer)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, tiny_model, tiny_processor):
    """A saved AgriCLIP folder (model + processor + custom-code files)."""
    path = tmp_path_factory.mktemp("agriclip-tiny")
    tiny_model.save_pretrained(path)
    tiny_processor.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_clip_baseline(clip_tokenizer):
    """A plain transformers CLIPModel and CLIPProcessor (PIL image backend), tiny and random."""
    torch.manual_seed(0)
    tower = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}
    config = CLIPConfig(
        text_config={**tower, "vocab_size": len(clip_tokenizer)},
        vision_config={**tower, "image_size": 32, "patch_size": 8},
        projection_dim=16,
    )
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return CLIPModel(config).eval(), CLIPProcessor(image_processor=image_processor, tokenizer=clip_tokenizer)


@pytest.fixture(scope="session")
def tiny_clip_checkpoint(tmp_path_factory, tiny_clip_baseline):
    """The baseline saved as a plain transformers CLIP folder."""
    path = tmp_path_factory.mktemp("clip-tiny")
    model, processor = tiny_clip_baseline
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def sample_images():
    """Three distinct RGB photos of different sizes."""
    rng = np.random.default_rng(0)
    return [
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in [(80, 100), (64, 64), (120, 90)]
    ]


COLOURS = {"red": (200, 40, 30), "green": (40, 190, 50), "blue": (30, 60, 200), "yellow": (220, 210, 30)}


def write_caption_folder(root, n_train=32, n_validation=16, seed=0):
    """An image folder with metadata.jsonl per split: noisy solid-colour leaves captioned by colour."""
    import json

    rng = np.random.default_rng(seed)
    names = list(COLOURS)
    for split, count in (("train", n_train), ("validation", n_validation)):
        folder = root / split
        folder.mkdir(parents=True)
        rows = []
        for index in range(count):
            name = names[index % len(names)]
            pixels = np.clip(np.array(COLOURS[name]) + rng.normal(0, 25, (48, 48, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"{index}.png")
            rows.append({"file_name": f"{index}.png", "caption": f"a photo of a {name} leaf"})
        (folder / "metadata.jsonl").write_text("\n".join(json.dumps(row) for row in rows))
    return root


def write_labelled_folder(root, per_class=8, seed=0):
    """One subfolder per colour of noisy solid-colour leaves."""
    rng = np.random.default_rng(seed)
    for name, colour in COLOURS.items():
        (root / name).mkdir(parents=True)
        for index in range(per_class):
            pixels = np.clip(np.array(colour) + rng.normal(0, 25, (40, 40, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{index}.png")
    return root


@pytest.fixture(scope="session")
def caption_folder(tmp_path_factory):
    return write_caption_folder(tmp_path_factory.mktemp("captions"))


@pytest.fixture(scope="session")
def variant_caption_folder(tmp_path_factory):
    """The caption folder with 3 caption variants per image, as the embedded dataset and the ALive builder write
    them: a `captions` list whose first entry is also `caption`."""
    import json

    root = write_caption_folder(tmp_path_factory.mktemp("caption-variants"))
    for metadata in root.glob("*/metadata.jsonl"):
        rows = [json.loads(line) for line in metadata.read_text().splitlines()]
        for row in rows:
            colour = row["caption"].removeprefix("a photo of a ").removesuffix(" leaf")
            row["captions"] = [
                row["caption"],
                f"a {colour} leaf on a plant in the field",
                f"close up of one leaf that is {colour} all over",
            ]
        metadata.write_text("\n".join(json.dumps(row) for row in rows))
    return root


@pytest.fixture
def sigterm_fallback():
    """For tests that send SIGTERM to their own process: the handler in place before the code under test runs.

    Should that code leave SIGTERM to this handler, the test fails (instead of pytest being killed by the default
    action); a test can also check that the code restored it. Restores the handler pytest had afterwards."""

    def fallback(signum, frame):
        pytest.fail("SIGTERM reached the test's fallback handler: the code under test did not handle it")

    previous = signal.signal(signal.SIGTERM, fallback)
    yield fallback
    signal.signal(signal.SIGTERM, previous)


def read_metrics(run_dir, run_name):
    """The rows a training run logged to <run_dir>/logs/<run_name>/metrics.jsonl."""
    import json

    return [json.loads(line) for line in (run_dir / "logs" / run_name / "metrics.jsonl").read_text().splitlines()]


def run_subprocess(command, *, timeout, env=None, cwd=None) -> subprocess.CompletedProcess:
    """`subprocess.run(command, capture_output=True, text=True)` that cannot hang the suite.

    On timeout the whole process group is killed: `subprocess.run` kills only the direct child, then waits for
    the pipes to close, which the grandchildren (the workers of `accelerate launch`, a tokenizer's threads)
    keep open forever.
    """
    with subprocess.Popen(
        command, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    ) as process:
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            stdout, stderr = process.communicate()
            pytest.fail(f"{' '.join(map(str, command))} ran past {timeout} s and was killed\n{stderr[-3000:]}")
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)  # workers left behind by a launcher that already exited
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def finish_distributed_worker(results, path) -> None:
    """Ends a test's spawned gloo worker: writes `results` to `path` whole or not at all, waits for the other
    ranks, and leaves without the process-group teardown. That teardown can deadlock in torch (the main thread
    holds the GIL while ~ProcessGroupGloo waits for a gloo worker thread that needs the GIL to free a tensor);
    it was seen here once in 6 runs."""
    import torch.distributed as dist

    torch.save(results, f"{path}.tmp")
    os.replace(f"{path}.tmp", path)
    dist.barrier()
    os._exit(0)


def run_script(module_args, processes=1, timeout=300):
    """Runs `python -m <module> ...` in a subprocess; with processes > 1 under `accelerate launch` on CPU processes
    (ACCELERATE_USE_CPU=1 with the multi-process launcher: `--cpu` alone starts a single process)."""
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable]
    if processes > 1:
        command += [
            "-m",
            "accelerate.commands.launch",
            "--multi_gpu",
            "--num_processes",
            str(processes),
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            "--main_process_port",
            "0",
        ]
    return run_subprocess([*command, "-m", *module_args], env=env, timeout=timeout)


def full_disk(monkeypatch, folder, room=10):
    """Files opened for writing in `folder` sit on a disk that fills after `room` bytes: a write beyond it stores
    what fits, then fails with ENOSPC, as a full disk does."""
    real_open = io.open

    class FullDiskFile:
        def __init__(self, handle):
            self.handle, self.room = handle, room

        def write(self, data):
            if len(data) > self.room:
                self.handle.write(data[: self.room])
                self.room = 0
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            self.room -= len(data)
            return self.handle.write(data)

        def __getattr__(self, name):
            return getattr(self.handle, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc_info):
            self.handle.close()

    def open_on_a_full_disk(file, mode="r", *args, **kwargs):
        handle = real_open(file, mode, *args, **kwargs)
        writing = any(flag in mode for flag in "wax+")
        return FullDiskFile(handle) if writing and Path(os.fsdecode(file)).parent == folder else handle

    monkeypatch.setattr(io, "open", open_on_a_full_disk)
    monkeypatch.setattr(builtins, "open", open_on_a_full_disk)


def run_as_main(module: str, argv: list[str]) -> tuple[int, str]:
    """Runs `python -m module argv...` in this process (its `if __name__ == "__main__":` path, without the cost of a
    new interpreter); returns (exit status, stderr)."""
    import runpy
    import warnings

    stderr = io.StringIO()
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stderr(stderr), warnings.catch_warnings():
        patch.setattr(sys, "argv", [module, *map(str, argv)])
        # runpy warns that the module, imported by the test already, runs again as __main__: that is the point here.
        warnings.filterwarnings("ignore", message=".*found in sys.modules", category=RuntimeWarning)
        try:
            runpy.run_module(module, run_name="__main__", alter_sys=True)
            code = 0
        except SystemExit as stop:
            code = stop.code if isinstance(stop.code, int) else 1
    return code, stderr.getvalue()


def assert_same_tensors(expected: dict, actual: dict) -> None:
    """Every tensor equal bit for bit; otherwise says how many differ and by how much at most."""
    assert expected.keys() == actual.keys()
    differences = {
        key: (expected[key].double() - actual[key].double()).abs().max().item()
        for key in expected
        if not torch.equal(expected[key], actual[key])
    }
    assert not differences, (
        f"{len(differences)} of {len(expected)} tensors differ, max |diff| {max(differences.values()):.3g}"
    )


def kill_before_last_checkpoint(run_dir: Path, last_step: int, output: str = "final") -> None:
    """Leaves a finished run as a kill just after its next-to-last checkpoint would: its `output` and its
    `checkpoint-<last_step>` removed, so that `--resume` continues from the checkpoint before."""
    shutil.rmtree(run_dir / output)
    shutil.rmtree(run_dir / "checkpoints" / f"checkpoint-{last_step}")


# Stage 2 with a small DINO head and two local crops, fast enough for the tests that train it.
SMALL_HEAD = [
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
    "--log-with",
    "none",
]

# Stage 2 of the tiny preset for two steps, as the multi-process runs and their one-process references train it.
STAGE2_ARGS = [
    "training.stage2_dino",
    "--model",
    "tiny",
    "--max-steps",
    "2",
    "--epochs",
    "2",
    "--checkpoint-every",
    "2",
    *SMALL_HEAD,
]
