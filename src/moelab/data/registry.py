"""Dataset names a config can use, and the two factory functions."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from .docs import load_docs
from .images import ImageSplits, load_cifar10, load_idx, load_mnist5k, load_npz
from .text import TextSplits, load_shakespeare, load_textfile, load_wikitext

__all__ = ["IMAGE_DATASETS", "TEXT_DATASETS", "load_image_dataset", "load_text_dataset"]

# name -> (loader, needs a path). Built-ins (no path needed) accept an optional path override.
_TEXT: dict[str, tuple[Callable[..., TextSplits], bool]] = {
    "shakespeare": (load_shakespeare, False),
    "wikitext": (load_wikitext, True),
    "textfile": (load_textfile, True),
    "docs": (load_docs, False),  # built once by `python -m moelab.data.docs build`
}
_IMAGE: dict[str, tuple[Callable[..., ImageSplits], bool]] = {
    "mnist5k": (load_mnist5k, False),
    "cifar10": (load_cifar10, True),
    "npz": (load_npz, True),
    "idx": (load_idx, True),
}
TEXT_DATASETS: tuple[str, ...] = tuple(_TEXT)
IMAGE_DATASETS: tuple[str, ...] = tuple(_IMAGE)


def _resolve(kind: str, table: dict, name: str, path: str | Path | None):
    if name not in table:
        known = ", ".join(repr(n) for n in table)
        raise ValueError(f"unknown {kind} dataset {name!r}; choose one of {known}")
    loader, needs_path = table[name]
    if path is None:
        if needs_path:
            raise ValueError(f"{kind} dataset {name!r} reads your own files: pass path=...")
        return loader()
    return loader(path)


def load_text_dataset(name: str, path: str | Path | None = None) -> TextSplits:
    """Text splits of dataset ``name`` in :data:`TEXT_DATASETS`.

    ``"shakespeare"`` (built in; ``path`` optionally overrides the texts folder),
    ``"wikitext"`` (``path`` = folder with ``wiki.{train,valid,test}.raw``),
    ``"textfile"`` (``path`` = any UTF-8 file, split 90/5/5 by position),
    ``"docs"`` (the Debian documentation corpus, ``moelab.data.docs``; ``path`` optionally
    overrides its folder).
    """
    return _resolve("text", _TEXT, name, path)


def load_image_dataset(name: str, path: str | Path | None = None) -> ImageSplits:
    """Image splits of dataset ``name`` in :data:`IMAGE_DATASETS`.

    ``"mnist5k"`` (built in; ``path`` optionally overrides the csv.gz), ``"cifar10"``
    (``cifar-10-batches-py`` folder), ``"npz"`` (an .npz file), ``"idx"`` (folder of
    MNIST-format IDX files, e.g. Fashion-MNIST).
    """
    return _resolve("image", _IMAGE, name, path)
