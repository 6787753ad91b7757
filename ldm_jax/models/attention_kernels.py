"""Fused attention kernels behind ``attention_impl`` (GPU cuDNN flash attention, TPU splash).

All take and return the layout of ``layers.dot_product_attention``:
q (B, T, N, H), k / v (B, S, N, H) -> (B, T, N, H), i.e. jax's "BTNH".

* ``"cudnn"`` (strict: raises where it cannot run; ``attention_impl="dot_product"``
  uses it when possible and XLA otherwise):
  ``jax.nn.dot_product_attention(..., implementation="cudnn")``, cuDNN's flash
  attention (Dao et al. 2022, "FlashAttention", Alg. 1). In jax <= 0.11 the
  default ``implementation=None`` is *always* the XLA composition ("defaults to
  XLA for now" in jax/_src/nn/functions.py), so asking for cuDNN explicitly is
  what makes it run. cuDNN needs a CUDA GPU, bf16/fp16 q/k/v and a head dim that
  is a multiple of 8 and <= 128 (<= 256 from Hopper, sm_90, on). SD1.5's head dims
  are 40 / 80 / 160: all three qualify on H100/H200; on A100 the 160 level falls
  back to XLA. float32 always falls back to XLA. Odd sequence lengths (CLIP's 77
  tokens) are padded to even ones with a padding mask (``even_length_attention``),
  which jax's cuDNN route needs when the attention is differentiated.
* ``"splash"``: Pallas splash attention for TPU
  (``jax.experimental.pallas.ops.tpu.splash_attention``), one kernel per head
  group, vmapped over the batch. Sequences are padded to the 128-lane block
  and padded keys masked with segment ids. On CPU it only runs in Pallas
  interpret mode (``interpret=True``), which the tests use; elsewhere than TPU
  it raises unless interpret mode is requested.
"""
from __future__ import annotations

import functools
import math
from typing import Optional, Tuple

import jax
import jax.numpy as jnp

_CUDNN_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
SPLASH_BLOCK = 128  # splash's block_q / block_kv must be multiples of the 128 TPU lanes


# ---------------------------------------------------------------------------
# cuDNN flash attention (GPU).
# ---------------------------------------------------------------------------


def cudnn_flash_supported(dtype, head_dim: int, platform: str, compute_capability: Optional[str]) -> Tuple[bool, str]:
    """Whether cuDNN flash attention takes these inputs (jax's own checks, stated statically)."""
    if platform != "gpu":
        return False, f"platform {platform!r} is not a CUDA GPU"
    if jnp.dtype(dtype) not in _CUDNN_DTYPES:
        return False, f"dtype {jnp.dtype(dtype).name} (cuDNN flash attention needs bfloat16 or float16)"
    cc = tuple(int(v) for v in (compute_capability or "0.0").split("."))
    if cc < (8, 0):
        return False, f"compute capability {compute_capability} < 8.0"
    h_max = 256 if cc >= (9, 0) else 128
    if head_dim % 8 or head_dim > h_max:
        return False, f"head dim {head_dim} (needs a multiple of 8, <= {h_max} on sm_{cc[0]}{cc[1]})"
    return True, ""


def _device_info() -> Tuple[str, Optional[str]]:
    dev = jax.devices()[0]
    platform = dev.platform
    if platform == "gpu" and "cuda" not in getattr(dev.client, "platform_version", "cuda").lower():
        platform = "rocm"
    return platform, getattr(dev, "compute_capability", None)


def fused_dot_product_attention(q_btnh, k_bsnh, v_bsnh, *, scale: float, causal: bool = False,
                                require_cudnn: bool = False):
    """cuDNN flash attention where it applies, else ``jax.nn.dot_product_attention``'s XLA
    path (with ``require_cudnn``: raise instead, naming the unmet condition)."""
    platform, cc = _device_info()
    ok, why = cudnn_flash_supported(q_btnh.dtype, q_btnh.shape[-1], platform, cc)
    if ok and not k_bsnh.dtype == q_btnh.dtype == v_bsnh.dtype:
        ok, why = False, "q, k and v dtypes differ"
    if ok:
        try:
            return even_length_attention(q_btnh, k_bsnh, v_bsnh, scale=scale, causal=causal, implementation="cudnn")
        except (NotImplementedError, RuntimeError, ValueError) as e:
            ok, why = False, f"{type(e).__name__}: {e}"  # a constraint not checked above (cuDNN version, ...)
    if require_cudnn:
        raise NotImplementedError(f"attention_impl='cudnn' cannot run here: {why}")
    return jax.nn.dot_product_attention(q_btnh, k_bsnh, v_bsnh, scale=scale, is_causal=causal)


def even_length_attention(q_btnh, k_bsnh, v_bsnh, *, scale: float, causal: bool = False,
                          implementation: Optional[str] = "cudnn"):
    """``jax.nn.dot_product_attention`` with odd sequence lengths padded to even ones.

    jax's cuDNN check refuses odd query / key lengths when the attention is differentiated
    ("Unsupported sequence length Q 4096, KV 77": in jax <= 0.11 its training path counts
    the empty bias placeholder as a bias), so SD's 77-token cross-attention fell back to XLA
    in training. An odd key length gets one zero key, hidden by the kernel's own padding mask
    (``key_value_seq_lengths``: cuDNN's PADDING mask, no bias tensor), so each query attends to
    exactly its keys; an odd query length gets one zero query row, sliced off the output (its
    cotangent is zero, so it adds nothing to any gradient). Causal masks are unchanged: the
    padded query and key are the last ones. ``implementation=None`` runs the same padding on
    XLA (the tests check it against the unpadded attention on CPU)."""
    b, t, s = q_btnh.shape[0], q_btnh.shape[1], k_bsnh.shape[1]
    kv_lengths = None
    if s % 2:
        pad = ((0, 0), (0, 1), (0, 0), (0, 0))
        k_bsnh, v_bsnh = jnp.pad(k_bsnh, pad), jnp.pad(v_bsnh, pad)
        kv_lengths = jnp.full((b,), s, jnp.int32)
    if t % 2:
        q_btnh = jnp.pad(q_btnh, ((0, 0), (0, 1), (0, 0), (0, 0)))
    out = jax.nn.dot_product_attention(q_btnh, k_bsnh, v_bsnh, scale=scale, is_causal=causal,
                                       key_value_seq_lengths=kv_lengths, implementation=implementation)
    return out[:, :t]


# ---------------------------------------------------------------------------
# Splash attention (TPU; Pallas interpret mode elsewhere).
# ---------------------------------------------------------------------------


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


@functools.lru_cache(maxsize=64)
def _splash_kernel(heads: int, t_pad: int, s_pad: int, causal: bool, interpret: bool):
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    base = sa.CausalMask((t_pad, s_pad)) if causal else sa.FullMask((t_pad, s_pad))
    mask = sa.MultiHeadMask([base] * heads)
    return sa.make_splash_mha(mask, head_shards=1, q_seq_shards=1, interpret=interpret), sa.SegmentIds


def splash_attention(q_btnh, k_bsnh, v_bsnh, *, scale: float, causal: bool = False,
                     interpret: Optional[bool] = None):
    """Splash attention with the BTNH layout; ``interpret`` defaults to "not on TPU"
    only when ``LDM_JAX_SPLASH_INTERPRET=1`` (tests), else non-TPU backends raise."""
    import os

    platform = jax.devices()[0].platform
    if interpret is None:
        interpret = platform != "tpu" and os.environ.get("LDM_JAX_SPLASH_INTERPRET") == "1"
    if platform != "tpu" and not interpret:
        raise NotImplementedError(
            "attention_impl='splash' is a TPU kernel (Pallas splash attention); on "
            f"{platform} use 'xla' or 'dot_product' (or set LDM_JAX_SPLASH_INTERPRET=1 to interpret it, slowly)")
    b, t, n, h = q_btnh.shape
    s = k_bsnh.shape[1]
    if causal and s != t:
        raise ValueError(f"splash causal attention needs equal query and key lengths, got {t} and {s}")
    t_pad, s_pad = _round_up(t, SPLASH_BLOCK), _round_up(s, SPLASH_BLOCK)
    kernel, segment_ids = _splash_kernel(n, t_pad, s_pad, causal, bool(interpret))

    # Pre-scale q (splash computes q k^T unscaled); (B, T, N, H) -> (B, N, T_pad, H).
    q = (q_btnh.astype(jnp.float32) * scale).astype(q_btnh.dtype)
    to_bnth = lambda a, length: jnp.pad(  # noqa: E731
        a.transpose(0, 2, 1, 3), ((0, 0), (0, 0), (0, length - a.shape[1]), (0, 0)))
    q, k, v = to_bnth(q, t_pad), to_bnth(k_bsnh, s_pad), to_bnth(v_bsnh, s_pad)
    # Padded keys get segment 1 and are never attended to; every query (padded ones too,
    # whose rows are dropped) is segment 0, so no row is fully masked.
    seg = segment_ids(q=jnp.zeros((t_pad,), jnp.int32), kv=(jnp.arange(s_pad) >= s).astype(jnp.int32))
    out_bnth = jax.vmap(lambda q1, k1, v1: kernel(q1, k1, v1, segment_ids=seg))(q, k, v)
    return out_bnth[:, :, :t].transpose(0, 2, 1, 3).astype(q_btnh.dtype)


# ---------------------------------------------------------------------------
# Blocked attention with a recomputing backward (CPU).
# ---------------------------------------------------------------------------
#
# FlashAttention's schedule (Dao et al. 2022, Alg. 1 forward / Alg. 2 backward;
# the dK/dV/dQ form of Dao 2023, FlashAttention-2, Alg. 2) written in XLA ops:
# queries are cut into blocks small enough that one block's (tq, S) score matrix
# stays in the CPU cache; each block computes its scores, row max, exp and row sum
# and the output directly (keys are not split: the U-Net's S <= 4096 fits a
# block row), keeping only the log-sum-exp per query. The backward recomputes
# each block's probabilities from the log-sum-exp,
#     P = exp(S - lse),  dV += P^T dO,  dP = dO V^T,  dS = P * (dP - rowsum(dO * O)),
#     dQ = dS K * scale,  dK += dS^T Q * scale,
# instead of storing the (T, S) probabilities of every layer: less memory traffic
# (XLA:CPU otherwise runs the softmax and its gradient over the whole
# (B, N, T, S) tensor, out of cache) and O(T) instead of O(T*S) saved memory.

# Scores per block: 1M float32 = 4 MiB (two cores' L2 on the benchmark Xeon; the rest of the
# block stays in L3). Measured on the cpu preset's attention shapes (2 cores, jax 0.10.2): 2^20
# beat 2^18 (1 MiB) and 2^19 at every self-attention shape, e.g. 32x32 tokens, 8 heads of 16,
# B2 forward 13.6 -> 12.9 ms, B4 forward + backward 101.6 -> 84.2 ms; the U-Net B2 forward
# 236 -> 231 ms and the B4 train step 1819 -> 1728 ms.
BLOCK_ELEMS = 1 << 20


def _largest_divisor_at_most(n: int, cap: int) -> int:
    cap = max(1, min(n, cap))
    for d in range(cap, 0, -1):
        if n % d == 0:
            return d
    return 1


def _plan(units: int, t: int, s: int, block_elems: int) -> Tuple[int, int]:
    """(queries per block, (batch*head) units per block) with about ``block_elems`` scores."""
    tq = _largest_divisor_at_most(t, max(1, block_elems // s))
    per = _largest_divisor_at_most(units * (t // tq), max(1, block_elems // (tq * s)))
    return tq, per


def _blocked_inputs(q_bthd, k_bshd, v_bshd, tq: int, per: int):
    """(n_iter, per, tq, D) query blocks, their (n_iter, per) key/value row indices into the
    (B*N, S, D) keys / values (shared by the nq query blocks of a (b, n): fetched per
    block inside the loop rather than broadcast nq times in memory), and positions."""
    b, t, n, d = q_bthd.shape
    s = k_bshd.shape[1]
    nq = t // tq
    q_u = q_bthd.transpose(0, 2, 1, 3).reshape(b * n * nq, tq, d)  # unit = (b, n, query block)
    kv = lambda a: a.transpose(0, 2, 1, 3).reshape(b * n, s, d)  # noqa: E731
    kv_index = jnp.arange(b * n * nq, dtype=jnp.int32) // nq
    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32).reshape(1, nq, tq), (b * n, nq, tq)).reshape(-1, tq)
    group = lambda a: a.reshape((a.shape[0] // per, per) + a.shape[1:])  # noqa: E731
    return group(q_u), kv(k_bshd), kv(v_bshd), group(kv_index), group(pos)


def _fetch(a_nsd, idx_u, nq: int):
    """Rows ``idx_u`` (per,) of ``a_nsd``: a slice where they are consecutive or one row repeated."""
    per = idx_u.shape[0]
    if nq == 1:  # units are whole (b, n) rows: consecutive
        return jax.lax.dynamic_slice_in_dim(a_nsd, idx_u[0], per, axis=0)
    if per == 1:
        return jax.lax.dynamic_slice_in_dim(a_nsd, idx_u[0], 1, axis=0)
    return jnp.take(a_nsd, idx_u, axis=0)


def _scores(q_utd, k_usd, pos_ut, scale, causal):
    s = jnp.einsum("utd,usd->uts", q_utd, k_usd, preferred_element_type=jnp.float32) * scale
    if causal:
        keep = jnp.arange(k_usd.shape[1], dtype=jnp.int32)[None, None, :] <= pos_ut[:, :, None]
        s = jnp.where(keep, s, -jnp.inf)
    return s


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _blocked(q_bthd, k_bshd, v_bshd, scale, causal, block_elems):
    return _blocked_fwd(q_bthd, k_bshd, v_bshd, scale, causal, block_elems)[0]


def _blocked_fwd(q_bthd, k_bshd, v_bshd, scale, causal, block_elems):
    b, t, n, d = q_bthd.shape
    s = k_bshd.shape[1]
    tq, per = _plan(b * n, t, s, block_elems)
    nq = t // tq
    qs, k_all, v_all, kv_idx, pos = _blocked_inputs(q_bthd, k_bshd, v_bshd, tq, per)

    def block(args):
        q_utd, idx_u, pos_ut = args
        k_usd, v_usd = _fetch(k_all, idx_u, nq), _fetch(v_all, idx_u, nq)
        scores = _scores(q_utd, k_usd, pos_ut, scale, causal)  # (U, tq, S) float32
        m = jnp.max(scores, axis=-1, keepdims=True)
        p = jnp.exp(scores - m)
        l = jnp.sum(p, axis=-1, keepdims=True)
        o = jnp.einsum("uts,usd->utd", p.astype(v_usd.dtype), v_usd, preferred_element_type=jnp.float32) / l
        return o.astype(q_bthd.dtype), (m + jnp.log(l))[..., 0]

    o, lse = jax.lax.map(block, (qs, kv_idx, pos))
    o_bthd = o.reshape(b, n, t, d).transpose(0, 2, 1, 3)
    return o_bthd, (q_bthd, k_bshd, v_bshd, o_bthd, lse)


def _blocked_bwd(scale, causal, block_elems, residuals, do_bthd):
    q_bthd, k_bshd, v_bshd, o_bthd, lse = residuals
    b, t, n, d = q_bthd.shape
    s = k_bshd.shape[1]
    tq, per = _plan(b * n, t, s, block_elems)
    nq = t // tq
    qs, k_all, v_all, kv_idx, pos = _blocked_inputs(q_bthd, k_bshd, v_bshd, tq, per)
    delta = jnp.sum(do_bthd.astype(jnp.float32) * o_bthd.astype(jnp.float32), axis=-1)  # (B, T, N)
    as_units = lambda a: a.transpose(0, 2, 1, 3).reshape(b * n * nq, tq, d)  # noqa: E731
    dos = as_units(do_bthd).reshape(qs.shape)
    deltas = delta.transpose(0, 2, 1).reshape(lse.shape)

    def block(args):
        q_utd, idx_u, pos_ut, do_utd, lse_ut, delta_ut = args
        k_usd, v_usd = _fetch(k_all, idx_u, nq), _fetch(v_all, idx_u, nq)
        p = jnp.exp(_scores(q_utd, k_usd, pos_ut, scale, causal) - lse_ut[..., None])  # (U, tq, S)
        # dV and dK are formed transposed, (U, D, S) = dO^T P: the (tq, S) matrix is then
        # the plain right-hand operand of the matmul (contracting its major axis), which
        # XLA:CPU runs several times faster than P^T dO with P as a transposed left operand.
        dv_uds = jnp.einsum("utd,uts->uds", do_utd, p.astype(do_utd.dtype), preferred_element_type=jnp.float32)
        dp = jnp.einsum("utd,usd->uts", do_utd, v_usd, preferred_element_type=jnp.float32)
        ds = p * (dp - delta_ut[..., None]) * scale
        dq = jnp.einsum("uts,usd->utd", ds.astype(k_usd.dtype), k_usd, preferred_element_type=jnp.float32)
        dk_uds = jnp.einsum("utd,uts->uds", q_utd, ds.astype(q_utd.dtype), preferred_element_type=jnp.float32)
        return dq, dk_uds, dv_uds

    dq, dk, dv = jax.lax.map(block, (qs, kv_idx, pos, dos, lse, deltas))
    dq_bthd = dq.reshape(b, n, t, d).transpose(0, 2, 1, 3).astype(q_bthd.dtype)
    # Keys / values were shared by the nq query blocks of each (b, n): sum their parts.
    def fold(g_uds, like):
        return g_uds.reshape(b, n, nq, d, s).sum(axis=2).transpose(0, 3, 1, 2).astype(like.dtype)

    return dq_bthd, fold(dk, k_bshd), fold(dv, v_bshd)


_blocked.defvjp(_blocked_fwd, _blocked_bwd)


def blocked_attention(q_btnh, k_bsnh, v_bsnh, *, scale: float, causal: bool = False,
                      block_elems: int = BLOCK_ELEMS):
    """softmax(q k^T * scale) v, query-blocked, with the recomputing backward above."""
    if causal and q_btnh.shape[1] != k_bsnh.shape[1]:
        raise ValueError(f"causal attention needs equal query and key lengths, got {q_btnh.shape[1]}, "
                         f"{k_bsnh.shape[1]}")
    return _blocked(q_btnh, k_bsnh, v_bsnh, float(scale), bool(causal), int(block_elems))


FUSED_IMPLS = ("dot_product", "cudnn", "splash", "blocked")


def attention(q_btnh, k_bsnh, v_bsnh, *, impl: str, scale: Optional[float] = None, causal: bool = False):
    """Dispatch for the fast implementations:

    * "dot_product": the fast path of the current backend -- cuDNN flash attention on
      a CUDA GPU where it applies, ``blocked`` on CPU, ``jax.nn.dot_product_attention``
      (XLA) otherwise;
    * "cudnn" (GPU only, raises elsewhere), "splash" (TPU), "blocked" (any backend).
    """
    scale = 1.0 / math.sqrt(q_btnh.shape[-1]) if scale is None else scale
    if impl == "dot_product" and jax.devices()[0].platform == "cpu":
        impl = "blocked"
    if impl in ("dot_product", "cudnn"):
        return fused_dot_product_attention(q_btnh, k_bsnh, v_bsnh, scale=scale, causal=causal,
                                           require_cudnn=impl == "cudnn")
    if impl == "splash":
        return splash_attention(q_btnh, k_bsnh, v_bsnh, scale=scale, causal=causal)
    if impl == "blocked":
        return blocked_attention(q_btnh, k_bsnh, v_bsnh, scale=scale, causal=causal)
    raise ValueError(f"unknown fused attention impl {impl!r}")
