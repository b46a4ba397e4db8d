"""Progress for long work: a tqdm bar on a terminal, plain lines on stderr otherwise (nohup,
batch systems, CI), nothing when quiet.

    p = StepProgress(total=600, initial=0, unit="tokens", every=30)
    p.update(step, loss, items)        # once per step
    p.close()
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

__all__ = ["EvalProgress", "StepProgress", "auto_every", "format_eta"]


def format_eta(seconds: float) -> str:
    """``"42s"``, ``"3m12s"``, ``"1h05m"``."""
    s = max(0, int(round(seconds)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def auto_every(total: int, log_every: int, lines: int = 20) -> int:
    """About ``lines`` progress lines per run, at a multiple of ``log_every``."""
    every = max(1, -(-total // lines))
    return max(log_every, -(-every // log_every) * log_every)


def _is_tty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


class StepProgress:
    """Training progress from step ``initial`` to ``total``.

    Terminal: a tqdm bar with loss and throughput. Otherwise one line
    ``step S/T | loss L | R tokens/s | ETA 3m12s`` at this process's first step, every
    ``every`` steps, at the last, and whenever ``max_quiet_s`` seconds passed without one
    (a slow run shows it is alive); the loss is the mean since the previous line, R and the
    ETA are measured over this process's steps so far (the first line's include start-up
    costs such as compilation, so that ETA is marked "after 1 step").
    """

    def __init__(self, total: int, initial: int, unit: str, every: int, enabled: bool = True,
                 stream: TextIO | None = None, max_quiet_s: float = 60.0) -> None:
        self.total, self.unit, self.every = total, unit, max(1, every)
        self.max_quiet_s = max_quiet_s
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self.tty = enabled and _is_tty(self.stream)
        self._start_step, self._t0 = initial, time.perf_counter()
        self._last_line = self._t0
        self._items, self._loss, self._n = 0, 0.0, 0
        self._bar = None
        if self.tty:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True,
                             leave=False, file=self.stream)

    def update(self, step: int, loss: float | None, items: int) -> None:
        """One step done (``loss`` None: a skipped step, left out of the mean)."""
        if not self.enabled:
            return
        self._items += items
        if loss is not None:
            self._loss += loss
            self._n += 1
        elapsed = time.perf_counter() - self._t0
        rate = self._items / max(elapsed, 1e-9)
        if self._bar is not None:
            self._bar.update(1)
            shown = "skipped" if loss is None else f"{loss:.3f}"
            self._bar.set_postfix(loss=shown, **{f"{self.unit[:3]}/s": f"{rate:,.0f}"},
                                  refresh=False)
            return
        done = step - self._start_step
        now = time.perf_counter()
        if (step % self.every and step != self.total and done != 1
                and now - self._last_line < self.max_quiet_s):
            return
        self._last_line = now
        eta = elapsed / max(done, 1) * (self.total - step)
        mean = f"{self._loss / self._n:.4f}" if self._n else "n/a (skipped)"
        first = " (after 1 step)" if done == 1 and step != self.total else ""
        print(f"step {step}/{self.total} | loss {mean} | {rate:,.0f} {self.unit}/s | "
              f"ETA {format_eta(eta)}{first}", file=self.stream, flush=True)
        self._loss, self._n = 0.0, 0

    def note(self, step: int, **postfix: str) -> None:
        """Extra values (e.g. ``val_ppl``) on the bar; a line of their own otherwise."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.set_postfix(**postfix)
        else:
            values = " | ".join(f"{k} {v}" for k, v in postfix.items())
            print(f"step {step}/{self.total} | {values}", file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


class EvalProgress:
    """Progress over ``total`` evaluation batches: a bar on a terminal, otherwise a start line
    and a line at each quarter (``evaluating val: 50/100 batches, ETA 12s``)."""

    def __init__(self, label: str, total: int, enabled: bool = True,
                 stream: TextIO | None = None) -> None:
        self.label, self.total = label, max(total, 1)
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self._bar = None
        self._t0 = time.perf_counter()
        self._next = 1
        if not enabled:
            return
        if _is_tty(self.stream):
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, desc=f"evaluating {label}", unit="batch",
                             dynamic_ncols=True, leave=False, file=self.stream)
        else:
            print(f"evaluating {label}: {total} batches", file=self.stream, flush=True)

    def update(self, done: int) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(1)
            return
        if done * 4 >= self._next * self.total and done < self.total:
            elapsed = time.perf_counter() - self._t0
            eta = elapsed / done * (self.total - done)
            print(f"evaluating {self.label}: {done}/{self.total} batches, ETA "
                  f"{format_eta(eta)}", file=self.stream, flush=True)
            while done * 4 >= self._next * self.total:
                self._next += 1

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
