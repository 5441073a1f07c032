"""synthetic_shapes: images of coloured shapes, captioned with colour, shape, size and position."""

from __future__ import annotations

import itertools
from typing import Any, Literal

import numpy as np
from PIL import Image, ImageDraw

from mmkit.data.synthetic import SyntheticSet
from mmkit.samples import DatasetInfo

COLOURS = {
    "red": (215, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 80, 215),
    "yellow": (225, 200, 30),
    "purple": (135, 50, 165),
    "orange": (240, 135, 25),
}
SHAPES = ("circle", "square", "triangle", "cross")
SIZES = {"small": 0.16, "large": 0.3}  # half-width as a fraction of the image side
POSITIONS = {
    "top left": (0.3, 0.3),
    "top right": (0.7, 0.3),
    "bottom left": (0.3, 0.7),
    "bottom right": (0.7, 0.7),
    "centre": (0.5, 0.5),
}
COMBINATIONS = list(itertools.product(COLOURS, SHAPES, SIZES, POSITIONS))
PROPERTIES = {"colour": tuple(COLOURS), "shape": SHAPES, "size": tuple(SIZES), "position": tuple(POSITIONS)}


class SyntheticShapes(SyntheticSet):
    """Images of one coloured shape each, captioned "a large red circle in the top left".

    Deterministic from the seed, with disjoint splits. ``label`` numbers the 240
    colour/shape/size/position combinations, or one property's values (``label_by``): the
    images and captions stay the same, only the labels change.

    Args:
        num_samples: samples in this split.
        split: "train" or "val".
        image_size: side of the square images in pixels; at least 16.
        seed: selects the whole set.
        label_by: "all" (the 240 combinations), or "colour" (6), "shape" (4), "size" (2),
            "position" (5).
        omit: properties left out of the captions ("a large circle in the centre" without
            colour), so that a label by one of them is found in the image, not in the text.
    """

    def __init__(self, num_samples: int = 2000, split: Literal["train", "val"] = "train",
                 image_size: int = 64, seed: int = 0,
                 label_by: Literal["all", "colour", "shape", "size", "position"] = "all",
                 omit: list[Literal["colour", "shape", "size", "position"]] = []):
        super().__init__(num_samples, split, seed)
        if image_size < 16:
            raise ValueError(f"image_size must be at least 16 pixels, got {image_size}")
        self.image_size, self.label_by, self.omit = image_size, label_by, set(omit)
        names = PROPERTIES.get(label_by) or tuple(f"{size} {colour} {shape} in the {position}"
                                                   for colour, shape, size, position in COMBINATIONS)
        self.info = DatasetInfo(keys=("id", "image", "text", "label"), label_kind="single", class_names=names)

    def draw(self, rng: np.random.Generator) -> dict[str, Any]:
        combination = int(rng.integers(len(COMBINATIONS)))
        colour, shape, size, position = COMBINATIONS[combination]
        values = {"colour": colour, "shape": shape, "size": size, "position": position}
        label = PROPERTIES[self.label_by].index(values[self.label_by]) if self.label_by != "all" else combination
        return {
            "image": draw_shape(rng, self.image_size, colour, shape, size, position),
            "text": caption(values, self.omit),
            "label": label,
        }


def caption(values: dict[str, str], omit: set[str]) -> str:
    """ "a large red circle in the top left", less the omitted properties ("a shape" when the
    shape is omitted, no place phrase when the position is)."""
    words = [values[key] for key in ("size", "colour") if key not in omit]
    words.append("shape" if "shape" in omit else values["shape"])
    place = "" if "position" in omit else f" in the {values['position']}"
    return f"a {' '.join(words)}{place}"


def draw_shape(rng: np.random.Generator, side: int, colour: str, shape: str, size: str,
               position: str) -> Image.Image:
    """One shape on a noisy grey background, with jittered place, size and shade."""
    background = rng.normal(200, 12, (side, side, 3)).clip(0, 255).astype(np.uint8)
    image = Image.fromarray(background, "RGB")
    cx, cy = (np.array(POSITIONS[position]) + rng.uniform(-0.05, 0.05, 2)) * side
    r = SIZES[size] * side * rng.uniform(0.85, 1.15)
    fill = tuple(int(c) for c in np.clip(np.array(COLOURS[colour]) + rng.integers(-20, 21, 3), 0, 255))
    draw = ImageDraw.Draw(image)
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        draw.rectangle([cx - r * 0.85, cy - r * 0.85, cx + r * 0.85, cy + r * 0.85], fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r * 0.8), (cx + r, cy + r * 0.8)], fill=fill)
    else:  # cross
        w = r * 0.35
        draw.rectangle([cx - r, cy - w, cx + r, cy + w], fill=fill)
        draw.rectangle([cx - w, cy - r, cx + w, cy + r], fill=fill)
    return image
