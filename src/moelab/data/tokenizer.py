"""Tokenizers: UTF-8 bytes (default, no dependency) and an optional byte-level BPE.

Both map ``str -> ids [N] int64`` and back. Named ``tokenizer`` (singular) so it never shadows
the optional ``tokenizers`` package.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple, Protocol, runtime_checkable

import torch

from .text import TextSplits

__all__ = [
    "BPETokenizer",
    "ByteTokenizer",
    "TokenSplits",
    "Tokenizer",
    "encode_splits",
    "make_tokenizer",
]

TOKENIZERS_PIP = "pip install tokenizers"


@runtime_checkable
class Tokenizer(Protocol):
    """What the LM code needs from a tokenizer."""

    @property
    def vocab_size(self) -> int: ...

    def encode(self, text: str) -> torch.Tensor:
        """``text -> ids [N]`` int64."""
        ...

    def decode(self, ids: torch.Tensor | Sequence[int]) -> str:
        """``ids [N] -> text``."""
        ...


class ByteTokenizer:
    """One token per UTF-8 byte: vocab 256, lossless for any str."""

    vocab_size = 256

    def encode(self, text: str) -> torch.Tensor:
        """``text -> ids [n_bytes]`` int64 in 0..255."""
        data = bytearray(text.encode("utf-8"))
        if not data:
            return torch.empty(0, dtype=torch.int64)
        return torch.frombuffer(data, dtype=torch.uint8).to(torch.int64)

    def decode(self, ids: torch.Tensor | Sequence[int], errors: str = "replace") -> str:
        """``ids [N] -> text``; byte sequences that are not valid UTF-8 (e.g. sampled by a
        model) become U+FFFD unless ``errors="strict"``."""
        t = torch.as_tensor(ids, dtype=torch.int64).reshape(-1)
        if t.numel() and (int(t.min()) < 0 or int(t.max()) > 255):
            raise ValueError("byte token ids must lie in 0..255")
        return bytes(t.to(torch.uint8).tolist()).decode("utf-8", errors=errors)

    def __repr__(self) -> str:
        return "ByteTokenizer(vocab_size=256)"


def _import_tokenizers():
    try:
        import tokenizers
    except ImportError:
        raise ImportError(
            f"the BPE tokenizer needs the optional package 'tokenizers': {TOKENIZERS_PIP}"
        ) from None
    return tokenizers


class BPETokenizer:
    """Byte-level BPE (Hugging Face ``tokenizers``), lossless for any str.

    Build it with :meth:`train`; it is cached as ``bpe-v{vocab_size}-{sha256(text)[:16]}.json``
    in ``cache_dir`` so the same training text and size load instead of retraining.
    """

    def __init__(self, tok: object) -> None:
        self._tok = tok

    @property
    def vocab_size(self) -> int:
        return int(self._tok.get_vocab_size())

    @staticmethod
    def cache_path(cache_dir: str | Path, text: str, vocab_size: int) -> Path:
        """Where the tokenizer trained on ``text`` with ``vocab_size`` is cached."""
        digest = hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]
        return Path(cache_dir) / f"bpe-v{vocab_size}-{digest}.json"

    @classmethod
    def train(cls, text: str, vocab_size: int, cache_dir: str | Path | None = None) -> BPETokenizer:
        """Train on ``text`` (the TRAIN split), or load the cached result from ``cache_dir``."""
        tk = _import_tokenizers()
        if vocab_size < 257:
            raise ValueError(
                f"BPE vocab_size must be at least 257 (256 bytes + merges), got {vocab_size}"
            )
        if not text:
            raise ValueError("cannot train a BPE tokenizer on empty text")
        path = None if cache_dir is None else cls.cache_path(cache_dir, text, vocab_size)
        if path is not None and path.is_file():
            return cls.load(path)
        tok = tk.Tokenizer(tk.models.BPE())
        tok.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = tk.decoders.ByteLevel()
        trainer = tk.trainers.BpeTrainer(
            vocab_size=vocab_size,
            initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet(),
            special_tokens=[],
            show_progress=False,
        )
        lines = text.splitlines(keepends=True)
        tok.train_from_iterator(
            (lines[i : i + 1000] for i in range(0, len(lines), 1000)),
            trainer=trainer,
            length=len(lines),
        )
        out = cls(tok)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
            os.close(fd)
            tok.save(tmp)
            os.replace(tmp, path)  # atomic: concurrent ranks never read a half-written file
        return out

    @classmethod
    def load(cls, path: str | Path) -> BPETokenizer:
        """Load a tokenizer saved by :meth:`train`."""
        tk = _import_tokenizers()
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"BPE tokenizer file not found: {p}")
        return cls(tk.Tokenizer.from_file(str(p)))

    def encode(self, text: str) -> torch.Tensor:
        """``text -> ids [N]`` int64."""
        lines = text.splitlines(keepends=True)
        ids: list[int] = []
        for enc in self._tok.encode_batch(lines, add_special_tokens=False):
            ids.extend(enc.ids)
        return torch.tensor(ids, dtype=torch.int64)

    def decode(self, ids: torch.Tensor | Sequence[int]) -> str:
        """``ids [N] -> text``."""
        t = torch.as_tensor(ids, dtype=torch.int64).reshape(-1)
        return self._tok.decode(t.tolist(), skip_special_tokens=False)

    def __repr__(self) -> str:
        return f"BPETokenizer(vocab_size={self.vocab_size})"


def make_tokenizer(
    kind: str = "byte",
    train_text: str | None = None,
    vocab_size: int | None = None,
    cache_dir: str | Path | None = None,
) -> ByteTokenizer | BPETokenizer:
    """``"byte"`` -> :class:`ByteTokenizer`; ``"bpe"`` -> :class:`BPETokenizer` trained on
    ``train_text`` (pass the TRAIN split only) with ``vocab_size``, cached in ``cache_dir``."""
    if kind == "byte":
        return ByteTokenizer()
    if kind == "bpe":
        if train_text is None or vocab_size is None:
            raise ValueError("tokenizer 'bpe' needs train_text and vocab_size")
        return BPETokenizer.train(train_text, vocab_size, cache_dir)
    raise ValueError(f"unknown tokenizer {kind!r}; choose 'byte' or 'bpe'")


class TokenSplits(NamedTuple):
    """Token ids of each split: 1-D int64 tensors."""

    train: torch.Tensor
    valid: torch.Tensor
    test: torch.Tensor


def encode_splits(splits: TextSplits, tokenizer: Tokenizer) -> TokenSplits:
    """Encode the three splits of ``splits`` with ``tokenizer``."""
    return TokenSplits(*(tokenizer.encode(s) for s in (splits.train, splits.valid, splits.test)))
