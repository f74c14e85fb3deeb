"""Measuring misalignment under steering: the inner loop of Stages 2 and 3, cached on disk so reruns are free."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..evaluation.generation import Steering, generate_responses
from ..evaluation.judge_base import INCOHERENT, MISALIGNED, Judge
from ..evaluation.metrics import UNSCORED, classify
from ..fingerprints import tokenizer_fingerprint, weights_fingerprint

logger = logging.getLogger(__name__)


@dataclass
class ProbeResult:
    """Shares of misaligned and incoherent answers among the `n` answers the judge scored (`unscored` it could not)."""

    em_rate: float
    incoherence_rate: float
    n: int
    unscored: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class SteeringProbe:
    """Samples answers from one model on a fixed prompt sample, optionally steered, and judges them.

    Results are cached as JSON under `cache_dir`, keyed on the model's `name` and weights (a sampled fingerprint
    of every parameter, adapters included), its tokenizer, the prompts, the sampling settings, the judge's identity and
    the steering (layer, direction bytes, alpha), so an interrupted selection resumes where it stopped and a run on
    another model or adapter never reads its results. Answers the judge could not score (an outage, a quota) are left
    out of the rates and keep the result out of the cache, so a rerun asks again.

    Args:
        model (`PreTrainedModel`): the model to steer.
        tokenizer (`PreTrainedTokenizerBase`): its tokenizer, with a chat template.
        judge (`Judge`): scores the answers.
        prompts (sequence of `str`): the selection prompts.
        name (`str`): a stable name of the model for the cache (for example `"base"` or `"misaligned"`).
        n_samples (`int`, *optional*, defaults to `4`): answers per prompt.
        max_new_tokens (`int`, *optional*, defaults to `64`): answer length limit.
        temperature (`float`, *optional*, defaults to `1.0`): sampling temperature.
        seed (`int`, *optional*, defaults to `0`): sampling seed (the same for every steering, so differences come
            from the steering, not from the draw).
        batch_size (`int`, *optional*, defaults to `64`): sequences per `generate` call.
        cache_dir (`str` or `Path`, *optional*): where to keep results; no caching when `None`.
    """

    model: Any
    tokenizer: Any
    judge: Judge
    prompts: Sequence[str]
    name: str
    n_samples: int = 4
    max_new_tokens: int = 64
    temperature: float = 1.0
    seed: int = 0
    batch_size: int = 64
    cache_dir: str | Path | None = None
    calls: int = field(default=0, init=False)
    _model_fingerprint: list[str | None] | None = field(default=None, init=False, repr=False)

    def _key(self, steering: Sequence[Steering]) -> str:
        if self._model_fingerprint is None:  # once per probe: a large vocabulary takes a while to serialise
            self._model_fingerprint = [weights_fingerprint(self.model), tokenizer_fingerprint(self.tokenizer)]
        digest = hashlib.sha256()
        settings = [self.name, list(self.prompts), self.n_samples, self.max_new_tokens, self.temperature, self.seed]
        identity = [settings, self._model_fingerprint, self.judge.identity]
        digest.update(json.dumps(identity, sort_keys=True, default=str).encode())
        for s in steering:
            digest.update(f"{s.layer}:{float(s.alpha)!r}:".encode())
            digest.update(s.direction.detach().float().cpu().numpy().tobytes())
        return digest.hexdigest()[:32]

    def measure(self, steering: Steering | Sequence[Steering] | None = None) -> ProbeResult:
        steering = [] if steering is None else [steering] if isinstance(steering, Steering) else list(steering)
        path = Path(self.cache_dir) / f"{self.name}-{self._key(steering)}.json" if self.cache_dir else None
        if path is not None and path.exists():
            return ProbeResult(**json.loads(path.read_text())["result"])
        self.calls += 1
        answers = generate_responses(
            self.model,
            self.tokenizer,
            list(self.prompts),
            n_samples=self.n_samples,
            temperature=self.temperature,
            max_new_tokens=self.max_new_tokens,
            batch_size=self.batch_size,
            seed=self.seed,
            steering=steering or None,
            progress=False,
        )
        verdicts = self.judge.judge(list(answers["prompt"]), list(answers["response"]))
        classes = [classify(v) for v in verdicts]
        unscored = classes.count(UNSCORED)
        n = len(classes) - unscored
        if n == 0:
            errors = next((v.extra["errors"] for v in verdicts if v.extra.get("errors")), "no score and no error")
            raise RuntimeError(
                f"Expected the judge {self.judge.identity} to score the {len(classes)} answers of {self.name!r}, it "
                f"scored none (first error: {errors}). Check the judge (endpoint, API key, quota) and run again: "
                "nothing was cached."
            )
        result = ProbeResult(classes.count(MISALIGNED) / n, classes.count(INCOHERENT) / n, n, unscored)
        if unscored:
            logger.warning(
                "The judge could not score %d of %d answers of %s; the rates leave them out and the result is not "
                "cached.",
                unscored,
                len(classes),
                self.name,
            )
        elif path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            steering_record = [{"layer": s.layer, "alpha": float(s.alpha)} for s in steering]
            record = {"result": result.to_dict(), "steering": steering_record, "answers": answers.to_list()}
            path.write_text(json.dumps(record))
        return result
