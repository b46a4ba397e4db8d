"""Tiny random Hugging Face MoE models for the moelab.hf tests (built from config classes;
nothing is downloaded). Import only after ``pytest.importorskip("transformers")``."""

from __future__ import annotations

import torch
import transformers as tf

VOCAB = 64
COMMON = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, output_router_logits=True, router_aux_loss_coef=0.02,
              tie_word_embeddings=False, pad_token_id=0, bos_token_id=1,
              eos_token_id=2)

#: family name -> (config class, model class, extra config kwargs)
SPECS = {
    "mixtral": (tf.MixtralConfig, tf.MixtralForCausalLM,
                dict(intermediate_size=48, num_local_experts=4, num_experts_per_tok=2)),
    "olmoe": (tf.OlmoeConfig, tf.OlmoeForCausalLM,
              dict(intermediate_size=48, num_experts=4, num_experts_per_tok=2,
                   norm_topk_prob=False)),
    "qwen2_moe": (tf.Qwen2MoeConfig, tf.Qwen2MoeForCausalLM,
                  dict(intermediate_size=64, moe_intermediate_size=48,
                       shared_expert_intermediate_size=40, num_experts=4,
                       num_experts_per_tok=2, norm_topk_prob=False, decoder_sparse_step=1,
                       mlp_only_layers=[])),
    "qwen3_moe": (tf.Qwen3MoeConfig, tf.Qwen3MoeForCausalLM,
                  dict(intermediate_size=64, moe_intermediate_size=48, num_experts=4,
                       num_experts_per_tok=2, norm_topk_prob=True, head_dim=8,
                       decoder_sparse_step=1, mlp_only_layers=[])),
    "granitemoe": (tf.GraniteMoeConfig, tf.GraniteMoeForCausalLM,
                   dict(intermediate_size=48, num_local_experts=4, num_experts_per_tok=2)),
    "deepseek_v3": (tf.DeepseekV3Config, tf.DeepseekV3ForCausalLM,
                    dict(num_hidden_layers=3, intermediate_size=64, moe_intermediate_size=24,
                         n_routed_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1,
                         n_shared_experts=1, first_k_dense_replace=1, q_lora_rank=None,
                         kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8,
                         v_head_dim=8, num_key_value_heads=4, routed_scaling_factor=2.5,
                         norm_topk_prob=True)),
    "gpt_oss": (tf.GptOssConfig, tf.GptOssForCausalLM,
                dict(intermediate_size=48, num_local_experts=4, num_experts_per_tok=2,
                     head_dim=8, sliding_window=128)),
}
#: families whose experts moelab can run (all three methods)
MOELAB_FAMILIES = [f for f in SPECS if f != "gpt_oss"]


def tiny_model(family: str, seed: int = 0, dtype: torch.dtype = torch.float32,
               experts_implementation: str = "eager", **overrides) -> torch.nn.Module:
    """A tiny random CausalLM of ``family`` in eval mode, with every router made to spread its
    tokens (random router weights at a scale that gives distinct top-K choices)."""
    config_cls, model_cls, extra = SPECS[family]
    kwargs = {**COMMON, **extra, **overrides}
    config = config_cls(**kwargs)
    config._experts_implementation = experts_implementation
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = model_cls(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.1)
            elif "bias" in name:
                p.normal_(0.0, 0.1)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.normal_(0.0, 0.05)
    return model.to(dtype).eval()


def token_batch(seed: int = 1, batch: int = 2, seq: int = 7) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))
