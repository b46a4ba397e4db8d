"""The word-swap attack of the MomentumSMoE paper (after TextAttack's ``WordSwap`` with a
``StopwordModification`` constraint and ``pct_words_to_swap=0.025``), made seeded.

Per line of the text (lines split on ``"\\n"``, kept): the words are the maximal runs of
letters, digits and inner apostrophes (``\\w+('\\w+)*``); ``n = max(floor(rate * #words), 1)``
of them, chosen uniformly without replacement among the words that are not stopwords
(case-insensitive), are replaced by the literal ``"AAA"``; a line with fewer eligible words
has all of them replaced, a line without words is left alone. Everything else (spacing,
punctuation) is kept. The choice in line i depends only on ``(seed, i)``.
"""

from __future__ import annotations

import math
import random
import re

__all__ = ["STOPWORDS", "swap_count", "word_swap"]

_WORD = re.compile(r"\w+(?:'\w+)*")

#: A small English stopword list (articles, pronouns, auxiliaries, prepositions, conjunctions,
#: and the archaic pronouns of the Shakespeare corpus). Never swapped.
STOPWORDS: frozenset[str] = frozenset("""
a an the and or but nor so yet if then than that this these those there here
i me my mine myself we us our ours ourselves you your yours yourself yourselves
he him his himself she her hers herself it its itself they them their theirs themselves
what which who whom whose when where why how all any both each few more most other some
such no not only own same too very s t can will just don should now
am is are was were be been being have has had having do does did doing would could shall
may might must of at by for with about against between into through during before after
above below to from up down in out on off over under again further once
thou thee thy thine ye art hath doth dost shalt wilt o
""".split())


def swap_count(n_words: int, rate: float) -> int:
    """Words to swap in a line of ``n_words`` words: ``max(floor(rate * n_words), 1)``
    (0 for an empty line)."""
    if n_words <= 0:
        return 0
    return max(math.floor(rate * n_words), 1)


def word_swap(text: str, rate: float = 0.025, seed: int = 0, token: str = "AAA",
              stopwords: frozenset[str] = STOPWORDS) -> str:
    """``text`` with, in each line, ``swap_count(#words, rate)`` non-stopword words replaced
    by ``token`` (see the module docstring). Deterministic in ``(text, rate, seed)``."""
    if not (isinstance(rate, (int, float)) and 0.0 < rate <= 1.0):
        raise ValueError(f"rate={rate!r} is invalid: need 0 < rate <= 1")
    lines = text.split("\n")
    out = []
    for i, line in enumerate(lines):
        words = list(_WORD.finditer(line))
        n = swap_count(len(words), rate)
        eligible = [w for w in words if w.group().lower() not in stopwords]
        if n == 0 or not eligible:
            out.append(line)
            continue
        rng = random.Random(f"word_swap:{seed}:{i}")
        chosen = sorted(rng.sample(eligible, min(n, len(eligible))), key=lambda m: m.start())
        parts, pos = [], 0
        for m in chosen:
            parts += [line[pos:m.start()], token]
            pos = m.end()
        parts.append(line[pos:])
        out.append("".join(parts))
    return "\n".join(out)
