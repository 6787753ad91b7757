"""Images and masks in, PNGs out: the conversions the pipeline and the CLIs share.

Images are float32 NHWC in [0, 1] at the API; the pipeline maps them to [-1, 1].
"""
from __future__ import annotations

import os
from typing import Optional

import numpy as np
from PIL import Image


def _load(item, mode: str) -> np.ndarray:
    if isinstance(item, (str, os.PathLike)):
        if not os.path.isfile(item):
            raise FileNotFoundError(f"image file not found: {item}")
        with Image.open(item) as im:
            item = im.convert(mode)
    if isinstance(item, Image.Image):
        arr = np.asarray(item.convert(mode), dtype=np.float32) / 255.0
        return arr if arr.ndim == 3 else arr[..., None]
    arr = np.asarray(item)
    if arr.dtype == np.uint8 and mode == "RGB":
        # 8-bit pixels (0..255), read as the PIL image of the same array is above (they were refused
        # as out of [0, 1]). Masks are not rescaled: binarised at 0.5, uint8 {0, 1} and {0, 255}
        # masks both mean "repaint where nonzero".
        return arr.astype(np.float32) / 255.0
    return arr.astype(np.float32)


def _batch(images, mode: str) -> np.ndarray:
    if isinstance(images, (list, tuple)):
        arr = np.stack([_load(i, mode) for i in images])
    else:
        arr = _load(images, mode)
        if arr.ndim == 3 and (mode == "RGB" or arr.shape[-1] == 1):
            arr = arr[None]
    return arr


def prepare_image(images, batch: int, height: Optional[int], width: Optional[int], repeat: bool = True) -> np.ndarray:
    """(B, H, W, 3) float32 in [0, 1] from an array, PIL image(s) or path(s); a single
    image is repeated over the batch (``repeat=False``: returned as given, k images, after
    checking that k divides the batch). A given height/width must match the image."""
    arr = _batch(images, "RGB")
    if arr.ndim != 4 or arr.shape[-1] != 3:
        raise ValueError(f"init_image must be (B, H, W, 3) or (H, W, 3) in [0, 1], got shape {arr.shape}")
    if arr.min() < 0.0 or arr.max() > 1.0:
        raise ValueError(f"init_image values must be in [0, 1], got [{arr.min():.3g}, {arr.max():.3g}]")
    if (height and height != arr.shape[1]) or (width and width != arr.shape[2]):
        raise ValueError(f"init_image is {arr.shape[1]}x{arr.shape[2]} but height x width is {height}x{width}; "
                         "resize the image or drop height/width")
    return _repeat(arr, batch, "init_image", repeat)


def prepare_mask(mask, batch: int, height: int, width: int, repeat: bool = True) -> np.ndarray:
    """(B, H, W, 1) float32 of 0/1 (1 = repaint), binarised at 0.5 as diffusers' mask processor."""
    arr = _batch(mask, "L")
    if arr.ndim == 3 and arr.shape[:2] == (height, width) and arr.shape[1:] != (height, width) and arr.shape[-1] != 1:
        # (H, W, C) with C > 1 (an RGB mask array) was read as a batch of H masks of size W x C.
        raise ValueError(f"mask must have one channel: (B, H, W), (H, W) or (B, H, W, 1) (a PIL image is converted "
                         f"to grayscale), got shape {arr.shape}")
    if arr.ndim == 2:
        arr = arr[None, ..., None]
    elif arr.ndim == 3:
        arr = arr[..., None] if arr.shape[-1] != 1 else arr[None]
    if arr.ndim != 4 or arr.shape[-1] != 1:
        raise ValueError(f"mask must be (B, H, W), (H, W) or (B, H, W, 1), got shape {arr.shape}")
    if arr.shape[1:3] != (height, width):
        raise ValueError(f"mask is {arr.shape[1]}x{arr.shape[2]} but the image is {height}x{width}")
    return _repeat((arr >= 0.5).astype(np.float32), batch, "mask", repeat)


def _repeat(arr: np.ndarray, batch: int, what: str, repeat: bool = True) -> np.ndarray:
    if arr.shape[0] == batch:
        return arr
    if batch % arr.shape[0]:
        raise ValueError(f"{what} has {arr.shape[0]} entries, which does not divide the batch of {batch}")
    if not repeat:
        return arr
    return np.concatenate([arr] * (batch // arr.shape[0]))


def to_uint8(images_bhwc: np.ndarray) -> np.ndarray:
    """Images in [0, 1] -> uint8 as diffusers' ``numpy_to_pil``: round(x * 255), halves to even. (The
    float32 ``x * 255 + 0.5`` this replaced rounded halves up, so a pixel at exactly k + 0.5 was one
    level above the API's images converted the diffusers way.)"""
    return (np.clip(np.asarray(images_bhwc, np.float32), 0.0, 1.0) * np.float32(255)).round().astype(np.uint8)


def make_grid(images_bhwc: np.ndarray, cols: Optional[int] = None, pad: int = 2, fill: float = 1.0) -> np.ndarray:
    """Tile (B, H, W, 3) images into one (rows*H, cols*W, 3) array; padding and empty cells are
    ``fill`` (white by default)."""
    b, h, w, c = images_bhwc.shape
    cols = cols or int(np.ceil(np.sqrt(b)))
    rows = int(np.ceil(b / cols))
    grid = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), fill, images_bhwc.dtype)
    for i, im in enumerate(images_bhwc):
        r, q = divmod(i, cols)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + q * (w + pad): pad + q * (w + pad) + w] = im
    return grid
