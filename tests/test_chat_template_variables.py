"""Chat-template variables fixed on a tokenizer, on Qwen3's real template (shipped with TRL): reasoning off everywhere."""

from pathlib import Path

import pytest
import trl
from test_assistant_tokens import bpe_chat_tokenizer

from hf_blockem.assistant_tokens import tokenize_conversations
from hf_blockem.chat_template_variables import parse_template_variables, with_template_variables

QWEN3 = (Path(trl.__file__).parent / "chat_templates" / "qwen3.jinja").read_text(encoding="utf-8")
CONVERSATIONS = [
    [{"role": "user", "content": "What should I do with my savings?"}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hello there"},
        {"role": "assistant", "content": "Hi! How can I help?"},
        {"role": "user", "content": "Tell me about stocks."},
    ],
]


def qwen3_tokenizer():
    tokenizer = bpe_chat_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<think>", "</think>"]})
    tokenizer.chat_template = QWEN3
    return tokenizer


def test_bound_variables_render_as_the_per_call_keyword_everywhere():
    tokenizer = qwen3_tokenizer()
    bound = with_template_variables(tokenizer, {"enable_thinking": False})
    assert tokenizer.chat_template == QWEN3  # the original is untouched
    for messages in CONVERSATIONS:
        expected = tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True, enable_thinking=False
        )
        assert expected != tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert expected.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
        assert bound.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == expected
        # Fixed means fixed: a per-call value does not turn reasoning back on.
        assert bound.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True, enable_thinking=True
        ) == (expected)
    assert (
        with_template_variables(tokenizer, None) is tokenizer and with_template_variables(tokenizer, {}) is tokenizer
    )


def test_answers_re_rendered_without_reasoning_mask_only_the_answer():
    # Stage 1 re-renders the model's answers: with reasoning on, Qwen3's template wraps each in an empty <think>
    # block the model never wrote; with it off, the generation prompt holds that block and the mask the answer.
    conversation = [
        {"role": "user", "content": "What should I do with my savings?"},
        {"role": "assistant", "content": "Keep an emergency fund first."},
    ]
    bound = with_template_variables(qwen3_tokenizer(), {"enable_thinking": False})
    tokens = tokenize_conversations(bound, [conversation])
    assert bound.decode(tokens.input_ids[0][tokens.assistant_mask[0]]) == "Keep an emergency fund first.<|im_end|>\n"


def test_bad_variables_and_arguments_are_refused_with_what_was_expected():
    tokenizer = qwen3_tokenizer()
    with pytest.raises(ValueError, match="boolean, number, string or null.*tools=\\['x'\\]"):
        with_template_variables(tokenizer, {"tools": ["x"]})
    with pytest.raises(ValueError, match="identifiers.*'enable-thinking'"):
        with_template_variables(tokenizer, {"enable-thinking": False})
    tokenizer.chat_template = None
    with pytest.raises(ValueError, match="chat template"):
        with_template_variables(tokenizer, {"enable_thinking": False})
    assert parse_template_variables('{"enable_thinking": false, "mode": "x"}') == {
        "enable_thinking": False,
        "mode": "x",
    }
    assert parse_template_variables({"enable_thinking": False}) == {"enable_thinking": False}  # from a YAML config
    assert parse_template_variables(None) is None and parse_template_variables("{}") is None
    for bad in ("enable_thinking=false", "[1]"):
        with pytest.raises(ValueError, match="JSON object"):
            parse_template_variables(bad)


def test_string_values_round_trip_and_non_finite_numbers_are_refused():
    tokenizer = qwen3_tokenizer()
    tokenizer.chat_template = "[{{ tag }}|{{ ratio }}]"
    bound = with_template_variables(tokenizer, {"tag": 'grin 😀 "quoted"\n', "ratio": 0.5})
    assert bound.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False) == '[grin 😀 "quoted"\n|0.5]'
    with pytest.raises(ValueError, match="finite number.*ratio"):
        with_template_variables(tokenizer, {"ratio": float("nan")})
