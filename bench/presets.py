"""Benchmark presets: model shapes, batch sizes, step counts and repetitions.

``cpu``: a mid-size Stable-Diffusion-shaped model that a 2-core machine runs in
a few minutes. Same block structure as SD1.5 (four resolution levels, three
cross-attention levels, 2 resnets per down block, 8 heads, context 77x768 from a
CLIP-L-shaped text encoder), channel widths divided by 2.5 and 32x32 latents
(256x256 images). float32 (XLA:CPU and PyTorch CPU are both fastest in float32
on most CPUs; bf16 is a GPU/TPU setting).

``tiny``: a plumbing check of every section (numbers meaningless).

``gpu``: SD1.5 shapes (the anchors in /work/shared/anchors): U-Net 320/640/1280/1280,
the SD VAE, CLIP-L text encoder, 64x64x4 latents (512x512 images), bf16 compute
(float32 master weights for training, bf16 autocast in PyTorch), B2 and B16,
50-step txt2img.
"""
from __future__ import annotations

import dataclasses
from typing import Tuple


@dataclasses.dataclass(frozen=True)
class Preset:
    name: str
    block_out_channels: Tuple[int, ...]   # U-Net widths per resolution level
    layers_per_block: int                 # resnets per down block
    heads: int                            # attention heads (diffusers attention_head_dim)
    context_dim: int                      # cross-attention / text-encoder width
    context_len: int                      # text tokens
    latent: int                           # latent side (image side = latent * vae factor)
    unet_batches: Tuple[int, ...]         # U-Net forward rows
    train_batch: int                      # training-step batch
    dtype: str                            # compute dtype
    vae_channels: Tuple[int, ...]         # VAE widths (len - 1 = number of 2x upsamplings)
    vae_layers: int                       # VAE resnets per block
    text_layers: int                      # CLIP text-encoder layers
    text_heads: int
    text_ffn: int
    txt2img_steps: int                    # sampler steps for the text-to-image row
    vae_batch: int                        # latents per VAE decode
    reps: int                             # timed repetitions (median reported)
    train_reps: int
    txt2img_reps: int

    def unet_config(self) -> dict:
        """``UNetConfig`` keyword arguments (the diffusers config maps onto the same)."""
        n = len(self.block_out_channels)
        return dict(
            block_out_channels=self.block_out_channels, layers_per_block=self.layers_per_block,
            down_block_types=("CrossAttnDownBlock2D",) * (n - 1) + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n - 1),
            num_heads=self.heads, cross_attention_dim=self.context_dim,
        )

    def diffusers_unet_config(self) -> dict:
        n = len(self.block_out_channels)
        return dict(
            sample_size=self.latent, in_channels=4, out_channels=4,
            block_out_channels=self.block_out_channels, layers_per_block=self.layers_per_block,
            down_block_types=("CrossAttnDownBlock2D",) * (n - 1) + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n - 1),
            cross_attention_dim=self.context_dim, attention_head_dim=self.heads,
        )

    @property
    def vae_factor(self) -> int:
        return 2 ** (len(self.vae_channels) - 1)

    @property
    def image_size(self) -> int:
        return self.latent * self.vae_factor


PRESETS = {
    "cpu": Preset(
        name="cpu", block_out_channels=(128, 256, 512, 512), layers_per_block=1, heads=8,
        context_dim=768, context_len=77, latent=32, unet_batches=(2, 16), train_batch=4, dtype="float32",
        vae_channels=(64, 128, 256, 256), vae_layers=2, text_layers=12, text_heads=12, text_ffn=3072,
        txt2img_steps=4, vae_batch=1, reps=5, train_reps=4, txt2img_reps=3,
    ),
    # A dry run of the whole suite in about a minute (plumbing check, numbers meaningless).
    "tiny": Preset(
        name="tiny", block_out_channels=(32, 64, 64, 64), layers_per_block=1, heads=8,
        context_dim=32, context_len=77, latent=16, unet_batches=(2,), train_batch=2, dtype="float32",
        vae_channels=(32, 32), vae_layers=1, text_layers=2, text_heads=4, text_ffn=64,
        txt2img_steps=2, vae_batch=1, reps=3, train_reps=2, txt2img_reps=2,
    ),
    # The gpu preset's code paths (bfloat16 compute, float32 master weights in training) at tiny
    # shapes: a CPU dry run of what a GPU session will execute.
    "gpu_dry": Preset(
        name="gpu_dry", block_out_channels=(32, 64, 64, 64), layers_per_block=1, heads=8,
        context_dim=32, context_len=77, latent=16, unet_batches=(2, 4), train_batch=4, dtype="bfloat16",
        vae_channels=(32, 32), vae_layers=1, text_layers=2, text_heads=4, text_ffn=64,
        txt2img_steps=3, vae_batch=1, reps=3, train_reps=2, txt2img_reps=2,
    ),
    "gpu": Preset(
        name="gpu", block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, heads=8,
        context_dim=768, context_len=77, latent=64, unet_batches=(2, 16), train_batch=16, dtype="bfloat16",
        vae_channels=(128, 256, 512, 512), vae_layers=2, text_layers=12, text_heads=12, text_ffn=3072,
        txt2img_steps=50, vae_batch=1, reps=20, train_reps=10, txt2img_reps=5,
    ),
}
