"""Two-level label files (`agriclip.labels`), two-level scoring (`modeling_agriclip.hierarchy`) and the suite's
hierarchy section (`evaluation.hierarchy`), against computations by hand."""

import re

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from agriclip.labels import DEFAULT_LEVELS, LabelHierarchy, load_hierarchy, parse_hierarchy
from agriclip.templates import get_templates
from evaluation.hierarchy import hierarchy_record, load_task_hierarchy
from evaluation.runner import run_suite
from evaluation.suite import DatasetSpec
from modeling_agriclip import AgriCLIPConfig, AgriCLIPModel
from modeling_agriclip.hierarchy import predict_hierarchical, two_level_probabilities
from modeling_agriclip.zero_shot import ZeroShotClassifier


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models on tiny images: threads only slow them down (many times over on a machine shared with other
    jobs)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


VALID = """\
levels: [crop, condition]
templates:
  crop: ["a photo of a {} plant.", "a photo of {} leaves."]
  condition: leaf
groups:
  grape: [grape leaf with rust, grape leaf with blight]
  maize: [maize leaf with rust, maize leaf with mosaic virus, healthy maize leaf]
  tomato: [tomato leaf mold]
"""


def _write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def test_a_label_file_gives_its_levels_templates_and_groups(tmp_path):
    hierarchy = load_hierarchy(_write(tmp_path / "labels.yaml", VALID))
    assert hierarchy.levels == ("crop", "condition")
    assert hierarchy.group_templates == ["a photo of a {} plant.", "a photo of {} leaves."]
    assert hierarchy.label_templates == get_templates("leaf")  # a registered template set, by name
    assert hierarchy.group_names == ["grape", "maize", "tomato"]
    assert hierarchy.labels == [
        "grape leaf with rust",
        "grape leaf with blight",
        "maize leaf with rust",
        "maize leaf with mosaic virus",
        "healthy maize leaf",
        "tomato leaf mold",
    ]
    assert hierarchy.group_of() == [0, 0, 1, 1, 1, 2]


def test_a_label_file_without_levels_or_templates_takes_the_defaults(tmp_path):
    hierarchy = load_hierarchy(_write(tmp_path / "labels.yml", "groups:\n  cow: [holstein, jersey]\n  goat: [boer]\n"))
    assert hierarchy == LabelHierarchy({"cow": ["holstein", "jersey"], "goat": ["boer"]}, DEFAULT_LEVELS, None, None)
    # Only the level given templates has them.
    only_labels = parse_hierarchy({"groups": {"cow": ["holstein"]}, "templates": {"label": ["a {} cow."]}}, "x.yaml")
    assert only_labels.group_templates is None and only_labels.label_templates == ["a {} cow."]


GROUPS = "groups:\n  grape: [rust, blight]\n  maize: [smut]\n"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("levels: [crop, condition]\n", "expected a mapping with `groups`"),
        ("groups: {}\n", "expected a mapping with `groups`"),
        ("groups: [rust, blight]\n", "expected a mapping with `groups`"),
        ("- rust\n- blight\n", "expected a mapping with `groups`"),
        ("groups:\n  grape: []\n", "groups.grape must be a non-empty list of names"),
        ("groups:\n  grape: rust\n", "groups.grape must be a non-empty list of names"),
        ("groups:\n  grape: [rust, blight]\n  maize: [rust]\n", "labels must each be in one group; repeated: ['rust']"),
        (GROUPS + "labels: [rust]\n", "unknown keys ['labels']; allowed: levels, templates, groups"),
        (GROUPS + "levels: [crop]\n", "levels must name two different levels"),
        (GROUPS + "levels: [crop, crop]\n", "levels must name two different levels"),
        (GROUPS + "levels: crop\n", "levels must be a non-empty list of names"),
        (GROUPS + "templates:\n  species: ['a {}.']\n", "templates must map the levels ['group', 'label']"),
        (GROUPS + "templates: ['a {}.']\n", "templates must map the levels"),
        (GROUPS + "templates:\n  group: no-such-set\n", "templates.group: .*unknown template set 'no-such-set'"),
        (GROUPS + "templates:\n  label: ['a photo']\n", "templates.label: .*no '{}' placeholder"),
        (
            GROUPS + "templates:\n  label: 5\n",
            "templates.label must be a list of templates or a template set's name; got 5",
        ),
        (GROUPS + "templates:\n  label:\n", "templates.label must be a list of templates"),
        (GROUPS + "templates:\n  group: [3]\n", "templates.group: .*not a string"),
        ("groups: [unclosed\n", "not a YAML label file"),
    ],
)
def test_label_file_errors_name_the_file_and_the_field(tmp_path, text, message):
    path = _write(tmp_path / "labels.yaml", text)
    # A literal message unless it is a pattern (with ".*").
    pattern = message if ".*" in message else re.escape(message)
    with pytest.raises(ValueError, match=re.escape(f"{path}: ") + pattern):
        load_hierarchy(path)


def test_a_label_file_that_is_not_utf8_is_a_yaml_error_naming_the_file(tmp_path):
    path = tmp_path / "labels.yaml"
    path.write_bytes(b"groups:\n  grape: [caf\xe9]\n")
    with pytest.raises(ValueError, match=re.escape(f"{path}: not a YAML label file")):
        load_hierarchy(path)


HIERARCHY = LabelHierarchy({"grape": ["rust", "blight"], "maize": ["smut", "mosaic", "healthy"], "tomato": ["mold"]})


def _softmax(z):
    shifted = np.exp(z - z.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


def _sigmoid(z):
    return 1 / (1 + np.exp(-z))


def _two_level_by_hand(group_logits, label_logits, group_of, sigmoid):
    """Per image: the best group; P(group) times, for its labels only, a softmax over them (or each sigmoid)."""
    read = _sigmoid if sigmoid else _softmax
    groups, scores = [], np.zeros_like(label_logits)
    for row, (g_row, l_row) in enumerate(zip(group_logits, label_logits)):
        p_group = read(g_row)
        group = int(np.argmax(p_group))
        members = np.flatnonzero(np.asarray(group_of) == group)
        scores[row, members] = p_group[group] * read(l_row[members])
        groups.append(group)
    return np.array(groups), scores


@pytest.mark.parametrize("sigmoid", [False, True], ids=["infonce", "siglip"])
def test_two_level_probabilities_equal_a_computation_by_hand(sigmoid):
    generator = torch.Generator().manual_seed(0)
    group_logits = 3 * torch.randn(40, 3, generator=generator).double() - (6 if sigmoid else 0)
    label_logits = 3 * torch.randn(40, 6, generator=generator).double() - (6 if sigmoid else 0)
    groups, scores = two_level_probabilities(group_logits, label_logits, HIERARCHY, sigmoid)
    expected_groups, expected = _two_level_by_hand(
        group_logits.numpy(), label_logits.numpy(), HIERARCHY.group_of(), sigmoid
    )
    assert groups.tolist() == expected_groups.tolist()
    np.testing.assert_allclose(scores.numpy(), expected, rtol=1e-10, atol=1e-15)
    # Every label of another group scores exactly 0.
    outside = torch.tensor(HIERARCHY.group_of())[None, :] != groups[:, None]
    assert (scores[outside] == 0).all() and (scores[~outside] > 0).all()
    # The case has teeth: the flat best label lies in another group for some images, which the hierarchy overrules.
    flat_groups = torch.tensor(HIERARCHY.group_of())[label_logits.argmax(dim=1)]
    assert (flat_groups != groups).any()
    if not sigmoid:  # a softmax per level: the scores of an image sum to its group's probability
        torch.testing.assert_close(scores.sum(dim=1), group_logits.softmax(dim=1).max(dim=1).values)


@pytest.fixture(scope="module")
def classifiers(tiny_model, tiny_processor):
    torch.manual_seed(1)
    siglip = AgriCLIPModel(AgriCLIPConfig.tiny(contrastive_loss="siglip")).eval()
    return {
        "infonce": ZeroShotClassifier(tiny_model, tiny_processor, batch_size=8),
        "siglip": ZeroShotClassifier(siglip, tiny_processor, batch_size=8),
    }


@pytest.mark.parametrize("objective", ["infonce", "siglip"])
@pytest.mark.parametrize("top_k", [1, 2, 5])
def test_predict_hierarchical_ranks_only_the_predicted_group_by_p_group_times_p_label(
    classifiers, sample_images, objective, top_k
):
    classifier = classifiers[objective]
    hierarchy = LabelHierarchy(
        {"grape": ["grape rust", "grape blight"], "maize": ["maize smut", "maize mosaic", "healthy maize"]},
        ("crop", "condition"),
        group_templates=["a photo of a {} plant."],
        label_templates=None,
    )
    templates = ["a photo of {}.", "a leaf with {}."]
    predictions = predict_hierarchical(classifier, sample_images, hierarchy, templates, top_k=top_k)
    group_logits = classifier.logits(sample_images, ["grape", "maize"], ["a photo of a {} plant."])
    label_logits = classifier.logits(sample_images, hierarchy.labels, templates)
    groups, expected = _two_level_by_hand(
        group_logits.double().numpy(), label_logits.double().numpy(), hierarchy.group_of(), objective == "siglip"
    )
    read = _sigmoid if objective == "siglip" else _softmax
    assert len(predictions) == len(sample_images)
    for row, group, scores, g_row in zip(predictions, groups, expected, group_logits.double().numpy()):
        members = hierarchy.groups[hierarchy.group_names[group]]
        assert len(row) == min(top_k, len(members))
        assert all(item["label"] in members and item["group"] == hierarchy.group_names[group] for item in row)
        by_hand = sorted(((scores[hierarchy.labels.index(label)], label) for label in members), reverse=True)
        assert [item["label"] for item in row] == [label for _, label in by_hand[:top_k]]
        assert [item["score"] for item in row] == pytest.approx([score for score, _ in by_hand[:top_k]], rel=1e-5)
        assert all(item["group_score"] == pytest.approx(read(g_row)[group], rel=1e-5) for item in row)


CLASSES = ["grape_blight", "grape_healthy", "maize_healthy", "maize_rust", "tomato_mold"]
# File order differs from the dataset's (alphabetical) class order.
TASK_GROUPS = {"maize": ["maize_rust", "maize_healthy"], "tomato": ["tomato_mold"], "grape": CLASSES[1::-1]}


def _task_file(tmp_path, groups=TASK_GROUPS, templates=None):
    document = {"levels": ["crop", "condition"], "groups": groups}
    if templates:
        document["templates"] = templates
    return _write(tmp_path / "hierarchy.yaml", yaml.safe_dump(document, sort_keys=False))


def _spec(tmp_path, hierarchy, class_names=None):
    return DatasetSpec(
        "leaves",
        "Leaves",
        tmp_path / "leaves",
        class_names=class_names or {},
        templates=["a photo of {}."],
        hierarchy=hierarchy,
    )


def test_a_task_hierarchy_maps_its_labels_to_the_prompt_names_and_dataset_classes(tmp_path):
    spec = _spec(tmp_path, _task_file(tmp_path), class_names={"tomato_mold": "tomato leaf mold"})
    prompt_names = spec.prompt_names(CLASSES, "here")
    hierarchy, classes = load_task_hierarchy(spec, CLASSES, prompt_names)
    assert hierarchy.groups == {
        "maize": ["maize rust", "maize healthy"],
        "tomato": ["tomato leaf mold"],
        "grape": ["grape healthy", "grape blight"],
    }
    assert classes == [3, 2, 4, 1, 0]
    assert [prompt_names[index] for index in classes] == hierarchy.labels


@pytest.mark.parametrize(
    ("groups", "missing", "unknown"),
    [
        (
            {"maize": ["maize_rust", "maize_healthy", "maize_smut"], "grape": CLASSES[:2]},
            ["tomato_mold"],
            ["maize_smut"],
        ),
        (
            {"grape": ["grape blight", "grape healthy"], "rest": CLASSES[2:]},
            CLASSES[:2],
            ["grape blight", "grape healthy"],
        ),
    ],
    ids=["other-labels", "prompt-names-not-classes"],
)
def test_a_task_hierarchy_whose_labels_are_not_the_dataset_classes_is_refused_naming_the_file(
    tmp_path, groups, missing, unknown
):
    path = _task_file(tmp_path, groups)
    spec = _spec(tmp_path, path)
    with pytest.raises(
        ValueError, match=re.escape(f"{path}: the labels must be the classes of dataset 'leaves'")
    ) as error:
        load_task_hierarchy(spec, CLASSES, spec.prompt_names(CLASSES, "here"))
    assert f"missing {missing}, not classes {unknown}" in str(error.value)


def _record_by_hand(classifier, features, labels, prompt_names, groups, group_templates, label_templates):
    """Flat and two-level predictions as dataset class ids, in the dataset's class order throughout."""
    group_names = list(groups)
    group_of_class = np.empty(len(CLASSES), dtype=int)
    for index, members in enumerate(groups.values()):
        group_of_class[[CLASSES.index(member) for member in members]] = index
    label_logits = classifier.embedding_logits(features, prompt_names, label_templates).numpy()
    group_logits = classifier.embedding_logits(features, group_names, group_templates).numpy()
    flat = label_logits.argmax(axis=1)
    group = group_logits.argmax(axis=1)  # the argmax of the softmax (or of the sigmoids) is that of the logits
    two_level = np.array(
        [max(np.flatnonzero(group_of_class == g), key=lambda index: row[index]) for g, row in zip(group, label_logits)]
    )
    y = labels.numpy()
    return {
        "top1_flat": np.mean(flat == y),
        "top1_hierarchical": np.mean(two_level == y),
        "group_accuracy": np.mean(group == group_of_class[y]),
        "flat_group_accuracy": np.mean(group_of_class[flat] == group_of_class[y]),
        "levels": ["crop", "condition"],
        "n_groups": 3,
        "n_images": len(y),
        "chance_top1": 1 / 5,
        "chance_group": 1 / 3,
    }, (flat, two_level)


@pytest.mark.parametrize("objective", ["infonce", "siglip"])
def test_hierarchy_record_equals_flat_and_two_level_accuracies_by_hand(tmp_path, classifiers, objective):
    classifier = classifiers[objective]
    spec = _spec(tmp_path, _task_file(tmp_path, templates={"crop": ["a photo of a {} plant."]}))
    prompt_names = spec.prompt_names(CLASSES, "here")
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(60) % 5
    text = classifier.label_embeddings(prompt_names, spec.templates)
    features = torch.nn.functional.normalize(text[labels] + 0.3 * torch.randn(60, 32, generator=generator), dim=-1)
    record = hierarchy_record(
        classifier, features, labels, load_task_hierarchy(spec, CLASSES, prompt_names), spec.templates
    )
    expected, (flat, two_level) = _record_by_hand(
        classifier, features, labels, prompt_names, TASK_GROUPS, ["a photo of a {} plant."], spec.templates
    )
    assert record == pytest.approx(expected)
    # The case has teeth: the two-level prediction differs from the flat one on some images.
    assert (flat != two_level).any()


def _write_images(root, per_class=3, seed=0):
    rng = np.random.default_rng(seed)
    for name in CLASSES:
        (root / name).mkdir(parents=True)
        for index in range(per_class):
            Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(root / name / f"{index}.png")


def test_the_suite_writes_a_hierarchy_section_whose_flat_top1_is_the_zero_shot_top1(tmp_path, classifiers):
    _write_images(tmp_path / "leaves")
    _write_images(tmp_path / "other", per_class=2, seed=1)
    _task_file(tmp_path, templates={"crop": ["a photo of a {} plant."]})
    config = _write(
        tmp_path / "suite.yaml",
        yaml.safe_dump(
            {
                "datasets": [
                    {"name": "leaves", "path": "leaves", "templates": "generic", "hierarchy": "hierarchy.yaml"},
                    {"name": "other", "path": "other"},  # no hierarchy: not in the section
                ]
            }
        ),
    )
    classifier = classifiers["infonce"]
    results = run_suite(config, {"agriclip": classifier}, tmp_path / "out", hierarchy=True)
    assert results["settings"]["hierarchy"] is True
    assert list(results["hierarchy"]["datasets"]) == ["leaves"]
    record = results["hierarchy"]["datasets"]["leaves"]["agriclip"]
    assert record["top1_flat"] == results["datasets"]["leaves"]["agriclip"]["top1"]
    assert record["zero_shot_top1"] == results["datasets"]["leaves"]["agriclip"]["top1"]
    # The two-level numbers, from the images by hand.
    images = [
        Image.open(path).convert("RGB") for name in CLASSES for path in sorted((tmp_path / "leaves" / name).iterdir())
    ]
    labels = torch.arange(len(CLASSES)).repeat_interleave(3)
    expected, _ = _record_by_hand(
        classifier,
        classifier.image_embeddings(images),
        labels,
        results["dataset_info"]["leaves"]["prompt_names"],
        TASK_GROUPS,
        ["a photo of a {} plant."],
        get_templates("generic"),
    )
    assert {key: value for key, value in record.items() if key != "zero_shot_top1"} == pytest.approx(expected)
    # Without --hierarchy there is no section.
    assert "hierarchy" not in run_suite(config, {"agriclip": classifier}, tmp_path / "out-2")
