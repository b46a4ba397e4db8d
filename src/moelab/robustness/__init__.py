"""Robustness evaluations: a word-swap attack on text and ImageNet-C-style image corruptions.

- :func:`word_swap` (``moelab.robustness.text``): the MomentumSMoE paper's word-swap attack,
  seeded and deterministic.
- :func:`corrupt` / :data:`CORRUPTIONS` (``moelab.robustness.images``): Gaussian noise,
  impulse noise, defocus blur, Gaussian blur and contrast at severities 1-5.
- :func:`evaluate_attack` / :func:`evaluate_corruptions` (``moelab.robustness.evaluate``): a
  trained run directory evaluated on attacked text / corrupted images (``moelab eval
  RUN_DIR --attack`` / ``--corrupt``), cached as JSON in ``RUN_DIR/robustness/``.
"""

from moelab.robustness.evaluate import evaluate_attack, evaluate_corruptions, parse_corrupt
from moelab.robustness.images import CORRUPTIONS, SEVERITIES, corrupt
from moelab.robustness.text import STOPWORDS, count_words, is_stopword, swap_count, word_swap

__all__ = ["CORRUPTIONS", "SEVERITIES", "STOPWORDS", "corrupt", "count_words", "evaluate_attack",
           "evaluate_corruptions", "is_stopword", "parse_corrupt", "swap_count", "word_swap"]
