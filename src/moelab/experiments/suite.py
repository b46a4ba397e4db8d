"""``moelab reproduce``: plan every run of the chosen experiments, execute them under one
progress bar, then write each experiment's results into ``OUT/NAME/``."""

from __future__ import annotations

import datetime as _dt
import os
import platform
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from moelab.experiments.keys import merge_overrides
from moelab.experiments.registry import get_experiment, resolve_names
from moelab.experiments.results import aggregate, write_results
from moelab.experiments.runner import (
    FASHION_MNIST_DIR,
    RunOutcome,
    check_configs,
    choose_image_data,
    default_jobs,
    describe_image_choice,
    execute_runs,
    failure_summary,
    invocation,
    plan_runs,
    profile_data,
    with_threads,
)
from moelab.experiments.spec import Experiment

__all__ = ["RunsFailedError", "machine_description", "print_verdicts", "reproduce",
           "with_sources"]


class RunsFailedError(RuntimeError):
    """Some runs of ``reproduce`` failed (results were still written for the others).

    ``paths``: the results.md files written; ``failed``: the failed runs' outcomes. The
    message is one line naming them and where their tracebacks are."""

    def __init__(self, failed: list[RunOutcome], paths: list[Path]) -> None:
        super().__init__(failure_summary(failed))
        self.failed = failed
        self.paths = paths


def with_sources(exps: Sequence[Experiment]) -> list[Experiment]:
    """``exps`` with every experiment's sources added before it (each once)."""
    out: list[Experiment] = []

    def add(e: Experiment) -> None:
        for s in e.sources:
            add(get_experiment(s))
        if e not in out:
            out.append(e)

    for e in exps:
        add(e)
    return out


def machine_description() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{platform.system()} {platform.machine()}, {cpu}, {os.cpu_count()} logical cores"


def reproduce(names: Sequence[str], *, profile: str = "quick", seeds: int | None = None,
              jobs: int | None = None, out: str | Path = "reproduce",
              data_dir: str | Path | None = None, fashion_dir: str | Path | None =
              FASHION_MNIST_DIR, command: Sequence[str] | None = None,
              progress: bool = True, threads: int | None = None,
              check: bool = True, device: str | None = None, precision: str | None = None,
              compile: bool | None = None, dry_run: bool = False) -> list[Path]:
    """Run the named experiments (or ``["all"]``) and write ``OUT/NAME/results.md`` for each;
    returns those paths. Runs already finished with the same config are skipped. An
    experiment's sources (e.g. the trained runs a robustness evaluation reads) are run or
    skipped too; a source's results.md is rewritten only if this call trained some of its
    runs.

    jobs: worker processes (default: one per core; on a GPU as many runs as fit in its free
    memory, ``moelab.experiments.packing``); threads: torch threads per run (default:
    cores // jobs). device, precision, compile: ``train.device`` (None: the configs' "auto",
    CUDA when there is one), ``train.precision`` and ``train.compile`` of every run (None:
    the configs'). command: what results.md records as the command (default: this
    process's own command line). dry_run: plan and check every run, print the plan
    (:func:`print_plan`: each run's ``moelab train`` command, tokens, GPU-hours) and return []
    without training. check: raise :class:`RunsFailedError` (after writing the
    results) if any run failed, so a script that calls this exits non-zero.

    Spawn-safe: called while a worker process imports the script that calls it (``--jobs``
    > 1 without an ``if __name__ == "__main__":`` guard), it does nothing and returns [].
    """
    if _in_spawned_import():
        return []
    from moelab.experiments.userfile import loading

    if (path := loading()) is not None:
        print(f"moelab reproduce: {path} calls reproduce() when imported; skipped (the "
              "command line runs the experiments it names)", file=sys.stderr)
        return []
    import torch

    from moelab import __version__

    t0 = time.perf_counter()
    requested = {e.name for e in resolve_names(list(names))}
    exps = with_sources(resolve_names(list(names)))
    exps = [e.at(profile) for e in exps]  # raises for an unknown profile
    if jobs is not None and jobs < 1:
        raise ValueError(f"--jobs={jobs} is invalid: need >= 1")
    from moelab.experiments import keys as K
    from moelab.experiments.keys import kv

    extra = tuple(kv(key, v) for key, v in ((K.DEVICE, device), (K.PRECISION, precision),
                                            (K.COMPILE, compile)) if v is not None)
    on_gpu = _runs_on_cuda(device)
    if threads is not None and threads < 1:
        raise ValueError(f"threads={threads} is invalid: need >= 1")
    out = Path(out)
    kinds = {e.name: e.profile(profile).data_dir for e in exps if not e.sources}
    if data_dir is not None and not any("cifar10" in e.image_datasets or kinds.get(e.name)
                                        for e in exps):
        raise ValueError("--data-dir holds CIFAR-10 for image claims (or a paper profile's "
                         "data); none of these experiments uses it")
    data = {e.name: (profile_data(kinds[e.name], data_dir, e.name, profile, dry_run)
                     if kinds.get(e.name) else
                     choose_image_data(data_dir, fashion_dir, e.image_datasets)
                     if e.image_datasets else None) for e in exps}
    for e in exps:
        if data[e.name] is not None and progress:
            what = (f"data: {data[e.name].label}" if kinds.get(e.name) else
                    describe_image_choice(data[e.name], e.image_datasets, fashion_dir))
            print(f"moelab reproduce: {e.name}: {what}", file=sys.stderr)
    # train.threads is set below, once the number of workers is known (not part of a run's
    # identity: a run resumes at another --jobs)
    plans = {e.name: plan_runs(e, profile, seeds or e.profile(profile).seeds, out,
                               data[e.name], extra=extra) for e in exps}
    cmd = list(command) if command is not None else invocation()
    all_specs = [s for e in exps for s in plans[e.name]]
    check_configs(all_specs)  # every arm valid before any run starts (BadArmsError)
    if dry_run:
        print_plan(exps, profile, plans, extra_args=_reproduce_args(profile, out, data_dir))
        return []
    if jobs is None:
        jobs = _gpu_jobs(all_specs, device or "cuda", progress) if on_gpu else default_jobs()
    if threads is None:
        threads = max(1, (os.cpu_count() or 1) // jobs)
    all_specs = [with_threads(s, threads) for s in all_specs]
    for e in exps:
        plans[e.name] = [s for s in all_specs if s.experiment == e.name]
    outcomes = execute_runs(all_specs, jobs=jobs, command=cmd, progress=progress)
    by_exp: dict[str, list] = {e.name: [] for e in exps}
    for o in outcomes:
        by_exp[o.spec.experiment].append(o)
    written = []
    # a source only read here (none of its runs trained) keeps the results.md of the
    # invocation that trained it: its command and time
    for e in (x for x in exps if x.name in requested or any(
            o.status in ("done", "resumed") for o in by_exp[x.name])):
        outs = by_exp[e.name]
        srcs = {s: (next(x for x in exps if x.name == s), by_exp[s]) for s in e.sources}
        t_agg = time.perf_counter()
        res = aggregate(e, outs, srcs)  # from_run metrics (robustness) are evaluated here
        agg_s = time.perf_counter() - t_agg
        used = [o for o in outs] + [o for s in e.sources for o in by_exp[s]]
        n_seeds = seeds or e.profile(profile).seeds
        meta: dict[str, Any] = {
            "profile": profile, "seeds": n_seeds, "jobs": jobs, "threads_per_job": threads,
            "command": shlex.join(cmd), "torch": torch.__version__,
            "python": platform.python_version(), "moelab": __version__,
            "machine": machine_description(), "data": data[e.name].label if data[e.name] else None,
            "overrides": merge_overrides(list(e.overrides) + list(e.profile(profile).overrides)),
            "invocation_wall_s": time.perf_counter() - t0,
            "invocation_experiments": [x.name for x in exps],
            "runs_wall_s": sum(o.wall_s for o in outs), "aggregate_wall_s": agg_s,
            "n_run": sum(o.status in ("done", "resumed") for o in used),
            "n_skipped": sum(o.status == "skipped" for o in used),
            "finished": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
        }
        exp_dir = out / e.name
        exp_dir.mkdir(parents=True, exist_ok=True)
        try:
            from moelab.experiments.plots import make_plots

            meta["plots"] = [str(p) for p in make_plots(exp_dir, e, res, srcs)]
        except ModuleNotFoundError as err:  # matplotlib missing: tables still written
            print(f"moelab reproduce: no plots: {err}", file=sys.stderr)
            meta["plots"] = []
        written.append(write_results(exp_dir, e, res, meta))
    if progress:  # also for `python my_experiment.py`: what was found, and where
        print_verdicts(written)
    failed = [o for o in outcomes if o.status == "failed"]
    if failed and check:
        raise RunsFailedError(failed, written)
    return written


def _reproduce_args(profile: str, out: Path, data_dir: str | Path | None) -> str:
    args = f"--profile {profile} --out {shlex.quote(str(out))}"
    return args + (f" --data-dir {shlex.quote(str(data_dir))}" if data_dir is not None else "")


def train_command(spec, gpus: int = 1) -> str:
    """The command that trains run ``spec`` by itself (``moelab train``; ``moelab launch
    --nproc-per-node G train`` on G GPUs): a run it finishes is one ``moelab reproduce``
    then skips (same config.toml)."""
    launch = ["moelab", "train"] if gpus == 1 else ["moelab", "launch", "--nproc-per-node",
                                                    str(gpus), "train"]
    sets = [a for o in merge_overrides(spec.overrides) for a in ("--set", o)]
    return shlex.join([*launch, "--config", spec.base, *sets, "--out", spec.run_dir])


def print_plan(exps: Sequence[Experiment], profile: str, plans: dict[str, list],
               extra_args: str = "") -> None:
    """The dry run's plan (stdout): per experiment its runs, tokens or images per run, the
    estimated GPU-hours (``gpu.PAPER_ASSUMPTION``) and each run's command; then how to
    collect the results."""
    from moelab.experiments.gpu import PAPER_ASSUMPTION, profile_gpu_hours
    from moelab.experiments.runner import resolve_config
    from moelab.experiments.spec import run_items

    for e in exps:
        specs = plans[e.name]
        if not specs:
            print(f"{e.name} --profile {profile}: trains nothing (analyses "
                  f"{', '.join(e.sources)})")
            continue
        prof = e.profile(profile)
        per_arm = {}
        for s in specs:
            if s.arm not in per_arm:
                per_arm[s.arm] = run_items(resolve_config(s))
        sizes = sorted({n for n, _ in per_arm.values()})
        unit = next(iter(per_arm.values()))[1]
        size = format_count(sizes[0]) if len(sizes) == 1 else \
            f"{format_count(sizes[0])}-{format_count(sizes[-1])}"
        hours = profile_gpu_hours(specs, prof.gpus_per_run)
        gpus = f"{prof.gpus_per_run} GPU{'s' if prof.gpus_per_run > 1 else ''}"
        print(f"{e.name} --profile {profile}: {len(specs)} runs, {size} {unit} per run, "
              f"{gpus} per run, ~{hours:,.1f} GPU-hours (an estimate: "
              f"{PAPER_ASSUMPTION})")
        for s in specs:
            print(f"  {train_command(s, prof.gpus_per_run)}")
        print(f"  then: moelab reproduce {e.name} {extra_args} (finished runs are skipped; "
              "it writes the results)", flush=True)


def format_count(n: float) -> str:
    """``n`` with a unit: 1.5 B, 614.4 k, 512."""
    for div, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if n >= div:
            return f"{n / div:.1f} {unit}"
    return f"{n:g}"


def print_verdicts(paths: Sequence[Path]) -> None:
    """For each results.md written: ``NAME: claim: verdict, ...`` and its path (stdout)."""
    import json

    for p in paths:
        res = json.loads((p.parent / "results.json").read_text(encoding="utf-8"))
        verdicts = ", ".join(f"{c['text']}: {c['verdict']}" for c in res["claims"])
        print(f"{p.parent.name}: {verdicts}")
        print(f"  results: {p}", flush=True)


def _runs_on_cuda(device: str | None) -> bool:
    """Whether the runs train on a CUDA GPU (``device`` None: the configs' "auto")."""
    if device is not None:
        return device.startswith("cuda")
    import torch

    return torch.cuda.is_available()


def _gpu_jobs(specs: list, device: str, progress: bool) -> int:
    """How many runs to pack on the GPU: from one run's measured peak and the free memory
    (``moelab.experiments.packing``); the largest run (the last planned of the biggest
    experiment) is measured."""
    from moelab.experiments.packing import cpu_cores, free_bytes, gpu_jobs, measure_peak

    todo = [s for s in specs if not _finished(s)]
    if not todo:
        return 1
    probe = max(todo, key=_size_hint)
    peak = measure_peak(probe, device)
    free = free_bytes(device)
    jobs = gpu_jobs(peak, free, cpu_cores(), len(todo))
    if progress:
        print(f"moelab reproduce: one run takes {peak / 2**30:.2f} GiB on {device} "
              f"({probe.label}), {free / 2**30:.1f} GiB free: {jobs} runs at a time "
              "(--jobs N to choose)", file=sys.stderr)
    return jobs


def _finished(spec) -> bool:
    from moelab.experiments.runner import resolve_config, run_state

    try:
        return run_state(spec, resolve_config(spec)) == "done"
    except ValueError:
        return False


def _size_hint(spec) -> int:
    """A rough memory size of a run, to pick the one to measure: its layers' parameters
    (attention 4 D^2 and experts 3 E D F per layer) times its tokens per step."""
    from moelab.experiments.runner import resolve_config

    cfg = resolve_config(spec)
    m, d = cfg.model, cfg.data
    per_layer = 4 * m.d_model ** 2 + 3 * m.moe.n_experts * m.d_model * m.moe.d_ff
    return m.n_layers * per_layer * d.batch_size * d.seq_len


def _in_spawned_import() -> bool:
    """Whether this process is a multiprocessing child still importing its parent's main
    module (what ``spawn`` does before it runs a worker)."""
    import multiprocessing

    return bool(getattr(multiprocessing.current_process(), "_inheriting", False))
