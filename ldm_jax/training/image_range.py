"""The value range of training images: batches carry uint8 [0, 255] (or float already in
[-1, 1]); the models (first stage, concatenated low-res images) take float32 [-1, 1]."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def images_to_float(image_bhwc: jax.Array) -> jax.Array:
    """uint8 [0, 255] -> float32 [-1, 1]; float input is taken as already in [-1, 1]."""
    if image_bhwc.dtype == jnp.uint8:
        return image_bhwc.astype(jnp.float32) / 127.5 - 1.0
    return image_bhwc.astype(jnp.float32)
