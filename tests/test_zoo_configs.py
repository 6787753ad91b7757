"""configs/ for the released model families (sd1_finetune, sd2_v_finetune, ldm_celebahq256, ldm_sr,
sd_inpainting_finetune, ...): every such config builds its models' parameter shapes (jax.eval_shape,
nothing allocated), and the architecture is exactly the one the released YAML describes. The
first-stage configs (autoencoder_*.py) likewise against the released first stages' ddconfigs."""
import contextlib
import dataclasses
import glob
import importlib.util
import io
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax.convert.original_config import read_original_yaml, spec_from_original_config, vae_config_from_ldm
from ldm_jax.convert.unet_diffusers import unet_abstract_params, unet_config_from_diffusers
from ldm_jax.convert.vae_diffusers import vae_config_from_diffusers
from ldm_jax.models.autoencoder import AutoencoderConfig, abstract_params, build_autoencoder
from ldm_jax.models.clip import CLIPTextConfig, CLIPTextModel
from ldm_jax.models.unet import UNet, UNetConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ZOO = sorted(p for p in glob.glob(os.path.join(ROOT, "configs", "*.py"))
             if not os.path.basename(p).startswith(("emoji_", "autoencoder_")))
# config -> (released YAML in tests/original_configs, U-Net parameters of the released checkpoint)
RELEASED = {
    "sd1_finetune.py": ("v1-inference.yaml", 859_520_964),
    "sd2_v_finetune.py": ("v2-inference-v.yaml", 865_910_724),
    "ldm_celebahq256.py": ("celebahq-ldm-vq-4.yaml", None),
    "ldm_cin256.py": ("cin256-v2.yaml", 400_920_579),
    "ldm_sr.py": ("bsr_sr-config.yaml", 113_622_563),                              # concat: low-res image
    "sd_inpainting_finetune.py": ("v1-inpainting-inference.yaml", 859_535_364),    # hybrid: 9 input channels
    "ldm_txt2img_f8.py": ("txt2img-1p4B-eval.yaml", 872_300_484),                  # LDM-KL-8-G, BERT trained
    "sd2_x4_upscaler.py": ("x4-upscaling.yaml", 473_398_020),                      # noise-augmented low-res
    "ldm_semantic_synthesis.py": ("semantic_synthesis256-config.yaml", 215_229_315),  # concat: rescaled label map
    "ldm_layout2img.py": ("layout2img-openimages256-config.yaml", 246_277_379),    # layout tokens, BERT trained
}


FIRST_STAGE_CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "autoencoder_*.py")))
# config -> the released first stage (CompVis latent-diffusion configs/autoencoder/*.yaml and
# models/first_stage_models/*/config.yaml; all ch 128, num_res_blocks 2, resolution 256):
# (embed_dim, n_embed (None: KL), z_channels, ch_mult, attn_resolutions)
FIRST_STAGES = {
    "autoencoder_kl_f4.py": (3, None, 3, [1, 2, 4], []),
    "autoencoder_kl_f8.py": (4, None, 4, [1, 2, 4, 4], []),
    "autoencoder_kl_f16.py": (16, None, 16, [1, 1, 2, 2, 4], [16]),
    "autoencoder_kl_f32.py": (64, None, 64, [1, 1, 2, 2, 4, 4], [16, 8]),
    "autoencoder_vq_f4.py": (3, 8192, 3, [1, 2, 4], []),
    "autoencoder_vq_f8.py": (4, 16384, 4, [1, 2, 2, 4], [32]),
    "autoencoder_vq_f16.py": (8, 16384, 8, [1, 1, 2, 2, 4], [16]),
}


def load_config(path):
    spec = importlib.util.spec_from_file_location("_zoo_" + os.path.basename(path)[:-3], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def count(tree):
    return sum(int(np.prod(p.shape)) for p in jax.tree_util.tree_leaves(tree))


def test_every_zoo_config_is_checked_against_a_released_yaml():
    assert sorted(os.path.basename(p) for p in ZOO) == sorted(RELEASED)


@pytest.mark.parametrize("path", ZOO, ids=os.path.basename)
def test_zoo_config_builds_the_released_architecture(path):
    name = os.path.basename(path)
    c = load_config(path)
    yaml_name, unet_size = RELEASED[name]
    spec = spec_from_original_config(read_original_yaml(os.path.join(ROOT, "tests", "original_configs", yaml_name)),
                                     yaml_name)

    unet_cfg = UNetConfig(**c.model.unet)  # the trainer builds UNetConfig(**model.unet)
    assert dataclasses.replace(unet_cfg, remat_blocks=False) == unet_config_from_diffusers(spec.unet)
    unet_params = unet_abstract_params(UNet(unet_cfg))  # eval_shape: nothing allocated
    if unet_size is not None:
        assert count(unet_params) == unet_size

    ae_cfg = AutoencoderConfig(**c.first_stage.autoencoder)
    assert ae_cfg == vae_config_from_diffusers(spec.vae)
    assert count(abstract_params(build_autoencoder(ae_cfg))) > 0
    assert float(c.first_stage.scale_factor) == spec.vae["scaling_factor"] and not c.first_stage.scale_by_std

    sched = spec.scheduler
    assert (c.diffusion.beta_schedule, c.diffusion.beta_start, c.diffusion.beta_end, c.diffusion.num_train_timesteps,
            c.diffusion.prediction_type) == (sched["beta_schedule"], sched["beta_start"], sched["beta_end"],
                                             sched["num_train_timesteps"], sched["prediction_type"])
    assert c.data.image_size // ae_cfg.downsample_factor == spec.sample_size  # 64, or 96 for 768-v

    # Concat conditioning (diffusion.concat) from the released U-Net's extra input channels.
    extra = spec.unet["in_channels"] - ae_cfg.embed_dim
    upscaler = spec.low_res_scheduler is not None  # LatentUpscaleDiffusion (x4): the noised low-res image
    concat = "none" if extra == 0 else "low_res" if spec.cond_stage == "identity" and extra == 3 else (
        "noise_augmented_low_res" if upscaler and extra == 3 else
        "inpainting" if spec.conditioning_key in ("concat", "hybrid") and extra == ae_cfg.embed_dim + 1 else
        "segmentation" if spec.cond_stage == "rescaler" and extra == spec.cond_stage_params["out_channels"] else "?")
    assert c.diffusion.get("concat", "none") == concat
    assert c.diffusion.get("loss_type", "l2") == original_yaml_params(yaml_name).get("loss_type", "l2")
    if concat == "noise_augmented_low_res":  # the low-res image's schedule and levels (low_scale_config)
        assert dict(c.diffusion.low_res_schedule) == {k: v for k, v in spec.low_res_scheduler.items() if v is not None}
        assert c.diffusion.max_noise_level == spec.max_noise_level

    if spec.cond_stage in ("clip", "open_clip"):
        assert c.diffusion.conditioning == "text"
        clip_cfg = CLIPTextConfig(**c.text_encoder.clip)
        assert clip_cfg.hidden_size == unet_cfg.cross_attention_dim
        ids = jax.ShapeDtypeStruct((1, clip_cfg.max_position_embeddings), jnp.int32)
        clip_params = jax.eval_shape(CLIPTextModel(clip_cfg).init, jax.random.PRNGKey(0), ids)["params"]
        assert count(clip_params) == reference_clip_size(clip_cfg)
        assert c.text_encoder.pad_token_id == (49407 if spec.cond_stage == "clip" else 0)
    elif spec.cond_stage == "bert":  # BERTEmbedder (LDM txt2img): LDMBert trained with the U-Net
        from ldm_jax.convert.ldm_bert_weights import ldm_bert_config_from_original
        from ldm_jax.models.ldm_bert import LDMBertConfig

        layout = spec.cond_stage_params.get("use_tokenizer", True) is False  # layout2img: token ids of boxes
        assert c.diffusion.conditioning == ("layout" if layout else "text") and c.text_encoder.kind == "ldm_bert"
        assert original_yaml_params(yaml_name)["cond_stage_trainable"] is True and c.text_encoder.trainable
        bert_cfg = LDMBertConfig(**c.text_encoder.ldm_bert)
        assert bert_cfg == ldm_bert_config_from_original(spec.cond_stage_params, yaml_name)
        assert bert_cfg.hidden_size == unet_cfg.cross_attention_dim
        if layout:  # taming's builder of the data: 3 x no_max_objects + 2 crop tokens over no_tokens
            from ldm_jax.data.layout_tokens import LayoutTokenBuilder

            builder = LayoutTokenBuilder.from_config(c.data.layout, no_object_classes=1)
            assert (builder.no_tokens, builder.embedding_dim) == (bert_cfg.vocab_size, bert_cfg.max_position_embeddings)
            assert c.diffusion.cond_drop_prob == 0.0
        else:
            assert c.text_encoder.tokenizer == ""  # required override: the vocabulary is not in any checkpoint
    elif spec.cond_stage == "class":  # ClassEmbedder: the label as one learned cross-attention token
        assert c.diffusion.conditioning == "class_crossattn"
        assert c.diffusion.num_classes + 1 == spec.cond_stage_params["n_classes"]
        assert spec.cond_stage_params["embed_dim"] == unet_cfg.cross_attention_dim
    elif spec.cond_stage == "identity":  # the low-res image itself is the condition (bsr_sr)
        assert c.diffusion.conditioning == "none" and concat == "low_res"
    elif spec.cond_stage == "rescaler":  # SpatialRescaler of the one-hot label map, trained (semantic synthesis)
        assert c.diffusion.conditioning == "none" and concat == "segmentation"
        assert dict(c.model.cond_stage) == spec.cond_stage_params
        assert original_yaml_params(yaml_name)["cond_stage_trainable"] is True
        assert c.data.num_classes == spec.cond_stage_params["in_channels"]
    else:
        assert spec.cond_stage == "none" and c.diffusion.conditioning == "none"


def original_yaml_params(yaml_name):
    return read_original_yaml(os.path.join(ROOT, "tests", "original_configs", yaml_name))["model"]["params"]


@pytest.mark.parametrize("name", ["ldm_sr.py", "sd_inpainting_finetune.py", "ldm_txt2img_f8.py",
                                  "sd2_x4_upscaler.py"])
def test_concat_zoo_configs_have_the_original_unet_size(name):
    """The concat-conditioned configs' U-Nets (and LDM txt2img's, context width 1280) have exactly as
    many parameters as the original openaimodel.UNetModel built from the released YAML (torch's meta
    device: no memory, no init)."""
    import torch

    import original_ckpt  # noqa: F401  (stubs the original package's training-only imports)
    from ldm.modules.diffusionmodules.openaimodel import UNetModel

    yaml_name, unet_size = RELEASED[name]
    original = read_original_yaml(os.path.join(ROOT, "tests", "original_configs", yaml_name))
    with torch.device("meta"):
        reference = UNetModel(**original["model"]["params"]["unet_config"]["params"])
    want = sum(t.numel() for t in reference.state_dict().values())
    got = count(unet_abstract_params(UNet(UNetConfig(**load_config(os.path.join(ROOT, "configs", name)).model.unet))))
    print(f"{name}: U-Net {got:,} parameters (original {want:,})")
    assert got == want == unet_size


def reference_clip_size(cfg):
    """Parameters of transformers' CLIPTextModel with the same configuration (meta device)."""
    import torch
    import transformers

    with torch.device("meta"):
        model = transformers.CLIPTextModel(transformers.CLIPTextConfig(
            vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
            num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
            max_position_embeddings=cfg.max_position_embeddings, hidden_act=cfg.hidden_act))
    return sum(p.numel() for p in model.parameters())


def test_every_first_stage_config_is_checked_against_a_released_ddconfig():
    assert sorted(os.path.basename(p) for p in FIRST_STAGE_CONFIGS) == sorted(FIRST_STAGES)


@pytest.mark.parametrize("path", FIRST_STAGE_CONFIGS, ids=os.path.basename)
def test_first_stage_config_builds_the_released_architecture(path):
    """The config's AutoencoderConfig is the one the released ddconfig converts to, and has exactly as
    many parameters as the original Encoder + Decoder (+ quant convs, codebook) built from that ddconfig
    (on torch's meta device: no memory, no init)."""
    import torch

    from original_ckpt import FirstStage

    embed_dim, n_embed, z, mult, attn = FIRST_STAGES[os.path.basename(path)]
    kind = "kl" if n_embed is None else "vq"
    ddconfig = dict(double_z=kind == "kl", z_channels=z, resolution=256, in_channels=3, out_ch=3, ch=128,
                    ch_mult=mult, num_res_blocks=2, attn_resolutions=attn, dropout=0.0)
    params = dict(embed_dim=embed_dim, ddconfig=ddconfig, **({} if n_embed is None else {"n_embed": n_embed}))
    target = "ldm.models.autoencoder." + ("AutoencoderKL" if kind == "kl" else "VQModelInterface")
    c = load_config(path)
    ours = AutoencoderConfig(**{**c.model.autoencoder, "kind": c.model.kind})  # as the autoencoder trainer builds it
    released = vae_config_from_diffusers(vae_config_from_ldm({"target": target, "params": params}, 1.0, 32, "released"))
    assert ours == released
    assert len(ours.attention_levels) == len(attn) and c.data.image_size == 256
    with torch.device("meta"), contextlib.redirect_stdout(io.StringIO()):  # the original prints shapes
        original = FirstStage(ddconfig, embed_dim, n_embed)
    want = sum(t.numel() for t in original.state_dict().values())
    got = count(abstract_params(build_autoencoder(ours)))
    print(f"{os.path.basename(path)}: {got:,} parameters (original {want:,})")
    assert got == want
