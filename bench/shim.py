"""Until ``layers.dot_product_attention`` dispatches to ``ldm_jax.models.attention_kernels``
(the wiring proposed in the fast-path report), route the non-"xla" attention impls there
for the benchmark process. A no-op once layers.py knows the impl."""
from __future__ import annotations

from ldm_jax.models import layers


def ensure_attention_impl(impl: str) -> None:
    if impl in layers.ATTENTION_IMPLS and impl != "dot_product":
        return
    if getattr(layers.dot_product_attention, "_bench_shim", False):
        return
    if "blocked" in layers.ATTENTION_IMPLS:  # wired already
        return
    from ldm_jax.models import attention_kernels

    original = layers.dot_product_attention

    def dot_product_attention(q_bthd, k_bshd, v_bshd, *, impl="xla", causal=False):
        if impl == "xla":
            return original(q_bthd, k_bshd, v_bshd, impl="xla", causal=causal)
        return attention_kernels.attention(q_bthd, k_bshd, v_bshd, impl=impl, causal=causal)

    dot_product_attention._bench_shim = True
    layers.dot_product_attention = dot_product_attention
