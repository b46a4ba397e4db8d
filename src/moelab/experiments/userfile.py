"""Experiments defined in your own Python file: ``moelab reproduce PATH.py [NAME ...]``.

The file uses the public API (``Experiment``, ``Arm``, ``Claim``, ``Metric``, ``Profile``) and
either ``register``s its experiments or just defines them at module level; both are picked
up. It is imported once, under a private module name, in the process that plans and
aggregates; the worker processes only receive each run's config (base + overrides), so they
never import it. A ``reproduce(...)`` call at the file's top level is skipped while the file
is loaded this way (the command line runs the experiments it names).
"""

from __future__ import annotations

import hashlib
import importlib.util
import sys
import traceback
from contextlib import contextmanager
from pathlib import Path

from moelab.experiments.registry import EXPERIMENTS, register
from moelab.experiments.spec import Experiment

__all__ = ["ExperimentFileError", "is_experiment_file", "load_experiments", "loading"]

_loading: list[Path] = []


class ExperimentFileError(ValueError):
    """An experiment file that cannot be used (missing, not Python, raises, defines none)."""


def is_experiment_file(name: str) -> bool:
    """Whether a ``moelab reproduce`` argument names an experiment file (``*.py``)."""
    return name.endswith(".py")


def loading() -> Path | None:
    """The experiment file being imported right now (None outside ``load_experiments``)."""
    return _loading[-1] if _loading else None


@contextmanager
def _mark(path: Path):
    _loading.append(path)
    try:
        yield
    finally:
        _loading.pop()


def _where(path: Path, e: BaseException) -> str:
    """``PATH:LINE`` of the deepest frame of ``e`` inside ``path`` (or just ``PATH``)."""
    line = getattr(e, "lineno", None) if isinstance(e, SyntaxError) else None
    for frame in traceback.extract_tb(e.__traceback__):
        if Path(frame.filename).resolve() == path:
            line = frame.lineno
    return f"{path}:{line}" if line else str(path)


def load_experiments(path: str | Path) -> list[Experiment]:
    """Import ``path`` and return the experiments it defines, in definition order, all of
    them registered (those it registered itself, then module-level ``Experiment`` objects it
    did not). Raises ExperimentFileError (one line) if the file is missing, is not ``.py``,
    raises while importing, or defines no experiment."""
    path = Path(path).expanduser()
    if not is_experiment_file(path.name):
        raise ExperimentFileError(f"experiment file {path}: need a Python file (*.py)")
    if not path.is_file():
        raise ExperimentFileError(f"experiment file not found: {path}")
    path = path.resolve()
    tag = hashlib.blake2b(str(path).encode(), digest_size=4).hexdigest()
    mod_name = f"moelab_user_{path.stem.replace('-', '_')}_{tag}"
    spec = importlib.util.spec_from_file_location(mod_name, path)
    if spec is None or spec.loader is None:  # pragma: no cover - a .py file always has one
        raise ExperimentFileError(f"experiment file {path}: cannot be imported")
    module = importlib.util.module_from_spec(spec)
    before = dict(EXPERIMENTS)
    sys.modules[mod_name] = module
    try:
        with _mark(path):
            spec.loader.exec_module(module)
    except Exception as e:  # noqa: BLE001 - reported as the user's error, one line
        sys.modules.pop(mod_name, None)
        msg = " ".join(str(e).split()) or type(e).__name__
        raise ExperimentFileError(f"experiment file {_where(path, e)}: {type(e).__name__}: "
                                  f"{msg}") from e
    found = [e for n, e in EXPERIMENTS.items() if before.get(n) is not e]
    for value in vars(module).values():
        if isinstance(value, Experiment) and value not in found:
            if EXPERIMENTS.get(value.name) is not value:
                register(value)  # ValueError names a clash with a built-in
            found.append(value)
    if not found:
        raise ExperimentFileError(f"experiment file {path} defines no experiment: define an "
                                  "Experiment at module level or register() one (see "
                                  "docs/REPRODUCE.md)")
    return found
