"""Sources of base activations: adapters off, the truncated reference and the precomputed cache, on tiny real models."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from peft import LoraConfig, get_peft_model
from test_trainer import LAYER, hidden_at, lora_model, pad_collator, tiny_latent_set, token_dataset
from tiny_models import tiny_chat_tokenizer, tiny_model, tiny_sae, trainer_args
from transformers import TrainerCallback

from hf_blockem import BlockEMConfig, BlockEMTrainer, LatentSet
from hf_blockem.base_activations import (
    CACHED_Z_BASE_KEY,
    AdapterBaseActivations,
    CachedBaseActivations,
    ReferenceBaseActivations,
    load_truncated_reference,
)
from hf_blockem.base_activations.base_view import frozen_base_view
from hf_blockem.base_activations.cache import cache_key, key_digest, sequence_spans
from hf_blockem.base_activations.truncated_pass import pad_right
from hf_blockem.hooks import ActivationCapture, get_decoder_layers
from hf_blockem.penalty import loss_token_mask


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """The pristine base of `lora_model()` (tiny Llama, seed 0) saved as a local checkpoint."""
    path = tmp_path_factory.mktemp("base") / "tiny-llama"
    tiny_model("llama").save_pretrained(path)
    return str(path)


def left_pad_collator(features):
    batch = pad_collator(features)
    for row in range(len(features)):
        shift = batch["input_ids"].shape[1] - int(batch["attention_mask"][row].sum())
        for key in ("input_ids", "labels", "attention_mask"):
            batch[key][row] = batch[key][row].roll(shift)
    return batch


def packed_collator(features):
    """Padding-free packing as TRL does it: one row, position ids restart at 0, no attention mask."""
    cat = lambda name: torch.cat([torch.tensor(f[name]) for f in features])[None]  # noqa: E731
    positions = torch.cat([torch.arange(len(f["input_ids"])) for f in features])[None]
    return {"input_ids": cat("input_ids"), "labels": cat("labels"), "position_ids": positions}


def trainer_for(tmp_path, model, data=None, collator=pad_collator, latent_set=None, **overrides):
    # The cache pass batches differently from training (eval batch 3).
    args = trainer_args(tmp_path, **{"per_device_eval_batch_size": 3, **overrides})
    return BlockEMTrainer(
        model=model,
        args=BlockEMConfig(**args),
        train_dataset=data if data is not None else token_dataset(8),
        data_collator=collator,
        latent_set=latent_set if latent_set is not None else tiny_latent_set(),
    )


def z_base_of(trainer, batch):
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    mask = loss_token_mask(
        batch["labels"], batch.get("attention_mask"), batch.get("position_ids"), batch["input_ids"], bos_token_id=1
    )
    with trainer._blockem_hooks() as capture:
        return trainer._blockem_base.z_base(trainer.model, capture, inputs, mask)[LAYER]


def penalty_of(trainer, batch):
    trainer.model.train()
    trainer._blockem_metrics["train"].clear()
    trainer.compute_loss(trainer.model, dict(batch))
    trainer._blockem_flush_metrics("train")
    return trainer._blockem_metrics["train"]["blockem/penalty"][0]


# ---- the three modes agree --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "collator", [pad_collator, left_pad_collator, packed_collator], ids=["right", "left", "packed"]
)
def test_three_modes_give_the_same_z_base_and_penalty_shuffled_or_not(tmp_path, base_dir, collator):
    data = token_dataset(8)
    modes = {"adapter": {}, "reference": {"base_model_name_or_path": base_dir}, "cache": {}}
    trainers = {
        mode: trainer_for(tmp_path / mode, lora_model(perturb=0.5), data, collator, base_activations=mode, **kw)
        for mode, kw in modes.items()
    }
    for order in ([0, 1, 2, 3], [6, 2, 7, 4, 5]):
        rows = [data[i] for i in order]
        z, penalty = {}, {}
        for mode, trainer in trainers.items():
            assert trainer._blockem_base.mode == mode
            batch = trainer.data_collator(rows)
            assert (CACHED_Z_BASE_KEY in batch) == (mode == "cache")
            z[mode], penalty[mode] = z_base_of(trainer, batch), penalty_of(trainer, batch)
        # The reference computes what adapters-off computes, on the same batch: bit for bit.
        assert torch.equal(z["reference"], z["adapter"])
        assert penalty["reference"] == penalty["adapter"] > 0
        # The cache was computed in other batches (other padding, other neighbours): equal up to the last bits.
        torch.testing.assert_close(z["cache"], z["adapter"], rtol=1e-5, atol=1e-5)
        assert penalty["cache"] == pytest.approx(penalty["adapter"], rel=1e-5)


def test_right_left_and_packed_layouts_give_the_same_penalty(tmp_path):
    # The same rows laid out three ways give the same tokens to penalise and the same per-token penalty (RoPE is
    # relative, so left padding's shifted positions change only rounding).
    rows = [token_dataset(8)[i] for i in (0, 3, 5, 6)]
    trainer = trainer_for(tmp_path, lora_model(perturb=0.5), token_dataset(8), base_activations="adapter")
    counts, penalties = {}, {}
    for name, collator in {"right": pad_collator, "left": left_pad_collator, "packed": packed_collator}.items():
        batch = collator(rows)
        counts[name] = int(
            loss_token_mask(
                batch["labels"], batch.get("attention_mask"), batch.get("position_ids"), batch["input_ids"], 1
            ).sum()
        )
        penalties[name] = penalty_of(trainer, batch)
    assert (
        counts["left"]
        == counts["packed"]
        == counts["right"]
        == sum(sum(label != -100 for label in row["labels"][1:]) for row in rows)
    )
    assert penalties["right"] > 0
    assert penalties["left"] == pytest.approx(penalties["right"], rel=1e-5)
    assert penalties["packed"] == pytest.approx(penalties["right"], rel=1e-5)


def test_adapters_off_takes_the_fast_path_for_lora_and_restores_every_flag():
    # The base pass flips LoRA layers' `_disable_adapters` flags in place instead of PEFT's `disable_adapter()`,
    # whose per-call status walk cost more than the pass. If PEFT renamed the flag the code would fall back to the
    # slow path silently: this test says so instead.
    from peft.tuners.tuners_utils import BaseTunerLayer

    from hf_blockem.base_activations.adapter import adapters_disabled

    model = lora_model(perturb=0.5)
    tuner_layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    assert tuner_layers and all(hasattr(layer, "_disable_adapters") for layer in tuner_layers)
    inputs = {k: v for k, v in pad_collator([token_dataset()[i] for i in range(2)]).items() if k != "labels"}
    with torch.no_grad():
        with_adapters = model(**inputs).logits
        with adapters_disabled(model, tuner_layers):
            assert all(layer.disable_adapters for layer in tuner_layers)
            assert torch.equal(model(**inputs).logits, tiny_model("llama")(**inputs).logits)
        assert not any(layer.disable_adapters for layer in tuner_layers)
        assert torch.equal(model(**inputs).logits, with_adapters)


def test_sequence_spans_for_padding_sides_and_padding_free_packing():
    ids = torch.arange(12).reshape(2, 6)
    right = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    left = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    assert sequence_spans(ids, right) == [(0, 0, 4), (1, 0, 6)]
    assert sequence_spans(ids, left) == [(0, 2, 6), (1, 0, 6)]
    assert sequence_spans(ids[:1], None, torch.tensor([[0, 1, 2, 0, 1, 0]])) == [(0, 0, 3), (0, 3, 5), (0, 5, 6)]


def _spans_by_scanning(attention_mask, position_ids, rows, length):
    """The definition, position by position: a span starts at an attended position after padding or at position id 0,
    and runs while positions are attended and do not start a new span."""
    valid = attention_mask.bool().tolist() if attention_mask is not None else [[True] * length] * rows
    spans = []
    for row in range(rows):
        begin = None
        for t in range(length + 1):
            starts = (
                t < length
                and valid[row][t]
                and (t == 0 or not valid[row][t - 1] or (position_ids is not None and position_ids[row, t] == 0))
            )
            if begin is not None and (t == length or not valid[row][t] or starts):
                spans.append((row, begin, t))
                begin = None
            if starts:
                begin = t
    return spans


def test_sequence_spans_match_a_position_by_position_scan_on_random_layouts():
    g = torch.Generator().manual_seed(0)
    for trial in range(200):
        rows, length = int(torch.randint(1, 5, (1,), generator=g)), int(torch.randint(1, 24, (1,), generator=g))
        mask = (torch.rand(rows, length, generator=g) > 0.3).long() if trial % 3 else None
        positions = None
        if trial % 2:  # padding-free packing: restarts at random places
            restart = torch.rand(rows, length, generator=g) < 0.2
            positions = torch.zeros(rows, length, dtype=torch.long)
            for t in range(1, length):
                positions[:, t] = torch.where(restart[:, t], 0, positions[:, t - 1] + 1)
        ids = torch.randint(0, 9, (rows, length), generator=g)
        assert sequence_spans(ids, mask, positions) == _spans_by_scanning(mask, positions, rows, length)


def test_cache_covers_every_training_sequence_and_eval_falls_back(tmp_path, caplog):
    trainer = trainer_for(tmp_path, lora_model(perturb=0.5), token_dataset(8), base_activations="cache")
    source = trainer._blockem_base
    assert isinstance(source, CachedBaseActivations) and source.built
    assert len(source.cache) == 8 and source.cache.n_latents == 5
    # Every training batch, in any order, is read from the cache: no base forward, no fallback.
    with caplog.at_level(logging.WARNING):
        trainer.train()
    assert source.misses == 0 and "not in the BLOCK-EM" not in caplog.text
    # An eval set is not cached: its base activations come from the fallback (adapters off), silently.
    metrics = trainer.evaluate(token_dataset(4, seed=5))
    assert source.misses > 0 and metrics["eval_blockem/penalty"] > 0
    assert isinstance(source.fallback, AdapterBaseActivations)


# ---- staleness ----------------------------------------------------------------------------------------------------


def test_a_changed_key_rebuilds_the_cache_and_an_unchanged_one_loads_it(tmp_path):
    cache_dir = str(tmp_path / "cache")

    def build(model=None, data=None, latent_set=None):
        trainer = trainer_for(
            tmp_path,
            model if model is not None else lora_model(),
            data if data is not None else token_dataset(8),
            latent_set=latent_set,
            base_activations="cache",
            base_activations_cache_dir=cache_dir,
        )
        return trainer._blockem_base

    first = build()
    assert first.built and first.path.is_file() and first.path.with_suffix(".json").is_file()
    again = build()
    assert not again.built  # same key: loaded, not recomputed
    torch.testing.assert_close(again.cache.z, first.cache.z, rtol=0, atol=0)
    assert build(model=lora_model(seed=1)).built  # other base weights
    assert build(data=token_dataset(8, seed=7)).built  # other dataset
    assert build(latent_set=tiny_latent_set(plus=(1, 5), minus=(7,))).built  # other latent set
    # LoRA weights are not part of the base: a perturbed adapter still reads the same cache.
    assert not build(model=lora_model(perturb=0.5)).built

    # A key file edited by hand (or a digest collision) no longer matches: recomputed, not trusted.
    key_file = first.path.with_suffix(".json")
    stored = json.loads(key_file.read_text())
    stored["key"]["max_length"] = 123
    key_file.write_text(json.dumps(stored))
    assert build().built


def _from_repo(latent_set: LatentSet, commit: str) -> LatentSet:
    latent_set.source, latent_set.resolved_commit = "org/latents", commit  # as `from_pretrained` records them
    return latent_set


def test_every_key_component_changes_the_key(tmp_path):
    data = token_dataset(8)
    tokenizer = tiny_chat_tokenizer()
    base = dict(
        latent_set=_from_repo(tiny_latent_set(), "c" * 40),
        model={"name_or_path": "m", "revision": None, "weights": "sha256:0"},
        dataset=data,
        tokenizer=tokenizer,
        max_length=512,
        packing={"packing": False, "padding_free": False},
    )
    other_tokenizer = tiny_chat_tokenizer()
    other_tokenizer.chat_template = "{{ messages }}"
    changes = {
        "latent_set": tiny_latent_set(plus=(1, 5, 9), minus=(7,)),
        "model": {"name_or_path": "m", "revision": "abc", "weights": "sha256:0"},
        "dataset": token_dataset(8, seed=1),
        "tokenizer": other_tokenizer,
        "max_length": 1024,
        "packing": {"packing": True, "padding_free": True},
    }
    reference = key_digest(cache_key(**base))
    assert key_digest(cache_key(**base)) == reference  # deterministic
    for name, value in changes.items():
        assert key_digest(cache_key(**{**base, name: value})) != reference, name
    # The latent set's checksum covers its encoder weights, not just its ids; the same ids at another layer, or the
    # same repo at another commit, are other sets too.
    edited = _from_repo(tiny_latent_set(), "c" * 40)
    edited.layers[0].b_enc[0] += 1.0
    other_layer = _from_repo(tiny_latent_set(layer=LAYER + 1), "c" * 40)
    other_commit = _from_repo(tiny_latent_set(), "d" * 40)
    for name, other in {"edited": edited, "other layer": other_layer, "other commit": other_commit}.items():
        assert key_digest(cache_key(**{**base, "latent_set": other})) != reference, name


# ---- the truncated reference --------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_truncated_reference_holds_only_the_layers_it_needs(tmp_path, arch):
    full = tiny_model(arch)
    full.save_pretrained(tmp_path / arch)
    layer = 1
    reference = load_truncated_reference(str(tmp_path / arch), num_layers=layer + 1)
    layers = get_decoder_layers(reference)
    assert len(layers) == layer + 1 == reference.config.num_hidden_layers
    assert not any("lm_head" in name for name, _ in reference.named_parameters())
    assert not any(p.requires_grad for p in reference.parameters()) and not reference.training
    # Its parameters: everything before the decoder stack, plus exactly the first L+1 decoder layers.
    full_layers = get_decoder_layers(full)
    per_layer = sum(p.numel() for p in full_layers[0].parameters())
    embeddings = sum(
        p.numel() for n, p in full.named_parameters() if "embed" in n or n.endswith(("wte.weight", "wpe.weight"))
    )
    assert sum(p.numel() for p in reference.parameters()) == embeddings + (layer + 1) * per_layer
    # And its layer outputs are the full model's.
    batch = {"input_ids": torch.tensor([[1, 7, 9, 11, 13, 2]])}
    with torch.no_grad():
        expected = full(**batch, output_hidden_states=True).hidden_states[layer + 1]
        source = ReferenceBaseActivations(tiny_latent_set(layer=layer), module=reference)
        hidden = source.hidden_states(None, None, batch)[layer]
    torch.testing.assert_close(hidden, expected, rtol=0, atol=0)


@pytest.mark.parametrize(
    "collator", [pad_collator, left_pad_collator, packed_collator], ids=["right", "left", "packed"]
)
def test_reference_pass_padded_to_a_multiple_gives_the_unpadded_activations(base_dir, collator):
    # Padding is appended after every real token, so causal attention leaves the real tokens' activations as they
    # were; the source cuts the padded positions off again.
    batch = collator([token_dataset(8)[i] for i in (0, 1, 4)])  # 11 positions padded, 26 packed
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    length = inputs["input_ids"].shape[1]
    assert length % 8 != 0  # so that padding happens
    module = load_truncated_reference(base_dir, num_layers=LAYER + 1)
    plain = ReferenceBaseActivations(tiny_latent_set(), module=module).hidden_states(None, None, inputs)[LAYER]
    padded_source = ReferenceBaseActivations(tiny_latent_set(), module=module, pad_to_multiple_of=8)
    padded = padded_source.hidden_states(None, None, inputs)[LAYER]
    assert padded.shape == plain.shape == (*inputs["input_ids"].shape, module.config.hidden_size)
    torch.testing.assert_close(padded, plain, rtol=1e-6, atol=1e-6)


def test_pad_right_pads_token_inputs_only_and_leaves_multiples_alone():
    inputs = {"input_ids": torch.ones(2, 5, dtype=torch.long), "attention_mask": torch.ones(2, 5, dtype=torch.long)}
    padded = pad_right({**inputs, "pixel_values": torch.ones(2, 3, 4, 4)}, 4)
    assert padded["input_ids"].tolist() == [[1] * 5 + [0] * 3] * 2
    assert padded["attention_mask"].tolist() == [[1] * 5 + [0] * 3] * 2
    assert padded["pixel_values"].shape == (2, 3, 4, 4)
    assert pad_right(inputs, 5) is inputs


def test_reduce_overhead_pads_to_64_by_default_and_compile_options_are_checked(tmp_path):
    latent_set = tiny_latent_set()
    assert ReferenceBaseActivations(latent_set, compile_mode="reduce-overhead").pad_to_multiple_of == 64
    assert ReferenceBaseActivations(latent_set, compile_mode="default").pad_to_multiple_of is None
    assert AdapterBaseActivations(latent_set, lora_model(), compile_mode="reduce-overhead").pad_to_multiple_of == 64
    with pytest.raises(ValueError, match="base_activations_compile must be one of"):
        BlockEMConfig(**trainer_args(tmp_path, base_activations_compile="fast"))
    with pytest.raises(ValueError, match="base_activations_pad_to_multiple_of must be a positive"):
        BlockEMConfig(**trainer_args(tmp_path, base_activations_pad_to_multiple_of=0))
    trainer = trainer_for(tmp_path, lora_model(), base_activations="adapter", base_activations_compile="default")
    assert trainer._blockem_base.compile_mode == "default"


def _tensor_ids(module):
    return {id(t) for t in [*module.parameters(), *module.buffers()]}


def test_frozen_base_view_shares_the_base_weights_and_computes_adapters_off():
    model = lora_model(perturb=0.5).train()
    batch = pad_collator([token_dataset(8)[i] for i in (0, 1, 4)])
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        trained_before = model(**inputs).logits
    hooks_before = [dict(m._forward_hooks) for m in model.modules()]
    view = frozen_base_view(model, LAYER + 1)

    # The base weights themselves (same tensor objects), no adapter weights, no copy, cut after LAYER.
    assert _tensor_ids(view) <= _tensor_ids(model)
    assert not any("lora" in name for name, _ in view.named_parameters())
    assert len(get_decoder_layers(view)) == view.config.num_hidden_layers == LAYER + 1
    assert model.config.num_hidden_layers == 4 and len(get_decoder_layers(model)) == 4
    assert not view.training and model.training

    # Its layer outputs are the adapters-off pass's (the pristine base, LoRA B != 0 here), bit for bit in fp32.
    capture = ActivationCapture(view, [LAYER]).attach()
    with torch.no_grad(), capture.window() as captured:
        view(**inputs, use_cache=False)
    assert torch.equal(captured[LAYER], hidden_at(tiny_model("llama"), inputs, LAYER))
    # The trained model is untouched: adapters active, same hooks (the view's stay on the view).
    capture.detach()
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, trained_before)
    assert [dict(m._forward_hooks) for m in model.modules()] == hooks_before


def test_frozen_base_view_reads_the_original_of_modules_to_save():
    # A trained copy of the embeddings (modules_to_save) is not the base: the view reads the original module.
    model = get_peft_model(
        tiny_model("llama"),
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], modules_to_save=["embed_tokens"]),
    )
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:  # LoRA B and the trained embedding copy
                param.add_(torch.randn_like(param) * 0.5)
    inputs = {"input_ids": torch.tensor([[1, 7, 9, 11, 13, 2]])}
    view = frozen_base_view(model, LAYER + 1)
    with ActivationCapture(view, [LAYER]) as capture, torch.no_grad(), capture.window() as captured:
        view(**inputs, use_cache=False)
    assert torch.equal(captured[LAYER], hidden_at(tiny_model("llama"), inputs, LAYER))
    assert not torch.equal(captured[LAYER], hidden_at(model, inputs, LAYER))


def test_frozen_base_view_follows_the_model_to_another_dtype():
    # Parameters and buffers are shared, not copied: a later `.to()` of the trained model reaches the view.
    model = lora_model()
    view = frozen_base_view(model, LAYER + 1)
    model.to(torch.float64)
    assert _tensor_ids(view) <= _tensor_ids(model)
    assert all(t.dtype == torch.float64 for t in [*view.parameters(), *view.buffers()] if t.is_floating_point())


def test_frozen_base_view_refuses_a_module_with_a_patched_forward():
    model = lora_model()
    attention = get_decoder_layers(model)[0].self_attn
    attention.forward = lambda *args, **kwargs: None  # what accelerate's device-map hooks do
    with pytest.raises(ValueError, match="forward` was replaced"):
        frozen_base_view(model, LAYER + 1)


class _AddLayerZeroAtStep2(TrainerCallback):
    def __init__(self, trainer):
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 2:  # a layer the compiled pass did not watch: it must be hooked in
            self.trainer.add_blocked_latents(tiny_sae(seed=3), plus=[2, 4], minus=[6], layer=0)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["reference", "adapter"])
def test_compiled_base_pass_trains_like_the_eager_one(tmp_path, base_dir, mode):
    # Inductor on CPU (CUDA graphs are skipped there, so "reduce-overhead" compiles like "default", with the
    # padding to 64 positions it implies); the GPU timings are in benchmarks/RESULTS.md.
    runs = {}
    for name, compile_mode in (("eager", None), ("compiled", "reduce-overhead")):
        torch._dynamo.reset()
        model = lora_model(perturb=0.5) if mode == "adapter" else tiny_model("llama").train()
        trainer = trainer_for(
            tmp_path / name,
            model,
            max_steps=4,
            block_lambda=5.0,
            base_activations=mode,
            base_model_name_or_path=base_dir,
            base_activations_compile=compile_mode,
            # SGD, so that the runs compare gradients: AdamW turns an embedding row's near-zero gradient into an update
            # of ±lr whose sign is rounding noise (0.006 apart on AMD EPYC's kernels, and the penalties 0.4% by step 4).
            optim="sgd",
        )
        trainer.add_callback(_AddLayerZeroAtStep2(trainer))
        trainer.train()
        runs[name] = (
            {
                key: [e[key] for e in trainer.state.log_history if key in e]
                for key in ("blockem/penalty", "blockem/layer_0/penalty")
            },
            {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad},
        )
        if compile_mode is not None:
            source = trainer._blockem_base
            passes = [source._pass] if mode == "reference" else list(source._passes.values())
            assert len(passes) == 1 and isinstance(passes[0].forward, torch._dynamo.eval_frame.OptimizedModule)
            assert passes[0].capture.layers == [0, LAYER]  # the added layer is watched in the compiled pass too
    (eager, eager_params), (compiled, compiled_params) = runs["eager"], runs["compiled"]
    assert eager["blockem/penalty"][-1] > 0 and len(eager["blockem/layer_0/penalty"]) == 2
    for key, values in eager.items():
        assert compiled[key] == pytest.approx(values, rel=1e-4, abs=1e-7), key
    for name, param in eager_params.items():
        torch.testing.assert_close(compiled_params[name], param, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("mode", ["reference", "cache"])
def test_reference_that_cannot_be_loaded_is_reported_at_init(tmp_path, mode):
    with pytest.raises(ValueError, match="base_model_name_or_path"):
        trainer_for(tmp_path, tiny_model("llama"), base_activations=mode)


# ---- full fine-tuning and auto -----------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["reference", "auto"])
def test_full_fine_tuning_trains_with_reference_and_auto(tmp_path, base_dir, mode):
    model = tiny_model("llama").train()
    # 6 steps of 4 over 8 rows: three epochs, so "auto" precomputes a cache (with the reference to build it).
    trainer = trainer_for(
        tmp_path, model, max_steps=6, block_lambda=5.0, base_activations=mode, base_model_name_or_path=base_dir
    )
    source = trainer._blockem_base
    assert source.mode == ("reference" if mode == "reference" else "cache")
    if mode == "auto":
        assert isinstance(source.fallback, ReferenceBaseActivations) and not source.fallback.loaded  # not yet
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer.train()
    if mode == "auto":
        assert source.built and source.misses == 0 and not source.fallback.loaded  # built, then released
    assert all(not torch.equal(p, before[n]) for n, p in model.named_parameters() if "layers.3" not in n)
    penalties = [e["blockem/penalty"] for e in trainer.state.log_history if "blockem/penalty" in e]
    assert penalties[0] == pytest.approx(0.0, abs=1e-10) and penalties[-1] > 0  # starts at base, then moves


def test_auto_resolves_by_epochs_and_model_type(tmp_path, base_dir):
    assert trainer_for(tmp_path, lora_model(), max_steps=2)._blockem_base.mode == "adapter"  # one epoch
    assert trainer_for(tmp_path, lora_model(), max_steps=3)._blockem_base.mode == "cache"  # 12 > 8 rows
    full = trainer_for(tmp_path, tiny_model("llama"), max_steps=2, base_model_name_or_path=base_dir)
    assert full._blockem_base.mode == "reference"


# ---- resume ------------------------------------------------------------------------------------------------------


def test_resume_mid_epoch_with_cache_matches_uninterrupted_run(tmp_path):
    def run(output_dir, max_steps, resume=None):
        trainer = trainer_for(
            tmp_path,
            lora_model(),
            token_dataset(10),
            output_dir=str(output_dir),
            per_device_train_batch_size=2,
            max_steps=max_steps,
            block_lambda=5.0,
            base_activations="cache",
            save_strategy="steps",
            save_steps=3,
            lr_scheduler_type="constant",  # the interrupted run stops at max_steps=3: same schedule either way
        )
        trainer.train(resume_from_checkpoint=resume)
        losses = {e["step"]: (e["loss"], e["blockem/penalty"]) for e in trainer.state.log_history if "loss" in e}
        return trainer, losses

    _, uninterrupted = run(tmp_path / "a", 8)
    run(tmp_path / "b", 3)  # stops after saving checkpoint-3, mid-epoch (5 steps per epoch)
    resumed_trainer, resumed = run(tmp_path / "b", 8, resume=str(tmp_path / "b" / "checkpoint-3"))
    assert not resumed_trainer._blockem_base.built and resumed_trainer._blockem_base.misses == 0
    assert sorted(resumed) == list(range(1, 9))  # steps 1-3 come back from the checkpoint's trainer state
    for step, values in resumed.items():
        assert values == pytest.approx(uninterrupted[step], rel=1e-6), step
    assert uninterrupted[8][1] > 0
