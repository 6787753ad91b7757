"""The CLIP text tokenizer: byte-level BPE (Radford et al. 2021, "Learning
Transferable Visual Models From Natural Language Supervision", Sec. 2.4,
after Sennrich et al. 2016 with GPT-2's byte-to-unicode table).

Three ``style``s, one per reference a user compares with:

* ``"openai"`` (the default): OpenAI CLIP's ``SimpleTokenizer``, the tokenizer
  the CLIP models were trained with; used for CompVis SD1 ``.ckpt`` files
  (FrozenCLIPEmbedder). ``"open_clip"``: the same with open_clip's spelling of
  the special-token strings in text (``<start_of_text>``, ``<end_of_text>``),
  which ``open_clip.tokenize`` (FrozenOpenCLIPEmbedder, SD2 ``.ckpt`` files)
  maps to SOT/EOT. For one string:

  1. clean: ``ftfy.fix_text``, HTML-unescape (twice), collapse whitespace,
     strip, lowercase;
  2. pre-tokenise with the CLIP regex (the special-token strings,
     contractions, letter runs, single digits, runs of other non-space
     symbols; case-insensitive);
  3. map each piece's UTF-8 bytes to printable unicode characters
     (``bytes_to_unicode``), mark the last symbol with ``</w>``, and apply the
     BPE merges in rank order;
  4. look the resulting symbols up in the vocabulary.

* ``"transformers"``: transformers 5's ``CLIPTokenizer`` (the ``tokenizers``
  backend; no ftfy, no HTML unescaping), what diffusers pipelines load from a
  ``tokenizer/`` folder; ``from_pretrained`` uses it. Added tokens (the
  special tokens, textual-inversion tokens) are split out first, those with
  ``normalized=False`` from the raw text; the rest is normalised (NFC,
  ``\s+`` -> " ", per-character lowercase, nothing stripped), normalised
  added tokens are split out, and the remaining text is pre-tokenised with
  the CLIP regex (case-sensitive; an unmatched ``<|endoftext|>`` string is
  plain text there) followed by GPT-2's ByteLevel regex, then BPE as above.
  Consequences that are transformers' and kept on purpose: SD2 / SDXL folders
  whose pad token is "!" make "!" an added token, so "wow!!!" is three id-0
  tokens; in SD1 folders "<|endoftext|>" is matched case-sensitively (the pad
  token overrides EOT's ``normalized``), "<|ENDOFTEXT|>" is plain text.

``__call__`` wraps each string as ``[SOT] ids [EOT]``, truncates to
``max_length`` keeping EOT last (open_clip; transformers with
``truncation=True``), and pads with ``pad_token_id``: 0 as open_clip and SD2's
tokenizer ("!"), 49407 (EOT) as SD1's transformers tokenizer.

The vocabulary comes from the vendored ``assets/bpe_simple_vocab_16e6.txt.gz``
(OpenAI CLIP's merges, MIT; see ``assets/LICENSE``) or from a diffusers /
transformers ``tokenizer/`` folder (tokenizer.json, else vocab.json +
merges.txt).

Known limit: code points that Python's Unicode tables (``unicodedata``,
``regex``) and the Rust ones of ``tokenizers`` assign differently (characters
new in recent Unicode versions, unassigned in Python 3.11's) can tokenise
differently in the "transformers" style.
"""
from __future__ import annotations

import dataclasses
import functools
import gzip
import html
import os
import unicodedata
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
STYLES = ("openai", "open_clip", "transformers")
# How each style spells SOT / EOT inside a text (open_clip renamed them; its vocabulary ids are the same).
_TEXT_SPECIALS = {"openai": (SOT_TOKEN, EOT_TOKEN), "open_clip": ("<start_of_text>", "<end_of_text>")}

# Contractions, letter runs, single digits, runs of other non-space symbols.
_PIECE_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
# transformers' CLIPTokenizer: Split(this, invert) then ByteLevel(use_regex=True), whose GPT-2 regex
# splits the "<|endoftext|>" piece again ("<|", "endoftext", "|>"); both case-sensitive.
_HF_CLIP_SPLIT = regex.compile(r"<\|startoftext\|>|<\|endoftext\|>|" + _PIECE_PATTERN)
_HF_GPT2_SPLIT = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")
_HF_WHITESPACE = regex.compile(r"\s+")
# tokenizers' added_vocabulary.rs (Rust regex: Unicode \w and \s) for single_word / lstrip / rstrip.
_WORD_CHAR = regex.compile(r"[\p{Alphabetic}\p{M}\p{Nd}\p{Pc}\p{Join_Control}]")
_SPACES_AT_END = regex.compile(r"\p{White_Space}*\Z")
_SPACES_AT_START = regex.compile(r"\p{White_Space}*")


@dataclasses.dataclass(frozen=True)
class AddedToken:
    """A token matched in the text before BPE (transformers / tokenizers ``AddedToken``):
    the special tokens of a transformers folder, textual-inversion tokens."""

    content: str
    id: int
    special: bool = False      # skipped by decode(skip_special_tokens=True)
    normalized: bool = True    # matched in the normalised text (lowercased, NFC), else in the raw text
    lstrip: bool = False       # swallows the whitespace on its left
    rstrip: bool = False       # swallows the whitespace on its right
    single_word: bool = False  # only matched with no word character on either side


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


def normalize_transformers(text: str) -> str:
    """transformers' CLIP normaliser: NFC, ``\\s+`` -> " ", Lowercase. tokenizers lowercases
    one character at a time (Rust ``char::to_lowercase``: no final-sigma rule), and
    strips nothing (the pre-tokeniser drops the spaces)."""
    text = _HF_WHITESPACE.sub(" ", unicodedata.normalize("NFC", text))
    return "".join(c.lower() for c in text)


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
        style: str = "openai",
        added_tokens: Sequence[AddedToken] = (),
        unk_token_id: Optional[int] = None,
    ):
        """Args:
          vocab, merges: token -> id and merge list; both None reads ``bpe_path``
            (the vendored CLIP file).
          pad_token_id: id written after EOT (0: open_clip / SD2; 49407: SD1).
          max_length: default context length of ``__call__``.
          style: "openai" (OpenAI CLIP; CompVis SD1 files), "open_clip" (SD2 files) or
            "transformers" (diffusers / transformers folders); see the module docstring.
          added_tokens: tokens split out before BPE ("transformers" style only).
          unk_token_id: id of a BPE symbol missing from ``vocab`` ("transformers" style;
            the byte-level CLIP vocabulary has every byte, so only a pruned vocab needs it).
        """
        if (vocab is None) != (merges is None):
            raise ValueError("pass both vocab and merges, or neither")
        if style not in STYLES:
            raise ValueError(f"style must be one of {STYLES}, got {style!r}")
        if added_tokens and style != "transformers":
            raise ValueError(f"added_tokens are a transformers feature; pass style='transformers', got {style!r}")
        if merges is None:
            merges = read_bpe_merges(bpe_path)
            vocab = vocab_from_merges(merges)
        self.encoder: Dict[str, int] = dict(vocab)
        self.decoder: Dict[int, str] = {i: t for t, i in self.encoder.items()}
        self.bpe_ranks: Dict[Tuple[str, str], int] = {tuple(m): r for r, m in enumerate(merges)}
        for special in (SOT_TOKEN, EOT_TOKEN):
            if special not in self.encoder:
                raise ValueError(f"vocabulary lacks the special token {special!r}")
        self.style = style
        self.sot_token_id = self.encoder[SOT_TOKEN]
        self.eot_token_id = self.encoder[EOT_TOKEN]
        self.pad_token_id = int(pad_token_id)
        self.unk_token_id = None if unk_token_id is None else int(unk_token_id)
        self.max_length = int(max_length)
        self.vocab_size = len(self.encoder)
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        self.added_tokens: Tuple[AddedToken, ...] = tuple(added_tokens)
        self._added_by_id = {t.id: t for t in self.added_tokens}
        self._cache: Dict[str, Tuple[str, ...]] = {}
        if style == "transformers":
            # Leftmost-longest like tokenizers' Aho-Corasick trie: at one position the longest
            # alternative is tried first.
            def trie(tokens, key):
                by_text = {key(t): t for t in tokens}
                if not by_text:
                    return None, {}
                alts = sorted(by_text, key=len, reverse=True)
                return regex.compile("|".join(regex.escape(a) for a in alts)), by_text

            self._raw_trie = trie([t for t in self.added_tokens if not t.normalized], lambda t: t.content)
            self._norm_trie = trie([t for t in self.added_tokens if t.normalized],
                                   lambda t: normalize_transformers(t.content))
        else:
            sot, eot = _TEXT_SPECIALS[style]
            specials = "|".join(regex.escape(t) for t in (sot, eot))
            self._pattern = regex.compile(specials + "|" + _PIECE_PATTERN, regex.IGNORECASE)
            self._text_specials = {sot: self.sot_token_id, eot: self.eot_token_id}

    def __len__(self) -> int:
        """Vocabulary and added tokens (transformers' ``len(tokenizer)``): the rows a text
        encoder's embedding table needs."""
        return max([self.vocab_size - 1, *self._added_by_id]) + 1

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(
        cls, folder: str, *, pad_token_id: Optional[int] = None, max_length: Optional[int] = None,
        style: str = "transformers",
    ) -> "CLIPTokenizer":
        """Read a diffusers / transformers ``tokenizer/`` folder as transformers 5's
        ``CLIPTokenizer.from_pretrained`` does (``style="transformers"``; diffusers
        pipelines tokenise with it).

        Vocabulary: tokenizer.json, else vocab.json + merges.txt, else the vendored
        CLIP file. Special and added tokens: tokenizer_config.json's
        ``added_tokens_decoder`` when present; otherwise special_tokens_map.json
        (overriding tokenizer_config.json's entries, as in transformers), added_tokens.json
        and tokenizer.json's ``added_tokens``. Pad token (default "<|endoftext|>", SD2 / SDXL
        folders "!") and ``model_max_length`` (default 77) from the configs; the keyword
        arguments override them.
        """
        from ldm_jax.text.tokenizer_folder import added_tokens_of_folder, read_json

        if not os.path.isdir(folder):
            raise FileNotFoundError(f"{folder}: not a directory")
        path = functools.partial(os.path.join, folder)
        vocab = merges = None
        tokenizer_json = read_json(path("tokenizer.json")) if os.path.isfile(path("tokenizer.json")) else None
        if tokenizer_json is not None:  # transformers reads it first when both are there
            model = tokenizer_json.get("model") or {}
            vocab = model.get("vocab")
            if not vocab or not isinstance(vocab, dict):
                raise ValueError(f"{path('tokenizer.json')}: no BPE vocabulary in 'model'")
            merges = [tuple(m) if isinstance(m, (list, tuple)) else tuple(m.split(" "))
                      for m in model.get("merges") or []]
        elif os.path.isfile(path("vocab.json")) and os.path.isfile(path("merges.txt")):
            vocab = read_json(path("vocab.json"))
            with open(path("merges.txt"), encoding="utf-8") as f:
                merges = _parse_merge_lines(f.read().split("\n"))
        config = read_json(path("tokenizer_config.json")) if os.path.isfile(path("tokenizer_config.json")) else {}
        special_map = (read_json(path("special_tokens_map.json"))
                       if os.path.isfile(path("special_tokens_map.json")) else {})
        added_json = read_json(path("added_tokens.json")) if os.path.isfile(path("added_tokens.json")) else None
        if merges is None:
            merges = read_bpe_merges()
            vocab = vocab_from_merges(merges)
        named, added = added_tokens_of_folder(folder, vocab, config, special_map, added_json, tokenizer_json)
        if style != "transformers":
            if any(t.content not in vocab for t in added):
                extra = sorted(t.content for t in added if t.content not in vocab)
                raise ValueError(f"{folder}: added tokens {extra[:5]} need style='transformers'")
            added = []
        by_content = {t.content: t.id for t in added}

        def token_id(key):
            content = named.get(key)
            if content is None:
                return None
            if content in by_content:
                return by_content[content]
            if content in vocab:
                return vocab[content]
            raise ValueError(f"{folder}: {key} {content!r} is not in the vocabulary")

        tok = cls(vocab, merges, style=style, added_tokens=added, unk_token_id=token_id("unk_token"))
        if pad_token_id is not None:
            tok.pad_token_id = int(pad_token_id)
        elif named.get("pad_token") is not None:
            tok.pad_token_id = token_id("pad_token")
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

    def _bpe_ids(self, piece: str) -> List[int]:
        symbols = "".join(self.byte_encoder[b] for b in piece.encode("utf-8"))
        ids = []
        for s in self.bpe(symbols):
            i = self.encoder.get(s, self.unk_token_id)
            if i is None:
                raise ValueError(f"BPE symbol {s!r} is not in the vocabulary and there is no unk token")
            ids.append(i)
        return ids

    def encode(self, text: str) -> List[int]:
        """Token ids of ``text`` without SOT/EOT."""
        if self.style == "transformers":
            return self._encode_transformers(text)
        ids: List[int] = []
        for piece in self._pattern.findall(clean_text(text)):
            special = self._text_specials.get(piece)
            ids.extend([special] if special is not None else self._bpe_ids(piece))
        return ids

    def _encode_transformers(self, text: str) -> List[int]:
        # tokenizers' AddedVocabulary.extract_and_normalize: raw-text added tokens first,
        # then normalise each remaining segment and split out the normalised added tokens.
        ids: List[int] = []
        for raw, raw_id in self._split_added(text, *self._raw_trie):
            if raw_id is not None:
                ids.append(raw_id)
                continue
            for seg, seg_id in self._split_added(normalize_transformers(raw), *self._norm_trie):
                if seg_id is not None:
                    ids.append(seg_id)
                    continue
                for piece in _HF_CLIP_SPLIT.findall(seg):
                    for sub in _HF_GPT2_SPLIT.findall(piece):
                        ids.extend(self._bpe_ids(sub))
        return ids

    @staticmethod
    def _split_added(text: str, trie, by_text) -> List[Tuple[str, Optional[int]]]:
        """tokenizers' ``find_matches``: [(segment, added token id or None)] covering ``text``."""
        if trie is None or not text:
            return [(text, None)]
        out, done = [], 0
        for m in trie.finditer(text):
            tok = by_text[m.group()]
            start, stop = m.span()
            if tok.single_word and ((start > 0 and _WORD_CHAR.match(text[start - 1]))
                                    or (stop < len(text) and _WORD_CHAR.match(text[stop]))):
                continue
            if tok.lstrip:
                start = max(_SPACES_AT_END.search(text, 0, start).start(), done)
            if tok.rstrip:
                stop = _SPACES_AT_START.match(text, stop).end()
            if done < start:
                out.append((text[done:start], None))
            out.append((text[start:stop], tok.id))
            done = stop
        if done < len(text):
            out.append((text[done:], None))
        return out

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
        """Text of ``ids`` (``</w>`` becomes a space). By default SOT and special added
        tokens are dropped and decoding stops at the first EOT (what follows is padding);
        added tokens decode to their text followed by a space."""
        parts: List[str] = []
        symbols = ""

        def flush():
            text = bytes(self.byte_decoder[c] for c in symbols).decode("utf-8", errors="replace")
            parts.append(text.replace(END_OF_WORD, " "))

        for i in (int(i) for i in ids):
            if skip_special_tokens and i == self.eot_token_id:
                break
            if skip_special_tokens and i == self.sot_token_id:
                continue
            added = self._added_by_id.get(i)
            if added is not None and skip_special_tokens and added.special:
                continue  # e.g. "!" of SD2 folders, as transformers' decode(skip_special_tokens=True)
            if added is not None and i not in self.decoder:  # its text is not byte-encoded
                flush()
                symbols = ""
                parts.append(added.content + " ")
                continue
            # Every vocabulary symbol, "</w>" and the specials included, is made of byte characters.
            symbols += self.decoder[i]
        flush()
        return "".join(parts).strip()


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
