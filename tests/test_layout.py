"""The package's layout (docs/LAYOUT.md): no import circles, a small top level, the old module
paths still importable, and a checkpoint written before the modules moved still resumes."""

from __future__ import annotations

import ast
import importlib
import json
import shutil
import sys
import warnings
from pathlib import Path

import pytest

import moelab

SRC = Path(moelab.__file__).parent
FIXTURE = Path(__file__).parent / "fixtures" / "run_before_layout_move"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST, module: str, is_package: bool) -> set[str]:
    """Every module of moelab that ``tree`` imports at run time (module level or inside a
    function; imports under ``if TYPE_CHECKING:`` are type-only and left out)."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = module if is_package else module.rpartition(".")[0]
                for _ in range(node.level - 1):
                    pkg = pkg.rpartition(".")[0]
                base = f"{pkg}.{base}" if base else pkg
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def import_graph() -> dict[str, set[str]]:
    """moelab's modules -> the moelab modules each imports (a ``from pkg import name`` counts
    as importing ``pkg.name`` when that is a module, else ``pkg``)."""
    files = {_module_name(p): p for p in SRC.rglob("*.py")}
    graph = {}
    for name, path in files.items():
        targets = _imports(ast.parse(path.read_text()), name, path.name == "__init__.py")
        graph[name] = {t for t in targets if t in files and t != name}
        # `from pkg import submodule` names pkg.submodule; drop the bare pkg when that is all
        graph[name] -= {t for t in graph[name] if any(u.startswith(t + ".") for u in graph[name])
                        and t not in _direct_names(path, t)}
    return graph


def _direct_names(path: Path, pkg: str) -> set[str]:
    """``pkg`` itself when ``path`` imports a name from it that is not a submodule."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module == pkg and not node.level:
            for alias in node.names:
                if not (SRC.parent / (pkg.replace(".", "/") + f"/{alias.name}.py")).exists() \
                        and not (SRC.parent / pkg.replace(".", "/") / alias.name).is_dir():
                    return {pkg}
    return set()


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def strongconnect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            strongconnect(v)
    return out


def test_circle_finder_finds_a_circle_and_ignores_type_only_imports():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert circles(graph) == [["a", "b", "c"]]
    assert circles({"a": {"b"}, "b": set()}) == []
    code = ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from moelab.x import T\n"
            "def f():\n    from moelab.y import g\n")
    assert _imports(ast.parse(code), "moelab.z", False) == {"typing", "typing.TYPE_CHECKING",
                                                            "moelab.y", "moelab.y.g"}


def test_no_import_circles():
    found = circles(import_graph())
    assert not found, "import circles (move the shared piece, or import it under " \
                      f"TYPE_CHECKING if only a type needs it): {found}"


def test_moe_imports_nothing_from_methods():
    graph = import_graph()
    offenders = {m: sorted(t for t in ts if t.startswith("moelab.methods"))
                 for m, ts in graph.items() if m.startswith("moelab.moe")}
    assert not any(offenders.values()), offenders


def test_top_level_holds_few_modules():
    modules = sorted(p.name for p in SRC.glob("*.py"))
    assert len(modules) <= 5, modules


@pytest.mark.parametrize("old,new", sorted(moelab.MOVED_MODULES.items()))
def test_old_module_paths_are_the_moved_modules(old, new):
    sys.modules.pop(old, None)  # imported by an earlier test: import it afresh
    with pytest.warns(DeprecationWarning, match="moved to"):
        module = importlib.import_module(old)
    assert module is importlib.import_module(new)


def test_old_import_paths_of_the_docs_work():
    """The import lines docs/ and the README used before the move."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from moelab.guard import NonFiniteError
        from moelab.parallel import compile_blocks
        from moelab.precision import autocast

        from moelab.distributed import ParallelContext, world_size_from_env
        from moelab.train import Trainer, load_trained
    from moelab.distributed.ddp_ep import ParallelContext as PC
    from moelab.distributed.ddp_ep import world_size_from_env as wsfe
    from moelab.distributed.wrap import compile_blocks as cb
    from moelab.train.guard import NonFiniteError as NFE
    from moelab.train.precision import autocast as ac
    from moelab.train.trainer import Trainer as T
    from moelab.train.trainer import load_trained as lt
    assert (ParallelContext, world_size_from_env, NonFiniteError, compile_blocks, autocast,
            Trainer, load_trained) == (PC, wsfe, NFE, cb, ac, T, lt)


def test_checkpoint_from_before_the_move_resumes(tmp_path, capsys):
    """tests/fixtures/run_before_layout_move: a run of 6 steps interrupted after step 4,
    written by the code before the modules moved. It resumes to step 6, and the resumed steps
    equal a fresh run of the same config (bit-exact resume)."""
    from moelab.cli import main

    run = tmp_path / "old"
    shutil.copytree(FIXTURE, run)
    assert main(["train", "--resume", str(run), "--quiet", "--no-report"]) == 0
    fresh = tmp_path / "fresh"
    assert main(["train", "--config", str(FIXTURE / "config.toml"), "--out", str(fresh),
                 "--quiet", "--no-report"]) == 0
    capsys.readouterr()

    def losses(d: Path) -> dict[int, float]:
        rows = [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: r["loss"] for r in rows if r.get("kind") == "train"}

    resumed, again = losses(run), losses(fresh)
    assert max(resumed) == 6 and set(resumed) == set(again)
    assert resumed == again
