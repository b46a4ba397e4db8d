"""moelab report: figures and the Markdown comparison table from two tiny runs."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("matplotlib")

from moelab.analysis.report import load_run, make_report, markdown_table
from moelab.config import apply_overrides, config_from_dict, config_to_dict, load_config
from moelab.train.trainer import Trainer

TINY = [
    "model.d_model=32", "model.n_layers=3", "model.n_heads=2", "model.moe.n_experts=4",
    "model.moe.d_ff=32", "model.max_seq_len=32", "data.seq_len=32", "data.batch_size=8",
    "data.eval_batches=2", "data.final_eval_batches=2", "train.steps=9", "train.eval_every=3",
    "train.log_every=1", "train.threads=1",
]
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    dirs = []
    for name, extra in (("base", []), ("dmoe", ["model.default_moe.beta=0.9"])):
        data = config_to_dict(load_config("default"))
        data["name"] = name
        cfg = config_from_dict(apply_overrides(data, [*TINY, *extra]))
        Trainer(cfg, root / name, quiet=True).fit()
        dirs.append(root / name)
    return dirs


def test_report_writes_figures_and_table(two_runs, tmp_path):
    out = tmp_path / "report"
    md = make_report(two_runs, out)
    assert md == out / "report.md"
    names = {"loss.png", "gini_by_depth.png", "router_entropy.png", "utilization_base.png",
             "utilization_dmoe.png", "norm_share.png"}
    assert names <= {p.name for p in out.iterdir()}
    for n in names:
        data = (out / n).read_bytes()
        assert data.startswith(PNG) and len(data) > 5000, n
    text = md.read_text()
    table = [line for line in text.splitlines() if line.startswith("|")]
    # then the Default MoE table: the dmoe run's layers (beta 0.9, or 1 for an unrouted expert)
    dm = [line for line in table[4:] if line.startswith("| dmoe | ")]
    assert table[4].startswith("| run | layer | β (min – max)") and dm
    assert all(" – 1.0000 |" in line or "0.9000 – 0.9000" in line for line in dm)
    table = table[:4]
    assert table[0].startswith("| run | model | steps | params | val ppl | test ppl | tokens/s")
    assert "mean Gini" in table[0] and "dead experts" in table[0]
    assert len(table) == 4 and table[2].startswith("| base | lm | 9 |")
    assert table[3].startswith("| dmoe | lm | 9 |")
    for n in names:
        assert f"]({n})" in text


def test_table_numbers_match_the_runs(two_runs):
    runs = [load_run(d) for d in two_runs]
    final = [json.loads(line) for line in (two_runs[0] / "metrics.jsonl").read_text()
             .splitlines()][-1]
    row = markdown_table(runs).splitlines()[2].split(" | ")
    assert row[4] == f"{final['val_ppl']:.2f}" and row[5] == f"{final['test_ppl']:.2f}"
    assert row[3] == f"{final['params']:,}"
    assert row[8] == f"{final['gini_mean']:.3f}"
    assert len(runs[0].evals) == 3 and runs[0].n_layers == 3


def test_single_run_report_defaults_into_the_run(two_runs):
    md = make_report([two_runs[1]])
    assert md == two_runs[1] / "report.md" and (two_runs[1] / "loss.png").is_file()


def test_same_names_are_disambiguated(two_runs, tmp_path):
    md = make_report([two_runs[0], two_runs[0]], tmp_path)
    assert "| base-2 |" in md.read_text() and (tmp_path / "utilization_base-2.png").is_file()


def test_not_a_run_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a moelab run directory"):
        make_report([tmp_path])
    with pytest.raises(ValueError, match="at least one"):
        make_report([])


def test_report_reads_runs_without_the_trainer():
    """``moelab.analysis.report`` reads run directories through ``moelab.runs.directory``, not
    the trainer."""
    import subprocess
    import sys

    code = ("import sys, moelab.analysis.report; "
            "print('moelab.train.trainer' in sys.modules, 'moelab.runs.checkpoint' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == "False False"
