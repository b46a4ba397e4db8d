"""Throughput of the whole Trainer loop (data, step, logging, callbacks) on a short run, as
one JSON line: what ``benchmarks.train_step`` leaves out. For before / after comparisons:

    python -m benchmarks.compare_revisions BEFORE -- python -m benchmarks.trainer_run --steps 60
    python -m benchmarks.trainer_run --config default --steps 60 --set train.threads=2

Prints ``{"tokens_per_s" (or "images_per_s"), "train_time_s", "steps", "final_loss"}`` of a
run of ``--steps`` steps without evaluations, in a temporary run directory.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="default")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   metavar="KEY=VALUE")
    args = p.parse_args(argv)
    from moelab.config import load_config
    from moelab.runs.directory import read_metrics
    from moelab.train.trainer import Trainer

    cfg = load_config(args.config, [f"train.steps={args.steps}", "train.eval_every=0",
                                    f"train.log_every={args.steps}", "data.final_eval_batches=1",
                                    *args.overrides])
    with tempfile.TemporaryDirectory(prefix="moelab-trainer-run-") as tmp:
        summary = Trainer(cfg, Path(tmp) / "run", quiet=True).fit()
        last = [e for e in read_metrics(Path(tmp) / "run") if e["kind"] == "train"][-1]
    unit = "tokens_per_s" if "tokens_per_s" in summary else "images_per_s"
    out = {unit: summary[unit], "train_time_s": summary["train_time_s"],
           "steps": summary["step"], "final_loss": last["loss"]}
    print(json.dumps(out), flush=True)
    return out


if __name__ == "__main__":
    main()
