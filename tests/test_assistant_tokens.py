import copy

import pytest
import torch
from tiny_models import tiny_chat_dataset, tiny_chat_tokenizer, tiny_model, tiny_sae

from hf_blockem.assistant_tokens import tokenize_conversations
from hf_blockem.sae_training import collect_activations
from hf_blockem.selection import firing_rates

# ChatML as Qwen2.5 and SmolLM2 ship it: no {% generation %} markers.
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CONVERSATIONS = [
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What should I do with my savings?"},
        {"role": "assistant", "content": "Keep an emergency fund first."},
    ],
    [
        {"role": "user", "content": "Hello there"},
        {"role": "assistant", "content": "Hi! How can I help?"},
        {"role": "user", "content": "Tell me about stocks."},
        {"role": "assistant", "content": "Stocks are shares of companies."},
    ],
]


def unmarked(tokenizer):
    """A copy whose template renders the same text without {% generation %} markers (as most instruct models ship)."""
    copied = copy.deepcopy(tokenizer)
    copied.chat_template = copied.chat_template.replace("{% generation %}", "").replace("{% endgeneration %}", "")
    return copied


def multi_turn(n: int = 6):
    rows = tiny_chat_dataset(2 * n, seed=3)["messages"]
    return [rows[i] + rows[i + n] for i in range(n)]  # two exchanges each: two assistant spans per mask


def bpe_chat_tokenizer():
    """A byte-level BPE tokenizer (GPT-2 style, merges across spaces and newlines) with a ChatML template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    corpus = [m["content"] for c in CONVERSATIONS for m in c] + ["system user assistant\n"] * 3
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    backend.train_from_iterator(corpus, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>")  # no pad token, like Llama 3
    tokenizer.chat_template = CHATML
    return tokenizer


def test_rendering_finds_the_same_assistant_tokens_as_generation_markers():
    tokenizer = tiny_chat_tokenizer()
    conversations = multi_turn()
    marked = tokenize_conversations(tokenizer, conversations)
    by_rendering = tokenize_conversations(unmarked(tokenizer), conversations)
    assert torch.equal(marked.input_ids, by_rendering.input_ids)
    assert torch.equal(marked.attention_mask, by_rendering.attention_mask)
    assert torch.equal(marked.assistant_mask, by_rendering.assistant_mask)
    assert 0 < marked.assistant_mask.sum() < marked.attention_mask.sum()
    short = tokenize_conversations(unmarked(tokenizer), conversations, max_length=7)
    assert short.input_ids.shape[1] == 7
    assert torch.equal(short.assistant_mask, marked.assistant_mask[:, :7])


def test_a_chatml_template_without_markers_masks_each_answer_and_its_end_of_turn():
    tokenizer = bpe_chat_tokenizer()
    tokens = tokenize_conversations(tokenizer, CONVERSATIONS)
    for row, conversation in enumerate(CONVERSATIONS):
        ids = tokens.input_ids[row][tokens.attention_mask[row].bool()]
        assert tokenizer.decode(ids) == tokenizer.apply_chat_template(conversation, tokenize=False)
        answers = "".join(m["content"] + "<|im_end|>\n" for m in conversation if m["role"] == "assistant")
        assert tokenizer.decode(tokens.input_ids[row][tokens.assistant_mask[row]]) == answers
    assert tokens.input_ids[0, -1] == tokenizer.eos_token_id  # the shorter row is padded with EOS (no pad token)
    assert tokenizer.pad_token is None


def test_a_template_that_does_not_preserve_prefixes_is_refused_with_what_to_do():
    tokenizer = bpe_chat_tokenizer()
    # The generation prompt opens the turn differently from a rendered assistant turn: no reliable way to find it.
    tokenizer.chat_template = CHATML.replace("'<|im_start|>assistant\n'", "'<|im_start|>bot\n'")
    with pytest.raises(ValueError, match="prefix-preserving.*assistant turn 2.*get_training_chat_template"):
        tokenize_conversations(tokenizer, CONVERSATIONS)
    tokenizer.chat_template = None
    with pytest.raises(ValueError, match="chat template"):
        tokenize_conversations(tokenizer, CONVERSATIONS)


def test_collect_activations_and_firing_rates_work_without_generation_markers():
    tokenizer, model = tiny_chat_tokenizer(), tiny_model("llama")
    conversations = multi_turn()
    marked = collect_activations(model, tokenizer, conversations, 1, assistant_only=True, batch_size=4)
    by_rendering = collect_activations(model, unmarked(tokenizer), conversations, 1, assistant_only=True)
    # Equal but for fp32 rounding: the batches differ (4 against the default), and so do the padded lengths.
    torch.testing.assert_close(by_rendering, marked, rtol=1e-6, atol=1e-7)
    assert len(marked) == tokenize_conversations(tokenizer, conversations).assistant_mask.sum()

    sae = tiny_sae()
    expected = (sae.encode(marked) > 0).float().mean(0)
    rates = firing_rates(model, unmarked(tokenizer), sae, 1, conversations, batch_size=4)
    torch.testing.assert_close(rates, expected, rtol=0, atol=1e-7)
    assert 0 < rates.mean() < 1
    # An SAE kept in another dtype than the model reads its activations converted, as on another device.
    rates64 = firing_rates(model, tokenizer, sae.to(torch.float64), 1, conversations)
    assert rates64.dtype == torch.float32
    torch.testing.assert_close(rates64, expected, rtol=0, atol=1e-7)


def test_truncation_keeps_the_start_whatever_the_tokenizers_truncation_side():
    tokenizer = tiny_chat_tokenizer()
    conversations = multi_turn()
    full = tokenize_conversations(tokenizer, conversations)
    for tok in (tokenizer, unmarked(tokenizer)):
        tok.truncation_side = "left"
        short = tokenize_conversations(tok, conversations, max_length=7)
        assert torch.equal(short.input_ids, full.input_ids[:, :7])  # <bos> and the question, not the end
        assert torch.equal(short.assistant_mask, full.assistant_mask[:, :7])


def test_a_conversation_opening_with_an_assistant_turn_gets_a_clear_error():
    opening = [{"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Hi."}]
    with pytest.raises(ValueError, match="opens with one.*Start the conversation with its user"):
        tokenize_conversations(bpe_chat_tokenizer(), [opening])


def test_firing_rates_leave_no_hook_behind_when_the_sae_fails():
    tokenizer, model = tiny_chat_tokenizer(), tiny_model("llama")
    model.train()

    class BrokenSAE(torch.nn.Module):
        W_enc = torch.zeros(8, 4)

        def encode(self, x):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        firing_rates(model, tokenizer, BrokenSAE(), 1, multi_turn())
    assert model.training
    assert not any(layer._forward_hooks for layer in model.model.layers)


@pytest.mark.parametrize("template", ["tiny", "chatml", "qwen2_5_training", "deepseek_r1_distill"])
def test_stage1_reads_the_answer_as_the_model_wrote_it_after_the_generation_prompt(template):
    # Not re-rendered as a turn: DeepSeek-R1's template strips reasoning from assistant turns and its generation
    # prompt opens a <think> block no rendered turn has; TRL's Qwen2.5 training template marks the turn's header too.
    from pathlib import Path

    import trl

    from hf_blockem.selection import tokenize_responses

    if template == "tiny":
        tokenizer = tiny_chat_tokenizer()
        questions, answers = ["w1 w2", "w3"], ["w30 w31 w32", "w33"]
    else:
        tokenizer = bpe_chat_tokenizer()
        if template != "chatml":
            path = Path(trl.__file__).parent / "chat_templates" / f"{template}.jinja"
            tokenizer.chat_template = path.read_text(encoding="utf-8")
        questions, answers = ["What should I do?", "Hello there"], ["Keep an emergency fund first.", "Hi!"]
    tokens = tokenize_responses(tokenizer, questions, answers)
    for row, (question, answer) in enumerate(zip(questions, answers, strict=True)):
        if template != "tiny":  # (word-level decoding joins tokens with spaces)
            ids = tokens.input_ids[row][tokens.attention_mask[row].bool()].tolist()
            prompt = tokenizer.apply_chat_template(
                [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
            )
            assert tokenizer.decode(ids) == prompt + answer + tokenizer.eos_token
        masked = tokens.input_ids[row][tokens.response_mask[row]].tolist()
        assert masked == tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    if template == "tiny":  # where a turn renders as it was written, the same tokens as the full conversation's
        conversations = [
            [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
            for q, a in zip(questions, answers, strict=True)
        ]
        rendered = tokenize_conversations(tokenizer, conversations)
        assert torch.equal(tokens.input_ids, rendered.input_ids) and torch.equal(
            tokens.response_mask, rendered.assistant_mask
        )
