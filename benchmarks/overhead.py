"""Step-time and memory overhead of each source of base activations, relative to plain SFT, in one process.

Every round runs one training step (collate, forward, backward, optimizer step) of each variant, in a shuffled order,
on the same LoRA model and optimizer, so that clock drift, thermal state and allocator state hit every variant alike:

- `sft`: plain causal-LM loss, no penalty;
- `adapter`, `reference`, `cache`: `BlockEMTrainer.compute_loss` with `base_activations` set to that mode;
- `naive`: the same penalty with the obvious base pass: a full forward of the model with adapters disabled (LM head
  included, `output_hidden_states=True`), as naive code and KL-to-reference defences pay.

With `--compile`, three more: `adapter_compiled` (`base_activations_compile="default"` with `adapter`: a compiled
truncated view that shares the PEFT model's base weights), and `reference_compiled` and `reference_graphs`, the
reference under `"default"` and `"reduce-overhead"` (CUDA graphs, lengths padded to multiples of 64).

Reported per variant: median and min step time and their ratios to `sft`'s median and min; the paired ratio (the
median over rounds of the variant's step over SFT's step in the same round, which cancels drift between rounds); the
median CPU time of the step's main thread (backward launches run on autograd's device thread and are not in it); and
on CUDA the ratio of the peak memory allocated during its steps to `sft`'s. The capture hooks are registered once, as
`train()` does. The reference's own weights are resident in every variant (it is loaded once), so its memory shows
as `resident_extra_mib`, not in the peak ratio.

    python benchmarks/overhead.py                      # CPU config: tiny Qwen2-shaped model, about a minute
    python benchmarks/overhead.py --gpu --json out.json  # Qwen2.5-1.5B shape, random init, bf16, LoRA r16, 8x512
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import random
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone

import torch

VARIANTS = ("sft", "adapter", "reference", "cache", "naive")


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpu", action="store_true", help="Qwen2.5-1.5B shape, bf16, LoRA r16, batch 8x512 on CUDA.")
    parser.add_argument("--steps", type=int, default=30, help="Measured rounds (one step of every variant each).")
    parser.add_argument("--warmup", type=int, default=5, help="Unmeasured rounds first.")
    parser.add_argument("--layer", type=int, default=None, help="Blocked layer (default: half the depth, minus 1).")
    parser.add_argument("--latents", type=int, default=16, help="Blocked latents.")
    parser.add_argument(
        "--compile",
        action="store_true",
        help="Also time the reference under torch.compile (default, reduce-overhead).",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--json", default=None, help="Write {variant: {ratio_median, ratio_min, ratio_paired, peak_mem_ratio, ...}}."
    )
    return parser


def config_for(gpu: bool) -> dict:
    from transformers import Qwen2Config

    if gpu:  # Qwen2.5-1.5B
        model = Qwen2Config(
            vocab_size=151936,
            hidden_size=1536,
            intermediate_size=8960,
            num_hidden_layers=28,
            num_attention_heads=12,
            num_key_value_heads=2,
            max_position_embeddings=4096,
            tie_word_embeddings=True,
        )
        return dict(model=model, batch=8, seq=512, lora_r=16, dtype=torch.bfloat16, device="cuda", rows=64)
    model = Qwen2Config(
        vocab_size=1024,
        hidden_size=64,
        intermediate_size=192,
        num_hidden_layers=8,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
    )
    return dict(model=model, batch=4, seq=96, lora_r=8, dtype=torch.float32, device="cpu", rows=32)


def random_rows(n: int, seq: int, vocab: int, rng: random.Random) -> list[dict]:
    """Variable lengths in [seq/2, seq], a prompt of 1-16 tokens without loss."""
    rows = []
    for _ in range(n):
        length = rng.randint(seq // 2, seq)
        ids = [rng.randrange(3, vocab) for _ in range(length)]
        prompt = rng.randint(1, 16)
        rows.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return rows


def collate(features: list[dict]) -> dict[str, torch.Tensor]:
    length = max(len(f["input_ids"]) for f in features)
    ids = torch.zeros(len(features), length, dtype=torch.long)
    labels = torch.full((len(features), length), -100)
    attention = torch.zeros(len(features), length, dtype=torch.long)
    for i, f in enumerate(features):
        n = len(f["input_ids"])
        ids[i, :n], labels[i, :n], attention[i, :n] = torch.tensor(f["input_ids"]), torch.tensor(f["labels"]), 1
    return {"input_ids": ids, "labels": labels, "attention_mask": attention}


def random_latent_set(d_in: int, layer: int, n_latents: int, seed: int):
    from hf_blockem import BlockedLayer, LatentSet

    g = torch.Generator().manual_seed(seed)
    half = n_latents // 2
    blocked = BlockedLayer(
        layer=layer,
        plus=list(range(half)),
        minus=list(range(half, n_latents)),
        W_enc=torch.randn(d_in, n_latents, generator=g) / d_in**0.5,
        b_enc=torch.zeros(n_latents),
        b_dec=torch.zeros(d_in),
        threshold=None,
        apply_b_dec_to_input=False,
        normalize_activations="none",
        architecture="standard",
        hook_name=f"blocks.{layer}.hook_resid_post",
    )
    return LatentSet([blocked], base_model="benchmark/random-init", d_in=d_in)


def naive_source(latent_set):
    """The obvious base pass: the whole model, adapters off, every hidden state and the LM head."""
    from hf_blockem.base_activations import OnTheFlyBaseActivations, peft_model_of
    from hf_blockem.hooks import eval_mode

    class NaiveFullPass(OnTheFlyBaseActivations):
        mode = "naive"

        def hidden_states(self, model, capture, inputs):
            with torch.no_grad(), peft_model_of(model).disable_adapter(), eval_mode(model):
                out = model(**inputs, output_hidden_states=True, use_cache=False)
            return {layer: out.hidden_states[layer + 1] for layer in self.latent_set.layer_indices}

    return NaiveFullPass(latent_set)


def main(argv: list[str] | None = None) -> dict:
    args = make_parser().parse_args(argv)
    import datasets
    import peft
    import transformers
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from hf_blockem import BlockEMConfig, BlockEMTrainer
    from hf_blockem.base_activations import (
        AdapterBaseActivations,
        ReferenceBaseActivations,
        load_truncated_reference,
    )

    transformers.logging.set_verbosity_error()
    if not args.gpu:
        torch.set_num_threads(1)  # one thread: less sensitive to whatever else runs on the machine
    cfg = config_for(args.gpu)
    device, dtype = cfg["device"], cfg["dtype"]
    if args.gpu and not torch.cuda.is_available():
        sys.exit("--gpu needs CUDA; run the CPU config without --gpu.")
    n_layers = cfg["model"].num_hidden_layers
    layer = args.layer if args.layer is not None else n_layers // 2 - 1
    rng = random.Random(args.seed)
    torch.manual_seed(args.seed)

    with torch.device(device):
        base = AutoModelForCausalLM.from_config(cfg["model"], dtype=dtype, attn_implementation="sdpa")
    workdir = tempfile.mkdtemp(prefix="blockem-overhead-")
    base.save_pretrained(f"{workdir}/base")
    model = get_peft_model(
        base, LoraConfig(r=cfg["lora_r"], lora_alpha=2 * cfg["lora_r"], lora_dropout=0.0, target_modules="all-linear")
    )
    with torch.no_grad():  # B != 0, so the penalty is non-zero and its backward runs
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 1e-3)
    model.train()
    latent_set = random_latent_set(cfg["model"].hidden_size, layer, args.latents, args.seed)
    rows = random_rows(cfg["rows"], cfg["seq"], cfg["model"].vocab_size, rng)
    dataset = datasets.Dataset.from_list(rows)

    def trainer(mode: str, **extra) -> BlockEMTrainer:
        return BlockEMTrainer(
            model=model,
            args=BlockEMConfig(
                output_dir=f"{workdir}/{mode}",
                report_to="none",
                use_cpu=not args.gpu,
                bf16=args.gpu,
                per_device_train_batch_size=cfg["batch"],
                per_device_eval_batch_size=4 * cfg["batch"],
                remove_unused_columns=False,
                disable_tqdm=True,
                block_lambda=1.0,
                base_activations=mode,
                base_model_name_or_path=f"{workdir}/base",
                **extra,
            ),
            train_dataset=dataset,
            data_collator=collate,
            latent_set=latent_set,
        )

    trainers = {mode: trainer(mode) for mode in ("adapter", "reference", "cache")}
    trainers["naive"] = trainer("adapter")
    trainers["naive"]._blockem_base = naive_source(latent_set)
    started = time.perf_counter()
    cache_source = trainers["cache"]._blockem_base
    cache_source.cache  # noqa: B018 - build it now, outside the timed steps
    cache_build_s = time.perf_counter() - started
    variants = list(VARIANTS)
    if args.compile:
        trainers["adapter_compiled"] = trainer("adapter")
        trainers["adapter_compiled"]._blockem_base = AdapterBaseActivations(latent_set, model, compile_mode="default")
        variants.append("adapter_compiled")
        for name, compile_mode in (("reference_compiled", "default"), ("reference_graphs", "reduce-overhead")):
            trainers[name] = trainer("adapter")
            trainers[name]._blockem_base = ReferenceBaseActivations(
                latent_set,
                module=load_truncated_reference(f"{workdir}/base", layer + 1, dtype=dtype, device=device),
                compile_mode=compile_mode,
            )
            variants.append(name)
    reference_module = trainers["reference"]._blockem_base.module
    resident_extra = sum(p.numel() * p.element_size() for p in reference_module.parameters())

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    collators = {v: (trainers["cache"].data_collator if v == "cache" else collate) for v in variants}
    cuda = device == "cuda"

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def step(variant: str) -> tuple[float, float, int]:
        features = rng.sample(rows, cfg["batch"])
        if cuda:
            sync()
            torch.cuda.reset_peak_memory_stats()
        start, cpu_start = time.perf_counter(), time.thread_time()
        batch = {k: v.to(device, non_blocking=True) for k, v in collators[variant](features).items()}
        if variant == "sft":
            loss = model(**batch).loss
        else:
            loss = trainers[variant].compute_loss(model, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync()
        elapsed, cpu = time.perf_counter() - start, time.thread_time() - cpu_start
        return elapsed, cpu, torch.cuda.max_memory_allocated() if cuda else 0

    # Per variant, {measured round: value}: a round's variants ran back to back, so their ratios are paired.
    times, cpu_times, peaks = {v: {} for v in variants}, {v: {} for v in variants}, {v: {} for v in variants}
    failed = {}
    with contextlib.ExitStack() as hooks:
        for t in trainers.values():  # registered once, as train() does
            hooks.enter_context(t._blockem_hooks())
        for round_index in range(args.warmup + args.steps):
            order = list(variants)
            rng.shuffle(order)
            for variant in order:
                try:
                    elapsed, cpu, peak = step(variant)
                except Exception as error:  # a compiled variant may fail on some stacks: report it, time the rest
                    if not variant.endswith(("_compiled", "_graphs")):
                        raise
                    failed[variant] = f"{type(error).__name__}: {error}"[:2000]
                    variants.remove(variant)
                    print(f"{variant} failed and is left out: {failed[variant]}", file=sys.stderr)
                    optimizer.zero_grad(set_to_none=True)
                    continue
                if round_index >= args.warmup:
                    times[variant][round_index] = elapsed
                    cpu_times[variant][round_index] = cpu
                    peaks[variant][round_index] = peak
    assert cache_source.misses == 0, "every cached step must read the cache"

    sft_times = times["sft"]
    sft_median, sft_min = statistics.median(sft_times.values()), min(sft_times.values())
    sft_peak = max(peaks["sft"].values())
    results = {}
    for variant in variants:
        median, fastest = statistics.median(times[variant].values()), min(times[variant].values())
        results[variant] = {
            "ratio_median": median / sft_median,
            "ratio_min": fastest / sft_min,
            # The median over rounds of (this variant's step / SFT's step in the same round): drift between rounds
            # (clocks, other jobs) cancels in each pair.
            "ratio_paired": statistics.median(t / sft_times[r] for r, t in times[variant].items()),
            "peak_mem_ratio": max(peaks[variant].values()) / sft_peak if cuda else None,
            "median_ms": 1e3 * median,
            "min_ms": 1e3 * fastest,
            "cpu_median_ms": 1e3 * statistics.median(cpu_times[variant].values()),
            "step_ms_by_round": {r: round(1e3 * t, 3) for r, t in times[variant].items()},
        }
    results["_meta"] = {
        "device": torch.cuda.get_device_name() if cuda else platform.processor() or platform.machine(),
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "python": platform.python_version(),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
        "config": {
            "layers": n_layers,
            "blocked_layer": layer,
            "hidden": cfg["model"].hidden_size,
            "batch": cfg["batch"],
            "seq": cfg["seq"],
            "lora_r": cfg["lora_r"],
            "dtype": str(dtype),
            "latents": args.latents,
            "steps": args.steps,
            "warmup": args.warmup,
        },
        "cache_build_s": cache_build_s,
        "failed": failed,
        "reference_resident_extra_mib": resident_extra / 2**20,
    }
    header = f"{'variant':<20}{'median ms':>10}{'min ms':>10}{'x median':>10}{'x min':>8}{'x paired':>10}{'cpu ms':>8}"
    print(f"{header}{'peak mem':>10}")
    for variant in variants:
        r = results[variant]
        peak = f"{r['peak_mem_ratio']:.3f}" if r["peak_mem_ratio"] is not None else "n/a"
        print(
            f"{variant:<20}{r['median_ms']:>10.2f}{r['min_ms']:>10.2f}{r['ratio_median']:>10.3f}"
            f"{r['ratio_min']:>8.3f}{r['ratio_paired']:>10.3f}{r['cpu_median_ms']:>8.1f}{peak:>10}"
        )
    print(json.dumps(results["_meta"], indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()
