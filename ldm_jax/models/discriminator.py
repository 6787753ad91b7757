"""PatchGAN discriminator (Isola et al., CVPR 2017, "pix2pix", Sec. 3.2.2), as taming /
LDM use it for the first-stage GAN loss (taming ``NLayerDiscriminator``).

    conv 4x4/2 (in -> ndf), LeakyReLU(0.2)
    n_layers - 1 x [conv 4x4/2 (-> ndf * min(2^n, 8)), norm, LeakyReLU(0.2)]
    conv 4x4/1 (-> ndf * min(2^n_layers, 8)), norm, LeakyReLU(0.2)
    conv 4x4/1 (-> 1)                      -> one logit per (overlapping) patch

All convolutions pad by 1. A 256x256 image with n_layers=3 gives 30x30 logits (the
70x70-receptive-field PatchGAN); 64x64 gives 6x6. Submodule names are taming's
``nn.Sequential`` indices (``main_0``, ``main_2``, ``main_3`` ...), so a taming state
dict maps by name (norm ``weight`` -> ``scale``).

Normalisation (``norm``), since taming's BatchNorm keeps running statistics that a
pure, sharded jitted step would have to carry as mutable state:

* ``"group"`` (default): GroupNorm. Per-example, so the logits of an example do not
  depend on the rest of the batch, its sharding or gradient accumulation; no state.
* ``"batch"``: BatchNorm as taming trains it (``model.train()``: statistics of the
  current batch, here of the *global* batch, i.e. synchronised across devices); the
  running averages taming only uses in eval mode are not kept. Inner convs without
  bias, as taming. Differs from unsharded-but-accumulated steps (statistics per micro-batch).
* ``"actnorm"``: taming's ActNorm (Kingma & Dhariwal 2018, Glow Sec. 3.1): a learned
  per-channel affine ``scale * (x + loc)`` initialised from data so that the first
  batch's activations have zero mean and unit variance. ``actnorm_data_init`` does
  that initialisation functionally (taming does it in the first training forward).
* ``"none"``: no normalisation.

Initialisation follows taming's ``weights_init``: conv kernels N(0, 0.02), norm scales
N(1, 0.02), norm biases 0; conv biases are 0 (PyTorch leaves its default uniform init).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

from ldm_jax.models.layers import GroupNorm

Dtype = jnp.dtype
NORMS = ("group", "batch", "actnorm", "none")


@dataclasses.dataclass(frozen=True)
class DiscriminatorConfig:
    """Hyperparameters of the PatchGAN discriminator (taming NLayerDiscriminator)."""

    in_channels: int = 3        # image channels (taming disc_in_channels)
    ndf: int = 64               # channels of the first conv (taming ndf)
    n_layers: int = 3           # stride-2 convs, >= 0 (taming disc_num_layers; 0 still has the first)
    norm: str = "group"         # "group" | "batch" | "actnorm" | "none" (see the module docstring)
    norm_groups: int = 32       # GroupNorm groups (must divide every normalised width)

    def __post_init__(self):
        if self.norm not in NORMS:
            raise ValueError(f"DiscriminatorConfig.norm must be one of {NORMS}, got {self.norm!r}")
        if self.n_layers < 0:
            raise ValueError(f"DiscriminatorConfig.n_layers must be >= 0, got {self.n_layers}")
        if self.norm == "group":
            for c in self.normalised_widths:
                if c % self.norm_groups:
                    raise ValueError(f"DiscriminatorConfig: width {c} is not divisible by "
                                     f"norm_groups={self.norm_groups} (widths {self.widths})")

    @property
    def widths(self):
        """Output channels of the convs before the final 1-channel one."""
        return tuple(self.ndf * min(2 ** n, 8) for n in range(self.n_layers + 1))

    @property
    def normalised_widths(self):
        """Widths of the normalised convs (all but the first; n_layers=0: the stride-1 one)."""
        return self.widths[1:] if self.n_layers else self.widths

    def min_image_size(self) -> int:
        """Smallest input side that leaves at least one logit."""
        # 4x4 convs with padding 1: stride 1 gives in - 1, stride 2 gives floor(in / 2);
        # one logit needs 2 before the last conv, 3 before the stride-1 block. The first
        # conv has stride 2 even with n_layers=0 (taming builds that too: no middle layers).
        return 3 * 2 ** max(self.n_layers, 1)


def _conv_init(key, shape, dtype=jnp.float32):
    return 0.02 * jax.random.normal(key, shape, dtype)


def _scale_init(key, shape, dtype=jnp.float32):
    return 1.0 + 0.02 * jax.random.normal(key, shape, dtype)


class ActNorm(nn.Module):
    """taming ActNorm (logdet off): ``scale * (x + loc)`` per channel.

    With ``init_from_data`` the layer instead uses loc = -mean, scale = 1 / (std + 1e-6)
    of its input over (B, H, W) (std unbiased, as torch.std) and sows them into the
    ``"actnorm_init"`` collection, which ``actnorm_data_init`` copies into the params.
    """

    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_bhwc: jax.Array, init_from_data: bool = False) -> jax.Array:
        c = x_bhwc.shape[-1]
        loc = self.param("loc", nn.initializers.zeros, (c,), self.param_dtype).astype(jnp.float32)
        scale = self.param("scale", nn.initializers.ones, (c,), self.param_dtype).astype(jnp.float32)
        x32 = x_bhwc.astype(jnp.float32)
        if init_from_data:
            n = x32.shape[0] * x32.shape[1] * x32.shape[2]
            mean = jnp.mean(x32, axis=(0, 1, 2))
            std = jnp.sqrt(jnp.sum(jnp.square(x32 - mean), axis=(0, 1, 2)) / max(n - 1, 1))
            loc, scale = -mean, 1.0 / (std + 1e-6)
            self.sow("actnorm_init", "loc", loc)
            self.sow("actnorm_init", "scale", scale)
        return (scale * (x32 + loc)).astype(self.dtype)


class BatchStatNorm(nn.Module):
    """BatchNorm in training mode (torch BatchNorm2d.train(), eps 1e-5): statistics of the
    current (global) batch over (B, H, W), biased variance; no running averages."""

    epsilon: float = 1e-5
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_bhwc: jax.Array) -> jax.Array:
        c = x_bhwc.shape[-1]
        x32 = x_bhwc.astype(jnp.float32)
        mean = jnp.mean(x32, axis=(0, 1, 2))
        var = jnp.mean(jnp.square(x32 - mean), axis=(0, 1, 2))
        scale = self.param("scale", _scale_init, (c,), self.param_dtype).astype(jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (c,), self.param_dtype).astype(jnp.float32)
        return ((x32 - mean) * jax.lax.rsqrt(var + self.epsilon) * scale + bias).astype(self.dtype)


class NLayerDiscriminator(nn.Module):
    """``apply({"params": p}, x_bhwc) -> logits (B, h, w, 1)`` (float32), images in [-1, 1]."""

    config: DiscriminatorConfig = DiscriminatorConfig()
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_bhwc: jax.Array, init_from_data: bool = False) -> jax.Array:
        cfg = self.config
        if x_bhwc.ndim != 4 or x_bhwc.shape[-1] != cfg.in_channels:
            raise ValueError(f"NLayerDiscriminator: expected images (B, H, W, {cfg.in_channels}) (NHWC), "
                             f"got {tuple(x_bhwc.shape)}")
        if min(x_bhwc.shape[1:3]) < cfg.min_image_size():
            raise ValueError(f"NLayerDiscriminator: {x_bhwc.shape[1]}x{x_bhwc.shape[2]} images are too small for "
                             f"n_layers={cfg.n_layers} (need at least {cfg.min_image_size()})")
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        use_bias = cfg.norm != "batch"  # taming: no conv bias before BatchNorm
        pad = ((1, 1), (1, 1))
        index = 0

        def conv(h, features, stride, bias=True):
            nonlocal index
            out = nn.Conv(features, (4, 4), strides=(stride, stride), padding=pad, use_bias=bias,
                          kernel_init=_conv_init, name=f"main_{index}", **kw)(h)
            index += 1
            return out

        def norm(h):
            nonlocal index
            name = f"main_{index}"
            if cfg.norm == "group":
                h = GroupNorm(cfg.norm_groups, 1e-5, name=name, **kw)(h)
            elif cfg.norm == "batch":
                h = BatchStatNorm(name=name, **kw)(h)
            elif cfg.norm == "actnorm":
                h = ActNorm(name=name, **kw)(h, init_from_data)
            if cfg.norm != "none":
                index += 1
            return h

        def act(h):
            nonlocal index
            index += 1  # LeakyReLU occupies a Sequential slot in taming
            return nn.leaky_relu(h, 0.2)

        widths = cfg.widths
        h = act(conv(x_bhwc.astype(self.dtype), widths[0], 2))
        for n in range(1, cfg.n_layers):
            h = act(norm(conv(h, widths[n], 2, use_bias)))
        h = act(norm(conv(h, widths[cfg.n_layers], 1, use_bias)))
        return conv(h, 1, 1).astype(jnp.float32)


def actnorm_data_init(module: NLayerDiscriminator, params, x_bhwc: jax.Array) -> Dict[str, Any]:
    """Params with every ActNorm's loc / scale set from the activations of ``x_bhwc``
    (layer by layer, each layer seeing the already-normalised output of the previous
    ones, as taming's first training forward). Other parameters are returned unchanged;
    for other norms this is the identity."""
    if module.config.norm != "actnorm":
        return params
    _, state = module.apply({"params": params}, x_bhwc, True, mutable=["actnorm_init"])
    flat = dict(traverse_util.flatten_dict(jax.tree_util.tree_map(lambda x: x, params)))
    for path, value in traverse_util.flatten_dict(state["actnorm_init"]).items():
        # sow stores a tuple of the values sown; path = (..., layer, "loc"|"scale")
        flat[path] = value[0].astype(flat[path].dtype)
    return traverse_util.unflatten_dict(flat)
