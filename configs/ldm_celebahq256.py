"""Unconditional LDM-VQ-4 on CelebA-HQ 256 (Rombach et al. 2022, Table 1 / Sec. 4.1; CompVis
configs/latent-diffusion/celebahq-ldm-vq-4.yaml): the released architecture exactly (274M U-Net
with 32-channel AttentionBlock heads at 1/2, 1/4, 1/8 of the 64x64 latents, VQ-f4 first stage
with 8192 codes, CompVis "linear" schedule 0.0015..0.0195, eps-prediction, scale factor 1).

    python train.py --config configs/ldm_celebahq256.py --workdir /ckpt/celebahq \
        --config.first_stage.checkpoint=/ckpt/vq_f4 --config.data.path=/data/celeba_hq_256

``first_stage.checkpoint``: a trained VQ-f4 (configs/autoencoder_vq_f4.py workdir, or a diffusers
``vqvae/`` folder, e.g. written by ``save_diffusers`` from the released LDM). Learning rate as
CompVis main.py's scale_lr: base_learning_rate 2e-6 x batch 48 = 9.6e-5 (the paper's value),
AdamW, EMA 0.9999. Sample with ``python sample.py --checkpoint WORKDIR`` (no prompt).
"""
import importlib.util
import os

# model.unet: UNetConfig fields of celebahq-ldm-vq-4.yaml's unet_config (tests/test_zoo_configs.py)
CELEBAHQ_UNET = dict(
    in_channels=3, out_channels=3, block_out_channels=(224, 448, 672, 896),
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    mid_block_type="UNetMidBlock2D", mid_block_attention=True, layers_per_block=2,
    num_heads=None, head_dim=32, cross_attention_dim=None, norm_num_groups=32, norm_eps=1e-5,
    flip_sin_to_cos=True, freq_shift=0,
)
# first_stage_config: VQModelInterface, embed_dim 3, n_embed 8192, ch 128, ch_mult (1, 2, 4)
VQ_F4 = dict(kind="vq", in_channels=3, out_channels=3, latent_channels=3, block_out_channels=(128, 256, 512),
             layers_per_block=2, norm_num_groups=32, mid_block_attention=True, num_vq_embeddings=8192,
             vq_embed_dim=3, scaling_factor=1.0)


def _emoji_ldm():
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "emoji_ldm.py")
    spec = importlib.util.spec_from_file_location("_emoji_ldm_base", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def get_config(arg: str = ""):
    c = _emoji_ldm().get_config()
    c.model.dtype = "bfloat16"
    c.model.unet = dict(CELEBAHQ_UNET)
    c.data.name = "folder"
    c.data.path = ""                  # CelebA-HQ 256x256 images
    c.data.image_size = 256
    c.data.random_flip = True
    c.first_stage.checkpoint = ""     # trained VQ-f4 (required)
    c.first_stage.random_init = False
    c.first_stage.autoencoder = dict(VQ_F4)
    c.first_stage.scale_by_std = False
    c.first_stage.scale_factor = 1.0  # LatentDiffusion's default; the YAML sets none
    c.diffusion.conditioning = "none"
    c.diffusion.num_train_timesteps = 1000
    c.diffusion.beta_schedule = "scaled_linear"  # CompVis "linear"
    c.diffusion.beta_start = 0.0015
    c.diffusion.beta_end = 0.0195
    c.diffusion.prediction_type = "epsilon"
    c.diffusion.cond_drop_prob = 0.0
    c.train.num_steps = 500_000
    c.train.batch_size = 48
    c.train.lr = 2e-6 * 48            # CompVis scale_lr: base_learning_rate x batch
    c.train.lr_schedule = "constant"
    c.train.warmup_steps = 0
    c.train.weight_decay = 0.01       # torch.optim.AdamW's default
    c.train.grad_clip = 0.0
    c.train.ema_decay = 0.9999
    c.train.log_every = 100
    c.train.checkpoint_every = 5000
    c.train.sample_every = 10_000
    c.sample.num_images = 4
    c.sample.num_inference_steps = 200
    c.sample.guidance_scale = 1.0
    if arg:
        raise ValueError(f"unknown preset {arg!r}")
    return c
