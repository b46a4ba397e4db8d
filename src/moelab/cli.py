"""The ``moelab`` command line: train, eval, report, spectrum, export, reproduce, configs,
launch.

Errors in the user's input (bad config values, unknown keys, missing data or run directories)
print one line ``moelab: error: ...`` to stderr and exit with status 2, without a traceback.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
from collections.abc import Sequence

from moelab import __version__

# What a user can get wrong; anything else is a bug and keeps its traceback.
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError,
               ModuleNotFoundError, ImportError)

#: the profiles `moelab reproduce --profile` accepts (the smoke ones derived, spec.SMOKE_SUFFIX)
PROFILES = ("quick", "full", "gpu", "paper", "gpu-smoke", "paper-smoke")
EXAMPLES = """\
examples:
  moelab train                                   # built-in default: MoE LM on Shakespeare
  moelab train --config mnist                    # MoE ViT on the packaged MNIST 5k
  moelab train --set model.moe.n_experts=16 --set optim.excitation.strategy=zero_sum
  moelab train --set model.default_moe.beta=0.95 --out runs/dmoe
  moelab train --resume runs/dmoe                # continue from its ckpt.pt
  moelab launch --nproc-per-node 2 train --set train.parallel=fsdp   # torchrun, clean Ctrl-C
  moelab train --config runs/dmoe/config.toml    # redo a run from its saved config
  moelab eval runs/dmoe
  moelab report runs/a runs/b --out report/
  moelab spectrum runs/smoe runs/mom             # layer-map eigenvalues, side by side
  moelab export runs/dmoe dmoe.pt                # the model as a plain state dict
  moelab configs                                 # list the shipped configs
  moelab reproduce list                          # the papers' claims as experiments
  moelab reproduce excitation-foundation --profile full --out repro
"""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line + usage hint, exit 2
        self.exit(2, f"{self.prog}: error: {message}\n(see `{self.prog} --help`)\n")


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def _fail(msg: str) -> int:
    print(f"moelab: error: {msg}", file=sys.stderr)
    return 2


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="moelab", description="Train and analyse sparse Mixture-of-Experts "
                "models (Default MoE, MomentumSMoE, Excitation).", epilog=EXAMPLES,
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"moelab {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    t = sub.add_parser("train", help="train a model (writes a run directory)",
                       description="Train a model from a config. Writes config.toml, "
                       "metrics.jsonl, command.txt, ckpt.pt and a report into the run "
                       "directory (locked while it trains). Ctrl-C or SIGTERM finishes the "
                       "step, saves ckpt.pt and prints the resume command (twice: abort at "
                       "once). A NaN/inf loss stops the run, keeping the last good "
                       "checkpoint (train.skip_nonfinite_steps=N skips up to N bad steps). "
                       "The device is train.device (default auto: CUDA when available, "
                       "else CPU), printed in the first line.", epilog=EXAMPLES,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    t.add_argument("--config", "-c", default=None, metavar="NAME|PATH",
                   help="a shipped config name (see `moelab configs`) or a TOML file "
                   "(default: default)")
    t.add_argument("--set", "-s", dest="overrides", action="append", default=[],
                   metavar="KEY=VALUE", help="override a config value, e.g. "
                   "model.moe.n_experts=16, optim.lr=1e-3, model.default_moe=none (repeatable; "
                   "VALUE is a TOML literal or a plain string)")
    t.add_argument("--out", "-o", default=None, metavar="DIR",
                   help="run directory (default: train.out_dir or runs/<name>-<timestamp>)")
    t.add_argument("--resume", default=None, metavar="RUN_DIR",
                   help="continue the run in RUN_DIR from its checkpoint (uses its config.toml)")
    t.add_argument("--device", default=None, metavar="DEVICE",
                   help="where to train: auto (CUDA when available, else CPU; the default, "
                   "train.device), cpu, cuda, cuda:N or mps; with --resume it moves the run")
    t.add_argument("--precision", default=None, choices=("auto", "fp32", "tf32", "bf16"),
                   help="train.precision: auto (bf16 mixed precision on a CUDA GPU that has "
                   "it, else fp32; the default), fp32, tf32 (CUDA) or bf16 (fp32 weights, bf16 "
                   "autocast); with --resume it changes the run's precision from there on")
    t.add_argument("--quiet", "-q", action="store_true",
                   help="no progress bar or progress lines (the final results still print); "
                   "when stderr is not a terminal, progress is a plain line every "
                   "train.progress_every steps")
    t.add_argument("--no-report", action="store_true", help="do not write the report")

    e = sub.add_parser("eval", help="evaluate a run's checkpoint on validation and test",
                       description="Evaluate the checkpointed model of a run directory.")
    e.add_argument("run_dir", metavar="RUN_DIR")
    e.add_argument("--batches", type=int, default=None, metavar="N",
                   help="evaluate only the first N batches of each split (default: all)")
    e.add_argument("--json", action="store_true", help="print the results as JSON")
    e.add_argument("--precision", default=None, choices=("auto", "fp32", "tf32", "bf16"),
                   help="evaluate in this precision (default: the run's train.precision)")
    e.add_argument("--attack", metavar="word_swap[:RATE]", default=None,
                   help="LM runs: clean vs word-swap-attacked val/test perplexity (rate "
                        "default 0.025); writes RUN_DIR/robustness/*.json and .md")
    e.add_argument("--corrupt", metavar="NAME[:SEVERITY]|all", default=None,
                   help="image runs: test accuracy under corruptions (gaussian_noise, "
                        "impulse_noise, defocus_blur, gaussian_blur, contrast; all 5 "
                        "severities unless given); writes RUN_DIR/robustness/*.json and .md")
    e.add_argument("--baseline", metavar="RUN_DIR", default=None,
                   help="with --corrupt: report corruption errors relative to this run (CE, "
                        "mCE)")
    e.add_argument("--seed", type=int, default=None,
                   help="seed of the attack / corruptions (default 0)")

    r = sub.add_parser("report", help="plots + Markdown table comparing runs",
                       description="Write loss/perplexity curves, Gini by depth, router "
                       "entropy, expert-utilization heatmaps and report.md for the runs.")
    r.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    r.add_argument("--out", "-o", default=None, metavar="DIR",
                   help="output folder (default: the run itself for one run, else report/)")

    sp = sub.add_parser("spectrum", help="eigenvalues of each MoE layer's map (Jacobian)",
                        description="For each run: the per-token Jacobian of every MoE "
                        "layer's map (the (h, p) state for momentum rules) on its first "
                        "validation batch, its spectral radius, share of eigenvalues inside "
                        "the unit circle, the MomentumSMoE headroom and the relative move "
                        "(docs/METHODS.md); writes spectrum.png (runs side by side) and "
                        "spectrum.json.")
    sp.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    sp.add_argument("--out", "-o", default=None, metavar="DIR",
                    help="output folder (default: the run itself for one run, else report/)")
    sp.add_argument("--at", choices=("end", "init"), default="end",
                    help="the trained checkpoint (end) or the same model at initialisation")
    sp.add_argument("--tokens", type=int, default=64,
                    help="tokens (spread over the batch) whose Jacobians are taken")

    x = sub.add_parser("export", help="a run's model as a plain state dict or, for HF "
                       "models, a save_pretrained directory",
                       description="Write the checkpointed model of RUN_DIR (single-file or "
                       "sharded, any world size) to OUT: torch.save of the one-process "
                       "model's state dict, or save_pretrained for model.kind='hf'. One "
                       "process.")
    x.add_argument("run_dir", metavar="RUN_DIR")
    x.add_argument("out", metavar="OUT")

    rp = sub.add_parser(
        "reproduce", help="run papers' claims as multi-seed experiments with verdicts",
        description="`moelab reproduce list` lists the experiments; `moelab reproduce NAME "
        "[NAME ...] | all` trains every run (arms x lr grid x seeds; finished runs with the "
        "same config are skipped, interrupted ones resumed) and writes OUT/NAME/results.md, "
        "results.json and plots. `moelab reproduce PATH.py [NAME ...]` runs the experiments "
        "defined in your own Python file (all of them, or those named; PATH.py list lists "
        "them). A failed run makes the exit status 1, after the results are written.")
    rp.add_argument("names", nargs="+", metavar="NAME",
                    help="'list', 'all', experiment names, or PATH.py [NAME ...]")
    rp.add_argument("--seeds", type=int, default=None, metavar="N",
                    help="seeds 0..N-1 (default: the profile's)")
    rp.add_argument("--profile", choices=PROFILES, default="quick",
                    help="quick: tiny smoke-test runs; full: the documented CPU setting; gpu: "
                    "a budget run on one GPU, ~12 min, not the paper's scale (with --device "
                    "cuda); paper: the paper's own setting (model, tokens, lr schedule, "
                    "seeds, data from --data-dir), sized for a cluster: see it with "
                    "--dry-run; gpu-smoke / paper-smoke: that profile shrunk to two CPU "
                    "steps. `list` gives each one's tokens per run and GPU-hours (default: "
                    "quick)")
    rp.add_argument("--dry-run", action="store_true",
                    help="plan and check every run, print each one's `moelab train` (or "
                    "`moelab launch`) command, its tokens and the estimated GPU-hours, and "
                    "train nothing: run those commands anywhere (one torchrun per run), then "
                    "the same `moelab reproduce` collects the finished runs")
    rp.add_argument("--jobs", "-j", type=int, default=None, metavar="J",
                    help="worker processes, the CPU cores split between them (default: one "
                    "per core)")
    rp.add_argument("--out", "-o", default="reproduce", metavar="DIR",
                    help="output folder (default: reproduce/)")
    rp.add_argument("--device", default=None, metavar="DEVICE",
                    help="train.device of every run (default: the configs' auto, CUDA when "
                    "there is one); on a GPU, --jobs defaults to as many runs as fit in its "
                    "free memory (one run's peak is measured first)")
    rp.add_argument("--precision", default=None, choices=("auto", "fp32", "tf32", "bf16"),
                    help="train.precision of every run (default: the configs')")
    rp.add_argument("--compile", action="store_true", default=None,
                    help="train.compile=true for every run")
    rp.add_argument("--data-dir", default=None, metavar="DIR",
                    help="CIFAR-10 python batches for the image claims (default: "
                    "Fashion-MNIST if installed, else the packaged MNIST-5k); for a paper "
                    "profile the paper's data: CIFAR-10, WikiText-103 raw, or a text file "
                    "(`list` says which)")

    sub.add_parser("launch", help="run train or eval on several processes (torchrun with a "
                   "clean Ctrl-C): moelab launch --nproc-per-node N train ...",
                   add_help=False)  # its arguments go to moelab.distributed.launch unparsed
    c = sub.add_parser("configs", help="list the shipped configs, or print one resolved",
                       description="List the configs shipped with moelab; with NAME, print "
                       "that config fully resolved as TOML.")
    c.add_argument("name", nargs="?", default=None, metavar="NAME|PATH")
    c.add_argument("--set", "-s", dest="overrides", action="append", default=[],
                   metavar="KEY=VALUE", help="apply overrides before printing")
    return p


# ---------------------------------------------------------------------------- commands


def _resume_command(trainer) -> str:
    """The command that continues ``trainer``'s run: under torchrun, launched as it was."""
    import shlex

    command = ["moelab", "train", "--resume", str(trainer.run_dir)]
    if trainer.ctx is not None:
        from moelab.distributed.launch import launch_command

        command = launch_command(command, trainer.world_size)
    return shlex.join(command)


def _cmd_train(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from moelab.config import load_config
    from moelab.runs.directory import check_fresh_run_dir
    from moelab.train.guard import NonFiniteError
    from moelab.train.loggers import require_backends
    from moelab.train.trainer import Trainer

    command = ["moelab", *argv]
    try:
        if args.resume:
            if args.config or args.overrides or args.out:
                return _fail("--resume uses the run's own config.toml and directory; drop "
                             "--config/--set/--out (edit RUN_DIR/config.toml to change it)")
            trainer = Trainer.resume(args.resume, quiet=args.quiet, command=command,
                                     device=args.device, precision=args.precision)
        else:
            overrides = list(args.overrides)
            if args.device is not None:
                overrides.append(f"train.device={args.device}")
            if args.precision is not None:
                overrides.append(f"train.precision={args.precision}")
            cfg = load_config(args.config or "default", overrides)
            out = args.out or cfg.train.out_dir
            if out is not None:
                check_fresh_run_dir(out)
            trainer = Trainer(cfg, out, quiet=args.quiet, command=command)
            check_fresh_run_dir(trainer.run_dir)
        require_backends(trainer.cfg.train.loggers)  # a missing tracker: one line, not in fit
    except USER_ERRORS as e:
        return _fail(_one_line(e))
    except KeyboardInterrupt:
        print("\nmoelab: interrupted during start-up; nothing was written", file=sys.stderr)
        return 130
    done = trainer.finished_summary
    if done is not None:
        trainer.lock.release()
        if trainer.is_main:
            print(f"moelab: {trainer.run_dir} already finished at step {trainer.step}; nothing "
                  "to do, nothing changed (to train longer, raise train.steps in its "
                  "config.toml and resume)")
            print(format_summary(done))
        return 0
    try:
        summary = trainer.fit()
    except (NonFiniteError, FileExistsError) as e:  # divergence; run directory locked
        return _fail(_one_line(e))
    except KeyboardInterrupt:
        kept = (f"ckpt.pt holds step {trainer.checkpoint_step}; continue from it with: "
                f"{_resume_command(trainer)}" if trainer.checkpoint_step is not None
                else "no checkpoint was written")
        if trainer.is_main:  # under torchrun: one line
            print(f"\nmoelab: aborted at step {trainer.step}; {kept}", file=sys.stderr)
        return 130
    if summary.get("stopped") and summary.get("signal"):
        if trainer.is_main:
            print(f"moelab: stopped by {summary['signal']} at step {summary['step']}/"
                  f"{trainer.cfg.train.steps}; checkpoint saved in {trainer.run_dir}; "
                  f"continue with: {_resume_command(trainer)}", file=sys.stderr)
        return 143 if summary["signal"] == "SIGTERM" else 130
    if not trainer.is_main:  # under torchrun, rank 0 reports
        return 0
    print(format_summary(summary))
    if not args.no_report:
        try:
            from moelab.analysis.report import make_report

            md = make_report([trainer.run_dir])
            print(f"report: {md}")
        except ModuleNotFoundError as e:
            print(f"moelab: no report: {_one_line(e)}", file=sys.stderr)
    print(f"run: {trainer.run_dir}")
    return 0


def format_summary(s: dict) -> str:
    """One line with the final validation and test metric."""
    if "val_ppl" in s:
        head = (f"val ppl {s['val_ppl']:.3f} (loss {s['val_loss']:.4f}) | "
                f"test ppl {s['test_ppl']:.3f} (loss {s['test_loss']:.4f})")
        rate = f"{s.get('tokens_per_s', 0):,.0f} tokens/s"
    else:
        head = (f"val acc {s['val_acc']:.4f} (loss {s['val_loss']:.4f}) | "
                f"test acc {s['test_acc']:.4f} (loss {s['test_loss']:.4f})")
        rate = f"{s.get('images_per_s', 0):,.0f} images/s"
    extra = ""
    if s.get("gini_mean") is not None:
        extra = f" | mean Gini {s['gini_mean']:.3f}, dead experts {s.get('dead_experts', 0)}"
    return (f"step {s['step']} | {head} | {s.get('train_time_s', 0):.0f} s train, "
            f"{rate}{extra}")


def _cmd_eval(args: argparse.Namespace) -> int:
    from moelab.train.guard import NonFiniteError
    from moelab.train.trainer import load_trained

    if args.batches is not None and args.batches < 1:
        return _fail(f"--batches={args.batches} is invalid: need a positive int")
    if args.attack is not None or args.corrupt is not None:
        return _cmd_eval_robustness(args)
    if args.baseline is not None or args.seed is not None:
        return _fail("--baseline / --seed are invalid without --corrupt / --attack")
    try:
        trainer = load_trained(args.run_dir, precision=args.precision)
    except USER_ERRORS as e:
        return _fail(_one_line(e))
    n = args.batches if args.batches is not None else trainer.cfg.data.final_eval_batches
    trainer.quiet = not trainer.is_main or args.json
    try:
        val = trainer.evaluate("val", n, routing=True, progress=True)
        test = trainer.evaluate("test", n, routing=False, progress=True)
    except NonFiniteError as e:
        return _fail(_one_line(e))
    if not trainer.is_main:
        return 0
    layers = val.pop("layers", [])
    res = {"run": str(args.run_dir), "step": trainer.step, **val, **test}
    if layers:
        res["gini_by_layer"] = [x["gini"] for x in layers]
        res["dead_experts"] = sum(x["dead"] for x in layers)
    if args.json:
        print(json.dumps(res))
        return 0
    if trainer.is_lm:
        print(f"{args.run_dir} (step {trainer.step}): val ppl {res['val_ppl']:.3f} "
              f"(loss {res['val_loss']:.4f}) | test ppl {res['test_ppl']:.3f} "
              f"(loss {res['test_loss']:.4f})")
    else:
        print(f"{args.run_dir} (step {trainer.step}): val acc {res['val_acc']:.4f} | "
              f"test acc {res['test_acc']:.4f}")
    if layers:
        print("Gini by MoE layer: " + ", ".join(f"{g:.3f}" for g in res["gini_by_layer"])
              + f" | dead experts: {res['dead_experts']}")
    return 0


def _cmd_eval_robustness(args: argparse.Namespace) -> int:
    from moelab.robustness import evaluate
    from moelab.robustness.evaluate import parse_attack, parse_corrupt
    from moelab.train.guard import NonFiniteError

    if args.attack is not None and args.corrupt is not None:
        return _fail("give --attack (text) or --corrupt (images), not both")
    if args.baseline is not None and args.corrupt is None:
        return _fail("--baseline is invalid without --corrupt")
    seed = 0 if args.seed is None else args.seed
    try:
        if args.attack is not None:
            rate = parse_attack(args.attack)
            res = evaluate.evaluate_attack(args.run_dir, rate, seed, args.batches,
                                           progress=not args.json)
            text = evaluate.render_attack(res)
        else:
            names, sevs = parse_corrupt(args.corrupt)
            res = evaluate.evaluate_corruptions(args.run_dir, names, sevs, seed,
                                                args.batches, args.baseline,
                                                progress=not args.json)
            text = evaluate.render_corruptions(res)
    except (*USER_ERRORS, NonFiniteError) as e:
        return _fail(_one_line(e))
    print(json.dumps(res) if args.json else text, end="" if not args.json else "\n")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from moelab.analysis.report import make_report

    try:
        md = make_report(args.run_dirs, args.out)
    except USER_ERRORS as e:
        return _fail(_one_line(e))
    print(f"report: {md}")
    return 0


#: How ``moelab reproduce list`` says its GPU-time estimates are made (moelab.experiments.gpu).
GPU_ASSUMPTION = ("LMs: training FLOPs = tokens x (6 x active parameters + 12 x layers x "
                  "d_model x seq) at 150 TFLOP/s for all packed runs together; small image "
                  "models: 4 ms per step; plus 20 s per run; 8 runs at a time")


def _per_run(e, profile: str) -> str:
    from moelab.experiments.suite import format_count

    got = e.items_per_run(profile)
    if got is None:
        return ""
    return f"{format_count(got[0])} {got[1]} per run; "


def _cmd_spectrum(args: argparse.Namespace) -> int:
    from moelab.analysis.spectrum import make_spectrum_report

    if args.tokens < 1:
        return _fail(f"--tokens={args.tokens} is invalid: need at least 1")
    try:
        png, table = make_spectrum_report(args.run_dirs, args.out, at=args.at,
                                          tokens=args.tokens)
    except USER_ERRORS as e:  # NonFiniteError (a diverged run) is a ValueError
        return _fail(_one_line(e))
    print(table)
    print(f"spectrum: {png}")
    return 0


def _print_experiments(exps: Sequence, how: str) -> None:
    from moelab.experiments.gpu import PAPER_ASSUMPTION

    width = max((len(e.name) for e in exps), default=0)
    print(f"experiments ({how} [--profile quick|full|gpu|paper]):")
    for e in exps:
        cost = (f"{_cpu_time(e, 'full')} full, {_cpu_time(e, 'quick')} quick (2 CPU cores)"
                if not e.sources else "analyses " + ", ".join(e.sources))
        gpu = e.profiles.get("gpu")
        pad = f"\n  {'':<{width}}  "
        gpu_line = (f"{pad}gpu: a budget run on one GPU (sized to ~12 min, not to the paper): "
                    f"{_per_run(e, 'gpu')}~{gpu.gpu_minutes / 60:.2f} GPU-hours "
                    f"(~{gpu.gpu_minutes:.0f} min on one H200, packed runs; an estimate: "
                    f"{GPU_ASSUMPTION})") if gpu else ""
        full_size = "" if e.sources else f"; {_per_run(e, 'full').rstrip('; ')}"
        print(f"  {e.name:<{width}}  {e.claim}{pad}paper: {e.paper}{pad}"
              f"CPU time: {cost}{full_size}{gpu_line}{_paper_line(e, pad)}")
    if any("paper" in e.profiles for e in exps):
        print(f"\npaper profiles: GPU-hours are estimates: {PAPER_ASSUMPTION}. On a cluster: "
              "`moelab reproduce NAME --profile paper --dry-run` prints one `moelab launch "
              "--nproc-per-node G train ...` command per run (torchrun, data parallel on G "
              "GPUs); run them on any nodes with the same --out, then `moelab reproduce NAME "
              "--profile paper` with the same --out and --data-dir collects the finished runs "
              "and writes the results. On one machine, `moelab reproduce` trains them itself, "
              "packing as many runs on the GPU as fit (--jobs).")


def _paper_line(e, pad: str) -> str:
    """The list's line for ``e``'s paper profile: runs, tokens per run, GPUs per run,
    GPU-hours, data, or "" without one."""
    from pathlib import Path

    from moelab.experiments.gpu import profile_gpu_hours
    from moelab.experiments.runner import plan_runs, profile_data

    prof = e.profiles.get("paper")
    if prof is None:
        return ""
    if e.sources:
        return f"{pad}paper profile: analyses the paper profiles of {', '.join(e.sources)}"
    at = e.at("paper")
    data = (profile_data(prof.data_dir, None, e.name, "paper", dry_run=True)
            if prof.data_dir else None)
    specs = plan_runs(at, "paper", prof.seeds, Path("."), data)
    hours = profile_gpu_hours(specs, prof.gpus_per_run)
    where = {"cifar10": "CIFAR-10", "wikitext": "WikiText-103", "textfile": "a text file"}
    needs = f"; --data-dir: {where[prof.data_dir]}" if prof.data_dir else ""
    gpus = f"{prof.gpus_per_run} GPU{'s' if prof.gpus_per_run > 1 else ''}"
    lrs = " x lrs" if len(specs) > len(at.arms) * prof.seeds else ""
    h = f"{hours:,.0f}" if hours >= 10 else f"{hours:.1f}"
    return (f"{pad}paper profile (the paper's setting, for a cluster): {len(specs)} runs "
            f"({len(at.arms)} arms x {prof.seeds} seeds{lrs}), {_per_run(at, 'paper')}"
            f"{gpus} per run, ~{h} GPU-hours{needs}")


def _cpu_time(exp, profile: str) -> str:
    """A profile's measured CPU time (``Profile.cpu_minutes``), or "unknown" with its size:
    the number of runs and their steps."""
    from moelab.experiments.runner import plan_runs, resolve_config

    minutes = exp.profile(profile).cpu_minutes
    if minutes is not None:
        return f"~{minutes:.0f} min" if minutes >= 1 else f"~{minutes * 60:.0f} s"
    from pathlib import Path

    try:
        specs = plan_runs(exp, profile, exp.profile(profile).seeds, Path("."), None)
        steps = sorted({resolve_config(s).train.steps for s in specs})
    except ValueError:  # a bad arm: `moelab reproduce` names it
        return "unknown"
    each = f"{steps[0]}" if len(steps) == 1 else f"{steps[0]}-{steps[-1]}"
    return f"unknown ({len(specs)} runs x {each} steps)"


def _cmd_export(args: argparse.Namespace) -> int:
    from moelab.runs.export import export
    from moelab.train.guard import NonFiniteError

    try:
        out = export(args.run_dir, args.out)
    except (*USER_ERRORS, NonFiniteError) as e:
        return _fail(_one_line(e))
    print(f"exported: {out}")
    return 0


def _cmd_reproduce(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from moelab.experiments import EXPERIMENTS, reproduce
    from moelab.experiments.userfile import is_experiment_file, load_experiments

    names = list(args.names)
    if is_experiment_file(names[0]):  # moelab reproduce PATH.py [NAME ...]
        try:
            mine = load_experiments(names[0])
        except USER_ERRORS as e:
            return _fail(_one_line(e))
        if names[1:] == ["list"]:
            _print_experiments(mine, f"moelab reproduce {names[0]} NAME")
            return 0
        import difflib

        defined = [e.name for e in mine]
        for n in names[1:]:
            if (n not in defined and n not in EXPERIMENTS and n not in ("list", "all")
                    and not is_experiment_file(n)):
                close = difflib.get_close_matches(n, defined, n=1)
                hint = f"did you mean {close[0]!r}? " if close else ""
                return _fail(f"{names[0]} defines no experiment {n!r}: {hint}see `moelab "
                             f"reproduce {names[0]} list`")
        names = names[1:] or defined
    if names == ["list"]:
        _print_experiments(list(EXPERIMENTS.values()), "moelab reproduce NAME")
        return 0
    if "list" in names:
        return _fail("'list' takes no other names")
    if any(is_experiment_file(n) for n in names):
        return _fail("give the experiment file first: moelab reproduce PATH.py [NAME ...]")
    if args.seeds is not None and args.seeds < 1:
        return _fail(f"--seeds={args.seeds} is invalid: need >= 1")
    if args.jobs is not None and args.jobs < 1:
        return _fail(f"--jobs={args.jobs} is invalid: need >= 1")
    from moelab.experiments.runner import BadArmsError
    from moelab.experiments.suite import RunsFailedError

    failed = None
    try:
        reproduce(names, profile=args.profile, seeds=args.seeds, jobs=args.jobs,
                  out=args.out, data_dir=args.data_dir, command=["moelab", *argv],
                  device=args.device, precision=args.precision, compile=args.compile,
                  dry_run=args.dry_run)
    except RunsFailedError as e:
        failed = str(e)
    except BadArmsError as e:  # nothing trained: one line per bad arm
        for line in e.lines:
            _fail(line)
        return 2
    except USER_ERRORS as e:
        return _fail(_one_line(e))
    except KeyboardInterrupt:
        print("\nmoelab: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    if failed:  # reproduce() printed each experiment's verdicts and results path
        print(f"moelab reproduce: {failed}", file=sys.stderr)
        return 1
    return 0


def _cmd_configs(args: argparse.Namespace) -> int:
    from moelab.config import dump_toml_all, load_config, shipped_configs

    try:
        if args.name is not None:  # every key: the unset ones as comments
            print(dump_toml_all(load_config(args.name, args.overrides)), end="")
            return 0
        configs = shipped_configs()
    except USER_ERRORS as e:
        return _fail(_one_line(e))
    width = max(map(len, configs), default=0)
    print("shipped configs (moelab train --config NAME; moelab configs NAME prints one):")
    for name, desc in configs.items():
        print(f"  {name:<{width}}  {desc}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``moelab`` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["launch"]:  # torchrun's options: parsed by torchrun's own parser
        from moelab.distributed.launch import main as launch

        return launch(argv[1:])
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version, usage errors
        return int(e.code or 0) if not isinstance(e.code, str) else 2
    if args.command is None:
        parser.print_help()
        return 2
    try:
        if args.command == "train":
            return _cmd_train(args, argv)
        if args.command == "eval":
            return _cmd_eval(args)
        if args.command == "report":
            return _cmd_report(args)
        if args.command == "spectrum":
            return _cmd_spectrum(args)
        if args.command == "reproduce":
            return _cmd_reproduce(args, argv)
        if args.command == "export":
            return _cmd_export(args)
        return _cmd_configs(args)
    except KeyboardInterrupt:  # Ctrl-C outside a training loop: no traceback
        print(f"\nmoelab: {args.command} interrupted", file=sys.stderr)
        return 130
    finally:
        _close_process_group()


def _close_process_group() -> None:
    """Tear down torchrun's process group before the interpreter exits: a gloo group left
    alive to interpreter shutdown sometimes aborted a rank at exit ("terminate called without
    an active exception") after the run had finished."""
    dist = sys.modules.get("torch.distributed")  # not imported: no group to close
    if dist is not None and dist.is_available() and dist.is_initialized():
        gc.collect()  # a finished Trainer sits in reference cycles, still holding tensors
        dist.destroy_process_group()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
