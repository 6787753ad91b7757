"""Noise schedules against diffusers (float32 torch), the same formulas in float64, and CompVis."""
import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers.schedulers.scheduling_ddpm import betas_for_alpha_bar, rescale_zero_terminal_snr

from ldm_jax.diffusion import schedule as S
from ldm_jax.diffusion.schedule import NoiseSchedule

CONFIGS = {
    "linear": dict(beta_schedule="linear", beta_start=0.0001, beta_end=0.02),
    "scaled_linear": dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
    "squaredcos_cap_v2": dict(beta_schedule="squaredcos_cap_v2"),
}


def _diffusers_formula_f64(cfg, T=1000):
    """diffusers' own beta formulas evaluated in float64 torch."""
    name = cfg["beta_schedule"]
    if name == "linear":
        return torch.linspace(cfg["beta_start"], cfg["beta_end"], T, dtype=torch.float64).numpy()
    if name == "scaled_linear":
        return (torch.linspace(cfg["beta_start"] ** 0.5, cfg["beta_end"] ** 0.5, T, dtype=torch.float64) ** 2).numpy()
    return None


@pytest.mark.parametrize("rescale", [False, True])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_schedule_matches_diffusers(name, rescale):
    cfg = dict(CONFIGS[name], num_train_timesteps=1000, rescale_betas_zero_snr=rescale)
    ours = NoiseSchedule.from_diffusers_config(cfg)
    ref = diffusers.DDPMScheduler(**cfg)
    # Same formulas: diffusers' code in float64 gives our values to float64 precision.
    exact = _diffusers_formula_f64(cfg)
    if exact is None:  # cosine: computed in Python floats, returned as float32
        np.testing.assert_allclose(S.cosine_betas(1000), betas_for_alpha_bar(1000).double().numpy(), rtol=6e-8)
    else:
        if rescale:
            exact = rescale_zero_terminal_snr(torch.from_numpy(exact)).numpy()
        np.testing.assert_allclose(ours.betas64, exact, rtol=1e-12, atol=1e-15)
    # Against diffusers' float32 arrays: its float32 cumprod drifts by up to ~6e-7 (absolute).
    err = np.abs(ours.alphas_cumprod64 - ref.alphas_cumprod.double().numpy()).max()
    assert err < 1e-6, err
    np.testing.assert_allclose(np.asarray(ours.alphas_cumprod), ref.alphas_cumprod.numpy(), atol=1e-6, rtol=0)
    assert ours.zero_terminal_snr == rescale
    assert (ours.alphas_cumprod64[-1] == 0.0) == rescale
    assert ours.num_train_timesteps == 1000 and ours.beta_schedule == name


def test_rescale_zero_terminal_snr_properties():
    """Lin et al. 2024 Algorithm 1: sqrt(abar) shifted and scaled so that abar_T = 0 and abar_0
    is unchanged (checked in float64, independently of diffusers)."""
    betas = S.make_betas("scaled_linear", 1000, 0.00085, 0.012)
    new = S.rescale_zero_terminal_snr(betas)
    ac, ac_new = np.cumprod(1 - betas), np.cumprod(1 - new)
    assert ac_new[-1] == pytest.approx(0.0, abs=1e-20)
    assert ac_new[0] == pytest.approx(ac[0], rel=1e-14)
    # sqrt(abar) is an affine function of the old one
    a, b = np.polyfit(np.sqrt(ac), np.sqrt(ac_new), 1)
    np.testing.assert_allclose(a * np.sqrt(ac) + b, np.sqrt(ac_new), atol=1e-12)


def test_matches_compvis_make_beta_schedule():
    """CompVis computes in float64: its "linear" is diffusers' scaled_linear, "sqrt_linear" is linear."""
    from ldm.modules.diffusionmodules.util import make_beta_schedule

    sd = make_beta_schedule("linear", 1000, linear_start=0.00085, linear_end=0.012)
    np.testing.assert_allclose(S.make_betas("scaled_linear", 1000, 0.00085, 0.012), sd, rtol=1e-14, atol=0)
    lin = make_beta_schedule("sqrt_linear", 1000, linear_start=1e-4, linear_end=2e-2)
    np.testing.assert_allclose(S.make_betas("linear", 1000, 1e-4, 2e-2), lin, rtol=1e-14, atol=0)
    np.testing.assert_allclose(NoiseSchedule.create().alphas_cumprod64, np.cumprod(1 - sd), rtol=1e-14)


def test_from_diffusers_config_defaults_and_trained_betas():
    ours = NoiseSchedule.from_diffusers_config({"_class_name": "PNDMScheduler", "skip_prk_steps": True})
    np.testing.assert_allclose(ours.betas64, np.linspace(1e-4, 0.02, 1000), rtol=1e-14)  # diffusers defaults
    betas = np.linspace(1e-3, 0.05, 50)
    custom = NoiseSchedule.from_diffusers_config({"num_train_timesteps": 50, "trained_betas": betas.tolist(),
                                                  "beta_schedule": "ignored-with-trained-betas"})
    np.testing.assert_allclose(custom.alphas_cumprod64, np.cumprod(1 - betas), rtol=1e-14)
    assert custom.beta_schedule == "custom"
    sd = NoiseSchedule.from_diffusers_config(dict(CONFIGS["scaled_linear"], num_train_timesteps=1000))
    np.testing.assert_array_equal(sd.betas64, NoiseSchedule.create().betas64)


@pytest.mark.parametrize("config,key", [
    ({"beta_schedule": "sigmoid"}, "'beta_schedule'"),
    ({"num_train_timesteps": 1.5}, "'num_train_timesteps'"),
    ({"num_train_timesteps": 1}, "'num_train_timesteps'"),
    ({"rescale_betas_zero_snr": "yes"}, "'rescale_betas_zero_snr'"),
    ({"trained_betas": [0.1, 0.2]}, "'trained_betas'"),
    ({"beta_start": "0.1"}, "'beta_start'"),
    ({"beta_end": 2.0}, "'beta_end'"),
])
def test_from_diffusers_config_errors_name_the_key(config, key):
    with pytest.raises(ValueError, match=key):
        NoiseSchedule.from_diffusers_config(config)


def test_bad_betas():
    with pytest.raises(ValueError, match="unknown beta_schedule"):
        S.make_betas("quadratic", 10)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        NoiseSchedule.from_betas([0.1, 1.5])
    with pytest.raises(ValueError, match="1-D"):
        NoiseSchedule.from_betas([[0.1, 0.2]])


def test_add_noise_velocity_snr_match_diffusers(rng):
    from diffusers.training_utils import compute_snr

    cfg = dict(CONFIGS["scaled_linear"], num_train_timesteps=1000)
    ref = diffusers.DDPMScheduler(**cfg)
    ours = NoiseSchedule.from_diffusers_config(cfg)
    x0 = rng.standard_normal((4, 6, 6, 3)).astype(np.float32)
    noise = rng.standard_normal((4, 6, 6, 3)).astype(np.float32)
    t = np.array([0, 17, 500, 999])
    tx0, tn = (torch.from_numpy(a).permute(0, 3, 1, 2) for a in (x0, noise))
    want = ref.add_noise(tx0, tn, torch.from_numpy(t)).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(S.add_noise(ours, x0, noise, t), want, atol=2e-6, rtol=0)
    want_v = ref.get_velocity(tx0, tn, torch.from_numpy(t)).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(S.get_velocity(ours, x0, noise, t), want_v, atol=2e-6, rtol=0)
    np.testing.assert_allclose(S.snr(ours, t), compute_snr(ref, torch.from_numpy(t)).numpy(), rtol=3e-5)
    # q(x_t|x_0) algebra: v = alpha eps - sigma x0 and x_t = alpha x0 + sigma eps give x0 = alpha x_t - sigma v
    a, s = (np.asarray(v)[:, None, None, None] for v in S.alpha_sigma(ours, t))
    np.testing.assert_allclose(a * S.add_noise(ours, x0, noise, t) - s * S.get_velocity(ours, x0, noise, t),
                               x0, atol=2e-6)


def test_schedule_is_a_pytree_usable_under_jit():
    sched = NoiseSchedule.create()
    traces = []

    @jax.jit
    def f(s, x, t):
        traces.append(1)
        return S.add_noise(s, x, jnp.zeros_like(x), t)

    x = jnp.ones((2, 4, 4, 1))
    f(sched, x, jnp.array([0, 999]))
    f(sched, x, jnp.array([5, 6]))
    assert len(traces) == 1
    assert sched.alphas_cumprod.dtype == jnp.float32 and sched.alphas_cumprod64.dtype == np.float64
