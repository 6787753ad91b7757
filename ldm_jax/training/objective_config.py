"""The training objective's configuration (``diffusion.*``): the noise schedule and the loss terms of
the original ``LatentDiffusion.p_losses``, and the check that an ``init.original_config`` YAML trained
with the same objective. ``LDMTask`` builds ``LDMStepConfig`` / ``NoiseSchedule`` from these."""
from __future__ import annotations

import logging
import re
from typing import Any, Dict

import jax

from ldm_jax.diffusion.schedule import NoiseSchedule
from ldm_jax.training.config_access import config_get as _get

log = logging.getLogger(__name__)


# CompVis names of the beta schedules (make_beta_schedule) -> diffusers' (diffusion.beta_schedule).
_COMPVIS_BETA_SCHEDULES = {"linear": "scaled_linear", "sqrt_linear": "linear", "cosine": "squaredcos_cap_v2",
                           "sqrt": None}


def schedule_config_from(diff, prediction_type: str) -> Dict[str, Any]:
    """The diffusers scheduler config of ``diffusion.*`` (training schedule; the workdir's sampler reads it)."""
    config = dict(
        num_train_timesteps=int(_get(diff, "num_train_timesteps", 1000)),
        beta_schedule=_get(diff, "beta_schedule", "scaled_linear"),
        beta_start=float(_get(diff, "beta_start", 0.00085)),
        beta_end=float(_get(diff, "beta_end", 0.012)),
        prediction_type=prediction_type,
    )
    # diffusion.rescale_betas_zero_snr (Lin et al. 2024, diffusers' scheduler key) was ignored before: a
    # zero-terminal-SNR config trained on the plain schedule. Set only when true (older configs unchanged).
    if _get(diff, "rescale_betas_zero_snr", False):
        config["rescale_betas_zero_snr"] = True
    return config


def schedule_from_config(schedule_config: Dict[str, Any]) -> NoiseSchedule:
    """The training NoiseSchedule of ``diffusion.*``; errors name the config keys and, for CompVis
    schedule names, their diffusers equivalents (CompVis "linear" is diffusers "scaled_linear")."""
    try:
        return NoiseSchedule.from_diffusers_config(schedule_config)
    except ValueError as err:
        name = schedule_config.get("beta_schedule")
        # The scheduler config's keys are diffusion.*'s (schedule_config_from): name the config key.
        match = re.match(r"scheduler config key '(\w+)' ", str(err))
        where = "diffusion.* (the training noise schedule)"
        if match and match.group(1) in schedule_config:
            where = (f"config key diffusion.{match.group(1)}={schedule_config[match.group(1)]!r} (the training "
                     "noise schedule, diffusion.*)")
        hint = ""
        if name in _COMPVIS_BETA_SCHEDULES:
            same = _COMPVIS_BETA_SCHEDULES[name]
            hint = (f"; CompVis beta_schedule {name!r} is diffusion.beta_schedule={same!r}" if same else
                    f"; CompVis beta_schedule {name!r} (sqrt of a linspace) has no diffusers equivalent and is not "
                    "supported")
        raise ValueError(f"{where}: {err}{hint}") from None


# CompVis LatentDiffusion objective options (model.params of an original YAML) -> LDMStepConfig fields.
LOSS_TERM_KEYS = ("l_simple_weight", "original_elbo_weight", "logvar_init", "v_posterior")
_LOSS_TERM_DEFAULTS = dict(l_simple_weight=1.0, original_elbo_weight=0.0, logvar_init=0.0, v_posterior=0.0)


def loss_terms(diff) -> Dict[str, float]:
    """LDMStepConfig's objective fields from ``diffusion.*``: ``input_perturbation`` (diffusers) and the
    CompVis ``p_losses`` terms. ``diffusion.learn_logvar`` is refused: the original trains a per-timestep
    logvar as an extra parameter, which this trainer does not have (ignoring it would train another
    objective silently)."""
    if _get(diff, "learn_logvar", False):
        raise ValueError("diffusion.learn_logvar=True is not supported (CompVis learn_logvar trains a per-timestep "
                         "log-variance next to the U-Net); set it to False (diffusion.logvar_init sets a fixed one)")
    out = {"input_perturbation": float(_get(diff, "input_perturbation", 0.0) or 0.0)}
    for key in LOSS_TERM_KEYS:
        value = _get(diff, key, None)
        out[key] = _LOSS_TERM_DEFAULTS[key] if value is None else float(value)
    return out


def check_original_objective(init_cfg, step_cfg) -> None:
    """An init.checkpoint's original YAML (``init.original_config``) trained with CompVis objective options
    (``original_elbo_weight``, ``l_simple_weight``, ``logvar_init``, ``v_posterior``, ``learn_logvar``,
    ``loss_type``): the config must repeat them (``diffusion.*``), else a ValueError names both, unless
    ``init.allow_schedule_change`` (then logged), as ``init_checkpoint.check_schedule`` does for the schedule."""
    path = str(_get(init_cfg, "original_config", "") or "")
    if not path:
        return
    from ldm_jax.convert.original_config import read_original_yaml

    params = (read_original_yaml(path).get("model") or {}).get("params") or {}
    if params.get("learn_logvar", False):
        raise ValueError(f"init.original_config={path} sets learn_logvar: true (a trained per-timestep log-variance), "
                         "which this trainer does not support")
    differences = []
    for key in LOSS_TERM_KEYS + ("loss_type",):
        if key not in params:
            continue
        want = params[key] if key == "loss_type" else float(params[key])
        have = getattr(step_cfg, key)
        if key == "v_posterior" and not step_cfg.original_elbo_weight:
            continue  # only the lvlb weights read it
        if want != have:
            differences.append(f"diffusion.{key}={have!r} vs the YAML's {want!r}")
    if not differences:
        return
    message = f"training objective and init.original_config={path} differ: {'; '.join(differences)}"
    if not bool(_get(init_cfg, "allow_schedule_change", False)):
        raise ValueError(f"{message}. Set diffusion.* to the YAML's values, or init.allow_schedule_change=True to "
                         "fine-tune under the config's objective deliberately")
    if jax.process_index() == 0:
        log.warning("%s (init.allow_schedule_change: training under the config's)", message)
