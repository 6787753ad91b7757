"""Images with object boxes from COCO-style instance annotations: the data of layout-to-image LDMs.

    src = CocoLayoutSource("/data/coco/train2017", "/data/coco/annotations/instances_train2017.json")
    src.load(i) -> {"image": uint8 (H, W, 3), "objects": (LayoutObject, ...), "caption": ""}

(``data.name="coco_layout"``, ``data.path`` the images folder, ``data.annotations`` the JSON, or a list
of JSONs over the same images, e.g. COCO's instances + stuff files.) The JSON holds ``images``
(``id``, ``file_name`` relative to the images folder, ``width``, ``height``), ``annotations``
(``image_id``, ``category_id``, ``bbox`` [x, y, w, h] in pixels, optional ``iscrowd``) and
``categories`` (``id``, ``name``). The reading follows taming-transformers' ``AnnotatedObjectsCoco``
(the data of the scene-synthesis transformers and of ``ObjectsBoundingBoxConditionalBuilder``):

* categories named "other" are left out; the category number of an id is its index among the
  category ids sorted *as strings* (taming's ``setup_category_id_and_number``); annotations of an
  unknown category are skipped;
* boxes become relative (x / width, y / height, w / width, h / height), the area is the relative
  box area, ``iscrowd`` is the object's ``is_group_of``;
* per image, only objects with area > ``min_object_area`` are kept, and only images with
  ``min_objects_per_image`` <= objects <= ``max_objects_per_image`` (taming's COCO config:
  1e-5, 2, 30), ordered by file name; the objects keep the JSON's order (the builder shuffles).

The pipeline turns the objects into ``"layout_ids"`` with the crop box and flip of the image
(``ldm_jax.data.layout_tokens``). A malformed JSON entry (an annotation of an image that is not
listed, a box that is not 4 numbers with w, h >= 0) is an error naming the file and the entry; an
image whose decoded size differs from its JSON size stops the pipeline (its boxes would be wrong);
an undecodable image is skipped like any unreadable example.
"""
from __future__ import annotations

import json
import os
from collections import defaultdict
from typing import Dict, List, Sequence, Union

import numpy as np

from ldm_jax.data.folder import read_rgb
from ldm_jax.data.layout_tokens import LayoutObject


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"annotation file {path} does not exist") from None
    except ValueError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise ValueError(f"{path}: expected COCO instance annotations with lists 'images', 'annotations' and "
                             f"'categories'; '{key}' is missing")
    return data


class CocoLayoutSource:
    """Random-access source of (image, objects) pairs (see the module docstring)."""

    has_labels = False
    has_objects = True

    def __init__(self, images_dir: str, annotations: Union[str, Sequence[str]], *, min_object_area: float = 1e-5,
                 min_objects_per_image: int = 2, max_objects_per_image: int = 30):
        if not images_dir or not os.path.isdir(images_dir):
            raise FileNotFoundError(f"image folder {images_dir!r} (data.path) does not exist")
        if not annotations:
            raise ValueError("data.annotations: give the COCO instances JSON (or a list of JSONs)")
        self.root = os.path.abspath(images_dir)
        paths = [annotations] if isinstance(annotations, (str, os.PathLike)) else list(annotations)
        datas = [(str(p), _read_json(str(p))) for p in paths]

        categories: Dict[str, str] = {}
        for _, data in datas:
            for cat in data["categories"]:
                if cat.get("name") != "other":
                    categories[str(cat["id"])] = str(cat.get("name", cat["id"]))
        self.category_ids = sorted(categories)  # string order, as taming
        self.category_names = [categories[c] for c in self.category_ids]
        number = {c: i for i, c in enumerate(self.category_ids)}

        images: Dict[str, tuple] = {}
        for path, data in datas:
            for img in data["images"]:
                try:
                    images[str(img["id"])] = (str(img["file_name"]), int(img["width"]), int(img["height"]))
                except (KeyError, TypeError, ValueError) as err:
                    raise ValueError(f"{path}: image entry {img!r} needs id, file_name, width and height") from err
        objects: Dict[str, List[LayoutObject]] = defaultdict(list)
        for path, data in datas:
            for ann in data["annotations"]:
                image_id = str(ann.get("image_id"))
                if image_id not in images:
                    raise ValueError(f"{path}: annotation {ann.get('id')!r} refers to image_id {image_id} that has "
                                     "no entry in 'images'")
                category = str(ann.get("category_id"))
                if category not in number:
                    continue
                box = ann.get("bbox")
                if (not isinstance(box, (list, tuple)) or len(box) != 4
                        or not all(isinstance(v, (int, float)) and np.isfinite(v) for v in box)
                        or box[2] < 0 or box[3] < 0):
                    raise ValueError(f"{path}: annotation {ann.get('id')!r} (image {image_id}) has bbox {box!r}; "
                                     "expected [x, y, width, height] in pixels with width, height >= 0")
                _, width, height = images[image_id]
                rel = (box[0] / width, box[1] / height, box[2] / width, box[3] / height)
                objects[image_id].append(LayoutObject(number[category], rel, bool(ann.get("iscrowd", 0))))
        kept = []
        for image_id, objs in objects.items():
            objs = [o for o in objs if o.bbox[2] * o.bbox[3] > min_object_area]
            if min_objects_per_image <= len(objs) <= max_objects_per_image:
                kept.append((images[image_id], tuple(objs)))
        if not kept:
            raise ValueError(f"{', '.join(p for p, _ in datas)}: no image has {min_objects_per_image}.."
                             f"{max_objects_per_image} objects of area > {min_object_area} (data.layout."
                             "min_objects_per_image / max_objects_per_image / min_object_area)")
        kept.sort(key=lambda item: item[0][0])
        self.files = [k[0][0] for k in kept]
        self.sizes = [(k[0][1], k[0][2]) for k in kept]
        self.objects = [k[1] for k in kept]
        self.captions = [""] * len(self.files)

    @property
    def num_classes(self) -> int:
        """Category count: the builder's no_object_classes."""
        return len(self.category_ids)

    def __len__(self) -> int:
        return len(self.files)

    def describe(self, index: int) -> str:
        return os.path.join(self.root, self.files[index])

    def load(self, index: int) -> dict:
        path = self.describe(index)
        image = read_rgb(path)
        width, height = self.sizes[index]
        if image.shape[:2] != (height, width):
            from ldm_jax.data.pipeline import ExampleFormatError

            raise ExampleFormatError(f"the image is {image.shape[1]}x{image.shape[0]} but its annotations give "
                                     f"{width}x{height}: its boxes would not match")
        return {"image": image, "objects": self.objects[index], "caption": ""}
