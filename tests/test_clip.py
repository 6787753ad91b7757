"""CLIP text encoder against transformers' CLIPTextModel and open_clip's TextTransformer
(float32, tiny random configs with randomised layer norms and biases)."""
import importlib.util
import os
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

from ldm_jax.convert.clip_transformers import (
    clip_config_from_transformers, clip_params_from_open_clip, load_text_encoder,
)
from ldm_jax.convert.errors import CheckpointError
from ldm_jax.models.clip import CLIPTextConfig, CLIPTextModel

VOCAB, WIDTH, MLP, LAYERS, HEADS, CTX = 1000, 64, 128, 3, 4, 77
SOT, EOT = VOCAB - 2, VOCAB - 1  # EOT is the highest id, as in the real vocabulary
OC_PREFIX = "cond_stage_model.model."


def _ids(seed=0):
    """Two rows: a short prompt padded with EOT (SD1 style) and one filling the context."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, SOT, (2, CTX))
    ids[:, 0] = SOT
    ids[0, 9:] = EOT
    ids[1, -1] = EOT
    return ids.astype(np.int32)


def _randomise_norms_and_biases(module, seed):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "norm" in name or "ln_" in name or name.endswith("bias"):
                p.add_(0.3 * torch.randn(p.shape, generator=gen))


def _hf_model(hidden_act, seed):
    from transformers import CLIPTextConfig as HFConfig, CLIPTextModel as HFModel

    torch.manual_seed(seed)
    cfg = HFConfig(vocab_size=VOCAB, hidden_size=WIDTH, intermediate_size=MLP, num_hidden_layers=LAYERS,
                   num_attention_heads=HEADS, max_position_embeddings=CTX, hidden_act=hidden_act,
                   bos_token_id=SOT, eos_token_id=EOT, pad_token_id=EOT, attn_implementation="eager")
    model = HFModel(cfg).eval()
    _randomise_norms_and_biases(model, seed)
    return model


@pytest.fixture(scope="module")
def clip_l(tmp_path_factory):
    """quick_gelu transformers model saved with save_pretrained; its outputs."""
    model = _hf_model("quick_gelu", seed=0)
    folder = tmp_path_factory.mktemp("clip_l")
    model.save_pretrained(str(folder))
    with torch.no_grad():
        out = model(torch.from_numpy(_ids()).long(), output_hidden_states=True)
    return model, str(folder), out


@pytest.fixture(scope="module")
def clip_h(tmp_path_factory):
    """gelu transformers model, the OpenCLIP-H layout."""
    model = _hf_model("gelu", seed=1)
    folder = tmp_path_factory.mktemp("clip_h")
    model.save_pretrained(str(folder))
    with torch.no_grad():
        out = model(torch.from_numpy(_ids()).long(), output_hidden_states=True)
        penultimate = model.final_layer_norm(out.hidden_states[-2]).numpy()
    return model, str(folder), out, penultimate


def _max_err(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))))


def test_clip_l_last_hidden_state_and_pooled(clip_l):
    _, folder, out = clip_l
    model, params = load_text_encoder(folder)
    assert model.config == CLIPTextConfig(VOCAB, WIDTH, MLP, LAYERS, HEADS, CTX, "quick_gelu", 1e-5, "last")
    ids = jnp.asarray(_ids())
    context = model.apply({"params": params}, ids)
    err = _max_err(context, out.last_hidden_state)
    print(f"CLIP-L last_hidden_state max abs err {err:.2e}")
    np.testing.assert_allclose(context, out.last_hidden_state.numpy(), atol=1e-4, rtol=0)
    context2, pooled = model.apply({"params": params}, ids, return_pooled=True)
    np.testing.assert_array_equal(context2, context)
    print(f"CLIP-L pooled max abs err {_max_err(pooled, out.pooler_output):.2e}")
    np.testing.assert_allclose(pooled, out.pooler_output.numpy(), atol=1e-4, rtol=0)
    np.testing.assert_array_equal(model.apply({"params": params}, ids, method="pooled"), pooled)
    states = model.apply({"params": params}, ids, method="hidden_states")
    assert len(states) == LAYERS + 1
    for mine, theirs in zip(states, out.hidden_states):
        np.testing.assert_allclose(mine, theirs.numpy(), atol=1e-4, rtol=0)


def test_open_clip_h_style_penultimate(clip_h):
    _, folder, out, penultimate = clip_h
    model, params = load_text_encoder(folder, output_layer="penultimate")
    assert model.config.hidden_act == "gelu" and model.config.context_layer == LAYERS - 1
    context, pooled = model.apply({"params": params}, jnp.asarray(_ids()), return_pooled=True)
    print(f"OpenCLIP-H penultimate max abs err {_max_err(context, penultimate):.2e}, "
          f"pooled {_max_err(pooled, out.pooler_output):.2e}")
    np.testing.assert_allclose(context, penultimate, atol=1e-4, rtol=0)
    # The pooled features still come from the last block.
    np.testing.assert_allclose(pooled, out.pooler_output.numpy(), atol=1e-4, rtol=0)
    assert _max_err(context, out.last_hidden_state) > 1e-2  # penultimate really differs from last
    # Without return_pooled the last block is not run, with the same result.
    np.testing.assert_array_equal(model.apply({"params": params}, jnp.asarray(_ids())), context)


def _hf_to_open_clip(state_dict, prefix=OC_PREFIX):
    """Rename transformers CLIPTextModel weights to open_clip naming (q/k/v fused into in_proj)."""
    sd = {k: v.detach().numpy() for k, v in state_dict.items() if not k.endswith("position_ids")}
    out = {
        "token_embedding.weight": sd.pop("embeddings.token_embedding.weight"),
        "positional_embedding": sd.pop("embeddings.position_embedding.weight"),
        "ln_final.weight": sd.pop("final_layer_norm.weight"),
        "ln_final.bias": sd.pop("final_layer_norm.bias"),
    }
    for i in range(LAYERS):
        src, dst = f"encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            out[dst + f"attn.in_proj_{kind}"] = np.concatenate(
                [sd.pop(src + f"self_attn.{p}_proj.{kind}") for p in "qkv"], axis=0)
            for a, b in (("self_attn.out_proj", "attn.out_proj"), ("layer_norm1", "ln_1"),
                         ("layer_norm2", "ln_2"), ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")):
                out[dst + f"{b}.{kind}"] = sd.pop(src + f"{a}.{kind}")
    assert not sd, sorted(sd)
    return {prefix + k: v for k, v in out.items()}


def _open_clip_extras(prefix=OC_PREFIX):
    """Keys an SD2 checkpoint holds next to the text tower, all to be skipped."""
    return {
        prefix + "text_projection": np.zeros((WIDTH, 32), np.float32),
        prefix + "logit_scale": np.zeros((), np.float32),
        prefix + "attn_mask": np.zeros((CTX, CTX), np.float32),
        "model.diffusion_model.input_blocks.0.0.weight": np.zeros((4, 4, 3, 3), np.float32),
        "first_stage_model.decoder.conv_in.bias": np.zeros((4,), np.float32),
    }


def test_open_clip_names_give_identical_params(clip_h):
    hf_model, folder, _, penultimate = clip_h
    model, params = load_text_encoder(folder, output_layer="penultimate")
    sd = {**_hf_to_open_clip(hf_model.state_dict()), **_open_clip_extras()}
    oc_params = clip_params_from_open_clip(sd, model.config, source="sd2.ckpt", prefix=OC_PREFIX)
    jax.tree_util.tree_map(np.testing.assert_array_equal, oc_params, params)
    context = model.apply({"params": oc_params}, jnp.asarray(_ids()))
    np.testing.assert_allclose(context, penultimate, atol=1e-4, rtol=0)


def _load_open_clip_transformer():
    """open_clip/transformer.py loaded by file path inside a stand-in package.

    The real ``open_clip.utils`` imports torchvision (not installed); the text
    tower only needs ``feature_take_indices`` for ``forward_intermediates``,
    which these tests do not call, so the stand-in ``utils`` raises if used.
    """
    name = "_open_clip_ref"
    if name + ".transformer" in sys.modules:
        return sys.modules[name + ".transformer"]
    root = os.path.dirname(importlib.util.find_spec("open_clip").origin)
    pkg = types.ModuleType(name)
    pkg.__path__ = [root]
    utils = types.ModuleType(name + ".utils")

    def _unused(*args, **kwargs):
        raise NotImplementedError("stand-in for open_clip.utils")

    utils.to_2tuple = utils.feature_take_indices = _unused
    sys.modules[name] = pkg
    sys.modules[name + ".utils"] = utils
    for sub in ("pos_embed", "transformer"):
        spec = importlib.util.spec_from_file_location(f"{name}.{sub}", os.path.join(root, sub + ".py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
    return sys.modules[name + ".transformer"]


def test_open_clip_text_transformer_reference():
    """A real open_clip TextTransformer, run as SD2's FrozenOpenCLIPEmbedder(layer="penultimate")."""
    oc = _load_open_clip_transformer()
    torch.manual_seed(3)
    ref = oc.TextTransformer(context_length=CTX, vocab_size=VOCAB, width=WIDTH, heads=HEADS, layers=LAYERS,
                             mlp_ratio=MLP / WIDTH, output_dim=None, output_tokens=True).eval()
    _randomise_norms_and_biases(ref, seed=3)
    ids = _ids(seed=1)
    text = torch.from_numpy(ids).long()
    with torch.no_grad():
        # ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder.encode_with_transformer, with the
        # batch-first blocks of current open_clip (the original permutes to LND for old versions).
        x = ref.token_embedding(text) + ref.positional_embedding
        for block in ref.transformer.resblocks[:-1]:
            x = block(x, attn_mask=ref.attn_mask)
        want_context = ref.ln_final(x).numpy()
        want_pooled, want_last = (t.numpy() for t in ref(text))

    sd = {OC_PREFIX + k: v.numpy() for k, v in ref.state_dict().items()}
    sd.update(_open_clip_extras())
    config = CLIPTextConfig.open_clip_h14(vocab_size=VOCAB, hidden_size=WIDTH, intermediate_size=MLP,
                                          num_layers=LAYERS, num_heads=HEADS)
    params = clip_params_from_open_clip(sd, config, source="sd2.ckpt", prefix=OC_PREFIX)
    model = CLIPTextModel(config)
    context, pooled = model.apply({"params": params}, jnp.asarray(ids), return_pooled=True)
    print(f"open_clip TextTransformer: penultimate max abs err {_max_err(context, want_context):.2e}, "
          f"pooled {_max_err(pooled, want_pooled):.2e}")
    np.testing.assert_allclose(context, want_context, atol=1e-4, rtol=0)
    np.testing.assert_allclose(pooled, want_pooled, atol=1e-4, rtol=0)
    last = CLIPTextModel(CLIPTextConfig(**{**config.__dict__, "output_layer": "last"}))
    np.testing.assert_allclose(last.apply({"params": params}, jnp.asarray(ids)), want_last, atol=1e-4, rtol=0)


def test_dot_product_impl_matches_xla(clip_l):
    _, folder, _ = clip_l
    model, params = load_text_encoder(folder)
    fast, _ = load_text_encoder(folder, attention_impl="dot_product")
    ids = jnp.asarray(_ids())
    ref = model.apply({"params": params}, ids, return_pooled=True)
    got = fast.apply({"params": params}, ids, return_pooled=True)
    print(f"dot_product vs xla max abs err {max(_max_err(a, b) for a, b in zip(got, ref)):.2e}")
    for a, b in zip(got, ref):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)


def test_bf16_compute_close_to_float32(clip_l):
    """bfloat16 compute (float32 params, float32 LN statistics and softmax) vs float32.

    bf16 keeps 8 mantissa bits (relative rounding 2^-9 ~ 2e-3 per op); through
    3 blocks the error stays below 3% of the output's max magnitude.
    """
    _, folder, out = clip_l
    model32, params = load_text_encoder(folder)
    model16, params16 = load_text_encoder(folder, dtype="bfloat16")
    assert all(p.dtype == np.float32 for p in jax.tree_util.tree_leaves(params16))
    ids = jnp.asarray(_ids())
    ref = np.asarray(model32.apply({"params": params}, ids))
    got = model16.apply({"params": params16}, ids)
    assert got.dtype == jnp.bfloat16
    scale = np.abs(ref).max()
    err = _max_err(got, ref)
    print(f"bf16 max abs err {err:.3e} ({err / scale:.2%} of max |ref| = {scale:.2f})")
    assert err <= 0.03 * scale


def test_presets():
    l14, h14 = CLIPTextConfig.clip_l14(), CLIPTextConfig.open_clip_h14()
    assert (l14.hidden_size, l14.num_layers, l14.num_heads, l14.hidden_act, l14.output_layer) == \
        (768, 12, 12, "quick_gelu", "last")
    assert (h14.hidden_size, h14.intermediate_size, h14.num_layers, h14.num_heads, h14.hidden_act,
            h14.output_layer, h14.context_layer) == (1024, 4096, 24, 16, "gelu", "penultimate", 23)
    shapes = jax.eval_shape(CLIPTextModel(h14).init, jax.random.PRNGKey(0), jnp.zeros((1, 77), jnp.int32))
    assert "layers_23" in shapes["params"]["encoder"]  # every block exists even when the context skips one
    assert shapes["params"]["embeddings"]["token_embedding"]["embedding"].shape == (49408, 1024)


def test_config_from_full_clip_config():
    text = dict(vocab_size=VOCAB, hidden_size=WIDTH, intermediate_size=MLP, num_hidden_layers=LAYERS,
                num_attention_heads=HEADS, max_position_embeddings=CTX, hidden_act="gelu")
    assert clip_config_from_transformers({"text_config": text, "model_type": "clip"}).hidden_act == "gelu"
    with pytest.raises(CheckpointError, match="num_hidden_layers"):
        clip_config_from_transformers({k: v for k, v in text.items() if k != "num_hidden_layers"})


def test_old_text_model_prefix_and_position_ids(clip_l, tmp_path):
    """Hub checkpoints of SD1 store ``text_model.*`` keys and the ``position_ids`` buffer."""
    hf_model, folder, out = clip_l
    sd = {"text_model." + k: v.detach().numpy().copy() for k, v in hf_model.state_dict().items()}
    sd["text_model.embeddings.position_ids"] = np.arange(CTX, dtype=np.int64)[None]
    save_file(sd, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_bytes(open(os.path.join(folder, "config.json"), "rb").read())
    model, params = load_text_encoder(str(tmp_path))
    np.testing.assert_allclose(model.apply({"params": params}, jnp.asarray(_ids())),
                               out.last_hidden_state.numpy(), atol=1e-4, rtol=0)


def test_pytorch_model_bin(clip_l, tmp_path):
    """A pickled ``pytorch_model.bin`` (older folders) loads like the safetensors file."""
    hf_model, folder, out = clip_l
    torch.save({"text_model." + k: v for k, v in hf_model.state_dict().items()}, tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_bytes(open(os.path.join(folder, "config.json"), "rb").read())
    model, params = load_text_encoder(str(tmp_path))
    np.testing.assert_allclose(model.apply({"params": params}, jnp.asarray(_ids())),
                               out.last_hidden_state.numpy(), atol=1e-4, rtol=0)


def _write_folder(tmp_path, folder, sd):
    save_file(sd, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_bytes(open(os.path.join(folder, "config.json"), "rb").read())
    return str(tmp_path)


def _hf_state(hf_model):
    return {k: v.detach().numpy().copy() for k, v in hf_model.state_dict().items()}


def test_transformers_missing_unexpected_and_wrong_shape(clip_l, tmp_path):
    hf_model, folder, _ = clip_l
    sd = _hf_state(hf_model)
    del sd["encoder.layers.1.mlp.fc2.bias"]
    with pytest.raises(CheckpointError, match="encoder/layers_1/mlp/fc2/bias"):
        load_text_encoder(_write_folder(tmp_path, folder, sd))

    sd = _hf_state(hf_model)
    sd["text_projection.weight"] = np.zeros((32, WIDTH), np.float32)
    with pytest.raises(CheckpointError, match="text_projection.weight"):
        load_text_encoder(_write_folder(tmp_path, folder, sd))

    sd = _hf_state(hf_model)
    sd["encoder.layers.0.self_attn.k_proj.weight"] = np.zeros((WIDTH, WIDTH + 1), np.float32)
    with pytest.raises(CheckpointError, match=r"encoder.layers.0.self_attn.k_proj.weight.*shape"):
        load_text_encoder(_write_folder(tmp_path, folder, sd))

    with pytest.raises(CheckpointError, match="config.json: no such file"):
        load_text_encoder(str(tmp_path / "nowhere"))
    os.remove(tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match="no weight file"):
        load_text_encoder(str(tmp_path))


def test_open_clip_missing_unexpected_and_wrong_shape(clip_h):
    hf_model, folder, _, _ = clip_h
    config = clip_config_from_transformers({"vocab_size": VOCAB, "hidden_size": WIDTH, "intermediate_size": MLP,
                                            "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
                                            "max_position_embeddings": CTX, "hidden_act": "gelu"})
    good = _hf_to_open_clip(hf_model.state_dict())

    sd = dict(good)
    del sd[OC_PREFIX + "transformer.resblocks.2.attn.in_proj_weight"]
    with pytest.raises(CheckpointError, match="encoder/layers_2/self_attn/q_proj/kernel"):
        clip_params_from_open_clip(sd, config, source="sd2.ckpt", prefix=OC_PREFIX)

    sd = dict(good)
    sd[OC_PREFIX + "transformer.resblocks.2.attn.in_proj_weight"] = np.zeros((3 * WIDTH, WIDTH - 1), np.float32)
    with pytest.raises(CheckpointError, match=r"resblocks.2.attn.in_proj_weight.*shape"):
        clip_params_from_open_clip(sd, config, source="sd2.ckpt", prefix=OC_PREFIX)

    sd = dict(good)
    sd[OC_PREFIX + "positional_embedding"] = np.zeros((CTX + 1, WIDTH), np.float32)
    with pytest.raises(CheckpointError, match=r"positional_embedding.*shape"):
        clip_params_from_open_clip(sd, config, source="sd2.ckpt", prefix=OC_PREFIX)

    sd = dict(good)
    sd[OC_PREFIX + "transformer.resblocks.3.ln_1.weight"] = np.ones((WIDTH,), np.float32)
    with pytest.raises(CheckpointError, match=r"transformer.resblocks.3.ln_1.weight"):
        clip_params_from_open_clip(sd, config, source="sd2.ckpt", prefix=OC_PREFIX)

    with pytest.raises(CheckpointError, match="no open_clip text weights"):
        clip_params_from_open_clip(good, config, source="sd2.ckpt", prefix="wrong.prefix.")


def test_bad_config_and_inputs():
    with pytest.raises(ValueError, match="hidden_act"):
        CLIPTextConfig(hidden_act="relu")
    with pytest.raises(ValueError, match="output_layer"):
        CLIPTextConfig(output_layer="pooled")
    with pytest.raises(ValueError, match="divisible"):
        CLIPTextConfig(hidden_size=65, num_heads=4)
    config = CLIPTextConfig(VOCAB, WIDTH, MLP, 2, HEADS, 8)
    model = CLIPTextModel(config)
    params = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"]
    with pytest.raises(ValueError, match="exceeds max_position_embeddings"):
        jax.eval_shape(model.apply, {"params": params}, jnp.zeros((1, 9), jnp.int32))
    with pytest.raises(ValueError, match=r"\(B, L\)"):
        jax.eval_shape(model.apply, {"params": params}, jnp.zeros((8,), jnp.int32))
    with pytest.raises(TypeError, match="integers"):
        jax.eval_shape(model.apply, {"params": params}, jnp.zeros((1, 8), jnp.float32))
    with pytest.raises(ValueError, match="unknown attention impl"):
        jax.eval_shape(CLIPTextModel(config, attention_impl="flash3").init, jax.random.PRNGKey(0),
                       jnp.zeros((1, 8), jnp.int32))
