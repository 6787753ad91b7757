"""The denoiser a sampler calls: the U-Net wrapped with classifier-free guidance.

Classifier-free guidance (Ho & Salimans 2022, Eq. 6):
    eps = eps(x, t, uncond) + s * (eps(x, t, cond) - eps(x, t, uncond)),
computed in one U-Net call on the batch [uncond; cond] and split afterwards
(the order diffusers uses, so results match it bit for bit in float32 up to
rounding). The guidance scale ``s`` is a traced value. The same combination is
applied to v-predictions, as diffusers does.
"""
from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp

# apply_unet(x_bhwc, t_b, context_btd or None, class_labels_b or None) -> (B, h, w, C)
UNetFn = Callable[[jax.Array, jax.Array, Optional[jax.Array], Optional[jax.Array]], jax.Array]


def guided_denoiser(
    apply_unet: UNetFn,
    context: Optional[jax.Array],
    uncond_context: Optional[jax.Array],
    class_labels: Optional[jax.Array] = None,
    uncond_class_labels: Optional[jax.Array] = None,
    *,
    guidance_scale: jax.Array,
    extra_channels: Optional[jax.Array] = None,
) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """``model_fn(x_bhwc, t_b)`` for the samplers.

    Guidance is on when an unconditional context or unconditional labels are given.
    ``extra_channels`` (B, h, w, k) are concatenated to the input channels after
    the sampler's scaling (the inpainting U-Net's mask and masked-image latents).
    """
    use_cfg = uncond_context is not None or uncond_class_labels is not None

    def model_fn(x_bhwc: jax.Array, t_b: jax.Array) -> jax.Array:
        x_in = x_bhwc if extra_channels is None else jnp.concatenate(
            [x_bhwc, extra_channels.astype(x_bhwc.dtype)], axis=-1)
        if not use_cfg:
            return apply_unet(x_in, t_b, context, class_labels).astype(jnp.float32)
        both = lambda u, c: None if c is None else jnp.concatenate([u if u is not None else c, c])  # noqa: E731
        out = apply_unet(
            jnp.concatenate([x_in, x_in]), jnp.concatenate([t_b, t_b]),
            both(uncond_context, context), both(uncond_class_labels, class_labels),
        ).astype(jnp.float32)
        out_uncond, out_cond = jnp.split(out, 2)
        return out_uncond + guidance_scale * (out_cond - out_uncond)

    return model_fn
