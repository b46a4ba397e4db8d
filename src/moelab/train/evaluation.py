"""Evaluation of a run's model: the batches of a split, the loss / perplexity / accuracy, the
per-MoE-layer routing metrics accumulated over the whole evaluation, and the numbers of the
final summary.

    ev = evaluate(model, data, "val", batch_size=32, seq_len=128, device=dev, loss_fn=loss)
    ev["val_ppl"], ev["layers"][0]["gini"]

LM splits are read as contiguous non-overlapping windows (``moelab.data.EvalWindows``: every
target scored once, in order); image splits in order, normalised with the train split's
statistics. ``max_batches`` evaluates only the first batches (the periodic evaluations'
``data.eval_batches``).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from moelab.analysis.metrics import LayerAccumulator
from moelab.data import EvalWindows, RunData, iter_image_batches
from moelab.distributed.fsdp import reshard
from moelab.train.guard import NonFiniteError
from moelab.train.precision import autocast
from moelab.train.progress import EvalProgress

__all__ = ["EvalInterrupted", "evaluate", "eval_batches", "excitation_summary",
           "final_summary", "n_eval_batches"]

#: (logits, targets, reduction) -> loss; the Trainer's task loss.
LossFn = Callable[..., Tensor]


class EvalInterrupted(Exception):
    """``should_stop`` asked :func:`evaluate` to stop between two batches."""


def eval_batches(data: RunData, split: str, batch_size: int, seq_len: int,
                 max_batches: int | None = None) -> Iterator[tuple[Tensor, Tensor]]:
    """The ``(inputs, targets)`` batches of ``split``, in order: LM windows ``[b, S]`` each,
    or normalised images ``[b, C, H, W]`` and labels ``[b]``; at most ``max_batches``."""
    if data.is_lm:
        it = iter(EvalWindows(data.tokens[split], batch_size, seq_len))
    else:
        imgs = data.images[split]
        it = iter_image_batches(imgs.x, imgs.y, batch_size, data.mean, data.std)
    for i, batch in enumerate(it):
        if max_batches is not None and i >= max_batches:
            break
        yield batch


def n_eval_batches(data: RunData, split: str, batch_size: int, seq_len: int,
                   max_batches: int | None = None) -> int:
    """How many batches :func:`eval_batches` yields."""
    if data.is_lm:
        n = len(EvalWindows(data.tokens[split], batch_size, seq_len))
    else:
        n = -(-data.images[split].x.shape[0] // batch_size)
    return n if max_batches is None else min(n, max_batches)


@torch.no_grad()
def evaluate(model: nn.Module, data: RunData, split: str, *, batch_size: int, seq_len: int,
             device: torch.device, loss_fn: LossFn, max_batches: int | None = None,
             routing: bool = True, progress: bool = False,
             should_stop: Callable[[], bool] | None = None,
             layer_blocks: list[int] | None = None, step: int | None = None,
             run_dir: object = None, precision: str = "fp32") -> dict[str, Any]:
    """Loss and perplexity (LM) or accuracy of ``model`` on ``split`` ("val" | "test"), plus,
    with ``routing``, one metrics dict per MoE layer under ``layers`` (``moelab.analysis.metrics``
    ``layer_metrics`` over the counts of the whole evaluation, expert output norms on;
    ``layer_blocks[i]``: the block index of MoE layer i).

    Keys: ``{split}_loss``, ``{split}_ppl`` (LM) or ``{split}_acc``, ``{split}_items``
    (tokens or images scored), ``layers``. ``progress``: an EvalProgress bar / lines.
    ``should_stop`` is asked before each batch; True raises :class:`EvalInterrupted`. A NaN
    or infinite loss raises NonFiniteError (naming ``step`` and ``run_dir`` when given).
    ``precision``: the run's (``moelab.train.precision``); "bf16" runs the forward under autocast.
    The model's train/eval mode is restored afterwards.
    """
    if split not in ("val", "test"):
        raise ValueError(f"split={split!r} is invalid: choose 'val' or 'test'")
    bar = EvalProgress(split, n_eval_batches(data, split, batch_size, seq_len, max_batches),
                       enabled=progress)
    was_training = model.training
    model.eval()
    layers = model.moe_layers() if routing else []
    if routing:
        model.set_track_out_norm(True)
    acc = [LayerAccumulator() for _ in layers]
    loss_sum, n_items, correct = 0.0, 0, 0
    try:
        with eager_if_compiled():
            loss_sum, n_items, correct = _run_batches(
                model, data, split, batch_size, seq_len, device, loss_fn, max_batches,
                should_stop, precision, layers, acc, bar)
    finally:
        bar.close()
        if routing:
            model.set_track_out_norm(False)
        model.train(was_training)
        reshard(model)  # FSDP: the parameters the optimizer holds, not gathered copies
    return _results(split, loss_sum, n_items, correct, data.is_lm, acc if routing else None,
                    layer_blocks or [], step, run_dir)


def eager_if_compiled() -> contextlib.AbstractContextManager:
    """Compiled blocks run eagerly inside (``torch.compiler.set_stance("force_eager")``; a
    no-op in torch without it). An evaluation differs from a training step in every guard of
    a compiled block (grad mode, ``training``, output norms tracked), so a compiled evaluation
    would compile each block again; evaluations are a small share of a run's forwards, and
    eager blocks compute the same values."""
    stance = getattr(torch.compiler, "set_stance", None)
    return stance("force_eager") if stance is not None else contextlib.nullcontext()


def _run_batches(model: nn.Module, data: RunData, split: str, batch_size: int, seq_len: int,
                 device: torch.device, loss_fn: LossFn, max_batches: int | None,
                 should_stop: Callable[[], bool] | None, precision: str, layers: list,
                 acc: list[LayerAccumulator], bar: EvalProgress) -> tuple[float, int, int]:
    """The evaluation loop of :func:`evaluate`: (loss sum, items, correct)."""
    loss_sum, n_items, correct = 0.0, 0, 0
    for b, (x, y) in enumerate(eval_batches(data, split, batch_size, seq_len, max_batches)):
        if should_stop is not None and should_stop():
            raise EvalInterrupted
        x, y = x.to(device), y.to(device)
        with autocast(precision, device):
            out = model(x)
            loss_sum += float(loss_fn(out.logits, y, reduction="sum"))
        if not math.isfinite(loss_sum):  # before the routing metrics see NaNs
            break
        n_items += y.numel()
        if not data.is_lm:
            correct += int((out.logits.argmax(-1) == y).sum())
        for i, layer in enumerate(layers):
            losses = out.moe_losses[i] if i < len(out.moe_losses) else None
            acc[i].add(layer.last_stats, losses)
        bar.update(b + 1)
    return loss_sum, n_items, correct


def _results(split: str, loss_sum: float, n_items: int, correct: int, is_lm: bool,
             acc: list[LayerAccumulator] | None, blocks: list[int], step: int | None,
             run_dir: object) -> dict[str, Any]:
    if not math.isfinite(loss_sum):
        loss = loss_sum
    elif n_items == 0:
        raise ValueError(f"the {split} split gave no evaluation batch")
    else:
        loss = loss_sum / n_items
    if not math.isfinite(loss):
        at = "" if step is None else f" at step {step}"
        model = "the model" if run_dir is None else f"the model in {run_dir}"
        raise NonFiniteError(
            f"evaluation on the {split} split{at} gave a {loss} loss: {model} has diverged or "
            "overflows; train it again with a smaller optim.lr (routing metrics need finite "
            "outputs)")
    res: dict[str, Any] = {f"{split}_loss": loss}
    if is_lm:
        res[f"{split}_ppl"] = math.exp(min(loss, 700.0))
    else:
        res[f"{split}_acc"] = correct / n_items
    res[f"{split}_items"] = n_items
    if acc is not None:
        res["layers"] = [{"layer": i, "block": blocks[i] if i < len(blocks) else None,
                          **a.metrics()} for i, a in enumerate(acc)]
    return res


def excitation_summary(excitation: Any) -> dict[str, Any] | None:
    """{layer: {multipliers, min, max, std}} of Excitation's last step (None: off or no step
    yet)."""
    mult = excitation.last_multipliers if excitation is not None else None
    if not mult:
        return None
    out = {}
    for name, phi in mult.items():
        v = phi.detach().double().cpu()
        out[name] = {"multipliers": v.tolist(), "min": float(v.min()), "max": float(v.max()),
                     "std": float(v.std(unbiased=False))}
    return out


def final_summary(run: dict[str, Any], val: dict[str, Any], test: dict[str, Any],
                  throughput: dict[str, Any]) -> dict[str, Any]:
    """The ``final`` record of a run: ``run`` (step, name, ...), the validation numbers, the
    test numbers, ``throughput``, then the validation ``layers`` summarised as ``gini_mean``
    (mean Gini over the MoE layers) and ``dead_experts`` (their sum)."""
    summary = {"kind": "final", **run, **{k: v for k, v in val.items() if k != "layers"},
               **test, **throughput}
    layers = val.get("layers", [])
    if layers:
        summary["gini_mean"] = sum(x["gini"] for x in layers) / len(layers)
        summary["dead_experts"] = sum(x["dead"] for x in layers)
    return summary
