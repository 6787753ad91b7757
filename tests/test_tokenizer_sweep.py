"""Generated-string sweep of the CLIP tokenizer against its references.

* ``style="openai"`` (CompVis SD1 files) against OpenAI CLIP's SimpleTokenizer (open_clip's
  code with OpenAI's special-token spelling), ``style="open_clip"`` (SD2 files) against
  open_clip's SimpleTokenizer;
* ``CLIPTokenizer.from_pretrained`` (diffusers folders) against transformers'
  ``CLIPTokenizer.from_pretrained`` on the same folder: SD1 / SD2 / SDXL-style configs,
  transformers-5 saves (tokenizer.json), textual-inversion tokens from tokenizer.json,
  added_tokens.json and ``added_tokens_decoder``, lstrip / rstrip / single_word / normalized
  flags, model_max_length.

Strings mix ASCII words, contractions in both cases, punctuation, digits, letters of many
scripts, combining marks, emoji (ZWJ, skin tones, flags), control and zero-width characters,
unicode whitespace, HTML entities, mojibake, the special-token strings and words over 1000
characters; ids are compared after truncation and padding at two lengths.
"""
import importlib.util
import json
import os
import random
import shutil
import unicodedata

import numpy as np
import pytest
import regex

from ldm_jax.text.tokenizer import (
    AddedToken, CLIPTokenizer, EOT_TOKEN, SOT_TOKEN, read_bpe_merges, vocab_from_merges,
)

# --------------------------------------------------------------------------- strings
_WORDS = ["a", "photo", "of", "Riding", "HORSE", "castle", "trending", "Café", "naïve", "straße", "ΟΔΟΣ", "Σίσυφος",
          "İstanbul", "ǅemal", "ﬁne", "Ⅻ", "½", "²", "٣"]
_CONTRACTIONS = ["'s", "'t", "'re", "'ve", "'m", "'ll", "'d", "'S", "'LL", "'Re", "'VE", "’s", "'ſ"]
_PUNCT = list("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~") + ["...", "!!!", "—", "“", "”", "’", "«", "¿", "…"]
_SCRIPTS = [(0x0400, 0x04FF), (0x0370, 0x03FF), (0x0590, 0x05FF), (0x0600, 0x06FF), (0x0900, 0x097F),
            (0x0E00, 0x0E7F), (0x3040, 0x30FF), (0x4E00, 0x4FFF), (0xAC00, 0xAD00), (0x0100, 0x024F),
            (0x1E00, 0x1EFF), (0xFF00, 0xFFEF), (0x2000, 0x206F), (0x1D400, 0x1D7FF)]
_OTHER = [
    "\u0301", "\u0308", "\u0327", "\u20dd", "\u093f",                                     # combining marks
    "😀", "👍🏽", "👩\u200d💻", "👨\u200d👩\u200d👧\u200d👦", "🏳️\u200d🌈", "❤️", "🇯🇵", "1️⃣",     # emoji
    "\x00", "\x07", "\x1b", "\x7f", "\x85", "\x9f", "\u202e", "\ufeff",                    # controls
    "\u200b", "\u200c", "\u200d", "\u2060", "\u00ad",                                     # zero width
    "\u00a0", "\u1680", "\u2003", "\u2009", "\u2028", "\u202f", "\u3000", "\x0b", "\x1c", "\r\n", "\t",  # spaces
    SOT_TOKEN, EOT_TOKEN, "<|ENDOFTEXT|>", "<start_of_text>", "<END_OF_TEXT>", "<|endoftext|", "!<|endoftext|>",
    "&amp;", "&lt;", "&quot;", "&#39;", "&nbsp;", "&amp;amp;", "&eacute;", "&#128512;", "&bogus;",  # HTML
    "cafÃ©", "â€œquotedâ€\x9d", "donâ€™t", "Ã¼ber",                                        # mojibake
    "42", "3.14", "１２３", "١٢٣", "①",
]


def _rand_char(rng):
    while True:  # assigned in Python's tables (newer characters: see the tokenizer's known limit)
        lo, hi = rng.choice(_SCRIPTS)
        c = chr(rng.randint(lo, hi))
        if unicodedata.category(c) != "Cn":
            return c


def _piece(rng, extra):
    k = rng.random()
    if k < 0.25:
        w = rng.choice(_WORDS)
        return w.upper() if rng.random() < 0.2 else w
    if k < 0.32:
        return rng.choice(_WORDS) + rng.choice(_CONTRACTIONS)
    if k < 0.42:
        return rng.choice(_PUNCT)
    if k < 0.55:
        return "".join(_rand_char(rng) for _ in range(rng.randint(1, 5)))
    if k < 0.85:
        return rng.choice(_OTHER)
    return rng.choice(extra) if extra else rng.choice(_WORDS)


def generated(n, seed, extra=()):
    """``n`` random strings (a few whitespace-only ones and words over 1000 characters)."""
    rng = random.Random(seed)
    out = ["", " \u3000\t\n ", "x" * 1200, "ab" * 700 + " cat", "東" * 1100]
    while len(out) < n:
        parts = []
        for _ in range(rng.randint(1, 25) if rng.random() < 0.9 else rng.randint(60, 120)):
            parts += [_piece(rng, extra), rng.choice([" ", " ", "", "  ", rng.choice(_OTHER[27:38])])]
        out.append("".join(parts))
    return out


# --------------------------------------------------------------------------- references
def _open_clip_tokenizer_module():
    spec = importlib.util.find_spec("open_clip")  # by file path: the package pulls torchvision
    mod_spec = importlib.util.spec_from_file_location(
        "_open_clip_tokenizer_sweep", os.path.join(os.path.dirname(spec.origin), "tokenizer.py"))
    mod = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def open_clip_ref():
    return _open_clip_tokenizer_module().SimpleTokenizer()


@pytest.fixture(scope="module")
def openai_ref():
    """OpenAI CLIP's SimpleTokenizer (clip/simple_tokenizer.py): open_clip's code with the
    special tokens spelled <|startoftext|> / <|endoftext|>."""
    ref = _open_clip_tokenizer_module().SimpleTokenizer()
    rename = {"<start_of_text>": SOT_TOKEN, "<end_of_text>": EOT_TOKEN}
    ref.encoder = {rename.get(t, t): i for t, i in ref.encoder.items()}
    ref.cache = {t: t for t in rename.values()}
    ref.pat = regex.compile(r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|"""
                            r"""[^\s\p{L}\p{N}]+""", regex.IGNORECASE)
    return ref


@pytest.mark.parametrize("style", ["openai", "open_clip"])
def test_simple_tokenizer_styles(style, openai_ref, open_clip_ref):
    ref = openai_ref if style == "openai" else open_clip_ref
    ours = CLIPTokenizer(style=style)
    texts = generated(250, seed=11)
    for length in (77, 16):
        np.testing.assert_array_equal(ours(texts, max_length=length), ref(texts, context_length=length).numpy())


def test_open_clip_style_reads_open_clip_special_strings(open_clip_ref):
    """open_clip.tokenize (FrozenOpenCLIPEmbedder, SD2 .ckpt files) maps "<end_of_text>" in a
    prompt to EOT and leaves "<|endoftext|>" as text; OpenAI CLIP the other way round."""
    text = "a <END_OF_TEXT> b <|endoftext|> c"
    ours = CLIPTokenizer(style="open_clip").encode(text)
    assert ours == open_clip_ref.encode(text)
    assert ours[:3] == [320, 49407, 321] and ours.count(49407) == 1
    assert CLIPTokenizer().encode(text).count(49407) == 1 and CLIPTokenizer().encode(text)[1] != 49407


# --------------------------------------------------------------------------- folders
def _at(content, normalized):
    return {"__type": "AddedToken", "content": content, "lstrip": False, "normalized": normalized, "rstrip": False,
            "single_word": False}


def _entry(content, normalized, special):
    return {"content": content, "lstrip": False, "normalized": normalized, "rstrip": False, "single_word": False,
            "special": special}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Tokenizer folders as diffusers checkpoints ship them, built from the vendored merges."""
    from transformers import AddedToken as HFAddedToken
    from transformers import CLIPTokenizer as HFCLIPTokenizer

    root = tmp_path_factory.mktemp("tokenizer_folders")
    merges = read_bpe_merges()
    vocab_text = json.dumps(vocab_from_merges(merges), ensure_ascii=False)
    merges_text = "#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n"

    def base(name, config=None, special_map=None):
        folder = root / name
        folder.mkdir()
        (folder / "vocab.json").write_text(vocab_text, encoding="utf-8")
        (folder / "merges.txt").write_text(merges_text, encoding="utf-8")
        if config is not None:
            (folder / "tokenizer_config.json").write_text(json.dumps(config))
        if special_map is not None:
            (folder / "special_tokens_map.json").write_text(json.dumps(special_map))
        return folder

    # openai/clip-vit-large-patch14 (SD1.x): AddedToken dicts, pad as a plain string.
    sd1_config = {"add_prefix_space": False, "bos_token": _at(SOT_TOKEN, True), "do_lower_case": True,
                  "eos_token": _at(EOT_TOKEN, True), "errors": "replace", "model_max_length": 77,
                  "pad_token": EOT_TOKEN, "tokenizer_class": "CLIPTokenizer", "unk_token": _at(EOT_TOKEN, True)}
    plain = {k: {f: v for f, v in t.items() if f != "__type"} for k, t in sd1_config.items() if k.endswith("_token")
             and isinstance(t, dict)}
    out = {"sd1": base("sd1", sd1_config, dict(plain, pad_token=EOT_TOKEN))}
    # SD2.x: tokenizer_config.json copied from CLIP-L (pad <|endoftext|>), special_tokens_map.json pads with "!"
    out["sd2"] = base("sd2", sd1_config, dict(plain, pad_token="!"))
    # SDXL's tokenizer_2 (transformers >= 4.34 save): added_tokens_decoder, "!" an unnormalised special
    out["sdxl2"] = base("sdxl2", dict(sd1_config, pad_token="!", added_tokens_decoder={
        "0": _entry("!", False, True), "49406": _entry(SOT_TOKEN, True, True), "49407": _entry(EOT_TOKEN, False, True)}))
    out["bare"] = base("bare")  # vocab.json + merges.txt only: transformers' CLIPTokenizer defaults
    out["len32"] = base("len32", dict(sd1_config, model_max_length=32))
    # textual inversion saved by transformers 4 (slow tokenizer): added_tokens.json
    out["ti_legacy"] = base("ti_legacy", sd1_config, dict(plain, pad_token=EOT_TOKEN))
    (out["ti_legacy"] / "added_tokens.json").write_text(json.dumps({"<cat-toy>": 49408, "<cat-toy>_1": 49409}))
    # ... and by transformers >= 4.34: added_tokens_decoder (with a case-sensitive token)
    out["ti_decoder"] = base("ti_decoder", dict(sd1_config, added_tokens_decoder={
        "49406": _entry(SOT_TOKEN, True, True), "49407": _entry(EOT_TOKEN, False, True),
        "49408": _entry("<cat-toy>", True, False), "49409": _entry("<Hat>", False, False)}))
    # transformers 5 saves: tokenizer.json + tokenizer_config.json only
    for name, src, new in [
        ("sd1_v5", "sd1", []), ("sd2_v5", "sd2", []),
        ("ti_v5", "sd1", ["<cat-toy>", "<cat-toy>_1", "<Dog>", "ÉTÉ", "a b"]),
        ("flags_v5", "sd2", [HFAddedToken("<L>", lstrip=True), HFAddedToken("<R>", rstrip=True),
                             HFAddedToken("word", single_word=True), HFAddedToken("CaseTok", normalized=False),
                             HFAddedToken("<sp>", lstrip=True, rstrip=True, special=True, normalized=False),
                             HFAddedToken("hello", single_word=True)]),
    ]:
        hf = HFCLIPTokenizer.from_pretrained(str(out[src]))
        hf.add_tokens(new)
        hf.save_pretrained(str(root / name))
        out[name] = root / name
    # both files: transformers reads tokenizer.json (with the added tokens)
    out["both"] = root / "both"
    shutil.copytree(out["ti_v5"], out["both"])
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(out["sd1"] / name, out["both"] / name)
    return out


_ADDED = ["<cat-toy>", "<CAT-TOY>", "<cat-toy>_1", "<Dog>", "<dog>", "ÉTÉ", "été", "a b", "A  B", "<Hat>", "<hat>",
          "<L>", "<R>", "word", "words", "Word", "CaseTok", "casetok", "<sp>", "  <sp>  ", "hello", "helloworld", "!",
          "!!", " ! "]
FOLDER_NAMES = ["sd1", "sd2", "sdxl2", "bare", "len32", "ti_legacy", "ti_decoder", "sd1_v5", "sd2_v5", "ti_v5",
                "flags_v5", "both"]


@pytest.mark.parametrize("name", FOLDER_NAMES)
def test_from_pretrained_equals_transformers(folders, name):
    from transformers import CLIPTokenizer as HFCLIPTokenizer

    hf = HFCLIPTokenizer.from_pretrained(str(folders[name]))
    ours = CLIPTokenizer.from_pretrained(str(folders[name]))
    assert ours.style == "transformers"
    # transformers' model_max_length is 1e30 when unset; the context is then CLIP's 77
    assert (ours.pad_token_id, ours.max_length, len(ours)) == (hf.pad_token_id, min(hf.model_max_length, 77), len(hf))
    assert {t.id: (t.content, t.normalized, t.lstrip, t.rstrip, t.single_word, t.special) for t in ours.added_tokens} \
        == {i: (t.content, t.normalized, t.lstrip, t.rstrip, t.single_word, t.special)
            for i, t in hf.added_tokens_decoder.items()}
    texts = generated(120, seed=FOLDER_NAMES.index(name), extra=_ADDED)
    for length in (ours.max_length, 16):
        want = hf(texts, padding="max_length", max_length=length, truncation=True)["input_ids"]
        np.testing.assert_array_equal(ours(texts, max_length=length), np.asarray(want))


def test_folder_semantics_regressions(folders):
    """The transformers behaviours a diffusers user sees, spelled out."""
    sd1 = CLIPTokenizer.from_pretrained(str(folders["sd1"]))
    sd2 = CLIPTokenizer.from_pretrained(str(folders["sd2"]))
    # special_tokens_map.json wins over tokenizer_config.json (SD2 pads with "!")
    assert (sd1.pad_token_id, sd2.pad_token_id) == (49407, 0)
    # a folder that names no pad token pads with <|endoftext|> (transformers' CLIPTokenizer default)
    assert CLIPTokenizer.from_pretrained(str(folders["bare"])).pad_token_id == 49407
    # "!" is an added special token of SD2 folders: never merged by BPE
    assert sd2.encode("wow!!!") == [2781, 0, 0, 0] and sd1.encode("wow!!!") == [2781, 995]
    assert sd2.decode(sd2(["wow!!! a cat"])[0]) == "wow a cat"  # transformers' decode(skip_special_tokens=True)
    # no ftfy / HTML unescaping (OpenAI CLIP cleans both)
    assert sd1.encode("&amp; don\u2019t") != CLIPTokenizer().encode("&amp; don\u2019t")
    # the pad string makes SD1's EOT case-sensitive: "<|ENDOFTEXT|>" is text, SD2's is EOT
    assert 49407 not in sd1.encode("a <|ENDOFTEXT|> b") and sd2.encode("a <|ENDOFTEXT|> b") == [320, 49407, 321]
    # per-character lowercase (no final-sigma rule), nothing stripped before the split
    assert sd1.encode("ΟΔΟΣ") == CLIPTokenizer().encode("οδοσ") != CLIPTokenizer().encode("ΟΔΟΣ")
    # textual inversion: added tokens split out anywhere, matched after lowercasing when normalized
    ti = CLIPTokenizer.from_pretrained(str(folders["ti_v5"]))
    assert len(ti) == 49413 and ti.encode("a<CAT-TOY>b <cat-toy>_1") == [320, 49408, 321, 49409]
    np.testing.assert_array_equal(ti("<cat-toy>", max_length=6), [[49406, 49408, 49407, 49407, 49407, 49407]])
    assert ti.decode(ti(["a <cat-toy> cat"])[0]) == "a <cat-toy> cat"
    legacy = CLIPTokenizer.from_pretrained(str(folders["ti_decoder"]))
    assert legacy.encode("<Hat> <hat>")[0] == 49409 and 49409 not in legacy.encode("<hat>")


def test_folder_refusals(folders, tmp_path):
    # a saved added-token id that transformers would renumber (the text encoder rows would shift)
    bad = tmp_path / "gap"
    shutil.copytree(folders["ti_legacy"], bad)
    (bad / "added_tokens.json").write_text(json.dumps({"<cat-toy>": 49410}))
    with pytest.raises(ValueError, match="'<cat-toy>' is saved with id 49410, but transformers would give it id 49408"):
        CLIPTokenizer.from_pretrained(str(bad))
    # added tokens exist only in the transformers style
    with pytest.raises(ValueError, match=r"added tokens \['<cat-toy>', '<cat-toy>_1'\] need style='transformers'"):
        CLIPTokenizer.from_pretrained(str(folders["ti_legacy"]), style="openai")
    assert CLIPTokenizer.from_pretrained(str(folders["sd2"]), style="open_clip").encode("wow!!!") == [2781, 995]
    with pytest.raises(ValueError, match="added_tokens are a transformers feature"):
        CLIPTokenizer(added_tokens=[AddedToken("<x>", 49408)])
    with pytest.raises(ValueError, match="style must be one of"):
        CLIPTokenizer(style="hf")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"mask_token": "<mask>"}))
    with pytest.raises(ValueError, match="mask token '<mask>' is not in the vocabulary"):
        CLIPTokenizer.from_pretrained(str(tmp_path))


@pytest.mark.parametrize("name", ["sd1", "sd2", "sdxl2", "ti_legacy", "ti_decoder", "ti_v5", "flags_v5"])
def test_exported_folder_tokenizes_as_the_source_in_transformers(folders, name, tmp_path):
    """save_tokenizer (save_diffusers' tokenizer/) keeps the added tokens: transformers reading the
    written folder gives the ids transformers gives on the source folder (a textual-inversion
    token lost on export would be BPE'd into other ids)."""
    from transformers import CLIPTokenizer as HFCLIPTokenizer

    from ldm_jax.convert.export import save_tokenizer

    ours = CLIPTokenizer.from_pretrained(str(folders[name]))
    save_tokenizer(ours, str(tmp_path / "out"))
    want_tok = HFCLIPTokenizer.from_pretrained(str(folders[name]))
    got_tok = HFCLIPTokenizer.from_pretrained(str(tmp_path / "out"))
    texts = generated(60, seed=100 + FOLDER_NAMES.index(name), extra=_ADDED)
    want = want_tok(texts, padding="max_length", max_length=32, truncation=True)["input_ids"]
    np.testing.assert_array_equal(got_tok(texts, padding="max_length", max_length=32, truncation=True)["input_ids"],
                                  want)
    reread = CLIPTokenizer.from_pretrained(str(tmp_path / "out"))
    np.testing.assert_array_equal(reread(texts, max_length=32), np.asarray(want))
