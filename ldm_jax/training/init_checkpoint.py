"""``init.checkpoint``: start LDM training from a released model (fine-tuning).

    python train.py --config configs/sd1_finetune.py --workdir W \\
        --config.init.checkpoint=v1-5-pruned-emaonly.safetensors --config.data.path=IMAGES

``init.checkpoint`` is anything ``ldm_jax.load_pipeline`` reads: a single original
CompVis / Stability ``.ckpt`` / ``.safetensors`` file (``init.original_config``: its YAML,
"" = inferred from the keys; ``init.use_ema``: its ``model_ema.*`` weights), a diffusers
folder or another ``train.py`` workdir. Its U-Net weights become the first step's
parameters (and EMA), its autoencoder and text encoder the frozen stages unless
``first_stage.checkpoint`` / ``text_encoder.checkpoint`` name others. ``model.unet``
must describe the same U-Net (checked leaf by leaf); ``model.unet = {}`` takes the
checkpoint's. A resumed run restores its own checkpoint and only reuses the frozen
stages from here. Pickles are read with the restricted unpickler (nothing executed).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Optional

import jax

from ldm_jax.convert.errors import CheckpointError
from ldm_jax.training import sharding as shd
from ldm_jax.training.config_access import config_get as _get


def load_init_pipeline(init_cfg, dtype: str, attention_impl: str, tokenizer: Optional[str] = None):
    """The ``Pipeline`` of ``init.checkpoint`` (None when unset). ``tokenizer``: the vocabulary
    (vocab.txt / folder) of a single-file LDM txt2img model, whose BERTEmbedder the file lacks."""
    path = str(_get(init_cfg, "checkpoint", "") or "")
    if not path:
        return None
    import ldm_jax

    kwargs: Dict[str, Any] = {}
    if path.endswith((".ckpt", ".safetensors", ".pt", ".pth", ".bin")):
        kwargs["use_ema"] = bool(_get(init_cfg, "use_ema", False))
        if tokenizer:
            kwargs["tokenizer"] = tokenizer
    pipe = ldm_jax.load_pipeline(path, config=_get(init_cfg, "original_config", "") or None, dtype=dtype, **kwargs)

    def with_attention(module):
        return module.clone(attention_impl=attention_impl) if hasattr(module, "attention_impl") else module

    return dataclasses.replace(pipe, unet=with_attention(pipe.unet), vae=with_attention(pipe.vae),
                               text_encoder=None if pipe.text_encoder is None else with_attention(pipe.text_encoder))


def unet_fields_from(pipe) -> Dict[str, Any]:
    """The checkpoint U-Net's UNetConfig fields (for ``model.unet = {}``)."""
    return dataclasses.asdict(pipe.unet.config)


def check_same_structure(expected, got, source: str, what: str = "U-Net") -> None:
    """CheckpointError naming the missing, unexpected and wrongly shaped leaves of ``got``
    against ``expected`` (trees of arrays / ShapeDtypeStructs)."""
    want = {shd.path_str(p): tuple(x.shape) for p, x in jax.tree_util.tree_flatten_with_path(expected)[0]}
    have = {shd.path_str(p): tuple(x.shape) for p, x in jax.tree_util.tree_flatten_with_path(got)[0]}
    problems: List[str] = []
    problems += [f"missing {k} {want[k]}" for k in sorted(set(want) - set(have))]
    problems += [f"unexpected {k} {have[k]}" for k in sorted(set(have) - set(want))]
    problems += [f"{k}: checkpoint {have[k]}, model.unet {want[k]}" for k in sorted(set(want) & set(have))
                 if want[k] != have[k]]
    if problems:
        shown = "; ".join(problems[:6]) + (f"; ... ({len(problems)} in all)" if len(problems) > 6 else "")
        raise CheckpointError(
            f"init.checkpoint={source}: its {what} does not match config.model.unet: {shown}. "
            "Set model.unet to the checkpoint's architecture, or model.unet={} to take it from the checkpoint")
