"""Misalignment directions in the residual stream: what the cross-layer rerouting monitor projects on.

At selection time, for each monitored layer L, d_L = mean over the probe's tokens of h_L(misaligned) − h_L(base),
the residual-stream shift that emergent misalignment produced at the output of decoder layer L. During training the
diagnostics report mean_t ⟨h_θ − h_base, d_L⟩ / ‖d_L‖²: 0 at the base model, about 1 at the misaligned model on the
selection data. Store the directions with the latent set (`LatentSet(..., directions=...)`) so they travel with it.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from ..hooks import ActivationCapture
from ..peft_aliasing import reading_base
from .probe import ProbeBatch, probe_hidden_states


def _hidden(model: torch.nn.Module, layers: list[int], probe: ProbeBatch, batch_size: int) -> dict[int, torch.Tensor]:
    with ActivationCapture(model, layers) as capture:
        return probe_hidden_states(model, capture, probe, batch_size=batch_size)


@torch.no_grad()
def misalignment_directions(
    base_model: torch.nn.Module,
    misaligned_model: torch.nn.Module,
    probe: ProbeBatch,
    layers: Iterable[int],
    batch_size: int = 32,
) -> dict[int, torch.Tensor]:
    """Mean difference of residual-stream activations, misaligned minus base, at each layer's output.

    Args:
        base_model (`PreTrainedModel`): the aligned base model.
        misaligned_model (`PreTrainedModel`): the emergently misaligned model. It may be the same `PeftModel` object
            as `base_model`, or the model its adapters were injected into: the base is then read with its adapters
            disabled.
        probe ([`ProbeBatch`]): the selection prompts with answers (for example [`probe_batch`] of the out-of-domain
            selection questions and the misaligned model's answers, as in Stage 1); both models read the same tokens.
        layers (`Iterable[int]`): decoder-layer indices (`blocks.L.hook_resid_post`, i.e. `hidden_states[L + 1]`).
        batch_size (`int`, *optional*, defaults to `32`): probe rows per forward.

    Returns:
        `dict[int, torch.Tensor]`: `{layer: [d_in]}` fp32 CPU directions, ready for `LatentSet(directions=...)`.
    """
    layers = sorted(set(int(layer) for layer in layers))
    misaligned = _hidden(misaligned_model, layers, probe, batch_size)
    with reading_base(base_model, misaligned_model) as base_view:
        base = _hidden(base_view, layers, probe, batch_size)
    directions = {layer: (misaligned[layer] - base[layer]).mean(0).cpu() for layer in layers}
    flat = [layer for layer, d in directions.items() if not d.abs().sum() > 0]
    if flat:
        raise ValueError(
            f"The misaligned and base models have identical activations at layers {flat} on the probe: there is no "
            "direction to monitor there. Pass the fine-tuned model (with its adapters enabled) as `misaligned_model`."
        )
    return directions
