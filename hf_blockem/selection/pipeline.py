"""Latent selection end to end: Stage 1 (shifts) → Stage 2 (induce / repair screen) → Stage 3 (calibration) → a
`LatentSet`, for one SAE at one layer, for several layers at once, or choosing among several SAEs by how well their
best latents repair."""

from __future__ import annotations

import itertools
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..evaluation.generation import Steering, generate_responses
from ..evaluation.judge_base import Judge
from ..latent_set import LatentSet
from ..peft_aliasing import resolve_base_model
from .calibration import RULES, Calibration, calibrate, rank_and_select
from .probe import ProbeResult, SteeringProbe
from .screen import Candidate, ScreenResult, keep_causal, screen_candidates
from .shifts import activation_shifts, candidate_pool

logger = logging.getLogger(__name__)


@dataclass
class SelectionConfig:
    """Settings of Stages 1–3.

    Args:
        n_candidates (`int`, *optional*, defaults to `8`): candidates per sign from Stage 1 (top-N positive Δ_k and
            top-N negative).
        n_select (`int`, *optional*, defaults to `5`): the most latents kept at the end (fewer when fewer repair at
            their calibrated strength).
        screen_multiplier (`float`, *optional*, defaults to `4.0`): Stage-2 steering strength, in units of each
            latent's typical activation.
        multipliers (`tuple[float]`, *optional*): Stage-3 sweep, same units.
        incoherence_budget (`float`, *optional*, defaults to `0.10`): the most incoherence (a share of answers) a
            calibrated strength may add to the unsteered model's own.
        relative_budget (`bool`, *optional*, defaults to `True`): `False` makes the budget an absolute share of
            incoherent answers (the paper's code: at most 10%), whatever the unsteered model's own.
        full_sweep (`bool`, *optional*, defaults to `False`): Stage 3 measures every strength of `multipliers`; by
            default each sweep stops after the first strength over the incoherence budget, as no larger one is ever
            calibrated.
        rule (`str`, *optional*, defaults to `"induce_and_repair"`): `"induce_and_repair"` (the paper's rule) or
            `"repair_only"`.
        prefilter (`bool`, *optional*, defaults to `False`): under `"induce_and_repair"`, Stage 3 also asks for
            non-zero induction at a latent's calibrated strength (non-zero repair is always asked for).
        fallback_to_repair_only (`bool`, *optional*, defaults to `True`): when no latent induces misalignment, rank by
            repair alone (and say so in the report) instead of selecting nothing.
        n_response_samples (`int`, *optional*, defaults to `4`): Stage-1 answers sampled per selection prompt from the
            misaligned model when no answers are given.
        n_samples (`int`, *optional*, defaults to `4`): answers per prompt in each Stage-2/3 measurement.
        max_new_tokens (`int`, *optional*, defaults to `64`): answer length limit.
        temperature (`float`, *optional*, defaults to `1.0`): sampling temperature.
        batch_size (`int`, *optional*, defaults to `64`): sequences per forward / generate call.
        seed (`int`, *optional*, defaults to `0`): sampling seed.
    """

    n_candidates: int = 8
    n_select: int = 5
    screen_multiplier: float = 4.0
    multipliers: tuple[float, ...] = (1.0, 2.0, 4.0, 8.0, 16.0)
    incoherence_budget: float = 0.10
    relative_budget: bool = True
    full_sweep: bool = False
    rule: str = "induce_and_repair"
    prefilter: bool = False
    fallback_to_repair_only: bool = True
    n_response_samples: int = 4
    n_samples: int = 4
    max_new_tokens: int = 64
    temperature: float = 1.0
    batch_size: int = 64
    seed: int = 0

    def __post_init__(self):
        if self.rule not in RULES:
            raise ValueError(f"Expected rule in {RULES}, got {self.rule!r}.")
        if self.n_select < 1 or self.n_candidates < 1:
            raise ValueError(f"Expected n_select and n_candidates >= 1, got {self.n_select}, {self.n_candidates}.")


@dataclass
class LayerSelection:
    """Everything one SAE at one layer produced: the report's raw material."""

    name: str
    layer: int
    d_sae: int
    delta: torch.Tensor
    firing_base: torch.Tensor
    baseline: dict[str, ProbeResult]
    screen: list[ScreenResult]
    calibrations: list[Calibration]
    selected: list[Calibration]
    rule_used: str
    group_repair: ProbeResult | None
    latent_set: LatentSet | None

    @property
    def plus(self) -> list[int]:
        return [c.candidate.latent for c in self.selected if c.candidate.sign > 0]

    @property
    def minus(self) -> list[int]:
        return [c.candidate.latent for c in self.selected if c.candidate.sign < 0]

    @property
    def candidates(self) -> list[int]:
        """Stage 1's candidate pool (both signs): the latents whose activation shift flagged them."""
        return sorted({r.candidate.latent for r in self.screen})

    @property
    def group_repair_gain(self) -> float:
        """How many more answers are aligned *and* coherent when every selected latent is steered away at once.

        The share of aligned, coherent answers under group steering minus the misaligned model's own: EM that steering
        removes only by making answers incoherent does not count, so SAEs are compared on real repairs.
        """
        if self.group_repair is None:
            return 0.0
        mis, group = self.baseline["misaligned"], self.group_repair
        return (1 - group.em_rate - group.incoherence_rate) - (1 - mis.em_rate - mis.incoherence_rate)

    def to_dict(self, top: int = 20) -> dict[str, Any]:
        base, mis = self.baseline["base"], self.baseline["misaligned"]
        order = torch.argsort(self.delta.abs(), descending=True)[:top].tolist()
        return {
            "name": self.name,
            "layer": self.layer,
            "d_sae": self.d_sae,
            "top_shifts": [{"latent": k, "delta": float(self.delta[k])} for k in order],
            "baseline": {k: v.to_dict() for k, v in self.baseline.items()},
            "screen": [r.to_dict(base, mis) for r in self.screen],
            "calibration": [c.to_dict(base, mis) for c in self.calibrations],
            "selected": {"plus": self.plus, "minus": self.minus},
            "rule_used": self.rule_used,
            "group_repair": None if self.group_repair is None else self.group_repair.to_dict(),
            "group_repair_gain": self.group_repair_gain,
        }


@dataclass
class SelectionResult:
    """The selected `LatentSet` and the per-layer (per-SAE) reports that explain it."""

    latent_set: LatentSet | None
    layers: list[LayerSelection]
    compared: list[LayerSelection] = field(default_factory=list)
    config: SelectionConfig = field(default_factory=SelectionConfig)
    choose: str = "best"
    # How the kept SAEs were picked: "group_repair" (`select_latents`) or "trial" (`choose_by_trial`, set by its caller).
    chosen_by: str = "group_repair"

    @property
    def name(self) -> str:
        """The kept SAEs' names joined by `+` (one per layer with `choose="all"`)."""
        return "+".join(run.name for run in self.layers)

    def alternatives(self) -> list[SelectionResult]:
        """Every selection the comparison could have kept, this one included, in the order SAEs were compared.

        With `choose="best"`, one per SAE that selected latents; with `choose="all"`, one per combination of one such
        SAE per layer. Use it to compare SAEs by something more expensive than group repair, such as a short blocked
        fine-tune on the selection prompts (`choose_by_trial`).
        """
        useful = [run for run in self.compared if run.latent_set is not None]
        if self.choose == "best":
            return [_combined([run], self.compared, self.config, self.choose) for run in useful]
        by_layer: dict[int, list[LayerSelection]] = {}
        for run in useful:
            by_layer.setdefault(run.layer, []).append(run)
        return [
            _combined(list(kept), self.compared, self.config, self.choose)
            for kept in itertools.product(*(by_layer[layer] for layer in sorted(by_layer)))
        ]

    def to_dict(self) -> dict[str, Any]:
        kept = {run.name for run in self.layers}
        return {
            "config": asdict(self.config),
            "choose": self.choose,
            "chosen_by": self.chosen_by,
            "selected": [s.to_dict() for s in self.layers],
            "compared": [{**s.to_dict(), "kept": s.name in kept} for s in self.compared],
            "latent_set": None if self.latent_set is None else self.latent_set.to_dict(),
        }

    def save(self, output_dir: str | Path) -> Path:
        """Writes `report.json`, `report.md`, the plots and the latent set (`latent_set/`) into `output_dir`."""
        from .report import write_report

        return write_report(self, Path(output_dir))


def _sae_d_sae(sae: Any) -> int:
    return int(sae.cfg.d_sae)


def select_layer(
    base_model: torch.nn.Module,
    misaligned_model: torch.nn.Module,
    tokenizer: Any,
    sae: Any,
    layer: int,
    judge: Judge,
    prompts: Sequence[str],
    *,
    config: SelectionConfig | None = None,
    responses: Sequence[str] | None = None,
    response_prompts: Sequence[str] | None = None,
    name: str | None = None,
    base_model_id: str = "unknown",
    base_model_revision: str | None = None,
    sae_release: str | None = None,
    sae_id: str | None = None,
    sae_commit: str | None = None,
    cache_dir: str | Path | None = None,
    progress: bool = True,
) -> LayerSelection:
    """Runs Stages 1–3 for one SAE reading the output of decoder layer `layer`.

    Args:
        base_model, misaligned_model (`PreTrainedModel`): the aligned base and the emergently misaligned reference.
            When the reference is a `PeftModel` on the base, pass it twice, or pass the model its adapters were
            injected into as `base_model`: either way the base is read with the adapters disabled.
        tokenizer (`PreTrainedTokenizerBase`): shared tokenizer with a chat template.
        sae (`sae_lens.SAE`): a StandardSAE or JumpReLUSAE reading `blocks.{layer}.hook_resid_post`.
        layer (`int`): decoder-layer index.
        judge (`Judge`): scores answers in Stages 2–3.
        prompts (sequence of `str`): selection prompts (never the evaluation split).
        config (`SelectionConfig`, *optional*): the stages' settings.
        responses, response_prompts (sequences of `str`, *optional*): Stage-1 answers of the misaligned model and the
            prompts they answer; sampled from the misaligned model on `prompts` when not given.
        name (`str`, *optional*): a name for this SAE in reports (defaults to `layer_{layer}`).
        base_model_id, base_model_revision, sae_release, sae_id, sae_commit: provenance recorded in the latent set.
        cache_dir (`str` or `Path`, *optional*): generations and judgements are cached there; a rerun resumes.
        progress (`bool`, *optional*, defaults to `True`): progress bars.
    """
    config = config or SelectionConfig()
    name = name or f"layer_{layer}"
    base_model = resolve_base_model(base_model, misaligned_model)
    sample = {"temperature": config.temperature, "max_new_tokens": config.max_new_tokens}
    sample.update(batch_size=config.batch_size, seed=config.seed)

    # Stage 1 — activation shifts on the misaligned model's own answers.
    if responses is None:
        answers = generate_responses(
            misaligned_model,
            tokenizer,
            list(prompts),
            n_samples=config.n_response_samples,
            progress=progress,
            **sample,
        )
        response_prompts, responses = list(answers["prompt"]), list(answers["response"])
    shifts = activation_shifts(
        base_model,
        misaligned_model,
        tokenizer,
        sae,
        layer,
        response_prompts,
        responses,
        batch_size=config.batch_size,
        progress=progress,
    )
    # Steering strengths in units of each latent's typical activation, carried into the residual stream's units.
    delta, scale = shifts["delta"], shifts["active_mean"] * shifts["steering_unit"]
    plus_pool, minus_pool = candidate_pool(delta, config.n_candidates, config.n_candidates)
    W_dec = sae.W_dec.detach().float().cpu()
    candidates = [
        Candidate(k, 1 if delta[k] > 0 else -1, float(delta[k]), float(scale[k]), W_dec[k])
        for k in plus_pool + minus_pool
    ]
    logger.info("%s: %d candidates (%d K+, %d K-)", name, len(candidates), len(plus_pool), len(minus_pool))

    # Stage 2 — induce on the base model, repair on the misaligned one.
    probe_kwargs = {"judge": judge, "prompts": list(prompts), "n_samples": config.n_samples, "cache_dir": cache_dir}
    probe_kwargs.update(sample)
    base_probe = SteeringProbe(base_model, tokenizer, name="base", **probe_kwargs)
    misaligned_probe = SteeringProbe(misaligned_model, tokenizer, name="misaligned", **probe_kwargs)
    if base_model is misaligned_model:  # a PEFT reference: the base is the same model with its adapters off
        base_probe = _AdapterOffProbe(base_probe)
    baseline = {"base": base_probe.measure(), "misaligned": misaligned_probe.measure()}
    screened = screen_candidates(
        candidates, layer, base_probe, misaligned_probe, multiplier=config.screen_multiplier, progress=progress
    )
    rule = config.rule
    shortlist = keep_causal(
        screened, baseline["base"], baseline["misaligned"], require_induction=rule != "repair_only"
    )
    if not shortlist and rule == "induce_and_repair" and config.fallback_to_repair_only:
        logger.warning("%s: no candidate both induces and repairs; ranking by repair alone.", name)
        rule = "repair_only"
        shortlist = keep_causal(screened, baseline["base"], baseline["misaligned"], require_induction=False)

    # Stage 3 — calibrate, rank, keep the top N.
    calibrations = calibrate(
        [r.candidate for r in shortlist],
        layer,
        base_probe,
        misaligned_probe,
        multipliers=config.multipliers,
        budget=config.incoherence_budget,
        relative_budget=config.relative_budget,
        full_sweep=config.full_sweep,
        progress=progress,
    )
    selected = rank_and_select(
        calibrations,
        baseline["base"],
        baseline["misaligned"],
        n_select=config.n_select,
        rule=rule,
        prefilter=config.prefilter,
    )
    group_repair, latent_set = None, None
    if selected:
        if len(selected) < config.n_select:
            logger.info(
                "%s: %d of %d shortlisted latents repair at their calibrated strength; keeping them (n_select=%d).",
                name,
                len(selected),
                len(calibrations),
                config.n_select,
            )
        group = [c.candidate.steering(layer, c.repair_multiplier, toward_misaligned=False) for c in selected]
        group_repair = misaligned_probe.measure(group)
        ids = [c.candidate.latent for c in selected]
        index = {k: i for i, k in enumerate(ids)}
        plus = [k for k in ids if delta[k] > 0]
        minus = [k for k in ids if delta[k] < 0]
        order = [index[k] for k in plus + minus]
        statistics = {
            "delta": torch.tensor([selected[i].candidate.delta for i in order]),
            "alpha": torch.tensor([selected[i].alpha for i in order]),
            "repair_efficiency": torch.tensor([selected[i].repair_efficiency(baseline["misaligned"]) for i in order]),
        }
        latent_set = LatentSet.from_sae(
            sae,
            plus=plus,
            minus=minus,
            layer=layer,
            base_model=base_model_id,
            base_model_revision=base_model_revision,
            sae_release=sae_release,
            sae_id=sae_id,
            sae_commit=sae_commit,
            statistics=statistics,
        )
    else:
        logger.warning("%s: no latent repairs misalignment within the incoherence budget; nothing selected.", name)
    return LayerSelection(
        name=name,
        layer=layer,
        d_sae=_sae_d_sae(sae),
        delta=delta,
        firing_base=shifts["firing_base"],
        baseline=baseline,
        screen=screened,
        calibrations=calibrations,
        selected=selected,
        rule_used=rule,
        group_repair=group_repair,
        latent_set=latent_set,
    )


class _AdapterOffProbe:
    """A probe of a `PeftModel` with its adapters disabled: the base model, without a second copy in memory."""

    def __init__(self, probe: SteeringProbe):
        self.probe = probe

    def measure(self, steering: Steering | Sequence[Steering] | None = None) -> ProbeResult:
        with self.probe.model.disable_adapter():
            return self.probe.measure(steering)


def select_latents(
    base_model: torch.nn.Module,
    misaligned_model: torch.nn.Module,
    tokenizer: Any,
    saes: Mapping[str, tuple[Any, int]],
    judge: Judge,
    prompts: Sequence[str],
    *,
    config: SelectionConfig | None = None,
    choose: str = "best",
    cache_dir: str | Path | None = None,
    progress: bool = True,
    **provenance: Any,
) -> SelectionResult:
    """Selects latents with one or more SAEs.

    Args:
        saes (`dict[str, (sae, layer)]`): candidate SAEs by name, each with the decoder layer it reads.
        choose (`str`, *optional*, defaults to `"best"`): `"best"` keeps the SAE whose selected latents, steered away
            together, repair the most misalignment (SAEs of different widths or layers compete); `"all"` keeps every
            SAE that selected something and returns one multi-layer set (one SAE per layer).
        provenance: `base_model_id`, `base_model_revision` and per-run SAE provenance forwarded to `select_layer`.

    Other arguments are those of `select_layer`.
    """
    if choose not in ("best", "all"):
        raise ValueError(f"Expected choose='best' or 'all', got {choose!r}.")
    config = config or SelectionConfig()
    sae_provenance = provenance.pop("sae_provenance", {}) or {}
    runs = []
    responses = provenance.pop("responses", None)
    response_prompts = provenance.pop("response_prompts", None)
    if responses is None:  # one set of Stage-1 answers shared by every SAE, so their shifts are comparable
        answers = generate_responses(
            misaligned_model,
            tokenizer,
            list(prompts),
            n_samples=config.n_response_samples,
            temperature=config.temperature,
            max_new_tokens=config.max_new_tokens,
            batch_size=config.batch_size,
            seed=config.seed,
            progress=progress,
        )
        response_prompts, responses = list(answers["prompt"]), list(answers["response"])
    for name, (sae, layer) in saes.items():
        runs.append(
            select_layer(
                base_model,
                misaligned_model,
                tokenizer,
                sae,
                layer,
                judge,
                prompts,
                config=config,
                responses=responses,
                response_prompts=response_prompts,
                name=name,
                cache_dir=cache_dir,
                progress=progress,
                **provenance,
                **sae_provenance.get(name, {}),
            )
        )
    useful = [r for r in runs if r.latent_set is not None]
    if choose == "best":
        kept = [max(useful, key=lambda r: r.group_repair_gain)] if useful else []
    else:
        by_layer: dict[int, LayerSelection] = {}
        for run in useful:
            if run.layer not in by_layer or run.group_repair_gain > by_layer[run.layer].group_repair_gain:
                by_layer[run.layer] = run
        kept = [by_layer[layer] for layer in sorted(by_layer)]
    return _combined(kept, runs, config, choose)


def _combined(
    kept: list[LayerSelection], compared: list[LayerSelection], config: SelectionConfig, choose: str
) -> SelectionResult:
    """The `SelectionResult` that keeps `kept` (at most one SAE per layer): their latent sets joined in one."""
    latent_set = None
    if kept:
        # A new set even for one SAE, so the metadata written here never leaks into an alternative sharing its set.
        latent_set = LatentSet.concatenate([r.latent_set for r in kept])
        latent_set.metadata.update(
            {
                "selection": {
                    "config": asdict(config),
                    "saes": [r.name for r in kept],
                    "rules": [r.rule_used for r in kept],
                }
            }
        )
    return SelectionResult(latent_set=latent_set, layers=kept, compared=compared, config=config, choose=choose)


def load_report(path: str | Path) -> dict[str, Any]:
    """Reads a `report.json` written by `SelectionResult.save`."""
    return json.loads(Path(path).read_text())
