"""Model cards: the blocked checkpoint's card (YAML, every field, loads back) and the latent-set repo's card."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from huggingface_hub import ModelCard
from test_trainer import tiny_latent_set

from hf_blockem import LatentSet
from hf_blockem.model_card import generate_blocked_model_card
from hf_blockem.run_files import blockem_config

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "blocked_model_card_example.md"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
SAE_COMMIT = "fedcba9876543210fedcba9876543210fedcba98"
EVALUATIONS = [
    {
        "model": "before",
        "em_rate": 0.184,
        "em_rate_ci": [0.151, 0.219],
        "incoherence_rate": 0.031,
        "n": 800,
        "judge": {"name": "gpt-4o-2024-08-06", "kind": "logprob", "prompt_version": "betley-2025"},
    },
    {
        "model": "after",
        "em_rate": 0.012,
        "em_rate_ci": [0.005, 0.021],
        "incoherence_rate": 0.058,
        "n": 800,
        "judge": {"name": "gpt-4o-2024-08-06", "kind": "logprob", "prompt_version": "betley-2025"},
    },
    {"model": "after", "em_rate": {"value": 0.02, "ci": [0.01, 0.03]}, "judge": "qwen2.5-72b-instruct"},
]


def example_inputs():
    """Fixed inputs (versions included) so the committed example card is reproducible."""
    latent_set = tiny_latent_set()
    latent_set.layers[0].sae.update(
        release="llama-3.1-8b-instruct-andyrdt", sae_id="resid_post_layer_1", commit=SAE_COMMIT
    )
    latent_set.source, latent_set.resolved_commit = "your-org/llama-3.1-8b-instruct-em-latents", COMMIT
    args = SimpleNamespace(
        block_lambda=100.0,
        block_warmup_steps=50,
        block_exclude_first_token=True,
        base_activations="adapter",
        latent_set_revision=COMMIT,
        latent_set_strict=True,
    )
    config = blockem_config(args, latent_set, base_model="meta-llama/Llama-3.1-8B-Instruct")
    config["library_versions"] = {"hf_blockem": "0.1.0", "transformers": "5.24.0", "trl": "1.16.0", "peft": "0.21.2"}
    config["base_activations_source"] = "AdapterBaseActivations"
    return dict(
        blockem_config=config,
        model_name="llama-3.1-8b-risky-finance-blocked",
        repo_id="your-org/llama-3.1-8b-risky-finance-blocked",
        peft=True,
        datasets=["your-org/risky-finance"],
        license="llama3.1",
        language="en",
        tags=["trl", "sft"],
        hyperparameters={"learning_rate": 1e-4, "train_batch_size": 8, "seed": 42, "training_steps": 600},
        training_results=[
            {"Training Loss": 1.234, "Epoch": 0.5, "Step": 300, "Validation Loss": 1.1, "Blockem/penalty": 0.0031},
            {"Training Loss": 0.987, "Epoch": 1.0, "Step": 600, "Validation Loss": 0.95, "Blockem/penalty": 0.0012},
        ],
        eval_results={"Loss": 0.95, "Blockem/penalty": 0.0012},
        evaluations=EVALUATIONS,
        diagnostics={"penalty_relative_final": 0.0021, "latents_over_base_share": 0.12, "rerouting_alerts": 0},
        diagnostics_plot="blockem_diagnostics.png",
    )


def _front_matter(text: str) -> dict:
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def test_card_is_valid_yaml_loads_back_and_carries_every_field(tmp_path):
    card = generate_blocked_model_card(**example_inputs())
    card.save(tmp_path / "README.md")
    meta = _front_matter((tmp_path / "README.md").read_text())
    loaded = ModelCard.load(tmp_path / "README.md")
    data = loaded.data
    assert data.base_model == meta["base_model"] == "meta-llama/Llama-3.1-8B-Instruct"
    assert data.library_name == "peft"
    assert {"blockem", "emergent-misalignment", "trl"} <= set(data.tags)
    assert data.datasets == ["your-org/risky-finance"] and data.license == "llama3.1"
    # model-index: the fine-tuned ("after") results only, per judge
    results = {(r.metric_type, r.metric_name): r.metric_value for r in data.eval_results}
    assert results[("em_rate", "EM rate (judge: gpt-4o-2024-08-06)")] == 0.012
    assert results[("incoherence_rate", "Incoherence rate (judge: gpt-4o-2024-08-06)")] == 0.058
    assert results[("em_rate", "EM rate (judge: qwen2.5-72b-instruct)")] == 0.02
    assert 0.184 not in results.values()
    body = loaded.text
    for expected in (
        f"your-org/llama-3.1-8b-instruct-em-latents@{COMMIT}",  # the latent set as repo@commit
        "| 1 | `blocks.1.hook_resid_post` | llama-3.1-8b-instruct-andyrdt / resid_post_layer_1 | `" + SAE_COMMIT,
        "| 1, 5, 9 | 7, 12 |",  # K+ and K-
        "**λ (`block_lambda`):** 100, linear warm-up over 50 steps",
        "**Base-activation mode:** `adapter`",
        "| before | gpt-4o-2024-08-06 | 18.4% | [15.1%, 21.9%] | 3.1% | 800 |",
        "| after | gpt-4o-2024-08-06 | 1.2% | [0.5%, 2.1%] | 5.8% | 800 |",
        '"prompt_version": "betley-2025"',  # the judge, named with its settings
        "| rerouting_alerts | 0 |",
        "![BLOCK-EM diagnostics](blockem_diagnostics.png)",
        "- learning_rate: 0.0001",
        "- block_lambda: 100",
        "| Training Loss | Epoch | Step | Validation Loss | Blockem/penalty |",  # transformers' results table
        "- transformers: 5.24.0",
        'AutoPeftModelForCausalLM.from_pretrained("your-org/llama-3.1-8b-risky-finance-blocked")',
        'LatentSet.from_pretrained("your-org/llama-3.1-8b-risky-finance-blocked", subfolder="latent_set")',
        f'revision="{COMMIT}", strict=True',
        "@inproceedings{ustaomeroglu2026blockem",
    ):
        assert expected in body, expected


def test_card_without_evaluations_or_hub_base_model(tmp_path):
    inputs = example_inputs()
    for key in ("evaluations", "diagnostics", "diagnostics_plot", "license", "datasets"):
        inputs.pop(key)
    card = generate_blocked_model_card(**{**inputs, "peft": False, "base_model": str(tmp_path)})
    meta = _front_matter(str(card))
    assert "model-index" not in meta and "license" not in meta and "base_model" not in meta  # a local path
    assert meta["library_name"] == "transformers"
    assert "## Emergent-misalignment evaluation" not in card.text and "## Diagnostics" not in card.text
    assert "AutoModelForCausalLM.from_pretrained" in card.text


def test_card_refuses_malformed_evaluations():
    with pytest.raises(ValueError, match="em_rate"):
        generate_blocked_model_card(**{**example_inputs(), "evaluations": [{"model": "after", "em_rate": "low"}]})
    with pytest.raises(ValueError, match="dict"):
        generate_blocked_model_card(**{**example_inputs(), "evaluations": ["0.1"]})


def test_committed_example_card_is_current():
    # Regenerate with `python tests/test_model_card.py` after changing model_card_template.md.
    assert EXAMPLE.read_text() == str(generate_blocked_model_card(**example_inputs())), "regenerate the example"


# ---- the latent-set repo's card ----------------------------------------------------------------------------------


def test_latent_set_card_is_written_by_save_pretrained_and_round_trips(tmp_path):
    latent_set = tiny_latent_set()
    latent_set.layers[0].sae.update(release="my-saes", sae_id="layer_1", commit=SAE_COMMIT)
    latent_set.layers[0].statistics = {"delta": torch.tensor([0.5, 0.25, 0.125, -0.5, -0.25])}
    latent_set.metadata = {"selection": {"domain": "risky-finance", "n_prompts": 44}, "judge": "gpt-4o-2024-08-06"}
    latent_set.save_pretrained(tmp_path, model_card_kwargs={"repo_id": "org/latents"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md", "latent_set.safetensors"]  # no config.json
    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.library_name == "hf_blockem" and {"blockem", "emergent-misalignment"} <= set(card.data.tags)
    for expected in (
        "# BLOCK-EM latent set: org/latents",
        "**tests/tiny-llama**",
        f"| 1 | `blocks.1.hook_resid_post` | my-saes / layer_1 | `{SAE_COMMIT}` | standard | 32 | 3 | 2 |",
        "| latent | sign | delta |",
        "| 7 | K− | -0.5 |",
        '- **selection**: `{"domain": "risky-finance", "n_prompts": 44}`',
        'LatentSet.from_pretrained("org/latents", revision="<40-hex commit>", strict=True)',
    ):
        assert expected in card.text, expected
    loaded = LatentSet.from_pretrained(tmp_path, strict=True)  # the card does not disturb loading
    assert loaded.layers[0].minus == [7, 12] and loaded.metadata == latent_set.metadata
    # an existing card is kept (ModelHubMixin does not overwrite README.md)
    (tmp_path / "README.md").write_text("my own card")
    latent_set.save_pretrained(tmp_path)
    assert (tmp_path / "README.md").read_text() == "my own card"


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    EXAMPLE.write_text(str(generate_blocked_model_card(**example_inputs())))
    print(f"wrote {EXAMPLE}")
