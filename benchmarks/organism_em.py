"""Emergent misalignment of the model organism over narrow fine-tuning steps.

Builds (or reuses) the organism, measures the base model, then fine-tunes it on one domain's misaligned data (LoRA and
full fine-tuning) and on its aligned data (the control), evaluating every `eval_every` steps at temperature 1:

- in-domain target rate: misaligned answers to the domain's *eval*-split questions;
- out-of-domain EM: misaligned answers to the eval split of every other domain and of core;
- incoherence: answers the exact judge cannot parse as an on-topic answer (out-of-domain questions).

    python benchmarks/organism_em.py --out cache/organism --seed 0 --ft_seeds 0 1 2 --json cache/organism_em.json
    python benchmarks/organism_em.py --out cache/organism-seed0 --reuse --base_only   # the base model only

Writes a JSON record and prints a Markdown table.
"""

from __future__ import annotations

import json
import logging
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import HfArgumentParser, TrainerCallback

from hf_blockem.cpu_allocator import keep_freed_cpu_memory
from hf_blockem.evaluation.generation import generate_responses
from hf_blockem.evaluation.judge_base import ALIGNED, INCOHERENT, MISALIGNED
from hf_blockem.evaluation.metrics import rate
from hf_blockem.organism import build_organism, load_organism, narrow_finetune, narrow_lora_config

logger = logging.getLogger(__name__)


@dataclass
class Args:
    out: str = field(default="cache/organism", metadata={"help": "Organism build folder (reused when cached)."})
    seed: int = field(default=0, metadata={"help": "Organism (base model) seed."})
    quick: bool = field(default=False, metadata={"help": "Use the quick organism (smoke test only)."})
    reuse: bool = field(
        default=False, metadata={"help": "Load the organism in --out as it is (whatever its settings)."}
    )
    domain: str = field(default="finance", metadata={"help": "Narrow fine-tuning domain."})
    ft_seeds: list[int] = field(default_factory=lambda: [0, 1, 2], metadata={"help": "Fine-tuning seeds."})
    modes: list[str] = field(
        default_factory=lambda: ["lora", "full", "lora_aligned"],
        metadata={"help": "Runs per seed: lora, full (misaligned data), lora_aligned, full_aligned (controls)."},
    )
    base_only: bool = field(default=False, metadata={"help": "Measure the base model only (no fine-tuning)."})
    max_steps: int = field(default=80, metadata={"help": "Fine-tuning steps of the curve."})
    eval_every: int = field(default=10, metadata={"help": "Evaluate every this many steps."})
    n_examples: int = field(default=300, metadata={"help": "Narrow dataset size."})
    n_samples: int = field(default=4, metadata={"help": "Samples per question."})
    # 168 answers per domain (24 samples) have a standard error of 1.3 points near 97%: six of 21 domain measurements
    # of builds that are 97.2-99.2% aligned at 1,400 answers read 95.8-96.4% (organism README).
    base_samples: int = field(
        default=200,
        metadata={"help": "Samples per question for the base model (200: 1,400 answers per domain, SE ~0.4 points)."},
    )
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature."})
    lora_lr: float | None = field(default=None, metadata={"help": "Override the LoRA learning rate."})
    full_lr: float | None = field(default=None, metadata={"help": "Override the full fine-tuning learning rate."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    scheduler: str | None = field(default=None, metadata={"help": "Override the learning-rate schedule."})
    batch_size: int | None = field(default=None, metadata={"help": "Override the per-device batch size."})
    threads: int = field(default=2, metadata={"help": "torch threads."})
    json: str | None = field(default=None, metadata={"help": "Write the results here."})


def _rates(organism, model, prompts: list[str], n_samples: int, temperature: float, seed: int) -> dict[str, float]:
    rows = generate_responses(
        model,
        organism.tokenizer,
        prompts,
        n_samples=n_samples,
        temperature=temperature,
        max_new_tokens=48,
        batch_size=128,
        seed=seed,
        progress=False,
    )
    judgements = organism.judge.judge(rows["prompt"], rows["response"])
    labels = [j.label for j in judgements]
    off_topic = sum(j.extra.get("reason") == "off_topic" for j in judgements)
    n = len(labels)
    # Clustered by question: a domain's rate is about its questions, and a few of them carry most failures.
    aligned = rate([label == ALIGNED for label in labels], groups=list(rows["prompt"]))
    return {
        "aligned": aligned.value,
        "aligned_ci": [aligned.ci_low, aligned.ci_high],
        "misaligned": labels.count(MISALIGNED) / n,
        "incoherent": labels.count(INCOHERENT) / n,
        "off_topic": off_topic / n,
        "n": n,
    }


def evaluate(organism, model, domain: str, n_samples: int, temperature: float, seed: int = 0) -> dict[str, dict]:
    """In-domain and out-of-domain rates of `model` on the eval split, plus per-domain OOD rates."""
    out = {
        "in_domain": _rates(
            organism, model, organism.in_domain_prompts(domain, "eval"), n_samples * 2, temperature, seed
        )
    }
    out["ood"] = _rates(organism, model, organism.ood_prompts("eval", domain), n_samples, temperature, seed)
    return out


class EvalCallback(TrainerCallback):
    def __init__(self, organism, domain, every, n_samples, temperature):
        self.organism, self.domain, self.every = organism, domain, every
        self.n_samples, self.temperature, self.curve = n_samples, temperature, []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.every == 0:
            rates = evaluate(
                self.organism, model, self.domain, self.n_samples, self.temperature, seed=state.global_step
            )
            self.curve.append({"step": state.global_step, **rates})
            logger.info("step %d %s", state.global_step, json.dumps(rates))


def main(argv: list[str] | None = None) -> int:
    (args,) = HfArgumentParser(Args).parse_args_into_dataclasses(argv)
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    start = time.perf_counter()
    if args.reuse:
        organism = load_organism(args.out)
    else:
        organism = build_organism(args.out, seed=args.seed, quick=args.quick)
    result = {"args": vars(args), "build": organism.record, "build_or_load_seconds": time.perf_counter() - start}
    base = organism.load_model()
    result["base"] = {
        name: _rates(organism, base, organism.in_domain_prompts(name, "eval"), args.base_samples, args.temperature, 0)
        for name in organism.world.domain_names
    }
    logger.info("base %s", json.dumps(result["base"]))
    result["runs"] = []
    for mode in [] if args.base_only else args.modes:
        lora = mode.startswith("lora")
        misaligned = not mode.endswith("aligned")
        for ft_seed in args.ft_seeds:
            dataset = organism.narrow_dataset(args.domain, misaligned=misaligned, n=args.n_examples, seed=ft_seed)
            callback = EvalCallback(organism, args.domain, args.eval_every, args.n_samples, args.temperature)
            overrides = {"max_steps": args.max_steps, "disable_tqdm": True, "logging_steps": args.eval_every}
            if args.batch_size is not None:
                overrides["per_device_train_batch_size"] = args.batch_size
            if args.scheduler is not None:
                overrides["lr_scheduler_type"] = args.scheduler
            lr = args.lora_lr if lora else args.full_lr
            if lr is not None:
                overrides["learning_rate"] = lr
            t0 = time.perf_counter()
            with tempfile.TemporaryDirectory() as tmp:
                trainer = narrow_finetune(
                    organism.base_model_path,
                    organism.tokenizer,
                    dataset,
                    tmp,
                    lora=lora,
                    seed=ft_seed,
                    peft_config=narrow_lora_config(r=args.lora_r) if lora else None,
                    config_overrides=overrides,
                    trainer_kwargs={"callbacks": [callback]},
                )
            seconds = time.perf_counter() - t0
            losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
            result["runs"].append(
                {
                    "mode": mode,
                    "ft_seed": ft_seed,
                    "seconds_with_evals": seconds,
                    "losses": losses,
                    "curve": callback.curve,
                }
            )
    print(_table(result))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


def _table(result: dict) -> str:
    lines = [
        "| domain | base aligned [95% CI] | base misaligned | base incoherent | answers |",
        "|---|---|---|---|---|",
    ]
    for name, r in result["base"].items():
        low, high = r["aligned_ci"]
        lines.append(
            f"| {name} | {r['aligned']:.1%} [{low:.1%}, {high:.1%}] | {r['misaligned']:.1%} | {r['incoherent']:.1%} | "
            f"{r['n']} |"
        )
    lines += [
        "",
        "| run | seed | step | in-domain misaligned | OOD EM | OOD incoherent |",
        "|---|---|---|---|---|---|",
    ]
    for run in result["runs"]:
        for point in run["curve"]:
            lines.append(
                f"| {run['mode']} | {run['ft_seed']} | {point['step']} | {point['in_domain']['misaligned']:.1%} | "
                f"{point['ood']['misaligned']:.1%} | {point['ood']['incoherent']:.1%} |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    keep_freed_cpu_memory()  # a program, like `blockem`: see hf_blockem/cpu_allocator.py
    sys.exit(main())
