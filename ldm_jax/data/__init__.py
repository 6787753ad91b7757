"""Input pipelines and the built-in "emoji" dataset.

    from ldm_jax.data import create_dataset
    ds = create_dataset(config.data, split="train", global_batch_size=64)
    batch = next(ds)   # {"image": uint8 (B, H, W, 3), "caption": str (B,), "index": int64 (B,), ...}

Importing this package registers the TFDS builder "emoji" (`tfds.builder("emoji")`,
`tfds.data_source("emoji", split=..., data_dir=...)`), which prepares offline from
the packaged asset and reads without TensorFlow.
"""

from ldm_jax.data import emoji  # noqa: F401  (registers the TFDS builder "emoji")
from ldm_jax.data.folder import FolderSource
from ldm_jax.data.pipeline import DEFAULTS, DataIterator, TFDSSource, create_dataset, make_source

__all__ = ["DEFAULTS", "DataIterator", "FolderSource", "TFDSSource", "create_dataset", "make_source"]
