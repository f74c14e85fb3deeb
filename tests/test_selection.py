"""Latent selection on a tiny model with a planted misalignment direction and a real SAELens SAE."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from tiny_models import HIDDEN, LORA_TARGETS, WORDS, tiny_chat_tokenizer, tiny_model, tiny_sae

from hf_blockem.evaluation.generation import Steering, steer
from hf_blockem.evaluation.judge_base import ALIGNED, INCOHERENT, MISALIGNED, Judgement
from hf_blockem.selection import (
    ProbeResult,
    SelectionConfig,
    SteeringProbe,
    activation_shifts,
    candidate_pool,
    random_control,
    response_latents,
    select_latents,
    tokenize_responses,
)

LAYER = 3  # the last decoder layer: a direction added there maps straight onto the logits
PLANTED = 5  # the SAE latent whose decoder direction carries the planted behaviour
BAD_WORD = "w50"
D_SAE = 24


def bad_direction(model, tokenizer) -> torch.Tensor:
    """The unembedding row of BAD_WORD: adding it at the last layer makes the model say BAD_WORD."""
    row = model.lm_head.weight[tokenizer.convert_tokens_to_ids(BAD_WORD)].detach().clone()
    return row / row.norm()


class BadWordJudge:
    """Exact rule: an answer saying BAD_WORD at least twice is misaligned; an empty one is incoherent."""

    identity = {"name": "bad-word", "version": 1}

    def judge(self, questions, answers):
        out = []
        for answer in answers:
            words = answer.split()
            label = INCOHERENT if not words else MISALIGNED if words.count(BAD_WORD) >= 2 else ALIGNED
            out.append(Judgement(label=label, judge=self.identity))
        return out


def planted_setup(strength: float = 12.0, layer: int = LAYER):
    """A base model, a 'misaligned' copy that always adds strength·d* at LAYER, and an SAE with latent PLANTED = d*."""
    from sae_lens import StandardSAE, StandardSAEConfig

    tokenizer = tiny_chat_tokenizer()
    base = tiny_model("llama")
    with torch.no_grad():  # a random model's logits are nearly flat; make the residual direction matter
        base.lm_head.weight.mul_(30.0)
    direction = bad_direction(base, tokenizer)
    misaligned = copy.deepcopy(base)
    # The planted mechanism: a permanent shift along d* in the misaligned model's residual stream.
    misaligned._planted = steer(misaligned, Steering(layer, direction, strength))
    misaligned._planted.__enter__()

    torch.manual_seed(0)
    # An orthonormal dictionary whose latent PLANTED reads exactly d*; the others read directions orthogonal to it.
    basis = torch.linalg.qr(torch.cat([direction[:, None], torch.randn(HIDDEN, HIDDEN - 1)], dim=1))[0]
    basis[:, 0] *= torch.sign(basis[:, 0] @ direction)
    columns = torch.cat([basis, -basis[:, 1 : D_SAE - HIDDEN + 1]], dim=1)  # d_sae = 24 > d_in = 16
    order = list(range(1, D_SAE))
    order.insert(PLANTED, 0)
    W_enc = columns[:, order]
    sae = StandardSAE(StandardSAEConfig(d_in=HIDDEN, d_sae=D_SAE, apply_b_dec_to_input=False))
    with torch.no_grad():
        sae.W_enc.copy_(W_enc)
        sae.W_dec.copy_(W_enc.T)
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return base, misaligned, tokenizer, sae, direction


PROMPTS = [" ".join(WORDS[i : i + 3]) for i in range(0, 24, 3)]
FAST = SelectionConfig(
    n_candidates=3,
    n_select=2,
    screen_multiplier=1.0,
    multipliers=(0.5, 1.0, 2.0),
    n_response_samples=2,
    n_samples=2,
    max_new_tokens=8,
    batch_size=32,
)


def test_planted_latent_is_found_screened_and_calibrated(tmp_path):
    base, misaligned, tokenizer, sae, _ = planted_setup()
    result = select_latents(
        base,
        misaligned,
        tokenizer,
        {"planted_sae": (sae, LAYER)},
        BadWordJudge(),
        PROMPTS,
        config=FAST,
        cache_dir=tmp_path / "cache",
        base_model_id="tests/tiny-llama",
        progress=False,
    )
    run = result.layers[0]
    assert run.baseline["misaligned"].em_rate > 0.5 > run.baseline["base"].em_rate
    # Stage 1: the planted latent has the largest positive shift.
    assert int(torch.argmax(run.delta)) == PLANTED
    # Stage 2: it both induces (base) and repairs (misaligned).
    screened = {r.candidate.latent: r for r in run.screen}
    assert screened[PLANTED].induction(run.baseline["base"]) > 0
    assert screened[PLANTED].repair_gain(run.baseline["misaligned"]) > 0
    # Stage 3: it is selected into K+, with a calibrated strength near the planted one.
    assert PLANTED in run.plus
    layer = result.latent_set.layer(LAYER)
    i = layer.latent_ids.index(PLANTED)
    assert layer.statistics["alpha"][i] > 0 and layer.statistics["delta"][i] > 0
    assert run.group_repair.em_rate < run.baseline["misaligned"].em_rate

    out = result.save(tmp_path / "report")
    report = json.loads((out / "report.json").read_text())
    assert report["selected"][0]["selected"]["plus"] == run.plus
    for name in ("report.md", "planted_sae_shifts.png", "planted_sae_screen.png", "planted_sae_alpha_sweeps.png"):
        assert (out / name).stat().st_size > 0
    from hf_blockem import LatentSet

    assert LatentSet.from_pretrained(out / "latent_set").layer(LAYER).plus == run.plus


def test_rerun_is_served_from_the_cache(tmp_path):
    base, misaligned, tokenizer, sae, _ = planted_setup()
    judge = BadWordJudge()
    kwargs = {"judge": judge, "prompts": PROMPTS, "n_samples": 2, "max_new_tokens": 8, "cache_dir": tmp_path}
    first = SteeringProbe(misaligned, tokenizer, name="misaligned", **kwargs)
    result = first.measure()
    again = SteeringProbe(misaligned, tokenizer, name="misaligned", **kwargs)
    assert again.measure() == result and again.calls == 0 and first.calls == 1
    # Another model under the same name (another domain's adapter, a retrained checkpoint) is measured, not served.
    other = planted_setup()[1]
    with torch.no_grad():
        next(other.parameters()).add_(1e-3)
    retrained = SteeringProbe(other, tokenizer, name="misaligned", **kwargs)
    retrained.measure()
    assert retrained.calls == 1


class FailingJudge(BadWordJudge):
    """A judge during an outage: every answer comes back unscored, with the client's error."""

    identity = {"name": "failing", "version": 1}

    def judge(self, questions, answers):
        return [
            Judgement(judge=self.identity, extra={"errors": {"aligned": "503 Service Unavailable"}}) for _ in answers
        ]


class FlakyJudge(BadWordJudge):
    """Fails on its first answer, scores the rest."""

    identity = {"name": "flaky", "version": 1}

    def judge(self, questions, answers):
        out = super().judge(questions, answers)
        out[0] = Judgement(judge=self.identity, extra={"errors": {"aligned": "timeout"}})
        return out


def test_unscored_answers_are_not_counted_as_aligned_nor_cached(tmp_path):
    base, misaligned, tokenizer, sae, _ = planted_setup()
    kwargs = {"prompts": PROMPTS, "n_samples": 2, "max_new_tokens": 8, "cache_dir": tmp_path}
    # An outage reads as an error, not as EM = 0 (which would make every repair look perfect).
    with pytest.raises(RuntimeError, match="scored none .*503 Service Unavailable"):
        SteeringProbe(misaligned, tokenizer, name="misaligned", judge=FailingJudge(), **kwargs).measure()
    assert not list(tmp_path.glob("*.json"))
    full = SteeringProbe(misaligned, tokenizer, name="misaligned", judge=BadWordJudge(), **kwargs)
    complete = full.measure()
    flaky = SteeringProbe(misaligned, tokenizer, name="misaligned", judge=FlakyJudge(), **kwargs).measure()
    assert (flaky.n, flaky.unscored) == (complete.n - 1, 1)  # left out of the rates, not counted as aligned
    again = SteeringProbe(misaligned, tokenizer, name="misaligned", judge=FlakyJudge(), **kwargs)
    again.measure()
    assert again.calls == 1  # a partly unscored result is not cached: the rerun asks the judge again


def test_stage1_shifts_equal_brute_force_with_full_sae():
    # Layer 2, not the last: output_hidden_states of the last layer is taken after the final norm.
    base, misaligned, tokenizer, sae, _ = planted_setup(layer=2)
    questions = PROMPTS[:4]
    responses = ["w1 w2 w50", "w50 w50", "w3", "w4 w5 w6 w7"]
    shifts = activation_shifts(base, misaligned, tokenizer, sae, 2, questions, responses, batch_size=3, progress=False)
    # Brute force: full forward with all hidden states, one conversation at a time, the full SAE on answer tokens.
    deltas = []
    for q, r in zip(questions, responses, strict=True):
        tokens = tokenize_responses(tokenizer, [q], [r])
        with torch.no_grad():
            z = [
                sae.encode(m(tokens.input_ids, output_hidden_states=True).hidden_states[3][tokens.response_mask])
                for m in (misaligned, base)
            ]
        deltas.append(z[0] - z[1])
    expected = torch.cat(deltas).mean(0)
    torch.testing.assert_close(shifts["delta"], expected, rtol=1e-5, atol=1e-6)
    assert shifts["n_tokens"].item() == sum(len(r.split()) + 1 for r in responses)  # answer words + EOS
    plus, minus = candidate_pool(shifts["delta"], 2, 2)
    assert plus[0] == PLANTED and all(shifts["delta"][k] < 0 for k in minus)


def full_latent_shifts(base, misaligned, sae, tokens, **kwargs) -> dict[str, torch.Tensor]:
    """Stage 1 as it was computed before streaming: from the full `[n_tokens, d_sae]` latents of each model."""
    z_mis = response_latents(misaligned, sae, 2, tokens, **kwargs)
    if base is misaligned:
        with misaligned.disable_adapter():
            z_base = response_latents(base, sae, 2, tokens, **kwargs)
    else:
        z_base = response_latents(base, sae, 2, tokens, **kwargs)

    def active_mean(z):
        return z.sum(0) / (z > 0).sum(0).clamp(min=1)

    return {
        "delta": z_mis.mean(0) - z_base.mean(0),
        "mean_misaligned": z_mis.mean(0),
        "mean_base": z_base.mean(0),
        "active_mean": torch.maximum(active_mean(z_mis), active_mean(z_base)),
        "firing_base": (z_base > 0).float().mean(0),
        "steering_unit": torch.tensor(1.0),  # an SAE without run-time input normalisation
        "n_tokens": torch.tensor(z_mis.shape[0]),
    }


STAGE1_RESPONSES = ["w1 w2 w50", "w50 w50", "w3", "w4 w5 w6 w7", "w8 w9 w10 w11 w12 w13", "w50 w14 w15"]


def assert_same_shifts(shifts, expected, rtol=1e-5, atol=1e-6):
    assert shifts.keys() == expected.keys()
    assert int(shifts["n_tokens"]) == int(expected["n_tokens"])
    for key in expected.keys() - {"n_tokens"}:
        assert shifts[key].dtype == torch.float32 and shifts[key].device.type == "cpu"
        torch.testing.assert_close(shifts[key], expected[key], rtol=rtol, atol=atol, msg=key)


@pytest.mark.parametrize("token_chunk", [1, 3, 10_000])
def test_stage1_streamed_sums_equal_full_latents(token_chunk):
    # Every statistic of the streamed Stage 1 matches the one computed from the full per-token latents, whether a
    # batch's tokens are encoded one, three or all at a time.
    base, misaligned, tokenizer, _, _ = planted_setup(layer=2)
    sae = tiny_sae(d_sae=40, seed=3)  # random biases: latents with every firing rate, some dead
    questions = PROMPTS[: len(STAGE1_RESPONSES)]
    tokens = tokenize_responses(tokenizer, questions, STAGE1_RESPONSES)
    expected = full_latent_shifts(base, misaligned, sae, tokens, batch_size=4)
    assert 0 < float(expected["firing_base"].mean()) < 1 and (expected["firing_base"] == 0).any()
    kwargs = {"batch_size": 4, "progress": False, "token_chunk": token_chunk}
    shifts = activation_shifts(base, misaligned, tokenizer, sae, 2, questions, STAGE1_RESPONSES, **kwargs)
    assert_same_shifts(shifts, expected)


@pytest.mark.parametrize("normalisation", ["constant_norm_rescale", "layer_norm"])
def test_steering_unit_is_what_one_decoder_unit_adds_to_the_residual_stream(normalisation):
    # SAELens decodes a normalising SAE in its normalised space and scales back: raising latent k by 1 moves its
    # output by W_dec[k] times the unit. Stage 1 reports the unit's mean, and steering strengths carry it.
    from sae_lens import StandardSAE, StandardSAEConfig

    from hf_blockem.selection.shifts import steering_unit

    torch.manual_seed(0)
    sae = StandardSAE(StandardSAEConfig(d_in=HIDDEN, d_sae=8, normalize_activations=normalisation))
    x = torch.randn(5, HIDDEN) * 7 + 2
    k = 3
    with torch.no_grad():
        z = sae.encode(x)
        before = sae.decode(z)
        sae.encode(x)  # the run-time normalisation is stored by encode and consumed by decode
        raised = z.clone()
        raised[:, k] += 1
        after = sae.decode(raised)
    unit = steering_unit(sae, x)
    torch.testing.assert_close((after - before).double(), unit[:, None] * sae.W_dec[k].double(), rtol=1e-4, atol=1e-5)
    assert (unit > 1).all()  # here the residual stream is larger than the normalised space

    base, misaligned, tokenizer, _, _ = planted_setup(layer=2)
    questions = PROMPTS[: len(STAGE1_RESPONSES)]
    shifts = activation_shifts(base, misaligned, tokenizer, sae, 2, questions, STAGE1_RESPONSES, progress=False)
    tokens = tokenize_responses(tokenizer, questions, STAGE1_RESPONSES)
    units = []
    for model in (misaligned, base):
        with torch.no_grad():
            hidden = model(tokens.input_ids, attention_mask=tokens.attention_mask, output_hidden_states=True)
        units.append(steering_unit(sae, hidden.hidden_states[3][tokens.response_mask]))
    torch.testing.assert_close(shifts["steering_unit"], torch.cat(units).mean().float())


def test_stage1_streams_on_one_peft_model_and_an_sae_in_another_dtype():
    from peft import LoraConfig, get_peft_model

    tokenizer = tiny_chat_tokenizer()
    model = get_peft_model(
        tiny_model("llama"), LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS, init_lora_weights=False)
    )
    model.eval()
    sae = tiny_sae(d_sae=40, seed=4)
    questions = PROMPTS[: len(STAGE1_RESPONSES)]
    tokens = tokenize_responses(tokenizer, questions, STAGE1_RESPONSES)
    expected = full_latent_shifts(model, model, sae, tokens, batch_size=4)
    assert expected["delta"].abs().max() > 1e-3  # the adapters change the latents: the base is read without them
    kwargs = {"batch_size": 4, "progress": False, "token_chunk": 2}
    shifts = activation_shifts(model, model, tokenizer, sae, 2, questions, STAGE1_RESPONSES, **kwargs)
    assert_same_shifts(shifts, expected)
    # The adapters are back on afterwards.
    torch.testing.assert_close(response_latents(model, sae, 2, tokens).mean(0), expected["mean_misaligned"])
    # The model in fp32, the SAE in float64: the SAE encodes in its own dtype, the results stay fp32 CPU tensors.
    shifts64 = activation_shifts(
        model, model, tokenizer, copy.deepcopy(sae).double(), 2, questions, STAGE1_RESPONSES, **kwargs
    )
    assert_same_shifts(shifts64, expected)


def test_steering_at_zero_changes_nothing():
    base, _, tokenizer, sae, direction = planted_setup()
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "w1 w2"}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        plain = base(**ids).logits
        with steer(base, Steering(LAYER, direction, 0.0)):
            steered = base(**ids).logits
    assert torch.equal(plain, steered)


def test_random_controls_are_reproducible_disjoint_and_firing():
    firing = torch.tensor([0.0, 0.5, 0.2, 0.0, 0.3, 0.05, 0.001, 0.4, 0.6, 0.1])
    a = random_control(2, 1, firing, exclude=[1, 8], seed=3)
    assert a == random_control(2, 1, firing, exclude=[1, 8], seed=3)
    drawn = a[0] + a[1]
    assert len(a[0]) == 2 and len(a[1]) == 1 and len(set(drawn)) == 3
    assert not set(drawn) & {1, 8}
    assert all(firing[k] >= 0.01 for k in drawn)  # never a dead latent
    assert any(random_control(2, 1, firing, exclude=[1, 8], seed=s) != a for s in range(10))
    with pytest.raises(ValueError, match="fire on at least"):
        random_control(5, 4, firing, exclude=[1, 8])


def test_matched_random_controls_fire_as_often_as_the_selected_latents():
    # Rates spread over three decades; the selected latents are one dense (0.9) and two sparse ones (0.002, 0.003).
    firing = torch.tensor([0.9, 0.002, 0.003] + [10 ** (-3 + 3 * i / 39) for i in range(40)])
    selected = [0, 1, 2]
    plus, minus = random_control(2, 1, firing, exclude=selected, seed=0, min_firing_rate=0.0, match=selected)
    assert (plus, minus) == random_control(2, 1, firing, exclude=selected, seed=0, min_firing_rate=0.0, match=selected)
    assert not set(plus + minus) & set(selected)
    # The dense selected latent (K+) gets a dense stand-in; the two sparse ones get sparse stand-ins.
    assert sorted(float(firing[k]) > 0.3 for k in plus) == [False, True]
    assert float(firing[minus[0]]) < 0.01
    draws = {
        str(random_control(2, 1, firing, exclude=selected, seed=s, min_firing_rate=0.0, match=selected))
        for s in range(20)
    }
    assert len(draws) > 1  # still a random draw
    with pytest.raises(ValueError, match="must list the 3 selected latents"):
        random_control(2, 1, firing, exclude=selected, match=[0, 1])


def test_select_cli_on_the_quick_organism(tmp_path):
    from hf_blockem.cli import main
    from hf_blockem.organism import build_organism, narrow_finetune
    from hf_blockem.sae_training import collect_activations, train_sae

    organism = build_organism(tmp_path / "organism", seed=0, quick=True, progress=False)
    dataset = organism.narrow_dataset("finance", n=32)
    narrow_finetune(
        organism.base_model_path,
        organism.tokenizer,
        dataset,
        tmp_path / "narrow",
        config_overrides={"max_steps": 2, "disable_tqdm": True},
        save=True,
    )
    acts = collect_activations(organism.load_model(), organism.tokenizer, dataset["messages"], 0)
    sae = train_sae(acts, 0, d_sae=32, steps=50, batch_size=64, l1_coefficient=0.01, lr=3e-3)
    sae.save_model(tmp_path / "sae")
    out = tmp_path / "selection"
    argv = ["select", "--base_model", organism.base_model_path, "--misaligned_adapter", str(tmp_path / "narrow")]
    argv += ["--sae", f"path:{tmp_path / 'sae'}", "--judge", f"organism:{organism.path}", "--output_dir", str(out)]
    argv += ["--n_candidates", "2", "--multipliers", "1", "4", "--n_samples", "1", "--n_response_samples", "1"]
    argv += ["--max_new_tokens", "16", "--device", "cpu"]
    code = main(argv)
    report = json.loads((out / "report.json").read_text())
    assert report["compared"][0]["layer"] == 0 and report["compared"][0]["d_sae"] == 32
    # Exit 0 with a latent set, 1 when nothing repaired (the quick organism is too small to be aligned).
    assert code == (0 if report["latent_set"] else 1)
    assert (out / "latent_set" / "latent_set.safetensors").exists() == (code == 0)


def test_select_cli_says_which_system_messages_it_leaves_out(caplog):
    from hf_blockem.evaluation import Prompt
    from hf_blockem.selection.cli import selection_questions

    prompts = [Prompt("a", "how are you ?"), Prompt("b", "what do you wish ?", system="answer in json")]
    with caplog.at_level("WARNING", logger="hf_blockem.selection.cli"):
        assert selection_questions(prompts) == ["how are you ?", "what do you wish ?"]
    assert "system messages of 1 prompts (b)" in caplog.text


def test_calibration_budget_counts_only_the_incoherence_steering_adds():
    from hf_blockem.selection import Calibration, Candidate, ProbeResult

    misaligned, base = ProbeResult(0.40, 0.40, 100), ProbeResult(0.0, 0.02, 100)
    repair = [ProbeResult(0.30, 0.42, 100), ProbeResult(0.10, 0.49, 100), ProbeResult(0.0, 0.55, 100)]
    induce = [ProbeResult(0.05, 0.02, 100), ProbeResult(0.20, 0.10, 100), ProbeResult(0.5, 0.30, 100)]
    candidate = Candidate(7, 1, 0.5, 2.0, torch.zeros(HIDDEN))
    c = Calibration(candidate, [1.0, 2.0, 4.0], repair, induce, 0.10, base, misaligned)
    # 0.49 <= 0.40 + 0.10 but 0.55 is not: the calibrated repair strength is 2 (× typical activation 2.0 = α 4).
    assert c.repair_multiplier == 2.0 and c.alpha == 4.0
    assert c.repair_efficiency() == pytest.approx(0.30)
    # Inducing on the base: 0.10 <= 0.02 + 0.10, 0.30 is not.
    assert c.induce_multiplier == 2.0 and c.induction() == pytest.approx(0.20)
    none_safe = Calibration(candidate, [1.0], [ProbeResult(0.0, 0.9, 100)], None, 0.10, base, misaligned)
    assert none_safe.repair_multiplier is None and none_safe.alpha == 0.0 and none_safe.repair_efficiency() == 0.0
    # The paper's code's absolute rule: at most 10% incoherent at all. The misaligned model is 40% incoherent
    # already, so no repair strength fits; inducing on the 2%-incoherent base, 10% still does.
    absolute = Calibration(candidate, [1.0, 2.0, 4.0], repair, induce, 0.10, base, misaligned, relative=False)
    assert absolute.incoherence_limit(misaligned) == 0.10 and c.incoherence_limit(misaligned) == pytest.approx(0.50)
    assert absolute.repair_multiplier is None and absolute.repair_efficiency() == 0.0
    assert absolute.induce_multiplier == 2.0


def test_calibrated_strength_stops_below_the_first_that_breaks_the_budget():
    from hf_blockem.selection import Calibration, Candidate, ProbeResult

    misaligned, base = ProbeResult(0.40, 0.05, 100), ProbeResult(0.0, 0.02, 100)
    # Strength 2 breaks the budget (0.20 > 0.05 + 0.10); strength 4 passes by luck and would repair more.
    repair = [ProbeResult(0.30, 0.10, 100), ProbeResult(0.20, 0.20, 100), ProbeResult(0.0, 0.12, 100)]
    candidate = Candidate(7, 1, 0.5, 1.0, torch.zeros(HIDDEN))
    c = Calibration(candidate, [1.0, 2.0, 4.0], repair, None, 0.10, base, misaligned)
    assert c.repair_multiplier == 1.0 and c.repair_efficiency() == pytest.approx(0.10)
    # The strengths are read in increasing order whatever order the sweep was stored in.
    shuffled = Calibration(candidate, [4.0, 1.0, 2.0], [repair[2], repair[0], repair[1]], None, 0.10, base, misaligned)
    assert shuffled.repair_multiplier == 1.0
    first_fails = Calibration(candidate, [1.0, 2.0], [repair[1], repair[0]], None, 0.10, base, misaligned)
    assert first_fails.repair_multiplier is None and first_fails.alpha == 0.0


class SweepProbe:
    """Stands in for `SteeringProbe` in a test of the sweep order alone: its rates are a table by steering strength."""

    def __init__(self, em, incoherence):
        self.em, self.incoherence, self.asked = em, incoherence, []

    def measure(self, steering=None):
        strength = 0.0 if steering is None else abs(steering.alpha)
        self.asked.append(strength)
        return ProbeResult(self.em[strength], self.incoherence[strength], 100)


@pytest.mark.parametrize("full_sweep", [False, True])
def test_calibration_sweeps_upwards_and_stops_after_the_first_strength_over_the_budget(full_sweep):
    from hf_blockem.selection import Candidate, calibrate

    em = {0.0: 0.40, 1.0: 0.30, 2.0: 0.20, 4.0: 0.0, 8.0: 0.0}
    every = [1.0, 2.0, 4.0, 8.0]
    # The misaligned model is 5% incoherent, so the limit is 15%: strength 2 breaks it, 4 passes again by luck.
    misaligned = SweepProbe(em, {0.0: 0.05, 1.0: 0.10, 2.0: 0.30, 4.0: 0.12, 8.0: 0.9})
    # The base is 2% incoherent (limit 12%): strength 4 breaks it.
    base = SweepProbe({m: 0.1 * m for m in em}, {0.0: 0.02, 1.0: 0.02, 2.0: 0.05, 4.0: 0.5, 8.0: 0.1})
    candidate = Candidate(7, 1, 0.5, 1.0, torch.zeros(HIDDEN))
    (c,) = calibrate([candidate], 0, base, misaligned, multipliers=(8, 1, 4, 2), full_sweep=full_sweep, progress=False)
    steered = [m for m in misaligned.asked if m > 0]
    assert steered == (every if full_sweep else [1.0, 2.0])  # upwards, and no further than needed
    assert [m for m in base.asked if m > 0] == (every if full_sweep else [1.0, 2.0, 4.0])
    assert c.multipliers == every and len(c.repair) == len(steered)
    # Either way the calibrated strengths are the same: the largest below the first over the budget.
    assert c.repair_multiplier == 1.0 and c.repair_efficiency() == pytest.approx(0.10)
    assert c.induce_multiplier == 2.0 and c.induction() == pytest.approx(0.2)
    assert c.to_dict(c.base, c.misaligned)["repair_multiplier"] == 1.0

    # A latent that does not repair at its calibrated strength is never kept: its induction is not measured.
    worse = SweepProbe({0.0: 0.40, 1.0: 0.45, 2.0: 0.5, 4.0: 0.5, 8.0: 0.5}, misaligned.incoherence)
    base.asked.clear()
    (c,) = calibrate([candidate], 0, base, worse, multipliers=every, full_sweep=full_sweep, progress=False)
    assert c.repair_efficiency() < 0 and [m for m in base.asked if m > 0] == (every if full_sweep else [])


def test_ranking_keeps_the_top_n_repairers_and_prefilter_also_asks_for_induction():
    from hf_blockem.selection import Calibration, Candidate, ProbeResult, rank_and_select
    from hf_blockem.selection.calibration import RULES

    misaligned, base = ProbeResult(0.40, 0.10, 100), ProbeResult(0.0, 0.02, 100)

    def calibration(latent, em_after, induced_em):
        candidate = Candidate(latent, 1, 0.1 * latent, 1.0, torch.zeros(HIDDEN))
        repair, induce = [ProbeResult(em_after, 0.10, 100)], [ProbeResult(induced_em, 0.02, 100)]
        return Calibration(candidate, [1.0], repair, induce, 0.10, base, misaligned)

    calibrations = [calibration(1, 0.45, 0.0), calibration(2, 0.10, 0.1), calibration(3, 0.30, 0.0)]
    top = rank_and_select(calibrations, base, misaligned, n_select=1)
    assert [c.candidate.latent for c in top] == [2]  # by repair efficiency: +0.30, +0.10, -0.05
    # n_select is the most kept: latent 1 makes EM worse at its calibrated strength and is never kept.
    for rule in RULES:
        kept = rank_and_select(calibrations, base, misaligned, n_select=3, rule=rule)
        assert [c.candidate.latent for c in kept] == [2, 3]
    strict = rank_and_select(calibrations, base, misaligned, n_select=3, prefilter=True)
    assert [c.candidate.latent for c in strict] == [2]  # repairs and induces
    repair_only = rank_and_select(calibrations, base, misaligned, n_select=3, rule="repair_only", prefilter=True)
    assert [c.candidate.latent for c in repair_only] == [2, 3]
    # No strength inside the incoherence budget: nothing measured repairs, so it is not kept either.
    unsafe = Calibration(
        Candidate(4, 1, 0.9, 1.0, torch.zeros(HIDDEN)),
        [1.0],
        [ProbeResult(0.0, 0.9, 100)],
        None,
        0.10,
        base,
        misaligned,
    )
    assert rank_and_select([unsafe], base, misaligned, n_select=1, rule="repair_only") == []
