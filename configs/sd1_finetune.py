"""Fine-tune Stable Diffusion 1.x (Rombach et al. 2022; CompVis/stable-diffusion
configs/stable-diffusion/v1-inference.yaml): the released architecture exactly (860M U-Net,
KL-f8 autoencoder, CLIP ViT-L/14 text encoder, eps-prediction, CompVis "linear" = diffusers
"scaled_linear" 0.00085..0.012), on an image folder with captions.

Start from the released file: its U-Net weights start training, its autoencoder and text
encoder become the frozen stages (init.checkpoint, ldm_jax/training/init_checkpoint.py; a
pickled .ckpt is read without executing anything):

    python train.py --config configs/sd1_finetune.py --workdir /ckpt/sd1_ft \
        --config.init.checkpoint=v1-5-pruned-emaonly.safetensors --config.data.path=/data/captioned_images

(a diffusers folder works too; ``--config.init.original_config=v1-inference.yaml`` when the keys
alone do not say which model it is). Without init.checkpoint the frozen stages must be given as
diffusers ``vae/`` / transformers ``text_encoder/`` folders (first_stage.checkpoint,
text_encoder.checkpoint, text_encoder.tokenizer) and the U-Net trains from scratch.
Optimiser as the CompVis training configs: AdamW at
1e-4 with 10k linear warm-up steps (LambdaLinearScheduler), EMA 0.9999, 10% caption dropout.
"""
import importlib.util
import os

# model.unet: UNetConfig fields of v1-inference.yaml's unet_config (tests/test_zoo_configs.py
# checks them against the translation of the released YAML).
SD1_UNET = dict(
    in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    mid_block_type="UNetMidBlock2DCrossAttn", mid_block_attention=False, layers_per_block=2,
    transformer_layers_per_block=1, num_heads=8, cross_attention_dim=768, use_linear_projection=False,
    norm_num_groups=32, norm_eps=1e-5, flip_sin_to_cos=True, freq_shift=0,
)
# first_stage_config: KL-f8, z_channels 4, ch 128, ch_mult (1, 2, 4, 4), scale_factor 0.18215
SD_VAE = dict(kind="kl", in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
              layers_per_block=2, norm_num_groups=32, mid_block_attention=True, scaling_factor=0.18215)
# FrozenCLIPEmbedder: openai/clip-vit-large-patch14 text tower, last layer
CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_layers=12, num_heads=12,
              max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5, output_layer="last")


def _emoji_ldm():
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "emoji_ldm.py")
    spec = importlib.util.spec_from_file_location("_emoji_ldm_base", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def sd_base(unet, vae, clip, *, image_size, pad_token_id, prediction_type):
    """Settings shared by the Stable Diffusion fine-tuning configs."""
    c = _emoji_ldm().get_config()
    c.model.dtype = "bfloat16"
    c.model.remat = True
    c.model.unet = dict(unet)
    c.data.name = "folder"
    c.data.path = ""                  # images with .txt / captions.jsonl / captions.csv captions
    c.data.image_size = image_size
    c.data.random_flip = False        # captions can name sides
    c.first_stage.checkpoint = ""     # diffusers vae/ folder ("" = init.checkpoint's autoencoder)
    c.first_stage.random_init = False
    c.first_stage.autoencoder = dict(vae)
    c.first_stage.scale_by_std = False
    c.first_stage.scale_factor = vae["scaling_factor"]
    c.first_stage.sample_posterior = True  # LatentDiffusion.get_first_stage_encoding samples
    c.text_encoder.checkpoint = ""    # transformers CLIPTextModel folder ("" = init.checkpoint's)
    c.text_encoder.tokenizer = ""     # its tokenizer/ folder ("" = vendored CLIP BPE)
    c.text_encoder.clip = dict(clip)
    c.text_encoder.max_length = 77
    c.text_encoder.pad_token_id = pad_token_id
    c.diffusion.conditioning = "text"
    c.diffusion.num_train_timesteps = 1000
    c.diffusion.beta_schedule = "scaled_linear"  # CompVis "linear": linspace(sqrt(b0), sqrt(b1)) ** 2
    c.diffusion.beta_start = 0.00085
    c.diffusion.beta_end = 0.012
    c.diffusion.prediction_type = prediction_type
    c.diffusion.cond_drop_prob = 0.1
    c.train.num_steps = 100_000
    c.train.batch_size = 256
    c.train.lr = 1e-4                 # base_learning_rate of the SD configs (not scaled by the batch)
    c.train.lr_schedule = "constant"
    c.train.warmup_steps = 10_000     # LambdaLinearScheduler warm_up_steps
    c.train.weight_decay = 0.01       # torch.optim.AdamW's default
    c.train.grad_clip = 0.0           # Lightning's default: no clipping
    c.train.ema_decay = 0.9999
    c.train.log_every = 100
    c.train.checkpoint_every = 2000
    c.train.sample_every = 5000
    c.sample.prompts = ("a photograph of an astronaut riding a horse", "a red apple on a wooden table")
    c.sample.num_inference_steps = 50
    c.sample.guidance_scale = 7.5
    return c


def get_config(arg: str = ""):
    c = sd_base(SD1_UNET, SD_VAE, CLIP_L, image_size=512, pad_token_id=49407, prediction_type="epsilon")
    if arg:
        raise ValueError(f"unknown preset {arg!r}")
    return c
