"""Hub publishing over a Hub-compatible server on loopback: the dry run, push, pull, pipeline by repo id, remote code
from the repo, revision pinning, datasets, LoRA adapters, and no token in any file or log."""

import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from huggingface_hub import HfApi, ModelCard, snapshot_download
from PIL import Image
from safetensors.torch import load_file, save_file
from test_model_card import write_alive_folder
from transformers import pipeline
from transformers.dynamic_module_utils import get_class_from_dynamic_module

import modeling_agriclip
from agriclip.cli import main as agriclip
from agriclip.errors import ExitCode
from model_card.card import write_dataset_card, write_model_card
from model_card.publish import (
    PublishError,
    find_secrets,
    plan_upload,
    publish,
    validate_adapter,
    validate_checkpoint,
    validate_dataset,
)
from modeling_agriclip import AgriCLIPConfig, AgriCLIPModel, AgriCLIPProcessor

from conftest import run_subprocess
from hub_server import FAKE_TOKEN, FakeHub


REPO_ROOT = Path(__file__).resolve().parents[1]
LABELS = ["a photo of a leaf", "a photo of a fish", "a photo of a cow"]
# What save_pretrained of the tiny model and processor writes, plus the card: a checkpoint's allow-list.
CHECKPOINT = [
    "README.md",
    "backbones.py",
    "config.json",
    "configuration_agriclip.py",
    "model.safetensors",
    "modeling_agriclip.py",
    "processing_agriclip.py",
    "processor_config.json",
    "tokenizer.json",
    "tokenizer.py",
    "tokenizer_config.json",
]
CODE_FILES = [name for name in CHECKPOINT if name.endswith(".py")]
INSTALLED = Path(modeling_agriclip.__file__).parent
PRIVATE_KEY = "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQ\n-----END OPENSSH PRIVATE KEY-----\n"


@pytest.fixture(scope="module")
def carded_checkpoint(tiny_checkpoint, tmp_path_factory):
    """The tiny checkpoint with its model card: a folder ready to publish."""
    folder = shutil.copytree(tiny_checkpoint, tmp_path_factory.mktemp("publish") / "agriclip-tiny")
    write_model_card(folder, repo_id="agri/agriclip-tiny")
    return folder


@pytest.fixture
def checkpoint(carded_checkpoint, tmp_path):
    """A private copy to break or change."""
    return shutil.copytree(carded_checkpoint, tmp_path / "agriclip-tiny")


@pytest.fixture
def checked(monkeypatch):
    """Stands in for the checkpoint dry run in tests of the transport alone (the dry run has tests of its own);
    lists the folders `publish` asked it to check."""
    folders = []
    monkeypatch.setattr(
        "model_card.publish.validate_checkpoint", lambda folder, **kwargs: folders.append(Path(folder)) or []
    )
    return folders


def outputs(model_or_path, processor, images, **kwargs):
    model = (
        model_or_path
        if isinstance(model_or_path, torch.nn.Module)
        else AgriCLIPModel.from_pretrained(model_or_path, **kwargs)
    )
    inputs = processor(text=LABELS, images=images, return_tensors="pt")
    with torch.no_grad():
        return model.eval()(**inputs).logits_per_image


def all_text(root) -> str:
    return "".join(path.read_bytes().decode("latin-1") for path in Path(root).rglob("*") if path.is_file())


def printed_plan(out: str) -> tuple[list[str], list[str]]:
    """The files and the left-out entries that a dry run printed."""
    sections, current = {"would upload": [], "left out": []}, None
    for line in out.splitlines():
        current = next((header for header in sections if line.startswith(header)), current)
        if line.startswith("  ") and current:
            sections[current].append(line.strip())
    return sections["would upload"], sections["left out"]


def tamper(code_file: Path, marker: Path) -> None:
    """Makes a custom-code file write `marker` when it is imported, and otherwise behave as before."""
    code_file.write_text(f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n" + code_file.read_text())


def differs(name: str) -> str:
    return (
        f"{name} differs from the installed package's ({INSTALLED / name}); save the model again, "
        "or pass --trust-remote-code to run and compare it"
    )


# ---------------------------------------------------------------------------------------------------------------
# The dry run
# ---------------------------------------------------------------------------------------------------------------


def test_dry_run_passes_a_complete_checkpoint_and_uploads_nothing(carded_checkpoint, fake_hub, capsys):
    assert agriclip(["publish", str(carded_checkpoint), "--repo-id", "agri/agriclip-tiny", "--dry-run"]) == ExitCode.OK
    out = capsys.readouterr().out
    assert "dry run passed" in out
    plan = plan_upload(carded_checkpoint)
    assert plan.files == CHECKPOINT == sorted(p.name for p in carded_checkpoint.iterdir())
    assert printed_plan(out) == (CHECKPOINT, []) and plan.left_out == []
    assert fake_hub.repos == {}


def test_dry_run_names_a_missing_processor_file_and_uploads_nothing(checkpoint, fake_hub, capsys):
    (checkpoint / "processor_config.json").unlink()
    (checkpoint / "tokenizer.json").unlink()
    assert agriclip(["publish", str(checkpoint), "--repo-id", "agri/broken"]) == ExitCode.INPUT
    message = capsys.readouterr().err
    assert "nothing was uploaded" in message
    assert "processor_config.json is missing (save the processor" in message
    assert "tokenizer.json is missing" in message
    assert [r for r in fake_hub.requests if r["method"] == "POST"] == [] and fake_hub.repos == {}


def test_dry_run_names_a_config_that_does_not_load(checkpoint):
    config = json.loads((checkpoint / "config.json").read_text())
    (checkpoint / "config.json").write_text(json.dumps({**config, "image_embedding": "dino"}))
    with pytest.raises(PublishError, match=r"config.json does not load: .*image_embedding must be one of"):
        publish(checkpoint, "agri/x", dry_run=True)
    del config["dino_config"]
    (checkpoint / "config.json").write_text(json.dumps(config))
    assert validate_checkpoint(checkpoint) == [
        "config.json does not load: The AgriCLIP config is missing the sub-config(s) ['dino_config']; "
        "a saved config names all of ('text_config', 'vision_config', 'dino_config')"
    ]
    (checkpoint / "config.json").write_text('{"model_type": "agriclip",')
    assert validate_checkpoint(checkpoint)[0].startswith("config.json does not load: it is not valid JSON")


def test_dry_run_names_missing_weights_card_and_custom_code(checkpoint):
    for name in ("model.safetensors", "README.md", "tokenizer.py"):
        (checkpoint / name).unlink()
    problems = validate_checkpoint(checkpoint)
    assert "model.safetensors is missing (no weights in safetensors format)" in problems
    assert "README.md is missing (write the card with `agriclip card FOLDER`)" in problems
    assert any(p.startswith("processing_agriclip.py imports tokenizer.py, which is missing") for p in problems), (
        problems
    )


def test_dry_run_names_weights_that_do_not_fit_the_config(checkpoint):
    AgriCLIPModel(AgriCLIPConfig.tiny(backbone="resnet")).save_pretrained(checkpoint / "other")
    shutil.copy(checkpoint / "other" / "model.safetensors", checkpoint / "model.safetensors")
    shutil.rmtree(checkpoint / "other")
    problems = validate_checkpoint(checkpoint)
    assert any(
        p.startswith("the weights do not match the config:") and "missing keys" in p and "dino_model" in p
        for p in problems
    ), problems


def test_dry_run_catches_custom_code_that_differs_from_the_package(checkpoint):
    # The backbone's pooling (the CLS token of the tiny ViT) is Hub code of the backbone registry, which the model
    # file imports.
    pooling = checkpoint / "backbones.py"
    pooling.write_text(
        pooling.read_text().replace("return outputs.last_hidden_state[:, 0]", "return outputs.last_hidden_state[:, 1]")
    )
    assert validate_checkpoint(checkpoint) == [differs("backbones.py")]
    # Trusted, the files run, and their outputs are compared with the package's.
    [problem] = validate_checkpoint(checkpoint, trust_remote_code=True)
    assert problem.startswith("the custom-code files give other outputs than the installed package")
    code = checkpoint / "modeling_agriclip.py"
    code.write_text("import modeling_agriclip\n" + code.read_text())
    assert validate_checkpoint(checkpoint, trust_remote_code=True) == [
        "modeling_agriclip.py imports modeling_agriclip, which people loading with trust_remote_code do not have"
    ]
    shutil.copy(INSTALLED / "modeling_agriclip.py", code)
    shutil.copy(INSTALLED / "backbones.py", pooling)
    processing = checkpoint / "processing_agriclip.py"
    processing.write_text(
        processing.read_text().replace("max_length = max_length or self.tokenizer.model_max_length", "max_length = 4")
    )
    assert validate_checkpoint(checkpoint, trust_remote_code=True) == [
        "the custom-code processor gives other inputs (['attention_mask', 'input_ids']) than the installed package; save the processor again"
    ]


def test_every_file_that_would_go_up_is_scanned_by_its_bytes_whatever_its_name(checkpoint, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    # The weights' header can carry metadata: binary files are read too, not only text suffixes.
    save_file(
        load_file(checkpoint / "model.safetensors"),
        checkpoint / "model.safetensors",
        metadata={"format": "pt", "by": FAKE_TOKEN},
    )
    with open(checkpoint / "README.md", "a", encoding="utf-8") as card:
        card.write("\n" + PRIVATE_KEY)
    (checkpoint / "eval_results.json").write_text(json.dumps({"ci": "ghp_" + "x1" * 18, "bucket": "AKIA" + "Q7" * 8}))
    tokenizer_config = json.loads((checkpoint / "tokenizer_config.json").read_text())
    (checkpoint / "tokenizer_config.json").write_text(json.dumps({**tokenizer_config, "hub": "hf_" + "a1B2" * 9}))
    (checkpoint / ".env").write_text(f"HF_TOKEN={FAKE_TOKEN}\n")  # left out, so no finding
    problems = validate_checkpoint(checkpoint)
    assert sorted(problems) == sorted(
        f"{name} contains {what}; remove it before publishing"
        for name, what in [
            ("model.safetensors", "this session's Hugging Face token"),
            ("README.md", "a string shaped like a private key (-----BEGIN ... PRIVATE KEY-----)"),
            ("eval_results.json", "a string shaped like a GitHub token (ghp_..., github_pat_...)"),
            ("eval_results.json", "a string shaped like an AWS access key id (AKIA...)"),
            ("tokenizer_config.json", "a string shaped like a Hugging Face token (hf_...)"),
        ]
    )
    assert not any(FAKE_TOKEN in problem for problem in problems)


def test_the_byte_scan_sees_a_secret_cut_by_a_chunk_boundary(tmp_path, monkeypatch):
    monkeypatch.setattr("model_card.publish.SCAN_CHUNK", 1024)
    noise = np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    secret = b"hf_" + b"a1B2" * 9
    (tmp_path / "clean.bin").write_bytes(noise)
    names = []
    for start in range(1024 - len(secret) + 1, 1024):  # every place where the first boundary cuts the secret
        names.append(f"cut-{start}.bin")
        (tmp_path / names[-1]).write_bytes(noise[:start] + secret + noise[start + len(secret) :])
    assert find_secrets(tmp_path, ["clean.bin", *names]) == [
        f"{name} contains a string shaped like a Hugging Face token (hf_...); remove it before publishing"
        for name in names
    ]


def test_only_the_allow_list_goes_up_exactly_as_the_dry_run_printed_it(checkpoint, fake_hub, tmp_path, capsys):
    outside = tmp_path / "outside"
    (outside / "wandb").mkdir(parents=True)
    (outside / "id_rsa").write_text(PRIVATE_KEY)
    (outside / "wandb" / "settings").write_text(f"api_key={FAKE_TOKEN}\n")
    (checkpoint / ".env").write_text(f"HF_TOKEN={FAKE_TOKEN}\n")
    (checkpoint / "train.log").write_text(f"step 1: pushing with {FAKE_TOKEN}\n")
    (checkpoint / "notes").write_text(f"token {FAKE_TOKEN}\n")
    (checkpoint / "id_rsa").symlink_to(outside / "id_rsa")
    (checkpoint / "wandb").symlink_to(outside / "wandb", target_is_directory=True)
    (checkpoint / "checkpoints" / "step-10").mkdir(parents=True)
    (checkpoint / "checkpoints" / "step-10" / "optimizer.safetensors").write_bytes(b"\0" * 64)
    (checkpoint / "eval_results.json").write_text(json.dumps({"datasets": {}, "mean": {}}))

    agriclip(["publish", str(checkpoint), "--repo-id", "agri/allow-listed", "--dry-run"])
    files, left_out = printed_plan(capsys.readouterr().out)
    assert files == sorted([*CHECKPOINT, "eval_results.json"])
    assert left_out == [".env", "checkpoints/", "id_rsa", "notes", "train.log", "wandb"]

    agriclip(["publish", str(checkpoint), "--repo-id", "agri/allow-listed"])
    pushed = fake_hub.files("agri/allow-listed")
    assert sorted(set(pushed) - {".gitattributes"}) == files
    assert all(pushed[name] == (checkpoint / name).read_bytes() for name in files)
    assert not any(FAKE_TOKEN.encode() in data or b"PRIVATE KEY" in data for data in pushed.values())


def test_links_that_lead_out_of_the_folder_are_never_uploaded(checkpoint, tmp_path):
    outside = tmp_path / "outside"
    (outside / "templates").mkdir(parents=True)
    (outside / "id_rsa").write_text(PRIVATE_KEY)
    (outside / "templates" / "default.jinja").write_text("{{ messages }}")
    (checkpoint / "id_rsa").symlink_to(outside / "id_rsa")
    (checkpoint / "additional_chat_templates").symlink_to(outside / "templates", target_is_directory=True)
    # A link that stays inside the folder goes up as the file it leads to.
    (checkpoint / "weights").mkdir()
    (checkpoint / "model.safetensors").rename(checkpoint / "weights" / "model.safetensors")
    (checkpoint / "model.safetensors").symlink_to(Path("weights") / "model.safetensors")
    plan = plan_upload(checkpoint)
    assert plan.files == CHECKPOINT and plan.problems == []
    assert plan.left_out == ["additional_chat_templates", "id_rsa", "weights/"]
    assert validate_checkpoint(checkpoint) == []
    # A file of the allow-list that leads outside is a problem: the repo would lack it.
    shutil.move(checkpoint / "tokenizer.json", outside / "tokenizer.json")
    (checkpoint / "tokenizer.json").symlink_to(outside / "tokenizer.json")
    problems = validate_checkpoint(checkpoint)
    assert [problem.split(";")[0] for problem in problems] == [
        "tokenizer.json leads outside the folder (a symbolic link, or inside a linked folder), and what lies outside is never uploaded"
    ]
    assert "tokenizer.json" not in plan_upload(checkpoint).files
    # Nor is anything but a regular file read: a pipe would block the scan.
    os.mkfifo(checkpoint / "vocab.json")
    assert [problem.split(";")[0] for problem in validate_checkpoint(checkpoint)][1:] == [
        "vocab.json is not a regular file (a folder, a broken link or a pipe)"
    ]


def test_sharded_weights_go_up_as_the_index_and_the_shards_it_names(checkpoint, tiny_model):
    (checkpoint / "model.safetensors").unlink()
    tiny_model.save_pretrained(checkpoint, max_shard_size="100KB")
    shards = sorted(path.name for path in checkpoint.glob("model-*-of-*.safetensors"))
    assert len(shards) > 1
    plan = plan_upload(checkpoint)
    assert plan.files == sorted({*CHECKPOINT, *shards, "model.safetensors.index.json"} - {"model.safetensors"})
    assert validate_checkpoint(checkpoint) == []
    index = json.loads((checkpoint / "model.safetensors.index.json").read_text())
    index["weight_map"][next(iter(index["weight_map"]))] = "../elsewhere.safetensors"
    (checkpoint / "model.safetensors.index.json").write_text(json.dumps(index))
    (problem,) = plan_upload(checkpoint).problems
    assert problem.startswith(
        f"{checkpoint / 'model.safetensors.index.json'}: weight_map: the shard '../elsewhere.safetensors' leads outside"
    )


def test_the_dry_run_runs_no_code_of_the_folder_unless_trusted(checkpoint, tmp_path):
    markers = {name: tmp_path / f"{name}.ran" for name in CODE_FILES}
    for name, marker in markers.items():
        tamper(checkpoint / name, marker)
    assert validate_checkpoint(checkpoint) == [differs(name) for name in CODE_FILES]
    with pytest.raises(PublishError, match=r"modeling_agriclip\.py differs from the installed package's"):
        publish(checkpoint, "agri/tampered", dry_run=True)
    assert not any(marker.exists() for marker in markers.values())
    # Trusted, by the user's explicit choice, the files that build the processor and the model run (tokenizer.py only
    # serves from_config); they build the package's, so the dry run passes.
    assert publish(checkpoint, "agri/tampered", dry_run=True, trust_remote_code=True).files == CHECKPOINT
    assert [name for name, marker in markers.items() if marker.exists()] == [
        "backbones.py",
        "configuration_agriclip.py",
        "modeling_agriclip.py",
        "processing_agriclip.py",
    ]


def test_custom_code_the_package_lacks_or_cannot_read_is_refused(checkpoint):
    processor_config = json.loads((checkpoint / "processor_config.json").read_text())
    processor_config["auto_map"].update(
        {"AutoImageProcessor": "image_processing_agriclip.Images", "AutoFeatureExtractor": "broken.Features"}
    )
    (checkpoint / "processor_config.json").write_text(json.dumps(processor_config))
    (checkpoint / "image_processing_agriclip.py").write_text("class Images:\n    pass\n")
    (checkpoint / "broken.py").write_bytes(b"\xff\xfe not UTF-8")
    tokenizer_config = json.loads((checkpoint / "tokenizer_config.json").read_text())
    tokenizer_config["auto_map"]["AutoTokenizer"] = ["other/repo--tokenization.Tokenizer", None]
    (checkpoint / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    assert "image_processing_agriclip.py" in plan_upload(checkpoint).files
    assert validate_checkpoint(checkpoint) == [
        "tokenizer_config.json auto_map names 'other/repo--tokenization', which is no code file of this folder; save the model and processor again",
        "broken.py is not UTF-8 Python source; save the model and processor again",
        "image_processing_agriclip.py is no file of the installed package modeling_agriclip; save the model again, "
        "or pass --trust-remote-code to run and compare it",
    ]


def test_the_command_never_asks_on_stdin_and_runs_no_folder_code(checkpoint, tmp_path):
    marker = tmp_path / "ran"
    tamper(checkpoint / "modeling_agriclip.py", marker)
    env = {
        "PATH": os.environ["PATH"],
        "HF_HOME": str(tmp_path / "hf"),
        "HF_HUB_OFFLINE": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    done = subprocess.run(
        [sys.executable, "-m", "agriclip", "publish", str(checkpoint), "--repo-id", "agri/tampered", "--dry-run"],
        input="y\n",
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        env=env,
        timeout=300,
    )
    assert done.returncode == ExitCode.INPUT, done.stderr[-3000:]
    assert differs("modeling_agriclip.py") in done.stderr
    assert "[y/N]" not in done.stdout + done.stderr
    assert not marker.exists()


@pytest.mark.parametrize(
    "metadata, problem",
    [
        ("", "README.md has no metadata (the YAML front matter between '---' lines)"),
        ("---\n---\n", "README.md has no metadata (the YAML front matter between '---' lines)"),
        (
            "---\nlicense: apache-2.0\nlibrary_name: transformers\n---\n",
            "README.md lacks the metadata ['pipeline_tag'] that a checkpoint card needs on the Hub",
        ),
    ],
)
def test_a_card_without_the_metadata_the_hub_needs_is_refused(checkpoint, fake_hub, metadata, problem):
    text = ModelCard.load(checkpoint / "README.md").text  # the card without its front matter
    (checkpoint / "README.md").write_text(metadata + text)
    with pytest.raises(PublishError) as refused:
        publish(checkpoint, "agri/no-metadata")
    assert [p.split(";")[0] for p in refused.value.problems] == [problem]
    assert "write the card with `agriclip card FOLDER`" in refused.value.problems[0]
    assert fake_hub.repos == {}


# ---------------------------------------------------------------------------------------------------------------
# Push and pull
# ---------------------------------------------------------------------------------------------------------------


def test_push_then_pull_gives_identical_outputs(
    carded_checkpoint, fake_hub, tiny_model, sample_images, tmp_path, caplog, capsys
):
    caplog.set_level(logging.DEBUG)
    argv = [
        "publish",
        str(carded_checkpoint),
        "--repo-id",
        "agri/agriclip-tiny",
        "--private",
        "--commit-message",
        "AgriCLIP tiny",
    ]
    assert agriclip(argv) == ExitCode.OK
    assert f"published {carded_checkpoint} to agri/agriclip-tiny: {fake_hub.endpoint}" in capsys.readouterr().out
    repo = fake_hub.repos[("model", "agri/agriclip-tiny")]
    assert repo.private
    pushed = fake_hub.files("agri/agriclip-tiny")
    local = {
        p.relative_to(carded_checkpoint).as_posix(): p.read_bytes() for p in carded_checkpoint.rglob("*") if p.is_file()
    }
    assert {name: data for name, data in pushed.items() if name != ".gitattributes"} == local
    assert {"model.safetensors", "processor_config.json", "modeling_agriclip.py", "tokenizer.py", "README.md"} <= set(
        pushed
    )
    assert all(
        r["authorised"] for r in fake_hub.requests if r["method"] == "POST" and r["path"] != "/api/validate-yaml"
    )

    processor = AgriCLIPProcessor.from_pretrained("agri/agriclip-tiny")
    expected = outputs(tiny_model, processor, sample_images)
    assert torch.equal(outputs("agri/agriclip-tiny", processor, sample_images), expected)
    by_repo = pipeline("zero-shot-image-classification", model="agri/agriclip-tiny")(
        sample_images[0], candidate_labels=LABELS, hypothesis_template="{}"
    )
    by_folder = pipeline("zero-shot-image-classification", model=str(carded_checkpoint))(
        sample_images[0], candidate_labels=LABELS, hypothesis_template="{}"
    )
    assert by_repo == by_folder
    # The custom-code path from the repo: the class comes from the downloaded files, not the installed package.
    remote_class = get_class_from_dynamic_module("modeling_agriclip.AgriCLIPModel", "agri/agriclip-tiny")
    assert remote_class.__module__.startswith("transformers_modules")
    assert torch.equal(outputs(remote_class.from_pretrained("agri/agriclip-tiny"), processor, sample_images), expected)

    assert FAKE_TOKEN not in caplog.text + "".join(capsys.readouterr())
    assert FAKE_TOKEN not in all_text(carded_checkpoint) + all_text(tmp_path)
    assert all(FAKE_TOKEN.encode() not in data for data in pushed.values())


def test_revision_pinning(checkpoint, fake_hub, checked, tiny_config, tiny_processor, sample_images):
    first = publish(checkpoint, "agri/pinned")
    torch.manual_seed(1)
    AgriCLIPModel(tiny_config).save_pretrained(checkpoint)
    second = publish(checkpoint, "agri/pinned", revision="v2", commit_message="retrained")
    assert checked == [checkpoint, checkpoint] and first.oid != second.oid
    assert set(fake_hub.repos[("model", "agri/pinned")].branches) == {"main", "v2"}
    at_first = outputs("agri/pinned", tiny_processor, sample_images, revision=first.oid)
    on_main = outputs("agri/pinned", tiny_processor, sample_images, revision="main")
    on_v2 = outputs("agri/pinned", tiny_processor, sample_images, revision="v2")
    assert torch.equal(at_first, on_main)
    assert torch.equal(on_v2, outputs(checkpoint, tiny_processor, sample_images))
    assert not torch.allclose(on_v2, on_main)


def test_private_is_refused_for_an_existing_public_repo(carded_checkpoint, fake_hub, checked):
    publish(carded_checkpoint, "agri/public")
    commits = len(fake_hub.repos[("model", "agri/public")].commits)
    with pytest.raises(PublishError, match="agri/public already exists and is public"):
        publish(carded_checkpoint, "agri/public", private=True)
    assert len(fake_hub.repos[("model", "agri/public")].commits) == commits


def test_dataset_push_then_pull(tmp_path, fake_hub):
    folder = write_alive_folder(tmp_path / "alive")
    with pytest.raises(PublishError, match="README.md is missing"):
        publish(folder, "agri/alive-mini", dataset=True)
    write_dataset_card(folder, repo_id="agri/alive-mini")
    (folder / "imagefolder" / "train" / "0000" / "1.png").rename(folder / "elsewhere.png")
    with pytest.raises(PublishError, match=r"imagefolder/train/metadata.jsonl names 1 image\(s\) that do not exist"):
        publish(folder, "agri/alive-mini", dataset=True)
    (folder / "elsewhere.png").rename(folder / "imagefolder" / "train" / "0000" / "1.png")

    publish(folder, "agri/alive-mini", dataset=True, revision="v1")
    pulled = snapshot_download("agri/alive-mini", repo_type="dataset", revision="v1", local_dir=tmp_path / "pulled")
    loaded = datasets.load_dataset(pulled, cache_dir=str(tmp_path / "cache"))
    original = datasets.load_dataset(str(folder), cache_dir=str(tmp_path / "cache-original"))
    for split in ("train", "validation"):
        assert loaded[split]["caption"] == original[split]["caption"]
        assert [image.tobytes() for image in loaded[split]["image"]] == [
            image.tobytes() for image in original[split]["image"]
        ]


def test_a_dataset_goes_up_as_its_card_report_rows_images_and_copies(tmp_path, fake_hub):
    folder = write_alive_folder(tmp_path / "alive")
    write_dataset_card(folder, repo_id="agri/alive-mini")
    saved = [
        "datasets/dataset_dict.json",
        "datasets/train/state.json",
        "datasets/train/dataset_info.json",
        "datasets/train/data-00000-of-00001.arrow",
    ]
    for name in saved:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(b"{}")
    (folder / ".env").write_text(f"HF_TOKEN={FAKE_TOKEN}\n")
    (folder / "cache" / "train").mkdir(parents=True)
    (folder / "cache" / "train" / "images.lock").write_text("")
    shutil.copy(
        folder / "imagefolder" / "train" / "0000" / "0.png", folder / "imagefolder" / "train" / "0000" / "unlisted.png"
    )
    rows = {
        split: [
            json.loads(line) for line in (folder / "imagefolder" / split / "metadata.jsonl").read_text().splitlines()
        ]
        for split in ("train", "validation")
    }
    expected = ["README.md", "build_report.json", "webdataset/train/shard-0.tar", *saved]
    expected += [
        f"imagefolder/{split}/{name}"
        for split in rows
        for name in ["metadata.jsonl", *(row["file_name"] for row in rows[split])]
    ]

    plan = publish(folder, "agri/alive-mini", dataset=True, dry_run=True)
    assert plan.files == sorted(expected)
    assert plan.left_out == [".env", "cache/", "imagefolder/train/0000/unlisted.png"]
    publish(folder, "agri/alive-mini", dataset=True)
    assert sorted(set(fake_hub.files("agri/alive-mini", repo_type="dataset")) - {".gitattributes"}) == plan.files


def test_dataset_rows_and_images_that_leave_their_split_are_refused(tmp_path):
    folder = write_alive_folder(tmp_path / "alive")
    write_dataset_card(folder)
    secret = tmp_path / "secret.png"
    secret.write_text(PRIVATE_KEY)
    split = folder / "imagefolder" / "train"
    (split / "0000" / "1.png").unlink()
    (split / "0000" / "1.png").symlink_to(secret)
    rows = [json.loads(line) for line in (split / "metadata.jsonl").read_text().splitlines()]
    rows[2]["file_name"] = "../validation/0000/0.png"
    rows[3]["file_name"] = str(secret)
    (split / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    latin1 = b'{"file_name": "0000/0.png", "caption": "\xe9t\xe9"}\n'
    (folder / "imagefolder" / "validation" / "metadata.jsonl").write_bytes(latin1)
    problems = validate_dataset(folder)
    assert [problem.split(";")[0] for problem in problems] == [
        f"imagefolder/train/metadata.jsonl line 2: the image path '0000/1.png' leads outside {split} (through '..' or a "
        f"symlink, to {secret})",
        f"imagefolder/train/metadata.jsonl line 3: the image path '../validation/0000/0.png' leads outside {split} "
        f"(through '..' or a symlink, to {folder / 'imagefolder' / 'validation' / '0000' / '0.png'})",
        f"imagefolder/train/metadata.jsonl line 4: the image path {str(secret)!r} is absolute or a URL",
        f"imagefolder/validation/metadata.jsonl is not UTF-8 text ('utf-8' codec can't decode byte 0xe9 in position "
        f"{latin1.index(0xE9)}: invalid continuation byte)",
    ]


def test_dataset_images_and_shards_are_scanned_and_the_card_needs_a_license(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    folder = write_alive_folder(tmp_path / "alive")
    write_dataset_card(folder)
    with open(folder / "imagefolder" / "train" / "0000" / "0.png", "ab") as image:
        image.write(PRIVATE_KEY.encode())  # after the PNG's end: the image still reads
    (folder / "webdataset" / "train" / "shard-0.tar").write_bytes(b"\0" * 512 + FAKE_TOKEN.encode() + b"\0" * 512)
    assert validate_dataset(folder) == [
        "imagefolder/train/0000/0.png contains a string shaped like a private key (-----BEGIN ... PRIVATE KEY-----); remove it before publishing",
        "webdataset/train/shard-0.tar contains this session's Hugging Face token; remove it before publishing",
    ]
    write_alive_folder(tmp_path / "clean")
    card = (folder / "README.md").read_text()
    (tmp_path / "clean" / "README.md").write_text(card.replace("license: other\n", ""))
    assert validate_dataset(tmp_path / "clean") == [
        "README.md lacks the metadata ['license'] that a dataset card needs on the Hub; write the card with "
        "`agriclip card FOLDER --dataset`, or add them to its YAML front matter"
    ]


# ---------------------------------------------------------------------------------------------------------------
# LoRA adapters
# ---------------------------------------------------------------------------------------------------------------


def test_adapter_with_a_local_base_path_is_refused_then_published(carded_checkpoint, fake_hub, tmp_path, sample_images):
    from peft import LoraConfig, get_peft_model

    HfApi().create_repo("agri/agriclip-tiny")
    HfApi().upload_folder(folder_path=carded_checkpoint, repo_id="agri/agriclip-tiny")
    base = AgriCLIPModel.from_pretrained(carded_checkpoint)
    lora = LoraConfig(r=2, lora_alpha=4, target_modules=r"text_model\.encoder\.layers\.\d+\.self_attn\.(q_proj|v_proj)")
    adapter = get_peft_model(base, lora)
    adapter.save_pretrained(tmp_path / "lora")
    [problem] = validate_adapter(tmp_path / "lora")
    assert f"base_model_name_or_path is {str(carded_checkpoint)!r}, a local path" in problem
    with pytest.raises(PublishError, match="base_model_name_or_path"):
        publish(tmp_path / "lora", "agri/agriclip-tiny-lora")

    adapter.peft_config["default"].base_model_name_or_path = "agri/agriclip-tiny"
    adapter.save_pretrained(tmp_path / "lora")
    card = (tmp_path / "lora" / "README.md").read_text()
    (tmp_path / "lora" / "README.md").write_text(card.split("---\n", 2)[2])
    assert validate_adapter(tmp_path / "lora") == [
        "README.md has no metadata (the YAML front matter between '---' lines); "
        "save the adapter with peft_model.save_pretrained(folder), which writes it"
    ]
    (tmp_path / "lora" / "README.md").write_text(card)
    publish(tmp_path / "lora", "agri/agriclip-tiny-lora")
    result = pipeline("zero-shot-image-classification", model="agri/agriclip-tiny-lora")(
        sample_images[0], candidate_labels=LABELS
    )
    assert sorted(r["label"] for r in result) == sorted(LABELS)


# ---------------------------------------------------------------------------------------------------------------
# Fresh processes, reaching the server through HF_ENDPOINT as a user would
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_command_line_push_and_remote_code_from_the_repo_in_fresh_processes(carded_checkpoint, tmp_path):
    """`agriclip publish` pushes; someone who never installed the package loads the repo with
    trust_remote_code=True and gets the installed package's scores."""
    with FakeHub() as hub:
        env = {
            "PATH": os.environ["PATH"],
            "HF_HOME": str(tmp_path / "hf"),
            "HF_ENDPOINT": hub.endpoint,
            "HF_TOKEN": FAKE_TOKEN,
            "HF_HUB_DISABLE_TELEMETRY": "1",
            "TOKENIZERS_PARALLELISM": "false",
        }
        pushed = run_subprocess(
            [
                sys.executable,
                "-m",
                "agriclip",
                "publish",
                str(carded_checkpoint),
                "--repo-id",
                "agri/fresh",
                "--revision",
                "v1",
            ],
            cwd=REPO_ROOT,
            env=env,
            timeout=600,
        )
        assert pushed.returncode == 0, pushed.stderr[-3000:]
        assert FAKE_TOKEN not in pushed.stdout + pushed.stderr
        script = textwrap.dedent(
            f"""
            import json, sys
            sys.path = [p for p in sys.path if p not in ("", ".")]
            import numpy as np
            from PIL import Image
            from transformers import pipeline
            assert "modeling_agriclip" not in sys.modules
            classifier = pipeline("zero-shot-image-classification", model="agri/fresh", revision="v1", trust_remote_code=True)
            assert type(classifier.model).__module__.startswith("transformers_modules"), type(classifier.model).__module__
            image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (80, 72, 3), dtype=np.uint8))
            print("RESULT" + json.dumps(classifier(image, candidate_labels={LABELS!r})))
            """
        )
        pulled = run_subprocess([sys.executable, "-c", script], cwd=tmp_path, env={**env, "HF_TOKEN": ""}, timeout=600)
    assert "RESULT" in pulled.stdout, pulled.stderr[-3000:]
    remote = json.loads(pulled.stdout.split("RESULT")[1])
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (80, 72, 3), dtype=np.uint8))
    local = pipeline("zero-shot-image-classification", model=str(carded_checkpoint))(image, candidate_labels=LABELS)
    assert [r["label"] for r in remote] == [r["label"] for r in local]
    assert [r["score"] for r in remote] == pytest.approx([r["score"] for r in local], abs=1e-6)
    assert FAKE_TOKEN not in all_text(tmp_path)
