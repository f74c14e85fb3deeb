import pytest
import torch
from evaluation_tiny import tiny_llama, tiny_tokenizer

from hf_blockem.evaluation import Prompt, Steering, TransformersBackend, generate_responses, steer
from hf_blockem.evaluation.generation import _make_hook
from hf_blockem.hooks import get_decoder_layers

PROMPTS = ["hello world", "money power wish", "humans help"]


@pytest.fixture(scope="module")
def chat():
    return tiny_llama(), tiny_tokenizer()


def test_records_shape_order_and_columns(chat):
    model, tokenizer = chat
    prompts = [Prompt("a", "hello world", "greeting"), "money power", Prompt("c", "wish", system="help humans")]
    ds = generate_responses(model, tokenizer, prompts, n_samples=2, max_new_tokens=4, seed=0, progress=False)
    assert len(ds) == 6
    assert ds["prompt"] == ["hello world"] * 2 + ["money power"] * 2 + ["wish"] * 2
    assert ds["sample"] == [0, 1, 0, 1, 0, 1]
    assert ds["prompt_id"] == ["a", "a", "prompt_1", "prompt_1", "c", "c"]
    assert ds["category"][:2] == ["greeting", "greeting"]
    assert ds["system"][4] == "help humans"
    assert all(isinstance(r, str) and r for r in ds["response"])


def test_chat_template_rendering_and_missing_template(chat):
    model, tokenizer = chat
    backend = TransformersBackend(model, tokenizer)
    rendered = backend.render(Prompt("x", "hello", system="be kind"))
    assert rendered == "<bos><system> be kind <end> <user> hello <end> <assistant> "
    with pytest.raises(ValueError, match="chat template"):
        generate_responses(model, tiny_tokenizer(chat_template=False), ["hello"], max_new_tokens=2, progress=False)


def test_seeded_sampling_is_reproducible_and_leaves_global_rng_alone(chat):
    model, tokenizer = chat
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    kwargs = {"n_samples": 3, "max_new_tokens": 6, "seed": 7, "progress": False}
    first = generate_responses(model, tokenizer, PROMPTS, **kwargs)["response"]
    assert torch.equal(torch.random.get_rng_state(), state)
    assert generate_responses(model, tokenizer, PROMPTS, **kwargs)["response"] == first
    other = generate_responses(model, tokenizer, PROMPTS, **{**kwargs, "seed": 8})["response"]
    assert other != first


def test_left_padding_batched_equals_one_by_one(chat):
    model, tokenizer = chat
    kwargs = {"temperature": 0.0, "max_new_tokens": 6, "progress": False}
    batched = generate_responses(model, tokenizer, PROMPTS, batch_size=3, **kwargs)["response"]
    single = generate_responses(model, tokenizer, PROMPTS, batch_size=1, **kwargs)["response"]
    assert batched == single
    assert tokenizer.padding_side == "right"  # restored


def test_a_tokenizer_without_pad_token_still_batches(chat):
    # Llama 3 Instruct ships without a pad token: batches pad with EOS, and the tokenizer is left as it was.
    model, _ = chat
    tokenizer = tiny_tokenizer()
    tokenizer.pad_token = None
    kwargs = {"temperature": 0.0, "max_new_tokens": 6, "progress": False}
    batched = generate_responses(model, tokenizer, PROMPTS, batch_size=3, **kwargs)["response"]
    assert batched == generate_responses(model, tiny_tokenizer(), PROMPTS, batch_size=1, **kwargs)["response"]
    assert tokenizer.pad_token is None and tokenizer.padding_side == "right"


def test_steering_alpha_zero_is_bit_identical(chat):
    model, tokenizer = chat
    direction = torch.randn(32, generator=torch.Generator().manual_seed(0))
    kwargs = {"n_samples": 2, "max_new_tokens": 8, "seed": 3, "progress": False}
    plain = generate_responses(model, tokenizer, PROMPTS, **kwargs)["response"]
    zero = generate_responses(model, tokenizer, PROMPTS, steering=Steering(0, direction, 0.0), **kwargs)["response"]
    assert zero == plain
    ids = tokenizer("<bos> <user> hello world <end> <assistant>", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(ids).logits
        with steer(model, [Steering(0, direction, 0.0), Steering(1, direction, 0.0)]):
            steered = model(ids).logits
    assert torch.equal(logits, steered)
    strong = generate_responses(model, tokenizer, PROMPTS, steering=Steering(0, direction * 50, 1.0), **kwargs)
    assert strong["response"] != plain


def _hook_counts(model):
    return [len(layer._forward_hooks) for layer in get_decoder_layers(model)]


def _layer_output(model, ids, layer, steering=None):
    """The output of decoder layer `layer` as the rest of the network sees it (after every earlier hook).

    transformers 5 records `output_hidden_states` with its own forward hooks, installed on the first forward and so
    run *before* any hook added later: the recorded `hidden_states[L + 1]` is the output before steering. A hook
    registered after the steering hook sees what the next layer receives."""
    captured = {}
    with steer(model, steering):
        handle = get_decoder_layers(model)[layer].register_forward_hook(
            lambda m, a, out: captured.__setitem__("h", out if isinstance(out, torch.Tensor) else out[0])
        )
        try:
            with torch.no_grad():
                logits = model(ids).logits
        finally:
            handle.remove()
    return captured["h"], logits


@pytest.mark.parametrize("layer", [0, 1])
def test_steering_adds_alpha_direction_to_hook_resid_post(chat, layer):
    model, tokenizer = chat
    direction = torch.randn(32, generator=torch.Generator().manual_seed(1))
    ids = tokenizer("<bos> <user> money power <end>", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        hidden_states = model(ids, output_hidden_states=True).hidden_states
    hooks_before = _hook_counts(model)
    base, base_logits = _layer_output(model, ids, layer)
    if layer + 1 < len(hidden_states) - 1:  # the last entry is after the final norm
        assert torch.equal(base, hidden_states[layer + 1])  # the hook point is blocks.L.hook_resid_post
    steered, steered_logits = _layer_output(model, ids, layer, Steering(layer, direction, 2.5))
    torch.testing.assert_close(steered - base, (2.5 * direction).expand_as(base))
    assert not torch.allclose(steered_logits, base_logits)
    assert _hook_counts(model) == hooks_before


def test_hooks_removed_after_error_and_bad_inputs_rejected(chat):
    model, _ = chat
    model(torch.tensor([[1, 2]]))  # transformers installs its own output-recording hooks on the first forward
    before = _hook_counts(model)
    with pytest.raises(RuntimeError, match="boom"):
        with steer(model, Steering(1, torch.ones(32), 1.0)):
            assert _hook_counts(model) == [before[0], before[1] + 1]
            raise RuntimeError("boom")
    assert _hook_counts(model) == before
    with pytest.raises(ValueError, match="out of range"):
        with steer(model, Steering(5, torch.ones(32), 1.0)):
            pass
    with pytest.raises(ValueError, match="shape"):
        with steer(model, Steering(0, torch.ones(2, 32), 1.0)):
            pass
    assert _hook_counts(model) == before


def test_hook_handles_tuple_outputs_of_older_decoder_layers():
    hook = _make_hook(torch.ones(4), 2.0)
    hidden, extra = torch.zeros(1, 3, 4), object()
    out = hook(None, (), (hidden, extra))
    assert isinstance(out, tuple) and out[1] is extra
    assert torch.equal(out[0], torch.full((1, 3, 4), 2.0))
    assert torch.equal(hook(None, (), hidden), torch.full((1, 3, 4), 2.0))


def test_steering_through_a_peft_wrapper(chat):
    from peft import LoraConfig, get_peft_model

    model, tokenizer = chat
    peft_model = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    direction = torch.randn(32, generator=torch.Generator().manual_seed(2))
    kwargs = {"n_samples": 2, "max_new_tokens": 5, "seed": 0, "progress": False}
    plain = generate_responses(peft_model, tokenizer, PROMPTS, **kwargs)["response"]
    zero = generate_responses(peft_model, tokenizer, PROMPTS, steering=Steering(1, direction, 0.0), **kwargs)
    assert zero["response"] == plain
    ids = tokenizer("<bos> <user> wish <end>", return_tensors="pt")["input_ids"]
    base, _ = _layer_output(peft_model, ids, 1)
    steered, _ = _layer_output(peft_model, ids, 1, Steering(1, direction, -1.5))
    torch.testing.assert_close(steered - base, (-1.5 * direction).expand_as(base))


def test_model_generation_config_defaults_do_not_change_sampling(chat):
    model, tokenizer = chat
    kwargs = {"n_samples": 3, "max_new_tokens": 6, "seed": 5, "progress": False}
    plain = generate_responses(model, tokenizer, PROMPTS, **kwargs)["response"]
    old = (model.generation_config.top_k, model.generation_config.repetition_penalty)
    try:
        model.generation_config.top_k, model.generation_config.repetition_penalty = 1, 3.0
        assert generate_responses(model, tokenizer, PROMPTS, **kwargs)["response"] == plain
    finally:
        model.generation_config.top_k, model.generation_config.repetition_penalty = old


def test_a_system_message_opens_the_user_turn_when_the_template_refuses_system_roles(caplog):
    # Gemma 1 / 2 raise on a system role (TRL ships their template); Gemma 3's own template folds it like this.
    from pathlib import Path

    import trl

    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = (Path(trl.__file__).parent / "chat_templates" / "gemma.jinja").read_text()
    backend = TransformersBackend(tiny_llama(seed=0), tokenizer)
    with caplog.at_level("WARNING", logger="hf_blockem.evaluation.generation"):
        texts = [backend.render(Prompt(f"p{i}", "hello world", system="be brief")) for i in range(2)]
    folded = [{"role": "user", "content": "be brief\n\nhello world"}]
    assert texts == [tokenizer.apply_chat_template(folded, tokenize=False, add_generation_prompt=True)] * 2
    assert caplog.text.count("refuses system messages") == 1  # said once, not per prompt
    assert backend.render(Prompt("q", "hello")) == tokenizer.apply_chat_template(
        [{"role": "user", "content": "hello"}], tokenize=False, add_generation_prompt=True
    )
