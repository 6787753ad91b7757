"""Precomputed first-stage latents (``data.precompute_latents=True``).

Before LDM training the frozen first stage encodes the whole training split once
(batched, jitted over the training mesh, a progress bar on process 0). Every process
loads and encodes its share of each encoding batch; the latents come back replicated
and process 0 writes them into ``WORKDIR/latents/``:

* ``latents.npy``      (N, h, w, c) float32: the KL posterior mean, or the VQ
                       pre-quantisation latents (what the LDM trains on);
* ``latents_std.npy``  (N, h, w, c) float32, KL only: the posterior std, so that a posterior
                       sample ``mean + std * eps`` is still drawn per step with the step's
                       rng when ``first_stage.sample_posterior`` (the same eps the image
                       path would draw, see ``LDMTask.train_step``);
* ``*_flip.npy``       the same for the horizontally flipped images, when ``data.random_flip``
                       (flipping latents is only approximately flipping images, so both
                       flips are encoded: 2x the encoding time and disk);
* ``low_res.npy``      (N, h, w, 3) float32, super-resolution runs only (``diffusion.concat=
                       "low_res"``): the image box-filtered to the latent size in [-1, 1], the
                       step's condition (``concat_conditioning.low_res_condition``);
* ``examples.npz``     captions, labels (if any) and a ``valid`` mask (unreadable images
                       are marked invalid and skipped like in the image pipeline);
* ``meta.json``        what the cache was built from: the first-stage checkpoint path,
                       a SHA-256 of its parameters, its kind, the compute dtype, the image
                       size and the data settings. A cache whose ``meta.json`` does not match
                       the run is rebuilt (with a warning naming the differing keys), never
                       reused.

The cache is written into a temporary directory next to it and renamed into place, so
a crash never leaves a partial cache that looks complete.

Training then reads the cache through ``LatentIterator``, a ``DataIterator`` over the
cache: the same (seed, position) -> example order, the same per-position flip draw, the
same process sharding, replacement of unreadable examples and checkpointable state as
the image pipeline, so a run on precomputed latents sees exactly the examples (and
flips) of a run on images, and resumes at the same data position. Each process reads
only its own rows (memory-mapped ``.npy``). Random crops (``data.center_crop=False``)
cannot be precomputed and are refused. The encoding batch is ``train.batch_size`` (or
``data.precompute_batch_size`` when set). The workdir must be a (shared) POSIX path.
With ``model.dtype="bfloat16"`` the mean and std are stored (float32) from the bfloat16
encoder, and the posterior sample is formed in float32 (the image path forms it in the
encoder's dtype).
"""
from __future__ import annotations

import concurrent.futures
import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
from typing import Any, Dict, Optional

import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax.data.pipeline import DataIterator, _get as _data_get, make_source, preprocess
from ldm_jax.training.config_access import config_get as _cfg_get
from ldm_jax.training import sharding as shd

log = logging.getLogger(__name__)

CACHE_VERSION = 1
CACHE_DIRNAME = "latents"


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if hasattr(x, "to_dict"):
        return _jsonable(x.to_dict())
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating,)):
        return float(x)
    return x


def params_fingerprint(params) -> str:
    """SHA-256 of the (gathered) parameter values, paths, shapes and dtypes (a collective)."""
    host = shd.gather_to_host(params)
    h = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_flatten_with_path(host)[0]:
        leaf = np.ascontiguousarray(leaf)
        h.update(f"{shd.path_str(path)}|{leaf.shape}|{leaf.dtype}|".encode())
        h.update(leaf.tobytes())
    return h.hexdigest()


def _source_fingerprint(source) -> Dict[str, Any]:
    """Cheap identity of the data behind a source (folder: files, sizes, mtimes, captions)."""
    out: Dict[str, Any] = {"num_examples": len(source), "type": type(source).__name__}
    files = getattr(source, "files", None)
    root = getattr(source, "root", None)
    if files is not None and root is not None:
        h = hashlib.sha256()
        for rel, cap in zip(files, getattr(source, "captions", [""] * len(files))):
            try:
                st = os.stat(os.path.join(root, rel))
                h.update(f"{rel}|{st.st_size}|{st.st_mtime_ns}|{cap}\n".encode())
            except OSError:
                h.update(f"{rel}|missing\n".encode())
        out["files_sha256"] = h.hexdigest()
    ds = getattr(source, "_ds", None)
    info = getattr(ds, "dataset_info", None)
    if info is not None:
        out["tfds_version"] = str(getattr(info, "version", ""))
    return out


def expected_meta(task, data_cfg, source, split: str = "train") -> Dict[str, Any]:
    """The ``meta.json`` "key" a cache must carry to be reused by this run (a collective)."""
    fs = task.config.first_stage
    checkpoint = _cfg_get(fs, "checkpoint", "") or ""
    first_stage = {
        "checkpoint": os.path.abspath(checkpoint) if checkpoint else "",
        "kind": task.vae.config.kind,
        "params_sha256": params_fingerprint(task.frozen["vae"]),
    }
    if not checkpoint:
        first_stage.update(random_init=True, seed=int(_cfg_get(fs, "seed", 0)),
                           autoencoder=_jsonable(_cfg_get(fs, "autoencoder", {})))
    image_size = _data_get(data_cfg, "image_size")
    data = {k: _jsonable(_data_get(data_cfg, k)) for k in
            ("name", "data_dir", "path", "image_key", "caption_key", "label_key", "caption_template",
             "folder_labels", "exclude_captions")}
    data["split"] = split
    key = {
        "version": CACHE_VERSION,
        "first_stage": first_stage,
        "compute_dtype": np.dtype(task.dtype).name,
        "image_size": None if image_size is None else int(image_size),
        "random_flip": bool(_data_get(data_cfg, "random_flip")),
        "data": data,
        "source": _source_fingerprint(source),
    }
    if _with_low_res(task):  # only then, so caches of other runs keep their key
        key["low_res"] = True
    return key


def _with_low_res(task) -> bool:
    """Super-resolution training: the cache also holds the low-res condition of every image."""
    return getattr(task, "concat", "none") in ("low_res", "noise_augmented_low_res")


def _diff(cached: Any, expected: Any, prefix: str = "") -> list:
    if isinstance(cached, dict) and isinstance(expected, dict):
        out = []
        for k in sorted(set(cached) | set(expected)):
            out += _diff(cached.get(k), expected.get(k), f"{prefix}{k}.")
        return out
    return [] if cached == expected else [f"{prefix[:-1]}: cached {cached!r}, now {expected!r}"]


def check_cache(cache_dir: str, expected: Dict[str, Any]) -> Optional[str]:
    """None when ``cache_dir`` holds a complete cache built for ``expected``; else why not."""
    meta_path = os.path.join(cache_dir, "meta.json")
    if not os.path.isfile(meta_path):
        return f"no cache at {cache_dir}" if not os.path.exists(cache_dir) else f"{meta_path} is missing"
    try:
        with open(meta_path, encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, ValueError) as err:
        return f"{meta_path} is unreadable ({err})"
    diffs = _diff(meta.get("key"), json.loads(json.dumps(expected)))
    if diffs:
        return f"{meta_path} does not match this run: " + "; ".join(diffs[:6])
    for name in meta.get("files", []):
        if not os.path.isfile(os.path.join(cache_dir, name)):
            return f"{os.path.join(cache_dir, name)} is missing"
    return None


# ------------------------------------------------------------------ building
def make_encode_fn(vae, mesh, low_res: bool = False):
    """Jitted ``(vae_params, images uint8 (B, H, W, 3)) -> {"latents"[, "latents_std"][, "low_res"]}``
    (float32, unscaled, replicated): KL mean and std, or VQ pre-quantisation latents; with
    ``low_res`` the super-resolution condition of the images as well."""
    from ldm_jax.training.concat_conditioning import low_res_condition
    from ldm_jax.training.image_range import images_to_float

    def fn(vae_params, image_bhwc):
        enc = vae.apply({"params": vae_params}, images_to_float(image_bhwc), method="encode")
        if hasattr(enc, "logvar"):
            out = {"latents": enc.mean.astype(jnp.float32), "latents_std": enc.std.astype(jnp.float32)}
        else:
            out = {"latents": enc.pre_quant.astype(jnp.float32)}
        if low_res:
            out["low_res"] = low_res_condition(image_bhwc, vae.config.downsample_factor)
        return out

    return shd.SyncedJit(jax.jit(fn, out_shardings=shd.replicated(mesh)), "encode_latents")


def build_cache(task, data_cfg, source, cache_dir: str, expected: Dict[str, Any], batch_size: int,
                progress: bool = True) -> None:
    """Encode every example of ``source`` and write the cache atomically (process 0 writes;
    every process loads and encodes its share of each batch). A collective."""
    mesh = task.mesh
    pc, pi = jax.process_count(), jax.process_index()
    is_main = pi == 0
    shd.local_batch_size(batch_size, mesh)
    local = batch_size // pc
    n = len(source)
    image_size = _data_get(data_cfg, "image_size")
    flips = bool(_data_get(data_cfg, "random_flip"))
    encode = getattr(task, "_latent_encode_fn", None)
    if encode is None:  # one jitted encoder per task (params are an argument: rebuilds reuse it)
        encode = make_encode_fn(task.vae, mesh, low_res=_with_low_res(task))
        try:
            task._latent_encode_fn = encode
        except AttributeError:  # pragma: no cover - a task without a __dict__
            pass
    threads = max(1, int(_data_get(data_cfg, "num_threads")))
    f = task.vae.config.downsample_factor

    def load(index: int):
        if index >= n:
            return None, None
        try:
            ex = source.load(index)
            image = preprocess(ex["image"], image_size, center_crop=True, random_flip=False, rng=None)
            return image, ex
        except Exception as err:  # noqa: BLE001 - unreadable: skipped like the image pipeline
            log.warning("latent cache: skipping unreadable example %s (%s: %s)", source.describe(index),
                        type(err).__name__, err)
            return None, None

    tmp = None
    arrays: Dict[str, np.ndarray] = {}  # process 0: output name -> memory-mapped .npy being written
    records: Dict[int, Any] = {}
    num_chunks = math.ceil(n / batch_size)
    bar = None
    if is_main:
        parent = os.path.dirname(os.path.abspath(cache_dir))
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".{CACHE_DIRNAME}.tmp-", dir=parent)
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=n, desc="encoding latents", dynamic_ncols=True)
    shape = None
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        for c in range(num_chunks):
            indices = [c * batch_size + pi * local + j for j in range(local)]
            loaded = list(pool.map(load, indices))
            images = [im for im, _ in loaded if im is not None]
            if shape is None:  # the image shape must agree on all processes (from one readable image)
                shapes = _gather(list(images[0].shape) if images else None)
                shape = next((tuple(s) for s in shapes if s is not None), None)
                if shape is None:
                    shape = tuple(source.image_shape) if getattr(source, "image_shape", None) else None
                if shape is None or shape[0] % f or shape[1] % f:
                    raise ValueError(f"latent cache: cannot determine a usable image shape ({shape}) for "
                                     f"data.image_size={image_size} and first-stage factor {f}")
            for im in images:
                if im.shape != shape:
                    raise ValueError(f"latent cache: image of shape {im.shape} != {shape}: set data.image_size")
            blank = np.zeros(shape, np.uint8)
            batch = np.stack([blank if im is None else im for im, _ in loaded])
            for index, (im, ex) in zip(indices, loaded):
                if index < n:
                    records[index] = None if im is None else (
                        str(ex.get("caption", "")), None if "label" not in ex else int(ex["label"]))
            outs = {"": encode(task.frozen["vae"], shd.shard_batch(batch, mesh))}
            if flips:
                outs["_flip"] = encode(task.frozen["vae"], shd.shard_batch(np.ascontiguousarray(batch[:, :, ::-1]),
                                                                           mesh))
            if is_main:
                lo, hi = c * batch_size, min((c + 1) * batch_size, n)
                for suffix, out in outs.items():
                    for name, value in out.items():
                        value = np.asarray(value)
                        key = name + suffix
                        if key not in arrays:
                            arrays[key] = np.lib.format.open_memmap(
                                os.path.join(tmp, key + ".npy"), mode="w+", dtype=np.float32,
                                shape=(n,) + value.shape[1:])
                        arrays[key][lo:hi] = value[: hi - lo]
                if bar is not None:
                    bar.update(hi - lo)
    if bar is not None:
        bar.close()
    gathered = _gather({str(k): v for k, v in records.items()})
    if is_main:
        allrec = {}
        for part in gathered:
            allrec.update({int(k): v for k, v in part.items()})
        valid = np.array([allrec.get(i) is not None for i in range(n)], np.bool_)
        captions = np.array([allrec[i][0] if valid[i] else "" for i in range(n)], dtype=np.str_)
        examples = {"valid": valid, "caption": captions}
        if getattr(source, "has_labels", False):
            examples["label"] = np.array([allrec[i][1] if valid[i] else -1 for i in range(n)], np.int32)
        np.savez(os.path.join(tmp, "examples.npz"), **examples)
        files = sorted(k + ".npy" for k in arrays) + ["examples.npz"]
        for a in arrays.values():
            a.flush()
        del arrays
        meta = {"key": expected, "files": files,
                "info": {"num_examples": n, "num_unreadable": int((~valid).sum()),
                         "image_shape": list(shape), "encode_batch_size": batch_size}}
        with open(os.path.join(tmp, "meta.json"), "w", encoding="utf-8") as fh:
            json.dump(meta, fh, indent=1)
        # Atomic swap: the old cache moves aside, the complete new one is renamed into place.
        stale = None
        if os.path.exists(cache_dir):
            stale = tempfile.mkdtemp(prefix=f".{CACHE_DIRNAME}.stale-", dir=os.path.dirname(os.path.abspath(cache_dir)))
            os.rmdir(stale)
            os.replace(cache_dir, stale)
        os.replace(tmp, cache_dir)
        if stale is not None:
            shutil.rmtree(stale, ignore_errors=True)
        log.info("latent cache: %d examples (%d unreadable) encoded into %s", n, int((~valid).sum()), cache_dir)
    shd.sync_processes("latent_cache_written")


def _gather(obj) -> list:
    from ldm_jax.training.loop import _allgather_json

    return _allgather_json(obj)


# ------------------------------------------------------------------ reading
class LatentSource:
    """Random access over a cache: ``load(i)`` -> {"caption"[, "label"]} (raises for an
    example that was unreadable when the cache was built); the latents are read by
    ``LatentIterator`` from the memory-mapped arrays."""

    def __init__(self, cache_dir: str, with_std: bool, with_flip: bool, with_low_res: bool = False):
        self.cache_dir = cache_dir
        ex = np.load(os.path.join(cache_dir, "examples.npz"))
        self.valid = ex["valid"]
        self.captions = ex["caption"]
        self.labels = ex["label"] if "label" in ex.files else None
        self.has_labels = self.labels is not None
        names = ["latents"] + (["latents_std"] if with_std else []) + (["low_res"] if with_low_res else [])
        self.arrays = {}
        for suffix in [""] + (["_flip"] if with_flip else []):
            for name in names:
                path = os.path.join(cache_dir, name + suffix + ".npy")
                if not os.path.isfile(path):
                    raise FileNotFoundError(f"latent cache {cache_dir}: {name + suffix}.npy is missing "
                                            f"(expected for first_stage.sample_posterior / data.random_flip / "
                                            f"diffusion.concat)")
                self.arrays[name + suffix] = np.load(path, mmap_mode="r")
        self.names = names

    def __len__(self) -> int:
        return len(self.valid)

    def describe(self, index: int) -> str:
        return f"latent cache {self.cache_dir} example {index} (unreadable when the cache was built)"

    def load(self, index: int) -> dict:
        if not self.valid[index]:
            raise ValueError("the image could not be read when the latents were precomputed")
        out = {"caption": str(self.captions[index])}
        if self.has_labels:
            out["label"] = int(self.labels[index])
        return out

    def latents(self, index: int, flip: bool) -> Dict[str, np.ndarray]:
        suffix = "_flip" if flip else ""
        return {name: np.array(self.arrays[name + suffix][index]) for name in self.names}


class LatentIterator(DataIterator):
    """``DataIterator`` over a latent cache: batches {"latents" (L, h, w, c) float32[,
    "latents_std"][, "low_res"], "caption", "index"[, "label"][, "mask"]} in the image pipeline's order,
    with its flips (drawn from (seed, position) exactly as ``preprocess`` draws them)."""

    def _example(self, index: int, rng) -> dict:
        ex = self.source.load(index)  # caption / label; raises for an example the cache marked unreadable
        flip = bool(rng is not None and rng.random() < 0.5)  # preprocess's draw (rng is None without random_flip)
        out = {**self.source.latents(index, flip), "caption": ex["caption"]}
        if self.has_labels:
            out["label"] = ex["label"]
        return out

    @staticmethod
    def _batch_fn(examples: list) -> dict:
        out = {"caption": np.array([ex["caption"] for ex in examples], dtype=np.str_),
               "index": np.array([ex["index"] for ex in examples], dtype=np.int64)}
        for key in ("latents", "latents_std", "low_res"):
            if key in examples[0]:
                out[key] = np.stack([ex[key] for ex in examples]).astype(np.float32, copy=False)
        for key, dtype in (("label", np.int32), ("mask", np.bool_)):
            if key in examples[0]:
                out[key] = np.array([ex[key] for ex in examples], dtype=dtype)
        return out


def prepare_latent_dataset(task, config, workdir: str, seed: int, *, split: str = "train",
                           progress: bool = True) -> LatentIterator:
    """Build (or reuse, when ``meta.json`` matches) ``WORKDIR/latents`` and return the
    training iterator over it. A collective with several processes."""
    data_cfg = config.data
    name = _data_get(data_cfg, "name")
    if name == "synthetic":
        raise ValueError("data.precompute_latents=True needs a finite dataset (data.name='emoji', 'folder' or a "
                         "TFDS name); data.name='synthetic' is an endless generated stream")
    if _data_get(data_cfg, "use_tfds_load"):
        raise ValueError("data.precompute_latents=True reads examples by index: set data.use_tfds_load=False "
                         "(tfds.data_source / array_record)")
    if not bool(_data_get(data_cfg, "center_crop")):
        raise ValueError("data.precompute_latents=True needs data.center_crop=True: random crops cannot be "
                         "precomputed")
    if "://" in str(workdir):
        raise ValueError(f"data.precompute_latents=True writes the cache with local file I/O; workdir={workdir!r} "
                         "is a URL: use a (shared) POSIX path")
    source = make_source(data_cfg, split)
    expected = expected_meta(task, data_cfg, source, split)
    cache_dir = os.path.join(workdir, CACHE_DIRNAME)
    reasons = _gather(check_cache(cache_dir, expected))  # every process checks before anything is written
    reason = next((r for r in reasons if r is not None), None)
    if reason is not None:
        if jax.process_index() == 0:
            (log.warning if os.path.exists(cache_dir) else log.info)(
                "latent cache: %s; encoding the %s split (%d examples) into %s", reason, split, len(source), cache_dir)
        batch_size = int(_cfg_get(data_cfg, "precompute_batch_size", 0) or config.train.batch_size)
        build_cache(task, data_cfg, source, cache_dir, expected, batch_size, progress=progress)
        problem = check_cache(cache_dir, expected)
        if problem is not None:
            raise RuntimeError(f"latent cache {cache_dir} was just written but does not check: {problem}")
    elif jax.process_index() == 0:
        log.info("latent cache: reusing %s (built for this first stage and data)", cache_dir)
    with_std = task.vae.config.kind == "kl" and task.step_cfg.sample_posterior
    latent_source = LatentSource(cache_dir, with_std=with_std, with_flip=bool(_data_get(data_cfg, "random_flip")),
                                 with_low_res=_with_low_res(task))
    num_epochs = _data_get(data_cfg, "num_epochs")
    return LatentIterator(
        latent_source, global_batch_size=int(config.train.batch_size), process_index=jax.process_index(),
        process_count=jax.process_count(), seed=seed, image_size=None,
        shuffle=bool(_data_get(data_cfg, "shuffle")), drop_remainder=bool(_data_get(data_cfg, "drop_remainder")),
        random_flip=bool(_data_get(data_cfg, "random_flip")), center_crop=True, num_epochs=num_epochs,
        num_threads=int(_data_get(data_cfg, "num_threads")),
        prefetch_batches=int(_data_get(data_cfg, "prefetch_batches")))
