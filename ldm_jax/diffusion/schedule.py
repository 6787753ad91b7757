"""Noise schedules as data: betas -> alphas -> alphas_cumprod.

The forward process of DDPM (Ho et al., NeurIPS 2020, arXiv:2006.11239) is
q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I), abar_t = prod_{s<=t} (1 - beta_s).
Schedules are computed once on the host in float64 numpy (guided-diffusion:
"use float64 for accuracy") with the same formulas as diffusers'
schedulers and the CompVis ``make_beta_schedule``; a ``NoiseSchedule`` keeps
the float64 arrays for host-side sampler plans (``ldm_jax.diffusion.timesteps``)
and float32 jnp copies for jitted training code.

Beta schedules (diffusers names; CompVis names in brackets):
  linear           linspace(beta_start, beta_end, T)                   [sqrt_linear]
  scaled_linear    linspace(sqrt(beta_start), sqrt(beta_end), T) ** 2  [linear]  (SD)
  squaredcos_cap_v2  Nichol & Dhariwal 2021 Eq. 17, betas capped at 0.999 [cosine-ish]

Note: diffusers computes its schedules in float32 torch, so its
``alphas_cumprod`` carry about 1e-6 relative rounding error against these
float64 values (see tests/test_schedule.py); CompVis computes in float64 and
casts, which these arrays reproduce exactly.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Optional, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
# diffusers scheduler-config keys that define the schedule (others are sampler options).
SCHEDULE_CONFIG_KEYS = (
    "num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas",
    "rescale_betas_zero_snr",
)


def cosine_betas(num_train_timesteps: int, max_beta: float = 0.999) -> np.ndarray:
    """Nichol & Dhariwal 2021 (arXiv:2102.09672) Eq. 17 with s = 0.008:
    abar(t) = cos^2(((t/T + s) / (1 + s)) * pi/2), beta_t = min(1 - abar(t+1)/abar(t), max_beta).
    """
    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    T = num_train_timesteps
    return np.array(
        [min(1.0 - alpha_bar((i + 1) / T) / alpha_bar(i / T), max_beta) for i in range(T)],
        dtype=np.float64,
    )


def make_betas(beta_schedule: str, num_train_timesteps: int, beta_start: float = 1e-4,
               beta_end: float = 0.02) -> np.ndarray:
    """Float64 betas (T,) for one of ``BETA_SCHEDULES``."""
    T = int(num_train_timesteps)
    if beta_schedule == "linear":
        return np.linspace(beta_start, beta_end, T, dtype=np.float64)
    if beta_schedule == "scaled_linear":
        return np.linspace(beta_start ** 0.5, beta_end ** 0.5, T, dtype=np.float64) ** 2
    if beta_schedule == "squaredcos_cap_v2":
        return cosine_betas(T)
    raise ValueError(f"unknown beta_schedule {beta_schedule!r}; expected one of {BETA_SCHEDULES}")


def rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Lin et al. 2024 (arXiv:2305.08891) Algorithm 1: shift and scale sqrt(abar) so that
    sqrt(abar_T) = 0 (zero terminal SNR) while sqrt(abar_0) is unchanged."""
    betas = np.asarray(betas, dtype=np.float64)
    abar_sqrt = np.sqrt(np.cumprod(1.0 - betas))
    first, last = abar_sqrt[0], abar_sqrt[-1]
    abar_sqrt = (abar_sqrt - last) * (first / (first - last))
    abar = abar_sqrt ** 2
    alphas = np.concatenate([abar[:1], abar[1:] / abar[:-1]])
    return 1.0 - alphas


@flax.struct.dataclass
class NoiseSchedule:
    """A discrete variance-preserving schedule of ``num_train_timesteps`` steps.

    Array fields are float32 jnp (traced when passed to jitted code); the float64
    values live in hashable static tuples, read on the host via ``betas64`` /
    ``alphas_cumprod64``.
    """
    betas: jax.Array             # (T,) float32 beta_t
    alphas: jax.Array            # (T,) float32 1 - beta_t
    alphas_cumprod: jax.Array    # (T,) float32 abar_t
    sqrt_alphas_cumprod: jax.Array            # (T,) float32 sqrt(abar_t), from float64
    sqrt_one_minus_alphas_cumprod: jax.Array  # (T,) float32 sqrt(1 - abar_t), from float64 (no
                                              # float32 cancellation in 1 - abar at small t)
    betas_f64: tuple = flax.struct.field(pytree_node=False)           # (T,) float64 betas, host side
    alphas_cumprod_f64: tuple = flax.struct.field(pytree_node=False)  # (T,) float64 abar_t, host side
    zero_terminal_snr: bool = flax.struct.field(pytree_node=False, default=False)  # abar_{T-1} == 0
    beta_schedule: str = flax.struct.field(pytree_node=False, default="custom")  # name it was made from

    @property
    def num_train_timesteps(self) -> int:
        return len(self.betas_f64)

    @property
    def betas64(self) -> np.ndarray:
        return np.asarray(self.betas_f64, dtype=np.float64)

    @property
    def alphas_cumprod64(self) -> np.ndarray:
        return np.asarray(self.alphas_cumprod_f64, dtype=np.float64)

    # ---- constructors -------------------------------------------------------------
    @classmethod
    def from_betas(cls, betas: Sequence[float], *, zero_terminal_snr: Optional[bool] = None,
                   beta_schedule: str = "custom") -> "NoiseSchedule":
        betas = np.asarray(betas, dtype=np.float64)
        if betas.ndim != 1 or betas.size < 2:
            raise ValueError(f"betas must be a 1-D array of at least 2 values, got shape {betas.shape}")
        if not np.all((betas >= 0.0) & (betas <= 1.0)):
            raise ValueError("betas must lie in [0, 1]")
        return cls.from_alphas_cumprod(np.cumprod(1.0 - betas), betas=betas,
                                       zero_terminal_snr=zero_terminal_snr, beta_schedule=beta_schedule)

    @classmethod
    def from_alphas_cumprod(cls, alphas_cumprod: Sequence[float], *, betas=None,
                            zero_terminal_snr: Optional[bool] = None,
                            beta_schedule: str = "custom") -> "NoiseSchedule":
        """Build from abar_t directly (e.g. to reuse another implementation's exact values)."""
        ac = np.asarray(alphas_cumprod, dtype=np.float64)
        if ac.ndim != 1 or ac.size < 2:
            raise ValueError(f"alphas_cumprod must be 1-D with at least 2 values, got shape {ac.shape}")
        if betas is None:
            betas = 1.0 - np.concatenate([ac[:1], ac[1:] / np.where(ac[:-1] > 0, ac[:-1], 1.0)])
        betas = np.asarray(betas, dtype=np.float64)
        if zero_terminal_snr is None:
            zero_terminal_snr = bool(ac[-1] == 0.0)
        return cls(
            betas=jnp.asarray(betas, jnp.float32),
            alphas=jnp.asarray(1.0 - betas, jnp.float32),
            alphas_cumprod=jnp.asarray(ac, jnp.float32),
            sqrt_alphas_cumprod=jnp.asarray(np.sqrt(ac), jnp.float32),
            sqrt_one_minus_alphas_cumprod=jnp.asarray(np.sqrt(1.0 - ac), jnp.float32),
            betas_f64=tuple(float(b) for b in betas),
            alphas_cumprod_f64=tuple(float(a) for a in ac),
            zero_terminal_snr=bool(zero_terminal_snr),
            beta_schedule=str(beta_schedule),
        )

    @classmethod
    def create(cls, beta_schedule: str = "scaled_linear", num_train_timesteps: int = 1000,
               beta_start: float = 0.00085, beta_end: float = 0.012, *,
               rescale_betas_zero_snr: bool = False) -> "NoiseSchedule":
        """Schedule from its defining numbers (defaults: Stable Diffusion)."""
        betas = make_betas(beta_schedule, num_train_timesteps, beta_start, beta_end)
        if rescale_betas_zero_snr:
            betas = rescale_zero_terminal_snr(betas)
        return cls.from_betas(betas, zero_terminal_snr=rescale_betas_zero_snr, beta_schedule=beta_schedule)

    @classmethod
    def from_diffusers_config(cls, config: Mapping[str, Any]) -> "NoiseSchedule":
        """Schedule of a saved diffusers scheduler config (``scheduler_config.json``).

        Reads num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas and
        rescale_betas_zero_snr (diffusers' defaults for missing keys); other keys are
        sampler options and are ignored here. Unsupported values raise ValueError naming
        the key.
        """
        T = config.get("num_train_timesteps", 1000)
        if isinstance(T, bool) or not isinstance(T, (int, np.integer)) or T < 2:
            raise ValueError(f"scheduler config key 'num_train_timesteps' must be an integer >= 2, got {T!r}")
        rescale = config.get("rescale_betas_zero_snr", False)
        if not isinstance(rescale, (bool, np.bool_)):
            raise ValueError(f"scheduler config key 'rescale_betas_zero_snr' must be true/false, got {rescale!r}")
        trained = config.get("trained_betas", None)
        if trained is not None:
            trained = np.asarray(trained, dtype=np.float64)
            if trained.shape != (T,):
                raise ValueError(
                    f"scheduler config key 'trained_betas' has shape {trained.shape}, expected ({T},) "
                    "to match 'num_train_timesteps'")
            betas, name = trained, "custom"
        else:
            name = config.get("beta_schedule", "linear")
            if name not in BETA_SCHEDULES:
                raise ValueError(
                    f"scheduler config key 'beta_schedule' has unsupported value {name!r}; "
                    f"supported: {BETA_SCHEDULES}")
            for key, default in (("beta_start", 0.0001), ("beta_end", 0.02)):
                value = config.get(key, default)
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
                    raise ValueError(f"scheduler config key {key!r} must be a number in [0, 1), got {value!r}")
            betas = make_betas(name, T, float(config.get("beta_start", 0.0001)),
                               float(config.get("beta_end", 0.02)))
        if rescale:
            betas = rescale_zero_terminal_snr(betas)
        return cls.from_betas(betas, zero_terminal_snr=bool(rescale), beta_schedule=name)


def _expand(coef_b: jax.Array, x: jax.Array) -> jax.Array:
    """(B,) -> (B, 1, ..., 1) to broadcast against x (B, ...)."""
    return coef_b.reshape(coef_b.shape + (1,) * (x.ndim - coef_b.ndim))


def alpha_sigma(schedule: NoiseSchedule, t_b: jax.Array):
    """(sqrt(abar_t), sqrt(1 - abar_t)) for integer timesteps t_b (B,), float32."""
    t_b = jnp.asarray(t_b, jnp.int32)
    return schedule.sqrt_alphas_cumprod[t_b], schedule.sqrt_one_minus_alphas_cumprod[t_b]


def add_noise(schedule: NoiseSchedule, x0: jax.Array, noise: jax.Array, t_b: jax.Array) -> jax.Array:
    """Sample q(x_t | x_0) (Ho et al. 2020 Eq. 4): sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps."""
    a_b, s_b = alpha_sigma(schedule, t_b)
    return _expand(a_b, x0) * x0 + _expand(s_b, x0) * noise


def get_velocity(schedule: NoiseSchedule, x0: jax.Array, noise: jax.Array, t_b: jax.Array) -> jax.Array:
    """v target (Salimans & Ho 2022, arXiv:2202.00512, Sec. 4): v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0."""
    a_b, s_b = alpha_sigma(schedule, t_b)
    return _expand(a_b, x0) * noise - _expand(s_b, x0) * x0


def snr(schedule: NoiseSchedule, t_b: jax.Array) -> jax.Array:
    """Signal-to-noise ratio abar_t / (1 - abar_t) = (alpha_t / sigma_t)^2 at integer timesteps
    (B,), float32 (diffusers' ``training_utils.compute_snr``)."""
    a_b, s_b = alpha_sigma(schedule, t_b)
    return jnp.square(a_b / s_b)
