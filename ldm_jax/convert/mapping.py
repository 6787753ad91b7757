"""PyTorch state dict -> Flax parameter tree, by name, transposing once.

The Flax modules use the PyTorch parameter names with ``.N`` list indices
folded into the module name (``down_blocks.0.resnets.1`` ->
``down_blocks_0/resnets_1``), so the mapping is mechanical:

* ``weight`` becomes ``kernel`` (Dense/Conv), ``scale`` (norms) or
  ``embedding`` (nn.Embed), whichever the target module has;
* conv kernels go OIHW -> HWIO, linear kernels (out, in) -> (in, out).

The target tree (from ``jax.eval_shape`` of the module's init) is the source
of truth: every target leaf must be filled, every checkpoint tensor must be
used, and shapes must agree. Anything else is a ``CheckpointError`` naming the
key and both shapes; nothing is silently left at its initial value.
"""
from __future__ import annotations

import re
from typing import Callable, Dict, Iterable, Mapping, Optional, Tuple

import jax
import numpy as np
from flax import traverse_util

from ldm_jax.convert.errors import CheckpointError

Path = Tuple[str, ...]
_INDEX = re.compile(r"^\d+$")


def torch_key_to_path(key: str) -> Path:
    """``a.b.0.c.weight`` -> ``("a", "b_0", "c", "weight")``."""
    out = []
    for part in key.split("."):
        if _INDEX.match(part) and out:
            out[-1] = f"{out[-1]}_{part}"
        else:
            out.append(part)
    return tuple(out)


def _to_flax_leaf(path: Path, value: np.ndarray, targets: Mapping[Path, jax.ShapeDtypeStruct]):
    """Pick the Flax leaf name for a torch leaf and lay the array out for it."""
    *parent, leaf = path
    parent = tuple(parent)
    if leaf != "weight":
        return parent + (leaf,), value
    for flax_leaf in ("kernel", "scale", "embedding"):
        if parent + (flax_leaf,) in targets:
            break
    else:
        return path, value  # unknown: reported as unexpected by the caller
    if flax_leaf == "kernel":
        if value.ndim == 4:  # conv OIHW -> HWIO
            value = np.transpose(value, (2, 3, 1, 0))
        elif value.ndim == 2:  # linear (out, in) -> (in, out)
            value = value.T
    return parent + (flax_leaf,), value


def convert_state_dict(
    state_dict: Mapping[str, np.ndarray],
    target_params,
    *,
    source: str,
    rename: Optional[Callable[[str], Optional[str]]] = None,
    ignore: Iterable[str] = (),
) -> Dict:
    """Map ``state_dict`` onto the structure of ``target_params``.

    Args:
      state_dict: torch-named tensors (numpy).
      target_params: the Flax ``params`` tree (arrays or ShapeDtypeStructs) to fill.
      source: the file or folder, for error messages.
      rename: optional key rewrite applied first; returning None drops the key
        (for buffers such as ``position_ids``).
      ignore: regexes of checkpoint keys to drop silently (non-parameter buffers).
    Returns:
      A nested dict of numpy arrays in the target dtypes.
    """
    targets = {k: v for k, v in traverse_util.flatten_dict(_unfreeze(target_params)).items()}
    ignore_res = [re.compile(p) for p in ignore]
    filled: Dict[Path, np.ndarray] = {}
    origin: Dict[Path, str] = {}
    unexpected = []
    for key, value in state_dict.items():
        if any(r.search(key) for r in ignore_res):
            continue
        new_key = rename(key) if rename else key
        if new_key is None:
            continue
        path, array = _to_flax_leaf(torch_key_to_path(new_key), np.asarray(value), targets)
        if path not in targets:
            unexpected.append(key)
            continue
        want = targets[path]
        if tuple(array.shape) != tuple(want.shape):
            raise CheckpointError(
                f"{source}: weight {key!r} has shape {tuple(np.shape(value))}; the model expects "
                f"{'/'.join(path)} with shape {tuple(want.shape)} (after layout change: {tuple(array.shape)})")
        if path in filled:
            raise CheckpointError(f"{source}: {key!r} and {origin[path]!r} both map to {'/'.join(path)}")
        filled[path] = np.asarray(array, dtype=want.dtype)
        origin[path] = key
    missing = sorted("/".join(p) for p in targets if p not in filled)
    if unexpected or missing:
        lines = [f"{source}: checkpoint does not match the model configuration."]
        if missing:
            lines.append(f"  {len(missing)} model weights missing from the checkpoint, e.g. {missing[:5]}")
        if unexpected:
            lines.append(f"  {len(unexpected)} unexpected checkpoint weights, e.g. {sorted(unexpected)[:5]}")
        raise CheckpointError("\n".join(lines))
    return traverse_util.unflatten_dict(filled)


def _unfreeze(tree):
    if hasattr(tree, "unfreeze"):
        return tree.unfreeze()
    return dict(tree)
