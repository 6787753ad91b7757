"""data.precompute_latents: the frozen first stage encodes the training split once into
WORKDIR/latents, training reads {"latents", "input_ids" | "label"} batches from it.

On a tiny folder dataset (13 files in class sub-folders, one of them corrupt; 20x20 images
resized to 16x16, random flips on) with a tiny class-conditional model on one device:
* the latent iterator yields the image iterator's examples, in its order, with its flips,
  and its latents are the first stage's encoding of the image iterator's batch;
* one train step from precomputed latents equals one step from images (same rng;
  sample_posterior=False): scale_by_std factor, loss and grad norm to 1e-6 relative;
* a cache built by another first stage is detected as stale and rebuilt (latents of the
  new first stage), a matching one is reused without re-encoding.
"""
import copy
import importlib.util
import json
import os

import jax
import numpy as np
import pytest

from ldm_jax.training import latent_cache, loop
from ldm_jax.training import sharding as shd
from ldm_jax.training.ldm_task import LDMTask

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _base_config():
    spec = importlib.util.spec_from_file_location("emoji_ldm", os.path.join(ROOT, "configs", "emoji_ldm.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config("runlocal")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    from PIL import Image

    synth = loop.SyntheticDataset(1, image_size=20)
    for i in range(12):
        ex = synth.example(i)
        (root / ex["caption"]).mkdir(exist_ok=True)  # class sub-folders (data.folder_labels)
        Image.fromarray(ex["image"]).save(root / ex["caption"] / f"img_{i:02d}.png")
        (root / ex["caption"] / f"img_{i:02d}.txt").write_text(ex["caption"])
    (root / ex["caption"] / "img_05b.png").write_bytes(b"not a png")  # unreadable: skipped by both paths
    return str(root)


def _config(folder, first_stage_seed=0):
    cfg = _base_config()
    assert cfg.data.precompute_latents is False, "configs/emoji_ldm.py: data.precompute_latents must default to False"
    cfg.data.name = "folder"
    cfg.data.path = folder
    cfg.data.image_size = 16
    cfg.data.random_flip = True
    cfg.data.precompute_latents = True
    cfg.first_stage.sample_posterior = False
    cfg.first_stage.seed = first_stage_seed
    cfg.mesh.data, cfg.mesh.fsdp = 1, 1
    # Smaller than runlocal (compile time on 2 cores): a class-conditional one-level U-Net (the labels
    # come from the cache: data.folder_labels), a one-level first stage without attention.
    cfg.diffusion.conditioning = "class"
    cfg.data.folder_labels = True
    cfg.model.unet = dict(cfg.model.unet, block_out_channels=(16,), down_block_types=("DownBlock2D",),
                          up_block_types=("UpBlock2D",), mid_block_type=None, cross_attention_dim=None,
                          num_class_embeds=5, norm_num_groups=8, conv_impl="xla")
    cfg.first_stage.autoencoder = dict(cfg.first_stage.autoencoder, block_out_channels=(8, 8), norm_num_groups=8,
                                       mid_block_attention=False, conv_impl="xla")
    cfg.train.batch_size = 8
    cfg.train.lr = 1e-3
    return cfg


def _mesh():
    return shd.make_mesh(1, 1, devices=jax.devices()[:1])


@pytest.fixture(scope="module", autouse=True)
def _fast_threefry():
    """Compile time: the non-partitionable threefry lowering compiles the random inits ~3x
    faster on CPU (both paths draw from the same generator; restored afterwards)."""
    previous = jax.config.jax_threefry_partitionable
    jax.config.update("jax_threefry_partitionable", False)
    yield
    jax.config.update("jax_threefry_partitionable", previous)


def _encode(task, images):
    if getattr(task, "_latent_encode_fn", None) is None:
        task._latent_encode_fn = latent_cache.make_encode_fn(task.vae, task.mesh)
    return np.asarray(task._latent_encode_fn(task.frozen["vae"], shd.shard_batch(images, task.mesh))["latents"])


def test_precomputed_latents_step_equals_image_step_and_stale_cache_is_rebuilt(folder, tmp_path, caplog):
    cfg = _config(folder)
    mesh = _mesh()
    task = LDMTask(cfg, mesh)
    workdir = str(tmp_path / "run")
    lat_ds = loop.make_dataset(cfg, 0, task=task, workdir=workdir)
    cache = os.path.join(workdir, "latents")
    meta = json.load(open(os.path.join(cache, "meta.json")))
    assert meta["info"]["num_examples"] == 13 and meta["info"]["num_unreadable"] == 1, meta["info"]
    assert sorted(meta["files"]) == sorted(["latents.npy", "latents_std.npy", "latents_flip.npy",
                                            "latents_std_flip.npy", "examples.npz"]), meta["files"]
    img_cfg = copy.deepcopy(cfg)
    img_cfg.data.precompute_latents = False
    img_ds = loop.make_dataset(img_cfg, 0)

    # Two batches: the same examples in the same order, the latents of the same (flipped) images.
    stored = np.load(os.path.join(cache, "latents.npy"))
    n_flipped = 0
    for _ in range(2):
        hb_img, hb_lat = next(img_ds), next(lat_ds)
        np.testing.assert_array_equal(hb_lat["index"], hb_img["index"])
        assert hb_lat["caption"].tolist() == hb_img["caption"].tolist()
        np.testing.assert_array_equal(hb_lat["label"], hb_img["label"])
        assert "latents_std" not in hb_lat  # sample_posterior=False: the mean only
        np.testing.assert_allclose(hb_lat["latents"], _encode(task, hb_img["image"]), rtol=0, atol=1e-6)
        n_flipped += sum(not np.array_equal(hb_lat["latents"][j], stored[i]) for j, i in enumerate(hb_lat["index"]))
    assert 0 < n_flipped < 16, f"random_flip: {n_flipped} of 16 latents flipped"
    img_ds.set_state({**img_ds.get_state(), "batches": 0})
    lat_ds.set_state({**lat_ds.get_state(), "batches": 0})
    hb_img, hb_lat = next(img_ds), next(lat_ds)

    # One step each from the same initial state and rng.
    state0 = shd.gather_to_host(task.init_state(jax.random.PRNGKey(0)))
    results = {}
    for name, hb in (("image", hb_img), ("latents", hb_lat)):
        batch = shd.shard_batch(task.prepare_batch(hb), mesh)
        assert ("latents" in batch) == (name == "latents") and "image" not in batch or name == "image"
        state = shd.shard_tree(state0, task.state_shardings)
        task.on_first_batch(state, batch)  # scale_by_std from the first batch
        scale = task.scale_factor
        state1, metrics = task.train_step(state, batch)
        results[name] = (scale, jax.device_get(metrics), shd.gather_to_host(state1.params))
    (s_i, m_i, p_i), (s_l, m_l, p_l) = results["image"], results["latents"]
    loss_i, loss_l = float(m_i["loss"]), float(m_l["loss"])
    print(f"scale_by_std {s_i:.7f} vs {s_l:.7f}; loss images {loss_i:.8f} vs latents {loss_l:.8f} "
          f"(rel {abs(loss_l - loss_i) / abs(loss_i):.1e})")
    np.testing.assert_allclose(s_l, s_i, rtol=1e-6)
    assert abs(loss_l - loss_i) <= 1e-6 * abs(loss_i), (loss_l, loss_i)
    np.testing.assert_allclose(m_l["grad_norm"], m_i["grad_norm"], rtol=1e-5)
    for a, b in zip(jax.tree_util.tree_leaves(p_l), jax.tree_util.tree_leaves(p_i)):
        np.testing.assert_allclose(a, b, atol=1e-6)

    # A matching cache is reused (not re-encoded) ...
    mtime = os.stat(os.path.join(cache, "meta.json")).st_mtime_ns
    loop.make_dataset(cfg, 0, task=task, workdir=workdir)
    assert os.stat(os.path.join(cache, "meta.json")).st_mtime_ns == mtime

    # ... one from another first stage (same config and path, other weights: a retrained
    # checkpoint) is rebuilt.
    rng = np.random.default_rng(1)
    other = jax.tree_util.tree_map(lambda x: x + 0.05 * rng.standard_normal(x.shape).astype(x.dtype),
                                   shd.gather_to_host(task.frozen["vae"]))
    task.frozen["vae"] = shd.shard_tree(other, task.frozen_shardings["vae"])
    with caplog.at_level("WARNING", logger="ldm_jax.training.latent_cache"):
        ds2 = loop.make_dataset(cfg, 0, task=task, workdir=workdir)
    assert any("params_sha256" in r.getMessage() for r in caplog.records), [r.getMessage() for r in caplog.records]
    meta2 = json.load(open(os.path.join(cache, "meta.json")))
    assert meta2["key"]["first_stage"]["params_sha256"] != meta["key"]["first_stage"]["params_sha256"]
    hb = next(ds2)
    img_ds.set_state({**img_ds.get_state(), "batches": 0})
    new = _encode(task, next(img_ds)["image"])
    np.testing.assert_allclose(hb["latents"], new, rtol=0, atol=1e-6)
    assert np.max(np.abs(hb["latents"] - hb_lat["latents"])) > 1e-2  # not the old first stage's latents
    assert not [p for p in os.listdir(workdir) if p.startswith(".latents")], os.listdir(workdir)
