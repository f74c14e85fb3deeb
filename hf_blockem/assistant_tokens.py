"""Which tokens of a chat-rendered conversation are the assistant's, for any chat template.

A template with `{% generation %}` markers says so itself (transformers' `return_assistant_tokens_mask`, the mask TRL's
`assistant_only_loss` trains on). Most instruct templates have no markers (Llama 3, Qwen2.5, SmolLM2). For those, an
assistant turn is what its rendering adds to the rendering of the conversation before it followed by the generation
prompt: the answer and the template's end of turn, exactly the tokens a model generates for that turn. Reading it
that way needs a *prefix-preserving* template (rendering the start of a conversation gives the start of its
rendering); that is checked for every turn, never assumed. Spans are found in the rendered text and mapped to tokens
through the tokenizer's offsets, so a token merged across the boundary cannot shift the mask.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from trl.chat_template_utils import has_generation_markers

from .padding import padding


@dataclass
class TokenizedConversations:
    """Right-padded chat renderings with the mask of their assistant tokens.

    Args:
        input_ids (`torch.LongTensor` of shape `[batch, length]`): the renderings' tokens.
        attention_mask (`torch.LongTensor` of shape `[batch, length]`): 1 on real tokens, 0 on padding.
        assistant_mask (`torch.BoolTensor` of shape `[batch, length]`): the assistant turns' tokens.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    assistant_mask: torch.Tensor


def require_chat_template(tokenizer: Any) -> str | dict[str, str]:
    """The tokenizer's chat template; a `ValueError` that says what to do when it has none."""
    template = getattr(tokenizer, "chat_template", None)
    if template is None:
        raise ValueError(
            f"Expected a tokenizer with a chat template, got {type(tokenizer).__name__} without one. Load the instruct "
            "model's tokenizer or set `tokenizer.chat_template`."
        )
    return template


def _render(tokenizer: Any, messages: Sequence[dict[str, str]], generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=generation_prompt)


def assistant_spans(tokenizer: Any, conversation: Sequence[dict[str, str]]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character span of each assistant turn in it (see the module docstring).

    Raises:
        `ValueError`: the template does not render this conversation's beginnings as beginnings of its rendering.
    """
    text, spans = _render(tokenizer, conversation), []
    for i, message in enumerate(conversation):
        if message["role"] != "assistant":
            continue
        if i == 0:
            raise ValueError(
                "Expected each assistant turn to follow a message, got a conversation that opens with one: without "
                "{% generation %} markers its turn is found after the rendering of the messages before it. Start the "
                "conversation with its user (or system) message."
            )
        before, through = (
            _render(tokenizer, conversation[:i], generation_prompt=True),
            _render(tokenizer, conversation[: i + 1]),
        )
        if not (text.startswith(before) and text.startswith(through) and len(before) <= len(through)):
            raise ValueError(
                f"Expected a prefix-preserving chat template to find assistant turn {i} of a conversation without "
                "{% generation %} markers, but the conversation's rendering does not start with the rendering of "
                f"its first {i} messages plus the generation prompt ({before[-60:]!r}) or of its first {i + 1} "
                f"messages ({through[-60:]!r}). Add {{% generation %}} ... {{% endgeneration %}} around the assistant "
                "turns of a copy of the template (`trl.chat_template_utils.get_training_chat_template(tokenizer)` "
                "returns one for the templates TRL knows) and set `tokenizer.chat_template` to it."
            )
        spans.append((len(before), len(through)))
    return text, spans


def _with_markers(tokenizer: Any, conversations: Sequence[Sequence[dict[str, str]]]):
    encoded = tokenizer.apply_chat_template(
        [list(c) for c in conversations], tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    return list(encoded["input_ids"]), [list(map(bool, m)) for m in encoded["assistant_masks"]]


def _by_rendering(tokenizer: Any, conversations: Sequence[Sequence[dict[str, str]]]):
    rows, masks = [], []
    for conversation in conversations:
        text, spans = assistant_spans(tokenizer, conversation)
        # No special tokens added: the template writes its own, as `apply_chat_template` assumes.
        encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        rows.append(list(encoded["input_ids"]))
        # A token counts when it overlaps a turn, as with transformers' {% generation %} masks.
        masks.append([any(start < e and end > s for s, e in spans) for start, end in encoded["offset_mapping"]])
    return rows, masks


def tokenize_conversations(
    tokenizer: Any, conversations: Sequence[Sequence[dict[str, str]]], *, max_length: int | None = None
) -> TokenizedConversations:
    """Renders `conversations` with the tokenizer's chat template and marks their assistant tokens.

    Uses the template's `{% generation %}` markers when it has them, otherwise the assistant turns' renderings (see
    the module docstring).

    Args:
        tokenizer (`PreTrainedTokenizerFast`): a tokenizer with a chat template (a fast one, for the token offsets).
        conversations: lists of `{"role", "content"}` messages (TRL's `messages` format).
        max_length (`int`, *optional*): keep the first `max_length` tokens of longer renderings.

    Raises:
        `ValueError`: no chat template; a template without markers that is not prefix-preserving; a slow tokenizer.
    """
    if has_generation_markers(require_chat_template(tokenizer)):
        rows, masks = _with_markers(tokenizer, conversations)
    elif not getattr(tokenizer, "is_fast", False):
        raise ValueError(
            f"Expected a fast tokenizer (token offsets locate assistant turns in a template without {{% generation %}} "
            f"markers), got {type(tokenizer).__name__}. Load it with `AutoTokenizer.from_pretrained(..., use_fast=True)`."
        )
    else:
        rows, masks = _by_rendering(tokenizer, conversations)
    return right_padded(tokenizer, rows, masks, max_length)


def right_padded(
    tokenizer: Any, rows: Sequence[Sequence[int]], masks: Sequence[Sequence[bool]], max_length: int | None = None
) -> TokenizedConversations:
    """Token rows and their masks cut to `max_length` (their end is dropped) and right-padded into tensors."""
    rows, masks = [list(r)[:max_length] for r in rows], [list(m)[:max_length] for m in masks]
    length = max((len(r) for r in rows), default=0)
    with padding(tokenizer) as pad_id:
        input_ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros(len(rows), length, dtype=torch.long)
    assistant_mask = torch.zeros(len(rows), length, dtype=torch.bool)
    for i, (ids, mask) in enumerate(zip(rows, masks, strict=True)):
        input_ids[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention_mask[i, : len(ids)] = 1
        assistant_mask[i, : len(ids)] = torch.tensor(mask, dtype=torch.bool)
    return TokenizedConversations(input_ids, attention_mask, assistant_mask)
