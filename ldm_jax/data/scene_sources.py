"""The label-map and object-layout sources of ``create_dataset`` (``data.name``), built from the data config:

* "segmentation_folder": ``data.path`` with images/ + labels/ (``segmentation.SegmentationFolderSource``;
  ``data.num_classes``, ``data.ignore_label``, ``data.shift_labels``, ``data.image_dir``, ``data.label_dir``);
* "coco_layout": ``data.path`` (images) + ``data.annotations`` (COCO instances JSON;
  ``coco_layout.CocoLayoutSource``, filtered by ``data.layout``'s min_object_area /
  min_objects_per_image / no_max_objects);
* "synthetic_segmentation" / "synthetic_layout": the generated scenes of ``synthetic_scenes.py``
  (``data.num_examples``, ``data.num_classes``, ``data.image_size`` high, 5/4 as wide).

Layout sources' objects become ``"layout_ids"`` through ``layout_builder(data.layout)`` (a
``layout_tokens.LayoutTokenBuilder``; ``LAYOUT_DEFAULTS`` are taming's scene-image settings, those of
the released layout2img model: 30 objects, 8192 tokens, crop box encoded, 92 ids).
"""
from __future__ import annotations

from typing import Any

from ldm_jax.data.pipeline import _get

# data.layout: the builder of the released layout2img model's data (taming's scene configs) and its filters.
LAYOUT_DEFAULTS: dict[str, Any] = {
    "no_max_objects": 30,  # objects per layout (images with more are left out, as max_objects_per_image)
    "no_tokens": 8192,  # vocabulary: coordinate grid int(sqrt(8192)) = 90 per side, last id = none
    "encode_crop": True,  # append the crop box's two tokens (length 3 * 30 + 2 = 92)
    "use_group_parameter": True,  # is_group_of (COCO iscrowd) in the object token
    "use_additional_parameters": False,  # OpenImages occluded / depiction / inside flags
    "no_object_classes": None,  # None: the data's category count
    "min_object_area": 1e-5,  # relative box area an object needs to be kept
    "min_objects_per_image": 2,  # images with fewer kept objects are left out
}


def layout_config(data_config) -> dict:
    """``data.layout`` over ``LAYOUT_DEFAULTS`` (unknown keys are an error)."""
    layout = _get(data_config, "layout") or {}
    layout = dict(layout.to_dict() if hasattr(layout, "to_dict") else layout)
    unknown = sorted(set(layout) - set(LAYOUT_DEFAULTS))
    if unknown:
        raise ValueError(f"data.layout: unknown keys {unknown}; expected {sorted(LAYOUT_DEFAULTS)}")
    return {**LAYOUT_DEFAULTS, **layout}


def layout_builder(data_config, source=None):
    """The ``LayoutTokenBuilder`` of ``data.layout`` (no_object_classes: the source's count by default)."""
    from ldm_jax.data.layout_tokens import LayoutTokenBuilder

    n = getattr(source, "num_classes", None) if source is not None else None
    return LayoutTokenBuilder.from_config(layout_config(data_config), no_object_classes=n)


SCENE_SOURCES = ("segmentation_folder", "synthetic_segmentation", "coco_layout", "synthetic_layout")


def make_scene_source(data_config, name: str, split: str):
    """The source ``name`` (one of ``SCENE_SOURCES``) for ``split`` from the data config."""
    import os

    image_size = _get(data_config, "image_size") or 16
    synthetic = dict(height=int(image_size), seed=0 if split == "train" else 1,
                     num_examples=int(_get(data_config, "num_examples")))
    if name == "synthetic_segmentation":
        from ldm_jax.data.synthetic_scenes import SyntheticSegmentationSource

        return SyntheticSegmentationSource(**synthetic, num_classes=int(_get(data_config, "num_classes") or 5))
    if name == "synthetic_layout":
        from ldm_jax.data.synthetic_scenes import SyntheticLayoutSource

        return SyntheticLayoutSource(**synthetic, num_classes=int(_get(data_config, "num_classes") or 5))
    root = _get(data_config, "path")
    if root and os.path.isdir(os.path.join(root, split)):
        root = os.path.join(root, split)  # optional per-split sub-folders
    if name == "segmentation_folder":
        from ldm_jax.data.segmentation import SegmentationFolderSource

        return SegmentationFolderSource(root, num_classes=_get(data_config, "num_classes"),
                                        image_dir=_get(data_config, "image_dir"),
                                        label_dir=_get(data_config, "label_dir"),
                                        ignore_label=_get(data_config, "ignore_label"),
                                        shift_labels=bool(_get(data_config, "shift_labels")))
    from ldm_jax.data.coco_layout import CocoLayoutSource

    layout = layout_config(data_config)
    annotations = _get(data_config, "annotations")
    if annotations is not None and not isinstance(annotations, str):
        annotations = [str(a) for a in annotations]
    return CocoLayoutSource(root, annotations, min_object_area=float(layout["min_object_area"]),
                            min_objects_per_image=int(layout["min_objects_per_image"]),
                            max_objects_per_image=int(layout["no_max_objects"]))
