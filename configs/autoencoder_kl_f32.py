"""LDM first stage KL-f32 (Rombach et al. 2022, Table 8; CompVis
configs/autoencoder/autoencoder_kl_8x8x64.yaml, models/first_stage_models/kl-f32):
256x256 -> 8x8x64, with self-attention after every ResNet block of the 16x16 and 8x8
levels (attn_resolutions [16, 8] = levels 4 and 5). CompVis trained it with batch 12 and
2 accumulation steps; the global batch here is the shared one (configs/autoencoder_kl_f8.py),
the learning rate scales with it as CompVis' scale_lr."""
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
                 autoencoder=dict(latent_channels=64, block_out_channels=(128, 128, 256, 256, 512, 512),
                                  attention_levels=(4, 5)),
                 loss=dict(disc_start=50001, kl_weight=1e-6, disc_weight=0.5))
    if arg:
        raise ValueError(f"unknown preset {arg!r}")
    return c
