"""Training arguments of the BLOCK-EM trainers: `BlockEMConfig` (Trainer) and `BlockEMSFTConfig` (TRL SFTTrainer)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from transformers import TrainingArguments
from trl import SFTConfig

BASE_ACTIVATION_MODES = ("auto", "adapter", "reference", "cache")
# torch.compile's modes (None: eager).
COMPILE_MODES = (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclass
class BlockEMArguments:
    r"""
    The BLOCK-EM fields shared by [`BlockEMConfig`] and [`BlockEMSFTConfig`].

    Parameters:
        > Parameters that control which latents are blocked

        latent_set (`str` or [`LatentSet`], *optional*):
            The latents to block: a Hub repo id, a local folder written by `LatentSet.save_pretrained`, or a
            [`LatentSet`] object. Can also be given to the trainer as `latent_set=`.
        latent_set_revision (`str`, *optional*):
            Branch, tag or commit of the latent set on the Hub. The resolved commit is recorded in the trainer state.
        latent_set_strict (`bool`, *optional*, defaults to `False`):
            Refuse a latent set that is not pinned: a Hub repo needs `latent_set_revision` to be a 40-hex commit, a
            file needs a checksum, and a `LatentSet` object must have been loaded from one of them.

        > Parameters that control the penalty

        block_lambda (`float`, *optional*, defaults to `100.0`):
            Weight λ of the penalty in `loss = loss_SFT + λ · L_block`. `L_block` sums the squared one-sided excess
            over the blocked latents and averages it over the tokens that carry the SFT loss, with the same
            denominator as the cross-entropy loss (so it is invariant to gradient accumulation). Because latent
            scales differ between SAEs, also watch `blockem/penalty_relative` (the penalty divided by the mean
            squared base activation of the blocked latents), which is comparable across models.
        block_warmup_steps (`int`, *optional*, defaults to `0`):
            Ramp λ linearly from 0 to `block_lambda` over this many optimizer steps.
        block_exclude_first_token (`bool`, *optional*, defaults to `True`):
            Leave the first token of every sequence out of the penalty (attention sinks carry activations orders of
            magnitude above the median there). BOS tokens are always left out.

        > Parameters that control the base activations

        base_activations (`str`, *optional*, defaults to `"auto"`):
            Where the base model's latent activations come from. `"adapter"`: the same PEFT model with its adapters
            disabled, under inference mode, stopped after the deepest blocked layer (exact for LoRA, no extra memory).
            `"reference"`: a frozen base model loaded from `base_model_name_or_path` (default: the latent set's
            `base_model`) and cut after the deepest blocked layer, without LM head (for full fine-tuning; memory about
            (L+1)/N of the decoder). `"cache"`: z_base on the blocked latents precomputed once for the whole training
            set (|K| floats per token), stored in `base_activations_cache_dir` and keyed on the base weights, latent
            set, dataset, tokeniser, max length and packing. `"auto"`: `"cache"` when the training set is map-style
            and seen more than once, else `"adapter"` for PEFT models and `"reference"` for full fine-tuning.
        base_model_name_or_path (`str`, *optional*):
            Hub id or local path of the base model for `"reference"` (and for `"cache"` without PEFT) when it is not
            the latent set's `base_model`.
        base_model_revision (`str`, *optional*):
            Revision of the base model (default: the latent set's `base_model_revision` when
            `base_model_name_or_path` is not set).
        base_activations_cache_dir (`str`, *optional*):
            Folder of the `"cache"` files. Default: beside the training set's own cache files when it has some, else
            `<output_dir>/_blockem_base_activations` (the leading `_` keeps it out of Hub pushes). The precomputing
            pass uses `per_device_eval_batch_size`.
        base_activations_compile (`str`, *optional*):
            A `torch.compile` mode for the base pass: `"default"`, `"reduce-overhead"` (CUDA graphs),
            `"max-autotune"` or `"max-autotune-no-cudagraphs"`. On a GPU an eager pass through a few layers is mostly
            kernel launches; compiled, it nearly disappears from the step time (`benchmarks/RESULTS.md`). With
            `"reference"` the frozen reference is compiled; with `"adapter"` a separate truncated module that shares
            the PEFT model's base weights (no copy) replaces the adapters-off pass. Sharded models (FSDP, ZeRO-3)
            keep the eager adapters-off pass. `None` (default): eager.
        base_activations_pad_to_multiple_of (`int`, *optional*):
            Right-pad the batches of the truncated base pass (the reference, or the compiled adapter view) to a
            multiple of this many positions (the activations are cut back; causal attention leaves the real tokens
            unchanged). With `"reduce-overhead"` it defaults to 64, so that a few CUDA graphs cover every length.
    """

    latent_set: str | None = field(
        default=None,
        metadata={
            "help": "The latents to block: a Hub repo id or a local folder written by `LatentSet.save_pretrained` "
            "(in Python, a `LatentSet` object also works).",
        },
    )
    latent_set_revision: str | None = field(
        default=None,
        metadata={"help": "Branch, tag or commit of the latent set on the Hub."},
    )
    latent_set_strict: bool = field(
        default=False,
        metadata={
            "help": "Refuse a latent set that is not pinned: a Hub repo needs `latent_set_revision` to be a 40-hex "
            "commit and the file a checksum."
        },
    )
    block_lambda: float = field(
        default=100.0,
        metadata={
            "help": "Weight λ of the BLOCK-EM penalty (loss = loss_SFT + λ·L_block; L_block is averaged over the "
            "tokens that carry the SFT loss with the cross-entropy's own denominator)."
        },
    )
    block_warmup_steps: int = field(
        default=0,
        metadata={"help": "Ramp λ linearly from 0 to `block_lambda` over this many optimizer steps."},
    )
    block_exclude_first_token: bool = field(
        default=True,
        metadata={"help": "Leave the first token of each sequence (attention sink) out of the penalty."},
    )
    base_activations: str = field(
        default="auto",
        metadata={
            "help": "Where base activations come from: `adapter` (PEFT adapters disabled, stopped after the "
            "deepest blocked layer), `reference` (frozen base model cut after the deepest blocked layer, for full "
            "fine-tuning), `cache` (precomputed once for the training set) or `auto` (cache when the training set "
            "is seen more than once, else adapter for PEFT and reference for full fine-tuning).",
            "choices": list(BASE_ACTIVATION_MODES),
        },
    )
    base_model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Hub id or local path of the base model for base_activations `reference` (and `cache` without "
            "PEFT); defaults to the latent set's `base_model`."
        },
    )
    base_model_revision: str | None = field(
        default=None,
        metadata={"help": "Revision of the base model (default: the latent set's `base_model_revision`)."},
    )
    base_activations_cache_dir: str | None = field(
        default=None,
        metadata={
            "help": "Folder of the base-activation cache. Default: beside the training set's cache files, else "
            "`<output_dir>/_blockem_base_activations`."
        },
    )

    base_activations_compile: str | None = field(
        default=None,
        metadata={
            "help": "torch.compile mode for the base pass (the reference, or a weight-sharing base view of the PEFT "
            "model): `default`, `reduce-overhead` (CUDA graphs), `max-autotune` or `max-autotune-no-cudagraphs`; "
            "unset: eager.",
            "choices": [mode for mode in COMPILE_MODES if mode is not None],
        },
    )
    base_activations_pad_to_multiple_of: int | None = field(
        default=None,
        metadata={
            "help": "Right-pad the truncated base pass's batches (the reference, or the compiled adapter view) to a "
            "multiple of this many positions (64 by default with `reduce-overhead`, so that few CUDA graphs cover "
            "every length)."
        },
    )

    def _check_blockem_arguments(self) -> None:
        if self.base_activations not in BASE_ACTIVATION_MODES:
            raise ValueError(
                f"base_activations must be one of {BASE_ACTIVATION_MODES}, received {self.base_activations!r}."
            )
        if self.base_activations_compile not in COMPILE_MODES:
            raise ValueError(
                f"base_activations_compile must be one of {COMPILE_MODES}, received {self.base_activations_compile!r}."
            )
        if self.base_activations_pad_to_multiple_of is not None and self.base_activations_pad_to_multiple_of < 1:
            raise ValueError(
                "base_activations_pad_to_multiple_of must be a positive number of positions (or unset), received "
                f"{self.base_activations_pad_to_multiple_of}."
            )
        if self.block_lambda < 0:
            raise ValueError(f"block_lambda must be >= 0, received {self.block_lambda}.")
        if self.block_warmup_steps < 0:
            raise ValueError(f"block_warmup_steps must be >= 0, received {self.block_warmup_steps}.")

    def _blockem_to_dict(self, d: dict[str, Any]) -> dict[str, Any]:
        # A LatentSet object is not JSON: record where it came from instead.
        latent_set = d.get("latent_set")
        if latent_set is not None and not isinstance(latent_set, str):
            d["latent_set"] = getattr(latent_set, "source", None) or repr(latent_set)
        return d


@dataclass
class BlockEMConfig(BlockEMArguments, TrainingArguments):
    __doc__ = (
        "Configuration class for [`BlockEMTrainer`]: [`~transformers.TrainingArguments`] plus the BLOCK-EM fields "
        "below.\n" + BlockEMArguments.__doc__
    )

    def __post_init__(self):
        self._check_blockem_arguments()
        super().__post_init__()

    def to_dict(self) -> dict[str, Any]:
        return self._blockem_to_dict(super().to_dict())


@dataclass
class BlockEMSFTConfig(BlockEMArguments, SFTConfig):
    __doc__ = (
        "Configuration class for [`BlockEMSFTTrainer`]: TRL's [`~trl.SFTConfig`] plus the BLOCK-EM fields below.\n"
        + BlockEMArguments.__doc__
    )

    def __post_init__(self):
        self._check_blockem_arguments()
        super().__post_init__()

    def to_dict(self) -> dict[str, Any]:
        return self._blockem_to_dict(super().to_dict())
