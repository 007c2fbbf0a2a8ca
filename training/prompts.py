"""Prompt generation: ALive-style captions from dataset and class metadata, and zero-shot prompt templates.

ALive captions are built in two steps (agriclip-method.md §2): a class-aware caption filled from dataset-level
metadata (domain, subject, setting, sensor) and class-level metadata (name, visual description), then diverse
variations. The paper asks GPT-4 for the variations; here template variation is the offline default and any
`Paraphraser` (e.g. `TransformersParaphraser` over a local text-generation model) can add rewrites.
"""

from __future__ import annotations

import json
import random
import re
import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import yaml


def with_article(phrase: str) -> str:
    """Prefixes "a" or "an" by the sound of the first word, for the common English exceptions."""
    word = phrase.split(" ", 1)[0].lower()
    vowel_sound = word[:1] in "aeiou" and not word.startswith(("uni", "use", "usu", "eu", "one", "ewe"))
    vowel_sound = vowel_sound or word.startswith(("hour", "honest", "heir"))
    return ("an " if vowel_sound else "a ") + phrase


# How a class name attaches to the subject: a condition the subject has ("a tomato leaf with early blight") or an
# attribute that qualifies it ("a healthy tomato leaf", "a Jersey cow").
RELATIONS = ("condition", "attribute")

# Caption templates. Slots: name, subject, a_subject, a_np (the class noun phrase with its article), details (visual
# cues), setting, sensor, domain, kind. A template is used only when all its slots are non-empty.
CAPTION_TEMPLATES: dict[str, list[str]] = {
    "shared": [
        "a photo of {a_np}.",
        "a photo of {a_np}, showing {details}.",
        "a close-up photo of {a_np}: {details}.",
        "{a_np} {setting}, with {details}.",
        "a {sensor} image of {a_np}, showing {details}.",
        "a {domain} photo of {a_np}, characterized by {details}.",
        "an image of {a_np}; visible: {details}.",
        "{details}, seen on {a_np}.",
        "a photo of {a_np} {setting}.",
    ],
    "condition": [
        "{a_subject} affected by {name}, with {details}.",
        "a photo of {a_subject} showing symptoms of {name}: {details}.",
    ],
    "attribute": [
        "a photo of {a_subject} of the {name} {kind}, recognisable by {details}.",
        "{a_np}, a {kind} known for {details}.",
    ],
}

_BASE_TEMPLATE = {True: "a photo of {a_np}, showing {details}.", False: "a photo of {a_np}."}


@dataclass
class ClassMetadata:
    """Class-level metadata: the name used in prompts and visual cues (symptoms, markings, coat) of the class."""

    name: str
    description: list[str] = field(default_factory=list)
    relation: str | None = None

    def __post_init__(self):
        if isinstance(self.description, str):
            self.description = [self.description] if self.description.strip() else []
        if self.relation is not None and self.relation not in RELATIONS:
            raise ValueError(f"class {self.name!r}: relation must be one of {RELATIONS}, got {self.relation!r}")


@dataclass
class DatasetMetadata:
    """Dataset-level metadata of one ALive source, plus its classes keyed by the label used in the data.

    The file format (YAML or JSON) has the same fields:

        domain: plant disease            # what the dataset is about
        subject: tomato leaf             # crop, plant part, species group or animal in the photos
        relation: condition              # condition ("a tomato leaf with X") or attribute ("a healthy tomato leaf")
        kind: breed                      # optional: what attribute classes are ("a cow of the Jersey breed")
        setting: in a greenhouse         # optional: where the photos were taken
        sensor: smartphone               # optional: camera or platform
        templates: [...]                 # optional: caption templates replacing the defaults
        classes:
          early_blight:                  # label as in the data (folder name, ClassLabel name, CSV label)
            name: early blight
            description: [concentric brown rings, yellowing around the lesions]
            relation: attribute          # optional: overrides the dataset relation for this class
    """

    domain: str
    subject: str
    relation: str = "condition"
    kind: str = ""
    setting: str = ""
    sensor: str = ""
    templates: list[str] | None = None
    classes: dict[str, ClassMetadata] = field(default_factory=dict)

    def __post_init__(self):
        if self.relation not in RELATIONS:
            raise ValueError(f"relation must be one of {RELATIONS}, got {self.relation!r}")
        if not self.subject.strip():
            raise ValueError("dataset metadata needs a non-empty subject")
        self.classes = {
            str(label): value if isinstance(value, ClassMetadata) else ClassMetadata(**value)
            for label, value in self.classes.items()
        }
        for label, metadata in self.classes.items():
            if not metadata.name.strip():
                raise ValueError(f"class {label!r} has an empty name")

    @classmethod
    def from_dict(cls, data: Mapping, where: str = "metadata") -> DatasetMetadata:
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{where}: unknown field(s) {unknown}; known: {sorted(known)}")
        classes = {}
        for label, value in (data.get("classes") or {}).items():
            value = {"name": value} if isinstance(value, str) else dict(value)
            value.setdefault("name", str(label).replace("_", " "))
            unknown = sorted(set(value) - set(ClassMetadata.__dataclass_fields__))
            if unknown:
                raise ValueError(f"{where}: class {label!r} has unknown field(s) {unknown}")
            classes[str(label)] = value
        try:
            return cls(**{**data, "classes": classes})
        except (TypeError, ValueError) as error:
            raise ValueError(f"{where}: {error}") from error

    @classmethod
    def from_file(cls, path: str | Path) -> DatasetMetadata:
        path = Path(path)
        text = path.read_text(encoding="utf-8")
        data = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
        if not isinstance(data, Mapping):
            raise ValueError(f"{path}: expected a mapping of metadata fields")
        return cls.from_dict(data, where=str(path))

    def to_dict(self) -> dict:
        data = {name: getattr(self, name) for name in ("domain", "subject", "relation", "kind", "setting", "sensor")}
        if self.templates is not None:
            data["templates"] = list(self.templates)
        data["classes"] = {
            label: {"name": meta.name, "description": list(meta.description)}
            | ({"relation": meta.relation} if meta.relation else {})
            for label, meta in self.classes.items()
        }
        return data

    def class_metadata(self, label: str) -> ClassMetadata:
        """The metadata of a class; a class the file does not list gets its label as name ("_" -> " ")."""
        return self.classes.get(str(label)) or ClassMetadata(name=str(label).replace("_", " "))


class Paraphraser(Protocol):
    """Rewrites a caption into `n` variants that keep its visual details; seeded by `rng`."""

    def __call__(self, caption: str, n: int, rng: random.Random) -> list[str]: ...


def _join(cues: Sequence[str]) -> str:
    return cues[0] if len(cues) == 1 else ", ".join(cues[:-1]) + " and " + cues[-1]


def _slots(template: str) -> set[str]:
    return {name for _, name, _, _ in string.Formatter().parse(template) if name}


class CaptionGenerator:
    """Turns dataset and class metadata into caption variants.

    Without a paraphraser, variants are distinct (template, subset of visual cues) combinations. With one, the
    variants are the canonical class-aware caption plus its paraphrases, topped up from the templates when the
    paraphraser returns fewer usable ones. Everything is drawn from the `rng` passed in, so a seed fixes the output.
    """

    def __init__(self, metadata: DatasetMetadata, paraphraser: Paraphraser | None = None):
        self.metadata = metadata
        self.paraphraser = paraphraser

    def _slot_values(self, label: str, cues: Sequence[str]) -> tuple[dict[str, str], str]:
        meta = self.metadata
        cls = meta.class_metadata(label)
        relation = cls.relation or meta.relation
        subject = meta.subject
        if relation == "condition":
            noun_phrase = f"{subject} with {cls.name}"
        elif subject.split()[-1].lower() in cls.name.lower():
            noun_phrase = cls.name  # "clownfish", not "clownfish fish"
        else:
            noun_phrase = f"{cls.name} {subject}"
        values = {
            "name": cls.name,
            "subject": subject,
            "a_subject": with_article(subject),
            "a_np": with_article(noun_phrase),
            "details": _join(cues) if cues else "",
            "setting": meta.setting,
            "sensor": meta.sensor,
            "domain": meta.domain,
            "kind": meta.kind,
        }
        return values, relation

    def _templates(self, relation: str) -> list[str]:
        if self.metadata.templates is not None:
            return list(self.metadata.templates)
        return CAPTION_TEMPLATES["shared"] + CAPTION_TEMPLATES[relation]

    def _render(self, template: str, values: Mapping[str, str], label: str) -> str:
        caption = re.sub(r"\s+", " ", template.format(**values)).strip()
        if not caption:
            raise ValueError(f"template {template!r} gives an empty caption for class {label!r}")
        return caption

    def base_caption(self, label: str) -> str:
        """The canonical class-aware caption: the class in its subject, with every visual cue."""
        cues = self.metadata.class_metadata(label).description
        values, _ = self._slot_values(label, cues)
        return self._render(_BASE_TEMPLATE[bool(cues)], values, label)

    def template_captions(self, label: str, n: int, rng: random.Random) -> list[str]:
        """`n` template variants, distinct while distinct combinations remain."""
        cues = list(self.metadata.class_metadata(label).description)
        _, relation = self._slot_values(label, cues)
        templates = self._templates(relation)
        captions: list[str] = []
        for _ in range(20 * n):
            if len(captions) == n:
                break
            chosen = rng.sample(cues, rng.randint(1, len(cues))) if cues else []
            values, _ = self._slot_values(label, chosen)
            usable = [t for t in templates if all(values.get(slot) for slot in _slots(t))]
            # Captions name the visual cues whenever the class has some: they carry the fine-grained signal.
            usable = [t for t in usable if "details" in _slots(t)] or usable
            if not usable:
                raise ValueError(f"no caption template has all its slots filled for class {label!r}")
            caption = self._render(rng.choice(usable), values, label)
            if caption not in captions:
                captions.append(caption)
        distinct = len(captions)
        while len(captions) < n:
            captions.append(captions[len(captions) % distinct])
        return captions

    def captions(self, label: str, n: int, rng: random.Random) -> list[str]:
        """`n` caption variants for one class."""
        if self.paraphraser is None:
            return self.template_captions(label, n, rng)
        base = self.base_caption(label)
        rewrites = [" ".join(text.split()) for text in self.paraphraser(base, n - 1, rng)]
        captions = [base] + [text for text in dict.fromkeys(rewrites) if text and text != base]
        if len(captions) < n:
            captions += self.template_captions(label, n - len(captions), rng)
        return captions[:n]


class TransformersParaphraser:
    """A `Paraphraser` over a local transformers causal language model (e.g. an instruction-tuned LLM).

    The model is asked to continue `prompt` (which holds `{caption}`) and the first line of each sampled
    continuation is one paraphrase. Sampling is seeded from the caller's `rng` without touching torch's global RNG.
    """

    DEFAULT_PROMPT = (
        "Rewrite the image caption in different words, keeping every visual detail.\nCaption: {caption}\nRewrite:"
    )

    def __init__(
        self,
        model_path: str | Path,
        prompt: str = DEFAULT_PROMPT,
        max_new_tokens: int = 48,
        temperature: float = 0.9,
        device: str = "cpu",
    ):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        # Never the folder's own code: transformers would otherwise ask on stdin whether to run it.
        local = {"local_files_only": True, "trust_remote_code": False}
        self.tokenizer = AutoTokenizer.from_pretrained(model_path, **local)
        self.model = AutoModelForCausalLM.from_pretrained(model_path, **local).to(device).eval()
        self.prompt = prompt
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.device = device

    def __call__(self, caption: str, n: int, rng: random.Random) -> list[str]:
        import torch

        if n <= 0:
            return []
        inputs = self.tokenizer(self.prompt.format(caption=caption), return_tensors="pt").to(self.device)
        pad_token_id = self.tokenizer.pad_token_id
        if pad_token_id is None:
            pad_token_id = self.tokenizer.eos_token_id
        with torch.random.fork_rng(), torch.no_grad():
            torch.manual_seed(rng.randrange(2**31))
            output = self.model.generate(
                **inputs,
                do_sample=True,
                temperature=self.temperature,
                max_new_tokens=self.max_new_tokens,
                num_return_sequences=n,
                pad_token_id=pad_token_id,
            )
        new_tokens = output[:, inputs["input_ids"].shape[1] :]
        texts = self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
        return [text.strip().split("\n", 1)[0].strip() for text in texts]
