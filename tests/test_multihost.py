"""Two CPU processes (4 virtual devices each, ``jax.distributed.initialize`` on localhost,
gloo collectives -- the default CPU implementation in jax 0.10) train on process-local
halves of each global batch and end with the parameters of one 8-device process that
sees the whole batch. The two-process run is split in two invocations (steps 0->2, then
resume 2->3), so multi-process checkpoint save/restore (orbax + per-process data-iterator
state) and the sample grid from sharded weights are exercised too.

This file doubles as the worker script: ``python tests/test_multihost.py WORKDIR OUT
NUM_STEPS PROCESS_ID NUM_PROCESSES PORT``.
"""
import json
import os
import socket
import subprocess
import sys
import tempfile

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE_DIR = os.path.join(tempfile.gettempdir(), "ldm_jax_test_jit_cache")


def worker_config(num_steps: int):
    import importlib.util

    spec = importlib.util.spec_from_file_location("emoji_ldm", os.path.join(ROOT, "configs", "emoji_ldm.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cfg = module.get_config("runlocal")
    cfg.mesh.data, cfg.mesh.fsdp = 2, 4
    cfg.train.num_steps = num_steps
    cfg.train.lr = 1e-3
    cfg.train.eps = 1e-3  # see tests/test_training.py: keeps Adam's first update Lipschitz in g
    cfg.train.log_every = 1
    cfg.train.checkpoint_every = 2
    cfg.train.sample_every = 3
    cfg.sample.num_inference_steps = 2
    return cfg


def worker(workdir, out, num_steps, process_id, num_processes, port):
    import jax

    if num_processes > 1:
        jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=num_processes,
                                   process_id=process_id)
    assert jax.device_count() == 8 and jax.process_count() == num_processes
    from ldm_jax.training import loop
    from ldm_jax.training import sharding as shd

    state = loop.train(worker_config(num_steps), workdir, progress=False)
    params = shd.gather_to_host({"params": state.params, "ema": state.ema_params})  # collective
    if jax.process_index() == 0:
        flat = {shd.path_str(p): np.asarray(x)
                for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}
        np.savez(out, step=int(jax.device_get(state.step)), **flat)


def _free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _spawn(workdir, out, num_steps, num_processes, devices_per_process):
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices_per_process}",
           "JAX_COMPILATION_CACHE_DIR": CACHE_DIR, "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "1"}
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), str(workdir), str(out), str(num_steps),
                               str(i), str(num_processes), str(port)],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(num_processes)]
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=900)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, text in zip(procs, outputs):
        assert p.returncode == 0, text[-4000:]
    return outputs


@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path):
    two, one = tmp_path / "two", tmp_path / "one"
    _spawn(two, tmp_path / "two_a.npz", 2, num_processes=2, devices_per_process=4)
    assert sorted(os.listdir(two / "checkpoints")) == ["2"]
    _spawn(two, tmp_path / "two.npz", 3, num_processes=2, devices_per_process=4)   # resumes at step 2
    _spawn(one, tmp_path / "one.npz", 3, num_processes=1, devices_per_process=8)

    a, b = np.load(tmp_path / "two.npz"), np.load(tmp_path / "one.npz")
    assert int(a["step"]) == int(b["step"]) == 3
    assert sorted(a.files) == sorted(b.files)
    worst = 0.0
    for key in a.files:
        np.testing.assert_allclose(a[key], b[key], atol=1e-5, rtol=0, err_msg=key)
        worst = max(worst, float(np.max(np.abs(a[key].astype(np.float64) - b[key]))) if a[key].size else 0.0)
    print(f"two processes vs one: max |param diff| {worst:.2e}")

    losses = lambda d: [json.loads(line)["loss"] for line in open(d / "metrics.jsonl")]  # noqa: E731
    np.testing.assert_allclose(losses(two), losses(one), atol=1e-5)
    assert len(losses(two)) == 3
    # Process 0 wrote the checkpoints (with both processes' data states) and the sample grid.
    assert sorted(os.listdir(two / "checkpoints")) == ["2", "3"]
    extra = json.load(open(two / "checkpoints" / "3" / "extra" / "metadata"))
    assert extra["data_state"] == [{"step": 3}, {"step": 3}]
    assert os.path.isfile(two / "samples" / "step_0000003.png")


if __name__ == "__main__":
    workdir_, out_, steps_, pid_, nproc_, port_ = sys.argv[1:7]
    worker(workdir_, out_, int(steps_), int(pid_), int(nproc_), int(port_))
