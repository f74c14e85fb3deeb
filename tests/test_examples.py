"""The example recipe `examples/train_blocked_sft.py`, run in-process on local folders (nothing touches the Hub)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
import yaml
from tiny_models import HIDDEN, tiny_chat_dataset, tiny_chat_tokenizer, tiny_model

from hf_blockem import LatentSet

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
LAYER = 1


def load_script(name: str):
    """Imports an example script by path (examples/ is not a package)."""
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def script():
    return load_script("train_blocked_sft")


def local_latent_set(path: Path) -> Path:
    from sae_lens import StandardSAE, StandardSAEConfig

    torch.manual_seed(0)
    sae = StandardSAE(StandardSAEConfig(d_in=HIDDEN, d_sae=32, apply_b_dec_to_input=True))
    with torch.no_grad():
        for param in (sae.W_enc, sae.b_enc, sae.b_dec, sae.W_dec):
            param.normal_(0, 0.3)
    LatentSet.from_sae(sae, plus=[1, 5], minus=[7], layer=LAYER, base_model="tests/tiny-llama").save_pretrained(path)
    return path


def test_shipped_config_parses_with_the_scripts_parser(script):
    script_args, training_args, model_args = script.make_parser().parse_args_and_config(
        ["--config", str(EXAMPLES / "train_blocked_sft.yaml"), "--bf16", "false", "--use_cpu", "true"]
    )
    assert model_args.use_peft and model_args.lora_target_modules == "all-linear"
    assert training_args.assistant_only_loss and training_args.block_lambda > 0
    assert training_args.latent_set and script_args.dataset_name
    assert training_args.gradient_checkpointing_kwargs == {"use_reentrant": False}


def run_recipe(tmp_path: Path, script, **overrides) -> Path:
    """The shipped recipe, pointed at local folders and shrunk to two CPU steps; returns its output_dir."""
    model_dir, data_dir, out_dir = tmp_path / "model", tmp_path / "data", tmp_path / "out"
    tiny_model("llama").save_pretrained(model_dir)
    tiny_chat_tokenizer().save_pretrained(model_dir)
    tiny_chat_dataset(16).to_parquet(str(data_dir / "train.parquet"))
    latents_dir = local_latent_set(tmp_path / "latents")
    config = yaml.safe_load((EXAMPLES / "train_blocked_sft.yaml").read_text())
    config.update(
        model_name_or_path=str(model_dir),
        dtype="float32",
        attn_implementation="eager",
        lora_r=4,
        lora_alpha=8,
        dataset_name=str(data_dir),
        latent_set=str(latents_dir),
        latent_set_revision=None,
        block_lambda=1.0,
        block_warmup_steps=0,
        max_length=32,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=1,
        max_steps=2,
        learning_rate=1e-2,
        warmup_steps=0,
        logging_steps=1,
        save_steps=2,
        bf16=False,
        use_cpu=True,
        disable_tqdm=True,
        output_dir=str(out_dir),
        **overrides,
    )
    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump(config))
    script.main(*script.make_parser().parse_args_and_config(["--config", str(config_path)]))
    return out_dir


def blockem_logs(out_dir: Path) -> list[dict]:
    state = json.loads((out_dir / "checkpoint-2" / "trainer_state.json").read_text())
    return [entry for entry in state["log_history"] if "blockem/penalty" in entry]


def test_script_trains_local_model_with_local_latent_set_from_a_yaml_config(tmp_path, script):
    out_dir = run_recipe(tmp_path, script)
    assert (out_dir / "adapter_model.safetensors").is_file()
    adapter_config = json.loads((out_dir / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str(tmp_path / "model")
    logs = blockem_logs(out_dir)
    assert [entry["step"] for entry in logs] == [1, 2]
    assert logs[0]["blockem/penalty"] == 0.0  # LoRA B = 0 at the first step
    assert all(entry["blockem/lambda"] == 1.0 for entry in logs)


def test_script_fine_tunes_fully_against_a_reference_copy(tmp_path, script):
    # The latent set names a Hub id for its base model; the run says where that model is here.
    reference = dict(base_activations="reference", base_model_name_or_path=str(tmp_path / "model"))
    out_dir = run_recipe(tmp_path, script, use_peft=False, **reference)
    assert (out_dir / "model.safetensors").is_file() and not (out_dir / "adapter_config.json").exists()
    assert (
        json.loads((out_dir / "blockem_config.json").read_text())["base_activations_source"]
        == "ReferenceBaseActivations"
    )
    logs = blockem_logs(out_dir)
    z, z_base = "blockem/layer_1/latent_1/z", "blockem/layer_1/latent_1/z_base"
    assert logs[0][z] == logs[0][z_base] and logs[0]["blockem/penalty"] == 0.0  # the base model until the first update
    assert logs[1][z] != logs[1][z_base]  # then the tuned model moves away from the frozen reference
