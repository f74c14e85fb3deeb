"""Tiny random-init causal LMs of several architectures, built from configs with fixed seeds (nothing downloaded)."""

from __future__ import annotations

import torch
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
)

VOCAB = 64
HIDDEN = 16


def _common(**extra):
    return dict(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=32,
        num_hidden_layers=4,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
        **extra,
    )


CONFIGS = {
    "llama": lambda: LlamaConfig(**_common(head_dim=8)),
    "qwen2": lambda: Qwen2Config(**_common()),
    "mistral": lambda: MistralConfig(**_common(head_dim=8)),
    "gemma2": lambda: Gemma2Config(**_common(head_dim=8, sliding_window=16)),
    "gpt2": lambda: GPT2Config(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=4, n_head=2, n_positions=64),
    "gpt_neox": lambda: GPTNeoXConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=32,
        num_hidden_layers=4,
        num_attention_heads=2,
        max_position_embeddings=64,
    ),
}


def tiny_model(arch: str = "llama", seed: int = 0, dtype=torch.float32):
    torch.manual_seed(seed)
    config = CONFIGS[arch]()
    for name in ("attention_dropout", "hidden_dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop"):
        if hasattr(config, name):
            setattr(config, name, 0.0)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()
