"""Which options a sampler runs with, given a saved diffusers scheduler config.

diffusers builds e.g. ``DDIMScheduler.from_config(saved)``: every key the
target class accepts is taken from the saved config, every other option keeps
that class's own default. These tables are those defaults (diffusers 0.42), so
``sampler="ddim"`` on a folder saved with a PNDMScheduler behaves exactly like
``DDIMScheduler.from_config(pipe.scheduler.config)``.
"""
from __future__ import annotations

from typing import Any, Dict, Mapping, Optional

_COMMON = dict(
    num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
    trained_betas=None, prediction_type="epsilon", steps_offset=0,
)

# sampler name -> (diffusers class, its defaults beyond _COMMON)
SAMPLER_DEFAULTS: Dict[str, tuple] = {
    "ddpm": ("DDPMScheduler", dict(
        variance_type="fixed_small", clip_sample=True, clip_sample_range=1.0,
        timestep_spacing="leading", rescale_betas_zero_snr=False)),
    "ddim": ("DDIMScheduler", dict(
        clip_sample=True, clip_sample_range=1.0, set_alpha_to_one=True,
        timestep_spacing="leading", rescale_betas_zero_snr=False)),
    # PLMS is PNDMScheduler with skip_prk_steps forced on, as the SD pipelines use it.
    "plms": ("PNDMScheduler", dict(
        skip_prk_steps=True, set_alpha_to_one=False, timestep_spacing="leading")),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", dict(
        solver_order=2, algorithm_type="dpmsolver++", solver_type="midpoint",
        lower_order_final=True, euler_at_final=False, use_karras_sigmas=False,
        final_sigmas_type="zero", timestep_spacing="linspace", rescale_betas_zero_snr=False)),
    "euler": ("EulerDiscreteScheduler", dict(
        interpolation_type="linear", use_karras_sigmas=False, timestep_spacing="linspace",
        final_sigmas_type="zero", rescale_betas_zero_snr=False)),
    "euler_a": ("EulerAncestralDiscreteScheduler", dict(
        timestep_spacing="linspace", rescale_betas_zero_snr=False)),
}

# Options this project forces whatever the saved config says.
_FORCED = {"plms": {"skip_prk_steps": True}}


def resolve_scheduler_options(sampler: str, saved: Optional[Mapping[str, Any]] = None,
                              **overrides: Any) -> Dict[str, Any]:
    """Effective options of ``sampler`` for a saved diffusers scheduler config."""
    if sampler not in SAMPLER_DEFAULTS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {sorted(SAMPLER_DEFAULTS)}")
    _, defaults = SAMPLER_DEFAULTS[sampler]
    options = {**_COMMON, **defaults}
    for key, value in (saved or {}).items():
        if key in options:
            options[key] = value
    options.update(_FORCED.get(sampler, {}))
    options.update({k: v for k, v in overrides.items() if v is not None})
    return options
