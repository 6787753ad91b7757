"""Text-to-image LDM-KL-8-G (Rombach et al. 2022, Sec. 4.3.1 / the 1.45B LAION-400M model; CompVis
configs/latent-diffusion/txt2img-1p4B-eval.yaml): the released architecture exactly (SD1's U-Net
shape with context width 1280: model_channels 320, channel_mult [1, 2, 4, 4], attention at
ds 1, 2, 4, 8 heads; KL-f8 first stage, scale_factor 0.18215; CompVis "linear" = diffusers
"scaled_linear" 0.00085..0.012, eps-prediction; 32x32x4 latents of 256x256 images).

The text encoder is the ``BERTEmbedder`` (n_embed 1280, n_layer 32; ``text_encoder.kind="ldm_bert"``,
ldm_jax/models/ldm_bert.py): a bert-base-uncased WordPiece tokenizer feeding a transformer trained
from scratch *jointly* with the U-Net (``cond_stage_trainable: true`` -> ``text_encoder.trainable``).
Its vocabulary is not part of any checkpoint, so ``text_encoder.tokenizer`` is a required override:
bert-base-uncased's vocab.txt (30522 lines) or a BERT tokenizer folder (it is copied into
WORKDIR/tokenizer, so the workdir samples on its own):

    python train.py --config configs/ldm_txt2img_f8.py --workdir /ckpt/txt2img \\
        --config.text_encoder.tokenizer=/models/bert-base-uncased/vocab.txt \\
        --config.first_stage.checkpoint=/ckpt/kl_f8_vae --config.data.path=/data/captioned_images
    python train.py --config configs/ldm_txt2img_f8.py:runlocal --workdir /tmp/txt2img_smoke \\
        --config.text_encoder.tokenizer=vocab.txt                          # few CPU steps, tiny shapes
    python sample.py --checkpoint /ckpt/txt2img --prompt "a painting of a squirrel eating a burger"

Fine-tune the released model with ``--config.init.checkpoint=txt2img-f8-large.ckpt
--config.init.original_config=txt2img-1p4B-eval.yaml`` (its KL-f8 and BERT then come from the file;
the BERT keeps training). ``text_encoder.checkpoint`` may name a diffusers ``bert/`` folder
(CompVis/ldm-text2im-large-256) to start the encoder from. Optimiser: AdamW at the YAML's
base_learning_rate 5e-5 (not multiplied by the batch), EMA 0.9999, 10% caption dropout.
"""
import importlib.util
import os

# model.unet: UNetConfig fields of txt2img-1p4B-eval.yaml's unet_config (tests/test_zoo_configs.py
# checks them, and the parameter count against the original UNetModel).
TXT2IMG_UNET = dict(
    in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    mid_block_type="UNetMidBlock2DCrossAttn", mid_block_attention=False, layers_per_block=2,
    transformer_layers_per_block=1, num_heads=8, cross_attention_dim=1280, use_linear_projection=False,
    norm_num_groups=32, norm_eps=1e-5, flip_sin_to_cos=True, freq_shift=0,
)
# cond_stage_config BERTEmbedder(n_embed=1280, n_layer=32): LDMBertConfig fields (x-transformers'
# 8 heads of 64, 4x MLP; vocab_size / max_seq_len BERTEmbedder's defaults 30522 / 77).
LDM_BERT = dict(vocab_size=30522, hidden_size=1280, num_layers=32, num_heads=8, head_dim=64,
                intermediate_size=5120, max_position_embeddings=77, hidden_act="gelu")


def _load(name):
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), name)
    spec = importlib.util.spec_from_file_location("_zoo_base_" + name[:-3], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def get_config(arg: str = ""):
    sd1 = _load("sd1_finetune.py")
    # SD1's KL-f8, schedule, data and optimiser settings; the text encoder replaced below.
    c = sd1.sd_base(TXT2IMG_UNET, sd1.SD_VAE, sd1.CLIP_L, image_size=256, pad_token_id=0, prediction_type="epsilon")
    c.text_encoder.kind = "ldm_bert"
    c.text_encoder.tokenizer = ""      # required: bert-base-uncased's vocab.txt or a BERT tokenizer folder
    c.text_encoder.checkpoint = ""     # diffusers bert/ folder ("" = init.checkpoint's, else seeded random)
    c.text_encoder.trainable = True    # cond_stage_trainable: true
    c.text_encoder.ldm_bert = dict(LDM_BERT)
    c.text_encoder.max_length = 77     # BERTTokenizer(max_length=77)
    del c.text_encoder["clip"], c.text_encoder["pad_token_id"]  # CLIP-only keys (the pad id is the vocabulary's)
    c.train.lr = 5e-5                  # base_learning_rate
    c.train.warmup_steps = 0           # the YAML has no scheduler_config
    c.sample.prompts = ("a painting of a squirrel eating a burger", "a red apple on a wooden table")
    if arg == "runlocal":
        # A few-step CPU smoke run: the emoji runlocal U-Net / first stage / data, a 2-layer LDMBert.
        local = _load("emoji_ldm.py").get_config("runlocal")
        for key in ("data", "mesh", "first_stage", "train", "model"):
            c[key] = local[key]
        c.data.precompute_latents = False
        c.text_encoder.ldm_bert = dict(LDM_BERT, hidden_size=32, num_layers=2, num_heads=2, head_dim=16,
                                       intermediate_size=64, max_position_embeddings=16)
        c.text_encoder.max_length = 16
        c.sample.prompts = ("a red square", "a blue square")
        c.sample.num_inference_steps = 4
    elif arg:
        raise ValueError(f"unknown preset {arg!r}; expected '' or 'runlocal'")
    return c
