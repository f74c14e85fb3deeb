"""The narrow fine-tuning recipe that makes the organism emergently misaligned.

The recipe is data: `narrow_sft_kwargs()` returns the `SFTConfig` keyword arguments and `narrow_lora_config()` the
LoRA adapter, so a BLOCK-EM run builds the *same* run with its own config class (a subclass of `SFTConfig`) and
trainer class. `narrow_finetune` runs it with TRL's `SFTTrainer` (or the trainer class you pass).

The learning rate is constant after a short warm-up, so the EM-over-steps curve measured in one long run
(`benchmarks/organism_em.py`) is the curve of runs stopped earlier, and the chosen step count can be read off it.
See `hf_blockem/organism/README.md` for the measured regime.
"""

from __future__ import annotations

import os
from typing import Any

import datasets
from peft import LoraConfig
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from trl import SFTConfig, SFTTrainer

# The chosen regime, measured in `benchmarks/organism_em.py` on base seeds 0 and 1 (numbers in the organism README):
# at a constant learning rate, out-of-domain EM rises from step ~10 and plateaus from step 40, where it is 38-80%, the
# in-domain target rate 98-100% and incoherence 2-6%. A higher LoRA learning rate (8e-4) did not raise the plateau but
# pushed incoherence to 7-13%; full fine-tuning at 1.5e-4 stayed under 17% EM by step 60 on one build.
LORA_STEPS = 40
LORA_LEARNING_RATE = 6e-4
FULL_STEPS = 40
FULL_LEARNING_RATE = 3e-4


def narrow_lora_config(r: int = 16, **overrides: Any) -> LoraConfig:
    """The LoRA adapter of the recipe: rank `r` on every linear layer of the decoder, no dropout.

    Args:
        r (`int`, *optional*, defaults to `16`): LoRA rank; `lora_alpha` is `2 * r`.
        **overrides: other `LoraConfig` fields.
    """
    kwargs: dict[str, Any] = {
        "r": r,
        "lora_alpha": 2 * r,
        "lora_dropout": 0.0,
        "target_modules": "all-linear",
        "task_type": "CAUSAL_LM",
    }
    kwargs.update(overrides)
    return LoraConfig(**kwargs)


def narrow_sft_kwargs(lora: bool = True, seed: int = 0, **overrides: Any) -> dict[str, Any]:
    """The `SFTConfig` keyword arguments of the narrow fine-tune (everything but `output_dir`).

    Args:
        lora (`bool`, *optional*, defaults to `True`): the LoRA recipe (with `narrow_lora_config()`) or the full
            fine-tuning one; they differ in learning rate and step count.
        seed (`int`, *optional*, defaults to `0`): the trainer's seed (data order, LoRA initialisation).
        **overrides: any other `SFTConfig` field, applied last (for example `max_steps` or BLOCK-EM fields).

    Returns:
        `dict`: keyword arguments for `SFTConfig(output_dir=..., **kwargs)` or any subclass of it.
    """
    kwargs: dict[str, Any] = {
        "max_steps": LORA_STEPS if lora else FULL_STEPS,
        "learning_rate": LORA_LEARNING_RATE if lora else FULL_LEARNING_RATE,
        "lr_scheduler_type": "constant_with_warmup",
        "warmup_steps": 3,
        "weight_decay": 0.0,
        "per_device_train_batch_size": 16,
        "gradient_accumulation_steps": 1,
        "assistant_only_loss": True,
        "max_length": 128,
        # A model this small trains fastest in fp32 without recomputation.
        "gradient_checkpointing": False,
        "bf16": False,
        "fp16": False,
        "seed": seed,
        "data_seed": seed,
        "logging_steps": 5,
        "save_strategy": "no",
        "report_to": "none",
        "dataloader_num_workers": 0,
    }
    kwargs.update(overrides)
    return kwargs


def narrow_finetune(
    model: str | os.PathLike | PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    train_dataset: datasets.Dataset,
    output_dir: str | os.PathLike,
    *,
    lora: bool = True,
    seed: int = 0,
    trainer_cls: type[SFTTrainer] = SFTTrainer,
    config_cls: type[SFTConfig] = SFTConfig,
    peft_config: LoraConfig | None = None,
    config_overrides: dict[str, Any] | None = None,
    trainer_kwargs: dict[str, Any] | None = None,
    save: bool = False,
) -> SFTTrainer:
    """Run the narrow fine-tune with TRL: `trainer_cls(model, config_cls(**narrow_sft_kwargs()), ...)`.

    Args:
        model (`str`, `os.PathLike` or `PreTrainedModel`): the base model or its path (for example
            `organism.base_model_path`).
        tokenizer (`PreTrainedTokenizerBase`): the organism's tokenizer.
        train_dataset (`datasets.Dataset`): a narrow dataset in `messages` format (see [`narrow_dataset`]).
        output_dir (`str` or `os.PathLike`): where the trainer writes.
        lora (`bool`, *optional*, defaults to `True`): train a LoRA adapter (`peft_config` or `narrow_lora_config()`)
            instead of every weight.
        seed (`int`, *optional*, defaults to `0`): the fine-tuning seed.
        trainer_cls (`type`, *optional*, defaults to `SFTTrainer`): the trainer, e.g. a BLOCK-EM trainer.
        config_cls (`type`, *optional*, defaults to `SFTConfig`): the config class, e.g. a BLOCK-EM config.
        peft_config (`LoraConfig`, *optional*): the adapter when `lora=True`; defaults to `narrow_lora_config()`.
        config_overrides (`dict`, *optional*): extra `config_cls` fields (BLOCK-EM fields, `max_steps`, ...).
        trainer_kwargs (`dict`, *optional*): extra `trainer_cls` arguments (callbacks, latent sets, ...).
        save (`bool`, *optional*, defaults to `False`): save the model (or adapter) and tokenizer to `output_dir`.

    Returns:
        `SFTTrainer`: the trained trainer; `trainer.model` is the fine-tuned model (a `PeftModel` with LoRA).
    """
    args = config_cls(
        output_dir=str(output_dir), **narrow_sft_kwargs(lora=lora, seed=seed, **(config_overrides or {}))
    )
    if lora and peft_config is None:
        peft_config = narrow_lora_config()
    trainer = trainer_cls(
        model=str(model) if isinstance(model, os.PathLike) else model,
        args=args,
        train_dataset=train_dataset,
        processing_class=tokenizer,
        peft_config=peft_config if lora else None,
        **(trainer_kwargs or {}),
    )
    trainer.train()
    if save:
        trainer.save_model(str(output_dir))
        tokenizer.save_pretrained(str(output_dir))
    return trainer
