"""Evaluation harness: measure emergent misalignment before and after fine-tuning, with several judges.

Prompts (`prompts`), generation with optional steering (`generation`), judges (`openai_judge`, `local_judge`, any
`Judge`), metrics with bootstrap CIs (`metrics`), and the result's JSON / Markdown / PNG faces (`report`).
"""

from .cache import JudgementCache
from .generation import GenerationBackend, Steering, TransformersBackend, generate_responses, steer
from .harness import evaluate, evaluate_responses
from .judge_base import Judge, Judgement
from .judge_prompts import PROMPT_VERSION
from .llm_judge import LogprobJudge
from .local_judge import LocalJudge
from .metrics import (
    EMMetrics,
    Rate,
    bootstrap_ci,
    classify,
    compute_metrics,
    held_out_loss,
    judge_agreement,
    target_rate,
)
from .openai_judge import OpenAIJudge
from .prompts import (
    OOD_PROMPTS,
    Prompt,
    load_core_misalignment,
    load_first_plot_questions,
    load_in_domain_prompts,
    ood_prompts,
)
from .report import EvaluationResult
from .scoring import score_distribution

__all__ = [
    "OOD_PROMPTS",
    "PROMPT_VERSION",
    "EMMetrics",
    "EvaluationResult",
    "GenerationBackend",
    "Judge",
    "Judgement",
    "JudgementCache",
    "LocalJudge",
    "LogprobJudge",
    "OpenAIJudge",
    "Prompt",
    "Rate",
    "Steering",
    "TransformersBackend",
    "bootstrap_ci",
    "classify",
    "compute_metrics",
    "evaluate",
    "evaluate_responses",
    "generate_responses",
    "held_out_loss",
    "judge_agreement",
    "load_core_misalignment",
    "load_first_plot_questions",
    "load_in_domain_prompts",
    "ood_prompts",
    "score_distribution",
    "steer",
    "target_rate",
]
