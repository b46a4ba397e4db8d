"""One worker process that dies fails only its own run (issue 36): the runs its death
interrupted are retried, each in a pool of its own."""

import os
import time

from moelab.experiments.runner import RunOutcome, RunSpec, execute_runs


def _kill_or_finish(spec: RunSpec, command) -> RunOutcome:
    """Spawned-worker stand-in for execute_run: the 'killer' arm kills its process (an OOM
    kill), the others finish after a moment (so the kill lands while they are in the pool)."""
    if spec.arm == "killer":
        os._exit(9)
    time.sleep(0.3)
    return RunOutcome(spec, "done")


def test_a_dead_worker_fails_only_its_own_run(tmp_path):
    specs = [RunSpec("t", arm, 0, None, "default", (), str(tmp_path / arm))
             for arm in ("killer", "a")]
    outs = execute_runs(specs, jobs=2, progress=False, worker=_kill_or_finish)
    assert [o.status for o in outs] == ["failed", "done"]
    assert "worker process died" in outs[0].error
    assert (tmp_path / "killer" / "reproduce.json").is_file()
