"""The generic training loop behind ``train.py``.

``train(config, workdir)`` builds the mesh, the task (``LDMTask`` unless one is given),
the data iterator and the checkpoint manager; resumes from ``workdir/checkpoints`` when
a checkpoint exists (state restored into its shardings, data-iterator state and task
metadata such as ``scale_factor`` from the checkpoint's JSON); then runs
``task.train_step`` until ``train.num_steps``, logging (tqdm on process 0, TensorBoard
scalars in ``workdir/tb``, JSON lines in ``workdir/metrics.jsonl``; ``data_skipped`` counts the
unreadable examples met, and a warning at the end of the run gives their total), writing sample
grids to ``workdir/samples`` every ``train.sample_every`` steps and checkpoints every
``train.checkpoint_every`` steps, at the end and on SIGTERM.

A task is any object with these hooks (``LDMTask`` is the latent-diffusion one; the
first-stage trainer provides another):

    init_state(rng) -> state            sharded, e.g. state.create_train_state
    abstract_state() -> ShapeDtypeStructs with shardings (restore target)
    prepare_batch(host_batch) -> {name: np.ndarray}   process-local, numeric
    on_first_batch(state, device_batch)  fresh runs only (e.g. scale_by_std)
    train_step(state, device_batch) -> (state, metrics)
    metadata() -> JSON dict;  load_metadata(dict)
    sample(state, step) -> images (N, H, W, 3) in [0, 1], or None
    global_batch_size: int

Determinism: the state carries the rng (step keys are fold_in(rng, step)), the data
iterator state is checkpointed per process, so stopping at step k and rerunning to N
reproduces an uninterrupted run bit for bit (with ``train.lr_schedule="cosine"`` the decay
horizon is ``train.num_steps``, so raising it changes the learning rate from there on; a
warning says so).

Two phases. ``prepare(config, workdir)`` checks everything a user can get wrong and writes
nothing to the workdir: the config keys (``config_access.check_train_config`` for the loop's,
``config_keys.check_config_keys`` for the model, objective, data, sample and mesh ones: a ValueError naming the key
and what is allowed), the workdir path (``check_workdir``), the mesh, the task and
the data (their own errors name their keys and files), and on resume the checkpoint: a
checkpoint of another task (``config.task``) or of another model (saved arrays of other
shapes, or a changed model-defining key, ``checkpoint.MODEL_KEYS``) is refused naming what differs,
and so is a ``train.num_steps`` below the checkpoint's step. ``TrainingRun.train()`` then
writes the workdir and trains. ``train.py`` prints the errors of the first phase as one line.

What the workdir records: ``config.json`` is the configuration of the latest run (what
``sample.py`` rebuilds the model from; a resume cannot change the model, so it always
describes the checkpoints), every checkpoint's JSON keeps the configuration it was saved
with, and ``runs.jsonl`` gets one line per start (``start_step``, ``num_steps``, the time,
and ``changed``: the keys that differ from the checkpoint's configuration, old and new
value; they are also logged as a warning). Rerunning a finished run (``train.num_steps``
equal to the checkpoint's step) only logs that there is nothing to do. On resume,
``metrics.jsonl`` lines past the checkpoint's step (logged by a run killed between
checkpoints) are dropped, as those steps are trained again.
"""
from __future__ import annotations

import datetime
import json
import logging
import math
import os
import re
import time
from typing import Any, Dict, Optional, Protocol

import jax
import numpy as np

from ldm_jax.training import checkpoint as ckpt_lib
from ldm_jax.training import sharding as shd
from ldm_jax.training.checkpoint import check_resume, format_changes
from ldm_jax.training.config_access import check_train_config, config_get as _get
from ldm_jax.training.config_keys import check_config_keys
from ldm_jax.writable_dir import directory_problem

log = logging.getLogger(__name__)


class Task(Protocol):
    """What ``train`` needs from a model-specific task (see the module docstring)."""

    global_batch_size: int

    def init_state(self, rng: jax.Array) -> Any: ...
    def abstract_state(self) -> Any: ...
    def prepare_batch(self, host_batch: Dict[str, Any]) -> Dict[str, np.ndarray]: ...
    def on_first_batch(self, state: Any, batch: Dict[str, jax.Array]) -> None: ...
    def train_step(self, state: Any, batch: Dict[str, jax.Array]) -> tuple: ...
    def metadata(self) -> Dict[str, Any]: ...
    def load_metadata(self, meta: Dict[str, Any]) -> None: ...
    def sample(self, state: Any, step: int) -> Optional[np.ndarray]: ...


# ------------------------------------------------------------------ data
class SyntheticDataset:
    """A built-in synthetic dataset with the ``ldm_jax.data`` iterator API (``data.name =
    "synthetic"``): one coloured square (random size and position, seeded per example) on
    a dark background; caption "a {colour} square", label = colour index. For smoke runs,
    tests and benchmarks without data on disk."""

    COLORS = (("red", (230, 40, 40)), ("green", (40, 200, 60)), ("blue", (50, 80, 230)), ("yellow", (230, 220, 40)))

    def __init__(self, global_batch_size: int, image_size: int = 32, process_index: int = 0,
                 process_count: int = 1, seed: int = 0):
        if global_batch_size % process_count:
            raise ValueError(f"global batch {global_batch_size} is not divisible by {process_count} processes")
        self.global_batch_size = int(global_batch_size)
        self.local_batch_size = self.global_batch_size // process_count
        self.image_size = int(image_size)
        self.process_index = int(process_index)
        self.seed = int(seed)
        self.num_skipped = 0
        self._step = 0

    def example(self, index: int) -> Dict[str, Any]:
        rng = np.random.default_rng([self.seed, index])
        s = self.image_size
        label = int(rng.integers(len(self.COLORS)))
        side = int(rng.integers(max(2, s // 4), max(3, s // 2 + 1)))
        y, x = (int(v) for v in rng.integers(0, s - side + 1, size=2))
        image = np.full((s, s, 3), 20, np.uint8)
        image[y:y + side, x:x + side] = self.COLORS[label][1]
        return {"image": image, "caption": f"a {self.COLORS[label][0]} square", "label": label, "index": index}

    def __iter__(self):
        return self

    def __next__(self) -> Dict[str, Any]:
        start = self._step * self.global_batch_size + self.process_index * self.local_batch_size
        examples = [self.example(start + j) for j in range(self.local_batch_size)]
        self._step += 1
        return {"image": np.stack([e["image"] for e in examples]),
                "caption": np.asarray([e["caption"] for e in examples]),
                "label": np.asarray([e["label"] for e in examples], np.int32),
                "index": np.asarray([e["index"] for e in examples], np.int64)}

    def get_state(self) -> Dict[str, Any]:
        return {"step": self._step}

    def set_state(self, state: Dict[str, Any]) -> None:
        self._step = int(state["step"])


def make_dataset(config, seed: int, task=None, workdir: Optional[str] = None):
    """The training iterator for ``config.data`` (``ldm_jax.data.create_dataset``, or the
    built-in ``SyntheticDataset`` for ``data.name == "synthetic"``; with
    ``data.precompute_latents``, the task's iterator over latents cached in the workdir)."""
    if bool(_get(config.data, "precompute_latents", False)):
        hook = getattr(task, "latent_dataset", None)
        if hook is None or workdir is None:
            raise ValueError(f"data.precompute_latents=True: the task {type(task).__name__} (config.task="
                             f"{_get(config, 'task', 'ldm')!r}) has no precomputed-latent dataset; only LDM training "
                             "(with a workdir) supports it")
        return hook(config, workdir, seed)
    kw = dict(global_batch_size=int(config.train.batch_size), process_index=jax.process_index(),
              process_count=jax.process_count(), seed=seed, image_size=int(config.data.image_size))
    if config.data.name == "synthetic":
        return SyntheticDataset(**kw)
    from ldm_jax.data import create_dataset

    return create_dataset(config.data, split="train", **kw)


# ------------------------------------------------------------------ logging
class MetricLogger:
    """TensorBoard (tensorboardX) + JSON lines + tqdm, on process 0 only."""

    def __init__(self, workdir: str, start_step: int, num_steps: int, enabled: bool = True,
                 progress: bool = True):
        self.enabled = enabled
        self._tb = self._bar = self._jsonl = None
        if not enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a", encoding="utf-8")
        try:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(os.path.join(workdir, "tb"))
        except ImportError:  # pragma: no cover
            log.warning("tensorboardX not installed: no TensorBoard logs")
        if progress:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=num_steps, initial=start_step, desc="train", dynamic_ncols=True)

    def step(self) -> None:
        if self._bar is not None:
            self._bar.update(1)

    def write(self, step: int, scalars: Dict[str, float]) -> None:
        if not self.enabled:
            return
        self._jsonl.write(json.dumps({"step": int(step), **{k: float(v) for k, v in scalars.items()}}) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for k, v in scalars.items():
                self._tb.add_scalar(f"train/{k}", float(v), int(step))
            self._tb.flush()
        if self._bar is not None:
            shown = {k: scalars[k] for k in ("loss", "steps_per_sec", "images_per_sec") if k in scalars}
            if scalars.get("data_skipped"):
                shown["data_skipped"] = scalars["data_skipped"]
            self._bar.set_postfix({k: f"{v:.4g}" for k, v in shown.items()}, refresh=False)

    def close(self) -> None:
        for obj in (self._bar, self._tb, self._jsonl):
            if obj is not None:
                obj.close()


def save_image_grid(images: np.ndarray, path: str, ncol: Optional[int] = None) -> str:
    """(N, H, W, 3) float in [0, 1] -> one PNG grid."""
    from PIL import Image

    from ldm_jax.image_io import make_grid, to_uint8

    # unpadded, empty cells black (to_uint8 clips to [0, 1])
    grid = make_grid(np.asarray(images, np.float32), cols=ncol, pad=0, fill=0.0)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(to_uint8(grid)).save(path)
    return path


# ------------------------------------------------------------------ per-process JSON
def _allgather_json(obj) -> list:
    """[obj of process 0, obj of process 1, ...] (a collective when several processes)."""
    if jax.process_count() == 1:
        return [obj]
    from jax.experimental import multihost_utils

    data = np.frombuffer(json.dumps(obj).encode("utf-8"), np.uint8)
    sizes = np.asarray(multihost_utils.process_allgather(np.asarray([data.size], np.int32))).reshape(-1)
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[:data.size] = data
    gathered = np.asarray(multihost_utils.process_allgather(padded)).reshape(len(sizes), -1)
    return [json.loads(bytes(gathered[i, :sizes[i]]).decode("utf-8")) for i in range(len(sizes))]


def _count_skipped(dataset) -> int:
    """Distinct unreadable examples met so far by all processes (a collective when several):
    the union of the iterators' ``unreadable`` indices, else the sum of their ``num_skipped``."""
    state = dataset.get_state() if hasattr(dataset, "get_state") else None
    indices = state.get("unreadable") if isinstance(state, dict) else None
    local = {"count": int(getattr(dataset, "num_skipped", 0) or 0),
             "indices": None if indices is None else sorted(int(i) for i in indices)}
    gathered = _allgather_json(local)
    if all(g["indices"] is not None for g in gathered):
        return len(set().union(*(g["indices"] for g in gathered)))
    return sum(g["count"] for g in gathered)


# ------------------------------------------------------------------ checks (nothing written yet)
def check_workdir(workdir: str) -> None:
    """A ValueError unless ``workdir`` is a writable directory or can be created as one
    (checked without creating it)."""
    if not workdir:
        raise ValueError("--workdir is empty: give the directory for checkpoints and logs")
    if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", workdir):
        # (it would be created as a local folder "gs:/..." and orbax would fail at the first checkpoint)
        raise ValueError(f"--workdir={workdir}: a URL; the workdir is written with local file operations: give a "
                         "file-system path (on several hosts one they all see, e.g. a gcsfuse mount of the bucket)")
    problem = directory_problem(workdir)
    if problem:
        raise ValueError(f"--workdir={workdir}: {problem}")


def check_task_shapes(config, task) -> None:
    """What an LDM task's first stage decides (it may come from a checkpoint, so this is checked on the
    built task; the first step would fail on the shapes, after the workdir is written): the U-Net
    predicts noise (or v, x0) of the latents, so model.unet.out_channels must be their channels, and
    data.image_size must be a multiple of the first stage's factor."""
    unet, vae = getattr(task, "unet", None), getattr(task, "vae", None)
    if unet is None or vae is None:
        return
    out, latent = unet.config.out_channels, vae.config.embed_dim
    if out != latent:
        raise ValueError(f"config key model.unet.out_channels={out}: must equal the first stage's {latent} latent "
                         "channels (the U-Net predicts the noise, v or x0 of the latents)")
    size, factor = _get(config.data, "image_size", None), vae.config.downsample_factor
    if size is not None and int(size) % factor:
        raise ValueError(f"config key data.image_size={size}: must be a multiple of the first stage's factor "
                         f"{factor} (images {factor}x larger than the latents)")


def _drop_metrics_after(workdir: str, step: int) -> None:
    """Keep ``metrics.jsonl`` one line per step: a run killed between checkpoints logged steps
    past the one it resumes from, which are trained (and logged) again."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.isfile(path):
        return
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    kept = []
    for line in lines:
        try:
            if int(json.loads(line)["step"]) > step:
                continue
        except (ValueError, KeyError, TypeError):
            pass
        kept.append(line)
    if len(kept) != len(lines):
        with open(path, "w", encoding="utf-8") as f:
            f.write("".join(line + "\n" for line in kept))
        log.warning("metrics.jsonl: dropped %d lines past step %d (logged after the last checkpoint)",
                    len(lines) - len(kept), step)


# ------------------------------------------------------------------ the loop
def make_task(config, mesh, workdir=None):
    """The task a config trains: ``config.task`` "ldm" (default) or "autoencoder"."""
    kind = _get(config, "task", "ldm")
    if kind == "ldm":
        from ldm_jax.training.ldm_task import LDMTask

        return LDMTask(config, mesh)
    if kind == "autoencoder":
        from ldm_jax.training.autoencoder_task import AutoencoderTask

        return AutoencoderTask(config, mesh, workdir=workdir)
    raise ValueError(f"config.task={kind!r}: expected 'ldm' or 'autoencoder'")


def _checkpoint_manager(config, workdir: str) -> ckpt_lib.CheckpointManager:
    tcfg = config.train
    # train.keep_checkpoints 0 or None keeps every checkpoint (config_get would read None as "unset": 3;
    # 0 is the command line's way: ml_collections cannot override an int key with None)
    keep = tcfg["keep_checkpoints"] if "keep_checkpoints" in tcfg else 3
    return ckpt_lib.CheckpointManager(
        os.path.join(workdir, "checkpoints"), save_every=int(_get(tcfg, "checkpoint_every", 1000)),
        max_to_keep=int(keep) if keep else None, async_save=bool(_get(tcfg, "async_checkpoint", True)))


def prepare(config, workdir: str, *, task: Optional[Task] = None, dataset=None, mesh=None) -> "TrainingRun":
    """Everything before the first write to ``workdir`` (see the module docstring): checks,
    mesh, task, data and, when ``workdir/checkpoints`` has a checkpoint, the checked restore.
    Errors a user can cause are ValueErrors / OSErrors naming the key, file or checkpoint."""
    t_setup = time.time()
    check_train_config(config)
    check_config_keys(config)
    check_workdir(workdir)
    tcfg = config.train
    if mesh is None:
        try:
            mesh = shd.make_mesh(int(config.mesh.data), int(config.mesh.fsdp))
        except ValueError as e:  # (the devices this process sees cannot make that mesh)
            raise ValueError(f"config keys mesh.data={config.mesh.data}, mesh.fsdp={config.mesh.fsdp}: {e}") from None
    # (names train.batch_size / grad_accum_steps / the mesh, before the task is built)
    shd.check_batch_size(int(tcfg.batch_size), mesh, int(_get(tcfg, "grad_accum_steps", 1)))
    shd.local_batch_size(int(tcfg.batch_size), mesh)  # validates divisibility by the processes
    if task is None:
        task = make_task(config, mesh, workdir)
        check_task_shapes(config, task)
    seed = int(_get(config, "seed", 0))
    num_steps = int(tcfg.num_steps)

    # The checkpoint, checked before anything is restored (or written): only an existing
    # checkpoints/ folder is opened (the manager creates it otherwise).
    manager, latest, changes = None, None, {}
    if os.path.isdir(os.path.join(workdir, "checkpoints")):
        manager = _checkpoint_manager(config, workdir)
        latest = manager.latest_step()
    try:
        if latest is not None:
            where = os.path.join(manager.directory, str(latest))
            extra, signature = manager.describe(latest)
            abstract_state = task.abstract_state()  # (traces the model: once, for the check and the restore)
            changes = check_resume(config, extra, signature, abstract_state, where)
            if num_steps < latest:
                raise ValueError(f"config key train.num_steps={num_steps} is below the step of the checkpoint {where}: "
                                 f"give train.num_steps >= {latest} to continue that run, or another --workdir")
            data_states = extra.get("data_state") or []
            if len(data_states) != jax.process_count():
                raise ValueError(f"cannot resume from {where}: it holds the data position of {len(data_states)} "
                                 f"processes, this run has {jax.process_count()}")
        if dataset is None:
            dataset = make_dataset(config, seed, task=task, workdir=workdir)
        if latest is not None:
            state, extra = manager.restore(latest, abstract_state)
            step = int(jax.device_get(state.step))
            dataset.set_state(extra["data_state"][jax.process_index()])
            task.load_metadata(extra)
        else:
            state, step = None, 0
    except BaseException:
        if manager is not None:
            manager.close()
        raise
    return TrainingRun(config=config, workdir=workdir, task=task, dataset=dataset, mesh=mesh, seed=seed,
                       num_steps=num_steps, state=state, step=step, manager=manager, changes=changes,
                       setup_seconds=time.time() - t_setup)


class TrainingRun:
    """A prepared run (``prepare``): ``train()`` writes the workdir and trains until
    ``train.num_steps``; returns the final state."""

    def __init__(self, *, config, workdir, task, dataset, mesh, seed, num_steps, state, step, manager, changes,
                 setup_seconds):
        self.config, self.workdir, self.task, self.dataset, self.mesh = config, workdir, task, dataset, mesh
        self.seed, self.num_steps, self.state, self.step = seed, num_steps, state, step
        self.manager, self.changes, self.setup_seconds = manager, changes, setup_seconds

    @property
    def resumed(self) -> bool:
        return self.state is not None

    def _record(self) -> None:
        """config.json (the latest run's configuration) and a runs.jsonl line (process 0)."""
        config, workdir = self.config, self.workdir
        text = (config.to_json_best_effort(indent=2) if hasattr(config, "to_json_best_effort")
                else json.dumps(ckpt_lib._jsonable(config), indent=2, default=str))
        with open(os.path.join(workdir, "config.json"), "w", encoding="utf-8") as f:
            f.write(text)
        line = {"time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "start_step": self.step, "num_steps": self.num_steps,
                "changed": {k: list(v) for k, v in self.changes.items()}}
        with open(os.path.join(workdir, "runs.jsonl"), "a", encoding="utf-8") as f:
            f.write(json.dumps(line, default=str) + "\n")

    def train(self, progress: bool = True):
        config, workdir, task, dataset, mesh = self.config, self.workdir, self.task, self.dataset, self.mesh
        is_main = jax.process_index() == 0
        tcfg = config.train
        num_steps, step = self.num_steps, self.step
        if self.resumed:
            if is_main:
                log.info("resumed from %s at step %d", self.manager.directory, step)
            if step >= num_steps:
                if is_main:
                    log.info("the checkpoint is at train.num_steps=%d already: nothing to train (raise "
                             "train.num_steps to continue)", num_steps)
                self.manager.close()
                return self.state
            if self.changes and is_main:
                log.warning("resuming with config keys changed since the checkpoint: %s",
                            format_changes(self.changes))
                if "train.num_steps" in self.changes and _get(tcfg, "lr_schedule", "constant") == "cosine":
                    log.warning("train.lr_schedule='cosine' decays over train.num_steps: with %s -> %s the learning "
                                "rate differs from step %d on from the run's schedule so far",
                                *self.changes["train.num_steps"], step)
        os.makedirs(workdir, exist_ok=True)
        if is_main:
            self._record()
            if self.resumed:
                _drop_metrics_after(workdir, step)
            write_assets = getattr(task, "write_workdir_assets", None)  # e.g. an LDM run's BERT vocabulary
            if write_assets is not None:
                write_assets(workdir)
        manager = self.manager or _checkpoint_manager(config, workdir)
        watcher = ckpt_lib.PreemptionWatcher(sync_every=int(_get(tcfg, "preemption_check_every", 1))).install()
        state = self.state if self.resumed else task.init_state(jax.random.PRNGKey(self.seed))

        def save(force: bool):
            extra = {"data_state": _allgather_json(dataset.get_state()), "step": step,
                     "config": config.to_dict() if hasattr(config, "to_dict") else dict(config), **task.metadata()}
            manager.save(step, state, extra=extra, force=force)

        logger = None
        try:
            logger = MetricLogger(workdir, step, num_steps, enabled=is_main, progress=progress)
            log_every = int(_get(tcfg, "log_every", 50))
            sample_every = int(_get(tcfg, "sample_every", 0))
            pending = []
            t_last, step_last = time.time(), step
            if is_main:
                log.info("setup took %.1fs; training steps %d -> %d on mesh %s", self.setup_seconds, step, num_steps,
                         dict(mesh.shape))
            fresh = step == 0
            while step < num_steps:
                try:
                    host_batch = next(dataset)
                except StopIteration:
                    if is_main:
                        log.warning("data exhausted at step %d (data.num_epochs?); stopping", step)
                    if step > 0:
                        save(force=True)
                    break
                batch = shd.shard_batch(task.prepare_batch(host_batch), mesh)
                if fresh:
                    task.on_first_batch(state, batch)
                    fresh = False
                state, metrics = task.train_step(state, batch)
                step += 1
                pending.append(metrics)
                logger.step()

                stop = watcher.requested(step)  # (a collective every sync_every steps with several processes)
                if step % log_every == 0 or step == num_steps or stop:
                    values = jax.device_get(pending)
                    scalars = {k: float(np.mean([m[k] for m in values])) for k in values[-1]}
                    now = time.time()
                    rate = (step - step_last) / max(now - t_last, 1e-9)
                    # data_skipped: distinct unreadable examples this process met so far.
                    scalars.update(steps_per_sec=rate, images_per_sec=rate * task.global_batch_size,
                                   data_skipped=float(getattr(dataset, "num_skipped", 0)))
                    logger.write(step, scalars)
                    pending, t_last, step_last = [], now, step
                    if not all(math.isfinite(v) for v in scalars.values()) and is_main:
                        log.warning("step %d: non-finite metrics %s", step, scalars)

                if stop or step == num_steps or manager.should_save(step):
                    save(force=stop or step == num_steps)
                if stop:
                    if is_main:
                        log.warning("termination requested: checkpoint at step %d, stopping", step)
                    break
                if sample_every and step % sample_every == 0:
                    images = task.sample(state, step)
                    if images is not None and is_main:
                        save_image_grid(images, os.path.join(workdir, "samples", f"step_{step:07d}.png"))
            skipped = _count_skipped(dataset)  # a collective: every process gets here
            if skipped and is_main:
                log.warning("data: %d unreadable examples skipped (replaced by the next readable ones; "
                            "each is named in a warning when first met)", skipped)
        finally:
            manager.close()
            if logger is not None:
                logger.close()
            watcher.uninstall()
        return state


def train(config, workdir: str, *, task: Optional[Task] = None, dataset=None, mesh=None, progress: bool = True):
    """Train (or resume) until ``config.train.num_steps``; returns the final state
    (``prepare(...).train(progress)``)."""
    return prepare(config, workdir, task=task, dataset=dataset, mesh=mesh).train(progress=progress)
