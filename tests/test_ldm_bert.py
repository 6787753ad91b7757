"""The CompVis LDM text-to-image model (LDM-KL-8-G, txt2img-1p4B; diffusers LDMTextToImagePipeline):
the LDMBert text encoder against diffusers' ``LDMBertModel``, loading a diffusers folder and an
original BERTEmbedder checkpoint, sampling against diffusers' pipeline, export, errors.

One tiny model serves every test: an original ``UNetModel`` and KL-f8 first stage (sdkit's ``ldm``
modules) converted to diffusers with diffusers' own single-file converter, a random diffusers
``LDMBertModel`` (8 heads of 64 and a 4x MLP, as x-transformers lays out BERTEmbedder), a tiny
WordPiece vocab.txt. The original checkpoint holds the same weights under the CompVis names,
renamed here from x-transformers' module structure (independently of the loader).
"""
import os
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import yaml

import ldm_jax
from ldm_jax.convert.errors import CheckpointError
from ldm_jax.convert.export import save_diffusers
from ldm_jax.convert.ldm_bert_weights import load_ldm_bert
from ldm_jax.text.bert_tokenizer import BERTTokenizer
from original_ckpt import CONFIGS, first_stage, ldm_state_dict, one_torch_thread, perturb, save_ckpt, unet_model
from tiny_sd import nchw

ENCODER_TOL = 1e-5   # float32 text embeddings, max abs
LATENT_TOL = 1e-4    # final latents against diffusers
IMAGE_TOL = 2e-3     # decoded images against diffusers
YAML = os.path.join(CONFIGS, "tiny-txt2img-ldm-bert.yaml")
# 24 tokens (the YAML's vocab_size): BERT's specials first, as in bert-base-uncased's vocab.txt.
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "apple", "on", "the", "table", "blue", "car",
         "painting", "of", "squirrel", "eating", "burger", "##s", ",", ".", "cat", "dog", "in"]
# Upper case, a word piece (cat ##s), punctuation, an unknown word, different lengths (padding).
PROMPTS = ["A painting of a squirrel eating a burger.", "a red apple on the table, cats and a zebra"]
BERT = dict(d_model=32, encoder_layers=2, encoder_attention_heads=8, head_dim=64, encoder_ffn_dim=128,
            max_position_embeddings=77, vocab_size=len(VOCAB))
STEPS, SCALE, SIZE = 4, 7.5, 64


def max_err(a, b):
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())


def write_vocab(folder) -> str:
    path = os.path.join(str(folder), "vocab.txt")
    with open(path, "w", encoding="utf-8") as f:
        f.write("".join(t + "\n" for t in VOCAB))
    return path


def ldm_bert_torch(seed: int, **overrides):
    """diffusers' LDMBertModel with weights large enough that every nonlinearity matters
    (pre-activations of order 1: GELU's erf and tanh forms differ visibly there)."""
    from diffusers.pipelines.latent_diffusion.pipeline_latent_diffusion import LDMBertConfig, LDMBertModel

    torch.manual_seed(seed)
    model = LDMBertModel(LDMBertConfig(**{**BERT, **overrides}, init_std=0.2)).eval()
    perturb(model, seed + 1, scale=0.1)  # LayerNorm gains and biases away from 1 and 0
    return model


def compvis_bert_state_dict(bert_sd, n_layer: int, prefix: str = "cond_stage_model.transformer."):
    """diffusers LDMBertModel names -> x-transformers TransformerWrapper names (BERTEmbedder.transformer).

    TransformerWrapper: token_emb, pos_emb (AbsolutePositionalEmbedding.emb), attn_layers, norm,
    to_logits. Encoder(depth=n) has layer types ('a', 'f') * n, each ModuleList([norm, block,
    residual]): attention blocks at 2i (to_q/to_k/to_v without bias, to_out), feed-forward blocks
    at 2i + 1 (net = Sequential(Sequential(Linear, GELU), Dropout, Linear))."""
    sd = {k: v.detach().numpy().copy() for k, v in bert_sd.items()}
    out = {prefix + "token_emb.weight": sd.pop("model.embed_tokens.weight"),
           prefix + "pos_emb.emb.weight": sd.pop("model.embed_positions.weight")}
    for i in range(n_layer):
        src = f"model.layers.{i}."
        attn, ff = f"{prefix}attn_layers.layers.{2 * i}.", f"{prefix}attn_layers.layers.{2 * i + 1}."
        pairs = [("self_attn_layer_norm.weight", attn + "0.weight"), ("self_attn_layer_norm.bias", attn + "0.bias"),
                 ("self_attn.q_proj.weight", attn + "1.to_q.weight"),
                 ("self_attn.k_proj.weight", attn + "1.to_k.weight"),
                 ("self_attn.v_proj.weight", attn + "1.to_v.weight"),
                 ("self_attn.out_proj.weight", attn + "1.to_out.weight"),
                 ("self_attn.out_proj.bias", attn + "1.to_out.bias"),
                 ("final_layer_norm.weight", ff + "0.weight"), ("final_layer_norm.bias", ff + "0.bias"),
                 ("fc1.weight", ff + "1.net.0.0.weight"), ("fc1.bias", ff + "1.net.0.0.bias"),
                 ("fc2.weight", ff + "1.net.2.weight"), ("fc2.bias", ff + "1.net.2.bias")]
        for ours, theirs in pairs:
            out[theirs] = sd.pop(src + ours)
    for leaf in ("weight", "bias"):
        out[f"{prefix}norm.{leaf}"] = sd.pop(f"model.layer_norm.{leaf}")
        out[f"{prefix}to_logits.{leaf}"] = sd.pop(f"to_logits.{leaf}")  # the unused LM head, kept as released
    assert not sd, sorted(sd)
    return out


def run_diffusers(ref_pipe, latents_bhwc):
    """(images, final latents) of diffusers' LDMTextToImagePipeline from the given noise; the latents
    are caught on their way into the decoder (the pipeline cannot return them)."""
    caught = []
    decode = ref_pipe.vqvae.decode

    def catching_decode(z, *args, **kwargs):
        caught.append(z.detach().numpy().transpose(0, 2, 3, 1) * ref_pipe.vqvae.config.scaling_factor)
        return decode(z, *args, **kwargs)

    ref_pipe.vqvae.decode = catching_decode
    try:
        with torch.no_grad(), one_torch_thread():
            images = ref_pipe(PROMPTS, num_inference_steps=STEPS, guidance_scale=SCALE, height=SIZE, width=SIZE,
                              latents=nchw(latents_bhwc), eta=0.0, output_type="np").images
    finally:
        ref_pipe.vqvae.decode = decode
    return images, caught[0]


def original_and_diffusers(original: dict, bert, seeds, path: str):
    """An original-format checkpoint from ``original`` (the YAML as a dict): sdkit's U-Net and first
    stage with random weights (``seeds``), ``bert``'s weights under the CompVis BERTEmbedder names;
    and the same U-Net and autoencoder in diffusers' classes through diffusers' own converter.
    Returns (state dict, .ckpt path, diffusers U-Net, diffusers autoencoder)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (
        convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint, create_unet_diffusers_config_from_ldm,
        create_vae_diffusers_config_from_ldm,
    )
    from ldm.modules.diffusionmodules.util import make_beta_schedule

    p = original["model"]["params"]
    unet = unet_model(seeds[0], **p["unet_config"]["params"])
    first = first_stage(seeds[1], p["first_stage_config"]["params"]["ddconfig"], 4)
    betas = np.asarray(make_beta_schedule("linear", 1000, linear_start=p["linear_start"],
                                          linear_end=p["linear_end"]), np.float64)
    sd = ldm_state_dict(unet, first, None, betas=betas)
    sd.update(compvis_bert_state_dict(bert.state_dict(), p["cond_stage_config"]["params"]["n_layer"]))
    ckpt = save_ckpt(path, sd)

    checkpoint = {k: torch.from_numpy(np.asarray(v)) for k, v in sd.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # diffusers' image_size deprecation
        unet_cfg = create_unet_diffusers_config_from_ldm(original, {}, image_size=SIZE)
        vae_cfg = create_vae_diffusers_config_from_ldm(original, {}, image_size=SIZE)
    d_unet = UNet2DConditionModel(**unet_cfg).eval()
    d_unet.load_state_dict(convert_ldm_unet_checkpoint(checkpoint, unet_cfg))
    d_vae = AutoencoderKL(**vae_cfg).eval()
    d_vae.load_state_dict(convert_ldm_vae_checkpoint(checkpoint, vae_cfg))
    return sd, ckpt, d_unet, d_vae


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """The tiny LDM txt2img model as a diffusers folder (save_pretrained) and an original .ckpt, and
    diffusers' outputs for PROMPTS."""
    from diffusers import DDIMScheduler, LDMTextToImagePipeline
    from transformers import BertTokenizer

    root = tmp_path_factory.mktemp("ldm_txt2img")
    with open(YAML) as f:
        original = yaml.safe_load(f)
    p = original["model"]["params"]
    assert p["cond_stage_config"]["params"]["vocab_size"] == len(VOCAB)
    bert = ldm_bert_torch(20)
    sd, ckpt, d_unet, d_vae = original_and_diffusers(original, bert, seeds=(0, 10), path=str(root / "txt2img.ckpt"))
    vocab = write_vocab(root)
    tokenizer = BertTokenizer(vocab={t: i for i, t in enumerate(VOCAB)})
    # CompVis "linear" = diffusers scaled_linear; DDIM as the original's (timesteps + 1, alphas[0] at the end)
    scheduler = DDIMScheduler(beta_start=p["linear_start"], beta_end=p["linear_end"], beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    ref_pipe = LDMTextToImagePipeline(vqvae=d_vae, bert=bert, tokenizer=tokenizer, unet=d_unet, scheduler=scheduler)
    ref_pipe.set_progress_bar_config(disable=True)
    folder = str(root / "diffusers")
    ref_pipe.save_pretrained(folder)

    latents = np.random.default_rng(3).standard_normal((2, SIZE // 8, SIZE // 8, 4)).astype(np.float32)
    images, final = run_diffusers(ref_pipe, latents)
    ids = tokenizer(PROMPTS + [""], padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        embeds = bert(ids)[0].numpy()
    return dict(folder=folder, ckpt=ckpt, vocab=vocab, sd=sd, bert=bert, ref_pipe=ref_pipe, latents=latents,
                images=images, final=final, ids=ids.numpy(), embeds=embeds, root=root)


@pytest.fixture(scope="module")
def from_folder(model):
    return ldm_jax.load_pipeline(model["folder"])


@pytest.fixture(scope="module")
def from_ckpt(model):
    return ldm_jax.load_pipeline(model["ckpt"], config=YAML, tokenizer=model["vocab"])


def sample(pipe, latents):
    """(images, final latents) from one jitted call (the last intermediate is the final latents)."""
    images, steps = pipe(PROMPTS, num_inference_steps=STEPS, guidance_scale=SCALE, height=SIZE, width=SIZE,
                         latents=latents, sampler="ddim", return_intermediates=True)
    return images, steps[-1]


# ----------------------------------------------------------------------------- (a) the encoder


@pytest.mark.parametrize("act", ["gelu", "gelu_new"])
def test_encoder_matches_diffusers_ldm_bert(act, tmp_path):
    """Random LDMBertModel -> bert/ folder -> ours: same states for a padded batch (no attention mask,
    as both references run it), float32 within 1e-5."""
    bert = ldm_bert_torch(7, activation_function=act, encoder_layers=3)
    bert.save_pretrained(str(tmp_path / "bert"))
    module, params = load_ldm_bert(str(tmp_path / "bert"))
    assert module.config.hidden_act == act and module.config.inner_dim == 512 and module.config.num_layers == 3
    tok = BERTTokenizer.from_pretrained(write_vocab(tmp_path))
    ids = tok(PROMPTS + [""])
    assert ids.shape == (3, 77) and (ids == 0).any(axis=1).all()  # every row padded
    with torch.no_grad():
        ref = bert(torch.from_numpy(ids).long())[0].numpy()
    got = jax.jit(module.apply)({"params": params}, jnp.asarray(ids))
    err = max_err(got, ref)
    print(f"LDMBert ({act}) vs diffusers LDMBertModel: max abs error {err:.2e} (output std {ref.std():.2f})")
    assert got.shape == ref.shape == (3, 77, 32)
    assert err < ENCODER_TOL


def test_save_replaces_an_earlier_save(tmp_path):
    """save_ldm_bert into a bert/ folder that holds another model's weights as a sharded checkpoint and an
    fp16 variant: diffusers' LDMBertModel (default: the sharded index first; variant="fp16") and ours read
    the new weights or nothing (the stale files used to stay and be read)."""
    from ldm_jax.convert.ldm_bert_weights import save_ldm_bert

    folder = str(tmp_path / "bert")
    old = ldm_bert_torch(1, encoder_layers=1)
    old.save_pretrained(folder, max_shard_size="20KB")
    old.save_pretrained(folder, variant="fp16")
    assert any("-00001-of-" in n for n in os.listdir(folder))
    new = ldm_bert_torch(2, encoder_layers=1)
    new.save_pretrained(str(tmp_path / "new"))
    module, params = load_ldm_bert(str(tmp_path / "new"))
    save_ldm_bert(module, params, folder)
    assert sorted(os.listdir(folder)) == ["config.json", "model.safetensors"]
    _, got = load_ldm_bert(folder)
    jax.tree_util.tree_map(np.testing.assert_array_equal, got, params)
    ref = type(new).from_pretrained(folder).state_dict()
    for key, value in new.state_dict().items():
        if not key.startswith("to_logits"):  # (the LM head is not exported: diffusers initialises it)
            np.testing.assert_array_equal(ref[key].numpy(), value.numpy(), err_msg=key)


def test_tokenizer_matches_the_reference_call(model, tmp_path):
    """Our tokenizer (from vocab.txt, or from the saved tokenizer/ folder) gives the ids of the
    reference's ``tokenizer(texts, padding="max_length", max_length=77, truncation=True)``."""
    for path in (model["vocab"], os.path.join(model["folder"], "tokenizer")):
        tok = BERTTokenizer.from_pretrained(path)
        np.testing.assert_array_equal(tok(PROMPTS + [""]), model["ids"])
    ids = model["ids"]
    assert list(ids[2, :3]) == [2, 3, 0]  # "" -> [CLS] [SEP] [PAD]...
    assert 1 in ids[1] and VOCAB.index("##s") in ids[1]  # zebra -> [UNK], cats -> cat ##s
    long = tok(["a " * 200])[0]
    assert long.shape == (77,) and long[0] == 2 and long[-1] == 3  # truncated with [SEP] kept last
    tok.save_pretrained(str(tmp_path / "saved"))
    for path in (str(tmp_path / "saved"), str(tmp_path / "saved" / "vocab.txt")):
        np.testing.assert_array_equal(BERTTokenizer.from_pretrained(path)(PROMPTS), ids[:2])


# ----------------------------------------------------------------------------- (b) the diffusers folder


def test_diffusers_folder_matches_ldm_text_to_image_pipeline(model, from_folder):
    pipe = from_folder
    assert type(pipe.text_encoder).__name__ == "LDMBertModel" and pipe.vae.config.kind == "kl"
    assert pipe.vae_scale_factor == 8 and pipe.default_size == SIZE
    embeds = pipe.encode_prompt(PROMPTS + [""])
    text_err = max_err(embeds, model["embeds"])
    images, final = sample(pipe, model["latents"])
    lat_err, img_err = max_err(final, model["final"]), max_err(images, model["images"])
    print(f"diffusers LDMTextToImagePipeline folder: text {text_err:.2e}, latents {lat_err:.2e} (max |z| "
          f"{np.abs(model['final']).max():.1f}), images {img_err:.2e} (image std {model['images'].std():.3f})")
    assert text_err < ENCODER_TOL
    assert lat_err < LATENT_TOL
    assert img_err < IMAGE_TOL and images.std() > 1e-2


# ----------------------------------------------------------------------------- (c) the original checkpoint


def test_original_checkpoint_matches_the_diffusers_folder(model, from_folder, from_ckpt):
    pipe = from_ckpt
    assert pipe.cond_stage == "bert" and pipe.conditioning_key == "crossattn"
    cfg = pipe.text_encoder.config
    assert (cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.head_dim, cfg.intermediate_size, cfg.vocab_size) == (
        32, 2, 8, 64, 128, len(VOCAB))
    for key in ("beta_start", "beta_end", "beta_schedule", "steps_offset", "set_alpha_to_one", "clip_sample"):
        assert pipe.scheduler_config[key] == model["ref_pipe"].scheduler.config[key], key
    for name in ("text_encoder", "unet", "vae"):  # the same weights as the diffusers folder's
        jax.tree_util.tree_map(np.testing.assert_array_equal, pipe.params[name], from_folder.params[name])
    np.testing.assert_array_equal(pipe.tokenize(PROMPTS + [""]), model["ids"])
    text_err = max_err(pipe.encode_prompt(PROMPTS + [""]), model["embeds"])
    images, final = sample(pipe, model["latents"])
    lat_err, img_err = max_err(final, model["final"]), max_err(images, model["images"])
    print(f"original BERTEmbedder checkpoint: text {text_err:.2e}, latents {lat_err:.2e}, images {img_err:.2e}")
    assert text_err < ENCODER_TOL and lat_err < LATENT_TOL and img_err < IMAGE_TOL


def test_export_runs_in_diffusers_and_loads_back(model, from_ckpt, tmp_path):
    """original .ckpt -> save_diffusers -> diffusers' LDMTextToImagePipeline: the same images; and
    load_pipeline reads the folder back to the same parameters and tokens."""
    from diffusers import LDMTextToImagePipeline
    from diffusers.pipelines.latent_diffusion.pipeline_latent_diffusion import LDMBertModel

    folder = save_diffusers(from_ckpt, str(tmp_path / "export"))
    with open(os.path.join(folder, "model_index.json")) as f:
        index = yaml.safe_load(f)
    assert index["_class_name"] == "LDMTextToImagePipeline" and index["bert"] == ["latent_diffusion", "LDMBertModel"]
    assert index["vqvae"] == ["diffusers", "AutoencoderKL"] and "text_encoder" not in index
    _, info = LDMBertModel.from_pretrained(os.path.join(folder, "bert"), output_loading_info=True)
    assert sorted(info["missing_keys"]) == ["to_logits.bias", "to_logits.weight"]  # the unused LM head
    assert not info["unexpected_keys"] and not info["mismatched_keys"]
    ref_pipe = LDMTextToImagePipeline.from_pretrained(folder)
    ref_pipe.set_progress_bar_config(disable=True)
    images, _ = run_diffusers(ref_pipe, model["latents"])
    err = max_err(images, model["images"])
    print(f"export -> diffusers LDMTextToImagePipeline: max abs image error vs the source model {err:.2e}")
    assert err < IMAGE_TOL
    back = ldm_jax.load_pipeline(folder)
    for name in ("text_encoder", "unet", "vae"):
        jax.tree_util.tree_map(np.testing.assert_array_equal, back.params[name], from_ckpt.params[name])
    np.testing.assert_array_equal(back.tokenize(PROMPTS + [""]), model["ids"])
    assert back.scheduler_config["steps_offset"] == 1 and back.scheduler_config["beta_schedule"] == "scaled_linear"


# ----------------------------------------------------------------------------- (d) errors


def test_missing_or_wrong_tokenizer_is_named(model, tmp_path):
    with pytest.raises(CheckpointError, match=r"BERTEmbedder.*not\s+stored in the checkpoint: pass tokenizer="):
        ldm_jax.load_pipeline(model["ckpt"], config=YAML)
    with pytest.raises(CheckpointError, match="tokenizer=.*no such tokenizer folder or vocab.txt"):
        ldm_jax.load_pipeline(model["ckpt"], config=YAML, tokenizer=str(tmp_path / "nowhere"))
    big = tmp_path / "big.txt"
    big.write_text("".join(t + "\n" for t in VOCAB + [f"w{i}" for i in range(10)]))
    with pytest.raises(CheckpointError, match=r"34 tokens but the BERTEmbedder's table 24"):
        ldm_jax.load_pipeline(model["ckpt"], config=YAML, tokenizer=str(big))


def _yaml_with(tmp_path, **bert_params):
    with open(YAML) as f:
        cfg = yaml.safe_load(f)
    cfg["model"]["params"]["cond_stage_config"]["params"].update(bert_params)
    path = tmp_path / "changed.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def test_wrong_n_layer_names_the_keys(model, tmp_path):
    prefix = r"cond_stage_model\.transformer\.attn_layers\.layers"
    with pytest.raises(CheckpointError, match=rf"(?s)missing from the checkpoint.*{prefix}\.4\.0\.bias.*does not fit"):
        ldm_jax.load_pipeline(model["ckpt"], config=_yaml_with(tmp_path, n_layer=3), tokenizer=model["vocab"])
    with pytest.raises(CheckpointError, match=rf"(?s)unexpected checkpoint weights.*{prefix}\.2\.0\.bias"):
        ldm_jax.load_pipeline(model["ckpt"], config=_yaml_with(tmp_path, n_layer=1), tokenizer=model["vocab"])
    with pytest.raises(CheckpointError, match=r"transformer\.\S+' has shape \(\d+, 32\).*\(\d+, 64\)"):
        ldm_jax.load_pipeline(model["ckpt"], config=_yaml_with(tmp_path, n_embed=64), tokenizer=model["vocab"])
    with pytest.raises(CheckpointError, match=r"BERTEmbedder params \['n_head'\] are not BERTEmbedder arguments"):
        ldm_jax.load_pipeline(model["ckpt"], config=_yaml_with(tmp_path, n_head=4), tokenizer=model["vocab"])


def test_sample_cli_takes_the_tokenizer_of_an_original_checkpoint(model, tmp_path, capsys):
    """sample.py --tokenizer: the vocabulary an original BERTEmbedder .ckpt does not hold."""
    import sample as sample_cli

    out = tmp_path / "out"
    argv = ["--checkpoint", model["ckpt"], "--config", YAML, "--prompt", PROMPTS[0], "--n_samples", "1",
            "--steps", "2", "--H", str(SIZE), "--W", str(SIZE), "--outdir", str(out)]
    assert sample_cli.main(argv + ["--tokenizer", model["vocab"]]) == 0, capsys.readouterr().err
    assert os.listdir(out / "samples") == ["00000.png"]
    capsys.readouterr()
    assert sample_cli.main(argv) == 2
    assert "pass tokenizer=" in capsys.readouterr().err


def test_bert_embedder_is_inferred_from_the_keys(model, from_ckpt):
    """Without the YAML the BERTEmbedder's width, depth, vocabulary and length come from its weights."""
    inferred = ldm_jax.load_pipeline(model["ckpt"], tokenizer=model["vocab"])
    assert inferred.text_encoder.config == from_ckpt.text_encoder.config
    for a, b in zip(jax.tree_util.tree_leaves(inferred.params["text_encoder"]),
                    jax.tree_util.tree_leaves(from_ckpt.params["text_encoder"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_allclose(np.asarray(inferred.encode_prompt(PROMPTS)),
                               np.asarray(from_ckpt.encode_prompt(PROMPTS)), rtol=0, atol=0)


# ----------------------------------------------------------------------------- (e) layout-to-image (token ids)


LAYOUT_YAML = os.path.join(CONFIGS, "tiny-layout2img-ldm-bert.yaml")
LAYOUT_VOCAB, LAYOUT_LENGTH = 40, 12  # the YAML's vocab_size and max_seq_len


def layout_ids(seed: int, batch: int = 2) -> np.ndarray:
    """Stand-ins for ObjectsBoundingBoxConditionalBuilder's output: any ids of the table, both ends included."""
    ids = np.random.default_rng(seed).integers(0, LAYOUT_VOCAB, (batch, LAYOUT_LENGTH))
    ids[0, 0], ids[-1, -1] = 0, LAYOUT_VOCAB - 1
    return ids


def reference_ddim(unet, vae, scheduler, embeds, latents_bhwc):
    """(images, final latents) of LDMTextToImagePipeline's loop (DDIM, no guidance) run by hand on given
    context states: the diffusers pipeline only takes text."""
    scheduler.set_timesteps(STEPS)
    z = nchw(latents_bhwc) * scheduler.init_noise_sigma
    context = torch.from_numpy(np.asarray(embeds))
    with torch.no_grad(), one_torch_thread():
        for t in scheduler.timesteps:
            eps = unet(scheduler.scale_model_input(z, t), t, encoder_hidden_states=context).sample
            z = scheduler.step(eps, t, z, eta=0.0).prev_sample
        images = vae.decode(z / vae.config.scaling_factor).sample
    return (images / 2 + 0.5).clamp(0, 1).numpy().transpose(0, 2, 3, 1), z.numpy().transpose(0, 2, 3, 1)


@pytest.fixture(scope="module")
def layout(tmp_path_factory):
    """A tiny original layout-to-image checkpoint (Layout2ImgDiffusion, BERTEmbedder use_tokenizer: false) and
    the reference: diffusers' LDMBertModel on the ids, then diffusers' U-Net / DDIM / autoencoder."""
    from diffusers import DDIMScheduler

    root = tmp_path_factory.mktemp("ldm_layout")
    with open(LAYOUT_YAML) as f:
        original = yaml.safe_load(f)
    p = original["model"]["params"]
    assert p["cond_stage_config"]["params"]["use_tokenizer"] is False
    bert = ldm_bert_torch(21, vocab_size=LAYOUT_VOCAB, max_position_embeddings=LAYOUT_LENGTH)
    _, ckpt, d_unet, d_vae = original_and_diffusers(original, bert, seeds=(1, 11), path=str(root / "layout.ckpt"))
    scheduler = DDIMScheduler(beta_start=p["linear_start"], beta_end=p["linear_end"], beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1)

    ids = layout_ids(5)
    with torch.no_grad():
        embeds = bert(torch.from_numpy(ids))[0].numpy()
    latents = np.random.default_rng(4).standard_normal((2, SIZE // 8, SIZE // 8, 4)).astype(np.float32)
    images, final = reference_ddim(d_unet, d_vae, scheduler, embeds, latents)
    pipe = ldm_jax.load_pipeline(ckpt, config=LAYOUT_YAML)  # no tokenizer=: the model takes token ids
    return dict(ckpt=ckpt, pipe=pipe, bert=bert, ids=ids, embeds=embeds, latents=latents, images=images,
                final=final, scheduler=scheduler)


def test_layout_checkpoint_samples_from_token_ids(layout):
    """use_tokenizer: false loads without a tokenizer; context_ids go through LDMBert and the U-Net as the
    reference's, inside the one jitted program (new ids: no recompilation)."""
    pipe = layout["pipe"]
    assert pipe.tokenizer is None and type(pipe.text_encoder).__name__ == "LDMBertModel"
    assert pipe.cond_stage == "bert" and pipe.conditioning_key == "crossattn"
    cfg = pipe.text_encoder.config
    assert (cfg.vocab_size, cfg.max_position_embeddings, cfg.hidden_size) == (LAYOUT_VOCAB, LAYOUT_LENGTH, 32)
    for key in ("beta_start", "beta_end", "beta_schedule", "steps_offset", "set_alpha_to_one", "clip_sample"):
        assert pipe.scheduler_config[key] == layout["scheduler"].config[key], key
    text_err = max_err(pipe.encode_ids(layout["ids"]), layout["embeds"])
    images, steps = pipe(context_ids=layout["ids"], num_inference_steps=STEPS, height=SIZE, width=SIZE,
                         latents=layout["latents"], sampler="ddim", return_intermediates=True)
    lat_err, img_err = max_err(steps[-1], layout["final"]), max_err(images, layout["images"])
    print(f"layout (token ids) checkpoint: text {text_err:.2e} (std {layout['embeds'].std():.2f}), latents "
          f"{lat_err:.2e} (max |z| {np.abs(layout['final']).max():.1f}), images {img_err:.2e} "
          f"(image std {layout['images'].std():.3f})")
    assert text_err < ENCODER_TOL and lat_err < LATENT_TOL
    assert img_err < IMAGE_TOL and images.std() > 1e-2

    compiled = {k: f._cache_size() for k, f in pipe._jit_cache.items()}
    other = pipe(context_ids=layout_ids(6), num_inference_steps=STEPS, height=SIZE, width=SIZE,
                 latents=layout["latents"], sampler="ddim", return_intermediates=True)[0]
    assert {k: f._cache_size() for k, f in pipe._jit_cache.items()} == compiled  # traced ids
    assert max_err(other, images) > 1e-2  # and they condition the samples


def test_layout_token_id_errors(layout, tmp_path):
    pipe = layout["pipe"]
    ids = layout["ids"]
    call = dict(num_inference_steps=1, height=SIZE, width=SIZE)
    with pytest.raises(ValueError, match=r"no tokenizer: its text encoder embeds token ids.*pass context_ids="):
        pipe("a cat on a table", **call)
    with pytest.raises(ValueError, match=r"no tokenizer"):
        pipe.encode_prompt(["a cat"])
    with pytest.raises(ValueError, match=r"context_ids must have shape \(B, 12\).*got \(2, 11\)"):
        pipe(context_ids=ids[:, :11], **call)
    with pytest.raises(ValueError, match=r"context_ids must have shape \(B, 12\).*got \(1, 2, 12\)"):
        pipe(context_ids=ids[None], **call)
    with pytest.raises(ValueError, match=r"context_ids must be in \[0, 40\).*got values in \[0, 40\]"):
        pipe(context_ids=np.where(ids == 39, 40, ids), **call)
    with pytest.raises(ValueError, match=r"got values in \[-1, 39\]"):
        pipe.encode_ids(np.where(ids == 0, -1, ids))
    with pytest.raises(TypeError, match=r"context_ids must be integer token ids, got dtype float32"):
        pipe(context_ids=ids.astype(np.float32), **call)
    with pytest.raises(TypeError, match=r"integer token ids, got dtype <U"):
        pipe(context_ids=["a cat"], **call)
    with pytest.raises(ValueError, match=r"either prompt \(text\) or context_ids"):
        pipe("a cat", context_ids=ids, **call)
    with pytest.raises(ValueError, match=r"no\s+unconditional input.*guidance_scale=1\.0"):
        pipe(context_ids=ids, guidance_scale=7.5, **call)
    with pytest.raises(ValueError, match=r"no negative_prompt"):
        pipe(context_ids=ids, negative_prompt="", **call)
    vocab = write_vocab(tmp_path)
    with pytest.raises(CheckpointError, match=r"tokenizer=.* given, but the BERTEmbedder has use_tokenizer: false"):
        ldm_jax.load_pipeline(layout["ckpt"], config=LAYOUT_YAML, tokenizer=vocab)


# ----------------------------------------------------------------------------- fine-tuning from the .ckpt
@pytest.mark.parametrize("trainable", [False, True])
def test_fine_tuning_from_an_original_bert_embedder_checkpoint(trainable, tmp_path):
    """init.checkpoint = an original LDM txt2img .ckpt (BERTEmbedder cond stage, no vocabulary) with
    configs/ldm_txt2img_f8.py (text_encoder.kind="ldm_bert", the vocabulary from text_encoder.tokenizer),
    model.unet={}: the first state's U-Net (params and EMA, 2x4 FSDP mesh) and text encoder are the
    file's (the BERT in the trained state with text_encoder.trainable, as cond_stage_trainable: true;
    frozen otherwise), checked against the torch weights too; the tokenizer is the vocabulary's; a
    sharded step runs and trains the BERT only when trainable."""
    import importlib.util

    from ldm_jax.models.ldm_bert import LDMBertModel
    from ldm_jax.training import loop
    from ldm_jax.training import sharding as shd
    from ldm_jax.training.ldm_task import LDMTask

    with open(YAML) as f:
        original = yaml.safe_load(f)
    bert = ldm_bert_torch(30)
    sd, ckpt, _, _ = original_and_diffusers(original, bert, seeds=(1, 11), path=str(tmp_path / "txt2img.ckpt"))
    vocab = write_vocab(tmp_path)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location("_cfg_ldm_txt2img_f8", os.path.join(root, "configs",
                                                                                     "ldm_txt2img_f8.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cfg = module.get_config("runlocal")
    cfg.model.unet = {}
    cfg.text_encoder.tokenizer = vocab
    cfg.text_encoder.trainable = trainable
    cfg.init.checkpoint = ckpt
    cfg.init.original_config = YAML
    cfg.first_stage.scale_by_std = False  # the file's 0.18215
    cfg.mesh.min_fsdp_size = 2 ** 10

    task = LDMTask(cfg, shd.make_mesh(2, 4))
    released = ldm_jax.load_pipeline(ckpt, config=YAML, tokenizer=vocab)
    assert isinstance(task.text_encoder, LDMBertModel) and task.text_encoder.config == released.text_encoder.config
    assert task.step_cfg.train_text_encoder == trainable and task.scale_factor == np.float32(0.18215)
    # "a red apple" -> [CLS] a red apple [SEP] [PAD]... with the written vocabulary (16 = runlocal's max_length)
    assert task.tokenizer(["a red apple"]).tolist() == [[2, 5, 6, 7, 3] + [0] * 11]
    host = shd.gather_to_host
    assert_same = lambda a, b: jax.tree_util.tree_map(np.testing.assert_array_equal, host(a), host(b))  # noqa: E731
    assert_same(task.frozen["vae"], released.params["vae"])
    state = task.init_state(jax.random.PRNGKey(0))
    if trainable:
        assert task.frozen["text_encoder"] is None and set(state.params) == {"unet", "text_encoder"}
        unet0, te0 = state.params["unet"], state.params["text_encoder"]
        assert_same(state.ema_params, state.params)
    else:
        unet0, te0 = state.params, task.frozen["text_encoder"]
        assert_same(state.ema_params, released.params["unet"])
    assert_same(unet0, released.params["unet"])
    assert_same(te0, released.params["text_encoder"])
    # and against the torch weights directly (not only through the loader)
    np.testing.assert_array_equal(np.asarray(host(te0)["embed_tokens"]["embedding"]),
                                  bert.model.embed_tokens.weight.detach().numpy())
    np.testing.assert_array_equal(np.asarray(host(unet0)["conv_in"]["kernel"]),
                                  sd["model.diffusion_model.input_blocks.0.0.weight"].transpose(2, 3, 1, 0))

    conv_in0 = np.asarray(host(unet0)["conv_in"]["kernel"])  # (the step donates the state)
    batch = next(loop.SyntheticDataset(8, image_size=16))
    state1, metrics = task.train_step(state, shd.shard_batch(task.prepare_batch(batch), task.mesh))
    print(f"LDM txt2img fine-tuning (text_encoder.trainable={trainable}): loss {float(metrics['loss']):.5f}")
    assert np.isfinite(float(metrics["loss"])) and int(state1.step) == 1
    unet1 = state1.params["unet"] if trainable else state1.params
    assert np.abs(np.asarray(host(unet1)["conv_in"]["kernel"]) - conv_in0).max() > 0
    if trainable:  # the BERT trains with the U-Net
        moved = np.asarray(host(state1.params["text_encoder"])["embed_tokens"]["embedding"]) - np.asarray(
            bert.model.embed_tokens.weight.detach().numpy())
        assert np.abs(moved).max() > 0
