"""Zero-shot prompt templates: the registry of template sets and the rule every template follows.

A template is a `str.format` string with exactly one `{}`, filled with a class name ("a photo of a leaf with {}.");
several templates of one class form a prompt ensemble. `ZERO_SHOT_TEMPLATES` holds the official per-dataset
templates of AgriCLIP and domain ensembles. Pure Python: the command line checks templates with it before it loads
anything heavy, and every layer may import it.
"""

from __future__ import annotations

import string
from collections.abc import Sequence


DEFAULT_TEMPLATES = ("a photo of {}.",)


def check_template(template) -> str:
    """Returns `template` if it is a prompt template: a string with exactly one `{}` (the class name) and no other
    format field. Literal braces are written `{{` and `}}`, as in `str.format`.

    Raises:
        ValueError: saying what is wrong, e.g. for "a photo", "{} with {}", "{name}" or "a {} }".
    """
    if not isinstance(template, str):
        raise ValueError(f"template {template!r} is not a string; give text with '{{}}' for the class name")
    try:
        fields = [
            (name, spec, conversion)
            for _, name, spec, conversion in string.Formatter().parse(template)
            if name is not None
        ]
    except ValueError as error:
        raise ValueError(
            f"template {template!r} is not a format string ({error}); write '{{{{' and '}}}}' for literal braces"
        ) from None
    if not fields:
        raise ValueError(f"template {template!r} has no '{{}}' placeholder for the class name")
    others = [
        ("{" + name + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "") + "}")
        for name, spec, conversion in fields
        if (name, spec, conversion) != ("", "", None)
    ]
    if others:
        raise ValueError(
            f"template {template!r} has the format field(s) {', '.join(others)}; the only field allowed is one '{{}}' "
            "for the class name (write '{{' and '}}' for literal braces)"
        )
    if len(fields) > 1:
        raise ValueError(
            f"template {template!r} has {len(fields)} '{{}}' placeholders; give exactly one, for the class name"
        )
    return template


def check_templates(templates: Sequence[str]) -> list[str]:
    """`check_template` on each of a non-empty list of templates; returns them as a list."""
    templates = list(templates)
    if not templates:
        raise ValueError("empty template list; give at least one template with '{}' for the class name")
    return [check_template(template) for template in templates]


def fill_templates(class_names: Sequence[str], templates: Sequence[str]) -> list[str]:
    """All prompts, class-major: the templates of class 0, then those of class 1, ..."""
    for template in templates:
        check_template(template)
    return [template.format(name) for name in class_names for template in templates]


# The fallback of the official code (`AgriCLIP_alignment/AgriClip_zeroshot.py`) for datasets without a prompt.
OFFICIAL_FALLBACK_TEMPLATE = "a photo of {}"

# Per-dataset zero-shot templates. The official ones are `prompts_dict` of `AgriCLIP_alignment/util.py`, their text
# kept verbatim (it changes the scores) and their keys spelled correctly (the official misspellings are aliases, see
# `OFFICIAL_SPELLINGS`); FishNet and Soybean Weeds have no official prompt and get the official fallback. The generic
# ensembles are in the style of CLIP's ImageNet ensemble.
ZERO_SHOT_TEMPLATES: dict[str, list[str]] = {
    "Aquarium Fish": ["a fish type of {} specie"],
    "Animal-2": ["a photo with {}"],
    "Banana Deficiency": ["a photo contain {} deficiency"],
    "Bean Lesion": ["a photo contain {} leaf type"],
    "Chicken Feces": ["a photo contain {}"],
    "CID": ["Image of cattle named {}"],
    "Citrus Fruits": ["a photo of fruit contain {}"],
    "Citrus Leaves": ["a photo contain {} symptoms"],
    "Cow Breed": ["a photo contain {} cow"],
    "DeepFish": ["a photo contain {} type under acquarium"],
    "Fish Freshness": ["a type of fish named {}"],
    "Fish Species": ["Image contain {} fish type"],
    "FishNet": [OFFICIAL_FALLBACK_TEMPLATE],
    "Fruits Diseases": ["a photo contain {} leaf"],
    "Horse Breed": ["a photo contain {}"],
    "Soybean Weeds": [OFFICIAL_FALLBACK_TEMPLATE],
    "Supermarket Fish": ["a fish type with {}"],
    "default": [OFFICIAL_FALLBACK_TEMPLATE],
    "generic": [
        "a photo of {}.",
        "a photo of a {}.",
        "a close-up photo of {}.",
        "a cropped photo of {}.",
        "a bright photo of {}.",
        "a low resolution photo of {}.",
    ],
    "leaf": [
        "a photo of a leaf with {}.",
        "a close-up photo of a plant leaf showing {}.",
        "a crop leaf affected by {}.",
        "a photo of a plant leaf, {}.",
        "a field photo of a leaf with signs of {}.",
    ],
    "crop": [
        "a photo of {}, a crop.",
        "a photo of a {} plant.",
        "a field photo of {}.",
        "a close-up photo of {} in a farm field.",
    ],
    "fish": [
        "a photo of a {}, a type of fish.",
        "a photo of a {} fish.",
        "a close-up photo of a {}.",
        "an underwater photo of a {}.",
        "a photo of a {} on a plain background.",
    ],
    "livestock": [
        "a photo of a {}, a type of livestock.",
        "a photo of a {} on a farm.",
        "a close-up photo of the coat of a {}.",
        "a photo of a {} standing in a field.",
    ],
}

# The official code's keys where they are misspelt, as the folders of the released downstream data are named: they
# still find their templates, while help and error messages list the correct spellings only.
OFFICIAL_SPELLINGS = {"Acquarium Fish": "Aquarium Fish", "Chicken Fecus": "Chicken Feces"}


def get_templates(name_or_list: str | Sequence[str]) -> list[str]:
    """Returns the templates registered under a name (or its official spelling, `OFFICIAL_SPELLINGS`), or a literal
    list of templates checked by `check_template` (exactly one `{}`, no other format field)."""
    if isinstance(name_or_list, str):
        name = OFFICIAL_SPELLINGS.get(name_or_list, name_or_list)
        if name not in ZERO_SHOT_TEMPLATES:
            raise KeyError(
                f"unknown template set {name_or_list!r}; known: {', '.join(sorted(ZERO_SHOT_TEMPLATES))}, "
                "or pass a list of templates with '{}' for the class name"
            )
        return list(ZERO_SHOT_TEMPLATES[name])
    return check_templates(name_or_list)


__all__ = [
    "DEFAULT_TEMPLATES",
    "OFFICIAL_FALLBACK_TEMPLATE",
    "OFFICIAL_SPELLINGS",
    "ZERO_SHOT_TEMPLATES",
    "check_template",
    "check_templates",
    "fill_templates",
    "get_templates",
]
