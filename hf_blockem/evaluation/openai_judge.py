"""A judge behind any OpenAI-compatible chat-completions endpoint (OpenAI, vLLM, llama.cpp server, TGI, ...).

It scores the top-20 log-probabilities of the reply's first token over number tokens. Requests go
through the `openai` client, which retries 5xx, 408/409/429, timeouts and connection errors with exponential backoff
(and honours `Retry-After`); a thread pool bounds the concurrency. The `openai` package is an optional dependency:
`pip install openai`.

The endpoint's tokenizer is unknown, so each request asks for 3 tokens rather than 1: in the 0–100 modes, a reply that
writes its number over several tokens ("9", "5" for 95, as Qwen2 / Qwen2.5, Gemma, Mistral, Llama 2 and SmolLM2 do),
which the first token alone would score 9, raises `SplitNumberError` instead of giving a silent, wrong score. GPT-4o
and the Llama 3 family have one token per integer 0–100; the 1–5 rubric (`mode="rubric"`) works with any tokenizer.

`huggingface_hub.InferenceClient` speaks the same protocol, but it refuses every request, local endpoints included,
while `HF_HUB_OFFLINE=1` is set, which is how evaluation clusters often run; hence the `openai` client.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import Any

from .cache import JudgementCache
from .llm_judge import LogprobJudge
from .scoring import ONE_TOKEN_NUMBERS_ADVICE, parse_number_token, probs_from_logprobs, split_number, strip_markers

TOP_LOGPROBS = 20
# The score reads the first token; the next ones tell a number written over several tokens ("9", "5") from "95".
MAX_TOKENS = 3


class MalformedReplyError(ValueError):
    """The endpoint answered, but not with the log-probabilities a judge needs."""


class SplitNumberError(ValueError):
    """The judge wrote a 0–100 score over several tokens, so a score read from its first token would be wrong.

    Unlike a failed request, it ends the run: every answer scoring 10 or more would be misread.
    """


class OpenAIJudge(LogprobJudge):
    """An LLM judge served by an OpenAI-compatible endpoint.

    The 0–100 modes read the score from the reply's first token, so the judge's tokenizer must write every integer
    0–100 as one token, as GPT-4o's and the Llama 3 family's do. The first reply that writes a number of two or more
    digits over several tokens (Qwen2 / Qwen2.5, Gemma, Mistral, Llama 2, SmolLM2 served by vLLM, ...) raises
    `SplitNumberError` from `judge`; with such a judge, use `mode="rubric"`.

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
        cache: JudgementCache | str | None = None,
        progress: bool = True,
    ):
        super().__init__(mode=mode, cache=cache, progress=progress)
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
        return {
            "type": "openai-compatible",
            "model": self.model,
            "base_url": self.base_url,
            "score_from": "first non-blank token, split numbers refused",
        }

    def _request(self, prompt: str) -> dict[str, float]:
        reply = self._client.chat.completions.create(
            model=self.model,
            messages=[{"role": "user", "content": prompt}],
            max_tokens=MAX_TOKENS,
            temperature=0,
            logprobs=True,
            top_logprobs=TOP_LOGPROBS,
            seed=0,
        )
        try:
            choice = reply.choices[0]
            tokens = choice.logprobs.content
            # A reply may open with blank tokens (" 95" as "▁", "9", "5"): the score is read where its text starts.
            first = next((t for t in tokens if strip_markers(t.token)), tokens[0])
            pairs = [(t.token, t.logprob) for t in first.top_logprobs] or [(first.token, first.logprob)]
            text = choice.message.content
            if text is None:
                text = "".join(t.token for t in tokens)
        except (AttributeError, IndexError, TypeError) as err:
            raise MalformedReplyError(
                f"Expected a reply with choices[0].logprobs.content[0].top_logprobs, got {str(reply)[:300]}. Check "
                "that the endpoint supports `logprobs` / `top_logprobs` (vLLM and OpenAI do)."
            ) from err
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
                if error is not None and (not isinstance(error, Exception) or isinstance(error, SplitNumberError)):
                    pool.shutdown(wait=False, cancel_futures=True)
                    raise error
                yield futures[future], (error if error is not None else future.result())
