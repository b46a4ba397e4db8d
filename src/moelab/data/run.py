"""The data of one training run, loaded from its ``[data]`` config: the splits, the tokenizer
(LM) or the image statistics (classification), and the resumable training batcher.

    data = load_run_data(cfg.data, lm=True, seed=0)          # one process
    x, y = data.batcher.next_batch()                            # [B, S] int64 each (LM)
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .batching import ImageBatcher, LMBatcher
from .images import LabeledImages
from .registry import load_image_dataset, load_text_dataset
from .tokenizer import Tokenizer, encode_splits, make_tokenizer

if TYPE_CHECKING:
    from moelab.config import DataConfig

__all__ = ["SPLITS", "RunData", "load_run_data"]

#: The split names of a run's data (``tokens`` / ``images`` keys).
SPLITS = ("train", "val", "test")


@dataclass
class RunData:
    """What a run reads. LM runs set ``tokens`` ({split: [N] token ids}, uint8 when the
    vocabulary fits, else int32), ``tokenizer`` and ``vocab_size``; classification runs set
    ``images`` ({split: LabeledImages}), ``image_shape`` (C, H, W), ``n_classes`` and the train
    split's per-channel ``mean`` / ``std`` [C]. ``batcher`` yields this rank's training
    batches; ``source`` says where the data came from. Evaluation reads the splits from these
    dicts at call time (``moelab.robustness`` swaps an attacked split in)."""

    batcher: LMBatcher | ImageBatcher
    source: str
    tokens: dict[str, torch.Tensor] | None = None
    tokenizer: Tokenizer | None = None
    vocab_size: int = 0
    images: dict[str, LabeledImages] | None = None
    image_shape: tuple[int, ...] = ()
    n_classes: int = 0
    mean: torch.Tensor | None = None
    std: torch.Tensor | None = None

    @property
    def is_lm(self) -> bool:
        return self.tokens is not None

    @property
    def unit(self) -> str:
        """What throughput counts: "tokens" or "images"."""
        return "tokens" if self.is_lm else "images"

    def model_kwargs(self) -> dict[str, Any]:
        """What ``moelab.models.build_model`` needs to know of the data."""
        if self.is_lm:
            return {"vocab_size": self.vocab_size}
        return {"image_shape": self.image_shape, "n_classes": self.n_classes}


def load_run_data(dcfg: DataConfig, *, lm: bool, seed: int, shard: int = 0,
                  num_shards: int = 1) -> RunData:
    """Load ``dcfg``'s dataset (text when ``lm``, else images) and a training batcher for
    shard ``shard`` of ``num_shards`` (data-parallel ranks). Raises ValueError /
    FileNotFoundError / ModuleNotFoundError naming the setting for bad settings or missing
    data (a split shorter than one sequence, a batch larger than the train split)."""
    if lm:
        return _load_text(dcfg, seed, shard, num_shards)
    return _load_images(dcfg, seed, shard, num_shards)


def _load_text(dcfg: DataConfig, seed: int, shard: int, num_shards: int) -> RunData:
    from moelab.models.lm import check_token_ids

    splits = load_text_dataset(dcfg.dataset, dcfg.path)
    cache = Path(os.environ.get("MOELAB_CACHE", Path.home() / ".cache" / "moelab"))
    tok = make_tokenizer(dcfg.tokenizer, train_text=splits.train,
                         vocab_size=dcfg.bpe_vocab_size, cache_dir=cache / "bpe")
    vocab_size = int(tok.vocab_size)
    small = torch.uint8 if vocab_size <= 256 else torch.int32
    toks = encode_splits(splits, tok)
    tokens = {"train": toks.train.to(small), "val": toks.valid.to(small),
              "test": toks.test.to(small)}
    for split, t in tokens.items():
        check_token_ids(t, vocab_size, f"{split} split token ids")  # once per split
        if t.numel() < dcfg.seq_len + 1:
            raise ValueError(f"data.seq_len={dcfg.seq_len} is invalid: the {split} split of "
                             f"{dcfg.dataset!r} has only {t.numel()} tokens")
    batcher = LMBatcher(tokens["train"], dcfg.batch_size, dcfg.seq_len, seed=seed, shard=shard,
                        num_shards=num_shards)
    return RunData(batcher, splits.source, tokens=tokens, tokenizer=tok, vocab_size=vocab_size)


def _load_images(dcfg: DataConfig, seed: int, shard: int, num_shards: int) -> RunData:
    splits = load_image_dataset(dcfg.dataset, dcfg.path)
    mean, std = splits.channel_stats()
    n_train = splits.train.x.shape[0]
    if dcfg.batch_size > n_train:
        raise ValueError(f"data.batch_size={dcfg.batch_size} is invalid: the train split of "
                         f"{dcfg.dataset!r} has only {n_train} images")
    batcher = ImageBatcher(splits.train.x, splits.train.y, dcfg.batch_size, seed=seed,
                           mean=mean, std=std, shard=shard, num_shards=num_shards)
    return RunData(batcher, splits.source,
                   images={"train": splits.train, "val": splits.valid, "test": splits.test},
                   image_shape=splits.image_shape, n_classes=splits.n_classes, mean=mean,
                   std=std)
