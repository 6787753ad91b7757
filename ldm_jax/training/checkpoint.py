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
takes ShapeDtypeStructs carrying ``sharding`` (``state.abstract_train_state``).
"""
from __future__ import annotations

import logging
import os
import signal
import threading
from typing import Any, Dict, Optional, Tuple

import jax
import numpy as np
import orbax.checkpoint as ocp

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
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            create=True,
            cleanup_tmp_directories=True,
            enable_async_checkpointing=async_save,
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=(STATE, EXTRA))
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
