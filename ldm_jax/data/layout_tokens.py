"""Object layouts -> token ids: the conditioning of the LDM layout-to-image model.

The CompVis layout-to-image LDM (Rombach et al. 2022, Sec. 4.3.1 / Fig. 8 "layout-to-image
synthesis on COCO / OpenImages"; ``models/ldm/layout2img-openimages256``: a ``BERTEmbedder`` with
``use_tokenizer: false``, ``vocab_size 8192``, ``max_seq_len 92``) reads a layout as a sequence of
integer tokens built by taming-transformers' ``ObjectsBoundingBoxConditionalBuilder``
(``taming/data/conditional_builder/objects_bbox.py`` + ``objects_center_points.py`` + ``utils.py``;
Jahn, Rombach & Ommer 2021, "High-Resolution Complex Scene Synthesis with Transformers"). This module
is an independent implementation of that builder with the same ids:

* Coordinates: a grid of ``no_sections = int(sqrt(no_tokens))`` x ``no_sections`` positions over
  [0, 1]^2; a point (x, y) is the token ``round(y * (S - 1)) * S + round(x * (S - 1))`` (Python's
  ``round``: halves to even, as the original). A box (x0, y0, w, h) is the pair of tokens of its
  top-left and bottom-right corners.
* Objects: ``(representation, top-left token, bottom-right token)`` triples, the representation
  ``category_no + no_object_classes * modifier`` with ``modifier`` the bits is_group_of (1, with
  ``use_group_parameter``), is_occluded (2), is_depiction (4), is_inside (8) (with
  ``use_additional_parameters``).
* ``none = no_tokens - 1`` pads to ``no_max_objects`` triples; with ``encode_crop`` the two tokens
  of the crop box follow, so the length is ``3 * no_max_objects + 2 * encode_crop`` (92 = 3 * 30 + 2
  for the released model, whose data config is taming's OpenImages one: no_tokens 8192,
  max_objects_per_image 30, encode_crop, use_group_parameter, random 2-d crops and flips).

``build(objects, crop_coordinates, horizontal_flip, rng)`` follows the original step by step: more
than ``no_max_objects`` objects are cut to the first ``no_max_objects`` (with a warning); the objects
are shuffled (the original calls the global ``random.shuffle``; here ``rng``, a ``random.Random``,
does it, so a seeded ``random.Random(s)`` gives the original's order after ``random.seed(s)``;
``rng=None`` keeps the given order); objects whose box does not intersect the crop are dropped;
then, with ``encode_crop``, boxes stay in full-image coordinates (clamped to [0, 1], flipped
about the image centre when ``horizontal_flip``) and the (flipped) crop box is appended; without
it, boxes are re-expressed relative to the crop (clamped, flipped). ``inverse_build`` decodes.

Objects are ``LayoutObject`` tuples or plain ``(category_no, (x0, y0, w, h))`` pairs, boxes relative
to the image size (x to the right, y down).
"""
from __future__ import annotations

import math
import random as _random
import warnings
from typing import Iterable, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np

BoundingBox = Tuple[float, float, float, float]  # x0, y0, w, h, relative to the image
FULL_CROP: BoundingBox = (0.0, 0.0, 1.0, 1.0)


class LayoutObject(NamedTuple):
    """One annotated object: its category number and box (x0, y0, w, h) in [0, 1] image units, plus
    the OpenImages flags the original can encode into the representation token."""

    category_no: int
    bbox: BoundingBox
    is_group_of: bool = False
    is_occluded: bool = False
    is_depiction: bool = False
    is_inside: bool = False


def as_layout_object(obj) -> LayoutObject:
    """A ``LayoutObject`` from one, or from ``(category_no, bbox[, is_group_of])``."""
    if isinstance(obj, LayoutObject):
        return obj
    category, bbox, *flags = obj
    if len(bbox) != 4:
        raise ValueError(f"a layout object's box must be (x0, y0, w, h), got {bbox!r}")
    return LayoutObject(int(category), tuple(float(v) for v in bbox), *(bool(f) for f in flags))


def _intersection_area(a: BoundingBox, b: BoundingBox) -> float:
    x_overlap = max(0.0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
    y_overlap = max(0.0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
    return x_overlap * y_overlap


def _flip_box(bbox: BoundingBox) -> BoundingBox:
    """Mirror a box about the vertical centre line x = 1/2."""
    return 1 - (bbox[0] + bbox[2]), bbox[1], bbox[2], bbox[3]


def _clamp01(x: float) -> float:
    return max(min(x, 1.0), 0.0)


def _relative_to(bbox: BoundingBox, crop: BoundingBox, flip: bool) -> BoundingBox:
    """``bbox`` in the coordinates of ``crop``: the top-left corner clamped to [0, 1], the size cut to
    end inside [0, 1], then optionally mirrored (taming's ``rescale_annotations``)."""
    x0 = _clamp01((bbox[0] - crop[0]) / crop[2])
    y0 = _clamp01((bbox[1] - crop[1]) / crop[3])
    w = min(bbox[2] / crop[2], 1 - x0)
    h = min(bbox[3] / crop[3], 1 - y0)
    if flip:
        x0 = 1 - (x0 + w)
    return x0, y0, w, h


def layout_shape_for_length(length: int) -> Optional[Tuple[int, bool]]:
    """(no_max_objects, encode_crop) of a builder whose sequences have ``length`` ids (the text
    encoder's max_position_embeddings): 3 per object, plus 2 crop tokens when encoded; None when
    ``length`` is neither 3 k + 2 nor 3 k. (The two cannot both hold: 92 = 3 x 30 + 2 for the
    released layout2img model.)"""
    length = int(length)
    if length >= 5 and (length - 2) % 3 == 0:
        return (length - 2) // 3, True
    if length >= 3 and length % 3 == 0:
        return length // 3, False
    return None


class LayoutTokenBuilder:
    """Token ids of object layouts (see the module docstring); taming's builder's constructor
    arguments, same meaning."""

    def __init__(self, no_object_classes: Optional[int], no_max_objects: int, no_tokens: int, encode_crop: bool,
                 use_group_parameter: bool = False, use_additional_parameters: bool = False):
        # no_object_classes None: not known (a released model's file does not record it). It only enters
        # the flag modifiers (category + no_object_classes * modifier), so flagged objects are refused then.
        for name, value in (("no_object_classes", no_object_classes), ("no_max_objects", no_max_objects),
                            ("no_tokens", no_tokens)):
            if name == "no_object_classes" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"LayoutTokenBuilder {name} must be a positive int, got {value!r}")
        self.no_object_classes = None if no_object_classes is None else int(no_object_classes)
        self.no_max_objects = int(no_max_objects)
        self.no_tokens = int(no_tokens)
        self.encode_crop = bool(encode_crop)
        self.use_group_parameter = bool(use_group_parameter)
        self.use_additional_parameters = bool(use_additional_parameters)
        self.no_sections = int(math.sqrt(self.no_tokens))
        if self.no_sections < 2:
            raise ValueError(f"LayoutTokenBuilder no_tokens={no_tokens} leaves no coordinate grid (needs >= 4)")

    @classmethod
    def from_config(cls, fields, no_object_classes: Optional[int] = None) -> "LayoutTokenBuilder":
        """From a ``data.layout`` (Config)dict: no_max_objects, no_tokens, encode_crop, use_group_parameter,
        use_additional_parameters, no_object_classes (None: ``no_object_classes``, the data's count)."""
        fields = dict(fields or {})
        n = fields.get("no_object_classes", None) or no_object_classes
        if n is None:
            raise ValueError("data.layout.no_object_classes is needed (the data source does not give its count)")
        return cls(int(n), int(fields.get("no_max_objects", 30)), int(fields.get("no_tokens", 8192)),
                   bool(fields.get("encode_crop", True)), bool(fields.get("use_group_parameter", True)),
                   bool(fields.get("use_additional_parameters", False)))

    # ---------------------------------------------------------------- vocabulary
    @property
    def none(self) -> int:
        """The padding token of an absent object (the last id)."""
        return self.no_tokens - 1

    @property
    def object_descriptor_length(self) -> int:
        return 3

    @property
    def embedding_dim(self) -> int:
        """Length of a built sequence (the text encoder's max_position_embeddings)."""
        return self.no_max_objects * self.object_descriptor_length + (2 if self.encode_crop else 0)

    def tokenize_coordinates(self, x: float, y: float) -> int:
        """The grid token nearest to (x, y) in [0, 1]^2 (row-major, y down)."""
        s = self.no_sections - 1
        return int(round(y * s)) * self.no_sections + int(round(x * s))

    def coordinates_from_token(self, token: int) -> Tuple[float, float]:
        s = self.no_sections - 1
        return (token % self.no_sections) / s, (token // self.no_sections) / s

    def token_pair_from_bbox(self, bbox: BoundingBox) -> Tuple[int, int]:
        return (self.tokenize_coordinates(bbox[0], bbox[1]),
                self.tokenize_coordinates(bbox[0] + bbox[2], bbox[1] + bbox[3]))

    def bbox_from_token_pair(self, token1: int, token2: int) -> BoundingBox:
        x0, y0 = self.coordinates_from_token(token1)
        x1, y1 = self.coordinates_from_token(token2)
        return x0, y0, x1 - x0, y1 - y0

    def object_representation(self, obj: LayoutObject) -> int:
        modifier = 0
        if self.use_group_parameter:
            modifier |= 1 * (obj.is_group_of is True)
        if self.use_additional_parameters:
            modifier |= 2 * (obj.is_occluded is True) | 4 * (obj.is_depiction is True) | 8 * (obj.is_inside is True)
        if modifier and self.no_object_classes is None:
            raise ValueError("an object with flags (is_group_of, ...) needs the builder's no_object_classes (its "
                             "token is category + no_object_classes * flags), which is not known here")
        return int(obj.category_no) + (self.no_object_classes or 0) * modifier

    # ---------------------------------------------------------------- build
    def build(self, objects: Iterable, crop_coordinates: Optional[Sequence[float]] = None,
              horizontal_flip: bool = False, rng: Optional[_random.Random] = None) -> np.ndarray:
        """int64 (embedding_dim,) token ids of a layout (see the module docstring for each step)."""
        objs: List[LayoutObject] = [as_layout_object(o) for o in objects]
        if not objs:
            warnings.warn("Did not receive any annotations.")
        if len(objs) > self.no_max_objects:
            warnings.warn("Received more annotations than allowed.")
            objs = objs[:self.no_max_objects]
        crop = tuple(float(v) for v in crop_coordinates) if crop_coordinates else FULL_CROP
        if rng is not None:
            rng.shuffle(objs)
        objs = [o for o in objs if _intersection_area(o.bbox, crop) > 0.0]
        if self.encode_crop:
            boxes = [_relative_to(o.bbox, FULL_CROP, horizontal_flip) for o in objs]
            extra = list(self.token_pair_from_bbox(_flip_box(crop) if horizontal_flip else crop))
        else:
            boxes = [_relative_to(o.bbox, crop, horizontal_flip) for o in objs]
            extra = []
        tokens = []
        for obj, box in zip(objs, boxes):
            tokens += [self.object_representation(obj), *self.token_pair_from_bbox(box)]
        tokens += [self.none] * (self.object_descriptor_length * (self.no_max_objects - len(objs)))
        tokens += extra
        ids = np.asarray(tokens, np.int64)
        if ids.shape != (self.embedding_dim,):  # pragma: no cover - guarded by the construction above
            raise AssertionError(f"built {ids.shape[0]} tokens, expected {self.embedding_dim}")
        bad = [int(v) for v in ids if not 0 <= v < self.no_tokens]
        if bad:
            raise ValueError(f"layout tokens {bad} are outside [0, {self.no_tokens}): a category_no >= "
                             f"no_object_classes={self.no_object_classes}, or a box outside the image")
        return ids

    def empty(self) -> np.ndarray:
        """The ids of an empty layout over the whole image (no object, full crop)."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return self.build([])

    def inverse_build(self, ids) -> Tuple[List[Tuple[int, BoundingBox]], Optional[BoundingBox]]:
        """([(representation, box), ...] of the non-padding objects, crop box or None)."""
        ids = [int(v) for v in np.asarray(ids).reshape(-1)]
        if len(ids) != self.embedding_dim:
            raise ValueError(f"expected {self.embedding_dim} layout tokens, got {len(ids)}")
        crop = None
        if self.encode_crop:
            crop, ids = self.bbox_from_token_pair(ids[-2], ids[-1]), ids[:-2]
        triples = [ids[i:i + 3] for i in range(0, len(ids), 3)]
        return [(t[0], self.bbox_from_token_pair(t[1], t[2])) for t in triples if t[0] != self.none], crop
