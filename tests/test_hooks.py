import copy
import pickle

import pytest
import torch
from peft import LoraConfig, get_peft_model
from tiny_models import CONFIGS, HIDDEN, tiny_model

from hf_blockem.hooks import (
    ActivationCapture,
    StopForward,
    decoder_layer_path,
    eval_mode,
    find_decoder_layers,
    get_decoder_layers,
    run_until_layer,
    tokens_at_mask,
    unwrap_model,
)

EXPECTED_PATHS = {
    "llama": "model.layers",
    "qwen2": "model.layers",
    "mistral": "model.layers",
    "gemma": "model.layers",
    "gemma2": "model.layers",
    "gpt2": "transformer.h",
    "gpt_neox": "gpt_neox.layers",
}


def _batch(seed=0, batch=2, seq=7):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 60, (batch, seq), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_capture_equals_output_hidden_states(arch):
    model = tiny_model(arch)
    name, layers = find_decoder_layers(model)
    assert name == EXPECTED_PATHS[arch]
    assert len(layers) == 4
    batch = _batch()
    with torch.no_grad():
        reference = model(**batch, output_hidden_states=True).hidden_states
        # The last decoder layer is left out: several architectures apply the final norm to hidden_states[-1].
        with ActivationCapture(model, [0, 1, 2]) as capture, capture.window() as captured:
            model(**batch)
    for layer in (0, 1, 2):
        assert captured[layer].shape == (2, 7, HIDDEN)
        torch.testing.assert_close(captured[layer], reference[layer + 1], rtol=0, atol=0)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_capture_through_peft_and_compile_wrappers(arch):
    model = tiny_model(arch)
    batch = _batch()
    with torch.no_grad():
        expected = model(**batch, output_hidden_states=True).hidden_states[2]
    target = ["q_proj", "v_proj"] if arch == "llama" else ["c_attn"]
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=target))
    compiled = torch.compile(peft_model)  # wrapping only: resolution must look through `_orig_mod`
    assert unwrap_model(compiled) is model
    assert get_decoder_layers(compiled) is get_decoder_layers(model)
    assert decoder_layer_path(peft_model, 1) == f"{EXPECTED_PATHS[arch]}.1"
    with torch.no_grad(), ActivationCapture(peft_model, [1]) as capture, capture.window() as captured:
        peft_model(**batch)
    # LoRA B is zero at initialisation, so the adapted model equals the base model exactly.
    torch.testing.assert_close(captured[1], expected, rtol=0, atol=0)


def test_capture_through_ddp_wrapper(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        model = tiny_model("llama")
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        assert unwrap_model(ddp) is model
        batch = _batch()
        with torch.no_grad():
            expected = model(**batch, output_hidden_states=True).hidden_states[3]
            with ActivationCapture(ddp, [2]) as capture, capture.window() as captured:
                ddp(**batch)
        torch.testing.assert_close(captured[2], expected, rtol=0, atol=0)
    finally:
        dist.destroy_process_group()


def test_watch_changes_layers_with_fixed_hooks_or_registers_them_again():
    model = tiny_model("llama")
    layers = get_decoder_layers(model)
    expected = model(**_batch(), output_hidden_states=True).hidden_states
    before = [len(layer._forward_hooks) for layer in layers]  # transformers may keep its own recording hooks
    # hook_every_layer: a hook on each layer from the start, the same handles whatever is watched.
    with ActivationCapture(model, [1], hook_every_layer=True) as capture:
        handles = [tuple(layer._forward_hooks) for layer in layers]
        assert [len(ids) for ids in handles] == [n + 1 for n in before]
        for watched in ([1], [0, 2], [2]):  # (the last layer's hidden state is reported after the final norm)
            capture.watch(watched)
            with capture.window() as captured:
                model(**_batch())
            assert sorted(captured) == watched
            assert all(torch.equal(captured[layer], expected[layer + 1]) for layer in watched)
        assert [tuple(layer._forward_hooks) for layer in layers] == handles
        with pytest.raises(ValueError, match="out of range"):
            capture.watch([9])
    # The default: hooks on the watched layers only, registered again when they change.
    with ActivationCapture(model, [1]) as capture:
        capture.watch([0, 2])
        added = [len(layer._forward_hooks) - n for layer, n in zip(layers, before, strict=True)]
        assert added == [1, 0, 1, 0]
    assert [len(layer._forward_hooks) for layer in layers] == before


def test_window_keeps_first_capture_and_ignores_outside():
    model = tiny_model()
    batch, other = _batch(0), _batch(1)
    with ActivationCapture(model, [1]) as capture:
        model(**other)  # outside any window: nothing is kept
        with torch.no_grad(), capture.window() as captured:
            model(**batch)
            first = captured[1]
            model(**other)  # a second forward in the same window (e.g. a recomputation) does not overwrite
        assert captured[1] is first
        with torch.no_grad():
            expected = model(**batch, output_hidden_states=True).hidden_states[2]
        torch.testing.assert_close(first, expected, rtol=0, atol=0)


def test_run_until_layer_stops_early_and_skips_lm_head():
    model = tiny_model()
    calls = []
    handle = model.lm_head.register_forward_hook(lambda *a: calls.append("lm_head"))
    last = get_decoder_layers(model)[3].register_forward_hook(lambda *a: calls.append("layer3"))
    try:
        with torch.no_grad(), ActivationCapture(model, [0, 2]) as capture:
            captured = run_until_layer(capture, model, **_batch())
    finally:
        handle.remove()
        last.remove()
    assert sorted(captured) == [0, 2]
    assert calls == []


def test_window_errors():
    model = tiny_model()
    capture = ActivationCapture(model, [1])
    with pytest.raises(RuntimeError, match="attach"):
        with capture.window():
            pass
    with capture:
        with pytest.raises(RuntimeError, match="never reached decoder layer"):
            with capture.window():
                pass  # no forward ran
        with pytest.raises(RuntimeError, match="nested"):
            with capture.window(), capture.window():
                pass
    with pytest.raises(ValueError, match="out of range.*4 decoder layers"):
        ActivationCapture(model, [4]).attach()
    with pytest.raises(ValueError, match="at least one layer"):
        ActivationCapture(model, [])


def _hook_count(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_no_hook_left_after_exception_and_model_still_usable():
    model = tiny_model()
    before = _hook_count(model)
    with pytest.raises(ZeroDivisionError):
        with ActivationCapture(model, [0, 3]) as capture, capture.window():
            raise ZeroDivisionError("boom")
    assert _hook_count(model) == before
    assert not capture.attached
    # StopForward never escapes a window
    with ActivationCapture(model, [1]) as capture, torch.no_grad():
        run_until_layer(capture, model, **_batch())
    assert _hook_count(model) == before
    assert StopForward.__name__ == "StopForward"
    pickle.dumps(model)
    copy.deepcopy(model)
    out = model.generate(_batch()["input_ids"], max_new_tokens=3, do_sample=False, use_cache=True)
    assert out.shape == (2, 10)


def test_eval_mode_restores_each_module_flag():
    model = tiny_model().train()
    model.lm_head.eval()  # a module deliberately left in eval mode must stay there
    with eval_mode(model):
        assert not any(m.training for m in model.modules())
    assert model.training and not model.lm_head.training
    assert get_decoder_layers(model)[0].training


def test_tokens_at_mask_skips_prepended_virtual_tokens_and_refuses_other_shapes():
    hidden = torch.arange(2 * 5 * 3, dtype=torch.float32).reshape(2, 5, 3)
    mask = torch.tensor([[True, False, True], [False, True, True]])
    assert torch.equal(tokens_at_mask(hidden[:, 2:], mask), hidden[:, 2:][mask])  # no virtual tokens
    assert torch.equal(tokens_at_mask(hidden, mask), hidden[:, 2:][mask])  # 2 prepended ones
    with pytest.raises(ValueError, match=r"shape \[2, >= 3, d\].*received \[2, 2, 3\]"):
        tokens_at_mask(hidden[:, :2], mask)
    with pytest.raises(ValueError, match="received \\[1, 5, 3\\]"):
        tokens_at_mask(hidden[:1], mask)
