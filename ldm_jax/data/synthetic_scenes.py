"""Built-in generated scenes with label maps and boxes, for tests and ``runlocal`` presets (no downloads).

    SyntheticSegmentationSource(64, height=16, width=20, num_classes=5).load(i)
        -> {"image": uint8 (16, 20, 3), "segmentation": int32 (16, 20), "caption": "..."}
    SyntheticLayoutSource(64, height=16, width=20, num_classes=5).load(i)
        -> {"image": uint8 (16, 20, 3), "objects": (LayoutObject, ...), "caption": "..."}

Example i is drawn from ``np.random.default_rng([seed, i])`` alone (the same on every host and run):
a background of class 0 and 1..3 shapes (axis-aligned rectangles or ellipses) of classes 1..C-1,
painted in order, each pixel in its class's colour (``PALETTE``), so the image is exactly
``PALETTE[segmentation]``. The layout source gives each shape as an object (category number
class - 1, so C - 1 categories; the box of the shape, relative to the image) in drawing order.
Images are wider than high by default so that square crops (and their crop boxes) matter.
(``data.name`` "synthetic_segmentation" / "synthetic_layout"; ``data.num_examples``, ``data.num_classes``.)
"""
from __future__ import annotations

from typing import Optional

import numpy as np

from ldm_jax.data.layout_tokens import LayoutObject

PALETTE = np.array([(20, 20, 30), (230, 40, 40), (40, 200, 60), (50, 80, 230), (230, 220, 40), (200, 60, 220),
                    (40, 210, 210), (240, 140, 30), (150, 150, 150), (250, 250, 250)], np.uint8)
NAMES = ("background", "red", "green", "blue", "yellow", "magenta", "cyan", "orange", "grey", "white")


def draw_scene(rng: np.random.Generator, height: int, width: int, num_classes: int):
    """(image uint8 (H, W, 3), labels int32 (H, W), [(class, (x0, y0, w, h) in pixels, kind), ...])."""
    if not 2 <= num_classes <= len(PALETTE):
        raise ValueError(f"synthetic scenes have 2..{len(PALETTE)} classes, got {num_classes}")
    labels = np.zeros((height, width), np.int32)
    shapes = []
    yy, xx = np.mgrid[0:height, 0:width]
    for _ in range(int(rng.integers(1, 4))):
        cls = int(rng.integers(1, num_classes))
        h = int(rng.integers(max(2, height // 4), max(3, height // 2 + 1)))
        w = int(rng.integers(max(2, width // 4), max(3, width // 2 + 1)))
        y0, x0 = int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1))
        if rng.random() < 0.5:
            kind, inside = "box", (yy >= y0) & (yy < y0 + h) & (xx >= x0) & (xx < x0 + w)
        else:  # ellipse inscribed in the box (pixel centres)
            cy, cx = y0 + h / 2.0, x0 + w / 2.0
            kind = "ellipse"
            inside = ((yy + 0.5 - cy) / (h / 2.0)) ** 2 + ((xx + 0.5 - cx) / (w / 2.0)) ** 2 <= 1.0
        labels[inside] = cls
        shapes.append((cls, (x0, y0, w, h), kind))
    return PALETTE[labels], labels, shapes


class _SyntheticScenes:
    has_labels = False

    def __init__(self, num_examples: int = 64, *, height: int = 16, width: Optional[int] = None,
                 num_classes: int = 5, seed: int = 0):
        if num_examples < 1 or height < 4:
            raise ValueError(f"synthetic scenes need num_examples >= 1 and height >= 4, got {num_examples}, {height}")
        self.n, self.height = int(num_examples), int(height)
        self.width = int(width if width is not None else height + height // 4)
        self.classes, self.seed = int(num_classes), int(seed)
        self.name = type(self).__name__
        self.captions = [self._scene(i)[3] for i in range(self.n)]

    def _scene(self, index: int):
        image, labels, shapes = draw_scene(np.random.default_rng([self.seed, index]), self.height, self.width,
                                           self.classes)
        caption = " and ".join(f"a {NAMES[c]} {kind}" for c, _, kind in shapes)
        return image, labels, shapes, caption

    def __len__(self) -> int:
        return self.n

    def describe(self, index: int) -> str:
        return f"{self.name} example {index}"


class SyntheticSegmentationSource(_SyntheticScenes):
    """Scenes with their label maps (``num_classes`` classes, 0 = background)."""

    @property
    def num_classes(self) -> int:
        return self.classes

    def load(self, index: int) -> dict:
        image, labels, _, caption = self._scene(index)
        return {"image": image, "segmentation": labels, "caption": caption}


class SyntheticLayoutSource(_SyntheticScenes):
    """Scenes with their shapes as objects (``num_classes - 1`` categories: class - 1)."""

    has_objects = True

    @property
    def num_classes(self) -> int:
        return self.classes - 1

    def load(self, index: int) -> dict:
        image, _, shapes, caption = self._scene(index)
        objects = tuple(LayoutObject(c - 1, (x0 / self.width, y0 / self.height, w / self.width, h / self.height))
                        for c, (x0, y0, w, h), _ in shapes)
        return {"image": image, "objects": objects, "caption": caption}
