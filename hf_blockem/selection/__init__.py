"""Latent selection (BLOCK-EM Stages 1–3): activation shifts, the induce / repair screen, strength calibration,
random-latent controls, and choosing among SAEs by a trial fine-tune. The result is a `LatentSet` ready to train against
or push to the Hub, plus a report."""

from .calibration import Calibration, calibrate, rank_and_select
from .controls import firing_latents, firing_rates, random_control
from .pipeline import LayerSelection, SelectionConfig, SelectionResult, select_latents, select_layer
from .probe import ProbeResult, SteeringProbe
from .screen import Candidate, ScreenResult, keep_causal, screen_candidates
from .shifts import activation_shifts, candidate_pool, response_latents, tokenize_responses
from .trial import Trial, choose_by_trial

__all__ = [
    "Calibration",
    "Candidate",
    "LayerSelection",
    "ProbeResult",
    "ScreenResult",
    "SelectionConfig",
    "SelectionResult",
    "SteeringProbe",
    "Trial",
    "activation_shifts",
    "calibrate",
    "candidate_pool",
    "choose_by_trial",
    "firing_latents",
    "firing_rates",
    "keep_causal",
    "random_control",
    "rank_and_select",
    "response_latents",
    "screen_candidates",
    "select_latents",
    "select_layer",
    "tokenize_responses",
]
