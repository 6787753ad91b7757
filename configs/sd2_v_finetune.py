"""Fine-tune Stable Diffusion 2.x 768-v (Stability-AI/stablediffusion
configs/stable-diffusion/v2-inference-v.yaml): the released architecture exactly (865M U-Net with
linear projections and 64-channel heads, KL-f8 autoencoder, OpenCLIP ViT-H/14 text tower read at
the penultimate layer, v-prediction), 768x768 images.

As configs/sd1_finetune.py (see there for the frozen stages and the U-Net initialisation):

    python train.py --config configs/sd2_v_finetune.py --workdir /ckpt/sd2v_ft \
        --config.init.checkpoint=768-v-ema.ckpt --config.init.original_config=v2-inference-v.yaml \
        --config.data.path=/data/captioned_images

or from a diffusers folder written with ``ldm_jax.convert.save_diffusers(load_pipeline(...), "sd21v")``.
From a diffusers folder, save_diffusers writes the penultimate-layer OpenCLIP tower as diffusers does for SD 2.x: 23
layers read at the last one, which is what ``text_encoder.clip`` describes below. The
tokenizer pads with 0 (open_clip.tokenize).
"""
import importlib.util
import os

# model.unet: UNetConfig fields of v2-inference-v.yaml's unet_config (num_head_channels 64 ->
# 5/10/20/20 heads); checked against the released YAML by tests/test_zoo_configs.py.
SD2_UNET = dict(
    in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    mid_block_type="UNetMidBlock2DCrossAttn", mid_block_attention=False, layers_per_block=2,
    transformer_layers_per_block=1, num_heads=(5, 10, 20, 20), cross_attention_dim=1024,
    use_linear_projection=True, norm_num_groups=32, norm_eps=1e-5, flip_sin_to_cos=True, freq_shift=0,
)
# FrozenOpenCLIPEmbedder(layer="penultimate") as diffusers stores it: 23 of ViT-H-14's 24 blocks
OPEN_CLIP_H_PENULTIMATE = dict(vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_layers=23,
                               num_heads=16, max_position_embeddings=77, hidden_act="gelu", layer_norm_eps=1e-5,
                               output_layer="last")


def _sd1():
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sd1_finetune.py")
    spec = importlib.util.spec_from_file_location("_sd1_finetune", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def get_config(arg: str = ""):
    sd1 = _sd1()
    c = sd1.sd_base(SD2_UNET, sd1.SD_VAE, OPEN_CLIP_H_PENULTIMATE, image_size=768, pad_token_id=0,
                    prediction_type="v_prediction")
    c.sample.guidance_scale = 9.0
    if arg:
        raise ValueError(f"unknown preset {arg!r}")
    return c
