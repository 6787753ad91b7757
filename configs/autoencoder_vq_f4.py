"""LDM first stage VQ-f4 (Rombach et al. 2022, Table 8; CompVis
models/first_stage_models/vq-f4/config.yaml): 256x256 -> 64x64x3, 8192 codes, taming's
VQLPIPSWithDiscriminator with the GAN on from the start. See configs/autoencoder_kl_f8.py."""
import importlib.util
import os


def _sibling(name):
    spec = importlib.util.spec_from_file_location(
        "_" + name, os.path.join(os.path.dirname(os.path.abspath(__file__)), name + ".py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def get_config(arg: str = ""):
    f8 = _sibling("autoencoder_kl_f8")
    c = f8._base().get_config("vq")
    f8.full_size(c, kind="vq",
                 autoencoder=dict(latent_channels=3, block_out_channels=(128, 256, 512), num_vq_embeddings=8192,
                                  vq_embed_dim=3, beta=0.25, legacy=True),
                 loss=dict(disc_start=0, disc_weight=0.75, codebook_weight=1.0))
    if arg:
        raise ValueError(f"unknown preset {arg!r}")
    return c
