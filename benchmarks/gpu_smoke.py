# Copyright 2026 The hf_blockem authors. Licensed under the Apache License, Version 2.0.
"""
GPU smoke test of BLOCK-EM's wrapping paths on ONE device: FSDP2 and DeepSpeed ZeRO-2 / ZeRO-3 with world size 1
still shard (FSDP2: DTensor parameters, ZeRO-3: partitioned placeholders), prepare the reference the way TRL does,
and run the base pass and the cache under the wrappers' hooks.

For each layout and each source of base activations (adapter, reference, cache), one plain-SGD step (lr 1, so the
update is minus the gradient) on the tiny Llama of the test suite, in fp32, compared with the same step without any
wrapper (1 process, batch 8): loss, parameter update and logged `blockem/*` metrics. The wrapped runs use batch 4 x
accumulation 2, so gradient accumulation is exercised too. Nothing is downloaded.

```bash
python benchmarks/gpu_smoke.py --out benchmarks/gpu_smoke.json   # about 2-4 minutes on one GPU
python benchmarks/gpu_smoke.py --cpu --nproc 2                    # 2 CPU processes (gloo): this script's own check
```

ZeRO layouts need `pip install deepspeed` (reported as skipped otherwise). Without SAELens (the GPU image has none) the
workers load the test suite's tiny latent set from `benchmarks/gpu/tiny_latent_set.safetensors`, which
`tests/test_distributed.py` checks is the one SAELens builds. The exit status is 0 only if every layout
that ran matched within `--tolerance`. The Markdown table on stdout is what `benchmarks/RESULTS.md` records.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TESTS = ROOT / "tests"
TINY_LATENT_SET = ROOT / "benchmarks" / "gpu" / "tiny_latent_set.safetensors"
MODES = ("adapter", "reference", "cache")
LAYOUTS = {"fsdp2": {"fsdp": "2"}, "zero2": {"zero": 2}, "zero3": {"zero": 3}}


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "gpu_smoke.json", help="JSON results")
    parser.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=list(LAYOUTS))
    parser.add_argument("--tolerance", type=float, default=1e-5, help="relative to each tensor's largest value")
    parser.add_argument("--timeout", type=int, default=480, help="seconds per launch")
    parser.add_argument(
        "--nproc", type=int, default=1, choices=(1, 2), help="processes (2: 2 GPUs, or 2 CPU processes with --cpu)"
    )
    parser.add_argument(
        "--cpu",
        action="store_true",
        help="check this script itself on a machine without GPU (FSDP2 on gloo, via the "
        "test worker's CPU shim); the numbers are not GPU results",
    )
    return parser


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(
    cases: list[dict], out: Path, base_dir: str, latent_set: Path, nproc: int, timeout: int
) -> tuple[int, str, float]:
    worker = [str(TESTS / "distributed_worker.py"), "--out", str(out), "--base-dir", base_dir]
    worker += ["--cases", json.dumps(cases), "--latent-set", str(latent_set)]
    launcher = ["-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={free_port()}"]
    command = [sys.executable, *(launcher if nproc else []), *worker]  # nproc 0: the plain run, no launcher
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), str(ROOT), env.get("PYTHONPATH", "")])
    start = time.perf_counter()
    try:
        result = subprocess.run(command, cwd=TESTS, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as error:
        return 124, f"timed out after {timeout} s: {error.stderr or ''}"[-3000:], time.perf_counter() - start
    return result.returncode, (result.stdout + result.stderr)[-3000:], time.perf_counter() - start


def compare(reference: Path, wrapped: Path, tolerance: float, partitioned: bool) -> dict:
    import torch
    from safetensors.torch import load_file

    ref_record, record = json.loads(reference.with_suffix(".json").read_text()), json.loads(wrapped.read_text())
    ref_updates, updates = load_file(str(reference)), load_file(str(wrapped.with_suffix(".safetensors")))
    worst = 0.0
    for name, expected in ref_updates.items():
        scale = max(1.0, expected.abs().max().item())
        worst = max(worst, (updates[name] - expected).abs().max().item() / scale)
    metric_errors = [
        abs(record["metrics"][key] - value) / max(1.0, abs(value)) for key, value in ref_record["metrics"].items()
    ]
    loss_error = abs(record["loss"] - ref_record["loss"]) / max(1.0, abs(ref_record["loss"]))
    # ZeRO-2 partitions gradients and optimizer state only: its parameters stay whole.
    wrapped_ok = record["fsdp_enabled"] or record["deepspeed_enabled"]
    sharded = wrapped_ok and (record["sharded_parameters"] > 0 or not partitioned)
    ok = sharded and max(worst, loss_error, *metric_errors) <= tolerance and torch.isfinite(torch.tensor(worst))
    return {
        "ok": bool(ok),
        "sharded_parameters": record["sharded_parameters"],
        "max_update_error": worst,
        "loss_error": loss_error,
        "max_metric_error": max(metric_errors),
        "penalty": record["metrics"].get("blockem/penalty"),
        "processes": record["processes"],
    }


def main(args: argparse.Namespace) -> int:
    import torch

    if not torch.cuda.is_available() and not args.cpu:
        print("No CUDA device: this smoke test exercises the GPU wrapping paths; run it on a GPU machine.")
        return 2
    if not args.cpu and torch.cuda.device_count() < args.nproc:
        print(f"--nproc {args.nproc} needs {args.nproc} GPUs; this machine has {torch.cuda.device_count()}.")
        return 2
    sys.path[:0] = [str(TESTS), str(ROOT)]
    from distributed_worker import case_name
    from tiny_models import tiny_model

    work = Path(tempfile.mkdtemp(prefix="blockem-gpu-smoke-"))
    base_dir = str(work / "tiny-llama")
    tiny_model("llama").save_pretrained(base_dir)
    latent_set = TINY_LATENT_SET
    if importlib.util.find_spec("sae_lens") is not None:  # build it as the test suite does
        from test_trainer import tiny_latent_set

        latent_set = work / "latent_set"
        tiny_latent_set().save_pretrained(latent_set)
    print(f"Latent set: {latent_set}")
    single = [dict(mode=m, batch=8, accumulation=1, accepts_loss_kwargs=True, cpu=args.cpu) for m in MODES]
    rc, log, seconds = launch(single, work / "plain", base_dir, latent_set, nproc=0, timeout=args.timeout)
    if rc != 0:
        print(f"The unwrapped reference runs failed (exit {rc}):\n{log}")
        return 1
    device = "CPU (--cpu dry run)" if args.cpu else torch.cuda.get_device_name(0)
    # The same 8 examples in the one optimizer step: per-process batch x accumulation 2 x processes = 8.
    batch = 8 // (2 * args.nproc)
    results: dict = {"device": device, "torch": torch.__version__, "nproc": args.nproc, "layouts": {}}
    for layout in args.layouts:
        if "zero" in LAYOUTS[layout] and importlib.util.find_spec("deepspeed") is None:
            results["layouts"][layout] = {"skipped": "deepspeed is not installed (pip install deepspeed)"}
            continue
        cases = [dict(case, batch=batch, accumulation=2, **LAYOUTS[layout]) for case in single]
        rc, log, seconds = launch(cases, work / layout, base_dir, latent_set, nproc=args.nproc, timeout=args.timeout)
        entry: dict = {"exit_code": rc, "seconds": round(seconds, 1)}
        if rc != 0:
            entry["log_tail"] = log
        for case, ref in zip(cases, single, strict=True):
            wrapped = work / layout / f"{case_name(case)}.json"
            if wrapped.is_file():
                reference = work / "plain" / f"{case_name(ref)}.safetensors"
                entry[case["mode"]] = compare(reference, wrapped, args.tolerance, partitioned=layout != "zero2")
            else:
                entry[case["mode"]] = {"ok": False, "error": "no result (see log_tail)"}
        results["layouts"][layout] = entry

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    layout_text = f"{args.nproc} process(es) x batch {batch} x accumulation 2"
    print(f"{results['device']}, torch {results['torch']}; fp32, {layout_text} vs 1 process x batch 8\n")
    print("| layout | base activations | sharded params | max update error | loss error | metric error | ok |")
    print("|---|---|---|---|---|---|---|")
    failed = False
    for layout, entry in results["layouts"].items():
        if "skipped" in entry:
            print(f"| {layout} | - | - | - | - | - | skipped: {entry['skipped']} |")
            continue
        for mode in MODES:
            r = entry[mode]
            failed |= not r["ok"]
            if "error" in r:
                print(f"| {layout} | {mode} | - | - | - | - | {r['error']} |")
                continue
            print(
                f"| {layout} | {mode} | {r['sharded_parameters']} | {r['max_update_error']:.1e} | "
                f"{r['loss_error']:.1e} | {r['max_metric_error']:.1e} | {'yes' if r['ok'] else 'NO'} |"
            )
        if entry.get("log_tail"):
            print(f"\n{layout} exited with {entry['exit_code']}:\n{entry['log_tail']}\n")
    print(f"\nFull results: {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(make_parser().parse_args()))
