"""Hugging Face `LlamaForCausalLM` layout: config and weight-name mapping.

Where it sits: used by tests (logit parity against transformers) and by export/import.
Our parameter names are HF's without the leading `model.` (lm_head keeps its name), so the
mapping is a prefix; no tensor is permuted because we use HF's rotate-half RoPE convention.
"""
from __future__ import annotations

from typing import Any

import torch

from ownllm.config import ModelConfig


def hf_config_dict(cfg: ModelConfig, bos_id: int | None = None, eos_id: int | None = None,
                   pad_id: int | None = None) -> dict[str, Any]:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.dim,
        "intermediate_size": cfg.ffn_dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": cfg.tie_embeddings,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "pad_token_id": pad_id,
        "torch_dtype": "float32",
    }


def to_hf_state_dict(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    out = {}
    for name, t in state.items():
        if name == "lm_head.weight":
            if not cfg.tie_embeddings:
                out[name] = t
        else:
            out["model." + name] = t
    return out
