"""The image embedding chosen per task from k shots (`evaluation.selection`), and that it never sees test images."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from PIL import Image

import evaluation.runner as runner
from evaluation.linear_probe import sample_k_shot
from evaluation.runner import fit_task_file, run_suite
from evaluation.selection import FUSION_WEIGHTS, fused_features, mode_embedding, mode_name, select_embedding
from modeling_agriclip import AgriCLIPConfig, AgriCLIPModel
from modeling_agriclip.calibration import fit_calibration
from modeling_agriclip.zero_shot import ZeroShotClassifier


TEMPLATES = ["a photo of {}.", "a close-up photo of {}."]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Dozens of temperature fits of a few shots each: tiny operations, which threads only slow down (many times
    over on a machine shared with other jobs)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def classifier(tiny_model, tiny_processor):
    return ZeroShotClassifier(tiny_model, tiny_processor, embedding="aligned", batch_size=8)


@pytest.fixture(scope="module")
def siglip_classifier(tiny_processor):
    torch.manual_seed(1)
    return ZeroShotClassifier(AgriCLIPModel(AgriCLIPConfig.tiny(contrastive_loss="siglip")).eval(), tiny_processor)


def _normalise(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _nll(z: np.ndarray, y: np.ndarray, sigmoid: bool) -> float:
    """Mean cross-entropy of a softmax, or mean binary cross-entropy of per-label sigmoids (own label positive)."""
    if sigmoid:
        targets = np.eye(z.shape[1])[y]
        return float(np.mean(targets * np.logaddexp(0, -z) + (1 - targets) * np.logaddexp(0, z)))
    top = z.max(axis=1, keepdims=True)
    return float(np.mean(top[:, 0] + np.log(np.exp(z - top).sum(axis=1)) - z[np.arange(len(y)), y]))


def _brute_force_choice(classifier, clip, aligned, labels, names, templates, weights=FUSION_WEIGHTS):
    """Per weight, the fused features by hand, the classifier's zero-shot logits, top-1 and the NLL at the fitted
    temperature; the best top-1, then the lowest NLL, then the lowest weight."""
    text = classifier.label_embeddings(names, templates).double().numpy()
    bias = classifier.logit_bias if classifier.sigmoid_scores else 0.0
    c, a, y = _normalise(clip.double().numpy()), _normalise(aligned.double().numpy()), labels.numpy()
    scores = {}
    for weight in weights:
        features = _normalise(weight * c + (1 - weight) * a)
        logits = classifier.logit_scale * features @ text.T + bias
        fit = fit_calibration(torch.from_numpy(logits), labels, classifier.sigmoid_scores)
        top1 = float(np.mean(logits.argmax(axis=1) == y))
        scores[weight] = (top1, _nll(logits / fit.temperature + fit.bias, y, classifier.sigmoid_scores))
    best = min(weights, key=lambda weight: (-scores[weight][0], scores[weight][1], weight))
    return best, scores


def _shots(classifier, names, seed, n=24, dim=32):
    """Clip and aligned features that both carry the label, each with its own noise: the fusions differ."""
    generator = torch.Generator().manual_seed(seed)
    text = classifier.label_embeddings(names, TEMPLATES)
    labels = torch.arange(n) % len(names)
    clip = text[labels] + 0.25 * torch.randn(n, dim, generator=generator)
    aligned = text[labels.roll(1)] + 0.25 * torch.randn(n, dim, generator=generator)
    aligned[: n // 2] = text[labels[: n // 2]] + 0.25 * torch.randn(n // 2, dim, generator=generator)
    return clip, aligned, labels


@pytest.mark.parametrize("objective", ["infonce", "siglip"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_select_embedding_equals_a_brute_force_over_the_fusion_weights(classifier, siglip_classifier, objective, seed):
    model = siglip_classifier if objective == "siglip" else classifier
    names = ["leaf rust", "healthy leaf", "leaf blight", "powdery mildew"]
    clip, aligned, labels = _shots(model, names, seed)
    chosen = select_embedding(model, clip, aligned, labels, names, TEMPLATES)
    best, scores = _brute_force_choice(model, clip, aligned, labels, names, TEMPLATES)
    assert chosen["chosen"] == mode_name(best) and chosen["fusion_weight"] == best
    assert list(chosen["candidates"]) == [mode_name(weight) for weight in FUSION_WEIGHTS]
    for weight, (top1, nll) in scores.items():
        candidate = chosen["candidates"][mode_name(weight)]
        assert candidate["fusion_weight"] == weight
        assert candidate["top1"] == pytest.approx(top1)
        assert candidate["nll"] == pytest.approx(nll, rel=1e-4)
    # The case has teeth: the weights do not all score alike.
    assert len({top1 for top1, _ in scores.values()}) > 1


def _barely_right(text, labels, other, margin=0.02):
    """Image embeddings on the right side of the boundary between each label and `other` by a small margin."""
    return F.normalize((0.5 + margin) * text[labels] + (0.5 - margin) * text[other], dim=-1)


def test_a_right_clip_embedding_and_a_wrong_aligned_one_choose_clip(classifier):
    """Two labels; the CLIP embedding of every shot barely on the right side, the aligned one on the wrong label:
    any fusion with w < 1 is pulled across the boundary (it needs w > 1/(1 + 2·margin/|x|) > 0.96)."""
    names = ["leaf rust", "healthy leaf"]
    text = classifier.label_embeddings(names, TEMPLATES)
    labels = torch.tensor([0, 1] * 6)
    clip, aligned = _barely_right(text, labels, 1 - labels), text[1 - labels]
    chosen = select_embedding(classifier, clip, aligned, labels, names, TEMPLATES)
    assert chosen["chosen"] == "clip" and chosen["fusion_weight"] == 1.0
    assert chosen["candidates"]["clip"]["top1"] == 1.0
    assert all(chosen["candidates"][mode_name(weight)]["top1"] == 0.0 for weight in FUSION_WEIGHTS[:-1])


def test_a_right_aligned_embedding_and_a_wrong_clip_one_choose_aligned(classifier):
    names = ["leaf rust", "healthy leaf"]
    text = classifier.label_embeddings(names, TEMPLATES)
    labels = torch.tensor([0, 1] * 6)
    clip, aligned = text[1 - labels], _barely_right(text, labels, 1 - labels)
    chosen = select_embedding(classifier, clip, aligned, labels, names, TEMPLATES)
    assert chosen["chosen"] == "aligned" and chosen["fusion_weight"] == 0.0
    assert chosen["candidates"]["aligned"]["top1"] == 1.0
    assert all(chosen["candidates"][mode_name(weight)]["top1"] == 0.0 for weight in FUSION_WEIGHTS[1:])


def test_a_top1_tie_goes_to_the_lower_nll_even_at_a_higher_weight(classifier):
    """Both embeddings right on 11 shots and wrong on the same one: the CLIP one with the wider margins fits a
    temperature to a lower NLL, and wins over the aligned one despite its higher weight."""
    names = ["leaf rust", "healthy leaf"]
    text = classifier.label_embeddings(names, TEMPLATES)
    labels = torch.tensor([0, 1] * 6)
    clip, aligned = _barely_right(text, labels, 1 - labels, 0.4), _barely_right(text, labels, 1 - labels, 0.05)
    clip[0] = aligned[0] = text[1]  # a shot of label 0 that both embeddings put on label 1
    chosen = select_embedding(classifier, clip, aligned, labels, names, TEMPLATES, weights=(0.0, 1.0))
    candidates = chosen["candidates"]
    assert candidates["clip"]["top1"] == candidates["aligned"]["top1"] == 11 / 12
    assert candidates["clip"]["nll"] < candidates["aligned"]["nll"]
    assert chosen["chosen"] == "clip"
    best, _ = _brute_force_choice(classifier, clip, aligned, labels, names, TEMPLATES, weights=(0.0, 1.0))
    assert best == 1.0


@pytest.mark.parametrize("weights", [(0.0, 1.0), (1.0, 0.0), (1.0, 0.0, 0.5)])
def test_a_full_tie_goes_to_the_lower_weight_whatever_the_order_of_the_candidates(classifier, weights):
    """Equal clip and aligned embeddings: every candidate has the same features, top-1 and NLL (bit for bit)."""
    names = ["leaf rust", "healthy leaf", "leaf blight"]
    clip, _, labels = _shots(classifier, names, seed=0, n=9)
    chosen = select_embedding(classifier, clip, clip.clone(), labels, names, TEMPLATES, weights=weights)
    nlls = {candidate["nll"] for candidate in chosen["candidates"].values()}
    assert len(nlls) == 1
    assert chosen["chosen"] == "aligned" and chosen["fusion_weight"] == 0.0


def test_fusion_weights_mode_names_and_embeddings():
    assert FUSION_WEIGHTS == (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
    assert [mode_name(weight) for weight in (0.0, 0.3, 0.5, 1.0)] == ["aligned", "fused@0.3", "fused@0.5", "clip"]
    assert mode_embedding(0.0) == ("aligned", None)
    assert mode_embedding(1.0) == ("clip", None)
    assert mode_embedding(0.7) == ("fused", 0.7)


@pytest.mark.parametrize("weight", [0.0, 0.3, 0.8, 1.0])
def test_a_candidate_is_the_embedding_a_classifier_with_its_mode_computes(classifier, sample_images, weight):
    clip = classifier.with_embedding("clip").image_embeddings(sample_images)
    aligned = classifier.with_embedding("aligned").image_embeddings(sample_images)
    by_mode = classifier.with_embedding(*mode_embedding(weight)).image_embeddings(sample_images)
    expected = F.normalize(weight * F.normalize(clip, dim=-1) + (1 - weight) * F.normalize(aligned, dim=-1), dim=-1)
    torch.testing.assert_close(fused_features(clip, aligned, weight), expected)
    torch.testing.assert_close(by_mode, expected, atol=1e-5, rtol=1e-5)


CLASSES = ("blight", "healthy", "rust")


def _write_split(root, per_class, seed):
    rng = np.random.default_rng(seed)
    for name in CLASSES:
        (root / name).mkdir(parents=True)
        for index in range(per_class):
            Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(root / name / f"{index}.png")


def _split_images(root):
    paths = [(label, path) for label, name in enumerate(CLASSES) for path in sorted((root / name).iterdir())]
    return [Image.open(path).convert("RGB") for _, path in paths], torch.tensor([label for label, _ in paths])


@pytest.fixture
def split_task(tmp_path):
    """A task whose train and test splits hold different images, and its suite YAML."""
    _write_split(tmp_path / "data" / "train", per_class=4, seed=0)
    _write_split(tmp_path / "data" / "test", per_class=3, seed=1)
    config = tmp_path / "suite.yaml"
    entry = {"name": "leaves", "path": "data", "split": "test", "train_split": "train", "templates": "generic"}
    config.write_text(yaml.safe_dump({"datasets": [entry]}))
    return config


def _record_selection(monkeypatch):
    """`select_embedding` as the runner calls it, recording the shots it is given."""
    calls = []

    def recording(classifier, clip, aligned, labels, *args, **kwargs):
        calls.append({"clip": clip.clone(), "aligned": aligned.clone(), "labels": labels.clone()})
        return select_embedding(classifier, clip, aligned, labels, *args, **kwargs)

    monkeypatch.setattr(runner, "select_embedding", recording)
    return calls


def _rewrite_test_split(config):
    test = config.parent / "data" / "test"
    for path in sorted(test.rglob("*.png")):
        path.unlink()
    for name in CLASSES:
        (test / name).rmdir()
    _write_split(test, per_class=5, seed=7)


def _assert_shots_are_train_images(call, classifier, root, shots, seed):
    """Every shot is a train image of its label, none a test image, and its labels those `sample_k_shot` draws."""
    train_images, train_labels = _split_images(root / "train")
    test_images, _ = _split_images(root / "test")
    for embedding in ("clip", "aligned"):
        sibling = classifier.with_embedding(embedding)
        train, test = sibling.image_embeddings(train_images), sibling.image_embeddings(test_images)
        nearest = torch.cdist(call[embedding], train).min(dim=1)
        assert nearest.values.max() < 1e-5
        assert torch.equal(train_labels[nearest.indices], call["labels"])
        assert torch.cdist(call[embedding], test).min() > 1e-3
    indices, _ = sample_k_shot(train_labels, shots, seed)
    assert torch.equal(call["labels"], train_labels[indices])


def test_the_suite_selects_on_train_shots_only_and_reports_selected_fixed_and_chance(
    split_task, classifier, monkeypatch
):
    models = {"agri (aligned)": classifier, "agri (clip)": classifier.with_embedding("clip")}
    calls = _record_selection(monkeypatch)
    results = run_suite(split_task, models, split_task.parent / "out", select_shots=2, seeds=[0, 1])
    assert len(calls) == 2  # one per seed
    for call, seed in zip(calls, [0, 1]):
        _assert_shots_are_train_images(call, classifier, split_task.parent / "data", 2, seed)

    section = results["selection"]
    record = section["datasets"]["leaves"]["agri"]
    assert section["shots"] == 2 and [run["seed"] for run in record["selected"]] == [0, 1]
    assert record["n_test"] == 9 and all(run["n_shots"] == 6 for run in record["selected"])
    # The test top-1 of each chosen mode, computed here from the test images.
    test_images, test_labels = _split_images(split_task.parent / "data" / "test")
    clip = classifier.with_embedding("clip").image_embeddings(test_images)
    aligned = classifier.image_embeddings(test_images)
    prompt_names, templates = (
        results["dataset_info"]["leaves"]["prompt_names"],
        results["dataset_info"]["leaves"]["templates"],
    )

    def test_top1(weight):
        features = F.normalize(weight * clip + (1 - weight) * aligned, dim=-1)
        logits = classifier.embedding_logits(features, prompt_names, templates)
        return float((logits.argmax(dim=1) == test_labels).double().mean())

    for run in record["selected"]:
        assert run["test_top1"] == pytest.approx(test_top1(run["fusion_weight"]))
    mean = section["mean"]["agri"]
    assert mean["selected_top1"] == pytest.approx(
        np.mean([test_top1(run["fusion_weight"]) for run in record["selected"]])
    )
    # Each fixed mode's top-1 is the suite's ordinary zero-shot top-1 of that classifier.
    fixed = {name: results["datasets"]["leaves"][name]["top1"] for name in models}
    assert mean["fixed_top1"] == pytest.approx(fixed)
    assert mean["best_fixed_in_hindsight"] == max(fixed, key=fixed.get)
    assert mean["best_fixed_in_hindsight_top1"] == pytest.approx(max(fixed.values()))
    assert mean["oracle_top1"] == pytest.approx(max(test_top1(weight) for weight in FUSION_WEIGHTS))
    assert mean["oracle_top1"] >= max(mean["selected_top1"], mean["best_fixed_in_hindsight_top1"])
    assert section["chance"]["mean"] == pytest.approx(1 / 3)

    # Other test images change the test scores, never the shots nor the choice.
    _rewrite_test_split(split_task)
    again = run_suite(split_task, models, split_task.parent / "out-2", select_shots=2, seeds=[0, 1])
    assert len(calls) == 4
    for first, second in zip(calls[:2], calls[2:]):
        assert all(torch.equal(first[key], second[key]) for key in first)
    rerun = again["selection"]["datasets"]["leaves"]["agri"]
    assert rerun["n_test"] == 15
    assert [run["chosen"] for run in rerun["selected"]] == [run["chosen"] for run in record["selected"]]
    assert [run["shots_top1"] for run in rerun["selected"]] == [run["shots_top1"] for run in record["selected"]]


def test_a_task_file_selects_and_calibrates_on_train_shots_only(split_task, classifier, monkeypatch):
    calls = _record_selection(monkeypatch)
    # The tiny model in memory stands for a checkpoint folder (loading one is tested elsewhere).
    loaded = []

    def from_pretrained(path, batch_size=32, device=None):
        loaded.append(path)
        return ZeroShotClassifier(classifier.model, classifier.processor, batch_size=batch_size)

    monkeypatch.setattr(ZeroShotClassifier, "from_pretrained", from_pretrained)
    task = fit_task_file(split_task, "leaves", "runs/tiny", shots=3, seed=1, select=True, device="cpu")
    assert loaded == ["runs/tiny"] and task.model == "runs/tiny"
    assert len(calls) == 1
    _assert_shots_are_train_images(calls[0], classifier, split_task.parent / "data", 3, 1)
    assert (task.embedding, task.fusion_weight) == mode_embedding(
        task.selection["candidates"][task.selection["chosen"]]["fusion_weight"]
    )
    # The temperature is fitted on the same shots, embedded as the chosen mode.
    weight = task.selection["candidates"][task.selection["chosen"]]["fusion_weight"]
    shots = F.normalize(weight * calls[0]["clip"] + (1 - weight) * calls[0]["aligned"], dim=-1)
    logits = classifier.embedding_logits(shots, task.labels, task.templates)
    assert task.temperature == pytest.approx(fit_calibration(logits, calls[0]["labels"], False).temperature, rel=1e-4)
    # The similarity threshold keeps 90 % of the shots: the round(0.9 n)-th highest best-label cosine.
    cosines = (shots @ classifier.label_embeddings(task.labels, task.templates).T).max(dim=1).values
    kept = round(0.9 * len(cosines))
    assert task.similarity_threshold == pytest.approx(float(cosines.sort(descending=True).values[kept - 1]), abs=1e-6)
    _rewrite_test_split(split_task)
    again = fit_task_file(split_task, "leaves", "runs/tiny", shots=3, seed=1, select=True, device="cpu")
    assert all(torch.equal(calls[0][key], calls[1][key]) for key in calls[0])
    assert again.selection == task.selection
    assert (again.temperature, again.embedding, again.fusion_weight, again.similarity_threshold) == (
        task.temperature,
        task.embedding,
        task.fusion_weight,
        task.similarity_threshold,
    )
