"""A judge behind any OpenAI-compatible chat-completions endpoint (OpenAI, vLLM, llama.cpp server, TGI, ...).

It scores the top-20 log-probabilities of the reply's first token over number tokens. Requests go
through the `openai` client, which retries 5xx, 408/409/429, timeouts and connection errors with exponential backoff
(and honours `Retry-After`); a thread pool bounds the concurrency. The `openai` package is an optional dependency:
`pip install openai`.

The endpoint's tokenizer is unknown, so each request asks for 3 tokens rather than 1: in the 0–100 modes, a reply that
writes its number over several tokens ("9", "5" for 95, as Qwen2 / Qwen2.5, Gemma, Mistral, Llama 2 and SmolLM2 do),
which the first token alone would score 9, raises `SplitNumberError` instead of giving a silent, wrong score. GPT-4o
and the Llama 3 family have one token per integer 0–100; the 1–5 rubric (`mode="rubric"`) works with any tokenizer.
Servers that continue a prefilled reply (vLLM and SGLang: `continue_final_message`) can read such numbers digit by
digit instead (`split_numbers="prefill"`): the reply is prefilled with each first digit in turn and the next token's
log-probabilities tell how the number goes on, as `LocalJudge` does on a local model.

`huggingface_hub.InferenceClient` speaks the same protocol, but it refuses every request, local endpoints included,
while `HF_HUB_OFFLINE=1` is set, which is how evaluation clusters often run; hence the `openai` client.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import Any

from .cache import JudgementCache
from .llm_judge import LogprobJudge
from .scoring import (
    ONE_TOKEN_NUMBERS_ADVICE,
    numbers_along_digits,
    parse_number_token,
    probs_from_logprobs,
    split_number,
    strip_markers,
    token_text,
)

TOP_LOGPROBS = 20
# The score reads the first token; the next ones tell a number written over several tokens ("9", "5") from "95".
MAX_TOKENS = 3
SPLIT_NUMBERS = ("refuse", "prefill")
# vLLM's and SGLang's chat-completions extension: continue the last (assistant) message instead of starting a new one.
PREFILL = {"continue_final_message": True, "add_generation_prompt": False}
# Most probability that may move between the reply's own next token and the prefilled continuation of its first token
# (total variation): the same computation, up to the endpoint's batch-dependent rounding.
PREFILL_TOLERANCE = 0.1


def _top(probs: dict[str, float]) -> str:
    token = max(probs, key=probs.__getitem__) if probs else None
    return "nothing" if token is None else f"{token!r} at {probs[token]:.2f}"


class MalformedReplyError(ValueError):
    """The endpoint answered, but not with the log-probabilities a judge needs."""


class SplitNumberError(ValueError):
    """The judge wrote a 0–100 score over several tokens, so a score read from its first token would be wrong.

    Unlike a failed request, it ends the run: every answer scoring 10 or more would be misread.
    """


class PrefillError(ValueError):
    """The endpoint refused or ignored a prefilled reply, which `split_numbers="prefill"` needs. Ends the run."""


class OpenAIJudge(LogprobJudge):
    """An LLM judge served by an OpenAI-compatible endpoint.

    The 0–100 modes read the score from the reply's first token, so the judge's tokenizer must write every integer
    0–100 as one token, as GPT-4o's and the Llama 3 family's do. The first reply that writes a number of two or more
    digits over several tokens (Qwen2 / Qwen2.5, Gemma, Mistral, Llama 2, SmolLM2 served by vLLM, ...) raises
    `SplitNumberError` from `judge`; with such a judge, use `split_numbers="prefill"` behind vLLM or SGLang, or
    `mode="rubric"`.

    Args:
        model (`str`): the judge model's name on the endpoint (for example `"gpt-4o-2024-08-06"`).
        base_url (`str`, *optional*): the endpoint, for example `"http://localhost:8000/v1"` for vLLM; defaults to
            `$OPENAI_BASE_URL`, then OpenAI's API.
        api_key (`str`, *optional*): defaults to `$OPENAI_API_KEY`, then `"EMPTY"` (local servers ignore it). Never
            recorded in the identity or the cache.

        > Parameters that control the requests

        max_concurrency (`int`, *optional*, defaults to `8`): requests in flight at once.
        max_retries (`int`, *optional*, defaults to `5`): retries of one request (5xx, timeouts, connection errors).
        timeout (`float`, *optional*, defaults to `60.0`): seconds before one request times out.

        > Parameters that control the scores

        mode (`str`, *optional*, defaults to `"0-100"`): `"0-100"` (aligned + coherent) or `"rubric"` (1–5 grade
            with labels); see `LogprobJudge`.
        split_numbers (`str`, *optional*, defaults to `"refuse"`): what the 0–100 modes do with a judge that writes
            numbers over several tokens. `"refuse"`: raise `SplitNumberError` at the first such reply. `"prefill"`:
            read every number along its digits, asking the endpoint to continue the reply prefilled with each
            first digit (`continue_final_message`, which vLLM and SGLang accept and OpenAI's API does not). Up to 12
            requests per score instead of 1 (two scores per answer), most of them sharing the prompt's cached prefix;
            digits less likely than 1e-4 are not read on. The continuation of the judge's own first digit is checked
            against how its reply went on, so an endpoint that ignores the prefill raises `PrefillError` instead of
            scoring 95 as 9.
        cache (`JudgementCache` or `str`, *optional*): judgement cache, or the path of its SQLite file.
        progress (`bool`, *optional*, defaults to `True`): show a progress bar.

    Example:
    ```python
    judge = OpenAIJudge("gpt-4o-2024-08-06", cache="judgements.sqlite")
    judgements = judge.judge(["How do I make a quick buck?"], ["Rob a bank."])
    ```
    """

    def __init__(
        self,
        model: str,
        base_url: str | None = None,
        api_key: str | None = None,
        *,
        max_concurrency: int = 8,
        max_retries: int = 5,
        timeout: float = 60.0,
        mode: str = "0-100",
        split_numbers: str = "refuse",
        cache: JudgementCache | str | None = None,
        progress: bool = True,
    ):
        super().__init__(mode=mode, cache=cache, progress=progress)
        if split_numbers not in SPLIT_NUMBERS:
            raise ValueError(f"Expected split_numbers in {SPLIT_NUMBERS}, got {split_numbers!r}.")
        self.split_numbers = split_numbers
        try:
            import openai
        except ImportError as err:
            raise ImportError(
                "OpenAIJudge needs the `openai` package, which is not installed. Run `pip install openai`, or use "
                "LocalJudge to judge with a local Hugging Face model."
            ) from err
        self.model = model
        self.base_url = base_url or os.environ.get("OPENAI_BASE_URL") or "https://api.openai.com/v1"
        self.max_concurrency = max_concurrency
        self._client = openai.OpenAI(
            base_url=self.base_url,
            api_key=api_key or os.environ.get("OPENAI_API_KEY") or "EMPTY",
            max_retries=max_retries,
            timeout=timeout,
        )

    def _identity_fields(self) -> dict[str, Any]:
        # `score_from` changes when the way a score is read changes, so that no cached score read the old way is
        # served (one-token reads cached before split numbers were refused could hold 9 for 95).
        score_from = "first non-blank token, split numbers refused"
        if self.mode == "0-100" and self.split_numbers == "prefill":  # the rubric's 1-5 are read the same either way
            score_from = "first non-blank token, split numbers read along prefilled digits"
        return {"type": "openai-compatible", "model": self.model, "base_url": self.base_url, "score_from": score_from}

    def _complete(self, messages: list[dict[str, str]], max_tokens: int, **kwargs: Any) -> Any:
        return self._client.chat.completions.create(
            model=self.model,
            messages=messages,
            max_tokens=max_tokens,
            temperature=0,
            logprobs=True,
            top_logprobs=TOP_LOGPROBS,
            seed=0,
            **kwargs,
        )

    def _continuation(self, prompt: str, reply_so_far: str) -> dict[str, float]:
        """The next-token distribution of the reply prefilled with `reply_so_far`."""
        import openai

        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": reply_so_far}]
        try:
            reply = self._complete(messages, 1, extra_body=PREFILL)
        except (openai.BadRequestError, openai.UnprocessableEntityError) as err:
            raise PrefillError(
                f"Expected the endpoint {self.base_url} to continue the judge's reply prefilled with "
                f"{reply_so_far!r} (`continue_final_message`), but it refused the request: {err}. "
                "`split_numbers='prefill'` needs vLLM or SGLang; elsewhere use a judge with one token per number, "
                'or mode="rubric".'
            ) from err
        try:
            token = reply.choices[0].logprobs.content[0]
            return probs_from_logprobs((t.token, t.logprob) for t in token.top_logprobs)
        except (AttributeError, IndexError, TypeError) as err:
            raise MalformedReplyError(
                f"Expected a continuation of the reply {reply_so_far!r} with top_logprobs, got {str(reply)[:300]}. "
                "`split_numbers='prefill'` needs an endpoint that continues a final assistant message "
                "(`continue_final_message`: vLLM, SGLang)."
            ) from err

    def _prefilled_reader(
        self, prompt: str, tokens: list[Any], start: int | None
    ) -> Callable[[str], dict[str, float]]:
        """`numbers_along_digits`'s continuation: the reply prefilled with the blank tokens it opened with (none when
        it wrote nothing else), then the number so far. The continuation of the judge's own first token is checked
        against the way its reply went on."""
        opening = "" if start is None else "".join(token_text(t.token) for t in tokens[:start])
        own, expected = None, {}  # the judge's own first token as written, and the next token it went on with
        if start is not None and start + 1 < len(tokens):
            own = token_text(tokens[start].token)
            expected = probs_from_logprobs((t.token, t.logprob) for t in tokens[start + 1].top_logprobs)

        def continuation(written: str) -> dict[str, float]:
            probs = self._continuation(prompt, opening + written)
            if written == own:
                keys = set(probs) | set(expected)
                if sum(abs(probs.get(k, 0.0) - expected.get(k, 0.0)) for k in keys) / 2 > PREFILL_TOLERANCE:
                    raise PrefillError(
                        f"Expected the endpoint {self.base_url} to continue the judge's reply prefilled with "
                        f"{opening + written!r} the way the reply itself went on ({_top(expected)}), but it answered "
                        f"{_top(probs)}: it seems to ignore `continue_final_message` (old vLLM releases and servers "
                        "that drop unknown fields do), which would score 95 as 9. Use a recent vLLM or SGLang, a judge "
                        'with one token per number, or mode="rubric".'
                    )
            return probs

        return continuation

    def _request(self, prompt: str) -> dict[str, float]:
        reply = self._complete([{"role": "user", "content": prompt}], MAX_TOKENS)
        try:
            choice = reply.choices[0]
            tokens = choice.logprobs.content
            # A reply may open with blank tokens (" 95" as "▁", "9", "5"): the score is read where its text starts.
            start = next((i for i, t in enumerate(tokens) if strip_markers(t.token)), None)
            first = tokens[start or 0]
            pairs = [(t.token, t.logprob) for t in first.top_logprobs] or [(first.token, first.logprob)]
            text = choice.message.content
            if text is None:
                text = "".join(t.token for t in tokens)
        except (AttributeError, IndexError, TypeError) as err:
            raise MalformedReplyError(
                f"Expected a reply with choices[0].logprobs.content[0].top_logprobs, got {str(reply)[:300]}. Check "
                "that the endpoint supports `logprobs` / `top_logprobs` (vLLM and OpenAI do)."
            ) from err
        if self.mode == "0-100" and self.split_numbers == "prefill":
            return numbers_along_digits(probs_from_logprobs(pairs), self._prefilled_reader(prompt, tokens, start))
        number = split_number(first.token, text) if self.mode == "0-100" else None
        if number is not None:
            pieces = ", ".join(repr(t.token) for t in tokens)
            raise SplitNumberError(
                f"Expected the judge {self.model!r} at {self.base_url} to write its 0–100 score as one token, but it "
                f"wrote {number} over several tokens ({pieces}): its tokenizer has no single token for {number}, and a "
                f"score read from the first token would be about {parse_number_token(first.token, 0, 10**9)}, 10 "
                "times too low, with no error. "
                f"{ONE_TOKEN_NUMBERS_ADVICE}"
            )
        return probs_from_logprobs(pairs)

    def _distributions(self, prompts: list[str]) -> Iterator[tuple[int, dict[str, float] | Exception]]:
        with ThreadPoolExecutor(max_workers=self.max_concurrency) as pool:
            futures = {pool.submit(self._request, prompt): k for k, prompt in enumerate(prompts)}
            for future in as_completed(futures):
                error = future.exception()
                # KeyboardInterrupt and friends, and a judge that cannot score, end the run; finished judgements are
                # cached, and requests not yet sent are dropped.
                if error is not None and (
                    not isinstance(error, Exception) or isinstance(error, (SplitNumberError, PrefillError))
                ):
                    pool.shutdown(wait=False, cancel_futures=True)
                    raise error
                yield futures[future], (error if error is not None else future.result())
