"""JAX's persistent compilation cache and ahead-of-time compilation, for repeated jobs.

A sampling or training job compiles its programs (the whole txt2img chain, the
train step) once per process; on a cold start that is most of the time to the
first image. With the persistent cache a second process with the same shapes,
flags and jax/jaxlib version loads the executables from disk instead:

    from ldm_jax.compile_cache import enable_compilation_cache
    enable_compilation_cache()            # before the first jit call of the job

From the command line: ``python train.py ... --compilation_cache DIR`` and
``python sample.py ... --compilation-cache DIR`` (``default`` for the default
directory, ``off`` to disable; without the flag the cache is on only when
``$LDM_JAX_COMPILATION_CACHE`` names a directory); both call
``configure_compilation_cache(value)``.

Directory: ``path``, else ``$LDM_JAX_COMPILATION_CACHE``, else
``$JAX_COMPILATION_CACHE_DIR``, else ``$XDG_CACHE_HOME/ldm_jax/jax_cache``
(``~/.cache/...``). ``LDM_JAX_COMPILATION_CACHE=off`` disables it. See
https://docs.jax.dev/en/latest/persistent_compilation_cache.html. The cache is
trusted code: do not point it at a directory others can write to.
"""
from __future__ import annotations

import os
import time
from typing import Any, Callable, Optional, Tuple

import jax

ENV_VAR = "LDM_JAX_COMPILATION_CACHE"
_OFF = ("off", "none", "0", "false", "no")


def default_cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "ldm_jax", "jax_cache")


def enable_compilation_cache(path: Optional[str] = None, *, min_compile_time_secs: float = 0.0,
                             min_entry_size_bytes: int = -1) -> Optional[str]:
    """Turn on JAX's persistent compilation cache; returns the directory (None if disabled
    by ``path="off"`` or ``LDM_JAX_COMPILATION_CACHE=off``).

    ``min_compile_time_secs=0`` and ``min_entry_size_bytes=-1`` cache every program
    (JAX's defaults skip programs that compile in under a second). Call it before the
    first compilation; calling it again with another directory switches to it.
    """
    if path is None:
        env = os.environ.get(ENV_VAR)
        if env is not None and env.strip().lower() in _OFF:
            return None
        path = env or os.environ.get("JAX_COMPILATION_CACHE_DIR") or default_cache_dir()
    elif str(path).strip().lower() in _OFF:  # e.g. a CLI flag --compilation-cache off
        return None
    path = os.path.abspath(os.path.expanduser(path))
    os.makedirs(path, exist_ok=True)

    from jax._src import compilation_cache as _cc  # reset_cache is the documented way to re-point it

    previous = jax.config.jax_compilation_cache_dir
    jax.config.update("jax_enable_compilation_cache", True)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_time_secs))
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", int(min_entry_size_bytes))
    try:  # also keep XLA:GPU's per-fusion autotuning results (ignored on CPU/TPU)
        jax.config.update("jax_persistent_cache_enable_xla_caches", "xla_gpu_per_fusion_autotune_cache_dir")
    except (AttributeError, ValueError):
        pass
    if previous and os.path.abspath(previous) != path and getattr(_cc, "_cache", None) is not None:
        _cc.reset_cache()  # a cache object for the old directory exists: re-point it
    return path


def configure_compilation_cache(value: Optional[str] = None) -> Optional[str]:
    """The CLI / config hook. ``value``: a directory, ``"default"`` (or ``"on"``: the default
    directory, see ``enable_compilation_cache``), ``"off"`` (disable), or None / ``""``: enable
    only if ``$LDM_JAX_COMPILATION_CACHE`` is set (and not ``off``). Returns the directory in
    use, or None when the cache stays off."""
    if value is None or not str(value).strip():
        env = os.environ.get(ENV_VAR)
        if env is None or not env.strip():
            return None
        return enable_compilation_cache()
    value = str(value).strip()
    if value.lower() in _OFF:
        disable_compilation_cache()
        return None
    if value.lower() in ("default", "on", "1", "true", "yes"):
        return enable_compilation_cache()
    return enable_compilation_cache(value)


def disable_compilation_cache() -> None:
    """Stop reading and writing the persistent cache in this process."""
    from jax._src import compilation_cache as _cc

    jax.config.update("jax_enable_compilation_cache", False)
    if getattr(_cc, "_cache", None) is not None:
        _cc.reset_cache()


def aot_compile(fn: Callable, *args: Any, jit_kwargs: Optional[dict] = None, **kwargs: Any) -> Tuple[Any, float]:
    """``jax.jit(fn).lower(*args, **kwargs).compile()`` and the seconds it took.

    The returned ``jax.stages.Compiled`` is called with arguments of exactly the
    lowered shapes/dtypes/shardings and never retraces or recompiles (a mismatch
    raises instead of silently compiling again), which is what a long sampling
    job wants. It goes through the persistent cache when that is enabled.
    """
    jitted = fn if hasattr(fn, "lower") else jax.jit(fn, **(jit_kwargs or {}))
    t0 = time.perf_counter()
    compiled = jitted.lower(*args, **kwargs).compile()
    return compiled, time.perf_counter() - t0
