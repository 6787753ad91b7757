"""Images with semantic label maps: the data of the LDM semantic-synthesis models.

    src = SegmentationFolderSource("/data/landscapes", num_classes=182)
    src.load(i) -> {"image": uint8 (H, W, 3), "segmentation": int32 (H, W), "caption": ""}

Layout (``data.name="segmentation_folder"``, ``data.path`` the root)::

    ROOT/images/<any sub-path>/<stem>.jpg|png|...     the images (sorted by relative path)
    ROOT/labels/<same sub-path>/<stem>.png            one integer class per pixel, same size

(``data.image_dir`` / ``data.label_dir`` rename the two folders.) Label PNGs are single-channel
("L", "P": the palette indices, "I", "I;16"); an RGB or RGBA label image is refused. The pipeline
(``ldm_jax.data.pipeline``) crops, resizes (nearest) and flips a label map exactly as its image,
and the batch carries it as ``"segmentation"`` int32 (L, S, S).

Labels, in the conventions of the data sets the CompVis models were trained on:

* ``num_classes`` C: every label must be in [0, C) after the steps below (else an error naming the
  file: a wrong C would otherwise make every example fail);
* ``shift_labels`` (taming's ``shift_segmentation``, used for COCO-stuff's Caffe-style maps whose
  "unlabeled" is 255): uint8 labels + 1 with wrap-around, so 255 becomes class 0 and class k becomes
  k + 1 (C then counts "unlabeled" too: 183 for COCO-stuff);
* ``ignore_label`` (e.g. 255): pixels with this value become -1, which the trainer one-hot encodes
  as all zeros (no class), for maps where "unlabeled" should not be a class of its own.

The released ``semantic_synthesis256`` model was trained on 182-class landscape maps (taming's
``sflckr`` data: no shift, no ignore label) as ``np.eye(182)[labels]`` one-hot inputs.

A missing label file is an error at construction (naming the image and the expected path); an
undecodable image or label file is skipped by the pipeline like any unreadable example.
"""
from __future__ import annotations

import os
from typing import Optional

import numpy as np
from PIL import Image

from ldm_jax.data.folder import IMAGE_EXTENSIONS, read_rgb

LABEL_MODES = ("L", "P", "I", "I;16", "I;16B", "I;16L", "1")


def read_label_map(path: str) -> np.ndarray:
    """int64 (H, W) class indices of a single-channel label image (a palette PNG gives its indices)."""
    with Image.open(path) as img:
        img.load()
        if img.mode not in LABEL_MODES:
            from ldm_jax.data.pipeline import ExampleFormatError

            raise ExampleFormatError(f"label map {path} has mode {img.mode!r}; expected a single-channel image of "
                                     f"class indices (modes {', '.join(LABEL_MODES)}), not colours")
        return np.asarray(img).astype(np.int64)


def normalize_labels(labels: np.ndarray, num_classes: int, *, ignore_label: Optional[int] = None,
                     shift_labels: bool = False, what: str = "label map") -> np.ndarray:
    """int32 (H, W) labels in [0, num_classes) or -1 (ignored), per the module docstring's rules."""
    labels = np.asarray(labels).astype(np.int64)
    if shift_labels:
        labels = (labels + 1) % 256  # taming: uint8 + 1, 255 -> 0 ("unlabeled")
    valid = (labels >= 0) & (labels < num_classes)
    out = labels
    if ignore_label is not None:
        ignored = labels == int(ignore_label)
        valid |= ignored
        out = np.where(ignored, -1, labels)
    bad = ~valid
    if bad.any():
        values = np.unique(labels[bad])
        from ldm_jax.data.pipeline import ExampleFormatError

        hint = "" if ignore_label is not None else " (data.ignore_label maps an 'unlabeled' value to no class)"
        raise ExampleFormatError(f"{what} has labels {values[:8].tolist()} outside [0, {num_classes}) "
                                 f"(data.num_classes={num_classes}){hint}")
    return out.astype(np.int32)


class SegmentationFolderSource:
    """Random-access source of (image, label map) pairs (see the module docstring)."""

    has_labels = False

    def __init__(self, root: str, *, num_classes: int, image_dir: str = "images", label_dir: str = "labels",
                 ignore_label: Optional[int] = None, shift_labels: bool = False):
        if num_classes is None or int(num_classes) < 1:
            raise ValueError(f"a segmentation source needs data.num_classes >= 1 (the classes of its label maps), "
                             f"got {num_classes!r}")
        self.num_classes = int(num_classes)
        self.ignore_label = None if ignore_label is None else int(ignore_label)
        self.shift_labels = bool(shift_labels)
        if not root or not os.path.isdir(root):
            raise FileNotFoundError(f"segmentation data folder {root!r} does not exist")
        self.root = os.path.abspath(root)
        self.image_root = os.path.join(self.root, image_dir)
        self.label_root = os.path.join(self.root, label_dir)
        for path, what in ((self.image_root, "images"), (self.label_root, "label maps")):
            if not os.path.isdir(path):
                raise FileNotFoundError(f"{path} does not exist: a segmentation folder holds {image_dir}/ (images) "
                                        f"and {label_dir}/ (label PNGs with the same relative paths and stems)")
        rels = []
        for dirpath, dirnames, filenames in os.walk(self.image_root, followlinks=True):
            dirnames.sort()
            rels += [os.path.relpath(os.path.join(dirpath, n), self.image_root) for n in filenames
                     if n.lower().endswith(IMAGE_EXTENSIONS)]
        self.files = sorted(r.replace(os.sep, "/") for r in rels)
        if not self.files:
            raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under {self.image_root}")
        self.label_files = []
        for rel in self.files:
            label = os.path.join(self.label_root, os.path.splitext(rel)[0] + ".png")
            if not os.path.isfile(label):
                raise FileNotFoundError(f"{os.path.join(self.image_root, rel)} has no label map: expected {label}")
            self.label_files.append(label)
        self.captions = [""] * len(self.files)

    def __len__(self) -> int:
        return len(self.files)

    def describe(self, index: int) -> str:
        return f"{os.path.join(self.image_root, self.files[index])} (labels {self.label_files[index]})"

    def load(self, index: int) -> dict:
        image = read_rgb(os.path.join(self.image_root, self.files[index]))
        path = self.label_files[index]
        labels = normalize_labels(read_label_map(path), self.num_classes, ignore_label=self.ignore_label,
                                  shift_labels=self.shift_labels, what=f"label map {path}")
        if labels.shape != image.shape[:2]:
            from ldm_jax.data.pipeline import ExampleFormatError

            raise ExampleFormatError(f"label map {path} is {labels.shape[1]}x{labels.shape[0]} but its image is "
                                     f"{image.shape[1]}x{image.shape[0]} (width x height)")
        return {"image": image, "segmentation": labels, "caption": ""}
