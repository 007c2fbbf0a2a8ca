"""The embedded default dataset: procedural agricultural photos with metadata-driven captions, no download.

Three domains are drawn with numpy on a pixel grid, each from a handful of parameters that a class fixes and the
rest randomised per image (pose, size, colour, background, lighting, noise):

- crop leaves: four crops that differ in leaf shape and venation (serrated ovate tomato, strap-like maize with
  parallel veins, palmately lobed grape, heart-shaped bean), under ten conditions (healthy, three spot diseases that
  differ only in spot size and halo colour, rust pustules, blight, mosaic mottling, two chlorosis patterns, pest
  damage);
- fish species: body shape, bands, spots and fin colours;
- cattle breeds: coat colours and patterns.

`build_embedded_dataset` writes "ALive-mini" (one source per crop plus fish and cattle, captions from
`training.prompts.CaptionGenerator` over each source's metadata) and downstream zero-shot tasks drawn from separate
seed streams, including crop-condition pairs that pretraining never shows, plus the `suite.yaml` that the
evaluation suite reads.

    python -m training.embedded --output data/embedded --seed 0
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import random
import shutil
import time
import zlib
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import yaml
from PIL import Image
from tqdm.auto import tqdm

from agriclip.atomic import replace_entries
from agriclip.errors import SCRIPT_EXIT_CODES, run_command

from .prompts import CaptionGenerator, DatasetMetadata


# ---------------------------------------------------------------------------------------------------------------
# Drawing primitives. Images are float32 (H, W, 3) in [0, 1]; coordinates are normalised to [-1, 1].
# ---------------------------------------------------------------------------------------------------------------


@lru_cache(maxsize=4)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates in [-1, 1], x to the right and y up."""
    coords = (np.arange(size, dtype=np.float32) + 0.5) / size * 2 - 1
    return coords[None, :].repeat(size, 0), -coords[:, None].repeat(size, 1)


def _object_frame(size: int, center, angle: float, scale: float, flip: bool = False):
    """Maps the image grid into an object's frame (u along its main axis, v across), in object units."""
    x, y = _grid(size)
    # Python floats keep the float32 grid float32 (numpy float64 scalars would promote every later array).
    cos, sin, scale = float(np.cos(angle)), float(np.sin(angle)), float(scale)
    dx, dy = x - float(center[0]), y - float(center[1])
    u = (cos * dx + sin * dy) / scale
    v = (-sin * dx + cos * dy) / scale
    return (-u if flip else u), v


def _coverage(inside: np.ndarray, pixel: float) -> np.ndarray:
    """Anti-aliased coverage from a signed inside-distance (positive inside), `pixel` = one pixel in those units."""
    return np.clip(inside / pixel + 0.5, 0.0, 1.0)


def _blend(image: np.ndarray, color, alpha: np.ndarray) -> np.ndarray:
    """`color` (an RGB triple or an image) over `image` with coverage `alpha` (H, W)."""
    alpha = np.asarray(alpha, dtype=np.float32)[..., None]
    return image + (np.asarray(color, dtype=np.float32) - image) * alpha


def _noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Smooth value noise in [0, 1]: a random `cells` x `cells` grid upsampled bicubically."""
    grid = Image.fromarray((rng.random((cells, cells)) * 255).astype(np.uint8))
    return np.asarray(grid.resize((size, size), Image.Resampling.BICUBIC), dtype=np.float32) / 255.0


def _jitter(rng: np.random.Generator, color, amount: float = 0.06) -> np.ndarray:
    return np.clip(np.asarray(color, dtype=np.float32) + rng.normal(0, amount, 3), 0, 1).astype(np.float32)


def _spot_field(size: int, centers: np.ndarray, radii: np.ndarray, reach: float = 2.0) -> np.ndarray:
    """min_i |p - c_i| / r_i over the grid: < 1 inside a spot, 1..1+h in a halo of relative width h.

    Each spot only updates the window where its value can be below `reach`; elsewhere the field is `reach`.
    """
    x, y = _grid(size)
    field = np.full((size, size), reach, dtype=np.float32)
    to_pixel = size / 2
    for (cx, cy), radius in zip(centers, radii):
        extent = reach * radius * to_pixel + 1
        col, row = (cx + 1) * to_pixel, (1 - cy) * to_pixel
        rows = slice(max(int(row - extent), 0), min(int(row + extent) + 1, size))
        cols = slice(max(int(col - extent), 0), min(int(col + extent) + 1, size))
        local = np.hypot(x[rows, cols] - cx, y[rows, cols] - cy) / radius
        np.minimum(field[rows, cols], local, out=field[rows, cols])
    return field


def _sample_points(rng: np.random.Generator, score: np.ndarray, threshold: float, count: int) -> np.ndarray:
    """`count` random pixel centres (in normalised coordinates) where `score` exceeds `threshold`, or at its
    maximum when no pixel does (a thin shape at a small image size)."""
    x, y = _grid(score.shape[0])
    mask = score > threshold
    candidates = np.flatnonzero(mask if mask.any() else score >= score.max())
    chosen = rng.choice(candidates, size=count, replace=len(candidates) < count)
    return np.stack([x.ravel()[chosen], y.ravel()[chosen]], axis=1)


@lru_cache(maxsize=4)
def _sensor_noise(size: int) -> np.ndarray:
    """A fixed field of Gaussian pixel noise twice the image size; each image takes a random window of it, which
    costs a slice instead of fresh normal samples per pixel."""
    return 0.012 * np.random.default_rng(0).standard_normal((2 * size, 2 * size, 3), dtype=np.float32)


def _finish(rng: np.random.Generator, image: np.ndarray) -> np.ndarray:
    """Camera effects: exposure, a directional light gradient and sensor noise; returns uint8."""
    x, y = _grid(image.shape[0])
    direction = rng.normal(0, 1, 2)
    light = 1 + 0.12 * (direction[0] * x + direction[1] * y) / np.hypot(*direction)
    image = image * rng.uniform(0.85, 1.12) * light[..., None]
    row, col = rng.integers(0, image.shape[0], 2)
    image = image + _sensor_noise(image.shape[0])[row : row + image.shape[0], col : col + image.shape[1]]
    return (np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8)


def _plain_background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A lab bench or photo tray: light, near-neutral, with a soft vignette."""
    x, y = _grid(size)
    base = _jitter(rng, rng.uniform(0.72, 0.92) * np.ones(3), 0.03)
    vignette = 1 - 0.12 * (x**2 + y**2)
    return base * vignette[..., None]


def _soil_background(rng: np.random.Generator, size: int) -> np.ndarray:
    texture = 0.6 * _noise(rng, size, 12) + 0.4 * rng.random((size, size), dtype=np.float32)
    dark, light = _jitter(rng, (0.24, 0.17, 0.1), 0.03), _jitter(rng, (0.46, 0.34, 0.22), 0.03)
    return dark + (light - dark) * texture[..., None]


# ---------------------------------------------------------------------------------------------------------------
# Leaves
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Crop:
    """A crop's leaf: outline, venation, green, and its size in the frame."""

    name: str
    shape: str  # ovate | strap | palmate | cordate
    venation: str  # pinnate | parallel | palmate
    green: tuple[float, float, float]
    scale: float
    serration: float


CROPS = {
    "tomato": Crop("tomato", "ovate", "pinnate", (0.2, 0.44, 0.14), 0.8, 0.07),
    "maize": Crop("maize", "strap", "parallel", (0.36, 0.56, 0.18), 0.95, 0.0),
    "grape": Crop("grape", "palmate", "palmate", (0.18, 0.4, 0.2), 0.82, 0.03),
    "bean": Crop("bean", "cordate", "pinnate", (0.27, 0.5, 0.17), 0.8, 0.0),
}

_PALMATE_ANGLES = np.deg2rad(np.array([0.0, 72.0, -72.0, 144.0, -144.0])).astype(np.float32)


def _leaf_geometry(crop: Crop, u: np.ndarray, v: np.ndarray, phase: float):
    """Signed inside-distance of the outline, distance to the nearest vein, and the position from base (0) to tip
    (1), all in leaf units."""
    if crop.shape == "palmate":
        radius, angle = np.hypot(u, v), np.arctan2(v, u)
        outline = 0.78 * (0.8 + 0.2 * np.cos(5 * angle)) * (1 + crop.serration * np.sin(40 * angle + phase))
        inside = outline - radius
        offsets = (angle[..., None] - _PALMATE_ANGLES + np.pi) % (2 * np.pi) - np.pi
        vein_distance = np.abs(offsets).min(axis=-1) * radius
        return inside, vein_distance, radius / 0.78
    along = np.clip(u, -1, 1)
    if crop.shape == "ovate":
        half_width = 0.44 * (1 - along**2) ** 0.6 * (1 - 0.25 * along)
    elif crop.shape == "strap":
        half_width = 0.17 * (1 - along**2) ** 0.35 * (1 - 0.25 * along)
    else:  # cordate: broad near the base, pointed tip
        half_width = 0.45 * (1 - along) ** 1.1 * (1 + along) ** 0.5 / 1.12
    half_width = half_width * (1 + crop.serration * np.sin(34 * u + phase))
    inside = np.minimum(half_width - np.abs(v), 1 - np.abs(u))
    if crop.venation == "parallel":
        lanes = np.abs(v) / np.maximum(half_width, 1e-3) * 4
        vein_distance = np.minimum(np.abs(lanes - np.round(lanes)) * half_width / 4, np.abs(v))
    else:
        ribs = (u - 0.9 * np.abs(v)) * 5 + phase
        vein_distance = np.minimum(np.abs(ribs - np.round(ribs)) / 5 * 0.7, np.abs(v))
    return inside, vein_distance, (u + 1) / 2


@dataclass(frozen=True)
class Condition:
    """A leaf condition: its prompt name, the visual cues captions name, and how it is drawn."""

    name: str
    description: tuple[str, ...]
    relation: str = "condition"


CONDITIONS = {
    "healthy": Condition("healthy", ("a uniform green surface", "intact margins", "no lesions"), "attribute"),
    "leaf_spot": Condition(
        "leaf spot", ("a few large round brown spots", "bright yellow halos around each spot", "dark spot rims")
    ),
    "bacterial_spot": Condition(
        "bacterial spot", ("many tiny black specks", "yellow halos around the specks", "specks scattered densely")
    ),
    "frogeye_spot": Condition(
        "frogeye leaf spot", ("a few large round pale tan spots", "purple-red margins around each spot")
    ),
    "rust": Condition("rust", ("dense tiny orange pustules", "a powdery orange texture", "no halos")),
    "blight": Condition(
        "blight",
        (
            "large irregular dark brown dead patches",
            "necrosis spreading from the leaf tip",
            "a yellow border around the dead tissue",
        ),
    ),
    "mosaic": Condition("mosaic virus", ("light and dark green mottling", "irregular yellow-green patches")),
    "nitrogen_deficiency": Condition(
        "nitrogen deficiency", ("uniform pale yellow-green colour", "yellowing strongest toward the tip", "pale veins")
    ),
    "iron_deficiency": Condition(
        "iron deficiency",
        ("interveinal chlorosis", "yellow tissue between green veins", "a sharp green vein network"),
    ),
    "pest_damage": Condition(
        "pest damage", ("irregular holes chewed through the leaf", "ragged bitten margins", "brown edges around holes")
    ),
}

# Crop-condition pairs that no pretraining caption shows; the `crop-condition` task asks for them zero-shot, next
# to seen pairs that share their crop or their condition.
HELD_OUT_PAIRS = (("grape", "rust"), ("maize", "mosaic"), ("bean", "blight"), ("tomato", "frogeye_spot"))
SEEN_CONTROL_PAIRS = (("grape", "blight"), ("maize", "rust"), ("bean", "frogeye_spot"), ("tomato", "mosaic"))

# Spot diseases: (count range, radius range in leaf units, relative halo width, core, rim, halo colours).
_SPOTS = {
    "leaf_spot": ((5, 9), (0.1, 0.13), 0.55, (0.47, 0.32, 0.15), (0.26, 0.15, 0.07), (0.9, 0.83, 0.18)),
    "bacterial_spot": ((22, 34), (0.035, 0.05), 0.9, (0.1, 0.08, 0.05), (0.1, 0.08, 0.05), (0.9, 0.83, 0.18)),
    "frogeye_spot": ((5, 9), (0.1, 0.13), 0.45, (0.66, 0.58, 0.46), (0.5, 0.4, 0.3), (0.46, 0.1, 0.24)),
    "rust": ((70, 110), (0.028, 0.04), 0.0, (0.86, 0.45, 0.08), (0.7, 0.32, 0.05), (0.0, 0.0, 0.0)),
}


# Conditions drawn as localised lesions, whose pixels `render_leaf_with_lesions` returns: spots (core and rim, not the
# halo), rust pustules, blight's dead patches, and pest damage's holes, bites and their brown edges. The others are
# spread over the whole leaf (mosaic mottling, chlorosis) or absent (healthy).
LESION_CONDITIONS = ("leaf_spot", "bacterial_spot", "frogeye_spot", "rust", "blight", "pest_damage")


def render_leaf(crop_key: str, condition_key: str, rng: np.random.Generator, size: int) -> np.ndarray:
    """One leaf of `crop_key` with `condition_key` on a lab or soil background; uint8 (size, size, 3)."""
    return render_leaf_with_lesions(crop_key, condition_key, rng, size)[0]


def render_leaf_with_lesions(
    crop_key: str, condition_key: str, rng: np.random.Generator, size: int
) -> tuple[np.ndarray, np.ndarray]:
    """`render_leaf` (the same image from the same `rng` state) and the boolean (size, size) mask of the pixels
    where it drew a lesion of a `LESION_CONDITIONS` condition (all False for the others)."""
    crop = CROPS[crop_key]
    scale = crop.scale * rng.uniform(0.88, 1.05)
    center = rng.uniform(-0.08, 0.08, 2)
    u, v = _object_frame(size, center, rng.uniform(-np.pi, np.pi), scale, flip=bool(rng.integers(2)))
    inside, vein_distance, toward_tip = _leaf_geometry(crop, u, v, rng.uniform(0, 2 * np.pi))
    pixel = 2 / size / scale
    alpha = _coverage(inside, pixel)
    green = _jitter(rng, crop.green, 0.03)
    leaf = np.broadcast_to(green, (size, size, 3)).copy()
    leaf *= (0.88 + 0.12 * np.clip(inside / 0.2, 0, 1))[..., None]
    vein_width = 0.012 * (3.0 if condition_key == "iron_deficiency" else 1.0)
    veins = _coverage(vein_width - vein_distance, pixel) * (inside > 0.02)
    vein_color = np.clip(green * 1.35 + 0.04, 0, 1)

    if condition_key == "nitrogen_deficiency":
        yellowing = 0.45 + 0.4 * np.clip(toward_tip, 0, 1)
        leaf = _blend(leaf, _jitter(rng, (0.8, 0.78, 0.32), 0.03), yellowing)
        vein_color = np.clip(leaf.mean(axis=(0, 1)) * 1.15, 0, 1)
    elif condition_key == "iron_deficiency":
        leaf = _blend(leaf, _jitter(rng, (0.9, 0.86, 0.28), 0.03), np.full_like(alpha, 0.8))
        vein_color = _jitter(rng, (0.12, 0.4, 0.1), 0.02)
    elif condition_key == "mosaic":
        mottle = _noise(rng, size, int(rng.integers(6, 9)))
        leaf = _blend(leaf, _jitter(rng, (0.7, 0.8, 0.3), 0.03), np.clip((mottle - 0.5) * 8, 0, 1))
        leaf = _blend(leaf, green * 0.7, np.clip((0.35 - mottle) * 8, 0, 1))
    leaf = _blend(leaf, vein_color, veins)

    if condition_key in _SPOTS:
        (low, high), (r_low, r_high), halo, core, rim, halo_color = _SPOTS[condition_key]
        count = int(rng.integers(low, high + 1))
        radii = rng.uniform(r_low, r_high, count).astype(np.float32) * scale
        centers = _sample_points(rng, inside, r_high, count)
        field = _spot_field(size, centers, radii)
        edge = 1.0 / (r_low * scale * size / 2)  # one pixel, relative to the radius
        if halo > 0:
            leaf = _blend(leaf, _jitter(rng, halo_color, 0.03), np.clip((1 + halo - field) / edge, 0, 1))
        leaf = _blend(leaf, _jitter(rng, rim, 0.02), np.clip((1 - field) / edge + 0.5, 0, 1))
        leaf = _blend(leaf, _jitter(rng, core, 0.03), np.clip((0.72 - field) / edge + 0.5, 0, 1))
        lesions = field < 1
    elif condition_key == "blight":
        score = 0.5 * _noise(rng, size, 5) + 0.7 * np.clip(toward_tip, 0, 1)
        threshold = rng.uniform(0.62, 0.75)
        leaf = _blend(leaf, _jitter(rng, (0.72, 0.62, 0.2), 0.03), np.clip((score - threshold + 0.07) * 30, 0, 1))
        dead = np.clip((score - threshold) * 30, 0, 1)
        texture = 0.8 + 0.4 * rng.random((size, size), dtype=np.float32)
        leaf = _blend(leaf, _jitter(rng, (0.3, 0.19, 0.09), 0.02), dead) * np.where(dead > 0.5, texture, 1)[..., None]
        lesions = dead > 0.5
    elif condition_key == "pest_damage":
        holes = int(rng.integers(3, 7))
        centers = _sample_points(rng, inside, 0.12, holes)
        radii = rng.uniform(0.06, 0.11, holes).astype(np.float32) * scale
        field = _spot_field(size, centers, radii) + 0.25 * (_noise(rng, size, 10) - 0.5)
        bites = int(rng.integers(2, 4))
        margin = _sample_points(rng, -np.abs(inside), -pixel, bites)
        bite_field = _spot_field(size, margin, np.full(bites, 0.16 * scale))
        field = np.minimum(field, bite_field + 0.25 * (_noise(rng, size, 10) - 0.5))
        leaf = _blend(leaf, _jitter(rng, (0.42, 0.3, 0.14), 0.03), np.clip((1.3 - field) * 6, 0, 1))
        lesions = (field < 1.3) & (alpha > 0.5)  # holes and brown edges inside the intact outline
        alpha = alpha * np.clip((field - 1) * 8, 0, 1)

    background = _plain_background(rng, size) if rng.random() < 0.5 else _soil_background(rng, size)
    image = _finish(rng, _blend(background, leaf, alpha))
    if condition_key == "pest_damage":
        return image, lesions
    if condition_key in LESION_CONDITIONS:
        return image, lesions & (alpha > 0.5)
    return image, np.zeros((size, size), dtype=bool)


# ---------------------------------------------------------------------------------------------------------------
# Fish
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FishSpecies:
    """A fish: body depth and tail shape, dorsal-to-belly colours, fin colour and markings (in body units)."""

    name: str
    description: tuple[str, ...]
    depth: float
    tail: str  # forked | rounded | pointed
    top: tuple[float, float, float]
    belly: tuple[float, float, float]
    fin: tuple[float, float, float]
    bands: tuple[tuple[float, float], ...] = ()  # (position along the body, half-width)
    band_color: tuple[float, float, float] = (0.05, 0.05, 0.05)
    band_edge: float = 0.0  # width of a black edge around each band
    spots: tuple[tuple[float, float, float], ...] = ()  # (u, v relative to the local depth, radius)
    blotches: int = 0
    scales: bool = False
    barbels: bool = False
    bend: float = 0.0


FISH_SPECIES = {
    "clownfish": FishSpecies(
        "clownfish",
        ("a bright orange body", "three white vertical bands edged in black", "an oval body"),
        0.42,
        "rounded",
        (0.95, 0.42, 0.04),
        (1.0, 0.6, 0.2),
        (0.95, 0.4, 0.05),
        bands=((0.52, 0.08), (0.0, 0.1), (-0.8, 0.05)),
        band_color=(0.97, 0.97, 0.95),
        band_edge=0.035,
    ),
    "tiger_barb": FishSpecies(
        "tiger barb",
        ("a deep golden body", "four black vertical stripes", "red fins"),
        0.5,
        "forked",
        (0.85, 0.7, 0.3),
        (0.95, 0.86, 0.55),
        (0.88, 0.14, 0.08),
        bands=((0.62, 0.05), (0.2, 0.06), (-0.25, 0.06), (-0.75, 0.05)),
    ),
    "freshwater_eel": FishSpecies(
        "freshwater eel",
        ("an elongated snake-like body", "a dark olive colour", "a continuous fin along the back"),
        0.09,
        "pointed",
        (0.24, 0.27, 0.11),
        (0.55, 0.55, 0.3),
        (0.3, 0.3, 0.15),
        bend=0.08,
    ),
    "grass_carp": FishSpecies(
        "grass carp",
        ("a torpedo-shaped olive-silver body", "large dark-edged scales", "a forked tail"),
        0.27,
        "forked",
        (0.4, 0.42, 0.25),
        (0.8, 0.8, 0.7),
        (0.55, 0.55, 0.45),
        scales=True,
    ),
    "climbing_perch": FishSpecies(
        "climbing perch",
        ("a greenish-brown body", "a dark spot at the base of the tail", "a dark spot behind the gill"),
        0.33,
        "rounded",
        (0.32, 0.38, 0.2),
        (0.62, 0.6, 0.42),
        (0.45, 0.45, 0.3),
        spots=((-0.86, 0.0, 0.09), (0.42, 0.25, 0.08)),
    ),
    "goby": FishSpecies(
        "goby",
        ("a slender sandy body", "dark blotches along the flank", "a rounded tail"),
        0.21,
        "rounded",
        (0.72, 0.63, 0.45),
        (0.87, 0.82, 0.7),
        (0.72, 0.66, 0.5),
        blotches=5,
    ),
    "blue_catfish": FishSpecies(
        "blue catfish",
        ("a smooth slate-blue body", "whisker-like barbels at the mouth", "a forked tail"),
        0.26,
        "forked",
        (0.28, 0.36, 0.5),
        (0.76, 0.8, 0.86),
        (0.34, 0.4, 0.52),
        barbels=True,
    ),
    "bolivian_ram": FishSpecies(
        "bolivian ram",
        ("a yellow body", "a black spot in the middle of the flank", "red fins"),
        0.48,
        "rounded",
        (0.85, 0.76, 0.35),
        (0.96, 0.9, 0.66),
        (0.85, 0.2, 0.15),
        bands=((0.72, 0.035),),
        spots=((0.02, 0.1, 0.11),),
    ),
}


def _segment_distance(u, v, start, end) -> np.ndarray:
    (u0, v0), (u1, v1) = (map(float, start)), (map(float, end))
    du, dv = u1 - u0, v1 - v0
    t = np.clip(((u - u0) * du + (v - v0) * dv) / (du * du + dv * dv), 0, 1)
    return np.hypot(u - u0 - t * du, v - v0 - t * dv)


def _water_background(rng: np.random.Generator, size: int) -> np.ndarray:
    _, y = _grid(size)
    top, bottom = _jitter(rng, (0.45, 0.7, 0.8), 0.04), _jitter(rng, (0.12, 0.32, 0.42), 0.04)
    gradient = ((y + 1) / 2)[..., None]
    caustics = 0.08 * (_noise(rng, size, 9) - 0.5)[..., None]
    return bottom + (top - bottom) * gradient + caustics


def render_fish(species_key: str, rng: np.random.Generator, size: int) -> np.ndarray:
    """One fish of `species_key`, side view, in water or on a market tray; uint8 (size, size, 3)."""
    fish = FISH_SPECIES[species_key]
    scale = 0.78 * rng.uniform(0.88, 1.05)
    flip = bool(rng.integers(2))
    center = (rng.uniform(-0.06, 0.06) + (-0.13 if flip else 0.13) * scale, rng.uniform(-0.1, 0.1))
    u, v = _object_frame(size, center, rng.uniform(-0.3, 0.3), scale, flip=flip)
    pixel = 2 / size / scale
    depth = fish.depth * rng.uniform(0.92, 1.08)
    v = v - fish.bend * np.sin(3 * u + rng.uniform(0, 2 * np.pi))
    along = np.clip(u, -1, 1)
    half = depth * np.sqrt(np.clip(1 - along**2, 0, 1)) * (0.78 + 0.22 * along)
    half = np.maximum(half, np.where(np.abs(u) < 1, 0.03, 0.0).astype(np.float32))
    body = np.minimum(half - np.abs(v), 1 - np.abs(u))

    t = (-0.92 - u) / 0.38
    if fish.tail == "forked":
        tail = np.minimum(depth * (0.22 + 0.9 * t) - np.abs(v), np.minimum(t, 1 - t) * 0.38)
        tail = np.minimum(tail, np.abs(v) - depth * 1.3 * (t - 0.45))
    elif fish.tail == "rounded":
        tail = np.minimum(depth * (0.3 + 0.55 * np.sqrt(np.clip(t, 0, 1))) - np.abs(v), np.minimum(t, 1 - t) * 0.38)
    else:
        tail = np.minimum(depth * 0.6 * (1 - t) - np.abs(v), t * 0.38)
    fins = tail
    if fish.tail == "pointed":  # a fringe fin along the whole back
        fringe = np.minimum(np.minimum(half + 0.05 - v, v - half + 0.01), np.minimum(0.3 - u, u + 1))
        fins = np.maximum(fins, fringe)
    else:
        s = (u + 0.35) / 0.6
        dorsal = np.minimum(half + depth * 0.45 * np.sin(np.pi * np.clip(s, 0, 1)) - v, np.minimum(s, 1 - s) * 0.6)
        dorsal = np.minimum(dorsal, v)
        s = (u + 0.62) / 0.36
        anal = np.minimum(half + depth * 0.3 * np.sin(np.pi * np.clip(s, 0, 1)) + v, np.minimum(s, 1 - s) * 0.36)
        anal = np.minimum(anal, -v)
        fins = np.maximum(fins, np.maximum(dorsal, anal))

    relative = np.clip(v / np.maximum(half, 1e-3), -1, 1)
    top, belly = _jitter(rng, fish.top, 0.03), _jitter(rng, fish.belly, 0.03)
    color = belly + (top - belly) * np.clip(0.5 + 0.6 * relative, 0, 1)[..., None]
    if fish.scales:
        lattice = np.minimum(np.abs(np.sin(20 * (u + v))), np.abs(np.sin(20 * (u - v))))
        color = color * (0.72 + 0.28 * np.clip(lattice * 4, 0, 1))[..., None]
    for position, width in fish.bands:
        distance = np.abs(u - position)
        if fish.band_edge:
            color = _blend(color, (0.04, 0.04, 0.04), _coverage(width + fish.band_edge - distance, pixel))
        color = _blend(color, fish.band_color, _coverage(width - distance, pixel))
    spots = list(fish.spots)
    for _ in range(fish.blotches):
        spots.append((rng.uniform(-0.7, 0.6), rng.uniform(-0.3, 0.3), rng.uniform(0.06, 0.09)))
    for spot_u, spot_v, radius in spots:
        local = depth * np.sqrt(max(1 - spot_u**2, 0)) * (0.78 + 0.22 * spot_u)
        distance = np.hypot(u - spot_u, v - spot_v * local)
        color = _blend(color, (0.08, 0.06, 0.04), _coverage(radius - distance, pixel))
    gill = np.abs(np.hypot(u - 0.92, v) - 0.36) < 0.012
    color = np.where((gill & (u < 0.75))[..., None], color * 0.7, color)

    fin_color = _jitter(rng, fish.fin, 0.03)
    image = _water_background(rng, size) if rng.random() < 0.5 else _plain_background(rng, size)
    image = _blend(image, fin_color, _coverage(fins, pixel) * 0.9)
    image = _blend(image, color, _coverage(body, pixel))
    eye_u, eye_v = 0.74, 0.3 * depth
    eye = np.hypot(u - eye_u, v - eye_v)
    image = _blend(image, (0.95, 0.9, 0.7), _coverage(0.055 - eye, pixel))
    image = _blend(image, (0.02, 0.02, 0.02), _coverage(0.035 - eye, pixel))
    if fish.barbels:
        whiskers = np.full_like(u, np.inf)
        for angle in (-0.9, -0.5, -0.2, 0.15):
            end = (0.98 + 0.3 * np.cos(angle), -0.05 * depth + 0.3 * np.sin(angle))
            whiskers = np.minimum(whiskers, _segment_distance(u, v, (0.98, -0.05 * depth), end))
        image = _blend(image, (0.1, 0.1, 0.12), _coverage(0.014 - whiskers, pixel))
    return _finish(rng, image)


# ---------------------------------------------------------------------------------------------------------------
# Cattle
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CattleBreed:
    """A cattle breed by coat: base colour and markings."""

    name: str
    description: tuple[str, ...]
    coat: tuple[float, float, float]
    pattern: str  # solid | patches | white_face | belt | muzzle_ring | dark_points


CATTLE_BREEDS = {
    "holstein": CattleBreed(
        "Holstein", ("black and white patches", "a piebald coat", "white lower legs"), (0.93, 0.93, 0.9), "patches"
    ),
    "jersey": CattleBreed(
        "Jersey",
        ("a light fawn coat", "a black muzzle", "darker shading on the head"),
        (0.74, 0.52, 0.3),
        "dark_points",
    ),
    "brown_swiss": CattleBreed(
        "Brown Swiss", ("a grey-brown coat", "a pale ring around the dark muzzle"), (0.5, 0.43, 0.37), "muzzle_ring"
    ),
    "hereford": CattleBreed(
        "Hereford",
        ("a red-brown body", "a white face", "a white belly and lower legs"),
        (0.56, 0.22, 0.12),
        "white_face",
    ),
    "angus": CattleBreed("Angus", ("a solid black coat", "no white markings"), (0.08, 0.07, 0.07), "solid"),
    "belted_galloway": CattleBreed(
        "Belted Galloway", ("a black coat", "a broad white belt around the middle"), (0.08, 0.07, 0.07), "belt"
    ),
}


def _ellipse(u, v, center, a, b, angle=0.0) -> np.ndarray:
    """Approximate signed inside-distance of a rotated ellipse."""
    cos, sin = float(np.cos(angle)), float(np.sin(angle))
    du, dv = u - float(center[0]), v - float(center[1])
    x, y = (cos * du + sin * dv) / a, (-sin * du + cos * dv) / b
    return (1 - np.hypot(x, y)) * min(a, b)


def _pasture_background(rng: np.random.Generator, size: int) -> np.ndarray:
    _, y = _grid(size)
    horizon = rng.uniform(-0.1, 0.25)
    sky = _jitter(rng, (0.62, 0.76, 0.9), 0.04) + 0.1 * ((y - horizon) / 2)[..., None]
    grass = _jitter(rng, (0.3, 0.5, 0.2), 0.04) * (0.8 + 0.4 * _noise(rng, size, 16))[..., None]
    return np.where((y > horizon)[..., None], sky, grass)


def _barn_background(rng: np.random.Generator, size: int) -> np.ndarray:
    x, y = _grid(size)
    wood = _jitter(rng, (0.48, 0.34, 0.22), 0.04)
    planks = np.where(np.sin(x * rng.uniform(14, 22)) > 0.9, 1.0, 0.85).astype(np.float32)
    floor = _jitter(rng, (0.7, 0.62, 0.4), 0.04)
    return np.where((y > -0.45)[..., None], wood * planks[..., None], floor)


def render_cattle(breed_key: str, rng: np.random.Generator, size: int) -> np.ndarray:
    """One animal of `breed_key`, side view, on a pasture or in a barn; uint8 (size, size, 3)."""
    breed = CATTLE_BREEDS[breed_key]
    scale = rng.uniform(0.86, 1.0)
    flip = bool(rng.integers(2))
    center = ((-0.13 if flip else 0.13) * scale + rng.uniform(-0.05, 0.05), rng.uniform(0.0, 0.1))
    u, v = _object_frame(size, center, rng.uniform(-0.08, 0.08), scale, flip=flip)
    pixel = 2 / size / scale
    body_u, body_v = u / 0.6, (v - 0.05) / 0.27
    body = (1 - (body_u**4 + body_v**4) ** 0.25) * 0.27
    neck = _ellipse(u, v, (0.55, 0.17), 0.2, 0.14, 0.5)
    head = _ellipse(u, v, (0.79, 0.11), 0.16, 0.09, -0.8)
    ear = _ellipse(u, v, (0.69, 0.25), 0.07, 0.025, 0.3)
    muzzle = _ellipse(u, v, (0.88, 0.0), 0.055, 0.05)
    legs = np.full_like(u, -1.0)
    for x in (-0.46, -0.33, 0.3, 0.43):
        legs = np.maximum(legs, np.minimum(np.minimum(0.045 - np.abs(u - x), v + 0.62), 0.05 - v))
    tail = np.minimum(0.016 - _segment_distance(u, v, (-0.58, 0.2), (-0.64, -0.33)), 1.0)
    tail = np.maximum(tail, _ellipse(u, v, (-0.64, -0.36), 0.03, 0.05))
    front = np.maximum(np.maximum(neck, head), np.maximum(ear, muzzle))
    animal = np.maximum(np.maximum(body, front), np.maximum(legs, tail))

    coat = _jitter(rng, breed.coat, 0.03)
    color = np.broadcast_to(coat, u.shape + (3,)).copy()
    headness = np.clip(np.maximum(head, muzzle) / 0.02, 0, 1)
    lower_legs = (legs > 0) & (v < -0.35)
    if breed.pattern == "patches":
        patches = _noise(rng, size, int(rng.integers(8, 12)))
        color = _blend(color, (0.06, 0.06, 0.06), np.clip((patches - 0.5) * 12, 0, 1) * ~lower_legs)
    elif breed.pattern == "dark_points":
        color = color * (1 - 0.35 * np.maximum(headness, np.clip((-u - 0.3) * 2, 0, 1)))[..., None]
    elif breed.pattern == "white_face":
        white = np.maximum(headness, ((body_v < -0.35) & (body > 0)) | lower_legs)
        color = _blend(color, (0.94, 0.93, 0.9), white.astype(np.float32))
    elif breed.pattern == "belt":
        belt = (np.abs(u - rng.uniform(-0.05, 0.05)) < 0.17) & (body > 0) & ~(legs > 0)
        color = _blend(color, (0.94, 0.93, 0.9), belt.astype(np.float32))
    elif breed.pattern == "muzzle_ring":
        color = _blend(color, (0.92, 0.9, 0.86), _coverage(_ellipse(u, v, (0.87, 0.01), 0.085, 0.075), pixel))
    color = _blend(color, (0.06, 0.05, 0.05), _coverage(muzzle - 0.01, pixel))
    color = _blend(color, (0.1, 0.08, 0.06), (legs > 0) & (v < -0.56))
    color = color * (0.85 + 0.15 * np.clip(body / 0.1, 0, 1))[..., None]

    image = _pasture_background(rng, size) if rng.random() < 0.5 else _barn_background(rng, size)
    return _finish(rng, _blend(image, color, _coverage(animal, pixel)))


# ---------------------------------------------------------------------------------------------------------------
# Sources, tasks and the builder
# ---------------------------------------------------------------------------------------------------------------

# A drawing is (renderer name, class arguments); several drawings for one class are picked from at random per image.
Drawing = tuple[str, tuple[str, ...]]

RENDERERS: dict[str, Callable[..., np.ndarray]] = {"leaf": render_leaf, "fish": render_fish, "cattle": render_cattle}


def draw(drawings: list[Drawing], rng: np.random.Generator, size: int) -> np.ndarray:
    """Renders one image of a class from its drawings; uint8 (size, size, 3)."""
    kind, arguments = drawings[int(rng.integers(len(drawings)))] if len(drawings) > 1 else drawings[0]
    return RENDERERS[kind](*arguments, rng, size)


def draw_with_lesions(drawings: list[Drawing], rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """`draw` (the same image from the same `rng` state) and its lesion mask (`render_leaf_with_lesions`; all False
    for a fish, a cow, or a leaf without localised lesions)."""
    kind, arguments = drawings[int(rng.integers(len(drawings)))] if len(drawings) > 1 else drawings[0]
    if kind == "leaf":
        return render_leaf_with_lesions(*arguments, rng, size)
    return RENDERERS[kind](*arguments, rng, size), np.zeros((size, size), dtype=bool)


@dataclass(frozen=True)
class EmbeddedSource:
    """One ALive-mini source: its metadata (which drives the captions) and each class's drawing."""

    name: str
    metadata: DatasetMetadata
    drawings: dict[str, list[Drawing]]


@dataclass(frozen=True)
class DownstreamTask:
    """A zero-shot task of the suite: class folders, the names used in prompts, the templates, and whether its
    classes differ only in fine detail (the suite's fine-grained mean)."""

    name: str
    display_name: str
    domain: str
    drawings: dict[str, list[Drawing]]
    class_names: dict[str, str]
    templates: list[str] | str
    fine_grained: bool = False
    # A two-level label file (`agriclip.labels`) over the class folders, as the YAML document written for it.
    hierarchy: dict | None = None


def _condition_class(key: str) -> dict:
    condition = CONDITIONS[key]
    return {"name": condition.name, "description": list(condition.description), "relation": condition.relation}


def pretraining_sources() -> list[EmbeddedSource]:
    """One source per crop (held-out crop-condition pairs left out), one of fish species and one of cattle breeds."""
    sources = []
    for crop in CROPS:
        conditions = [key for key in CONDITIONS if (crop, key) not in HELD_OUT_PAIRS]
        metadata = DatasetMetadata(
            domain="plant disease",
            subject=f"{crop} leaf",
            relation="condition",
            setting="on a lab bench or on bare soil",
            sensor="smartphone",
            classes={key: _condition_class(key) for key in conditions},
        )
        sources.append(EmbeddedSource(f"{crop}-leaves", metadata, {key: [("leaf", (crop, key))] for key in conditions}))
    fish = DatasetMetadata(
        domain="fish species",
        subject="fish",
        relation="attribute",
        kind="species",
        setting="in an aquarium or on a market tray",
        sensor="camera",
        classes={key: {"name": s.name, "description": list(s.description)} for key, s in FISH_SPECIES.items()},
    )
    sources.append(EmbeddedSource("fish-species", fish, {key: [("fish", (key,))] for key in FISH_SPECIES}))
    cattle = DatasetMetadata(
        domain="cattle breed",
        subject="cow",
        relation="attribute",
        kind="breed",
        setting="on a pasture or in a barn",
        sensor="farm camera",
        classes={key: {"name": b.name, "description": list(b.description)} for key, b in CATTLE_BREEDS.items()},
    )
    sources.append(EmbeddedSource("cattle-breeds", cattle, {key: [("cattle", (key,))] for key in CATTLE_BREEDS}))
    return sources


def _seen_leaf_drawings(condition: str) -> list[Drawing]:
    return [("leaf", (crop, condition)) for crop in CROPS if (crop, condition) not in HELD_OUT_PAIRS]


def downstream_tasks() -> list[DownstreamTask]:
    """The zero-shot suite. `leaf-spot` is decided by spot size and halo colour alone; `crop-condition` holds
    crop-condition pairs never captioned in pretraining next to seen pairs with the same crops and conditions;
    `cattle-breed` by coat colours and patterns on one body shape. These three are the fine-grained tasks."""
    spots = ("leaf_spot", "bacterial_spot", "frogeye_spot")
    pairs = HELD_OUT_PAIRS + SEEN_CONTROL_PAIRS
    return [
        DownstreamTask(
            "leaf-condition",
            "Leaf condition",
            "plant disease",
            {key: _seen_leaf_drawings(key) for key in CONDITIONS},
            {key: ("a healthy leaf" if key == "healthy" else f"a leaf with {c.name}") for key, c in CONDITIONS.items()},
            ["a photo of {}.", "a close-up photo of {}.", "a crop photo showing {}."],
        ),
        DownstreamTask(
            "leaf-spot",
            "Leaf spot diseases (fine-grained)",
            "plant disease",
            {key: _seen_leaf_drawings(key) for key in spots},
            {key: CONDITIONS[key].name for key in spots},
            ["a photo of a leaf with {}.", "a close-up photo of a crop leaf with {}."],
            fine_grained=True,
        ),
        DownstreamTask(
            "crop-condition",
            "Crop and condition (held-out pairs)",
            "plant disease",
            {f"{crop}_{key}": [("leaf", (crop, key))] for crop, key in pairs},
            {f"{crop}_{key}": f"a {crop} leaf with {CONDITIONS[key].name}" for crop, key in pairs},
            ["a photo of {}.", "a close-up photo of {}."],
            fine_grained=True,
            hierarchy={
                "levels": ["crop", "condition"],
                "templates": {"crop": ["a photo of a {} leaf.", "a close-up photo of a {} plant."]},
                "groups": {crop: [f"{crop}_{key}" for pair_crop, key in pairs if pair_crop == crop] for crop in CROPS},
            },
        ),
        DownstreamTask(
            "fish-species",
            "Fish species",
            "fish species",
            {key: [("fish", (key,))] for key in FISH_SPECIES},
            {key: species.name for key, species in FISH_SPECIES.items()},
            "fish",
        ),
        DownstreamTask(
            "cattle-breed",
            "Cattle breed",
            "cattle breed",
            {key: [("cattle", (key,))] for key in CATTLE_BREEDS},
            {key: f"{breed.name} cow" for key, breed in CATTLE_BREEDS.items()},
            "livestock",
            fine_grained=True,
        ),
    ]


# Images per task sent to a render process: few enough that the progress bar moves, enough to amortise the transfer.
RENDER_CHUNK = 32
# What a build owns in its output folder; other files there are left alone.
EMBEDDED_ENTRIES = ("pretrain", "downstream", "hierarchies", "sources", "suite.yaml", "embedded.json")


def _stream(name: str) -> int:
    """A stable integer per seed stream, so that pretraining and each task draw disjoint images."""
    return zlib.crc32(name.encode())


def _downstream_entropy(seed: int, task: str, class_index: int, index: int) -> list[int]:
    """The seed of image `index` of class `class_index` of downstream task `task`."""
    return [seed, _stream(f"downstream/{task}"), class_index, index]


def downstream_image(
    task: str, class_folder: str, index: int, seed: int = 0, image_size: int = 96
) -> tuple[np.ndarray, np.ndarray]:
    """Image `index` of `downstream/<task>/<class_folder>/` as `build_embedded_dataset(seed=seed,
    image_size=image_size)` draws it (uint8 (size, size, 3), the pixels of its PNG) and the boolean mask of its drawn
    lesions (`draw_with_lesions`). The seed and image size of a built dataset are in its embedded.json."""
    tasks = {spec.name: spec for spec in downstream_tasks()}
    if task not in tasks:
        raise KeyError(f"no downstream task {task!r}; the tasks are {', '.join(tasks)}")
    folders = list(tasks[task].drawings)
    if class_folder not in folders:
        raise KeyError(f"task {task!r} has no class {class_folder!r}; its classes are {', '.join(folders)}")
    class_index = folders.index(class_folder)
    rng = np.random.default_rng(_downstream_entropy(seed, task, class_index, index))
    return draw_with_lesions(tasks[task].drawings[class_folder], rng, image_size)


def _render_jobs(jobs: list[tuple]) -> int:
    """Draws and saves each (drawings, entropy, size, path) job; returns how many."""
    for drawings, entropy, size, path in jobs:
        Image.fromarray(draw(drawings, np.random.default_rng(entropy), size)).save(path, compress_level=1)
    return len(jobs)


def build_embedded_dataset(
    output_dir: str | Path,
    seed: int = 0,
    image_size: int = 96,
    pretrain_per_class: int = 48,
    downstream_per_task: int = 200,
    validation_fraction: float = 0.1,
    captions_per_image: int = 3,
    num_workers: int | None = None,
    progress: bool = False,
) -> Path:
    """Writes ALive-mini, the downstream tasks and the evaluation suite config under `output_dir`.

    Layout:
        pretrain/{train,validation}/<source>/<class>_<n>.png + metadata.jsonl (file_name, caption, captions,
            source, label)
        downstream/<task>/<class>/<n>.png       one folder per class
        hierarchies/<task>.yaml                 two-level label files (crop -> its conditions) of the suite's tasks
        sources/<source>.yaml                   the metadata each source's captions come from
        suite.yaml                              the zero-shot suite (paths relative to it), with each task's domain
        embedded.json                           what was built, with the held-out pairs and counts

    Every image has its own seed from (seed, stream, class, index), so the output is identical for a seed whatever
    `num_workers` is, and pretraining and each downstream task come from disjoint seed streams.
    """
    final_dir = Path(output_dir)
    # Built aside and moved in whole: a build that fails or is killed leaves the previous one as it was.
    output_dir = final_dir / ".staging"
    shutil.rmtree(output_dir, ignore_errors=True)
    (output_dir / "sources").mkdir(parents=True)
    # At least one training image per class; a single image per class leaves the validation split empty.
    validation = min(int(np.ceil(pretrain_per_class * validation_fraction)), pretrain_per_class - 1)
    jobs, counts, splits = [], {}, {"train": [], "validation": []}
    sources = pretraining_sources()
    for source in sources:
        generator = CaptionGenerator(source.metadata)
        for class_index, (label, drawings) in enumerate(source.drawings.items()):
            for index in range(pretrain_per_class):
                split = "validation" if index < validation else "train"
                file_name = f"{source.name}/{label}_{index:04d}.png"
                rng = random.Random(f"{seed}/{source.name}/{label}/{index}")
                captions = generator.captions(label, captions_per_image, rng)
                row = {"file_name": file_name, "caption": captions[0], "captions": captions}
                splits[split].append(row | {"source": source.name, "label": label})
                entropy = [seed, _stream(f"pretrain/{source.name}"), class_index, index]
                jobs.append((drawings, entropy, image_size, output_dir / "pretrain" / split / file_name))
        metadata_file = output_dir / "sources" / f"{source.name}.yaml"
        metadata_file.write_text(yaml.safe_dump(source.metadata.to_dict(), sort_keys=False))
    for split, rows in splits.items():
        counts[f"pretrain/{split}"] = len(rows)
        if not rows:
            continue
        for source in sources:
            (output_dir / "pretrain" / split / source.name).mkdir(parents=True, exist_ok=True)
        with open(output_dir / "pretrain" / split / "metadata.jsonl", "w", encoding="utf-8") as handle:
            handle.writelines(json.dumps(row) + "\n" for row in rows)

    suite = []
    for task in downstream_tasks():
        per_class = max(1, downstream_per_task // len(task.drawings))
        for class_index, (folder, drawings) in enumerate(task.drawings.items()):
            (output_dir / "downstream" / task.name / folder).mkdir(parents=True, exist_ok=True)
            for index in range(per_class):
                entropy = _downstream_entropy(seed, task.name, class_index, index)
                path = output_dir / "downstream" / task.name / folder / f"{index:04d}.png"
                jobs.append((drawings, entropy, image_size, path))
        counts[f"downstream/{task.name}"] = per_class * len(task.drawings)
        entry = {
            "name": task.name,
            "display_name": task.display_name,
            "path": f"downstream/{task.name}",
            "class_names": dict(task.class_names),
            "templates": task.templates if isinstance(task.templates, str) else list(task.templates),
            "fine_grained": task.fine_grained,
            "domain": task.domain,
        }
        if task.hierarchy is not None:
            entry["hierarchy"] = f"hierarchies/{task.name}.yaml"
            (output_dir / "hierarchies").mkdir(exist_ok=True)
            (output_dir / entry["hierarchy"]).write_text(yaml.safe_dump(task.hierarchy, sort_keys=False))
        suite.append(entry)
    (output_dir / "suite.yaml").write_text(yaml.safe_dump({"datasets": suite}, sort_keys=False))

    num_workers = num_workers if num_workers is not None else min(2, os.cpu_count() or 1)
    chunks = [jobs[start : start + RENDER_CHUNK] for start in range(0, len(jobs), RENDER_CHUNK)]
    # smoothing=0: the rate is the average since the start. The default weights the latest update most, and the
    # first one comes only after the workers have started and rendered a whole chunk.
    bar = tqdm(total=len(jobs), desc="embedded dataset", unit="img", smoothing=0, disable=not progress)
    if num_workers > 1:
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(num_workers, mp_context=context) as pool:
            for rendered in pool.map(_render_jobs, chunks):
                bar.update(rendered)
    else:
        for chunk in chunks:
            bar.update(_render_jobs(chunk))
    bar.close()
    manifest = {
        "seed": seed,
        "image_size": image_size,
        "counts": counts,
        "held_out_pairs": [list(pair) for pair in HELD_OUT_PAIRS],
        "sources": [source.name for source in sources],
        "tasks": [task["name"] for task in suite],
    }
    (output_dir / "embedded.json").write_text(json.dumps(manifest, indent=2))
    replace_entries(output_dir, final_dir, EMBEDDED_ENTRIES)
    return final_dir


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog=f"python -m {__spec__.name}",
        description="Build the embedded procedural agricultural dataset (no download).",
        epilog=SCRIPT_EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--output", required=True, help="folder to write pretrain/, downstream/ and suite.yaml to")
    parser.add_argument("--seed", type=int, default=0, help="seed; the same seed gives the same files")
    parser.add_argument("--image-size", type=int, default=96, help="side of the square images in pixels")
    parser.add_argument("--pretrain-per-class", type=int, default=48, help="pretraining images per source class")
    parser.add_argument("--downstream-per-task", type=int, default=200, help="about this many images per task")
    parser.add_argument("--captions-per-image", type=int, default=3, help="caption variants stored per image")
    parser.add_argument("--num-workers", type=int, default=None, help="render processes (default: up to 2)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    output = build_embedded_dataset(
        args.output,
        seed=args.seed,
        image_size=args.image_size,
        pretrain_per_class=args.pretrain_per_class,
        downstream_per_task=args.downstream_per_task,
        captions_per_image=args.captions_per_image,
        num_workers=args.num_workers,
        progress=True,
    )
    manifest = json.loads((output / "embedded.json").read_text())
    print(f"built in {time.perf_counter() - start:.1f} s (seed {args.seed}, {args.image_size} px)")
    for name, count in manifest["counts"].items():
        print(f"  {output / name}: {count} images")
    print(f"  source metadata: {output / 'sources'}")
    print(f"  zero-shot suite: {output / 'suite.yaml'}")
    print(f"  held-out crop-condition pairs: {', '.join('-'.join(pair) for pair in manifest['held_out_pairs'])}")


if __name__ == "__main__":
    run_command(main, __spec__.name)
