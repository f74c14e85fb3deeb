"""Stage 3: per-latent strength calibration under an incoherence budget, ranking, and the K+ / K− split.

For each shortlisted latent, sweep the steering multiplier upwards; its calibrated strength is the largest one below
the first whose answers break the incoherence budget: at most `budget` (default 10 points) more incoherent answers
than the same model unsteered. (Measured against the unsteered model by default, because an emergently misaligned
model is often somewhat incoherent already and steering is charged only for the incoherence it adds; `relative=False`
is the paper's code's absolute rule, at most `budget` of all answers incoherent.) Incoherence grows with the strength,
so a larger strength that passes again after one that broke the budget did so by sampling luck, and would be ranked on
a repair bought with incoherence. The strengths above the first that breaks it are therefore not measured
(`full_sweep=True` measures them for the plots), which saves a generation and a judging pass per strength, latent and
model.

Repair efficiency = EM of the misaligned model at α = 0 minus its EM when steered away at the calibrated strength. The
shortlist (Stage 2's survivors) is ranked by repair efficiency and the top N are kept, as in the paper's main
procedure; N is the most kept, because a latent whose calibrated strength does not lower EM (or which has no strength
inside the budget) has shown nothing to block. With `prefilter=True` and the `"induce_and_repair"` rule a latent must
also show non-zero induction at its calibrated strength, the paper's stricter variant; with a few dozen answers per
measurement that pre-filter mostly tests sampling noise.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from tqdm.auto import tqdm

from .probe import ProbeResult, SteeringProbe
from .screen import Candidate

RULES = ("induce_and_repair", "repair_only")


@dataclass
class Calibration:
    """Stage-3 sweep of one latent."""

    candidate: Candidate
    multipliers: list[float]
    repair: list[ProbeResult]  # repair[i] at multipliers[i]; shorter when the sweep stopped at the budget
    induce: list[ProbeResult] | None
    budget: float
    base: ProbeResult
    misaligned: ProbeResult
    relative: bool = True  # the budget adds to the unsteered model's incoherence (False: an absolute share)

    def incoherence_limit(self, unsteered: ProbeResult) -> float:
        """The most incoherence a calibrated strength may give, steering the model measured by `unsteered`."""
        return (unsteered.incoherence_rate if self.relative else 0.0) + self.budget

    def _safe_index(self, results: Sequence[ProbeResult], unsteered: ProbeResult) -> int | None:
        """The largest strength below the first that breaks the incoherence budget (None when the smallest does)."""
        limit = self.incoherence_limit(unsteered)
        safe = None
        for i in sorted(range(len(results)), key=lambda i: self.multipliers[i]):
            if results[i].incoherence_rate > limit:
                break
            safe = i
        return safe

    def _repair_index(self) -> int | None:
        return self._safe_index(self.repair, self.misaligned)

    def _induce_index(self) -> int | None:
        return None if self.induce is None else self._safe_index(self.induce, self.base)

    @property
    def repair_multiplier(self) -> float | None:
        i = self._repair_index()
        return None if i is None else self.multipliers[i]

    @property
    def induce_multiplier(self) -> float | None:
        i = self._induce_index()
        return None if i is None else self.multipliers[i]

    def repair_efficiency(self, misaligned: ProbeResult | None = None) -> float:
        i = self._repair_index()
        return 0.0 if i is None else (misaligned or self.misaligned).em_rate - self.repair[i].em_rate

    def induction(self, base: ProbeResult | None = None) -> float:
        i = self._induce_index()
        return 0.0 if i is None else self.induce[i].em_rate - (base or self.base).em_rate

    @property
    def alpha(self) -> float:
        """The calibrated repair strength in absolute units (0 when no strength fits the budget)."""
        m = self.repair_multiplier
        return 0.0 if m is None else m * self.candidate.scale

    def to_dict(self, base: ProbeResult, misaligned: ProbeResult) -> dict[str, Any]:
        return {
            "latent": self.candidate.latent,
            "sign": self.candidate.sign,
            "delta": self.candidate.delta,
            "scale": self.candidate.scale,
            "multipliers": self.multipliers,
            "repair": [r.to_dict() for r in self.repair],
            "induce": None if self.induce is None else [r.to_dict() for r in self.induce],
            "repair_multiplier": self.repair_multiplier,
            "induce_multiplier": self.induce_multiplier,
            "alpha": self.alpha,
            "repair_efficiency": self.repair_efficiency(misaligned),
            "induction": self.induction(base),
        }


def calibrate(
    shortlist: Sequence[Candidate],
    layer: int,
    base_probe: SteeringProbe,
    misaligned_probe: SteeringProbe,
    *,
    multipliers: Sequence[float] = (1.0, 2.0, 4.0, 8.0, 16.0),
    budget: float = 0.10,
    relative_budget: bool = True,
    induce: bool = True,
    full_sweep: bool = False,
    progress: bool = True,
) -> list[Calibration]:
    """Sweeps every shortlisted latent over `multipliers`, repairing the misaligned model (and inducing on the base).

    `budget` is the most incoherence (a share of answers) steering may add to the unsteered model's own, or with
    `relative_budget=False` the most incoherence it may give at all. Each sweep stops after the first strength that
    breaks the budget, unless `full_sweep`.
    """
    multipliers = sorted(float(m) for m in multipliers)
    base, misaligned = base_probe.measure(), misaligned_probe.measure()  # cached: the unsteered baselines
    calibrations = []
    for candidate in tqdm(shortlist, disable=not progress, desc=f"calibrate layer {layer}"):
        sweep = Calibration(
            candidate, multipliers, [], [] if induce else None, budget, base, misaligned, relative_budget
        )
        _measure_upwards(
            sweep, sweep.repair, misaligned_probe, misaligned, layer, toward_misaligned=False, full=full_sweep
        )
        # A latent that does not repair is never kept, so its induction would only fill the report.
        if induce and (full_sweep or sweep.repair_efficiency() > 0):
            _measure_upwards(sweep, sweep.induce, base_probe, base, layer, toward_misaligned=True, full=full_sweep)
        calibrations.append(sweep)
    return calibrations


def _measure_upwards(
    sweep: Calibration,
    results: list[ProbeResult],
    probe: SteeringProbe,
    unsteered: ProbeResult,
    layer: int,
    *,
    toward_misaligned: bool,
    full: bool,
) -> None:
    """Appends `probe`'s result at each strength of `sweep`, in increasing order, up to the first over the budget."""
    limit = sweep.incoherence_limit(unsteered)
    for m in sweep.multipliers:
        results.append(probe.measure(sweep.candidate.steering(layer, m, toward_misaligned=toward_misaligned)))
        if results[-1].incoherence_rate > limit and not full:
            return


def rank_and_select(
    calibrations: Sequence[Calibration],
    base: ProbeResult,
    misaligned: ProbeResult,
    *,
    n_select: int,
    rule: str = "induce_and_repair",
    prefilter: bool = False,
) -> list[Calibration]:
    """At most `n_select` shortlisted latents: those that repair at their calibrated strength, best first.

    With `prefilter` and the `"induce_and_repair"` rule they must also induce at theirs.
    """
    if rule not in RULES:
        raise ValueError(f"Expected a selection rule in {RULES}, got {rule!r}.")
    eligible = [c for c in calibrations if c.repair_efficiency(misaligned) > 0]
    if prefilter and rule == "induce_and_repair":
        eligible = [c for c in eligible if c.induction(base) > 0]
    eligible.sort(key=lambda c: (-c.repair_efficiency(misaligned), -abs(c.candidate.delta)))
    return eligible[:n_select]
