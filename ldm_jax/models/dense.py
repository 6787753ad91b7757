"""``Dense``: ``flax.linen.Dense`` (same parameters, initialisation and forward) whose kernel
gradient on a CPU backend is formed as a plain matmul from an explicitly transposed copy of the
smaller of its two operands.

Why: for ``y = x @ W`` autodiff asks for ``dW = x^T dy``, a matmul contracting the token axis,
the major axis of both operands. XLA:CPU hands such a matmul to Eigen instead of its YNNPACK
kernels and, inside the U-Net's backward, copies ``dy`` transposed first, so that Eigen reads both
operands transposed (the same 4096 x 128 by 4096 x 1024 product, 2 cores under load: 16 ms from a
transposed copy of ``x`` through YNNPACK, 70 ms with both operands transposed through Eigen).
Copying one operand transposed behind an optimization barrier (so that XLA cannot fold the transpose
back into the matmul) makes it a plain matmul. Which one: the one with fewer features, ``x`` (then
``dW = x^T dy``) or ``dy`` (then ``dW = (dy^T x)^T``, a small transpose of the result). For the
feed-forward's output layer (4C -> C at level 0 of the ``cpu`` bench preset: x 4096 x 512, dy
4096 x 128) the transposed copy of ``x`` cost 26-29 ms per call, as XLA recomputed GEGLU's product
into it in transposed order; that of ``dy`` is a quarter of the data and recomputes nothing.
Measured on the ``cpu`` bench preset (U-Net B4 forward + backward, 2 cores, idle, variants
interleaved in one process, medians of 12-14, bench/RESULTS.md): transposing ``x`` always was
0.9-2.7% faster than XLA's own gradient; transposing the smaller operand 2.2-3.6% faster again;
the forward is unchanged. Used by ``layers.Attention`` (the U-Net's and the autoencoders'
attention) and the U-Net's feed-forward and linear projections.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import flax.linen as nn



@jax.custom_vjp
def dense_matmul(x, kernel):
    return jnp.tensordot(x, kernel, axes=1)


def _matmul_fwd(x, kernel):
    return dense_matmul(x, kernel), (x, kernel)


def _matmul_bwd(residuals, dy):
    x, kernel = residuals
    x2 = x.reshape(-1, x.shape[-1])
    dy2 = dy.reshape(-1, dy.shape[-1])
    accumulate = jnp.promote_types(kernel.dtype, jnp.float32)
    if dy2.shape[1] < x2.shape[1]:
        # Fewer output than input features (the feed-forward's net_2: 4C -> C; key / value projections
        # of a wide text context): transpose the smaller dy and form dW^T = dy^T x. The barrier on the
        # product keeps XLA from folding the final (small) transpose back into the matmul.
        dy_t = jax.lax.optimization_barrier(dy2.T)  # (out, tokens), materialised
        dkernel_t = jax.lax.optimization_barrier(jnp.dot(dy_t, x2, preferred_element_type=accumulate))
        dkernel = dkernel_t.T.astype(kernel.dtype)
    else:
        x_t = jax.lax.optimization_barrier(x2.T)  # (in, tokens), materialised
        dkernel = jnp.dot(x_t, dy2, preferred_element_type=accumulate).astype(kernel.dtype)
    dx = jnp.tensordot(dy, kernel.T, axes=1).astype(x.dtype)
    return dx, dkernel


dense_matmul.defvjp(_matmul_fwd, _matmul_bwd)


def matmul(x, kernel):
    """``x @ kernel`` over the last axis of ``x``; on a CPU backend with the kernel gradient above
    (reverse mode only there: ``jax.jvp`` through it raises, as through the matmul convolutions);
    elsewhere XLA's own gradient (GPU / TPU matmul libraries read transposed operands directly)."""
    if jax.default_backend() == "cpu":
        return dense_matmul(x, kernel)
    return jnp.tensordot(x, kernel, axes=1)


class Dense(nn.Dense):
    """``nn.Dense`` whose matmul is ``matmul`` above; parameters, initialisation and forward unchanged."""

    @nn.compact
    def __call__(self, inputs):
        if self.precision is not None or self.dot_general is not None or self.dot_general_cls is not None:
            raise ValueError("Dense: precision / dot_general / dot_general_cls are not supported (use nn.Dense)")
        kernel = self.param("kernel", self.kernel_init, (jnp.shape(inputs)[-1], self.features), self.param_dtype)
        bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype) if self.use_bias else None
        inputs, kernel, bias = nn.dtypes.promote_dtype(inputs, kernel, bias, dtype=self.dtype)
        y = matmul(inputs, kernel)
        return y if bias is None else y + jnp.reshape(bias, (1,) * (y.ndim - 1) + (-1,))
