"""The LDM ``SpatialRescaler`` cond stage: resize a conditioning map, then mix its channels.

The CompVis semantic-synthesis models (Rombach et al. 2022, Sec. 4.3.2, the
``semantic_synthesis256`` / landscapes models) condition by concatenation: a
one-hot segmentation map at the image resolution (B, H, W, n_classes) is
shrunk to the latent size by ``n_stages`` calls of
``torch.nn.functional.interpolate(x, scale_factor=multiplier, mode=method)``
(defaults: bilinear, 0.5, ``align_corners`` unset, i.e. False, no antialiasing)
and, with ``out_channels`` set, mapped to ``out_channels`` by a 1x1 convolution
(``channel_mapper``, trained with the U-Net); the result is concatenated to the
latents.

``jax.image.resize`` is not the same function: it antialiases when shrinking
(a wider triangle filter: bilinear x0.5 mixes 4 input pixels per axis where
PyTorch averages 2), PyTorch's "nearest" takes ``floor(dst * scale)`` (not the
pixel centres), its "bicubic" is Keys' kernel with A = -0.75 (not -0.5), and
with ``scale_factor`` the source coordinate uses ``1 / multiplier``, not
in/out. So each interpolation is written here as the (out, in) matrix PyTorch's
CPU kernels apply along one axis (separable: rows, then columns), computed in
numpy at trace time from the static shapes; the ``n_stages`` matrices of an axis
are multiplied into one. "linear" and "trilinear" are accepted by the original
constructor but fail on its 4-D input (they need 3-D / 5-D tensors), so they
are refused here.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax.models.conv import Conv

Dtype = jnp.dtype

METHODS = ("nearest", "bilinear", "bicubic", "area")
_NOT_2D = ("linear", "trilinear")  # in the original's list, but torch refuses them for (B, C, H, W) input


def check_rescaler_options(n_stages, method, multiplier) -> None:
    """ValueError for options the original cannot run on a 2-D map or this module does not implement."""
    if isinstance(n_stages, bool) or not isinstance(n_stages, (int, np.integer)) or n_stages < 0:
        raise ValueError(f"SpatialRescaler n_stages must be an int >= 0, got {n_stages!r}")
    if method in _NOT_2D:
        raise ValueError(f"SpatialRescaler method {method!r} cannot resize a 2-D map (torch.nn.functional."
                         f"interpolate needs {'3-D' if method == 'linear' else '5-D'} input for it); "
                         f"supported: {', '.join(METHODS)}")
    if method not in METHODS:
        raise ValueError(f"SpatialRescaler method {method!r} is not supported (supported: {', '.join(METHODS)})")
    if isinstance(multiplier, bool) or not isinstance(multiplier, (int, float, np.floating, np.integer)) \
            or not multiplier > 0 or not math.isfinite(multiplier):
        raise ValueError(f"SpatialRescaler multiplier must be a positive number, got {multiplier!r}")


def interpolated_size(size: int, multiplier: float) -> int:
    """torch's output size for ``scale_factor``: int(size * multiplier) in double precision."""
    return int(size * float(multiplier))


def rescaled_size(size: int, n_stages: int, multiplier: float) -> int:
    """The side after ``n_stages`` interpolations."""
    for _ in range(n_stages):
        size = interpolated_size(size, multiplier)
    return size


def interpolation_matrix(in_size: int, multiplier: float, method: str) -> np.ndarray:
    """(out, in) float64 weights of one ``F.interpolate(scale_factor=multiplier, mode=method)`` along an axis,
    as PyTorch's CPU kernels compute them (index math in float32 like theirs)."""
    out_size = interpolated_size(in_size, multiplier)
    if out_size < 1:
        raise ValueError(f"SpatialRescaler: a side of {in_size} times {multiplier} leaves no pixels")
    m = np.zeros((out_size, in_size), np.float64)
    rows = np.arange(out_size)
    f32 = np.float32
    scale = f32(1.0 / float(multiplier))  # compute_scales_value: 1 / scale_factor (not in / out)
    if method == "area":  # adaptive_avg_pool2d to the output size: [floor(o*in/out), ceil((o+1)*in/out))
        for o in rows:
            start, end = (o * in_size) // out_size, -((-(o + 1) * in_size) // out_size)
            m[o, start:end] = 1.0 / (end - start)
        return m
    if method == "nearest":  # nearest_idx: copies for out == in and out == 2 in, else floor(dst * scale)
        if out_size == in_size:
            src = rows
        elif out_size == 2 * in_size:
            src = rows >> 1
        else:
            src = np.minimum(np.floor(rows.astype(f32) * scale).astype(np.int64), in_size - 1)
        m[rows, src] = 1.0
        return m
    # Half-pixel source coordinate (align_corners=False): scale * (dst + 0.5) - 0.5.
    real = scale * (rows.astype(f32) + f32(0.5)) - f32(0.5)
    if method == "bilinear":  # compute_source_index_and_lambda (clamped at 0 for linear modes)
        if out_size == in_size:
            return np.eye(in_size)
        real = np.maximum(real, f32(0))
        i0 = np.minimum(np.floor(real).astype(np.int64), in_size - 1)
        lam1 = np.clip(real - i0.astype(f32), f32(0), f32(1))
        i1 = i0 + (i0 < in_size - 1)
        np.add.at(m, (rows, i0), (f32(1) - lam1).astype(np.float64))
        np.add.at(m, (rows, i1), lam1.astype(np.float64))
        return m
    # bicubic: Keys' cubic convolution with A = -0.75 on taps i-1..i+2, indices clamped to the border.
    i = np.floor(real).astype(np.int64)
    t = real - i.astype(f32)
    a = f32(-0.75)

    def near(x):  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x):  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    coeffs = (far(t + f32(1)), near(t), near(f32(1) - t), far(f32(2) - t))
    for k, c in enumerate(coeffs):
        np.add.at(m, (rows, np.clip(i - 1 + k, 0, in_size - 1)), c.astype(np.float64))
    return m


def rescale_matrix(in_size: int, n_stages: int, multiplier: float, method: str) -> np.ndarray:
    """The ``n_stages`` interpolations along one axis as one (out, in) matrix."""
    m = np.eye(in_size)
    for _ in range(n_stages):
        m = interpolation_matrix(m.shape[0], multiplier, method) @ m
    return m


class SpatialRescaler(nn.Module):
    """``apply({"params": p}, x_bhwc)`` -> (B, h, w, out_channels or in_channels).

    Parameters (only with ``out_channels``): ``{"channel_mapper": {"kernel": (1, 1, in, out)[, "bias"]}}``,
    the CompVis keys ``cond_stage_model.channel_mapper.weight`` / ``.bias``.
    """

    n_stages: int = 1
    method: str = "bilinear"
    multiplier: float = 0.5
    in_channels: int = 3
    out_channels: Optional[int] = None  # None: no channel mapper, the resized map itself
    bias: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @property
    def features(self) -> int:
        """Channels of the output (those concatenated to the latents)."""
        return int(self.in_channels if self.out_channels is None else self.out_channels)

    def output_size(self, height: int, width: int) -> Tuple[int, int]:
        """(h, w) of the output for an (H, W) input."""
        out = (rescaled_size(height, self.n_stages, self.multiplier),
               rescaled_size(width, self.n_stages, self.multiplier))
        if min(out) < 1:
            raise ValueError(f"SpatialRescaler: a {height}x{width} map leaves no pixels after {self.n_stages} "
                             f"interpolations by {self.multiplier}")
        return out

    @nn.compact
    def __call__(self, x_bhwc: jax.Array) -> jax.Array:
        check_rescaler_options(self.n_stages, self.method, self.multiplier)
        if x_bhwc.ndim != 4 or x_bhwc.shape[-1] != self.in_channels:
            raise ValueError(f"SpatialRescaler takes (B, H, W, {self.in_channels}), got {tuple(x_bhwc.shape)}")
        _, h, w, _ = x_bhwc.shape
        rh = jnp.asarray(rescale_matrix(h, self.n_stages, self.multiplier, self.method), jnp.float32)
        rw = jnp.asarray(rescale_matrix(w, self.n_stages, self.multiplier, self.method), jnp.float32)
        x = x_bhwc.astype(jnp.float32)
        # HIGHEST: the weights are exact averages; TF32 / bf16 passes would blur one-hot maps by ~1e-3.
        x = jnp.einsum("oh,bhwc->bowc", rh, x, precision=jax.lax.Precision.HIGHEST)
        x = jnp.einsum("pw,bowc->bopc", rw, x, precision=jax.lax.Precision.HIGHEST)
        if self.out_channels is None:
            return x.astype(self.dtype)
        return Conv(int(self.out_channels), (1, 1), use_bias=self.bias, dtype=self.dtype,
                    param_dtype=self.param_dtype, name="channel_mapper")(x.astype(self.dtype))


def prepare_segmentation(segmentation, num_classes: int) -> np.ndarray:
    """The rescaler's input (B, H, W, num_classes) float32 from what a user has at hand.

    * integer (H, W) or (B, H, W): class indices, one-hot encoded (``np.eye(num_classes)[labels]``,
      as the LDM segmentation data sets build their ``segmentation`` input); -1 marks a pixel of no
      class (an all-zero vector, as training encodes ``data.ignore_label`` pixels);
    * (B, H, W, C) of any dtype, or float (H, W, C): the map itself (one-hot or class
      probabilities), C must be ``num_classes``;
    * a path: ``.npy`` holding either of the above, or a single-channel image (PNG "L" / "P" /
      "I"; a palette PNG gives its indices) whose pixel values are class indices; or a PIL image.
    """
    arr = segmentation
    if isinstance(arr, (str, bytes)) or hasattr(arr, "__fspath__"):
        path = str(arr if not isinstance(arr, bytes) else arr.decode())
        if path.lower().endswith(".npy"):
            arr = np.load(path, allow_pickle=False)
        else:
            from PIL import Image

            with Image.open(path) as image:
                image.load()
                arr = image
    if hasattr(arr, "getbands"):  # PIL image: a label map
        if len(arr.getbands()) != 1:
            raise ValueError(f"a segmentation image must be single-channel (mode L, P or I) holding class indices, "
                             f"got mode {arr.mode!r}")
        arr = np.asarray(arr).astype(np.int64)
    arr = np.asarray(arr)
    if np.issubdtype(arr.dtype, np.integer) and arr.ndim in (2, 3):
        labels = arr[None] if arr.ndim == 2 else arr
        if labels.size and (labels.min() < -1 or labels.max() >= num_classes):
            raise ValueError(f"segmentation labels must be class indices in [0, {num_classes}) (the "
                             f"SpatialRescaler's in_channels) or -1 for no class, got values in "
                             f"[{labels.min()}, {labels.max()}]")
        # (not np.eye(n)[labels]: its row -1 is the last class)
        return (labels[..., None] == np.arange(num_classes)).astype(np.float32)
    if arr.ndim == 3 and np.issubdtype(arr.dtype, np.floating):
        arr = arr[None]
    if arr.ndim != 4 or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool):
        raise ValueError(f"segmentation must be a map (B, H, W, {num_classes}) / (H, W, {num_classes}) or integer "
                         f"class indices (B, H, W) / (H, W), got {arr.dtype} of shape {arr.shape}")
    if arr.shape[-1] != num_classes:
        raise ValueError(f"segmentation has {arr.shape[-1]} channels but the SpatialRescaler takes "
                         f"in_channels={num_classes} (one per class); pass (B, H, W, {num_classes}) or integer "
                         "class indices (B, H, W)")
    return arr.astype(np.float32)
