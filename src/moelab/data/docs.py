"""``docs``: a ~51 MB English text corpus built from Debian's documentation packages, for
language models larger than the built-in Shakespeare (1 MB) supports.

Install once (an optional step; Debian or Ubuntu with ``apt-get`` and ``dpkg``; no root
needed, about 60 MB of downloads from Debian's package registry):

    python -m moelab.data.docs build            # -> $MOELAB_DATA/docs or ~/.cache/moelab/docs
    moelab train --set data.dataset=docs --set data.tokenizer=bpe

What goes in (:data:`PACKAGES`): the reStructuredText and plain-text sources of the Linux
kernel's documentation (``linux-doc-6.1``), the reStructuredText sources of the Python 3.11
documentation (``python3.11-doc``), Perl's POD documentation (``perl-doc``) and Git's manual
pages in AsciiDoc (``git-doc``); HTML renderings and images are left out. Each source file
goes whole into one split, chosen by a hash of its package and path (1% validation, 1% test),
so no document is shared between splits. ``build`` writes ``train.txt``, ``valid.txt``,
``test.txt`` and ``MANIFEST.json`` (the package versions, file counts, bytes and SHA-256 of
each split: Debian updates packages, so the manifest says which corpus a result used).
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ._common import require_dir, require_file
from .text import TextSplits

__all__ = ["PACKAGES", "DocsPackage", "build_docs", "default_docs_dir", "load_docs"]

SPLITS = ("train", "valid", "test")
#: per-mille of the source files in each held-out split (the rest is train)
HELD_OUT_PERMILLE = {"valid": 10, "test": 10}
_HOW = ("Build it once with `python -m moelab.data.docs build` (Debian/Ubuntu, ~60 MB from "
        "Debian's package registry), or point data.path at a folder holding train.txt, "
        "valid.txt and test.txt.")


@dataclass(frozen=True)
class DocsPackage:
    """One Debian package: which of its files are text sources, and their licence."""

    name: str
    root: str  # the folder inside the package holding the sources
    suffixes: tuple[str, ...]  # source files end with one of these (".gz" added as well)
    licence: str


PACKAGES = (
    DocsPackage("linux-doc-6.1", "usr/share/doc/linux-doc-6.1/Documentation", (".rst", ".txt"),
                "GPL-2.0 (Linux kernel documentation)"),
    DocsPackage("python3.11-doc", "usr/share/doc/python3.11/html/_sources", (".rst.txt",),
                "PSF-2.0 (Python documentation)"),
    DocsPackage("perl-doc", "usr/share/perl", (".pod",),
                "Artistic-1.0 or GPL-1.0+ (Perl documentation)"),
    DocsPackage("git-doc", "usr/share/doc/git-doc", (".txt",), "GPL-2.0 (Git documentation)"),
)


def default_docs_dir() -> Path:
    """Where ``build`` writes the corpus and ``load_docs`` looks: ``$MOELAB_DATA/docs``, else
    ``~/.cache/moelab/docs``."""
    base = os.environ.get("MOELAB_DATA")
    return Path(base) / "docs" if base else Path.home() / ".cache" / "moelab" / "docs"


def _split_of(key: str) -> str:
    """The split of a source file, from a stable hash of ``package/path``."""
    bucket = int.from_bytes(hashlib.sha256(key.encode()).digest()[:4], "big") % 1000
    if bucket < HELD_OUT_PERMILLE["valid"]:
        return "valid"
    if bucket < HELD_OUT_PERMILLE["valid"] + HELD_OUT_PERMILLE["test"]:
        return "test"
    return "train"


def _read_source(path: Path) -> str:
    """A source file's text (gunzipped if .gz; UTF-8, else Latin-1; CR/CRLF -> LF)."""
    data = path.read_bytes()
    if path.suffix == ".gz":
        data = gzip.decompress(data)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        text = data.decode("latin-1")
    return text.replace("\r\n", "\n").replace("\r", "\n").replace("\x00", "")


def _sources(extracted: Path, pkg: DocsPackage) -> list[Path]:
    root = extracted / pkg.name / pkg.root
    if not root.is_dir():
        raise FileNotFoundError(f"docs: {pkg.name} has no {pkg.root} in {extracted / pkg.name}")
    ends = tuple(s + z for s in pkg.suffixes for z in ("", ".gz"))
    return sorted(p for p in root.rglob("*") if p.is_file() and p.name.endswith(ends))


def build_docs(extracted: Path, out: Path, versions: dict[str, str] | None = None,
               packages: tuple[DocsPackage, ...] = PACKAGES) -> dict:
    """Write ``train.txt``, ``valid.txt``, ``test.txt`` and ``MANIFEST.json`` into ``out``
    from packages unpacked in ``extracted/<package name>/`` (``dpkg -x``). Files are read in
    sorted order and each ends with a blank line. Returns the manifest."""
    out.mkdir(parents=True, exist_ok=True)
    handles = {s: open(out / f"{s}.txt.tmp", "w", encoding="utf-8") for s in SPLITS}
    stats = {s: {"files": 0, "bytes": 0} for s in SPLITS}
    try:
        for pkg in packages:
            for path in _sources(extracted, pkg):
                rel = path.relative_to(extracted / pkg.name).as_posix()
                split = _split_of(f"{pkg.name}/{rel}")
                text = _read_source(path).strip("\n") + "\n\n"
                handles[split].write(text)
                stats[split]["files"] += 1
                stats[split]["bytes"] += len(text.encode("utf-8"))
    finally:
        for f in handles.values():
            f.close()
    manifest = {"packages": {p.name: {"version": (versions or {}).get(p.name),
                                      "licence": p.licence} for p in packages},
                "held_out_permille": HELD_OUT_PERMILLE, "splits": stats}
    for s in SPLITS:
        tmp = out / f"{s}.txt.tmp"
        stats[s]["sha256"] = hashlib.sha256(tmp.read_bytes()).hexdigest()
        os.replace(tmp, out / f"{s}.txt")
    (out / "MANIFEST.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def load_docs(path: str | Path | None = None) -> TextSplits:
    """The built corpus (``path``: its folder, default :func:`default_docs_dir`)."""
    folder = require_dir(path if path is not None else default_docs_dir(), "docs", _HOW)
    texts = {}
    for split in SPLITS:
        f = require_file(folder / f"{split}.txt", "docs", _HOW)
        texts[split] = f.read_text(encoding="utf-8")
        if not texts[split].strip():
            raise ValueError(f"docs: {f} is empty (split {split!r})")
    manifest = folder / "MANIFEST.json"
    versions = ""
    if manifest.is_file():
        pkgs = json.loads(manifest.read_text())["packages"]
        versions = " (" + ", ".join(f"{k} {v['version']}" for k, v in pkgs.items()) + ")"
    return TextSplits(
        **texts, source=f"Debian documentation corpus{versions} from {folder}",
        licence="; ".join(p.licence for p in PACKAGES))


def _download(packages: tuple[DocsPackage, ...], into: Path) -> dict[str, str]:
    """``apt-get download`` + ``dpkg -x`` each package into ``into/<name>``; their versions."""
    for tool in ("apt-get", "dpkg", "dpkg-deb"):
        if shutil.which(tool) is None:
            raise SystemExit(f"docs: {tool} not found: building the corpus needs Debian or "
                             "Ubuntu (or unpack the packages yourself and run `build "
                             "--extracted DIR`)")
    debs = into / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    names = [p.name for p in packages]
    print(f"docs: downloading {', '.join(names)} from Debian's package registry", flush=True)
    subprocess.run(["apt-get", "download", *names], cwd=debs, check=True)
    versions = {}
    for p in packages:
        deb = next(debs.glob(f"{p.name}_*.deb"))
        subprocess.run(["dpkg", "-x", str(deb), str(into / p.name)], check=True)
        versions[p.name] = subprocess.run(
            ["dpkg-deb", "-f", str(deb), "Version"], check=True, capture_output=True,
            text=True).stdout.strip()
    return versions


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m moelab.data.docs",
                                description="Build the `docs` text corpus (module docstring).")
    p.add_argument("command", choices=["build"])
    p.add_argument("--out", default=None, help=f"default: {default_docs_dir()}")
    p.add_argument("--extracted", default=None,
                   help="packages already unpacked here (<dir>/<package>/...): skip apt-get")
    args = p.parse_args(argv)
    out = Path(args.out).expanduser() if args.out else default_docs_dir()
    with tempfile.TemporaryDirectory(prefix="moelab-docs-") as tmp:
        extracted, versions = Path(args.extracted or tmp), None
        if args.extracted is None:
            versions = _download(PACKAGES, extracted)
        manifest = build_docs(extracted, out, versions)
    sizes = {s: v["bytes"] for s, v in manifest["splits"].items()}
    print(f"docs: wrote {out} ({sum(sizes.values()) / 1e6:.1f} MB: "
          + ", ".join(f"{s} {b / 1e6:.2f} MB" for s, b in sizes.items()) + ")", file=sys.stderr)


if __name__ == "__main__":
    main()
