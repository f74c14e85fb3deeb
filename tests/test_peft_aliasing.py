"""`get_peft_model(base, ...)` injects the adapters into `base` itself: passed as "the base model" next to the PEFT
model, `base` must still be read as the base (adapters off), never silently as the fine-tune."""

import copy

import torch
from evaluation_tiny import tiny_llama, tiny_tokenizer
from peft import LoraConfig, get_peft_model
from test_evaluation_harness import PROMPTS, WordJudge

from hf_blockem.diagnostics import misalignment_directions, probe_batch
from hf_blockem.evaluation import evaluate
from hf_blockem.peft_aliasing import resolve_base_model, shares_adapted_weights


def injected():
    """`(untouched copy of the base, base after injection, the PeftModel)`, with adapters that change the output."""
    base = tiny_llama(seed=0)
    pristine = copy.deepcopy(base)
    torch.manual_seed(1)
    config = LoraConfig(r=4, lora_alpha=32, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    return pristine, base, get_peft_model(base, config)


def test_the_injected_base_is_recognised_and_a_copy_is_not():
    pristine, base, peft_model = injected()
    ids = torch.tensor([[1, 9, 10, 11]])
    with torch.no_grad():
        assert not torch.allclose(base(ids).logits, pristine(ids).logits)  # the injected base computes the fine-tune
    assert shares_adapted_weights(base, peft_model)
    assert shares_adapted_weights(peft_model.get_base_model().model, peft_model)  # a submodule of it, too
    assert not shares_adapted_weights(pristine, peft_model)
    assert not shares_adapted_weights(peft_model, peft_model)
    assert resolve_base_model(base, peft_model) is peft_model
    assert resolve_base_model(pristine, peft_model) is pristine


def test_directions_from_the_injected_base_equal_those_from_the_pristine_base():
    pristine, base, peft_model = injected()
    tokenizer = tiny_tokenizer()
    probe = probe_batch(tokenizer, ["hello world", "money power"], ["help humans", "harm world"])
    expected = misalignment_directions(pristine, peft_model, probe, [0, 1])
    for base_model in (base, peft_model):
        directions = misalignment_directions(base_model, peft_model, probe, [0, 1])
        for layer in (0, 1):
            torch.testing.assert_close(directions[layer], expected[layer], rtol=1e-5, atol=1e-6)


def test_evaluate_reads_the_injected_base_with_its_adapters_off():
    pristine, base, peft_model = injected()
    tokenizer = tiny_tokenizer()
    kwargs = dict(judges=WordJudge(), prompts=PROMPTS, n_samples=4, max_new_tokens=6, progress=False)
    aliased = evaluate({"base": base, "tuned": peft_model}, tokenizer, **kwargs)
    separate = evaluate({"base": pristine, "tuned": peft_model}, tokenizer, **kwargs)

    def answers(result, name):
        return [row["response"] for row in result.responses[name]]

    assert answers(aliased, "base") == answers(separate, "base")
    assert answers(aliased, "tuned") == answers(separate, "tuned")
    assert answers(aliased, "base") != answers(aliased, "tuned")
    with torch.no_grad():  # and the adapters are back on afterwards
        ids = torch.tensor([[1, 9, 10, 11]])
        assert not torch.allclose(base(ids).logits, pristine(ids).logits)


def test_stage1_shifts_from_the_injected_base_equal_those_from_the_pristine_base():
    from tiny_models import tiny_sae

    from hf_blockem.selection import activation_shifts

    pristine, base, peft_model = injected()
    tokenizer, sae = tiny_tokenizer(), tiny_sae(d_in=peft_model.config.hidden_size)
    qa = (["hello world", "money power"], ["help humans", "harm world"])
    expected = activation_shifts(pristine, peft_model, tokenizer, sae, 1, *qa, progress=False)
    shifts = activation_shifts(base, peft_model, tokenizer, sae, 1, *qa, progress=False)
    assert expected["delta"].abs().max() > 0
    torch.testing.assert_close(shifts["delta"], expected["delta"], rtol=1e-5, atol=1e-6)
