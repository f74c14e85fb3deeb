"""Stage 2: the causal screen. Does steering along a candidate's decoder direction induce and repair misalignment?

A candidate latent k with sign s_k (+1 when Δ_k > 0, −1 when Δ_k < 0) points in the misaligned direction s_k·d_k,
where d_k is its SAE decoder row. *Induce*: add +α·s_k·d_k to the base model (does misalignment appear?). *Repair*:
add −α·s_k·d_k to the misaligned model (does misalignment drop?). α is measured in units of the latent's own typical
activation, so one multiplier means the same thing for every latent.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from ..evaluation.generation import Steering
from .probe import ProbeResult, SteeringProbe


@dataclass
class Candidate:
    """A latent from the Stage-1 pool.

    Args:
        latent (`int`): SAE latent id.
        sign (`int`): +1 (candidate for K+) or −1 (K−), the sign of Δ_k.
        delta (`float`): Δ_k.
        scale (`float`): its typical activation (mean over the misaligned answers' tokens where it fires), the unit
            of steering strength.
        direction (`torch.Tensor`): its SAE decoder row `W_dec[k]`.
    """

    latent: int
    sign: int
    delta: float
    scale: float
    direction: torch.Tensor = field(repr=False)

    def steering(self, layer: int, multiplier: float, toward_misaligned: bool) -> Steering:
        alpha = multiplier * self.scale * self.sign * (1.0 if toward_misaligned else -1.0)
        return Steering(layer=layer, direction=self.direction, alpha=alpha)


@dataclass
class ScreenResult:
    """Stage-2 outcome of one candidate at one steering multiplier."""

    candidate: Candidate
    multiplier: float
    induce: ProbeResult | None
    repair: ProbeResult

    def induction(self, base: ProbeResult) -> float:
        return 0.0 if self.induce is None else self.induce.em_rate - base.em_rate

    def repair_gain(self, misaligned: ProbeResult) -> float:
        return misaligned.em_rate - self.repair.em_rate

    def to_dict(self, base: ProbeResult, misaligned: ProbeResult) -> dict[str, Any]:
        return {
            "latent": self.candidate.latent,
            "sign": self.candidate.sign,
            "delta": self.candidate.delta,
            "multiplier": self.multiplier,
            "induce": None if self.induce is None else self.induce.to_dict(),
            "repair": self.repair.to_dict(),
            "induction": self.induction(base),
            "repair_gain": self.repair_gain(misaligned),
        }


def screen_candidates(
    candidates: Sequence[Candidate],
    layer: int,
    base_probe: SteeringProbe,
    misaligned_probe: SteeringProbe,
    *,
    multiplier: float = 4.0,
    induce: bool = True,
    progress: bool = True,
) -> list[ScreenResult]:
    """Steers each candidate once toward misalignment on the base model and once away from it on the misaligned one."""
    results = []
    for candidate in tqdm(candidates, disable=not progress, desc=f"screen layer {layer}"):
        induced = base_probe.measure(candidate.steering(layer, multiplier, toward_misaligned=True)) if induce else None
        repaired = misaligned_probe.measure(candidate.steering(layer, multiplier, toward_misaligned=False))
        results.append(ScreenResult(candidate, multiplier, induced, repaired))
    return results


def keep_causal(
    results: Sequence[ScreenResult], base: ProbeResult, misaligned: ProbeResult, *, require_induction: bool = True
) -> list[ScreenResult]:
    """The shortlist: candidates with non-zero repair, and non-zero induction unless `require_induction=False`."""
    return [r for r in results if r.repair_gain(misaligned) > 0 and (not require_induction or r.induction(base) > 0)]
