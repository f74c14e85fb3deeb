"""Training a SAELens SAE on a Hugging Face model's residual stream, for models no public SAE covers.

SAELens' own activation store drives TransformerLens models; here the activations come from our hooks on any
transformers model (the output of decoder layer L, i.e. `blocks.L.hook_resid_post`), and SAELens' `SAETrainer`
does the training. The result is an inference `StandardSAE` with its hook name set, ready for `LatentSet.from_sae`.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from .assistant_tokens import right_padded, tokenize_conversations
from .blocked_layer import hook_name_for_layer
from .hooks import ActivationCapture, iter_masked_hidden_states

logger = logging.getLogger(__name__)


@torch.no_grad()
def iter_activations(
    model: torch.nn.Module,
    tokenizer: Any,
    conversations: Sequence[Sequence[dict[str, str]]],
    layer: int,
    *,
    batch_size: int = 64,
    max_length: int = 128,
    assistant_only: bool = False,
) -> Iterator[torch.Tensor]:
    """Residual-stream activations at decoder layer `layer`'s output, one `[n_tokens, d_model]` chunk per batch.

    The chunks stay on the model's device and dtype, so a caller that reduces them (firing rates) never holds every
    token's activations at once. Arguments as in [`collect_activations`].
    """

    def batches():
        for start in range(0, len(conversations), batch_size):
            chunk = [list(c) for c in conversations[start : start + batch_size]]
            if assistant_only:
                tokens = tokenize_conversations(tokenizer, chunk, max_length=max_length)
            else:
                rows = tokenizer.apply_chat_template(chunk, tokenize=True, return_dict=True)["input_ids"]
                tokens = right_padded(tokenizer, rows, [[True] * len(r) for r in rows], max_length)  # every token
            # The first token of each sequence is an attention sink with outsized activations: never collected.
            keep = tokens.assistant_mask & (tokens.attention_mask.cumsum(-1) > 1)
            yield tokens.input_ids, tokens.attention_mask, keep

    found = False
    with ActivationCapture(model, [layer]) as capture:
        for hidden in iter_masked_hidden_states(model, capture, batches()):
            found = True
            yield hidden[layer]
    if not found:
        raise ValueError(
            f"Expected tokens to collect from {len(conversations)} conversations, found none"
            + (" (no assistant turn in them)." if assistant_only else ".")
        )


def collect_activations(
    model: torch.nn.Module,
    tokenizer: Any,
    conversations: Sequence[Sequence[dict[str, str]]],
    layer: int,
    *,
    batch_size: int = 64,
    max_length: int = 128,
    assistant_only: bool = False,
) -> torch.Tensor:
    """Residual-stream activations `[n_tokens, d_model]` (fp32, CPU) at decoder layer `layer`'s output.

    Args:
        conversations: chat conversations (lists of `{"role", "content"}`), rendered with the tokenizer's template.
        batch_size (`int`, *optional*, defaults to `64`): conversations per forward pass.
        max_length (`int`, *optional*, defaults to `128`): keep the first `max_length` tokens of longer renderings.
        assistant_only (`bool`, *optional*, defaults to `False`): keep only assistant tokens (found by the template's
            `{% generation %}` markers, or by rendering when it has none: `hf_blockem.assistant_tokens`); otherwise
            every non-padding token but the first of each sequence (attention sink).
    """
    kwargs = {"batch_size": batch_size, "max_length": max_length, "assistant_only": assistant_only}
    # Closed on an error too, so the capture's hooks and eval mode never outlive the pass.
    with contextlib.closing(iter_activations(model, tokenizer, conversations, layer, **kwargs)) as chunks:
        return torch.cat([chunk.float().cpu() for chunk in chunks])


def _batches(activations: torch.Tensor, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    while True:
        for index in torch.randperm(len(activations), generator=generator).split(batch_size):
            if len(index) == batch_size:
                yield activations[index]


def train_sae(
    activations: torch.Tensor,
    layer: int,
    *,
    d_sae: int,
    l1_coefficient: float = 1.0,
    steps: int = 2000,
    batch_size: int = 256,
    lr: float = 3e-4,
    seed: int = 0,
    model_name: str | None = None,
) -> Any:
    """Trains a ReLU SAE with SAELens on `activations` and returns the inference `StandardSAE`.

    Args:
        activations (`torch.Tensor` of shape `[n_tokens, d_model]`): from `collect_activations`.
        layer (`int`): the decoder layer they were read at (recorded as `blocks.{layer}.hook_resid_post`).
        d_sae (`int`): dictionary width.
        l1_coefficient (`float`, *optional*, defaults to `1.0`): sparsity penalty.
        steps (`int`, *optional*, defaults to `2000`): optimizer steps.
        batch_size (`int`, *optional*, defaults to `256`): activations per step.
        lr (`float`, *optional*, defaults to `3e-4`): Adam learning rate.
        seed (`int`, *optional*, defaults to `0`): initialisation and data-order seed.
        model_name (`str`, *optional*): recorded in the SAE's metadata.
    """
    from sae_lens import SAE, LoggingConfig, StandardTrainingSAE, StandardTrainingSAEConfig
    from sae_lens.config import SAETrainerConfig
    from sae_lens.training.sae_trainer import SAETrainer

    torch.manual_seed(seed)
    cfg = StandardTrainingSAEConfig(
        d_in=activations.shape[-1],
        d_sae=d_sae,
        l1_coefficient=l1_coefficient,
        apply_b_dec_to_input=True,
        normalize_activations="none",
    )
    cfg.metadata.hook_name = hook_name_for_layer(layer)
    cfg.metadata.model_name = model_name
    sae = StandardTrainingSAE(cfg)
    trainer_cfg = SAETrainerConfig(
        total_training_samples=steps * batch_size,
        train_batch_size_samples=batch_size,
        lr=lr,
        lr_end=lr,  # constant schedule (SAELens' runner config fills this in; the trainer alone does not)
        dead_feature_window=max(1, steps // 4),
        feature_sampling_window=max(1, steps // 2),
        logger=LoggingConfig(log_to_wandb=False),
    )
    generator = torch.Generator().manual_seed(seed)
    trainer = SAETrainer(trainer_cfg, sae, _batches(activations, batch_size, generator))
    logging.getLogger("sae_lens").setLevel(logging.WARNING)
    trained = trainer.fit()
    # The inference SAE comes from SAELens' own save / load round trip (folded decoder norms, inference config).
    with tempfile.TemporaryDirectory() as folder:
        trained.save_inference_model(folder)
        inference = SAE.load_from_disk(folder, device="cpu")
    inference.eval()
    return inference
