"""DTensor helpers. Under FSDP2 (``moelab.distributed.fsdp``) parameters, their gradients and
optimizer state are ``torch.distributed.tensor.DTensor`` s; code that works on a rank's own part
reads it through :func:`local`. ``torch.distributed.tensor`` is not imported here (it costs a
second at start-up): a tensor can only be a DTensor once something else has imported it.
"""

from __future__ import annotations

import sys
from typing import Any

from torch import Tensor

__all__ = ["full", "is_dtensor", "local"]


def is_dtensor(t: Any) -> bool:
    """Whether ``t`` is a DTensor."""
    mod = sys.modules.get("torch.distributed.tensor")
    return mod is not None and isinstance(t, mod.DTensor)


def local(t: Tensor) -> Tensor:
    """This rank's part of ``t`` (``to_local()`` of a DTensor: a view of its local shard,
    differentiable; in-place changes reach the DTensor); ``t`` itself otherwise."""
    return t.to_local() if is_dtensor(t) else t


def full(t: Tensor) -> Tensor:
    """The whole of ``t`` (``full_tensor()`` of a DTensor: a collective, every rank of its mesh
    must call it); ``t`` itself otherwise."""
    return t.full_tensor() if is_dtensor(t) else t
