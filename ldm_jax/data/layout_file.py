"""Object layouts from a JSON file: the condition of a layout-to-image model at sampling time
(``sample.py --layout FILE.json``).

The file holds one layout, a list of objects::

    [{"category": 3, "bbox": [0.10, 0.20, 0.50, 0.40]},
     {"category": 0, "bbox": [0.55, 0.05, 0.40, 0.30], "is_group_of": true}]

or several, a list of such lists (each one conditions its own batch of images). An object has

* ``category``: the category number the model was trained with (an int >= 0, below the model's
  number of object classes; ``coco_layout`` data numbers the COCO category ids by their order as
  strings, taming's ``AnnotatedObjectsCoco`` numbering; ``synthetic_layout`` shape class - 1);
* ``bbox``: ``[x0, y0, w, h]``, the top-left corner, width and height *relative to the image*
  (x to the right, y down, all in [0, 1], w and h > 0, x0 + w <= 1, y0 + h <= 1): the model's
  layouts do not depend on the output size. A box in pixels (as COCO annotations) is
  ``[x / W, y / H, w / W, h / H]`` for an image of W x H;
* ``is_group_of`` (optional, default false): a crowd (COCO ``iscrowd``), for models whose layouts
  encode it (``data.layout.use_group_parameter``) and whose number of object classes is known (a
  training workdir: ``data.layout.no_object_classes`` or the synthetic data's; a released file does
  not record it).

``read_layout_file`` checks the file's structure (before any model is loaded);
``layout_file_ids`` turns its layouts into the model's token ids with the model's
``LayoutTokenBuilder`` (``Pipeline.layout_builder``), checking what depends on the model (object
count, category range, flags). Errors are ``ValueError`` naming the file, the layout and the object.
"""
from __future__ import annotations

import json
import math
import warnings
from typing import Any, List, Sequence

import numpy as np

from ldm_jax.data.layout_tokens import LayoutObject, LayoutTokenBuilder

OBJECT_KEYS = ("category", "bbox", "is_group_of")
_TOLERANCE = 1e-6  # rounding of boxes divided by the image size (e.g. 0.1 + 0.9 > 1 by an ulp)
FORMAT = ('a list of objects {"category": int, "bbox": [x0, y0, w, h]} (box relative to the image, in [0, 1]), '
          'or a list of such lists')


def _object(path: str, where: str, entry: Any) -> LayoutObject:
    if not isinstance(entry, dict):
        raise ValueError(f"{path}: {where}: expected an object {{\"category\": ..., \"bbox\": [x0, y0, w, h]}}, "
                         f"got {json.dumps(entry)}")
    unknown = sorted(set(entry) - set(OBJECT_KEYS))
    if unknown:
        raise ValueError(f"{path}: {where}: unknown keys {unknown}; an object has {list(OBJECT_KEYS)}")
    for key in ("category", "bbox"):
        if key not in entry:
            raise ValueError(f"{path}: {where}: '{key}' is missing")
    category = entry["category"]
    if isinstance(category, bool) or not isinstance(category, int) or category < 0:
        raise ValueError(f"{path}: {where}: 'category' must be an int >= 0 (the model's category number), "
                         f"got {json.dumps(category)}")
    bbox = entry["bbox"]
    if (not isinstance(bbox, list) or len(bbox) != 4
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in bbox)):
        raise ValueError(f"{path}: {where}: 'bbox' must be [x0, y0, w, h], four numbers, got {json.dumps(bbox)}")
    x0, y0, w, h = (float(v) for v in bbox)
    if not (x0 >= 0 and y0 >= 0 and w > 0 and h > 0 and x0 + w <= 1 + _TOLERANCE and y0 + h <= 1 + _TOLERANCE):
        raise ValueError(f"{path}: {where}: 'bbox' {json.dumps(bbox)} is not a box relative to the image: need "
                         "x0, y0 >= 0, w, h > 0, x0 + w <= 1 and y0 + h <= 1 (a box in pixels: divide x and w by the "
                         "image width, y and h by its height)")
    group = entry.get("is_group_of", False)
    if not isinstance(group, bool):
        raise ValueError(f"{path}: {where}: 'is_group_of' must be true or false, got {json.dumps(group)}")
    return LayoutObject(category, (x0, y0, w, h), group)  # (the builder clamps the far corner to 1)


def read_layout_file(path: str) -> List[List[LayoutObject]]:
    """The layouts of a JSON layout file (see the module docstring), structure checked."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"layout file not found: {path}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e}); expected {FORMAT}") from None
    if not isinstance(data, list) or not data:
        raise ValueError(f"{path}: expected {FORMAT}, got {'an empty list' if data == [] else type(data).__name__}")
    if all(isinstance(entry, dict) for entry in data):
        data = [data]  # one layout
    elif not all(isinstance(entry, list) for entry in data):
        bad = next((i for i, entry in enumerate(data) if not isinstance(entry, (list, dict))), None)
        kind = "objects and lists mixed" if bad is None else f"entry {bad} is {json.dumps(data[bad])}"
        raise ValueError(f"{path}: expected {FORMAT}; {kind}")
    return [[_object(path, f"layout {i}, object {j}", entry) for j, entry in enumerate(layout)]
            for i, layout in enumerate(data)]


def describe_layout(layout: Sequence[LayoutObject]) -> str:
    """A layout as the file's JSON (for the PNG metadata of its samples)."""
    return json.dumps([{"category": o.category_no, "bbox": list(o.bbox), **({"is_group_of": True}
                                                                            if o.is_group_of else {})}
                       for o in layout])


def layout_file_ids(layouts: Sequence[Sequence[LayoutObject]], builder: LayoutTokenBuilder, path: str) -> np.ndarray:
    """int32 (len(layouts), builder.embedding_dim) token ids of ``read_layout_file``'s layouts over the
    whole image (no crop, no flip, the objects in the file's order), checked against the model's builder."""
    classes = builder.no_object_classes
    # Without the class count, any id below the padding token is a possible category of the model.
    limit = classes if classes is not None else builder.none
    what = "object classes" if classes is not None else f"layout tokens below the padding token {builder.none}"
    rows = []
    for i, layout in enumerate(layouts):
        if len(layout) > builder.no_max_objects:
            raise ValueError(f"{path}: layout {i} has {len(layout)} objects; the model's layouts hold at most "
                             f"{builder.no_max_objects} (no_max_objects)")
        for j, obj in enumerate(layout):
            where = f"{path}: layout {i}, object {j}"
            if obj.category_no >= limit:
                raise ValueError(f"{where}: category {obj.category_no} is outside the model's {limit} {what} "
                                 f"(categories 0 .. {limit - 1})")
            if obj.is_group_of and not builder.use_group_parameter:
                raise ValueError(f"{where}: is_group_of is not encoded by this model's layouts "
                                 "(use_group_parameter false): leave it out")
            if obj.is_group_of and classes is None:
                raise ValueError(f"{where}: is_group_of needs the model's number of object classes (its token is "
                                 "category + no_object_classes), which this model does not record (a released "
                                 "file, or a run whose data.layout.no_object_classes was unset): leave it out")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # (an empty layout: the builder warns "no annotations")
            rows.append(builder.build(layout))
    return np.stack(rows).astype(np.int32)
