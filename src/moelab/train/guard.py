"""Divergence guard: stop (or skip a bounded number of steps) when a step's loss or gradient
norm is NaN or infinite, before the optimizer applies it.

    guard = NonFiniteGuard(max_skips=cfg.train.skip_nonfinite_steps)
    if not guard.ok(loss, grad_norm):          # a bad step: raises NonFiniteError when the
        guard.skip(step, loss, grad_norm, lr, checkpoint_note)   # budget is spent

Deferred (``deferred=True``, with a fused optimizer that skips a step on the device when
given ``found_inf``): nothing is read back per step; ``record`` notes each step's finiteness
on the device and ``flush`` reads what was noted (once, e.g. at each logged step), counts the
skipped steps and raises when the budget is spent, naming the first bad step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

__all__ = ["NonFiniteError", "NonFiniteGuard", "divergence_message"]


class NonFiniteError(ValueError):
    """Training produced a NaN or infinite loss / gradient norm / parameter (one-line message)."""


def _num(x: float) -> str:
    return f"{x:.4g}" if math.isfinite(x) else str(x)


def divergence_message(step: int, loss: float, grad_norm: float, lr: float,
                       checkpoint_note: str, skipped: int = 0) -> str:
    """One line: where training diverged, with what, what was kept and what to try."""
    what = (f"training diverged at step {step}: loss {_num(loss)}, grad norm {_num(grad_norm)} "
            f"at lr {lr:.3g}")
    if skipped:
        what += f" ({skipped} bad steps skipped before, the train.skip_nonfinite_steps limit)"
    return (f"{what}; {checkpoint_note}; try a smaller optim.lr (e.g. {lr / 10:.3g}), more "
            "optim.warmup_steps or a smaller optim.grad_clip, or skip a few bad steps with "
            "train.skip_nonfinite_steps=N")


@dataclass
class NonFiniteGuard:
    """Counts the bad steps skipped so far; ``max_skips`` (``train.skip_nonfinite_steps``) is
    how many a run may skip in total before it stops (0: stop at the first)."""

    max_skips: int = 0
    skipped: int = 0
    deferred: bool = False
    #: deferred mode, since the last flush: [bad steps, their items, first bad step, its loss,
    #: its grad norm, its lr] on the device (None: nothing recorded)
    _noted: Tensor | None = field(default=None, repr=False)

    @staticmethod
    def ok(*values: float) -> bool:
        """True if every value is finite."""
        return all(math.isfinite(v) for v in values)

    def skip(self, step: int, loss: float, grad_norm: float, lr: float,
             checkpoint_note: str) -> None:
        """Record a skipped step, or raise NonFiniteError when the budget is spent."""
        if self.skipped >= self.max_skips:
            raise NonFiniteError(divergence_message(step, loss, grad_norm, lr, checkpoint_note,
                                                    self.skipped))
        self.skipped += 1

    def record(self, ok: Tensor, step: int, loss: Tensor, grad_norm: Tensor, lr: float,
               items: int) -> None:
        """Deferred mode: note (on ``ok``'s device, no sync) whether step ``step`` was finite
        (``ok``: a bool tensor; a False step was not applied)."""
        dtype = torch.float32 if ok.device.type == "mps" else torch.float64
        bad = (~ok).to(dtype)
        this = torch.stack([bad, bad * items, bad * step, loss.to(dtype), grad_norm.to(dtype),
                            torch.full((), lr, dtype=dtype, device=ok.device)])
        if self._noted is None:
            self._noted = torch.cat([this[:2], torch.where(bad > 0, this[2:], 0.0)])
            return
        first = (self._noted[0] == 0) & (bad > 0)  # the first bad step since the last flush
        self._noted = torch.cat([self._noted[:2] + this[:2],
                                 torch.where(first, this[2:], self._noted[2:])])

    def flush(self, checkpoint_note: str, now: int) -> int:
        """Deferred mode: read what ``record`` noted (one device read) at step ``now``;
        returns the items of the steps that were skipped. Raises NonFiniteError when the skips
        pass ``max_skips``."""
        if self._noted is None:
            return 0
        n_bad, bad_items, step, loss, grad_norm, lr = self._noted.tolist()
        self._noted = None
        if n_bad == 0:
            return 0
        if self.skipped + n_bad > self.max_skips:
            note = (f"{checkpoint_note}; noticed at step {now} (the guard is read at logged "
                    "steps; no non-finite step was applied)")
            raise NonFiniteError(divergence_message(int(step), loss, grad_norm, lr, note,
                                                    self.skipped))
        self.skipped += int(n_bad)
        return int(bad_items)
