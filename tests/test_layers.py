"""Shared blocks against their PyTorch counterparts (float32, random weights)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from ldm_jax.convert.mapping import convert_state_dict
from ldm_jax.models import layers


def _params_from_torch(module, torch_module, x):
    target = jax.eval_shape(module.init, jax.random.PRNGKey(0), x)["params"]
    sd = {k: v.detach().numpy() for k, v in torch_module.state_dict().items()}
    return convert_state_dict(sd, target, source="test")


def test_group_norm_matches_torch(rng):
    x = rng.standard_normal((2, 5, 6, 64)).astype(np.float32)
    tm = torch.nn.GroupNorm(32, 64, eps=1e-6)
    torch.nn.init.normal_(tm.weight); torch.nn.init.normal_(tm.bias)
    fm = layers.GroupNorm(32, 1e-6)
    params = _params_from_torch(fm, tm, x)
    got = fm.apply({"params": params}, x)
    want = tm(torch.from_numpy(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).detach().numpy()
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)



@pytest.mark.parametrize("shape, groups, offset, atol, grad_atol", [
    ((2, 5, 6, 64), 8, 0.0, 2e-5, 1e-4),        # 8 channels per group
    ((3, 7, 96), 32, 0.0, 2e-5, 1e-4),          # a sequence (B, T, C)
    ((4, 48), 16, 0.0, 2e-5, 1e-4),             # no positions (B, C)
    ((1, 9, 4, 32), 1, 0.0, 2e-5, 1e-4),        # one group: LayerNorm over everything
    # A large mean: the variance of the centred values, as torch (E[x^2] - E[x]^2 loses all digits
    # here). The bound is float32's resolution at 100 (7.6e-6) over a std of 0.5, times |scale|,
    # for the output, and that summed over the 72 positions of a group for the scale's gradient.
    ((2, 6, 6, 64), 32, 100.0, 2e-4, 2e-3),
])
def test_group_norm_and_its_gradients_match_torch(rng, shape, groups, offset, atol, grad_atol):
    x = (rng.standard_normal(shape) * 0.5 + offset).astype(np.float32)
    c = shape[-1]
    tm = torch.nn.GroupNorm(groups, c, eps=1e-6)
    torch.nn.init.normal_(tm.weight); torch.nn.init.normal_(tm.bias)
    fm = layers.GroupNorm(groups, 1e-6)
    params = _params_from_torch(fm, tm, x)
    dy = rng.standard_normal(shape).astype(np.float32)

    def loss(p, x):
        return jnp.sum(fm.apply({"params": p}, x) * dy)

    got, (dp, dx) = fm.apply({"params": params}, x), jax.grad(loss, argnums=(0, 1))(params, x)
    to_nc = (0, x.ndim - 1) + tuple(range(1, x.ndim - 1))      # channels last -> channels second
    xt = torch.from_numpy(x).permute(*to_nc).contiguous().requires_grad_(True)
    want = tm(xt)
    (want * torch.from_numpy(dy).permute(*to_nc)).sum().backward()
    back = tuple(int(i) for i in np.argsort(to_nc))
    np.testing.assert_allclose(got, want.permute(*back).detach().numpy(), atol=atol, rtol=0)
    np.testing.assert_allclose(dx, xt.grad.permute(*back).numpy(), atol=grad_atol, rtol=1e-4)
    np.testing.assert_allclose(dp["scale"], tm.weight.grad.numpy(), atol=grad_atol, rtol=1e-4)
    np.testing.assert_allclose(dp["bias"], tm.bias.grad.numpy(), atol=grad_atol, rtol=1e-4)


def test_resnet_block_matches_diffusers(rng):
    from diffusers.models.resnet import ResnetBlock2D

    torch.manual_seed(0)
    tm = ResnetBlock2D(in_channels=32, out_channels=64, temb_channels=16, groups=8, eps=1e-5).eval()
    x = rng.standard_normal((2, 8, 8, 32)).astype(np.float32)
    temb = rng.standard_normal((2, 16)).astype(np.float32)
    fm = layers.ResnetBlock(64, groups=8, epsilon=1e-5)
    target = jax.eval_shape(fm.init, jax.random.PRNGKey(0), x, temb)["params"]
    sd = {k: v.detach().numpy() for k, v in tm.state_dict().items()}
    params = convert_state_dict(sd, target, source="test")
    got = fm.apply({"params": params}, x, temb)
    with torch.no_grad():
        want = tm(torch.from_numpy(x).permute(0, 3, 1, 2), torch.from_numpy(temb)).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


@pytest.mark.parametrize("causal", [False, True])
def test_attention_impls_agree(rng, causal):
    q, k, v = (rng.standard_normal((2, 7, 3, 16)).astype(np.float32) for _ in range(3))
    ref = layers.dot_product_attention(q, k, v, impl="xla", causal=causal)
    fast = layers.dot_product_attention(q, k, v, impl="dot_product", causal=causal)
    np.testing.assert_allclose(fast, ref, atol=1e-5, rtol=0)
    # Against an explicit float64 computation.
    s = np.einsum("bthd,bshd->bhts", q.astype(np.float64), k) / 4.0
    if causal:
        s = np.where(np.tril(np.ones((7, 7), bool)), s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True)); p /= p.sum(-1, keepdims=True)
    np.testing.assert_allclose(ref, np.einsum("bhts,bshd->bthd", p, v), atol=1e-5, rtol=0)


def test_attention_rejects_unknown_impl():
    x = jnp.zeros((1, 2, 1, 4))
    with pytest.raises(ValueError, match="unknown attention impl"):
        layers.dot_product_attention(x, x, x, impl="flash3")
