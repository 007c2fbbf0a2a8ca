"""`agriclip explain`: the heat maps (backbone CLS attention, Grad-CAM, the CLIP tower's gradient-weighted attention),
the pointing game that measures them, the lesion masks of the embedded generator, and the command's files."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from agriclip.cli import main
from modeling_agriclip import AgriCLIPConfig, AgriCLIPModel, AgriCLIPProcessor, ZeroShotClassifier
from modeling_agriclip.explain import (
    BACKBONE_ATTENTION,
    BACKBONE_GRAD_CAM,
    CLIP_GRAD_ATTENTION,
    explain,
    grad_cam,
    gradient_attention_relevance,
    map_types,
    output_names,
    peak,
    pointing_hit,
    processed_mask,
    processed_view,
    random_hit,
    upsample,
)
from training.embedded import (
    LESION_CONDITIONS,
    build_embedded_dataset,
    downstream_image,
    render_leaf,
    render_leaf_with_lesions,
)


LABELS = ["leaf rust", "healthy leaf", "leaf spot"]
TEMPLATES = ["a photo of a {}."]


def classifier_for(backbone: str, clip_tokenizer, embedding: str | None = None) -> ZeroShotClassifier:
    config = AgriCLIPConfig.tiny(backbone=backbone)
    torch.manual_seed(0)
    model = AgriCLIPModel(config).eval()
    processor = AgriCLIPProcessor.from_config(config, tokenizer=clip_tokenizer)
    return ZeroShotClassifier(model, processor, embedding=embedding)


@pytest.fixture(scope="module")
def vit(clip_tokenizer):
    return classifier_for("vit", clip_tokenizer)


@pytest.fixture(scope="module")
def resnet(clip_tokenizer):
    return classifier_for("resnet", clip_tokenizer)


@pytest.fixture(scope="module")
def pixel_values(vit, sample_images):
    return vit.pixel_values(sample_images)


# ---------------------------------------------------------------------------------------------------------------
# The maps
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("backbone", "embedding", "expected"),
    [
        ("vit", "aligned", [BACKBONE_ATTENTION]),
        ("dinov2", "aligned", [BACKBONE_ATTENTION]),
        ("resnet", "aligned", [BACKBONE_GRAD_CAM]),
        ("convnext", "aligned", [BACKBONE_GRAD_CAM]),
        ("vit", "clip", [CLIP_GRAD_ATTENTION]),
        ("resnet", "fused", [BACKBONE_GRAD_CAM, CLIP_GRAD_ATTENTION]),
    ],
)
def test_each_map_has_the_processed_shape_and_lies_in_the_unit_range(
    clip_tokenizer, sample_images, backbone, embedding, expected
):
    classifier = classifier_for(backbone, clip_tokenizer, embedding)
    pixels = classifier.pixel_values(sample_images)
    assert map_types(classifier.model, embedding) == expected
    result = explain(classifier, pixels, LABELS, TEMPLATES)
    assert list(result.maps) == expected
    for heat in result.maps.values():
        assert heat.shape == (3, 64, 64)
        assert heat.min() >= 0 and heat.max() <= 1
        assert torch.allclose(heat.flatten(1).amax(1), torch.ones(3))  # min-max scaled: every map reaches 1
    # The logits the maps explain are the classifier's, the probabilities predict's.
    assert torch.allclose(result.logits, classifier.logits(pixels, LABELS, TEMPLATES), atol=1e-5)
    assert torch.allclose(result.probabilities.sum(1), torch.ones(3))
    assert result.targets.tolist() == result.logits.argmax(1).tolist()
    if backbone in ("vit", "dinov2") and embedding == "aligned":
        heads = result.head_maps[BACKBONE_ATTENTION]
        assert heads.shape == (3, 3, 64, 64) and heads.min() >= 0 and heads.max() <= 1


def test_the_cls_attention_map_is_the_returned_attentions_cls_row_mean(vit, pixel_values):
    result = explain(vit, pixel_values, LABELS, TEMPLATES)
    with torch.no_grad():
        outputs = vit.model.get_backbone_features(pixel_values, output_attentions=True)
    last = outputs.attentions[-1]  # (B, heads, 1 + 64, 1 + 64) on 8-pixel patches of 64 pixels
    expected = last[:, :, 0, 1:].mean(dim=1).reshape(3, 8, 8)
    assert torch.allclose(result.grids[BACKBONE_ATTENTION], expected, atol=1e-6)
    scaled = upsample(expected, (64, 64))
    low, high = scaled.flatten(1).amin(1), scaled.flatten(1).amax(1)
    assert torch.allclose(result.maps[BACKBONE_ATTENTION], (scaled - low[:, None, None]) / (high - low)[:, None, None])
    # The backbone attention does not depend on the label explained.
    other = explain(vit, pixel_values, LABELS, TEMPLATES, targets=2)
    assert torch.equal(other.maps[BACKBONE_ATTENTION], result.maps[BACKBONE_ATTENTION])


def test_grad_cam_matches_one_written_with_hooks_and_backward(resnet, pixel_values):
    """An independent Grad-CAM: the last stage's output caught by a forward hook, the label's logit (as the
    classifier scores it) back-propagated with `backward`, the CAM written out."""
    target = 1
    result = explain(resnet, pixel_values, LABELS, TEMPLATES, targets=target)
    caught = {}

    def keep(module, inputs, output):
        output.retain_grad()
        caught["features"] = output

    handle = resnet.model.dino_model.encoder.stages[-1].register_forward_hook(keep)
    try:
        embeds = resnet.model.get_image_features(pixel_values, embedding="aligned").pooler_output
    finally:
        handle.remove()
    labels = resnet.label_embeddings(LABELS, TEMPLATES).clone()
    logits = resnet.logit_scale * torch.nn.functional.normalize(embeds, dim=-1) @ labels.T
    logits[:, target].sum().backward()
    features, gradients = caught["features"], caught["features"].grad
    assert features.shape == (3, 64, 2, 2)
    expected = torch.relu((gradients.mean(dim=(2, 3))[:, :, None, None] * features).sum(dim=1)).detach()
    assert torch.allclose(result.grids[BACKBONE_GRAD_CAM], expected, rtol=1e-4, atol=1e-6)
    resnet.model.zero_grad(set_to_none=True)


def test_grad_cam_points_at_the_one_location_the_score_depends_on():
    features = torch.rand(1, 4, 5, 5)
    planted = features.clone().requires_grad_(True)
    score = (planted[0, 2, 3, 1] * 5.0) + planted[0, 0].sum() * 0.0  # only channel 2 at row 3, column 1 matters
    (gradient,) = torch.autograd.grad(score, planted)
    features = torch.zeros(1, 4, 5, 5)
    features[0, 2, 3, 1] = 1.0
    cam = grad_cam(features, gradient)
    assert cam.shape == (1, 5, 5) and cam[0, 3, 1] > 0 and cam.sum() == cam[0, 3, 1]
    x, y = peak(upsample(cam, (50, 50))[0].numpy())
    assert x in (14, 15) and y in (34, 35)  # the centre of that cell (pixels 10-19, 30-39)
    # Negative evidence is cut by the ReLU.
    assert grad_cam(features, -gradient).abs().sum() == 0


def test_the_clip_map_is_chefer_relevance_of_the_tower_attentions(vit, pixel_values):
    clip = vit.with_embedding("clip")
    result = explain(clip, pixel_values, LABELS, TEMPLATES)
    outputs = clip.model.get_clip_image_features(pixel_values, output_attentions=True)
    labels = clip.label_embeddings(LABELS, TEMPLATES).clone()
    logits = clip.logit_scale * torch.nn.functional.normalize(outputs.pooler_output, dim=-1) @ labels.T
    targets = logits.argmax(1)
    gradients = torch.autograd.grad(logits.gather(1, targets[:, None]).sum(), list(outputs.attentions))
    relevance = torch.eye(17).repeat(3, 1, 1)  # CLS + 16 patches of 16 pixels
    for attention, gradient in zip(outputs.attentions, gradients):
        relevance = relevance + torch.bmm((gradient * attention).clamp(min=0).mean(1), relevance)
    expected = relevance[:, 0, 1:].reshape(3, 4, 4).detach()
    assert torch.allclose(result.grids[CLIP_GRAD_ATTENTION], expected, rtol=1e-4, atol=1e-7)
    assert result.maps[CLIP_GRAD_ATTENTION].shape == (3, 64, 64)


def test_one_layer_relevance_is_the_positive_gradient_weighted_cls_row():
    attention = torch.softmax(torch.randn(1, 2, 4, 4), dim=-1)
    gradient = torch.randn(1, 2, 4, 4)
    relevance = gradient_attention_relevance([attention], [gradient])
    weighted = (gradient * attention).clamp(min=0).mean(1)
    assert torch.allclose(relevance, torch.eye(4) + weighted)
    assert torch.allclose(relevance[0, 0, 1:], weighted[0, 0, 1:])


def test_eager_attention_is_switched_on_when_an_attention_map_needs_it(clip_tokenizer, sample_images):
    classifier = classifier_for("vit", clip_tokenizer)
    classifier.model.set_attn_implementation("sdpa")
    result = explain(classifier, classifier.pixel_values(sample_images[:1]), LABELS, TEMPLATES)
    assert classifier.model.config.dino_config._attn_implementation == "eager"
    assert result.maps[BACKBONE_ATTENTION].shape == (1, 64, 64)


# ---------------------------------------------------------------------------------------------------------------
# The pointing game
# ---------------------------------------------------------------------------------------------------------------


def test_the_pointing_game_on_planted_maps_and_masks():
    mask = np.zeros((10, 10), dtype=bool)
    mask[2:5, 6:9] = True  # 9 of 100 pixels
    inside, outside = np.zeros((10, 10)), np.zeros((10, 10))
    inside[3, 7] = 1.0
    outside[8, 1] = 1.0
    assert pointing_hit(inside, mask) == 1.0 and pointing_hit(outside, mask) == 0.0
    assert peak(inside) == (7, 3)
    tied = np.zeros((10, 10))
    tied[3, 7] = tied[8, 1] = 1.0  # two maxima, one inside: half a hit
    assert pointing_hit(tied, mask) == 0.5
    assert random_hit(mask) == pytest.approx(0.09)
    # The random baseline is what uniformly random maxima score on average.
    rng = np.random.default_rng(0)
    hits = [pointing_hit(rng.random((10, 10)), mask) for _ in range(4000)]
    assert np.mean(hits) == pytest.approx(random_hit(mask), abs=0.015)
    with pytest.raises(ValueError, match="differ in shape"):
        pointing_hit(inside, mask[:5])


def test_a_mask_is_mapped_into_the_processed_crop_as_the_image_is(vit):
    processor = vit.processor.image_processor  # shorter side to 64, then a 64 x 64 centre crop
    image = np.zeros((64, 128, 3), dtype=np.uint8)
    image[:, :32] = 255  # the left quarter, cropped away
    image[16:48, 56:72] = 255  # a block in the middle
    mask = image[..., 0] > 0
    crop = processed_mask(mask, processor)
    assert crop.shape == (64, 64)
    assert not crop[:, :16].any() and crop[16:48, 24:40].all() and crop.sum() == 32 * 16
    view = processed_view(vit.pixel_values([Image.fromarray(image)]), processor)[0]
    assert np.array_equal(view[..., 0] > 127, crop)


# ---------------------------------------------------------------------------------------------------------------
# The embedded generator's lesion masks
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("condition", ["leaf_spot", "rust", "blight", "pest_damage", "healthy", "mosaic"])
def test_lesion_masks_come_with_the_same_drawing(condition):
    image = render_leaf("tomato", condition, np.random.default_rng(3), 64)
    again, mask = render_leaf_with_lesions("tomato", condition, np.random.default_rng(3), 64)
    assert np.array_equal(image, again) and mask.shape == (64, 64) and mask.dtype == bool
    if condition not in LESION_CONDITIONS:
        assert not mask.any()
        return
    assert 0.005 < mask.mean() < 0.3
    if condition in ("leaf_spot", "rust", "blight"):  # brown or orange lesions on a green leaf: red over green
        lesion = image[mask].astype(float)
        assert lesion[:, 0].mean() > lesion[:, 1].mean() + 10


def test_downstream_images_are_redrawn_with_their_masks(tmp_path):
    root = build_embedded_dataset(tmp_path, seed=0, image_size=48, pretrain_per_class=1, downstream_per_task=20)
    for task, folder in (("leaf-spot", "bacterial_spot"), ("leaf-condition", "rust"), ("leaf-condition", "healthy")):
        for index in range(2):
            drawn, mask = downstream_image(task, folder, index, seed=0, image_size=48)
            saved = np.asarray(Image.open(root / "downstream" / task / folder / f"{index:04d}.png"))
            assert np.array_equal(drawn, saved)
            assert mask.any() == (folder in LESION_CONDITIONS)
    with pytest.raises(KeyError, match="no class"):
        downstream_image("leaf-spot", "rust", 0)


# ---------------------------------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------------------------------


def test_output_names_are_distinct_paths_below_the_common_folder():
    names = output_names(["d/a/0000.png", "d/b/0000.png", "d/b/0000.jpg"])
    assert names == {"d/a/0000.png": "a__0000", "d/b/0000.png": "b__0000", "d/b/0000.jpg": "b__0000-2"}


def run(capsys, *argv):
    code = main([str(arg) for arg in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_explain_writes_overlays_and_scores_and_names_unreadable_images(capsys, tmp_path, tiny_checkpoint):
    photos = tmp_path / "photos"
    (photos / "field").mkdir(parents=True)
    Image.new("RGB", (80, 60), (40, 150, 40)).save(photos / "field" / "leaf.png")
    Image.new("RGB", (64, 64), (160, 90, 20)).save(photos / "rust.jpg")
    (photos / "broken.png").write_bytes(b"not an image")
    output = tmp_path / "explained"
    args = ["explain", tiny_checkpoint, photos, "--labels", ",".join(LABELS), "--output", output, "--num-workers", 0]
    code, _, err = run(capsys, *args)
    assert code == 0, err
    assert "broken.png" in err and "skipped 1" in err
    index = json.loads((output / "explain.json").read_text())
    assert [row["json"] for row in index["results"]] == ["rust.json", "field__leaf.json"]
    assert index["skipped"] == [{"image": str(photos / "broken.png"), "error": "corrupt"}]
    document = json.loads((output / "field__leaf.json").read_text())
    assert document["embedding"] == "aligned" and document["labels"] == LABELS
    assert sum(row["score"] for row in document["scores"]) == pytest.approx(1.0)
    assert document["explained"] == document["predicted"] == document["scores"][0]["label"]
    (attention,) = document["maps"]
    assert attention["type"] == BACKBONE_ATTENTION and attention["grid"] == [8, 8]
    assert 0 <= attention["argmax"]["x"] < 64 and 0 <= attention["argmax"]["y"] < 64
    assert len(attention["head_argmax"]) == 3
    overlay = Image.open(output / attention["overlay"])
    assert overlay.size == (64, 64) and overlay.mode == "RGB"
    assert Image.open(output / attention["heads_overlay"]).size == (3 * 64, 64)
    # The scores are predict's.
    reference = ZeroShotClassifier.from_pretrained(tiny_checkpoint)
    (predicted,) = reference.predict([Image.open(photos / "field" / "leaf.png")], LABELS, top_k=3)
    assert [row["label"] for row in document["scores"]] == [row["label"] for row in predicted]
    assert [row["score"] for row in document["scores"]] == pytest.approx([row["score"] for row in predicted], abs=1e-5)

    # A chosen label, another embedding: the CLIP tower's map of that label.
    code, _, err = run(capsys, *args, "--label", "healthy leaf", "--embedding", "fused")
    assert code == 0, err
    document = json.loads((output / "rust.json").read_text())
    assert document["explained"] == "healthy leaf" and document["embedding"] == "fused"
    assert [row["type"] for row in document["maps"]] == [BACKBONE_ATTENTION, CLIP_GRAD_ATTENTION]
    assert (output / "rust.clip-grad-attention.png").is_file()


def test_explain_fails_on_an_unknown_label_and_on_no_readable_image(capsys, tmp_path, tiny_checkpoint):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"")
    base = ["explain", tiny_checkpoint, broken, "--labels", "a,b", "--output", tmp_path / "out"]
    code, _, err = run(capsys, *base, "--label", "c")
    assert code == 7 and "--label 'c'" in err
    code, _, err = run(capsys, *base)
    assert code == 5 and "broken.png" in err and not (tmp_path / "out" / "explain.json").exists()
