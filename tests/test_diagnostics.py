"""BlockEMCallback on tiny real models: statistics against a direct computation, hook lifecycle, the alert on a planted
drift (and its silence without one), adaptive re-blocking with save and resume."""

from __future__ import annotations

import copy
import json
import logging
import pickle

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from tiny_models import HIDDEN, LORA_TARGETS, tiny_model, tiny_sae, trainer_args, training_args
from transformers import Trainer, TrainerCallback, TrainingArguments

from hf_blockem import BlockEMConfig, BlockEMTrainer, LatentSet
from hf_blockem.diagnostics import BlockEMCallback, ProbeBatch, misalignment_directions
from hf_blockem.hooks import get_decoder_layers
from hf_blockem.run_files import BLOCKEM_CONFIG_NAME, read_card_extras

P = "blockem_diag"


def blocked_set(layer: int = 1, directions=None) -> LatentSet:
    part = LatentSet.from_sae(
        tiny_sae(d_sae=24, seed=layer), plus=[1, 5], minus=[7], layer=layer, base_model="tests/tiny-llama"
    )
    return LatentSet(part.layers, base_model=part.base_model, d_in=part.d_in, directions=directions)


def lora_model(seed: int = 0, perturb: float = 0.0):
    model = get_peft_model(
        tiny_model("llama", seed=seed), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=LORA_TARGETS)
    )
    if perturb:
        torch.manual_seed(seed + 1)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.normal_(0, perturb)
    return model


def plant(model, layer: int = 2, scale: float = 0.5, seed: int = 3) -> dict[str, torch.Tensor]:
    """LoRA B weights that change decoder layer `layer` only (the "rerouted" path); returns them."""
    g = torch.Generator().manual_seed(seed)
    return {
        name: torch.randn(param.shape, generator=g) * scale
        for name, param in model.named_parameters()
        if "lora_B" in name and f"layers.{layer}." in name
    }


def set_params(model, values: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in values.items():
            params[name].copy_(value)


class Plant(TrainerCallback):
    """Plants the drift at the end of optimizer step `at` (before that step's logging)."""

    def __init__(self, model, values, at: int):
        self.model, self.values, self.at = model, values, at

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.at:
            set_params(self.model, self.values)


def dataset(n: int = 16, seed: int = 0) -> Dataset:
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        ids = torch.randint(6, 60, (10,), generator=g).tolist()
        rows.append({"input_ids": [1, *ids], "labels": [-100, *ids]})
    return Dataset.from_list(rows)


def collate(features):
    return {
        "input_ids": torch.tensor([f["input_ids"] for f in features]),
        "labels": torch.tensor([f["labels"] for f in features]),
        "attention_mask": torch.ones(len(features), len(features[0]["input_ids"]), dtype=torch.long),
    }


def probe(seed: int = 7) -> ProbeBatch:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(6, 60, (6, 12), generator=g)
    attention = torch.ones_like(ids)
    attention[4:, 9:] = 0  # some padding
    return ProbeBatch.from_inputs({"input_ids": ids, "attention_mask": attention})


def config(tmp_path, **overrides):
    return BlockEMConfig(
        **trainer_args(tmp_path, **{"learning_rate": 1e-3, "base_activations": "adapter", **overrides})
    )


def diag_entries(trainer) -> list[dict]:
    return [entry for entry in trainer.state.log_history if f"{P}/path_drift" in entry]


def hidden(model, batch: ProbeBatch, layer: int) -> torch.Tensor:
    with torch.no_grad():
        out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, output_hidden_states=True)
    return out.hidden_states[layer + 1][batch.token_mask].float()


def test_statistics_equal_direct_computation(tmp_path):
    torch.manual_seed(0)
    # Not the last layer: output_hidden_states applies the final norm to it, the hooks read the raw layer output.
    directions = {1: torch.randn(HIDDEN), 2: torch.randn(HIDDEN)}
    latent_set = blocked_set(1, directions)
    sae = tiny_sae(d_sae=24, seed=5)
    model = lora_model(perturb=0.3)
    trainer = BlockEMTrainer(
        model=model, args=config(tmp_path), train_dataset=dataset(), data_collator=collate, latent_set=latent_set
    )
    batch = probe()
    trainer.add_callback(BlockEMCallback(trainer, batch, saes={2: sae}, top_k=3))
    trainer.train()
    logged = diag_entries(trainer)
    assert [entry["step"] for entry in logged] == [1, 2]
    last = logged[-1]

    model.eval()
    trained = {layer: hidden(model, batch, layer) for layer in (1, 2)}
    with model.disable_adapter():
        base = {layer: hidden(model, batch, layer) for layer in (1, 2)}
    blocked = latent_set.layer(1)
    z, z_base = blocked.encode(trained[1]), blocked.encode(base[1])
    for j, latent in enumerate(blocked.latent_ids):
        assert last[f"{P}/layer_1/latent_{latent}/z"] == pytest.approx(float(z[:, j].mean()), abs=1e-5)
        assert last[f"{P}/layer_1/latent_{latent}/z_base"] == pytest.approx(float(z_base[:, j].mean()), abs=1e-5)
        over = ((z[:, j] - z_base[:, j]) * blocked.signs[j] > 0).float().mean()
        assert last[f"{P}/layer_1/latent_{latent}/over_base"] == pytest.approx(float(over), abs=1e-6)
    excess = torch.relu((z - z_base) * blocked.signs).square().sum() / z_base.square().sum()
    assert last[f"{P}/layer_1/blocked_excess"] == pytest.approx(float(excess), rel=1e-4, abs=1e-8)
    for layer, d in directions.items():
        drift = ((trained[layer] - base[layer]) @ d).mean() / d.dot(d)
        assert last[f"{P}/layer_{layer}/direction_drift"] == pytest.approx(float(drift), abs=1e-5)
    with torch.no_grad():
        sae_drift = (sae.encode(trained[2]) - sae.encode(base[2])).mean(0)
    d = directions[2]
    score = sae_drift * (sae.W_dec.detach() @ d) / d.dot(d)  # each latent's share of the direction drift
    top = torch.argsort(score, descending=True)[:3].tolist()
    assert [int(last[f"{P}/layer_2/top_{i}/latent"]) for i in range(3)] == top
    for i, latent in enumerate(top):
        assert last[f"{P}/layer_2/top_{i}/drift"] == pytest.approx(float(sae_drift[latent]), abs=1e-5)
        assert last[f"{P}/layer_2/top_{i}/score"] == pytest.approx(float(score[latent]), abs=1e-5)
    assert last[f"{P}/layer_2/unblocked_shift"] == pytest.approx(float(score.sum()), abs=1e-5)
    assert last[f"{P}/n_tokens"] == batch.n_tokens
    # The training metrics of the penalty still land in the loss entry, not in the diagnostics entry.
    assert any("blockem/penalty" in entry and "loss" in entry for entry in trainer.state.log_history)


def test_plain_trainer_reduced_set_and_hooks_removed(tmp_path):
    model = tiny_model("llama")
    layers = get_decoder_layers(model)
    args = TrainingArguments(**training_args(tmp_path, output_dir=str(tmp_path / "plain")))
    trainer = Trainer(model=model, args=args, train_dataset=dataset(), data_collator=collate)
    with pytest.raises(ValueError, match="blocks nothing"):
        BlockEMCallback(trainer, probe(), saes={2: tiny_sae(d_sae=24)}, adaptive=True)
    seen = []

    class Spy(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            seen.append(sum(len(layer._forward_hooks) for layer in layers))

    callback = BlockEMCallback(trainer, probe(), latent_set=blocked_set(2), directions={3: torch.ones(HIDDEN)})
    trainer.add_callback(callback)
    trainer.add_callback(Spy())
    trainer.train()
    assert max(seen) == 2  # layers 2 and 3 were watched during training
    assert sum(len(layer._forward_hooks) for layer in layers) == 0
    assert callback._capture is None and callback._base_hidden == {}
    last = diag_entries(trainer)[-1]
    assert f"{P}/layer_2/latent_1/z" in last and f"{P}/layer_3/direction_drift" in last
    assert last[f"{P}/layer_3/direction_drift"] != 0.0  # full fine-tuning moved the model away from its start
    extras = read_card_extras(args.output_dir)
    assert extras["diagnostics_plot"] == "blockem_diagnostics.png"
    assert extras["diagnostics"]["logging steps monitored"] == 2


def planted_setup(tmp_path, *, planted: bool, adaptive: bool = False, **overrides):
    """Blocked latents at layer 1; a misalignment direction at layer 2 measured from a planted LoRA change there."""
    model = lora_model()
    values = plant(model)
    batch = probe()
    set_params(model, values)
    directions = misalignment_directions(model, model, batch, [2])
    set_params(model, {name: torch.zeros_like(v) for name, v in values.items()})
    trainer = BlockEMTrainer(
        model=model,
        args=config(tmp_path, **overrides),
        train_dataset=dataset(),
        data_collator=collate,
        latent_set=blocked_set(1),
    )
    callback = BlockEMCallback(
        trainer,
        batch,
        directions=directions,
        saes={2: tiny_sae(d_sae=24, seed=11)},
        alert_threshold=0.5,
        adaptive=adaptive,
        adaptive_top_k=2,
        adaptive_max_latents=2,
    )
    trainer.add_callback(callback)
    if planted:
        trainer.add_callback(Plant(model, values, at=1))
    return trainer, callback


def test_hooks_are_removed_when_training_raises_and_not_stacked_by_the_next_run(tmp_path):
    class Boom(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 2:
                raise RuntimeError("boom")

    trainer, callback = planted_setup(tmp_path, planted=False, max_steps=3)
    layers = get_decoder_layers(trainer.model)
    hooks_before = [len(layer._forward_hooks) for layer in layers]
    boom = Boom()
    trainer.add_callback(boom)
    with pytest.raises(RuntimeError, match="boom"):
        trainer.train()
    assert [len(layer._forward_hooks) for layer in layers] == hooks_before
    assert callback._capture is None and callback._base_hidden == {}
    assert pickle.loads(pickle.dumps(trainer.model)) is not None  # no hook closure left on it

    trainer.remove_callback(boom)
    trainer.train()  # the run again, from the start: one set of hooks, the same measurements
    assert [e["step"] for e in diag_entries(trainer)][-3:] == [1, 2, 3]
    assert [len(layer._forward_hooks) for layer in layers] == hooks_before


@pytest.mark.parametrize("planted", [True, False])
def test_alert_fires_on_planted_drift_only(tmp_path, caplog, planted):
    trainer, _ = planted_setup(tmp_path, planted=planted, max_steps=3, learning_rate=0.0)
    with caplog.at_level(logging.WARNING, logger="hf_blockem.diagnostics.callback"):
        trainer.train()
    logged = diag_entries(trainer)
    assert [entry["step"] for entry in logged] == [1, 2, 3]
    drift = [entry[f"{P}/layer_2/direction_drift"] for entry in logged]
    assert all(entry[f"{P}/blocked_excess"] == 0.0 for entry in logged)  # layer 1 is untouched by the plant
    alerts = [entry[f"{P}/alert"] for entry in logged]
    warned = [r for r in caplog.records if "rerouting alert" in r.getMessage()]
    if planted:
        assert drift == pytest.approx([1.0, 1.0, 1.0], abs=1e-4)  # the direction *is* the planted shift
        assert alerts == [1.0, 1.0, 1.0] and len(warned) == 1  # one warning per episode, a metric every step
    else:
        assert drift == [0.0, 0.0, 0.0] and alerts == [0.0, 0.0, 0.0] and not warned


def test_adaptive_additions_next_step_saved_and_resumed(tmp_path):
    kwargs = dict(max_steps=4, save_strategy="steps", save_steps=3, learning_rate=1e-3, block_lambda=10.0)
    trainer, callback = planted_setup(tmp_path / "a", planted=True, adaptive=True, **kwargs)
    trainer.train()
    [record] = callback.records.additions
    assert record["layer"] == 2 and record["step"] == 1 and len(record["plus"] + record["minus"]) == 2
    assert trainer.latent_set.layer_indices == [1, 2]
    assert trainer.latent_set.metadata["adaptive_additions"] == [record]
    penalty = {e["step"]: e.get("blockem/layer_2/penalty") for e in trainer.state.log_history if "loss" in e}
    assert penalty[1] is None  # the step that raised the alert was trained without the additions ...
    assert all(penalty[step] > 0 for step in (2, 3, 4))  # ... every later step with them
    diag = diag_entries(trainer)
    assert [e[f"{P}/adaptive_added"] for e in diag] == [2.0, 0.0, 0.0, 0.0]
    assert [e[f"{P}/n_blocked"] for e in diag] == [5.0, 5.0, 5.0, 5.0]

    # Saved with the checkpoint: the latent set (tensors + record) and the diagnostics state (JSON).
    checkpoint = tmp_path / "a" / "out" / "checkpoint-3"
    saved = LatentSet.from_pretrained(str(checkpoint / "latent_set"))
    assert saved.layer_indices == [1, 2] and saved.metadata["adaptive_additions"] == [record]
    state = json.loads((checkpoint / "trainer_state.json").read_text())["stateful_callbacks"]
    assert state["BlockEMDiagnosticsState"]["attributes"]["additions"] == [record]
    # blockem_config.json (and so the card) describes the set blocked at that checkpoint, additions included.
    config = json.loads((checkpoint / BLOCKEM_CONFIG_NAME).read_text())
    layer1, layer2 = config["latent_set"]["layers"]
    assert (layer1["layer"], layer2["layer"]) == (1, 2)
    assert (layer2["plus"], layer2["minus"]) == (record["plus"], record["minus"])

    # Resume in a fresh trainer built with the original one-layer set: the addition comes back with the checkpoint.
    resumed, resumed_callback = planted_setup(tmp_path / "b", planted=False, adaptive=True, **kwargs)
    assert resumed.latent_set.layer_indices == [1]
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.latent_set.layer_indices == [1, 2]
    assert resumed.latent_set.layer(2).latent_ids == trainer.latent_set.layer(2).latent_ids
    assert resumed_callback.records.additions == [record]
    assert [e["step"] for e in resumed_callback.records.history] == [1, 2, 3, 4]
    # The restored steps are the interrupted run's, value for value; the step after the resume measures the same.
    assert resumed_callback.records.history[:3] == callback.records.history[:3]
    assert resumed_callback.records.history[3] == pytest.approx(callback.records.history[3], rel=1e-4)
    assert resumed_callback.records.alerts == callback.records.alerts and callback.records.alerts[0] == 1

    def step4(t):
        return next(e for e in t.state.log_history if e.get("step") == 4 and "loss" in e)

    assert step4(resumed)["loss"] == pytest.approx(step4(trainer)["loss"], rel=1e-5)
    assert step4(resumed)["blockem/layer_2/penalty"] == pytest.approx(
        step4(trainer)["blockem/layer_2/penalty"], rel=1e-4
    )


def test_misalignment_directions_are_mean_differences():
    model = lora_model(perturb=0.3)
    batch = probe()
    directions = misalignment_directions(model, model, batch, [0, 2])
    for layer in (0, 2):
        tuned = hidden(model, batch, layer)
        with model.disable_adapter():
            base = hidden(model, batch, layer)
        torch.testing.assert_close(directions[layer], (tuned - base).mean(0))
    with pytest.raises(ValueError, match="identical activations"):
        misalignment_directions(lora_model(), lora_model(), batch, [0])


@pytest.mark.parametrize("sae_dtype", [torch.float32, torch.float64])
def test_full_sae_drift_is_summed_over_token_chunks(sae_dtype):
    # The full SAEs encode the probe a few tokens at a time; every sum and logged value is the one-shot computation's.
    from hf_blockem.diagnostics import probe_metrics, probe_sums

    model = lora_model(perturb=0.3)
    model.eval()
    batch = probe()
    trained = {layer: hidden(model, batch, layer) for layer in (1, 2)}
    with model.disable_adapter():
        base = {layer: hidden(model, batch, layer) for layer in (1, 2)}
    torch.manual_seed(0)
    directions = {1: torch.randn(HIDDEN), 2: torch.randn(HIDDEN)}
    latent_set = blocked_set(1, directions)
    saes = {1: tiny_sae(d_sae=24, seed=5), 2: tiny_sae(d_sae=40, seed=6)}
    kwargs = {"latent_set": latent_set, "saes": saes, "directions": directions}
    assert batch.n_tokens > 20  # several chunks of 3 tokens, the last one partial
    with torch.no_grad():  # as in the callback's measurement
        expected = probe_sums(trained, base, token_chunk=10_000, **kwargs)
    for layer, sae in saes.items():  # the former one-shot computation: [n_tokens, d_sae] latents of both models
        with torch.no_grad():
            drift = (sae.encode(trained[layer]) - sae.encode(base[layer])).sum(0)
        torch.testing.assert_close(expected[f"sae/{layer}/drift"], drift, rtol=1e-5, atol=1e-5)
    kwargs["saes"] = {layer: copy.deepcopy(sae).to(sae_dtype) for layer, sae in saes.items()}
    with torch.no_grad():
        sums = probe_sums(trained, base, token_chunk=3, **kwargs)
    assert sums.keys() == expected.keys()
    for key, value in expected.items():
        assert sums[key].dtype == value.dtype == torch.float32, key
        torch.testing.assert_close(sums[key], value, rtol=1e-5, atol=1e-5, msg=key)
    metrics, rerouting = probe_metrics(sums, top_k=3, **kwargs)
    expected_metrics, expected_rerouting = probe_metrics(expected, top_k=3, **kwargs)
    assert metrics.keys() == expected_metrics.keys()
    for key, value in expected_metrics.items():
        assert metrics[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    for layer, info in expected_rerouting.items():
        torch.testing.assert_close(rerouting[layer]["drift"], info["drift"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(rerouting[layer]["score"], info["score"], rtol=1e-5, atol=1e-6)
