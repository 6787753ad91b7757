"""Training the LDM semantic-synthesis and layout-to-image models (issue #4).

* Layout tokens (ldm_jax/data/layout_tokens.py): the ids of taming-transformers'
  ``ObjectsBoundingBoxConditionalBuilder`` (the reference, from the ``taming-transformers-hugf`` wheel,
  installed --no-deps: a packaging of CompVis/taming-transformers whose conditional_builder/ files equal
  the upstream ones up to the package prefix of their imports) for random layouts, including more objects
  than no_max_objects, boxes on and past the borders, boxes outside the crop, empty layouts, crops and flips;
  plus one example worked out by hand.
* Data (ldm_jax/data/segmentation.py, coco_layout.py, synthetic_scenes.py, pipeline.py): label maps stay
  aligned with their images under random crops and flips (checked against the source files), layout ids
  decode to the JSON's boxes seen through the crop box; deterministic, shardable, resumable; bad input ->
  an error naming the file.
* Training (runlocal presets of configs/ldm_semantic_synthesis.py and configs/ldm_layout2img.py, a 2x4
  mesh over 8 virtual CPU devices): one sharded step's loss equals the L1 loss written out here from the
  same draws (the semantic condition built with torch's one-hot, bilinear F.interpolate and conv2d), the
  step's update of the rescaler / LDMBert follows the hand-written loss's gradient, and a short
  ``loop.train`` run writes a workdir that ``ldm_jax.load_pipeline`` samples (``segmentation=`` /
  ``context_ids=``) as a DDIM loop written here with diffusers' DDIMScheduler; ``sample.py --layout FILE.json``
  on the layout workdir writes the images of ``pipe(context_ids=builder.build(...))`` for the file's layouts.
(Fine-tuning the released files, init.checkpoint: tests/test_scene_fine_tuning.py.)
"""
import json
import os
import random
import sys
import types
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from PIL import Image

import ldm_jax
from ldm_jax.data import create_dataset
from ldm_jax.data.layout_tokens import LayoutObject, LayoutTokenBuilder
from ldm_jax.data.pipeline import ExampleFormatError
from ldm_jax.data.synthetic_scenes import PALETTE, SyntheticLayoutSource, SyntheticSegmentationSource
from ldm_jax.diffusion.schedule import add_noise
from ldm_jax.training import loop
from ldm_jax.training import sharding as shd
from ldm_jax.training.ldm_task import LDMTask
from test_concat_training import ddim_reference, load_config, nchw, nhwc, rel, scaled_latents, step_draws
from test_training import _compilation_cache, host, mesh_of  # noqa: F401  (module-scoped compilation cache)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------------ A. layout tokens vs taming
def taming_builder():
    """taming's ObjectsBoundingBoxConditionalBuilder and Annotation. Its image_transforms module (used only
    by plot(), for a tensor conversion) imports torchvision, which the tests avoid: a stub stands in."""
    pkg = "taming_transformers_hugf.taming.data"
    if pkg + ".image_transforms" not in sys.modules:
        stub = types.ModuleType(pkg + ".image_transforms")
        stub.convert_pil_to_tensor = lambda image: None
        sys.modules[pkg + ".image_transforms"] = stub
    from taming_transformers_hugf.taming.data.conditional_builder.objects_bbox import (
        ObjectsBoundingBoxConditionalBuilder)
    from taming_transformers_hugf.taming.data.helper_types import Annotation
    return ObjectsBoundingBoxConditionalBuilder, Annotation


def random_layout(rng, n_classes, n_objects):
    """Objects with boxes inside, on and past the image borders (as annotations can be), and on halves
    (0.5 lands between two points of the odd-sized grids: a rounding tie)."""
    objs = []
    for _ in range(n_objects):
        kind = rng.integers(5)
        x0, y0 = rng.uniform(-0.1, 1.0, 2) if kind == 0 else rng.uniform(0, 1, 2)
        w, h = rng.uniform(0, 1.2, 2) if kind < 2 else rng.uniform(0, 0.5, 2)
        if kind == 3:  # on the border: touching x = 0 or x = 1
            x0, w = (0.0, w) if rng.random() < 0.5 else (1.0 - w, w)
        if kind == 4:
            x0, y0, w, h = rng.choice([0.0, 0.5], 2).tolist() + [0.5, 0.5]
        objs.append(LayoutObject(int(rng.integers(n_classes)), (float(x0), float(y0), float(w), float(h)),
                                 bool(rng.random() < 0.3), bool(rng.random() < 0.3), bool(rng.random() < 0.3),
                                 bool(rng.random() < 0.3)))
    return objs


def test_layout_tokens_match_taming_builder():
    Taming, Annotation = taming_builder()
    rng = np.random.default_rng(0)
    # (no_object_classes, no_max_objects, no_tokens, encode_crop, use_group_parameter, use_additional_parameters);
    # the first is the released model's (with COCO's 20-odd classes), the others small grids (4x4 .. 10x10) with
    # every representation (class + classes * modifier bits) below the none token.
    settings = [(20, 30, 8192, True, True, False), (20, 30, 8192, False, False, False), (3, 4, 64, True, True, True),
                (3, 2, 16, False, True, False), (6, 6, 100, True, False, True)]
    seen = dict(cases=0, empty=0, truncated=0, outside_crop=0, flipped=0, cropped=0)
    for classes, max_objects, tokens, crop_enc, group, extra in settings:
        theirs = Taming(classes, max_objects, tokens, crop_enc, group, extra)
        ours = LayoutTokenBuilder(classes, max_objects, tokens, crop_enc, group, extra)
        assert ours.embedding_dim == theirs.embedding_dim and ours.none == theirs.none
        for case in range(120):
            n = [0, 1, max_objects, max_objects + 3][case % 4] if case < 8 else int(rng.integers(0, max_objects + 4))
            objs = random_layout(rng, classes, n)
            crop = None
            if case % 3 == 1:
                s = float(rng.uniform(0.3, 1.0))
                crop = (float(rng.uniform(0, 1 - s)), float(rng.uniform(0, 1 - s)), s, s)
            elif case % 3 == 2:
                crop = (0.0, 0.0, 1.0, 1.0)
            flip = bool(case % 2)
            anns = [Annotation(area=o.bbox[2] * o.bbox[3], image_id="0", bbox=o.bbox, category_no=o.category_no,
                               category_id=str(o.category_no), is_group_of=o.is_group_of, is_occluded=o.is_occluded,
                               is_depiction=o.is_depiction, is_inside=o.is_inside) for o in objs]
            seed = int(rng.integers(2 ** 31))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                random.seed(seed)  # the original shuffles with the global random module
                want = theirs.build(list(anns), crop, flip).numpy()
                got = ours.build(objs, crop, flip, rng=random.Random(seed))
            np.testing.assert_array_equal(got, want, err_msg=f"{(classes, max_objects, tokens, crop_enc)} case {case}")
            assert got.dtype == np.int64 and got.shape == (theirs.embedding_dim,)
            decoded, crop_back = ours.inverse_build(got)
            want_decoded, want_crop = theirs.inverse_build(torch.from_numpy(want))
            assert decoded == list(want_decoded) and crop_back == want_crop
            c = crop or (0.0, 0.0, 1.0, 1.0)
            dropped = [o for o in objs[:max_objects] if min(o.bbox[0] + o.bbox[2], c[0] + c[2]) <= max(o.bbox[0], c[0])
                       or min(o.bbox[1] + o.bbox[3], c[1] + c[3]) <= max(o.bbox[1], c[1])]
            seen["cases"] += 1
            seen["empty"] += n == 0
            seen["truncated"] += n > max_objects
            seen["outside_crop"] += len(dropped) > 0
            seen["flipped"] += flip
            seen["cropped"] += crop is not None and crop != (0.0, 0.0, 1.0, 1.0)
    print(f"layout ids identical to taming's ObjectsBoundingBoxConditionalBuilder: {seen}")
    assert min(seen.values()) > 0
    # A representation past the vocabulary: the original asserts, the port raises.
    objs = [LayoutObject(3, (0.1, 0.1, 0.2, 0.2), is_group_of=True, is_inside=True)]  # 3 + 4 * 9 = 39 >= 16
    with pytest.raises(AssertionError):
        Taming(4, 2, 16, False, True, True).build([Annotation(0, "0", o.bbox, 3, "3", is_group_of=True,
                                                              is_inside=True) for o in objs])
    with pytest.raises(ValueError, match=r"layout tokens \[39\] are outside \[0, 16\)"):
        LayoutTokenBuilder(4, 2, 16, False, True, True).build(objs)


def test_layout_tokens_hand_checked_example():
    """A 4x4 grid (16 tokens, 15 = none), two object slots, crop tokens at the end: a box (0, 0, 0.5, 0.5)
    of class 1 has corners (0, 0) -> token 0 and (0.5, 0.5) -> round(1.5) = 2 (Python rounds halves to
    even) -> token 2 * 4 + 2 = 10; the full crop is (0, 0) -> 0, (1, 1) -> 15. A crowd (is_group_of) of
    class 2 adds no_object_classes * 1 = 3. Mirrored, the box spans x 0.5..1: corners (1.5, 0) -> 2 and
    (3, 1.5) -> 2 * 4 + 3 = 11."""
    b = LayoutTokenBuilder(no_object_classes=3, no_max_objects=2, no_tokens=16, encode_crop=True,
                           use_group_parameter=True)
    assert b.embedding_dim == 8 and b.none == 15
    assert b.build([(1, (0.0, 0.0, 0.5, 0.5))]).tolist() == [1, 0, 10, 15, 15, 15, 0, 15]
    assert b.build([(2, (0.0, 0.0, 0.5, 0.5), True)]).tolist()[:3] == [5, 0, 10]
    assert b.build([(1, (0.0, 0.0, 0.5, 0.5))], horizontal_flip=True).tolist() == [1, 2, 11, 15, 15, 15, 0, 15]
    # A crop of the right half: the box (left half) does not meet it and is dropped; the crop's corners
    # (1.5, 0) -> 2 and (3, 3) -> 15.
    assert b.build([(1, (0.0, 0.0, 0.5, 0.5))], (0.5, 0.0, 0.5, 1.0)).tolist() == [15] * 6 + [2, 15]
    assert b.empty().tolist() == [15] * 6 + [0, 15]
    # A 10x10 grid: the corner (0.5, 0.5) is (4.5, 4.5) on it, a tie rounded to even: 4 -> token 44 (not 55).
    assert LayoutTokenBuilder(3, 1, 100, False).build([(0, (0.0, 0.0, 0.5, 0.5))]).tolist() == [0, 0, 44]
    with pytest.raises(ValueError, match="outside"):
        b.build([(16, (0.1, 0.1, 0.2, 0.2))])  # a representation past the 16-token vocabulary


# ------------------------------------------------------------------ B. data sources
def _scene_folder(root, sizes, num_classes=5, seed=0):
    """images/ + labels/ PNGs with image = PALETTE[labels] (blocks of classes), sizes (h, w)."""
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(root, "images", "sub"), exist_ok=True)
    os.makedirs(os.path.join(root, "labels", "sub"), exist_ok=True)
    out = []
    for i, (h, w) in enumerate(sizes):
        labels = rng.integers(0, num_classes, (h // 2 + 1, w // 2 + 1)).repeat(2, 0).repeat(2, 1)[:h, :w]
        labels[:, 0] = 1  # an asymmetric column: a wrong flip shows
        rel = f"sub/{i:02d}" if i % 2 else f"{i:02d}"
        Image.fromarray(PALETTE[labels]).save(os.path.join(root, "images", rel + ".png"))
        Image.fromarray(labels.astype(np.uint8)).save(os.path.join(root, "labels", rel + ".png"))
        out.append((rel, labels))
    return dict(sorted(out))


def _find_window(image, source_image):
    """(top, left, flipped) of a (S, S, 3) window of source_image equal to image, or None."""
    s = image.shape[0]
    for flipped in (False, True):
        target = image[:, ::-1] if flipped else image
        for top in range(source_image.shape[0] - s + 1):
            for left in range(source_image.shape[1] - s + 1):
                if np.array_equal(source_image[top:top + s, left:left + s], target):
                    return top, left, flipped
    return None


def test_segmentation_folder_labels_follow_crops_and_flips(tmp_path):
    labels_by_rel = _scene_folder(str(tmp_path), [(16, 20), (16, 27), (16, 16), (16, 23)] * 3)
    rels = sorted(labels_by_rel)
    cfg = dict(name="segmentation_folder", path=str(tmp_path), num_classes=5, image_size=16, center_crop=False,
               random_flip=True)
    ds = create_dataset(cfg, global_batch_size=4, seed=3)
    windows, flips = 0, 0
    for _ in range(6):
        batch = next(ds)
        assert batch["segmentation"].dtype == np.int32 and batch["segmentation"].shape == (4, 16, 16)
        for image, labels, index in zip(batch["image"], batch["segmentation"], batch["index"]):
            source_labels = labels_by_rel[rels[index]]
            found = _find_window(image, PALETTE[source_labels])
            assert found is not None
            top, left, flipped = found
            window = source_labels[top:top + 16, left:left + 16]
            np.testing.assert_array_equal(labels, window[:, ::-1] if flipped else window)
            windows += left > 0
            flips += flipped
    print(f"segmentation folder: 24 crops checked against the source files, {windows} offset, {flips} flipped")
    assert windows > 0 and 0 < flips < 24

    # Deterministic, process-count independent, resumable.
    first = next(create_dataset(cfg, global_batch_size=4, seed=3))
    again = next(create_dataset(cfg, global_batch_size=4, seed=3))
    np.testing.assert_array_equal(first["segmentation"], again["segmentation"])
    halves = [next(create_dataset(cfg, global_batch_size=4, seed=3, process_index=p, process_count=2))
              for p in range(2)]
    np.testing.assert_array_equal(np.concatenate([h["segmentation"] for h in halves]), first["segmentation"])
    np.testing.assert_array_equal(np.concatenate([h["image"] for h in halves]), first["image"])
    it = create_dataset(cfg, global_batch_size=4, seed=3)
    next(it)
    state = it.get_state()
    want = next(it)
    resumed = create_dataset(cfg, global_batch_size=4, seed=3)
    resumed.set_state(state)
    np.testing.assert_array_equal(next(resumed)["segmentation"], want["segmentation"])

    # Resized: the first file (16x20) center-cropped at left = 2 and halved to 8x8 with nearest (PIL NEAREST
    # takes the source pixel under each output pixel centre: rows / columns 1, 3, 5, ...).
    small = next(create_dataset({**cfg, "image_size": 8, "center_crop": True, "random_flip": False, "shuffle": False},
                                global_batch_size=4))
    np.testing.assert_array_equal(small["segmentation"][0], labels_by_rel[rels[0]][:, 2:18][1::2, 1::2])


def test_segmentation_ignore_shift_and_bad_input(tmp_path, caplog):
    root = str(tmp_path / "d")
    _scene_folder(root, [(8, 8)] * 4)
    lab_path = os.path.join(root, "labels", "02.png")
    labels = np.array(Image.open(lab_path))
    labels[0, :3] = 255
    Image.fromarray(labels).save(lab_path)
    cfg = dict(name="segmentation_folder", path=root, num_classes=5, image_size=8, shuffle=False)
    with pytest.raises(ExampleFormatError, match=r"labels/02\.png.*\[255\] outside \[0, 5\)"):
        next(create_dataset(cfg, global_batch_size=4))
    k = 1  # 02.png is the second file in path order (00, 02, sub/01, sub/03)
    seg = next(create_dataset({**cfg, "ignore_label": 255}, global_batch_size=4))["segmentation"]
    assert (seg[k, 0, :3] == -1).all() and (seg[k, 0, 3:] >= 0).all() and (seg[k, 1:] >= 0).all()
    shifted = next(create_dataset({**cfg, "num_classes": 6, "shift_labels": True}, global_batch_size=4))
    assert (shifted["segmentation"][k, 0, :3] == 0).all()
    np.testing.assert_array_equal(shifted["segmentation"][k, 1:], labels[1:].astype(np.int32) + 1)
    # -1 one-hot encodes to all zeros (no class) in the step; the others to one 1.
    from ldm_jax.training.concat_conditioning import one_hot_labels
    onehot = np.asarray(one_hot_labels(jnp.asarray(seg[k:k + 1]), 5))[0]
    assert (onehot[0, :3].sum(-1) == 0).all() and (onehot[1:].sum(-1) == 1).all()

    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(lab_path)  # an RGB "label map"
    with pytest.raises(ExampleFormatError, match=r"labels/02\.png has mode 'RGB'"):
        next(create_dataset(cfg, global_batch_size=4))
    Image.fromarray(np.zeros((8, 6), np.uint8)).save(lab_path)  # another size
    with pytest.raises(ExampleFormatError, match=r"labels/02\.png is 6x8 but its image is 8x8"):
        next(create_dataset(cfg, global_batch_size=4))
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(lab_path)
    with open(os.path.join(root, "images", "00.png"), "wb") as f:
        f.write(b"not a png")  # unreadable: skipped and logged, as any corrupt image
    ds = create_dataset(cfg, global_batch_size=2)
    assert next(ds)["index"].tolist() == [1, 1] and ds.num_skipped == 1  # slot 0 takes the next readable one
    assert "00.png" in caplog.text
    os.remove(os.path.join(root, "labels", "sub", "03.png"))
    with pytest.raises(FileNotFoundError, match=r"images/sub/03\.png has no label map: expected .*labels/sub/03\.png"):
        create_dataset(cfg, global_batch_size=2)
    with pytest.raises(ValueError, match="data.num_classes"):
        create_dataset({**cfg, "num_classes": None}, global_batch_size=2)


def _coco(root, images, annotations, categories):
    os.makedirs(os.path.join(root, "img"), exist_ok=True)
    for img in images:
        Image.fromarray(np.full((img["height"], img["width"], 3), 128, np.uint8)).save(
            os.path.join(root, "img", img["file_name"]))
    path = os.path.join(root, "instances.json")
    with open(path, "w") as f:
        json.dump({"images": images, "annotations": annotations, "categories": categories}, f)
    return path


def test_coco_layout_source_tokens_and_bad_input(tmp_path):
    # Categories 1, 2, 10 (+ "other", left out): taming numbers them by their ids sorted as strings: "1", "10", "2".
    categories = [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}, {"id": 10, "name": "car"},
                  {"id": 99, "name": "other"}]
    images = [{"id": 7, "file_name": "a.png", "width": 40, "height": 20},
              {"id": 8, "file_name": "b.png", "width": 20, "height": 20},
              {"id": 9, "file_name": "c.png", "width": 20, "height": 20}]
    anns = [{"id": 1, "image_id": 7, "category_id": 2, "bbox": [0, 0, 20, 10], "iscrowd": 0},
            {"id": 2, "image_id": 7, "category_id": 10, "bbox": [25, 10, 10, 10], "iscrowd": 1},
            {"id": 3, "image_id": 7, "category_id": 99, "bbox": [0, 0, 4, 4]},  # "other": skipped
            {"id": 4, "image_id": 7, "category_id": 1, "bbox": [5, 5, 0.001, 0.001]},  # area below the minimum
            {"id": 5, "image_id": 8, "category_id": 1, "bbox": [0, 0, 10, 10]},  # one object: left out (min 2)
            {"id": 6, "image_id": 9, "category_id": 1, "bbox": [0, 0, 10, 10]},
            {"id": 7, "image_id": 9, "category_id": 1, "bbox": [10, 10, 10, 10]}]
    path = _coco(str(tmp_path), images, anns, categories)
    layout = dict(no_max_objects=3, no_tokens=100, encode_crop=True, use_group_parameter=True)
    cfg = dict(name="coco_layout", path=str(tmp_path / "img"), annotations=path, image_size=10, shuffle=False,
               layout=layout)
    from ldm_jax.data.pipeline import make_source
    src = make_source(cfg)
    assert src.category_names == ["cat", "car", "dog"] and src.files == ["a.png", "c.png"]
    assert src.load(0)["objects"] == (LayoutObject(2, (0.0, 0.0, 0.5, 0.5)),
                                      LayoutObject(1, (0.625, 0.5, 0.25, 0.5), True))
    batch = next(create_dataset(cfg, global_batch_size=2))
    assert batch["layout_ids"].dtype == np.int32 and batch["layout_ids"].shape == (2, 11)
    b = LayoutTokenBuilder(3, 3, 100, True, True)  # 10x10 grid: token = round(9 y) * 10 + round(9 x)
    objs, crop = b.inverse_build(batch["layout_ids"][0])
    # a.png (40x20) center-cropped to its middle 20x20: the crop box (0.25, 0, 0.5, 1) -> tokens (2, 0), (7, 9).
    assert crop == b.bbox_from_token_pair(0 * 10 + 2, 9 * 10 + 7)
    # encode_crop: boxes stay in full-image units. The dog (0, 0, .5, .5): corners (0, 0) -> 0 and (4.5, 4.5)
    # on the grid, rounded to even -> (4, 4) -> 44. The car crowd (.625, .5, .25, .5): representation
    # 1 + 3 * 1 = 4, corners (5.625, 4.5) -> (6, 4) -> 46 and (7.875, 9) -> (8, 9) -> 98.
    assert sorted(objs) == sorted([(2, b.bbox_from_token_pair(0, 44)), (4, b.bbox_from_token_pair(46, 98))])
    # Flipped (seeded per slot): the dog mirrored to (.5, 0, .5, .5) -> corners (4.5, 0) -> 4 and (9, 4.5) -> 49.
    dogs = set()
    for seed in range(6):
        for row in next(create_dataset({**cfg, "random_flip": True}, global_batch_size=2, seed=seed))["layout_ids"]:
            dogs |= {tuple(row[i + 1:i + 3]) for i in range(0, 9, 3) if row[i] == 2}
    assert dogs == {(0, 44), (4, 49)}

    bad = dict(anns=[*anns, {"id": 70, "image_id": 123, "category_id": 1, "bbox": [0, 0, 1, 1]}])
    with pytest.raises(ValueError, match=r"instances\.json: annotation 70 refers to image_id 123"):
        make_source({**cfg, "annotations": _coco(str(tmp_path / "x"), images, bad["anns"], categories)})
    with pytest.raises(ValueError, match=r"annotation 71 \(image 7\) has bbox \[0, 0, -1, 1\]"):
        make_source({**cfg, "annotations": _coco(str(tmp_path / "y"), images, [
            *anns, {"id": 71, "image_id": 7, "category_id": 1, "bbox": [0, 0, -1, 1]}], categories)})
    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(str(tmp_path / "img" / "a.png"))  # not the JSON's 40x20
    with pytest.raises(ExampleFormatError, match=r"img/a\.png: the image is 30x20 but its annotations give 40x20"):
        next(create_dataset(cfg, global_batch_size=2))


def test_synthetic_scenes_are_deterministic_and_consistent():
    a, b = SyntheticSegmentationSource(8, height=12), SyntheticSegmentationSource(8, height=12)
    lay = SyntheticLayoutSource(8, height=12)
    for i in range(8):
        x, y = a.load(i), b.load(i)
        np.testing.assert_array_equal(x["image"], y["image"])
        np.testing.assert_array_equal(x["image"], PALETTE[x["segmentation"]])
        assert x["image"].shape == (12, 15, 3)
        # the last drawn shape is on top: its box holds pixels of its class, and none outside the box do
        # unless another shape of that class is there
        objs = lay.load(i)["objects"]
        x0, y0, w, h = objs[-1].bbox
        box = x["segmentation"][round(y0 * 12):round((y0 + h) * 12), round(x0 * 15):round((x0 + w) * 15)]
        assert (box == objs[-1].category_no + 1).mean() > 0.5
    assert not np.array_equal(a.load(0)["segmentation"], a.load(1)["segmentation"])


# ------------------------------------------------------------------ C. training
def run_config(name):
    cfg = load_config(name)
    cfg.mesh.data, cfg.mesh.fsdp = 2, 4
    cfg.train.num_steps = 2
    cfg.train.checkpoint_every = 2
    cfg.train.log_every = 1
    return cfg


def first_step(name):
    """The family's task on a 2x4 mesh, its initial state on the host, the first batch of its built-in data
    (the pipeline's), the prepared batch, and the first step's state and metrics."""
    cfg = run_config(name)
    task = LDMTask(cfg, mesh_of(2, 4))
    state = task.init_state(jax.random.PRNGKey(0))
    state0 = host(state)
    host_batch = next(loop.make_dataset(cfg, 0, task))
    prepared = task.prepare_batch(host_batch)
    batch = shd.shard_batch(prepared, task.mesh)
    task.on_first_batch(state, batch)
    state1, metrics = task.train_step(state, batch)
    return dict(cfg=cfg, task=task, state0=state0, state1=host(state1), host_batch=host_batch, prepared=prepared,
                metrics=jax.device_get(metrics))


def adam_first_update(task, grad, p0):
    """The AdamW update of step 1 for a gradient: -lr (g / (|g| + eps) + wd p0) (global-norm clipping scales g,
    which step 1's m / sqrt(v) cancels up to eps)."""
    cfg = task.opt_cfg
    return -cfg.lr * (grad / (np.abs(grad) + cfg.eps) + cfg.weight_decay * p0)


def train_workdir(run, workdir):
    cfg = run["cfg"].copy_and_resolve_references()
    cfg.train.sample_every = 2
    trained = loop.train(cfg, str(workdir), task=run["task"], mesh=run["task"].mesh, progress=False)
    assert int(trained.step) == 2
    grid = np.asarray(Image.open(workdir / "samples" / "step_0000002.png"))
    assert grid.ndim == 3 and grid.std() > 0
    (workdir / "config.json").write_text(cfg.to_json_best_effort())
    return str(workdir), host(trained)


def reference_channels(segmentation, kernel, n_stages=1, num_classes=5):
    """torch: one_hot -> n_stages x bilinear F.interpolate(0.5) -> 1x1 conv2d (the original SpatialRescaler)."""
    x = torch.nn.functional.one_hot(torch.from_numpy(np.asarray(segmentation, np.int64)), num_classes)
    x = x.permute(0, 3, 1, 2).float()
    for _ in range(n_stages):
        x = torch.nn.functional.interpolate(x, scale_factor=0.5, mode="bilinear")
    w = torch.from_numpy(np.array(kernel, np.float32)).permute(3, 2, 0, 1)  # (1, 1, in, out) -> (out, in, 1, 1)
    return x, w


@pytest.fixture(scope="module")
def semantic():
    return first_step("ldm_semantic_synthesis")


def test_semantic_synthesis_step_matches_hand_written_loss(semantic):
    task, state0, host_batch = semantic["task"], semantic["state0"], semantic["host_batch"]
    assert task.concat == "segmentation" and task.unet.config.in_channels == 4 + 3
    assert task.step_cfg.loss_type == "l1" and task.step_cfg.cond_drop_prob == 0.0
    seg = host_batch["segmentation"]
    assert seg.shape == (8, 16, 16) and len(np.unique(seg)) == 5
    image = host_batch["image"].astype(np.float32) / 127.5 - 1.0
    shape = (8, 8, 8, 4)
    _, t, noise, eps = step_draws(task, state0, shape)
    x_t = add_noise(task.schedule, scaled_latents(task.vae, host(task.frozen["vae"]), image, eps, task.scale_factor),
                    noise, t)
    unet = jax.jit(lambda p, x, t: task.unet.apply({"params": p}, x, t))
    kernel = state0.params["cond_stage"]["channel_mapper"]["kernel"]
    onehot_small, w = reference_channels(seg, kernel)
    channels = nhwc(torch.nn.functional.conv2d(onehot_small, w))

    def losses(c):
        out = unet(state0.params["unet"], jnp.concatenate([x_t, c], -1), t)
        return float(jnp.mean(jnp.abs(out - noise))), float(jnp.mean(jnp.square(out - noise)))

    expected, l2 = losses(channels)
    got = float(semantic["metrics"]["loss"])
    nearest = nhwc(torch.nn.functional.conv2d(torch.nn.functional.interpolate(
        nchw(np.eye(5, dtype=np.float32)[seg]), scale_factor=0.5, mode="nearest"), w))  # a wrong resize
    wrong_resize, _ = losses(nearest)
    print(f"semantic synthesis step on 2x4: L1 loss {got:.7f}, hand-written {expected:.7f} "
          f"(rel {rel(got, expected):.1e}); as L2 {l2:.7f}; with nearest instead of bilinear {wrong_resize:.7f} "
          f"(rel {rel(wrong_resize, expected):.1e})")
    assert rel(got, expected) < 1e-5
    assert rel(l2, expected) > 1e-3 and rel(wrong_resize, expected) > 1e-5

    # The rescaler's channel mapper gets the hand-written loss's gradient: d loss / d channels from JAX, then
    # torch autograd through its conv2d.
    g_channels = jax.grad(lambda c: jnp.mean(jnp.abs(
        unet(state0.params["unet"], jnp.concatenate([x_t, c], -1), t) - noise)))(jnp.asarray(channels))
    w_grad = w.clone().requires_grad_(True)
    torch.nn.functional.conv2d(onehot_small, w_grad).backward(nchw(np.asarray(g_channels)))
    grad = w_grad.grad.permute(2, 3, 1, 0).numpy()  # back to (1, 1, in, out)
    delta = semantic["state1"].params["cond_stage"]["channel_mapper"]["kernel"] - kernel
    want = adam_first_update(task, grad, kernel)
    checked = np.abs(grad) > 1e-6
    err = float(np.abs(delta - want)[checked].max())
    print(f"rescaler kernel update vs AdamW of the hand-written gradient: {checked.sum()} of {grad.size} entries, "
          f"max err {err:.1e} (lr {task.opt_cfg.lr})")
    # (a gradient of the wrong sign moves an entry by 2 lr, a missing one by lr)
    assert checked.sum() >= 12 and err < 0.05 * task.opt_cfg.lr


def test_semantic_synthesis_workdir_samples_with_segmentation(semantic, tmp_path):
    workdir, trained = train_workdir(semantic, tmp_path / "run")
    pipe = ldm_jax.load_pipeline(workdir)
    assert (pipe.cond_stage, pipe.concat_channels) == ("rescaler", 3)
    kernel = trained.ema_params["cond_stage"]["channel_mapper"]["kernel"]
    np.testing.assert_array_equal(pipe.params["cond_stage"]["channel_mapper"]["kernel"], kernel)
    seg = semantic["host_batch"]["segmentation"][:2]
    x_T = np.random.default_rng(1).standard_normal((2, 8, 8, 4)).astype(np.float32)
    images = pipe(["", ""], segmentation=seg, num_inference_steps=2, guidance_scale=1.0, latents=x_T)
    assert images.shape == (2, 16, 16, 3) and np.isfinite(images).all() and images.std() > 1e-3
    onehot_small, w = reference_channels(seg, kernel)
    want = ddim_reference(pipe, x_T, nhwc(torch.nn.functional.conv2d(onehot_small, w)), 2)
    err = float(np.abs(images - want).max())
    print(f"semantic workdir: load_pipeline(segmentation=) vs DDIM with torch-built channels: max abs err {err:.2e}")
    assert err < 1e-4


@pytest.fixture(scope="module")
def layout():
    return first_step("ldm_layout2img")


def test_layout_step_matches_hand_written_loss(layout):
    task, state0, host_batch, prepared = layout["task"], layout["state0"], layout["host_batch"], layout["prepared"]
    assert task.conditioning == "layout" and task.tokenizer is None and task.step_cfg.train_text_encoder
    ids = host_batch["layout_ids"]
    assert ids.shape == (8, 14) and (prepared["input_ids"] == ids).all()
    # Each layout decodes to its scene's objects seen through the crop (the data side of the token ids).
    b = task.layout_builder
    for row in ids:
        objs, crop = b.inverse_build(row)
        assert 1 <= len(objs) <= 3 and crop is not None and all(o[0] < 4 for o in objs)
    image = host_batch["image"].astype(np.float32) / 127.5 - 1.0
    shape = (8, 8, 8, 4)
    _, t, noise, eps = step_draws(task, state0, shape)
    x_t = add_noise(task.schedule, scaled_latents(task.vae, host(task.frozen["vae"]), image, eps, task.scale_factor),
                    noise, t)

    def loss(params, ids, l1=True):
        ctx = task.text_encoder.apply({"params": params["text_encoder"]}, jnp.asarray(ids, jnp.int32))
        out = task.unet.apply({"params": params["unet"]}, x_t, t, ctx)
        return jnp.mean(jnp.abs(out - noise)) if l1 else jnp.mean(jnp.square(out - noise))

    loss_jit = jax.jit(loss, static_argnums=2)
    expected = float(loss_jit(state0.params, ids, True))
    got = float(layout["metrics"]["loss"])
    empty = float(loss_jit(state0.params, np.repeat(b.empty()[None], 8, 0), True))
    print(f"layout step on 2x4: L1 loss {got:.7f}, hand-written {expected:.7f} (rel {rel(got, expected):.1e}); "
          f"with empty layouts {empty:.7f} (rel {rel(empty, expected):.1e})")
    assert rel(got, expected) < 1e-5 and rel(empty, expected) > 1e-5

    # LDMBert gets the hand-written loss's gradient: rows of the tokens used move by AdamW's step-1 update,
    # the others only decay.
    grads = jax.jit(jax.grad(loss))(state0.params, ids)
    table0 = state0.params["text_encoder"]["embed_tokens"]["embedding"]
    g = np.asarray(grads["text_encoder"]["embed_tokens"]["embedding"])
    delta = layout["state1"].params["text_encoder"]["embed_tokens"]["embedding"] - table0
    used = np.isin(np.arange(g.shape[0]), ids)
    checked = np.abs(g) > 1e-6
    err = float(np.abs(delta - adam_first_update(task, g, table0))[checked].max())
    print(f"LDMBert token table: {used.sum()} rows used, {checked.sum()} entries checked, max err {err:.1e}")
    assert used.sum() > 5 and checked[used].mean() > 0.9 and not checked[~used].any()
    assert err < 0.05 * task.opt_cfg.lr
    ulp = 2 * np.finfo(np.float32).eps * np.abs(table0).max()  # (p1 - p0 of float32 weights)
    np.testing.assert_allclose(delta[~used], -task.opt_cfg.lr * task.opt_cfg.weight_decay * table0[~used], atol=ulp)


@pytest.fixture(scope="module")
def layout_workdir(layout, tmp_path_factory):
    """(workdir, trained state) of a 2-step layout run (shared by the sampling tests)."""
    return train_workdir(layout, tmp_path_factory.mktemp("layout_run") / "run")


def test_layout_workdir_samples_with_context_ids(layout, layout_workdir):
    workdir, trained = layout_workdir
    pipe = ldm_jax.load_pipeline(workdir)
    assert pipe.tokenizer is None and pipe.text_encoder.config.max_position_embeddings == 14
    ids = layout["host_batch"]["layout_ids"][:2]
    x_T = np.random.default_rng(2).standard_normal((2, 8, 8, 4)).astype(np.float32)
    images = pipe(context_ids=ids, num_inference_steps=2, latents=x_T)
    assert images.shape == (2, 16, 16, 3) and np.isfinite(images).all() and images.std() > 1e-3
    ctx = pipe.text_encoder.apply({"params": trained.ema_params["text_encoder"]}, jnp.asarray(ids))
    want = ddim_reference(pipe, x_T, np.zeros((2, 8, 8, 0), np.float32), 2, ctx=ctx)
    err = float(np.abs(images - want).max())
    print(f"layout workdir: load_pipeline(context_ids=) vs DDIM with the trained LDMBert's context: max err {err:.2e}")
    assert err < 1e-4 and ctx.shape == (2, 14, 32)
    with pytest.raises(ValueError, match="no tokenizer"):
        pipe(["a cat"], num_inference_steps=2)


def test_sample_cli_layout_file_on_a_layout_workdir(layout_workdir, tmp_path, capsys):
    """sample.py --layout FILE.json on a layout workdir: each layout of the file (boxes relative to the image) is
    built into ids with the run's data.layout builder (4 objects on an 8x8 grid + crop, 64 tokens; the synthetic
    data's 4 categories, so is_group_of adds 4) and sampled as one batch (seed + batch); the PNGs equal
    pipe(context_ids=builder.build(...)). --prompt is refused for the layout model, and a category past its 4."""
    import sample as sample_cli
    from ldm_jax.image_io import to_uint8

    workdir, _ = layout_workdir
    layouts = [[{"category": 1, "bbox": [0.1, 0.2, 0.5, 0.4]},
                {"category": 3, "bbox": [0.5, 0.5, 0.4, 0.45], "is_group_of": True}],
               [{"category": 0, "bbox": [0.0, 0.25, 1.0, 0.5]}]]
    path = tmp_path / "layouts.json"
    path.write_text(json.dumps(layouts))
    out = tmp_path / "out"
    base = ["--checkpoint", workdir, "--steps", "2", "--seed", "7"]
    assert sample_cli.main(base + ["--layout", str(path), "--n_samples", "2", "--outdir", str(out)]) == 0
    builder = LayoutTokenBuilder(no_object_classes=4, no_max_objects=4, no_tokens=64, encode_crop=True,
                                 use_group_parameter=True)
    ids = [builder.build([LayoutObject(o["category"], tuple(o["bbox"]), o.get("is_group_of", False))
                          for o in layout]) for layout in layouts]
    assert ids[0][3] == 3 + 4 and ids[0][0] == 1  # the crowd's token: category + no_object_classes
    pipe = ldm_jax.load_pipeline(workdir)
    for b in range(2):
        want = to_uint8(pipe(context_ids=np.repeat(ids[b][None], 2, 0), num_inference_steps=2, seed=7 + b))
        got = np.stack([np.asarray(Image.open(out / "samples" / f"{2 * b + k:05d}.png")) for k in range(2)])
        np.testing.assert_array_equal(got, want)
    assert json.loads(Image.open(out / "samples" / "00002.png").text["layout"]) == layouts[1]
    assert not np.array_equal(np.asarray(Image.open(out / "samples" / "00000.png")),
                              np.asarray(Image.open(out / "samples" / "00002.png")))

    def error(argv):
        code = sample_cli.main(base + argv + ["--outdir", str(tmp_path / "bad")])
        lines = [line for line in capsys.readouterr().err.splitlines() if "error: " in line]
        assert code == 2 and len(lines) == 1, lines
        return lines[0]

    assert "is a layout-to-image model: it takes object layouts, not text" in error(["--prompt", "a red square"])
    path.write_text(json.dumps([{"category": 4, "bbox": [0.1, 0.2, 0.5, 0.4]}]))
    assert ("layouts.json: layout 0, object 0: category 4 is outside the model's 4 object classes"
            in error(["--layout", str(path)]))


def test_configuration_checks(layout, semantic, tmp_path):
    cfg = run_config("ldm_layout2img")
    cfg.diffusion.cond_drop_prob = 0.1
    with pytest.raises(ValueError, match="cond_drop_prob=0"):
        LDMTask(cfg, mesh_of(1, 1))
    cfg = run_config("ldm_semantic_synthesis")
    cfg.model.cond_stage = dict(cfg.model.cond_stage, in_channels=6)
    with pytest.raises(ValueError, match="data.num_classes=5 but model.cond_stage.in_channels=6"):
        LDMTask(cfg, mesh_of(1, 1))
    with pytest.raises(ValueError, match="precompute_latents=True is not supported"):
        semantic["task"].latent_dataset(semantic["cfg"], str(tmp_path / "c"), 0)
    with pytest.raises(KeyError, match="'segmentation' field"):
        semantic["task"].prepare_batch({"image": np.zeros((8, 16, 16, 3), np.uint8), "caption": np.array([""] * 8)})
    with pytest.raises(KeyError, match="'layout_ids' field"):
        layout["task"].prepare_batch({"image": np.zeros((8, 16, 16, 3), np.uint8), "caption": np.array([""] * 8)})
    with pytest.raises(ValueError, match="SpatialRescaler.*latents are 8x8"):
        batch = {"image": jnp.zeros((8, 16, 16, 3), jnp.uint8), "segmentation": jnp.zeros((8, 32, 32), jnp.int32)}
        semantic["task"].step_fn(semantic["task"].init_state(jax.random.PRNGKey(0)), batch, semantic["task"].frozen)


def test_released_architectures_have_the_original_parameter_counts():
    """configs/ldm_semantic_synthesis.py and ldm_layout2img.py build the released U-Nets (counted against the
    original UNetModel on the meta device), the layout LDMBert the BERTEmbedder's size, 92 = 3 * 30 + 2."""
    from diffusers.pipelines.latent_diffusion.pipeline_latent_diffusion import LDMBertConfig as TorchBertConfig
    from diffusers.pipelines.latent_diffusion.pipeline_latent_diffusion import LDMBertModel as TorchBert
    from ldm.modules.diffusionmodules.openaimodel import UNetModel

    from ldm_jax.convert.unet_diffusers import unet_abstract_params
    from ldm_jax.models.ldm_bert import LDMBertConfig, LDMBertModel
    from ldm_jax.models.unet import UNet, UNetConfig

    def count(tree):
        return sum(int(np.prod(p.shape)) for p in jax.tree_util.tree_leaves(tree))

    originals = {
        "ldm_semantic_synthesis": dict(image_size=64, in_channels=6, out_channels=3, model_channels=128,
                                       attention_resolutions=[32, 16, 8], num_res_blocks=2, channel_mult=[1, 4, 8],
                                       num_heads=8),
        # (transformer_depth 3: the sdkit copy of SpatialTransformer needs context_dim per layer)
        "ldm_layout2img": dict(image_size=64, in_channels=3, out_channels=3, model_channels=128,
                               attention_resolutions=[8, 4, 2], num_res_blocks=2, channel_mult=[1, 2, 3, 4],
                               num_head_channels=32, use_spatial_transformer=True, transformer_depth=3,
                               context_dim=[512] * 3)}
    counts = {}
    for name, unet in originals.items():
        cfg = load_config(name, "")
        with torch.device("meta"):
            want = sum(p.numel() for p in UNetModel(**unet).parameters())
        counts[name] = (count(unet_abstract_params(UNet(UNetConfig(**cfg.model.unet)))), want)
    assert counts["ldm_semantic_synthesis"] == (215_229_315, 215_229_315)
    assert counts["ldm_layout2img"] == (246_277_379, 246_277_379)
    cfg = load_config("ldm_layout2img", "")
    with torch.device("meta"):  # diffusers' LDMBertModel: the BERTEmbedder(n_embed 512, n_layer 16) layout
        want = sum(p.numel() for p in TorchBert(TorchBertConfig(
            d_model=512, encoder_layers=16, encoder_attention_heads=8, head_dim=64, encoder_ffn_dim=2048,
            max_position_embeddings=92, vocab_size=8192)).parameters())
        lm_head = 512 * 8192 + 8192  # to_logits, unused for conditioning and not kept
    bert = LDMBertModel(LDMBertConfig(**cfg.text_encoder.ldm_bert))
    ours = count(jax.eval_shape(lambda: bert.init(jax.random.PRNGKey(0), jnp.zeros((1, 92), jnp.int32))))
    assert ours == want - lm_head
    assert LayoutTokenBuilder.from_config(cfg.data.layout, 80).embedding_dim == 92
    sem = load_config("ldm_semantic_synthesis", "")
    assert dict(sem.model.cond_stage) == dict(n_stages=2, method="bilinear", multiplier=0.5, in_channels=182,
                                              out_channels=3, bias=False)
    print(f"U-Net parameters (ours, original): {counts}; LDMBert {ours:,}")
