"""Text-to-image LDM on the built-in emoji dataset (32x32 images, 8x8x4 latents).

    python train.py --config configs/emoji_ldm.py --workdir /tmp/emoji_ldm
    python train.py --config configs/emoji_ldm.py:runlocal --workdir /tmp/smoke   # few CPU steps
    python train.py --config configs/emoji_ldm.py:demo --workdir /tmp/ldm \
        --config.first_stage.checkpoint=/tmp/emoji_ae                               # the main job (tools/demo.sh)

The first stage is a randomly initialised (frozen) KL autoencoder with factor 4 until
``first_stage.checkpoint`` points at a trained one (an autoencoder workdir or a diffusers
``vae/`` folder), and the text encoder a seeded random tiny CLIP (frozen unless
``text_encoder.trainable``; the demo trains it), with ``scale_by_std`` (LDM Sec. 4.3) so
the latents have unit variance whatever the autoencoder.
"""
import ml_collections
from ml_collections import config_dict


def get_config(arg: str = ""):
    c = ml_collections.ConfigDict()
    c.seed = 0

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1                # data-parallel axis (-1: all devices not used by fsdp)
    c.mesh.fsdp = 1                 # FSDP axis size
    c.mesh.min_fsdp_size = 2 ** 18  # parameters with fewer elements stay replicated
    c.mesh.rules = ()               # ((regex, PartitionSpec-tuple), ...) overrides

    c.data = ml_collections.ConfigDict()
    c.data.name = "emoji"
    c.data.data_dir = config_dict.placeholder(str)  # TFDS data_dir (None: $TFDS_DATA_DIR or ~/tensorflow_datasets)
    c.data.path = config_dict.placeholder(str)      # image folder for name="folder"
    c.data.image_size = 32
    c.data.random_flip = True
    c.data.center_crop = True
    c.data.shuffle = True
    c.data.exclude_captions = config_dict.placeholder(str)  # regex: leave out examples whose caption matches
    # Encode the training split once with the frozen first stage into WORKDIR/latents (rebuilt when the
    # first stage or data change) and train on those latents. Both flips are encoded when random_flip
    # (a flipped latent is only approximately the latent of the flipped image); needs center_crop=True.
    c.data.precompute_latents = False

    c.model = ml_collections.ConfigDict()
    c.model.dtype = "float32"       # compute dtype ("bfloat16" on accelerators); params stay float32
    c.model.attention_impl = "xla"
    c.model.remat = False           # rematerialise U-Net blocks (memory for compute)
    c.model.unet = dict(
        in_channels=4, out_channels=4, block_out_channels=(64, 128),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        mid_block_type="UNetMidBlock2DCrossAttn", layers_per_block=1, num_heads=4,
        cross_attention_dim=64, norm_num_groups=32,
        conv_impl="auto",  # "auto": matmul-VJP convolutions on CPU, XLA's on GPU/TPU ("xla": always XLA's)
    )

    c.first_stage = ml_collections.ConfigDict()
    c.first_stage.checkpoint = ""   # diffusers vae/ folder; "" = random init (below)
    c.first_stage.random_init = True
    c.first_stage.seed = 0
    c.first_stage.autoencoder = dict(kind="kl", latent_channels=4, block_out_channels=(32, 64, 64),
                                     layers_per_block=1, norm_num_groups=32)
    c.first_stage.scale_by_std = True
    c.first_stage.scale_factor = config_dict.placeholder(float)  # fixed factor (None: the autoencoder config's) when not scale_by_std
    c.first_stage.sample_posterior = True

    c.text_encoder = ml_collections.ConfigDict()
    c.text_encoder.checkpoint = ""  # transformers CLIPTextModel folder; "" = seeded random tiny CLIP
    c.text_encoder.tokenizer = ""   # tokenizer folder; "" = vendored CLIP BPE
    c.text_encoder.seed = 0
    # Optimise the text encoder jointly with the U-Net (LDM Sec. 3.3): a random encoder must learn
    # to read the captions; a pretrained CLIP (checkpoint) stays frozen as in Stable Diffusion.
    c.text_encoder.trainable = False
    c.text_encoder.max_length = 16
    c.text_encoder.pad_token_id = 49407
    c.text_encoder.clip = dict(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                               max_position_embeddings=16)

    # Start from a released model (fine-tuning; ldm_jax/training/init_checkpoint.py): a .ckpt /
    # .safetensors file, diffusers folder or train.py workdir. Its U-Net weights start training, its
    # autoencoder and text encoder are the frozen stages unless the checkpoints above are set.
    c.init = ml_collections.ConfigDict()
    c.init.checkpoint = ""
    c.init.original_config = ""     # the original YAML of a single-file checkpoint ("" = inferred)
    c.init.use_ema = False          # a single file's model_ema.* weights instead of model.*
    # diffusion.num_train_timesteps / beta_* / prediction_type must be the file's (a ValueError
    # names both), unless this is True: fine-tuning under another schedule or objective on purpose.
    c.init.allow_schedule_change = False

    c.diffusion = ml_collections.ConfigDict()
    c.diffusion.conditioning = "text"  # "text", "class" or "none"
    c.diffusion.concat = "none"        # channels next to the latents: "none", "low_res" (SR) or "inpainting"
    c.diffusion.num_train_timesteps = 1000
    c.diffusion.beta_schedule = "scaled_linear"
    c.diffusion.beta_start = 0.00085
    c.diffusion.beta_end = 0.012
    c.diffusion.prediction_type = "epsilon"
    c.diffusion.min_snr_gamma = config_dict.placeholder(float)  # None: no min-SNR weighting
    c.diffusion.offset_noise = 0.0
    c.diffusion.cond_drop_prob = 0.1
    # Optional objective keys at their defaults (declared so that the command line can set them):
    c.diffusion.loss_type = "l2"                 # "l2" (squared error) or "l1" (CompVis loss_type)
    c.diffusion.rescale_betas_zero_snr = False   # zero terminal SNR (Lin et al. 2024, Algorithm 1)
    c.diffusion.input_perturbation = 0.0         # diffusers' train_text_to_image --input_perturbation
    c.diffusion.l_simple_weight = 1.0            # CompVis p_losses terms (an original YAML's model.params)
    c.diffusion.original_elbo_weight = 0.0
    c.diffusion.logvar_init = 0.0
    c.diffusion.v_posterior = 0.0

    c.train = ml_collections.ConfigDict()
    c.train.num_steps = 20_000
    c.train.batch_size = 64         # global batch
    c.train.lr = 2e-4
    c.train.lr_schedule = "cosine"
    c.train.warmup_steps = 500
    c.train.end_lr_factor = 0.1
    c.train.weight_decay = 0.01     # AdamW decoupled decay (not on norms / biases)
    c.train.b1 = 0.9
    c.train.b2 = 0.999
    c.train.eps = 1e-8
    c.train.grad_clip = 1.0
    c.train.grad_accum_steps = 1
    c.train.ema_decay = 0.9999
    c.train.log_every = 50
    c.train.checkpoint_every = 1000
    c.train.keep_checkpoints = 3   # 0: keep all
    c.train.async_checkpoint = True
    c.train.sample_every = 2000
    c.train.preemption_check_every = 10  # multi-process: steps between all-gathers of the SIGTERM flags

    c.sample = ml_collections.ConfigDict()
    c.sample.prompts = ("a smiling face", "a red heart", "a cat", "a thumbs up")
    c.sample.num_inference_steps = 25
    c.sample.guidance_scale = 3.0
    c.sample.sampler = "ddim"
    c.sample.seed = 0

    if arg == "runlocal":
        # A few-step CPU smoke run on synthetic data.
        c.data.name = "synthetic"
        c.data.image_size = 16
        c.mesh.min_fsdp_size = 2 ** 12
        c.model.unet = dict(c.model.unet, block_out_channels=(32, 64), norm_num_groups=16,
                            num_heads=2, cross_attention_dim=32)
        c.first_stage.autoencoder = dict(c.first_stage.autoencoder, block_out_channels=(16, 32),
                                         norm_num_groups=16)
        c.text_encoder.clip = dict(c.text_encoder.clip, hidden_size=32, intermediate_size=64, num_heads=2)
        c.train.num_steps = 6
        c.train.batch_size = 8
        c.train.lr_schedule = "constant"
        c.train.warmup_steps = 0
        c.train.log_every = 2
        c.train.checkpoint_every = 3
        c.train.sample_every = 0
        c.sample.prompts = ("a red square", "a blue square")
        c.sample.num_inference_steps = 4
    elif arg == "demo":
        # The README's main job (tools/demo.sh) on top of a trained first stage given with
        # --config.first_stage.checkpoint=WORKDIR_OF_emoji_autoencoder: 9.7 minutes on 2 idle CPU
        # cores (2.7 steps/s on precomputed latents). What makes it follow prompts at this budget
        # (measured with tools/prompt_colours.py, see the issue 7 note): the text encoder is trained
        # with the U-Net (a frozen random one gives context vectors the U-Net never learns to read),
        # a high learning rate for this 4M-parameter model, and the 2,145 skin-tone variants left out
        # so the rest of the emoji are seen twice as often.
        c.first_stage.random_init = False
        c.data.random_flip = False      # "facing right" emoji must stay right-facing
        c.data.precompute_latents = True
        c.data.exclude_captions = "skin tone"
        c.text_encoder.trainable = True
        c.train.lr = 1.5e-3
        c.train.num_steps = 1500
        c.train.warmup_steps = 100
        c.train.ema_decay = 0.999
        c.train.log_every = 100
        c.train.checkpoint_every = 500
        c.train.sample_every = 0
        c.sample.prompts = ("grinning face", "blue heart", "yellow heart", "flag of japan")
    elif arg:
        raise ValueError(f"unknown preset {arg!r}; expected '', 'runlocal' or 'demo'")
    return c
