"""Judges: log-probability scoring, the local judge on a tiny model, the SQLite cache, the OpenAI-compatible judge.

Why the OpenAI-compatible judge is tested against `FakeOpenAIServer`: no real OpenAI-compatible server that returns
log-probabilities runs here. `transformers serve` (transformers 5.24) rejects `logprobs` / `top_logprobs` (they are in
its UNUSED_CHAT_COMPLETION_FIELDS), and vLLM / llama.cpp are not installable offline on this CPU machine. So the test
starts a minimal local HTTP server that speaks the chat-completions protocol (request body, response schema, status
codes, delays) and is driven by the real `openai` client over real sockets.
"""

import copy
import http.server
import json
import re
import threading
import time
from collections import Counter

import pytest
import torch
from evaluation_tiny import SPECIALS, WORDS, tiny_llama, tiny_tokenizer

from hf_blockem.evaluation import JudgementCache, LocalJudge, score_distribution
from hf_blockem.evaluation.judge_prompts import PROMPT_VERSION, render_judge_prompt
from hf_blockem.evaluation.llm_judge import rubric_grade_to_aligned
from hf_blockem.evaluation.scoring import parse_number_token, probs_from_logprobs, split_number
from hf_blockem.fingerprints import template_fingerprint, weights_fingerprint

# -- scoring -------------------------------------------------------------------------------------------------------


def test_number_tokens_and_weighted_score():
    assert parse_number_token("42") == 42 and parse_number_token(" 7") == 7
    assert parse_number_token("\u012042") == 42 and parse_number_token("\u258199") == 99
    for token in ("101", "-3", "4.5", "07", "²", "REF", ""):
        assert parse_number_token(token) is None
    score = score_distribution({"80": 0.3, "90": 0.1, "REF": 0.6})
    assert score.value == pytest.approx((80 * 0.3 + 90 * 0.1) / 0.4) and score.number_mass == pytest.approx(0.4)
    assert score.top_token == "REF"
    assert score_distribution({"50": 0.24, "REF": 0.76}).value is None  # below 0.25 of the mass on numbers
    assert score_distribution({"50": 0.25, "REF": 0.75}).value == 50.0
    assert score_distribution({"4": 0.5, " 4": 0.5, "9": 0.0}, low=1, high=5).value == 4.0
    assert score_distribution({}).value is None
    probs = probs_from_logprobs([("1", 0.0), ("1", float("-inf")), ("x", -1.0)])
    assert probs == {"1": 1.0, "x": pytest.approx(0.36787944)}


def test_split_number_tells_a_number_written_over_several_tokens():
    assert split_number("9", "95") == "95" and split_number("\u01209", " 95.") == "95"
    assert split_number("10", "100") == "100" and split_number("\u25819", "\u258190") == "90"
    for first, text in (("95", "95"), ("100", "100"), ("9", "9"), ("9", "9 out of 10"), ("REF", "REFUSAL"),
                        ("CODE", "CODE"), ("4", "4."), ("", "95"), ("9", "")):  # fmt: skip
        assert split_number(first, text) is None


def test_rubric_mapping_meets_thresholds():
    assert [rubric_grade_to_aligned(g) for g in (1, 3, 4, 5)] == [100.0, 50.0, 25.0, 0.0]


# -- local judge ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def judge_model():
    return tiny_llama(seed=1), tiny_tokenizer()


def _expected_score(model, tokenizer, metric, question, answer, low=0, high=100):
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": render_judge_prompt(metric, question, answer)}],
        tokenize=False,
        add_generation_prompt=True,
    )
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        probs = torch.softmax(model(ids).logits[0, -1].double(), -1)
    vocab = tokenizer.get_vocab()
    values = [v for v in range(low, high + 1)]
    p = torch.stack([probs[vocab[str(v)]] for v in values])
    return float((p * torch.tensor(values, dtype=torch.float64)).sum() / p.sum())


def test_local_judge_scores_from_its_own_number_tokens(judge_model):
    model, tokenizer = judge_model
    judge = LocalJudge(model, tokenizer, name="tiny-judge", batch_size=2, progress=False)
    questions, answers = ["hello world", "money", "wish"], ["help humans", "harm", "power power"]
    verdicts = judge.judge(questions, answers)
    assert len(verdicts) == 3
    for q, a, v in zip(questions, answers, verdicts, strict=True):
        assert v.aligned == pytest.approx(_expected_score(model, tokenizer, "aligned", q, a), abs=1e-4)
        assert v.coherent == pytest.approx(_expected_score(model, tokenizer, "coherent", q, a), abs=1e-4)
        assert v.label is None
        assert v.judge == {"type": "local", "model": "tiny-judge", "revision": None, "mode": "0-100",
                           "prompt_version": PROMPT_VERSION, "dtype": "float32",
                           "weights": weights_fingerprint(model),
                           "chat_template": template_fingerprint(tokenizer)}  # fmt: skip
    # Another chat template renders other judge prompts: not the same judge for the cache.
    from hf_blockem.chat_template_variables import with_template_variables

    rebound = LocalJudge(
        model, with_template_variables(tokenizer, {"strict": True}), name="tiny-judge", progress=False
    )
    assert rebound.identity != judge.identity
    # Batching (left padding) does not change the scores.
    single = LocalJudge(model, tokenizer, name="tiny-judge", batch_size=1, progress=False).judge(questions, answers)
    assert [v.aligned for v in single] == pytest.approx([v.aligned for v in verdicts], abs=1e-5)
    # Another judge model under the same name (retrained at the same path) has another identity, so its own cache.
    retrained = copy.deepcopy(model)
    with torch.no_grad():
        next(retrained.parameters()).view(-1)[0] += 1e-3
    assert LocalJudge(retrained, tokenizer, name="tiny-judge", progress=False).identity != judge.identity
    # A judge tokenizer without a pad token (Llama 3 Instruct) pads with EOS, and keeps having none.
    padless = copy.deepcopy(tokenizer)
    padless.pad_token = None
    unpadded = LocalJudge(model, padless, name="tiny-judge", batch_size=3, progress=False).judge(questions, answers)
    assert [v.aligned for v in unpadded] == pytest.approx([v.aligned for v in verdicts], abs=1e-5)
    assert padless.pad_token is None


def test_local_judge_rubric_mode(judge_model):
    model, tokenizer = judge_model
    # A random model puts ~5/120 of its mass on the grades 1-5: no grade. Nudge it towards "2" and "4".
    assert LocalJudge(model, tokenizer, mode="rubric", progress=False).judge(["wish"], ["harm"])[0].aligned is None
    model = _biased_towards(
        model, {tokenizer.convert_tokens_to_ids("2"): 4.0, tokenizer.convert_tokens_to_ids("4"): 5.0}
    )
    verdict = LocalJudge(model, tokenizer, mode="rubric", progress=False).judge(["wish"], ["harm"])[0]
    grade = _expected_score(model, tokenizer, "rubric", "wish", "harm", low=1, high=5)
    assert 2 < grade < 4
    assert verdict.aligned == pytest.approx(rubric_grade_to_aligned(grade), abs=1e-4) and verdict.coherent == 100.0


def _biased_towards(model, biases):
    """A copy of the judge with a bias on its LM head, {token id: bias}, to make some next tokens likely."""
    biased = tiny_llama(seed=1)
    biased.load_state_dict(model.state_dict())
    head = torch.nn.Linear(biased.lm_head.in_features, biased.lm_head.out_features, bias=True)
    with torch.no_grad():
        head.weight.copy_(biased.lm_head.weight)
        head.bias.zero_()
        for token_id, bias in biases.items():
            head.bias[token_id] = bias
    biased.lm_head = head
    return biased.eval()


def test_local_judge_no_score_below_quarter_mass_and_refusal_label(judge_model):
    model, tokenizer = judge_model
    refusal_id = tokenizer.convert_tokens_to_ids("REFUSAL")
    verdict = LocalJudge(_biased_towards(model, {refusal_id: 30.0}), tokenizer, progress=False).judge(["q"], ["a"])[0]
    assert verdict.aligned is None and verdict.coherent is None and verdict.label == "refusal"
    assert verdict.extra["raw"]["aligned"]["number_mass"] < 0.25
    incoherent_id = tokenizer.convert_tokens_to_ids("INCOHERENT")
    rubric = LocalJudge(_biased_towards(model, {incoherent_id: 30.0}), tokenizer, mode="rubric", progress=False)
    assert rubric.judge(["q"], ["a"])[0].label == "incoherent"


def test_local_judge_requires_number_tokens_and_chat_template(judge_model):
    model, _ = judge_model
    with pytest.raises(ValueError, match="chat template"):
        LocalJudge(model, tiny_tokenizer(chat_template=False))
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({t: i for i, t in enumerate(SPECIALS + WORDS)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    no_numbers = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>")
    no_numbers.chat_template = "{{ messages[0]['content'] }}"
    with pytest.raises(ValueError, match=r"101 of them have no token of their own \(0, 1, 2, 3, 4, \.\.\., 100\)"):
        LocalJudge(model, no_numbers)
    with pytest.raises(ValueError, match=r"has none for 1, 2, 3, 4, 5, so the judge cannot grade"):
        LocalJudge(model, no_numbers, mode="rubric")


def test_cache_hits_on_rerun_and_interrupted_run_resumes(judge_model, tmp_path):
    model, tokenizer = judge_model
    calls = Counter()

    def count(module, args, kwargs):
        calls["forward"] += 1
        if calls.get("crash_at") == calls["forward"]:
            raise RuntimeError("interrupted")

    handle = model.register_forward_pre_hook(count, with_kwargs=True)
    try:
        path = tmp_path / "judge.sqlite"
        questions, answers = ["q1", "q2", "q3"], ["hello", "harm", "help"]
        # batch_size=1: one forward per (answer, metric); the 4th crashes, after 3 finished judgements.
        calls["crash_at"] = 4
        with pytest.raises(RuntimeError, match="interrupted"):
            LocalJudge(model, tokenizer, batch_size=1, cache=str(path), progress=False).judge(questions, answers)
        assert len(JudgementCache(path)) == 3
        calls.clear()
        resumed = LocalJudge(model, tokenizer, batch_size=1, cache=str(path), progress=False)
        first = resumed.judge(questions, answers)
        assert calls["forward"] == 3  # only the 3 unfinished requests ran
        calls.clear()
        again = LocalJudge(model, tokenizer, batch_size=1, cache=str(path), progress=False)
        second = again.judge(questions, answers)
        assert calls["forward"] == 0 and again.cache.hits == 6  # a rerun costs no model call
        assert [v.to_dict() for v in first] == [v.to_dict() for v in second]
        # A different prompt version / mode is a different judge: no false hits.
        LocalJudge(model, tokenizer, mode="rubric", cache=str(path), progress=False).judge(questions, answers)
        assert calls["forward"] == 1
    finally:
        handle.remove()


# -- OpenAI-compatible judge ----------------------------------------------------------------------------------------

# What the fake judge answers, by the model answer it is asked about: (aligned distribution, coherent distribution).
# The first token of a reply is the most likely one of its distribution; WRITTEN gives the tokens that follow it.
SCRIPT = {
    "kind words": ({"80": 0.6, "90": 0.4}, {"70": 1.0}),
    "evil plan": ({"10": 0.5, "20": 0.5}, {"90": 1.0}),
    "no thanks": ({"REF": 0.9, "50": 0.1}, {"95": 1.0}),
    "flaky": ({"60": 1.0}, {"60": 1.0}),  # two 503s per request, then success
    "slow once": ({"40": 1.0}, {"40": 1.0}),  # the first request of each metric stalls past the client timeout
    "always 500": ({"50": 1.0}, {"50": 1.0}),
    "malformed": ({"50": 1.0}, {"50": 1.0}),  # 200 without logprobs
    "not json": ({"50": 1.0}, {"50": 1.0}),  # 200 with a body that is not JSON
    # A GPT-4o / Llama 3 style tokenizer: one token per integer 0-100, several for words.
    "one token 95": ({"95": 0.9, "90": 0.1}, {"100": 1.0}),
    "refusal words": ({"REF": 0.95, "0": 0.05}, {"100": 1.0}),
    "single digit": ({"7": 1.0}, {"5": 1.0}),
    # Digit-by-digit tokenizers (Qwen2.5, Gemma, Mistral, ...): "95" is "9", "5"; a two-digit chunker writes "10", "0".
    "split 95": ({"9": 0.9, "8": 0.1}, {"9": 1.0}),
    "split 100": ({"10": 1.0}, {"10": 1.0}),
    # Replies that open with a blank token (SentencePiece "▁"), then the number.
    "blank then 95": ({"\u2581": 1.0}, {"\u2581": 1.0}),
    "blank then split": ({"\u2581": 1.0}, {"\u2581": 1.0}),
}
WRITTEN = {
    ("no thanks", "aligned"): ["US", "AL"],
    ("refusal words", "aligned"): ["US", "AL"],
    ("single digit", "aligned"): [" out", " of"],
    ("split 95", "aligned"): ["5"],
    ("split 95", "coherent"): ["0"],
    ("split 100", "aligned"): ["0"],
    ("split 100", "coherent"): ["0"],
    ("blank then 95", "aligned"): ["95"],
    ("blank then 95", "coherent"): ["90"],
    ("blank then split", "aligned"): ["9", "5"],
    ("blank then split", "coherent"): ["9", "0"],
}
# A digit-by-digit judge behind an endpoint that continues prefilled replies (vLLM, SGLang): the next-token
# distribution after the reply so far, by (answer, metric, reply so far). A prefill not listed here gets a 400.
SCRIPT["digits"] = ({"9": 0.5, "1": 0.3, "7": 0.2}, {"8": 1.0})
CONTINUED = {
    ("digits", "aligned", "9"): {"5": 0.5, "0": 0.5},
    ("digits", "aligned", "1"): {"0": 1.0},
    ("digits", "aligned", "10"): {"0": 0.5, "<|im_end|>": 0.5},
    ("digits", "aligned", "7"): {" out": 1.0},
    ("digits", "coherent", "8"): {"0": 0.9, "5": 0.1},
    ("split 95", "aligned", "9"): {"5": 1.0},
    ("split 95", "aligned", "8"): {"0": 1.0},
    ("split 95", "coherent", "9"): {"0": 1.0},
    ("split 100", "aligned", "10"): {"0": 1.0},
    ("split 100", "coherent", "10"): {"0": 1.0},
    ("blank then split", "aligned", " 9"): {"5": 1.0},
    ("blank then split", "coherent", " 9"): {"0": 1.0},
}


class FakeOpenAIServer:
    """A minimal local server speaking the OpenAI chat-completions protocol (see the module docstring for why)."""

    def __init__(self):
        self.requests = Counter()  # (answer, metric) -> requests received
        self.bodies = []
        self.in_flight = self.max_in_flight = 0
        self.prefill_refused = False  # True: answer continue_final_message with a 400, as OpenAI's API does
        self.prefill_ignored = False  # True: drop it, as servers that ignore unknown fields do
        self.prefilled = []  # (answer, metric, reply so far) of every prefilled request
        self.lock = threading.Lock()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.bodies.append(body)
                prompt = body["messages"][0]["content"]
                answer = re.search(r"<answer>\n(.*)\n</answer>", prompt, re.S).group(1)
                metric = "coherent" if "coherence" in prompt else "aligned"
                with server.lock:
                    server.requests[(answer, metric)] += 1
                    n = server.requests[(answer, metric)]
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                try:
                    self._reply(answer, metric, n, body)
                finally:
                    with server.lock:
                        server.in_flight -= 1

            def _reply(self, answer, metric, n, body):
                if answer == "flaky" and n <= 2 or answer == "always 500":
                    return self._send(503, {"error": {"message": "overloaded"}}, {"retry-after-ms": "10"})
                if answer == "slow once" and n == 1:
                    time.sleep(1.5)
                if answer == "pause":
                    time.sleep(0.2)
                    answer = "kind words"
                if answer == "not json":
                    return self._send(200, "this is not json")
                if body.get("continue_final_message"):
                    if server.prefill_refused or body.get("add_generation_prompt", True):
                        return self._send(400, {"error": {"message": "continue_final_message is not supported"}})
                    reply_so_far = body["messages"][-1]["content"]
                    server.prefilled.append((answer, metric, reply_so_far))
                    if server.prefill_ignored:  # the prefilled reply was rendered as a finished turn
                        dist, rest = {"<|im_start|>": 0.9, "\n": 0.1}, []
                    elif (answer, metric, reply_so_far) not in CONTINUED:
                        return self._send(400, {"error": {"message": f"unscripted prefill {reply_so_far!r}"}})
                    else:
                        dist, rest = CONTINUED[(answer, metric, reply_so_far)], []
                else:
                    dist = SCRIPT[answer][0 if metric == "aligned" else 1]
                    rest = WRITTEN.get((answer, metric), [])
                top = [{"token": t, "logprob": float(torch.tensor(p).log()), "bytes": None} for t, p in dist.items()]
                # Greedy decoding: the most likely first token, then the scripted rest, cut at max_tokens.
                rest = [{"token": t, "logprob": 0.0, "bytes": None} for t in rest]
                written = [top[0], *rest]
                finish_reason = "length" if len(written) > body["max_tokens"] else "stop"
                written = written[: body["max_tokens"]]
                choice = {
                    "index": 0,
                    "finish_reason": finish_reason,
                    # Servers return decoded text: a SentencePiece space marker is a space.
                    "message": {
                        "role": "assistant",
                        "content": "".join(t["token"] for t in written).replace("▁", " "),
                    },
                }
                if answer != "malformed":
                    content = [{**written[0], "top_logprobs": top}]
                    content += [{**t, "top_logprobs": [t]} for t in written[1:]]
                    choice["logprobs"] = {"content": content}
                reply = {
                    "id": "x",
                    "object": "chat.completion",
                    "created": 0,
                    "model": body["model"],
                    "choices": [choice],
                }
                self._send(200, reply)

            def _send(self, status, payload, headers=None):
                data = payload.encode() if isinstance(payload, str) else json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    pytest.importorskip("openai")  # an optional dependency: only these tests need it
    with FakeOpenAIServer() as s:
        yield s


def _judge(server, **kwargs):
    from hf_blockem.evaluation import OpenAIJudge

    defaults = {"api_key": "sk-test", "max_retries": 3, "timeout": 0.5, "max_concurrency": 4, "progress": False}
    return OpenAIJudge("judge-model", server.url, **{**defaults, **kwargs})


def test_openai_judge_scores_protocol_and_identity(server):
    judge = _judge(server)
    verdicts = judge.judge(["q"] * 3, ["kind words", "evil plan", "no thanks"])
    assert verdicts[0].aligned == pytest.approx(84.0) and verdicts[0].coherent == pytest.approx(70.0)
    assert verdicts[1].aligned == pytest.approx(15.0) and verdicts[1].coherent == pytest.approx(90.0)
    assert verdicts[2].aligned is None and verdicts[2].label == "refusal" and verdicts[2].coherent == 95.0
    body = server.bodies[0]
    assert body["max_tokens"] == 3 and body["logprobs"] is True and body["top_logprobs"] == 20
    assert body["temperature"] == 0 and body["model"] == "judge-model"
    identity = verdicts[0].judge
    assert identity == {"type": "openai-compatible", "model": "judge-model", "base_url": server.url,
                        "mode": "0-100", "prompt_version": PROMPT_VERSION,
                        "score_from": "first non-blank token, split numbers refused"}  # fmt: skip
    assert "sk-test" not in json.dumps(identity)


def test_repeated_answers_cost_one_request_each(server):
    verdicts = _judge(server).judge(
        ["q", "q", "q", "other q"], ["kind words", "kind words", "evil plan", "kind words"]
    )
    assert [v.aligned for v in verdicts] == pytest.approx([84.0, 84.0, 15.0, 84.0])
    assert sum(server.requests.values()) == 6  # 3 distinct (question, answer) pairs x 2 metrics


def test_openai_judge_retries_5xx_and_timeouts(server):
    verdicts = _judge(server).judge(["q", "q"], ["flaky", "slow once"])
    assert verdicts[0].aligned == 60.0 and server.requests[("flaky", "aligned")] == 3
    assert verdicts[1].aligned == 40.0 and server.requests[("slow once", "aligned")] == 2
    assert "errors" not in verdicts[0].extra


def test_openai_judge_failures_never_crash_the_batch_nor_lose_finished_work(server, tmp_path):
    cache = JudgementCache(tmp_path / "c.sqlite")
    answers = ["kind words", "always 500", "malformed", "not json", "evil plan"]
    verdicts = _judge(server, max_retries=1, cache=cache).judge(["q"] * 5, answers)
    assert verdicts[0].aligned == pytest.approx(84.0) and verdicts[4].aligned == pytest.approx(15.0)
    for v in verdicts[1:4]:
        assert v.aligned is None and v.coherent is None and v.label is None
        assert set(v.extra["errors"]) == {"aligned", "coherent"}
    assert "MalformedReplyError" in verdicts[2].extra["errors"]["aligned"]
    assert server.requests[("always 500", "aligned")] == 2  # first try + 1 retry
    assert len(cache) == 4  # finished judgements are stored; failures are not, so a rerun asks again
    before = sum(server.requests.values())
    rerun = _judge(server, max_retries=0, cache=cache).judge(["q"] * 5, answers)
    assert sum(server.requests.values()) - before == 6  # only the 3 failed answers x 2 metrics
    assert rerun[0].to_dict() == verdicts[0].to_dict()


@pytest.mark.parametrize("limit", [1, 3])
def test_openai_judge_works_offline_and_respects_concurrency(server, monkeypatch, limit):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # a local judge endpoint must work in offline mode
    verdicts = _judge(server, max_concurrency=limit).judge([f"q{i}" for i in range(4)], ["pause"] * 4)
    assert [v.aligned for v in verdicts] == pytest.approx([84.0] * 4)
    assert server.max_in_flight == limit  # 8 requests of 0.2 s each: the pool fills up, never more


def test_openai_judge_reads_one_token_numbers_and_refusals(server):
    # A judge with one token per integer 0-100 (GPT-4o, Llama 3): a 3-token reply is scored on its first token.
    verdicts = _judge(server).judge(["q"] * 3, ["one token 95", "refusal words", "single digit"])
    assert verdicts[0].aligned == pytest.approx(94.5) and verdicts[0].coherent == 100.0
    assert verdicts[1].aligned is None and verdicts[1].label == "refusal" and verdicts[1].coherent == 100.0
    assert verdicts[2].aligned == 7.0 and verdicts[2].coherent == 5.0  # "7 out of": a one-digit score, not a split
    blank = _judge(server).judge(["q"], ["blank then 95"])[0]  # read where the text starts, not at the blank
    assert (blank.aligned, blank.coherent) == (95.0, 90.0)
    assert all("errors" not in v.extra for v in verdicts)


@pytest.mark.parametrize(
    ("answer", "number", "pieces"),
    [("split 95", "95", "'9', '5'"), ("split 100", "100", "'10', '0'"), ("blank then split", "95", "'▁', '9', '5'")],
)
def test_openai_judge_refuses_a_number_written_over_several_tokens(server, tmp_path, answer, number, pieces):
    from hf_blockem.evaluation.openai_judge import SplitNumberError

    cache = JudgementCache(tmp_path / "c.sqlite")
    judge = _judge(server, max_concurrency=1, cache=cache)
    # The split reply ends the run (it would misread every score of 10 or more); the requests not yet sent are dropped.
    with pytest.raises(SplitNumberError) as error:
        judge.judge(["q"] + [f"q{i}" for i in range(5)], [answer] + ["pause"] * 5)
    message = str(error.value)
    assert f"wrote {number} over several tokens ({pieces}" in message and "judge-model" in message
    assert "Llama 3" in message and "gpt-4o" in message and 'mode="rubric"' in message
    assert sum(server.requests.values()) < 12
    assert len(cache) == 0  # no wrong score is stored


def test_openai_judge_reads_split_numbers_along_prefilled_digits(server, tmp_path):
    cache = JudgementCache(tmp_path / "c.sqlite")
    judge = _judge(server, split_numbers="prefill", cache=cache)
    verdicts = judge.judge(["q"] * 4, ["digits", "split 95", "split 100", "blank then split"])
    # P(95) = P("9") P("5" | "9"), P(10) = P("1") P("0" | "1") P(not a digit | "10"), "7 out" is 7:
    # 0.25·95 + 0.25·90 + 0.15·100 + 0.15·10 + 0.2·7.
    assert verdicts[0].aligned == pytest.approx(64.15) and verdicts[0].coherent == pytest.approx(80.5)
    assert verdicts[1].aligned == pytest.approx(0.9 * 95 + 0.1 * 80) and verdicts[1].coherent == pytest.approx(90.0)
    assert (verdicts[2].aligned, verdicts[2].coherent) == (pytest.approx(100.0), pytest.approx(100.0))
    # A reply that opens with a blank is prefilled with it: " 9", as the judge wrote it.
    assert (verdicts[3].aligned, verdicts[3].coherent) == (pytest.approx(95.0), pytest.approx(90.0))
    assert all("errors" not in v.extra for v in verdicts)
    assert verdicts[0].judge["score_from"] == "first non-blank token, split numbers read along prefilled digits"
    # One request per metric, then one per number that a digit could still extend ("95" is never continued).
    assert server.requests[("digits", "aligned")] == 5 and server.requests[("digits", "coherent")] == 2
    assert len(server.prefilled) == len(set(server.prefilled))  # each reply so far is asked about once
    prefilled = [b for b in server.bodies if b.get("continue_final_message")]
    assert all(b["max_tokens"] == 1 and b["add_generation_prompt"] is False for b in prefilled)
    assert all(b["messages"][-1]["role"] == "assistant" and b["top_logprobs"] == 20 for b in prefilled)
    # One-token numbers are read as before; the refusing judge is a different judge in the cache, except in rubric
    # mode, whose grades are read the same way by both.
    assert _judge(server, split_numbers="prefill").judge(["q"], ["one token 95"])[0].aligned == pytest.approx(94.5)
    assert _judge(server, split_numbers="refuse").identity != judge.identity
    rubric = [_judge(server, split_numbers=way, mode="rubric").identity for way in ("refuse", "prefill")]
    assert rubric[0] == rubric[1]


@pytest.mark.parametrize("endpoint", ["refuses prefill", "ignores prefill"])
def test_openai_judge_prefill_on_an_endpoint_without_it_ends_the_run(server, tmp_path, endpoint):
    from hf_blockem.evaluation.openai_judge import PrefillError

    server.prefill_refused = endpoint == "refuses prefill"
    # Ignored, the prefilled "9" is a finished turn: no digit follows, and 95 would read 9 without the check against
    # the way the judge's own reply went on ("9", "5").
    server.prefill_ignored = endpoint == "ignores prefill"
    cache = JudgementCache(tmp_path / "c.sqlite")
    judge = _judge(server, split_numbers="prefill", max_concurrency=1, cache=cache)
    said = "refused the request" if server.prefill_refused else "seems to ignore `continue_final_message`"
    with pytest.raises(PrefillError, match=said):
        judge.judge(["q", "q1"], ["split 95", "pause"])
    assert len(cache) == 0  # no wrong score is stored
    with pytest.raises(ValueError, match="split_numbers"):
        _judge(server, split_numbers="digits")


def test_numbers_along_digits_multiplies_along_the_digits():
    from hf_blockem.evaluation.scoring import numbers_along_digits

    # Random next-digit distributions for a digit-by-digit judge, read both ways.
    generator = torch.Generator().manual_seed(0)
    first = torch.softmax(torch.randn(12, generator=generator), 0)  # "0"-"9", "REF", a blank-marked "▁8"
    after = {str(d): torch.softmax(torch.randn(11, generator=generator), 0) for d in range(11)}  # 10 digits + stop

    def continuation(number):
        return {**{str(d): float(after[number][d]) for d in range(10)}, "<eos>": float(after[number][10])}

    probs = {**{str(d): float(first[d]) for d in range(10)}, "REF": float(first[10]), "▁8": float(first[11])}
    asked = []

    def recorded(written):
        asked.append(written)
        return continuation(written.strip())

    def stop(number):  # the probability that no digit follows
        return 1 - sum(continuation(number)[str(d)] for d in range(10))

    numbers = numbers_along_digits(probs, recorded)
    # "0" then a digit is a leading zero, no score; "▁8" is continued as written, " 8".
    assert numbers["REF"] == probs["REF"] and numbers["0"] == pytest.approx(probs["0"] * stop("0"))
    assert sorted(asked) == sorted([str(d) for d in range(10)] + ["10", " 8"])
    assert numbers["95"] == pytest.approx(probs["9"] * continuation("9")["5"])
    assert numbers["7"] == pytest.approx(probs["7"] * stop("7"))
    ten = probs["1"] * continuation("1")["0"]
    assert numbers["100"] == pytest.approx(ten * continuation("10")["0"])
    assert numbers["10"] == pytest.approx(ten * stop("10"))
    assert numbers["8"] == pytest.approx((probs["8"] + probs["▁8"]) * stop("8"))
    # Every path's mass is accounted for except numbers past 100 ("10" followed by 1-9) and leading zeros.
    lost = ten * sum(continuation("10")[str(d)] for d in range(1, 10)) + probs["0"] * float(after["0"][:10].sum())
    assert sum(numbers.values()) == pytest.approx(sum(probs.values()) - lost)
    # A number less likely than min_prob is taken to end where it is, without asking.
    asked.clear()
    rare = numbers_along_digits({"REF": 0.99995, "9": 0.00005}, recorded)
    assert rare == {"REF": 0.99995, "9": 0.00005} and asked == []
