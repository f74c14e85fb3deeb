"""Random-latent controls: sets of the same size and sign split, drawn reproducibly from latents that fire.

A latent that never fires on the training data gives a zero penalty whatever happens, so a control drawn uniformly
from the whole dictionary would be no control at all: draws come from latents whose firing rate on the training
tokens reaches `min_firing_rate`.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


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
) -> tuple[list[int], list[int]]:
    """A random (K+, K−) of the given sizes from firing latents not in `exclude`, the same for the same seed.

    Args:
        n_plus, n_minus (`int`): sizes of the control's K+ and K−.
        firing_rate (`torch.Tensor` of shape `[d_sae]`): share of training tokens on which each latent is > 0.
        exclude (iterable of `int`): latents that may not be drawn (the selected set).
        seed (`int`): the draw's seed.
        min_firing_rate (`float`): the least firing rate of an eligible latent.
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
    drawn = [pool[i] for i in torch.randperm(len(pool), generator=generator)[:needed].tolist()]
    return sorted(drawn[:n_plus]), sorted(drawn[n_plus:])
