"""train.py as a demanding user runs it: every bad flag, config value, workdir, data path or
checkpoint is one ``error:`` line naming the flag / key / file (exit code 2) before anything is
written to the workdir; a resume under a config that builds another model (another task, other
shapes, a changed model-defining key) is refused naming what differs, and leaves the workdir as
it was; a resume records what changed (``runs.jsonl``) and keeps ``metrics.jsonl`` one line per
step. The loop is exercised with a tiny task (one matrix, SGD) so that nothing compiles for long;
the real CLI run on configs/emoji_ldm.py:runlocal is the slow test at the end."""
import json
import os
import subprocess
import sys
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from ldm_jax.training import loop
from ldm_jax.training import sharding as shd
from ldm_jax.training.config_access import check_train_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}


def _cli(args, timeout=300):
    return subprocess.run([sys.executable, "train.py", *args, "--noprogress"], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=timeout)


def _one_error_line(proc, *fragments):
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


# ------------------------------------------------------------------ flags (no jax, no workdir)
@pytest.fixture(scope="module")
def config_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("configs")
    (d / "noget.py").write_text("def make():\n    return None\n")
    (d / "none.py").write_text("def get_config(arg=''):\n    pass\n")
    (d / "syntax.py").write_text("def get_config(:\n")
    return d


LDM = ["--config", "configs/emoji_ldm.py:runlocal"]


@pytest.mark.parametrize("args, fragments", [
    (LDM + ["--config.train.num_step=5"], ["--config.train.num_step", "unknown config key 'num_step'", "num_steps"]),
    (LDM + ["--config.model.unet.foo=1"], ["--config.model.unet.foo", "unknown config key 'foo'"]),
    (LDM + ["--config.train.num_steps=abc"], ["--config.train.num_steps=abc", "expected an int"]),
    (LDM + ["--config.train.batch_size=8.5"], ["--config.train.batch_size=8.5", "expected an int"]),
    (LDM + ["--config.train.lr=fast"], ["--config.train.lr=fast", "expected a float"]),
    (["--config", "configs/emoji_ldm.py:nosuch"], ["--config=configs/emoji_ldm.py:nosuch", "unknown preset 'nosuch'"]),
    (["--config", "configs/nosuch.py"], ["--config=configs/nosuch.py", "No such file"]),
    (["--config", "{d}/noget.py"], ["noget.py", "no get_config()"]),
    (["--config", "{d}/none.py"], ["none.py", "returned None"]),
    (["--config", "{d}/syntax.py"], ["syntax.py", "line 1"]),
    (LDM + ["extra"], ["unexpected arguments: extra"]),
    (["--workdir", "{w}"], ["--config is required"]),
], ids=["unknown-key", "unknown-nested-key", "str-for-int", "float-for-int", "str-for-float", "preset",
        "missing-file", "no-get-config", "returns-none", "syntax-error", "positional", "no-config"])
def test_flag_errors_are_one_line(args, fragments, config_files, tmp_path):
    workdir = tmp_path / "run"
    args = [a.format(d=config_files, w=workdir) for a in args]
    if "--workdir" not in args:
        args += ["--workdir", str(workdir)]
    _one_error_line(_cli(args), *fragments)
    assert not workdir.exists()


def test_partial_multiprocess_flags_and_bad_values_write_nothing(tmp_path):
    """Past the flags (jax imported): still one line, still nothing written."""
    workdir = tmp_path / "run"
    _one_error_line(_cli(LDM + ["--workdir", str(workdir), "--num_processes=2"]),
                    "also pass --coordinator_address, --process_id")
    _one_error_line(_cli(LDM + ["--workdir", str(workdir), "--config.train.log_every=0"]),
                    "train.log_every=0", ">= 1")
    assert not workdir.exists()
    afile = tmp_path / "afile"
    afile.write_text("x")
    _one_error_line(_cli(LDM + ["--workdir", str(afile)]), "is a file")
    _one_error_line(_cli(LDM + ["--workdir", str(afile / "sub")]), "cannot be created", "is a file")
    # A URL workdir was created as a local "gs:/..." folder, and orbax failed at the first checkpoint.
    _one_error_line(_cli(LDM + ["--workdir", "gs://bucket/run"]), "--workdir=gs://bucket/run: a URL", "gcsfuse")
    assert not os.path.exists(os.path.join(ROOT, "gs:"))


@pytest.mark.parametrize("url", ["gs://bucket/run", "s3://b/x", "file:///tmp/x", "hdfs://nn:8020/r"])
def test_url_workdirs_are_refused(url):
    from ldm_jax.training.loop import check_workdir

    with pytest.raises(ValueError, match="a URL; the workdir is written with local file operations"):
        check_workdir(url)


# ------------------------------------------------------------------ config values
def _ldm_config():
    import importlib.util

    spec = importlib.util.spec_from_file_location("emoji_ldm_cfg", os.path.join(ROOT, "configs", "emoji_ldm.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config("runlocal")


@pytest.mark.parametrize("key, value, fragment", [
    ("train.num_steps", 0, ">= 1"), ("train.num_steps", -3, ">= 1"), ("train.num_steps", 2.0, "integer"),
    ("train.batch_size", 0, ">= 1"), ("train.log_every", 0, ">= 1"), ("train.checkpoint_every", -1, ">= 0"),
    ("train.sample_every", -1, ">= 0"), ("train.keep_checkpoints", -1, "0 or None: keep all"),
    ("train.preemption_check_every", 0, ">= 1"), ("train.grad_accum_steps", 0, ">= 1"),
    ("train.warmup_steps", -1, ">= 0"), ("train.lr", -1e-3, ">= 0"), ("train.lr", float("nan"), "finite"),
    ("train.eps", 0.0, "> 0"), ("train.b2", 1.0, "[0, 1)"), ("train.ema_decay", 1.5, "[0, 1)"),
    ("train.grad_clip", -1.0, ">= 0"), ("train.weight_decay", -0.1, ">= 0"), ("train.end_lr_factor", -1.0, ">= 0"),
    ("train.lr_schedule", "linear", "'constant', 'cosine'"), ("sample.sampler", "nosuch", "'ddim'"),
    ("data.image_size", 0, ">= 1"), ("seed", 1.5, "integer"),
])
def test_config_value_errors_name_the_key(key, value, fragment):
    cfg = _ldm_config().to_dict()  # (a plain dict takes values of any type)
    section, _, name = key.rpartition(".")
    (cfg[section] if section else cfg)[name] = value
    with pytest.raises(ValueError) as info:
        check_train_config(cfg)
    assert f"{key}=" in str(info.value) and fragment in str(info.value), str(info.value)


def test_config_value_checks_accept_the_presets():
    check_train_config(_ldm_config())
    cfg = _ldm_config()
    cfg.train.lr_schedule, cfg.train.warmup_steps = "cosine", cfg.train.num_steps
    with pytest.raises(ValueError, match="num_steps must be larger"):
        check_train_config(cfg)
    cfg.train.warmup_steps, cfg.train.keep_checkpoints, cfg.train.checkpoint_every = 0, None, 0
    check_train_config(cfg)  # keep all; checkpoints only at the end


@pytest.mark.parametrize("keep,max_to_keep", [(0, None), (None, None), (2, 2)])
def test_keep_checkpoints_zero_keeps_all(keep, max_to_keep, tmp_path):
    """0 keeps every checkpoint, as None does: the shipped configs declare the key an int, and
    ml_collections cannot override an int key with None from the command line."""
    from ldm_jax.training import loop

    cfg = _ldm_config()
    cfg.train.keep_checkpoints = keep
    check_train_config(cfg)
    manager = loop._checkpoint_manager(cfg, str(tmp_path))
    try:
        assert manager.max_to_keep == max_to_keep
    finally:
        manager.close()


# ------------------------------------------------------------------ the loop with a tiny task
@flax.struct.dataclass
class _State:
    step: jax.Array
    params: Any
    ema_params: Any
    rng: jax.Array


class TinyTask:
    """The loop's Task hooks around one (3, model.width) matrix trained with SGD (an EMA copy when
    train.ema_decay > 0): compiles in well under a second."""

    def __init__(self, config, mesh):
        self.mesh, self.width = mesh, int(config.model.width)
        self.global_batch_size = int(config.train.batch_size)
        self.ema = float(config.train.ema_decay) > 0
        self.tx = optax.sgd(float(config.train.lr))
        rep = NamedSharding(mesh, P())

        def init(rng):
            params = {"w": jax.random.normal(rng, (3, self.width))}
            return _State(step=jnp.int32(0), params=params, ema_params=params if self.ema else None, rng=rng)

        self._init = jax.jit(init, out_shardings=rep)
        self._abstract = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep),
                                                jax.eval_shape(init, jax.random.PRNGKey(0)))

        def step(state, batch):
            def loss_fn(p):
                return jnp.mean((batch["image"].mean(axis=(1, 2)) @ p["w"]) ** 2)

            loss, grads = jax.value_and_grad(loss_fn)(state.params)
            updates, _ = self.tx.update(grads, self.tx.init(state.params), state.params)
            params = optax.apply_updates(state.params, updates)
            ema = None if state.ema_params is None else jax.tree_util.tree_map(
                lambda e, p: 0.9 * e + 0.1 * p, state.ema_params, params)
            return state.replace(step=state.step + 1, params=params, ema_params=ema), {"loss": loss}

        self._step = jax.jit(step)

    def init_state(self, rng):
        return self._init(rng)

    def abstract_state(self):
        return self._abstract

    def prepare_batch(self, host_batch):
        return {"image": np.asarray(host_batch["image"], np.float32) / 255.0}

    def on_first_batch(self, state, batch):
        pass

    def train_step(self, state, batch):
        return self._step(state, batch)

    def metadata(self):
        return {"width": self.width}

    def load_metadata(self, meta):
        pass

    def sample(self, state, step):
        return None


def _tiny_config(**train):
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=1))
    c.data = ml_collections.ConfigDict(dict(name="synthetic", image_size=4, path=""))
    c.model = ml_collections.ConfigDict(dict(width=2, dtype="float32"))
    c.diffusion = ml_collections.ConfigDict(dict(prediction_type="epsilon"))
    c.train = ml_collections.ConfigDict(dict(num_steps=2, batch_size=2, lr=0.1, ema_decay=0.0, log_every=1,
                                             checkpoint_every=1, keep_checkpoints=2, async_checkpoint=False,
                                             sample_every=0, preemption_check_every=1))
    c.train.update(train)
    return c


@pytest.fixture(scope="module")
def mesh1():
    return shd.make_mesh(1, 1, devices=jax.devices()[:1])


def _run(config, workdir, mesh, task=None):
    task = task or TinyTask(config, mesh)
    return loop.train(config, str(workdir), task=task, mesh=mesh, progress=False)


def _snapshot(workdir):
    """{relative path: bytes} of every file under workdir."""
    out = {}
    for root, _, files in os.walk(workdir):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, workdir)] = f.read()
    return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory, mesh1):
    """A tiny run's workdir at step 2 (checkpoints 1 and 2), and its files."""
    workdir = tmp_path_factory.mktemp("tiny_run")
    _run(_tiny_config(), workdir, mesh1)
    return workdir, _snapshot(workdir)


def _changed(cfg, **changes):
    cfg = ml_collections.ConfigDict(cfg.to_dict())
    for key, value in changes.items():
        section, _, name = key.replace("__", ".").rpartition(".")
        (cfg[section] if section else cfg)[name] = value
    return cfg


@pytest.mark.parametrize("changes, fragments", [
    ({"model__width": 3}, ["model.width: 2 -> 3", "params/w: checkpoint float32[3, 2], config float32[3, 3]"]),
    ({"diffusion__prediction_type": "v_prediction"}, ["diffusion.prediction_type: 'epsilon' -> 'v_prediction'"]),
    ({"train__ema_decay": 0.5}, ["train.ema_decay: 0.0 -> 0.5", "ema_params", "not in the checkpoint"]),
    ({"task": "autoencoder"}, ["config.task='ldm'", "config.task='autoencoder'"]),
    ({"train__num_steps": 1}, ["train.num_steps=1", "below the step", "train.num_steps >= 2"]),
], ids=["width", "objective", "ema-added", "task", "fewer-steps"])
def test_resume_with_another_model_is_refused_and_writes_nothing(trained, mesh1, changes, fragments):
    workdir, files = trained
    cfg = _changed(_tiny_config(), **changes)
    with pytest.raises(ValueError) as info:
        loop.prepare(cfg, str(workdir), task=TinyTask(cfg, mesh1), mesh=mesh1)
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message
    assert _snapshot(workdir) == files


def test_rerun_of_a_finished_run_does_nothing(trained, mesh1):
    workdir, files = trained
    state = _run(_tiny_config(), workdir, mesh1)
    assert int(state.step) == 2 and _snapshot(workdir) == files


def test_allowed_changes_are_recorded(trained, mesh1, tmp_path):
    """lr / num_steps / compute dtype / a key the checkpoint's config lacks may change: the run
    continues, config.json becomes the new config, runs.jsonl says what changed; metrics.jsonl
    lines past the checkpoint (a run killed before its next checkpoint) are dropped."""
    workdir = tmp_path / "run"
    os.makedirs(workdir)
    for rel, data in trained[1].items():
        os.makedirs(os.path.dirname(workdir / rel), exist_ok=True)
        (workdir / rel).write_bytes(data)
    with open(workdir / "metrics.jsonl", "a") as f:  # steps 3 and 4 logged, never checkpointed
        f.write('{"step": 3, "loss": 9.0}\n{"step": 4, "loss": 9.0}\n')
    cfg = _changed(_tiny_config(), train__num_steps=4, train__lr=0.05, model__dtype="bfloat16")
    cfg.diffusion.new_key = 1  # (as a newer config file would add)
    run = loop.prepare(cfg, str(workdir), task=TinyTask(cfg, mesh1), mesh=mesh1)
    assert set(run.changes) == {"train.num_steps", "train.lr", "model.dtype", "diffusion.new_key"}
    state = run.train(progress=False)
    assert int(state.step) == 4
    assert json.loads((workdir / "config.json").read_text())["train"]["lr"] == 0.05
    runs = [json.loads(line) for line in (workdir / "runs.jsonl").read_text().splitlines()]
    assert [(r["start_step"], r["num_steps"]) for r in runs] == [(0, 2), (2, 4)]
    assert runs[1]["changed"]["train.lr"] == [0.1, 0.05] and runs[1]["changed"]["diffusion.new_key"] == ["<absent>", 1]
    logged = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in logged] == [1, 2, 3, 4] and logged[2]["loss"] != 9.0


@pytest.mark.parametrize("path, fragment", [("missing", "does not exist"), ("empty", "no images"),
                                          ("afile", "is a file, not a folder"), (None, "needs data.path")])
def test_bad_image_folder_fails_before_writing(mesh1, tmp_path, path, fragment):
    (tmp_path / "empty").mkdir()
    (tmp_path / "afile").write_text("x")
    cfg = _changed(_tiny_config(), data__name="folder", data__path=None if path is None else str(tmp_path / path))
    workdir = tmp_path / "run"
    with pytest.raises((ValueError, OSError), match=fragment):
        loop.prepare(cfg, str(workdir), task=TinyTask(cfg, mesh1), mesh=mesh1)
    assert not workdir.exists()


# ------------------------------------------------------------------ the real CLI (slow)
@pytest.mark.slow
def test_cli_resume_refuses_another_architecture_and_keeps_config_json(tmp_path):
    """emoji_ldm runlocal, 2 steps; then the same workdir with other U-Net widths, or fewer steps:
    one error line naming the key, config.json (what sample.py rebuilds the model from) untouched."""
    workdir = tmp_path / "run"
    base = LDM + ["--workdir", str(workdir)]
    done = _cli(base + ["--config.train.num_steps=2"], timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    config_json = (workdir / "config.json").read_text()
    other = _cli(base + ["--config.train.num_steps=3", "--config.model.unet.block_out_channels=(32,32)"])
    _one_error_line(other, "cannot resume", "model.unet.block_out_channels: [32, 64] -> [32, 32]", "checkpoint float32")
    fewer = _cli(base + ["--config.train.num_steps=1"])
    _one_error_line(fewer, "train.num_steps=1", "below the step")
    assert (workdir / "config.json").read_text() == config_json
    assert sorted(os.listdir(workdir / "checkpoints")) == ["2"]


def test_model_dtype_is_named():
    from ldm_jax.training.config_access import compute_dtype

    assert compute_dtype({"dtype": "bfloat16"}).name == "bfloat16" and compute_dtype({}).name == "float32"
    for bad in ("float8", "int8", "fp32"):  # (float8 was a numpy TypeError inside the task)
        with pytest.raises(ValueError, match=f"model.dtype='{bad}': expected one of"):
            compute_dtype({"dtype": bad})
