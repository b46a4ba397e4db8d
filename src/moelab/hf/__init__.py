"""moelab's methods on Hugging Face ``transformers`` MoE models (needs ``moelab[hf]``).

    model = MixtralForCausalLM(config)               # or .from_pretrained(DIR)
    moelab.hf.patch(model, default_moe=DefaultMoEConfig(), momentum=MomentumConfig("heavy_ball"))
    opt = moelab.hf.Excitation(torch.optim.AdamW(model.parameters()), model)
    ...train as usual...; moelab.hf.save_state(model, DIR)

Nothing in ``moelab`` outside this package imports ``transformers``; this package does not
import it either (it recognises HF classes by name), so it only needs a model to act on.
"""

from moelab.hf.excitation import Excitation
from moelab.hf.patch import DISPATCHES, patch, patched_blocks, unpatch
from moelab.hf.state import changes_function, load_state, save_state

__all__ = [
    "DISPATCHES", "Excitation", "changes_function", "load_state", "patch", "patched_blocks",
    "save_state", "unpatch",
]
