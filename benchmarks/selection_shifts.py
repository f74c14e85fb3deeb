"""Stage-1 throughput: activation shifts against a plain forward to the hook layer (issue 5: at least 80%).

In one process, interleaved round by round on the same batches:
- `forward_to_layer`: the model run up to decoder layer L and stopped there (no SAE), the floor Stage 1 cannot beat;
- `stage1`: `hf_blockem.selection.response_latents`, the same partial forward plus the SAE on the answer tokens;
- `full_forward`: the whole model with its LM head, what a naive implementation pays.
Throughput ratio = time(forward_to_layer) / time(stage1) (1.0 = free SAE; the target is >= 0.8).

    python benchmarks/selection_shifts.py [--hidden 512 --layers 12 --layer 6 --d_sae 4096 --json out.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch
from sae_lens import StandardSAE, StandardSAEConfig
from transformers import LlamaConfig, LlamaForCausalLM

from hf_blockem.hooks import ActivationCapture, run_until_layer
from hf_blockem.selection.shifts import TokenizedResponses, response_latents


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--layer", type=int, default=4)
    parser.add_argument("--d_sae", type=int, default=2048)
    parser.add_argument("--sequences", type=int, default=64)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=4096,
        hidden_size=args.hidden,
        intermediate_size=4 * args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=max(1, args.hidden // 64),
        max_position_embeddings=args.length,
    )
    model = LlamaForCausalLM(config).eval()
    sae = StandardSAE(StandardSAEConfig(d_in=args.hidden, d_sae=args.d_sae))
    ids = torch.randint(0, config.vocab_size, (args.sequences, args.length))
    attention = torch.ones_like(ids)
    answers = torch.zeros_like(ids, dtype=torch.bool)
    answers[:, args.length // 4 :] = True  # the last three quarters are "answer" tokens
    tokens = TokenizedResponses(ids, attention, answers)
    batches = [slice(s, s + args.batch_size) for s in range(0, args.sequences, args.batch_size)]

    @torch.no_grad()
    def forward_to_layer():
        with ActivationCapture(model, [args.layer]) as capture:
            for b in batches:
                run_until_layer(capture, model, input_ids=ids[b], attention_mask=attention[b], use_cache=False)

    @torch.no_grad()
    def full_forward():
        for b in batches:
            model(input_ids=ids[b], attention_mask=attention[b], use_cache=False)

    def stage1():
        response_latents(model, sae, args.layer, tokens, batch_size=args.batch_size)

    variants = {"forward_to_layer": forward_to_layer, "stage1": stage1, "full_forward": full_forward}
    times: dict[str, list[float]] = {name: [] for name in variants}
    for fn in variants.values():  # warm-up
        fn()
    for round_ in range(args.rounds):
        order = list(variants)
        order = order[round_ % 3 :] + order[: round_ % 3]  # rotate so no variant always runs first
        for name in order:
            start = time.perf_counter()
            variants[name]()
            times[name].append(time.perf_counter() - start)
    median = {name: statistics.median(t) for name, t in times.items()}
    n_tokens = args.sequences * args.length
    result = {
        "device": f"{platform.processor() or platform.machine()} CPU, {args.threads} thread(s)",
        "torch": torch.__version__,
        "config": vars(args),
        "median_seconds": median,
        "tokens_per_second": {name: n_tokens / t for name, t in median.items()},
        "stage1_throughput_vs_forward_to_layer": median["forward_to_layer"] / median["stage1"],
        "stage1_throughput_vs_full_forward": median["full_forward"] / median["stage1"],
    }
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as file:
            json.dump(result, file, indent=2)


if __name__ == "__main__":
    main()
