"""Two CPU processes (4 virtual devices each, ``jax.distributed.initialize`` on localhost,
gloo collectives -- the default CPU implementation in jax 0.10) train on process-local
halves of each global batch and end with the parameters of one 8-device process that
sees the whole batch (this pytest process). The two-process run trains steps 0->2, then
a second ``loop.train`` call resumes 2->3 from the checkpoint (task metadata reset first,
new data iterators), so multi-process checkpoint save/restore (orbax + per-process
data-iterator state) and the sample grid from sharded weights are exercised too.

This file doubles as the worker script: ``python tests/test_multihost.py WORKDIR OUT
STEPS PROCESS_ID NUM_PROCESSES PORT`` with STEPS a comma-separated list of
``train.num_steps`` values run one after the other on WORKDIR.
"""
import json
import os
import socket
import subprocess
import sys
import tempfile

import numpy as np
import pytest

from test_training import _compilation_cache  # noqa: F401  (the persistent compilation cache, autouse)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE_DIR = os.path.join(tempfile.gettempdir(), "ldm_jax_test_jit_cache")


def worker_config(num_steps: int, sample_every: int = 3):
    """tests/test_training.py's tiny config on a 2x4 mesh (the same step program as there)."""
    from test_training import tiny_config

    cfg = tiny_config(num_steps=num_steps, log_every=1, checkpoint_every=2, sample_every=sample_every)
    cfg.mesh.data, cfg.mesh.fsdp = 2, 4
    cfg.sample.num_inference_steps = 2
    return cfg


def flat_params(state):
    """{path: np.ndarray} of the params and EMA params (a collective with several processes)."""
    import jax

    from ldm_jax.training import sharding as shd

    params = shd.gather_to_host({"params": state.params, "ema": state.ema_params})
    return {shd.path_str(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}


def worker(workdir, out, steps, process_id, num_processes, port):
    import jax

    if num_processes > 1:
        jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=num_processes,
                                   process_id=process_id)
    assert jax.device_count() == 8 and jax.process_count() == num_processes
    from ldm_jax.training import loop
    from ldm_jax.training import sharding as shd
    from ldm_jax.training.ldm_task import LDMTask

    cfg = worker_config(steps[0])
    mesh = shd.make_mesh(cfg.mesh.data, cfg.mesh.fsdp)
    task = LDMTask(cfg, mesh)   # one task: its step compiles once for all the runs
    listings = []
    for i, num_steps in enumerate(steps):
        if i:
            task.set_scale_factor(123.0)   # a resumed run must restore it from the checkpoint
        state = loop.train(worker_config(num_steps), workdir, task=task, mesh=mesh, progress=False)
        listings.append(sorted(os.listdir(os.path.join(workdir, "checkpoints"))))
    flat = flat_params(state)  # collective
    if jax.process_index() == 0:
        np.savez(out, step=int(jax.device_get(state.step)), scale_factor=task.scale_factor,
                 listings=json.dumps(listings), **flat)


def _free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _spawn(workdir, out, steps, num_processes, devices_per_process):
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices_per_process}",
           "JAX_COMPILATION_CACHE_DIR": CACHE_DIR, "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "1"}
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), str(workdir), str(out),
                               ",".join(map(str, steps)), str(i), str(num_processes), str(port)],
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
    import jax

    from ldm_jax.training import loop

    assert jax.device_count() == 8, "conftest must set --xla_force_host_platform_device_count=8"
    two, one = tmp_path / "two", tmp_path / "one"
    _spawn(two, tmp_path / "two.npz", [2, 3], num_processes=2, devices_per_process=4)   # 0 -> 2, resume 2 -> 3
    # The reference: this (single) process with all 8 devices and the whole global batch
    # (no sample grid: it does not touch the parameters).
    b = flat_params(loop.train(worker_config(3, sample_every=0), str(one), progress=False))

    a = np.load(tmp_path / "two.npz")
    assert int(a["step"]) == 3
    assert json.loads(str(a["listings"])) == [["2"], ["2", "3"]]   # phase 1 saved step 2 only
    scale_factor = json.load(open(two / "checkpoints" / "2" / "extra" / "metadata"))["scale_factor"]
    assert float(a["scale_factor"]) == scale_factor != 123.0     # restored by the resumed run
    keys = sorted(k for k in a.files if k not in ("step", "scale_factor", "listings"))
    assert keys == sorted(b)
    worst = 0.0
    for key in keys:
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
    worker(workdir_, out_, [int(s) for s in steps_.split(",")], int(pid_), int(nproc_), int(port_))
