"""The BERT WordPiece tokenizer of the CompVis LDM text-to-image model.

CompVis ``BERTTokenizer`` (ldm/modules/encoders/modules.py) and diffusers'
``LDMTextToImagePipeline`` both call transformers' bert-base-uncased tokenizer as

    tokenizer(texts, truncation=True, max_length=77, padding="max_length")

so each prompt becomes ``[CLS] wordpieces [SEP] [PAD]...`` (ids 101, ..., 102, 0 with
the bert-base-uncased vocabulary), cut to 77 with [SEP] kept last. The empty prompt
(the unconditional input of classifier-free guidance in both) is ``[CLS] [SEP] [PAD]...``.

This wraps transformers' ``BertTokenizer`` (the ``tokenizers`` WordPiece with BERT's
normaliser: lowercasing, accent stripping, CJK splitting) rather than reimplementing
it, so that the ids are the reference's by construction. The vocabulary is never
downloaded: it comes from a diffusers ``tokenizer/`` folder (tokenizer.json or
vocab.txt) or a bare vocab.txt (bert-base-uncased's, 30522 lines, for the original
checkpoints, which do not carry it).
"""
from __future__ import annotations

import os
from typing import Iterable, Optional, Union

import numpy as np

DEFAULT_MAX_LENGTH = 77


class BERTTokenizer:
    """``__call__(texts)`` -> int32 (B, max_length): the interface ``Pipeline.tokenize`` uses."""

    def __init__(self, tokenizer, max_length: int = DEFAULT_MAX_LENGTH):
        """Args:
          tokenizer: a transformers ``BertTokenizer`` (see ``from_pretrained``).
          max_length: padded length (the text encoder's max_position_embeddings, 77).
        """
        self.tokenizer = tokenizer
        self.max_length = int(max_length)
        self.pad_token_id = int(tokenizer.pad_token_id)
        self.vocab_size = len(tokenizer)

    @classmethod
    def from_pretrained(cls, path: str, max_length: int = DEFAULT_MAX_LENGTH) -> "BERTTokenizer":
        """A tokenizer folder (transformers' tokenizer.json or vocab.txt, with its
        tokenizer_config.json if any) or a bert vocab.txt file (one token per line,
        line number = id; lowercasing as bert-base-uncased)."""
        from transformers import BertTokenizer

        if os.path.isfile(path):
            vocab = {}
            with open(path, encoding="utf-8") as f:
                for index, line in enumerate(f):
                    vocab[line.rstrip("\n")] = index
            missing = [t for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]") if t not in vocab]
            if missing:
                raise ValueError(f"{path}: not a BERT vocab.txt (no {', '.join(missing)} line)")
            return cls(BertTokenizer(vocab=vocab, do_lower_case=True), max_length)
        if not os.path.isdir(path):
            raise FileNotFoundError(f"{path}: no such tokenizer folder or vocab.txt")
        if not any(os.path.isfile(os.path.join(path, n)) for n in ("vocab.txt", "tokenizer.json")):
            raise FileNotFoundError(f"{path}: a BERT tokenizer folder needs vocab.txt or tokenizer.json")
        return cls(BertTokenizer.from_pretrained(path, local_files_only=True), max_length)

    def __call__(self, texts: Union[str, Iterable[str]], max_length: Optional[int] = None) -> np.ndarray:
        if isinstance(texts, str):
            texts = [texts]
        texts = list(texts)
        for row, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"expected a string, got {type(text).__name__} at index {row}")
        length = self.max_length if max_length is None else int(max_length)
        out = self.tokenizer(texts, truncation=True, max_length=length, padding="max_length")
        return np.asarray(out["input_ids"], dtype=np.int32).reshape(len(texts), length)

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def save_pretrained(self, folder: str) -> str:
        """A transformers tokenizer folder: tokenizer.json + tokenizer_config.json, and vocab.txt
        (what the slow BertTokenizer of transformers 4 reads)."""
        os.makedirs(folder, exist_ok=True)
        self.tokenizer.save_pretrained(folder)
        vocab = sorted(self.tokenizer.get_vocab().items(), key=lambda item: item[1])
        if [i for _, i in vocab] != list(range(len(vocab))):
            raise ValueError("save_pretrained: the vocabulary ids are not 0..N-1; no vocab.txt can list them")
        with open(os.path.join(folder, "vocab.txt"), "w", encoding="utf-8") as f:
            f.write("".join(token + "\n" for token, _ in vocab))
        return folder
