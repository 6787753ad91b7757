"""Train a latent diffusion model (thin CLI; the logic lives in ``ldm_jax.training``).

    python train.py --config configs/emoji_ldm.py --workdir /tmp/run [--config.train.num_steps=1000 ...]
    python train.py --config configs/emoji_ldm.py:runlocal --workdir /tmp/smoke

Rerunning with the same workdir resumes from its latest checkpoint (e.g. with a larger
``--config.train.num_steps``). SIGTERM saves a checkpoint at the next step boundary and
exits with status 0.

Multi-process (one process per host, or several on one machine):

    python train.py ... --coordinator_address=host0:1234 --num_processes=2 --process_id=0
    python train.py ... --multihost          # TPU pods / SLURM: cluster auto-detection
"""
import logging
import os
import sys

from absl import app, flags
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", None, "Path to a configs/*.py file (optionally file.py:preset).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and samples.")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 for jax.distributed.initialize.")
flags.DEFINE_integer("num_processes", None, "Number of processes (jax.distributed.initialize).")
flags.DEFINE_integer("process_id", None, "Index of this process (jax.distributed.initialize).")
flags.DEFINE_list("local_device_ids", None, "Devices this process uses (jax.distributed.initialize).")
flags.DEFINE_bool("multihost", False, "Call jax.distributed.initialize() with cluster auto-detection.")
flags.DEFINE_bool("progress", True, "Show a progress bar (process 0).")
flags.DEFINE_string("compilation_cache", None, "JAX persistent compilation cache: a directory, 'default' or "
                    "'off' (unset: on only if $LDM_JAX_COMPILATION_CACHE names a directory).")
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS


def _explicit_distributed() -> bool:
    return any(v is not None for v in (FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id))


def _auto_distributed() -> bool:
    """Multi-host environments where ``jax.distributed.initialize()`` detects its peers."""
    if FLAGS.multihost:
        return True
    hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    return "," in hosts or bool(os.environ.get("MEGASCALE_COORDINATOR_ADDRESS"))


def initialize_distributed() -> None:
    import jax

    if _explicit_distributed():
        missing = [n for n in ("coordinator_address", "num_processes", "process_id") if getattr(FLAGS, n) is None]
        if missing:
            raise app.UsageError(f"multi-process run: also pass --{', --'.join(missing)}")
        ids = None if FLAGS.local_device_ids is None else [int(i) for i in FLAGS.local_device_ids]
        jax.distributed.initialize(coordinator_address=FLAGS.coordinator_address,
                                   num_processes=FLAGS.num_processes, process_id=FLAGS.process_id,
                                   local_device_ids=ids)
    elif _auto_distributed():
        jax.distributed.initialize()


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    initialize_distributed()
    import jax

    from ldm_jax.compile_cache import configure_compilation_cache
    from ldm_jax.training import loop

    cache_dir = configure_compilation_cache(FLAGS.compilation_cache)
    logging.getLogger().setLevel(logging.INFO if jax.process_index() == 0 else logging.WARNING)
    logging.getLogger("absl").setLevel(logging.WARNING)  # orbax's per-save INFO chatter
    logging.info("jax %s: process %d/%d, %d local / %d global devices (%s)", jax.__version__,
                 jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count(),
                 jax.devices()[0].platform)
    if cache_dir:
        logging.info("persistent compilation cache: %s", cache_dir)
    os.makedirs(FLAGS.workdir, exist_ok=True)
    if jax.process_index() == 0:
        with open(os.path.join(FLAGS.workdir, "config.json"), "w") as f:
            f.write(FLAGS.config.to_json_best_effort(indent=2))
    loop.train(FLAGS.config, FLAGS.workdir, progress=FLAGS.progress)
    logging.info("done")
    return 0


if __name__ == "__main__":
    sys.exit(app.run(main))
