"""Build the packaged emoji dataset: ldm_jax/data/assets/emoji64.npz.

Renders every emoji that Noto Color Emoji draws as one glyph, captions it with
its name, and stores 64x64 RGB images plus captions in one compressed .npz.
The result ships in the repository; nobody but the maintainer who rebuilds it
needs the font or the tools below.

Build-time tool dependencies (NOT runtime requirements of ldm_jax):
  * Debian package fonts-noto-color-emoji (the font file, a CBDT bitmap font:
    PIL renders it only at size 109 with ``embedded_color=True``),
  * Pillow built with libraqm (complex text layout, so that ZWJ sequences,
    flags, keycaps and skin tones are shaped into one glyph),
  * the PyPI package ``emoji`` (its EMOJI_DATA lists every emoji sequence with
    its CLDR short name and qualification status; tested with emoji==2.16.0).
  Example, without touching the project's environment:
    apt-get install -y fonts-noto-color-emoji
    pip install --target /tmp/emoji_tools emoji==2.16.0
    PYTHONPATH=/tmp/emoji_tools python tools/build_emoji_dataset.py

Captions (lower-case):
  * one code point (ignoring U+FE0F): ``unicodedata.name`` of the running
    Python ("red apple", "grinning face with smiling eyes"); code points newer
    than Python's Unicode database fall back to the CLDR name,
  * sequences (ZWJ sequences, skin tones, keycaps): the CLDR short name from the
    ``emoji`` package with underscores as spaces ("man technologist medium skin
    tone", "keycap 1"); flags get a "flag of " prefix ("flag of japan").
The CLDR short name of every emoji is stored too (``cldr_names``).

Which emoji are kept: every fully-qualified emoji and every component of the
``emoji`` package that the font shapes into exactly one glyph (one advance
width after layout) with visible pixels (the font's .notdef is blank); renders
identical to another are merged, keeping the one with the shortest name
(the flag of France, not of Clipperton Island). Order: by code point sequence.

Image: the glyph is drawn at size 109 on a transparent canvas, cropped to its
visible pixels, centred on a white square whose side is the font's nominal
advance (136 px, or the crop's larger side if that is bigger; so relative
sizes are kept), alpha-composited, and resized to 64x64 with LANCZOS.

Split: every 20th image (index % 20 == 19) is the validation split.

The output is byte-for-byte deterministic for a given font, Pillow and emoji
version: the .npz zip entries get a fixed timestamp.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import io
import os
import subprocess
import sys
import unicodedata
import zipfile

import numpy as np
from PIL import Image, ImageDraw, ImageFont, features

FONT_PATH = "/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf"
COPYRIGHT_PATH = "/usr/share/doc/fonts-noto-color-emoji/copyright"
FONT_SIZE = 109  # the only strike of the CBDT font
IMAGE_SIZE = 64
VALIDATION_EVERY = 20  # index % 20 == 19 -> validation
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUT = os.path.join(REPO, "ldm_jax", "data", "assets")

_VS16 = 0xFE0F
_REGIONAL_INDICATORS = range(0x1F1E6, 0x1F200)
_BLACK_FLAG = 0x1F3F4  # + tag characters = subdivision flags (England, ...)


def _codepoints(seq: str) -> str:
    return " ".join(f"U+{ord(c):04X}" for c in seq)


def _cldr_name(entry: dict) -> str:
    # ":man_technologist_medium_skin_tone:" -> "man technologist medium skin tone"
    return entry["en"].strip(":").replace("_", " ").lower()


def caption_for(seq: str, entry: dict) -> str:
    """Lower-case caption: Unicode name for one code point, CLDR name otherwise."""
    cps = [ord(c) for c in seq if ord(c) != _VS16]
    if len(cps) == 1:
        name = unicodedata.name(chr(cps[0]), None)
        if name:
            return name.lower()
    name = _cldr_name(entry)
    is_flag = all(c in _REGIONAL_INDICATORS for c in cps) or (
        cps[0] == _BLACK_FLAG and len(cps) > 2 and all(0xE0020 <= c <= 0xE007F for c in cps[1:])
    )
    if is_flag and not name.startswith("flag"):
        name = "flag of " + name
    return name


def _prefer(seq: str, other: str, data: dict) -> bool:
    """True if `seq` should replace `other` as the representative of one image."""
    key = lambda s: (len(_cldr_name(data[s])), [ord(c) for c in s])  # noqa: E731
    return key(seq) < key(other)


def render(font: ImageFont.FreeTypeFont, seq: str, advance: float) -> Image.Image | None:
    """RGB image (IMAGE_SIZE, IMAGE_SIZE) on white, or None when not one visible glyph."""
    if abs(font.getlength(seq) - advance) > 0.5:
        return None  # the font laid it out as several glyphs: sequence unsupported
    canvas = Image.new("RGBA", (2 * int(advance), 2 * int(advance)), (0, 0, 0, 0))
    ImageDraw.Draw(canvas).text((int(advance) // 2,) * 2, seq, font=font, embedded_color=True)
    bbox = canvas.getchannel("A").getbbox()
    if bbox is None:
        return None  # .notdef / empty glyph
    glyph = canvas.crop(bbox)
    side = max(int(round(advance)), glyph.width, glyph.height)
    square = Image.new("RGBA", (side, side), (255, 255, 255, 255))
    square.alpha_composite(glyph, ((side - glyph.width) // 2, (side - glyph.height) // 2))
    return square.convert("RGB").resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.LANCZOS)


def build(font_path: str = FONT_PATH):
    import emoji  # build-time only

    if not features.check("raqm"):
        sys.exit("Pillow lacks libraqm: emoji sequences would not be shaped into one glyph")
    font = ImageFont.truetype(font_path, FONT_SIZE)
    advance = font.getlength("\U0001F34E")  # red apple: one glyph's advance
    wanted = (emoji.STATUS["fully_qualified"], emoji.STATUS["component"])
    candidates = sorted(
        (seq for seq, e in emoji.EMOJI_DATA.items() if e["status"] in wanted),
        key=lambda s: [ord(c) for c in s],
    )
    by_digest: dict[bytes, tuple[str, np.ndarray]] = {}
    dropped_unsupported = dropped_duplicate = 0
    for seq in candidates:
        img = render(font, seq, advance)
        if img is None:
            dropped_unsupported += 1
            continue
        arr = np.asarray(img, dtype=np.uint8)
        digest = hashlib.sha256(arr.tobytes()).digest()
        if digest in by_digest:
            # Identical renders (flags shared by territories, a fully covered
            # snowboarder in every skin tone): keep the shortest name, which is
            # the common one ("united states", not "u.s. outlying islands").
            dropped_duplicate += 1
            if _prefer(seq, by_digest[digest][0], emoji.EMOJI_DATA):
                by_digest[digest] = (seq, arr)
        else:
            by_digest[digest] = (seq, arr)
    kept = sorted(by_digest.values(), key=lambda item: [ord(c) for c in item[0]])
    images = [arr for _, arr in kept]
    captions = [caption_for(seq, emoji.EMOJI_DATA[seq]) for seq, _ in kept]
    cldr = [_cldr_name(emoji.EMOJI_DATA[seq]) for seq, _ in kept]
    codepoints = [_codepoints(seq) for seq, _ in kept]
    n = len(images)
    stats = dict(candidates=len(candidates), kept=n, unsupported=dropped_unsupported,
                 duplicates=dropped_duplicate, emoji_version=emoji.__version__)
    arrays = {
        "images": np.stack(images),  # (N, 64, 64, 3) uint8
        "captions": np.array(captions, dtype=np.str_),
        "cldr_names": np.array(cldr, dtype=np.str_),
        "codepoints": np.array(codepoints, dtype=np.str_),
        "is_validation": (np.arange(n) % VALIDATION_EVERY) == VALIDATION_EVERY - 1,
    }
    return arrays, stats


def save_npz_deterministic(path: str, arrays: dict) -> None:
    """Like np.savez_compressed, with fixed zip timestamps (reproducible bytes).

    Entries are LZMA-compressed (8.8 MB instead of 13.1 MB with deflate for the
    44 MB of pixels); np.load reads them, as Python's zipfile supports LZMA.
    """
    tmp = path + ".tmp"
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_LZMA) as zf:
        for name in sorted(arrays):
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.asanyarray(arrays[name]), allow_pickle=False)
            info = zipfile.ZipInfo(name + ".npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_LZMA
            info.external_attr = 0o644 << 16
            zf.writestr(info, buf.getvalue())
    os.replace(tmp, path)


def _font_version(font_path: str) -> str:
    try:
        out = subprocess.run(["dpkg-query", "-W", "-f=${Version}", "fonts-noto-color-emoji"],
                             capture_output=True, text=True, check=True).stdout.strip()
        deb = f"Debian fonts-noto-color-emoji {out}"
    except (OSError, subprocess.CalledProcessError):
        deb = "Debian package version unknown"
    try:
        from fontTools.ttLib import TTFont  # optional, for the name table

        name = TTFont(font_path, lazy=True)["name"].getDebugName(5)
    except Exception:  # noqa: BLE001 - purely informative
        name = None
    return f"{deb}; font name table: {name}" if name else deb


def write_license(path: str, arrays: dict, stats: dict, npz_path: str, font_path: str) -> None:
    with open(COPYRIGHT_PATH, encoding="utf-8") as f:
        copyright_text = f.read()
    with open(npz_path, "rb") as f:
        sha = hashlib.sha256(f.read()).hexdigest()
    n = len(arrays["captions"])
    n_val = int(arrays["is_validation"].sum())
    header = f"""emoji64.npz: Noto Color Emoji images with captions
====================================================

The images in emoji64.npz are renderings of the Noto Color Emoji font
(https://github.com/googlefonts/noto-emoji), Copyright 2013-2017 Google Inc.
and contributors. The emoji image files are licensed under the Apache License,
Version 2.0 (https://www.apache.org/licenses/LICENSE-2.0); the font file itself
is under the SIL Open Font License 1.1. The images here were rendered from the
font and resized; they are a modified form of the Apache-2.0 licensed images.
Captions are Unicode character names (Python unicodedata {unicodedata.unidata_version})
and CLDR short names as shipped by the PyPI package emoji {stats['emoji_version']}.

How this file was produced
--------------------------
font:     {font_path} ({_font_version(font_path)})
script:   tools/build_emoji_dataset.py (Pillow {Image.__version__} with libraqm,
          Python {sys.version.split()[0]}, numpy {np.__version__}, emoji {stats['emoji_version']})
date:     {datetime.date.today().isoformat()}
contents: {n} images (64x64 RGB uint8, white background), {n - n_val} train /
          {n_val} validation (every {VALIDATION_EVERY}th image); candidates
          {stats['candidates']}, not drawn as one glyph by the font {stats['unsupported']},
          duplicate renders {stats['duplicates']}.
sha256:   {sha}

Arrays: images (N,64,64,3) uint8, captions (N,) str, cldr_names (N,) str,
codepoints (N,) str ("U+1F34E", space separated for sequences),
is_validation (N,) bool.

Debian copyright file of fonts-noto-color-emoji ({COPYRIGHT_PATH})
---------------------------------------------------------------------------
"""
    with open(path, "w", encoding="utf-8") as f:
        f.write(header + copyright_text)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--font", default=FONT_PATH)
    parser.add_argument("--out_dir", default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    arrays, stats = build(args.font)
    os.makedirs(args.out_dir, exist_ok=True)
    npz_path = os.path.join(args.out_dir, "emoji64.npz")
    save_npz_deterministic(npz_path, arrays)
    write_license(os.path.join(args.out_dir, "EMOJI_LICENSE.txt"), arrays, stats, npz_path, args.font)
    size = os.path.getsize(npz_path)
    print(f"wrote {npz_path}: {len(arrays['captions'])} images, {size / 2**20:.2f} MiB; {stats}")


if __name__ == "__main__":
    main()
