"""The special and added tokens of a transformers ``tokenizer/`` folder, read as transformers 5.24's
``CLIPTokenizer.from_pretrained`` reads them (``CLIPTokenizer.from_pretrained`` in ``tokenizer.py``
uses this): which strings are the named special tokens, which strings are split out of a text
before BPE (``AddedToken``: textual-inversion tokens, SD2's "!" pad token) and their ids.
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Mapping, Optional

from ldm_jax.text.tokenizer import EOT_TOKEN, SOT_TOKEN, AddedToken

# transformers' PreTrainedTokenizerBase.SPECIAL_TOKENS_ATTRIBUTES, in its order.
_SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
# transformers.CLIPTokenizer's defaults when a folder's configs do not name them.
_CLIP_SPECIAL_DEFAULTS = {"bos_token": SOT_TOKEN, "eos_token": EOT_TOKEN, "unk_token": EOT_TOKEN, "pad_token": EOT_TOKEN}


def read_json(file: str) -> Any:
    try:
        with open(file, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{file}: not valid JSON ({e})") from None


def _token_fields(value: Mapping, special: bool, source: str) -> Dict[str, Any]:
    """An AddedToken's fields from a saved dict; ``normalized`` defaults to ``not special``
    (transformers' / tokenizers' AddedToken)."""
    if not isinstance(value.get("content"), str):
        raise ValueError(f"{source}: added token {value!r} has no 'content' string")
    fields = dict(special=bool(value.get("special", special)), lstrip=bool(value.get("lstrip", False)),
                  rstrip=bool(value.get("rstrip", False)), single_word=bool(value.get("single_word", False)))
    norm = value.get("normalized")
    fields["normalized"] = (not fields["special"]) if norm is None else bool(norm)
    return dict(content=value["content"], **fields)


def added_tokens_of_folder(folder, vocab, config, special_map, added_json, tokenizer_json):
    """(named special token contents, [AddedToken]) as transformers 5.24 builds them
    (``PreTrainedTokenizerBase._from_pretrained`` + ``TokenizersBackend.__init__``).

    Sources: ``added_tokens_decoder`` of tokenizer_config.json when present, else
    special_tokens_map.json (its entries override tokenizer_config.json's), added_tokens.json
    and tokenizer.json's ``added_tokens``. transformers then adds, in order, those tokens (by
    id), the named special tokens it has not seen yet (a plain string becomes
    ``normalized=False``) and the extra special tokens; the last entry for a string sets its
    flags. New strings get ids from the vocabulary size on; a saved id that disagrees with
    that would silently shift the text encoder's rows, so it is refused.
    """
    cfg_file = os.path.join(folder, "tokenizer_config.json")
    declared: Dict[int, Dict[str, Any]] = {}  # id -> fields
    settings = {k: v for k, v in config.items()}
    if "added_tokens_decoder" in config:
        for idx, value in (config["added_tokens_decoder"] or {}).items():
            if not isinstance(value, Mapping):
                raise ValueError(f"{cfg_file}: added_tokens_decoder[{idx!r}] is not a dict")
            declared[int(idx)] = _token_fields(value, False, cfg_file)
    else:
        for key, value in special_map.items():  # transformers' legacy path: the map wins
            if isinstance(value, Mapping) and key not in ("additional_special_tokens", "extra_special_tokens"):
                # AddedToken(**value, special=True): "special" forced, normalized defaults to False
                value = _token_fields({k: v for k, v in value.items() if k != "special"}, True,
                                      os.path.join(folder, "special_tokens_map.json"))
            settings[key] = value
        named_now = {_content(settings.get(k)) for k in _SPECIAL_KEYS}
        for extra in _extra_specials(settings):
            named_now.add(_content(extra))
        if added_json is not None:
            if not isinstance(added_json, Mapping):
                raise ValueError(f"{os.path.join(folder, 'added_tokens.json')}: expected {{token: id}}")
            for content, idx in added_json.items():
                special = content in named_now
                declared[int(idx)] = dict(content=content, special=special, normalized=not special,
                                          lstrip=False, rstrip=False, single_word=False)
        if tokenizer_json is not None:
            for value in tokenizer_json.get("added_tokens") or []:
                declared[int(value["id"])] = _token_fields(value, False, os.path.join(folder, "tokenizer.json"))
    by_content = {f["content"]: f for f in declared.values()}

    def as_token(value):
        """A config value -> AddedToken fields (a plain string: special, not normalized)."""
        if value is None:
            return None
        if isinstance(value, Mapping):
            if value.get("__type") not in (None, "AddedToken") or "content" not in value:
                raise ValueError(f"{cfg_file}: cannot read special token {value!r}")
            fields = _token_fields(value, False, cfg_file)
            # a token named in the added-token sources takes their flags (transformers' added_tokens_map)
            return dict(by_content.get(fields["content"], fields))
        if isinstance(value, str):
            if value in by_content:
                return dict(by_content[value])
            return dict(content=value, special=True, normalized=False, lstrip=False, rstrip=False,
                        single_word=False)
        raise ValueError(f"{cfg_file}: special token {value!r} is neither a string nor an AddedToken dict")

    named_tokens = {}
    for key in _SPECIAL_KEYS:
        value = settings.get(key, _CLIP_SPECIAL_DEFAULTS.get(key))
        named_tokens[key] = as_token(value)
    order = [declared[i] for i in sorted(declared)]
    seen = {f["content"] for f in order}
    queued = list(order)
    named_list = [(k.replace("_", " "), named_tokens[k]) for k in _SPECIAL_KEYS]
    named_list += [("extra special token", as_token(v)) for v in _extra_specials(settings)]
    for what, fields in named_list:
        if fields is None or fields["content"] in seen:
            continue
        if fields["content"] not in vocab:
            # transformers would append it as a new id past the text encoder's embedding table
            raise ValueError(f"{folder}: {what} {fields['content']!r} is not in the vocabulary")
        fields = dict(fields, special=True)  # a named special token is special
        if fields not in queued:
            queued.append(fields)
    final: Dict[str, Dict[str, Any]] = {}
    for fields in queued:  # the last entry for a string sets its flags
        final.pop(fields["content"], None)
        final[fields["content"]] = fields
    # Ids as tokenizers' AddedVocabulary.add_tokens assigns them, in the order first added.
    first_order = list(dict.fromkeys(f["content"] for f in queued))
    ids: Dict[str, int] = {}
    for content in first_order:
        if content in vocab:
            ids[content] = int(vocab[content])
        else:
            top = max(ids.values(), default=-1)
            ids[content] = top + 1 if top >= len(vocab) else len(vocab)
    for idx, fields in declared.items():
        if ids[fields["content"]] != idx:
            raise ValueError(f"{folder}: added token {fields['content']!r} is saved with id {idx}, but transformers "
                             f"would give it id {ids[fields['content']]} (vocabulary of {len(vocab)}); the text "
                             "encoder's rows would not line up")
    added = [AddedToken(id=ids[c], **final[c]) for c in first_order]
    named = {k: (None if v is None else v["content"]) for k, v in named_tokens.items()}
    return named, added


def _content(value) -> Optional[str]:
    if isinstance(value, Mapping):
        return value.get("content")
    return value


def _extra_specials(settings) -> List[Any]:
    extra = settings.get("extra_special_tokens") or settings.get("additional_special_tokens") or []
    return list(extra.values()) if isinstance(extra, Mapping) else list(extra)
