"""Divergence guard: stop (or skip a bounded number of steps) when a step's loss or gradient
norm is NaN or infinite, before the optimizer applies it.

    guard = NonFiniteGuard(max_skips=cfg.train.skip_nonfinite_steps)
    if not guard.ok(loss, grad_norm):          # a bad step: raises NonFiniteError when the
        guard.skip(step, loss, grad_norm, lr, checkpoint_note)   # budget is spent
"""

from __future__ import annotations

import math
from dataclasses import dataclass

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
