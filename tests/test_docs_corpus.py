"""The `docs` corpus (moelab.data.docs): built from unpacked Debian packages (here small fake
ones with the real layout), split by whole files, loaded through the text registry."""

from __future__ import annotations

import gzip
import json

import pytest

from moelab.data import load_text_dataset
from moelab.data.docs import PACKAGES, build_docs, default_docs_dir, load_docs


def fake_packages(root, n_files: int = 300):
    """Every package of PACKAGES with ``n_files`` sources (half gzipped) and a non-source."""
    for pkg in PACKAGES:
        base = root / pkg.name / pkg.root / "sub"
        base.mkdir(parents=True)
        (base / "picture.svg").write_text("<svg/>")  # not a source
        for i in range(n_files):
            text = f"{pkg.name} document {i}\r\nline two of {i}\n"
            name = f"doc{i}{pkg.suffixes[0]}"
            if i % 2:
                (base / (name + ".gz")).write_bytes(gzip.compress(text.encode()))
            else:
                (base / name).write_text(text)


def test_build_splits_whole_files_deterministically(tmp_path):
    fake_packages(tmp_path / "x")
    manifest = build_docs(tmp_path / "x", tmp_path / "a", {"git-doc": "1:2.39"})
    build_docs(tmp_path / "x", tmp_path / "b")
    for split in ("train", "valid", "test"):  # the same corpus twice
        assert (tmp_path / "a" / f"{split}.txt").read_bytes() == \
            (tmp_path / "b" / f"{split}.txt").read_bytes()
    splits = load_docs(tmp_path / "a")
    docs = {s: [d for d in getattr(splits, s).split("\n\n") if d] for s in
            ("train", "valid", "test")}
    n = 4 * 300
    assert sum(len(v) for v in docs.values()) == n  # every source once, no .svg
    assert set(docs["train"]).isdisjoint(docs["valid"]) and \
        set(docs["train"]).isdisjoint(docs["test"])
    assert 0 < len(docs["valid"]) < 0.05 * n and 0 < len(docs["test"]) < 0.05 * n
    assert "git-doc document 1\nline two of 1" in splits.train + splits.valid + splits.test
    assert "\r" not in splits.train  # CRLF normalised, gzipped sources read
    assert manifest["splits"]["train"]["files"] == len(docs["train"])
    assert json.loads((tmp_path / "a" / "MANIFEST.json").read_text()) == manifest
    assert "git-doc 1:2.39" in splits.source and "GPL-2.0" in splits.licence
    through_registry = load_text_dataset("docs", tmp_path / "a")
    assert through_registry.valid == splits.valid


def test_missing_corpus_says_how_to_build_it(tmp_path, monkeypatch):
    monkeypatch.setenv("MOELAB_DATA", str(tmp_path))
    assert default_docs_dir() == tmp_path / "docs"
    with pytest.raises(FileNotFoundError, match="python -m moelab.data.docs build"):
        load_text_dataset("docs")
    with pytest.raises(FileNotFoundError, match="linux-doc-6.1 has no"):
        build_docs(tmp_path, tmp_path / "out")


def test_the_installed_corpus_has_50_mb_of_text():
    """Runs where the corpus was built (`python -m moelab.data.docs build`)."""
    if not (default_docs_dir() / "train.txt").is_file():
        pytest.skip("the docs corpus is not built here")
    splits = load_docs()
    total = sum(len(t.encode()) for t in (splits.train, splits.valid, splits.test))
    assert total >= 50e6 and len(splits.valid) > 1e5 and len(splits.test) > 1e5
