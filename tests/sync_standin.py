"""Print the would-sync ops (``sync_count.WouldSync``) of one unlogged training step of the tiny
LM (2 MoE layers; Default MoE, heavy ball, fused AdamW): one process in bf16, fp32 and tf32
(TF32 has fp32 operands: fp32's path; the Trainer is let run it on CPU), dropless, with a
capacity (fp32 / tf32: the padded path) and with ``dispatch=padded``; DDP+EP and FSDP+EP on 2
gloo ranks in bf16, dropless and with a capacity (padded slots, equal splits); with CUDA's
dispatch policy forced on CPU (what tests/test_sync_free.py asserts).

    PYTHONPATH=src python tests/sync_standin.py            # this tree
    PYTHONPATH=/old/src python tests/sync_standin.py before  # a tree from before issue 35:
        # CUDA's "auto" picked grouped GEMM in every dtype there, so dispatch=grouped_mm
"""

import pathlib
import sys
import tempfile

sys.path.insert(0, str(pathlib.Path(__file__).parent))

import test_sync_free  # noqa: E402
import torch  # noqa: E402
from test_distributed import spawn  # noqa: E402
from test_train import tiny  # noqa: E402

import moelab.moe.dispatch as dispatch  # noqa: E402
import moelab.train.trainer as trainer_module  # noqa: E402

BEFORE = sys.argv[1:] == ["before"]
STEP = (*test_sync_free.STEP, *(["model.moe.dispatch=grouped_mm"] if BEFORE else []))
CAPACITY = "model.moe.capacity_factor=1.25"


def cuda_policy() -> None:
    if not BEFORE:
        dispatch.backend_policy = lambda device_type: "cuda"
    torch.cuda.is_available = lambda: False
    trainer_module.resolve_precision = lambda name, device: name  # tf32 on CPU


def one(precision: str, extra: tuple[str, ...] = ()) -> dict:
    from moelab.train.trainer import Trainer

    with tempfile.TemporaryDirectory() as d:
        tr = Trainer(tiny(*STEP, f"train.precision={precision}", *extra),
                     pathlib.Path(d) / "run", quiet=True)
        return dict(test_sync_free.counted_step(tr))


def _worker(rank: int, world: int, run_dir: str, parallel: str, extra: tuple[str, ...]) -> None:
    cuda_policy()
    calls = one("bf16", ("train.expert_parallel=2", f"train.parallel={parallel}", *extra))
    if rank == 0:
        what = " ".join(e.removeprefix("model.moe.") for e in extra) or "dropless"
        print(f"{parallel}+EP bf16 {what}, 2 ranks: {sum(calls.values())} {calls}", flush=True)


if __name__ == "__main__":
    cuda_policy()
    cases = [("bf16", ()), ("fp32", ()), ("tf32", ())]
    if not BEFORE:
        cases += [("bf16", (CAPACITY,)), ("fp32", (CAPACITY,)), ("tf32", (CAPACITY,)),
                  ("fp32", ("model.moe.dispatch=padded",)),
                  ("tf32", ("model.moe.dispatch=padded",))]
    for precision, extra in cases:
        calls = one(precision, extra)
        what = " ".join(e.removeprefix("model.moe.") for e in extra) or "dropless"
        print(f"1 process {precision} {what}: {sum(calls.values())} {calls}", flush=True)
    for extra in [()] + ([] if BEFORE else [(CAPACITY,)]):
        for parallel in ("ddp", "fsdp"):
            with tempfile.TemporaryDirectory() as d:
                spawn(2, pathlib.Path(d), _worker, f"{d}/run", parallel, extra)
