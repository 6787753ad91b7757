"""TFDS builder "emoji": Noto Color Emoji images with their names as captions.

A small built-in text-to-image dataset for smoke runs and demos: ~3,800 emoji
rendered at 64x64 RGB on white, captioned with their Unicode / CLDR names
("red apple", "flag of japan", "man technologist medium skin tone").

Everything comes from the packaged file `assets/emoji64.npz` (built once by
`tools/build_emoji_dataset.py`; see `assets/EMOJI_LICENSE.txt`), so
`download_and_prepare` needs no network and no TensorFlow: images are
PNG-encoded with PIL and written as array_record, which `tfds.data_source`
reads back without TensorFlow.

    import ldm_jax.data  # registers the builder
    tfds.builder("emoji", data_dir=...).download_and_prepare()
    ds = tfds.data_source("emoji", split="train", data_dir=...)
    ds[0]  # {"image": uint8 (64, 64, 3), "caption": b"...", "cldr_name": b"...", "codepoint": b"U+..."}

`data_dir` defaults to TFDS's own default ($TFDS_DATA_DIR or ~/tensorflow_datasets).
"""

from __future__ import annotations

import io
import os

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from PIL import Image
from tensorflow_datasets.core import utils as tfds_utils

ASSET_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "emoji64.npz")
IMAGE_SHAPE = (64, 64, 3)


SPLITS = ("train", "validation")  # every 20th image is in the validation split


def load_asset(path: str = ASSET_PATH) -> dict[str, np.ndarray]:
    """The packaged arrays: images (N,64,64,3) uint8, captions, cldr_names, codepoints, is_validation."""
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"emoji asset {path} is missing; rebuild it with tools/build_emoji_dataset.py"
        )
    with np.load(path, allow_pickle=False) as data:
        return {name: data[name] for name in data.files}


class Emoji(tfds.core.GeneratorBasedBuilder):
    """Noto Color Emoji, 64x64 RGB, captioned with emoji names."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Noto Color Emoji 2.042 (Emoji 15.1), 3,780 images."}

    @tfds_utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        # TFDS 4.9.10's default probes `importlib_resources.abc`, a backport that
        # it only installs on Python < 3.9 (ModuleNotFoundError in
        # download_and_prepare); the answer is simply this file.
        return epath.Path(os.path.abspath(__file__))

    def __init__(self, *, file_format=None, **kwargs):
        # array_record by default: random access and reading without TensorFlow.
        super().__init__(file_format=file_format or "array_record", **kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        # Built directly (not dataset_info_from_configs): this builder has no
        # metadata folder (README/CITATIONS) beside it.
        return tfds.core.DatasetInfo(
            builder=self,
            description=(
                "Noto Color Emoji glyphs rendered at 64x64 on a white background, "
                "captioned with their lower-case Unicode names (one code point) or "
                "CLDR short names (sequences). Every 20th image is the validation split."
            ),
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=IMAGE_SHAPE, encoding_format="png"),
                    "caption": tfds.features.Text(),
                    "cldr_name": tfds.features.Text(),
                    "codepoint": tfds.features.Text(),
                }
            ),
            supervised_keys=None,
            homepage="https://github.com/googlefonts/noto-emoji",
            license="Apache-2.0 (Noto Color Emoji images); see EMOJI_LICENSE.txt",
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download: the data ships with the package
        data = load_asset()  # decompressed once for both splits
        train, validation = SPLITS
        return {
            train: self._generate_examples(data, validation=False),
            validation: self._generate_examples(data, validation=True),
        }

    def _generate_examples(self, data: dict[str, np.ndarray], validation: bool):
        for i in np.flatnonzero(data["is_validation"] == validation):
            buf = io.BytesIO()
            # PNG bytes are passed through as-is (encoding numpy arrays would need
            # TF); fast compression: preparing is part of every first run.
            Image.fromarray(data["images"][i]).save(buf, format="png", compress_level=1)
            yield int(i), {
                "image": buf.getvalue(),
                "caption": str(data["captions"][i]),
                "cldr_name": str(data["cldr_names"][i]),
                "codepoint": str(data["codepoints"][i]),
            }
