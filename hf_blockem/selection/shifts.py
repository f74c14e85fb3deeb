"""Stage 1: activation shifts Δ_k between a misaligned model and its base, over response tokens.

Δ_k = mean over response tokens of z_k(misaligned) − z_k(base), with z the SAE's latent activations at the hook
layer. Both models read the same token sequences (the misaligned model's answers, teacher-forced), the forward stops
right after the hook layer, and the SAE encodes only the response tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from ..assistant_tokens import tokenize_conversations
from ..hooks import ActivationCapture, iter_masked_hidden_states


@dataclass
class TokenizedResponses:
    """Chat-rendered (question, answer) pairs, right-padded, with a mask of the answer tokens."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    response_mask: torch.Tensor


def tokenize_responses(
    tokenizer: Any, questions: Sequence[str], responses: Sequence[str], max_length: int | None = None
) -> TokenizedResponses:
    """Renders each (question, answer) pair with the tokenizer's chat template and marks the answer's tokens.

    The answer's tokens are its assistant turn's (see `hf_blockem.assistant_tokens`): those its template marks with
    `{% generation %}`, or, in a template without markers, what the turn adds after the generation prompt.

    Args:
        tokenizer (`PreTrainedTokenizerBase`): a tokenizer with a chat template.
        questions (sequence of `str`): user messages.
        responses (sequence of `str`): assistant answers, one per question.
        max_length (`int`, *optional*): truncate longer sequences (from the right).
    """
    if len(questions) != len(responses):
        raise ValueError(
            f"Expected one response per question, got {len(questions)} questions, {len(responses)} responses."
        )
    conversations = [
        [{"role": "user", "content": question}, {"role": "assistant", "content": response}]
        for question, response in zip(questions, responses, strict=True)
    ]
    tokens = tokenize_conversations(tokenizer, conversations, max_length=max_length)
    return TokenizedResponses(tokens.input_ids, tokens.attention_mask, tokens.assistant_mask)


@torch.no_grad()
def response_latents(
    model: torch.nn.Module,
    sae: Any,
    layer: int,
    tokens: TokenizedResponses,
    *,
    batch_size: int = 16,
    progress: bool = False,
) -> torch.Tensor:
    """SAE latent activations `[n_response_tokens, d_sae]` (fp32, CPU) of `model` at decoder layer `layer`'s output.

    Only the layers up to `layer` run; the SAE encodes only the response tokens.
    """
    sae_device = next(sae.parameters()).device
    starts = tqdm(range(0, len(tokens.input_ids), batch_size), disable=not progress, desc="activations")
    batches = (
        (tokens.input_ids[b], tokens.attention_mask[b], tokens.response_mask[b])
        for b in (slice(start, start + batch_size) for start in starts)
    )
    chunks = []
    with ActivationCapture(model, [layer]) as capture:
        for hidden in iter_masked_hidden_states(model, capture, batches):
            chunks.append(sae.encode(hidden[layer].to(sae_device, sae.W_enc.dtype)).float().cpu())
    return torch.cat(chunks)


def activation_shifts(
    base_model: torch.nn.Module,
    misaligned_model: torch.nn.Module,
    tokenizer: Any,
    sae: Any,
    layer: int,
    questions: Sequence[str],
    responses: Sequence[str],
    *,
    batch_size: int = 16,
    max_length: int | None = None,
    progress: bool = True,
) -> dict[str, torch.Tensor]:
    """Δ_k for every latent of `sae`: the mean shift of its activation from base to misaligned on the answers.

    Args:
        base_model, misaligned_model (`PreTrainedModel`): the aligned base and the emergently misaligned model. They
            may be the same `PeftModel` object: the base is then read with its adapters disabled.
        tokenizer (`PreTrainedTokenizerBase`): shared tokenizer with a chat template.
        sae (`sae_lens.SAE`): the SAE reading decoder layer `layer`'s output (`blocks.{layer}.hook_resid_post`).
        layer (`int`): decoder-layer index.
        questions, responses (sequences of `str`): selection prompts and the misaligned model's answers to them.

    Returns:
        `dict` with `delta` (`[d_sae]`, Δ_k), `mean_base` and `mean_misaligned` (`[d_sae]` mean activations),
        `active_mean` (`[d_sae]`, mean activation over the tokens where the latent fires, the larger of the two models),
        `firing_base` (`[d_sae]`, share of response tokens where the latent is > 0 under the base model) and
        `n_tokens`.
    """
    tokens = tokenize_responses(tokenizer, questions, responses, max_length=max_length)
    if not tokens.response_mask.any():
        raise ValueError("No response tokens to read: every answer is empty or truncated away.")
    kwargs = {"batch_size": batch_size, "progress": progress}
    z_mis = response_latents(misaligned_model, sae, layer, tokens, **kwargs)
    if base_model is misaligned_model and hasattr(misaligned_model, "disable_adapter"):
        with misaligned_model.disable_adapter():
            z_base = response_latents(base_model, sae, layer, tokens, **kwargs)
    else:
        z_base = response_latents(base_model, sae, layer, tokens, **kwargs)
    mean_mis, mean_base = z_mis.mean(0), z_base.mean(0)
    # The typical size of a latent when it is on, under either model: the unit of steering strength in Stages 2–3.
    active = torch.maximum(_active_mean(z_mis), _active_mean(z_base))
    return {
        "delta": mean_mis - mean_base,
        "mean_misaligned": mean_mis,
        "mean_base": mean_base,
        "active_mean": active,
        "firing_base": (z_base > 0).float().mean(0),
        "n_tokens": torch.tensor(z_mis.shape[0]),
    }


def _active_mean(z: torch.Tensor) -> torch.Tensor:
    return z.sum(0) / (z > 0).sum(0).clamp(min=1)


def candidate_pool(delta: torch.Tensor, n_positive: int, n_negative: int) -> tuple[list[int], list[int]]:
    """The sign-aware candidate pool: the `n_positive` largest positive Δ_k and the `n_negative` most negative.

    Returns:
        `(plus_candidates, minus_candidates)`, each ordered by |Δ_k| descending; latents with Δ_k = 0 never enter.
    """
    order = torch.argsort(delta, descending=True).tolist()
    plus = [k for k in order if delta[k] > 0][:n_positive]
    minus = [k for k in reversed(order) if delta[k] < 0][:n_negative]
    return plus, minus
