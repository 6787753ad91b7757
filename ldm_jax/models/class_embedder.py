"""Class conditioning through cross-attention (the LDM ``ClassEmbedder``).

The class-conditional ImageNet LDMs (Rombach et al. 2022, Sec. 4.3,
``cin256-v2.yaml``) condition the U-Net's cross-attention on one token: a
learned embedding of the label, ``context = embedding[label][:, None, :]``
of shape (B, 1, D). The last class (``n_classes - 1``, class 1000 of the
1001-entry table) is the "no label" token that classifier-free guidance
uses as the unconditional input.

``ClassEmbedder`` plays the text encoder's part in a ``Pipeline`` and
``ClassLabelTokenizer`` the tokenizer's: prompts are class indices (ints or
digit strings), and the empty prompt (the default negative prompt) is the
unconditional class, so ``pipe(["207", "360"], guidance_scale=3.0)`` samples
those two classes with guidance.
"""
from __future__ import annotations

from typing import Iterable, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = jnp.dtype


class ClassEmbedder(nn.Module):
    """``apply({"params": p}, labels_bl)`` -> context (B, L, embed_dim); L is 1 for LDM models.

    Parameters: ``{"embedding": {"embedding": (num_classes, embed_dim)}}`` (the
    CompVis key ``cond_stage_model.embedding.weight``).
    """

    num_classes: int  # table size, including the unconditional class
    embed_dim: int  # context width (the U-Net's context_dim)
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, labels_bl: jax.Array) -> jax.Array:
        labels_bl = jnp.asarray(labels_bl)
        if labels_bl.ndim == 1:
            labels_bl = labels_bl[:, None]
        if not jnp.issubdtype(labels_bl.dtype, jnp.integer):
            raise TypeError(f"ClassEmbedder: labels must be integers, got {labels_bl.dtype}")
        return nn.Embed(self.num_classes, self.embed_dim, dtype=self.dtype, param_dtype=self.param_dtype,
                        name="embedding")(labels_bl)


class ClassLabelTokenizer:
    """Prompts -> class labels (B, 1) int32 for ``ClassEmbedder``.

    Each prompt is an int or a string of one: ``3``, ``"3"``, ``" 207 "``. The
    empty string (a Pipeline's default negative prompt) and None give
    ``unconditional_class`` (default ``num_classes - 1``).
    """

    def __init__(self, num_classes: int, unconditional_class: int = -1):
        self.num_classes = int(num_classes)
        self.unconditional_class = int(unconditional_class) % self.num_classes
        self.max_length = 1

    def label(self, prompt: Union[int, str, None]) -> int:
        if prompt is None or (isinstance(prompt, str) and not prompt.strip()):
            return self.unconditional_class
        if isinstance(prompt, (bool, np.bool_)):
            raise ValueError(f"class label {prompt!r} is not an integer")
        if isinstance(prompt, (int, np.integer)):
            value = int(prompt)
        else:
            try:
                value = int(str(prompt).strip())
            except ValueError:
                raise ValueError(f"this model is class-conditional: give class indices as prompts "
                                 f"(ints or digit strings, '' for unconditional), got {prompt!r}") from None
        if not 0 <= value < self.num_classes:
            raise ValueError(f"class label {value} is out of range [0, {self.num_classes})")
        return value

    def __call__(self, prompts: Union[int, str, Iterable]) -> np.ndarray:
        if isinstance(prompts, (str, int, np.integer)):
            prompts = [prompts]
        return np.asarray([[self.label(p)] for p in prompts], dtype=np.int32).reshape(-1, 1)
