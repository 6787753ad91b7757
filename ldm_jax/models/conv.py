"""2-D convolution with a selectable gradient implementation (a CPU fast path).

Why: XLA differentiates ``y = conv(x, W)`` into two convolutions. The input
gradient is an ordinary convolution of ``dy`` with the flipped kernel and runs
close to the forward's speed. The kernel gradient

    dW[i, j, c, o] = sum_{b, h, w} x_pad[b, s*h + i, s*w + j, c] * dy[b, h, w, o]

is emitted as a *convolution whose window is the whole feature map* (e.g.
32x32) with the batch (2..16) as the contracted feature dimension and a 3x3
output. XLA:CPU (YNNPACK / Eigen convolution kernels in jaxlib 0.10) runs that
shape 2-5x slower than the forward (4x on the U-Net's 32x32x256 3x3 conv):
with XLA's attention (see ``attention_kernels``), the reason the old
diffusers-Flax U-Net reached only 0.45x PyTorch on forward + backward on CPU.

The same sum is a sum of matrix products, one per kernel tap (i, j):

    dW[i, j] = x_tap(i, j)^T @ dy,   x_tap(i, j)[(b, h, w), c] = x_pad[b, s*h + i, s*w + j, c]

each a (C, B*Ho*Wo) x (B*Ho*Wo, O) matmul whose long contraction (thousands) keeps
the matmul kernel busy (the im2col formulation of Chellapilla et al. 2006,
"High Performance Convolutional Neural Networks for Document Processing",
Sec. 2, split by tap so the 9x im2col copy is never materialised). A 1x1
convolution is a single matmul. Measured on XLA:CPU (jaxlib 0.10.2, one core,
float32): 1.0-2.8x faster than XLA's kernel-gradient convolution on the U-Net's
3x3 shapes and ~5x on its 1x1 shapes (``bench/conv_profile.py``).

Implementations (``impl``):

* ``"xla"``: ``jax.lax.conv_general_dilated`` with XLA's own gradients (the
  reference; the right choice on GPU / TPU).
* ``"matmul"``: the kernel gradient by the per-tap matmuls above; where the
  output has few rows (B*Ho*Wo <= 256 for the forward, <= 1024 for the input
  gradient: the 4x4 / 8x8 / 16x16 levels, where XLA:CPU's convolution kernels
  reach a fraction of matmul speed) also the forward (one im2col matmul) and the
  input gradient (col2im: dy W^T, then each tap's columns added back in place);
  XLA's convolutions elsewhere (``jax.custom_vjp``). Numerically the same sums
  in another order (float32: ~1e-7 relative). Reverse mode only (``jax.jvp``
  through it raises).
* ``"auto"`` (the default of ``UNetConfig.conv_impl`` / ``AutoencoderConfig.conv_impl``
  and of the process): the process default if one was set (``set_conv_impl``,
  ``with conv_impl(...)``), else ``"matmul"`` when the default backend is CPU and
  ``"xla"`` otherwise; decided when the function is traced.

Use ``Conv(...)`` where ``flax.linen.Conv(...)`` was used (it *is* an
``nn.Conv``, with its ``conv_general_dilated`` hook set, so parameter names,
shapes and initialisers are unchanged), or pass
``conv_general_dilated=conv_general_dilated`` to any ``nn.Conv``. The process
default is read at trace time: ``set_conv_impl("xla")`` or
``with conv_impl("xla"): ...`` before a function is first jitted.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

CONV_IMPLS = ("auto", "xla", "matmul")
_default_impl = "auto"

_NHWC = ("NHWC", "HWIO", "NHWC")
Padding = Tuple[Tuple[int, int], Tuple[int, int]]


def set_conv_impl(impl: str) -> None:
    """Set the process-wide default implementation (read when a function is traced)."""
    global _default_impl
    _check_impl(impl)
    _default_impl = impl


def get_conv_impl() -> str:
    return _default_impl


@contextlib.contextmanager
def conv_impl(impl: str):
    """Temporarily use ``impl`` as the default (for code traced inside the block)."""
    previous = _default_impl
    set_conv_impl(impl)
    try:
        yield
    finally:
        set_conv_impl(previous)


def resolve_impl(impl: Optional[str] = None) -> str:
    """The concrete impl ("xla" or "matmul") for ``impl``.

    None and "auto" defer to the process default (``set_conv_impl`` / ``conv_impl``), so a
    model configured with "auto" (the ``UNetConfig`` / ``AutoencoderConfig`` default) can
    be switched for a whole job without touching its config; a process default of "auto"
    means the fastest per backend: "matmul" on CPU, "xla" on GPU / TPU.
    """
    impl = _default_impl if impl is None else impl
    _check_impl(impl)
    if impl == "auto":
        impl = _default_impl
    if impl == "auto":
        return "matmul" if jax.default_backend() == "cpu" else "xla"
    return impl


def _check_impl(impl: str) -> None:
    if impl not in CONV_IMPLS:
        raise ValueError(f"unknown convolution impl {impl!r}; expected one of {CONV_IMPLS}")


# ---------------------------------------------------------------------------
# The reference convolution and its matmul formulations (forward, input and kernel gradients).
# ---------------------------------------------------------------------------


def _lax_conv(x_bhwc, w_hwio, strides, padding, precision=None, preferred_element_type=None):
    return lax.conv_general_dilated(
        x_bhwc, w_hwio, strides, padding, dimension_numbers=_NHWC, precision=precision,
        preferred_element_type=preferred_element_type)


# Below these output-row counts (B * Ho * Wo) XLA:CPU's convolution kernels run far from
# matmul speed (the U-Net's 4x4 and 8x8 levels: 2-5x slower than the same FLOPs as one
# matmul, one core, float32), so the forward and the input gradient switch to matmuls.
FWD_MATMUL_MAX_ROWS = 256
DX_MATMUL_MAX_ROWS = 1024
DW_MATMUL_MIN_FEATURES = 8  # per-tap kernel-gradient matmuls need some output channels to pay off


def _out_hw(x_shape, kernel_hw, strides, padding) -> Tuple[int, int]:
    (kh, kw), (sh, sw), ((pt, pb), (pl, pr)) = kernel_hw, strides, padding
    return (x_shape[1] + pt + pb - kh) // sh + 1, (x_shape[2] + pl + pr - kw) // sw + 1


def _tap(x_pad, i, j, out_hw, strides):
    """x_pad[:, s*h + i, s*w + j, :] for all output positions (h, w): (B, Ho, Wo, C)."""
    (ho, wo), (sh, sw) = out_hw, strides
    b, _, _, c = x_pad.shape
    return lax.slice(x_pad, (0, i, j, 0), (b, i + sh * (ho - 1) + 1, j + sw * (wo - 1) + 1, c), (1, sh, sw, 1))


def conv_forward_matmul(x_bhwc, w_hwio, strides, padding, precision=None) -> jax.Array:
    """The convolution as one im2col matmul: (B*Ho*Wo, kh*kw*C) x (kh*kw*C, O)."""
    kh, kw, c, o = w_hwio.shape
    (pt, pb), (pl, pr) = padding
    out_hw = _out_hw(x_bhwc.shape, (kh, kw), strides, padding)
    x_pad = jnp.pad(x_bhwc, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
    cols = [_tap(x_pad, i, j, out_hw, strides) for i in range(kh) for j in range(kw)]
    cols = cols[0] if len(cols) == 1 else jnp.concatenate(cols, axis=-1)  # (B, Ho, Wo, kh*kw*C)
    y = lax.dot_general(cols, w_hwio.reshape(kh * kw * c, o), (((3,), (0,)), ((), ())), precision=precision,
                        preferred_element_type=jnp.float32)
    return y.astype(jnp.result_type(x_bhwc.dtype, w_hwio.dtype))


def input_grad_matmul(g_bhwo, w_hwio, x_shape, strides, padding, precision=None) -> jax.Array:
    """dL/dx by col2im: dcols = dy (B*Ho*Wo, O) x W^T (O, kh*kw*C), then every tap's
    columns added back at its (strided) input positions."""
    kh, kw, c, o = w_hwio.shape
    (pt, pb), (pl, pr) = padding
    (sh, sw) = strides
    b, ho, wo, _ = g_bhwo.shape
    hp, wp = x_shape[1] + pt + pb, x_shape[2] + pl + pr
    dcols = lax.dot_general(g_bhwo, w_hwio.reshape(kh * kw * c, o), (((3,), (1,)), ((), ())), precision=precision,
                            preferred_element_type=jnp.float32)  # (B, Ho, Wo, kh*kw*C)
    zero = jnp.zeros((), dcols.dtype)
    dx_pad = None
    for i in range(kh):
        for j in range(kw):
            k = i * kw + j
            part = lax.pad(dcols[..., k * c:(k + 1) * c], zero, (
                (0, 0, 0), (i, hp - i - sh * (ho - 1) - 1, sh - 1), (j, wp - j - sw * (wo - 1) - 1, sw - 1), (0, 0, 0)))
            dx_pad = part if dx_pad is None else dx_pad + part
    return dx_pad[:, pt:pt + x_shape[1], pl:pl + x_shape[2], :]


def kernel_grad_matmul(x_bhwc: jax.Array, g_bhwo: jax.Array, kernel_shape: Sequence[int],
                       strides: Tuple[int, int], padding: Padding, precision=None) -> jax.Array:
    """dL/dW (kh, kw, C, O) of ``conv(x, W)`` given dL/dy: one matmul per kernel tap, float32 accumulation."""
    kh, kw, c, o = kernel_shape
    (pt, pb), (pl, pr) = padding
    b, ho, wo, _ = g_bhwo.shape
    if _out_hw(x_bhwc.shape, (kh, kw), strides, padding) != (ho, wo):
        raise ValueError(f"kernel_grad_matmul: x {x_bhwc.shape} and dy {g_bhwo.shape} do not match "
                         f"kernel {tuple(kernel_shape)}, strides {strides}, padding {padding}")
    g_no = g_bhwo.reshape(b * ho * wo, o)
    x_pad = jnp.pad(x_bhwc, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
    taps = []
    for i in range(kh):
        for j in range(kw):
            x_tap = _tap(x_pad, i, j, (ho, wo), strides).reshape(b * ho * wo, c)
            # (C, N) x (N, O): contract the B*Ho*Wo positions.
            taps.append(lax.dot_general(x_tap, g_no, (((0,), (0,)), ((), ())), precision=precision,
                                        preferred_element_type=jnp.float32))
    return jnp.stack(taps).reshape(kh, kw, c, o)


# ---------------------------------------------------------------------------
# "matmul": per-tap matmul kernel gradient; forward and input gradient as matmuls
# where the output is small, XLA's convolutions otherwise.
# ---------------------------------------------------------------------------


def _rows(x_shape, kernel_hw, strides, padding) -> int:
    ho, wo = _out_hw(x_shape, kernel_hw, strides, padding)
    return x_shape[0] * ho * wo


def _pads_past_kernel(kernel_hw, padding) -> bool:
    """Whether a padding exceeds kernel - 1, i.e. XLA's transposed convolution (the input
    gradient) gets a negative padding: XLA:CPU in jaxlib 0.10.2 returns garbage there (e.g. a 2x2
    kernel padded ((2, 0), (2, 0)): values ~1e30 read from uninitialised memory), so those
    input gradients always take the col2im route."""
    return any(p > k - 1 for k, pair in zip(kernel_hw, padding) for p in pair)


def _forward(x_bhwc, w_hwio, strides, padding, precision):
    if _rows(x_bhwc.shape, w_hwio.shape[:2], strides, padding) <= FWD_MATMUL_MAX_ROWS:
        return conv_forward_matmul(x_bhwc, w_hwio, strides, padding, precision)
    return _lax_conv(x_bhwc, w_hwio, strides, padding, precision)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def conv_matmul_grad(x_bhwc, w_hwio, strides, padding, precision=None):
    """A 2-D convolution (NHWC/HWIO) computed and differentiated with the "matmul" rules."""
    return _forward(x_bhwc, w_hwio, strides, padding, precision)


def _matmul_fwd(x_bhwc, w_hwio, strides, padding, precision):
    return _forward(x_bhwc, w_hwio, strides, padding, precision), (x_bhwc, w_hwio)


def _matmul_bwd(strides, padding, precision, residuals, g_bhwo):
    x_bhwc, w_hwio = residuals
    g_bhwo = g_bhwo.astype(x_bhwc.dtype)
    if (_rows(x_bhwc.shape, w_hwio.shape[:2], strides, padding) <= DX_MATMUL_MAX_ROWS
            or _pads_past_kernel(w_hwio.shape[:2], padding)):
        dx = input_grad_matmul(g_bhwo, w_hwio, x_bhwc.shape, strides, padding, precision)
    else:  # XLA's own transpose (a convolution with the flipped kernel)
        _, vjp_x = jax.vjp(lambda x: _lax_conv(x, w_hwio, strides, padding, precision), x_bhwc)
        (dx,) = vjp_x(g_bhwo)
    if w_hwio.shape[3] >= DW_MATMUL_MIN_FEATURES:
        dw = kernel_grad_matmul(x_bhwc, g_bhwo, w_hwio.shape, strides, padding, precision)
    else:  # a handful of output channels (conv_out): per-tap matmuls would be (C, N) x (N, 4)
        _, vjp_w = jax.vjp(lambda w: _lax_conv(x_bhwc, w, strides, padding, precision), w_hwio)
        (dw,) = vjp_w(g_bhwo)
    return dx.astype(x_bhwc.dtype), dw.astype(w_hwio.dtype)


conv_matmul_grad.defvjp(_matmul_fwd, _matmul_bwd)


# ---------------------------------------------------------------------------
# Drop-in for lax.conv_general_dilated (the nn.Conv hook) and for nn.Conv.
# ---------------------------------------------------------------------------


def _as_nhwc(lhs, rhs, dimension_numbers) -> bool:
    """Whether ``dimension_numbers`` describe NHWC / HWIO / NHWC for these 4-D operands."""
    if lhs.ndim != 4 or rhs.ndim != 4 or dimension_numbers is None:
        return False
    want = lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC)
    got = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
    return got == want


def _explicit_padding(padding, lhs, rhs, strides) -> Optional[Padding]:
    if isinstance(padding, str):
        pads = lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], strides, padding)
    else:
        pads = padding
    pads = tuple((int(lo), int(hi)) for lo, hi in pads)
    if len(pads) != 2 or any(p < 0 for pair in pads for p in pair):
        return None
    return pads


def make_conv_general_dilated(impl: Optional[str] = None):
    """A function with ``lax.conv_general_dilated``'s signature that uses ``impl``
    (None: the process default at trace time) when the call is a plain 2-D NHWC
    convolution (no dilation, one group), and ``lax.conv_general_dilated`` otherwise."""
    if impl is not None:
        _check_impl(impl)

    def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                             dimension_numbers=None, feature_group_count=1, batch_group_count=1,
                             precision=None, preferred_element_type=None):
        concrete = resolve_impl(impl)
        strides = tuple(int(s) for s in window_strides)
        plain = (
            concrete == "matmul"
            and _as_nhwc(lhs, rhs, dimension_numbers)
            and all(int(d) == 1 for d in (lhs_dilation or (1, 1)))
            and all(int(d) == 1 for d in (rhs_dilation or (1, 1)))
            and feature_group_count == 1 and batch_group_count == 1
            and preferred_element_type is None
            and len(strides) == 2
        )
        pads = _explicit_padding(padding, lhs, rhs, strides) if plain else None
        if pads is None:
            return lax.conv_general_dilated(
                lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
                dimension_numbers=dimension_numbers, feature_group_count=feature_group_count,
                batch_group_count=batch_group_count, precision=precision,
                preferred_element_type=preferred_element_type)
        return conv_matmul_grad(lhs, rhs, strides, pads, precision)

    conv_general_dilated.__name__ = f"conv_general_dilated_{impl or 'default'}"
    return conv_general_dilated


# One function object per impl, so nn.Conv modules built with it hash and compare equal.
_CONV_FNS = {None: make_conv_general_dilated(None)}
_CONV_FNS.update({name: make_conv_general_dilated(name) for name in CONV_IMPLS})
conv_general_dilated = _CONV_FNS[None]


def Conv(features: int, kernel_size, *args, impl: Optional[str] = None, **kwargs) -> nn.Conv:  # noqa: N802
    """``flax.linen.Conv`` whose convolution follows ``impl`` ("auto", "xla", "matmul";
    None: the process default read at trace time). Same parameters as ``nn.Conv``."""
    if impl is not None:
        _check_impl(impl)
    return nn.Conv(features, kernel_size, *args, conv_general_dilated=_CONV_FNS[impl], **kwargs)


@contextlib.contextmanager
def route_convs(impl: str):
    """Run every ``nn.Conv`` applied inside the block (in any model, wired to ``Conv``
    or not) with ``impl``, by a Flax method interceptor. Like ``conv_impl`` it acts
    at trace time: jit (or re-jit) the function inside the block."""
    _check_impl(impl)
    fn = _CONV_FNS[impl]

    def interceptor(next_fun, args, kwargs, context):
        mod = context.module
        if isinstance(mod, nn.Conv) and context.method_name == "__call__" and mod.conv_general_dilated_cls is None:
            object.__setattr__(mod, "conv_general_dilated", fn)
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(interceptor):
        yield
