"""4x super-resolution LDM-VQ-4 (Rombach et al. 2022, Sec. 4.4 / Fig. 10; CompVis/latent-diffusion
models/ldm/bsr_sr/config.yaml, commit 8c4bf443, kept verbatim in tests/original_configs/bsr_sr-config.yaml):
the released architecture exactly (114M U-Net: 160 base channels, mult (1, 2, 2, 4), two res blocks per
level, 32-channel attention heads at 1/8 of the 64x64 latents and in the middle block; VQ-f4 first stage
with 8192 codes; CompVis "linear" schedule 0.0015..0.0155, eps-prediction, scale factor 1).

The condition (``diffusion.concat="low_res"``, ldm_jax/training/concat_conditioning.py) is the training
image box-filtered 4x (the autoencoder factor) to the 64x64 latent size, in [-1, 1], concatenated to the
noisy latents: U-Net in_channels = 3 + 3. The released model was trained on OpenImages 256x256 crops
degraded with BSRGAN's "bsrgan_light" pipeline (random blur, noise, JPEG and resize kernels) rather than
this clean downsample; a data source that yields its own ``"low_res"`` images per example is used as given.

    python train.py --config configs/ldm_sr.py --workdir /ckpt/sr \\
        --config.first_stage.checkpoint=/ckpt/vq_f4 --config.data.path=/data/openimages_256
    python sample.py --checkpoint /ckpt/sr --cond-img low_res_64x64.png --scale 1 --steps 100   # 256x256 out
    python train.py --config configs/ldm_sr.py:runlocal --workdir /tmp/sr_smoke               # CPU smoke run

``data.precompute_latents=True`` works here (the cache also stores the low-res images). Fine-tune the
released model with ``--config.init.checkpoint=bsr_sr.ckpt --config.init.original_config=bsr_sr.yaml``
(its VQ-f4 then comes from the file). Learning rate as CompVis main.py's scale_lr: base_learning_rate
1e-6 x batch 64 = 6.4e-5, AdamW, EMA 0.9999; no classifier-free guidance (nothing to drop).
"""
import importlib.util
import os

# model.unet: UNetConfig fields of bsr_sr's unet_config (attention_resolutions [16, 8] at image_size 64:
# ds 8 is level 3; ds 16 does not occur with 4 levels); tests/test_zoo_configs.py checks them.
SR_UNET = dict(
    in_channels=6, out_channels=3, block_out_channels=(160, 320, 320, 640),
    down_block_types=("DownBlock2D", "DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D"),
    mid_block_type="UNetMidBlock2D", mid_block_attention=True, layers_per_block=2,
    num_heads=None, head_dim=32, cross_attention_dim=None, norm_num_groups=32, norm_eps=1e-5,
    flip_sin_to_cos=True, freq_shift=0,
)


def _load(name):
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), name)
    spec = importlib.util.spec_from_file_location("_zoo_base_" + name[:-3], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def get_config(arg: str = ""):
    celebahq = _load("ldm_celebahq256.py")
    c = celebahq.get_config()          # VQ-f4 first stage, scale factor 1, eps-prediction, AdamW
    c.model.unet = dict(SR_UNET)
    c.data.path = ""                   # high-resolution training images (OpenImages in the paper)
    c.data.image_size = 256            # the output size; the condition is 64x64
    c.data.random_flip = True
    c.first_stage.autoencoder = dict(celebahq.VQ_F4)
    c.diffusion.conditioning = "none"
    c.diffusion.concat = "low_res"
    c.diffusion.beta_start = 0.0015
    c.diffusion.beta_end = 0.0155
    c.diffusion.cond_drop_prob = 0.0
    c.train.batch_size = 64
    c.train.lr = 1e-6 * 64             # CompVis scale_lr: base_learning_rate x batch
    c.sample.images = ()               # image files whose low-res versions the sample grids upscale
    c.sample.num_inference_steps = 100
    if arg == "runlocal":
        # A few-step CPU smoke run: synthetic 16x16 squares, a random factor-2 KL first stage (8x8x4
        # latents, 8x8 condition), a tiny U-Net with in_channels 4 + 3.
        local = _load("emoji_ldm.py").get_config("runlocal")
        for key in ("data", "mesh", "first_stage", "train", "model"):
            c[key] = local[key]
        c.data.precompute_latents = False
        c.model.unet = dict(local.model.unet, in_channels=7, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                            up_block_types=("AttnUpBlock2D", "UpBlock2D"), mid_block_type="UNetMidBlock2D",
                            mid_block_attention=True, num_heads=None, head_dim=16, cross_attention_dim=None)
        c.sample.num_images = 2
        c.sample.num_inference_steps = 4
    elif arg:
        raise ValueError(f"unknown preset {arg!r}; expected '' or 'runlocal'")
    return c
