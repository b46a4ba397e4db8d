"""The experiments ``moelab reproduce`` knows, by name."""

from __future__ import annotations

import difflib

from moelab.experiments.spec import Experiment

__all__ = ["EXPERIMENTS", "get_experiment", "register", "resolve_names"]

EXPERIMENTS: dict[str, Experiment] = {}


def register(exp: Experiment, *, replace: bool = False) -> Experiment:
    """Add ``exp`` to the registry (an existing name raises unless ``replace``)."""
    if exp.name in EXPERIMENTS and not replace:
        raise ValueError(f"experiment {exp.name!r} is already registered")
    for src in exp.sources:
        if src not in EXPERIMENTS:
            raise ValueError(f"experiment {exp.name!r} reads {src!r}, which is not registered")
    EXPERIMENTS[exp.name] = exp
    return exp


def get_experiment(name: str) -> Experiment:
    """The registered experiment ``name``; a ValueError names close matches otherwise."""
    if name not in EXPERIMENTS:
        close = difflib.get_close_matches(name, list(EXPERIMENTS), n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ValueError(f"unknown experiment {name!r}; {hint}known: "
                         f"{', '.join(EXPERIMENTS)} (see `moelab reproduce list`)")
    return EXPERIMENTS[name]


def resolve_names(names: list[str]) -> list[Experiment]:
    """``["all"]`` or names -> experiments, each once, in the order given."""
    if not names:
        raise ValueError("name at least one experiment, or 'all' (see `moelab reproduce list`)")
    if "all" in names:
        return list(EXPERIMENTS.values())
    out: list[Experiment] = []
    for n in names:
        e = get_experiment(n)
        if e not in out:
            out.append(e)
    return out


def _register_builtins() -> None:
    from moelab.experiments import excitation

    for exp in (excitation.FOUNDATION, excitation.RESCUE, excitation.SPECIALIZATION):
        register(exp)
    from moelab.experiments import momentum

    for exp in (momentum.DEPTH, momentum.ROBUSTNESS_TEXT, momentum.ROBUSTNESS_IMAGES,
                momentum.SENSITIVITY):
        register(exp)
    from moelab.experiments import momentum_spectrum

    for exp in (momentum_spectrum.DEEP, momentum_spectrum.SPECTRUM):
        register(exp)
    from moelab.experiments import default_moe

    for exp in (default_moe.SPEED, default_moe.LR, default_moe.BETA, default_moe.COMBINED,
                default_moe.AUTO_BETA):
        register(exp)
    from moelab.experiments import expert_choice

    for exp in (expert_choice.IMAGES, expert_choice.LM):
        register(exp)


_register_builtins()
