"""Tiny random-weight Stable Diffusion pipelines in diffusers format, for end-to-end tests.

Everything is built from PyPI code with fixed seeds; nothing is downloaded.
"""
from __future__ import annotations

import json
import os

import numpy as np
import torch

from ldm_jax.text.tokenizer import EOT_TOKEN, SOT_TOKEN, read_bpe_merges, vocab_from_merges

SD_SCHEDULER = dict(
    beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
    skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False,
)


def write_tokenizer_folder(folder: str, pad_token: str = "<|endoftext|>") -> str:
    """A transformers CLIPTokenizer folder made from the vendored CLIP BPE merges."""
    os.makedirs(folder, exist_ok=True)
    merges = read_bpe_merges()
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab_from_merges(merges), f, ensure_ascii=False)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({"pad_token": pad_token, "model_max_length": 77, "bos_token": SOT_TOKEN,
                   "eos_token": EOT_TOKEN, "unk_token": EOT_TOKEN}, f)
    return folder


def _perturb(module: torch.nn.Module, seed: int, scale: float = 0.05) -> None:
    """Add noise to every parameter (norm gains, biases, zero-initialised layers
    included), so that a wrong mapping of any weight shows in the outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)


def tiny_sd_pipeline(folder: str, *, unet_in_channels: int = 4, prediction_type: str = "epsilon",
                     sd2: bool = False, seed: int = 0):
    """Build, save (save_pretrained, safetensors) and return a diffusers StableDiffusionPipeline.

    VAE factor 2 with 4 latent channels; U-Net with one cross-attention level.
    ``unet_in_channels=9`` makes an inpainting U-Net; ``sd2`` uses linear projections,
    per-block head dims and upcast attention like SD 2.x.
    """
    from diffusers import (AutoencoderKL, PNDMScheduler, StableDiffusionInpaintPipeline,
                           StableDiffusionPipeline, UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=unet_in_channels, out_channels=4, block_out_channels=(32, 64),
        layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
        attention_head_dim=(2, 4) if sd2 else 4, use_linear_projection=sd2, upcast_attention=sd2,
        norm_num_groups=8,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32),
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1, norm_num_groups=8, sample_size=16,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, hidden_act="gelu" if sd2 else "quick_gelu", bos_token_id=49406,
        eos_token_id=49407, pad_token_id=0 if sd2 else 49407))
    for i, m in enumerate((unet, vae, text_encoder)):
        _perturb(m, seed + 100 + i)
    tok_dir = write_tokenizer_folder(os.path.join(folder, "_tok"), pad_token="!" if sd2 else "<|endoftext|>")
    tokenizer = CLIPTokenizer.from_pretrained(tok_dir)
    scheduler = PNDMScheduler(**SD_SCHEDULER, prediction_type=prediction_type)
    cls = StableDiffusionInpaintPipeline if unet_in_channels == 9 else StableDiffusionPipeline
    pipe = cls(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
               safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(folder, safe_serialization=True)
    # The published SD 1.x scheduler config also says clip_sample: false (read by DDIM/DDPM).
    config_path = os.path.join(folder, "scheduler", "scheduler_config.json")
    with open(config_path) as f:
        config = json.load(f)
    config["clip_sample"] = False
    with open(config_path, "w") as f:
        json.dump(config, f, indent=2)
    return pipe


def nchw(x_bhwc: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(np.asarray(x_bhwc).transpose(0, 3, 1, 2)))


def nhwc(x) -> np.ndarray:
    return np.asarray(x).transpose(0, 2, 3, 1)


class NoiseQueue:
    """Stands in for diffusers' ``randn_tensor``: returns the given arrays in order,
    so a diffusers run consumes exactly the noise this project draws."""

    def __init__(self, arrays_bhwc):
        self.arrays = [np.asarray(a) for a in arrays_bhwc]
        self.calls = 0

    def __call__(self, shape, generator=None, device=None, dtype=None, layout=None, **kw):
        if self.calls >= len(self.arrays):
            raise AssertionError(f"diffusers drew more noise than expected ({self.calls + 1} draws)")
        arr = self.arrays[self.calls]
        self.calls += 1
        t = nchw(arr) if arr.ndim == 4 else torch.from_numpy(arr)
        assert tuple(t.shape) == tuple(shape), (t.shape, shape)
        return t.to(dtype or torch.float32)
