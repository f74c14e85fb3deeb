"""Fingerprints that tell two models or tokenisers apart, for the keys of on-disk caches.

Cheap enough for a 7B model (a strided sample of each parameter, not every value), and stable across processes and
wrappers (FSDP names, sharded parameters are gathered for the sample).
"""

from __future__ import annotations

import contextlib
import hashlib
import json

import torch
from torch import nn

# Values sampled per parameter: any fine-tuning step moves some of them.
_FINGERPRINT_SAMPLES = 64


def weights_fingerprint(module: nn.Module, only_frozen: bool = False) -> str:
    """sha256 over every parameter's name, dtype, shape and a strided sample of its values.

    Args:
        module (`torch.nn.Module`): the model (or the part of it) to fingerprint.
        only_frozen (`bool`, *optional*, defaults to `False`): skip trainable parameters (PEFT adapters: disabled
            during the base pass, and they change while training).
    """
    digest = hashlib.sha256()
    with torch.no_grad():
        for name, param in sorted(module.named_parameters(), key=lambda item: item[0]):
            if only_frozen and param.requires_grad:
                continue
            # The same key with and without FSDP1's wrappers around the layers.
            name = name.replace("_fsdp_wrapped_module.", "").replace("_checkpoint_wrapped_module.", "")
            with _whole(param) as whole:
                flat = whole.detach().reshape(-1)
                sample = flat[:: max(1, flat.numel() // _FINGERPRINT_SAMPLES)][:_FINGERPRINT_SAMPLES]
                digest.update(f"\0{name}\0{whole.dtype}\0{list(whole.shape)}\0".encode())
                digest.update(sample.to("cpu", torch.float32).numpy().tobytes())
    return "sha256:" + digest.hexdigest()


@contextlib.contextmanager
def _whole(param: torch.Tensor):
    # A sharded parameter is gathered for the sample: a collective, which every process runs in the same (sorted)
    # order since every process computes the cache key.
    if hasattr(param, "full_tensor"):  # FSDP2 / DTensor
        yield param.full_tensor()
    elif hasattr(param, "ds_id"):  # DeepSpeed ZeRO-3 keeps an empty placeholder in `param.data`
        import deepspeed

        with deepspeed.zero.GatheredParameters([param]):
            yield param.data
    else:
        yield param


def tokenizer_fingerprint(tokenizer) -> str | None:
    """sha256 of a tokeniser's full definition (vocabulary, merges, normaliser, special tokens, chat template)."""
    if tokenizer is None:
        return None
    tokenizer = getattr(tokenizer, "tokenizer", tokenizer)  # processors wrap their tokeniser
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        # Without the backend's padding and truncation state: transformers sets it from each call's arguments (a
        # padded batch leaves it switched on), and it does not change how a text is tokenised.
        definition = json.loads(backend.to_str())
        definition.pop("padding", None)
        definition.pop("truncation", None)
        definition = json.dumps(definition, sort_keys=True)
    else:
        definition = json.dumps(sorted(tokenizer.get_vocab().items()))
    extra = json.dumps(
        {
            "name_or_path": getattr(tokenizer, "name_or_path", None),
            "special_tokens": {str(k): str(v) for k, v in getattr(tokenizer, "special_tokens_map", {}).items()},
            "chat_template": getattr(tokenizer, "chat_template", None),
            "padding_side": getattr(tokenizer, "padding_side", None),
        },
        sort_keys=True,
    )
    return "sha256:" + hashlib.sha256((definition + extra).encode()).hexdigest()


def template_fingerprint(tokenizer) -> str | None:
    """sha256 of a tokeniser's chat template (`None` without one): what decides how it renders a conversation."""
    template = getattr(getattr(tokenizer, "tokenizer", tokenizer), "chat_template", None)
    if template is None:
        return None
    return "sha256:" + hashlib.sha256(json.dumps(template, sort_keys=True).encode()).hexdigest()
