"""ldm_jax.models.dense.Dense: flax's nn.Dense with a CPU-friendly kernel gradient. Same parameters,
initialisation, forward and gradients as nn.Dense (the reference path)."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax.models import dense
from ldm_jax.models.dense import Dense
from ldm_jax.models.unet_blocks import GEGLU


def _loss(module):
    # a non-linear loss: each output element gets its own cotangent
    return lambda p, x: jnp.sum(jnp.sin(module.apply(p, x).astype(jnp.float32) * 1.3))


@pytest.mark.parametrize("shape", [(6, 5), (2, 7, 5), (2, 3, 4, 5)])
@pytest.mark.parametrize("use_bias", [True, False])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("features", [9, 3])  # more / fewer outputs than the 5 inputs: both gradient forms
def test_dense_matches_flax_dense(shape, use_bias, dtype, features):
    x = jnp.asarray(np.random.default_rng(0).standard_normal(shape), jnp.float32)
    ref, ours = nn.Dense(features, use_bias=use_bias, dtype=dtype), Dense(features, use_bias=use_bias, dtype=dtype)
    p_ref, p_ours = ref.init(jax.random.PRNGKey(1), x), ours.init(jax.random.PRNGKey(1), x)
    assert jax.tree_util.tree_all(jax.tree_util.tree_map(lambda a, b: bool((a == b).all()), p_ref, p_ours))
    params = jax.tree_util.tree_map(lambda a: a + 0.25, p_ref)  # a non-zero bias
    y_ref, y = ref.apply(params, x.astype(dtype)), ours.apply(params, x.astype(dtype))
    assert y.dtype == y_ref.dtype == dtype
    tol = 1e-6 if dtype == jnp.float32 else 2e-2
    np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(y_ref, np.float32), atol=tol, rtol=tol)
    (gp_ref, gx_ref), (gp, gx) = (jax.jit(jax.grad(_loss(m), argnums=(0, 1)))(params, x.astype(dtype))
                                  for m in (ref, ours))
    assert jax.tree_util.tree_structure(gp) == jax.tree_util.tree_structure(gp_ref)
    for a, b in zip(jax.tree_util.tree_leaves((gp, gx)), jax.tree_util.tree_leaves((gp_ref, gx_ref))):
        assert a.dtype == b.dtype and a.shape == b.shape
        scale = float(jnp.max(jnp.abs(b.astype(jnp.float32))))
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), atol=tol * scale * 4, rtol=0)


@pytest.mark.parametrize("n_in, n_out", [(11, 13), (13, 11)])
def test_kernel_gradient_is_the_float64_sum(n_in, n_out):
    rng = np.random.default_rng(2)
    x, w, dy = rng.standard_normal((37, n_in)), rng.standard_normal((n_in, n_out)), rng.standard_normal((37, n_out))
    _, vjp = jax.vjp(dense.dense_matmul, jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32))
    dx, dw = vjp(jnp.asarray(dy, jnp.float32))
    np.testing.assert_allclose(np.asarray(dw), x.T @ dy, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(dx), dy @ w.T, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n_in, n_out", [(6, 20), (20, 6), (8, 8)])
def test_kernel_gradient_transposes_the_smaller_operand_into_a_plain_matmul(n_in, n_out):
    """dW is formed from a transposed copy of the smaller of x and dy, and the compiled gradient has
    no matmul left that contracts the token axis of a transposed left operand (the form XLA:CPU
    hands to Eigen instead of YNNPACK): the barriers keep XLA from folding the transposes back."""
    x, w = jnp.ones((64, n_in)), jnp.ones((n_in, n_out))
    grad_w = jax.grad(lambda w: jnp.sum(jnp.sin(dense.dense_matmul(x, w))))
    transposed = [eqn.invars[0].aval.shape for eqn in jax.make_jaxpr(grad_w)(w).jaxpr.eqns
                  if eqn.primitive.name == "transpose"]
    assert (64, min(n_in, n_out)) in transposed, transposed
    if n_in != n_out:
        assert (64, max(n_in, n_out)) not in transposed, transposed
    hlo = jax.jit(grad_w).lower(w).compile().as_text()
    dots = [line for line in hlo.splitlines() if " dot(" in line]
    assert dots and not [line for line in dots if "lhs_contracting_dims={0}" in line], dots


def test_off_cpu_the_plain_matmul_is_used(monkeypatch):
    """On GPU / TPU the matmul libraries read transposed operands: XLA's own gradient (no custom VJP)."""
    x, w = jnp.ones((3, 4)), jnp.ones((4, 2))
    jaxpr = lambda: str(jax.make_jaxpr(jax.grad(lambda w: dense.matmul(x, w).sum()))(w))  # noqa: E731
    cpu_jaxpr = jaxpr()
    monkeypatch.setattr(dense.jax, "default_backend", lambda: "gpu")
    gpu_jaxpr = jaxpr()
    jax.jvp(lambda w: dense.matmul(x, w), (w,), (w,))  # forward mode there
    assert "custom_vjp" in cpu_jaxpr and "custom_vjp" not in gpu_jaxpr


def test_geglu_matches_flax_dense_and_split():
    """The U-Net's GEGLU (its projection a ``Dense``): nn.Dense's parameters, values and gradients."""
    class Reference(nn.Module):
        @nn.compact
        def __call__(self, x):
            h, gate = jnp.split(nn.Dense(2 * 16, name="proj")(x), 2, axis=-1)
            return h * nn.gelu(gate, approximate=False)

    x = jnp.asarray(np.random.default_rng(3).standard_normal((2, 5, 8)), jnp.float32)
    p_ref, p = Reference().init(jax.random.PRNGKey(4), x), GEGLU(16).init(jax.random.PRNGKey(4), x)
    assert jax.tree_util.tree_all(jax.tree_util.tree_map(lambda a, b: bool((a == b).all()), p_ref, p))
    params = jax.tree_util.tree_map(lambda a: a + 0.1, p_ref)
    np.testing.assert_allclose(GEGLU(16).apply(params, x), Reference().apply(params, x), atol=2e-6, rtol=1e-6)
    g_ref, g = (jax.grad(_loss(m))(params, x) for m in (Reference(), GEGLU(16)))
    for a, b in zip(jax.tree_util.tree_leaves(g), jax.tree_util.tree_leaves(g_ref)):
        np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-5)


def test_float64_kernel_gradient_keeps_float64_precision():
    with jax.enable_x64(True):
        rng = np.random.default_rng(5)
        x, w, dy = rng.standard_normal((9, 4)), rng.standard_normal((4, 3)), rng.standard_normal((9, 3))
        _, vjp = jax.vjp(dense.dense_matmul, jnp.asarray(x), jnp.asarray(w))
        dx, dw = vjp(jnp.asarray(dy))
        assert dw.dtype == jnp.float64
        np.testing.assert_allclose(np.asarray(dw), x.T @ dy, rtol=1e-13, atol=1e-13)


def test_unsupported_dense_options_are_refused():
    x = jnp.ones((2, 3))
    with pytest.raises(ValueError, match="precision / dot_general"):
        Dense(4, precision=jax.lax.Precision.HIGHEST).init(jax.random.PRNGKey(0), x)
