"""The BLOCK-EM trainers on tiny real models: real PEFT adapters, real TRL / transformers trainers, a real SAELens SAE."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from tiny_models import (
    HIDDEN,
    LORA_TARGETS,
    tiny_chat_dataset,
    tiny_chat_tokenizer,
    tiny_model,
    tiny_sae,
    trainer_args,
    training_args,
)
from transformers import DataCollatorForLanguageModeling, TrainerCallback

from hf_blockem import BlockEMConfig, BlockEMSFTConfig, BlockEMSFTTrainer, BlockEMTrainer, LatentSet
from hf_blockem.hooks import get_decoder_layers, hidden_state_of
from hf_blockem.penalty import block_penalty_sum, loss_token_mask
from hf_blockem.trainer import check_ddp_checkpointing

LAYER = 1


BASE_REVISION = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"  # of the (imaginary) Hub base model: strict loads need one


def tiny_latent_set(layer: int = LAYER, plus=(1, 5, 9), minus=(7, 12), d_in: int = HIDDEN) -> LatentSet:
    return LatentSet.from_sae(
        tiny_sae(d_in=d_in),
        plus=list(plus),
        minus=list(minus),
        layer=layer,
        base_model="tests/tiny-llama",
        base_model_revision=BASE_REVISION,
    )


def lora_model(seed: int = 0, perturb: float = 0.0):
    model = tiny_model("llama", seed=seed)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=LORA_TARGETS))
    if perturb:
        torch.manual_seed(seed + 1)
        with torch.no_grad():
            for name, param in peft_model.named_parameters():
                if "lora_B" in name:
                    param.normal_(0, perturb)
    return peft_model


def token_dataset(n: int = 8, seed: int = 0, equal_lengths: bool = False) -> Dataset:
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        length = 10 if equal_lengths else 6 + (i * 3) % 7
        ids = torch.randint(6, 60, (length,), generator=g).tolist()
        ids[0] = 1  # BOS
        labels = list(ids)
        if not equal_lengths:  # a prompt without loss, of varying length
            labels[: 1 + i % 3] = [-100] * (1 + i % 3)
        rows.append({"input_ids": ids, "labels": labels})
    return Dataset.from_list(rows)


def pad_collator(features):
    length = max(len(f["input_ids"]) for f in features)
    ids = torch.zeros(len(features), length, dtype=torch.long)
    labels = torch.full((len(features), length), -100)
    attention = torch.zeros(len(features), length, dtype=torch.long)
    for i, f in enumerate(features):
        n = len(f["input_ids"])
        ids[i, :n] = torch.tensor(f["input_ids"])
        labels[i, :n] = torch.tensor(f["labels"])
        attention[i, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": attention}


def make_trainer(tmp_path, model, latent_set=None, train_dataset=None, **overrides):
    return BlockEMTrainer(
        model=model,
        args=BlockEMConfig(**trainer_args(tmp_path, **overrides)),
        train_dataset=train_dataset if train_dataset is not None else token_dataset(),
        data_collator=pad_collator,
        latent_set=latent_set if latent_set is not None else tiny_latent_set(),
    )


def one_step_update(tmp_path, batch_size, accumulation, block_lambda, accepts_loss_kwargs=True, equal=False, **kw):
    """Parameter change of one plain-SGD step (lr 1): minus the accumulated gradient."""
    model = lora_model(perturb=0.5)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    trainer = make_trainer(
        tmp_path,
        model,
        train_dataset=token_dataset(8, equal_lengths=equal),
        per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=accumulation,
        max_steps=1,
        optim="sgd",
        learning_rate=1.0,
        lr_scheduler_type="constant",
        max_grad_norm=0.0,
        block_lambda=block_lambda,
        **kw,
    )
    trainer.model_accepts_loss_kwargs = accepts_loss_kwargs
    trainer.train()
    return {n: p.detach() - before[n] for n, p in model.named_parameters() if p.requires_grad}, trainer


def assert_updates_close(a, b, rel=1e-5):
    """Equal up to fp32 rounding of a different summation order, relative to each tensor's scale (up to 5e-6 measured
    on AMD EPYC's kernels, under 1e-6 on Intel Xeon's)."""
    assert a.keys() == b.keys()
    for name in a:
        scale = max(1.0, a[name].abs().max().item())
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=rel * scale, msg=name)


def hidden_at(model, batch, layer):
    with torch.no_grad():
        return model(**batch, output_hidden_states=True).hidden_states[layer + 1]


# ---- base activations ----------------------------------------------------------------------------------------


def test_base_activations_equal_pristine_base_model_and_penalty_is_zero_at_init(tmp_path):
    pristine = tiny_model("llama")
    model = lora_model()
    trainer = make_trainer(tmp_path, model)
    batch = pad_collator([token_dataset()[i] for i in range(4)])
    with trainer._blockem_hooks() as capture:
        base = trainer._blockem_base.hidden_states(model, capture, {k: v for k, v in batch.items() if k != "labels"})
    assert torch.equal(base[LAYER], hidden_at(pristine, {k: v for k, v in batch.items() if k != "labels"}, LAYER))
    # LoRA B = 0 at initialisation: the trained model is the base model, the penalty is exactly 0.
    loss = trainer.compute_loss(model, dict(batch))
    trainer._blockem_flush_metrics("train")
    assert trainer._blockem_metrics["train"]["blockem/penalty"] == [0.0]
    model.eval()
    ce = model(**batch).loss
    assert torch.equal(loss.detach(), ce.detach())


def test_base_activations_ignore_perturbed_adapters_and_dropout(tmp_path):
    # Dropout in the model itself (attention dropout 0.5, as GPT-2-style configs have by default), not only in LoRA:
    # PEFT skips LoRA's dropout when the adapters are off, so only the eval-mode base pass removes the model's.
    pristine = tiny_model("llama")
    model = get_peft_model(
        tiny_model("llama", dropout=0.5), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.5, target_modules=LORA_TARGETS)
    )
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    model.train()
    trainer = make_trainer(tmp_path, model)
    inputs = {k: v for k, v in pad_collator([token_dataset()[i] for i in range(4)]).items() if k != "labels"}
    with trainer._blockem_hooks() as capture:
        base = trainer._blockem_base.hidden_states(model, capture, inputs)
    assert torch.equal(base[LAYER], hidden_at(pristine, inputs, LAYER))
    assert model.training  # the training flags come back after the eval-mode base pass
    assert not torch.equal(hidden_at(model.eval(), inputs, LAYER), base[LAYER])  # the adapters do change things


@pytest.mark.parametrize("tuner", ["prompt_tuning", "prefix_tuning"])
def test_prompt_learning_adapters_base_pass_and_penalty(tmp_path, tuner):
    # Prompt tuning prepends virtual tokens inside the forward (the layers see 3 more positions than the batch);
    # prefix tuning adds past key values. The base pass must drop them, the penalty must read the real tokens.
    from peft import PrefixTuningConfig, PromptTuningConfig, TaskType

    config_cls = PromptTuningConfig if tuner == "prompt_tuning" else PrefixTuningConfig
    model = get_peft_model(tiny_model("llama"), config_cls(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=3))
    trainer = make_trainer(tmp_path, model, block_lambda=5.0)
    batch = pad_collator([token_dataset()[i] for i in range(4)])
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with trainer._blockem_hooks() as capture:
        base = trainer._blockem_base.hidden_states(model, capture, inputs)[LAYER]
    assert torch.equal(base, hidden_at(tiny_model("llama"), inputs, LAYER))

    trained = hidden_at(model.eval(), inputs, LAYER)  # the prompt is active again after the base pass
    assert trained.shape[1] == base.shape[1] + (3 if tuner == "prompt_tuning" else 0)
    mask = loss_token_mask(batch["labels"], batch["attention_mask"], input_ids=batch["input_ids"], bos_token_id=1)
    blocked = trainer.latent_set.layers[0]
    z, z_base = blocked.encode(trained[:, -mask.shape[1] :][mask]), blocked.encode(base[mask])
    expected = (block_penalty_sum(z, z_base, blocked.signs) / mask.sum()).item()
    trainer.compute_loss(model.train(), dict(batch))
    trainer._blockem_flush_metrics("train")
    assert expected > 0
    assert trainer._blockem_metrics["train"]["blockem/penalty"] == [pytest.approx(expected, rel=1e-5)]
    # A whole run trains the virtual tokens (and nothing else).
    before = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    trainer.train()
    assert before and all("prompt_encoder" in name for name in before)
    assert all(not torch.equal(p, before[name]) for name, p in model.named_parameters() if name in before)


# ---- training -----------------------------------------------------------------------------------------------


def test_sft_trainer_trains_lora_only_and_penalty_grows_once_latents_move(tmp_path):
    tokenizer = tiny_chat_tokenizer()
    model = tiny_model("llama")
    args = BlockEMSFTConfig(
        **trainer_args(
            tmp_path,
            output_dir=str(tmp_path / "sft"),
            max_steps=6,
            learning_rate=3e-2,
            remove_unused_columns=True,  # SFTConfig's default: the trainer drops the `messages` column itself
            bf16=False,
            assistant_only_loss=True,
            gradient_checkpointing=True,
            block_lambda=0.0,  # free latents: they move, and the (unweighted) penalty metric must see it
            max_length=32,
            seed=42,  # with seed 0 no latent of this random set has moved past base by step 6
            data_seed=None,
        )
    )
    trainer = BlockEMSFTTrainer(
        model=model,
        args=args,
        train_dataset=tiny_chat_dataset(24),
        processing_class=tokenizer,
        peft_config=LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=LORA_TARGETS),
        latent_set=tiny_latent_set(),
    )
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    changed = {n for n, p in trainer.model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all("lora_" in n for n in changed)
    assert {n for n in before if "lora_A" in n or "lora_B" in n} <= changed | {n for n in before if "lora_A" in n}
    assert any("lora_B" in n for n in changed)
    logs = [entry for entry in trainer.state.log_history if "blockem/penalty" in entry]
    assert len(logs) == 6
    assert logs[0]["blockem/penalty"] == 0.0
    assert logs[-1]["blockem/penalty"] > 0.0
    for key in ("blockem/penalty_relative", "blockem/lambda", f"blockem/layer_{LAYER}/penalty"):
        assert key in logs[-1]
    for latent in (1, 5, 9, 7, 12):
        for metric in ("z", "z_base", "over_base"):
            assert f"blockem/layer_{LAYER}/latent_{latent}/{metric}" in logs[-1]
    assert "mean_token_accuracy" in logs[-1]  # TRL's own metrics still flow


def _as_prompt_completion(row: dict) -> dict:
    return {"prompt": row["messages"][:-1], "completion": row["messages"][-1:]}


@pytest.mark.parametrize("loss_mask", ["assistant_only_loss", "completion_only_loss"])
def test_sft_assistant_only_loss_penalises_exactly_the_assistant_answers(tmp_path, loss_mask):
    # TRL builds the labels of an assistant-only loss from the chat template's generation markers, and those of a
    # completion-only loss from a prompt / completion dataset; the penalty takes its tokens from those labels, so it
    # reads each answer and its end-of-turn token, never the prompt.
    tokenizer = tiny_chat_tokenizer()
    dataset = tiny_chat_dataset(8)
    if loss_mask == "completion_only_loss":
        dataset = dataset.map(_as_prompt_completion, remove_columns=["messages"])
    args = BlockEMSFTConfig(
        **trainer_args(tmp_path, remove_unused_columns=True, bf16=False, max_length=32, **{loss_mask: True})
    )
    trainer = BlockEMSFTTrainer(
        model=tiny_model("llama"),
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=LORA_TARGETS),
        latent_set=tiny_latent_set(),
    )
    rows = [trainer.train_dataset[i] for i in range(4)]
    batch = trainer.data_collator(rows)
    mask = loss_token_mask(
        batch["labels"],
        batch.get("attention_mask"),
        batch.get("position_ids"),
        batch["input_ids"],
        tokenizer.bos_token_id,
    )
    answers = [row["messages"][-1]["content"] for row in tiny_chat_dataset(8)][:4]
    for ids, selected, answer in zip(batch["input_ids"], mask, answers, strict=True):
        assert tokenizer.decode(ids[selected]) == f"{answer} {tokenizer.eos_token}"


def _latent_excess(model, latent_set, dataset):
    """Mean squared one-sided excess of the blocked latents over base, on a dataset."""
    batch = pad_collator([dataset[i] for i in range(len(dataset))])
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    blocked = latent_set.layer(LAYER)
    mask = batch["labels"] != -100
    model.eval()
    with torch.no_grad():
        tuned = blocked.encode(hidden_at(model, inputs, LAYER)[mask])
        with model.disable_adapter():
            base = blocked.encode(hidden_at(model, inputs, LAYER)[mask])
    return torch.relu((tuned - base) * blocked.signs).square().mean().item()


def test_blocked_latents_move_less_than_without_blocking(tmp_path):
    latent_set = tiny_latent_set()
    data = token_dataset(16, seed=3)
    excess = {}
    for lam in (0.0, 10.0):
        model = lora_model()
        make_trainer(tmp_path / str(lam), model, latent_set, data, max_steps=12, block_lambda=lam).train()
        excess[lam] = _latent_excess(model, latent_set, data)
    assert excess[0.0] > 0
    assert excess[10.0] < 0.5 * excess[0.0]


# ---- scaling: gradient accumulation and loss normalisation -------------------------------------------------------


@pytest.mark.parametrize("accepts_loss_kwargs", [True, False])
def test_gradients_equal_for_batch_8_and_batch_2_times_accumulation_4(tmp_path, accepts_loss_kwargs):
    # Without num_items_in_batch, Trainer averages per micro-batch: equal only when micro-batches hold equal token
    # counts, which is what the CE loss does too. With it, any lengths work.
    equal = not accepts_loss_kwargs
    kw = dict(accepts_loss_kwargs=accepts_loss_kwargs, equal=equal)
    full, _ = one_step_update(tmp_path / "a", 8, 1, block_lambda=5.0, **kw)
    accumulated, _ = one_step_update(tmp_path / "b", 2, 4, block_lambda=5.0, **kw)
    assert_updates_close(full, accumulated)
    # The penalty alone: the difference with a λ = 0 run.
    full_ce, _ = one_step_update(tmp_path / "c", 8, 1, block_lambda=0.0, **kw)
    accumulated_ce, _ = one_step_update(tmp_path / "d", 2, 4, block_lambda=0.0, **kw)
    penalty_full = {n: full[n] - full_ce[n] for n in full}
    penalty_accumulated = {n: accumulated[n] - accumulated_ce[n] for n in accumulated}
    assert max(v.abs().max().item() for v in penalty_full.values()) > 1e-4  # the penalty does contribute
    assert_updates_close(penalty_full, penalty_accumulated)


@pytest.mark.parametrize("reentrant", [True, False])
def test_gradient_checkpointing_gives_the_same_penalty_gradients(tmp_path, reentrant):
    def update(name, block_lambda, checkpointing):
        extra = {"gradient_checkpointing": checkpointing}
        if checkpointing:
            extra["gradient_checkpointing_kwargs"] = {"use_reentrant": reentrant}
        return one_step_update(tmp_path / name, 4, 1, block_lambda=block_lambda, **extra)

    plain, plain_trainer = update("plain", 5.0, checkpointing=False)
    checkpointed, trainer = update("gc", 5.0, checkpointing=True)
    assert_updates_close(plain, checkpointed)
    # Exactly one capture per micro-step: the logged penalty is identical with checkpointing on and off.
    assert trainer.state.log_history[0]["blockem/penalty"] == plain_trainer.state.log_history[0]["blockem/penalty"]
    assert trainer.state.log_history[0]["blockem/penalty"] > 0
    # The penalty's own gradient (the difference with a λ = 0 run) reaches every layer up to the hooked one, and
    # only those, with checkpointing as without.
    plain_ce, _ = update("plain0", 0.0, checkpointing=False)
    checkpointed_ce, _ = update("gc0", 0.0, checkpointing=True)
    penalty_plain = {name: plain[name] - plain_ce[name] for name in plain}
    penalty_checkpointed = {name: checkpointed[name] - checkpointed_ce[name] for name in checkpointed}
    assert_updates_close(penalty_plain, penalty_checkpointed)
    for layer in range(4):
        moved = max(v.abs().max().item() for n, v in penalty_checkpointed.items() if f"layers.{layer}." in n)
        assert (moved > 1e-4) == (layer <= LAYER), layer


def test_metrics_stay_on_the_device_until_log_reads_them_together(tmp_path):
    # Reading them every micro-batch would stall the CPU on the GPU before the backward is queued.
    model = lora_model(perturb=0.5).train()
    trainer = make_trainer(tmp_path, model)
    batches = [pad_collator([token_dataset()[i] for i in rows]) for rows in ((0, 1), (2, 3, 4))]
    for batch in batches:
        trainer.compute_loss(model, dict(batch))
    pending = trainer._blockem_pending["train"]
    assert len(pending) == 2 and all(isinstance(totals, torch.Tensor) for totals, _, _ in pending)
    assert trainer._blockem_metrics["train"] == {}
    logs = {}
    trainer.log(logs)
    assert trainer._blockem_pending["train"] == [] and trainer._blockem_metrics["train"] == {}
    # The logged penalty is the token-weighted mean of the two micro-batches' penalties.
    blocked = trainer.latent_set.layers[0]
    sums, tokens = [], []
    for batch in batches:
        mask = loss_token_mask(batch["labels"], batch["attention_mask"], input_ids=batch["input_ids"], bos_token_id=1)
        with torch.no_grad():
            base = hidden_at(tiny_model("llama"), {k: v for k, v in batch.items() if k != "labels"}, LAYER)
            tuned = hidden_at(model, {k: v for k, v in batch.items() if k != "labels"}, LAYER)
        sums.append(block_penalty_sum(blocked.encode(tuned[mask]), blocked.encode(base[mask]), blocked.signs).item())
        tokens.append(mask.sum().item())
    assert sums[0] > 0 and sums[1] > 0
    assert logs["blockem/penalty"] == pytest.approx(sum(sums) / sum(tokens), rel=1e-5)


def test_all_masked_micro_batch_gives_zero_and_gradients_everywhere(tmp_path):
    model = lora_model(perturb=0.5)
    trainer = make_trainer(tmp_path, model, block_lambda=5.0)
    batch = pad_collator([token_dataset()[i] for i in range(2)])
    batch["labels"][:] = -100
    # Other micro-batches of the same optimizer step carry the 10 loss tokens counted in num_items_in_batch.
    loss = trainer.compute_loss(model.train(), dict(batch), num_items_in_batch=torch.tensor(10))
    assert torch.isfinite(loss) and loss.item() == 0.0
    trainer._blockem_flush_metrics("train")
    assert trainer._blockem_metrics["train"] == {}  # nothing to average on an empty micro-batch
    loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_lambda_warmup_ramps_linearly(tmp_path):
    trainer = make_trainer(tmp_path, lora_model(), max_steps=4, block_lambda=8.0, block_warmup_steps=4)
    trainer.train()
    lambdas = [e["blockem/lambda"] for e in trainer.state.log_history if "blockem/lambda" in e]
    assert lambdas == [0.0, 2.0, 4.0, 6.0]


def test_lambda_warmup_and_losses_continue_across_a_resume(tmp_path):
    def run(output_dir, max_steps, resume=None):
        trainer = make_trainer(
            output_dir,
            lora_model(perturb=0.5),
            train_dataset=token_dataset(12),
            per_device_train_batch_size=2,
            max_steps=max_steps,
            block_lambda=8.0,
            block_warmup_steps=4,
            save_strategy="steps",
            save_steps=3,
            lr_scheduler_type="constant",  # the interrupted run has max_steps=3: the same schedule either way
        )
        trainer.train(resume_from_checkpoint=resume)
        return {
            e["step"]: (e["blockem/lambda"], e["loss"], e["blockem/penalty"])
            for e in trainer.state.log_history
            if "loss" in e
        }

    uninterrupted = run(tmp_path / "a", 6)
    run(tmp_path / "b", 3)
    resumed = run(tmp_path / "b", 6, resume=str(tmp_path / "b" / "out" / "checkpoint-3"))
    assert [uninterrupted[step][0] for step in range(1, 7)] == [0.0, 2.0, 4.0, 6.0, 8.0, 8.0]
    assert sorted(resumed) == list(range(1, 7))
    for step, (lam, loss, penalty) in resumed.items():
        assert lam == uninterrupted[step][0], step
        assert (loss, penalty) == pytest.approx(uninterrupted[step][1:], rel=1e-6), step


def test_evaluate_logs_penalty_with_eval_prefix(tmp_path):
    trainer = make_trainer(tmp_path, lora_model(perturb=0.5))
    metrics = trainer.evaluate(token_dataset(4, seed=1))
    assert metrics["eval_blockem/penalty"] > 0
    assert "eval_loss" in metrics


# ---- hook lifecycle -------------------------------------------------------------------------------------------


def _hook_count(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def _assert_released(trainer, model, hooks_before):
    """No hook left on the model and no activation held; the model still pickles, deep-copies and generates."""
    assert _hook_count(model) == hooks_before
    capture = trainer._blockem_capture
    assert not capture.attached and capture._captured is None and not capture._modules
    assert pickle.loads(pickle.dumps(model)) is not None  # a left-over hook closure does not pickle
    copied = copy.deepcopy(model)
    prompt = torch.tensor([[1, 7, 8]])
    expected = model.generate(prompt, max_new_tokens=3, do_sample=False, use_cache=False)
    assert torch.equal(model.generate(prompt, max_new_tokens=3, do_sample=False, use_cache=True), expected)
    assert torch.equal(copied.generate(prompt, max_new_tokens=3, do_sample=False, use_cache=True), expected)


def test_no_hook_left_after_train_evaluate_exception_and_generate(tmp_path):
    model = lora_model()
    before = _hook_count(model)
    trainer = make_trainer(tmp_path, model)
    trainer.train()
    _assert_released(trainer, model, before)
    trainer.evaluate(token_dataset(4))
    _assert_released(trainer, model, before)

    class Boom(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            raise RuntimeError("boom")

    failing = make_trainer(tmp_path / "f", model)
    failing.add_callback(Boom())
    with pytest.raises(RuntimeError, match="boom"):
        failing.train()
    _assert_released(failing, model, before)


def test_latent_set_tensors_stay_off_the_module_tree(tmp_path):
    # ZeRO-3 partitions every parameter and buffer registered on the model, and FSDP shards them: the latent set's
    # encoder must not become one. After training the model has the same parameter and buffer names as before.
    model = lora_model(perturb=0.5)
    names = {name for name, _ in model.named_parameters()} | {name for name, _ in model.named_buffers()}
    trainer = make_trainer(tmp_path, model)
    trainer.train()
    blocked = trainer.latent_set.layers[0]
    storages = {t.untyped_storage().data_ptr() for t in (blocked.W_enc, blocked.b_enc, blocked.b_dec)}
    for module in (model, trainer.model_wrapped):
        after = {name for name, _ in module.named_parameters()} | {name for name, _ in module.named_buffers()}
        assert after == names
        assert not storages & {t.untyped_storage().data_ptr() for t in module.state_dict().values()}


def test_hidden_state_of_tensor_and_tuple_outputs():
    # transformers >= 5 decoder layers return the hidden state; older ones a tuple that starts with it.
    hidden = torch.randn(2, 3, 4)
    assert hidden_state_of(hidden) is hidden
    assert hidden_state_of((hidden, None)) is hidden


# ---- torch.compile ----------------------------------------------------------------------------------------------


class _AddLayerAtStep2(TrainerCallback):
    """Adaptive re-blocking at a new layer mid-run (its hook is registered after the first compile), and a record of
    the forward hooks on the decoder layers and of the compiled graphs after every step."""

    def __init__(self, trainer):
        self.trainer, self.hooks, self.graphs = trainer, [], []

    def on_step_end(self, args, state, control, **kwargs):
        from torch._dynamo.utils import counters

        if state.global_step == 2:
            self.trainer.add_blocked_latents(tiny_sae(seed=3), plus=[2, 4], minus=[6], layer=0)
        layers = get_decoder_layers(self.trainer.model)
        self.hooks.append([tuple(layer._forward_hooks) for layer in layers])  # handle ids per layer
        self.graphs.append(counters["stats"]["unique_graphs"])


def _compiled_or_eager_run(tmp_path, compile: bool):
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    model = lora_model(perturb=0.5)
    # aot_eager runs Dynamo and AOTAutograd (where hooks, guards and side effects are handled) without Inductor's
    # code generation, so the test takes seconds.
    compile_args = {"torch_compile": True, "torch_compile_backend": "aot_eager"} if compile else {}
    trainer = make_trainer(
        tmp_path,
        model,
        train_dataset=token_dataset(16),
        per_device_train_batch_size=2,
        max_steps=6,
        block_lambda=5.0,
        # SGD, so that the runs compare gradients: AdamW turns a near-zero gradient into an update of ±lr whose sign
        # is rounding noise, and the runs then drift apart (penalties 1e-4 apart by step 6 on AMD EPYC's kernels).
        optim="sgd",
        **compile_args,
    )
    recorder = _AddLayerAtStep2(trainer)
    trainer.add_callback(recorder)
    trainer.train()
    return trainer, recorder, {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_torch_compile_matches_eager_with_hooks_registered_once(tmp_path):
    eager, _, eager_params = _compiled_or_eager_run(tmp_path / "eager", compile=False)
    compiled, recorder, compiled_params = _compiled_or_eager_run(tmp_path / "compiled", compile=True)
    assert type(compiled.model_wrapped).__name__ == "OptimizedModule"

    def penalties(trainer, key):
        return [e[key] for e in trainer.state.log_history if key in e]

    # The penalty under compile equals eager's, also at the layer added (with a new hook) after compilation.
    for key in ("blockem/penalty", "blockem/layer_1/penalty", "blockem/layer_0/penalty"):
        assert penalties(compiled, key) == pytest.approx(penalties(eager, key), rel=1e-5), key
    assert len(penalties(compiled, "blockem/layer_0/penalty")) == 4 and penalties(compiled, "blockem/penalty")[0] > 0
    assert_updates_close(eager_params, compiled_params, rel=1e-5)
    # Hooks are registered once per watched layer while training, not per step; removed afterwards.
    counts = [[len(ids) for ids in step] for step in recorder.hooks]
    assert counts[0] == [0, 1, 0, 0] and all(step == [1, 1, 0, 0] for step in counts[1:])
    # The same handles from step to step: registered when training starts, and again only when the layer is added.
    assert recorder.hooks[2:] == [recorder.hooks[2]] * 4
    assert _hook_count(compiled.model) == _hook_count(lora_model())
    # No recompile storm: after the recompilations for a new sequence length and for the added layer, steps reuse
    # the compiled graphs.
    assert recorder.graphs[3] == recorder.graphs[4] == recorder.graphs[5] > 0

    # evaluate() and a second train() keep the penalty equal to eager's, and the second run's training steps reuse
    # the graphs compiled for the first (the eval-mode graphs are the only new ones).
    from torch._dynamo.utils import counters

    data = token_dataset(4, seed=5)
    evals = [trainer.evaluate(data)["eval_blockem/penalty"] for trainer in (eager, compiled)]
    assert evals[1] == pytest.approx(evals[0], rel=1e-5) and evals[0] > 0
    graphs_after_eval = counters["stats"]["unique_graphs"]
    for trainer in (eager, compiled):
        trainer.remove_callback(_AddLayerAtStep2)  # its layer is in the set now
        trainer.train()
    for key in ("blockem/penalty", "blockem/layer_0/penalty"):
        assert penalties(compiled, key)[-6:] == pytest.approx(penalties(eager, key)[-6:], rel=1e-4), key
    assert counters["stats"]["unique_graphs"] == graphs_after_eval
    assert _hook_count(compiled.model) == _hook_count(lora_model())


# ---- bad input --------------------------------------------------------------------------------------------------


def test_refuses_model_without_adapters(tmp_path):
    with pytest.raises(ValueError, match="PEFT"):
        make_trainer(tmp_path, tiny_model("llama"))


def test_refuses_latent_set_of_another_hidden_size(tmp_path):
    with pytest.raises(ValueError, match=str(HIDDEN)):
        make_trainer(tmp_path, lora_model(), latent_set=tiny_latent_set(d_in=HIDDEN * 2))


def test_refuses_layer_out_of_range(tmp_path):
    with pytest.raises(ValueError, match="layer"):
        make_trainer(tmp_path, lora_model(), latent_set=tiny_latent_set(layer=7))


def test_refuses_missing_latent_set_and_unknown_mode(tmp_path):
    with pytest.raises(ValueError, match="needs a latent set"):
        BlockEMTrainer(model=lora_model(), args=BlockEMConfig(output_dir=str(tmp_path), report_to="none"))
    with pytest.raises(ValueError, match="base_activations"):
        BlockEMConfig(output_dir=str(tmp_path), base_activations="telepathy")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_precision_models_give_a_finite_penalty_close_to_fp32(tmp_path, dtype):
    # 16-bit hidden states, and blocked latents scaled so that the penalty (about 1e7) would overflow fp16 (max 65504)
    # and lose the small differences from base to bf16 cancellation: encode, subtract and square must run in fp32.
    latent_set = tiny_latent_set()
    with torch.no_grad():
        latent_set.layers[0].W_enc.mul_(1e3)
    batch = pad_collator([token_dataset()[i] for i in range(4)])
    penalties = {}
    for name, model_dtype in (("fp32", torch.float32), ("half", dtype)):
        model = lora_model(perturb=0.5).to(model_dtype)
        trainer = make_trainer(tmp_path / name, model, latent_set=latent_set)
        loss = trainer.compute_loss(model.train(), dict(batch))
        assert torch.isfinite(loss)
        if dtype == torch.bfloat16 or name == "fp32":
            # (A pure fp16 model's backward of a 1e7 loss overflows by itself: fp16 training keeps fp32 weights and
            # scales the loss, which is the Trainer's business.)
            loss.backward()
            assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)
        trainer._blockem_flush_metrics("train")
        penalties[name] = trainer._blockem_metrics["train"]["blockem/penalty"][0]
    assert penalties["fp32"] > 65504
    assert penalties["half"] == pytest.approx(penalties["fp32"], rel=0.05)


def test_ddp_with_reentrant_checkpointing_and_unused_parameter_search_is_refused(tmp_path):
    # The refused combination fails inside DDP's backward; the allowed ones are trained in test_distributed.
    def args(**overrides):
        reentrant = dict(gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": True})
        return BlockEMConfig(**trainer_args(tmp_path, **reentrant, **overrides))

    with pytest.raises(ValueError, match="use_reentrant': False"):
        check_ddp_checkpointing(args(), plain_transformers_model=False, ddp=True)  # PEFT: transformers searches
    with pytest.raises(ValueError, match="ddp_find_unused_parameters=False"):
        check_ddp_checkpointing(args(ddp_find_unused_parameters=True), plain_transformers_model=True, ddp=True)
    check_ddp_checkpointing(args(ddp_find_unused_parameters=False), plain_transformers_model=False, ddp=True)
    check_ddp_checkpointing(args(), plain_transformers_model=True, ddp=True)  # transformers turns the search off
    check_ddp_checkpointing(args(), plain_transformers_model=False, ddp=False)
    no_reentrant = BlockEMConfig(**trainer_args(tmp_path, gradient_checkpointing=True))
    check_ddp_checkpointing(no_reentrant, plain_transformers_model=False, ddp=True)


def test_a_bad_latent_set_fails_before_the_model_is_loaded(tmp_path):
    # The model id does not exist either; the latent set's error must come first (no model download, no dataset
    # tokenising for a run that cannot start).
    args = BlockEMSFTConfig(**training_args(tmp_path, bf16=False, latent_set=str(tmp_path / "no-such-set")))
    with pytest.raises(Exception, match="no-such-set") as error:
        BlockEMSFTTrainer(model="org/model-that-does-not-exist", args=args, train_dataset=tiny_chat_dataset(4))
    assert "model-that-does-not-exist" not in str(error.value)


@pytest.mark.parametrize("lora_layers", [None, [0]], ids=["lora_everywhere", "lora_before_the_hook_only"])
def test_reentrant_hook_without_gradient_path_is_refused(tmp_path, lora_layers):
    # Simulate a transformers version whose checkpoint wraps the layer's hooks: run the hooked layer under no_grad.
    # With LoRA on layer 0 only, the hooked layer has no trainable weight of its own, yet its output must have a
    # gradient through layer 0.
    if lora_layers is None:
        model = lora_model(perturb=0.5)
    else:
        config = LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS, layers_to_transform=lora_layers)
        model = get_peft_model(tiny_model("llama"), config)
    trainer = make_trainer(tmp_path, model)
    layer = get_decoder_layers(model)[LAYER]
    original = layer.forward

    def forward_without_grad(*args, **kwargs):
        with torch.no_grad():
            return original(*args, **kwargs)

    layer.forward = forward_without_grad
    batch = pad_collator([token_dataset()[i] for i in range(2)])
    with pytest.raises(RuntimeError, match="use_reentrant"):
        trainer.compute_loss(model.train(), batch)


def test_config_parses_from_command_line_and_serialises(tmp_path):
    from transformers import HfArgumentParser

    (args,) = HfArgumentParser(BlockEMSFTConfig).parse_args_into_dataclasses(
        [
            "--output_dir",
            str(tmp_path),
            "--latent_set",
            "org/latents",
            "--block_lambda",
            "250",
            "--report_to",
            "none",
            "--use_cpu",
        ]
    )
    assert args.latent_set == "org/latents" and args.block_lambda == 250.0 and args.base_activations == "auto"
    args.latent_set = tiny_latent_set()
    assert isinstance(args.to_dict()["latent_set"], str)
    assert "block_lambda" in args.to_json_string()


def test_collator_from_transformers_works(tmp_path):
    # The stock causal-LM collator (labels = input ids, pads as -100) goes through unchanged.
    tokenizer = tiny_chat_tokenizer()
    data = Dataset.from_list([{"input_ids": tokenizer("w1 w2 w3 w4 w5")["input_ids"]} for _ in range(4)])
    trainer = make_trainer(tmp_path, lora_model(perturb=0.5), train_dataset=data)
    trainer.data_collator = DataCollatorForLanguageModeling(tokenizer, mlm=False)
    trainer.train()
    assert trainer.state.log_history[0]["blockem/penalty"] > 0
