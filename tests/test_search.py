"""`agriclip index` and `agriclip search`: rankings against a brute-force numpy ranking, index updates against a fresh
build, provenance, refused models and index files, skipped photos, and the command end to end in a subprocess."""

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from agriclip.cli import main
from agriclip.errors import ExitCode
from agriclip.images import open_image
from modeling_agriclip import search
from modeling_agriclip.commands import package_version
from modeling_agriclip.search import (
    ImageIndex,
    IndexFileError,
    model_identity,
    read_index,
    scan_folder,
    search_embeddings,
    update_index,
)
from modeling_agriclip.zero_shot import ZeroShotClassifier

from conftest import run_subprocess


REPO_ROOT = Path(__file__).resolve().parents[1]


def write_photo(path: Path, seed: int, size=(40, 48)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


@pytest.fixture
def archive(tmp_path):
    """Five readable photos (two in a subfolder) and a corrupt one, in walk order a, b, c, broken, sub/d, sub/e."""
    root = tmp_path / "archive"
    for seed, name in enumerate(["a.png", "b.png", "c.png", "sub/d.png", "sub/e.png"]):
        write_photo(root / name, seed)
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    return root


@pytest.fixture(scope="module")
def classifier(tiny_checkpoint):
    return ZeroShotClassifier.from_pretrained(tiny_checkpoint)


def build(classifier, checkpoint, folder, previous=None):
    identity = model_identity(classifier, str(checkpoint))
    return update_index(classifier, identity, str(folder), scan_folder(str(folder)), previous, num_workers=0)


def run(capsys, *argv):
    code = main([str(arg) for arg in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def brute_force(embeddings: np.ndarray, queries: np.ndarray, top_k: int) -> tuple[np.ndarray, np.ndarray]:
    """The reference ranking: every cosine similarity in float64, sorted."""
    scores = queries.astype(np.float64) @ embeddings.astype(np.float64).T
    order = np.argsort(-scores, axis=1, kind="stable")[:, :top_k]
    return np.take_along_axis(scores, order, axis=1), order


# ---------------------------------------------------------------------------------------------------------------
# Search
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["torch", "faiss"])
@pytest.mark.parametrize("top_k", [1, 7, 500])
def test_search_ranks_as_a_brute_force_ranking(backend, top_k):
    generator = torch.Generator().manual_seed(0)
    embeddings = torch.nn.functional.normalize(torch.randn(300, 32, generator=generator), dim=-1)
    queries = torch.nn.functional.normalize(torch.randn(5, 32, generator=generator), dim=-1)
    scores, indices = search_embeddings(embeddings, queries, top_k, backend)
    expected_scores, expected_indices = brute_force(embeddings.numpy(), queries.numpy(), top_k)
    assert indices.shape == (5, min(top_k, 300))  # at most the whole archive
    np.testing.assert_array_equal(indices.numpy(), expected_indices)
    np.testing.assert_allclose(scores.numpy(), expected_scores, atol=1e-5)


def test_faiss_and_torch_give_the_same_exact_search():
    generator = torch.Generator().manual_seed(1)
    embeddings = torch.nn.functional.normalize(torch.randn(2000, 64, generator=generator), dim=-1)
    queries = torch.nn.functional.normalize(torch.randn(16, 64, generator=generator), dim=-1)
    torch_scores, torch_indices = search_embeddings(embeddings, queries, 20, "torch")
    faiss_scores, faiss_indices = search_embeddings(embeddings, queries, 20, "faiss")
    torch.testing.assert_close(faiss_indices, torch_indices)
    torch.testing.assert_close(faiss_scores, torch_scores, atol=1e-5, rtol=0)


def test_a_missing_faiss_names_the_extra_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)  # makes `import faiss` fail
    with pytest.raises(ImportError, match=r'pip install "agriclip\[search\]"'):
        search_embeddings(torch.eye(3), torch.eye(3)[:1], 1, "faiss")


# ---------------------------------------------------------------------------------------------------------------
# Building and updating
# ---------------------------------------------------------------------------------------------------------------


def test_an_index_holds_the_readable_photos_and_counts_the_corrupt_one(classifier, tiny_checkpoint, archive):
    index, update = build(classifier, tiny_checkpoint, archive)
    readable = ["a.png", "b.png", "c.png", "sub/d.png", "sub/e.png"]
    assert [entry["path"] for entry in index.files] == readable and update.added == readable
    assert index.skipped == [{"image": "broken.jpg", "error": "corrupt"}]
    assert update.stats.decoded == 5 and update.stats.skipped == {"corrupt": [str(archive / "broken.jpg")]}
    assert index.paths == [str(archive / name) for name in readable]
    expected = classifier.image_embeddings([open_image(path) for path in index.paths])
    torch.testing.assert_close(index.embeddings, expected, atol=1e-5, rtol=1e-5)
    assert index.identity == {
        "model": os.path.realpath(tiny_checkpoint),
        "revision": None,  # a local folder
        "embedding": "aligned",
        "fusion_weight": None,
    }


def test_an_update_embeds_only_new_and_changed_files_drops_the_gone_and_equals_a_fresh_build(
    classifier, tiny_checkpoint, archive, monkeypatch
):
    first, _ = build(classifier, tiny_checkpoint, archive)
    write_photo(archive / "sub/aa.png", seed=10)  # new
    write_photo(archive / "b.png", seed=11, size=(52, 40))  # changed: other size
    os.utime(archive / "b.png", ns=(first.files[1]["mtime_ns"] + 10**9,) * 2)
    (archive / "c.png").unlink()  # gone

    embedded = []
    real_embed_files = search.embed_files

    def counting_embed_files(classifier, files, *args, **kwargs):
        embedded.extend(files)
        return real_embed_files(classifier, files, *args, **kwargs)

    monkeypatch.setattr(search, "embed_files", counting_embed_files)
    updated, update = build(classifier, tiny_checkpoint, archive, previous=first)
    assert sorted(embedded) == sorted(str(archive / name) for name in ["b.png", "broken.jpg", "sub/aa.png"])
    assert (update.added, update.changed, update.dropped) == (["sub/aa.png"], ["b.png"], ["c.png"])
    assert updated.skipped == [{"image": "broken.jpg", "error": "corrupt"}]  # tried again, still corrupt

    fresh, _ = build(classifier, tiny_checkpoint, archive)
    assert updated.files == fresh.files and updated.root == fresh.root
    assert [entry["path"] for entry in fresh.files] == ["a.png", "b.png", "sub/aa.png", "sub/d.png", "sub/e.png"]
    torch.testing.assert_close(updated.embeddings, fresh.embeddings, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(updated.embeddings[0], first.embeddings[0])  # a.png's row was kept as it was

    embedded.clear()
    again, update = build(classifier, tiny_checkpoint, archive, previous=updated)
    assert update.unchanged and embedded == [str(archive / "broken.jpg")]
    assert again.files == updated.files


def test_an_index_round_trips_through_its_safetensors_file(classifier, tiny_checkpoint, archive, tmp_path):
    index, _ = build(classifier, tiny_checkpoint, archive)
    path = tmp_path / "photos.safetensors"
    path.write_bytes(index.to_bytes())
    with safe_open(path, framework="pt") as handle:
        assert list(handle.keys()) == ["image_embeds"]
        document = json.loads(handle.metadata()["agriclip_index"])
    assert document["format_version"] == 1 and document["agriclip_version"] == package_version()
    assert document["root"] == str(archive) and document["embedding"] == "aligned"
    loaded = read_index(path)
    assert (loaded.files, loaded.identity, loaded.skipped, loaded.root) == (
        index.files,
        index.identity,
        index.skipped,
        index.root,
    )
    torch.testing.assert_close(loaded.embeddings, index.embeddings, atol=0, rtol=0)


def test_files_that_are_not_an_index_are_refused(tmp_path):
    embed_output = tmp_path / "embeddings.safetensors"
    save_file({"image_embeds": torch.zeros(2, 4)}, embed_output, metadata={"files": "[]"})
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not a header")
    mismatched = tmp_path / "mismatched.safetensors"
    identity = {"model": "m", "revision": None, "embedding": None, "fusion_weight": None}
    index = ImageIndex(
        root="/", files=[{"path": "a.png", "size": 1, "mtime_ns": 1}], embeddings=torch.zeros(1, 4), identity=identity
    )
    mismatched.write_bytes(index.to_bytes())
    read_index(mismatched)
    with safe_open(mismatched, framework="pt") as handle:
        metadata = handle.metadata()
    save_file({"image_embeds": torch.zeros(3, 4)}, mismatched, metadata=metadata)
    for path, message in [
        (embed_output, "is not an AgriCLIP index (its header has no 'agriclip_index' entry)"),
        (garbage, "is not a readable AgriCLIP index"),
        (mismatched, "image_embeds has shape (3, 4) for 1 files"),
    ]:
        with pytest.raises(IndexFileError, match=message.replace("(", r"\(").replace(")", r"\)")):
            read_index(path)


def test_an_index_too_large_for_a_safetensors_header_is_refused(monkeypatch):
    monkeypatch.setattr(search, "MAX_HEADER_BYTES", 2000)
    files = [{"path": f"photo-{i}.png", "size": 1, "mtime_ns": 1} for i in range(100)]
    identity = {"model": "m", "revision": None, "embedding": None, "fusion_weight": None}
    index = ImageIndex(root="/", files=files, embeddings=torch.zeros(100, 4), identity=identity)
    with pytest.raises(ValueError, match="index of 100 files needs a longer header than safetensors reads"):
        index.to_bytes()


# ---------------------------------------------------------------------------------------------------------------
# The commands
# ---------------------------------------------------------------------------------------------------------------


def test_search_in_every_format_agrees_with_a_brute_force_ranking(
    capsys, classifier, tiny_checkpoint, archive, tmp_path
):
    index_path = tmp_path / "photos.safetensors"
    code, _, err = run(capsys, "index", archive, "--output", index_path, "--model", tiny_checkpoint, "--num-workers", 0)
    assert code == ExitCode.OK
    assert "indexed 5 images (5 new, 0 changed, 0 dropped, 1 unreadable skipped)" in err and "broken.jpg" in err
    index = read_index(index_path)
    texts = ["a leaf with rust", "healthy maize"]
    scores, order = brute_force(index.embeddings.numpy(), classifier.text_embeddings(texts).numpy(), 3)
    expected = [[(index.paths[row], score) for row, score in zip(rows, values)] for rows, values in zip(order, scores)]

    argv = ["search", index_path, "--text", texts[0], "--text", texts[1], "--top-k", 3]
    code, out, _ = run(capsys, *argv, "--format", "json")
    assert code == ExitCode.OK
    document = json.loads(out)
    assert {key: document[key] for key in ("model", "revision", "embedding", "backend")} == {
        "model": os.path.realpath(tiny_checkpoint),
        "revision": None,
        "embedding": "aligned",
        "backend": "torch",
    }
    assert [result["query"] for result in document["results"]] == texts
    for result, want in zip(document["results"], expected):
        assert [match["image"] for match in result["matches"]] == [path for path, _ in want]
        assert [match["score"] for match in result["matches"]] == pytest.approx([s for _, s in want], abs=1e-5)

    code, out, _ = run(capsys, *argv, "--format", "csv", "--backend", "faiss")
    rows = [line.split(",") for line in out.splitlines()]
    assert rows[0] == ["query", "rank", "image", "score", "error"]
    assert [(row[0], row[2]) for row in rows[1:]] == [(text, path) for text, w in zip(texts, expected) for path, _ in w]

    code, out, _ = run(capsys, *argv, "--format", "table")
    lines = out.splitlines()
    assert lines[0].split() == ["query", "rank", "image", "score"] and len(lines) == 7
    assert lines[1].startswith(texts[0]) and str(expected[0][0][0]) in lines[1]

    # An image query finds itself first; an unreadable one is reported, not fatal.
    code, out, err = run(capsys, "search", index_path, "--image", archive / "b.png", "--image", archive / "broken.jpg")
    assert code == ExitCode.OK and "broken.jpg" in err
    assert out.splitlines()[1].split()[2] == str(archive / "b.png")


def test_a_model_or_embedding_other_than_the_indexs_is_refused(
    capsys, tiny_checkpoint, tiny_clip_checkpoint, archive, tmp_path
):
    index_path = tmp_path / "photos.safetensors"
    assert run(capsys, "index", archive, "--output", index_path, "--model", tiny_checkpoint)[0] == ExitCode.OK
    before = index_path.read_bytes()

    code, _, err = run(
        capsys, "index", archive, "--output", index_path, "--model", tiny_checkpoint, "--embedding", "clip"
    )
    assert code == ExitCode.USAGE and "was built with another model: embedding 'clip' instead of 'aligned'" in err
    code, _, err = run(capsys, "index", archive, "--output", index_path, "--model", tiny_clip_checkpoint)
    assert code == ExitCode.USAGE and f"model {str(os.path.realpath(tiny_clip_checkpoint))!r} instead of" in err
    code, _, err = run(capsys, "search", index_path, "--text", "rust", "--model", tiny_clip_checkpoint)
    assert code == ExitCode.USAGE and "search it with the model that built it (omit --model)" in err
    assert index_path.read_bytes() == before

    # The same folder by another path is the same model.
    relative = os.path.relpath(tiny_checkpoint)
    assert run(capsys, "search", index_path, "--text", "rust", "--model", relative)[0] == ExitCode.OK

    # A Hub model whose revision moved since the index was built.
    with safe_open(index_path, framework="pt") as handle:
        document = json.loads(handle.metadata()["agriclip_index"])
        embeddings = handle.get_tensor("image_embeds")
    document["revision"] = "0123abc"
    save_file({"image_embeds": embeddings}, index_path, metadata={"agriclip_index": json.dumps(document)})
    code, _, err = run(capsys, "search", index_path, "--text", "rust")
    assert code == ExitCode.USAGE and "revision None instead of '0123abc'" in err


def test_command_errors(capsys, tiny_checkpoint, archive, tmp_path):
    embed_output = tmp_path / "embeddings.safetensors"
    save_file({"image_embeds": torch.zeros(1, 4)}, embed_output)
    code, _, err = run(capsys, "search", embed_output, "--text", "rust")
    assert code == ExitCode.INPUT and "is not an AgriCLIP index" in err
    code, _, err = run(capsys, "search", tmp_path / "missing.safetensors", "--text", "rust")
    assert code == ExitCode.INPUT and "no such index file" in err
    code, _, err = run(capsys, "index", archive, "--output", embed_output, "--model", tiny_checkpoint)
    assert code == ExitCode.INPUT and embed_output.read_bytes()  # left as it was
    code, _, err = run(capsys, "index", archive, "--output", tmp_path / "index.npy", "--model", tiny_checkpoint)
    assert code == ExitCode.USAGE and "an index is a .safetensors file" in err
    code, _, err = run(capsys, "index", tmp_path / "nowhere", "--output", tmp_path / "i.safetensors", "--model", "m")
    assert code == ExitCode.NO_IMAGES
    only_broken = tmp_path / "only-broken"
    only_broken.mkdir()
    (only_broken / "broken.png").write_bytes(b"not a png")
    code, _, err = run(capsys, "index", only_broken, "--output", tmp_path / "i.safetensors", "--model", tiny_checkpoint)
    assert code == ExitCode.UNREADABLE and not (tmp_path / "i.safetensors").exists()


@pytest.mark.slow
def test_index_update_and_search_through_python_m_agriclip(capsys, tiny_checkpoint, archive, tmp_path):
    """The commands end to end as a user runs them: an index built earlier (here in-process), updated with a new
    photo by `python -m agriclip index`, then searched by `python -m agriclip search` from another folder."""
    index_path = tmp_path / "photos.safetensors"
    index_argv = ["index", str(archive), "--output", str(index_path), "--model", str(tiny_checkpoint)]
    assert run(capsys, *index_argv)[0] == ExitCode.OK
    write_photo(archive / "sub/new.png", seed=20)
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO_ROOT)}
    done = run_subprocess([sys.executable, "-m", "agriclip", *index_argv], env=environment, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "indexed 6 images (1 new, 0 changed, 0 dropped, 1 unreadable skipped)" in done.stderr

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    query = str(archive / "sub/new.png")
    search_argv = ["search", str(index_path), "--image", query, "--top-k", "2", "--format", "json"]
    done = run_subprocess([sys.executable, "-m", "agriclip", *search_argv], env=environment, cwd=elsewhere, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    (result,) = json.loads(done.stdout)["results"]
    assert result["query"] == query and len(result["matches"]) == 2
    assert result["matches"][0]["image"] == query
    assert result["matches"][0]["score"] == pytest.approx(1.0, abs=1e-5)
