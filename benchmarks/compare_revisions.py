"""Before / after: one benchmark command at two revisions of moelab, interleaved in one run.

    python -m benchmarks.compare_revisions BEFORE [AFTER] [--rounds 5] -- COMMAND...
    python -m benchmarks.compare_revisions HEAD~3 -- python -m benchmarks.dispatch --reps 5

BEFORE / AFTER: git revisions (AFTER defaults to ``WORKTREE``: this checkout as it is,
uncommitted changes included). Each revision is checked out into a temporary git worktree;
COMMAND runs there (working directory = that checkout, ``PYTHONPATH`` = its ``src`` and root,
so ``python -m benchmarks.X`` and ``import moelab`` are that revision's). Rounds alternate the
order (A B, B A, A B, ...) so slow drift of a noisy machine hits both alike.

What is compared, per round: the command's wall time and every number it reports: the JSON
file it writes to ``{out}`` (a placeholder in COMMAND replaced by a fresh path per run), else
every JSON object it prints on a line of its own. Numbers are matched by their path
(``rows.default.moelab_ms``, ``[0].moelab_ms``); the table gives each one's median per
revision and the ratio AFTER / BEFORE. ``--out FILE`` writes it all as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

WORKTREE = "WORKTREE"
ROOT = Path(__file__).resolve().parents[1]


def numbers(value: Any, prefix: str = "") -> Iterator[tuple[str, float]]:
    """Every int / float leaf of a JSON value, with its path (``a.b[2].c``); bools skipped."""
    if isinstance(value, bool):
        return
    if isinstance(value, (int, float)):
        yield prefix, float(value)
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from numbers(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from numbers(v, f"{prefix}[{i}]")


def printed_json(stdout: str) -> list[Any]:
    """The JSON objects printed one per line in ``stdout``."""
    found = []
    for line in stdout.splitlines():
        line = line.strip()
        if line.startswith("{"):
            try:
                found.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return found


def checkout(rev: str, into: Path) -> Path:
    """The directory holding ``rev``: this checkout for WORKTREE, else a detached worktree."""
    if rev == WORKTREE:
        return ROOT
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-f", str(into), rev],
                   check=True, capture_output=True, text=True)
    return into


def run_once(where: Path, command: list[str], out_file: Path) -> tuple[float, dict[str, float]]:
    """Run ``command`` in ``where``; returns (wall seconds, its numbers by path)."""
    cmd = [part.replace("{out}", str(out_file)) for part in command]
    env = {**os.environ,
           "PYTHONPATH": os.pathsep.join([str(where / "src"), str(where),
                                          os.environ.get("PYTHONPATH", "")])}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=where, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"compare_revisions: {' '.join(cmd)} failed in {where} "
                         f"(exit {proc.returncode}):\n{proc.stderr[-2000:]}")
    if out_file.is_file():
        value: Any = json.loads(out_file.read_text())
    else:
        value = printed_json(proc.stdout)
        value = value[0] if len(value) == 1 else value
    return wall, dict(numbers(value))


def compare(revs: tuple[str, str], command: list[str], rounds: int) -> dict[str, Any]:
    """Run ``command`` ``rounds`` times at each revision, alternating; medians and ratios."""
    samples: dict[str, list[dict[str, float]]] = {r: [] for r in revs}
    with tempfile.TemporaryDirectory(prefix="moelab-compare-") as tmp:
        dirs = {rev: checkout(rev, Path(tmp) / f"rev{i}") for i, rev in enumerate(revs)}
        try:
            for r in range(rounds):
                order = revs if r % 2 == 0 else revs[::-1]
                for rev in order:
                    out_file = Path(tmp) / f"out-{r}-{revs.index(rev)}.json"
                    wall, nums = run_once(dirs[rev], command, out_file)
                    samples[rev].append({"wall_s": wall, **nums})
                    print(f"round {r + 1}/{rounds} {rev}: {wall:.1f} s", file=sys.stderr,
                          flush=True)
        finally:
            for d in dirs.values():
                if d != ROOT:
                    subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force",
                                    str(d)], capture_output=True)
    before, after = revs
    rows = {}
    for key in samples[before][0]:
        a = [s[key] for s in samples[before] if key in s]
        b = [s[key] for s in samples[after] if key in s]
        if len(a) == len(b) == rounds:
            ma, mb = statistics.median(a), statistics.median(b)
            rows[key] = {"before": ma, "after": mb, "ratio": mb / ma if ma else None}
    return {"before": before, "after": after, "command": command, "rounds": rounds,
            "rows": rows, "samples": samples}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = list(sys.argv[1:] if argv is None else argv)
    if "--" not in args:
        raise SystemExit("usage: python -m benchmarks.compare_revisions BEFORE [AFTER] "
                         "[--rounds N] [--out FILE] -- COMMAND...")
    split = args.index("--")
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("before")
    p.add_argument("after", nargs="?", default=WORKTREE)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--out", help="also write the comparison as JSON here")
    opts = p.parse_args(args[:split])
    command = args[split + 1:]
    if not command or opts.rounds < 1:
        raise SystemExit("compare_revisions: need a COMMAND after -- and --rounds >= 1")
    result = compare((opts.before, opts.after), command, opts.rounds)
    print(f"{'number':<48} {'before':>12} {'after':>12} {'after/before':>13}")
    for key, row in result["rows"].items():
        ratio = "" if row["ratio"] is None else f"{row['ratio']:.3f}"
        print(f"{key:<48} {row['before']:>12.4g} {row['after']:>12.4g} {ratio:>13}")
    if opts.out:
        Path(opts.out).parent.mkdir(parents=True, exist_ok=True)
        Path(opts.out).write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
