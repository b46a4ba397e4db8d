"""moelab: training dynamics for sparse Mixture-of-Experts.

The package's layout (docs/LAYOUT.md):

    moelab.moe           the sparse MoE layer, method-free
    moelab.methods       Default MoE, MomentumSMoE (+ AdamSMoE, Robust), Excitation
    moelab.models        the LM, ViT and MLP built from one Block
    moelab.hf            Hugging Face MoE models, patched
    moelab.data          built-in datasets, loaders, tokenizers, batchers
    moelab.train         the Trainer and its parts (callbacks, optimizer, evaluation, precision...)
    moelab.runs          the run directory: its files, lock, checkpoints, export
    moelab.distributed   torchrun, DDP + expert parallel, FSDP2, wrap_model
    moelab.analysis      routing metrics and the run report
    moelab.experiments   moelab reproduce
    moelab.robustness    attacked and corrupted evaluation
    moelab.config        RunConfig (TOML + --set); moelab.cli: the command line

Modules that moved into these packages stay importable under their old names (e.g.
``moelab.rundir`` is ``moelab.runs.directory``), so older code and checkpoints that pickled
their classes keep working; importing an old name warns with a ``DeprecationWarning``.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings
from types import ModuleType

__version__ = "0.1.0"

#: Old module -> the module it moved to (issue 34). ``moelab.train`` and ``moelab.distributed``
#: became packages of the same name that still export what the modules did.
MOVED_MODULES: dict[str, str] = {
    "moelab.callbacks": "moelab.train.callbacks",
    "moelab.optim": "moelab.train.optim",
    "moelab.evaluation": "moelab.train.evaluation",
    "moelab.guard": "moelab.train.guard",
    "moelab.interrupt": "moelab.train.interrupt",
    "moelab.progress": "moelab.train.progress",
    "moelab.loggers": "moelab.train.loggers",
    "moelab.precision": "moelab.train.precision",
    "moelab.rundir": "moelab.runs.directory",
    "moelab.runlock": "moelab.runs.lock",
    "moelab.checkpoint": "moelab.runs.checkpoint",
    "moelab.sharded_ckpt": "moelab.runs.sharded_checkpoint",
    "moelab.export": "moelab.runs.export",
    "moelab.parallel": "moelab.distributed.wrap",
    "moelab.fsdp": "moelab.distributed.fsdp",
    "moelab.metrics": "moelab.analysis.metrics",
    "moelab.report": "moelab.analysis.report",
}


class _MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Resolves an old module name to the module it moved to (the same module object)."""

    def find_spec(self, name: str, path: object = None, target: object = None
                  ) -> importlib.machinery.ModuleSpec | None:
        if name not in MOVED_MODULES:
            return None
        return importlib.util.spec_from_loader(name, self)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        new = MOVED_MODULES[spec.name]
        warnings.warn(f"{spec.name} moved to {new}; import it from there", DeprecationWarning,
                      stacklevel=2)
        return importlib.import_module(new)

    def exec_module(self, module: ModuleType) -> None:
        pass  # the module it moved to is already executed


if not any(isinstance(f, _MovedModules) for f in sys.meta_path):
    sys.meta_path.append(_MovedModules())
