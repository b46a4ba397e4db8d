"""moelab.experiments: spec validation, dataset choice, runner skip/resume/failures,
aggregation by hand, the quick profile end to end, and the CLI."""

import dataclasses
import json
import os
import re
from pathlib import Path

import pytest

from moelab.cli import main
from moelab.experiments import Arm, Claim, Experiment, Metric, Profile, register
from moelab.experiments.registry import EXPERIMENTS
from moelab.experiments.results import aggregate, render_markdown
from moelab.experiments.runner import (
    RunOutcome,
    RunSpec,
    choose_image_data,
    execute_run,
    execute_runs,
    plan_runs,
    resolve_config,
)
from moelab.experiments.stats import VERDICT_RULE
from moelab.experiments.suite import RunsFailedError, reproduce
from moelab.runs.directory import read_metrics
from moelab.train.trainer import Trainer

TINY = ("model.kind=\"mlp\"", "model.n_layers=2", "model.d_model=16", "model.moe.n_experts=4",
        "model.moe.top_k=2", "model.moe.d_ff=8", "data.batch_size=32", "train.steps=4",
        "train.eval_every=2", "train.checkpoint_every=2", "train.log_every=2",
        "data.eval_batches=1", "data.final_eval_batches=2", "optim.warmup_steps=0")
ZS = ("optim.excitation.strategy=\"zero_sum\"",)


def tiny_experiment(name="t-tiny", arms=None, lr_grid=None) -> Experiment:
    arms = arms or (Arm("base"), Arm("zs", ZS), Arm("broken", ("train.expert_parallel=2",)))
    claims = (Claim("zs", "base", "higher", text="zs beats base"),) if len(arms) > 1 else ()
    return Experiment(
        name=name, claim="zero_sum helps", paper="test", base="mnist_mlp", overrides=TINY,
        arms=arms, claims=claims,
        metrics=(Metric.final("acc"),), lr_grid=lr_grid, chance=0.1,
        profiles={"quick": Profile(seeds=2, cpu_minutes=0.1), "full": Profile(seeds=3)})


@pytest.fixture
def registered():
    added = []

    def add(exp):
        register(exp, replace=True)
        added.append(exp.name)
        return exp

    yield add
    for n in added:
        EXPERIMENTS.pop(n, None)


# ----------------------------------------------------------------------------- spec


def test_spec_rejects_inconsistent_definitions():
    with pytest.raises(ValueError, match="claim arm 'nope'"):
        Experiment(name="x", claim="", paper="", arms=(Arm("a"),),
                   claims=(Claim("nope", "a", "higher"),), metrics=(Metric.final("acc"),),
                   profiles={"quick": Profile(), "full": Profile()})
    with pytest.raises(ValueError, match="different lr grids"):
        Experiment(name="x", claim="", paper="", arms=(Arm("a", lr_grid=(0.1,)), Arm("b")),
                   claims=(Claim("b", "a", "higher"),), metrics=(Metric.final("acc"),),
                   profiles={"quick": Profile(), "full": Profile()})
    with pytest.raises(ValueError, match="'full' profile"):
        Experiment(name="x", claim="", paper="", arms=(Arm("a"),),
                   metrics=(Metric.final("acc"),), profiles={"quick": Profile()})
    with pytest.raises(ValueError, match="direction"):
        Claim("a", "b", "better")


def test_every_builtin_experiment_resolves_its_configs(tmp_path):
    data = choose_image_data(None, fashion_dir=None)
    for exp in EXPERIMENTS.values():
        for prof in ("quick", "full"):
            # text experiments (image_datasets=()) keep their base config's dataset
            d = data if exp.image_datasets else None
            for spec in plan_runs(exp, prof, 1, tmp_path, d):
                cfg = resolve_config(spec)  # raises for a wrong key or value
                assert cfg.train.seed == 0
                assert cfg.data.dataset == ("mnist5k" if d else "shakespeare")
    rescue = EXPERIMENTS["excitation-rescue"]
    specs = plan_runs(rescue, "full", 5, tmp_path, data)
    assert len(specs) == 4 * 3 * 5  # arms x lr grid x seeds
    cfg = resolve_config(next(s for s in specs if s.arm == "adam+excitation"))
    assert cfg.optim.name == "adam" and cfg.optim.excitation.strategy == "positive_sum"
    assert cfg.model.skip_connections is False


def test_choose_image_data(tmp_path):
    cifar = tmp_path / "c" / "cifar-10-batches-py"
    cifar.mkdir(parents=True)
    for f in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (cifar / f).write_bytes(b"")
    assert choose_image_data(tmp_path / "c").dataset == "cifar10"
    with pytest.raises(FileNotFoundError, match="no CIFAR-10"):
        choose_image_data(tmp_path)
    fm = tmp_path / "fm"
    fm.mkdir()
    (fm / "train-images-idx3-ubyte.gz").write_bytes(b"")
    c = choose_image_data(None, fashion_dir=fm)
    assert (c.dataset, c.path) == ("idx", str(fm)) and "Fashion-MNIST" in c.label
    assert choose_image_data(None, fashion_dir=tmp_path / "none").dataset == "mnist5k"
    # an experiment may skip Fashion-MNIST (excitation-rescue: its trap is on MNIST-5k)
    assert choose_image_data(None, fm, ("cifar10", "mnist5k")).dataset == "mnist5k"
    assert choose_image_data(tmp_path / "c", fm, ("cifar10", "mnist5k")).dataset == "cifar10"


# --------------------------------------------------------------------------- runner


def test_suite_records_failures_then_skips_everything(tmp_path, registered, capsys):
    exp = registered(tiny_experiment())
    kw = dict(out=tmp_path, jobs=1, threads=1, fashion_dir=None, command=["moelab", "test"])
    with pytest.raises(RunsFailedError, match=r"^2 run\(s\) failed: t-tiny broken seed=0") as e:
        reproduce([exp.name], **kw)
    md = e.value.paths[0]
    res = json.loads((md.parent / "results.json").read_text())
    err = capsys.readouterr().err
    assert "[1/6]" in err and "FAILED" in err  # a plain line per run off a TTY
    # the arm that fails at run time (expert parallel on one process) failed on both seeds,
    # recorded with its error; the others finished
    assert [f["run"] for f in res["failed"]] == ["t-tiny broken seed=0", "t-tiny broken seed=1"]
    assert all("expert_parallel" in f["error"] for f in res["failed"])
    status = json.loads((Path(res["failed"][0]["run_dir"]) / "reproduce.json").read_text())
    assert status["status"] == "failed" and "Traceback" in status["traceback"]
    text = md.read_text()
    assert "## Failed runs" in text and "expert_parallel" in text and VERDICT_RULE in text
    assert "MNIST 5k" in text and "moelab test" in text and "torch " in text
    # aggregation: per-arm mean of the runs' own final records, claim = paired difference
    arms = {a["arm"]: a for a in res["arms"]}
    for name in ("base", "zs"):
        accs = [read_metrics(d)[-1]["test_acc"] for d in arms[name]["run_dirs"].values()]
        assert arms[name]["metrics"]["test_acc"]["summary"]["n"] == 2
        assert arms[name]["metrics"]["test_acc"]["summary"]["mean"] == pytest.approx(
            sum(accs) / 2)
    assert arms["broken"]["metrics"]["test_acc"]["summary"]["n"] == 0
    claim = res["claims"][0]
    diffs = [arms["zs"]["metrics"]["test_acc"]["per_seed"][s]
             - arms["base"]["metrics"]["test_acc"]["per_seed"][s] for s in ("0", "1")]
    assert claim["mean"] == pytest.approx(sum(diffs) / 2)
    assert claim["verdict"] in ("supported", "contradicted", "inconclusive")
    for png in ("metric.png", "curves.png", "gini_by_depth.png", "router_entropy.png"):
        assert (md.parent / png).is_file()

    # second invocation: the finished runs are skipped (nothing rewritten), failures retried
    done = Path(arms["base"]["run_dirs"]["0"]) / "metrics.jsonl"
    before = done.stat().st_mtime_ns
    md = reproduce([exp.name], check=False, **kw)[0]
    res = json.loads((md.parent / "results.json").read_text())
    statuses = {(r["arm"], r["seed"]): r["status"] for r in res["runs"]}
    assert {statuses[(a, s)] for a in ("base", "zs") for s in (0, 1)} == {"skipped"}
    assert statuses[("broken", 0)] == "failed"
    assert done.stat().st_mtime_ns == before


def _spec(tmp_path, overrides=()) -> RunSpec:
    exp = tiny_experiment(arms=(Arm("base"),))
    s = plan_runs(exp, "quick", 1, tmp_path, choose_image_data(None, fashion_dir=None))[0]
    return RunSpec(s.experiment, s.arm, s.seed, s.lr, s.base, s.overrides + tuple(overrides),
                   s.run_dir)


def test_interrupted_run_resumes_from_its_checkpoint(tmp_path):
    spec = _spec(tmp_path)
    straight = _spec(tmp_path / "straight")
    Trainer(resolve_config(spec), spec.run_dir, quiet=True).fit(max_steps=2)  # "killed" at 2
    assert (Path(spec.run_dir) / "ckpt.pt").is_file()
    o = execute_run(spec)
    assert o.status == "resumed" and o.final["step"] == 4
    lines = (Path(spec.run_dir) / "command.txt").read_text().splitlines()
    assert len(lines) == 2  # started once, resumed once: not restarted
    ref = execute_run(straight)
    assert ref.status == "done"
    assert o.final["test_acc"] == ref.final["test_acc"]  # resume is exact
    assert execute_run(spec).status == "skipped"


def test_changed_definition_moves_old_run_aside(tmp_path):
    spec = _spec(tmp_path)
    assert execute_run(spec).status == "done"
    changed = _spec(tmp_path, ("model.moe.d_ff=4",))
    o = execute_run(changed)
    assert o.status == "done"
    assert (Path(spec.run_dir).parent / (Path(spec.run_dir).name + ".stale-1")).is_dir()
    # threads are not part of the identity: another --jobs still skips
    again = _spec(tmp_path, ("model.moe.d_ff=4", "train.threads=2"))
    assert execute_run(again).status == "skipped"


def test_two_worker_processes(tmp_path):
    exp = tiny_experiment(arms=(Arm("base"), Arm("zs", ZS)))
    specs = plan_runs(exp, "quick", 1, tmp_path, choose_image_data(None, fashion_dir=None),
                      threads=1)
    outs = execute_runs(specs, jobs=2, progress=False)
    assert [o.status for o in outs] == ["done", "done"]
    assert [o.spec for o in outs] == specs


# ------------------------------------------------------------------- aggregation by hand


def _fake_run(root: Path, arm: str, seed: int, lr: float, val: float, test: float,
              gini=None) -> RunOutcome:
    d = root / f"{arm}-{lr}-{seed}"
    d.mkdir(parents=True)
    recs = []
    if gini is not None:
        recs.append({"kind": "eval", "step": 5, "final": True, "val_acc": val,
                     "layers": [{"gini": g, "entropy_normalized": 0.5} for g in gini]})
    recs.append({"kind": "final", "step": 5, "val_acc": val, "test_acc": test})
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    spec = RunSpec("t-agg", arm, seed, lr, "mnist_mlp", (), str(d))
    return RunOutcome(spec, "done")


def test_aggregate_picks_lr_on_validation_and_reports_test(tmp_path):
    exp = tiny_experiment(name="t-agg", arms=(Arm("base"), Arm("zs", ZS)), lr_grid=(0.1, 0.3))
    runs = []
    # base: lr 0.1 best on validation (but worse on test: test is not used to pick)
    for seed, (v1, t1, v3, t3) in enumerate([(0.6, 0.20, 0.5, 0.90), (0.7, 0.30, 0.5, 0.90),
                                             (0.8, 0.40, 0.5, 0.90)]):
        runs += [_fake_run(tmp_path, "base", seed, 0.1, v1, t1),
                 _fake_run(tmp_path, "base", seed, 0.3, v3, t3)]
    # zs: lr 0.3 best on validation; test 0.25, 0.45, 0.45 -> diffs vs base .05, .15, .05
    for seed, t in enumerate([0.25, 0.45, 0.45]):
        runs += [_fake_run(tmp_path, "zs", seed, 0.1, 0.1, 0.99),
                 _fake_run(tmp_path, "zs", seed, 0.3, 0.9, t)]
    res = aggregate(exp, runs)
    arms = {a["arm"]: a for a in res["arms"]}
    assert arms["base"]["lr"] == 0.1 and arms["zs"]["lr"] == 0.3
    assert arms["base"]["metrics"]["test_acc"]["summary"]["mean"] == pytest.approx(0.3)
    assert arms["zs"]["escape"] == {"fraction": 1.0, "n": 3, "threshold": pytest.approx(0.2)}
    assert arms["base"]["escape"]["fraction"] == pytest.approx(2 / 3)  # 0.2 is not > 0.2
    c = res["claims"][0]
    # diffs .05 .15 .05: mean 1/12, sd 0.057735 -> half = 4.302653 * 0.057735 / sqrt(3)
    half = 4.302652729911275 * 0.05773502691896258 / 3 ** 0.5
    assert c["mean"] == pytest.approx(0.25 / 3)
    assert c["ci_low"] == pytest.approx(0.25 / 3 - half)
    assert c["verdict"] == "inconclusive"  # 0.0833 - 0.1434 < 0
    sel = {x["lr"]: x["mean"] for x in arms["base"]["lr_selection"]}
    assert sel == {0.1: pytest.approx(0.7), 0.3: pytest.approx(0.5)}


def test_claims_get_benjamini_hochberg_p_over_the_table(tmp_path):
    ns = ("optim.excitation.strategy=\"negative_sum\"",)
    exp = dataclasses.replace(
        tiny_experiment(name="t-agg", arms=(Arm("base"), Arm("zs", ZS), Arm("ns", ns))),
        claims=(Claim("zs", "base", "higher"), Claim("ns", "base", "higher")))
    runs = []
    for seed, (b, z, n) in enumerate([(0.50, 0.60, 0.50), (0.60, 0.72, 0.58),
                                      (0.70, 0.79, 0.73)]):
        runs += [_fake_run(tmp_path, "base", seed, 0.1, 0.5, b),
                 _fake_run(tmp_path, "zs", seed, 0.1, 0.5, z),
                 _fake_run(tmp_path, "ns", seed, 0.1, 0.5, n)]
    res = aggregate(exp, runs)
    p = [c["p_value"] for c in res["claims"]]
    lo, hi = sorted(p)
    # two p-values: the larger is kept, the smaller becomes min(2 * p, larger)
    adj = {lo: min(2 * lo, hi), hi: hi}
    assert [c["p_bh"] for c in res["claims"]] == pytest.approx([adj[x] for x in p])
    assert [c["verdict"] for c in res["claims"]] == ["supported", "inconclusive"]  # unchanged
    meta = {"profile": "quick", "seeds": 3, "command": "moelab reproduce t-agg", "torch": "x",
            "python": "x", "moelab": "x", "machine": "x", "finished": "x",
            "invocation_experiments": ["t-agg"], "runs_wall_s": 1.0, "jobs": 1,
            "aggregate_wall_s": 0.0, "invocation_wall_s": 1.0, "n_run": 9, "n_skipped": 0}
    md = render_markdown(exp, res, meta)
    assert "| p | p (BH) | n | verdict |" in md and "Benjamini-Hochberg, over the 2 p-values" in md
    # one claim: nothing to adjust, no column
    one = {**res, "claims": res["claims"][:1]}
    one["claims"][0] = {**one["claims"][0], "p_bh": one["claims"][0]["p_value"]}
    md1 = render_markdown(exp, one, meta)
    assert "p (BH)" not in md1 and "| p | n | verdict |" in md1


def test_aggregate_per_layer_claim_needs_every_layer(tmp_path):
    src = tiny_experiment(name="t-agg", arms=(Arm("base"), Arm("zs", ZS)))
    from moelab.experiments.excitation import ENTROPY_AUC, GINI

    spec_exp = Experiment(name="t-spec", claim="", paper="", sources=("t-agg",),
                          claims=(Claim("zs", "base", "higher", metric="gini", source="t-agg"),),
                          metrics=(GINI, ENTROPY_AUC),
                          profiles={"quick": Profile(), "full": Profile()})
    runs = []
    for seed in range(3):
        runs.append(_fake_run(tmp_path, "base", seed, 0.1, 0.5, 0.5, gini=[0.2, 0.3]))
        # layer 0 clearly higher for zs, layer 1 the same on average
        runs.append(_fake_run(tmp_path, "zs", seed, 0.1, 0.5, 0.5,
                              gini=[0.5 + 0.01 * seed, 0.3 + 0.01 * (seed - 1)]))
    res = aggregate(spec_exp, [], {"t-agg": (src, runs)})
    c = res["claims"][0]
    assert [x["verdict"] for x in c["per_layer"]] == ["supported", "inconclusive"]
    assert c["verdict"] == "inconclusive"
    assert res["arms"][0]["key"] == "t-agg/base"


# ------------------------------------------------------------------- quick profile + CLI


def test_quick_profile_of_every_experiment_end_to_end(tmp_path):
    # one thread: tiny models, and immune to a busy machine (2 threads in one process on a
    # loaded 2-core machine ran 4x slower)
    paths = reproduce(["all"], profile="quick", out=tmp_path, jobs=1, threads=1,
                      fashion_dir=None, progress=False, command=["moelab", "reproduce", "all"])
    assert [p.parent.name for p in paths] == list(EXPERIMENTS)
    for p in paths:
        res = json.loads((p.parent / "results.json").read_text())
        assert res["failed"] == [] and res["claims"]
        ok = ("supported", "contradicted", "inconclusive", "not enough runs")
        assert all(c["verdict"] in ok for c in res["claims"])
        if all(a["seeds"] == [0] for a in res["arms"]):  # one seed: never a verdict
            assert {c["verdict"] for c in res["claims"]} == {"not enough runs"}
    spec = json.loads((tmp_path / "excitation-specialization" / "results.json").read_text())
    assert {a["source"] for a in spec["arms"]} == {"excitation-foundation", "excitation-rescue"}
    gini = next(a for a in spec["arms"] if a["key"] == "excitation-rescue/sgd")
    assert len(gini["metrics"]["gini"]["summary"]) == 16  # one Gini per depth


def test_cli_reproduce_list_and_errors(capsys):
    assert main(["reproduce", "list"]) == 0
    out = capsys.readouterr().out
    for name in ("excitation-foundation", "excitation-rescue", "excitation-specialization"):
        assert name in out
    assert "min full" in out and "paper:" in out
    # the gpu profiles say what they are, with their size per run and GPU-hours: 600 steps
    # x batch 32 x 512 tokens = 9.8 M tokens per default-moe-speed gpu run
    assert "gpu: a budget run on one GPU (sized to ~12 min, not to the paper): 9.8 M tokens " \
        "per run" in out and "GPU-hours" in out and "150 TFLOP/s" in out
    from moelab.experiments import get_experiment

    assert get_experiment("default-moe-speed").items_per_run("gpu") == (600 * 32 * 512, "tokens")
    assert get_experiment("excitation-specialization").items_per_run("full") is None
    assert main(["reproduce", "excitation-foundatoin"]) == 2
    assert "did you mean 'excitation-foundation'" in capsys.readouterr().err
    assert main(["reproduce", "all", "--jobs", "0"]) == 2
    assert main(["reproduce", "all", "--data-dir", os.devnull]) == 2
    assert "no CIFAR-10" in capsys.readouterr().err


def test_many_arm_plots_get_distinct_lines_and_one_outside_legend(tmp_path):
    from moelab.experiments import plots

    plt = plots._plt()
    n = 24
    fig, axes = plt.subplots(1, 2)
    plots._distinct_lines(axes, n)
    for ax in axes:
        for i in range(n):
            ax.plot([0, 1], [i, i], label=f"arm{i}")
    styles = {(str(line.get_color()), line.get_linestyle()) for line in axes[0].lines}
    assert len(styles) == n  # no two arms look alike
    path = plots._finish(fig, axes, tmp_path / "many.png")
    assert path.is_file()
    assert axes[0].get_legend() is None and axes[1].get_legend() is not None
    fig, ax = plt.subplots()
    assert plots._finish(fig, [ax], tmp_path / "empty.png", drew=False) is None
    assert not (tmp_path / "empty.png").exists()


def test_metric_plot_accuracy_in_percent_with_whiskers_inside_0_100():
    from moelab.experiments.plots import metric_bars

    res = {"arms": [
        {"key": "a", "metrics": {"test_acc": {"summary": {"mean": 0.99, "std": 0.02, "n": 2}}}},
        {"key": "b", "metrics": {"test_acc": {"summary": {"mean": 0.5, "std": 0.0, "n": 1}}}},
        {"key": "c", "metrics": {"test_acc": {"summary": {"mean": None, "std": None, "n": 0}}}},
    ]}
    names, means, lo, hi, unit = metric_bars(res, "test_acc")
    assert (names, unit) == (["a", "b"], "%")
    # a: 99 ± t(0.975, 1) * 2 / sqrt(2) = 99 ± 17.97; the upper whisker stops at 100
    assert means == pytest.approx([99.0, 50.0])
    assert lo == pytest.approx([12.706205 * 2 / 2 ** 0.5, 0.0])
    assert hi == pytest.approx([1.0, 0.0])
    loss = {"arms": [{"key": "a", "metrics": {"test_loss": {"summary": {
        "mean": 2.0, "std": 0.1, "n": 3}}}}]}
    _, means, lo, hi, unit = metric_bars(loss, "test_loss")
    assert unit == "" and means == [2.0] and lo == pytest.approx(hi) and lo[0] > 0


def test_effective_overrides_and_quick_page_wording(tmp_path, capsys):
    from moelab.experiments.keys import merge_overrides
    from moelab.experiments.runner import describe_image_choice

    assert merge_overrides(["data.batch_size=512", "train.steps=100", "data.batch_size=64"]) \
        == ["data.batch_size=64", "train.steps=100"]
    fm = describe_image_choice(choose_image_data(None, tmp_path / "none"),
                               ("cifar10", "fashion-mnist", "mnist5k"), tmp_path / "none")
    assert fm.startswith("image data: MNIST-5k") and "instead of the preferred dataset" in fm
    assert "Fashion-MNIST not installed at" in fm
    # the quick page of an image experiment: effective overrides, notes flagged, data printed
    paths = reproduce(["excitation-foundation"], profile="quick", seeds=1, out=tmp_path,
                      jobs=1, threads=1, fashion_dir=tmp_path / "none",
                      command=["moelab", "reproduce"])
    err = capsys.readouterr().err
    assert "moelab reproduce: excitation-foundation: image data: MNIST-5k" in err
    md = paths[0].read_text()
    line = next(x for x in md.splitlines() if x.startswith("- Base config"))
    keys = [o.split("=")[0] for o in re.findall(r"`([^`]+=[^`]+)`", line)]
    assert len(keys) == len(set(keys)) and "`data.batch_size=64`" in line
    assert "not evidence" in md and "- Notes (full profile):" in md
