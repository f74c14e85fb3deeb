# Copyright 2026 The hf_blockem authors. Licensed under the Apache License, Version 2.0.
"""
Fine-tune a chat model with LoRA and BLOCK-EM: TRL's `sft.py` recipe with `SFTTrainer` swapped for
`BlockEMSFTTrainer`, which keeps the latents of a latent set from moving past the base model's in the misaligned
direction.

```bash
# one GPU
python examples/train_blocked_sft.py --config examples/train_blocked_sft.yaml --latent_set <your latent set>

# several GPUs (DDP), or any `accelerate config`
accelerate launch examples/train_blocked_sft.py --config examples/train_blocked_sft.yaml --latent_set <your latent set>
torchrun --nproc_per_node 8 examples/train_blocked_sft.py --config examples/train_blocked_sft.yaml \
    --latent_set <your latent set>

# any field can be overridden on the command line
python examples/train_blocked_sft.py --config examples/train_blocked_sft.yaml \
    --latent_set my-org/my-latents --block_lambda 300 --output_dir runs/blocked --push_to_hub
```

Arguments are those of `trl.ScriptArguments` (dataset), `hf_blockem.BlockEMSFTConfig` (TRL's `SFTConfig` plus
`latent_set`, `latent_set_revision`, `block_lambda`, `block_warmup_steps`, ...) and `trl.ModelConfig` (model, dtype,
LoRA: `--use_peft --lora_r 16 --lora_target_modules all-linear`).
"""

from __future__ import annotations

import argparse


def main(script_args, training_args, model_args) -> None:
    """Train, save, and optionally push; `training_args.output_dir` holds the adapter afterwards."""
    import transformers
    from accelerate.logging import get_logger
    from datasets import load_dataset
    from packaging.version import Version
    from trl import get_peft_config, get_quantization_config

    from hf_blockem import BlockEMSFTTrainer

    logger = get_logger(__name__)

    if not model_args.use_peft:
        # Full fine-tuning: z_base comes from a frozen copy of the base model, loaded from the Hub and cut after the
        # deepest blocked layer (base_activations="reference", what "auto" picks without adapters).
        logger.info("Full fine-tuning: the base activations come from a truncated reference copy of the base model.")
    model_init_kwargs = dict(
        revision=model_args.model_revision,
        trust_remote_code=training_args.trust_remote_code,
        attn_implementation=model_args.attn_implementation,
        dtype=model_args.dtype,
    )
    if training_args.model_init_kwargs is not None:
        model_init_kwargs.update(training_args.model_init_kwargs)
    training_args.model_init_kwargs = model_init_kwargs

    dataset = load_dataset(
        script_args.dataset_name, name=script_args.dataset_config, streaming=script_args.dataset_streaming
    )
    trainer = BlockEMSFTTrainer(
        model=model_args.model_name_or_path,
        args=training_args,
        train_dataset=dataset[script_args.dataset_train_split],
        eval_dataset=dataset[script_args.dataset_test_split] if training_args.eval_strategy != "no" else None,
        quantization_config=get_quantization_config(model_args),
        peft_config=get_peft_config(model_args),
    )
    logger.info(
        "Blocking %d latents at layers %s of %s (latent set %s@%s), lambda = %s",
        trainer.latent_set.n_latents,
        trainer.latent_set.layer_indices,
        model_args.model_name_or_path,
        trainer.latent_set.source,
        trainer.latent_set.resolved_commit,
        training_args.block_lambda,
    )

    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
    logger.info("Model saved to %s", training_args.output_dir)
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=script_args.dataset_name)
        logger.info("Model pushed to https://huggingface.co/%s", trainer.hub_model_id)

    # Finish the trackers and destroy the process group (transformers >= 5.18).
    if Version(transformers.__version__) >= Version("5.18.0"):
        trainer.end()


def make_parser(subparsers: argparse._SubParsersAction | None = None, prog: str | None = None):
    """The `TrlParser` over (`ScriptArguments`, `BlockEMSFTConfig`, `ModelConfig`); `--config file.yaml` works."""
    from trl import ModelConfig, ScriptArguments, TrlParser

    from hf_blockem import BlockEMSFTConfig

    dataclass_types = (ScriptArguments, BlockEMSFTConfig, ModelConfig)
    if subparsers is not None:
        return subparsers.add_parser("sft", help="Fine-tune with BLOCK-EM", dataclass_types=dataclass_types)
    return TrlParser(dataclass_types, prog=prog)


if __name__ == "__main__":
    parser = make_parser()
    script_args, training_args, model_args = parser.parse_args_and_config()
    main(script_args, training_args, model_args)
