"""Counting the ops of a CPU run that would read a device value back on the host (a sync) on a
GPU: the CPU stand-in for ``torch.cuda.set_sync_debug_mode``.

Counted (each with the innermost moelab frame that issued it, ``"moe/experts.py:forward"``):

* ops that return a device value to the host or whose output shape depends on data:
  ``_local_scalar_dense`` (``.item()``, ``float(t)``, ``int(t)``), ``is_nonzero`` (``bool(t)``),
  ``nonzero``, ``masked_select``, ``bincount``, ``unique``, ``equal``;
* ``repeat_interleave`` without ``output_size`` (it reads the total on the host);
* ``_grouped_mm`` with operands other than bf16 (torch's CUDA fallback reads ``offs`` back);
* ``lift_fresh`` (``torch.tensor`` of host data: on a GPU a pageable host-to-device copy, which
  waits for the stream);
* ``Tensor.tolist`` / ``Tensor.cpu`` / ``Tensor.numpy`` (on CPU they read memory without an op
  the dispatch mode would see: they are patched while counting).

Left out: calls from ``moelab/data/`` (the batchers build host-side batches, later copied to
the device without a sync) and from this file.
"""

from __future__ import annotations

import os
import sys
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

READS = {"_local_scalar_dense", "is_nonzero", "nonzero", "masked_select", "bincount",
         "unique", "_unique2", "unique_dim", "unique_consecutive", "equal"}
_SRC = f"{os.sep}moelab{os.sep}"
_DATA = f"{os.sep}moelab{os.sep}data{os.sep}"


def _where() -> str | None:
    """``"pkg/file.py:function"`` of the innermost moelab frame on the stack, "torch" when
    none is (an op issued by torch on its own, e.g. an optimizer or FSDP), None for a data
    loader's call."""
    frame = sys._getframe(2)
    while frame is not None:
        name = frame.f_code.co_filename
        if _DATA in name:
            return None
        if _SRC in name and "/tests/" not in name:
            rel = name.split(_SRC, 1)[1]
            return f"{rel}:{frame.f_code.co_name}"
        frame = frame.f_back
    return "torch"


class WouldSync(TorchDispatchMode):
    """Counts would-sync ops (module docstring) while active: ``calls`` is a Counter of
    ``(op, where)``."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: Counter[tuple[str, str]] = Counter()
        self._patched: list[tuple[str, object]] = []

    def _note(self, op: str) -> None:
        where = _where()
        if where is not None:
            self.calls[(op, where)] += 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if name in READS or name == "lift_fresh":
            self._note(name)
        elif name == "repeat_interleave" and kwargs.get("output_size") is None \
                and (len(args) < 3 or args[2] is None):
            self._note(name)
        elif name == "_grouped_mm" and any(isinstance(a, torch.Tensor) and a.is_floating_point()
                                           and a.dtype != torch.bfloat16 for a in args[:2]):
            self._note(f"_grouped_mm[{args[0].dtype}]")
        return func(*args, **kwargs)

    def __enter__(self):
        for method in ("tolist", "cpu", "numpy"):
            original = getattr(torch.Tensor, method)

            def counted(t, *a, _original=original, _method=method, **kw):
                self._note(_method)
                return _original(t, *a, **kw)

            self._patched.append((method, original))
            setattr(torch.Tensor, method, counted)
        return super().__enter__()

    def __exit__(self, *exc):
        for method, original in self._patched:
            setattr(torch.Tensor, method, original)
        self._patched.clear()
        return super().__exit__(*exc)

    def total(self) -> int:
        return sum(self.calls.values())
