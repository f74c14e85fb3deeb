"""The fixed probe batch the diagnostics read: token ids, padding mask, and the tokens whose activations count.

The probe never changes during a run, so the base model's activations on it are computed once, and every logging
step costs one no-grad forward of the probe, stopped after the deepest monitored layer.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..hooks import ActivationCapture, iter_masked_hidden_states


@dataclass
class ProbeBatch:
    """A right-padded batch of token sequences and the mask of the tokens the diagnostics average over.

    Args:
        input_ids (`torch.LongTensor` of shape `(batch, seq)`): token ids.
        attention_mask (`torch.LongTensor` of shape `(batch, seq)`): 1 on real tokens, 0 on padding.
        token_mask (`torch.BoolTensor` of shape `(batch, seq)`): tokens whose activations count (for example the
            answer tokens of out-of-domain prompts, or the loss tokens of a few training examples).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    token_mask: torch.Tensor

    def __post_init__(self):
        shapes = {tuple(t.shape) for t in (self.input_ids, self.attention_mask, self.token_mask)}
        if len(shapes) != 1 or self.input_ids.ndim != 2:
            raise ValueError(
                "Expected input_ids, attention_mask and token_mask of one shape (batch, seq), got "
                f"{[list(t.shape) for t in (self.input_ids, self.attention_mask, self.token_mask)]}."
            )
        self.token_mask = self.token_mask.bool() & self.attention_mask.bool()
        if not self.token_mask.any():
            raise ValueError("The probe batch has no token to average over: its token_mask is empty.")

    @property
    def n_tokens(self) -> int:
        """Tokens the probe averages over (its token mask, within the attention mask)."""
        return int(self.token_mask.sum())

    @classmethod
    def from_inputs(cls, inputs: Any) -> ProbeBatch:
        """A probe from a `ProbeBatch`, a mapping or a list of them (concatenated, re-padded on the right).

        A mapping needs `input_ids`; `attention_mask` defaults to all ones; the token mask is `token_mask`, else
        `response_mask`, else `labels != -100` (a collated training batch), else every real token but the first.
        `TokenizedResponses` from `hf_blockem.selection` are accepted too (their answer tokens count).
        """
        if isinstance(inputs, ProbeBatch):
            return inputs
        if isinstance(inputs, Sequence) and not isinstance(inputs, (str, bytes)):
            parts = [cls.from_inputs(part) for part in inputs]
            if not parts:
                raise ValueError("Expected at least one probe batch, got an empty list.")
            width = max(p.input_ids.shape[1] for p in parts)

            def pad(t, value):
                return torch.nn.functional.pad(t, (0, width - t.shape[1]), value=value)

            return cls(
                torch.cat([pad(p.input_ids, 0) for p in parts]),
                torch.cat([pad(p.attention_mask, 0) for p in parts]),
                torch.cat([pad(p.token_mask, False) for p in parts]),
            )
        if not isinstance(inputs, Mapping):
            inputs = vars(inputs)  # a TokenizedResponses dataclass
        input_ids = torch.as_tensor(inputs["input_ids"])
        attention_mask = inputs.get("attention_mask")
        attention_mask = torch.ones_like(input_ids) if attention_mask is None else torch.as_tensor(attention_mask)
        for key in ("token_mask", "response_mask"):
            if inputs.get(key) is not None:
                return cls(input_ids, attention_mask, torch.as_tensor(inputs[key]))
        if inputs.get("labels") is not None:
            return cls(input_ids, attention_mask, torch.as_tensor(inputs["labels"]) != -100)
        first = attention_mask.long().cumsum(-1) == 1
        return cls(input_ids, attention_mask, attention_mask.bool() & ~first)

    def shard(self, index: int, count: int) -> ProbeBatch | None:
        """The rows `index::count` (one process's share), or `None` when that share holds no counted token."""
        rows = slice(index, None, count)
        mask = self.token_mask[rows]
        if not mask.any():
            return None
        return ProbeBatch(self.input_ids[rows], self.attention_mask[rows], mask)


def probe_batch(
    tokenizer: Any, questions: Sequence[str], responses: Sequence[str], max_length: int | None = None
) -> ProbeBatch:
    """A probe of chat-rendered (question, answer) pairs whose answer tokens count.

    Args:
        tokenizer (`PreTrainedTokenizerBase`): the model's tokenizer, with a chat template.
        questions (sequence of `str`): user messages, for example the out-of-domain selection prompts.
        responses (sequence of `str`): one answer per question (teacher-forced).
        max_length (`int`, *optional*): truncate longer sequences.

    Returns:
        [`ProbeBatch`]
    """
    from ..selection.shifts import tokenize_responses

    return ProbeBatch.from_inputs(tokenize_responses(tokenizer, questions, responses, max_length=max_length))


@torch.no_grad()
def probe_hidden_states(
    model: torch.nn.Module, capture: ActivationCapture, probe: ProbeBatch, batch_size: int = 32
) -> dict[int, torch.Tensor]:
    """Residual-stream activations `{layer: [n_tokens, d_in]}` (fp32) of `model` on the probe's counted tokens.

    The forward stops after the deepest watched layer, runs in eval mode (no dropout) and without gradient.
    """
    chunks: dict[int, list[torch.Tensor]] = {layer: [] for layer in capture.layers}
    rows = [slice(start, start + batch_size) for start in range(0, probe.input_ids.shape[0], batch_size)]
    batches = ((probe.input_ids[r], probe.attention_mask[r], probe.token_mask[r]) for r in rows)
    for hidden in iter_masked_hidden_states(model, capture, batches):
        for layer, value in hidden.items():
            chunks[layer].append(value.float())
    return {layer: torch.cat(values) for layer, values in chunks.items()}
