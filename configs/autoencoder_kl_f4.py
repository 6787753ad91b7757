"""LDM first stage KL-f4 (Rombach et al. 2022, Table 8; CompVis
configs/autoencoder/autoencoder_kl_64x64x3.yaml): 256x256 -> 64x64x3.
See configs/autoencoder_kl_f8.py for the shared settings."""
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
                 autoencoder=dict(latent_channels=3, block_out_channels=(128, 256, 512)),
                 loss=dict(disc_start=50001, kl_weight=1e-6, disc_weight=0.5))
    if arg:
        raise ValueError(f"unknown preset {arg!r}")
    return c
