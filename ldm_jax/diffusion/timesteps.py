"""Host-side sampler plans: timesteps, sigmas and per-step coefficients.

Each diffusers scheduler computes ``set_timesteps`` its own way (spacing quirks,
``steps_offset``, PNDM's repeated step, DPM-Solver's N+1 grid, Euler's float
timesteps and interpolated sigmas); the functions here reproduce them in numpy.
``make_plan`` turns them into a ``SamplerPlan``: float32 jnp arrays (traced
inside ``jax.jit``: new numbers never recompile) plus a few static fields that
select the code path. Per-step coefficients of the alpha-based samplers (ddpm,
ddim, plms) are computed in float64 from the float64 schedule, then cast. The
sigma-based ones (dpmpp_2m, euler, euler_a) follow diffusers' float32
arithmetic for the sigma grid and its scalars: their steps can be badly
conditioned (at sigma_max = 4096 with zero terminal SNR an Euler step cancels
x ~ 1e4 down to ~50), so one ulp of a coefficient shows in the result, and the
Karras timesteps come from interpolating log(sigma).

The update rules that read these plans live in ``ldm_jax.diffusion.samplers``.
"""
from __future__ import annotations

from typing import Any, Dict, Mapping, Optional

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax.diffusion.losses import check_prediction_type
from ldm_jax.diffusion.schedule import NoiseSchedule

SAMPLER_NAMES = ("ddpm", "ddim", "plms", "dpmpp_2m", "euler", "euler_a")
SPACINGS = ("leading", "trailing", "linspace")
# "compvis": the original CompVis DDIM/PLMS samplers' `make_ddim_timesteps(uniform)`:
# range(0, T, T // N) + 1 (N+1 steps when N does not divide T), previous alpha = next listed
# timestep's, final previous alpha = abar_0.
COMPVIS = "compvis"


@flax.struct.dataclass
class SamplerPlan:
    """Everything a sampler's scan reads; built by ``make_plan``. S = number of steps."""
    timesteps: jax.Array          # (S,) float32 timestep given to the model at each step
    coefs: Dict[str, jax.Array]   # name -> (S,) float32 per-step scalars of the update rule
    noise_alpha: jax.Array        # (S,) scheduler.add_noise at step i = noise_alpha[i] x0 + noise_sigma[i] n
    noise_sigma: jax.Array        # (S,)
    init_noise_sigma: jax.Array   # () float32: txt2img latents = N(0, 1) * init_noise_sigma
    clip_sample_range: jax.Array  # () float32: |x0| clip when clip_sample
    sampler: str = flax.struct.field(pytree_node=False)          # one of SAMPLER_NAMES
    prediction_type: str = flax.struct.field(pytree_node=False)  # epsilon | v_prediction | sample
    clip_sample: bool = flax.struct.field(pytree_node=False)     # clip predicted x0 (ddpm, ddim)
    num_inference_steps: int = flax.struct.field(pytree_node=False)  # N asked for (PLMS runs N+1 steps)
    order: int = flax.struct.field(pytree_node=False, default=1)     # diffusers `scheduler.order`
    # Dynamic thresholding of the predicted x0 (ddpm, ddim, dpmpp_2m; replaces clip_sample):
    # diffusers' `thresholding`, `dynamic_thresholding_ratio`, `sample_max_value`.
    thresholding: bool = flax.struct.field(pytree_node=False, default=False)
    threshold_ratio: Optional[jax.Array] = None   # () float32
    sample_max_value: Optional[jax.Array] = None  # () float32

    @property
    def num_steps(self) -> int:
        return int(self.timesteps.shape[0])


# ---------------------------------------------------------------------------------------
# set_timesteps of each diffusers scheduler
# ---------------------------------------------------------------------------------------
def _check_steps(num_inference_steps: int, T: int) -> int:
    n = int(num_inference_steps)
    if n != num_inference_steps or n < 1:
        raise ValueError(f"num_inference_steps must be a positive integer, got {num_inference_steps!r}")
    if n > T:
        raise ValueError(f"num_inference_steps ({n}) cannot exceed num_train_timesteps ({T})")
    return n


def _check_spacing(spacing: str, allowed=SPACINGS) -> None:
    if spacing not in allowed:
        raise ValueError(f"unknown timestep spacing {spacing!r}; expected one of {allowed}")


def compvis_timesteps(T: int, n: int) -> np.ndarray:
    """CompVis `make_ddim_timesteps("uniform")`, descending."""
    return (np.arange(0, T, T // n) + 1)[::-1].astype(np.int64)


def ddim_timesteps(T: int, n: int, spacing: str, steps_offset: int = 0) -> np.ndarray:
    """DDPMScheduler / DDIMScheduler.set_timesteps (descending int64)."""
    _check_spacing(spacing, SPACINGS + (COMPVIS,))
    if spacing == "linspace":
        return np.linspace(0, T - 1, n).round()[::-1].astype(np.int64)
    if spacing == "leading":
        return (np.arange(0, n) * (T // n)).round()[::-1].astype(np.int64) + steps_offset
    if spacing == "trailing":
        return np.round(np.arange(T, 0, -T / n)).astype(np.int64) - 1
    return compvis_timesteps(T, n)


def pndm_timesteps(T: int, n: int, spacing: str, steps_offset: int = 0) -> np.ndarray:
    """PNDMScheduler(skip_prk_steps=True).set_timesteps: N+1 entries, the second one repeated:
    [t_{N-1}, t_{N-2}, t_{N-2}, t_{N-3}, ..., t_0]."""
    _check_spacing(spacing, SPACINGS + (COMPVIS,))
    if spacing == "linspace":
        asc = np.linspace(0, T - 1, n).round().astype(np.int64)
    elif spacing == "leading":
        asc = (np.arange(0, n) * (T // n)).round().astype(np.int64) + steps_offset
    elif spacing == "trailing":
        asc = np.round(np.arange(T, 0, -T / n))[::-1].astype(np.int64) - 1
    else:
        asc = compvis_timesteps(T, n)[::-1]
    return np.concatenate([asc[:-1], asc[-2:-1], asc[-1:]])[::-1].astype(np.int64)


def dpm_timesteps(T: int, n: int, spacing: str, steps_offset: int = 0, last_timestep: Optional[int] = None
                  ) -> np.ndarray:
    """DPMSolverMultistepScheduler.set_timesteps, descending. ``last_timestep``: T minus the
    number of training steps whose log-SNR/2 lies below lambda_min_clipped (None: T)."""
    _check_spacing(spacing)
    last = T if last_timestep is None else int(last_timestep)
    if spacing == "linspace":
        return np.linspace(0, last - 1, n + 1).round()[::-1][:-1].astype(np.int64)
    if spacing == "leading":
        ratio = last // (n + 1)
        return (np.arange(0, n + 1) * ratio).round()[::-1][:-1].astype(np.int64) + steps_offset
    # diffusers steps by T / n here (not last / n), from last
    return np.arange(last, 0, -T / n).round().astype(np.int64) - 1


def dpm_last_timestep(schedule: NoiseSchedule, lambda_min_clipped: float) -> int:
    """DPMSolverMultistepScheduler.set_timesteps' ``last_timestep``: lambda_t = log(alpha_t) -
    log(sigma_t) in float32 (as its __init__), clipped_idx = searchsorted(flip(lambda_t), lmc)."""
    T = schedule.num_train_timesteps
    if np.isneginf(lambda_min_clipped):
        return T
    ac = schedule.alphas_cumprod64.astype(np.float32)
    if ac[-1] == 0.0:
        ac[-1] = np.float32(2.0 ** -24)
    with np.errstate(divide="ignore"):
        lam = np.log(np.sqrt(ac)) - np.log(np.sqrt(np.float32(1) - ac))
    return T - int(np.searchsorted(lam[::-1], np.float32(lambda_min_clipped), side="left"))


def euler_timesteps(T: int, n: int, spacing: str, steps_offset: int = 0) -> np.ndarray:
    """Euler(Ancestral)DiscreteScheduler.set_timesteps: float32 timesteps, descending."""
    _check_spacing(spacing)
    if spacing == "linspace":
        return np.linspace(0, T - 1, n, dtype=np.float32)[::-1].copy()
    if spacing == "leading":
        ratio = T // n
        return (np.arange(0, n) * ratio).round()[::-1].astype(np.float32) + np.float32(steps_offset)
    return np.arange(T, 0, -T / n).round().astype(np.float32) - np.float32(1)


def karras_sigmas(sigma_min: float, sigma_max: float, n: int, rho: float = 7.0) -> np.ndarray:
    """Karras et al. 2022 (arXiv:2206.00364) Eq. 5: sigma_i = (max^(1/rho) + i/(n-1) (min^(1/rho) - max^(1/rho)))^rho."""
    ramp = np.linspace(0, 1, n)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def sigma_to_t(sigmas: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """Fractional timestep of each sigma by linear interpolation in log-sigma (diffusers `_sigma_to_t`)."""
    sigmas = np.asarray(sigmas, dtype=np.float64)
    log_sigma = np.log(np.maximum(sigmas, 1e-10))
    dists = log_sigma[None, :] - log_sigmas[:, None]
    low = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    high = low + 1
    w = np.clip((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[high]), 0, 1)
    return ((1 - w) * low + w * high).reshape(sigmas.shape)


def _train_sigmas(schedule: NoiseSchedule) -> np.ndarray:
    """sqrt((1 - abar) / abar) for all T, float32, computed as the sigma-based diffusers
    schedulers do (float32 arithmetic on float32 abar; a zero terminal abar becomes 2**-24 so that
    sigma_max stays finite). Their timesteps (Karras: sigma -> t interpolation) depend on it."""
    ac = schedule.alphas_cumprod64.astype(np.float32)
    if ac[-1] == 0.0:
        ac[-1] = np.float32(2.0 ** -24)
    return np.sqrt((np.float32(1) - ac) / ac)


# ---------------------------------------------------------------------------------------
# per-sampler plans
# ---------------------------------------------------------------------------------------
def _vp_noise(ac: np.ndarray, ts: np.ndarray):
    return np.sqrt(ac[ts]), np.sqrt(1.0 - ac[ts])


def _plan_ddpm(schedule, n, spacing, steps_offset):
    ac = schedule.alphas_cumprod64
    ts = ddim_timesteps(schedule.num_train_timesteps, n, spacing, steps_offset)
    _check_in_range(ts, schedule.num_train_timesteps)
    # DDPMScheduler.previous_timestep: the next listed timestep, -1 after the last.
    prev = np.concatenate([ts[1:], [-1]])
    a_t = ac[ts]
    a_prev = np.where(prev >= 0, ac[np.maximum(prev, 0)], 1.0)
    beta_prod, beta_prod_prev = 1 - a_t, 1 - a_prev
    cur_alpha = a_t / a_prev
    cur_beta = 1 - cur_alpha
    # Ho et al. 2020 Eq. 7: posterior mean coefficients and variance beta~_t ("fixed_small").
    var = np.maximum(beta_prod_prev / beta_prod * cur_beta, 1e-20)
    coefs = dict(
        alpha=np.sqrt(a_t), sigma=np.sqrt(beta_prod),
        c_x0=np.sqrt(a_prev) * cur_beta / beta_prod,
        c_xt=np.sqrt(cur_alpha) * beta_prod_prev / beta_prod,
        std=np.where(ts > 0, np.sqrt(var), 0.0),
    )
    return ts, coefs, _vp_noise(ac, ts), 1.0


def _plan_ddim(schedule, n, spacing, steps_offset, eta, set_alpha_to_one):
    ac = schedule.alphas_cumprod64
    T = schedule.num_train_timesteps
    ts = ddim_timesteps(T, n, spacing, steps_offset)
    _check_in_range(ts, T)
    final = 1.0 if set_alpha_to_one else ac[0]
    # diffusers: prev = t - T // N whatever the spacing; CompVis: the next listed timestep.
    prev = np.concatenate([ts[1:], [-1]]) if spacing == COMPVIS else ts - T // n
    a_t = ac[ts]
    a_prev = np.where(prev >= 0, ac[np.maximum(prev, 0)], final)
    # Song et al. 2021 (DDIM) Eq. 16: sigma_t(eta).
    var = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
    std = eta * np.sqrt(var)
    coefs = dict(
        alpha=np.sqrt(a_t), sigma=np.sqrt(1 - a_t),
        c_x0=np.sqrt(a_prev), c_dir=np.sqrt(np.maximum(1 - a_prev - std ** 2, 0.0)), std=std,
    )
    return ts, coefs, _vp_noise(ac, ts), 1.0


def _plan_plms(schedule, n, spacing, steps_offset, set_alpha_to_one):
    ac = schedule.alphas_cumprod64
    T = schedule.num_train_timesteps
    ts = pndm_timesteps(T, n, spacing, steps_offset)
    _check_in_range(ts, T)
    final = 1.0 if set_alpha_to_one else ac[0]
    ratio = T // n
    distinct = np.unique(ts)[::-1]  # descending

    def list_next(t):  # CompVis: next listed timestep, -1 after the last
        k = np.searchsorted(-distinct, -t)
        return int(distinct[k + 1]) if k + 1 < len(distinct) else -1

    def list_prev(t):
        k = np.searchsorted(-distinct, -t)
        return int(distinct[k - 1]) if k >= 1 else T  # T: unusable, never read

    if spacing == COMPVIS:
        pairs = [(t, list_next(t)) for t in ts]       # ordinary step t -> next
        pairs2 = [(list_prev(t), t) for t in ts]      # second step (counter 1): restart from x_start
    else:
        pairs = [(t, t - ratio) for t in ts]          # PNDMScheduler.step_plms: prev = t - T // N
        pairs2 = [(t + ratio, t) for t in ts]         # counter == 1: timestep = t + T // N, prev = t

    def coefs_of(pairs):
        t_cur = np.array([p[0] for p in pairs])
        t_prev = np.array([p[1] for p in pairs])
        ok = t_cur < T
        a = np.where(ok, ac[np.minimum(t_cur, T - 1)], np.nan)
        ap = np.where(t_prev >= 0, ac[np.clip(t_prev, 0, T - 1)], final)
        # Liu et al. 2022 (PNDM) Eq. 9, the transfer phi(x_t, eps, t, t-delta) (= DDIM eta=0):
        # x_prev = sqrt(ap/a) x - (ap - a) / (a sqrt(1-ap) + sqrt(a (1-a) ap)) eps
        with np.errstate(invalid="ignore", divide="ignore"):
            denom = a * np.sqrt(1 - ap) + np.sqrt(a * (1 - a) * ap)
            return np.sqrt(a), np.sqrt(1 - a), np.sqrt(ap / a), (ap - a) / denom

    alpha, sigma, c_x, c_eps = coefs_of(pairs)
    alpha2, sigma2, c_x2, c_eps2 = coefs_of(pairs2)
    coefs = dict(alpha=alpha, sigma=sigma, c_x=c_x, c_eps=c_eps,
                 alpha2=alpha2, sigma2=sigma2, c_x2=c_x2, c_eps2=c_eps2)
    return ts, coefs, _vp_noise(ac, ts), 1.0


def _final_sigma(schedule, final_sigmas_type: str) -> float:
    """diffusers' final_sigmas_type: "zero", or "sigma_min" = sqrt((1 - abar_0) / abar_0) in float32."""
    if final_sigmas_type == "zero":
        return 0.0
    if final_sigmas_type == "sigma_min":
        a0 = np.float32(schedule.alphas_cumprod64[0])
        return float(np.sqrt((np.float32(1) - a0) / a0))
    raise ValueError(f"final_sigmas_type must be 'zero' or 'sigma_min', got {final_sigmas_type!r}")


def _plan_dpmpp_2m(schedule, n, spacing, steps_offset, use_karras_sigmas, final_sigmas_type="zero",
                   lower_order_final=True, euler_at_final=False, lambda_min_clipped=-np.inf,
                   sigma_min=None, sigma_max=None):
    T = schedule.num_train_timesteps
    train_sigmas = _train_sigmas(schedule)  # float32
    log_sigmas = np.log(train_sigmas)
    ts = dpm_timesteps(T, n, spacing, steps_offset, dpm_last_timestep(schedule, lambda_min_clipped))
    if use_karras_sigmas:  # config sigma_min / sigma_max override the training range (_convert_to_karras)
        sig = karras_sigmas(float(train_sigmas[0]) if sigma_min is None else float(sigma_min),
                            float(train_sigmas[-1]) if sigma_max is None else float(sigma_max), n)
        ts = sigma_to_t(sig, log_sigmas)
        if schedule.beta_schedule != "squaredcos_cap_v2":  # diffusers rounds unless cosine
            ts = ts.round()
        ts = ts.astype(np.int64)
    else:  # np.interp clamps, as diffusers does (leading + steps_offset can reach T)
        sig = np.interp(ts, np.arange(T), train_sigmas)
    # Per-step scalars in float32 arithmetic, as DPMSolverMultistepScheduler computes them.
    sig = np.concatenate([sig, [_final_sigma(schedule, final_sigmas_type)]]).astype(np.float32)
    one = np.float32(1)
    alpha = one / np.sqrt(sig * sig + one)  # _sigma_to_alpha_sigma_t: VE sigma -> VP (alpha_t, sigma_t)
    sigma = sig * alpha
    with np.errstate(divide="ignore", invalid="ignore"):
        lam = np.log(alpha) - np.log(sigma)  # log-SNR / 2; +inf at the final sigma 0
        h = lam[1:] - lam[:-1]
        h0 = np.concatenate([[np.float32(np.nan)], lam[1:-1] - lam[:-2]]).astype(np.float32)
        inv_r0 = one / (h0 / h)  # 1 / r0, r0 = h_0 / h
    inv_r0 = np.where(np.isfinite(inv_r0), inv_r0, np.float32(0))
    c_d = alpha[1:] * (np.exp(-h) - one)  # alpha_t (e^{-h} - 1)
    # DPMSolverMultistepScheduler.step's `lower_order_final`: the last step is first order when
    # euler_at_final, or lower_order_final with fewer than 15 steps, or the final sigma is 0.
    n_steps = len(ts)
    last_first = euler_at_final or (lower_order_final and n_steps < 15) or final_sigmas_type == "zero"
    first_order = np.zeros(n_steps)
    first_order[-1] = float(last_first)
    coefs = dict(
        alpha=alpha[:-1], sigma=sigma[:-1],
        c_x=sigma[1:] / sigma[:-1],          # sigma_t / sigma_s0
        c_d=c_d, half_c_d=np.float32(0.5) * c_d, inv_r0=inv_r0, first_order=first_order,
    )
    return ts, coefs, (alpha[:-1], sigma[:-1]), 1.0


def _euler_sigmas(schedule, n, spacing, steps_offset, use_karras_sigmas, final_sigmas_type="zero",
                  interpolation_type="linear", sigma_min=None, sigma_max=None):
    T = schedule.num_train_timesteps
    train_sigmas = _train_sigmas(schedule)  # float32
    ts = euler_timesteps(T, n, spacing, steps_offset)
    if interpolation_type == "linear":
        # np.interp clamps, as diffusers does (leading + steps_offset can reach T)
        sig = np.interp(ts.astype(np.float64), np.arange(T), train_sigmas)
    elif interpolation_type == "log_linear":
        # EulerDiscreteScheduler.set_timesteps: N+1 sigmas log-spaced from sigma_max to sigma_min
        # (float32 torch.linspace), whatever the timesteps; with the final sigma appended the N
        # steps then end at sigma_min, one short of the final sigma.
        lo, hi = np.log(train_sigmas[0]), np.log(train_sigmas[-1])
        sig = np.exp(np.linspace(np.float64(hi), np.float64(lo), n + 1).astype(np.float32))
    else:
        raise ValueError(f"interpolation_type must be 'linear' or 'log_linear', got {interpolation_type!r}")
    if use_karras_sigmas:  # config sigma_min / sigma_max override the range (_convert_to_karras)
        # (Python floats, as diffusers' .item(): float32 numpy scalars would make it float32 math)
        sig = karras_sigmas(float(sig[-1] if sigma_min is None else sigma_min),
                            float(sig[0] if sigma_max is None else sigma_max), n)
        ts = sigma_to_t(sig, np.log(train_sigmas)).astype(np.float32)
    sig = np.concatenate([sig, [_final_sigma(schedule, final_sigmas_type)]]).astype(np.float32)
    sig = sig[: len(ts) + 1]  # log_linear: its (N+2)-th sigma is never reached
    smax = np.float32(sig.max())
    if spacing == "leading":
        init = (smax * smax + np.float32(1.0)) ** np.float32(0.5)
    else:
        init = smax
    return ts, sig, float(init)


def _euler_scalars(s: np.ndarray) -> Dict[str, np.ndarray]:
    """Per-step scalars of Euler(Ancestral)DiscreteScheduler, in float32 arithmetic as diffusers
    computes them: at sigma_max = 4096 (zero terminal SNR) the step x + (x - x0)/sigma * dt cancels
    to ~1e-3 of |x|, so a single-ulp difference in -sigma/sqrt(sigma^2+1) would show."""
    s = s.astype(np.float32)
    s2p1 = s * s + np.float32(1)
    root = np.sqrt(s2p1)
    return dict(sigma=s, in_scale=root, c_v_out=-s / root, v_skip_div=s2p1)


def _plan_euler(schedule, n, spacing, steps_offset, use_karras_sigmas, **sigma_options):
    ts, sig, init = _euler_sigmas(schedule, n, spacing, steps_offset, use_karras_sigmas, **sigma_options)
    s, s_next = sig[:-1].astype(np.float32), sig[1:].astype(np.float32)
    coefs = dict(_euler_scalars(s), dt=s_next - s)
    return ts, coefs, (np.ones_like(s), s), init


def _plan_euler_a(schedule, n, spacing, steps_offset):
    ts, sig, init = _euler_sigmas(schedule, n, spacing, steps_offset, False)
    s, s_next = sig[:-1].astype(np.float32), sig[1:].astype(np.float32)
    # Ancestral step (k-diffusion `get_ancestral_step`): split sigma_next into a deterministic
    # part sigma_down and fresh noise sigma_up, sigma_down^2 + sigma_up^2 = sigma_next^2.
    s_up = np.sqrt(s_next * s_next * (s * s - s_next * s_next) / (s * s))
    s_down = np.sqrt(np.maximum(s_next * s_next - s_up * s_up, np.float32(0)))
    coefs = dict(_euler_scalars(s), dt=s_down - s, sigma_up=s_up)
    return ts, coefs, (np.ones_like(s), s), init


def _check_in_range(ts, T):
    if np.any(ts < 0) or np.any(ts > T - 1):
        # (diffusers' "trailing" arange(T, 0, -T / N) keeps a last entry ~1e-13 for some N, e.g.
        # T=1000, N=61 or T=300, N=7: timestep -1, which its alpha-based schedulers would read as
        # abar[-1], the noisiest one.)
        raise ValueError(f"timesteps {ts.tolist()} fall outside [0, {T - 1}]: check steps_offset "
                         "('leading'), or pick another num_inference_steps ('trailing' gives -1 "
                         "for this one)")


# ---------------------------------------------------------------------------------------
# public entry points
# ---------------------------------------------------------------------------------------
def make_plan(
    name: str,
    schedule: NoiseSchedule,
    num_inference_steps: int,
    *,
    spacing: str = "leading",
    steps_offset: int = 0,
    prediction_type: str = "epsilon",
    eta: float = 0.0,
    use_karras_sigmas: bool = False,
    clip_sample: bool = False,
    clip_sample_range: float = 1.0,
    set_alpha_to_one: Optional[bool] = None,
    thresholding: bool = False,
    dynamic_thresholding_ratio: float = 0.995,
    sample_max_value: float = 1.0,
    final_sigmas_type: str = "zero",
    lower_order_final: bool = True,
    euler_at_final: bool = False,
    lambda_min_clipped: float = -np.inf,
    interpolation_type: str = "linear",
    sigma_min: Optional[float] = None,
    sigma_max: Optional[float] = None,
    first_step: int = 0,
) -> SamplerPlan:
    """Host-side plan of sampler ``name`` (see ``SAMPLER_NAMES``), reproducing the matching
    diffusers scheduler's ``set_timesteps`` for these options.

    spacing: diffusers ``timestep_spacing`` ("leading", "trailing", "linspace"), or "compvis"
      for ddim/plms (the CompVis samplers' uniform discretization, always offset by 1).
    eta: DDIM only (0 = deterministic). clip_sample: ddpm/ddim only.
    use_karras_sigmas: dpmpp_2m and euler only.
    set_alpha_to_one: ddim/plms final step; None = diffusers' default (ddim True, plms False;
      compvis spacing False, as the CompVis samplers use abar_0).
    thresholding, dynamic_thresholding_ratio, sample_max_value: dynamic thresholding of the
      predicted x0 (Saharia et al. 2022, Imagen, Sec. 2.3), ddpm/ddim/dpmpp_2m, as diffusers'
      `_threshold_sample`; replaces clip_sample when on.
    final_sigmas_type ("zero" | "sigma_min"): dpmpp_2m and euler. lower_order_final,
      euler_at_final, lambda_min_clipped: dpmpp_2m. interpolation_type ("linear" | "log_linear"):
      euler. sigma_min / sigma_max: the Karras sigma range (dpmpp_2m, euler; None = the schedule's).
    first_step: the first step that will run (img2img / inpaint: ``start_index_for_strength``); the
      zero-terminal-SNR checks only look at the steps from there on.
    """
    if name not in SAMPLER_NAMES:
        raise ValueError(f"unknown sampler {name!r}; expected one of {SAMPLER_NAMES}")
    check_prediction_type(prediction_type)
    T = schedule.num_train_timesteps
    n = _check_steps(num_inference_steps, T)
    if spacing == COMPVIS and name not in ("ddim", "plms"):
        raise ValueError(f"spacing 'compvis' is only defined for ddim and plms, not {name!r}")
    if use_karras_sigmas and name not in ("dpmpp_2m", "euler"):
        raise ValueError(f"use_karras_sigmas is only supported by dpmpp_2m and euler, not {name!r}")
    if clip_sample and name not in ("ddpm", "ddim"):
        raise ValueError(f"clip_sample is only supported by ddpm and ddim, not {name!r}")
    if prediction_type == "sample" and name in ("plms", "euler_a"):
        raise ValueError(f"prediction_type 'sample' is not supported by {name!r} (nor by diffusers)")
    if isinstance(first_step, bool) or not isinstance(first_step, (int, np.integer)) or first_step < 0:
        raise ValueError(f"first_step must be an int >= 0, got {first_step!r}")
    if not 0.0 <= float(eta):
        raise ValueError(f"eta must be >= 0, got {eta}")
    if thresholding and name not in ("ddpm", "ddim", "dpmpp_2m"):
        raise ValueError(f"thresholding is only supported by ddpm, ddim and dpmpp_2m, not {name!r}")
    if thresholding and not 0.0 <= float(dynamic_thresholding_ratio) <= 1.0:  # torch.quantile raises too
        raise ValueError(f"dynamic_thresholding_ratio must lie in [0, 1], got {dynamic_thresholding_ratio!r}")
    if final_sigmas_type != "zero" and name not in ("dpmpp_2m", "euler"):
        raise ValueError(f"final_sigmas_type is only supported by dpmpp_2m and euler, not {name!r}")
    if interpolation_type != "linear" and name != "euler":
        raise ValueError(f"interpolation_type is only supported by euler, not {name!r}")
    if set_alpha_to_one is None:
        set_alpha_to_one = name == "ddim" and spacing != COMPVIS

    if name == "ddpm":
        out = _plan_ddpm(schedule, n, spacing, steps_offset)
    elif name == "ddim":
        out = _plan_ddim(schedule, n, spacing, steps_offset, float(eta), set_alpha_to_one)
    elif name == "plms":
        out = _plan_plms(schedule, n, spacing, steps_offset, set_alpha_to_one)
        # Only the steps that run: an img2img run from first_step > 0 never visits t = T - 1 with
        # trailing spacing (diffusers' PNDM then gives finite results), and the restart step
        # (alpha2) is the one after the first step run.
        alpha_used = np.concatenate([out[1]["alpha"][first_step:], out[1]["alpha2"][first_step + 1:first_step + 2]])
        if np.any(alpha_used == 0):
            raise ValueError("plms cannot step from a timestep with abar_t = 0 (zero terminal SNR); "
                             "use 'leading' spacing or another sampler")
    elif name == "dpmpp_2m":
        out = _plan_dpmpp_2m(schedule, n, spacing, steps_offset, use_karras_sigmas, final_sigmas_type,
                             lower_order_final, euler_at_final, lambda_min_clipped, sigma_min, sigma_max)
    elif name == "euler":
        out = _plan_euler(schedule, n, spacing, steps_offset, use_karras_sigmas,
                          final_sigmas_type=final_sigmas_type, interpolation_type=interpolation_type,
                          sigma_min=sigma_min, sigma_max=sigma_max)
    else:
        out = _plan_euler_a(schedule, n, spacing, steps_offset)
    ts, coefs, (noise_a, noise_s), init = out
    # Only the steps that run (first_step on): img2img with strength < 1 and trailing spacing starts
    # below T - 1, where diffusers' DDPM / DDIM are finite.
    if prediction_type == "epsilon" and name in ("ddpm", "ddim") and np.any(coefs["alpha"][first_step:] == 0):
        raise ValueError(f"{name} with prediction_type 'epsilon' cannot denoise from a timestep with "
                         "abar_t = 0 (zero terminal SNR): x0 = (x - eps) / 0; use v_prediction "
                         "(Lin et al. 2024) or 'leading' spacing")

    f32 = lambda a: jnp.asarray(np.asarray(a, np.float64), jnp.float32)  # noqa: E731
    return SamplerPlan(
        timesteps=f32(ts),
        coefs={k: f32(v) for k, v in coefs.items()},
        noise_alpha=f32(noise_a),
        noise_sigma=f32(noise_s),
        init_noise_sigma=f32(init),
        clip_sample_range=f32(clip_sample_range),
        sampler=name,
        prediction_type=prediction_type,
        clip_sample=bool(clip_sample),
        num_inference_steps=n,
        order=1,  # every scheduler reproduced here has diffusers `order = 1`
        thresholding=bool(thresholding),
        threshold_ratio=f32(dynamic_thresholding_ratio),
        sample_max_value=f32(sample_max_value),
    )


# diffusers option -> values this module implements (anything else raises). Options that only
# matter together with a rejected one need no check: flow_shift and time_shift_type (flow /
# dynamic-shifting sigmas only), sample_max_value / dynamic_thresholding_ratio (thresholding).
_FIXED_OPTIONS = {
    # DDPM: None falls through _get_variance to the fixed_small value; DPM-Solver: None = no
    # learned variance channels to drop.
    "variance_type": ("fixed_small", None),
    # diffusers' DPMSolverMultistepScheduler.__init__ maps the UniPC / DEIS solver types "logrho",
    # "bh1", "bh2" (of a folder saved with those schedulers) to "midpoint". (It maps algorithm_type
    # "deis" to "dpmsolver++" too, then refuses final_sigmas_type "zero"; here sampler="dpmpp_2m"
    # is DPM-Solver++(2M) whatever algorithm the folder saved: _FORCED sets it before this check.)
    "algorithm_type": ("dpmsolver++",), "solver_type": ("midpoint", "logrho", "bh1", "bh2"),
    "solver_order": (2,),
    "use_exponential_sigmas": (False,), "use_beta_sigmas": (False,), "use_lu_lambdas": (False,),
    "use_flow_sigmas": (False,), "use_dynamic_shifting": (False,), "skip_prk_steps": (True,),
}
# options passed on to make_plan (by the samplers that read them) when the dict has them
_PASSED_OPTIONS = {
    "thresholding": ("ddpm", "ddim", "dpmpp_2m"), "dynamic_thresholding_ratio": ("ddpm", "ddim", "dpmpp_2m"),
    "sample_max_value": ("ddpm", "ddim", "dpmpp_2m"), "final_sigmas_type": ("dpmpp_2m", "euler"),
    "lower_order_final": ("dpmpp_2m",), "euler_at_final": ("dpmpp_2m",), "lambda_min_clipped": ("dpmpp_2m",),
    "interpolation_type": ("euler",), "sigma_min": ("dpmpp_2m", "euler"), "sigma_max": ("dpmpp_2m", "euler"),
}


def make_plan_from_options(name: str, schedule: NoiseSchedule, num_inference_steps: int,
                           options: Mapping[str, Any], *, eta: float = 0.0, first_step: int = 0) -> SamplerPlan:
    """``make_plan`` from a diffusers-style option dict (e.g. the output of
    ``scheduler_config.resolve_scheduler_options``). Options this module does not implement
    raise ValueError naming the scheduler_config.json key and the supported values."""
    for key, supported in _FIXED_OPTIONS.items():
        if key in options and options[key] not in supported:
            raise ValueError(f"scheduler option {key!r}={options[key]!r} (scheduler/scheduler_config.json) "
                             f"is not supported by sampler {name!r}; supported: "
                             f"{', '.join(repr(v) for v in supported)}")
    # EulerDiscreteScheduler: timestep_type "continuous" feeds the model 0.25 log(sigma) instead of
    # t, but only for v_prediction (set_timesteps); otherwise it changes nothing.
    if options.get("timestep_type", "discrete") != "discrete" and options.get("prediction_type") == "v_prediction":
        raise ValueError(f"scheduler option 'timestep_type'={options['timestep_type']!r} "
                         f"(scheduler/scheduler_config.json) is not supported by sampler {name!r} with "
                         "v_prediction; supported: 'discrete'")
    kw = dict(
        spacing=options.get("timestep_spacing", "leading"),
        steps_offset=int(options.get("steps_offset", 0) or 0),
        prediction_type=options.get("prediction_type", "epsilon"),
    )
    if name in ("ddpm", "ddim"):
        kw["clip_sample"] = bool(options.get("clip_sample", False))
        kw["clip_sample_range"] = float(options.get("clip_sample_range", 1.0))
    if name in ("ddim", "plms") and "set_alpha_to_one" in options:
        kw["set_alpha_to_one"] = bool(options["set_alpha_to_one"])
    if name in ("dpmpp_2m", "euler"):
        kw["use_karras_sigmas"] = bool(options.get("use_karras_sigmas", False) or False)
    if name == "ddim":
        kw["eta"] = eta
    for key, names in _PASSED_OPTIONS.items():
        if name in names and options.get(key) is not None:
            kw[key] = options[key]
    if "lambda_min_clipped" in kw:
        kw["lambda_min_clipped"] = float(kw["lambda_min_clipped"])
    return make_plan(name, schedule, num_inference_steps, first_step=first_step, **kw)


def start_index_for_strength(num_inference_steps: int, strength: float, order: int = 1) -> int:
    """First step of an img2img/inpaint run, as StableDiffusionImg2ImgPipeline.get_timesteps:
    init_timestep = min(int(N * strength), N); t_start = max(N - init_timestep, 0); index t_start * order."""
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be in [0, 1], got {strength}")
    n = int(num_inference_steps)
    init_timestep = min(int(n * strength), n)
    return max(n - init_timestep, 0) * order
