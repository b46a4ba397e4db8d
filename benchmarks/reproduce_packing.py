"""Runs per hour of ``moelab reproduce`` on one GPU with N runs packed at once (N worker
processes sharing the GPU), for N = 1, 2, 4, 8: what ``--jobs`` buys.

    python -m benchmarks.reproduce_packing                      # default-moe-speed's gpu runs
    python -m benchmarks.reproduce_packing --experiment momentum-depth --steps 100 --out r.json
    python -m benchmarks.reproduce_packing --device cpu --profile gpu-smoke --runs 2 --jobs 1 2

Each N trains the same ``--runs`` runs of the experiment's ``gpu`` profile, shortened to
``--steps`` steps, from scratch in a fresh folder, and reports their wall time and runs/hour
(with ``--steps`` steps; a full run's share of start-up is smaller). The memory-based choice
``moelab reproduce`` makes on its own is printed beside.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--experiment", default="default-moe-speed")
    p.add_argument("--profile", default="gpu", choices=["gpu", "gpu-smoke"],
                   help="gpu-smoke: the tiny CI variant, to check this script on CPU")
    p.add_argument("--device", default="cuda")
    p.add_argument("--runs", type=int, default=8)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--jobs", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--out", default=None, help="also write the result as JSON here")
    args = p.parse_args(argv)
    import torch

    from moelab.experiments import EXPERIMENTS
    from moelab.experiments import keys as K
    from moelab.experiments.keys import kv
    from moelab.experiments.runner import (
        choose_image_data,
        execute_runs,
        plan_runs,
        with_threads,
    )

    exp = EXPERIMENTS[args.experiment].at(args.profile)
    data = choose_image_data(None, prefer=exp.image_datasets) if exp.image_datasets else None
    extra = (kv(K.DEVICE, args.device), kv(K.STEPS, args.steps))
    auto_jobs = None
    if args.device.startswith("cuda"):  # what moelab reproduce would choose on its own
        from moelab.experiments.suite import _gpu_jobs

        with tempfile.TemporaryDirectory(prefix="moelab-packing-") as tmp:
            probe = plan_runs(exp, args.profile, args.runs, Path(tmp), data, extra=extra)
            auto_jobs = _gpu_jobs(probe[:args.runs], args.device, progress=True)
    rows = []
    for jobs in args.jobs:
        with tempfile.TemporaryDirectory(prefix="moelab-packing-") as tmp:
            specs = plan_runs(exp, args.profile, args.runs, Path(tmp), data, extra=extra)
            specs = specs[:args.runs]
            threads = max(1, (os.cpu_count() or 1) // jobs)
            specs = [with_threads(s, threads) for s in specs]
            t0 = time.perf_counter()
            outcomes = execute_runs(specs, jobs=jobs, progress=False)
            wall = time.perf_counter() - t0
        failed = [o.spec.label for o in outcomes if not o.ok]
        row = {"jobs": jobs, "runs": len(specs), "steps": args.steps, "wall_s": round(wall, 1),
               "runs_per_hour": round(len(specs) / wall * 3600, 1), "failed": failed}
        rows.append(row)
        print(json.dumps(row), flush=True)
    result = {"command": "python -m benchmarks.reproduce_packing " + " ".join(argv or []),
              "experiment": args.experiment, "profile": args.profile, "device": args.device,
              "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
              "auto_jobs": auto_jobs, "torch": torch.__version__, "machine": platform.platform(),
              "rows": rows}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
