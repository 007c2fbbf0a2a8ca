"""Hub publishing over a Hub-compatible server on loopback: the dry run, push, pull, pipeline by repo id, remote code
from the repo, revision pinning, datasets, LoRA adapters, and no token in any file or log."""

import json
import logging
import os
import shutil
import sys
import textwrap
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from huggingface_hub import HfApi, snapshot_download
from PIL import Image
from transformers import pipeline
from transformers.dynamic_module_utils import get_class_from_dynamic_module

from conftest import run_subprocess
from hub_server import FAKE_TOKEN, FakeHub, fake_hub  # noqa: F401  (fake_hub is a fixture)
from model_card.card import write_dataset_card, write_model_card
from model_card.publish import PublishError, main, publish, validate_adapter, validate_checkpoint
from modeling_agriclip import AgriCLIPConfig, AgriCLIPModel, AgriCLIPProcessor
from test_model_card import write_alive_folder

REPO_ROOT = Path(__file__).resolve().parents[1]
LABELS = ["a photo of a leaf", "a photo of a fish", "a photo of a cow"]


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
    monkeypatch.setattr("model_card.publish.validate_checkpoint", lambda folder: folders.append(Path(folder)) or [])
    return folders


def outputs(model_or_path, processor, images, **kwargs):
    model = model_or_path if isinstance(model_or_path, torch.nn.Module) else AgriCLIPModel.from_pretrained(model_or_path, **kwargs)
    inputs = processor(text=LABELS, images=images, return_tensors="pt")
    with torch.no_grad():
        return model.eval()(**inputs).logits_per_image


def all_text(root) -> str:
    return "".join(path.read_bytes().decode("latin-1") for path in Path(root).rglob("*") if path.is_file())


# ---------------------------------------------------------------------------------------------------------------
# The dry run
# ---------------------------------------------------------------------------------------------------------------


def test_dry_run_passes_a_complete_checkpoint_and_uploads_nothing(carded_checkpoint, fake_hub, capsys):
    assert main([str(carded_checkpoint), "--repo-id", "agri/agriclip-tiny", "--dry-run"]) is None
    assert "dry run passed" in capsys.readouterr().out
    assert fake_hub.repos == {}


def test_dry_run_names_a_missing_processor_file_and_uploads_nothing(checkpoint, fake_hub, capsys):
    (checkpoint / "processor_config.json").unlink()
    (checkpoint / "tokenizer.json").unlink()
    with pytest.raises(SystemExit) as stopped:
        main([str(checkpoint), "--repo-id", "agri/broken"])
    assert stopped.value.code == 1
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
    assert "README.md is missing (write the card with `python -m model_card.card FOLDER`)" in problems
    assert any(p.startswith("processing_agriclip.py imports tokenizer.py, which is missing") for p in problems), problems


def test_dry_run_names_weights_that_do_not_fit_the_config(checkpoint):
    AgriCLIPModel(AgriCLIPConfig.tiny(backbone="resnet")).save_pretrained(checkpoint / "other")
    shutil.copy(checkpoint / "other" / "model.safetensors", checkpoint / "model.safetensors")
    shutil.rmtree(checkpoint / "other")
    problems = validate_checkpoint(checkpoint)
    assert any(p.startswith("the weights do not match the config:") and "missing keys" in p and "dino_model" in p for p in problems), problems


def test_dry_run_catches_custom_code_that_differs_from_the_package(checkpoint):
    code = checkpoint / "modeling_agriclip.py"
    code.write_text(code.read_text().replace("return outputs.last_hidden_state[:, 0]", "return outputs.last_hidden_state[:, 1]"))
    [problem] = validate_checkpoint(checkpoint)
    assert problem.startswith("the custom-code files give other outputs than the installed package")
    code.write_text("import modeling_agriclip\n" + code.read_text())
    assert validate_checkpoint(checkpoint) == [
        "modeling_agriclip.py imports modeling_agriclip, which people loading with trust_remote_code do not have"
    ]


def test_dry_run_refuses_files_holding_a_token(checkpoint, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    (checkpoint / "notes.txt").write_text(f"pushed with {FAKE_TOKEN}\n")
    (checkpoint / "extra.json").write_text(json.dumps({"key": "hf_" + "a1B2" * 9}))
    problems = validate_checkpoint(checkpoint)
    assert "notes.txt contains this session's Hugging Face token; remove it before publishing" in problems
    assert "extra.json contains a string shaped like a Hugging Face token (hf_...); remove it before publishing" in problems
    assert not any(FAKE_TOKEN in problem for problem in problems)


# ---------------------------------------------------------------------------------------------------------------
# Push and pull
# ---------------------------------------------------------------------------------------------------------------


def test_push_then_pull_gives_identical_outputs(carded_checkpoint, fake_hub, tiny_model, sample_images, tmp_path, caplog, capsys):
    caplog.set_level(logging.DEBUG)
    commit = main([str(carded_checkpoint), "--repo-id", "agri/agriclip-tiny", "--private", "--commit-message", "AgriCLIP tiny"])
    assert commit.commit_url.startswith(fake_hub.endpoint)
    repo = fake_hub.repos[("model", "agri/agriclip-tiny")]
    assert repo.private
    pushed = fake_hub.files("agri/agriclip-tiny")
    local = {p.relative_to(carded_checkpoint).as_posix(): p.read_bytes() for p in carded_checkpoint.rglob("*") if p.is_file()}
    assert {name: data for name, data in pushed.items() if name != ".gitattributes"} == local
    assert {"model.safetensors", "processor_config.json", "modeling_agriclip.py", "tokenizer.py", "README.md"} <= set(pushed)
    assert all(r["authorised"] for r in fake_hub.requests if r["method"] == "POST" and r["path"] != "/api/validate-yaml")

    processor = AgriCLIPProcessor.from_pretrained("agri/agriclip-tiny")
    expected = outputs(tiny_model, processor, sample_images)
    assert torch.equal(outputs("agri/agriclip-tiny", processor, sample_images), expected)
    by_repo = pipeline("zero-shot-image-classification", model="agri/agriclip-tiny")(sample_images[0], candidate_labels=LABELS, hypothesis_template="{}")
    by_folder = pipeline("zero-shot-image-classification", model=str(carded_checkpoint))(sample_images[0], candidate_labels=LABELS, hypothesis_template="{}")
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
        assert [image.tobytes() for image in loaded[split]["image"]] == [image.tobytes() for image in original[split]["image"]]


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
    publish(tmp_path / "lora", "agri/agriclip-tiny-lora")
    result = pipeline("zero-shot-image-classification", model="agri/agriclip-tiny-lora")(sample_images[0], candidate_labels=LABELS)
    assert sorted(r["label"] for r in result) == sorted(LABELS)


# ---------------------------------------------------------------------------------------------------------------
# Fresh processes, reaching the server through HF_ENDPOINT as a user would
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_command_line_push_and_remote_code_from_the_repo_in_fresh_processes(carded_checkpoint, tmp_path):
    """`python -m model_card.publish` pushes; someone who never installed the package loads the repo with
    trust_remote_code=True and gets the installed package's scores."""
    with FakeHub() as hub:
        env = {"PATH": os.environ["PATH"], "HF_HOME": str(tmp_path / "hf"), "HF_ENDPOINT": hub.endpoint, "HF_TOKEN": FAKE_TOKEN,
               "HF_HUB_DISABLE_TELEMETRY": "1", "TOKENIZERS_PARALLELISM": "false"}
        pushed = run_subprocess(
            [sys.executable, "-m", "model_card.publish", str(carded_checkpoint), "--repo-id", "agri/fresh", "--revision", "v1"],
            cwd=REPO_ROOT, env=env, timeout=600,
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
