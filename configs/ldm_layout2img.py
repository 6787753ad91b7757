"""Layout-to-image LDM-VQ-4 (Rombach et al. 2022, Sec. 4.3.1 / Fig. 8: images from object boxes;
CompVis models/ldm/layout2img-openimages256/config.yaml): the released architecture exactly (246M
U-Net: 128 base channels, mult (1, 2, 3, 4), two res blocks per level, spatial transformers of depth 3
with 32-channel heads at 1/2, 1/4, 1/8 of the 64x64 latents and in the middle, context width 512;
VQ-f4 first stage with 8192 codes; CompVis "linear" 0.0015..0.0205, eps-prediction, ``loss_type: l1``).

The condition (``diffusion.conditioning="layout"``, ldm_jax/training/scene_conditioning.py): the
objects of an image as the 92 token ids of taming-transformers' ``ObjectsBoundingBoxConditionalBuilder``
(``data.layout``, ldm_jax/data/layout_tokens.py: 30 objects x (category, top-left, bottom-right) on a
90x90 grid of an 8192-token vocabulary, plus the crop box; the parameters of taming's scene-image
configs, whose embedding length 92 is the YAML's max_seq_len) through the ``BERTEmbedder`` with
``use_tokenizer: false`` (``text_encoder.kind="ldm_bert"``: n_embed 512, 16 layers, vocab 8192,
length 92), trained from a seeded init with the U-Net, into cross-attention. No classifier-free
guidance: the original drops nothing.

Data (``data.name="coco_layout"``, ldm_jax/data/coco_layout.py): ``data.path`` an images folder and
``data.annotations`` its COCO instances JSON (boxes, categories; taming's ``AnnotatedObjectsCoco``
reading: images with 2..30 objects of area > 1e-5). The released model was trained on OpenImages
with CompVis' unreleased ``OpenImagesBBox`` loader (random 2-d crops); here random crops of the
shorter-side-resized image (taming's COCO "random-1d") and flips, the crop box and flip going into
the tokens:

    python train.py --config configs/ldm_layout2img.py --workdir /ckpt/layout \\
        --config.first_stage.checkpoint=/ckpt/vq_f4 --config.data.path=/data/coco/train2017 \\
        --config.data.annotations=/data/coco/annotations/instances_train2017.json
    python train.py --config configs/ldm_layout2img.py:runlocal --workdir /tmp/layout   # CPU smoke run

The workdir loads with ``ldm_jax.load_pipeline(workdir)`` and samples with ``pipe(context_ids=ids)``,
``ids = LayoutTokenBuilder(...).build([(category_no, (x0, y0, w, h)), ...])[None]``. Learning rate as
CompVis main.py's scale_lr: base_learning_rate 2e-6 x the YAML's batch 24, AdamW, EMA 0.9999.
Fine-tuning the released checkpoint (its U-Net, its VQ-f4 first stage frozen, its LDMBert the start of the
trained one; this config's architecture, LDMBert and ``data.layout`` (92 ids of 8192 tokens) are the
file's, which is checked; see ldm_jax/training/init_checkpoint.py; the data's category numbers must mean
the file's classes):

    python train.py --config configs/ldm_layout2img.py --workdir /ckpt/layout_ft \
        --config.init.checkpoint=layout2img-openimages256/model.ckpt \
        --config.init.original_config=layout2img-openimages256/config.yaml --config.data.path=... \
        --config.data.annotations=...

Sampling from object boxes (a JSON file, see sample.py --help):
``python sample.py --checkpoint /ckpt/layout [--config config.yaml for a .ckpt] --layout layouts.json``.
"""
import importlib.util
import os

from ml_collections import config_dict

# model.unet: UNetConfig fields of layout2img-openimages256's unet_config (in_channels 3, model_channels 128,
# attention_resolutions [8, 4, 2], channel_mult [1, 2, 3, 4], num_head_channels 32, transformer_depth 3,
# context_dim 512; tests/test_semantic_layout_training.py checks the count, 246,277,379, against UNetModel).
LAYOUT_UNET = dict(
    in_channels=3, out_channels=3, block_out_channels=(128, 256, 384, 512),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    mid_block_type="UNetMidBlock2DCrossAttn", mid_block_attention=False, layers_per_block=2,
    transformer_layers_per_block=3, num_heads=(4, 8, 12, 16), cross_attention_dim=512, use_linear_projection=False,
    norm_num_groups=32, norm_eps=1e-5, flip_sin_to_cos=True, freq_shift=0,
)
# cond_stage_config: BERTEmbedder(n_embed=512, n_layer=16, vocab_size=8192, max_seq_len=92, use_tokenizer=False)
LAYOUT_BERT = dict(vocab_size=8192, hidden_size=512, num_layers=16, num_heads=8, head_dim=64, intermediate_size=2048,
                   max_position_embeddings=92, hidden_act="gelu")
# data.layout: taming's scene-image builder settings (no_tokens 8192, max_objects_per_image 30, encode_crop,
# use_group_parameter) and its COCO filters (min_object_area 1e-5, min_objects_per_image 2).
LAYOUT_TOKENS = dict(no_max_objects=30, no_tokens=8192, encode_crop=True, use_group_parameter=True,
                     use_additional_parameters=False, no_object_classes=None, min_object_area=1e-5,
                     min_objects_per_image=2)


def _load(name):
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), name)
    spec = importlib.util.spec_from_file_location("_zoo_base_" + name[:-3], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def get_config(arg: str = ""):
    celebahq = _load("ldm_celebahq256.py")
    c = celebahq.get_config()          # VQ-f4 first stage, scale factor 1, eps-prediction, AdamW, EMA
    c.model.unet = dict(LAYOUT_UNET)
    c.data.name = "coco_layout"
    c.data.path = ""                   # the images folder
    c.data.annotations = ""            # its COCO instances JSON (or a list of JSONs, e.g. + stuff)
    c.data.layout = dict(LAYOUT_TOKENS)
    c.data.layout.no_object_classes = config_dict.placeholder(int)  # (None: the data's; typed for overrides)
    c.data.image_size = 256
    c.data.center_crop = False         # random crops (taming COCO "random-1d"); the crop box is encoded
    c.data.random_flip = True
    c.first_stage.autoencoder = dict(celebahq.VQ_F4)
    c.text_encoder.kind = "ldm_bert"
    c.text_encoder.trainable = True
    c.text_encoder.ldm_bert = dict(LAYOUT_BERT)
    c.diffusion.conditioning = "layout"
    c.diffusion.beta_start = 0.0015
    c.diffusion.beta_end = 0.0205
    c.diffusion.loss_type = "l1"
    c.diffusion.cond_drop_prob = 0.0
    c.train.batch_size = 24
    c.train.lr = 2e-6 * 24             # CompVis scale_lr: base_learning_rate x batch
    if arg == "runlocal":
        # A few-step CPU smoke run on the built-in synthetic scenes (16x20 images cropped to 16x16, 1-3 shapes
        # of 4 categories as objects), layouts of <= 4 objects on an 8x8 grid (64 tokens, length 14), a tiny
        # LDMBert, a random factor-2 KL first stage (8x8x4 latents) and a tiny cross-attention U-Net.
        local = _load("emoji_ldm.py").get_config("runlocal")
        for key in ("mesh", "first_stage", "train", "model"):
            c[key] = local[key]
        c.data.name = "synthetic_layout"
        c.data.num_classes = 5
        c.data.image_size = 16
        c.data.num_examples = 64
        c.data.precompute_latents = False
        c.data.layout = dict(LAYOUT_TOKENS, no_max_objects=4, no_tokens=64)
        c.data.layout.no_object_classes = config_dict.placeholder(int)
        c.text_encoder.ldm_bert = dict(vocab_size=64, hidden_size=32, num_layers=2, num_heads=2, head_dim=16,
                                       intermediate_size=64, max_position_embeddings=14, hidden_act="gelu")
        c.sample.num_images = 2
        c.sample.num_inference_steps = 4
    elif arg:
        raise ValueError(f"unknown preset {arg!r}; expected '' or 'runlocal'")
    return c
