"""Input pipeline and the built-in emoji dataset (ldm_jax/data)."""

import importlib.util
import io
import json
import logging
import os

import ml_collections
import numpy as np
import pytest
from PIL import Image

import tensorflow_datasets as tfds

import ldm_jax.data  # noqa: F401  (registers "emoji")
from ldm_jax.data import DataIterator, FolderSource, create_dataset
from ldm_jax.data import emoji as emoji_lib
from ldm_jax.data.pipeline import _apply_template

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ASSETS = os.path.join(REPO, "ldm_jax", "data", "assets")

tfds.disable_progress_bar()


def _cfg(**kw):
    return ml_collections.ConfigDict(kw)


def _take(it, n):
    return [next(it) for _ in range(n)]


def _assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


@pytest.fixture(scope="module")
def emoji_dir(tmp_path_factory):
    """The emoji dataset prepared (offline, no TF) into a temporary data_dir."""
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    builder = tfds.builder("emoji", data_dir=data_dir)
    assert builder.info.file_format.value == "array_record"
    builder.download_and_prepare()
    return data_dir


# ----------------------------------------------------------------------------- the asset


def test_asset_size_count_and_captions():
    path = os.path.join(ASSETS, "emoji64.npz")
    size = os.path.getsize(path)
    assert size <= 20 * 2**20, size
    data = emoji_lib.load_asset(path)
    n = len(data["captions"])
    assert 3400 <= n <= 4000, n
    assert data["images"].shape == (n, 64, 64, 3) and data["images"].dtype == np.uint8
    for key in ("captions", "cldr_names", "codepoints"):
        assert data[key].shape == (n,) and all(len(s) > 0 for s in data[key]), key
    captions = set(data["captions"].tolist())
    for known in ("red apple", "grinning face with smiling eyes", "flag of united states",
                  "flag of japan", "keycap 1", "man technologist medium skin tone"):
        assert known in captions, known
    # Fixed split: every 20th image is held out.
    np.testing.assert_array_equal(np.flatnonzero(data["is_validation"]), np.arange(19, n, 20))
    # White background: the corners of (almost) every image are white.
    corners = data["images"][:, [0, 0, -1, -1], [0, -1, 0, -1]]
    assert (corners == 255).all(axis=(1, 2)).mean() > 0.9
    # A red apple is mostly red.
    apple = data["images"][data["captions"].tolist().index("red apple")].astype(int)
    fg = apple.sum(-1) < 700
    assert apple[fg, 0].mean() > apple[fg, 1].mean() + 60
    with open(os.path.join(ASSETS, "EMOJI_LICENSE.txt"), encoding="utf-8") as f:
        text = f.read()
    assert "Apache" in text and "build_emoji_dataset.py" in text and "2.042" in text


def test_build_script_captions():
    spec = importlib.util.spec_from_file_location(
        "build_emoji_dataset", os.path.join(REPO, "tools", "build_emoji_dataset.py"))
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    assert build.caption_for("\U0001F34E", {"en": ":red_apple:"}) == "red apple"
    # One code point + VS16 -> Unicode name, not the CLDR name.
    assert build.caption_for("\u263a\ufe0f", {"en": ":smiling_face:"}) == "white smiling face"
    assert build.caption_for("\U0001F1EF\U0001F1F5", {"en": ":Japan:"}) == "flag of japan"
    england = "\U0001F3F4\U000E0067\U000E0062\U000E0065\U000E006E\U000E0067\U000E007F"
    assert build.caption_for(england, {"en": ":England:"}) == "flag of england"
    assert build.caption_for("1\ufe0f\u20e3", {"en": ":keycap_1:"}) == "keycap 1"
    assert build._codepoints("1\ufe0f\u20e3") == "U+0031 U+FE0F U+20E3"


# ----------------------------------------------------------------------------- TFDS builder


def test_tfds_data_source_without_tensorflow(emoji_dir):
    ds = tfds.data_source("emoji", split="train", data_dir=emoji_dir)
    val = tfds.data_source("emoji", split="validation", data_dir=emoji_dir)
    n_asset = len(emoji_lib.load_asset()["captions"])
    assert len(ds) + len(val) == n_asset and len(val) == (n_asset + 1) // 20
    ex = ds[0]
    assert ex["image"].shape == (64, 64, 3) and ex["image"].dtype == np.uint8
    assert isinstance(ex["caption"], bytes) and ex["caption"]
    assert ex["codepoint"].startswith(b"U+")
    fast = tfds.data_source("emoji", split="train", data_dir=emoji_dir,
                            decoders={"image": tfds.decode.SkipDecoding()})
    captions = {fast[i]["caption"].decode() for i in range(len(fast))}
    assert "" not in captions
    assert {"red apple", "flag of france", "snowboarder"} <= captions
    # The stored pixels round-trip exactly (PNG is lossless).
    data = emoji_lib.load_asset()
    i = int(np.flatnonzero(data["captions"] == "red apple")[0])
    j = next(k for k in range(len(fast)) if fast[k]["caption"] == b"red apple")
    assert not data["is_validation"][i]
    np.testing.assert_array_equal(ds[j]["image"], data["images"][i])


# ----------------------------------------------------------------------------- pipeline on emoji


def test_emoji_batches_shapes(emoji_dir):
    cfg = _cfg(name="emoji", data_dir=emoji_dir, random_flip=True)
    ds = create_dataset(cfg, split="train", global_batch_size=6, image_size=32, seed=3)
    batch = next(ds)
    assert set(batch) == {"image", "caption", "index"}
    assert batch["image"].shape == (6, 32, 32, 3) and batch["image"].dtype == np.uint8
    assert batch["caption"].shape == (6,) and all(len(c) > 0 for c in batch["caption"])
    assert batch["index"].dtype == np.int64 and len(set(batch["index"].tolist())) == 6
    assert ds.num_skipped == 0


def test_sharding_two_processes_equal_one(emoji_dir):
    # Validation split: 189 examples, 23 global batches of 8 an epoch, so 30
    # batches cross an epoch boundary. Random crops + flips must agree too.
    cfg = _cfg(name="emoji", data_dir=emoji_dir, center_crop=False, random_flip=True)
    kw = dict(split="validation", global_batch_size=8, image_size=24, seed=7)
    one = _take(create_dataset(cfg, **kw), 30)
    p0 = _take(create_dataset(cfg, process_index=0, process_count=2, **kw), 30)
    p1 = _take(create_dataset(cfg, process_index=1, process_count=2, **kw), 30)
    for g, a, b in zip(one, p0, p1):
        assert a["image"].shape[0] == 4
        for k in g:
            np.testing.assert_array_equal(np.concatenate([a[k], b[k]]), g[k], err_msg=k)
    # Each epoch is a permutation: the first 23 batches hold 184 distinct examples.
    first = np.concatenate([g["index"] for g in one[:23]])
    assert len(set(first.tolist())) == 184
    # A new permutation per epoch.
    assert not np.array_equal(one[0]["index"], one[23]["index"])


@pytest.mark.parametrize("k", [5, 21])  # 21: the next batches cross the epoch boundary
def test_resume_emoji(emoji_dir, k):
    cfg = _cfg(name="emoji", data_dir=emoji_dir, random_flip=True)
    kw = dict(split="validation", global_batch_size=8, image_size=16, seed=1)
    full = _take(create_dataset(cfg, **kw), k + 6)
    ds = create_dataset(cfg, **kw)
    _take(ds, k)
    state = json.loads(json.dumps(ds.get_state()))
    assert state["batches"] == k
    resumed = create_dataset(cfg, **kw)
    resumed.set_state(state)
    _assert_batches_equal(_take(resumed, 6), full[k:])
    # The state is the same for any process count, so a resumed job can change it.
    half = create_dataset(cfg, process_index=1, process_count=2, **kw)
    half.set_state(state)
    b = next(half)
    np.testing.assert_array_equal(b["index"], full[k]["index"][4:])


# ----------------------------------------------------------------------------- in-memory source


class _ArraySource:
    """N tiny distinct images; the indices in `bad` raise like corrupt files."""

    def __init__(self, n, bad=(), labels=False):
        self.n, self.bad = n, set(bad)
        self.has_labels = labels

    def __len__(self):
        return self.n

    def describe(self, i):
        return f"array[{i}]"

    def load(self, i):
        if i in self.bad:
            raise OSError(f"broken {i}")
        image = np.zeros((4, 4, 3), np.uint8)
        image[..., 0], image[..., 1] = i % 256, i // 256
        out = {"image": image, "caption": f"c{i}"}
        if self.has_labels:
            out["label"] = i % 3
        return out


def test_epochs_padding_mask_and_num_epochs():
    # N=10, G=4, no drop: epochs padded to 12 positions; padding is marked.
    it = DataIterator(_ArraySource(10, labels=True), global_batch_size=4, drop_remainder=False,
                      num_epochs=2, seed=5)
    batches = list(it)
    assert len(batches) == 6
    assert batches[0]["label"].dtype == np.int32 and batches[0]["mask"].dtype == np.bool_
    for epoch in (batches[:3], batches[3:]):
        idx = np.concatenate([b["index"] for b in epoch])
        mask = np.concatenate([b["mask"] for b in epoch])
        assert mask.tolist() == [True] * 10 + [False] * 2
        assert sorted(idx[mask].tolist()) == list(range(10))
        np.testing.assert_array_equal(np.concatenate([b["image"][:, 0, 0, 0] for b in epoch]), idx)
    with pytest.raises(StopIteration):
        next(it)
    # drop_remainder: 2 batches an epoch, no mask; no shuffle -> identity order.
    it = DataIterator(_ArraySource(10), global_batch_size=4, shuffle=False, num_epochs=2)
    idx = [b["index"].tolist() for b in it]
    assert idx == [[0, 1, 2, 3], [4, 5, 6, 7], [0, 1, 2, 3], [4, 5, 6, 7]]


@pytest.mark.parametrize("drop_remainder", [True, False])
def test_resume_across_epochs_exact(drop_remainder):
    def make():
        return DataIterator(_ArraySource(11, bad={3}), global_batch_size=4, seed=2,
                            drop_remainder=drop_remainder, random_flip=True, num_threads=2)

    full = _take(make(), 12)
    for k in (1, 2, 3, 4, 7):
        ds = make()
        _take(ds, k)
        state = json.loads(json.dumps(ds.get_state()))
        resumed = make()
        resumed.set_state(state)
        _assert_batches_equal(_take(resumed, 12 - k), full[k:])
        assert resumed.num_skipped == 1


def test_large_dataset_permutation(monkeypatch):
    """Above IN_MEMORY_PERMUTATION_MAX epochs use grain's index_shuffle: still exact."""
    monkeypatch.setattr(DataIterator, "IN_MEMORY_PERMUTATION_MAX", 0)

    def make():
        return DataIterator(_ArraySource(300), global_batch_size=20, seed=4)

    full = _take(make(), 20)  # 15 batches an epoch
    for epoch in (full[:15], full[15:]):
        idx = np.concatenate([b["index"] for b in epoch]).tolist()
        assert len(set(idx)) == len(idx)
    assert sorted(np.concatenate([b["index"] for b in full[:15]]).tolist()) == list(range(300))
    assert np.concatenate([b["index"] for b in full[:15]]).tolist() != list(range(300))
    ds = make()
    _take(ds, 13)
    resumed = make()
    resumed.set_state(ds.get_state())
    _assert_batches_equal(_take(resumed, 7), full[13:])


def test_set_state_rejects_other_dataset():
    state = DataIterator(_ArraySource(10), global_batch_size=4).get_state()
    with pytest.raises(ValueError, match="does not match"):
        DataIterator(_ArraySource(10), global_batch_size=2).set_state(state)
    with pytest.raises(ValueError, match="version"):
        DataIterator(_ArraySource(10), global_batch_size=4).set_state({**state, "version": 99})


def test_bad_arguments():
    with pytest.raises(ValueError, match="multiple of process_count"):
        DataIterator(_ArraySource(10), global_batch_size=5, process_count=2)
    with pytest.raises(ValueError, match="process_index"):
        DataIterator(_ArraySource(10), global_batch_size=4, process_index=2, process_count=2)
    with pytest.raises(ValueError, match="fewer than one global batch"):
        DataIterator(_ArraySource(3), global_batch_size=4)
    with pytest.raises(RuntimeError, match="unreadable"):
        next(DataIterator(_ArraySource(4, bad=range(4)), global_batch_size=2, num_threads=0))


def test_bad_config(emoji_dir, tmp_path):
    with pytest.raises(KeyError, match="no feature 'text'"):
        create_dataset(_cfg(name="emoji", data_dir=emoji_dir, caption_key="text"),
                       global_batch_size=2)
    with pytest.raises(FileNotFoundError):
        create_dataset(_cfg(name="folder", path=str(tmp_path / "missing")), global_batch_size=2,
                       image_size=8)
    with pytest.raises(ValueError, match="no images"):
        create_dataset(_cfg(name="folder", path=str(tmp_path)), global_batch_size=2, image_size=8)


def test_caption_template():
    assert _apply_template("a photo of a {}", "cat") == "a photo of a cat"
    assert _apply_template("a photo of a {}", "airplane") == "a photo of an airplane"
    assert _apply_template("{}", "sea_lion") == "sea lion"


# ----------------------------------------------------------------------------- folders


def _save(path, size=(20, 12), color=(200, 30, 30), fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path, format=fmt)


def test_folder_corrupt_images_are_skipped(tmp_path, caplog):
    root = tmp_path / "imgs"
    for i in range(6):
        _save(root / f"ok{i}.png", color=(10 * i, 0, 0))
    (root / "garbage.png").write_bytes(b"this is not a png" * 20)
    _save(root / "full.jpg", size=(64, 48), fmt="JPEG")
    full = (root / "full.jpg").read_bytes()
    (root / "truncated.jpg").write_bytes(full[: len(full) // 2])
    (root / "full.jpg").unlink()
    cfg = _cfg(name="folder", path=str(root), drop_remainder=False, num_epochs=3)
    with caplog.at_level(logging.WARNING, logger="ldm_jax.data"):
        ds = create_dataset(cfg, global_batch_size=4, image_size=8, seed=0)
        batches = list(ds)
    assert len(batches) == 6  # 8 files -> 2 batches an epoch, 3 epochs
    assert ds.num_skipped == 2
    bad = {ds.source.files.index("garbage.png"), ds.source.files.index("truncated.jpg")}
    for b in batches:
        assert b["image"].shape == (4, 8, 8, 3)  # full batches: replaced, not dropped
        assert not bad & set(b["index"].tolist())
    skipped = [r.getMessage() for r in caplog.records if "unreadable" in r.getMessage()]
    assert len(skipped) == 2  # once each, although every epoch meets them
    assert any("garbage.png" in m for m in skipped) and any("truncated.jpg" in m for m in skipped)
    # A resumed iterator knows them already: no new warnings, same count.
    caplog.clear()
    again = create_dataset(cfg, global_batch_size=4, image_size=8, seed=0)
    again.set_state(ds.get_state())
    assert again.num_skipped == 2
    assert again.get_state()["unreadable"] == sorted(bad)
    again.set_state({**ds.get_state(), "batches": 0})
    assert len(list(again)) == 6
    assert not [r for r in caplog.records if "unreadable" in r.getMessage()]


def test_folder_captions_sidecar_jsonl_csv(tmp_path, caplog):
    root = tmp_path / "caps"
    for name in ("a.png", "sub/b.png", "c.jpg", "d.webp", "e.bmp"):
        _save(root / name)
    (root / "a.txt").write_text("sidecar caption\n")
    (root / "captions.jsonl").write_text(
        json.dumps({"file": "sub/b.png", "caption": "from jsonl"}) + "\n"
        + json.dumps({"file": "a.png", "caption": "loses to the sidecar"}) + "\n\n")
    (root / "captions.csv").write_text(
        "file,caption\nc.jpg,\"from csv, with a comma\"\nsub/b.png,loses to jsonl\n")
    with caplog.at_level(logging.WARNING, logger="ldm_jax.data"):
        src = FolderSource(str(root))
    assert src.files == ["a.png", "c.jpg", "d.webp", "e.bmp", "sub/b.png"]
    assert src.captions == ["sidecar caption", "from csv, with a comma", "", "", "from jsonl"]
    missing = [r for r in caplog.records if "no caption" in r.getMessage()]
    assert len(missing) == 1 and "2 of 5" in missing[0].getMessage()
    ds = create_dataset(_cfg(name="folder", path=str(root), shuffle=False, drop_remainder=False),
                        global_batch_size=5, image_size=8, num_epochs=1)
    (batch,) = list(ds)
    assert batch["caption"].tolist() == src.captions
    assert batch["image"].shape == (5, 8, 8, 3) and "label" not in batch


def test_folder_labels_and_split_subfolder(tmp_path):
    for split in ("train", "validation"):
        for cls in ("cat", "dog"):
            for i in range(2):
                _save(tmp_path / split / cls / f"{i}.png", size=(16, 16))
    cfg = _cfg(name="folder", path=str(tmp_path), folder_labels=True, shuffle=False)
    ds = create_dataset(cfg, split="validation", global_batch_size=4, image_size=8)
    batch = next(ds)
    assert ds.source.root.endswith("validation")
    assert batch["label"].tolist() == [0, 0, 1, 1] and batch["label"].dtype == np.int32


class DummyClassLabels(tfds.core.GeneratorBasedBuilder):
    """A generic TFDS dataset with a ClassLabel and images of several sizes."""

    VERSION = tfds.core.Version("1.0.0")
    code_path = emoji_lib.Emoji.code_path  # same TFDS 4.9.10 workaround as emoji.py

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 3)),
            "label": tfds.features.ClassLabel(names=["cat", "airplane"])}))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        for i in range(6):
            buf = io.BytesIO()
            Image.new("RGB", (10 + i, 8), (i, i, i)).save(buf, format="png")
            yield i, {"image": buf.getvalue(), "label": i % 2}


def test_tfds_class_label_captions(tmp_path):
    """Captions from the class names of a ClassLabel feature, labels returned."""
    DummyClassLabels(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
    cfg = _cfg(name="dummy_class_labels", data_dir=str(tmp_path), caption_key="label",
               label_key="label", shuffle=False)
    with pytest.raises(ValueError, match="image_size is required"):
        create_dataset(cfg, global_batch_size=2)
    batch = next(create_dataset(cfg, global_batch_size=6, image_size=8))
    expected = {0: "a photo of a cat", 1: "a photo of an airplane"}
    assert batch["caption"].tolist() == [expected[int(v)] for v in batch["label"]]
    assert sorted(batch["label"].tolist()) == [0, 0, 0, 1, 1, 1]


def test_exclude_captions(emoji_dir, tmp_path):
    """data.exclude_captions: matching examples are left out (TFDS and folder sources), the rest
    keep their order, captions and images; a pattern that matches everything is refused."""
    from ldm_jax.data.pipeline import make_source

    full = make_source(_cfg(name="emoji", data_dir=emoji_dir), "train")
    kept = make_source(_cfg(name="emoji", data_dir=emoji_dir, exclude_captions="skin tone"), "train")
    all_captions = [full.load(i)["caption"] for i in range(len(full))]
    expected = [i for i, c in enumerate(all_captions) if "skin tone" not in c]
    assert 0 < len(kept) == len(expected) < len(full)
    assert kept.indices == expected
    for j in (0, len(kept) // 2, len(kept) - 1):
        a, b = kept.load(j), full.load(expected[j])
        assert a["caption"] == b["caption"] and "skin tone" not in a["caption"]
        np.testing.assert_array_equal(a["image"], b["image"])
    ds = create_dataset(_cfg(name="emoji", data_dir=emoji_dir, exclude_captions="skin tone", shuffle=False),
                        global_batch_size=8, image_size=16)
    assert next(ds)["caption"].tolist() == [all_captions[i] for i in expected[:8]]

    root = tmp_path / "caps"
    for i, cap in enumerate(["a cat", "a dog", "a cat and a dog", "a bird"]):
        _save(root / f"{i}.png")
        (root / f"{i}.txt").write_text(cap)
    src = make_source(_cfg(name="folder", path=str(root), exclude_captions=r"\bdog\b"))
    assert src.files == ["0.png", "3.png"] and src.captions == ["a cat", "a bird"]
    assert src.load(1)["caption"] == "a bird" and src.describe(1).endswith("3.png")
    with pytest.raises(ValueError, match="leaves no example of 4"):
        make_source(_cfg(name="folder", path=str(root), exclude_captions="a"))
