"""The demo app: its scores against an independent computation and `agriclip predict`, its presets, the card section
it shows, the Space folder it writes, and the page driven in a real headless Chromium."""

import json
import os
import sys
from pathlib import Path

import gradio as gr
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from PIL import Image

from app.demo import DemoModel, build_demo, card_evaluation
from app.presets import presets_from_suite
from app.space import write_space
from modeling_agriclip.explain import map_types

from conftest import run_as_main, run_subprocess, write_labelled_folder


REPO_ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
SCREENSHOT = Path("/tmp/agriclip-app.png")
LABELS = ["red leaf", "green leaf", "blue leaf", "yellow leaf"]
TEMPLATE = "a photo of a {}."


@pytest.fixture(scope="module")
def photo(tmp_path_factory) -> Path:
    """A photo the tiny random model does not score uniformly: a striped leaf on soil."""
    pixels = np.random.default_rng(3).integers(0, 256, (72, 96, 3), dtype=np.uint8)
    pixels[20:50, 10:80] = (40, 170, 60)
    path = tmp_path_factory.mktemp("photos") / "leaf.png"
    Image.fromarray(pixels).save(path)
    return path


@pytest.fixture(scope="module")
def demo_model(tiny_checkpoint) -> DemoModel:
    return DemoModel(str(tiny_checkpoint), device="cpu")


def agriclip_predict(capsys, model, photo, labels, template) -> list[dict]:
    """The predictions `agriclip predict --format json` prints for one photo."""
    capsys.readouterr()
    argv = ["predict", photo, "--labels", ",".join(labels), "--template", template, "--model", model]
    code, stderr = run_as_main("agriclip", [*argv, "--format", "json", "--top-k", len(labels)])
    assert code == 0, stderr
    return json.loads(capsys.readouterr().out)["results"][0]["predictions"]


def test_the_page_scores_as_an_independent_computation_and_agriclip_predict(
    demo_model, tiny_model, tiny_processor, tiny_checkpoint, photo, capsys
):
    scores, maps = demo_model.classify(str(photo), ", ".join(LABELS), TEMPLATE, 4, False)
    assert maps == []
    with torch.no_grad():
        text = tiny_model.get_text_features(
            **tiny_processor(text=[TEMPLATE.format(label) for label in LABELS], return_tensors="pt", padding=True)
        ).pooler_output
        pixel_values = tiny_processor(images=[Image.open(photo).convert("RGB")], return_tensors="pt")["pixel_values"]
        image = tiny_model.get_image_features(pixel_values=pixel_values).pooler_output
        logits = tiny_model.logit_scale.exp() * F.normalize(image, dim=-1) @ F.normalize(text, dim=-1).T
    expected = dict(zip(LABELS, logits.softmax(dim=-1)[0].tolist()))
    assert scores.keys() == expected.keys()
    assert list(scores.values()) == sorted(scores.values(), reverse=True)
    for label, score in scores.items():
        assert score == pytest.approx(expected[label], abs=1e-5)
    assert max(expected.values()) - min(expected.values()) > 1e-3  # the comparison has teeth: scores differ
    predicted = agriclip_predict(capsys, str(tiny_checkpoint), photo, LABELS, TEMPLATE)
    assert [(p["label"], pytest.approx(p["score"], abs=1e-6)) for p in predicted] == list(scores.items())


def test_the_heat_maps_are_those_of_the_embedding_for_the_predicted_label(demo_model, photo):
    scores, maps = demo_model.classify(str(photo), ", ".join(LABELS), TEMPLATE, 2, True)
    assert len(scores) == 2
    types = map_types(demo_model.classifier.model, "aligned")
    assert [caption.split(" for ")[0] for _, caption in maps] == types
    top = next(iter(scores))
    for image, caption in maps:
        assert f"for {top!r}" in caption and isinstance(image, Image.Image) and image.size[0] > 0


@pytest.mark.parametrize(
    "labels, templates, message",
    [
        (" , ", TEMPLATE, "--labels holds no label"),
        ("rust, blight", "a photo of {} with {}", "has 2 '{}' placeholders"),
    ],
)
def test_bad_labels_or_templates_are_messages_on_the_page(demo_model, photo, labels, templates, message):
    with pytest.raises(gr.Error, match=message):
        demo_model.classify(str(photo), labels, templates, 3, False)
    with pytest.raises(gr.Error, match="Upload a photo first"):
        demo_model.classify(None, "rust, blight", TEMPLATE, 3, False)


def test_the_card_evaluation_section_is_read_from_the_checkpoint_folder(tmp_path):
    (tmp_path / "README.md").write_text(
        "---\nlicense: apache-2.0\n---\n# Model\n\n## Evaluation\n\nZero-shot.\n\n### Top-1 accuracy\n\n| a | b |\n"
        "| --- | --- |\n| 1 | 2 |\n\n## How to use\n\nImport it.\n"
    )
    assert card_evaluation(str(tmp_path)) == "Zero-shot.\n\n### Top-1 accuracy\n\n| a | b |\n| --- | --- |\n| 1 | 2 |"
    (tmp_path / "README.md").write_text("# Model\n\n## How to use\n")
    assert card_evaluation(str(tmp_path)) is None
    (tmp_path / "README.md").unlink()
    assert card_evaluation(str(tmp_path)) is None


def test_a_hub_model_is_classified_and_its_card_section_shown_as_a_folder_is(
    fake_hub, tiny_checkpoint, demo_model, photo
):
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo("agri/agriclip-tiny")
    api.upload_folder(repo_id="agri/agriclip-tiny", folder_path=tiny_checkpoint)
    card = "# AgriCLIP\n\n## Evaluation\n\n| Model | Mean |\n| --- | ---: |\n| agri | 40.0 |\n\n## How to use\n"
    api.upload_file(repo_id="agri/agriclip-tiny", path_or_fileobj=card.encode(), path_in_repo="README.md")
    assert card_evaluation("agri/agriclip-tiny") == "| Model | Mean |\n| --- | ---: |\n| agri | 40.0 |"
    hub_scores, _ = DemoModel("agri/agriclip-tiny", device="cpu").classify(
        str(photo), ", ".join(LABELS), TEMPLATE, 4, False
    )
    # To float rounding: the heat maps switch the shared local model to eager attention.
    folder_scores, _ = demo_model.classify(str(photo), ", ".join(LABELS), TEMPLATE, 4, False)
    assert list(hub_scores) == list(folder_scores) and hub_scores == pytest.approx(folder_scores, abs=1e-6)


def _suite(tmp_path) -> Path:
    write_labelled_folder(tmp_path / "downstream" / "colours", per_class=2)
    suite = {
        "datasets": [
            {
                "name": "colours",
                "display_name": "Leaf colours",
                "path": "downstream/colours",
                "class_names": {"red": "red leaf", "blue": "blue leaf"},
                "templates": [TEMPLATE],
            }
        ]
    }
    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump(suite))
    return path


def test_presets_are_the_suite_datasets_with_their_prompt_names_and_first_photos(tmp_path):
    (preset,) = presets_from_suite(_suite(tmp_path))
    folder = tmp_path / "downstream" / "colours"
    assert preset.name == "Leaf colours" and preset.templates == [TEMPLATE]
    assert preset.labels == ["blue leaf", "green", "red leaf", "yellow"]  # class folders in alphabetical order
    assert preset.examples == [str(folder / name / "0.png") for name in ("blue", "green", "red")]


def test_the_space_folder_is_a_gradio_space_of_the_hub_model(tmp_path, tiny_checkpoint):
    presets = presets_from_suite(_suite(tmp_path))
    with pytest.raises(ValueError, match="a Space loads its model from the Hub"):
        write_space(str(tiny_checkpoint), tmp_path / "space", presets)
    space = write_space("agri/agriclip-tiny", tmp_path / "space", presets)
    front, body = (space / "README.md").read_text().removeprefix("---\n").split("---\n", 1)
    assert "(https://huggingface.co/agri/agriclip-tiny)" in body
    settings = yaml.safe_load(front)
    assert settings["sdk"] == "gradio" and settings["sdk_version"] == gr.__version__
    assert settings["app_file"] == "app.py" and settings["models"] == ["agri/agriclip-tiny"]
    requirements = (space / "requirements.txt").read_text().splitlines()
    assert any(line.startswith("torch") for line in requirements)
    assert any(line.startswith("transformers") for line in requirements)
    assert not any(line.startswith(("pytest", "gradio")) for line in requirements)
    (saved,) = json.loads((space / "presets.json").read_text())
    assert saved["labels"] == presets[0].labels
    for example, original in zip(saved["examples"], presets[0].examples, strict=True):
        assert (space / example).read_bytes() == Path(original).read_bytes()
    assert "MODEL = 'agri/agriclip-tiny'" in (space / "app.py").read_text()
    compile((space / "app.py").read_text(), "app.py", "exec")


@pytest.mark.slow
def test_the_space_folder_builds_its_page_from_its_own_copies_of_the_packages(tmp_path, tiny_checkpoint):
    """app.py's steps, with a local model in place of the Hub one: the page builds from the folder's presets and
    the packages it holds, not this checkout's."""
    space = write_space("agri/agriclip-tiny", tmp_path / "space", presets_from_suite(_suite(tmp_path)))
    probe = (
        "import json, sys\nfrom pathlib import Path\nimport agriclip, demo, modeling_agriclip\n"
        "presets = [demo.Preset(**p) for p in json.loads(Path('presets.json').read_text())]\n"
        "demo.build_demo(sys.argv[1], presets)\n"
        "print(demo.__file__, agriclip.__file__, modeling_agriclip.__file__)"
    )
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"}
    done = run_subprocess([sys.executable, "-c", probe, str(tiny_checkpoint)], timeout=300, cwd=space, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    files = done.stdout.split()[-3:]
    assert len(files) == 3 and all(Path(path).resolve().is_relative_to(space.resolve()) for path in files)


@pytest.fixture
def browser():
    """Debian's Chromium, headless, through its own chromedriver (Selenium Manager is never asked for a driver)."""
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        pytest.skip(f"needs {CHROMIUM} and {CHROMEDRIVER} (apt-get install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = str(CHROMIUM)
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1100"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    yield driver
    driver.quit()


def _replace_text(element, text: str) -> None:
    """Types `text` over a box's content as a user would (select all, type), so the page sees input events."""
    from selenium.webdriver.common.keys import Keys

    element.send_keys(Keys.CONTROL, "a")
    element.send_keys(Keys.DELETE)
    element.send_keys(text)


def test_the_page_in_a_browser_gives_the_top_label_of_agriclip_predict(
    browser, tiny_checkpoint, photo, tmp_path, monkeypatch, capsys
):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as seen
    from selenium.webdriver.support.ui import WebDriverWait

    monkeypatch.setenv("GRADIO_ANALYTICS_ENABLED", "False")
    expected = agriclip_predict(capsys, str(tiny_checkpoint), photo, LABELS, TEMPLATE)
    presets = presets_from_suite(_suite(tmp_path))
    demo = build_demo(str(tiny_checkpoint), presets, device="cpu")
    demo.launch(server_name="127.0.0.1", server_port=None, prevent_thread_lock=True, quiet=True)
    try:
        wait = WebDriverWait(browser, 60)
        browser.get(demo.local_url)
        upload = wait.until(seen.presence_of_element_located((By.CSS_SELECTOR, "#photo input[type=file]")))
        assert browser.find_element(By.CSS_SELECTOR, "#labels textarea").get_attribute("value") == ", ".join(
            presets[0].labels
        )  # the first preset is offered
        upload.send_keys(str(photo))
        wait.until(seen.presence_of_element_located((By.CSS_SELECTOR, "#photo img")))
        _replace_text(browser.find_element(By.CSS_SELECTOR, "#labels textarea"), ", ".join(LABELS))
        _replace_text(browser.find_element(By.CSS_SELECTOR, "#templates textarea"), TEMPLATE)
        browser.find_element(By.CSS_SELECTOR, "#explain input[type=checkbox]").click()
        browser.find_element(By.CSS_SELECTOR, "#classify").click()
        top = wait.until(
            seen.presence_of_element_located((By.CSS_SELECTOR, "#scores [data-testid=label-output-value]"))
        )
        assert top.text == expected[0]["label"]
        bars = browser.find_elements(By.CSS_SELECTOR, "#scores meter")
        assert [bar.get_attribute("aria-label") for bar in bars] == [p["label"] for p in expected]
        wait.until(seen.presence_of_element_located((By.CSS_SELECTOR, "#maps img")))
        assert "aligned" in browser.find_element(By.CSS_SELECTOR, "#embedding").text
        assert browser.save_screenshot(str(SCREENSHOT))
    finally:
        demo.close()


def test_the_app_command_answers_help_before_gradio_or_torch_load():
    probe = (
        "import runpy, sys\nsys.argv = ['app', '--help']\ntry:\n    runpy.run_module('app', run_name='__main__')\n"
        "except SystemExit:\n    pass\nprint('HEAVY', sorted(m for m in ('torch', 'gradio') if m in sys.modules))"
    )
    done = run_subprocess([sys.executable, "-c", probe], timeout=60, cwd=REPO_ROOT)
    assert done.returncode == 0, done.stderr
    assert "--model MODEL" in done.stdout and "HEAVY []" in done.stdout
