"""Semantic synthesis LDM-VQ-4 (Rombach et al. 2022, Sec. 4.3.2 / Fig. 9: images from semantic label
maps; CompVis models/ldm/semantic_synthesis256/config.yaml, the landscapes model semantic_synthesis512
has the same model part at 512): the released architecture exactly (215M U-Net: 128 base channels,
mult (1, 4, 8), two res blocks per level, attention only in the middle block (attention_resolutions
32, 16, 8 never occur with three levels), 8 heads; VQ-f4 first stage with 8192 codes; CompVis
"linear" schedule 0.0015..0.0205, eps-prediction, ``loss_type: l1``, scale factor 1).

The condition (``diffusion.concat="segmentation"``): the label map one-hot over 182 classes
(``np.eye(182)[labels]``, the landscape maps of taming's ``sflckr`` data) through the trained
``SpatialRescaler`` cond stage (``model.cond_stage``: two bilinear halvings 256 -> 64, then a 1x1
conv to 3 channels, trained with the U-Net: ``cond_stage_trainable``), concatenated to the 3 latent
channels: U-Net in_channels 6. No classifier-free guidance (nothing is dropped).

Data (``data.name="segmentation_folder"``, ldm_jax/data/segmentation.py): ``data.path`` with
``images/`` and ``labels/`` (a single-channel PNG of class indices per image, same stem);
``data.ignore_label`` / ``data.shift_labels`` for maps with an "unlabeled" value (COCO-stuff: 255).
Random 256 crops of the shorter-side-resized image, the label map cropped with it (nearest):

    python train.py --config configs/ldm_semantic_synthesis.py --workdir /ckpt/semantic \\
        --config.first_stage.checkpoint=/ckpt/vq_f4 --config.data.path=/data/landscapes
    python sample.py --checkpoint /ckpt/semantic --segmentation labels.png --steps 200   # 256x256 out
    python train.py --config configs/ldm_semantic_synthesis.py:runlocal --workdir /tmp/sem  # CPU smoke run

The workdir loads with ``ldm_jax.load_pipeline(workdir)`` and samples with ``pipe([""],
segmentation=labels)`` (integer maps or one-hot at the image size). Learning rate as CompVis
main.py's scale_lr: base_learning_rate 1e-6 x batch 8 (semantic_synthesis512's data batch_size),
AdamW, EMA 0.9999. Fine-tuning the released checkpoint (its U-Net, its VQ-f4 first stage frozen, its
rescaler's weights the start of the trained one; this config's architecture and rescaler are the
file's, which is checked; see ldm_jax/training/init_checkpoint.py):

    python train.py --config configs/ldm_semantic_synthesis.py --workdir /ckpt/semantic_ft \
        --config.init.checkpoint=semantic_synthesis256/model.ckpt \
        --config.init.original_config=semantic_synthesis256/config.yaml --config.data.path=/data/landscapes
"""
import importlib.util
import os

from ml_collections import config_dict

# model.unet: UNetConfig fields of semantic_synthesis256's unet_config (in_channels 6, model_channels 128,
# channel_mult [1, 4, 8], num_res_blocks 2, num_heads 8; tests/test_semantic_layout_training.py checks the
# parameter count, 215,229,315, against the original UNetModel).
SEMANTIC_UNET = dict(
    in_channels=6, out_channels=3, block_out_channels=(128, 512, 1024),
    down_block_types=("DownBlock2D", "DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D", "UpBlock2D"),
    mid_block_type="UNetMidBlock2D", mid_block_attention=True, layers_per_block=2,
    num_heads=None, head_dim=(16, 64, 128), cross_attention_dim=None, norm_num_groups=32, norm_eps=1e-5,
    flip_sin_to_cos=True, freq_shift=0,
)
# cond_stage_config: SpatialRescaler(n_stages=2, in_channels=182, out_channels=3); method / multiplier at
# their defaults (bilinear, 0.5), no bias.
SEMANTIC_COND_STAGE = dict(n_stages=2, method="bilinear", multiplier=0.5, in_channels=182, out_channels=3, bias=False)


def _load(name):
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), name)
    spec = importlib.util.spec_from_file_location("_zoo_base_" + name[:-3], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def get_config(arg: str = ""):
    celebahq = _load("ldm_celebahq256.py")
    c = celebahq.get_config()          # VQ-f4 first stage, scale factor 1, eps-prediction, AdamW, EMA
    c.model.unet = dict(SEMANTIC_UNET)
    c.model.cond_stage = dict(SEMANTIC_COND_STAGE)
    c.data.name = "segmentation_folder"
    c.data.path = ""                   # images/ + labels/ (one class index per pixel)
    c.data.num_classes = 182
    c.data.ignore_label = config_dict.placeholder(int)  # e.g. 255: that value becomes "no class" (all-zero one-hot)
    c.data.shift_labels = False        # taming's shift_segmentation (255 -> 0, k -> k + 1)
    c.data.image_size = 256
    c.data.center_crop = False         # random crops (taming SegmentationBase random_crop), maps cropped alike
    c.data.random_flip = False         # taming's sflckr data does not flip
    c.first_stage.autoencoder = dict(celebahq.VQ_F4)
    c.diffusion.conditioning = "none"
    c.diffusion.concat = "segmentation"
    c.diffusion.beta_start = 0.0015
    c.diffusion.beta_end = 0.0205
    c.diffusion.loss_type = "l1"
    c.diffusion.cond_drop_prob = 0.0
    c.train.batch_size = 8
    c.train.lr = 1e-6 * 8              # CompVis scale_lr: base_learning_rate x batch
    c.sample.segmentations = ()        # label PNGs for the sample grids (default: synthetic scenes' maps)
    if arg == "runlocal":
        # A few-step CPU smoke run on the built-in synthetic scenes (16x20 images cropped to 16x16, label maps
        # of 5 classes), a random factor-2 KL first stage (8x8x4 latents), one rescaler halving to 8x8, and a
        # tiny U-Net with in_channels 4 + 3.
        local = _load("emoji_ldm.py").get_config("runlocal")
        for key in ("mesh", "first_stage", "train", "model"):
            c[key] = local[key]
        c.data.name = "synthetic_segmentation"
        c.data.num_classes = 5
        c.data.image_size = 16
        c.data.num_examples = 64
        c.data.precompute_latents = False
        c.model.unet = dict(local.model.unet, in_channels=7, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                            up_block_types=("AttnUpBlock2D", "UpBlock2D"), mid_block_type="UNetMidBlock2D",
                            mid_block_attention=True, num_heads=None, head_dim=16, cross_attention_dim=None)
        c.model.cond_stage = dict(SEMANTIC_COND_STAGE, n_stages=1, in_channels=5)
        c.sample.num_images = 2
        c.sample.num_inference_steps = 4
    elif arg:
        raise ValueError(f"unknown preset {arg!r}; expected '' or 'runlocal'")
    return c
