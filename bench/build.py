"""A random-weight Stable-Diffusion-shaped diffusers folder for a benchmark preset.

Both sides of every benchmark row load these same weights: PyTorch through
diffusers ``from_pretrained``, this project through ``ldm_jax.load_pipeline`` /
``load_unet``. Built once per preset (seeded) and reused from ``folder``.
"""
from __future__ import annotations

import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from bench.presets import Preset  # noqa: E402

STAMP = "bench_preset.json"


def build_folder(preset: Preset, folder: str, seed: int = 0) -> str:
    """Write (or reuse) ``folder`` with unet/, vae/, text_encoder/, tokenizer/, scheduler/."""
    stamp_path = os.path.join(folder, STAMP)
    want = {"preset": preset.name, "fields": repr(preset), "seed": seed}
    if os.path.isfile(stamp_path):
        with open(stamp_path) as f:
            if json.load(f) == want:
                return folder
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from tests.tiny_sd import SD_SCHEDULER, write_tokenizer_folder

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**preset.diffusers_unet_config())
    n = len(preset.vae_channels)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=preset.vae_channels,
        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
        layers_per_block=preset.vae_layers, norm_num_groups=32, sample_size=preset.image_size,
        scaling_factor=0.18215,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=preset.context_dim, intermediate_size=preset.text_ffn,
        num_hidden_layers=preset.text_layers, num_attention_heads=preset.text_heads,
        max_position_embeddings=preset.context_len, hidden_act="quick_gelu",
        bos_token_id=49406, eos_token_id=49407, pad_token_id=49407))
    tokenizer = CLIPTokenizer.from_pretrained(write_tokenizer_folder(os.path.join(folder, "_tok")))
    scheduler = DDIMScheduler(**{k: v for k, v in SD_SCHEDULER.items() if k != "skip_prk_steps"},
                              clip_sample=False)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(folder, safe_serialization=True)
    with open(stamp_path, "w") as f:
        json.dump(want, f)
    return folder
