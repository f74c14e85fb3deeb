"""The BLOCK-EM penalty and the mask of tokens it applies to (pure functions).

For one blocked layer with latents K = K+ ∪ K- and per-latent sign s_k (+1 on K+, -1 on K-):

    L_block = (1 / N) · Σ_{t ∈ T} Σ_{k ∈ K} ReLU(s_k · (z_θ,k(t) − z_base,k(t)))²

summed over blocked layers, where T is the set of tokens that carry the SFT loss (labels != -100, first token of
each sequence excluded) and N is the *same denominator the cross-entropy loss uses* (the trainer passes it in). The
one-sided ReLU lets a latent move in the harmless direction and forbids it to move past its base value in the
misaligned one. Everything is computed in fp32: z_θ ≈ z_base at the start of training, where bf16 would cancel.
"""

from __future__ import annotations

import torch


def loss_token_mask(
    labels: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    input_ids: torch.Tensor | None = None,
    bos_token_id: int | None = None,
    exclude_first_token: bool = True,
) -> torch.Tensor:
    """The tokens the penalty applies to: those that carry the SFT loss, without sequence starts.

    Args:
        labels (`torch.Tensor` of shape `(batch, seq)`):
            Labels as the trainer sees them; `-100` marks prompt, padding and any other token without loss, so
            completion-only and assistant-only masks carry over.
        attention_mask (`torch.Tensor`, *optional*):
            Padding mask (right or left padding). Padded positions are excluded.
        position_ids (`torch.Tensor`, *optional*):
            With padding-free packing the trainer sends position ids and no attention mask; a position id of 0 marks
            the start of each packed sequence.
        input_ids (`torch.Tensor`, *optional*) and bos_token_id (`int`, *optional*):
            BOS tokens are excluded wherever they appear.
        exclude_first_token (`bool`, *optional*, defaults to `True`):
            Exclude the first real token of every sequence: attention sinks there carry activations orders of
            magnitude above the median and would dominate the penalty.

    Returns:
        `torch.BoolTensor` of shape `(batch, seq)`.
    """
    mask = labels != -100
    if attention_mask is not None:
        mask &= attention_mask.bool()
    if exclude_first_token:
        if position_ids is not None:
            mask &= position_ids != 0
        elif attention_mask is not None:
            # The first attended position of each row, whatever the padding side.
            first = attention_mask.long().cumsum(dim=-1) == 1
            mask &= ~(first & attention_mask.bool())
        else:
            mask[..., 0] = False
    if input_ids is not None and bos_token_id is not None:
        mask &= input_ids != bos_token_id
    return mask


def one_sided_excess(z: torch.Tensor, z_base: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
    """ReLU(s_k · (z_k − z_base,k)): how far each latent moved past its base value in the misaligned direction.

    Args:
        z (`torch.Tensor` of shape `(..., n)`): latent activations of the model being trained (fp32).
        z_base (`torch.Tensor` of shape `(..., n)`): the base model's activations on the same tokens (fp32).
        signs (`torch.Tensor` of shape `(n,)`): +1 for latents in K+, -1 for latents in K-.
    """
    return torch.relu((z - z_base) * signs)


def block_penalty_sum(z: torch.Tensor, z_base: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
    """Σ_t Σ_k ReLU(s_k (z − z_base))² over the given tokens, in fp32. Divide by the loss denominator."""
    z, z_base, signs = z.float(), z_base.float(), signs.to(device=z.device, dtype=torch.float32)
    return one_sided_excess(z, z_base.detach(), signs).square().sum()
