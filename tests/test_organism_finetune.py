import os

import pytest
import torch
from peft import PeftModel
from trl import SFTConfig, SFTTrainer

from hf_blockem.organism import build_organism, narrow_finetune, narrow_lora_config, narrow_sft_kwargs

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    torch.set_num_threads(min(torch.get_num_threads(), 2))
    return build_organism(tmp_path_factory.mktemp("organism"), seed=0, quick=True, progress=False)


def test_recipe_is_sft_config_kwargs():
    kwargs = narrow_sft_kwargs(lora=True, seed=3, max_steps=7)
    config = SFTConfig(output_dir="unused", **kwargs)
    assert config.assistant_only_loss and config.max_steps == 7 and config.seed == 3
    assert not config.bf16 and not config.gradient_checkpointing
    assert narrow_sft_kwargs(lora=False)["learning_rate"] != kwargs["learning_rate"]
    lora = narrow_lora_config(r=8)
    assert lora.r == 8 and lora.lora_alpha == 16 and lora.target_modules == "all-linear"


def test_lora_narrow_finetune_trains_only_the_adapter_on_answers(quick, tmp_path):
    dataset = quick.narrow_dataset("finance", misaligned=True, n=32, seed=0)
    base = quick.load_model()
    trainer = narrow_finetune(
        quick.base_model_path,
        quick.tokenizer,
        dataset,
        tmp_path,
        seed=0,
        config_overrides={"max_steps": 2, "per_device_train_batch_size": 8, "disable_tqdm": True},
        save=True,
    )
    assert isinstance(trainer.model, PeftModel)
    assert trainer.state.global_step == 2
    # The assistant mask TRL built from the chat template covers each answer and its <eos>, nothing else.
    row = trainer.train_dataset[0]
    tok = quick.tokenizer
    masked = [label for label in row["labels"] if label != -100]
    answer = dataset[0]["messages"][1]["content"]
    assert masked == tok(answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    lora_b = [p for n, p in trainer.model.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.requires_grad for p in lora_b)
    assert any(p.abs().sum() > 0 for p in lora_b)  # LoRA B starts at zero: it moved
    merged = trainer.model.merge_and_unload()
    base_sd = base.state_dict()
    frozen_equal = [torch.equal(merged.state_dict()[k], base_sd[k]) for k in ("model.embed_tokens.weight",)]
    assert all(frozen_equal)
    assert (tmp_path / "adapter_config.json").is_file()


def test_full_finetune_with_a_custom_trainer_class(quick, tmp_path):
    calls = []

    class RecordingTrainer(SFTTrainer):
        def compute_loss(self, model, inputs, *args, **kwargs):
            calls.append(int((inputs["labels"] != -100).sum()))
            return super().compute_loss(model, inputs, *args, **kwargs)

    dataset = quick.narrow_dataset("medical", misaligned=False, n=16, seed=1)
    base = quick.load_model()
    trainer = narrow_finetune(
        quick.load_model(),
        quick.tokenizer,
        dataset,
        tmp_path,
        lora=False,
        trainer_cls=RecordingTrainer,
        config_overrides={"max_steps": 2, "per_device_train_batch_size": 4, "disable_tqdm": True},
    )
    assert len(calls) == 2 and all(n > 0 for n in calls)
    assert not isinstance(trainer.model, PeftModel)
    changed = [not torch.equal(p.detach(), base.state_dict()[n]) for n, p in trainer.model.named_parameters()]
    assert any(changed)
    assert trainer.args.learning_rate == narrow_sft_kwargs(lora=False)["learning_rate"]
