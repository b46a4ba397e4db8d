"""Resumable, deterministic CPU batchers for language modelling and image classification.

Randomness is derived from ``(seed, rank, step)`` / ``(seed, rank, epoch)`` alone, so
``state_dict()`` only needs counters and a restored batcher continues bit-for-bit.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch

from ._common import stable_seed
from .images import channel_stats, to_float

__all__ = ["EvalWindows", "ImageBatcher", "LMBatcher", "iter_image_batches"]


def _check_tokens(tokens: torch.Tensor, seq_len: int, batch_size: int, what: str) -> None:
    if tokens.ndim != 1:
        raise ValueError(f"{what}: tokens must be 1-D [N], got shape {tuple(tokens.shape)}")
    if tokens.dtype.is_floating_point or tokens.dtype.is_complex or tokens.dtype == torch.bool:
        raise ValueError(f"{what}: tokens must be an integer tensor, got {tokens.dtype}")
    if batch_size < 1 or seq_len < 1:
        raise ValueError(
            f"{what}: batch_size and seq_len must be >= 1, got {batch_size}, {seq_len}"
        )
    if seq_len + 1 > tokens.numel():
        raise ValueError(
            f"{what}: seq_len={seq_len} needs at least seq_len + 1 = {seq_len + 1} "
            f"tokens, but the split has {tokens.numel()}; use a shorter seq_len"
        )


def _check_shard(shard: int, num_shards: int, batch_size: int, what: str) -> slice:
    """The rows ``[shard * B/n, (shard + 1) * B/n)`` of a batch of B, validated."""
    if not (isinstance(num_shards, int) and num_shards >= 1 and batch_size % num_shards == 0):
        raise ValueError(f"{what}: num_shards={num_shards!r} is invalid: need a positive "
                         f"divisor of batch_size={batch_size}")
    if not (isinstance(shard, int) and 0 <= shard < num_shards):
        raise ValueError(f"{what}: shard={shard!r} is invalid: need 0 <= shard < {num_shards}")
    per = batch_size // num_shards
    return slice(shard * per, (shard + 1) * per)


def _generator(*parts: object) -> torch.Generator:
    return torch.Generator().manual_seed(stable_seed(*parts))


class LMBatcher:
    """Random training windows from one token stream, forever.

    Each step draws ``batch_size`` start offsets uniformly in ``[0, N - seq_len - 1]`` from an
    RNG seeded by ``(seed, rank, step)`` and yields

    * ``inputs [B, S]`` int64 = ``tokens[o : o + S]``
    * ``targets [B, S]`` int64 = ``tokens[o + 1 : o + S + 1]``

    Args:
        tokens: ``[N]`` integer token ids (the train split), N >= seq_len + 1; any integer
            dtype (not copied; windows are cast to int64).
        batch_size: B. seq_len: S. seed: run seed. rank: an independent stream per value.
        shard, num_shards: data parallelism — each step's batch of B windows is the same on
            every rank, and this batcher yields only its part ``shard`` of ``num_shards``
            equal parts (B / num_shards rows), so N ranks together see exactly the batch one
            process would.
    """

    def __init__(
        self, tokens: torch.Tensor, batch_size: int, seq_len: int, seed: int = 0, rank: int = 0,
        shard: int = 0, num_shards: int = 1,
    ) -> None:
        _check_tokens(tokens, seq_len, batch_size, "LMBatcher")
        self.tokens = tokens  # kept as given (e.g. uint8 bytes for a big corpus), no copy
        self.batch_size, self.seq_len, self.seed, self.rank = batch_size, seq_len, seed, rank
        self.shard = _check_shard(shard, num_shards, batch_size, "LMBatcher")
        self.step = 0
        self._span = torch.arange(seq_len + 1)

    def __iter__(self) -> LMBatcher:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.next_batch()

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch of the current step, then advance: ``(inputs [B, S], targets [B, S])``."""
        g = _generator("lm", self.seed, self.rank, self.step)
        n_starts = self.tokens.numel() - self.seq_len
        offsets = torch.randint(0, n_starts, (self.batch_size,), generator=g)[self.shard]
        window = self.tokens[offsets[:, None] + self._span].to(torch.int64)  # [B, S + 1]
        self.step += 1
        return window[:, :-1].contiguous(), window[:, 1:].contiguous()

    def state_dict(self) -> dict[str, Any]:
        """Position + identity of the stream (plain ints, safe for ``torch.save``/JSON)."""
        return {
            "step": self.step,
            "seed": self.seed,
            "rank": self.rank,
            "batch_size": self.batch_size,
            "seq_len": self.seq_len,
            "n_tokens": self.tokens.numel(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state``; raises ValueError if it describes another stream."""
        for key in ("seed", "rank", "batch_size", "seq_len", "n_tokens"):
            mine = self.state_dict()[key]
            if state.get(key) != mine:
                raise ValueError(
                    f"LMBatcher state has {key}={state.get(key)!r}, this batcher "
                    f"has {mine!r}; build it with the same data and settings"
                )
        self.step = int(state["step"])


class EvalWindows:
    """Contiguous, non-overlapping windows over a val/test token stream, in order.

    Window ``k`` has inputs ``tokens[kS : kS + S]`` and targets ``tokens[kS + 1 : kS + S + 1]``,
    for ``k < (N - 1) // S``; the last ``(N - 1) % S`` targets are not scored. Iterating yields
    ``(inputs [b, S], targets [b, S])`` int64 with b = batch_size except possibly the last.
    Re-iterable; no state.
    """

    def __init__(self, tokens: torch.Tensor, batch_size: int, seq_len: int) -> None:
        _check_tokens(tokens, seq_len, batch_size, "EvalWindows")
        self.tokens = tokens
        self.batch_size, self.seq_len = batch_size, seq_len
        self.n_windows = (tokens.numel() - 1) // seq_len

    def __len__(self) -> int:
        """Number of batches."""
        return -(-self.n_windows // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        s = self.seq_len
        span = torch.arange(s + 1)
        for k0 in range(0, self.n_windows, self.batch_size):
            k = torch.arange(k0, min(k0 + self.batch_size, self.n_windows))
            window = self.tokens[k[:, None] * s + span].to(torch.int64)
            yield window[:, :-1].contiguous(), window[:, 1:].contiguous()


def _stats(
    x: torch.Tensor,
    mean: Sequence[float] | torch.Tensor | None,
    std: Sequence[float] | torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    if (mean is None) != (std is None):
        raise ValueError("pass both mean and std, or neither")
    if mean is None:
        mean, std = channel_stats(x)
    c = x.shape[1]
    m = torch.as_tensor(mean, dtype=torch.float32).reshape(-1)
    s = torch.as_tensor(std, dtype=torch.float32).reshape(-1)
    if m.numel() != c or s.numel() != c:
        raise ValueError(f"mean/std need {c} values (one per channel), got {m.numel()}/{s.numel()}")
    if bool((s <= 0).any()):
        raise ValueError("std must be positive")
    return m.view(1, c, 1, 1), s.view(1, c, 1, 1)


def _check_images(x: torch.Tensor, y: torch.Tensor, batch_size: int, what: str) -> None:
    if x.ndim != 4 or y.ndim != 1 or x.shape[0] != y.shape[0]:
        raise ValueError(
            f"{what}: need images [N, C, H, W] and labels [N], got "
            f"{tuple(x.shape)} and {tuple(y.shape)}"
        )
    if x.shape[0] == 0:
        raise ValueError(f"{what}: the image split is empty")
    if batch_size < 1:
        raise ValueError(f"{what}: batch_size must be >= 1, got {batch_size}")


class ImageBatcher:
    """Shuffled training batches over images, epoch after epoch, forever.

    Epoch ``e`` visits the images in ``randperm(N)`` seeded by ``(seed, rank, e)``. With
    ``drop_last`` (default) every batch has exactly ``batch_size`` rows and an epoch's
    remainder is skipped (needs N >= batch_size). Yields

    * ``images [B, C, H, W]`` float32 = ``(x / 255 - mean) / std`` per channel (float x: no /255)
    * ``labels [B]`` int64

    ``mean``/``std`` (``[C]``) default to the statistics of ``x`` itself; pass the TRAIN split's
    (:meth:`ImageSplits.channel_stats`) so evaluation normalises the same way.
    ``shard``/``num_shards``: data parallelism, as in :class:`LMBatcher` (the same batch on
    every rank, this batcher yields its equal part).
    """

    def __init__(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        batch_size: int,
        seed: int = 0,
        mean: Sequence[float] | torch.Tensor | None = None,
        std: Sequence[float] | torch.Tensor | None = None,
        drop_last: bool = True,
        rank: int = 0,
        shard: int = 0,
        num_shards: int = 1,
    ) -> None:
        _check_images(x, y, batch_size, "ImageBatcher")
        self.shard = _check_shard(shard, num_shards, batch_size, "ImageBatcher")
        if num_shards > 1 and not drop_last:
            raise ValueError("ImageBatcher: num_shards > 1 needs drop_last=True (equal shards)")
        if drop_last and batch_size > x.shape[0]:
            raise ValueError(
                f"ImageBatcher: batch_size={batch_size} > {x.shape[0]} images with "
                "drop_last=True would never yield a batch"
            )
        self.x, self.y = x, y.to(torch.int64)
        self.batch_size, self.seed, self.rank, self.drop_last = batch_size, seed, rank, drop_last
        self.mean, self.std = _stats(x, mean, std)
        self.epoch, self.index = 0, 0
        self._perm: torch.Tensor | None = None

    def _order(self) -> torch.Tensor:
        if self._perm is None:
            g = _generator("img", self.seed, self.rank, self.epoch)
            self._perm = torch.randperm(self.x.shape[0], generator=g)
        return self._perm

    def __iter__(self) -> ImageBatcher:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.next_batch()

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(images [B, C, H, W] float32, labels [B] int64)``, then advance."""
        n = self.x.shape[0]
        left = n - self.index
        if left <= 0 or (self.drop_last and left < self.batch_size):
            self.epoch, self.index, self._perm = self.epoch + 1, 0, None
        idx = self._order()[self.index : self.index + self.batch_size]
        self.index += idx.numel()
        idx = idx[self.shard]
        return (to_float(self.x[idx]) - self.mean) / self.std, self.y[idx]

    def state_dict(self) -> dict[str, Any]:
        """Epoch and position within it, plus the stream's identity (plain values)."""
        return {
            "epoch": self.epoch,
            "index": self.index,
            "seed": self.seed,
            "rank": self.rank,
            "batch_size": self.batch_size,
            "drop_last": self.drop_last,
            "n_images": int(self.x.shape[0]),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state``; raises ValueError if it describes another stream."""
        for key in ("seed", "rank", "batch_size", "drop_last", "n_images"):
            mine = self.state_dict()[key]
            if state.get(key) != mine:
                raise ValueError(
                    f"ImageBatcher state has {key}={state.get(key)!r}, this "
                    f"batcher has {mine!r}; build it with the same data/settings"
                )
        self.epoch, self.index, self._perm = int(state["epoch"]), int(state["index"]), None


def iter_image_batches(
    x: torch.Tensor,
    y: torch.Tensor,
    batch_size: int,
    mean: Sequence[float] | torch.Tensor,
    std: Sequence[float] | torch.Tensor,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Evaluation batches in order, every image once: ``(images [b, C, H, W] float32
    normalised like :class:`ImageBatcher`, labels [b] int64)``; the last b may be smaller."""
    _check_images(x, y, batch_size, "iter_image_batches")
    if mean is None or std is None:
        raise ValueError("iter_image_batches needs the TRAIN split's mean and std")
    m, s = _stats(x, mean, std)
    for i in range(0, x.shape[0], batch_size):
        yield (to_float(x[i : i + batch_size]) - m) / s, y[i : i + batch_size].to(torch.int64)
