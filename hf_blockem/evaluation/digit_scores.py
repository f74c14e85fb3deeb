"""The probability that a local judge writes each integer 0–100, when its tokenizer writes numbers digit by digit.

Qwen2 / Qwen2.5, Gemma and SmolLM2 write 95 as "9", "5": reading one next token would score it 9. The probability
that the judge writes the integer n is instead a product along its digits: P(first digit) · P(next digit | first) ·
P(stop | all digits), "stop" being any token but a digit. Three forward steps give it for every n in 0–100 at once:
the prompt; the prompt followed by each of the ten digits (ten rows sharing the prompt's key-value cache, so the prompt
runs once); and the prompt followed by "1", "0", which tells 10 from 100. A "0" followed by a digit is a leading zero,
not a score. A two-digit number other than 10 is taken to stop after its second digit: a third digit would make it
larger than 100, which a judge asked for 0–100 practically never writes, and its mass stays with the two-digit number.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import torch


def digit_token_ids(tokenizer: Any) -> list[int] | None:
    """The token ids of "0"–"9" when the tokenizer writes every integer 0–100 as its digits, one token each; else
    `None` (a tokenizer with number tokens, or one that writes a space marker before a digit)."""
    ids = []
    for digit in "0123456789":
        encoded = tokenizer.encode(digit, add_special_tokens=False)
        if len(encoded) != 1:
            return None
        ids.append(encoded[0])
    for value in range(101):
        if tokenizer.encode(str(value), add_special_tokens=False) != [ids[int(c)] for c in str(value)]:
            return None
    return ids


def _cache_keyword(model: torch.nn.Module) -> str:
    # transformers 5.2x renamed the forward's `past_key_values` to `cache` (the old name still works, with a warning).
    get_base_model = getattr(model, "get_base_model", None)  # a PeftModel forwards keywords to the model it wraps
    forward = (get_base_model() if callable(get_base_model) else model).forward
    return "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"


def _next(model: torch.nn.Module, cache: Any = None, **inputs: Any) -> tuple[torch.Tensor, Any]:
    """The next-token distribution after `inputs` (continuing `cache` when given) and the updated cache."""
    keyword = _cache_keyword(model)
    if cache is not None:
        inputs[keyword] = cache
    out = model(**inputs, use_cache=True, logits_to_keep=1)
    return torch.softmax(out.logits[:, -1].float(), dim=-1), out[keyword]


@torch.inference_mode()
def number_probabilities(
    model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, digits: Sequence[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """The next-token distribution after left-padded prompts, and the probability of each integer 0–100.

    Args:
        model (`PreTrainedModel`): the judge, a causal LM with a key-value cache.
        input_ids, attention_mask (`torch.LongTensor` of shape `[batch, length]`): left-padded prompts on the model's
            device.
        digits (sequence of `int`): the token ids of "0"–"9" ([`digit_token_ids`]).

    Returns:
        `(first, numbers)`: `[batch, vocab]` and `[batch, 101]`, fp32.
    """
    batch, device = input_ids.shape[0], input_ids.device
    digits = torch.tensor(list(digits), device=device)
    position = attention_mask.sum(-1, keepdim=True)  # where each row's next token goes, padding left out
    first, cache = _next(
        model,
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=(attention_mask.cumsum(-1) - 1).clamp(min=0),
    )
    # Each prompt followed by each digit: rows b * 10 + d.
    cache.batch_repeat_interleave(10)
    mask = torch.cat([attention_mask.repeat_interleave(10, 0), attention_mask.new_ones(batch * 10, 1)], dim=-1)
    second, cache = _next(
        model,
        input_ids=digits.repeat(batch)[:, None],
        attention_mask=mask,
        position_ids=position.repeat_interleave(10, 0),
        cache=cache,
    )
    # Each prompt followed by "1", "0": is a third digit next (100) or not (10)?
    ones = torch.arange(batch, device=device) * 10 + 1
    cache.batch_select_indices(ones)
    third, _ = _next(
        model,
        input_ids=digits[:1].repeat(batch)[:, None],
        attention_mask=torch.cat([mask[ones], attention_mask.new_ones(batch, 1)], dim=-1),
        position_ids=position + 1,
        cache=cache,
    )
    digits = digits.to(first.device)  # the logits sit with the last layer (`device_map` may split the model)
    p1 = first[:, digits]  # [batch, d1]
    p2 = second[:, digits].view(batch, 10, 10)  # [batch, d1, d2]
    p3 = third[:, digits]  # [batch, d3] after "10"
    numbers = torch.zeros(batch, 101, device=first.device)
    numbers[:, :10] = p1 * (1 - p2.sum(-1)).clamp(min=0)  # one digit, then anything but a digit
    numbers[:, 10:100] = (p1[:, 1:, None] * p2[:, 1:, :]).reshape(batch, 90)
    ten = p1[:, 1] * p2[:, 1, 0]
    numbers[:, 10] = ten * (1 - p3.sum(-1)).clamp(min=0)
    numbers[:, 100] = ten * p3[:, 0]
    return first, numbers
