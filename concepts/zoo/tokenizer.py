"""A small word-level tokenizer with the call signature of open_clip's tokenizers.

The built-in ConceptWorld CLIP speaks a closed language (colours, shapes, sizes, counts, backgrounds and a
few template words), so a word-level vocabulary is enough. The tokenizer still behaves like
``open_clip.get_tokenizer(...)``: ``tokenizer(texts) -> LongTensor [n, context_length]``, each row
``<sot> w1 w2 ... <eot> <pad> ...``, truncated to the context length with ``<eot>`` kept as the last token,
and ``<eot>`` has the highest id so open_clip's default ``argmax`` text pooling finds it.

Id layout: ``0 = <pad>``, ``1 = <unk>``, then the words, then ``<sot>``, then ``<eot>`` (highest).
"""
from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

__all__ = ["WordTokenizer", "PAD", "UNK", "SOT", "EOT"]

PAD, UNK, SOT, EOT = "<pad>", "<unk>", "<sot>", "<eot>"
_PATTERN = r"[a-z]+|[0-9]+|[^\sa-z0-9]"
_FORMAT = "conceptkit.zoo.word_tokenizer"


class WordTokenizer:
    """Word-level tokenizer: lowercase, split into words / numbers / single punctuation marks.

    Parameters
    ----------
    words
        The vocabulary words (specials are added; duplicates and specials in ``words`` are dropped, order
        is kept).
    context_length
        Length of every token row (default 32), like open_clip's ``context_length``.

    Attributes
    ----------
    vocab : list[str]
        Token strings by id.
    pad_token_id, unk_token_id, sot_token_id, eot_token_id : int

    Examples
    --------
    >>> tok = WordTokenizer(["a", "red", "circle"], context_length=8)
    >>> tok(["a red circle", "a blue circle"]).tolist()
    [[5, 2, 3, 4, 6, 0, 0, 0], [5, 2, 1, 4, 6, 0, 0, 0]]
    >>> tok.decode(tok("a red circle")[0])
    'a red circle'
    """

    def __init__(self, words: Iterable[str], context_length: int = 32) -> None:
        if not isinstance(context_length, int) or context_length < 2:
            raise ValueError(
                f"context_length must be an integer >= 2 (room for <sot> and <eot>), got {context_length!r}."
            )
        specials = {PAD, UNK, SOT, EOT}
        seen: dict[str, None] = {}
        for w in words:
            if not isinstance(w, str):
                raise TypeError(f"vocabulary words must be strings, got {type(w).__name__} ({w!r}).")
            w = w.lower()
            if w and w not in specials:
                seen[w] = None
        self.vocab: list[str] = [PAD, UNK, *seen, SOT, EOT]
        self._ids = {w: i for i, w in enumerate(self.vocab)}
        self.context_length = context_length
        self.pad_token_id = 0
        self.unk_token_id = 1
        self.sot_token_id = len(self.vocab) - 2
        self.eot_token_id = len(self.vocab) - 1

    # ------------------------------------------------------------------ basic API
    @property
    def vocab_size(self) -> int:
        """Number of token ids (specials included)."""
        return len(self.vocab)

    @staticmethod
    def split(text: str) -> list[str]:
        """Lowercase and split a text into word / number / punctuation pieces."""
        return re.findall(_PATTERN, text.lower())

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` without ``<sot>``/``<eot>``; unknown words map to ``<unk>``."""
        if not isinstance(text, str):
            raise TypeError(f"expected a str to tokenize, got {type(text).__name__} ({text!r}).")
        return [self._ids.get(w, self.unk_token_id) for w in self.split(text)]

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        """Words of a token row, skipping ``<pad>``/``<sot>`` and stopping at ``<eot>``."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        words = []
        for i in ids:
            i = int(i)
            if i == self.eot_token_id:
                break
            if i in (self.pad_token_id, self.sot_token_id):
                continue
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"token id {i} is outside the vocabulary (0..{self.vocab_size - 1}).")
            words.append(self.vocab[i])
        return " ".join(words).replace(" ,", ",")

    def __call__(self, texts: str | Sequence[str], context_length: int | None = None) -> torch.Tensor:
        """Tokenize like open_clip: ``LongTensor [n, context_length]``.

        Parameters
        ----------
        texts
            One text or a sequence of texts.
        context_length
            Row length (default: the tokenizer's ``context_length``). Longer texts are truncated and keep
            ``<eot>`` as their last token.
        """
        if isinstance(texts, str):
            texts = [texts]
        if not isinstance(texts, Sequence):
            raise TypeError(f"texts must be a str or a sequence of str, got {type(texts).__name__}.")
        ctx = self.context_length if context_length is None else int(context_length)
        if ctx < 2:
            raise ValueError(f"context_length must be >= 2 (room for <sot> and <eot>), got {ctx}.")
        out = torch.full((len(texts), ctx), self.pad_token_id, dtype=torch.long)
        for row, text in enumerate(texts):
            ids = [self.sot_token_id, *self.encode(text), self.eot_token_id]
            if len(ids) > ctx:
                ids = ids[:ctx]
                ids[-1] = self.eot_token_id
            out[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out

    def __repr__(self) -> str:
        return f"WordTokenizer(vocab_size={self.vocab_size}, context_length={self.context_length})"

    # ------------------------------------------------------------------ persistence (JSON)
    def to_dict(self) -> dict:
        """JSON-friendly spec (``format``, ``vocab``, ``context_length``, special token ids)."""
        return {
            "format": _FORMAT,
            "version": 1,
            "lowercase": True,
            "pattern": _PATTERN,
            "context_length": self.context_length,
            "vocab": list(self.vocab),
            "special_tokens": {PAD: self.pad_token_id, UNK: self.unk_token_id, SOT: self.sot_token_id,
                               EOT: self.eot_token_id},
        }

    def save(self, path: str | Path) -> None:
        """Write the JSON spec to ``path``."""
        Path(path).write_text(json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def from_dict(cls, spec: dict, *, source: str = "tokenizer spec") -> WordTokenizer:
        """Rebuild from :meth:`to_dict` output; ``source`` names the file in error messages."""
        if not isinstance(spec, dict) or spec.get("format") != _FORMAT:
            got = spec.get("format") if isinstance(spec, dict) else type(spec).__name__
            raise ValueError(f"{source}: expected a word-tokenizer spec with format {_FORMAT!r}, got {got!r}.")
        for key in ("vocab", "context_length", "special_tokens"):
            if key not in spec:
                raise ValueError(f"{source}: missing key {key!r}; re-export the tokenizer with WordTokenizer.save.")
        vocab = spec["vocab"]
        if not isinstance(vocab, list) or len(vocab) < 4 or vocab[:2] != [PAD, UNK] or vocab[-2:] != [SOT, EOT]:
            raise ValueError(
                f"{source}: key 'vocab' must be a list [<pad>, <unk>, words..., <sot>, <eot>], got "
                f"{vocab[:3] if isinstance(vocab, list) else type(vocab).__name__}..."
            )
        tok = cls(vocab[2:-2], context_length=spec["context_length"])
        if tok.vocab != vocab:
            raise ValueError(f"{source}: key 'vocab' has duplicate or non-lowercase words; it cannot be rebuilt exactly.")
        expected = {PAD: tok.pad_token_id, UNK: tok.unk_token_id, SOT: tok.sot_token_id, EOT: tok.eot_token_id}
        if spec["special_tokens"] != expected:
            raise ValueError(f"{source}: key 'special_tokens' is {spec['special_tokens']}, expected {expected}.")
        return tok

    @classmethod
    def from_file(cls, path: str | Path) -> WordTokenizer:
        """Read a JSON spec written by :meth:`save`."""
        from .checkpoint import read_json

        return cls.from_dict(read_json(path), source=str(path))
