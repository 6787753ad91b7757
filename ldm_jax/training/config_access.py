"""Reading training configuration values (``ml_collections.ConfigDict`` or plain dicts).

ConfigDict raises on a missing key, and many optional keys are ``None`` placeholders;
the trainers read both with ``config_get(cfg, key, default)``. ``check_train_config``
checks the keys the generic loop and the optimizer read, before a run starts.
"""
from __future__ import annotations

import math
from typing import Any, Dict

import numpy as np


def config_get(cfg, key: str, default: Any = None) -> Any:
    """``cfg[key]``; ``default`` when the key is missing, its value is None, or cfg is None."""
    try:
        value = cfg[key]
    except (KeyError, AttributeError, TypeError):
        return default
    return default if value is None else value


def config_as_dict(cfg) -> Dict[str, Any]:
    """A ConfigDict / mapping as a plain dict ({} for None)."""
    if cfg is None:
        return {}
    return cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _is_number(value) -> bool:
    return (_is_int(value) or isinstance(value, (float, np.floating))) and math.isfinite(float(value))


_MISSING = object()


def check_train_config(config) -> None:
    """The keys this loop (and the optimizer) read, as a user overrides them: a ValueError
    naming the key, its value and what is allowed. Keys a config does not have are skipped.

    ``train.num_steps``, ``train.batch_size``, ``train.log_every``, ``train.grad_accum_steps``,
    ``train.preemption_check_every``: integers >= 1; ``train.checkpoint_every`` >= 0 (0: only
    at the end and on SIGTERM); ``train.sample_every`` >= 0 (0: no sample grids);
    ``train.keep_checkpoints`` >= 0 (0 or None: keep all); ``train.warmup_steps`` >= 0;
    ``train.lr`` / ``train.disc_lr`` / ``train.weight_decay`` / ``train.grad_clip`` (0: no
    clipping) / ``train.end_lr_factor`` >= 0, ``train.eps`` > 0, ``train.b1`` / ``train.b2`` /
    ``train.ema_decay`` in [0, 1); ``train.lr_schedule`` one of ``optim.LR_SCHEDULES`` (cosine:
    ``num_steps > warmup_steps``); ``seed`` an integer; ``data.image_size`` >= 1;
    ``sample.sampler`` one of the samplers. (Other keys are checked where they are read.)
    """
    from ldm_jax.training import optim

    def value(section, key):
        cfg = config_get(config, section) if section else config
        if cfg is None:
            return _MISSING
        try:
            return cfg[key]
        except (KeyError, AttributeError, TypeError):
            return _MISSING

    def fail(name, v, allowed):
        raise ValueError(f"config key {name}={v!r}: {allowed}")

    ints = (("train", "num_steps", 1), ("train", "batch_size", 1), ("train", "log_every", 1),
            ("train", "grad_accum_steps", 1), ("train", "preemption_check_every", 1),
            ("train", "checkpoint_every", 0), ("train", "sample_every", 0), ("train", "warmup_steps", 0),
            ("train", "keep_checkpoints", 0), ("data", "image_size", 1), ("", "seed", None))
    notes = {"checkpoint_every": " (0: checkpoints only at the end and on SIGTERM)",
             "sample_every": " (0: no sample grids)", "keep_checkpoints": " (0 or None: keep all)"}
    for section, key, low in ints:
        v = value(section, key)
        if v is _MISSING or (v is None and key == "keep_checkpoints"):
            continue
        name = f"{section}.{key}" if section else key
        if not _is_int(v):
            fail(name, v, "expected an integer" + ("" if low is None else f" >= {low}") + notes.get(key, ""))
        if low is not None and v < low:
            fail(name, v, f"must be >= {low}{notes.get(key, '')}")
    floats = (("lr", 0.0, None), ("disc_lr", 0.0, None), ("weight_decay", 0.0, None), ("grad_clip", 0.0, None),
              ("end_lr_factor", 0.0, None), ("eps", None, None), ("b1", 0.0, 1.0), ("b2", 0.0, 1.0),
              ("ema_decay", 0.0, 1.0))
    for key, low, high in floats:
        v = value("train", key)
        if v is _MISSING or (v is None and key == "disc_lr"):
            continue
        name = f"train.{key}"
        if not _is_number(v):
            fail(name, v, "expected a finite number")
        if key == "eps" and not v > 0:
            fail(name, v, "must be > 0")
        if low is not None and v < low:
            fail(name, v, f"must be >= {low:g}" + (" (0: no clipping)" if key == "grad_clip" else ""))
        if high is not None and not v < high:
            fail(name, v, f"must be in [{low:g}, {high:g})" + (" (0: no EMA)" if key == "ema_decay" else ""))
    schedule = value("train", "lr_schedule")
    if schedule is not _MISSING:
        if schedule not in optim.LR_SCHEDULES:
            fail("train.lr_schedule", schedule, f"expected one of {optim.LR_SCHEDULES}")
        steps, warmup = value("train", "num_steps"), value("train", "warmup_steps")
        if schedule == "cosine" and steps is not _MISSING and warmup is not _MISSING and steps <= warmup:
            raise ValueError(f"config key train.lr_schedule='cosine' decays from train.warmup_steps={warmup} to "
                             f"train.num_steps={steps}: num_steps must be larger")
    sampler = value("sample", "sampler")
    if sampler is not _MISSING:
        from ldm_jax.diffusion.timesteps import SAMPLER_NAMES

        if sampler not in SAMPLER_NAMES:
            fail("sample.sampler", sampler, f"expected one of {SAMPLER_NAMES} (the sample grids' sampler)")


# ------------------------------------------------------------------ CLI flag errors
def config_arg(argv) -> str:
    """``--config=VALUE`` as given (``--config VALUE`` too)."""
    for i, a in enumerate(argv):
        if a.startswith("--config="):
            return a
        if a == "--config" and i + 1 < len(argv):
            return f"--config={argv[i + 1]}"
    return "--config"


def _config_type(config, path: str) -> str:
    """The type name of ``config``'s value at dotted ``path`` ("" when unknown)."""
    try:
        value = config
        for part in path.split("."):
            value = value[part]
        return type(value).__name__
    except Exception:  # noqa: BLE001  (only a hint for the message)
        return ""


def config_flag_error(argv, exc: BaseException, config=None) -> str:
    """One line for an error absl met parsing a CLI's ``--config`` flags (``config_flags``;
    ``config``: the config loaded so far, for the expected type of a bad override). absl and
    ml_collections wrap a config file's own exception in a traceback text, defer a load error
    to the first access, and name an unknown override key only by its last part: the line
    names the flag (``--config=FILE:PRESET`` or ``--config.a.b=VALUE``) and the reason."""
    while isinstance(exc, AttributeError) and isinstance(exc.__context__, KeyError):
        exc = exc.__context__  # ConfigDict: AttributeError(KeyError("'key'\nDid you mean ...?"))
    text = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
    config_flag = config_arg(argv)
    if "Failed loading config file" in text:  # (OSError, deferred by ml_collections to the first access)
        return f"{config_flag}: cannot load the config file ({text.strip().splitlines()[-1].strip()})"
    if "Traceback (most recent call last)" in text:  # the config file raised: keep its last line
        last = [line.strip() for line in text.splitlines() if line.strip()][-1]
        return f"{config_flag}: {last.split(': ', 1)[-1]}"
    if "of field config." in text and "is not supported for overriding" in text:
        # ml_collections cannot type an override of a key the file sets to a plain None
        key = text.split("of field config.", 1)[1].split()[0]
        flag = next((a for a in argv if a.startswith(f"--config.{key}=")), f"--config.{key}")
        kind = text.split("Type <class '", 1)[-1].split("'", 1)[0] if text.startswith("Type <class '") else "?"
        if kind == "NoneType":
            return (f"{flag}: the config file sets {key} = None, which has no type, so ml_collections cannot "
                    "override it from the command line; declare it in the file with ml_collections.config_dict."
                    f"placeholder(float) (or int, str), or give {key} a value there")
        return f"{flag}: config values of type {kind} cannot be overridden from the command line"
    if isinstance(exc, SyntaxError):
        return f"{config_flag}: {exc.msg} ({exc.filename}, line {exc.lineno})"
    if "has no attribute 'get_config'" in text:
        return f"{config_flag}: the file defines no get_config() (a configs/*.py file returns its ConfigDict " \
               "from get_config(preset))"
    if isinstance(exc, (KeyError, AttributeError)):  # an override of a key the config does not have
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        key = lines[0].strip("'\"") if lines else "?"
        overrides = [a.split("=", 1)[0] for a in argv if a.startswith("--config.")]
        named = [o for o in overrides if key in o[len("--config."):].split(".")]
        flag = named[0] if named else "--config." + key
        hint = f"; {lines[1]}" if len(lines) > 1 else ""
        return f"{flag}: unknown config key {key!r}{hint} (--config.KEY=VALUE overrides a key of the config file)"
    if "must have a value other than None" in text:  # a required flag is missing
        flag = text[len("flag "):].split("=", 1)[0] if text.startswith("flag ") else text
        if flag == "--config" and config_flag != "--config":
            return f"{config_flag}: get_config() returned None (a missing return statement?)"
        return f"{flag} is required"
    if text.startswith("flag --config."):  # a value of the wrong type
        flag, _, why = text[len("flag "):].partition(": ")
        kind = _config_type(config, flag.split("=", 1)[0][len("--config."):])
        article = "an" if kind[:1] in "aeiou" else "a"
        return f"{flag}: {why}" + (f" (expected {article} {kind}, the type of the config file's value)" if kind else "")
    if text.startswith("flag "):
        return text[len("flag "):]
    return text


COMPUTE_DTYPES = ("float32", "bfloat16", "float16")


def compute_dtype(model_cfg):
    """``model.dtype`` (the modules' compute dtype; parameters stay float32) as a jnp dtype,
    or a ValueError naming the key and the allowed names."""
    import jax.numpy as jnp

    name = config_get(model_cfg, "dtype", "float32")
    if str(name) not in COMPUTE_DTYPES:
        raise ValueError(f"config key model.dtype={name!r}: expected one of {COMPUTE_DTYPES}")
    return jnp.dtype(str(name))
