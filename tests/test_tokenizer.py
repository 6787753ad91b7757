"""CLIP BPE tokenizer against open_clip's SimpleTokenizer and transformers' CLIPTokenizer."""
import importlib.util
import json
import os

import numpy as np
import pytest

from ldm_jax.text.tokenizer import (
    ASSET_BPE, CLIPTokenizer, EOT_TOKEN, SOT_TOKEN, clean_text, read_bpe_merges, vocab_from_merges,
)

LONG_PROMPT = " ".join(
    f"{w}{i}" if i % 7 == 0 else w
    for i, w in enumerate(("a highly detailed matte painting of a castle on a hill at sunset, "
                           "trending on artstation, by greg rutkowski and alphonse mucha " * 20).split()[:200]))

# Strings on which open_clip and transformers' fast tokenizer agree.
COMMON = [
    "a photo of an astronaut riding a horse on mars",
    "Hello, world!!! What's up? (yes) [no] {maybe} -- ok... #tag @user 100% $5 a/b_c*d",
    "Café, naïve Zürich, crème brûlée, São Paulo",
    "cafe\u0301 decomposed accent",           # NFC folds e + U+0301 into é
    "emoji 🐱🚀😀👍🏽 and ❤️",
    "numbers 12345, 3.14159, 1e-5 and 2024-01-01",
    "東京タワー 中文字符 한국어 テスト",
    "MiXeD CaSe ÉCOLE ÜBER",
    "  lots   of\n\twhitespace \r\n here  ",
    "I'm you're it's we've they'll she'd can't",
    LONG_PROMPT,
    "",
]
# Strings that ftfy / HTML unescaping changes: transformers' fast tokenizer skips both.
CLEANED_BY_FTFY = [
    "Tom &amp; Jerry &lt;3 &quot;quoted&quot; &#39;x&#39;",
    "don\u2019t \u201cquote\u201d me",
    "\ufb01ne \uff46\uff55\uff4c\uff4c\uff57\uff49\uff44\uff54\uff48",  # ligature fi, full-width letters
    "mojibake cafÃ©",
]


@pytest.fixture(scope="module")
def oc_tokenizer():
    """open_clip's tokenizer module loaded by file path (the package pulls torchvision)."""
    spec = importlib.util.find_spec("open_clip")
    path = os.path.join(os.path.dirname(spec.origin), "tokenizer.py")
    mod_spec = importlib.util.spec_from_file_location("_open_clip_tokenizer_ref", path)
    mod = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(mod)
    return mod.SimpleTokenizer()


@pytest.fixture(scope="module")
def tok():
    return CLIPTokenizer()


@pytest.fixture(scope="module")
def vocab_folder(tmp_path_factory):
    """A transformers-style tokenizer folder written from the vendored BPE file (SD1: pad = EOT)."""
    folder = tmp_path_factory.mktemp("tokenizer")
    merges = read_bpe_merges()
    with open(folder / "vocab.json", "w", encoding="utf-8") as f:
        json.dump(vocab_from_merges(merges), f, ensure_ascii=False)
    with open(folder / "merges.txt", "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    with open(folder / "tokenizer_config.json", "w") as f:
        json.dump({"pad_token": "<|endoftext|>", "model_max_length": 77,
                   "bos_token": SOT_TOKEN, "eos_token": EOT_TOKEN, "unk_token": EOT_TOKEN}, f)
    return folder


@pytest.fixture(scope="module")
def hf_tokenizer(vocab_folder):
    from transformers import CLIPTokenizer as HFCLIPTokenizer

    return HFCLIPTokenizer.from_pretrained(str(vocab_folder))


def _hf_ids(hf, texts, max_length=77):
    return np.asarray(hf(texts, padding="max_length", max_length=max_length, truncation=True)["input_ids"])


def test_vendored_vocab_equals_open_clip(tok, oc_tokenizer):
    renamed = {"<start_of_text>": SOT_TOKEN, "<end_of_text>": EOT_TOKEN}
    theirs = {renamed.get(t, t): i for t, i in oc_tokenizer.encoder.items()}
    assert tok.encoder == theirs
    assert len(tok.encoder) == 49408
    assert (tok.sot_token_id, tok.eot_token_id, tok.pad_token_id) == (49406, 49407, 0)


@pytest.mark.parametrize("text", COMMON + CLEANED_BY_FTFY)
def test_ids_equal_open_clip(tok, oc_tokenizer, text):
    got = tok([text])
    want = oc_tokenizer([text]).numpy()
    assert got.dtype == np.int32 and got.shape == (1, 77)
    np.testing.assert_array_equal(got, want)


def test_batch_truncation_and_padding(tok, oc_tokenizer):
    got = tok(COMMON)
    np.testing.assert_array_equal(got, oc_tokenizer(COMMON).numpy())
    long_row = got[COMMON.index(LONG_PROMPT)]
    assert len(tok.encode(LONG_PROMPT)) > 75
    assert long_row[0] == 49406 and long_row[-1] == 49407 and 49407 not in long_row[:-1]
    np.testing.assert_array_equal(long_row[1:-1], tok.encode(LONG_PROMPT)[:75])
    np.testing.assert_array_equal(tok(""), [[49406, 49407] + [0] * 75])
    # A shorter context length truncates the same way.
    np.testing.assert_array_equal(tok(LONG_PROMPT, max_length=16), oc_tokenizer(LONG_PROMPT, context_length=16).numpy())


def test_ids_equal_transformers_on_common_strings(vocab_folder, hf_tokenizer):
    ours = CLIPTokenizer(pad_token_id=49407)
    np.testing.assert_array_equal(ours(COMMON), _hf_ids(hf_tokenizer, COMMON))


def test_transformers_differs_only_by_ftfy_and_html_cleaning(hf_tokenizer):
    """transformers' fast CLIPTokenizer normalises with NFC + whitespace + lowercase only;
    it never runs ftfy.fix_text or html.unescape. On strings those change, the ids
    differ, and they agree again once the text is cleaned first."""
    ours = CLIPTokenizer(pad_token_id=49407)
    raw = _hf_ids(hf_tokenizer, CLEANED_BY_FTFY)
    mine = ours(CLEANED_BY_FTFY)
    assert all((raw[i] != mine[i]).any() for i in range(len(CLEANED_BY_FTFY)))
    np.testing.assert_array_equal(mine, _hf_ids(hf_tokenizer, [clean_text(t) for t in CLEANED_BY_FTFY]))


def test_from_pretrained_reads_vocab_and_pad(vocab_folder, tmp_path, tok):
    sd1 = CLIPTokenizer.from_pretrained(str(vocab_folder))
    assert sd1.pad_token_id == 49407 and sd1.max_length == 77
    assert sd1.encoder == tok.encoder and sd1.bpe_ranks == tok.bpe_ranks
    np.testing.assert_array_equal(sd1(["a cat"])[0, :5], [49406, 320, 2368, 49407, 49407])
    # SD2's tokenizer folder pads with "!" (id 0) and stores the pad token as a dict.
    for name in ("vocab.json", "merges.txt"):
        (tmp_path / name).write_bytes((vocab_folder / name).read_bytes())
    (tmp_path / "special_tokens_map.json").write_text(json.dumps(
        {"pad_token": {"content": "!", "lstrip": False}, "eos_token": EOT_TOKEN}))
    sd2 = CLIPTokenizer.from_pretrained(str(tmp_path))
    assert sd2.pad_token_id == 0
    assert CLIPTokenizer.from_pretrained(str(tmp_path), pad_token_id=7, max_length=10)("a").tolist() == \
        [[49406, 320, 49407] + [7] * 7]


def test_from_pretrained_tokenizer_json(hf_tokenizer, tmp_path):
    """transformers 5 saves only tokenizer.json + tokenizer_config.json."""
    hf_tokenizer.save_pretrained(str(tmp_path))
    assert not (tmp_path / "vocab.json").exists()
    loaded = CLIPTokenizer.from_pretrained(str(tmp_path))
    assert loaded.pad_token_id == 49407
    np.testing.assert_array_equal(loaded(COMMON), _hf_ids(hf_tokenizer, COMMON))


def test_from_pretrained_without_vocab_uses_asset(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"pad_token": EOT_TOKEN}))
    loaded = CLIPTokenizer.from_pretrained(str(tmp_path))
    assert loaded.vocab_size == 49408 and loaded.pad_token_id == 49407


def test_encode_decode_round_trip(tok):
    text = "a photo of café 東京 🐱, 3 cats!"
    ids = tok.encode(text)
    assert 49406 not in ids and 49407 not in ids
    assert tok.decode(ids) == "a photo of café 東京 🐱, 3 cats !"  # "🐱," is one pre-token
    assert tok.decode(tok(text)[0]) == tok.decode(ids)
    assert tok.decode([49406, 320, 49407], skip_special_tokens=False) == "<|startoftext|>a <|endoftext|>"
    # Pad id 0 is "!": a real "!" survives, the padding after EOT does not.
    assert tok.decode(tok("wow!")[0]) == "wow !"


def test_special_token_strings_in_text_map_to_specials(tok, hf_tokenizer):
    """Like OpenAI CLIP and transformers (open_clip spells them <start_of_text>/<end_of_text>)."""
    ids = tok.encode("a <|endoftext|> b")
    assert ids == [320, 49407, 320 + 1]
    assert ids == hf_tokenizer("a <|endoftext|> b", add_special_tokens=False)["input_ids"]


def test_bad_inputs(tok, tmp_path):
    with pytest.raises(TypeError, match="expected a string"):
        tok(["ok", 3])
    with pytest.raises(ValueError, match="max_length"):
        tok("a", max_length=1)
    with pytest.raises(ValueError, match="both vocab and merges"):
        CLIPTokenizer(vocab={"a": 0})
    with pytest.raises(ValueError, match="special token"):
        CLIPTokenizer(vocab={"a": 0}, merges=[])
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"pad_token": "<pad>"}))
    with pytest.raises(ValueError, match="pad token '<pad>'"):
        CLIPTokenizer.from_pretrained(str(tmp_path))
    with pytest.raises(FileNotFoundError):
        CLIPTokenizer.from_pretrained(str(tmp_path / "nope"))


def test_asset_is_packaged():
    assert os.path.isfile(ASSET_BPE)
    assert os.path.isfile(os.path.join(os.path.dirname(ASSET_BPE), "LICENSE"))
