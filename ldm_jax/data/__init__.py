"""Input pipelines and the built-in "emoji" dataset.

    from ldm_jax.data import create_dataset
    ds = create_dataset(config.data, split="train", global_batch_size=64)
    batch = next(ds)   # {"image": uint8 (B, H, W, 3), "caption": str (B,), "index": int64 (B,), ...}

Importing this package registers the TFDS builder "emoji" (`tfds.builder("emoji")`,
`tfds.data_source("emoji", split=..., data_dir=...)`), which prepares offline from
the packaged asset and reads without TensorFlow.

Label maps and object layouts (semantic synthesis, layout-to-image): `SegmentationFolderSource`
(segmentation.py), `CocoLayoutSource` (coco_layout.py), the generated `Synthetic*Source`s
(synthetic_scenes.py) and `LayoutTokenBuilder` (layout_tokens.py: taming's
ObjectsBoundingBoxConditionalBuilder ids); layout_file.py reads the JSON layouts of
`sample.py --layout`.
"""

from ldm_jax.data import emoji  # noqa: F401  (registers the TFDS builder "emoji")
from ldm_jax.data.coco_layout import CocoLayoutSource
from ldm_jax.data.folder import FolderSource
from ldm_jax.data.layout_tokens import LayoutObject, LayoutTokenBuilder
from ldm_jax.data.pipeline import (DEFAULTS, DataIterator, ExampleFormatError, TFDSSource, create_dataset,
                                   make_source)
from ldm_jax.data.segmentation import SegmentationFolderSource
from ldm_jax.data.synthetic_scenes import SyntheticLayoutSource, SyntheticSegmentationSource

__all__ = ["DEFAULTS", "CocoLayoutSource", "DataIterator", "ExampleFormatError", "FolderSource", "LayoutObject",
           "LayoutTokenBuilder", "SegmentationFolderSource", "SyntheticLayoutSource", "SyntheticSegmentationSource",
           "TFDSSource", "create_dataset", "make_source"]
