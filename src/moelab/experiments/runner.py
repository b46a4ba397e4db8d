"""Turn experiments into runs and execute them: resumable, parallel, failures recorded.

    specs = plan_runs(exp, "quick", seeds=2, out=Path("repro"), data=choose_image_data(None))
    outcomes = execute_runs(specs, jobs=1)

Each run is an ordinary moelab run directory ``OUT/<experiment>/runs/<arm>-lr<lr>-s<seed>``
plus ``reproduce.json`` (status, error, data source, wall time). Before a run:

* its resolved config equals ``config.toml`` there and a ``final`` record exists -> skipped;
* it equals and ``ckpt.pt`` exists -> resumed from the checkpoint (``Trainer.resume``);
* ``config.toml`` differs (the definition changed) -> the old directory is moved aside to
  ``<dir>.stale-N`` and the run starts fresh; anything else unfinished starts fresh.

A run that raises is recorded (``status: failed``, error and traceback in ``reproduce.json``)
and the others go on; the next invocation retries it. ``train.threads`` is left out of the
comparison, so the same runs can be resumed with another ``--jobs``.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
import traceback
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from moelab.experiments import keys as K
from moelab.experiments.keys import kv
from moelab.experiments.spec import Experiment, final_record
from moelab.train.guard import NonFiniteError

__all__ = ["FASHION_MNIST_DIR", "BadArmsError", "DataChoice", "RunOutcome", "RunSpec",
           "check_configs", "choose_image_data", "default_jobs", "describe_image_choice",
           "execute_run", "execute_runs", "failure_summary", "plan_runs", "profile_data",
           "resolve_config", "run_state", "with_threads"]

#: Where Debian's ``dataset-fashion-mnist`` package installs the original IDX files.
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
STATUS_FILE = "reproduce.json"
_CIFAR_FILES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]


@dataclass(frozen=True)
class DataChoice:
    """The image dataset every image run of this invocation uses: ``dataset``/``path`` config
    values and a label for results.md."""

    dataset: str
    path: str | None
    label: str

    def overrides(self) -> tuple[str, ...]:
        out = [kv(K.DATASET, self.dataset)]
        out.append(kv(K.DATA_PATH, self.path) if self.path else f"{K.DATA_PATH}=none")
        return tuple(out)


def choose_image_data(data_dir: str | Path | None,
                      fashion_dir: str | Path | None = FASHION_MNIST_DIR,
                      prefer: tuple[str, ...] = ("cifar10", "fashion-mnist", "mnist5k"),
                      ) -> DataChoice:
    """The first available dataset of ``prefer``: "cifar10" if ``data_dir`` holds its python
    batches (the papers' setting), "fashion-mnist" if its IDX files are at ``fashion_dir``,
    "mnist5k" (packaged, always there).

    A ``data_dir`` without CIFAR-10 batches is an error (not a silent fallback).
    """
    cifar = None
    if data_dir is not None:
        root = Path(data_dir).expanduser()
        for folder in (root / "cifar-10-batches-py", root):
            if all((folder / f).is_file() for f in _CIFAR_FILES):
                cifar = folder
                break
        else:
            raise FileNotFoundError(f"--data-dir {root}: no CIFAR-10 python batches there "
                                    f"(need {', '.join(_CIFAR_FILES)} in it or in "
                                    "cifar-10-batches-py/); leave --data-dir out to use "
                                    "Fashion-MNIST or MNIST-5k")
    fashion = None
    if fashion_dir is not None:
        f = Path(fashion_dir)
        if any((f / n).is_file() for n in ("train-images-idx3-ubyte.gz",
                                           "train-images-idx3-ubyte")):
            fashion = f
    for name in prefer:
        if name == "cifar10" and cifar is not None:
            return DataChoice("cifar10", str(cifar), f"CIFAR-10 ({cifar})")
        if name == "fashion-mnist" and fashion is not None:
            return DataChoice("idx", str(fashion), f"Fashion-MNIST ({fashion})")
        if name == "mnist5k":
            return DataChoice("mnist5k", None, "MNIST-5k (packaged subset of MNIST)")
    raise ValueError(f"none of the datasets {prefer} is available")


#: what a profile's ``data_dir`` kind is, and what --data-dir must hold for it
_DATA_DIR_HOW = {
    "cifar10": ("CIFAR-10", "a folder with the python batches data_batch_1..5 and "
                "test_batch, or its parent holding cifar-10-batches-py/"),
    "wikitext": ("WikiText-103 raw", "the folder holding wiki.train.raw, wiki.valid.raw and "
                 "wiki.test.raw, or its parent holding wikitext-103-raw/"),
    "textfile": ("a UTF-8 text file", "the path of the file (split 90/5/5 into train, "
                 "validation and test)"),
}
#: the data path a dry run plans with when --data-dir is not given
DATA_DIR_PLACEHOLDER = "DATA_DIR"


def profile_data(kind: str, data_dir: str | Path | None, experiment: str, profile: str,
                 dry_run: bool = False) -> DataChoice:
    """The data of a profile whose ``Profile.data_dir`` is ``kind`` (one of
    ``spec.DATA_DIR_KINDS``): what ``data_dir`` holds. Without ``data_dir`` a ValueError says
    what to give (a dry run plans with the placeholder path ``DATA_DIR``)."""
    what, how = _DATA_DIR_HOW[kind]
    if data_dir is None:
        if dry_run:
            return DataChoice(kind, DATA_DIR_PLACEHOLDER,
                              f"{what} from --data-dir (not given: {DATA_DIR_PLACEHOLDER})")
        raise ValueError(f"{experiment}: the {profile!r} profile trains on {what}: give "
                         f"--data-dir ({how})")
    if kind == "cifar10":
        return choose_image_data(data_dir, None, ("cifar10",))
    path = Path(data_dir).expanduser()
    if not (path.is_dir() if kind == "wikitext" else path.is_file()):
        thing = "folder" if kind == "wikitext" else "file"
        raise FileNotFoundError(f"--data-dir {path}: not a {thing}; the {profile!r} profile "
                                f"of {experiment} needs {how}")
    return DataChoice(kind, str(path), f"{what} ({path})")


def describe_image_choice(choice: DataChoice, prefer: tuple[str, ...],
                          fashion_dir: str | Path | None = FASHION_MNIST_DIR) -> str:
    """One line for the terminal: the image data a run set uses and, when it is not the
    experiment's preferred dataset, which ones were skipped and why."""
    why = {"cifar10": "no --data-dir with CIFAR-10",
           "fashion-mnist": f"Fashion-MNIST not installed at {fashion_dir} (Debian package "
                            "dataset-fashion-mnist)"}
    names = {"cifar10": "cifar10", "idx": "fashion-mnist", "mnist5k": "mnist5k"}
    chosen = names.get(choice.dataset, choice.dataset)
    skipped = [why[p] for p in prefer[:prefer.index(chosen)] if p in why] \
        if chosen in prefer else []
    # CIFAR-10 is only used when given; skipping it is the normal case, not news
    skipped = [s for s in skipped if not s.startswith("no --data-dir")]
    note = f" instead of the preferred dataset ({'; '.join(skipped)})" if skipped else ""
    return f"image data: {choice.label}{note}"


def default_jobs(cores: int | None = None) -> int:
    """Worker processes when ``--jobs`` is not given: one per core (measured faster than one
    process with all cores for these small models; see the README)."""
    return max(1, cores if cores is not None else (os.cpu_count() or 1))


@dataclass(frozen=True)
class RunSpec:
    """One training run of an experiment (picklable: sent to worker processes)."""

    experiment: str
    arm: str
    seed: int
    lr: float | None
    base: str
    overrides: tuple[str, ...]
    run_dir: str

    @property
    def label(self) -> str:
        lr = "" if self.lr is None else f" lr={self.lr:g}"
        return f"{self.experiment} {self.arm}{lr} seed={self.seed}"


@dataclass
class RunOutcome:
    """What happened to one run: ``status`` "done" (trained now), "resumed" (finished from a
    checkpoint), "skipped" (already finished), "diverged" (stopped at a non-finite loss,
    ``moelab.train.guard.NonFiniteError``; an outcome, counted by ``spec.divergence``), "failed"
    (``error`` says why)."""

    spec: RunSpec
    status: str
    error: str | None = None
    wall_s: float = 0.0
    data_source: str | None = None
    final: dict[str, Any] | None = field(default=None, repr=False)

    @property
    def ok(self) -> bool:
        return self.status != "failed"


def invocation() -> list[str]:
    """The command line this process was started with, as a user would type it: ``moelab
    ...`` for the console script, else ``python ARGV...`` (a script or ``-m``)."""
    argv = list(sys.argv) or [""]
    if Path(argv[0]).name == "moelab":
        return ["moelab", *argv[1:]]
    if argv[0] in ("-c", ""):
        return ["python", "-c", "..."]
    return ["python", *argv]


def _lr_tag(lr: float | None) -> str:
    return "" if lr is None else f"-lr{lr:g}"


def plan_runs(exp: Experiment, profile: str, seeds: int, out: Path,
              data: DataChoice | None, threads: int = 0,
              extra: tuple[str, ...] = ()) -> list[RunSpec]:
    """Every run of ``exp`` (arms x lr grid x seeds 0..seeds-1), in arm-major order, on
    ``data`` (None: the base config's dataset); ``extra`` overrides come last (the device,
    precision and compile settings of ``moelab reproduce``)."""
    if exp.sources:
        return []
    if seeds < 1:
        raise ValueError(f"--seeds={seeds} is invalid: need >= 1")
    prof = exp.profile(profile)
    shared = list(exp.overrides) + list(prof.overrides)
    data_ov = list(data.overrides()) if data is not None else []
    specs = []
    for arm in exp.arms:
        for lr in exp.lr_grid_of(arm, prof):
            for seed in range(seeds):
                ov = shared + list(arm.overrides) + data_ov + [
                    kv(K.NAME, f"{exp.name}-{arm.name}"), kv(K.SEED, seed), kv(K.THREADS, threads),
                    kv(K.TRACKER_GROUP, exp.name)]
                if lr is not None:
                    ov.append(kv(K.LR, float(lr)))
                ov += list(prof.after_arms) + list(extra)
                run_dir = out / exp.name / "runs" / f"{arm.name}{_lr_tag(lr)}-s{seed}"
                specs.append(RunSpec(exp.name, arm.name, seed, lr, exp.base, tuple(ov),
                                     str(run_dir)))
    return specs


def with_threads(spec: RunSpec, threads: int) -> RunSpec:
    """``spec`` with ``train.threads`` set to ``threads`` (chosen once the number of workers
    is known; not part of a run's identity: see ``run_state``)."""
    import dataclasses

    ov = tuple(o for o in spec.overrides if not o.startswith(K.THREADS + "="))
    return dataclasses.replace(spec, overrides=ov + (kv(K.THREADS, threads),))


def resolve_config(spec: RunSpec):
    """The run's RunConfig (raises ConfigError / ValueError for a bad override)."""
    from moelab.config import load_config

    return load_config(spec.base, list(spec.overrides))


class BadArmsError(ValueError):
    """Arms whose runs' configs do not resolve; ``lines``: one per bad arm
    (``EXPERIMENT arm ARM: what is wrong``)."""

    def __init__(self, lines: list[str]) -> None:
        super().__init__("; ".join(lines))
        self.lines = lines


def check_configs(specs: Iterable[RunSpec]) -> None:
    """Resolve and validate every run's config before any run starts; raises BadArmsError
    naming each bad arm once (its first error)."""
    bad: dict[tuple[str, str], str] = {}
    for spec in specs:
        if (spec.experiment, spec.arm) in bad:
            continue
        try:
            resolve_config(spec)
        except ValueError as e:
            bad[spec.experiment, spec.arm] = " ".join(str(e).split())
    if bad:
        raise BadArmsError([f"{exp} arm {arm}: {msg}" for (exp, arm), msg in bad.items()])


def _comparable(cfg) -> dict[str, Any]:
    from moelab.config import config_to_dict

    d = config_to_dict(cfg)
    *parents, leaf = K.THREADS.split(".")
    node = d
    for p in parents:
        node = node.get(p, {})
    node.pop(leaf, None)
    train = d.get("train", {})
    if "deterministic" in train:  # as resolved: runs saved before "auto" say true (= CPU's auto)
        train["deterministic"] = _resolved_deterministic(train)
    return d


def _resolved_deterministic(train: dict[str, Any]) -> bool:
    """``train.deterministic`` of a config dict as it resolves on the config's device."""
    import torch

    from moelab.distributed.wrap import resolve_deterministic

    name = train.get("device", "auto")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return resolve_deterministic(train["deterministic"], torch.device(name))


def run_state(spec: RunSpec, cfg) -> str:
    """"fresh" | "done" | "resume" | "stale" (config.toml differs) | "diverged" (stopped at a
    non-finite loss before: not retried, the outcome is deterministic) for ``spec``'s
    directory."""
    from moelab.config import load_config
    from moelab.runs.directory import read_metrics

    d = Path(spec.run_dir)
    if not (d / "config.toml").is_file():
        return "fresh"
    try:
        saved = load_config(d / "config.toml")
    except ValueError:
        return "stale"
    if _comparable(saved) != _comparable(cfg):
        return "stale"
    if final_record(read_metrics(d)) is not None:
        return "done"
    if read_status(d).get("status") == "diverged":
        return "diverged"
    return "resume" if (d / "ckpt.pt").is_file() else "fresh"


def _move_aside(d: Path) -> Path:
    i = 1
    while (dest := d.with_name(f"{d.name}.stale-{i}")).exists():
        i += 1
    d.rename(dest)
    return dest


def _write_status(d: Path, record: dict[str, Any]) -> None:
    d.mkdir(parents=True, exist_ok=True)
    tmp = d / (STATUS_FILE + ".tmp")
    tmp.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, d / STATUS_FILE)


def read_status(run_dir: str | Path) -> dict[str, Any]:
    """The run's ``reproduce.json`` (empty dict if absent or unreadable)."""
    try:
        return json.loads((Path(run_dir) / STATUS_FILE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}


def execute_run(spec: RunSpec, command: list[str] | None = None) -> RunOutcome:
    """Run (or skip, or resume) one run; never raises for a failing run (returns "failed")."""
    from moelab.runs.directory import read_metrics
    from moelab.train.trainer import Trainer

    d = Path(spec.run_dir)
    t0 = time.perf_counter()
    cmd = command or invocation()
    try:
        cfg = resolve_config(spec)
        state = run_state(spec, cfg)
        if state == "done":
            st = read_status(d)
            return RunOutcome(spec, "skipped", data_source=st.get("data_source"),
                              final=final_record(read_metrics(d)),
                              wall_s=float(st.get("wall_s", 0.0)))  # its earlier training
        if state == "diverged":
            st = read_status(d)
            return RunOutcome(spec, "diverged", error=st.get("error"),
                              data_source=st.get("data_source"))
        if state == "stale":
            _move_aside(d)
        elif state == "fresh" and d.exists():
            shutil.rmtree(d)  # an unfinished run without a checkpoint, or a failure record
        if state == "resume":
            trainer = Trainer.resume(d, quiet=True, command=cmd)
        else:
            trainer = Trainer(cfg, d, quiet=True, command=cmd)
        summary = trainer.fit()
        wall = time.perf_counter() - t0
        if summary.get("stopped"):  # SIGINT/SIGTERM: checkpointed; the next invocation resumes
            return RunOutcome(spec, "interrupted", wall_s=wall)
        status = "resumed" if state == "resume" else "done"
        _write_status(d, {"status": status, "run": spec.label, "wall_s": wall,
                          "data_source": trainer.data_source, "overrides": list(spec.overrides)})
        return RunOutcome(spec, status, wall_s=wall, data_source=trainer.data_source,
                          final=summary)
    except NonFiniteError as e:  # an outcome of the run (divergence), not a crash
        wall = time.perf_counter() - t0
        err = " ".join(str(e).split())
        _write_status(d, {"status": "diverged", "run": spec.label, "error": err,
                          "wall_s": wall, "overrides": list(spec.overrides)})
        return RunOutcome(spec, "diverged", error=err, wall_s=wall)
    except Exception as e:  # noqa: BLE001 - recorded and reported, the suite goes on
        wall = time.perf_counter() - t0
        err = f"{type(e).__name__}: {' '.join(str(e).split())}"
        try:
            _write_status(d, {"status": "failed", "run": spec.label, "error": err,
                              "traceback": traceback.format_exc(), "wall_s": wall,
                              "overrides": list(spec.overrides)})
        except OSError:
            pass
        return RunOutcome(spec, "failed", error=err, wall_s=wall)


def _worker_died(spec: RunSpec, e: BaseException) -> RunOutcome:
    """A failed outcome for a run whose worker process died, recorded in its
    ``reproduce.json`` (so the results' pointer to it holds)."""
    err = f"worker process died: {type(e).__name__}: {' '.join(str(e).split())}"
    try:
        _write_status(Path(spec.run_dir), {
            "status": "failed", "run": spec.label, "error": err,
            "traceback": "".join(traceback.format_exception(e)), "wall_s": 0.0,
            "overrides": list(spec.overrides)})
    except OSError:
        pass
    return RunOutcome(spec, "failed", error=err)


def failure_summary(failed: list[RunOutcome], limit: int = 4) -> str:
    """One line naming the failed runs and where their tracebacks are."""
    named = [f"{o.spec.label} ({Path(o.spec.run_dir) / STATUS_FILE})" for o in failed[:limit]]
    more = f" and {len(failed) - limit} more" if len(failed) > limit else ""
    return (f"{len(failed)} run(s) failed: {'; '.join(named)}{more}; each reproduce.json holds "
            "the error and traceback; the same command retries them")


def _describe(o: RunOutcome) -> str:
    if o.status == "failed":
        return f"FAILED ({o.error})"
    if o.status == "diverged":
        return f"diverged ({o.error})"
    fin = o.final or {}
    bits = [f"{k} {fin[k]:.4f}" for k in ("test_acc", "test_ppl") if fin.get(k) is not None]
    return f"{o.status} {' '.join(bits)} ({o.wall_s:.0f} s)"


def _run_pool(worker: Callable[..., RunOutcome], specs: list[RunSpec], idx: Iterable[int],
              jobs: int, command: list[str] | None,
              finished: Callable[[int, RunOutcome], None]) -> list[tuple[int, BaseException]]:
    """Run ``specs[i]`` for ``i`` in ``idx`` on ``jobs`` spawned workers, calling
    ``finished`` for each; returns the runs the pool could not finish because a worker died
    (``BrokenProcessPool``), with the error."""
    idx = list(idx)
    broken: list[tuple[int, BaseException]] = []
    ctx = get_context("spawn")  # no forked torch thread pools
    with ProcessPoolExecutor(max_workers=min(jobs, len(idx)), mp_context=ctx) as ex:
        futs = {ex.submit(worker, specs[i], command): i for i in idx}
        for f in as_completed(futs):
            i = futs[f]
            try:
                o = f.result()
            except BrokenProcessPool as e:
                broken.append((i, e))
                continue
            except Exception as e:  # noqa: BLE001 - the run could not be sent or returned
                o = _worker_died(specs[i], e)
            if o.status == "interrupted":
                ex.shutdown(wait=True, cancel_futures=True)
                raise KeyboardInterrupt
            finished(i, o)
    return broken


def execute_runs(specs: Iterable[RunSpec], jobs: int = 1,
                 on_done: Callable[[RunOutcome], None] | None = None,
                 command: list[str] | None = None, progress: bool = True,
                 worker: Callable[..., RunOutcome] = execute_run) -> list[RunOutcome]:
    """Execute ``specs`` with ``jobs`` worker processes (1: in this process); one overall
    progress bar on a TTY stderr, else one line per finished run. Returns the outcomes in
    the order of ``specs``. ``worker(spec, command)``: what runs one spec (``execute_run``;
    a module-level function, since workers are spawned). A worker process that dies fails
    only its own run: the runs its death interrupted are retried, each alone."""
    specs = list(specs)
    if jobs < 1:
        raise ValueError(f"--jobs={jobs} is invalid: need >= 1")
    from tqdm.auto import tqdm

    tty = sys.stderr.isatty()
    bar = tqdm(total=len(specs), unit="run", disable=not (progress and tty),
               dynamic_ncols=True, desc="reproduce")
    results: dict[int, RunOutcome] = {}
    count = 0

    def finished(i: int, o: RunOutcome) -> None:
        nonlocal count
        count += 1
        results[i] = o
        bar.update(1)
        if o.status == "failed":
            bar.write(f"moelab reproduce: {o.spec.label}: {_describe(o)}", file=sys.stderr)
        elif progress and not tty:
            print(f"[{count}/{len(specs)}] {o.spec.label}: {_describe(o)}", file=sys.stderr,
                  flush=True)
        if on_done is not None:
            on_done(o)

    try:
        if jobs == 1 or len(specs) <= 1:
            for i, s in enumerate(specs):
                o = worker(s, command)
                if o.status == "interrupted":
                    raise KeyboardInterrupt
                finished(i, o)
        else:
            # a worker that dies breaks the pool and every run still in it: those are retried
            # one at a time, each in a pool of its own, so a run that kills its worker fails
            # only itself
            broken = _run_pool(worker, specs, range(len(specs)), jobs, command, finished)
            for i, _ in sorted(broken):
                for j, e in _run_pool(worker, specs, [i], 1, command, finished):
                    finished(j, _worker_died(specs[j], e))
    finally:
        bar.close()
    return [results[i] for i in range(len(specs))]


def outcome_dict(o: RunOutcome) -> dict[str, Any]:
    """JSON-ready summary of one outcome (for results.json)."""
    return {**asdict(o.spec), "status": o.status, "error": o.error, "wall_s": o.wall_s,
            "data_source": o.data_source}
