"""Training losses: targets, conversions, min-SNR-gamma weights and offset noise."""
import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from ldm_jax.diffusion import losses as L
from ldm_jax.diffusion.schedule import NoiseSchedule, add_noise, alpha_sigma, snr

SCHEDULE = NoiseSchedule.create()
MIX = np.random.default_rng(1).standard_normal((3, 3)).astype(np.float32) * 0.5


def fake_apply(x_t, t_b, cond):
    """A deterministic "UNet": channel mix + t and cond dependence."""
    return jnp.einsum("bhwc,cd->bhwd", x_t, MIX) + 1e-3 * t_b[:, None, None, None] + cond[:, None, None, :]


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_min_snr_weights_match_numpy(prediction_type):
    t = np.array([0, 1, 10, 100, 300, 500, 700, 999])
    ac = SCHEDULE.alphas_cumprod64[t]
    snr_np = ac / (1 - ac)
    for gamma in (1.0, 5.0, 20.0):
        clipped = np.minimum(snr_np, gamma)
        want = {"epsilon": clipped / snr_np, "v_prediction": clipped / (snr_np + 1), "sample": clipped}[prediction_type]
        got = L.min_snr_weights(snr(SCHEDULE, t), gamma, prediction_type)
        np.testing.assert_allclose(got, want, rtol=1e-6)
        # weights are <= 1 for eps and v, exactly 1 where SNR <= gamma for eps
        if prediction_type == "epsilon":
            np.testing.assert_allclose(np.asarray(got)[snr_np <= gamma], 1.0, rtol=1e-6)


def test_min_snr_weights_match_diffusers_training_script():
    """The weighting block of diffusers' examples/text_to_image/train_text_to_image.py
    (its float32 1 - abar at t = 0 loses ~3e-5 relative; ours comes from float64)."""
    from diffusers.training_utils import compute_snr

    ref_sched = diffusers.DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    timesteps = torch.tensor([0, 3, 50, 250, 600, 999])
    gamma = 5.0
    for prediction_type in ("epsilon", "v_prediction"):
        snr_t = compute_snr(ref_sched, timesteps)
        w = torch.stack([snr_t, gamma * torch.ones_like(timesteps)], dim=1).min(dim=1)[0]
        w = w / snr_t if prediction_type == "epsilon" else w / (snr_t + 1)
        got = L.min_snr_weights(snr(SCHEDULE, timesteps.numpy()), gamma, prediction_type)
        np.testing.assert_allclose(got, w.numpy(), rtol=5e-5)


def test_min_snr_zero_terminal_snr_is_finite():
    zsnr = NoiseSchedule.create(rescale_betas_zero_snr=True)
    w = L.min_snr_weights(snr(zsnr, np.array([999, 500])), 5.0, "epsilon")
    assert np.all(np.isfinite(w)) and float(w[0]) == 1.0


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_targets_and_conversions_round_trip(prediction_type, rng):
    x0 = rng.standard_normal((3, 4, 4, 3)).astype(np.float32)
    eps = rng.standard_normal((3, 4, 4, 3)).astype(np.float32)
    t = np.array([5, 400, 950])
    x_t = add_noise(SCHEDULE, x0, eps, t)
    target = L.prediction_target(SCHEDULE, x0, eps, t, prediction_type)
    a, s = (v[:, None, None, None] for v in alpha_sigma(SCHEDULE, t))
    got_x0, got_eps = L.predict_x0_and_eps(target, x_t, a, s, prediction_type)
    # eps -> x0 divides by alpha_t (0.07 at t=950): float32 error grows like 1/alpha_t.
    np.testing.assert_allclose(got_x0, x0, atol=5e-5)
    np.testing.assert_allclose(got_eps, eps, atol=5e-5)
    np.testing.assert_allclose(L.predict_x0(target, x_t, a, s, prediction_type), got_x0)
    np.testing.assert_allclose(L.predict_eps(target, x_t, a, s, prediction_type), got_eps)


@pytest.mark.parametrize("prediction_type,gamma,offset", [
    ("epsilon", None, 0.0), ("v_prediction", 5.0, 0.0), ("epsilon", 5.0, 0.1), ("sample", 3.0, 0.05),
])
def test_training_loss_matches_numpy(prediction_type, gamma, offset, rng):
    """The whole loss recomputed in float64 numpy from the same random draws."""
    x0 = rng.standard_normal((4, 5, 5, 3)).astype(np.float32)
    cond = rng.standard_normal((4, 3)).astype(np.float32)
    key = jax.random.PRNGKey(7)
    loss = L.training_loss(key, fake_apply, x0, cond, SCHEDULE, prediction_type, gamma, offset)

    t, noise = (np.asarray(v) for v in L.sample_training_inputs(key, x0, SCHEDULE, offset))
    _, k_noise, k_offset = jax.random.split(key, 3)
    base = np.asarray(jax.random.normal(k_noise, x0.shape, jnp.float32), np.float64)
    if offset:  # offset noise: a per-(example, channel) constant, shape (B, 1, 1, C)
        shift = np.asarray(jax.random.normal(k_offset, (4, 1, 1, 3), jnp.float32), np.float64)
        np.testing.assert_allclose(noise, base + offset * shift, atol=1e-6)
    else:
        np.testing.assert_array_equal(noise, base)
    ac = SCHEDULE.alphas_cumprod64[t][:, None, None, None]
    a, s = np.sqrt(ac), np.sqrt(1 - ac)
    x_t = a * x0 + s * noise
    target = {"epsilon": noise, "v_prediction": a * noise - s * x0, "sample": x0}[prediction_type]
    out = np.einsum("bhwc,cd->bhwd", x_t, MIX.astype(np.float64)) + 1e-3 * t[:, None, None, None] \
        + cond[:, None, None, :]
    per_example = ((out - target) ** 2).mean(axis=(1, 2, 3))
    if gamma is not None:
        r = (ac / (1 - ac)).reshape(-1)
        w = np.minimum(r, gamma)
        w = {"epsilon": w / r, "v_prediction": w / (r + 1), "sample": w}[prediction_type]
        per_example = per_example * w
    assert float(loss) == pytest.approx(per_example.mean(), rel=1e-5)


def test_offset_noise_is_constant_over_space():
    x0 = jnp.zeros((3, 8, 8, 4))
    key = jax.random.PRNGKey(3)
    _, plain = L.sample_training_inputs(key, x0, SCHEDULE, 0.0)
    _, shifted = L.sample_training_inputs(key, x0, SCHEDULE, 0.5)
    diff = np.asarray(shifted - plain)
    np.testing.assert_allclose(diff, np.broadcast_to(diff[:, :1, :1, :], diff.shape), atol=1e-6)
    assert np.abs(diff).max() > 1e-3


def test_training_loss_is_pure_and_differentiable(rng):
    x0 = jnp.asarray(rng.standard_normal((2, 4, 4, 3)).astype(np.float32))
    cond = jnp.zeros((2, 3))

    def loss_fn(scale, key):
        return L.training_loss(key, lambda x, t, c: scale * fake_apply(x, t, c), x0, cond, SCHEDULE,
                               "v_prediction", min_snr_gamma=5.0)

    f = jax.jit(jax.value_and_grad(loss_fn))
    key = jax.random.PRNGKey(0)
    (v1, g1), (v2, g2) = f(1.0, key), f(1.0, key)
    assert float(v1) == float(v2) and float(g1) == float(g2)
    eps = 1e-3
    numeric = (loss_fn(1.0 + eps, key) - loss_fn(1.0 - eps, key)) / (2 * eps)
    assert float(g1) == pytest.approx(float(numeric), rel=1e-2)
    assert float(f(1.0, jax.random.PRNGKey(1))[0]) != float(v1)


def test_bf16_model_output_loss():
    """A bf16 model (dtype=bfloat16 compute): the loss is still reduced in float32 and tracks the
    float32 loss to bf16 precision (~2^-8 relative on outputs): tolerance 1e-2 relative."""
    x0 = jnp.asarray(np.random.default_rng(2).standard_normal((4, 8, 8, 3)).astype(np.float32))
    cond = jnp.zeros((4, 3))
    key = jax.random.PRNGKey(5)
    f32 = L.training_loss(key, fake_apply, x0, cond, SCHEDULE, "epsilon")
    bf16 = L.training_loss(key, lambda x, t, c: fake_apply(x.astype(jnp.bfloat16), t, c).astype(jnp.bfloat16),
                           x0, cond, SCHEDULE, "epsilon")
    assert bf16.dtype == jnp.float32
    assert float(bf16) == pytest.approx(float(f32), rel=1e-2)


def test_bad_prediction_type():
    with pytest.raises(ValueError, match="unknown prediction_type 'eps'"):
        L.training_loss(jax.random.PRNGKey(0), fake_apply, jnp.zeros((1, 2, 2, 3)), jnp.zeros((1, 3)),
                        SCHEDULE, "eps")
    with pytest.raises(ValueError, match="unknown prediction_type"):
        L.min_snr_weights(jnp.ones(2), 5.0, "x0")
    with pytest.raises(ValueError, match="unknown prediction_type"):
        L.predict_x0(jnp.ones(2), jnp.ones(2), 1.0, 0.0, "noise")
