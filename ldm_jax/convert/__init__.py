"""Checkpoint conversion: PyTorch weights (diffusers / transformers / open_clip
naming, CompVis originals) -> Flax modules and parameter trees.

Weight files are read without torch and without executing pickled code
(``weights_io``, ``torch_pickle``).
"""
from importlib import import_module

from ldm_jax.convert.errors import CheckpointError, UnsafePickleError

# name -> module that defines it; imported on first use so that reading one
# converter does not import every model.
_LAZY = {
    "load_unet": "ldm_jax.convert.unet_diffusers",
    "load_vae": "ldm_jax.convert.vae_diffusers",
    "load_text_encoder": "ldm_jax.convert.clip_transformers",
    "load_ldm_bert": "ldm_jax.convert.ldm_bert_weights",
    "read_state_dict": "ldm_jax.convert.weights_io",
    "load_original_pipeline": "ldm_jax.convert.original_pipeline",
    "save_diffusers": "ldm_jax.convert.export",
}

__all__ = ["CheckpointError", "UnsafePickleError", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'ldm_jax.convert' has no attribute {name!r}")
