"""Fingerprints of models and tokenisers, the keys of the base-activation and selection caches."""

from __future__ import annotations

import torch
from tiny_models import tiny_chat_tokenizer, tiny_model

from hf_blockem.fingerprints import tokenizer_fingerprint, weights_fingerprint


def test_weights_fingerprint_tells_apart_a_moved_weight_and_nothing_else():
    model, same = tiny_model("llama"), tiny_model("llama")
    assert weights_fingerprint(model) == weights_fingerprint(same)
    with torch.no_grad():
        next(same.parameters()).view(-1)[0] += 1e-3
    assert weights_fingerprint(model) != weights_fingerprint(same)


def test_tokenizer_fingerprint_ignores_the_state_a_padded_call_leaves():
    tokenizer = tiny_chat_tokenizer()
    before = tokenizer_fingerprint(tokenizer)
    tokenizer(["w1 w2", "w3"], padding=True, truncation=True, max_length=8)  # leaves padding on in the backend
    assert tokenizer_fingerprint(tokenizer) == before
    tokenizer.chat_template = "{{ messages }}"
    assert tokenizer_fingerprint(tokenizer) != before
