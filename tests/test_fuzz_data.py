"""Fuzzing the data loaders: every corrupted file either loads or raises the clear one-line
errors the CLI reports (ValueError / FileNotFoundError), never another exception."""

from __future__ import annotations

import gzip
import pickle
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from test_data import write_cifar, write_idx, write_wikitext

from moelab.data import load_cifar10, load_idx, load_mnist5k, load_npz, load_textfile, load_wikitext

CLEAR = (ValueError, FileNotFoundError)
N_CASES = 60


def corruptions(data: bytes, seed: int, n: int = N_CASES) -> list[bytes]:
    """``n`` corrupted copies of ``data``: byte flips, truncations, insertions, deletions,
    plus an empty file and random bytes."""
    rng = np.random.default_rng(seed)
    out = [b"", bytes(rng.integers(0, 256, 64, dtype=np.uint8))]
    while len(out) < n:
        b = bytearray(data)
        kind = rng.integers(4)
        if kind == 0:  # flip 1..8 bytes
            for i in rng.integers(0, len(b), rng.integers(1, 9)):
                b[i] = int(rng.integers(256))
        elif kind == 1:  # truncate
            b = b[: int(rng.integers(0, len(b)))]
        elif kind == 2:  # insert junk
            i = int(rng.integers(0, len(b)))
            b[i:i] = bytes(rng.integers(0, 256, int(rng.integers(1, 16)), dtype=np.uint8))
        else:  # delete a span
            i = int(rng.integers(0, len(b)))
            del b[i : i + int(rng.integers(1, 16))]
        out.append(bytes(b))
    return out


def fuzz(target: Path, load: Callable[[], object], seed: int) -> int:
    """Write each corruption of ``target`` and load; returns how many raised a clear error."""
    original = target.read_bytes()
    clear = 0
    for i, data in enumerate(corruptions(original, seed)):
        target.write_bytes(data)
        try:
            load()
        except CLEAR:
            clear += 1
        except Exception as e:  # noqa: BLE001 - the point: anything else is a bug
            pytest.fail(f"corruption #{i} of {target.name} raised {type(e).__name__}: {e}")
    target.write_bytes(original)
    load()  # the intact file still loads
    return clear


def test_fuzz_cifar10(tmp_path):
    write_cifar(tmp_path / "c")
    assert fuzz(tmp_path / "c" / "data_batch_2", lambda: load_cifar10(tmp_path / "c"), 0) > 0


def test_cifar10_bad_encoding_name_is_a_clear_error(tmp_path):
    # protocol 2 writes bytes as _codecs.encode(str, "latin1"): a corrupted encoding name made
    # the codec lookup raise LookupError with a traceback
    write_cifar(tmp_path / "c")
    f = tmp_path / "c" / "test_batch"
    raw = f.read_bytes()
    assert b"latin1" in raw
    f.write_bytes(raw.replace(b"latin1", b"latinX", 1))
    with pytest.raises(ValueError, match="test_batch is not a CIFAR-10 python pickle batch"):
        load_cifar10(tmp_path / "c")


def test_fuzz_idx(tmp_path):
    for gz in (True, False):
        d = tmp_path / f"idx{gz}"
        write_idx(d, gz=gz)
        name = "train-images-idx3-ubyte" + (".gz" if gz else "")
        assert fuzz(d / name, lambda d=d: load_idx(d), int(gz)) > 0


def test_fuzz_npz(tmp_path):
    rng = np.random.default_rng(0)
    f = tmp_path / "a.npz"
    np.savez(f, x=rng.integers(0, 256, (40, 4, 4), dtype=np.uint8), y=np.arange(40) % 3)
    assert fuzz(f, lambda: load_npz(f), 2) > 0


def test_fuzz_mnist5k_csv(tmp_path):
    # 30 rows (too few for the 500-per-digit split, so every case must end in ValueError):
    # the gzip stream itself, then the CSV text inside an intact gzip
    f = tmp_path / "m.csv.gz"
    table = b"".join(b"0," * 784 + b"%d\n" % (i % 10) for i in range(30))
    f.write_bytes(gzip.compress(table))
    for i, data in enumerate([*corruptions(f.read_bytes(), 3),
                              *(gzip.compress(t) for t in corruptions(table, 4))]):
        f.write_bytes(data)
        try:
            load_mnist5k(f)
        except ValueError:
            continue
        except Exception as e:  # noqa: BLE001
            pytest.fail(f"mnist5k corruption #{i} raised {type(e).__name__}: {e}")
        pytest.fail(f"mnist5k corruption #{i} loaded")


def test_fuzz_text_loaders(tmp_path):
    d = write_wikitext(tmp_path / "w")
    fuzz(d / "wiki.valid.raw", lambda: load_wikitext(d), 6)
    f = tmp_path / "t.txt"
    f.write_text("Some text, with ünïcode ☃ and lines.\n" * 40, encoding="utf-8")
    assert fuzz(f, lambda: load_textfile(f), 7) > 0  # bad UTF-8 / too short -> ValueError


def test_cifar_pickle_refuses_code(tmp_path):
    """A CIFAR batch that asks the unpickler to call something is refused, not run."""
    write_cifar(tmp_path / "c")
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (Path.touch, (marker,))

    (tmp_path / "c" / "data_batch_1").write_bytes(pickle.dumps({b"data": Evil()}, protocol=2))
    with pytest.raises(ValueError, match="refusing to load"):
        load_cifar10(tmp_path / "c")
    assert not marker.exists()
