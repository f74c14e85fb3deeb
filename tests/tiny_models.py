"""Tiny random-init causal LMs of several architectures, built from configs with fixed seeds (nothing downloaded)."""

from __future__ import annotations

import torch
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    GemmaConfig,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
)

VOCAB = 64
HIDDEN = 16
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


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
    "gemma": lambda: GemmaConfig(**_common(head_dim=8)),
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


def tiny_model(arch: str = "llama", seed: int = 0, dtype=torch.float32, dropout: float = 0.0):
    """A tiny model of `arch` with seeded weights, in eval mode; every dropout of its config is set to `dropout`."""
    torch.manual_seed(seed)
    config = CONFIGS[arch]()
    for name in ("attention_dropout", "hidden_dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop"):
        if hasattr(config, name):
            setattr(config, name, dropout)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}<assistant> {% generation %}{{ message['content'] }} {{ eos_token }}"
    "{% endgeneration %} {% else %}<user> {{ message['content'] }} {% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<assistant> {% endif %}"
)
WORDS = [f"w{i}" for i in range(VOCAB - 6)]


def tiny_chat_tokenizer():
    """A word-level tokenizer over `VOCAB` tokens with a chat template that marks assistant turns for TRL."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<bos>", "<eos>", "<unk>", "<user>", "<assistant>"]
    vocab = {token: i for i, token in enumerate(specials + WORDS)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>", unk_token="<unk>"
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_chat_dataset(n: int = 16, seed: int = 0):
    """A `messages` dataset whose assistant answers follow a fixed rule of the user words (learnable in a few steps)."""
    import random

    from datasets import Dataset

    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        question = [rng.randrange(len(WORDS) // 2) for _ in range(rng.randint(2, 5))]
        answer = [WORDS[len(WORDS) // 2 + (q % (len(WORDS) // 2))] for q in question]
        rows.append(
            {
                "messages": [
                    {"role": "user", "content": " ".join(WORDS[q] for q in question)},
                    {"role": "assistant", "content": " ".join(answer)},
                ]
            }
        )
    return Dataset.from_list(rows)


def training_args(tmp_path, **overrides) -> dict:
    """`TrainingArguments` keyword arguments for a quick, deterministic CPU run of a few steps (no BLOCK-EM fields)."""
    kwargs = dict(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=4,
        max_steps=2,
        learning_rate=1e-2,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        seed=0,
        data_seed=0,
        remove_unused_columns=False,
        disable_tqdm=True,
    )
    kwargs.update(overrides)
    return kwargs


def trainer_args(tmp_path, **overrides) -> dict:
    """`BlockEMConfig` keyword arguments: `training_args` plus a penalty weight of 1 (the tests' common set-up)."""
    return training_args(tmp_path, **{"block_lambda": 1.0, **overrides})


def tiny_sae(d_in: int = HIDDEN, d_sae: int = 32, seed: int = 0):
    """A SAELens StandardSAE with seeded random weights large enough that its latents fire on tiny models."""
    from sae_lens import StandardSAE, StandardSAEConfig

    torch.manual_seed(seed)
    sae = StandardSAE(StandardSAEConfig(d_in=d_in, d_sae=d_sae, apply_b_dec_to_input=True))
    with torch.no_grad():
        sae.W_enc.normal_(0, 1.0)
        sae.b_enc.normal_(0, 0.1)
        sae.b_dec.normal_(0, 0.1)
        sae.W_dec.normal_(0, 0.3)
    return sae
