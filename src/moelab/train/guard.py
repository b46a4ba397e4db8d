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
import warnings
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

__all__ = ["NonFiniteError", "NonFiniteGuard", "StepBuffers", "divergence_message"]


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


class StepBuffers:
    """The model's buffers before a step, so that a skipped step can be undone, without cloning
    every buffer every step.

    A buffer that a step replaces (Default MoE's EMA and update counts are new tensors after
    each training forward) is kept by reference: the old tensor is unchanged. Only buffers that
    a step writes in place (the layers' assignment counts, BatchNorm statistics) are cloned;
    which those are is learned on the first step, when every buffer is cloned. Constant
    buffers (rotary tables) cost nothing. ``take`` before the step, ``restore`` after it.
    """

    def __init__(self) -> None:
        self._in_place: set[str] | None = None  # None: not learned yet (clone all)
        self._warned: set[str] = set()

    def take(self, model: nn.Module) -> list[tuple]:
        """The buffers of ``model`` now: (module, name, key, tensor, version, clone or None)."""
        out = []
        for prefix, module in model.named_modules():
            for name, buf in module._buffers.items():
                if buf is None:
                    continue
                key = f"{prefix}.{name}"
                clone = (buf.detach().clone()
                         if self._in_place is None or key in self._in_place else None)
                out.append((module, name, key, buf, buf._version, clone))
        return out

    @torch.no_grad()
    def restore(self, taken: list[tuple], ok: Tensor | None = None) -> None:
        """Undo the step's changes to the buffers (``ok`` None), or undo them where the bool
        tensor ``ok`` is False (deferred mode: decided on the device, no host read)."""
        in_place = set()
        for module, name, key, old, version, clone in taken:
            now = module._buffers[name]
            if now is old and old._version == version:
                continue  # untouched
            if now is old:  # written in place: only its clone has the old values
                in_place.add(key)
                if clone is None:
                    self._warn(key)
                    continue
                now.copy_(clone if ok is None else torch.where(ok, now, clone))
            else:  # replaced: the old tensor is the old value
                module._buffers[name] = old if ok is None else torch.where(ok, now, old)
        if self._in_place is None:
            self._in_place = in_place
        else:
            self._in_place |= in_place

    def _warn(self, key: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(f"buffer {key} was first written in place by a step after the first "
                          "one: that step's change to it could not be undone; it is cloned "
                          "before every step from now on", RuntimeWarning, stacklevel=3)
