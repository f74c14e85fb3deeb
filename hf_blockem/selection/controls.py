"""Random-latent controls: sets of the same size and sign split, drawn reproducibly from latents that fire.

A latent that never fires on the training data gives a zero penalty whatever happens, so a control drawn uniformly
from the whole dictionary would be no control at all: draws come from latents whose firing rate on the training
tokens reaches `min_firing_rate`. With `match`, each control latent is also drawn among the latents that fire about as
often as the selected latent it stands for: a dense latent (one that fires on most tokens) constrains the residual
stream far more than a sparse one under a one-sided penalty, so an unmatched draw that happens to pick dense latents
measures density, not the choice of latents.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Sequence

import torch


def firing_rates(
    model, tokenizer, sae, layer: int, conversations, *, batch_size: int = 64, max_length: int = 512
) -> torch.Tensor:
    """Share of the assistant tokens of `conversations` (TRL `messages` lists) on which each SAE latent is > 0.

    Streams: each batch's activations are encoded on the SAE's device and counted, so the memory used does not grow
    with the number of conversations.

    Args:
        model (`torch.nn.Module`): the base model the SAE reads (activations at decoder layer `layer`'s output).
        tokenizer: its tokenizer, with a chat template (assistant turns are found as in `collect_activations`).
        sae: a SAELens SAE (anything with `encode` and `W_enc`).
        layer (`int`): the decoder layer.
        conversations: the training conversations.
        batch_size (`int`, *optional*, defaults to `64`): conversations per forward pass.
        max_length (`int`, *optional*, defaults to `512`): longer renderings are truncated from the right.

    Returns:
        `torch.Tensor` of shape `[d_sae]` (fp32, CPU).
    """
    from ..sae_training import iter_activations

    device, dtype = sae.W_enc.device, sae.W_enc.dtype
    fired, n_tokens = torch.zeros(sae.W_enc.shape[1], dtype=torch.float64, device=device), 0
    chunks = iter_activations(
        model, tokenizer, conversations, layer, batch_size=batch_size, max_length=max_length, assistant_only=True
    )
    with torch.no_grad(), contextlib.closing(chunks):  # closed on an error too: no hook outlives the pass
        for chunk in chunks:
            fired += (sae.encode(chunk.to(device, dtype)) > 0).sum(0, dtype=torch.float64)
            n_tokens += chunk.shape[0]
    return (fired / n_tokens).float().cpu()


def firing_latents(firing_rate: torch.Tensor, min_firing_rate: float = 0.01) -> list[int]:
    """Latent ids whose share of firing tokens is at least `min_firing_rate`."""
    return torch.nonzero(firing_rate >= min_firing_rate).flatten().tolist()


def random_control(
    n_plus: int,
    n_minus: int,
    firing_rate: torch.Tensor,
    *,
    exclude: Iterable[int] = (),
    seed: int = 0,
    min_firing_rate: float = 0.01,
    match: Sequence[int] | None = None,
    neighbours: int = 5,
) -> tuple[list[int], list[int]]:
    """A random (K+, K−) of the given sizes from firing latents not in `exclude`, the same for the same seed.

    Args:
        n_plus, n_minus (`int`): sizes of the control's K+ and K−.
        firing_rate (`torch.Tensor` of shape `[d_sae]`): share of training tokens on which each latent is > 0.
        exclude (iterable of `int`): latents that may not be drawn (the selected set).
        seed (`int`): the draw's seed.
        min_firing_rate (`float`): the least firing rate of an eligible latent.
        match (sequence of `int`, *optional*): the selected latents, K+ first then K− (`n_plus + n_minus` ids). Each
            control latent is then drawn uniformly from the `neighbours` eligible latents whose firing rate is
            closest (in log scale) to that of the selected latent in the same position.
        neighbours (`int`, *optional*, defaults to `5`): how many nearest latents a matched draw chooses from.
    """
    excluded = set(exclude)
    pool = [k for k in firing_latents(firing_rate, min_firing_rate) if k not in excluded]
    needed = n_plus + n_minus
    if len(pool) < needed:
        raise ValueError(
            f"A random control needs {needed} latents that fire on at least {min_firing_rate:.1%} of the training "
            f"tokens and are not selected; only {len(pool)} do. Lower `min_firing_rate` or use a wider SAE."
        )
    generator = torch.Generator().manual_seed(seed)
    if match is None:
        drawn = [pool[i] for i in torch.randperm(len(pool), generator=generator)[:needed].tolist()]
        return sorted(drawn[:n_plus]), sorted(drawn[n_plus:])
    if len(match) != needed:
        raise ValueError(f"`match` must list the {needed} selected latents (K+ then K−), got {len(match)} ids.")
    log_rate = torch.log(firing_rate.double().clamp_min(1e-6))
    drawn = []
    for target in match:
        left = [k for k in pool if k not in drawn]
        distance = (log_rate[left] - log_rate[target]).abs()
        nearest = [left[i] for i in torch.argsort(distance, stable=True)[:neighbours].tolist()]
        drawn.append(nearest[int(torch.randint(len(nearest), (1,), generator=generator))])
    return sorted(drawn[:n_plus]), sorted(drawn[n_plus:])
