"""Train a latent diffusion model (thin CLI; the logic lives in ``ldm_jax.training``).

    python train.py --config configs/emoji_ldm.py --workdir /tmp/run [--config.train.num_steps=1000 ...]
    python train.py --config configs/emoji_ldm.py:runlocal --workdir /tmp/smoke

Rerunning with the same workdir resumes from its latest checkpoint (e.g. with a larger
``--config.train.num_steps``; a config that builds another model than the checkpoint holds
is refused, naming what differs). SIGTERM saves a checkpoint at the next step boundary and
exits with status 0.

A user error (an unknown config key, a value of the wrong type or out of range, a missing
config file or preset, a bad workdir, data or checkpoint) is one ``error: ...`` line naming
the flag, key or file, exit status 2, before anything is written to the workdir
(``ldm_jax.training.loop.prepare``).

Multi-process (one process per host, or several on one machine):

    python train.py ... --coordinator_address=host0:1234 --num_processes=2 --process_id=0
    python train.py ... --multihost          # TPU pods / SLURM: cluster auto-detection
"""
import logging
import os
import sys

from absl import app, flags
from ml_collections import config_flags

from ldm_jax.training.config_access import config_arg, config_flag_error

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


class UserError(Exception):
    """Printed as one ``error:`` line (exit status 2)."""


def _error(message: str, max_lines: int = 4) -> int:
    lines = [line.strip() for line in str(message).splitlines() if line.strip()]
    if len(lines) > max_lines:  # (e.g. TFDS lists every dataset it knows)
        lines = lines[:max_lines] + ["..."]
    print("error: " + "; ".join(lines), file=sys.stderr)
    return 2


def _loaded_config():
    try:
        return FLAGS["config"].value
    except Exception:  # noqa: BLE001  (only a hint for the error message)
        return None


def parse_flags(argv):
    """absl's flag parsing, with every error one line (absl prints the whole usage, or a
    traceback for an unknown config key or a broken config file)."""
    try:
        rest = FLAGS(argv)
        config = FLAGS.config  # (ml_collections defers a config file's load error to the first access)
        if not hasattr(config, "to_dict"):
            raise UserError(f"{config_arg(argv)}: get_config() returned "
                            f"{type(config).__name__}, not an ml_collections.ConfigDict")
        config.get("train")
    except UserError as e:
        sys.exit(_error(str(e)))
    except (flags.Error, KeyError, AttributeError, OSError, SyntaxError, TypeError, ValueError) as e:
        sys.exit(_error(config_flag_error(argv, e, _loaded_config())))
    if len(rest) > 1:
        sys.exit(_error(f"unexpected arguments: {' '.join(rest[1:])} (flags are --name=value)"))
    return rest


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
            raise UserError(f"multi-process run: also pass --{', --'.join(missing)} (or none of "
                            "--coordinator_address, --num_processes, --process_id for one process)")
        ids = None if FLAGS.local_device_ids is None else [int(i) for i in FLAGS.local_device_ids]
        jax.distributed.initialize(coordinator_address=FLAGS.coordinator_address,
                                   num_processes=FLAGS.num_processes, process_id=FLAGS.process_id,
                                   local_device_ids=ids)
    elif _auto_distributed():
        jax.distributed.initialize()


def main(argv):
    del argv  # (parse_flags refused extra arguments)
    try:
        initialize_distributed()
    except UserError as e:
        return _error(str(e))
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
    try:  # checks, task, data, checked restore: nothing written to the workdir yet
        run = loop.prepare(FLAGS.config, FLAGS.workdir)
    except (ValueError, OSError, KeyError) as e:  # (the library's errors name the key, file or checkpoint)
        return _error(e.args[0] if isinstance(e, KeyError) and e.args else e)
    run.train(progress=FLAGS.progress)
    logging.info("done")
    return 0


if __name__ == "__main__":
    sys.exit(app.run(main, flags_parser=parse_flags))
