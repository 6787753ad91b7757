"""Optimizer, learning-rate schedule, gradient accumulation and EMA.

* AdamW (Loshchilov & Hutter 2019, arXiv:1711.05101) with decoupled weight decay masked
  off norms and biases, after global-norm gradient clipping (Pascanu et al. 2013);
* learning rate: linear warmup, then constant or cosine decay (Loshchilov & Hutter 2017,
  SGDR) down to ``end_lr_factor * lr`` at ``num_steps``;
* gradient accumulation as a ``lax.scan`` over micro-batches inside the jitted step, so
  k micro-batches give the update of one k-times larger batch (up to float rounding);
* an exponential moving average of the weights with the CompVis ``LitEma`` warmup:
  decay_n = min(decay, (1 + n) / (10 + n)) at update n = 1, 2, ...
"""
from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, Callable, Mapping, Optional, Tuple

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

LR_SCHEDULES = ("constant", "cosine")
NO_DECAY_NAMES = ("bias", "scale")  # Linen: LayerNorm/GroupNorm gains are "scale", all biases "bias"


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """AdamW + schedule + clipping + accumulation + EMA hyperparameters."""

    lr: float = 1e-4                 # peak learning rate (after warmup)
    lr_schedule: str = "constant"    # "constant" or "cosine" after the warmup
    warmup_steps: int = 0            # linear warmup 0 -> lr over this many updates
    num_steps: int = 0               # cosine: updates until lr reaches end_lr_factor * lr
    end_lr_factor: float = 0.0       # cosine: final lr / peak lr
    b1: float = 0.9                  # Adam beta1
    b2: float = 0.999                # Adam beta2
    eps: float = 1e-8                # Adam epsilon
    weight_decay: float = 0.0        # decoupled decay on kernels / embeddings (not norms, biases)
    grad_clip: float = 1.0           # global-norm clip threshold; 0 disables clipping
    grad_accum_steps: int = 1        # micro-batches per update (scan inside the step)
    ema_decay: float = 0.9999        # EMA decay of the weights; 0 disables the EMA copy
    ema_warmup: bool = True          # LitEma warmup min(decay, (1+n)/(10+n))

    def __post_init__(self):
        # Library users build this directly (train.py's keys are checked by config_access first):
        # an out-of-range value would otherwise train with NaNs or a silently wrong schedule.
        def number(name, ok, allowed):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) \
                    or not ok(value):
                raise ValueError(f"OptimizerConfig.{name} must be {allowed}, got {value!r}")

        def integer(name, low):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
                raise ValueError(f"OptimizerConfig.{name} must be an integer >= {low}, got {value!r}")

        for name in ("lr", "end_lr_factor", "weight_decay", "grad_clip"):
            number(name, lambda v: v >= 0, "a finite number >= 0")
        number("eps", lambda v: v > 0, "a finite number > 0")
        for name in ("b1", "b2"):
            number(name, lambda v: 0 <= v < 1, "in [0, 1)")
        number("ema_decay", lambda v: 0 <= v < 1, "in [0, 1) (0: no EMA)")
        integer("warmup_steps", 0)
        integer("num_steps", 0)
        integer("grad_accum_steps", 1)
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"OptimizerConfig.lr_schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}")
        if self.lr_schedule == "cosine" and self.num_steps <= self.warmup_steps:
            raise ValueError("OptimizerConfig: a cosine schedule needs num_steps > warmup_steps")

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> "OptimizerConfig":
        """Pick this dataclass's fields out of a (Config)dict, ignoring other keys."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in dict(values).items() if k in names})


def learning_rate_schedule(cfg: OptimizerConfig) -> optax.Schedule:
    """step -> lr: linear warmup from 0, then constant or cosine decay."""
    if cfg.lr_schedule == "constant":
        if cfg.warmup_steps <= 0:
            return optax.constant_schedule(cfg.lr)
        return optax.join_schedules(
            [optax.linear_schedule(0.0, cfg.lr, cfg.warmup_steps), optax.constant_schedule(cfg.lr)],
            [cfg.warmup_steps])
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=cfg.lr, warmup_steps=cfg.warmup_steps, decay_steps=cfg.num_steps,
        end_value=cfg.lr * cfg.end_lr_factor)


def weight_decay_mask(params):
    """True where weight decay applies: arrays with >= 2 dims not named bias/scale."""
    def decay(path, x):
        name = getattr(path[-1], "key", str(path[-1])) if path else ""
        return x.ndim >= 2 and name not in NO_DECAY_NAMES

    return jax.tree_util.tree_map_with_path(decay, params)


def make_optimizer(cfg: OptimizerConfig) -> optax.GradientTransformation:
    """clip_by_global_norm -> AdamW(schedule, masked weight decay)."""
    parts = []
    if cfg.grad_clip and cfg.grad_clip > 0:
        parts.append(optax.clip_by_global_norm(cfg.grad_clip))
    parts.append(optax.adamw(learning_rate_schedule(cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                             weight_decay=cfg.weight_decay, mask=weight_decay_mask))
    return optax.chain(*parts)


# ------------------------------------------------------------------ EMA
def ema_decay_at(num_updates: jax.Array, decay: float, warmup: bool = True) -> jax.Array:
    """CompVis LitEma: min(decay, (1 + n) / (10 + n)) for the n-th update (n >= 1)."""
    n = jnp.asarray(num_updates, jnp.float32)
    if not warmup:
        return jnp.float32(decay)
    return jnp.minimum(jnp.float32(decay), (1.0 + n) / (10.0 + n))


def update_ema(ema_params, params, decay: jax.Array):
    """ema <- ema - (1 - decay) (ema - params)  (LitEma's in-place form)."""
    one_minus = 1.0 - decay
    return jax.tree_util.tree_map(
        lambda e, p: e - (one_minus * (e - p.astype(e.dtype))).astype(e.dtype), ema_params, params)


# ------------------------------------------------------------------ accumulation
def split_microbatches(tree, k: int, mesh: Optional[Mesh] = None, batch_axes=("data", "fsdp")):
    """(B, ...) leaves -> (k, B/k, ...): micro-batch i holds examples i, i+k, i+2k, ...

    The strided split keeps every micro-batch spread over all devices: each device's
    contiguous block of the batch splits locally into its k parts (no communication).
    With ``mesh``, the result is constrained to ``P(None, batch_axes)``.
    """
    def split(x):
        b = x.shape[0]
        if b % k:
            raise ValueError(f"batch of {b} examples cannot be split into {k} micro-batches")
        y = jnp.swapaxes(x.reshape((b // k, k) + x.shape[1:]), 0, 1)
        if mesh is not None:
            y = jax.lax.with_sharding_constraint(y, NamedSharding(mesh, P(None, batch_axes)))
        return y

    return jax.tree_util.tree_map(split, tree)


def accumulate_gradients(
    loss_fn: Callable[[Any, Any, jax.Array], Tuple[jax.Array, Any]],
    params,
    batch,
    k: int,
    mesh: Optional[Mesh] = None,
):
    """Mean loss, mean gradients and mean aux over ``k`` micro-batches of ``batch``.

    ``loss_fn(params, micro_batch, index) -> (loss, aux)`` must return the mean over its
    micro-batch; the mean of k equal-sized micro-batch means is the full-batch mean.
    k = 1 differentiates the whole batch directly (no scan).
    """
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if k == 1:
        (loss, aux), grads = grad_fn(params, batch, jnp.int32(0))
        return loss, grads, aux

    micro = split_microbatches(batch, k, mesh)
    zeros = jax.tree_util.tree_map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
    (_, aux0), _ = jax.eval_shape(grad_fn, params, jax.tree_util.tree_map(lambda x: x[0], micro), jnp.int32(0))
    aux_zeros = jax.tree_util.tree_map(lambda a: jnp.zeros(a.shape, jnp.float32), aux0)

    def body(carry, inputs):
        loss_sum, grad_sum, aux_sum = carry
        index, mb = inputs
        (loss, aux), grads = grad_fn(params, mb, index)
        grad_sum = jax.tree_util.tree_map(lambda s, g: s + g.astype(jnp.float32), grad_sum, grads)
        aux_sum = jax.tree_util.tree_map(lambda s, a: s + a.astype(jnp.float32), aux_sum, aux)
        return (loss_sum + loss.astype(jnp.float32), grad_sum, aux_sum), None

    (loss_sum, grad_sum, aux_sum), _ = jax.lax.scan(
        body, (jnp.float32(0), zeros, aux_zeros), (jnp.arange(k, dtype=jnp.int32), micro))
    scale = 1.0 / k
    grads = jax.tree_util.tree_map(lambda g, p: (g * scale).astype(p.dtype), grad_sum, params)
    aux = jax.tree_util.tree_map(lambda a: a * scale, aux_sum)
    return loss_sum * scale, grads, aux
