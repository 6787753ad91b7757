"""LDM first stage KL-f16 (Rombach et al. 2022, Table 8; CompVis
configs/autoencoder/autoencoder_kl_16x16x16.yaml, models/first_stage_models/kl-f16):
256x256 -> 16x16x16, with self-attention after every ResNet block of the 16x16 level
(attn_resolutions [16] = level 4). See configs/autoencoder_kl_f8.py for the shared settings."""
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
    c = f8._base().get_config("kl")
    f8.full_size(c, kind="kl",
                 autoencoder=dict(latent_channels=16, block_out_channels=(128, 128, 256, 256, 512),
                                  attention_levels=(4,)),
                 loss=dict(disc_start=50001, kl_weight=1e-6, disc_weight=0.5))
    if arg:
        raise ValueError(f"unknown preset {arg!r}")
    return c
