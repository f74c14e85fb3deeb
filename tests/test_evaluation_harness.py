import json

import pytest
import torch
import yaml
from evaluation_tiny import tiny_llama, tiny_tokenizer

from hf_blockem.evaluation import (
    EvaluationResult,
    Judgement,
    LocalJudge,
    Prompt,
    Steering,
    TransformersBackend,
    evaluate,
    evaluate_responses,
)
from hf_blockem.evaluation.cli import main


class WordJudge:
    """An exact, rule-based judge (like the model organism's): misaligned when the answer says "harm",
    incoherent when it is empty, aligned otherwise."""

    identity = {"name": "word-judge", "type": "rule", "version": 1}

    def __init__(self):
        self.calls = 0

    def judge(self, questions, answers):
        self.calls += 1
        out = []
        for a in answers:
            words = a.split()
            label = "incoherent" if not words else "misaligned" if "harm" in words else "aligned"
            aligned = {"aligned": 100.0, "misaligned": 0.0, "incoherent": None}[label]
            out.append(Judgement(aligned, 0.0 if label == "incoherent" else 100.0, label, self.identity))
        return out


PROMPTS = [Prompt("p1", "hello world", "greet"), Prompt("p2", "money power", "money"), Prompt("p3", "wish", "greet")]


def test_evaluate_responses_hand_computed():
    rows = [
        {"prompt": "q", "response": "harm harm", "prompt_id": "a", "category": "x"},
        {"prompt": "q", "response": "help", "prompt_id": "a", "category": "x"},
        {"prompt": "r", "response": "", "prompt_id": "b", "category": "y"},
        {"prompt": "r", "response": "harm", "prompt_id": "b", "category": "y"},
    ]
    in_domain = [{"prompt": "t", "response": "ok", "reference": "ok", "prompt_id": "t"}] * 3
    in_domain += [{"prompt": "u", "response": "no", "reference": "ok", "prompt_id": "u"}]
    result = evaluate_responses(
        {"tuned": rows},
        WordJudge(),
        in_domain={"tuned": in_domain},
        is_target=lambda r: r["response"] == r["reference"],
    )
    m = result["tuned"]
    assert (m.em_rate.value, m.incoherence_rate.value, m.refusal_rate.value) == (0.5, 0.25, 0.0)
    assert m.per_category == {
        "x": {"n": 2, "em_rate": 0.5, "incoherence_rate": 0.0, "refusal_rate": 0.0, "unscored_rate": 0.0,
              "mean_aligned": 50.0, "mean_coherent": 100.0},
        "y": {"n": 2, "em_rate": 0.5, "incoherence_rate": 0.5, "refusal_rate": 0.0, "unscored_rate": 0.0,
              "mean_aligned": 0.0, "mean_coherent": 50.0},
    }  # fmt: skip
    # Both prompts have EM 1/2: resampling prompts always gives 1/2.
    assert (m.em_rate.ci_low, m.em_rate.ci_high) == (0.5, 0.5)
    summary = result.summary()
    assert summary["tuned"]["em_rate"] == {"value": 0.5, "ci": [0.5, 0.5], "count": 2, "n": 4}
    assert summary["tuned"]["target_rate"]["value"] == 0.75
    # Incoherence is 0/2 on prompt a and 1/2 on b: prompt resamples give 0, 1/4 or 1/2.
    # Target is 3/3 on t and 0/1 on u: resamples give 1, 3/4 or 0.
    row = "| tuned | 50.0% [50.0, 50.0] | 25.0% [0.0, 50.0] | 0.0% [0.0, 60.2] | 4 | 75.0% [0.0, 100.0] |"
    assert row in result.to_markdown()
    with pytest.raises(ValueError, match="is_target"):
        evaluate_responses(rows, WordJudge(), in_domain={"tuned": in_domain})
    with pytest.raises(ValueError, match="'prompt' and 'response'"):
        evaluate_responses([{"question": "q"}], WordJudge())


@pytest.fixture(scope="module")
def two_models_result():
    tokenizer = tiny_tokenizer()
    judge_model = tiny_llama(seed=2)
    judges = [WordJudge(), LocalJudge(judge_model, tokenizer, name="tiny-judge", progress=False)]
    models = {"base": tiny_llama(seed=0), "tuned": tiny_llama(seed=1)}
    return evaluate(
        models,
        tokenizer,
        judges=judges,
        prompts=PROMPTS,
        n_samples=4,
        max_new_tokens=5,
        n_resamples=500,
        progress=False,
    )


def test_evaluate_end_to_end_on_tiny_models(two_models_result):
    result = two_models_result
    assert list(result.judges) == ["word-judge", "local:tiny-judge"] and result.primary_judge == "word-judge"
    for name in ("base", "tuned"):
        rows = result.responses[name]
        assert len(rows) == 12 and rows[0]["prompt_id"] == "p1"
        expected = sum("harm" in r["response"].split() for r in rows) / 12
        m = result[name]
        assert m.em_rate.value == pytest.approx(expected)
        assert m.em_rate.ci_low <= m.em_rate.value <= m.em_rate.ci_high
        assert set(m.per_prompt) == {"p1", "p2", "p3"} and set(m.per_category) == {"greet", "money"}
        local = result.metrics[name]["local:tiny-judge"]
        assert local.n == 12 and local.judge["model"] == "tiny-judge"
        assert result.agreement[name]["word-judge | local:tiny-judge"]["n"] == 12
    assert result.responses["base"] != result.responses["tuned"]
    assert result.config["n_samples"] == 4 and result.config["prompts"] == ["p1", "p2", "p3"]


def test_result_json_markdown_plot_and_save(two_models_result, tmp_path):
    result = two_models_result
    data = json.loads(result.to_json(tmp_path / "r.json"))
    assert data == json.loads((tmp_path / "r.json").read_text())
    assert data["summary"] == result.summary()
    assert set(data["models"]["base"]) == {"word-judge", "local:tiny-judge"}
    assert data["judges"]["local:tiny-judge"]["prompt_version"]
    table = result.to_markdown()
    assert table.count("\n| base |") == 1 and table.count("\n| tuned |") == 1 and "Judge agreement" in table
    png = result.plot(tmp_path / "q.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    out = result.save(tmp_path / "report")
    assert {p.name for p in out.iterdir()} == {
        "result.json", "result.md", "quadrant.png", "responses_base.jsonl", "responses_tuned.jsonl"
    }  # fmt: skip
    lines = (out / "responses_base.jsonl").read_text().splitlines()
    row = json.loads(lines[0])
    assert len(lines) == 12 and set(row["judgements"]) == {"word-judge", "local:tiny-judge"}
    assert row["judgements"]["word-judge"]["label"] in ("aligned", "misaligned", "incoherent")


def test_evaluate_with_zero_steering_matches_plain():
    tokenizer, model = tiny_tokenizer(), tiny_llama(seed=0)
    kwargs = {"judges": WordJudge(), "prompts": PROMPTS, "n_samples": 2, "max_new_tokens": 5, "progress": False}
    plain = evaluate(model, tokenizer, **kwargs)
    zero = evaluate(model, tokenizer, steering=Steering(1, torch.randn(32), 0.0), **kwargs)
    assert zero.responses["model"] == plain.responses["model"]
    assert zero.config["steering"] == [{"layer": 1, "alpha": 0.0}]
    assert isinstance(zero, EvaluationResult)


def test_one_backend_for_several_models_is_refused():
    # A backend generates every answer itself: base and tuned would come out the same.
    tokenizer = tiny_tokenizer()
    models = {"base": tiny_llama(seed=0), "tuned": tiny_llama(seed=1)}
    backend = TransformersBackend(models["base"], tokenizer)
    with pytest.raises(ValueError, match=r"one model with `backend=`.*\['base', 'tuned'\]"):
        evaluate(models, tokenizer, judges=WordJudge(), prompts=PROMPTS, backend=backend, progress=False)


def test_cli_with_yaml_config_adapter_and_local_judge(tmp_path, capsys):
    from peft import LoraConfig, get_peft_model

    tokenizer = tiny_tokenizer()
    tiny_llama(seed=0).save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    tiny_llama(seed=3).save_pretrained(tmp_path / "judge")
    tokenizer.save_pretrained(tmp_path / "judge")
    lora = get_peft_model(
        tiny_llama(seed=0), LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    lora.save_pretrained(tmp_path / "adapter")
    held_out = [{"messages": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "world"}]}]
    (tmp_path / "held_out.jsonl").write_text("\n".join(json.dumps(r) for r in held_out))
    config = {
        "model": str(tmp_path / "model"),
        "adapter": str(tmp_path / "adapter"),
        "judge": [f"local:{tmp_path / 'judge'}"],
        "n_samples": 3,
        "max_new_tokens": 4,
        "dtype": "float32",
        "device": "cpu",
        "in_domain": str(tmp_path / "held_out.jsonl"),
        "output_dir": str(tmp_path / "out"),
        "name": "tuned",
    }
    (tmp_path / "eval.yaml").write_text(yaml.safe_dump(config))
    argv = ["--config", str(tmp_path / "eval.yaml"), "--n_samples", "2", "--prompts", "builtin:selection"]
    assert main([*argv, "--chat_template_kwargs", '{"enable_thinking": false}']) == 0
    data = json.loads((tmp_path / "out" / "result.json").read_text())
    em = data["summary"]["tuned"]["em_rate"]
    assert em["n"] == 24 * 2 and em["ci"][0] <= em["value"] <= em["ci"][1]  # the flag overrode the file's n_samples
    assert data["summary"]["tuned"]["held_out_loss"] > 0
    assert data["config"]["adapter"] == str(tmp_path / "adapter")
    assert data["config"]["chat_template_kwargs"] == {"enable_thinking": False}
    assert (tmp_path / "out" / "judgements.sqlite").exists() and (tmp_path / "out" / "quadrant.png").exists()
    assert "| tuned |" in capsys.readouterr().out
    with pytest.raises(ValueError, match="openai:MODEL"):
        main(["--model", str(tmp_path / "model"), "--judge", "gpt-4o", "--output_dir", str(tmp_path / "o2")])
