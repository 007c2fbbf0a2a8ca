"""Two-level label files: groups (a crop, a species) and the labels within each (its conditions, its breeds).

Practitioners think in crops first and conditions second; a two-level prediction names the group first, then the
label within it (`modeling_agriclip.hierarchy`). The file is YAML::

    levels: [crop, condition]            # optional: the names of the two levels (default: group, label)
    templates:                           # optional: templates per level, a list or a registered set's name
                                         # (default: the command's templates)
      crop: ["a photo of a {} plant.", "a photo of {} leaves."]
      condition: ["a photo of {}."]
    groups:                              # group -> its labels; every label in exactly one group
      grape: [grape leaf with rust, grape leaf with blight]
      maize: [maize leaf with rust, maize leaf with mosaic virus]

A group's name is put into the group templates, a label's into the label templates. The flat label list is the labels
of every group in file order. Pure Python (PyYAML, imported on use): `agriclip predict` reads it before loading a
model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .templates import get_templates


DEFAULT_LEVELS = ("group", "label")
HIERARCHY_SUFFIXES = (".yaml", ".yml")


@dataclass(frozen=True)
class LabelHierarchy:
    """Groups and their labels, with optional templates per level (None: the caller's templates).

    Attributes:
        groups: group name -> its label names, in file order.
        levels: the names of the two levels, e.g. ("crop", "condition").
        group_templates, label_templates: the templates of each level, or None.
    """

    groups: dict[str, list[str]]
    levels: tuple[str, str] = DEFAULT_LEVELS
    group_templates: list[str] | None = None
    label_templates: list[str] | None = None

    @property
    def labels(self) -> list[str]:
        """Every label, group by group: the flat label list."""
        return [label for labels in self.groups.values() for label in labels]

    @property
    def group_names(self) -> list[str]:
        return list(self.groups)

    def group_of(self) -> list[int]:
        """The index of each flat label's group."""
        return [index for index, labels in enumerate(self.groups.values()) for _ in labels]


def _fail(path, message: str):
    raise ValueError(f"{path}: {message}")


def _names(path, field: str, value) -> list[str]:
    if not isinstance(value, list) or not value or not all(isinstance(item, str) and item.strip() for item in value):
        _fail(path, f"{field} must be a non-empty list of names; got {value!r}")
    return [item.strip() for item in value]


def parse_hierarchy(raw, path) -> LabelHierarchy:
    """A `LabelHierarchy` from the parsed YAML of `path`; every error names the file and the field."""
    if not isinstance(raw, dict) or not isinstance(raw.get("groups"), dict) or not raw["groups"]:
        _fail(path, "expected a mapping with `groups`: group -> list of labels")
    unknown = sorted(set(raw) - {"levels", "templates", "groups"})
    if unknown:
        _fail(path, f"unknown keys {unknown}; allowed: levels, templates, groups")
    levels = tuple(_names(path, "levels", raw["levels"])) if "levels" in raw else DEFAULT_LEVELS
    if len(levels) != 2 or levels[0] == levels[1]:
        _fail(path, f"levels must name two different levels, e.g. [crop, condition]; got {list(levels)}")
    groups = {str(group).strip(): _names(path, f"groups.{group}", labels) for group, labels in raw["groups"].items()}
    labels = [label for names in groups.values() for label in names]
    repeated = sorted({label for label in labels if labels.count(label) > 1})
    if repeated:
        _fail(path, f"labels must each be in one group; repeated: {repeated}")
    templates = raw.get("templates") or {}
    if not isinstance(templates, dict) or not set(templates) <= set(levels):
        _fail(path, f"templates must map the levels {list(levels)} to lists of templates; got {templates!r}")
    checked = {}
    for level, level_templates in templates.items():
        if not isinstance(level_templates, (str, list)):
            _fail(
                path, f"templates.{level} must be a list of templates or a template set's name; got {level_templates!r}"
            )
        try:
            checked[level] = get_templates(level_templates)
        except (KeyError, ValueError) as error:
            _fail(path, f"templates.{level}: {error}")
    return LabelHierarchy(groups, levels, checked.get(levels[0]), checked.get(levels[1]))


def load_hierarchy(path) -> LabelHierarchy:
    """Reads a two-level label file (module docstring).

    Raises:
        ValueError: for a file that is not YAML or not a label hierarchy, naming the file and the field.
        OSError: for a file that cannot be read.
    """
    import yaml

    try:
        raw = yaml.safe_load(Path(path).read_text(encoding="utf-8-sig"))
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: not a YAML label file ({error})") from error
    return parse_hierarchy(raw, path)


def is_hierarchy_file(path) -> bool:
    """Whether a `--labels-file` is a two-level YAML label file (by its suffix) rather than one label a line."""
    return Path(path).suffix.lower() in HIERARCHY_SUFFIXES
