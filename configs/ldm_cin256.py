"""Class-conditional LDM-VQ-4 on ImageNet 256 (Rombach et al. 2022, Sec. 4.3 / Table 3; CompVis
configs/latent-diffusion/cin256-v2.yaml): the released architecture exactly (U-Net with cross-attention
at 1/2, 1/4, 1/8 of the 64x64x3 latents, one head, context width 512; VQ-f4 first stage with 8192
codes; CompVis "linear" schedule 0.0015..0.0195, eps-prediction, scale factor 1).

The label reaches the U-Net through cross-attention, as a learned 512-wide token (the LDM
``ClassEmbedder``, ``cond_stage_trainable: true``): ``diffusion.conditioning="class_crossattn"``
trains the 1001-row table (1000 classes + the unconditional label the CFG dropout uses) jointly
with the U-Net.

    python train.py --config configs/ldm_cin256.py --workdir /ckpt/cin256 \\
        --config.first_stage.checkpoint=/ckpt/vq_f4 --config.data.path=/data/imagenet/train
    python sample.py --checkpoint /ckpt/cin256 --class_label 207 --scale 3.0 --steps 50

``data.path``: a folder with one sub-folder per class (``data.folder_labels``: label = index of
the sorted sub-folder names), or ``data.name``/``data.label_key`` for a TFDS dataset. Fine-tune
the released model with ``--config.init.checkpoint=cin256-v2.ckpt
--config.init.original_config=cin256-v2.yaml`` (its VQ-f4 and class table then come from the
file). Optimiser: AdamW at the YAML's base_learning_rate 1e-4 (not multiplied by the batch: the
YAML ships no data section to scale it by), EMA 0.9999, 10% label dropout for guidance.
"""
import importlib.util
import os

# model.unet: UNetConfig fields of cin256-v2.yaml's unet_config (tests/test_zoo_configs.py)
CIN256_UNET = dict(
    in_channels=3, out_channels=3, block_out_channels=(192, 384, 576, 960),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    mid_block_type="UNetMidBlock2DCrossAttn", mid_block_attention=False, layers_per_block=2,
    transformer_layers_per_block=1, num_heads=1, cross_attention_dim=512, use_linear_projection=False,
    norm_num_groups=32, norm_eps=1e-5, flip_sin_to_cos=True, freq_shift=0,
)


def _load(name):
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), name)
    spec = importlib.util.spec_from_file_location("_zoo_base_" + name[:-3], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def get_config(arg: str = ""):
    celebahq = _load("ldm_celebahq256.py")
    c = celebahq.get_config()          # the same VQ-f4 first stage, schedule and optimiser
    c.model.unet = dict(CIN256_UNET)
    c.data.path = ""                   # ImageNet train: one sub-folder per class
    c.data.folder_labels = True
    c.data.random_flip = True
    c.first_stage.autoencoder = dict(celebahq.VQ_F4)
    c.diffusion.conditioning = "class_crossattn"
    c.diffusion.num_classes = 1000     # + the unconditional label: ClassEmbedder n_classes 1001
    c.diffusion.cond_drop_prob = 0.1   # the released model samples with CFG (scale 3.0 in the paper)
    c.train.batch_size = 64
    c.train.lr = 1e-4
    c.sample.class_labels = (88, 207, 360, 979)
    c.sample.num_inference_steps = 50
    c.sample.guidance_scale = 3.0
    if arg:
        raise ValueError(f"unknown preset {arg!r}")
    return c
