"""Vector quantisation for the VQ autoencoder (VQ-VAE / VQGAN).

van den Oord et al. 2017, "Neural Discrete Representation Learning", Eq. 3:

    L = ||sg[z_e] - e||^2 + beta * ||z_e - sg[e]||^2

with the nearest codebook entry ``e`` (squared Euclidean distance) and the
straight-through estimator ``z_q = z_e + sg[e - z_e]`` (Esser et al. 2021,
"Taming Transformers", Eq. 4). taming-transformers / CompVis / diffusers put
``beta`` on the wrong term by default ("legacy"); both forms are provided.

The parameter tree is ``{"embedding": {"embedding": (K, D)}}`` so that the
diffusers key ``quantize.embedding.weight`` maps onto it mechanically.
"""
from __future__ import annotations

from typing import Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct

Dtype = jnp.dtype


@struct.dataclass
class VQEncoding:
    """What ``VQModel.encode`` returns; quacks like a posterior (``mode``/``sample``)."""

    latents: jax.Array    # (B, h, w, D) quantised latents (straight-through form)
    pre_quant: jax.Array  # (B, h, w, D) quant_conv output before quantisation (diffusers' encode().latents)
    indices: jax.Array    # (B, h, w) int32 codebook indices
    loss: jax.Array       # () float32 codebook + commitment loss

    def mode(self) -> jax.Array:
        return self.latents

    def sample(self, rng=None) -> jax.Array:
        del rng  # quantisation is deterministic
        return self.latents


def _uniform_codebook_init(num_embeddings: int):
    """diffusers/taming init: U(-1/K, 1/K)."""
    bound = 1.0 / num_embeddings

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


class VectorQuantizer(nn.Module):
    """Nearest-neighbour codebook lookup with the straight-through estimator.

    ``__call__(z_bhwd) -> (z_q_bhwd, loss, indices_bhw)``. Distances and the
    loss are computed in float32 at full matmul precision whatever ``dtype``
    is, so that index selection does not depend on the compute precision of
    the accelerator's default matmul.
    """

    num_embeddings: int  # K, codebook size
    embed_dim: int       # D, codebook vector size
    beta: float = 0.25   # commitment weight
    legacy: bool = True  # True: taming/CompVis/diffusers' default (beta on the codebook term)
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        self.embedding = nn.Embed(
            self.num_embeddings, self.embed_dim,
            embedding_init=_uniform_codebook_init(self.num_embeddings),
            dtype=jnp.float32, param_dtype=self.param_dtype,
        )

    def codebook(self) -> jax.Array:
        """(K, D) codebook in float32."""
        return jnp.asarray(self.embedding.embedding, jnp.float32)

    def nearest(self, z_bhwd: jax.Array) -> jax.Array:
        """Indices (B, h, w) int32 of the nearest codebook entries (squared L2)."""
        if z_bhwd.shape[-1] != self.embed_dim:
            raise ValueError(
                f"VectorQuantizer: latents have {z_bhwd.shape[-1]} channels, the codebook has "
                f"vectors of size {self.embed_dim} (expected NHWC input)")
        e_kd = self.codebook()
        z_nd = z_bhwd.astype(jnp.float32).reshape(-1, self.embed_dim)
        # ||z - e||^2 = ||z||^2 + ||e||^2 - 2 z.e
        dist_nk = (
            jnp.sum(z_nd ** 2, axis=1, keepdims=True)
            + jnp.sum(e_kd ** 2, axis=1)[None, :]
            - 2.0 * jnp.dot(z_nd, e_kd.T, precision=jax.lax.Precision.HIGHEST)
        )
        return jnp.argmin(dist_nk, axis=1).astype(jnp.int32).reshape(z_bhwd.shape[:-1])

    def lookup(self, indices_bhw: jax.Array) -> jax.Array:
        """Codebook vectors (B, h, w, D) for indices (LDM's ``get_codebook_entry``)."""
        return jnp.take(self.codebook(), indices_bhw, axis=0).astype(self.dtype)

    def __call__(self, z_bhwd: jax.Array) -> Tuple[jax.Array, jax.Array, jax.Array]:
        indices_bhw = self.nearest(z_bhwd)
        z = z_bhwd.astype(jnp.float32)
        e = jnp.take(self.codebook(), indices_bhw, axis=0)  # (B, h, w, D)
        sg = jax.lax.stop_gradient
        # Eq. 3 of van den Oord et al.: codebook term ||sg[z] - e||^2, commitment ||z - sg[e]||^2.
        commitment = jnp.mean(jnp.square(sg(e) - z))
        codebook = jnp.mean(jnp.square(e - sg(z)))
        if self.legacy:
            loss = commitment + self.beta * codebook
        else:
            loss = self.beta * commitment + codebook
        # Straight-through estimator: forward value e, gradient of the identity w.r.t. z.
        z_q = z + sg(e - z)
        return z_q.astype(self.dtype), loss, indices_bhw


def codebook_usage(indices: jax.Array, num_embeddings: int) -> jax.Array:
    """Fraction of the K codebook entries that occur in ``indices`` (any shape)."""
    counts_k = jnp.bincount(indices.reshape(-1), length=num_embeddings)
    return jnp.mean(counts_k > 0)


def codebook_perplexity(indices: jax.Array, num_embeddings: int) -> jax.Array:
    """exp(entropy) of the empirical code distribution, as taming's quantizer reports it.

    Equals k when k codes are used equally often; 1 when a single code is used.
    """
    counts_k = jnp.bincount(indices.reshape(-1), length=num_embeddings).astype(jnp.float32)
    p_k = counts_k / jnp.maximum(jnp.sum(counts_k), 1.0)
    return jnp.exp(-jnp.sum(p_k * jnp.log(p_k + 1e-10)))
