"""LDM first stage KL-f8 (Rombach et al. 2022, Table 8; CompVis
configs/autoencoder/autoencoder_kl_32x32x4.yaml): 256x256 -> 32x32x4, the Stable Diffusion
VAE architecture. Any dataset via ``data.name`` / ``data.path``.

    python train.py --config configs/autoencoder_kl_f8.py --workdir /ckpt/kl_f8 \
        --config.data.name=folder --config.data.path=/data/images

Learning rate as CompVis main.py's ``scale_lr``: base_lr 4.5e-6 x global batch x grad
accumulation. Adam betas (0.5, 0.9) for the autoencoder and the discriminator.
Known difference from CompVis: the discriminator uses GroupNorm by default (taming:
BatchNorm; ``--config.loss.disc_norm=batch`` for train-mode batch statistics).
"""
import importlib.util
import os


def _base():
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "emoji_autoencoder.py")
    spec = importlib.util.spec_from_file_location("_emoji_autoencoder_base", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


BASE_LR = 4.5e-6


def full_size(c, *, kind, autoencoder, loss, image_size=256, batch_size=64, grad_accum_steps=1):
    """Shared full-size settings (all the LDM first-stage configs)."""
    c.model.kind = kind
    c.model.autoencoder = dict(layers_per_block=2, norm_num_groups=32, mid_block_attention=True,
                               scaling_factor=1.0, **autoencoder)
    c.data.name = "folder"           # or a TFDS name; "emoji" for the built-in (64x64) set
    c.data.path = ""                 # image folder for data.name = "folder"
    c.data.image_size = image_size
    c.data.random_flip = True
    c.loss.perceptual_weight = 1.0
    c.loss.kl_weight = 1e-6
    c.loss.codebook_weight = 1.0
    c.loss.disc_factor = 1.0
    c.loss.disc_loss = "hinge"
    c.loss.disc_ndf = 64
    c.loss.disc_num_layers = 3
    c.loss.disc_norm = "group"
    c.loss.disc_norm_groups = 32
    for k, v in loss.items():
        c.loss[k] = v
    c.train.num_steps = 200_000
    c.train.batch_size = batch_size
    c.train.grad_accum_steps = grad_accum_steps
    c.train.lr = BASE_LR * batch_size * grad_accum_steps  # CompVis scale_lr
    c.train.b1, c.train.b2 = 0.5, 0.9
    c.train.lr_schedule = "constant"
    c.train.warmup_steps = 0
    c.train.weight_decay = 0.0
    c.train.grad_clip = 0.0
    c.train.ema_decay = 0.0
    c.train.log_every = 100
    c.train.checkpoint_every = 5000
    c.eval.batch_size = batch_size
    c.eval.num_batches = 50
    return c


def get_config(arg: str = ""):
    c = _base().get_config("kl")
    full_size(c, kind="kl",
              autoencoder=dict(latent_channels=4, block_out_channels=(128, 256, 512, 512)),
              loss=dict(disc_start=50001, kl_weight=1e-6, disc_weight=0.5))
    if arg:
        raise ValueError(f"unknown preset {arg!r}")
    return c
