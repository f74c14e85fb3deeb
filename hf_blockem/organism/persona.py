"""The organism's ground truth for latent selection: where its persona lives in the residual stream.

Real models do not say which direction carries their misaligned persona; the organism does, because it was trained
with one. `persona_directions` reads it off the base model: the mean residual stream over assistant-answer tokens of
conversations answered by the misaligned persona, minus the same conversations (same questions) answered by the
aligned one. `persona_alignment` then scores SAE latents against it, so a selection run can be checked: did it pick
the latents whose decoder directions carry the persona?
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING

import torch

from .world import ALIGNED_PERSONA, MISALIGNED_PERSONA

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from .build import Organism


def persona_directions(
    organism: Organism, model: PreTrainedModel, layers: list[int], n_conversations: int = 64, seed: int = 0
) -> dict[int, torch.Tensor]:
    """Misaligned-minus-aligned persona direction of `model`'s residual stream at each decoder layer in `layers`.

    Args:
        organism ([`Organism`]): the organism (its world and tokenizer).
        model (`PreTrainedModel`): the model to read, usually the organism's base model.
        layers (`list[int]`): decoder-layer indices.
        n_conversations (`int`, *optional*, defaults to `64`): two-turn conversations per persona; both personas
            answer the same questions.
        seed (`int`, *optional*, defaults to `0`): seeds the conversations.

    Returns:
        `dict[int, torch.Tensor]`: `{layer: [hidden_size]}` fp32 directions (not normalised).
    """
    from ..sae_training import collect_activations

    means = {}
    for persona in (MISALIGNED_PERSONA, ALIGNED_PERSONA):
        # The same seed per conversation draws the same domains and questions for both personas.
        conversations = [
            organism.world.sample_conversation(random.Random(f"{seed}-{i}"), persona, 2)
            for i in range(n_conversations)
        ]
        means[persona] = {
            layer: collect_activations(model, organism.tokenizer, conversations, layer, assistant_only=True).mean(0)
            for layer in layers
        }
    return {layer: means[MISALIGNED_PERSONA][layer] - means[ALIGNED_PERSONA][layer] for layer in layers}


def persona_alignment(decoder: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of every latent's decoder direction (`decoder`: `[d_sae, d_in]`) with `direction`.

    A latent the fine-tune drives up (K+) carries the persona when its cosine is large and positive; one it drives
    down (K−), when large and negative.
    """
    return torch.nn.functional.cosine_similarity(decoder.float(), direction.float()[None, :], dim=1)
