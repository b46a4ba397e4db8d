"""The word-swap attack of the MomentumSMoE paper (after TextAttack's ``WordSwap`` with a
``StopwordModification`` constraint and ``pct_words_to_swap=0.025``), made seeded.

Words are the maximal runs of letters, digits and inner apostrophes (``\\w+('\\w+)*``). The
text is cut into *units*; in each unit ``n = max(floor(rate * #words), 1)`` words, chosen
uniformly without replacement among the unit's words that are not stopwords
(:func:`is_stopword`), are replaced by the literal ``"AAA"``. A unit with fewer eligible
words has all of them replaced; a unit without words is left alone. Everything else
(spacing, punctuation, newlines) is kept. The choice in unit i depends only on
``(seed, i)``.

Units (``unit=``):

* ``"line"``: every line (split on ``"\\n"``), the official script's rule. Its floor of one
  swap per line only matches the rate on lines of >= 40 words: on WikiText-103, whose lines are
  paragraphs, the effective rate is ~2.5%; on Shakespeare's ~6-word verse lines it is ~16%.
* ``"paragraph"``: consecutive lines joined until a unit holds >= :data:`PARAGRAPH_WORDS`
  (200) words (a shorter remainder joins the unit before it), so the floor does not distort
  the rate: ``floor(0.025 * 200) = 5`` swaps per unit, ~2.5% of all words.
* ``"auto"`` (default): ``"line"`` when the lines already are paragraphs (at least half of the
  words sit in lines of >= :data:`LONG_LINE_WORDS` words), else ``"paragraph"``.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Sequence

__all__ = ["LONG_LINE_WORDS", "PARAGRAPH_WORDS", "STOPWORDS", "apply_swaps", "choose_swaps",
           "count_words", "is_stopword", "swap_count", "swap_units", "word_swap"]

_WORD = re.compile(r"\w+(?:'\w+)*")
UNITS = ("auto", "line", "paragraph")
#: Minimum words per unit in ``"paragraph"`` mode.
PARAGRAPH_WORDS = 200
#: From this length on, ``max(floor(0.025 n), 1) == floor(0.025 n)``: a line is a paragraph.
LONG_LINE_WORDS = 40

#: TextAttack's default stopwords for ``StopwordModification``: NLTK's English list
#: (``nltk.corpus.stopwords.words("english")``, 179 words, contractions included), copied here
#: so the attack needs neither package nor a download. Never swapped; a contraction whose
#: apostrophe-separated pieces all are stopwords ("it's", "we're") is one too.
STOPWORDS: frozenset[str] = frozenset("""
i me my myself we our ours ourselves you you're you've you'll you'd your yours yourself
yourselves he him his himself she she's her hers herself it it's its itself they them their
theirs themselves what which who whom this that that'll these those am is are was were be
been being have has had having do does did doing a an the and but if or because as until
while of at by for with about against between into through during before after above below
to from up down in out on off over under again further then once here there when where why
how all any both each few more most other some such no nor not only own same so than too
very s t can will just don don't should should've now d ll m o re ve y ain aren aren't
couldn couldn't didn didn't doesn doesn't hadn hadn't hasn hasn't haven haven't isn isn't ma
mightn mightn't mustn mustn't needn needn't shan shan't shouldn shouldn't wasn wasn't weren
weren't won won't wouldn wouldn't
""".split())


def is_stopword(word: str, stopwords: frozenset[str] = STOPWORDS) -> bool:
    """Whether ``word`` is never swapped: it is a stopword (case-insensitive), or a
    contraction whose apostrophe-separated pieces all are ("don't", "it's", "we're")."""
    w = word.lower()
    return w in stopwords or ("'" in w and all(p in stopwords for p in w.split("'")))


def count_words(text: str) -> int:
    """Words in ``text`` (the attack's definition of a word)."""
    return sum(1 for _ in _WORD.finditer(text))


def swap_count(n_words: int, rate: float) -> int:
    """Words to swap in a unit of ``n_words`` words: ``max(floor(rate * n_words), 1)``
    (0 for an empty unit)."""
    if n_words <= 0:
        return 0
    return max(math.floor(rate * n_words), 1)


def _lines(text: str) -> list[tuple[int, list[re.Match[str]]]]:
    """``(start offset, word matches)`` of every line of ``text``."""
    out, pos = [], 0
    for line in text.split("\n"):
        out.append((pos, [m for m in _WORD.finditer(text, pos, pos + len(line))]))
        pos += len(line) + 1
    return out


def swap_units(text: str, unit: str = "auto") -> list[list[re.Match[str]]]:
    """The words of ``text`` grouped into the attack's units (see the module docstring)."""
    if unit not in UNITS:
        raise ValueError(f"unit={unit!r} is invalid: choose one of {UNITS}")
    lines = [words for _, words in _lines(text)]
    if unit == "auto":
        total = sum(map(len, lines))
        long = sum(len(w) for w in lines if len(w) >= LONG_LINE_WORDS)
        unit = "line" if total and 2 * long >= total else "paragraph"
    if unit == "line":
        return lines
    units: list[list[re.Match[str]]] = []
    cur: list[re.Match[str]] = []
    for words in lines:
        cur += words
        if len(cur) >= PARAGRAPH_WORDS:
            units.append(cur)
            cur = []
    if cur:
        if units:
            units[-1] += cur
        else:
            units.append(cur)
    return units


def choose_swaps(text: str, rate: float = 0.025, seed: int = 0, unit: str = "auto",
                 stopwords: frozenset[str] = STOPWORDS) -> list[tuple[int, int]]:
    """``(start, end)`` character spans of the words the attack replaces, in text order."""
    if not (isinstance(rate, (int, float)) and 0.0 < rate <= 1.0):
        raise ValueError(f"rate={rate!r} is invalid: need 0 < rate <= 1")
    chosen: list[tuple[int, int]] = []
    for i, words in enumerate(swap_units(text, unit)):
        n = swap_count(len(words), rate)
        eligible = [w for w in words if not is_stopword(w.group(), stopwords)]
        if n == 0 or not eligible:
            continue
        rng = random.Random(f"word_swap:{seed}:{i}")
        chosen += [m.span() for m in rng.sample(eligible, min(n, len(eligible)))]
    return sorted(chosen)


def apply_swaps(text: str, spans: Sequence[tuple[int, int]], token: str = "AAA",
                end: int | None = None) -> str:
    """``text[:end]`` (all of it for None) with every span that lies inside it replaced by
    ``token``."""
    end = len(text) if end is None else end
    parts, pos = [], 0
    for a, b in spans:
        if b > end:
            break
        parts += [text[pos:a], token]
        pos = b
    parts.append(text[pos:end])
    return "".join(parts)


def word_swap(text: str, rate: float = 0.025, seed: int = 0, token: str = "AAA",
              stopwords: frozenset[str] = STOPWORDS, unit: str = "auto") -> str:
    """``text`` with, in each unit, ``swap_count(#words, rate)`` non-stopword words replaced
    by ``token`` (see the module docstring). Deterministic in ``(text, rate, seed, unit)``."""
    return apply_swaps(text, choose_swaps(text, rate, seed, unit, stopwords), token)
