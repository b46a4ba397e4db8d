"""``moelab launch``: torchrun for moelab, with a clean Ctrl-C.

    moelab launch --nproc-per-node 2 train --set train.parallel=fsdp
    = torchrun --standalone --nproc-per-node 2 -m moelab train --set train.parallel=fsdp

The options before the moelab command (``train`` or ``eval``) are torchrun's own, parsed by
torchrun's parser (``--standalone`` is added when no rendezvous is given). Why a launcher of
our own: on Ctrl-C (SIGINT to the terminal's process group) or SIGTERM, torchrun's agent
raises ``SignalException`` in itself, forwards the signal to the workers (they finish the
step, save and exit 130 / 143) and then dies with that exception's traceback and status 1.
The agent's handler lives in the agent's process, out of the workers' reach; here it is
caught and the launcher exits 128 + the signal's number, as one process does. It also:

- forwards a second signal to the workers (torchrun's agent swallows it), so a second Ctrl-C
  aborts them at once, as on one process;
- waits ``--shutdown-timeout`` seconds (default here 600, torchrun's own 30) for the workers
  to save before it kills them;
- records itself in ``command.txt`` (``MOELAB_LAUNCH`` in the workers' environment), so the
  recorded line is the command that was run.

A worker that fails with a status (2: a bad input, already explained by the worker) makes
the launcher exit with that status.
"""

from __future__ import annotations

import logging
import os
import shlex
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

__all__ = ["COMMANDS", "LAUNCH_ENV", "launch_command", "main", "split_argv"]

COMMANDS = ("train", "eval")  # the moelab commands that run on several processes
LAUNCH_ENV = "MOELAB_LAUNCH"  # the launcher's own command line, up to the moelab command
# torchrun options that name a rendezvous (without one, --standalone is added)
_RENDEZVOUS = ("--standalone", "--rdzv-endpoint", "--rdzv_endpoint", "--rdzv-backend",
               "--rdzv_backend", "--master-addr", "--master_addr", "--nnodes")
SHUTDOWN_TIMEOUT_S = 600

USAGE = """\
usage: moelab launch [TORCHRUN OPTIONS] train|eval [ARGS ...]

Run a moelab command on several processes: torchrun (its options, e.g. --nproc-per-node N;
--standalone unless a rendezvous is given) with a clean stop. Ctrl-C or SIGTERM: the
workers finish the step, save and print the resume command; the launcher exits 130 / 143
without a traceback (plain torchrun ends in its agent's SignalException and status 1).
A second Ctrl-C aborts the workers at once. Default --shutdown-timeout: 600 s.

examples:
  moelab launch --nproc-per-node 2 train --set train.parallel=fsdp --out runs/fsdp
  moelab launch --nproc-per-node 2 train --resume runs/fsdp
"""


def split_argv(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """``argv`` -> (torchrun options, the moelab command and its arguments); ValueError
    without a moelab command."""
    for i, a in enumerate(argv):
        if a in COMMANDS:
            return list(argv[:i]), list(argv[i:])
    raise ValueError("no moelab command to launch: give train or eval after the torchrun "
                     "options, e.g. moelab launch --nproc-per-node 2 train")


def launch_command(command: Sequence[str], world_size: int) -> list[str]:
    """What a worker records in ``command.txt`` for ``command`` (``["moelab", "train", ...]``):
    the launcher's own line (``MOELAB_LAUNCH``) or a torchrun line that runs as written (one
    node: --standalone; several: the rendezvous endpoint is a placeholder to fill in)."""
    launcher = os.environ.get(LAUNCH_ENV)
    if launcher:
        return [*shlex.split(launcher), *command[1:]]
    local = os.environ.get("LOCAL_WORLD_SIZE", str(world_size))
    nodes = max(1, world_size // max(1, int(local)))
    if nodes == 1:
        return ["torchrun", "--standalone", "--nproc_per_node", local, "-m", *command]
    return ["torchrun", "--nnodes", str(nodes), "--nproc_per_node", local, "--rdzv_backend",
            "c10d", "--rdzv_endpoint", "HOST:PORT", "-m", *command]


def _child_pids() -> list[int]:
    """This process's children (the workers), from /proc; empty where there is none."""
    me, out = os.getpid(), []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == me:
            out.append(int(stat.parent.name))
    return out


class _Signals:
    """SIGINT / SIGTERM in the launcher: the first raises torchrun's SignalException (its
    agent then forwards the signal to the workers and waits for them); a later one is
    forwarded to the workers by us (the agent, busy waiting, would drop it)."""

    def __init__(self) -> None:
        self.first: signal.Signals | None = None

    def handle(self, signum: int, frame: FrameType | None) -> None:
        from torch.distributed.elastic.multiprocessing.api import SignalException

        sig = signal.Signals(signum)
        if self.first is None:
            self.first = sig
            logging.disable(logging.WARNING)  # the agent's "death signal" chatter
            raise SignalException(f"moelab launch got {sig.name}", sigval=sig)
        for pid in _child_pids():  # each worker leads its own process group
            try:
                os.killpg(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass


def main(argv: Sequence[str]) -> int:
    """``moelab launch ARGS``; returns the exit status."""
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE, end="")
        return 0 if argv else 2
    try:
        opts, command = split_argv(argv)
    except ValueError as e:
        print(f"moelab launch: error: {e}", file=sys.stderr)
        return 2
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    rendezvous = any(o.split("=")[0] in _RENDEZVOUS for o in opts)
    full = [*([] if rendezvous else ["--standalone"]), *opts]
    try:
        args = torchrun.parse_args([*full, "-m", "moelab", *command])
    except SystemExit as e:  # argparse: a bad torchrun option (it printed why)
        return int(e.code) if isinstance(e.code, int) else 2
    if args.shutdown_timeout is None and "TORCH_ELASTIC_SHUTDOWN_TIMEOUT" not in os.environ:
        args.shutdown_timeout = SHUTDOWN_TIMEOUT_S
    args.signals_to_handle = "SIGHUP,SIGQUIT"  # SIGINT / SIGTERM: ours, installed below
    before = os.environ.get(LAUNCH_ENV)
    os.environ[LAUNCH_ENV] = shlex.join(["moelab", "launch", *full])  # the workers inherit it
    handler = _Signals()
    previous = {s: signal.signal(s, handler.handle) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        torchrun.run(args)
    except SignalException as e:
        return 128 + int(e.sigval)
    except ChildFailedError as e:
        _, first = e.get_first_failure()
        code = first.exitcode
        if handler.first is not None:
            return 128 + int(handler.first)
        if code not in (2, 130, 143):  # 2: the worker explained it; 130/143: it stopped
            print(e.format_msg(), file=sys.stderr)
        return code if 0 < code < 256 else 1
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        logging.disable(logging.NOTSET)
        if before is None:
            os.environ.pop(LAUNCH_ENV, None)
        else:
            os.environ[LAUNCH_ENV] = before
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main(sys.argv[1:]))
