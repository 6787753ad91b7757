"""Config sweep of the first-stage autoencoders and the CLIP text encoder against the PyTorch
references (diffusers AutoencoderKL / VQModel, transformers CLIPTextModel), float32, tiny random
models saved with ``save_pretrained`` and read back with ``load_vae`` / ``load_text_encoder``.

Each config either matches the reference to the parity tests' tolerance (1e-4) or is refused by
the loader with a ``CheckpointError`` naming config.json, the key and what is implemented.
"""
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from ldm_jax.convert.clip_transformers import clip_config_from_transformers, load_text_encoder
from ldm_jax.convert.errors import CheckpointError
from ldm_jax.convert.vae_diffusers import load_vae, vae_config_from_diffusers

ATOL = 1e-4  # as tests/test_autoencoder.py and tests/test_clip.py


def _max_err(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def _nchw(x):
    return torch.from_numpy(np.ascontiguousarray(np.transpose(x, (0, 3, 1, 2))))


def _nhwc(t):
    return t.detach().permute(0, 2, 3, 1).numpy()


def _randomize_(model, seed):
    """Perturb every tensor (GroupNorm / LayerNorm affine parameters and biases included)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in model.state_dict().values():
            if t.is_floating_point():
                t.add_(torch.randn(t.shape, generator=g) * (0.5 * t.std() if t.ndim >= 2 else 0.1))
    return model


# ----------------------------------------------------------------------------- autoencoders


def _vae_kwargs(channels, lpb, groups, latent, cin=3, cout=3, attn=(), **extra):
    a = [i in attn for i in range(len(channels))]
    return dict(in_channels=cin, out_channels=cout,
                down_block_types=["AttnDownEncoderBlock2D" if x else "DownEncoderBlock2D" for x in a],
                up_block_types=["AttnUpDecoderBlock2D" if x else "UpDecoderBlock2D" for x in reversed(a)],
                block_out_channels=list(channels), layers_per_block=lpb, norm_num_groups=groups,
                latent_channels=latent, **extra)


# (id, diffusers AutoencoderKL kwargs, image (H, W)): channels not multiples of 32, few groups,
# one-channel and four-channel images, non-square and odd image sides.
KL_SWEEP = [
    ("1block_nonsquare", _vae_kwargs((8,), 1, 4, 4), (6, 10)),
    ("2blocks_lpb3_in4_lat8", _vae_kwargs((8, 24), 3, 8, 8, cin=4, cout=4), (8, 12)),
    ("2blocks_in1_noquant_odd", _vae_kwargs((12, 24), 2, 4, 3, cin=1, cout=1, use_quant_conv=False,
                                            mid_block_add_attention=False), (7, 9)),
    # diffusers maps act_fn "swish" (and any case: it lower-cases) to nn.SiLU
    ("act_swish", _vae_kwargs((8, 16), 1, 4, 4, act_fn="swish"), (8, 8)),
    ("act_SiLU", _vae_kwargs((8, 16), 1, 4, 4, attn=(1,), act_fn="SiLU"), (8, 8)),
]


@pytest.mark.parametrize("name,kwargs,hw", KL_SWEEP, ids=[c[0] for c in KL_SWEEP])
def test_kl_config_sweep_matches_diffusers(tmp_path, name, kwargs, hw):
    from diffusers import AutoencoderKL as TorchKL

    torch.manual_seed(0)
    ref = _randomize_(TorchKL(**kwargs).eval(), 1)
    ref.save_pretrained(str(tmp_path))
    module, params = load_vae(str(tmp_path))
    x = np.random.default_rng(0).uniform(-1, 1, (2, *hw, kwargs["in_channels"])).astype(np.float32)
    post = module.apply({"params": params}, x, method="encode")
    z = np.random.default_rng(1).standard_normal(post.mean.shape).astype(np.float32)
    with torch.no_grad():
        want_post = ref.encode(_nchw(x)).latent_dist
        want_dec = ref.decode(_nchw(z)).sample
        want_rec = ref(_nchw(x), sample_posterior=False).sample
    got_dec = module.apply({"params": params}, z, method="decode")
    got_rec, _ = module.apply({"params": params}, x, sample_posterior=False)
    assert got_dec.shape == _nhwc(want_dec).shape and got_rec.shape == _nhwc(want_rec).shape
    errs = {"mean": _max_err(post.mean, _nhwc(want_post.mean)),
            "logvar": _max_err(post.logvar, _nhwc(want_post.logvar)),
            "decode": _max_err(got_dec, _nhwc(want_dec)), "forward": _max_err(got_rec, _nhwc(want_rec))}
    print(f"\nKL {name}: {errs}")
    for key, err in errs.items():
        assert err < ATOL, (key, err)
    assert np.std(_nhwc(want_dec)) > 0.1


def test_vq_config_sweep_matches_diffusers(tmp_path):
    """vq_embed_dim != latent_channels, lookup_from_codebook / force_upcast (no effect on the
    network), act_fn "swish": codebook indices, encode, decode and decode from indices."""
    from diffusers import VQModel as TorchVQ

    kwargs = _vae_kwargs((8, 16), 1, 4, 4, num_vq_embeddings=16, vq_embed_dim=2, lookup_from_codebook=True,
                         force_upcast=True, act_fn="swish")
    torch.manual_seed(0)
    ref = _randomize_(TorchVQ(**kwargs).eval(), 2)
    x = np.random.default_rng(1).uniform(-1, 1, (2, 8, 10, 3)).astype(np.float32)
    with torch.no_grad():  # codebook = encoder outputs + noise, so that many codes are in use
        h_nd = ref.encode(_nchw(x)).latents.permute(0, 2, 3, 1).reshape(-1, 2)
        g = torch.Generator().manual_seed(3)
        table = ref.quantize.embedding.weight
        table.copy_(h_nd[torch.randint(0, h_nd.shape[0], (16,), generator=g)]
                    + 0.3 * h_nd.std() * torch.randn(table.shape, generator=g))
    ref.save_pretrained(str(tmp_path))
    module, params = load_vae(str(tmp_path))
    enc = module.apply({"params": params}, x, method="encode")
    with torch.no_grad():
        h = ref.encode(_nchw(x)).latents
        zq, _, (_, _, idx) = ref.quantize(h)
        want_rec = ref(_nchw(x)).sample
        want_lookup = ref.decode(idx, force_not_quantize=True, shape=(2, h.shape[2], h.shape[3], 2)).sample
    want_idx = idx.reshape(enc.indices.shape).numpy()
    np.testing.assert_array_equal(np.asarray(enc.indices), want_idx)
    assert len(np.unique(want_idx)) > 4
    got_rec, _ = module.apply({"params": params}, x)
    errs = {"pre_quant": _max_err(enc.pre_quant, _nhwc(h)), "latents": _max_err(enc.latents, _nhwc(zq)),
            "forward": _max_err(got_rec, _nhwc(want_rec)),
            "decode_indices": _max_err(module.apply({"params": params}, enc.indices, method="decode_indices"),
                                       _nhwc(want_lookup))}
    print(f"\nVQ sweep: {errs}")
    for key, err in errs.items():
        assert err < ATOL, (key, err)


@pytest.mark.parametrize("key,value", [("act_fn", "gelu"), ("act_fn", "mish"), ("norm_type", "spatial")])
def test_vae_unsupported_values_are_named(key, value):
    with pytest.raises(CheckpointError, match=rf"vae/config\.json: unsupported {key}='{value}'.*implemented"):
        vae_config_from_diffusers({"_class_name": "VQModel", "block_out_channels": [32], key: value},
                                  source="vae/config.json")


@pytest.mark.parametrize("value", [None, 0.0, "0.18215"])
def test_vae_bad_scaling_factor_is_named(value):
    with pytest.raises(CheckpointError, match=r"vae/config\.json: unsupported scaling_factor=.*positive number"):
        vae_config_from_diffusers({"_class_name": "AutoencoderKL", "block_out_channels": [32],
                                   "scaling_factor": value}, source="vae/config.json")


# ----------------------------------------------------------------------------- CLIP text encoder


def _hf_clip(tmp_path, seed=0, with_projection=False, **overrides):
    from transformers import CLIPTextConfig as HFConfig, CLIPTextModel, CLIPTextModelWithProjection

    kw = dict(vocab_size=300, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              max_position_embeddings=20, attn_implementation="eager")
    kw.update(overrides)
    torch.manual_seed(seed)
    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    model = _randomize_(cls(HFConfig(**kw)).eval(), seed)
    model.save_pretrained(str(tmp_path))
    return model


def _ids(eot, pad, high=None, length=16):
    """Three prompts ending in ``eot``; ``high`` (an added token above EOT) in two of them."""
    rng = np.random.default_rng(0)
    ids = rng.integers(3, 290, (3, length))
    ids[0, 5], ids[0, 6:] = eot, pad
    ids[1, -1] = eot
    ids[2, 3], ids[2, 4:] = eot, pad
    if high is not None:
        ids[0, 2] = ids[2, 1] = high
    return ids.astype(np.int32)


# (id, transformers config overrides, ids): the pooled position under each eos_token_id convention
POOL_CASES = [
    # eos_token_id == 2 (SD 1.x/2.x hub configs): transformers pools at argmax(ids), added tokens included
    ("legacy_eos2_added_token", dict(vocab_size=302, eos_token_id=2, pad_token_id=1, bos_token_id=0),
     _ids(299, 299, high=301)),
    # a real eos id: its first occurrence, even with textual-inversion ids above it
    ("eos_search_added_token", dict(vocab_size=302, eos_token_id=299, pad_token_id=299, bos_token_id=298),
     _ids(299, 299, high=301)),
    ("eos_search_pad0", dict(vocab_size=302, eos_token_id=299, pad_token_id=0, bos_token_id=298),
     _ids(299, 0, high=300)),
    # transformers' default eos_token_id 49407 is outside this vocabulary: pooled at position 0
    ("default_eos_outside_vocab", dict(), _ids(299, 299)),
    # eos == vocab_size - 1, the highest id: argmax == first EOT; shorter input than the positions
    ("eos_highest_id_short_input", dict(eos_token_id=299, pad_token_id=299, hidden_act="gelu",
                                        layer_norm_eps=1e-6), _ids(299, 299, length=12)),
]


@pytest.mark.parametrize("name,overrides,ids", POOL_CASES, ids=[c[0] for c in POOL_CASES])
def test_clip_pooled_position_matches_transformers(tmp_path, name, overrides, ids):
    hf = _hf_clip(tmp_path, **overrides)
    model, params = load_text_encoder(str(tmp_path))
    with torch.no_grad():
        out = hf(torch.from_numpy(ids).long())
    context, pooled = model.apply({"params": params}, jnp.asarray(ids), return_pooled=True)
    errs = {"context": _max_err(context, out.last_hidden_state), "pooled": _max_err(pooled, out.pooler_output)}
    print(f"\nCLIP {name}: eos_token_id={getattr(model.config, 'eos_token_id', None)} {errs}")
    for key, err in errs.items():
        assert err < ATOL, (key, err)


def test_clip_eos_token_id_from_config():
    base = dict(vocab_size=300, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=20)
    eos = lambda **kw: clip_config_from_transformers({**base, **kw}).eos_token_id  # noqa: E731
    assert eos(eos_token_id=2) is None          # legacy: argmax
    assert eos(eos_token_id=299) is None        # the highest id: argmax is the first EOT
    assert eos(eos_token_id=None) is None
    assert eos(eos_token_id=7) == 7
    assert eos() == 49407                       # transformers' default when the key is absent
    assert eos(vocab_size=49408) is None        # ... which is the highest id of the real vocabulary


@pytest.mark.parametrize("overrides,match", [
    ({"hidden_act": "gelu_pytorch_tanh"}, r"config\.json: unsupported .*hidden_act.*gelu_pytorch_tanh"),
    ({"hidden_act": "relu"}, r"config\.json: unsupported .*hidden_act.*relu"),
    ({"num_attention_heads": 5}, r"config\.json: unsupported .*hidden_size 32 .*num_heads 5"),
    ({"eos_token_id": [299, 298]}, r"config\.json: unsupported eos_token_id=\[299, 298\]"),
    ({"architectures": ["CLIPTextModelWithProjection"]},
     r"config\.json: unsupported architectures=\['CLIPTextModelWithProjection'\].*CLIPTextModel"),
])
def test_clip_unsupported_config_names_file_and_key(tmp_path, overrides, match):
    config = {**dict(vocab_size=300, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                     num_attention_heads=4, max_position_embeddings=20), **overrides}
    with open(tmp_path / "config.json", "w") as f:
        json.dump(config, f)
    with pytest.raises(CheckpointError, match=match):
        load_text_encoder(str(tmp_path))


def test_clip_with_projection_folder_is_refused_by_name(tmp_path):
    """A transformers CLIPTextModelWithProjection folder (SDXL text_encoder_2): its text_projection is
    not implemented, so it is refused naming config.json rather than loaded without it."""
    _hf_clip(tmp_path, with_projection=True, projection_dim=16)
    assert "CLIPTextModelWithProjection" in json.load(open(os.path.join(tmp_path, "config.json")))["architectures"]
    with pytest.raises(CheckpointError, match=r"config\.json: unsupported architectures.*WithProjection"):
        load_text_encoder(str(tmp_path))


@pytest.mark.parametrize("eos_token_id", [None, 7])
def test_clip_export_keeps_the_pooled_position(tmp_path, eos_token_id):
    """save_text_encoder writes an eos_token_id under which transformers pools where ldm_jax does:
    the highest id (argmax) for eos_token_id None, else the id itself (a 300-token vocabulary, so
    transformers' usual 49407 would pool at position 0)."""
    import jax
    from transformers import CLIPTextModel as HFModel

    from ldm_jax.convert.export import save_text_encoder
    from ldm_jax.models.clip import CLIPTextConfig, CLIPTextModel

    cfg = CLIPTextConfig(vocab_size=300, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                         max_position_embeddings=20, eos_token_id=eos_token_id)
    model = CLIPTextModel(cfg)
    ids = _ids(299 if eos_token_id is None else 7, 0, length=16)
    params = model.init(jax.random.PRNGKey(0), jnp.asarray(ids))["params"]
    save_text_encoder(model, params, str(tmp_path), pad_token_id=0)
    hf = HFModel.from_pretrained(str(tmp_path), attn_implementation="eager").eval()
    with torch.no_grad():
        want = hf(torch.from_numpy(ids).long()).pooler_output
    _, pooled = model.apply({"params": params}, jnp.asarray(ids), return_pooled=True)
    assert _max_err(pooled, want) < ATOL
