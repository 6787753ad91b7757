"""The CLIP text tokenizer: byte-level BPE (Radford et al. 2021, "Learning
Transferable Visual Models From Natural Language Supervision", Sec. 2.4,
after Sennrich et al. 2016 with GPT-2's byte-to-unicode table).

Pipeline for one string, as in OpenAI CLIP / open_clip ``SimpleTokenizer``:

1. clean: ``ftfy.fix_text``, HTML-unescape (twice), collapse whitespace,
   strip, lowercase;
2. pre-tokenise with the CLIP regex (contractions, letter runs, single
   digits, runs of other non-space symbols);
3. map each piece's UTF-8 bytes to printable unicode characters
   (``bytes_to_unicode``), mark the last symbol with ``</w>``, and apply the
   BPE merges in rank order;
4. look the resulting symbols up in the vocabulary.

``__call__`` wraps each string as ``[SOT] ids [EOT]``, truncates to
``max_length`` keeping EOT last (open_clip), and pads with ``pad_token_id``:
0 as open_clip and SD2's tokenizer ("!"), 49407 (EOT) as SD1's
transformers tokenizer.

The vocabulary comes from the vendored ``assets/bpe_simple_vocab_16e6.txt.gz``
(OpenAI CLIP's merges, MIT; see ``assets/LICENSE``) or from a diffusers /
transformers ``tokenizer/`` folder (vocab.json + merges.txt or tokenizer.json).

Known difference from transformers' (fast) CLIPTokenizer, which normalises
with NFC + whitespace collapse + lowercase only: it does not run ftfy or HTML
unescaping, so strings with HTML entities (``&amp;``), curly quotes,
full-width forms, ligatures or mojibake tokenise differently there. This
implementation follows OpenAI CLIP / open_clip, which the models were trained
with.
"""
from __future__ import annotations

import functools
import gzip
import html
import json
import os
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

import ftfy
import numpy as np
import regex

ASSET_BPE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "bpe_simple_vocab_16e6.txt.gz")

SOT_TOKEN = "<|startoftext|>"
EOT_TOKEN = "<|endoftext|>"
END_OF_WORD = "</w>"
# CLIP uses the first 49152 - 256 - 2 merges of the 16e6 file (vocab 49408).
NUM_CLIP_MERGES = 49152 - 256 - 2
DEFAULT_MAX_LENGTH = 77

# Contractions, letter runs, single digits, runs of other non-space symbols.
_PIECE_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


@functools.lru_cache(maxsize=None)
def bytes_to_unicode() -> Dict[int, str]:
    """GPT-2's reversible byte -> printable character table.

    Printable Latin-1 bytes map to themselves; the other 68 bytes (controls,
    space, ...) map to code points 256, 257, ... in byte order. The dict's
    order (printable bytes first, then the rest) is the order of the first 256
    vocabulary entries.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def clean_text(text: str) -> str:
    """ftfy + HTML unescape + whitespace collapse + lowercase (open_clip 'lower')."""
    text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    return " ".join(text.split()).lower()


def read_bpe_merges(path: str = ASSET_BPE, num_merges: int = NUM_CLIP_MERGES) -> List[Tuple[str, str]]:
    """The first ``num_merges`` merges of an OpenAI-format BPE file (.txt or .txt.gz)."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        lines = f.read().decode("utf-8").split("\n")
    # Line 0 is a version header.
    merges = [tuple(line.split()) for line in lines[1:1 + num_merges]]
    bad = [m for m in merges if len(m) != 2]
    if bad or len(merges) != num_merges:
        raise ValueError(f"{path}: expected {num_merges} merges of two symbols, got {len(merges)} ({bad[:3]})")
    return merges


def vocab_from_merges(merges: Sequence[Tuple[str, str]]) -> Dict[str, int]:
    """CLIP's vocabulary order: 256 byte symbols, the same with ``</w>``, one
    entry per merge, then SOT and EOT (ids 49406, 49407 for the CLIP file)."""
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + END_OF_WORD for s in symbols] + ["".join(m) for m in merges] + [SOT_TOKEN, EOT_TOKEN]
    return {t: i for i, t in enumerate(tokens)}


class CLIPTokenizer:
    """Byte-level BPE tokenizer of CLIP; ``__call__`` -> int32 (B, max_length)."""

    def __init__(
        self,
        vocab: Optional[Dict[str, int]] = None,
        merges: Optional[Sequence[Tuple[str, str]]] = None,
        *,
        pad_token_id: int = 0,
        max_length: int = DEFAULT_MAX_LENGTH,
        bpe_path: str = ASSET_BPE,
    ):
        """Args:
          vocab, merges: token -> id and merge list; both None reads ``bpe_path``
            (the vendored CLIP file).
          pad_token_id: id written after EOT (0: open_clip / SD2; 49407: SD1).
          max_length: default context length of ``__call__``.
        """
        if (vocab is None) != (merges is None):
            raise ValueError("pass both vocab and merges, or neither")
        if merges is None:
            merges = read_bpe_merges(bpe_path)
            vocab = vocab_from_merges(merges)
        self.encoder: Dict[str, int] = dict(vocab)
        self.decoder: Dict[int, str] = {i: t for t, i in self.encoder.items()}
        self.bpe_ranks: Dict[Tuple[str, str], int] = {tuple(m): r for r, m in enumerate(merges)}
        for special in (SOT_TOKEN, EOT_TOKEN):
            if special not in self.encoder:
                raise ValueError(f"vocabulary lacks the special token {special!r}")
        self.sot_token_id = self.encoder[SOT_TOKEN]
        self.eot_token_id = self.encoder[EOT_TOKEN]
        self.pad_token_id = int(pad_token_id)
        self.max_length = int(max_length)
        self.vocab_size = len(self.encoder)
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        specials = "|".join(regex.escape(t) for t in (SOT_TOKEN, EOT_TOKEN))
        self._pattern = regex.compile(specials + "|" + _PIECE_PATTERN, regex.IGNORECASE)
        self._cache: Dict[str, Tuple[str, ...]] = {SOT_TOKEN: (SOT_TOKEN,), EOT_TOKEN: (EOT_TOKEN,)}

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(
        cls, folder: str, *, pad_token_id: Optional[int] = None, max_length: Optional[int] = None
    ) -> "CLIPTokenizer":
        """Read a diffusers / transformers ``tokenizer/`` folder.

        Vocabulary: vocab.json + merges.txt, else tokenizer.json, else the
        vendored CLIP file. Pad token and ``model_max_length``: from
        tokenizer_config.json and special_tokens_map.json (SD1 pads with
        "<|endoftext|>", SD2 with "!"); the keyword arguments override them.
        """
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"{folder}: not a directory")
        path = functools.partial(os.path.join, folder)
        vocab = merges = None
        if os.path.isfile(path("vocab.json")) and os.path.isfile(path("merges.txt")):
            with open(path("vocab.json"), encoding="utf-8") as f:
                vocab = json.load(f)
            with open(path("merges.txt"), encoding="utf-8") as f:
                merges = _parse_merge_lines(f.read().split("\n"))
        elif os.path.isfile(path("tokenizer.json")):
            with open(path("tokenizer.json"), encoding="utf-8") as f:
                model = json.load(f).get("model") or {}
            vocab = model.get("vocab")
            if not vocab:
                raise ValueError(f"{path('tokenizer.json')}: no BPE vocabulary in 'model'")
            merges = [tuple(m) if isinstance(m, (list, tuple)) else tuple(m.split(" "))
                      for m in model.get("merges") or []]
        config = {}
        for name in ("special_tokens_map.json", "tokenizer_config.json"):  # the latter wins
            if os.path.isfile(path(name)):
                with open(path(name), encoding="utf-8") as f:
                    config.update(json.load(f))
        tok = cls(vocab, merges)
        pad = config.get("pad_token")
        if isinstance(pad, dict):
            pad = pad.get("content")
        if pad_token_id is not None:
            tok.pad_token_id = int(pad_token_id)
        elif pad is not None:
            if pad not in tok.encoder:
                raise ValueError(f"{folder}: pad token {pad!r} is not in the vocabulary")
            tok.pad_token_id = tok.encoder[pad]
        saved_len = config.get("model_max_length")
        if max_length is not None:
            tok.max_length = int(max_length)
        elif isinstance(saved_len, int) and 0 < saved_len < 10**6:  # transformers writes ~1e30 for "unset"
            tok.max_length = saved_len
        return tok

    # ---------------------------------------------------------------- encoding
    def bpe(self, piece: str) -> Tuple[str, ...]:
        """Merge the byte-symbols of one pre-token, lowest merge rank first."""
        cached = self._cache.get(piece)
        if cached is not None:
            return cached
        word = list(piece[:-1]) + [piece[-1] + END_OF_WORD]
        while len(word) > 1:
            ranked = [(self.bpe_ranks[pair], i) for i, pair in enumerate(zip(word, word[1:]))
                      if pair in self.bpe_ranks]
            if not ranked:
                break
            _, at = min(ranked)
            first, second = word[at], word[at + 1]
            # Merge every non-overlapping occurrence of the pair, left to right.
            merged, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and word[i] == first and word[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        out = tuple(word)
        if len(self._cache) < 100_000:
            self._cache[piece] = out
        return out

    def encode(self, text: str) -> List[int]:
        """Token ids of ``text`` without SOT/EOT."""
        ids: List[int] = []
        for piece in self._pattern.findall(clean_text(text)):
            symbols = "".join(self.byte_encoder[b] for b in piece.encode("utf-8"))
            ids.extend(self.encoder[s] for s in self.bpe(symbols))
        return ids

    def __call__(self, texts: Union[str, Iterable[str]], max_length: Optional[int] = None) -> np.ndarray:
        """``[SOT] ids [EOT] pad...`` per string -> int32 (B, max_length).

        Longer inputs are cut to ``max_length`` with EOT as the last token.
        """
        if isinstance(texts, str):
            texts = [texts]
        texts = list(texts)
        max_length = self.max_length if max_length is None else int(max_length)
        if max_length < 2:
            raise ValueError(f"max_length must leave room for SOT and EOT, got {max_length}")
        out_bl = np.full((len(texts), max_length), self.pad_token_id, dtype=np.int32)
        for row, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"expected a string, got {type(text).__name__} at index {row}")
            ids = [self.sot_token_id] + self.encode(text)[: max_length - 2] + [self.eot_token_id]
            out_bl[row, : len(ids)] = ids
        return out_bl

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Text of ``ids`` (``</w>`` becomes a space). By default SOT is dropped
        and decoding stops at the first EOT (what follows is padding)."""
        kept = []
        for i in (int(i) for i in ids):
            if skip_special_tokens and i == self.eot_token_id:
                break
            if not (skip_special_tokens and i == self.sot_token_id):
                kept.append(i)
        symbols = "".join(self.decoder[i] for i in kept)
        # Every vocabulary symbol, "</w>" and the specials included, is made of byte characters.
        text = bytes(self.byte_decoder[c] for c in symbols).decode("utf-8", errors="replace")
        return text.replace(END_OF_WORD, " ").strip()


def _parse_merge_lines(lines: Sequence[str]) -> List[Tuple[str, str]]:
    merges = []
    for line in lines:
        if not line or line.startswith("#version"):
            continue
        pair = tuple(line.split(" "))
        if len(pair) != 2:
            raise ValueError(f"malformed merge line {line!r}")
        merges.append(pair)
    return merges
