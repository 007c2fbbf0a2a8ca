"""The AgriCLIP demo page: zero-shot classification of an uploaded photo in Gradio.

`build_demo(model, presets)` returns the `gr.Blocks` that `python -m app` launches and a Hub Space's `app.py` runs.
The page takes a photo, labels (typed, or a preset: the classes of a suite dataset with its templates) and prompt
templates, and shows the top-k scores as bars, the image embedding the model compares with the text, a heat map of
where the model looked (`modeling_agriclip.explain`), example photos, and the evaluation section of the model card.

A photo is classified by `modeling_agriclip.commands.classify_files`, the implementation of `agriclip predict`, from
the uploaded file itself (Gradio hands over the file as uploaded), so the page and the command give the same scores.
This module imports only the inference layers (`agriclip`, `modeling_agriclip`) and Gradio: a Space vendors it with
those two packages.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import gradio as gr
from huggingface_hub import hf_hub_download
from huggingface_hub.constants import REPOCARD_NAME
from huggingface_hub.errors import EntryNotFoundError

from agriclip.cli import parse_labels
from agriclip.errors import CLIError, SingleLabelWarning
from agriclip.images import ImageDecodeError, open_image
from agriclip.templates import DEFAULT_TEMPLATES, check_templates
from modeling_agriclip.commands import classify_files, embedding_name, load_classifier, resolve_device
from modeling_agriclip.explain import MAP_DESCRIPTIONS, explain, overlay, processed_view
from modeling_agriclip.zero_shot import ZeroShotClassifier


TYPED_LABELS = "Typed labels"
MAX_TOP_K = 10


@dataclass
class Preset:
    """A label set offered on the page: its classes' prompt names, templates and example photos."""

    name: str
    labels: list[str]
    templates: list[str]
    examples: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def card_evaluation(model: str) -> str | None:
    """The "## Evaluation" section of the model card (README.md of the folder or Hub repo), None without one."""
    folder = Path(model)
    try:
        path = folder / REPOCARD_NAME if folder.is_dir() else Path(hf_hub_download(model, REPOCARD_NAME))
        text = path.read_text(encoding="utf-8")
    except (FileNotFoundError, EntryNotFoundError):
        return None
    match = re.search(r"^## Evaluation\s*$(.*?)(?=^## |\Z)", text, flags=re.MULTILINE | re.DOTALL)
    return None if match is None else match.group(1).strip()


def describe_embedding(classifier: ZeroShotClassifier) -> str:
    """What the image side of the comparison is, in words: a page visitor cannot read config.json."""
    embedding = embedding_name(classifier)
    if embedding is None:
        return "Image embedding: the CLIP image tower (a plain CLIP model)."
    words = {
        "aligned": "the stage-2 backbone through the linear aligner (the paper's AgriCLIP)",
        "clip": "the CLIP image tower (stage 1)",
        "fused": "the fusion of the CLIP image tower and the aligned backbone",
    }[embedding]
    weight = classifier.fusion_weight if classifier.fusion_weight is not None else classifier.model.config.fusion_weight
    suffix = f", CLIP weight {weight:g}" if embedding == "fused" else ""
    return f"Image embedding: `{embedding}`: {words}{suffix}."


def parse_templates(text: str) -> list[str]:
    """The templates of the page's box, one per line; `DEFAULT_TEMPLATES` when empty."""
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    return check_templates(lines or DEFAULT_TEMPLATES)


class DemoModel:
    """The classifier behind the page, loaded once; its methods are the page's event handlers."""

    def __init__(self, model: str, device: str | None = None):
        self.model = model
        self.classifier = load_classifier(model, resolve_device(device), batch_size=1)

    def classify(self, photo: str | None, labels: str, templates: str, top_k: float, show_map: bool):
        """(label -> score of the top k, heat maps with captions): errors become messages on the page."""
        if photo is None:
            raise gr.Error("Upload a photo first.")
        try:
            class_names = parse_labels(labels, None)
            prompt_templates = parse_templates(templates)
        except (CLIError, ValueError) as error:
            raise gr.Error(str(error)) from error
        if len(class_names) == 1:
            gr.Warning(f"A single label ({class_names[0]!r}) always scores 1.0: give the alternatives too.")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", SingleLabelWarning)  # said on the page above
            result = classify_files(
                self.classifier, [photo], class_names, prompt_templates, top_k=int(top_k), batch_size=1, num_workers=0
            )
        if not result.predictions:
            raise gr.Error(f"Cannot read the photo ({', '.join(result.stats.skipped)}).")
        scores = {prediction["label"]: prediction["score"] for prediction in result.predictions[0]}
        maps = self.heat_maps(photo, class_names, prompt_templates) if show_map else []
        return scores, maps

    def heat_maps(self, photo: str, class_names: Sequence[str], templates: Sequence[str]) -> list[tuple]:
        """Overlays of every map `explain` makes for the predicted label, captioned with what each map is."""
        try:
            image = open_image(photo)
        except ImageDecodeError as error:
            raise gr.Error(str(error)) from error
        pixel_values = self.classifier.pixel_values([image])
        explanation = explain(self.classifier, pixel_values, class_names, templates)
        view = processed_view(pixel_values, self.classifier.processor.image_processor)[0]
        label = class_names[int(explanation.targets[0])]
        return [
            (overlay(view, heat[0].numpy()), f"{name} for {label!r}: {MAP_DESCRIPTIONS[name]}")
            for name, heat in explanation.maps.items()
        ]


def _preset_values(presets: dict[str, Preset], name: str):
    """The labels and templates boxes for a chosen preset; a typed label set leaves them to the user."""
    if name not in presets:
        return gr.update(), gr.update()
    preset = presets[name]
    return ", ".join(preset.labels), "\n".join(preset.templates)


def build_demo(model: str, presets: Sequence[Preset] = (), device: str | None = None) -> gr.Blocks:
    """The page for `model` (an AgriCLIP or CLIP folder, or a Hub id), offering `presets`."""
    demo_model = DemoModel(model, device)
    by_name = {preset.name: preset for preset in presets}
    first = presets[0] if presets else None
    evaluation = card_evaluation(model)
    with gr.Blocks(title="AgriCLIP zero-shot classification") as demo:
        gr.Markdown(
            f"# AgriCLIP zero-shot classification\n\nModel: `{model}`. Scores are softmax probabilities over the "
            "labels given: they compare those labels only, so give the alternatives too."
        )
        with gr.Row():
            with gr.Column():
                photo = gr.Image(type="filepath", label="Photo", elem_id="photo")
                preset = gr.Dropdown(
                    choices=[*by_name, TYPED_LABELS],
                    value=first.name if first else TYPED_LABELS,
                    label="Label preset",
                    elem_id="preset",
                )
                labels = gr.Textbox(
                    value=", ".join(first.labels) if first else "",
                    label="Labels (comma-separated)",
                    placeholder="healthy leaf, leaf rust, early blight",
                    elem_id="labels",
                )
                templates = gr.Textbox(
                    value="\n".join(first.templates if first else DEFAULT_TEMPLATES),
                    label="Prompt templates ({} is the label; one per line: a prompt ensemble)",
                    lines=2,
                    elem_id="templates",
                )
                top_k = gr.Slider(1, MAX_TOP_K, value=5, step=1, label="Top k", elem_id="top-k")
                show_map = gr.Checkbox(value=False, label="Show where the model looked (heat map)", elem_id="explain")
                button = gr.Button("Classify", variant="primary", elem_id="classify")
            with gr.Column():
                scores = gr.Label(label="Top labels", elem_id="scores")
                gr.Markdown(describe_embedding(demo_model.classifier), elem_id="embedding")
                maps = gr.Gallery(
                    label="Heat map over the processed view",
                    columns=2,
                    height=360,
                    object_fit="contain",
                    elem_id="maps",
                )
        examples = [[path, preset.name] for preset in presets for path in preset.examples]
        if examples:
            gr.Examples(
                examples, inputs=[photo, preset], label="Example photos (with their preset)", examples_per_page=6
            )
        if evaluation:
            with gr.Accordion("Evaluation (from the model card)", open=False):
                gr.Markdown(evaluation, elem_id="card-evaluation")
        preset.change(lambda name: _preset_values(by_name, name), inputs=preset, outputs=[labels, templates])
        button.click(demo_model.classify, inputs=[photo, labels, templates, top_k, show_map], outputs=[scores, maps])
    return demo


__all__ = ["DemoModel", "Preset", "build_demo", "card_evaluation", "describe_embedding", "parse_templates"]
