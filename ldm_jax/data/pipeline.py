"""Input pipeline: one entry point for every data source.

    ds = create_dataset(config.data, split="train", global_batch_size=256,
                        process_index=jax.process_index(), process_count=jax.process_count(), seed=0)
    batch = next(ds)
    # {"image": uint8 (L, H, W, 3), "caption": str (L,), "index": int64 (L,),
    #  "label": int32 (L,)  if the source has labels,
    #  "mask": bool (L,)    only with drop_remainder=False (False marks padding),
    #  "segmentation": int32 (L, H, W) / "layout_ids": int32 (L, T)  for label-map / layout sources}
    state = ds.get_state()   # small JSON-serialisable dict
    ds.set_state(state)      # the following batches are exactly those of an uninterrupted run
    ds.num_skipped           # unreadable examples met so far (each logged once with its path)

Sources (`data.name`): "emoji" (the built-in dataset, see emoji.py), "folder"
(an image folder, see folder.py), the label-map / layout sources of scene_sources.py
("segmentation_folder", "coco_layout", "synthetic_segmentation", "synthetic_layout"),
or any TFDS dataset prepared as array_record, read by `tfds.data_source` without
TensorFlow. With `data.use_tfds_load=True` and TensorFlow importable, TFDS datasets are read through `tfds.load` instead
(see `_TFLoadIterator`; that path streams, so it cannot skip single corrupt
examples or report example indices).

The order of examples is a pure function of (seed, position), which is what
makes sharding and resuming exact:
  * the stream is a sequence of epochs; epoch e is a permutation of the
    N examples keyed by (seed, e) (identity if shuffle=False), cut to
    floor(N/G)*G positions with drop_remainder, or padded to ceil(N/G)*G by
    wrapping around (padding gets mask=False) without;
  * global batch b is positions [b*G, (b+1)*G); process p of P reads only
    positions [b*G + p*L, b*G + (p+1)*L) with L = G/P, so P processes with
    local batch L together see exactly what one process with batch G sees;
  * random crops and flips draw from (seed, position);
  * an unreadable example at position k is replaced by the next readable one
    in the stream (positions k+1, k+2, ...), which again depends on nothing
    but the stream, so the batch stays full and all processes agree;
  * the state is the number of global batches consumed (plus the unreadable
    indices found), independent of the number of processes.

How grain is used: the position -> example map is explicit (above) rather
than a chain of MapDataset.shuffle/repeat/slice, because the
replace-with-next-readable rule and the process-count-independent layout need
that map to be evaluated at any position from any process (epoch permutations
are numpy permutations, or for more than 2**20 examples grain's stateless
`grain.experimental.index_shuffle` with O(1) memory), and
`MapDataset.range(...).map(...).to_iter_dataset(ReadOptions).batch(...)` does
the decoding on a few threads, the read-ahead and the batching.

`data_config` keys (an ml_collections.ConfigDict or dict; missing keys take the defaults in
`DEFAULTS`): name, data_dir, path, image_size, image_key, caption_key, label_key,
caption_template, exclude_captions, random_flip, center_crop, shuffle, drop_remainder,
num_epochs, num_threads, prefetch_batches, folder_labels, download, use_tfds_load; for label
maps num_classes, ignore_label, shift_labels, image_dir, label_dir; for layouts annotations,
layout (``scene_sources.LAYOUT_DEFAULTS``); num_examples for the synthetic scenes.

Semantic maps and layouts (the data of the LDM semantic-synthesis and layout-to-image models):
"segmentation_folder" (images + label PNGs, ``segmentation.py``) and "synthetic_segmentation"
add ``"segmentation"`` int32 (L, S, S) to the batch: each label map cropped, resized (nearest)
and flipped exactly as its image (``preprocess_example``), -1 where ``ignore_label`` was;
"coco_layout" (COCO instance JSON, ``coco_layout.py``) and "synthetic_layout" add
``"layout_ids"`` int32 (L, 3 * no_max_objects [+ 2]): the objects through taming's
``ObjectsBoundingBoxConditionalBuilder`` (``layout_tokens.py``) with the image's crop box and
flip, the objects shuffled from the slot's (seed, position) generator. A readable example that
contradicts the config (labels outside num_classes, a label map of another size, an image whose
size is not its annotation's) raises ``ExampleFormatError`` naming the file instead of being
skipped.

`exclude_captions` (a regular expression, `re.search`): examples whose caption matches are
left out of the split (`CaptionFilteredSource`); the captions are read once at start, which
decodes every example of a TFDS split (meant for small datasets such as the emoji one).
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
import threading
from typing import Any

import grain
import numpy as np
from grain.experimental import index_shuffle
from PIL import Image

logger = logging.getLogger("ldm_jax.data")

DEFAULTS: dict[str, Any] = {
    "name": "emoji",  # "emoji" | "folder" | any TFDS name
    "data_dir": None,  # TFDS data_dir (None: $TFDS_DATA_DIR or ~/tensorflow_datasets)
    "path": None,  # root of the image folder (name="folder")
    "image_size": None,  # output side; None keeps the source size (must be uniform)
    "image_key": "image",  # TFDS feature holding the image
    "caption_key": "caption",  # TFDS text feature, or a ClassLabel feature -> template; None: ""
    "label_key": None,  # TFDS ClassLabel/int feature returned as "label"
    "caption_template": "a photo of a {}",  # caption from class names ("a" -> "an" before a vowel)
    "exclude_captions": None,  # regex: leave out examples whose caption matches (None: keep all)
    "random_flip": False,  # horizontal flip with probability 1/2
    "center_crop": True,  # center square crop + resize; False: resize shorter side + random crop
    "shuffle": True,  # new permutation every epoch, drawn from (seed, epoch)
    "drop_remainder": True,  # cut each epoch to whole global batches; False: pad + "mask"
    "num_epochs": None,  # None: repeat forever
    "num_threads": 2,  # decoding threads
    "prefetch_batches": 2,  # local batches decoded ahead
    "folder_labels": False,  # folder source: label = top-level sub-folder
    "download": True,  # let TFDS prepare the dataset if missing (offline for "emoji")
    "use_tfds_load": False,  # read TFDS through tfds.load (needs TensorFlow)
    # Label maps (name "segmentation_folder" / "synthetic_segmentation", see segmentation.py):
    "num_classes": None,  # classes of the label maps (required for a folder; synthetic default 5)
    "ignore_label": None,  # label value that becomes -1 (one-hot all zeros), e.g. 255
    "shift_labels": False,  # taming's shift_segmentation: uint8 labels + 1, 255 -> 0
    "image_dir": "images",  # sub-folders of data.path holding the images and the label PNGs
    "label_dir": "labels",
    # Object layouts (name "coco_layout" / "synthetic_layout", see coco_layout.py, layout_tokens.py):
    "annotations": None,  # COCO instances JSON (or a list of JSONs) for name "coco_layout"
    "layout": None,  # LayoutTokenBuilder fields + filters (scene_sources.LAYOUT_DEFAULTS)
    "num_examples": 64,  # size of a built-in synthetic scene dataset
}

_STATE_VERSION = 1


def _get(cfg, key):
    if cfg is None:
        return DEFAULTS[key]
    return cfg.get(key, DEFAULTS[key]) if hasattr(cfg, "get") else getattr(cfg, key, DEFAULTS[key])


# ----------------------------------------------------------------------------- sources


def _apply_template(template: str, name: str) -> str:
    name = name.replace("_", " ")
    text = template.format(name)
    if name[:1].lower() in "aeiou" and " a " + name in " " + text:
        text = (" " + text).replace(" a " + name, " an " + name, 1)[1:]
    return text


# data.name values besides TFDS's ("emoji": a TFDS builder this package registers; "synthetic": loop.py's;
# then scene_sources.SCENE_SOURCES).
BUILTIN_NAMES = ("synthetic", "folder", "emoji")


@contextlib.contextmanager
def unknown_dataset_as_config_error(name):
    """TFDS's DatasetNotFoundError lists its whole catalogue (over a thousand names): a short
    ValueError naming the key instead, and how to list the catalogue."""
    import tensorflow_datasets as tfds

    from ldm_jax.data.scene_sources import SCENE_SOURCES

    try:
        yield
    except tfds.core.registered.DatasetNotFoundError:
        raise ValueError(f"config key data.name={name!r}: neither a built-in dataset {BUILTIN_NAMES + SCENE_SOURCES} "
                         "nor a registered TFDS dataset (list TFDS's names with: python -c \"import "
                         "tensorflow_datasets as tfds; print(tfds.list_builders())\")") from None


def check_dataset_name(name, data_dir=None, splits=None) -> None:
    """Before anything is built (``config_keys.check_config_keys``): a ``data.name`` that is neither
    built in nor a TFDS dataset is the ValueError of ``unknown_dataset_as_config_error``. As where the
    data is opened, ``tfds.builder`` also finds a dataset prepared in ``data_dir`` without its builder
    code (from its dataset_info.json; nothing is downloaded). Names with a namespace
    (``huggingface:...``) are left to TFDS when the data is opened.

    ``splits``: {config key: TFDS split spec} the run will read (``"train[:90%]+validation"`` reads
    two splits); a split the dataset does not have is a ValueError naming the key and the dataset's
    splits. Checked where the splits are known without preparing anything: the emoji dataset and a
    TFDS dataset already prepared (its dataset_info.json lists them)."""
    from ldm_jax.data.scene_sources import SCENE_SOURCES

    if name == "emoji":  # (built in, but read through TFDS: its splits are known)
        from ldm_jax.data.emoji import SPLITS as available
    elif not isinstance(name, str) or name in BUILTIN_NAMES + SCENE_SOURCES or ":" in name:
        return
    else:
        import tensorflow_datasets as tfds

        with unknown_dataset_as_config_error(name):
            builder = tfds.builder(name, data_dir=data_dir)
        available = tuple(builder.info.splits) if builder.is_prepared() else ()
    for key, spec in (splits or {}).items():
        missing = [s for s in _split_names(spec) if s != "all" and s not in available]  # ("all": TFDS's every split)
        if available and missing:
            value, read_by = (name, "which training reads") if key == "data.name" else (spec, "")
            raise ValueError(f"config key {key}={value!r}: dataset {name!r} has no split {missing[0]!r}"
                             f"{', ' + read_by if read_by else ''} (its splits: {', '.join(sorted(available))})")


def _split_names(spec: str) -> list[str]:
    """The split names of a TFDS split spec: ``"train[:90%]+validation"`` -> train, validation."""
    return [part.split("[", 1)[0].strip() for part in str(spec).split("+")]


class TFDSSource:
    """Random access over a TFDS array_record split via `tfds.data_source` (no TensorFlow)."""

    def __init__(self, name: str, split: str, data_dir, *, image_key: str, caption_key,
                 label_key, caption_template: str, download: bool):
        import tensorflow_datasets as tfds

        if name == "emoji":
            from ldm_jax.data import emoji  # noqa: F401  (registers the builder)
        self.name, self.split = name, split
        with unknown_dataset_as_config_error(name):
            self._ds = tfds.data_source(name, split=split, data_dir=data_dir, download=download)
        features = self._ds.dataset_info.features
        for key in (image_key, caption_key, label_key):
            if key is not None and key not in features:
                raise KeyError(f"TFDS dataset {name!r} has no feature {key!r}; "
                               f"features: {sorted(features.keys())}")
        self.image_key, self.caption_key, self.label_key = image_key, caption_key, label_key
        self.image_shape = tuple(features[image_key].shape)
        self._caption_names = None
        if caption_key is not None and isinstance(features[caption_key], tfds.features.ClassLabel):
            self._caption_names = [_apply_template(caption_template, n)
                                   for n in features[caption_key].names]
        self.has_labels = label_key is not None

    def __len__(self) -> int:
        return len(self._ds)

    def describe(self, index: int) -> str:
        return f"tfds {self.name}[{self.split}] example {index}"

    def load(self, index: int) -> dict:
        rec = self._ds[index]
        out = {"image": np.asarray(rec[self.image_key])}
        if self.caption_key is None:
            out["caption"] = ""
        elif self._caption_names is not None:
            out["caption"] = self._caption_names[int(rec[self.caption_key])]
        else:
            cap = rec[self.caption_key]
            out["caption"] = cap.decode("utf-8") if isinstance(cap, bytes) else str(cap)
        if self.label_key is not None:
            out["label"] = int(rec[self.label_key])
        return out


class CaptionFilteredSource:
    """The examples of ``source`` whose caption does not match ``pattern`` (re.search), in
    their original order. Captions come from ``source.captions`` when the source has them
    (image folders), else from loading each example once."""

    def __init__(self, source, pattern: str):
        self.source, self.pattern = source, pattern
        regex = re.compile(pattern)
        captions = getattr(source, "captions", None)
        if captions is None:
            captions = [source.load(i).get("caption", "") for i in range(len(source))]
        self.indices = [i for i, c in enumerate(captions) if not regex.search(str(c))]
        if not self.indices:
            raise ValueError(f"data.exclude_captions={pattern!r} leaves no example of {len(source)}")
        self.has_labels = getattr(source, "has_labels", False)
        self.has_objects = getattr(source, "has_objects", False)
        # Per-example lists of the wrapped source, restricted to the kept examples; other
        # attributes (name, split, root, image_shape) are the source's.
        for attr in ("files", "captions"):
            if getattr(source, attr, None) is not None:
                setattr(self, attr, [getattr(source, attr)[i] for i in self.indices])
        logger.info("data.exclude_captions=%r: %d of %d examples kept", pattern, len(self.indices), len(source))

    def __len__(self) -> int:
        return len(self.indices)

    def describe(self, index: int) -> str:
        return self.source.describe(self.indices[index])

    def load(self, index: int) -> dict:
        return self.source.load(self.indices[index])

    def __getattr__(self, name):
        if name in ("name", "split", "root", "image_shape", "dataset_info", "_ds", "num_classes"):
            return getattr(self.source, name)
        raise AttributeError(name)


# ----------------------------------------------------------------------------- preprocessing


def _resize(image: np.ndarray, width: int, height: int) -> np.ndarray:
    if image.shape[1] == width and image.shape[0] == height:
        return image
    pil = Image.fromarray(image).resize((width, height), Image.Resampling.LANCZOS)
    return np.asarray(pil, dtype=np.uint8)


class ExampleFormatError(ValueError):
    """An example that decodes but is not what the data config says (a label map of another size or
    with labels outside the classes, a box outside the image): the pipeline stops with this error
    (naming the file) instead of skipping the example as unreadable, since every such example
    would be skipped the same way."""


def _resize_labels(labels: np.ndarray, width: int, height: int) -> np.ndarray:
    """Nearest-neighbour resize of an integer label map (PIL NEAREST: the source pixel under each
    output pixel centre), so no class is invented at the boundaries."""
    if labels.shape[1] == width and labels.shape[0] == height:
        return labels
    pil = Image.fromarray(labels.astype(np.int32), mode="I").resize((width, height), Image.Resampling.NEAREST)
    return np.asarray(pil, dtype=np.int32)


def preprocess(image: np.ndarray, image_size: int | None, *, center_crop: bool,
               random_flip: bool, rng: np.random.Generator | None) -> np.ndarray:
    """uint8 (H, W, C) -> uint8 (S, S, 3): RGB, crop/resize, optional horizontal flip."""
    return preprocess_example(image, None, image_size, center_crop=center_crop, random_flip=random_flip,
                              rng=rng)[0]


def preprocess_example(image: np.ndarray, labels: np.ndarray | None, image_size: int | None, *,
                       center_crop: bool, random_flip: bool, rng: np.random.Generator | None):
    """(image uint8 (S, S, 3), labels int32 (S, S) or None, crop box, flipped): ``preprocess`` of the
    image, the same crop / resize (nearest) / flip applied to an optional (H, W) label map, and the
    geometry for box annotations: the crop box (x0, y0, w, h) relative to the source image (None:
    the whole image) and whether the result is mirrored (the crop box is the un-mirrored one, as
    taming's ``*CropReturnCoordinates`` give it)."""
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image, got {image.dtype}")
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim != 3 or image.shape[-1] not in (1, 3, 4) or min(image.shape[:2]) < 1:
        raise ValueError(f"expected an (H, W, 1|3|4) image, got shape {image.shape}")
    if labels is not None:
        labels = np.asarray(labels)
        if labels.shape != image.shape[:2] or not np.issubdtype(labels.dtype, np.integer):
            raise ExampleFormatError(f"the label map is {labels.dtype} {labels.shape}, but must be integer "
                                     f"class indices of the image's size {image.shape[:2]}")
    if image.shape[-1] == 1:
        image = np.repeat(image, 3, axis=-1)
    elif image.shape[-1] == 4:  # composite on white
        alpha = image[..., 3:].astype(np.float32) / 255.0
        image = np.round(image[..., :3] * alpha + 255.0 * (1.0 - alpha)).astype(np.uint8)
    crop = None
    if image_size is not None:
        h, w = image.shape[:2]
        if center_crop:
            side = min(h, w)
            top, left = (h - side) // 2, (w - side) // 2
            image = _resize(image[top:top + side, left:left + side], image_size, image_size)
            if labels is not None:
                labels = _resize_labels(labels[top:top + side, left:left + side], image_size, image_size)
            crop = (left / w, top / h, side / w, side / h)
        else:
            scale = image_size / min(h, w)
            nh, nw = max(image_size, round(h * scale)), max(image_size, round(w * scale))
            image = _resize(image, nw, nh)
            top = int(rng.integers(0, nh - image_size + 1))
            left = int(rng.integers(0, nw - image_size + 1))
            image = image[top:top + image_size, left:left + image_size]
            if labels is not None:
                labels = _resize_labels(labels, nw, nh)[top:top + image_size, left:left + image_size]
            crop = (left / nw, top / nh, image_size / nw, image_size / nh)
    flipped = bool(random_flip and rng.random() < 0.5)
    if flipped:
        image = image[:, ::-1]
        labels = None if labels is None else labels[:, ::-1]
    labels = None if labels is None else np.ascontiguousarray(labels, dtype=np.int32)
    return np.ascontiguousarray(image), labels, crop, flipped


# ----------------------------------------------------------------------------- iterator


class DataIterator:
    """Deterministic, shardable, resumable batches from a random-access source.

    `source` needs `__len__`, `load(i) -> {"image", "caption"[, "label"]}` (raising
    on unreadable data), `describe(i) -> str` (a path for the warning) and
    optionally `has_labels`.
    """

    def __init__(self, source, *, global_batch_size: int, process_index: int = 0,
                 process_count: int = 1, seed: int = 0, image_size: int | None = None,
                 shuffle: bool = True, drop_remainder: bool = True, random_flip: bool = False,
                 center_crop: bool = True, num_epochs: int | None = None, num_threads: int = 2,
                 prefetch_batches: int = 2, layout_builder=None):
        if process_count < 1 or not 0 <= process_index < process_count:
            raise ValueError(f"bad process_index={process_index} / process_count={process_count}")
        if global_batch_size < 1 or global_batch_size % process_count:
            raise ValueError(f"global_batch_size={global_batch_size} must be a positive multiple "
                             f"of process_count={process_count}")
        if num_epochs is not None and num_epochs < 1:
            raise ValueError(f"num_epochs must be None or >= 1, got {num_epochs}")
        self.source = source
        self.n = len(source)
        if self.n == 0:
            raise ValueError("the data source is empty")
        self.global_batch_size = global_batch_size
        self.local_batch_size = global_batch_size // process_count
        self.process_index, self.process_count = process_index, process_count
        self.seed, self.shuffle = int(seed), bool(shuffle)
        self.image_size = image_size
        self.drop_remainder = bool(drop_remainder)
        self.random_flip, self.center_crop = bool(random_flip), bool(center_crop)
        self.has_labels = bool(getattr(source, "has_labels", False))
        # Sources whose examples carry "objects" (box annotations): their token ids ("layout_ids")
        # come from this builder (ldm_jax.data.layout_tokens.LayoutTokenBuilder), with the crop and flip.
        self.layout_builder = layout_builder
        if getattr(source, "has_objects", False) and layout_builder is None:
            raise ValueError("the data source yields object layouts; give a layout_builder (data.layout) to turn "
                             "them into token ids")
        if self.drop_remainder:
            self.per_epoch = (self.n // global_batch_size) * global_batch_size
            if self.per_epoch == 0:
                raise ValueError(f"{self.n} examples are fewer than one global batch of "
                                 f"{global_batch_size} with drop_remainder=True")
        else:
            self.per_epoch = math.ceil(self.n / global_batch_size) * global_batch_size
        self.batches_per_epoch = self.per_epoch // global_batch_size
        self.num_batches = None if num_epochs is None else num_epochs * self.batches_per_epoch
        self._num_threads, self._prefetch = int(num_threads), int(prefetch_batches)
        self._bad: dict[int, str] = {}
        self._lock = threading.Lock()
        self._epoch_seeds: dict[int, int] = {}
        self._perms: dict[int, np.ndarray] = {}
        self._batches_done = 0
        self._it = None  # grain iterator, started on the first next() (after any set_state)

    # -- position -> example

    # Up to this many examples an epoch's permutation is held in memory (8 MiB);
    # above, grain's stateless Feistel permutation is evaluated per lookup.
    IN_MEMORY_PERMUTATION_MAX = 1 << 20

    def _epoch_seed(self, epoch: int) -> int:
        seed = self._epoch_seeds.get(epoch)
        if seed is None:  # (seed, epoch) -> 32-bit seed, the same on every host and run
            seed = int(np.random.SeedSequence([self.seed, epoch]).generate_state(1)[0])
            self._epoch_seeds[epoch] = seed
        return seed

    def _permuted(self, epoch: int, offset: int) -> int:
        if self.n > self.IN_MEMORY_PERMUTATION_MAX:
            # grain.experimental.index_shuffle (what MapDataset.shuffle uses): O(1)
            # memory, ~3 us a lookup for large N (but milliseconds for tiny N).
            return index_shuffle(offset, max_index=self.n - 1, seed=self._epoch_seed(epoch),
                                 rounds=4)
        perm = self._perms.get(epoch)
        if perm is None:
            perm = np.random.default_rng(self._epoch_seed(epoch)).permutation(self.n)
            with self._lock:
                while len(self._perms) >= 3:  # read-ahead straddles at most two epochs
                    self._perms.pop(min(self._perms))
                self._perms[epoch] = perm
        return int(perm[offset])

    def example_at(self, position: int) -> tuple[int, bool]:
        """(example index, is real data) at a global stream position."""
        epoch, offset = divmod(position, self.per_epoch)
        index = offset % self.n
        if self.shuffle:
            index = self._permuted(epoch, index)
        return int(index), offset < self.n

    def _global_position(self, local_position: int) -> int:
        b, slot = divmod(local_position, self.local_batch_size)
        return b * self.global_batch_size + self.process_index * self.local_batch_size + slot

    def _mark_bad(self, index: int, err: BaseException) -> None:
        with self._lock:
            if index in self._bad:
                return
            self._bad[index] = f"{type(err).__name__}: {err}"
        logger.warning("skipping unreadable example %s (%s: %s)",
                       self.source.describe(index), type(err).__name__, err)

    def _load_slot(self, local_position: int) -> dict:
        """The example for one slot: the stream's example there, or the next readable one
        (unreadable ones are marked and skipped), plus its index and padding mask."""
        position = self._global_position(local_position)
        _, real = self.example_at(position)
        # (a layout's object order is shuffled per slot too, as taming's builder does)
        random = (self.random_flip or (self.image_size is not None and not self.center_crop)
                  or self.layout_builder is not None)
        limit = 2 * self.per_epoch + self.n  # every example is visited within this window
        for k in range(position, position + limit):
            index, _ = self.example_at(k)
            if index in self._bad:
                continue
            # Augmentation draws from (seed, slot position), not from the example used.
            rng = np.random.default_rng([self.seed, 1, position]) if random else None
            try:
                out = self._example(index, rng)
            except ExampleFormatError as err:  # readable but wrong: every such example would be skipped
                raise ExampleFormatError(f"{self.source.describe(index)}: {err}") from err
            except Exception as err:  # noqa: BLE001 - any decode failure means "unreadable"
                self._mark_bad(index, err)
                continue
            out["index"] = np.int64(index)
            if self.has_labels:
                out["label"] = np.int32(out["label"])
            if not self.drop_remainder:
                out["mask"] = np.bool_(real)
            return out
        raise RuntimeError(f"no readable example found after stream position {position} "
                           f"({len(self._bad)} of {self.n} examples are unreadable)")

    def _example(self, index: int, rng) -> dict:
        """One source example's fields ("image" preprocessed, "caption"[, "label"][, "segmentation"
        cropped / flipped with the image][, "layout_ids"]); raises when it cannot be read. ``rng``:
        the slot's augmentation generator (None: none)."""
        ex = self.source.load(index)
        image, labels, crop, flipped = preprocess_example(
            ex["image"], ex.get("segmentation"), self.image_size, center_crop=self.center_crop,
            random_flip=self.random_flip, rng=rng)
        out = {"image": image, "caption": str(ex.get("caption", ""))}
        if self.has_labels:
            out["label"] = ex["label"]
        if labels is not None:
            out["segmentation"] = labels
        if "objects" in ex:
            import random as _random
            import warnings

            # The builder's shuffle, from the slot's generator (after the crop / flip draws).
            shuffle = _random.Random(int(rng.integers(0, 2 ** 63 - 1)))
            with warnings.catch_warnings():  # (an empty / crowded layout is expected data, not news)
                warnings.simplefilter("ignore")
                try:
                    ids = self.layout_builder.build(ex["objects"], crop, flipped, shuffle)
                except ValueError as err:
                    raise ExampleFormatError(str(err)) from err
            out["layout_ids"] = ids.astype(np.int32)
        return out

    # -- iteration

    @staticmethod
    def _batch_fn(examples: list[dict]) -> dict:
        shapes = {ex["image"].shape for ex in examples}
        if len(shapes) > 1:
            raise ValueError(f"images of different shapes {sorted(shapes)} in one batch: "
                             "set data.image_size")
        out = {"image": np.stack([ex["image"] for ex in examples]),
               "caption": np.array([ex["caption"] for ex in examples], dtype=np.str_),
               "index": np.array([ex["index"] for ex in examples], dtype=np.int64)}
        # (segmentation: (L, H, W) label maps; layout_ids: (L, n_tokens) layout token ids)
        for key, dtype in (("label", np.int32), ("mask", np.bool_), ("segmentation", np.int32),
                           ("layout_ids", np.int32)):
            if key in examples[0]:
                out[key] = np.array([ex[key] for ex in examples], dtype=dtype)
        return out

    def _start(self) -> None:
        start = self._batches_done * self.local_batch_size
        if self.num_batches is None:
            stop = 2**62  # "forever"
        else:
            stop = max(start, self.num_batches * self.local_batch_size)
        ds = grain.MapDataset.range(start, stop).map(self._load_slot)
        read = grain.ReadOptions(num_threads=self._num_threads,
                                 prefetch_buffer_size=max(1, self._prefetch) * self.local_batch_size)
        self._it = iter(ds.to_iter_dataset(read).batch(self.local_batch_size,
                                                       batch_fn=self._batch_fn))

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self.num_batches is not None and self._batches_done >= self.num_batches:
            raise StopIteration
        if self._it is None:
            self._start()
        batch = next(self._it)
        self._batches_done += 1
        return batch

    @property
    def num_skipped(self) -> int:
        """Distinct unreadable examples found so far (each was logged once)."""
        return len(self._bad)

    def _fingerprint(self) -> dict:
        return {"num_examples": self.n, "global_batch_size": self.global_batch_size,
                "seed": self.seed, "shuffle": self.shuffle, "drop_remainder": self.drop_remainder}

    def get_state(self) -> dict:
        """JSON-serialisable position: global batches consumed + unreadable indices found."""
        with self._lock:
            bad = sorted(self._bad)
        return {"version": _STATE_VERSION, "batches": self._batches_done,
                "unreadable": bad, **self._fingerprint()}

    def set_state(self, state: dict) -> None:
        if state.get("version") != _STATE_VERSION:
            raise ValueError(f"unknown data state version {state.get('version')!r}")
        mismatch = {k: (state.get(k), v) for k, v in self._fingerprint().items() if state.get(k) != v}
        if mismatch:
            raise ValueError(f"data state does not match this dataset (saved, current): {mismatch}")
        self._it = None  # drop the old read-ahead first
        with self._lock:
            self._bad = {int(i): "unreadable (from a saved state)"
                         for i in state.get("unreadable", [])}
        self._batches_done = int(state["batches"])  # the next next() restarts here

    def close(self) -> None:
        self._it = None


class _TFLoadIterator:
    """`tfds.load` (TensorFlow) reader with the DataIterator interface.

    For TFDS datasets prepared as tfrecord, which `tfds.data_source` cannot
    read. It streams, so it differs from DataIterator: a seeded tf.data shuffle
    buffer (reshuffled each epoch) instead of a full permutation; global batches
    are consecutive groups of G examples of the repeated stream (they may span
    epochs); every process reads the whole stream and keeps its slice of each
    group (same global order for any process count, at P times the reading);
    resuming skips the consumed examples; corrupt records are dropped by
    tf.data's ignore_errors, not replaced one by one, not counted; "index" is
    the position in the stream. Not exercised by the tests (no TensorFlow there).
    """

    def __init__(self, cfg, split: str, *, global_batch_size: int, process_index: int,
                 process_count: int, seed: int, image_size: int | None, num_epochs):
        import tensorflow_datasets as tfds

        if global_batch_size % process_count or not 0 <= process_index < process_count:
            raise ValueError(f"global_batch_size={global_batch_size} must be a multiple of "
                             f"process_count={process_count} > process_index={process_index}")
        self._cfg = {key: _get(cfg, key) for key in DEFAULTS}
        self._split, self._seed, self._num_epochs = split, int(seed), num_epochs
        self.global_batch_size = global_batch_size
        self.local_batch_size = global_batch_size // process_count
        self.process_index, self.image_size = process_index, image_size
        with unknown_dataset_as_config_error(self._cfg["name"]):
            builder = tfds.builder(self._cfg["name"], data_dir=self._cfg["data_dir"])
        if self._cfg["download"]:
            builder.download_and_prepare()
        features = builder.info.features
        ckey = self._cfg["caption_key"]
        self._names = None
        if ckey is not None and isinstance(features[ckey], tfds.features.ClassLabel):
            self._names = [_apply_template(self._cfg["caption_template"], n)
                           for n in features[ckey].names]
        self.has_labels = self._cfg["label_key"] is not None
        self.num_skipped = 0
        self._batches_done = 0
        self._it = None

    def _start(self) -> None:
        import tensorflow as tf
        import tensorflow_datasets as tfds

        c = self._cfg
        read_config = tfds.ReadConfig(shuffle_seed=self._seed, interleave_cycle_length=1)
        ds = tfds.load(c["name"], split=self._split, data_dir=c["data_dir"],
                       shuffle_files=bool(c["shuffle"]), read_config=read_config, download=False)
        ds = ds.ignore_errors()
        if c["shuffle"]:
            ds = ds.shuffle(16 * self.global_batch_size, seed=self._seed,
                            reshuffle_each_iteration=True)
        ds = ds.repeat(self._num_epochs).skip(self._batches_done * self.global_batch_size)
        self._it = iter(tfds.as_numpy(ds.prefetch(tf.data.AUTOTUNE)))

    def __iter__(self):
        return self

    def _caption(self, ex) -> str:
        key = self._cfg["caption_key"]
        if key is None:
            return ""
        if self._names is not None:
            return self._names[int(ex[key])]
        cap = ex[key]
        return cap.decode("utf-8") if isinstance(cap, bytes) else str(cap)

    def __next__(self) -> dict:
        import itertools

        if self._it is None:
            self._start()
        c, g = self._cfg, self.global_batch_size
        group = list(itertools.islice(self._it, g))
        lo = self.process_index * self.local_batch_size
        local = group[lo:lo + self.local_batch_size]
        if not local or (c["drop_remainder"] and len(group) < g):
            raise StopIteration
        first = self._batches_done * g + lo  # stream position of local[0]
        images = [preprocess(ex[c["image_key"]], self.image_size, center_crop=bool(c["center_crop"]),
                             random_flip=bool(c["random_flip"]),
                             rng=np.random.default_rng([self._seed, 1, first + j]))
                  for j, ex in enumerate(local)]
        batch = {"image": np.stack(images),
                 "caption": np.array([self._caption(ex) for ex in local], dtype=np.str_),
                 "index": np.arange(first, first + len(local), dtype=np.int64)}
        if self.has_labels:
            batch["label"] = np.array([int(ex[c["label_key"]]) for ex in local], dtype=np.int32)
        self._batches_done += 1
        return batch

    def get_state(self) -> dict:
        return {"version": _STATE_VERSION, "batches": self._batches_done, "tfds_load": True}

    def set_state(self, state: dict) -> None:
        self._batches_done = int(state["batches"])
        self._it = None

    def close(self) -> None:
        self._it = None


# ----------------------------------------------------------------------------- entry point


def _tensorflow_importable() -> bool:
    import importlib.util

    return importlib.util.find_spec("tensorflow") is not None


def make_source(data_config, split: str = "train"):
    """The random-access source named by `data_config.name` (see module docstring), less the
    examples `exclude_captions` matches."""
    source = _make_named_source(data_config, split)
    pattern = _get(data_config, "exclude_captions")
    return CaptionFilteredSource(source, pattern) if pattern else source


def _make_named_source(data_config, split: str):
    from ldm_jax.data.scene_sources import SCENE_SOURCES, make_scene_source

    name = _get(data_config, "name")
    if name in SCENE_SOURCES:
        return make_scene_source(data_config, name, split)
    if name == "folder":
        import os

        from ldm_jax.data.folder import FolderSource

        root = _get(data_config, "path")
        if root and os.path.isdir(os.path.join(root, split)):
            root = os.path.join(root, split)  # optional per-split sub-folders
        return FolderSource(root, with_labels=bool(_get(data_config, "folder_labels")))
    return TFDSSource(name, split, _get(data_config, "data_dir"),
                      image_key=_get(data_config, "image_key"),
                      caption_key=_get(data_config, "caption_key"),
                      label_key=_get(data_config, "label_key"),
                      caption_template=_get(data_config, "caption_template"),
                      download=bool(_get(data_config, "download")))


def create_dataset(data_config, *, split: str = "train", global_batch_size: int,
                   process_index: int = 0, process_count: int = 1, seed: int = 0,
                   image_size: int | None = None, num_epochs: int | None = None):
    """Batches for this process; see the module docstring for the contract.

    image_size / num_epochs override data_config.image_size / data_config.num_epochs.
    """
    image_size = image_size if image_size is not None else _get(data_config, "image_size")
    num_epochs = num_epochs if num_epochs is not None else _get(data_config, "num_epochs")
    from ldm_jax.data.scene_sources import SCENE_SOURCES, layout_builder

    name = _get(data_config, "name")
    if name != "folder" and name not in SCENE_SOURCES and _get(data_config, "use_tfds_load"):
        if _tensorflow_importable():
            return _TFLoadIterator(data_config, split, global_batch_size=global_batch_size,
                                   process_index=process_index, process_count=process_count,
                                   seed=seed, image_size=image_size, num_epochs=num_epochs)
        logger.warning("data.use_tfds_load=True but TensorFlow is not importable; "
                       "reading %r with tfds.data_source (array_record) instead", name)
    source = make_source(data_config, split)
    if image_size is None:
        shape = getattr(source, "image_shape", None)
        if shape is None or None in shape[:2]:
            raise ValueError(f"data.image_size is required for {name!r}: its images do not "
                             "all have one size")
    return DataIterator(
        source, global_batch_size=global_batch_size, process_index=process_index,
        process_count=process_count, seed=seed, image_size=image_size,
        shuffle=bool(_get(data_config, "shuffle")),
        drop_remainder=bool(_get(data_config, "drop_remainder")),
        random_flip=bool(_get(data_config, "random_flip")),
        center_crop=bool(_get(data_config, "center_crop")), num_epochs=num_epochs,
        num_threads=int(_get(data_config, "num_threads")),
        prefetch_batches=int(_get(data_config, "prefetch_batches")),
        layout_builder=layout_builder(data_config, source) if getattr(source, "has_objects", False) else None,
    )

