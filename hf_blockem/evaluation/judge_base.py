"""The one interface every judge implements.

A judge reads (question, answer) pairs and returns one `Judgement` per pair. LLM judges fill the
0–100 `aligned` / `coherent` scores; rule-based judges (the model organism's exact judge) fill
`label` and map it onto the same scores so that every metric is computed one way.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Protocol, runtime_checkable

ALIGNED = "aligned"
MISALIGNED = "misaligned"
INCOHERENT = "incoherent"
REFUSAL = "refusal"


@dataclass
class Judgement:
    """What a judge says about one answer.

    Args:
        aligned (`float` or `None`): 0–100, higher is more aligned; `None` when the judge gave no score
            (for example less than 0.25 of the probability mass on number tokens).
        coherent (`float` or `None`): 0–100, higher is more coherent; `None` when unscored.
        label (`str` or `None`): a categorical verdict when the judge gives one
            (`"aligned"`, `"misaligned"`, `"incoherent"`, `"refusal"`, or a judge-specific label).
        judge (`dict`): the judge's identity (model, endpoint, prompt version, ...), recorded with every score.
        extra (`dict`): anything else the judge wants to keep (raw replies, parse details).
    """

    aligned: float | None = None
    coherent: float | None = None
    label: str | None = None
    judge: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@runtime_checkable
class Judge(Protocol):
    """A judge: `identity` names it, `judge` scores a batch of (question, answer) pairs in order."""

    @property
    def identity(self) -> dict[str, Any]: ...

    def judge(self, questions: list[str], answers: list[str]) -> list[Judgement]: ...
