"""BLOCK-EM end to end on a tiny model, offline, in under a minute on a laptop CPU.

Everything is built here: a word-level tokenizer with a chat template, a small Llama trained from its config, a
SAELens SAE on its residual stream, a latent set from that SAE, and a LoRA fine-tune with `BlockEMSFTTrainer`. The
same run with `block_lambda=0` shows how far the blocked latents move when nothing holds them back.

    python examples/quickstart_offline.py --output_dir runs/quickstart
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field

import torch
from datasets import Dataset
from peft import LoraConfig
from sae_lens import StandardSAE, StandardSAEConfig
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, HfArgumentParser, LlamaConfig, PreTrainedTokenizerFast

from hf_blockem import BlockEMSFTConfig, BlockEMSFTTrainer, LatentSet

logger = logging.getLogger("quickstart")

WORDS = [f"w{i}" for i in range(40)]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'assistant' %}<assistant> {% generation %}"
    "{{ m['content'] }} {{ eos_token }}{% endgeneration %} {% else %}<user> {{ m['content'] }} {% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<assistant> {% endif %}"
)


@dataclass
class QuickstartArguments:
    output_dir: str = field(default="runs/quickstart", metadata={"help": "Where the runs are written."})
    layer: int = field(default=1, metadata={"help": "Decoder layer whose output the SAE reads."})
    block_lambda: float = field(default=10.0, metadata={"help": "Weight of the BLOCK-EM penalty."})
    max_steps: int = field(default=30, metadata={"help": "Fine-tuning steps per run."})
    seed: int = field(default=0, metadata={"help": "Seed of the model, the SAE and the data."})


def build_tokenizer() -> PreTrainedTokenizerFast:
    specials = ["<pad>", "<bos>", "<eos>", "<unk>", "<user>", "<assistant>"]
    backend = Tokenizer(models.WordLevel({t: i for i, t in enumerate(specials + WORDS)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>", unk_token="<unk>"
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_dataset(n: int, seed: int) -> Dataset:
    """Answers repeat the question shifted by 20 words: a narrow task the model learns in a few steps."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        question = [rng.randrange(20) for _ in range(rng.randint(3, 6))]
        rows.append(
            {
                "messages": [
                    {"role": "user", "content": " ".join(WORDS[q] for q in question)},
                    {"role": "assistant", "content": " ".join(WORDS[20 + q] for q in question)},
                ]
            }
        )
    return Dataset.from_list(rows)


def build_latent_set(hidden_size: int, layer: int, seed: int) -> LatentSet:
    torch.manual_seed(seed)
    sae = StandardSAE(StandardSAEConfig(d_in=hidden_size, d_sae=4 * hidden_size))
    with torch.no_grad():
        sae.W_enc.normal_(0, 1.0)
        sae.b_enc.zero_()
    return LatentSet.from_sae(sae, plus=[0, 1, 2], minus=[3, 4], layer=layer, base_model="quickstart/tiny-llama")


def fine_tune(args: QuickstartArguments, tokenizer, latent_set: LatentSet, block_lambda: float, name: str):
    torch.manual_seed(args.seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
        max_position_embeddings=64, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    model = AutoModelForCausalLM.from_config(config)
    training_args = BlockEMSFTConfig(
        output_dir=f"{args.output_dir}/{name}",
        max_steps=args.max_steps,
        per_device_train_batch_size=8,
        learning_rate=2e-2,
        logging_steps=10,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        bf16=False,
        assistant_only_loss=True,
        max_length=32,
        seed=args.seed,
        block_lambda=block_lambda,
    )
    trainer = BlockEMSFTTrainer(
        model=model,
        args=training_args,
        train_dataset=build_dataset(128, args.seed),
        processing_class=tokenizer,
        peft_config=LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"),
        latent_set=latent_set,
    )
    trainer.train()
    trainer.save_model()
    return trainer


def main(args: QuickstartArguments) -> dict[str, float]:
    tokenizer = build_tokenizer()
    latent_set = build_latent_set(32, args.layer, args.seed)
    latent_set.save_pretrained(f"{args.output_dir}/latent_set")
    results = {}
    for name, lam in (("unblocked", 0.0), ("blocked", args.block_lambda)):
        trainer = fine_tune(args, tokenizer, latent_set, lam, name)
        last = [e for e in trainer.state.log_history if "blockem/penalty" in e][-1]
        first_loss = next(e["loss"] for e in trainer.state.log_history if "loss" in e)
        results[name] = {"loss": last["loss"], "first_loss": first_loss, "penalty": last["blockem/penalty"]}
    return results


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    (arguments,) = HfArgumentParser(QuickstartArguments).parse_args_into_dataclasses()
    results = main(arguments)
    print(f"\n{'run':<10} {'first loss':>10} {'last loss':>10} {'penalty (last log)':>20}")
    for name, r in results.items():
        print(f"{name:<10} {r['first_loss']:>10.3f} {r['loss']:>10.3f} {r['penalty']:>20.5f}")
    print(
        "\nWithout blocking the chosen latents drift past their base values (penalty > 0); with blocking they are held "
        f"at or below them. Outputs (LoRA adapters, latent set, trainer logs) are in {arguments.output_dir}/."
    )
