"""Train the Stable Diffusion 2 x4 upscaler (Stability-AI/stablediffusion
configs/stable-diffusion/x4-upscaling.yaml, kept verbatim in tests/original_configs/x4-upscaling.yaml):
the released architecture (U-Net 256 base channels, mult (1, 2, 2, 4), cross-attention only at the
three lower levels, 1000 class embeddings; KL-f4 autoencoder with 4 latent channels, scale 0.08333;
OpenCLIP ViT-H/14 read at the penultimate layer; CompVis "linear" 1e-4..0.02, v-prediction), 512x512
images and their 128x128 low-res versions.

The condition (``diffusion.concat="noise_augmented_low_res"``, ldm_jax/training/concat_conditioning.py;
LatentUpscaleDiffusion with ImageConcatWithNoiseAugmentation, ``hybrid-adm``) is the image
box-filtered 4x to the latent size, in [-1, 1], noised under ``diffusion.low_res_schedule`` at a
level drawn per example in [0, max_noise_level=350), the level the U-Net's class label (noise
conditioning augmentation, Ho et al. 2021 Sec. 4.1); 10% of captions dropped for CFG. The released
model was trained on degraded inputs (LAION, "lr" from its data pipeline); a data source that yields
its own ``"low_res"`` images is used as given.

Fine-tune the released model with ``--config.init.checkpoint=x4-upscaler-ema.ckpt
--config.init.original_config=x4-upscaling.yaml`` (ldm_jax/training/init_checkpoint.py): its U-Net starts
training, its KL-f4 autoencoder (scale factor 0.08333) and OpenCLIP encoder are the frozen stages, and the
step noises the low-res image with the file's low_scale_config. ``diffusion.low_res_schedule`` /
``max_noise_level`` below are the released values, so they agree with that file; for another upscaler
file set them to None (its values are then taken) or to its values (a disagreement is an error).

    python train.py --config configs/sd2_x4_upscaler.py --workdir /ckpt/x4 \\
        --config.first_stage.checkpoint=/ckpt/x4_vae --config.text_encoder.checkpoint=/ckpt/open_clip_h \\
        --config.data.path=/data/captioned_images
    python sample.py --checkpoint /ckpt/x4 --prompt "a cat" --cond-img low_res_128.png --noise-level 20
"""
import importlib.util
import os

# unet_config of x4-upscaling.yaml (checked against it by tests/test_zoo_configs.py)
X4_UNET = dict(
    in_channels=7, out_channels=4, block_out_channels=(256, 512, 512, 1024),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    mid_block_type="UNetMidBlock2DCrossAttn", mid_block_attention=False, layers_per_block=2, num_heads=8,
    head_dim=None, cross_attention_dim=1024, only_cross_attention=(True, True, True, False),
    use_linear_projection=True, num_class_embeds=1000, norm_num_groups=32, norm_eps=1e-5, flip_sin_to_cos=True,
    freq_shift=0,
)
# its first_stage_config: KL-f4, 4 latent channels, no attention levels
X4_VAE = dict(kind="kl", in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512),
              layers_per_block=2, norm_num_groups=32, mid_block_attention=True, scaling_factor=0.08333)
# its low_scale_config (ImageConcatWithNoiseAugmentation) as a diffusers scheduler config
LOW_RES_SCHEDULE = dict(_class_name="DDPMScheduler", num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02,
                        beta_schedule="scaled_linear")


def _load(name):
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), name)
    spec = importlib.util.spec_from_file_location("_zoo_base_" + name[:-3], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def get_config(arg: str = ""):
    sd1, sd2 = _load("sd1_finetune.py"), _load("sd2_v_finetune.py")
    c = sd1.sd_base(X4_UNET, X4_VAE, sd2.OPEN_CLIP_H_PENULTIMATE, image_size=512, pad_token_id=0,
                    prediction_type="v_prediction")
    c.diffusion.beta_start = 1e-4
    c.diffusion.beta_end = 0.02
    c.diffusion.concat = "noise_augmented_low_res"
    # With init.checkpoint these must agree with the file's low_scale_config (None: take the file's).
    c.diffusion.low_res_schedule = dict(LOW_RES_SCHEDULE)
    c.diffusion.max_noise_level = 350
    c.sample.images = ()               # image files whose 128x128 versions the sample grids upscale
    c.sample.guidance_scale = 9.0
    if arg:
        raise ValueError(f"unknown preset {arg!r}")
    return c
