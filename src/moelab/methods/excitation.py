"""Excitation (Shaier, "Excitation: Momentum For Experts", arXiv 2602.21798, 2026).

An optimizer wrapper. The base optimizer (SGD, momentum, Adam, AdamW, ...) computes its update
δ_k for the parameters of expert k (weight decay included); the applied update is
``Δθ_k = Φ_k · δ_k`` with Φ_k a multiplier from expert k's batch-level utilization. Routers,
attention, embeddings and dense layers keep Φ = 1 and move exactly as with the bare optimizer.
No per-parameter state is kept between steps.

Utilization, per MoE layer and optimizer step: ``u_k = n_k / (T·K) = n_k / sum_j n_j``, n_k the
number of top-K assignments (chosen by the router, before any capacity drop) to expert k over
every training-mode forward since the previous step (all micro-batches of gradient accumulation,
all data-parallel ranks when ``all_reduce_counts`` is set, as the Trainer does under torchrun).
Strategies (γ >= 0):

    zero_sum      Φ_k = u_k^γ / mean_j(u_j^γ)            (mean Φ = 1 per layer)
    positive_sum  Φ_k = max(1, Φ_ZS,k)                     (never suppresses)
    negative_sum  Φ_k = min(1, Φ_ZS,k)                     (never amplifies)
  Ablations, built on the multipliers Φ^b of ``ablation_base`` (one of the three above):
    inverted      the multipliers Φ^b sorted by utilization and handed out in reverse rank:
                  the i-th least used expert gets the i-th largest multiplier (ties between
                  equal utilizations broken by expert index)
    random        Φ^b permuted across the layer's experts by a fresh uniformly random
                  permutation per layer and step, from a seeded CPU ``torch.Generator``
    global        every expert gets mean_j Φ^b_j (plain learning-rate scaling of the experts;
                  with ablation_base="zero_sum" this mean is exactly 1, i.e. the base optimizer)

Expert-choice routing (``MoEConfig.routing="expert_choice"``): every expert takes exactly the
same number of tokens, so u_k = 1/E for all k and Φ ≡ 1 under every strategy: the wrapper is a
no-op there, and says so once (a UserWarning) when it finds such a layer.

Edge cases: 0^γ is 0 for γ > 0 (an expert with no tokens gets Φ = 0 under zero_sum and does not
move, whatever momentum the base optimizer carries) and 1 for γ = 0 (γ = 0 gives Φ ≡ 1, and the
wrapper then leaves the base step bit-identical). A layer with no counted forward since the last
step (or zero assignments in total) gets Φ ≡ 1: its experts take the plain base update.

Example — a moelab model (every ``moelab.moe.MoELayer`` inside ``model`` is found)::

    opt = torch.optim.AdamW(model.parameters(), lr=3e-4)
    exc = Excitation(opt, model, strategy="positive_sum", gamma=1.0)  # hooks onto opt
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=1000)
    for batch in loader:
        loss = model(batch).loss
        loss.backward()
        opt.step(); opt.zero_grad(); sched.step()     # or exc.step() / exc.zero_grad()
    exc.last_multipliers    # {layer name: Φ [E]} of the last step, for logging

Example — your own MoE, experts as an ``nn.ModuleList`` (or batched ``[E, ...]`` weights)::

    class MyMoE(nn.Module):
        def __init__(self, d, n_experts):
            super().__init__()
            self.gate = nn.Linear(d, n_experts)
            self.experts = nn.ModuleList(nn.Linear(d, d) for _ in range(n_experts))
            self.counts = torch.zeros(n_experts)   # you fill it: assignments since last step

    moe = MyMoE(16, 4)
    exc = Excitation(torch.optim.SGD(moe.parameters(), lr=0.1), strategy="zero_sum")
    exc.add_expert_group(params_per_expert=[list(e.parameters()) for e in moe.experts],
                         token_counts=lambda: moe.counts, name="my_moe")
    # or: exc.add_expert_group(batched_params=[w_EDF, w_EFD], token_counts=...)

``token_counts`` is called once per ``step()`` (before the base step) and returns the [E]
assignment counts since the previous step, or None for "no forward" (Φ ≡ 1); resetting your
counter after the step is up to you. Or leave ``token_counts`` out and report each forward's
counts with ``exc.record_counts("my_moe", counts_E)``: they are summed until the next step and
then reset, as for moelab's own layers.
"""

from __future__ import annotations

import functools
import math
import warnings
import weakref
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.optim import Optimizer

from moelab.moe.dtensor import is_dtensor, local
from moelab.moe.layer import MoELayer
from moelab.validation import require

BASE_STRATEGIES = ("zero_sum", "positive_sum", "negative_sum")
ABLATIONS = ("inverted", "random", "global")
STRATEGIES = BASE_STRATEGIES + ABLATIONS

#: Returns the [E] assignment counts since the last step, or None if there was no forward.
TokenCounts = Callable[[], "Tensor | None"]

#: On CPU the snapshot is taken in slices of at most this many bytes (at least one expert):
#: small allocations come from memory malloc already holds; one big buffer is a fresh mapping
#: that page-faults on every step (measured: ~20 ms per 96 MiB, 4x the copy itself).
_CPU_SLICE_BYTES = 1 << 20


@dataclass(frozen=True)
class ExcitationConfig:
    """Excitation settings.

    strategy: "zero_sum" | "positive_sum" | "negative_sum" (the paper's strategies) or the
        ablations "inverted" | "random" | "global", which rearrange the multipliers of
        ``ablation_base``.
    gamma: exponent γ >= 0 on utilization; 0 gives Φ ≡ 1 (the base optimizer exactly).
    seed: seed of the generator that draws the "random" permutations.
    ablation_base: "zero_sum" | "positive_sum" | "negative_sum": whose multipliers the
        ablations rearrange (ignored by the three base strategies).
    """

    strategy: str = "positive_sum"
    gamma: float = 1.0
    seed: int = 0
    ablation_base: str = "zero_sum"

    def __post_init__(self) -> None:
        require(self.strategy in STRATEGIES, "strategy", self.strategy,
                 f"choose one of {STRATEGIES}")
        gamma_ok = (isinstance(self.gamma, (int, float)) and not isinstance(self.gamma, bool)
                    and math.isfinite(self.gamma) and self.gamma >= 0)
        require(gamma_ok, "gamma", self.gamma, "need a finite float >= 0")
        require(isinstance(self.seed, int) and not isinstance(self.seed, bool),
                 "seed", self.seed, "need an int")
        require(self.ablation_base in BASE_STRATEGIES, "ablation_base",
                 self.ablation_base, f"choose one of {BASE_STRATEGIES}")


@functools.cache
def _warn_expert_choice() -> None:
    warnings.warn("Excitation is a no-op under expert-choice routing: every expert takes the "
                  "same number of tokens, so every utilization is equal and Phi == 1 (the "
                  "experts take the plain base-optimizer update); use routing='top_k' for an "
                  "effect", UserWarning, stacklevel=4)


def _phi_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64


def _base_multipliers(counts_LE: Tensor, strategy: str, gamma: float) -> Tensor:
    """zero/positive/negative-sum multipliers [L, E] of rows with a positive total."""
    if gamma == 0:
        return torch.ones_like(counts_LE)
    # u^γ / mean(u^γ) is invariant to scaling u: divide by the row max so the largest term
    # is 1 and the mean never underflows to 0 (large γ). 0^γ = 0 for γ > 0.
    v_LE = counts_LE / counts_LE.amax(dim=-1, keepdim=True)
    p_LE = v_LE.pow(gamma)
    phi_LE = p_LE / p_LE.mean(dim=-1, keepdim=True)
    if strategy == "positive_sum":
        return phi_LE.clamp_min(1.0)
    if strategy == "negative_sum":
        return phi_LE.clamp_max(1.0)
    return phi_LE


def excitation_multipliers(counts_LE: Tensor, strategy: str = "positive_sum", gamma: float = 1.0,
                           ablation_base: str = "zero_sum",
                           generator: torch.Generator | None = None) -> Tensor:
    """Multipliers Φ [L, E] (or [E]) from assignment counts n [L, E] (or [E]), one row a layer.

    Rows whose counts sum to 0 get Φ ≡ 1. "random" draws one permutation per row from
    ``generator`` (a CPU generator; the global one if None). Computed in float64 (float32 on
    MPS) on the counts' device; no host synchronisation.
    """
    cfg = ExcitationConfig(strategy=strategy, gamma=gamma, ablation_base=ablation_base)
    squeeze = counts_LE.dim() == 1
    counts_LE = counts_LE.reshape(-1, counts_LE.shape[-1])
    counts_LE = counts_LE.to(_phi_dtype(counts_LE.device))
    has_tokens_L1 = counts_LE.sum(dim=-1, keepdim=True) > 0
    safe_LE = torch.where(has_tokens_L1, counts_LE, torch.ones_like(counts_LE))
    base = cfg.strategy if cfg.strategy in BASE_STRATEGIES else cfg.ablation_base
    phi_LE = _base_multipliers(safe_LE, base, cfg.gamma)
    if cfg.strategy == "inverted":
        order_LE = torch.argsort(safe_LE, dim=-1, stable=True)   # ascending utilization
        ranked_LE = phi_LE.gather(-1, order_LE)                  # multipliers by rank
        phi_LE = torch.empty_like(phi_LE).scatter_(-1, order_LE, ranked_LE.flip(-1))
    elif cfg.strategy == "random":
        perm_LE = torch.rand(phi_LE.shape, generator=generator).argsort(dim=-1)
        phi_LE = phi_LE.gather(-1, perm_LE.to(phi_LE.device))
    elif cfg.strategy == "global":
        phi_LE = phi_LE.mean(dim=-1, keepdim=True).expand_as(phi_LE).clone()
    phi_LE = torch.where(has_tokens_L1, phi_LE, torch.ones_like(phi_LE))
    return phi_LE[0] if squeeze else phi_LE


def local_rows(w_E: Tensor, p: Tensor, what: str = "expert group") -> Tensor:
    """The entries of ``w_E`` ([E], one per expert along ``p``'s dim 0) for the rows this rank
    holds of ``p``: ``w_E`` itself for a plain tensor; for a DTensor (FSDP2) the part of
    ``w_E`` cut exactly as ``p``'s dim 0 is cut over its mesh (a local slice, no
    communication), so ``local_rows(w_E, p)[i]`` belongs to ``local(p)[i]``. Raises
    ValueError for a DTensor sharded along another dim (an expert's rows spread over ranks
    would need their Φ too, but nothing here needs that: FSDP shards dim 0)."""
    if not is_dtensor(p):
        return w_E
    from torch.distributed.tensor import DTensor, Replicate

    if any(not pl.is_replicate() and getattr(pl, "dim", None) != 0 for pl in p.placements):
        raise ValueError(f"Excitation ({what}): a DTensor parameter with placements "
                         f"{p.placements} is invalid: shard expert weights along dim 0 (the "
                         "expert dim), as FSDP2's fully_shard does by default")
    mesh = p.device_mesh
    whole = DTensor.from_local(w_E, mesh, [Replicate()] * mesh.ndim, run_check=False)
    return whole.redistribute(mesh, p.placements).to_local()


@dataclass
class _ExpertGroup:
    """The parameters of one layer's E experts and where its token counts come from."""

    name: str
    n_experts: int                   # E, the length of the counts
    batched_at_add: list[Tensor]     # each [E_held, ...], as given
    per_expert: list[list[Tensor]]   # E_held lists
    token_counts: TokenCounts
    held: range                      # the experts these parameters are (all E, or an EP shard)
    owner: nn.Module | None = None   # where the batched parameters are looked up by name
    names: tuple[str, ...] = ()

    @property
    def batched(self) -> list[Tensor]:
        """The batched parameters now: looked up in ``owner`` (a wrapper such as FSDP2 may
        have replaced them since), else as given."""
        if self.owner is None:
            return self.batched_at_add
        return [self.owner.get_parameter(n) for n in self.names]


#: Optimizers an Excitation is attached to (one Excitation per optimizer).
_ATTACHED: weakref.WeakSet[Optimizer] = weakref.WeakSet()


def _optimizer_hook(owner: Excitation, fn: Callable[..., Any]) -> Callable[..., Any]:
    """A hook for ``owner.optimizer`` that calls ``fn(owner, *args)``. It holds ``owner`` weakly
    and ignores any other optimizer: a deep copy of the optimizer shares this (plain) function
    but not the Excitation, and steps as the bare optimizer."""
    ref = weakref.ref(owner)

    def hook(optimizer: Optimizer, *args: Any) -> Any:
        exc = ref()
        if exc is None or optimizer is not exc.optimizer:
            return None
        return fn(exc, *args)

    return hook


class Excitation:
    """Attaches Excitation to ``optimizer``: each expert's update is scaled by its multiplier Φ_k.

    Args:
        optimizer: any ``torch.optim.Optimizer`` over the model's parameters — yours, unchanged
            in type: keep stepping it, hang LR schedulers on it, save its ``state_dict``.
        model: a module; every ``moelab.moe.MoELayer`` inside becomes an expert group named by
            its module path (its ``experts`` parameters, counts from ``last_stats``). None:
            only groups added with ``add_expert_group``.
        strategy, gamma, seed, ablation_base: see ``ExcitationConfig``; or pass ``config``.

    How it attaches: only through torch's public optimizer hooks. A step pre-hook computes Φ
    and snapshots the expert parameters that will move; a step post-hook rescales their update
    (``θ_k <- θ_k,old + Φ_k (θ_k,base - θ_k,old)``) and resets the counts; a state-dict
    post-hook adds an ``"excitation"`` entry (the random generator's state, the config) to
    ``optimizer.state_dict()`` and a load pre-hook restores it, so checkpoints of the plain
    optimizer carry everything. ``remove_hooks()`` detaches it (the optimizer is plain again).
    One Excitation per optimizer; a deep copy of the optimizer is a plain optimizer.

    The Excitation object also behaves like the optimizer for a one-line integration
    (``opt = Excitation(AdamW(...), model)`` then ``opt.step()``, ``opt.zero_grad()``,
    ``opt.param_groups``, ``opt.state_dict()`` all reach the wrapped optimizer). It is not an
    ``Optimizer``: attach LR schedulers to ``opt.optimizer`` (or to your optimizer variable).
    ``step(closure)`` evaluates the closure first, so its forward is counted, then steps the
    optimizer without it (fine for first-order optimizers; not for LBFGS).

    Counting: each MoELayer sums its assignment counts over its training-mode forwards
    (``layer.training``), skipping activation-checkpoint recomputes, in an [E] buffer that a
    compiled forward updates too; each optimizer step takes and resets them
    (``MoELayer.take_counts``). Eval-mode forwards are not counted.

    Attributes: ``last_multipliers`` {group name: Φ [E] float32} and ``last_utilization``
    {group name: u [E] float32, NaN for a layer without assignments} and ``last_counts``
    {group name: n [E], summed over the step's forwards (and ranks)} of the last step;
    ``last_snapshot_bytes``: size of the transient copy of the expert parameters made by the
    last step (the only extra memory; on CPU experts with Φ = 1 are not copied).
    """

    def __init__(self, optimizer: Optimizer, model: nn.Module | None = None,
                 strategy: str = "positive_sum", gamma: float = 1.0, seed: int = 0,
                 ablation_base: str = "zero_sum", *,
                 config: ExcitationConfig | None = None) -> None:
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"optimizer={type(optimizer).__name__} is invalid: need a "
                            "torch.optim.Optimizer")
        if optimizer in _ATTACHED:
            raise ValueError("optimizer is invalid: an Excitation is already attached to it "
                             "(call remove_hooks() on that one first)")
        self.optimizer = optimizer
        self.config = config or ExcitationConfig(strategy, gamma, seed, ablation_base)
        self.generator = torch.Generator().manual_seed(self.config.seed)
        #: Data parallelism: set True (and optionally a process group) to sum the counts over
        #: ranks in ``_reduce_counts``.
        self.all_reduce_counts = False
        self.process_group: dist.ProcessGroup | None = None
        self._groups: list[_ExpertGroup] = []
        self._pending: dict[str, Tensor] = {}
        self._hook_handles: list[torch.utils.hooks.RemovableHandle] = []
        #: (params, snapshots, lerp weights) between the step pre- and post-hook
        self._in_step: tuple[list[Tensor], list[Tensor], list[Tensor]] | None = None
        self.last_multipliers: dict[str, Tensor] = {}
        self.last_utilization: dict[str, Tensor] = {}
        self.last_counts: dict[str, Tensor] = {}
        self.last_snapshot_bytes = 0
        self._hook_handles += [
            optimizer.register_step_pre_hook(_optimizer_hook(self, Excitation._before_step)),
            optimizer.register_step_post_hook(_optimizer_hook(self, Excitation._after_step)),
            optimizer.register_state_dict_post_hook(
                _optimizer_hook(self, Excitation._add_state)),
            optimizer.register_load_state_dict_pre_hook(
                _optimizer_hook(self, Excitation._load_state)),
        ]
        _ATTACHED.add(optimizer)
        if model is not None:
            self._add_moe_layers(model)

    # ------------------------------------------------------------------ optimizer-like use

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.optimizer.param_groups

    @property
    def state(self) -> Any:
        return self.optimizer.state

    @property
    def defaults(self) -> dict[str, Any]:
        return self.optimizer.defaults

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        self.optimizer.add_param_group(param_group)

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Evaluate ``closure`` (if any), then ``optimizer.step()`` (the hooks apply Φ).
        Returns the closure's loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.optimizer.step()
        return loss

    def state_dict(self) -> dict[str, Any]:
        """``optimizer.state_dict()``: the wrapped state plus ``"excitation"``."""
        return self.optimizer.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """``optimizer.load_state_dict(...)``: restores the generator too (the config is not
        changed)."""
        self.optimizer.load_state_dict(state_dict)

    def load_extra_state(self, entries: dict[str, Any]) -> None:
        """Restore Excitation's entry (``entries["excitation"]``, as in
        ``optimizer.state_dict()``) alone: for checkpoints that load the optimizer's tensors
        another way (``moelab.runs.sharded_checkpoint``). Other entries are ignored."""
        self._load_state(dict(entries))

    def _add_state(self, state_dict: dict[str, Any]) -> None:
        state_dict["excitation"] = {"generator_state": self.generator.get_state(),
                                    "config": asdict(self.config)}

    def _load_state(self, state_dict: dict[str, Any]) -> None:
        extra = state_dict.pop("excitation", None)  # a shallow copy: the caller's dict is kept
        if extra is not None:
            self.generator.set_state(extra["generator_state"])

    def __repr__(self) -> str:
        cfg = self.config
        return (f"Excitation(strategy={cfg.strategy!r}, gamma={cfg.gamma}, "
                f"groups={[g.name for g in self._groups]}) on {self.optimizer!r}")

    # ------------------------------------------------------------------ expert groups

    @property
    def group_names(self) -> list[str]:
        return [g.name for g in self._groups]

    def add_expert_group(self, *, token_counts: TokenCounts | None = None,
                         params_per_expert: Sequence[Iterable[Tensor]] | None = None,
                         batched_params: Iterable[Tensor] | None = None,
                         name: str | None = None, n_experts: int | None = None,
                         held_experts: range | None = None,
                         batched_owner: nn.Module | None = None) -> str:
        """Register the experts of one MoE layer; returns the group's name.

        params_per_expert: E lists, the parameters of each expert (e.g. ``[list(e.parameters())
            for e in module_list]``).  batched_params: tensors shaped [E, ...], expert k's part
            the slice ``[k]``.  At least one of the two (both may be given; E must agree).
        token_counts: called once per step, returns [E] assignment counts since the previous
            step (any device/dtype), or None when the layer had no forward (Φ ≡ 1). Left out:
            the counts are those given to ``record_counts(name, ...)`` since the last step.
        n_experts, held_experts: expert parallelism — the counts cover all ``n_experts``
            experts while the parameters hold only the experts ``held_experts`` (a range of
            ``len(held_experts)``, the parameters' expert count). Default: they hold all.
        batched_owner: a module holding ``batched_params`` (as its own or its submodules'
            parameters): they are then looked up there by name at every step, so a wrapper
            that replaces the parameters afterwards (FSDP2's ``fully_shard``, e.g. under
            ``accelerate``) is followed.
        The parameters must also be in the wrapped optimizer to be updated at all. DTensor
        parameters (FSDP2) count by their global shape and must be sharded along the expert
        dim only: each rank rescales its local rows, nothing is gathered.
        """
        per_expert = [list(ps) for ps in params_per_expert] if params_per_expert else []
        batched = list(batched_params) if batched_params else []
        if not per_expert and not batched:
            raise ValueError("add_expert_group: give params_per_expert and/or batched_params")
        sizes = {len(per_expert)} if per_expert else set()
        sizes |= {p.shape[0] if p.dim() > 0 else -1 for p in batched}
        if len(sizes) != 1 or min(sizes) < 1:
            raise ValueError(f"add_expert_group: inconsistent expert counts {sorted(sizes)} "
                             "(len(params_per_expert) and every batched_params[i].shape[0])")
        n_held = sizes.pop()
        held = held_experts if held_experts is not None else range(n_held)
        total = n_experts if n_experts is not None else n_held
        if len(held) != n_held or held.step != 1 or held.start < 0 or held.stop > total:
            raise ValueError(f"add_expert_group: held_experts={held!r} is invalid: need a "
                             f"range of {n_held} consecutive experts within n_experts={total}")
        name = name if name is not None else f"group{len(self._groups)}"
        if name in self.group_names:
            raise ValueError(f"add_expert_group: name={name!r} is already used")
        seen = {id(p) for g in self._groups for p in self._group_params(g)}
        new = batched + [p for ps in per_expert for p in ps]
        if len({id(p) for p in new}) != len(new) or any(id(p) in seen for p in new):
            raise ValueError(f"add_expert_group {name!r}: a parameter appears twice or already "
                             "belongs to another expert group")
        names: tuple[str, ...] = ()
        if batched_owner is not None:
            by_id = {id(p): n for n, p in batched_owner.named_parameters()}
            if any(id(p) not in by_id for p in batched):
                raise ValueError(f"add_expert_group {name!r}: batched_owner does not hold "
                                 "every batched parameter")
            names = tuple(by_id[id(p)] for p in batched)
        if token_counts is None:
            token_counts = self._pending_counts(name)
        self._groups.append(_ExpertGroup(name, total, batched, per_expert, token_counts, held,
                                         batched_owner, names))
        return name

    def _add_moe_layers(self, model: nn.Module) -> None:
        for path, module in model.named_modules():
            if not isinstance(module, MoELayer):
                continue
            name = path or "moe"
            experts = module.experts  # an expert-parallel layer holds a range of the E experts
            if not list(experts.parameters()):
                raise ValueError(f"{name}: its experts hold no parameters of their own (a "
                                 "Hugging Face model patched by moelab.hf?): use "
                                 "moelab.hf.Excitation(optimizer, model)")
            if module.cfg.routing == "expert_choice":
                _warn_expert_choice()
            module.take_counts()  # count from here on
            params = list(experts.parameters())
            # a DTensor (FSDP) has the global shape: all E experts, whatever this rank holds
            held = None if is_dtensor(params[0]) else getattr(experts, "expert_range", None)
            self.add_expert_group(batched_params=params, name=name,
                                  n_experts=module.cfg.n_experts, held_experts=held,
                                  token_counts=module.take_counts, batched_owner=experts)

    def _pending_counts(self, name: str) -> TokenCounts:
        return lambda: self._pending.get(name)

    @torch.no_grad()
    def record_counts(self, name: str, counts_E: Tensor) -> None:
        """Add one forward's [E] assignment counts to group ``name`` (summed until the next
        ``step()``, which resets them). ``moelab.hf``'s router hooks call this; so can a user's
        MoE whose group was added without ``token_counts``."""
        counts_E = counts_E.detach()
        acc = self._pending.get(name)
        if acc is None:
            self._pending[name] = counts_E.to(_phi_dtype(counts_E.device)).clone()
        else:
            acc.add_(counts_E.to(acc.device))

    def remove_hooks(self) -> None:
        """Detach from the optimizer and the model's MoE layers: the optimizer steps, saves
        and loads as the bare optimizer again."""
        for handle in self._hook_handles:
            handle.remove()
        self._hook_handles.clear()
        _ATTACHED.discard(self.optimizer)

    @staticmethod
    def _group_params(group: _ExpertGroup) -> list[Tensor]:
        return group.batched + [p for ps in group.per_expert for p in ps]

    # ------------------------------------------------------------------ multipliers

    def _reduce_counts(self, counts: Tensor) -> Tensor:
        """Sum a flat tensor of counts over data-parallel ranks (one all-reduce per step).

        A no-op on a single process; active when ``all_reduce_counts`` is set and
        ``torch.distributed`` is initialised (``process_group``: None = the default group).
        """
        if self.all_reduce_counts and dist.is_available() and dist.is_initialized():
            dist.all_reduce(counts, op=dist.ReduceOp.SUM, group=self.process_group)
        return counts

    def _compute_multipliers(self) -> dict[str, Tensor | None]:
        """Φ [E] per group for this step; None where Φ ≡ 1 is known without looking at data
        (γ = 0, or no forward on any rank when counts are not reduced)."""
        cfg = self.config
        raw = [g.token_counts() for g in self._groups]
        self.last_multipliers, self.last_utilization, self.last_counts = {}, {}, {}
        if not self._groups:
            return {}
        if cfg.gamma == 0 or (not self.all_reduce_counts and all(c is None for c in raw)):
            for g, c in zip(self._groups, raw, strict=True):
                self.last_multipliers[g.name] = torch.ones(g.n_experts)
                if c is not None:
                    self.last_counts[g.name] = c.detach().clone()
                    self.last_utilization[g.name] = (c / c.sum()).float()
            return {g.name: None for g in self._groups}
        device = next((c.device for c in raw if c is not None),
                      self._group_params(self._groups[0])[0].device)
        dtype = _phi_dtype(device)
        # one flat buffer of every group's counts, zeros for "no forward" (a layer with no
        # assignments on any rank gets Φ ≡ 1), so data parallelism needs one all-reduce
        parts = [torch.zeros(g.n_experts, device=device, dtype=dtype) if c is None else
                 c.detach().to(device=device, dtype=dtype).reshape(g.n_experts)
                 for g, c in zip(self._groups, raw, strict=True)]
        sizes = [g.n_experts for g in self._groups]
        counts = list(self._reduce_counts(torch.cat(parts)).split(sizes))
        # stack groups with the same E, so each distinct E costs one vectorised computation
        by_size: dict[int, list[int]] = {}
        for i, n in enumerate(sizes):
            by_size.setdefault(n, []).append(i)
        phis: list[Tensor] = list(counts)
        for idx in by_size.values():
            counts_LE = torch.stack([counts[i] for i in idx])
            phi_LE = excitation_multipliers(counts_LE, cfg.strategy, cfg.gamma,
                                            cfg.ablation_base, self.generator)
            for row, i in enumerate(idx):
                phis[i] = phi_LE[row]
        out: dict[str, Tensor | None] = {}
        for i, g in enumerate(self._groups):
            out[g.name] = phis[i]
            self.last_multipliers[g.name] = phis[i].float()
            self.last_counts[g.name] = counts[i]
            self.last_utilization[g.name] = (counts[i] / counts[i].sum()).float()
        return out

    # ------------------------------------------------------------------ step

    def _plan(self, phis: dict[str, Tensor | None]) -> tuple[list[Tensor], list[Tensor]]:
        """The expert parameters to rescale and their lerp weights ``1 - Φ`` (shaped to
        broadcast over each parameter).

        Batched [E, ...] parameters come as slices along the expert dimension. On CPU: experts
        with Φ = 1 exactly are left out (their base update stands as is), and a slice holds at
        most ``_CPU_SLICE_BYTES`` (at least one expert), so the snapshot is made of small
        allocations that malloc serves from memory the process already has, instead of one big
        fresh mapping that page-faults on every step.
        """
        optimized = {id(p) for group in self.optimizer.param_groups for p in group["params"]}
        params: list[Tensor] = []
        weights: list[Tensor] = []
        for g in self._groups:
            phi_E = phis[g.name]
            if phi_E is None:
                continue
            w_E = 1.0 - phi_E[g.held.start:g.held.stop]
            on_cpu = phi_E.device.type == "cpu"
            # host-side mask of moving experts; elsewhere no sync, every expert is rescaled
            n_held = len(g.held)  # the experts these parameters hold (all, or an EP shard)
            moving = (w_E != 0).tolist() if on_cpu else [True] * n_held
            for p in g.batched:
                if id(p) not in optimized or p.grad is None:
                    continue
                rows = local(p)  # a DTensor's own rows, with their entries of w_E
                w_rows = local_rows(w_E, p, g.name)
                row_moving = moving if w_rows is w_E else (
                    (w_rows != 0).tolist() if on_cpu else [True] * rows.shape[0])
                self._add_slices(rows, w_rows, row_moving, params, weights)
            if g.per_expert:
                w_cols = w_E.unbind(0)
                for k, ps in enumerate(g.per_expert):
                    for p in ps:
                        if moving[k] and id(p) in optimized and p.grad is not None:
                            params.append(local(p))
                            weights.append(w_cols[k].to(device=p.device, dtype=p.dtype))
        return params, weights

    @staticmethod
    def _add_slices(p: Tensor, w_N: Tensor, moving: list[bool], params: list[Tensor],
                    weights: list[Tensor]) -> None:
        """Append the slices of ``p`` ([N, ...], N experts) whose experts move, and their
        weights ``w_N`` shaped to broadcast (slices on CPU: see :meth:`_plan`)."""
        n = p.shape[0]
        w_p = w_N.to(device=p.device, dtype=p.dtype).view(-1, *([1] * (p.dim() - 1)))
        limit = n
        if p.device.type == "cpu" and n:
            limit = max(1, _CPU_SLICE_BYTES // max(1, p[0].numel() * p.element_size()))
        a = 0
        while a < n:
            if not moving[a]:
                a += 1
                continue
            b = a + 1
            while b < n and moving[b] and b - a < limit:
                b += 1
            params.append(p[a:b])
            weights.append(w_p[a:b])
            a = b

    @torch.no_grad()
    def _snapshot(self, params: list[Tensor]) -> list[Tensor]:
        """A transient copy of ``params`` (one ``empty_like`` each), filled by one
        ``_foreach_copy_``."""
        snaps = [torch.empty_like(p) for p in params]
        if params:
            torch._foreach_copy_(snaps, params)
        self.last_snapshot_bytes = sum(s.numel() * s.element_size() for s in snaps)
        return snaps

    def _before_step(self, _args: Any, _kwargs: Any) -> None:
        """Step pre-hook: Φ from the counts, snapshot of the expert parameters that move."""
        params, weights = self._plan(self._compute_multipliers())
        self._in_step = (params, self._snapshot(params), weights)

    def _after_step(self, _args: Any, _kwargs: Any) -> None:
        """Step post-hook: ``θ_k <- θ_k,old + Φ_k (θ_k,base - θ_k,old)``; counts reset."""
        if self._in_step is not None:
            params, snaps, weights = self._in_step
            self._in_step = None
            if params:
                with torch.no_grad():
                    # lerp(θ_base, θ_old, 1 - Φ) = θ_base + (1 - Φ)(θ_old - θ_base)
                    #                            = θ_old + Φ (θ_base - θ_old);
                    # exact at the ends: Φ = 1 keeps θ_base, Φ = 0 restores θ_old bit for bit.
                    torch._foreach_lerp_(params, snaps, weights)
        self._pending.clear()
