"""Zero-shot template sets and the template rule (agriclip.templates)."""

import re

import pytest

from agriclip.cli import build_parser
from agriclip.templates import OFFICIAL_FALLBACK_TEMPLATE, OFFICIAL_SPELLINGS, ZERO_SHOT_TEMPLATES, get_templates


def test_official_templates_are_kept_verbatim():
    assert ZERO_SHOT_TEMPLATES["Banana Deficiency"] == ["a photo contain {} deficiency"]
    assert ZERO_SHOT_TEMPLATES["CID"] == ["Image of cattle named {}"]
    assert ZERO_SHOT_TEMPLATES["DeepFish"] == ["a photo contain {} type under acquarium"]
    assert ZERO_SHOT_TEMPLATES["Aquarium Fish"] == ["a fish type of {} specie"]
    assert ZERO_SHOT_TEMPLATES["FishNet"] == ZERO_SHOT_TEMPLATES["default"] == [OFFICIAL_FALLBACK_TEMPLATE]
    assert OFFICIAL_FALLBACK_TEMPLATE == "a photo of {}"
    for name in ("leaf", "fish", "livestock", "generic"):
        assert len(ZERO_SHOT_TEMPLATES[name]) > 1
    assert all("{}" in t for templates in ZERO_SHOT_TEMPLATES.values() for t in templates)


def test_get_templates():
    assert get_templates("Cow Breed") == ["a photo contain {} cow"]
    templates = get_templates("fish")
    templates.append("mutated")
    assert "mutated" not in ZERO_SHOT_TEMPLATES["fish"]
    assert get_templates(["a photo of {}.", "a {} leaf"]) == ["a photo of {}.", "a {} leaf"]
    with pytest.raises(KeyError, match="Banana Deficiency"):  # the message lists the known names
        get_templates("Bananas")
    with pytest.raises(ValueError, match="placeholder"):
        get_templates(["a photo of a leaf"])
    with pytest.raises(ValueError, match="empty"):
        get_templates([])


@pytest.mark.parametrize("template", ["{} with {}", "{name}", "a {name} with {}", "a {} }", "{0}", "{:>9}"])
def test_get_templates_refuses_what_format_would_not_fill_with_one_name(template):
    with pytest.raises(ValueError, match=f"template {re.escape(repr(template))}"):
        get_templates(["a photo of {}.", template])
    # Literal braces, escaped as str.format wants them, are text.
    assert get_templates(["a {{leaf}} with {}"]) == ["a {{leaf}} with {}"]


def test_registered_templates_pass_the_same_check():
    for name in ZERO_SHOT_TEMPLATES:
        assert get_templates(list(ZERO_SHOT_TEMPLATES[name])) == ZERO_SHOT_TEMPLATES[name]


def test_template_sets_are_listed_spelt_correctly_and_found_by_their_official_spelling(capsys):
    """The official keys' misspellings ("Acquarium", "Fecus") name the released data's folders, so they still find
    their templates; what users are shown (help, the unknown-name error) spells the names correctly."""
    assert get_templates("Acquarium Fish") == get_templates("Aquarium Fish") == ["a fish type of {} specie"]
    assert get_templates("Chicken Fecus") == get_templates("Chicken Feces") == ["a photo contain {}"]
    with pytest.raises(SystemExit):
        build_parser().parse_args(["predict", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    with pytest.raises(KeyError) as unknown:
        get_templates("Bananas")
    for shown in (help_text, str(unknown.value)):
        assert "Aquarium Fish" in shown and "Chicken Feces" in shown
        assert not any(official in shown for official in OFFICIAL_SPELLINGS)
