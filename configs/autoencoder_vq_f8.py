"""LDM first stage VQ-f8 (Rombach et al. 2022, Table 8; CompVis
models/first_stage_models/vq-f8/config.yaml, the first stage of cin-ldm-vq-f8): 256x256 -> 32x32x4,
16384 codes, self-attention after every ResNet block of the 32x32 level (attn_resolutions [32] =
level 3), a 2-layer PatchGAN. See configs/autoencoder_kl_f8.py."""
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
                 autoencoder=dict(latent_channels=4, block_out_channels=(128, 256, 256, 512), attention_levels=(3,),
                                  num_vq_embeddings=16384, vq_embed_dim=4, beta=0.25, legacy=True),
                 loss=dict(disc_start=1, disc_weight=0.6, codebook_weight=1.0, disc_num_layers=2))
    if arg:
        raise ValueError(f"unknown preset {arg!r}")
    return c
