"""Fast paths against their reference paths (float32 unless stated).

* ``ldm_jax.models.conv``: the "matmul" convolution (im2col-matmul kernel
  gradient) against ``lax.conv_general_dilated`` with XLA's own gradients, per
  convolution and through a U-Net (forward and every parameter gradient);
  (``UNetConfig.conv_impl`` / ``AutoencoderConfig.conv_impl``; the "auto" default);
* ``ldm_jax.models.attention_kernels`` as ``layers.dot_product_attention`` dispatches
  it: blocked attention (what attention_impl="dot_product" is on CPU), cuDNN support
  rules, TPU splash attention in Pallas interpret mode, each against the "xla"
  attention, and attention_impl="dot_product" against "xla" through a U-Net and an
  autoencoder, gradients included;
* remat_blocks on + all fast paths against the plain reference, gradients included;
* ``ldm_jax.compile_cache``: a program loaded from the persistent compilation
  cache by a fresh process gives bit-identical outputs to a fresh compilation.
"""
import os
import subprocess
import sys
import textwrap

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax.compile_cache import aot_compile, enable_compilation_cache
from ldm_jax.models import conv as C
from ldm_jax.models.unet import UNet, UNetConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _rel_err(got, want):
    """max |got - want| / max |want|: float32 rounding of a reordered sum is ~1e-7..1e-6."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-30))


def _tree_rel_err(got, want):
    return max(jax.tree_util.tree_leaves(jax.tree_util.tree_map(_rel_err, got, want)))


# ---------------------------------------------------------------------------
# One convolution.
# ---------------------------------------------------------------------------

CONV_CASES = {
    # name: (input (B, H, W, C), features, kernel, stride, padding)
    "3x3_s1": ((2, 8, 8, 6), 8, 3, 1, ((1, 1), (1, 1))),
    "3x3_s2_downsample": ((2, 8, 8, 6), 10, 3, 2, ((1, 1), (1, 1))),
    "3x3_s2_asymmetric_pad": ((2, 8, 8, 6), 8, 3, 2, ((0, 1), (0, 1))),  # the autoencoder's Downsample
    "3x3_s2_odd_size": ((1, 7, 9, 3), 9, 3, 2, ((1, 1), (1, 1))),
    "1x1": ((2, 6, 6, 8), 12, 1, 1, "VALID"),
    "3x3_same_string": ((2, 6, 5, 4), 8, 3, 1, "SAME"),
    "5x5_conv_in": ((2, 8, 8, 4), 16, 5, 1, ((2, 2), (2, 2))),
    "3x3_few_features": ((2, 8, 8, 6), 4, 3, 1, ((1, 1), (1, 1))),  # conv_out-like: XLA's kernel gradient
    # Row counts B*Ho*Wo above the matmul thresholds: XLA's forward (512 rows) and also
    # XLA's input gradient (1152 rows) inside the custom VJP.
    "3x3_rows_512": ((2, 16, 16, 3), 8, 3, 1, ((1, 1), (1, 1))),
    "3x3_rows_1152": ((2, 24, 24, 3), 8, 3, 1, ((1, 1), (1, 1))),
}


def _conv_pair(name, use_bias=True):
    shape, features, k, s, pad = CONV_CASES[name]
    kw = dict(strides=(s, s), padding=pad, use_bias=use_bias)
    return shape, C.Conv(features, (k, k), impl="xla", **kw), C.Conv(features, (k, k), impl="matmul", **kw)


@pytest.mark.parametrize("name", sorted(CONV_CASES))
def test_matmul_conv_matches_xla(name):
    shape, ref, fast = _conv_pair(name)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    params = ref.init(jax.random.PRNGKey(1), x)
    y_ref = ref.apply(params, x)
    cot = jnp.asarray(rng.standard_normal(y_ref.shape), jnp.float32)  # a generic cotangent

    def grads(mod):
        y, vjp = jax.vjp(lambda p, x: mod.apply(p, x), params, x)
        return (y,) + vjp(cot)

    (y0, gp0, gx0), (y1, gp1, gx1) = jax.jit(lambda: grads(ref))(), jax.jit(lambda: grads(fast))()
    # These small shapes take every matmul path (im2col forward, col2im input gradient,
    # per-tap kernel gradient): the same sums in another order.
    errs = {"y": _rel_err(y1, y0), "dx": _rel_err(gx1, gx0),
            "dW": _rel_err(gp1["params"]["kernel"], gp0["params"]["kernel"]),
            "db": _rel_err(gp1["params"]["bias"], gp0["params"]["bias"])}
    print(f"{name}: relative errors {errs}")
    assert max(errs.values()) < 1e-5


def test_matmul_kernel_grad_matches_float64_sum():
    """The per-tap matmul sum itself, against the definition evaluated in float64 numpy."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 5, 6, 3)).astype(np.float32)
    g = rng.standard_normal((2, 3, 3, 4)).astype(np.float32)  # stride 2, pad (1, 1): 3x3 outputs
    got = C.kernel_grad_matmul(jnp.asarray(x), jnp.asarray(g), (3, 3, 3, 4), (2, 2), ((1, 1), (1, 1)))
    xp = np.pad(x.astype(np.float64), ((0, 0), (1, 1), (1, 1), (0, 0)))
    want = np.zeros((3, 3, 3, 4))
    for i in range(3):
        for j in range(3):
            want[i, j] = np.einsum("bhwc,bhwo->co", xp[:, i:i + 5:2, j:j + 5:2, :], g)
    assert _rel_err(got, want) < 1e-6


@pytest.mark.parametrize("shape, k, pad", [
    ((1, 9, 9, 3), 2, ((2, 0), (2, 0))),     # 100 rows: col2im below the threshold anyway
    ((2, 40, 40, 3), 2, ((2, 0), (2, 0))),   # 3362 rows: above DX_MATMUL_MAX_ROWS
    ((2, 30, 30, 3), 3, ((4, 0), (4, 0))),   # 2048 rows
])
def test_input_grad_with_padding_past_the_kernel_matches_float64(shape, k, pad):
    """Paddings over kernel - 1 give XLA's transposed convolution a negative padding, where
    XLA:CPU (jaxlib 0.10.2) returns garbage; the matmul impl takes col2im there at any size."""
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    w = jnp.asarray(rng.standard_normal((k, k, shape[3], 5)), jnp.float32)
    y, vjp = jax.vjp(lambda x: C.conv_matmul_grad(x, w, (1, 1), pad), x)
    g = rng.standard_normal(y.shape)
    (dx,) = vjp(jnp.asarray(g, jnp.float32))
    (pt, _), (pl, _) = pad
    dx_pad = np.zeros((shape[0], shape[1] + pt, shape[2] + pl, shape[3]))
    for i in range(k):
        for j in range(k):
            dx_pad[:, i:i + y.shape[1], j:j + y.shape[2]] += np.einsum("bhwo,co->bhwc", g, np.asarray(w[i, j], np.float64))
    assert _rel_err(dx, dx_pad[:, pt:, pl:]) < 1e-5


def test_bf16_matmul_kernel_grad_as_accurate_as_xla():
    """bf16 operands, float32 master kernel: the per-tap matmuls accumulate in float32,
    so its error against the float32 gradient is at most that of XLA's bf16 path
    (plus a little; both are dominated by rounding the operands to bf16, ~0.4%)."""
    shape, ref, fast = _conv_pair("3x3_s1")
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    params = ref.init(jax.random.PRNGKey(1), x)
    cot = jnp.asarray(rng.standard_normal(ref.apply(params, x).shape), jnp.float32)

    def kernel_grad(mod):
        y, vjp = jax.vjp(lambda p: mod.apply(p, x), params)
        return vjp(cot.astype(y.dtype))[0]["params"]["kernel"]

    want = kernel_grad(ref)
    bf = dict(dtype=jnp.bfloat16)
    got_xla = kernel_grad(C.Conv(8, (3, 3), padding=((1, 1), (1, 1)), impl="xla", **bf))
    got_fast = kernel_grad(C.Conv(8, (3, 3), padding=((1, 1), (1, 1)), impl="matmul", **bf))
    assert got_fast.dtype == jnp.float32  # the gradient of the float32 parameter
    e_xla, e_fast = _rel_err(got_xla, want), _rel_err(got_fast, want)
    print(f"bf16 kernel gradient: xla {e_xla:.2e}, matmul {e_fast:.2e} (relative to max |dW|)")
    assert e_fast < 0.02
    assert e_fast <= 1.5 * e_xla + 1e-3


def test_unsupported_convolutions_fall_back_to_lax():
    """Dilation and grouped convolutions are not rewritten: identical to lax."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 9, 9, 4)), jnp.float32)
    for kw in (dict(kernel_dilation=(2, 2)), dict(feature_group_count=2), dict(input_dilation=(2, 2))):
        ref = nn.Conv(4, (3, 3), padding=((1, 1), (1, 1)), **kw)
        fast = C.Conv(4, (3, 3), padding=((1, 1), (1, 1)), impl="matmul", **kw)
        p = ref.init(jax.random.PRNGKey(0), x)
        g0 = jax.grad(lambda p: jnp.sum(ref.apply(p, x) ** 2))(p)
        g1 = jax.grad(lambda p: jnp.sum(fast.apply(p, x) ** 2))(p)
        jax.tree_util.tree_map(np.testing.assert_array_equal, g1, g0)


def test_conv_factory_is_a_plain_flax_conv_and_impl_switches():
    x = jnp.ones((1, 4, 4, 3))
    ref, fast = nn.Conv(2, (3, 3)), C.Conv(2, (3, 3))
    assert isinstance(fast, nn.Conv)
    shapes = lambda m: jax.tree_util.tree_map(lambda a: a.shape, m.init(jax.random.PRNGKey(0), x))  # noqa: E731
    assert shapes(fast) == shapes(ref)
    assert C.get_conv_impl() == "auto"
    assert C.resolve_impl() == ("matmul" if jax.default_backend() == "cpu" else "xla")
    with C.conv_impl("xla"):
        assert C.resolve_impl() == "xla"
        assert C.resolve_impl("matmul") == "matmul"
    assert C.get_conv_impl() == "auto"
    with pytest.raises(ValueError, match="unknown convolution impl 'im2col'"):
        C.Conv(2, (3, 3), impl="im2col")
    with pytest.raises(ValueError, match="unknown convolution impl"):
        C.set_conv_impl("cudnn")
    with pytest.raises(ValueError, match="unknown convolution impl"):
        with C.route_convs("fast"):
            pass


# ---------------------------------------------------------------------------
# Through a U-Net: every conv kind (conv_in 3x3, resnet 3x3 + 1x1 shortcut, 1x1
# transformer projections, stride-2 downsample, upsample conv, conv_out).
# ---------------------------------------------------------------------------


def _unet_config(**kw):
    return UNetConfig(**dict(dict(
        block_out_channels=(16, 32), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1, norm_num_groups=4,
        num_heads=2, cross_attention_dim=8), **kw))


X = np.random.default_rng(0).standard_normal((2, 8, 8, 4)).astype(np.float32)
T = np.array([3, 700], np.int32)
CTX = np.random.default_rng(1).standard_normal((2, 5, 8)).astype(np.float32)
TARGET = np.random.default_rng(2).standard_normal((2, 8, 8, 4)).astype(np.float32)


def _params(unet):
    shapes = jax.eval_shape(unet.init, jax.random.PRNGKey(0), X, T, CTX)["params"]
    rng = np.random.default_rng(0)
    return jax.tree_util.tree_map(lambda s: (0.3 * rng.standard_normal(s.shape)).astype(np.float32), shapes)


def _loss_and_grads(unet, params):
    """(output, loss, grads, compiled HLO text) of the eps loss."""
    def loss(p):
        out = unet.apply({"params": p}, X, T, CTX)
        return jnp.mean((out - TARGET) ** 2), out

    compiled = jax.jit(jax.value_and_grad(loss, has_aux=True)).lower(params).compile()
    (value, out), grads = compiled(params)
    return out, value, grads, compiled.as_text()


@pytest.fixture(scope="module")
def unet_reference():
    """The parity-tested reference path: XLA convolutions and XLA attention."""
    unet = UNet(_unet_config(conv_impl="xla"), attention_impl="xla")
    params = _params(unet)
    return unet, params, _loss_and_grads(unet, params)


@pytest.fixture(scope="module")
def unet_matmul(unet_reference):
    _, params, _ = unet_reference
    return _loss_and_grads(UNet(_unet_config(conv_impl="matmul")), params)


def _n_convs(hlo: str) -> int:
    return hlo.count(" convolution(")


def _jaxpr(unet, params) -> str:
    """The traced loss gradient (cheap: no compilation); equal jaxprs compile to the same program."""
    return str(jax.make_jaxpr(jax.grad(lambda p: jnp.mean((unet.apply({"params": p}, X, T, CTX) - TARGET) ** 2)))(
        params))


def _n_lax_convs(jaxpr: str) -> int:
    return jaxpr.count("conv_general_dilated[")


def test_unet_matmul_conv_matches_xla(unet_reference, unet_matmul):
    unet, params, (out0, v0, g0, hlo0) = unet_reference
    out1, v1, g1, hlo1 = unet_matmul
    out_err, grad_err = _rel_err(out1, out0), _tree_rel_err(g1, g0)
    print(f"U-Net, matmul vs xla convolutions: output {out_err:.1e}, gradients {grad_err:.1e} (relative)")
    assert out_err < 1e-5 and grad_err < 1e-5
    # The rewrite really happened: fewer convolution ops (the kernel gradients became dots).
    n0, n1 = _n_convs(hlo0), _n_convs(hlo1)
    assert n1 < n0, (n0, n1)


def test_unet_default_conv_impl_is_auto_and_resolves_per_backend(unet_reference):
    """UNetConfig().conv_impl is "auto": on CPU the very program of "matmul" (tested above),
    on GPU/TPU that of "xla"; a process default set with ``conv_impl(...)`` overrides "auto"
    (one switch for every model of a job), an explicit config does not."""
    unet, params, _ = unet_reference
    assert UNetConfig().conv_impl == "auto"
    default, xla, matmul = (UNet(_unet_config(**kw)) for kw in ({}, dict(conv_impl="xla"), dict(conv_impl="matmul")))
    j_default, j_xla, j_matmul = (_jaxpr(m, params) for m in (default, xla, matmul))
    assert _n_lax_convs(j_matmul) < _n_lax_convs(j_xla)
    assert j_default == (j_matmul if jax.default_backend() == "cpu" else j_xla)
    with C.conv_impl("xla"):
        assert _jaxpr(default, params) == j_xla
        assert _jaxpr(matmul, params) == j_matmul  # explicit wins
    with C.conv_impl("matmul"):
        assert _jaxpr(default, params) == j_matmul
    assert _jaxpr(default, params) == j_default  # the context restored the default
    with pytest.raises(ValueError, match="unknown conv_impl"):
        _unet_config(conv_impl="cudnn")


def test_route_convs_reroutes_plain_flax_convs(unet_reference):
    """``route_convs`` (for models built with plain ``nn.Conv``): the program of "matmul"."""
    unet, params, _ = unet_reference
    j_matmul = _jaxpr(UNet(_unet_config(conv_impl="matmul")), params)
    with C.route_convs("matmul"):
        assert _jaxpr(unet, params) == j_matmul


def test_unet_dot_product_attention_matches_xla(unet_reference):
    """attention_impl="dot_product" through layers.dot_product_attention: on CPU the blocked
    recomputing attention (on a CUDA GPU cuDNN flash attention, not testable here), forward
    and every gradient."""
    unet, params, (out0, v0, g0, _) = unet_reference
    fast = UNet(_unet_config(conv_impl="xla"), attention_impl="dot_product")
    out1, v1, g1, _ = _loss_and_grads(fast, params)
    out_err, grad_err = _rel_err(out1, out0), _tree_rel_err(g1, g0)
    print(f"dot_product vs xla attention: output {out_err:.1e}, gradients {grad_err:.1e} (relative)")
    assert out_err < 1e-5 and grad_err < 1e-5
    if jax.default_backend() == "cpu":  # "dot_product" is the blocked kernel here, op for op
        j_fast, j_ref = _jaxpr(fast, params), _jaxpr(unet, params)
        assert "scan[" in j_fast and "scan[" not in j_ref  # the blocked kernel's loop really is there
        assert j_fast == _jaxpr(fast.clone(attention_impl="blocked"), params)


def test_unet_remat_with_all_fast_paths_matches(unet_reference):
    """remat_blocks=True with the matmul convolutions and the fast attention against the
    plain reference (no remat, XLA convolutions and attention): outputs and gradients."""
    unet, params, (out0, v0, g0, _) = unet_reference
    remat = UNet(_unet_config(remat_blocks=True, conv_impl="matmul"), attention_impl="dot_product")
    out1, v1, g1, _ = _loss_and_grads(remat, params)
    out_err, grad_err = _rel_err(out1, out0), _tree_rel_err(g1, g0)
    print(f"remat + matmul conv + dot_product attention vs plain xla: output {out_err:.1e}, "
          f"gradients {grad_err:.1e} (relative)")
    assert out_err < 1e-5 and grad_err < 1e-5


def test_autoencoder_fast_paths_match_xla():
    """AutoencoderKL (asymmetric-pad stride-2 downsamples, upsample convs, 1x1 quant convs,
    single-head mid attention): conv_impl="matmul" + attention_impl="dot_product" against
    the XLA reference, encode + decode, forward and every parameter gradient."""
    from ldm_jax.models.autoencoder import AutoencoderConfig, build_autoencoder

    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.uniform(-1, 1, (2, 16, 16, 3)), jnp.float32)
    cfg = dict(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4)
    assert AutoencoderConfig(**cfg).conv_impl == "auto"

    def run(conv_impl, attention_impl):
        ae = build_autoencoder(AutoencoderConfig(conv_impl=conv_impl, **cfg), attention_impl=attention_impl)
        params = jax.eval_shape(lambda: ae.init({"params": jax.random.PRNGKey(0)}, x, False))["params"]
        prng = np.random.default_rng(0)
        params = jax.tree_util.tree_map(lambda s: (0.3 * prng.standard_normal(s.shape)).astype(np.float32), params)

        def loss(p):
            rec, post = ae.apply({"params": p}, x, False)
            return jnp.mean((rec - x) ** 2) + 1e-3 * jnp.mean(post.mean ** 2), rec

        compiled = jax.jit(jax.value_and_grad(loss, has_aux=True)).lower(params).compile()
        (_, rec), grads = compiled(params)
        return rec, grads, _n_convs(compiled.as_text())

    rec0, g0, n0 = run("xla", "xla")
    rec1, g1, n1 = run("matmul", "dot_product")
    # The key bias of the attention has a gradient of exactly 0 (softmax is invariant to q.b_k,
    # the same for every key): both paths must give rounding noise, tiny against the gradient.
    scale = max(float(np.abs(g).max()) for g in jax.tree_util.tree_leaves(g0))
    for g in (g0, g1):
        for block in ("encoder", "decoder"):
            zero = g[block]["mid_block"]["attentions_0"]["to_k"]["bias"]
            assert float(np.abs(zero).max()) < 1e-7 * scale
            g[block]["mid_block"]["attentions_0"]["to_k"]["bias"] = jnp.zeros_like(zero)
    out_err, grad_err = _rel_err(rec1, rec0), _tree_rel_err(g1, g0)
    print(f"autoencoder fast vs xla: reconstruction {out_err:.1e}, gradients {grad_err:.1e} (relative)")
    assert out_err < 1e-5 and grad_err < 1e-5
    assert n1 < n0, (n0, n1)


# ---------------------------------------------------------------------------
# Compilation cache and AOT.
# ---------------------------------------------------------------------------

_CACHE_SCRIPT = textwrap.dedent("""
    import sys
    import numpy as np
    import jax
    from jax._src import monitoring
    from ldm_jax.compile_cache import enable_compilation_cache
    hits = []
    monitoring.register_event_listener(lambda name, **kw: hits.append(name) if name.endswith("cache_hits") else None)
    assert enable_compilation_cache(sys.argv[1]) is not None
    sys.path.insert(0, sys.argv[3])
    from test_fast_paths import UNet, _unet_config, _params, X, T, CTX
    unet = UNet(_unet_config(conv_impl="xla"))
    out = jax.jit(lambda p: unet.apply({"params": p}, X, T, CTX))(_params(unet))
    np.save(sys.argv[2], np.asarray(out))
    print("HITS", len(hits))
""")


def _run_cached(cache_dir, out_path):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("LDM_JAX_COMPILATION_CACHE", None)
    proc = subprocess.run([sys.executable, "-c", _CACHE_SCRIPT, cache_dir, out_path, os.path.join(ROOT, "tests")],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return int(proc.stdout.split("HITS")[-1])


def test_persistent_cache_gives_identical_outputs(tmp_path, unet_reference):
    unet, params, _ = unet_reference
    cache = str(tmp_path / "cache")
    first_hits = _run_cached(cache, str(tmp_path / "a.npy"))
    assert first_hits == 0 and os.listdir(cache), "the first process should compile and write the cache"
    second_hits = _run_cached(cache, str(tmp_path / "b.npy"))
    assert second_hits >= 1, "the second process should load the U-Net program from the cache"
    a, b = np.load(tmp_path / "a.npy"), np.load(tmp_path / "b.npy")
    np.testing.assert_array_equal(b, a)
    # ... and the same as compiling here without any cache.
    np.testing.assert_array_equal(a, jax.jit(lambda p: unet.apply({"params": p}, X, T, CTX))(params))


def test_enable_compilation_cache_can_be_switched_off(monkeypatch):
    monkeypatch.setenv("LDM_JAX_COMPILATION_CACHE", "off")
    before = jax.config.jax_compilation_cache_dir
    assert enable_compilation_cache() is None
    monkeypatch.delenv("LDM_JAX_COMPILATION_CACHE")
    assert enable_compilation_cache("off") is None
    assert jax.config.jax_compilation_cache_dir == before


def test_configure_compilation_cache_cli_values(monkeypatch, tmp_path):
    """The train.py / sample.py flag: unset -> only $LDM_JAX_COMPILATION_CACHE turns it on;
    a directory -> on there; "off" -> off."""
    from ldm_jax.compile_cache import configure_compilation_cache, disable_compilation_cache

    before = (jax.config.jax_enable_compilation_cache, jax.config.jax_compilation_cache_dir)
    try:
        monkeypatch.delenv("LDM_JAX_COMPILATION_CACHE", raising=False)
        assert configure_compilation_cache(None) is None and configure_compilation_cache("") is None
        assert jax.config.jax_compilation_cache_dir == before[1]
        monkeypatch.setenv("LDM_JAX_COMPILATION_CACHE", str(tmp_path / "env"))
        assert configure_compilation_cache(None) == str(tmp_path / "env")
        assert configure_compilation_cache(str(tmp_path / "flag")) == str(tmp_path / "flag")
        assert jax.config.jax_enable_compilation_cache
        assert jax.config.jax_compilation_cache_dir == str(tmp_path / "flag")
        assert configure_compilation_cache("off") is None
        assert not jax.config.jax_enable_compilation_cache
    finally:
        disable_compilation_cache()
        jax.config.update("jax_compilation_cache_dir", before[1])
        jax.config.update("jax_enable_compilation_cache", before[0])


def test_aot_compile_reuses_one_executable():
    compiled, seconds = aot_compile(lambda a, s: a * s, jnp.ones(3), jnp.float32(2))
    assert seconds >= 0
    np.testing.assert_array_equal(compiled(jnp.arange(3.0), jnp.float32(3)), [0.0, 3.0, 6.0])
    with pytest.raises(TypeError):
        compiled(jnp.ones(4), jnp.float32(2))  # another shape: refused, not recompiled


# ---------------------------------------------------------------------------
# Fused attention kernels (cuDNN on GPU, splash on TPU; CPU: fallbacks / interpret mode).
# ---------------------------------------------------------------------------


def test_cudnn_support_rules():
    from ldm_jax.models.attention_kernels import cudnn_flash_supported

    bf16 = jnp.bfloat16
    assert cudnn_flash_supported(bf16, 160, "gpu", "9.0")[0]  # SD1.5's 1280-channel level on H100/H200
    assert not cudnn_flash_supported(bf16, 160, "gpu", "8.0")[0]  # ... but not on A100 (<= 128)
    assert cudnn_flash_supported(jnp.float16, 40, "gpu", "8.0")[0]
    ok, why = cudnn_flash_supported(jnp.float32, 64, "gpu", "9.0")
    assert not ok and "bfloat16 or float16" in why
    assert not cudnn_flash_supported(bf16, 36, "gpu", "9.0")[0]  # not a multiple of 8
    assert not cudnn_flash_supported(bf16, 64, "cpu", None)[0]


def _qkv(t=64, s=77, n=2, h=8, b=2, seed=0):
    rng = np.random.default_rng(seed)
    return tuple(jnp.asarray(rng.standard_normal(shape), jnp.float32)
                 for shape in ((b, t, n, h), (b, s, n, h), (b, s, n, h)))


@pytest.mark.parametrize("causal", [False, True])
def test_fast_attention_dispatch_off_gpu(causal):
    """layers.dot_product_attention routes every impl but "xla" to attention_kernels:
    "dot_product" off a GPU (blocked on CPU) and "blocked" equal the reference, forward and
    gradients; "cudnn" refuses off a GPU; unknown names are refused."""
    from ldm_jax.models import layers

    q, k, v = _qkv(t=77 if causal else 64, s=77)
    cot = jnp.asarray(np.random.default_rng(5).standard_normal(q.shape), jnp.float32)

    def value_and_vjp(impl):
        out, vjp = jax.vjp(lambda q, k, v: layers.dot_product_attention(q, k, v, impl=impl, causal=causal), q, k, v)
        return (out,) + vjp(cot)

    want = value_and_vjp("xla")
    for impl in ("dot_product", "blocked"):
        got = value_and_vjp(impl)
        errs = [_rel_err(g, w) for g, w in zip(got, want)]
        print(f"layers.dot_product_attention impl={impl} (causal={causal}): out, dq, dk, dv {errs}")
        assert max(errs) < 1e-5
    trace = lambda impl: str(jax.make_jaxpr(  # noqa: E731
        lambda q, k, v: layers.dot_product_attention(q, k, v, impl=impl, causal=causal))(q, k, v))
    if jax.default_backend() == "cpu":  # "dot_product" is the blocked kernel here, op for op
        assert "scan[" in trace("dot_product") and "scan[" not in trace("xla")
        assert trace("dot_product") == trace("blocked")
    if jax.default_backend() != "gpu":
        with pytest.raises(NotImplementedError, match="attention_impl='cudnn' cannot run here"):
            layers.dot_product_attention(q, k, v, impl="cudnn")
    with pytest.raises(ValueError, match="unknown attention impl"):
        layers.dot_product_attention(q, k, v, impl="flash3")


@pytest.mark.parametrize("t,s,causal", [(64, 77, False), (77, 77, True), (9, 7, False), (64, 64, False)])
def test_even_length_padding_is_exact(t, s, causal):
    """The cuDNN route pads odd lengths (one zero key hidden by key_value_seq_lengths, one zero
    query row sliced off). Run on XLA here (the same padding and mask), it equals the unpadded
    attention, forward and the three gradients; without the key mask the zero key takes weight."""
    from ldm_jax.models.attention_kernels import even_length_attention

    q, k, v = _qkv(t=t, s=s)
    cot = jnp.asarray(np.random.default_rng(5).standard_normal(q.shape), jnp.float32)
    scale = 1 / np.sqrt(q.shape[-1])

    def value_and_vjp(f):
        out, vjp = jax.vjp(f, q, k, v)
        return (out,) + vjp(cot)

    want = value_and_vjp(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=causal))
    got = value_and_vjp(lambda q, k, v: even_length_attention(q, k, v, scale=scale, causal=causal,
                                                              implementation=None))
    errs = [_rel_err(g, w) for g, w in zip(got, want)]
    print(f"even-length padding q{t}/kv{s} causal={causal}: out, dq, dk, dv {errs}")
    assert all(g.shape == w.shape for g, w in zip(got, want)) and max(errs) < 1e-6
    if s % 2:  # the padding mask matters: an unmasked zero key changes the result
        pad = ((0, 0), (0, 1), (0, 0), (0, 0))
        unmasked = jax.nn.dot_product_attention(q, jnp.pad(k, pad), jnp.pad(v, pad), scale=scale)
        assert _rel_err(unmasked, want[0]) > 1e-3


@pytest.mark.parametrize("causal", [False, True])
def test_splash_attention_interpret_mode_matches_xla(causal):
    """TPU splash attention run by the Pallas interpreter on CPU: padding of the
    sequences to the 128 block (64 queries, 77 keys / the CLIP causal 77) and the
    segment-id masking of padded keys, forward and gradients."""
    pytest.importorskip("jax.experimental.pallas.ops.tpu.splash_attention")
    from ldm_jax.models import layers
    from ldm_jax.models.attention_kernels import splash_attention

    q, k, v = _qkv(t=77 if causal else 64, s=77)
    cot = jnp.asarray(np.random.default_rng(5).standard_normal(q.shape), jnp.float32)

    def value_and_vjp(fn):
        out, vjp = jax.vjp(fn, q, k, v)
        return (out,) + vjp(cot)

    want = value_and_vjp(lambda q, k, v: layers.dot_product_attention(q, k, v, impl="xla", causal=causal))
    got = value_and_vjp(lambda q, k, v: splash_attention(q, k, v, scale=8 ** -0.5, causal=causal, interpret=True))
    errs = [_rel_err(g, w) for g, w in zip(got, want)]
    print(f"splash (interpret, causal={causal}) vs xla: out, dq, dk, dv relative errors {errs}")
    assert max(errs) < 1e-5


def test_splash_attention_refuses_to_run_off_tpu_without_interpret():
    from ldm_jax.models.attention_kernels import splash_attention

    if jax.default_backend() == "tpu":
        pytest.skip("runs natively on TPU")
    q, k, v = _qkv()
    with pytest.raises(NotImplementedError, match="TPU kernel"):
        splash_attention(q, k, v, scale=1.0, interpret=False)


@pytest.mark.parametrize("t,s,causal,block_elems", [
    (64, 77, False, 1 << 18),      # cross-attention, one block holding all 6 (batch, head) units
    (64, 77, False, 2 * 64 * 77),  # 2 units per block
    (64, 77, False, 1000),         # 8 query blocks of 8 per unit
    (77, 77, True, 1500),          # CLIP's causal self-attention, 7 query blocks of 11
])
def test_blocked_attention_matches_xla(t, s, causal, block_elems):
    from ldm_jax.models import layers
    from ldm_jax.models.attention_kernels import _plan, blocked_attention

    q, k, v = _qkv(t=t, s=s, n=3, h=8)
    cot = jnp.asarray(np.random.default_rng(5).standard_normal(q.shape), jnp.float32)
    print("plan (queries per block, units per block):", _plan(2 * 3, t, s, block_elems))

    def value_and_vjp(fn):
        out, vjp = jax.vjp(fn, q, k, v)
        return (out,) + vjp(cot)

    want = jax.jit(lambda: value_and_vjp(
        lambda q, k, v: layers.dot_product_attention(q, k, v, impl="xla", causal=causal)))()
    got = jax.jit(lambda: value_and_vjp(
        lambda q, k, v: blocked_attention(q, k, v, scale=8 ** -0.5, causal=causal, block_elems=block_elems)))()
    errs = [_rel_err(g, w) for g, w in zip(got, want)]
    print(f"blocked (t={t}, s={s}, causal={causal}) vs xla: out, dq, dk, dv relative errors {errs}")
    assert max(errs) < 1e-5


def test_blocked_attention_bf16_close_to_float32():
    """bf16 q/k/v (scores, softmax statistics and accumulation in float32): within the
    error of the reference "xla" path run in bf16, against the float32 reference."""
    from ldm_jax.models import layers
    from ldm_jax.models.attention_kernels import blocked_attention

    q, k, v = _qkv(t=64, s=64, n=2, h=16)
    want = layers.dot_product_attention(q, k, v, impl="xla")
    bf = [a.astype(jnp.bfloat16) for a in (q, k, v)]
    e_ref = _rel_err(layers.dot_product_attention(*bf, impl="xla").astype(jnp.float32), want)
    e_blk = _rel_err(blocked_attention(*bf, scale=0.25, block_elems=1024).astype(jnp.float32), want)
    print(f"bf16 attention: xla {e_ref:.2e}, blocked {e_blk:.2e} (relative to max |out|)")
    assert e_blk < 0.02 and e_blk <= 1.5 * e_ref + 1e-3
