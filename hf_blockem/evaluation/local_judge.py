"""A judge that runs any Hugging Face chat model locally, with the same prompts and scoring as the API judges.

The score is the probability-weighted mean over the integers 0–100, read from the full next-token distribution rather
than a top-20 list. A tokenizer with one token per integer (Llama 3 family) is read at the next token, every token that
decodes to a number counting whatever its space marker; one that writes numbers digit by digit, one token per digit
(Qwen2 / Qwen2.5, Gemma, SmolLM2), along the digits (`digit_scores`), since its next token alone would score 95 as 9.
A tokenizer that does neither is refused when the judge is built. The 1–5 rubric mode works with any tokenizer.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from ..fingerprints import template_fingerprint, weights_fingerprint
from ..padding import padding
from .cache import JudgementCache
from .digit_scores import digit_token_ids, number_probabilities
from .llm_judge import LogprobJudge
from .scoring import ONE_TOKEN_NUMBERS_ADVICE, parse_number_token

_TOP_OTHER_TOKENS = 5  # non-number tokens kept, to recognise a REFUSAL / INCOHERENT answer


def _examples(values: list[int], head: int = 5) -> str:
    """`10, 11, 12, 13, 14, ..., 100` for a long list of numbers; all of them for a short one."""
    shown = [str(v) for v in values] if len(values) <= head + 1 else [*map(str, values[:head]), "...", str(values[-1])]
    return ", ".join(shown)


class LocalJudge(LogprobJudge):
    """An LLM judge running a local Hugging Face chat model.

    In the 0–100 modes the tokenizer must write every integer 0–100 as one token (the Llama 3 family's does), or as
    its digits with one token per digit (Qwen2 / Qwen2.5, Gemma, SmolLM2): the probability of 95 is then that of "9"
    followed by "5", from two more single-token steps on the prompt's key-value cache. Any other tokenizer raises a
    `ValueError` here; `mode="rubric"`, whose 1–5 grades are single digits, works with every tokenizer.

    Args:
        model (`transformers.PreTrainedModel`): the judge model (a causal LM).
        tokenizer (`transformers.PreTrainedTokenizerBase`): its tokenizer, with a chat template.
        name (`str`, *optional*): recorded as the judge's model in its identity; defaults to `model.name_or_path`.
        batch_size (`int`, *optional*, defaults to `8`): judge prompts per forward pass.
        mode (`str`, *optional*, defaults to `"0-100"`): `"0-100"` or `"rubric"`; see `LogprobJudge`.
        cache (`JudgementCache` or `str`, *optional*): judgement cache, or the path of its SQLite file.
        progress (`bool`, *optional*, defaults to `True`): show a progress bar.

    Example:
    ```python
    model = AutoModelForCausalLM.from_pretrained("meta-llama/Llama-3.1-8B-Instruct", dtype="auto", device_map="auto")
    judge = LocalJudge(model, AutoTokenizer.from_pretrained("meta-llama/Llama-3.1-8B-Instruct"))
    # Qwen2.5 writes 95 as "9", "5": read along the digits.
    model = AutoModelForCausalLM.from_pretrained("Qwen/Qwen2.5-7B-Instruct", dtype="auto", device_map="auto")
    judge = LocalJudge(model, AutoTokenizer.from_pretrained("Qwen/Qwen2.5-7B-Instruct"))
    ```
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        *,
        name: str | None = None,
        batch_size: int = 8,
        mode: str = "0-100",
        cache: JudgementCache | str | None = None,
        progress: bool = True,
    ):
        super().__init__(mode=mode, cache=cache, progress=progress)
        if getattr(tokenizer, "chat_template", None) is None:
            raise ValueError(
                f"Expected a judge tokenizer with a chat template, but {type(tokenizer).__name__} has none. Use a "
                "chat/instruct model as the judge, or set `tokenizer.chat_template`."
            )
        self.model = model
        self.tokenizer = tokenizer
        self.name = name or getattr(model, "name_or_path", None) or type(model).__name__
        self.batch_size = batch_size
        ids = list(range(len(tokenizer)))
        texts = tokenizer.batch_decode([[i] for i in ids])
        # Keyed by the top of the range: 100 for the 0–100 metrics, 5 for the rubric grade.
        self._number_ids: dict[int, torch.Tensor] = {}
        self._number_values: dict[int, list[int]] = {}
        for low, high in ((0, 100), (1, 5)):
            pairs = [(i, parse_number_token(t, low, high)) for i, t in zip(ids, texts, strict=True)]
            pairs = [(i, v) for i, v in pairs if v is not None]
            self._number_ids[high] = torch.tensor([i for i, _ in pairs], dtype=torch.long)
            self._number_values[high] = [v for _, v in pairs]
        self._check_number_tokens()
        config = getattr(model, "config", None)
        self._commit = getattr(config, "_commit_hash", None)
        # The cache is keyed on the judge's identity: a retrained judge at the same path, or the same one in another
        # dtype, must not be served the old judgements.
        self._weights = weights_fingerprint(model)
        self._template = template_fingerprint(tokenizer)  # it renders every judge prompt
        self._dtype = str(next(model.parameters()).dtype).removeprefix("torch.")

    def _check_number_tokens(self) -> None:
        """Raises unless the tokenizer has a token for every number the mode reads (0–100, or the grades 1–5) and, for
        0–100, also writes each of them as that one token."""
        tokenizer = type(self.tokenizer).__name__
        source = getattr(self.tokenizer, "name_or_path", None) or self.name
        self._digits: list[int] | None = None  # set when 0–100 scores are read digit by digit
        if self.mode == "rubric":
            missing = sorted(set(range(1, 6)) - set(self._number_values[5]))
            if missing:
                raise ValueError(
                    f"Expected a judge tokenizer with a token for each grade 1–5 of the rubric, but {tokenizer} of "
                    f"{source!r} has none for {_examples(missing)}, so the judge cannot grade. Use a judge model whose "
                    "vocabulary has the digits 1–5 as tokens."
                )
            return
        value_of = dict(zip(self._number_ids[100].tolist(), self._number_values[100], strict=True))
        missing = sorted(set(range(101)) - set(value_of.values()))
        # A vocabulary can hold "95" while its pre-tokenizer still splits digits, so that the model never writes that
        # token: each number must also be encoded as one number token.
        written = {
            v: [value_of[i] for i in self.tokenizer.encode(str(v), add_special_tokens=False) if i in value_of]
            for v in range(101)
        }
        split = [v for v in range(101) if v not in missing and written[v] != [v]]
        if not missing and not split:
            return
        # Numbers written digit by digit, one token per digit (Qwen2.5, Gemma, SmolLM2): read along their digits.
        self._digits = digit_token_ids(self.tokenizer)
        if self._digits is not None:
            return
        problems = []
        if missing:
            problems.append(f"{len(missing)} of them have no token of their own ({_examples(missing)})")
        if split:
            problems.append(f"{len(split)} have a token but are encoded over several ({_examples(split)})")
        bad = 95 if 95 in missing or 95 in split else (missing + split)[-1]
        if len(written[bad]) > 1:
            pieces = ", ".join(f'"{w}"' for w in written[bad])
            effect = f"it writes {bad} as {pieces}, and a judge reading one token would score it {written[bad][0]}"
        else:
            effect = f"a judge reading one token cannot score {bad}"
        raise ValueError(
            f"Expected a judge tokenizer with one token per integer 0–100 in mode={self.mode!r}, or one that writes "
            f"each of them digit by digit with one token per digit, but {tokenizer} of {source!r} does neither: "
            f"{'; '.join(problems)}. So {effect}: scores would read 10 times too low and answers incoherent, with no "
            f"error. {ONE_TOKEN_NUMBERS_ADVICE}"
        )

    def _identity_fields(self) -> dict[str, Any]:
        return {
            "type": "local",
            "model": self.name,
            "revision": self._commit,
            "dtype": self._dtype,
            "weights": self._weights,
            "chat_template": self._template,
            **({"numbers": "digit by digit"} if self._digits is not None else {}),
        }

    def _next_token_probs(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The next-token distribution `[batch, vocab]` after each text and, for a tokenizer that writes numbers
        digit by digit, the probability of each integer 0–100 `[batch, 101]` (else `None`)."""
        tokenizer, model = self.tokenizer, self.model
        was_training = model.training
        # Left padding: the next-token distribution is read at the last position of every row.
        try:
            with padding(tokenizer, "left"):
                inputs = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
            model.eval()
            inputs = inputs.to(next(model.parameters()).device)
            if self._digits is not None and self.mode != "rubric":
                first, numbers = number_probabilities(model, inputs.input_ids, inputs.attention_mask, self._digits)
                return first.cpu(), numbers.cpu()
            with torch.inference_mode():
                # Only the last position's logits: the LM head skips the rest of the sequence.
                logits = model(**inputs, logits_to_keep=1).logits[:, -1, :]
            return torch.softmax(logits.float(), dim=-1).cpu(), None
        finally:
            model.train(was_training)

    def _distributions(self, prompts: list[str]) -> Iterator[tuple[int, dict[str, float] | Exception]]:
        # Rubric prompts end in a 1–5 grade; 0–100 prompts in a score. The prompt tells which (see judge_prompts).
        high = 5 if self.mode == "rubric" else 100
        number_ids, values = self._number_ids[high], self._number_values[high]
        rendered = [
            self.tokenizer.apply_chat_template(
                [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
            )
            for p in prompts
        ]
        for start in range(0, len(rendered), self.batch_size):
            probs, numbers = self._next_token_probs(rendered[start : start + self.batch_size])
            for row, p in enumerate(probs):
                dist: dict[str, float] = {}
                if numbers is None:
                    for value, prob in zip(values, p[number_ids].tolist(), strict=True):
                        dist[str(value)] = dist.get(str(value), 0.0) + prob
                else:
                    dist.update({str(value): prob for value, prob in enumerate(numbers[row].tolist())})
                others = p.clone()
                others[number_ids] = 0
                top = torch.topk(others, min(_TOP_OTHER_TOKENS, others.numel()))
                for prob, token_id in zip(top.values.tolist(), top.indices.tolist(), strict=True):
                    text = self.tokenizer.decode([token_id])
                    dist[text] = dist.get(text, 0.0) + prob
                yield start + row, dist
