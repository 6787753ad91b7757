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

# sampler name -> (diffusers class, its defaults beyond _COMMON). Every __init__ argument of the
# diffusers class is listed (plus the config keys its set_timesteps reads with hasattr), so a
# saved value reaches make_plan_from_options, which honours it or raises: a key left out here
# would be dropped by resolve_scheduler_options and silently ignored.
_THRESHOLD = dict(thresholding=False, dynamic_thresholding_ratio=0.995, sample_max_value=1.0)
SAMPLER_DEFAULTS: Dict[str, tuple] = {
    "ddpm": ("DDPMScheduler", dict(
        variance_type="fixed_small", clip_sample=True, clip_sample_range=1.0,
        timestep_spacing="leading", rescale_betas_zero_snr=False, **_THRESHOLD)),
    "ddim": ("DDIMScheduler", dict(
        clip_sample=True, clip_sample_range=1.0, set_alpha_to_one=True,
        timestep_spacing="leading", rescale_betas_zero_snr=False, **_THRESHOLD)),
    # PLMS is PNDMScheduler with skip_prk_steps forced on, as the SD pipelines use it.
    "plms": ("PNDMScheduler", dict(
        skip_prk_steps=True, set_alpha_to_one=False, timestep_spacing="leading")),
    # sigma_min / sigma_max are no DPMSolverMultistepScheduler arguments, but its Karras /
    # exponential / beta sigmas read them from the config when a saved one has them.
    "dpmpp_2m": ("DPMSolverMultistepScheduler", dict(
        solver_order=2, algorithm_type="dpmsolver++", solver_type="midpoint",
        lower_order_final=True, euler_at_final=False, use_karras_sigmas=False,
        final_sigmas_type="zero", timestep_spacing="linspace", rescale_betas_zero_snr=False,
        use_exponential_sigmas=False, use_beta_sigmas=False, use_lu_lambdas=False,
        use_flow_sigmas=False, flow_shift=1.0, lambda_min_clipped=float("-inf"), variance_type=None,
        use_dynamic_shifting=False, time_shift_type="exponential", sigma_min=None, sigma_max=None,
        **_THRESHOLD)),
    "euler": ("EulerDiscreteScheduler", dict(
        interpolation_type="linear", use_karras_sigmas=False, timestep_spacing="linspace",
        final_sigmas_type="zero", rescale_betas_zero_snr=False, use_exponential_sigmas=False,
        use_beta_sigmas=False, sigma_min=None, sigma_max=None, timestep_type="discrete")),
    "euler_a": ("EulerAncestralDiscreteScheduler", dict(
        timestep_spacing="linspace", rescale_betas_zero_snr=False)),
}

# Options this project forces whatever the saved config says.
# Options the sampler's name fixes whatever a saved config says: "plms" is PNDM with its PRK
# warm-up skipped (as the SD pipelines run it); "dpmpp_2m" is DPM-Solver++(2M), i.e.
# DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2), also for a folder
# saved with another order or algorithm (e.g. "sde-dpmsolver++"), whose schedule options it keeps.
_FORCED = {"plms": {"skip_prk_steps": True},
           "dpmpp_2m": {"solver_order": 2, "algorithm_type": "dpmsolver++"}}


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
