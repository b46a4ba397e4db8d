"""Your own experiments from a file (``moelab reproduce PATH.py``), the worked example of
docs/REPRODUCE.md run as documented with 2 workers, and failures that are failures."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from moelab.cli import main
from moelab.experiments.registry import EXPERIMENTS

ROOT = Path(__file__).resolve().parents[1]
MOELAB = Path(sys.executable).parent / "moelab"


def documented_example() -> str:
    """The Python block after ``<!-- example: my_experiment.py -->`` in docs/REPRODUCE.md."""
    text = (ROOT / "docs" / "REPRODUCE.md").read_text(encoding="utf-8")
    m = re.search(r"<!-- example: my_experiment\.py -->\n```python\n(.*?)```", text, re.S)
    assert m, "docs/REPRODUCE.md lost its worked example"
    return m.group(1)


@pytest.fixture
def forget():
    """Unregister the experiments a test's files register in this process."""
    before = set(EXPERIMENTS)
    yield
    for name in set(EXPERIMENTS) - before:
        EXPERIMENTS.pop(name)


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600)


def _check_results(out: Path, command: str) -> dict:
    res = json.loads((out / "my-zero-sum" / "results.json").read_text())
    assert res["failed"] == [] and res["meta"]["command"] == command
    assert res["meta"]["jobs"] == 2
    (claim,) = res["claims"]
    assert claim["n"] == 2 and claim["verdict"] in ("supported", "contradicted", "inconclusive")
    assert (out / "my-zero-sum" / "metric.png").is_file()
    for arm in res["arms"]:
        for run_dir in (out.parent / d for d in arm["run_dirs"].values()):
            cfg = (Path(run_dir) / "config.toml").read_text()
            assert 'tracker_group = "my-zero-sum"' in cfg
            assert (Path(run_dir) / "command.txt").read_text().strip() == command
    return res


def test_documented_example_runs_from_moelab_reproduce_with_two_workers(tmp_path):
    (tmp_path / "my_experiment.py").write_text(documented_example())
    cmd = "moelab reproduce my_experiment.py --profile quick --jobs 2 --out repro"
    p = _run([str(MOELAB), *cmd.split()[1:]], tmp_path)
    assert p.returncode == 0, p.stderr
    assert "my-zero-sum: zs higher than adamw:" in p.stdout
    _check_results(tmp_path / "repro", cmd)
    # again: every run is skipped, nothing trained
    p = _run([str(MOELAB), *cmd.split()[1:]], tmp_path)
    assert p.returncode == 0 and "[1/4]" in p.stderr and "skipped" in p.stderr
    p = _run([str(MOELAB), "reproduce", "my_experiment.py", "list"], tmp_path)
    assert p.returncode == 0 and "my-zero-sum" in p.stdout and "excitation" not in p.stdout


@pytest.mark.parametrize("guard", [True, False])
def test_documented_example_as_a_script_with_two_workers(tmp_path, guard):
    src = documented_example()
    if not guard:  # reproduce() at the top level: the spawned workers import it too
        src = src.replace('if __name__ == "__main__":                  # for `python '
                          'my_experiment.py`\n    reproduce(', 'reproduce(')
        assert "__main__" not in src
    (tmp_path / "my_experiment.py").write_text(src)
    p = _run([sys.executable, "my_experiment.py"], tmp_path)
    assert p.returncode == 0, p.stderr
    _check_results(tmp_path / "repro", "python my_experiment.py")
    # the script form says what it found and where, as `moelab reproduce` does
    assert re.search(r"^my-zero-sum: zs higher than adamw: (supported|contradicted|"
                     r"inconclusive)$", p.stdout, re.M), p.stdout
    assert "  results: repro/my-zero-sum/results.md" in p.stdout.splitlines()


BROKEN = """\
from moelab.experiments import Arm, Claim, Experiment, Metric, Profile

EXP = Experiment(  # not registered: moelab reproduce picks up module-level experiments too
    name="uf-broken", claim="c", paper="p", base="mnist_mlp",
    arms=(Arm("ok"), Arm("bad", ("data.dataset=idx", "data.path=/nonexistent/moelab-idx"))),
    claims=(Claim("bad", "ok", "higher"), Claim("ok", "ok", "higher")),
    metrics=(Metric.final("acc"),), image_datasets=(),
    profiles={"quick": Profile(("train.steps=4", "train.eval_every=0"), seeds=2),
              "full": Profile()})
"""


BAD_ARM = '("data.dataset=idx", "data.path=/nonexistent/moelab-idx")'


def test_every_arm_is_validated_before_any_run(tmp_path, capsys, forget):
    """A bad config in an arm (of two experiments): one line per bad arm, status 2, nothing
    trained, not even the valid arms' runs."""
    path = tmp_path / "two.py"
    text = BROKEN.replace(BAD_ARM, '("model.moe.top_k=9",)')
    second = text.split("EXP = ", 1)[1].replace('"uf-broken"', '"uf-broken2"')
    second = second.replace('Arm("ok"), ', 'Arm("ok", ("optim.lr=-1",)), ')
    path.write_text(text + "\nEXP2 = " + second)
    out = tmp_path / "out"
    assert main(["reproduce", str(path), "--jobs", "1", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "moelab: error: uf-broken arm bad: model.moe.top_k=9 is invalid: need top_k <= "
        "n_experts (8)",
        "moelab: error: uf-broken2 arm ok: optim.lr=-1.0 is invalid: need lr > 0",
        "moelab: error: uf-broken2 arm bad: model.moe.top_k=9 is invalid: need top_k <= "
        "n_experts (8)"], err
    assert not out.exists()


def test_failed_runs_exit_1_with_a_one_line_summary(tmp_path, capsys, forget):
    path = tmp_path / "broken.py"
    path.write_text(BROKEN)
    out = tmp_path / "out"
    code = main(["reproduce", str(path), "--jobs", "1", "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 1
    last = captured.err.strip().splitlines()[-1]
    assert last.startswith("moelab reproduce: 2 run(s) failed: uf-broken bad seed=0 (")
    for seed in (0, 1):
        status = out / "uf-broken" / "runs" / f"bad-s{seed}" / "reproduce.json"
        assert str(status) in last and "Traceback" in json.loads(status.read_text())["traceback"]
    res = json.loads((out / "uf-broken" / "results.json").read_text())
    verdicts = [c["verdict"] for c in res["claims"]]
    assert verdicts == ["not enough runs", "inconclusive"]  # n = 0 / identical arms, n = 2
    md = (out / "uf-broken" / "results.md").read_text()
    assert "**not enough runs**" in md and "## Failed runs" in md
    assert "uf-broken: bad higher than ok: not enough runs" in captured.out


def test_reproduce_raises_after_writing_the_results(tmp_path, forget):
    from moelab.experiments import reproduce
    from moelab.experiments.suite import RunsFailedError
    from moelab.experiments.userfile import load_experiments

    path = tmp_path / "broken.py"
    path.write_text(BROKEN)
    (exp,) = load_experiments(path)
    kw = dict(profile="quick", jobs=1, threads=1, out=tmp_path / "o", progress=False)
    with pytest.raises(RunsFailedError, match=r"^2 run\(s\) failed: uf-broken bad seed=0") as e:
        reproduce([exp.name], **kw)
    assert e.value.paths == [tmp_path / "o" / "uf-broken" / "results.md"]
    assert e.value.paths[0].is_file() and len(e.value.failed) == 2
    assert reproduce([exp.name], check=False, **kw) == e.value.paths


def test_one_seed_gets_no_verdict(tmp_path, capsys, forget):
    path = tmp_path / "one.py"
    path.write_text(BROKEN.replace(BAD_ARM, "()").replace("seeds=2",
                                                                             "seeds=1"))
    assert main(["reproduce", str(path), "--jobs", "1", "--out", str(tmp_path / "o")]) == 0
    res = json.loads((tmp_path / "o" / "uf-broken" / "results.json").read_text())
    assert [c["verdict"] for c in res["claims"]] == ["not enough runs"] * 2
    assert all(c["n"] == 1 for c in res["claims"])


@pytest.mark.parametrize("content,message", [
    (None, "experiment file not found"),
    ("x = 1\n", "defines no experiment"),
    ("import math\n\nraise RuntimeError('boom')\n", ":3: RuntimeError: boom"),
    ("def f(:\n", ": SyntaxError:"),
])
def test_experiment_file_errors_are_one_line(tmp_path, capsys, content, message):
    path = tmp_path / "exp.py"
    if content is not None:
        path.write_text(content)
    assert main(["reproduce", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("moelab: error: experiment file") and err.count("\n") == 1, err
    assert message in err and "Traceback" not in err


def test_reproduce_in_a_loaded_file_is_skipped(tmp_path, capsys, forget):
    path = tmp_path / "eager.py"
    path.write_text(BROKEN.replace(BAD_ARM, "()")
                    + "\nfrom moelab.experiments import register, reproduce\nregister(EXP)\n"
                    "reproduce(['uf-broken'], out='never')\n")
    assert main(["reproduce", str(path), "list"]) == 0
    out, err = capsys.readouterr()
    assert "uf-broken" in out and "calls reproduce() when imported; skipped" in err
    assert not (tmp_path / "never").exists() and not Path("never").exists()


def test_list_gives_measured_cpu_time_or_unknown_with_the_size(tmp_path, capsys, forget):
    """A profile without ``cpu_minutes`` is "unknown", with its runs and steps; a measured
    one is shown as given."""
    path = tmp_path / "sizes.py"
    path.write_text(BROKEN.replace(BAD_ARM, "()").replace(
        '"full": Profile()', '"full": Profile(("train.steps=7",), seeds=3, cpu_minutes=12.0)'))
    assert main(["reproduce", str(path), "list"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "CPU time: ~12 min full, unknown (4 runs x 4 steps) quick (2 CPU cores)" in out


def test_unknown_name_in_a_file_points_to_its_list(tmp_path, capsys, forget):
    path = tmp_path / "mine.py"
    path.write_text(BROKEN.replace(BAD_ARM, "()"))
    assert main(["reproduce", str(path), "uf-brokn"]) == 2
    err = capsys.readouterr().err
    assert err == (f"moelab: error: {path} defines no experiment 'uf-brokn': did you mean "
                   f"'uf-broken'? see `moelab reproduce {path} list`\n")
