"""Stage 1: activation shifts Δ_k between a misaligned model and its base, over response tokens.

Δ_k = mean over response tokens of z_k(misaligned) − z_k(base), with z the SAE's latent activations at the hook
layer. Both models read the same token sequences (the misaligned model's answers, teacher-forced), the forward stops
right after the hook layer, and the SAE encodes only the response tokens.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from ..assistant_tokens import require_chat_template, right_padded
from ..hooks import ActivationCapture, iter_masked_hidden_states
from ..peft_aliasing import reading_base


@dataclass
class TokenizedResponses:
    """(question, answer) pairs as the model wrote them (the question's generation prompt, then the answer),
    right-padded, with a mask of the answer tokens."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    response_mask: torch.Tensor


def tokenize_responses(
    tokenizer: Any, questions: Sequence[str], responses: Sequence[str], max_length: int | None = None
) -> TokenizedResponses:
    """Each question rendered with the chat template's generation prompt, followed by its answer: the sequence the
    model generated. The answer's tokens and the end-of-sequence token after them are marked.

    The answer is not re-rendered as an assistant turn: a template may render a turn differently from how the model
    wrote it (reasoning stripped from earlier turns, a header inside `{% generation %}` markers), and the activations
    of Stage 1 and the diagnostics are read on what the model wrote.

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
    require_chat_template(tokenizer)
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    rows, masks = [], []
    for question, response in zip(questions, responses, strict=True):
        user = [{"role": "user", "content": question}]
        prompt = list(
            tokenizer.apply_chat_template(user, add_generation_prompt=True, tokenize=True, return_dict=True)[
                "input_ids"
            ]
        )
        answer = list(tokenizer(response, add_special_tokens=False)["input_ids"]) + eos
        rows.append(prompt + answer)
        masks.append([False] * len(prompt) + [True] * len(answer))
    tokens = right_padded(tokenizer, rows, masks, max_length)
    return TokenizedResponses(tokens.input_ids, tokens.attention_mask, tokens.assistant_mask)


TOKEN_CHUNK = 2048  # response tokens the SAE encodes at once in `activation_shifts`: bounds its [rows, d_sae] tensors


def _response_hidden_states(
    model: torch.nn.Module, layer: int, tokens: TokenizedResponses, batch_size: int, progress: bool
) -> Iterator[torch.Tensor]:
    """Decoder layer `layer`'s output `[n_batch_response_tokens, d_in]` on the response tokens, batch by batch."""
    starts = tqdm(range(0, len(tokens.input_ids), batch_size), disable=not progress, desc="activations")
    batches = (
        (tokens.input_ids[b], tokens.attention_mask[b], tokens.response_mask[b])
        for b in (slice(start, start + batch_size) for start in starts)
    )
    with ActivationCapture(model, [layer]) as capture:
        for hidden in iter_masked_hidden_states(model, capture, batches):
            yield hidden[layer]


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

    Only the layers up to `layer` run; the SAE encodes only the response tokens. The result grows with the number of
    tokens times `d_sae`: for statistics over many answers, use `activation_shifts`, which streams.
    """
    sae_device = next(sae.parameters()).device
    with contextlib.closing(_response_hidden_states(model, layer, tokens, batch_size, progress)) as batches:
        chunks = [sae.encode(hidden.to(sae_device, sae.W_enc.dtype)).float().cpu() for hidden in batches]
    return torch.cat(chunks)


def steering_unit(sae: Any, hidden: torch.Tensor) -> torch.Tensor:
    """Per token `[n]`: what one unit of the SAE's decoder space is in the residual stream.

    An SAE that normalises its input at run time decodes in the normalised space and scales back: latent k at z adds
    z·W_dec[k]·unit to the residual stream, unit = ‖x‖/√d_in for `constant_norm_rescale`, the standard deviation of x
    for `layer_norm`, and 1 otherwise. Steering adds α·W_dec[k] to the residual stream itself, so a strength measured
    in latent activations must be multiplied by this unit to mean the same thing.
    """
    normalisation = getattr(sae.cfg, "normalize_activations", "none")
    x = hidden.double()
    if normalisation == "constant_norm_rescale":
        return x.norm(dim=-1) / sae.cfg.d_in**0.5
    if normalisation == "layer_norm":
        return x.std(dim=-1)
    return torch.ones(x.shape[0], dtype=torch.float64, device=x.device)


@torch.no_grad()
def _response_latent_sums(
    model: torch.nn.Module,
    sae: Any,
    layer: int,
    tokens: TokenizedResponses,
    *,
    batch_size: int,
    token_chunk: int,
    progress: bool,
) -> dict[str, torch.Tensor]:
    """Running sums over the response tokens of `model`'s SAE latents, never holding more than `token_chunk` rows.

    Returns float64 `sum` (Σ z), `positive_sum` (Σ z where z > 0), int64 `n_positive` (count of z > 0), each
    `[d_sae]` on the SAE's device, `unit_sum` (Σ of [`steering_unit`]) and `n_tokens`.
    """
    if token_chunk < 1:
        raise ValueError(f"Expected token_chunk >= 1, got {token_chunk}.")
    sae_device = next(sae.parameters()).device
    sums: dict[str, torch.Tensor] = {}
    n_tokens = 0
    # Closed on an error too: the capture's hooks never outlive this pass (the next may read the same model).
    with contextlib.closing(_response_hidden_states(model, layer, tokens, batch_size, progress)) as batches:
        for hidden in batches:
            for start in range(0, hidden.shape[0], token_chunk):
                z = sae.encode(hidden[start : start + token_chunk].to(sae_device, sae.W_enc.dtype))
                fires = z > 0
                chunk = {
                    "sum": z.sum(0, dtype=torch.float64),
                    "positive_sum": torch.where(fires, z, 0).sum(0, dtype=torch.float64),
                    "n_positive": fires.sum(0),
                    "unit_sum": steering_unit(sae, hidden[start : start + token_chunk]).sum().to(sae_device),
                }
                for key, value in chunk.items():
                    sums[key] = sums[key] + value if key in sums else value
                n_tokens += z.shape[0]
    sums["n_tokens"] = torch.tensor(n_tokens)
    return sums


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
    token_chunk: int = TOKEN_CHUNK,
) -> dict[str, torch.Tensor]:
    """Δ_k for every latent of `sae`: the mean shift of its activation from base to misaligned on the answers.

    Streams: each batch's response tokens are encoded `token_chunk` rows at a time on the SAE's device, in its dtype,
    and only float64 running sums `[d_sae]` per model are kept, so memory does not grow with the number of tokens.

    Args:
        base_model, misaligned_model (`PreTrainedModel`): the aligned base and the emergently misaligned model. They
            may be the same `PeftModel` object, or the model its adapters were injected into and the `PeftModel`:
            the base is then read with its adapters disabled.
        tokenizer (`PreTrainedTokenizerBase`): shared tokenizer with a chat template.
        sae (`sae_lens.SAE`): the SAE reading decoder layer `layer`'s output (`blocks.{layer}.hook_resid_post`).
        layer (`int`): decoder-layer index.
        questions, responses (sequences of `str`): selection prompts and the misaligned model's answers to them.
        token_chunk (`int`, *optional*, defaults to `TOKEN_CHUNK`): the most response tokens encoded at once.

    Returns:
        `dict` with `delta` (`[d_sae]`, Δ_k), `mean_base` and `mean_misaligned` (`[d_sae]` mean activations),
        `active_mean` (`[d_sae]`, mean activation over the tokens where the latent fires, the larger of the two models),
        `firing_base` (`[d_sae]`, share of response tokens where the latent is > 0 under the base model),
        `steering_unit` (scalar, the mean [`steering_unit`] over both models' tokens: 1 for an SAE without run-time
        input normalisation) and `n_tokens`. All fp32 on the CPU but `n_tokens` (an int64 scalar).
    """
    tokens = tokenize_responses(tokenizer, questions, responses, max_length=max_length)
    if not tokens.response_mask.any():
        raise ValueError("No response tokens to read: every answer is empty or truncated away.")
    kwargs = {"batch_size": batch_size, "token_chunk": token_chunk, "progress": progress}
    s_mis = _response_latent_sums(misaligned_model, sae, layer, tokens, **kwargs)
    with reading_base(base_model, misaligned_model) as base:
        s_base = _response_latent_sums(base, sae, layer, tokens, **kwargs)
    n_tokens = int(s_mis["n_tokens"])

    def fp32(t: torch.Tensor) -> torch.Tensor:
        return t.float().cpu()

    mean_mis, mean_base = fp32(s_mis["sum"] / n_tokens), fp32(s_base["sum"] / n_tokens)
    # The typical size of a latent when it is on, under either model: the unit of steering strength in Stages 2–3.
    active = torch.maximum(fp32(_active_mean(s_mis)), fp32(_active_mean(s_base)))
    return {
        "delta": mean_mis - mean_base,
        "mean_misaligned": mean_mis,
        "mean_base": mean_base,
        "active_mean": active,
        "firing_base": fp32(s_base["n_positive"].double() / n_tokens),
        "steering_unit": fp32((s_mis["unit_sum"] + s_base["unit_sum"]) / (2 * n_tokens)),
        "n_tokens": torch.tensor(n_tokens),
    }


def _active_mean(sums: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean of z over the tokens where it is > 0 (0 for a latent that never fires)."""
    return sums["positive_sum"] / sums["n_positive"].clamp(min=1)


def candidate_pool(delta: torch.Tensor, n_positive: int, n_negative: int) -> tuple[list[int], list[int]]:
    """The sign-aware candidate pool: the `n_positive` largest positive Δ_k and the `n_negative` most negative.

    Returns:
        `(plus_candidates, minus_candidates)`, each ordered by |Δ_k| descending; latents with Δ_k = 0 never enter.
    """
    order = torch.argsort(delta, descending=True).tolist()
    plus = [k for k in order if delta[k] > 0][:n_positive]
    minus = [k for k in reversed(order) if delta[k] < 0][:n_negative]
    return plus, minus
