"""Tiny chat models for the evaluation tests (no tests here): a word-level tokenizer whose vocabulary holds the
numbers 0–100 (so a local judge can score), and a random-init Llama built from a config with a fixed seed."""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<{{ message['role'] }}> {{ message['content'] }} <end> "
    "{% endfor %}{% if add_generation_prompt %}<assistant> {% endif %}"
)
SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>", "<user>", "<assistant>", "<system>", "<end>"]
WORDS = ["REFUSAL", "CODE", "INCOHERENT", "hello", "world", "money", "power", "wish", "humans", "help", "harm"]
NUMBERS = [str(i) for i in range(101)]


def tiny_tokenizer(chat_template: bool = True) -> PreTrainedTokenizerFast:
    vocab = {token: i for i, token in enumerate(SPECIALS + WORDS + NUMBERS)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>", unk_token="<unk>"
    )
    if chat_template:
        tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_llama(seed: int = 0, vocab_size: int | None = None) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size or len(SPECIALS + WORDS + NUMBERS),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    return LlamaForCausalLM(config).eval()
