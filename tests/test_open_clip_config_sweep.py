"""OpenCLIP text towers across configurations: open_clip 3.3's ``TextTransformer`` (loaded by file
path) against ``clip_config_from_open_clip`` + ``clip_params_from_open_clip`` + ``CLIPTextModel``,
as SD 2.x's ``FrozenOpenCLIPEmbedder`` reads it (layer "last" / "penultimate") and as open_clip
pools it; the key layouts users bring; and the options ldm_jax refuses by name.
float32, tiny shapes, random weights with randomised norms, biases and layer scales."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from ldm_jax.convert.clip_transformers import clip_config_from_open_clip, clip_params_from_open_clip
from ldm_jax.convert.errors import CheckpointError
from ldm_jax.convert.original_config import OriginalSpec
from ldm_jax.convert.original_pipeline import _load_cond_stage
from ldm_jax.models.clip import CLIPTextModel
from original_ckpt import load_open_clip_transformer

TOL = 1e-4
SD2_PREFIX = "cond_stage_model.model."


def _randomise(module, seed):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "ln_" in name or name.endswith(("bias", "gamma")):
                p.add_(0.3 * torch.randn(p.shape, generator=gen))


def _tower(text_cfg, quick_gelu=False, output_dim=None, seed=0):
    """open_clip's TextTransformer built as open_clip.model._build_text_tower builds it from text_cfg."""
    oc = load_open_clip_transformer()
    torch.manual_seed(seed)
    cfg = dict(text_cfg)
    kw = {k: cfg.pop(k) for k in ("context_length", "vocab_size", "width", "heads", "layers", "mlp_ratio",
                                  "ls_init_value", "pool_type", "eos_id", "no_causal_mask", "embed_cls",
                                  "qk_norm", "scale_heads", "scale_attn_inner", "scale_attn", "scale_fc",
                                  "proj_bias") if k in cfg}
    assert not cfg, cfg
    model = oc.TextTransformer(**kw, output_dim=output_dim, output_tokens=True,
                               act_layer=oc.QuickGELU if quick_gelu else torch.nn.GELU).eval()
    _randomise(model, seed + 1)
    return model


def _ids(vocab, ctx, seed, pad=0):
    """Row 0: SOT, a prompt, EOT (the highest id) and padding; row 1: EOT at the very end."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, vocab - 2, (2, ctx))
    ids[:, 0] = vocab - 2
    n = max(1, ctx // 3)
    ids[0, n], ids[0, n + 1:] = vocab - 1, pad
    ids[1, -1] = vocab - 1
    return ids


def _reference(tower, ids, skip):
    """ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder.encode_with_transformer (layer_idx = skip),
    with the batch-first blocks of current open_clip; and open_clip's pooled features."""
    text = torch.from_numpy(ids).long()
    with torch.no_grad():
        x = tower.token_embedding(text) + tower.positional_embedding
        for block in tower.transformer.resblocks[:len(tower.transformer.resblocks) - skip]:
            x = block(x, attn_mask=tower.attn_mask)
        return tower.ln_final(x).numpy(), tower(text)[0].numpy()


def _state(tower, prefix=SD2_PREFIX):
    return {prefix + k: v.numpy() for k, v in tower.state_dict().items()}


def _max_err(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))))


# (text_cfg, quick_gelu): widths not multiples of 64, head dims 8..48, 1..4 layers, other context lengths
# and vocabularies, fractional mlp_ratio, layer scale, QuickGELU, eos pooling.
CASES = {
    "w32_h1_l1": (dict(width=32, heads=1, layers=1, context_length=77, vocab_size=100, mlp_ratio=4.0), False),
    "w48_h6_l2_ls": (dict(width=48, heads=6, layers=2, context_length=16, vocab_size=257, mlp_ratio=2.0,
                          ls_init_value=0.5), False),
    "w72_h3_l3_quickgelu": (dict(width=72, heads=3, layers=3, context_length=12, vocab_size=90, mlp_ratio=3.7362),
                            True),
    "w96_h2_l4_eos": (dict(width=96, heads=2, layers=4, context_length=10, vocab_size=120, mlp_ratio=1.0,
                           pool_type="eos", eos_id=117), False),
    "w40_h5_l2_ls_quickgelu": (dict(width=40, heads=5, layers=2, context_length=8, vocab_size=64, mlp_ratio=2.5,
                                    ls_init_value=1e-5), True),
    "w80_h8_l1_ls": (dict(width=80, heads=8, layers=1, context_length=6, vocab_size=50, mlp_ratio=0.5,
                          ls_init_value=0.7), False),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_text_tower_matches_open_clip(case):
    text_cfg, quick_gelu = CASES[case]
    tower = _tower(text_cfg, quick_gelu, seed=len(case))
    model_cfg = {"embed_dim": 16, "quick_gelu": quick_gelu, "text_cfg": {**text_cfg, "proj_type": "none"}}
    ids = _ids(text_cfg["vocab_size"], text_cfg["context_length"], seed=len(case))
    sd = _state(tower)
    for layer, skip in (("last", 0), ("penultimate", 1)):
        config = clip_config_from_open_clip(model_cfg, layer, pooled=True, source="model.json")
        assert config.hidden_act == ("quick_gelu" if quick_gelu else "gelu")
        params = clip_params_from_open_clip(sd, config, source="sd2.ckpt", prefix=SD2_PREFIX)
        context, pooled = CLIPTextModel(config).apply({"params": params}, jnp.asarray(ids, jnp.int32),
                                                      return_pooled=True)
        want_context, want_pooled = _reference(tower, ids, skip)
        print(f"{case} {layer}: context {_max_err(context, want_context):.2e}, "
              f"pooled {_max_err(pooled, want_pooled):.2e}")
        np.testing.assert_allclose(context, want_context, atol=TOL, rtol=0)
        np.testing.assert_allclose(pooled, want_pooled, atol=TOL, rtol=0)


def test_penultimate_of_one_block_is_the_normed_embeddings():
    """FrozenOpenCLIPEmbedder(layer="penultimate") on a 1-block tower runs no block at all."""
    text_cfg, _ = CASES["w32_h1_l1"]
    tower = _tower(text_cfg)
    config = clip_config_from_open_clip({"text_cfg": text_cfg}, "penultimate")
    params = clip_params_from_open_clip(_state(tower, ""), config, source="tower.pt")
    ids = _ids(100, 77, seed=3)
    context = CLIPTextModel(config).apply({"params": params}, jnp.asarray(ids, jnp.int32))
    with torch.no_grad():
        want = tower.ln_final(tower.token_embedding(torch.from_numpy(ids)) + tower.positional_embedding).numpy()
    np.testing.assert_allclose(context, want, atol=TOL, rtol=0)


def test_state_dict_layouts_give_identical_params():
    """An SD2 checkpoint (cond_stage_model.model.*), a raw open_clip CLIP state dict (tower at the top level,
    next to visual.* and logit_scale) and a CustomTextCLIP one (text.*, a Linear text_projection with bias)."""
    text_cfg, _ = CASES["w48_h6_l2_ls"]
    tower = _tower(text_cfg, output_dim=24)
    config = clip_config_from_open_clip({"embed_dim": 24, "text_cfg": text_cfg}, "penultimate")
    want = clip_params_from_open_clip(_state(tower), config, source="sd2.ckpt", prefix=SD2_PREFIX)
    extras = {"visual.conv1.weight": np.zeros((4, 3, 2, 2), np.float32), "logit_scale": np.zeros((), np.float32)}
    raw = clip_params_from_open_clip({**_state(tower, ""), **extras}, config, source="open_clip.pt")
    custom = _state(tower, "text.")
    custom["text.text_projection.weight"] = custom.pop("text.text_projection").T
    custom["text.text_projection.bias"] = np.zeros((24,), np.float32)
    custom_params = clip_params_from_open_clip({**custom, **extras}, config, source="coca.pt", prefix="text.")
    for got in (raw, custom_params):
        jax.tree_util.tree_map(np.testing.assert_array_equal, got, want)


@pytest.mark.parametrize("option,key", [
    ("embed_cls", "cls_emb"),
    ("qk_norm", "attn.ln_q.weight"),
    ("scale_heads", "attn.head_scale"),
    ("scale_attn_inner", "attn.ln_inner.weight"),
    ("scale_attn", "ln_attn.weight"),
    ("scale_fc", "mlp.ln.weight"),
])
def test_weights_of_unsupported_options_are_refused_by_name(option, key):
    text_cfg = dict(width=32, heads=2, layers=1, context_length=8, vocab_size=40, mlp_ratio=2.0, **{option: True})
    tower = _tower(text_cfg)
    config = clip_config_from_open_clip({"text_cfg": dict(text_cfg, **{option: False})})
    with pytest.raises(CheckpointError, match=rf"sd2\.ckpt.*{SD2_PREFIX}.*{key.replace('.', '[.]')}.*{option}"):
        clip_params_from_open_clip(_state(tower), config, source="sd2.ckpt", prefix=SD2_PREFIX)


def test_layer_scale_without_its_layer_is_refused():
    tower = _tower(dict(width=32, heads=2, layers=1, context_length=8, vocab_size=40, ls_init_value=0.1))
    config = clip_config_from_open_clip({"text_cfg": dict(width=32, heads=2, layers=1, context_length=8,
                                                          vocab_size=40)})
    sd = _state(tower)
    del sd[SD2_PREFIX + "transformer.resblocks.0.mlp.c_proj.bias"]
    with pytest.raises(CheckpointError, match=r"sd2\.ckpt: layer scale .*resblocks\.0\.ls_2\.gamma.*c_proj\.bias"):
        clip_params_from_open_clip(sd, config, source="sd2.ckpt", prefix=SD2_PREFIX)
    sd = _state(tower)
    sd[SD2_PREFIX + "transformer.resblocks.0.ls_1.gamma"] = np.ones((31,), np.float32)
    with pytest.raises(CheckpointError, match=r"ls_1\.gamma.*shape"):
        clip_params_from_open_clip(sd, config, source="sd2.ckpt", prefix=SD2_PREFIX)


BASE = dict(width=32, heads=2, layers=1)


@pytest.mark.parametrize("text_cfg,pooled,match", [
    (dict(BASE, no_causal_mask=True), False, "text_cfg.no_causal_mask=True"),
    (dict(BASE, embed_cls=True), False, "text_cfg.embed_cls=True"),
    (dict(BASE, qk_norm=True), False, "text_cfg.qk_norm=True"),
    (dict(BASE, act_kwargs={"approximate": "tanh"}), False, "text_cfg.act_kwargs"),
    (dict(BASE, norm_kwargs={"eps": 1e-6, "elementwise_affine": False}), False, "norm_kwargs keys"),
    (dict(BASE, hf_model_name="roberta-base"), False, "hf_model_name='roberta-base'"),
    (dict(BASE, unknown_option=3), False, "unknown_option"),
    (dict(BASE, heads=3), False, "divisible"),
    (dict(BASE, pool_type="last"), True, "pool_type='last'"),
    (dict(BASE, pool_type="first"), True, "pool_type='first'"),
    (dict(BASE, pool_type="mean"), False, "pool_type='mean'"),
    (dict(BASE, proj_type="linear"), True, "embed_dim=16.*text_projection"),
])
def test_config_options_ldm_jax_cannot_express_are_refused(text_cfg, pooled, match):
    with pytest.raises(CheckpointError, match=rf"ViT-x\.json: .*{match}"):
        clip_config_from_open_clip({"embed_dim": 16, "text_cfg": text_cfg}, pooled=pooled, source="ViT-x.json")


def test_config_options_that_do_not_change_the_context():
    # Without the pooled output, a projection and the pool type do not matter; layer scale is folded.
    cfg = clip_config_from_open_clip({"embed_dim": 16, "quick_gelu": True, "text_cfg": dict(
        BASE, pool_type="last", ls_init_value=1e-5, norm_kwargs={"eps": 1e-6}, pad_id=1,
        tokenizer_kwargs={"clean": "canonicalize"})})
    assert (cfg.hidden_act, cfg.layer_norm_eps, cfg.intermediate_size, cfg.max_position_embeddings,
            cfg.vocab_size) == ("quick_gelu", 1e-6, 128, 77, 49408)
    cfg = clip_config_from_open_clip({"embed_dim": 16, "text_cfg": dict(BASE, proj_type="none")}, pooled=True,
                                     quick_gelu=True)
    assert cfg.hidden_act == "quick_gelu" and cfg.eos_token_id is None
    assert clip_config_from_open_clip(dict(BASE, pool_type="eos"), pooled=True).eos_token_id == 2  # CLIPTextCfg


@pytest.mark.parametrize("params,act", [
    ({"layer": "penultimate"}, "gelu"),  # ViT-H-14, laion2b: every released SD 2.x model
    ({"arch": "ViT-H-14-quickgelu", "version": "dfn5b", "layer": "penultimate"}, "quick_gelu"),
    ({"arch": "ViT-L-14", "version": "openai", "layer": "last"}, "quick_gelu"),
])
def test_sd2_yaml_arch_chooses_the_activation(params, act):
    """The original YAML's FrozenOpenCLIPEmbedder(arch, version) decides nn.GELU vs QuickGELU, which the
    weights cannot show: the loaded text encoder must reproduce the tower open_clip builds."""
    text_cfg = dict(width=64, heads=1, layers=2, context_length=77, vocab_size=49408, mlp_ratio=2.0)
    tower = _tower(text_cfg, quick_gelu=act == "quick_gelu", seed=5)
    spec = OriginalSpec(unet={}, vae={}, cond_stage="open_clip", cond_stage_params=params,
                        conditioning_key="crossattn", scheduler={}, sample_size=8, source="v2-inference.yaml")
    model, params_, tokenizer = _load_cond_stage(spec, _state(tower), "sd2.ckpt", dict(dtype=jnp.float32))
    assert model.config.hidden_act == act
    ids = _ids(49408, 77, seed=5)
    want, _ = _reference(tower, ids, 1 if params["layer"] == "penultimate" else 0)
    np.testing.assert_allclose(model.apply({"params": params_}, jnp.asarray(ids, jnp.int32)), want, atol=TOL,
                               rtol=0)
