"""Image-folder source: images under a directory, captions beside them.

    src = FolderSource("/data/pets", with_labels=False)
    len(src); src.load(i) -> {"image": uint8 (H, W, 3), "caption": str[, "label": int]}

Images: every .png/.jpg/.jpeg/.webp/.bmp below `root` (recursive, sorted by
relative path, so the index of a file never depends on the file system).
Captions, first match wins:
  1. a sidecar text file with the same stem: `cat/001.jpg` -> `cat/001.txt`,
  2. `captions.jsonl` at the root, one `{"file": "cat/001.jpg", "caption": "..."}` a line,
  3. `captions.csv` at the root with a header `file,caption`,
with "file" relative to the root (POSIX separators). An image without a caption
gets "" and one summary warning is logged for the whole folder.
Labels (optional, `with_labels=True`): the index of the image's top-level
sub-folder among the sorted sub-folders (the ImageFolder convention).

`load` raises on unreadable images (garbage bytes, truncated files); the
pipeline catches that, logs the path once and uses the next readable example.
"""

from __future__ import annotations

import csv
import json
import logging
import os

import numpy as np
from PIL import Image, ImageOps

logger = logging.getLogger("ldm_jax.data")

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def read_rgb(path: str) -> np.ndarray:
    """An image file as uint8 (H, W, 3): EXIF orientation applied, transparency composited on
    white (like the emoji asset). Truncated or garbage files raise (decoded here, not lazily)."""
    with Image.open(path) as img:
        img.load()
        img = ImageOps.exif_transpose(img)
        if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
            rgba = img.convert("RGBA")
            img = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            img.alpha_composite(rgba)
        return np.asarray(img.convert("RGB"), dtype=np.uint8)


def _read_caption_tables(root: str) -> dict[str, str]:
    """captions.csv and captions.jsonl at `root` (jsonl wins): {relative posix path: caption}."""
    table: dict[str, str] = {}
    csv_path = os.path.join(root, "captions.csv")
    if os.path.exists(csv_path):
        with open(csv_path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames is None or not {"file", "caption"} <= set(reader.fieldnames):
                raise ValueError(f"{csv_path}: expected a header with columns 'file,caption', "
                                 f"got {reader.fieldnames}")
            for row in reader:
                table[_norm(row["file"])] = row["caption"] or ""
    jsonl_path = os.path.join(root, "captions.jsonl")
    if os.path.exists(jsonl_path):  # read second: jsonl wins over csv
        with open(jsonl_path, encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                    table[_norm(rec["file"])] = str(rec["caption"])
                except (ValueError, KeyError, TypeError) as e:
                    raise ValueError(f"{jsonl_path}:{line_no}: expected "
                                     f'{{"file": ..., "caption": ...}}, got {line.strip()!r}') from e
    return table


def _norm(rel: str) -> str:
    rel = rel.strip()
    return os.path.normpath(rel).replace(os.sep, "/").lstrip("/") if rel else ""


class FolderSource:
    """Random-access source over an image folder (see the module docstring)."""

    def __init__(self, root: str, *, with_labels: bool = False):
        if not root:
            raise FileNotFoundError("image folder: no path given (a folder dataset needs data.path)")
        if os.path.exists(root) and not os.path.isdir(root):
            raise NotADirectoryError(f"image folder {root!r} is a file, not a folder (data.path)")
        if not os.path.isdir(root):
            raise FileNotFoundError(f"image folder {root!r} does not exist")
        self.root = os.path.abspath(root)
        rels = []
        for dirpath, dirnames, filenames in os.walk(self.root, followlinks=True):
            dirnames.sort()
            for name in filenames:
                if name.lower().endswith(IMAGE_EXTENSIONS):
                    rels.append(os.path.relpath(os.path.join(dirpath, name), self.root))
        self.files = sorted(r.replace(os.sep, "/") for r in rels)
        if not self.files:
            raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under {self.root}")
        table = _read_caption_tables(self.root)
        self.captions = []
        missing = []
        for rel in self.files:
            sidecar = os.path.join(self.root, os.path.splitext(rel)[0] + ".txt")
            if os.path.exists(sidecar):
                with open(sidecar, encoding="utf-8") as f:
                    self.captions.append(f.read().strip())
            elif rel in table:
                self.captions.append(table[rel])
            else:
                self.captions.append("")
                missing.append(rel)
        if missing:
            logger.warning("%d of %d images under %s have no caption (no sidecar .txt, not in "
                           "captions.jsonl/csv); using empty captions, e.g. %s",
                           len(missing), len(self.files), self.root, ", ".join(missing[:3]))
        self.class_names: list[str] | None = None
        self.labels: list[int] | None = None
        if with_labels:
            tops = [rel.split("/")[0] if "/" in rel else "" for rel in self.files]
            if "" in tops:
                raise ValueError(f"with_labels=True needs every image in a class sub-folder of "
                                 f"{self.root}; {self.files[tops.index('')]} is at the root")
            self.class_names = sorted(set(tops))
            ids = {name: i for i, name in enumerate(self.class_names)}
            self.labels = [ids[t] for t in tops]

    @property
    def has_labels(self) -> bool:
        return self.labels is not None

    def __len__(self) -> int:
        return len(self.files)

    def describe(self, index: int) -> str:
        return os.path.join(self.root, self.files[index])

    def load(self, index: int) -> dict:
        path = self.describe(index)
        out = {"image": read_rgb(path), "caption": self.captions[index]}
        if self.labels is not None:
            out["label"] = self.labels[index]
        return out
