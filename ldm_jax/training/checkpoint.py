"""Checkpoints (orbax ``CheckpointManager``) and preemption (SIGTERM) handling.

Layout: ``DIR/<step>/state`` (the TrainState tree, every process writes its shards) and
``DIR/<step>/extra`` (JSON: data-iterator state, config, task metadata such as the
latent ``scale_factor``).

Safety of the last good checkpoint: orbax writes a step into a temporary directory
(``<step>.orbax-checkpoint-tmp-*``) and renames it to ``<step>`` only after every process
has committed its shards; steps beyond ``max_to_keep`` are deleted in the same finalize
call *after* that rename (``CheckpointManager._finalize``: ``_finalize_checkpoint`` then
``delete_steps``). A crash mid-save therefore leaves the previous step intact and the
unfinished temporary directory ignored by ``latest_step`` (and removed on the next start,
``cleanup_tmp_directories=True``). ``tests/test_training.py`` kills a saving process to
check this.

Restoring goes straight into the target shardings: ``restore_latest(abstract_state)``
takes ShapeDtypeStructs carrying ``sharding`` (``state.abstract_train_state``). Before
restoring, ``describe(step)`` reads a step's JSON extra and the saved arrays' shapes and dtypes
(metadata only) and ``check_resume`` compares them, and the configuration saved with the step,
with what a config builds: a resume with another task, architecture or model-defining key
(``MODEL_KEYS``) is refused naming what differs, instead of failing inside orbax or silently
continuing the weights as another model.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import threading
from typing import Any, Dict, Optional, Tuple

import jax
import numpy as np
import orbax.checkpoint as ocp

from ldm_jax.training.config_access import config_get

log = logging.getLogger(__name__)

STATE, EXTRA = "state", "extra"


class CheckpointManager:
    """Thin wrapper over ``orbax.checkpoint.CheckpointManager`` for one TrainState + JSON extra.

    ``save_every``: ``save`` without ``force`` only writes when ``step % save_every == 0``.
    ``max_to_keep``: older steps are deleted once a newer one is finalised (None: keep all).
    ``async_save``: device->host copies happen in ``save``; file writes in the background.
    """

    def __init__(self, directory: str, *, save_every: int = 1000, max_to_keep: Optional[int] = 3,
                 async_save: bool = True):
        self.directory = os.path.abspath(directory)
        self.save_every = int(save_every)
        self.max_to_keep = max_to_keep
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            create=True,
            cleanup_tmp_directories=True,
            enable_async_checkpointing=async_save,
        )
        # (handlers rather than item names: item_metadata then works before any save or restore)
        self._manager = ocp.CheckpointManager(
            self.directory, options=options,
            item_handlers={STATE: ocp.StandardCheckpointHandler(), EXTRA: ocp.JsonCheckpointHandler()})
        # orbax removes unfinished temporary step directories in a background thread and waits
        # for it only in save(): wait now, so that they are gone when the constructor returns
        # (also for runs that only restore, and before close()).
        await_cleanup = getattr(self._manager, "_maybe_await_cleanup_tmp_directory", None)
        if await_cleanup is not None:
            await_cleanup()

    # ------------------------------------------------------------------ queries
    def latest_step(self) -> Optional[int]:
        return self._manager.latest_step()

    def all_steps(self):
        return list(self._manager.all_steps())

    def should_save(self, step: int) -> bool:
        return self.save_every > 0 and step % self.save_every == 0

    # ------------------------------------------------------------------ save / restore
    def save(self, step: int, state, extra: Optional[Dict[str, Any]] = None, force: bool = False) -> bool:
        """Save ``state`` (+ JSON ``extra``) as ``step`` when due (or ``force``). Every process
        must call it with the same step. Returns whether a save was started."""
        step = int(step)
        if not force and not self.should_save(step):
            return False
        if step in self._manager.all_steps():
            return False
        extra = _jsonable(extra or {})
        saved = self._manager.save(
            step, args=ocp.args.Composite(**{STATE: ocp.args.StandardSave(state), EXTRA: ocp.args.JsonSave(extra)}),
            force=True)
        if saved and jax.process_index() == 0:
            log.info("checkpoint: saving step %d to %s", step, self.directory)
        return bool(saved)

    def restore(self, step: int, abstract_state) -> Tuple[Any, Dict[str, Any]]:
        """(state, extra) of ``step``, the arrays placed as ``abstract_state``'s shardings."""
        restored = self._manager.restore(
            int(step), args=ocp.args.Composite(**{STATE: ocp.args.StandardRestore(abstract_state),
                                                  EXTRA: ocp.args.JsonRestore()}))
        return restored[STATE], dict(restored[EXTRA] or {})

    def describe(self, step: int) -> Tuple[Dict[str, Any], Dict[str, Tuple[Tuple[int, ...], str]]]:
        """(JSON extra, {leaf path "a/b/c": (shape, dtype)} of the saved state) of ``step``,
        without reading any array."""
        step = int(step)
        extra = self._manager.restore(step, args=ocp.args.Composite(**{EXTRA: ocp.args.JsonRestore()}))[EXTRA]
        meta = self._manager.item_metadata(step)[STATE]
        return dict(extra or {}), tree_signature(meta)

    def restore_latest(self, abstract_state) -> Optional[Tuple[Any, Dict[str, Any]]]:
        """(state, extra) of the newest finalised step, or None when there is none."""
        step = self.latest_step()
        if step is None:
            return None
        return self.restore(step, abstract_state)

    def wait(self) -> None:
        """Block until background writes are finalised."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _jsonable(value):
    """numpy / jax scalars and arrays -> Python JSON types (ConfigDicts -> dicts)."""
    if hasattr(value, "to_dict"):
        value = value.to_dict()
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.generic, np.ndarray, jax.Array)):
        return np.asarray(value).tolist()
    return value


def tree_signature(tree) -> Dict[str, Tuple[Tuple[int, ...], str]]:
    """{leaf path "a/b/0/c": (shape, dtype name)} of a tree of arrays, ShapeDtypeStructs or
    orbax array metadata (dicts, lists, namedtuples and flax structs give the same paths)."""
    from ldm_jax.training.sharding import path_str

    def is_leaf(x):
        return hasattr(x, "shape") and hasattr(x, "dtype")

    flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)[0]
    return {path_str(p): (tuple(int(d) for d in x.shape), np.dtype(x.dtype).name) for p, x in flat if is_leaf(x)}


def state_differences(saved: Dict[str, Tuple], expected: Dict[str, Tuple], limit: int = 4) -> list:
    """Readable differences between two ``tree_signature``s (at most ``limit`` lines, then a
    count): leaves only one side has (grouped by their first two path parts) and shape/dtype
    mismatches. Empty when the trees agree."""
    def group(keys):
        groups: Dict[str, int] = {}
        for k in sorted(keys):
            g = "/".join(k.split("/")[:2])
            groups[g] = groups.get(g, 0) + 1
        return groups

    lines = []
    for k in sorted(set(saved) & set(expected)):
        if saved[k] != expected[k]:
            (s_shape, s_dtype), (e_shape, e_dtype) = saved[k], expected[k]
            lines.append(f"{k}: checkpoint {s_dtype}{list(s_shape)}, config {e_dtype}{list(e_shape)}")
    for g, n in group(set(saved) - set(expected)).items():
        lines.append(f"{g}: in the checkpoint ({n} arrays), not in the state this config builds")
    for g, n in group(set(expected) - set(saved)).items():
        lines.append(f"{g}: built by this config ({n} arrays), not in the checkpoint")
    if len(lines) > limit:
        lines = lines[:limit] + [f"... {len(lines) - limit} more"]
    return lines


# ------------------------------------------------------------------ resuming under a config
# Config keys that define the trained model (prefixes): a resume that changes one is refused, as
# the checkpoint's weights would silently continue as another model (frozen first stage / text
# encoder, objective, schedule, conditioning). COMPUTE_ONLY_KEYS may change (precision, kernels,
# rematerialisation, dropout); any other change (lr, batch size, data, ...) is allowed and logged.
MODEL_KEYS = ("task", "model", "first_stage.autoencoder", "first_stage.random_init", "first_stage.seed",
              "first_stage.scale_factor", "text_encoder.kind", "text_encoder.clip", "text_encoder.ldm_bert",
              "text_encoder.seed", "text_encoder.trainable", "diffusion.conditioning", "diffusion.concat",
              "diffusion.prediction_type", "diffusion.num_train_timesteps", "diffusion.beta_schedule",
              "diffusion.beta_start", "diffusion.beta_end", "diffusion.rescale_betas_zero_snr",
              "diffusion.num_classes")
COMPUTE_ONLY_KEYS = ("model.dtype", "model.attention_impl", "model.remat", "model.unet.conv_impl",
                     "model.unet.remat_blocks", "model.unet.dropout", "model.autoencoder.conv_impl",
                     "model.sample_posterior", "model.codebook_init")


ABSENT = "<absent>"  # config_changes' value for a key only one configuration has


def _under(key: str, prefixes) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def _flat_config(cfg) -> Dict[str, Any]:
    """{dotted key: JSON value} of a (Config)dict (tuples as lists, as they come back from JSON)."""
    def walk(value, prefix, out):
        if isinstance(value, dict) and value:
            for k, v in value.items():
                walk(v, f"{prefix}.{k}" if prefix else str(k), out)
        else:
            out[prefix] = value
        return out

    plain = json.loads(json.dumps(_jsonable(cfg), default=str))
    return walk(plain, "", {})


def config_changes(old, new) -> Dict[str, tuple]:
    """{dotted key: (old value, new value)} where two configurations differ ("<absent>" for a
    key only one has)."""
    a, b = _flat_config(old), _flat_config(new)
    pairs = {k: (a.get(k, ABSENT), b.get(k, ABSENT)) for k in sorted(set(a) | set(b))}
    return {k: v for k, v in pairs.items() if v[0] != v[1]}


def format_changes(changes: Dict[str, tuple]) -> str:
    return ", ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changes.items())


def check_resume(config, extra: Dict[str, Any], saved_signature: Dict[str, tuple], abstract_state,
                 where: str) -> Dict[str, tuple]:
    """Whether the checkpoint at ``where`` (its JSON ``extra`` and ``saved_signature``, see
    ``CheckpointManager.describe``) can continue under ``config``: a ValueError naming what
    differs when it holds another task or another model; else the config keys changed since
    it was saved, {key: (old, new)}."""
    old_config = extra.get("config")
    kind = config_get(config, "task", "ldm")
    old_kind = extra.get("task") or (old_config or {}).get("task") or "ldm"
    hint = ("resume with the checkpoint's settings (its workdir's config.json), or give another --workdir"
            + (" (--config.init.checkpoint=THIS_WORKDIR starts a new run from its weights)" if kind == "ldm" else ""))
    if old_kind != kind:
        raise ValueError(f"cannot resume from {where}: it holds a config.task={old_kind!r} run, this config trains "
                         f"config.task={kind!r}; give another --workdir")
    changes = config_changes(old_config, config) if old_config is not None else {}
    # (a key only one side has, e.g. one a newer config file added, is logged, not refused)
    model_changes = {k: v for k, v in changes.items()
                     if _under(k, MODEL_KEYS) and not _under(k, COMPUTE_ONLY_KEYS) and ABSENT not in v}
    differences = state_differences(saved_signature, tree_signature(abstract_state))
    if differences or model_changes:
        what = []
        if model_changes:
            what.append("model keys changed since the checkpoint: " + format_changes(model_changes))
        elif changes:  # e.g. train.ema_decay=0 drops the EMA copy, train.grad_clip=0 the clipping state
            what.append("config keys changed since the checkpoint: " + format_changes(
                {k: v for k, v in changes.items() if k != "train.num_steps"}))
        if differences:
            what.append("saved arrays differ: " + "; ".join(differences))
        raise ValueError(f"cannot resume from {where}: this config builds another model ({'; '.join(what)}); {hint}")
    return changes


# ------------------------------------------------------------------ preemption
class PreemptionWatcher:
    """SIGTERM (and optionally SIGINT) -> "checkpoint at the next step boundary and stop".

    ``requested(step)`` is what the loop polls after each step. With several processes
    the local flags are OR-ed with a tiny all-gather every ``sync_every`` steps, so all
    processes stop (and save) at the same step. Previous handlers are restored by
    ``uninstall``. Installing only works from the main thread; elsewhere it is a no-op
    (the flag can still be set with ``request()``).
    """

    def __init__(self, signals=(signal.SIGTERM,), sync_every: int = 1):
        self._flag = threading.Event()
        self._signals = tuple(signals)
        self._previous: Dict[int, Any] = {}
        self.sync_every = max(1, int(sync_every))

    def install(self) -> "PreemptionWatcher":
        if threading.current_thread() is not threading.main_thread():
            return self
        for sig in self._signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame):  # noqa: ARG002
        self._flag.set()

    def request(self) -> None:
        self._flag.set()

    def requested(self, step: int) -> bool:
        local = self._flag.is_set()
        if jax.process_count() == 1:
            return local
        if step % self.sync_every:
            return False
        from jax.experimental import multihost_utils

        flags = multihost_utils.process_allgather(np.asarray([local], dtype=np.int32))
        stop = bool(np.any(flags))
        if stop:
            self._flag.set()
        return stop

    def __enter__(self):
        return self.install()

    def __exit__(self, *exc):
        self.uninstall()
