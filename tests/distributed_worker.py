"""One optimizer step of a BLOCK-EM trainer, run by `tests/test_distributed.py` under `torchrun` (or in-process).

Each case trains a tiny Llama for exactly one plain-SGD step (lr 1, no clipping), so the parameter update is minus
the gradient, on a dataset of exactly 8 examples: every layout (1 process x batch 8, 2 processes x batch 2 x
accumulation 2) sees the same 8 examples in its one step. The main process writes, per case, the update
(`<name>.safetensors`) and a JSON record: the logged loss and `blockem/*` metrics, how many grad-enabled forwards of
the trained model each process ran, and what each process did with the base-activation cache.

Run as `torchrun --nproc_per_node 2 tests/distributed_worker.py --out DIR --base-dir DIR --cases JSON`. With
`--latent-set PATH` the latent set is loaded from that file instead of built with SAELens (for machines without
SAELens, such as the GPU image `benchmarks/gpu_smoke.py` runs on).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from test_trainer import lora_model, pad_collator, tiny_latent_set, token_dataset  # noqa: E402
from tiny_models import tiny_model  # noqa: E402
from transformers.integrations.deepspeed import unset_hf_deepspeed_config  # noqa: E402

from hf_blockem import BlockEMConfig, BlockEMTrainer, LatentSet  # noqa: E402
from hf_blockem.base_activations import CachedBaseActivations  # noqa: E402
from hf_blockem.hooks import unwrap_model  # noqa: E402

N_EXAMPLES = 8
BLOCK_LAMBDA = 5.0


def full_model() -> torch.nn.Module:
    """The tiny Llama of `base_dir`, every weight moved a little: full fine-tuning that has drifted from its base."""
    model = tiny_model("llama")
    torch.manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param), alpha=0.05)
    return model


def allow_fsdp_on_cpu() -> None:
    """Lets accelerate use FSDP on CPU processes (gloo): the one test-only shim of this worker.

    accelerate's `AcceleratorState` enables FSDP only for accelerator device types (MULTI_GPU, MULTI_XPU, ...); for
    MULTI_CPU it silently drops the FSDP plugin and the Trainer wraps the model in DDP. torch's FSDP2 (`fully_shard`)
    itself runs on CPU with gloo, so flipping the distributed type exercises the real FSDP2 preparation path.
    """
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType

    original = AcceleratorState.__init__
    if getattr(original, "_blockem_cpu_fsdp", False):
        return

    def __init__(self, *args, fsdp_plugin=None, **kwargs):
        original(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin

    __init__._blockem_cpu_fsdp = True
    AcceleratorState.__init__ = __init__


def full_tensor(param: torch.Tensor) -> torch.Tensor:
    """The whole parameter on the CPU: FSDP2 leaves DTensor shards on each process, ZeRO-3 an empty placeholder."""
    if hasattr(param, "full_tensor"):
        return param.full_tensor().cpu()
    if hasattr(param, "ds_id"):
        import deepspeed

        with deepspeed.zero.GatheredParameters([param]):
            return param.data.detach().cpu().clone()
    return param.detach().cpu()


def case_name(case: dict) -> str:
    return "-".join(f"{key}={case[key]}" for key in sorted(case))


def run_case(case: dict, out_dir: Path, base_dir: str, latent_set_path: str | None = None) -> dict:
    """Trains one step of `case` and returns its record (and writes it, on the main process, to `out_dir`).

    case keys: `mode` (base activations), `batch`, `accumulation`, `accepts_loss_kwargs`, and optionally `fsdp`
    (`"2"` for FSDP2), `zero` (a DeepSpeed ZeRO stage), `gradient_checkpointing` (true or `"reentrant"`),
    `ddp_find_unused_parameters`, `masked_examples` (how many examples have no loss token), `block_lambda` and `cpu`
    (default true; false runs on the GPU, as `benchmarks/gpu_smoke.py` does).
    """
    name = case_name(case)
    mode = case["mode"]
    # A ZeRO-3 trainer of an earlier case in this process leaves transformers' global DeepSpeed config set: models
    # built now would be partitioned at construction (empty placeholders), before this case's trainer exists.
    unset_hf_deepspeed_config()
    model = full_model() if mode == "reference" else lora_model(perturb=0.5)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    # Every forward of the trained model, with its grad mode: DDP allows one grad-enabled forward per backward.
    forwards: list[bool] = []
    inner = unwrap_model(model)
    inner.register_forward_pre_hook(lambda module, args: forwards.append(torch.is_grad_enabled()))

    extra = {}
    cpu = case.get("cpu", True)
    if case.get("fsdp") and cpu:
        allow_fsdp_on_cpu()
    if case.get("fsdp"):
        extra = dict(
            fsdp=True,
            fsdp_config={"version": int(case["fsdp"]), "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]},
        )
    if case.get("zero"):
        extra["deepspeed"] = {
            "zero_optimization": {"stage": int(case["zero"])},
            "train_micro_batch_size_per_gpu": "auto",
            "train_batch_size": "auto",
            "gradient_accumulation_steps": "auto",
            "gradient_clipping": "auto",
            "zero_force_ds_cpu_optimizer": False,  # the plain torch SGD of this test
        }
    if case.get("gradient_checkpointing"):
        reentrant = case["gradient_checkpointing"] == "reentrant"
        extra.update(gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    if "ddp_find_unused_parameters" in case:
        extra["ddp_find_unused_parameters"] = case["ddp_find_unused_parameters"]
    args = BlockEMConfig(
        output_dir=str(out_dir / "runs" / name),
        per_device_train_batch_size=case["batch"],
        gradient_accumulation_steps=case["accumulation"],
        max_steps=1,
        optim="sgd",
        learning_rate=1.0,
        lr_scheduler_type="constant",
        max_grad_norm=0.0,
        block_lambda=case.get("block_lambda", BLOCK_LAMBDA),
        base_activations=mode,
        base_model_name_or_path=base_dir if mode == "reference" else None,
        base_activations_cache_dir=str(out_dir / "cache" / name),
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        use_cpu=cpu,
        seed=0,
        data_seed=0,
        remove_unused_columns=False,
        disable_tqdm=True,
        **extra,
    )
    dataset = token_dataset(N_EXAMPLES, equal_lengths=not case["accepts_loss_kwargs"])
    if case.get("masked_examples"):
        # The first examples carry no loss token: with 6 of 8, at least two micro-batches of 2 have none at all.
        masked = case["masked_examples"]
        dataset = dataset.map(
            lambda row, i: {"labels": [-100] * len(row["labels"]) if i < masked else row["labels"]}, with_indices=True
        )
    trainer = BlockEMTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        data_collator=pad_collator,
        latent_set=LatentSet.from_pretrained(latent_set_path) if latent_set_path else tiny_latent_set(),
    )
    trainer.model_accepts_loss_kwargs = case["accepts_loss_kwargs"]
    trainer.train()

    updates = {
        n: (full_tensor(p) - before[n]).contiguous() for n, p in trainer.model.named_parameters() if n in before
    }
    local = {"forwards_with_grad": sum(forwards), "forwards_without_grad": len(forwards) - sum(forwards)}
    source = trainer._blockem_base
    if isinstance(source, CachedBaseActivations):
        local.update(
            cache_built=source.built,
            cache_digest=hashlib.sha256(source.cache.z.numpy().tobytes()).hexdigest(),
            cache_misses=source.misses,
        )
    per_process = [local]
    if torch.distributed.is_initialized():
        per_process = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(per_process, local)

    logs = next(entry for entry in trainer.state.log_history if "loss" in entry)
    record = {
        "case": case,
        "world_size": trainer.accelerator.num_processes,
        "distributed_type": str(trainer.accelerator.distributed_type),
        "fsdp_enabled": bool(getattr(trainer, "is_fsdp_enabled", False)),
        "sharded_parameters": sum(
            hasattr(p, "full_tensor") or hasattr(p, "ds_id") for p in trainer.model.parameters()
        ),
        "deepspeed_enabled": bool(getattr(trainer, "is_deepspeed_enabled", False)),
        "loss": logs["loss"],
        "metrics": {key: value for key, value in logs.items() if key.startswith("blockem/")},
        "processes": per_process,
        "cache_files": sorted(p.name for p in (out_dir / "cache" / name).glob("*")) if mode == "cache" else [],
    }
    if trainer.accelerator.is_main_process:
        save_file(updates, str(out_dir / f"{name}.safetensors"))
        (out_dir / f"{name}.json").write_text(json.dumps(record, indent=2))
    trainer.accelerator.wait_for_everyone()
    return {**record, "updates": updates}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--base-dir", required=True)
    parser.add_argument("--cases", required=True, help="a JSON list of cases (see `run_case`)")
    parser.add_argument("--latent-set", default=None, help="a saved latent set (default: build it with SAELens)")
    options = parser.parse_args()
    torch.set_num_threads(1)
    for case in json.loads(options.cases):
        run_case(case, options.out, options.base_dir, options.latent_set)


if __name__ == "__main__":
    main()
