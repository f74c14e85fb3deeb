"""A judge that runs any Hugging Face chat model locally, with the same prompts and scoring as the API judges.

The score is the probability-weighted mean over the judge tokenizer's own number tokens (every token that decodes to
an integer 0–100, whatever its space marker), read from the full next-token distribution rather than a top-20 list.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from ..fingerprints import weights_fingerprint
from ..padding import padding
from .cache import JudgementCache
from .llm_judge import LogprobJudge
from .scoring import parse_number_token

_TOP_OTHER_TOKENS = 5  # non-number tokens kept, to recognise a REFUSAL / INCOHERENT answer


class LocalJudge(LogprobJudge):
    """An LLM judge running a local Hugging Face chat model.

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
        config = getattr(model, "config", None)
        self._commit = getattr(config, "_commit_hash", None)
        # The cache is keyed on the judge's identity: a retrained judge at the same path, or the same one in another
        # dtype, must not be served the old judgements.
        self._weights = weights_fingerprint(model)
        self._dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
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
        if len(self._number_ids[100]) == 0:
            raise ValueError(
                f"The judge tokenizer {type(tokenizer).__name__} has no token that decodes to an integer 0–100, so "
                "it cannot give a score. Use a judge model whose vocabulary has number tokens."
            )

    def _identity_fields(self) -> dict[str, Any]:
        return {
            "type": "local",
            "model": self.name,
            "revision": self._commit,
            "dtype": self._dtype,
            "weights": self._weights,
        }

    def _next_token_probs(self, texts: list[str]) -> torch.Tensor:
        tokenizer, model = self.tokenizer, self.model
        was_training = model.training
        # Left padding: the next-token distribution is read at the last position of every row.
        try:
            with padding(tokenizer, "left"):
                inputs = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
            model.eval()
            inputs = inputs.to(next(model.parameters()).device)
            with torch.inference_mode():
                logits = model(**inputs).logits[:, -1, :]
            return torch.softmax(logits.float(), dim=-1).cpu()
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
            probs = self._next_token_probs(rendered[start : start + self.batch_size])
            for row, p in enumerate(probs):
                dist: dict[str, float] = {}
                for value, prob in zip(values, p[number_ids].tolist(), strict=True):
                    dist[str(value)] = dist.get(str(value), 0.0) + prob
                others = p.clone()
                others[number_ids] = 0
                top = torch.topk(others, min(_TOP_OTHER_TOKENS, others.numel()))
                for prob, token_id in zip(top.values.tolist(), top.indices.tolist(), strict=True):
                    text = self.tokenizer.decode([token_id])
                    dist[text] = dist.get(text, 0.0) + prob
                yield start + row, dist
