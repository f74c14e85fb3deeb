"""The interface every source of base activations implements: `z_base` on the penalised tokens."""

from __future__ import annotations

import torch
from torch import nn

from ..hooks import ActivationCapture, tokens_at_mask
from ..latent_set import LatentSet

# Batch key under which the cache collator hands precomputed z_base to `compute_loss`. The values travel as the int32
# view of their fp32 bits, so that no input preparation (DeepSpeed casts floating inputs to bf16) can round them.
CACHED_Z_BASE_KEY = "blockem_z_base"


def forward_inputs(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The model inputs of a batch, without the cached z_base the cache collator may have added."""
    return {key: value for key, value in inputs.items() if key != CACHED_Z_BASE_KEY}


class BaseActivations:
    """Where z_base, the base model's activations of the blocked latents, comes from.

    Subclasses implement `z_base`. The trainer calls it once per micro-batch, before its own forward, inside the
    capture hooks of the trained model.

    Args:
        latent_set ([`LatentSet`]):
            The blocked latents (their layers and encoder columns).
    """

    mode: str = ""

    def __init__(self, latent_set: LatentSet):
        self.latent_set = latent_set

    def z_base(
        self,
        model: nn.Module,
        capture: ActivationCapture,
        inputs: dict[str, torch.Tensor],
        mask: torch.Tensor,
    ) -> dict[int, torch.Tensor]:
        """The base model's latent activations on the tokens selected by `mask`.

        Args:
            model (`torch.nn.Module`):
                The model being trained (possibly wrapped).
            capture ([`ActivationCapture`]):
                The trained model's capture hooks, attached.
            inputs (`dict[str, torch.Tensor]`):
                The model inputs of the micro-batch (no labels).
            mask (`torch.BoolTensor` of shape `(batch, seq)`):
                The tokens the penalty applies to.

        Returns:
            `dict[int, torch.Tensor]`: per blocked layer, a `[mask.sum(), n_latents]` fp32 tensor without gradient,
            columns ordered like the layer's latents (`plus` then `minus`).
        """
        raise NotImplementedError


class OnTheFlyBaseActivations(BaseActivations):
    """A source that runs a base forward pass every step and encodes the captured hidden states."""

    def hidden_states(
        self, model: nn.Module, capture: ActivationCapture, inputs: dict[str, torch.Tensor]
    ) -> dict[int, torch.Tensor]:
        """The base model's hidden states `{layer: [batch, seq, d_in]}` at the blocked layers."""
        raise NotImplementedError

    def z_base(self, model, capture, inputs, mask):
        # no_grad, not inference_mode: FSDP2 and ZeRO-3 gather parameters into buffers that the training forward
        # reuses, and a buffer first written under inference mode cannot be updated in place outside it.
        with torch.no_grad():
            hidden = self.hidden_states(model, capture, forward_inputs(inputs))
            return {
                blocked.layer: blocked.encode(tokens_at_mask(hidden[blocked.layer], mask))
                for blocked in self.latent_set.layers
            }
