"""Compiled sampling programs kept on disk, so a repeated job skips tracing as well as compiling.

JAX's persistent compilation cache (``compile_cache.py``) saves the XLA compile, but a
new process must still trace the whole text-to-image chain (text encoder, the
scanned U-Net, the VAE decoder) and lower it to HLO to compute the cache key: at
SD1.5 shapes that is seconds of the time to the first image. This store keys a
serialized executable (``jax.experimental.serialize_executable``) by everything the
program depends on and loads it without tracing:

* the ldm_jax source code (a hash of every ``.py`` file of the package), the jax,
  jaxlib and flax versions, the backend, its devices and ``XLA_FLAGS`` / the jax
  configuration options that change numerics;
* what the caller says the program is (``description``: the pipeline's modules, with
  their configurations, dtypes and attention implementations, and its other static
  fields; the program's own static switches);
* the abstract signature of the call: the pytree structure (static fields included,
  e.g. the sampler name of a ``SamplerPlan``), and every leaf's shape, dtype and
  sharding.

It lives in ``<persistent cache dir>/ldm_jax_executables/`` and is on exactly when
JAX's persistent cache is (``enable_compilation_cache`` / ``--compilation-cache``), in
single-process jobs (multi-host ones use JAX's cache only).
Like that cache it is trusted code: loading a serialized executable can run
anything, so never point it at a directory others can write to. An entry that
cannot be read (truncated, from an incompatible build) is reported and compiled
again. ``LDM_JAX_EXECUTABLE_STORE=off`` turns the store off and keeps JAX's cache.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import pickle
import time
from typing import Any, Callable, Dict, Optional, Tuple

import jax

log = logging.getLogger(__name__)

SUBDIR = "ldm_jax_executables"
ENV_VAR = "LDM_JAX_EXECUTABLE_STORE"
_FORMAT = 1  # bump when the entry layout changes
# jax options that change the compiled program without changing the traced call's signature.
_JAX_OPTIONS = ("jax_default_matmul_precision", "jax_enable_x64", "jax_default_prng_impl",
                "jax_threefry_partitionable", "jax_numpy_dtype_promotion")
_source_digest: Optional[str] = None


def store_dir() -> Optional[str]:
    """The store's directory, or None when JAX's persistent compilation cache is off (or
    ``$LDM_JAX_EXECUTABLE_STORE`` is "off")."""
    if os.environ.get(ENV_VAR, "").strip().lower() in ("off", "0", "false", "no"):
        return None
    if not jax.config.jax_enable_compilation_cache or not jax.config.jax_compilation_cache_dir:
        return None
    return os.path.join(jax.config.jax_compilation_cache_dir, SUBDIR)


def source_digest() -> str:
    """sha256 of the ldm_jax package's Python sources (paths and contents), computed once."""
    global _source_digest
    if _source_digest is None:
        root = os.path.dirname(os.path.abspath(__file__))
        h = hashlib.sha256()
        for folder, dirs, files in sorted(os.walk(root)):
            dirs.sort()
            for name in sorted(f for f in files if f.endswith(".py")):
                path = os.path.join(folder, name)
                h.update(os.path.relpath(path, root).encode())
                with open(path, "rb") as f:
                    h.update(hashlib.sha256(f.read()).digest())
        _source_digest = h.hexdigest()
    return _source_digest


def environment_description() -> str:
    """Everything outside the call that the compiled program depends on."""
    import flax
    import jaxlib

    devices = jax.devices()
    parts = [f"format={_FORMAT}", f"code={source_digest()}", f"jax={jax.__version__}",
             f"jaxlib={jaxlib.__version__}", f"flax={flax.__version__}", f"backend={jax.default_backend()}",
             f"processes={jax.process_count()}",
             "devices=" + ",".join(f"{d.id}:{d.device_kind}" for d in devices),
             f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')}",
             f"LIBTPU_INIT_ARGS={os.environ.get('LIBTPU_INIT_ARGS', '')}"]
    for name in _JAX_OPTIONS:
        parts.append(f"{name}={getattr(jax.config, name, None)}")
    return "\n".join(parts)


def call_signature(args) -> str:
    """The abstract signature of a call: pytree structure and each leaf's shape, dtype and
    sharding (Python scalars by type: jit traces them as weakly typed values)."""
    leaves, treedef = jax.tree_util.tree_flatten(args)
    parts = [str(treedef)]
    for leaf in leaves:
        if isinstance(leaf, jax.Array):
            parts.append(f"{leaf.shape}/{leaf.dtype}/{leaf.sharding}")
        elif hasattr(leaf, "shape") and hasattr(leaf, "dtype"):
            parts.append(f"{tuple(leaf.shape)}/{leaf.dtype}/host")
        else:
            parts.append(type(leaf).__name__)
    return "\n".join(parts)


@contextlib.contextmanager
def _persistent_cache_off():
    """JAX's persistent cache off for the compilations inside. JAX decides once per process
    whether it uses the cache; ``reset_cache`` (private, also used by compile_cache.py) makes
    it decide again from the configuration."""
    from jax._src import compilation_cache as _cc

    previous = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)
    _cc.reset_cache()
    try:
        yield
    finally:
        jax.config.update("jax_enable_compilation_cache", previous)
        _cc.reset_cache()


class StoredProgram:
    """``jax.jit(fn)`` whose compiled executables are read from / written to the store.

    Calls are those of the jitted function (positional arguments only). With the store
    off it is the plain jitted function. ``description`` must name everything ``fn``
    closes over that changes the program (see the module docstring)."""

    def __init__(self, fn: Callable, description: str, name: str = "program"):
        self.jitted = jax.jit(fn)
        self.description = description
        self.name = name
        self._compiled: Dict[str, Any] = {}  # this process's executables by key
        self.loaded_from_store = 0  # executables read from disk (for tests and benchmarks)

    def __call__(self, *args):
        folder = store_dir()
        if folder is None or jax.process_count() > 1:  # multi-host programs: JAX's cache only
            return self.jitted(*args)
        key = hashlib.sha256("\n\n".join(
            (environment_description(), self.name, self.description, call_signature(args))).encode()).hexdigest()
        compiled = self._compiled.get(key)
        if compiled is not None:
            return compiled(*args)
        compiled = self._load(folder, key)
        if compiled is not None:
            try:  # (blocking: execution errors surface when the result is ready)
                out = jax.block_until_ready(compiled(*args))
            except jax.errors.JaxRuntimeError as e:  # an entry that loads but cannot run
                log.warning("%s: the stored executable for this call fails (%s); compiling it again",
                            self.name, e)
                compiled = None
            else:
                self._compiled[key] = compiled
                return out
        compiled = self._compile_and_save(folder, key, args)
        self._compiled[key] = compiled
        return compiled(*args)

    def _cache_size(self) -> int:
        """Programs compiled or loaded in this process (as ``jax.jit``'s ``_cache_size``)."""
        return self.jitted._cache_size() + len(self._compiled)

    def _load(self, folder: str, key: str):
        path = os.path.join(folder, key + ".bin")
        if not os.path.exists(path):
            return None
        from jax.experimental import serialize_executable

        t0 = time.perf_counter()
        try:
            with open(path, "rb") as f:
                payload, in_tree, out_tree, device_ids = pickle.load(f)  # trusted (module docstring)
            by_id = {d.id: d for d in jax.devices()}
            compiled = serialize_executable.deserialize_and_load(
                payload, in_tree, out_tree, execution_devices=[by_id[i] for i in device_ids])
        except Exception as e:  # noqa: BLE001 - a bad entry is recompiled, never fatal
            log.warning("%s: cannot load the stored executable %s (%s: %s); compiling it again",
                        self.name, path, type(e).__name__, e)
            return None
        self.loaded_from_store += 1
        log.info("%s: loaded the compiled program from %s in %.2f s", self.name, path, time.perf_counter() - t0)
        return compiled

    def _compile_and_save(self, folder: str, key: str, args):
        from jax.experimental import serialize_executable

        # Compiled afresh, not read from JAX's persistent cache: XLA:CPU executables loaded from that
        # cache serialize without their kernels' code (the reloaded copy fails with "Function ... not
        # found" when called).
        lowered = self.jitted.lower(*args)
        with _persistent_cache_off():
            compiled = lowered.compile()
        path = os.path.join(folder, key + ".bin")
        try:
            os.makedirs(folder, exist_ok=True)
            # The devices it runs on, in order (one for an unsharded call, the mesh's for a sharded one).
            device_ids = [d.id for d in compiled.runtime_executable().local_devices()]
            blob = pickle.dumps((*serialize_executable.serialize(compiled), device_ids))
            tmp = f"{path}.tmp{os.getpid()}"
            with open(tmp, "wb") as f:
                f.write(blob)
            os.replace(tmp, path)  # readers see a whole entry or none
        except Exception as e:  # noqa: BLE001 - a program that cannot be stored still runs
            log.warning("%s: cannot store the compiled program in %s (%s: %s)", self.name, folder,
                        type(e).__name__, e)
        return compiled


def stored_param_shapes(module, inputs: Tuple[Any, ...], static_args: Tuple[Any, ...] = (),
                        rng_names: Tuple[str, ...] = ("params",)) -> Dict[str, Any]:
    """``module``'s parameter tree as ShapeDtypeStructs: ``jax.eval_shape`` of
    ``module.init(rngs, *inputs, *static_args)`` (``inputs``: ShapeDtypeStructs), which traces
    the whole module (seconds for an SD U-Net, at every load). With the store on, the shapes
    are kept as a small JSON file keyed like the executables (code, versions, the module's
    repr with its configuration, the inputs) and read back without tracing."""
    def trace():
        rngs = {name: jax.random.PRNGKey(0) for name in rng_names}
        return jax.eval_shape(lambda *xs: module.init(rngs, *xs, *static_args), *inputs)["params"]

    folder = store_dir()
    if folder is None or jax.process_count() > 1:
        return trace()
    key = hashlib.sha256("\n\n".join((environment_description(), "param shapes", repr(module), call_signature(inputs),
                                      repr(static_args), repr(rng_names))).encode()).hexdigest()
    path = os.path.join(folder, key + ".shapes.json")
    if os.path.exists(path):
        try:
            with open(path) as f:
                return _shapes_from_json(json.load(f))
        except (OSError, ValueError, TypeError, KeyError) as e:
            log.warning("cannot read the stored parameter shapes %s (%s); tracing again", path, e)
    shapes = trace()
    try:
        os.makedirs(folder, exist_ok=True)
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(_shapes_to_json(shapes), f)
        os.replace(tmp, path)
    except (OSError, TypeError) as e:
        log.warning("cannot store parameter shapes in %s (%s)", folder, e)
    return shapes


def _shapes_to_json(tree) -> list:
    out = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if not all(isinstance(k, jax.tree_util.DictKey) and isinstance(k.key, str) for k in path):
            raise TypeError(f"parameter trees are nested dicts with string keys, got the path {path}")
        out.append([[k.key for k in path], list(leaf.shape), str(leaf.dtype)])
    return out


def _shapes_from_json(entries: list) -> Dict[str, Any]:
    import jax.numpy as jnp

    tree: Dict[str, Any] = {}
    for keys, shape, dtype in entries:
        node = tree
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = jax.ShapeDtypeStruct(tuple(int(n) for n in shape), jnp.dtype(dtype))
    return tree
