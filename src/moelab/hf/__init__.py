"""moelab's methods on Hugging Face ``transformers`` MoE models (needs ``moelab[hf]``).

    model = MixtralForCausalLM(config)               # or .from_pretrained(DIR)
    moelab.hf.patch(model, default_moe=DefaultMoEConfig(), momentum=MomentumConfig("heavy_ball"))
    opt = moelab.hf.Excitation(torch.optim.AdamW(model.parameters()), model)
    ...train as usual...; moelab.hf.save_state(model, DIR)

Inside ``transformers.Trainer``: pass the patched model and the hooked optimizer
(``optimizers=(opt, scheduler)``), and attach ``moelab.hf.MoelabCallback(exc)`` for several ranks
and routing metrics in the Trainer's logs (``moelab.hf.trainer_callback``).

Nothing in ``moelab`` outside this package imports ``transformers``; this package does not
import it either (it recognises HF classes by name), except ``MoelabCallback``, imported when
first asked for.
"""

from typing import Any

from moelab.hf.excitation import Excitation
from moelab.hf.patch import DISPATCHES, patch, patched_blocks, unpatch
from moelab.hf.state import changes_function, load_state, save_state

__all__ = [
    "DISPATCHES", "Excitation", "MoelabCallback", "changes_function", "load_state", "patch",
    "patched_blocks", "save_state", "unpatch",
]


def __getattr__(name: str) -> Any:
    if name == "MoelabCallback":  # a transformers.TrainerCallback: imports transformers
        from moelab.hf.trainer_callback import MoelabCallback

        return MoelabCallback
    raise AttributeError(f"module 'moelab.hf' has no attribute {name!r}")
