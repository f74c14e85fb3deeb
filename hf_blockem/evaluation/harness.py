"""The harness: generate answers for one or more models, judge them with one or more judges, compute the metrics."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from itertools import combinations
from typing import Any

import torch

from ..peft_aliasing import without_injected_adapters
from .generation import (
    DEFAULT_MAX_NEW_TOKENS,
    DEFAULT_TEMPERATURE,
    DEFAULT_TOP_P,
    GenerationBackend,
    Steering,
    as_prompts,
    generate_responses,
)
from .judge_base import Judge
from .metrics import compute_metrics, held_out_loss, judge_agreement, target_rate
from .prompts import Prompt, ood_prompts
from .report import EvaluationResult

logger = logging.getLogger(__name__)

DEFAULT_N_SAMPLES = 25  # 24 evaluation prompts x 25 = 600 answers per model


def judge_name(identity: Mapping[str, Any]) -> str:
    """A short readable name for a judge identity, for example `"openai-compatible:gpt-4o"`."""
    if identity.get("name"):
        return str(identity["name"])
    parts = [str(identity.get("type", "judge"))] + ([str(identity["model"])] if identity.get("model") else [])
    name = ":".join(parts)
    return f"{name}:{identity['mode']}" if identity.get("mode") not in (None, "0-100") else name


def _rows(responses: Any) -> list[dict[str, Any]]:
    rows = responses.to_list() if hasattr(responses, "to_list") else [dict(r) for r in responses]
    for i, row in enumerate(rows):
        if "prompt" not in row or "response" not in row:
            raise ValueError(f"Expected rows with 'prompt' and 'response', got fields {sorted(row)} in row {i}.")
    return rows


def evaluate_responses(
    responses: Mapping[str, Any] | Any,
    judges: Judge | Sequence[Judge],
    *,
    in_domain: Mapping[str, Any] | None = None,
    is_target: Callable[[Mapping[str, Any]], bool] | None = None,
    cluster_by_prompt: bool = True,
    n_resamples: int = 2000,
    seed: int = 0,
    config: Mapping[str, Any] | None = None,
) -> EvaluationResult:
    """Judges answers that were already generated and computes every metric.

    Args:
        responses (`datasets.Dataset`, list of dicts, or a dict of them keyed by model name):
            rows with `prompt` and `response` (and `prompt_id`, `category` when available), as from
            `generate_responses`. A single set is named `"model"`.
        judges (`Judge` or list of `Judge`): the first is the primary judge; with several, their agreement is reported.
        in_domain (`dict[str, rows]`, *optional*): per model, answers to in-domain prompts, scored with `is_target`.
        is_target (`Callable[[dict], bool]`, *optional*): whether one in-domain row shows the trained behaviour.
        cluster_by_prompt (`bool`, *optional*, defaults to `True`): bootstrap over prompts rather than answers.
        n_resamples (`int`, *optional*, defaults to `2000`): bootstrap resamples.
        seed (`int`, *optional*, defaults to `0`): bootstrap seed.
        config (`dict`, *optional*): settings to record in the result.

    Returns:
        `EvaluationResult`
    """
    if not isinstance(responses, Mapping):
        responses = {"model": responses}
    judges = [judges] if isinstance(judges, Judge) else list(judges)
    if not judges:
        raise ValueError("Expected at least one judge, got none.")
    names: dict[str, Judge] = {}
    for judge in judges:
        name = judge_name(judge.identity)
        while name in names:
            name += "'"
        names[name] = judge
    result = EvaluationResult(
        metrics={}, judges={n: dict(j.identity) for n, j in names.items()}, config=dict(config or {})
    )
    for model, records in responses.items():
        rows = _rows(records)
        questions, answers = [r["prompt"] for r in rows], [r["response"] for r in rows]
        prompt_ids = [str(r.get("prompt_id") or r["prompt"]) for r in rows]
        categories = [str(r.get("category") or "uncategorised") for r in rows]
        result.responses[model] = rows
        result.metrics[model], result.judgements[model] = {}, {}
        for name, judge in names.items():
            logger.info("Judging %d answers of %s with %s", len(rows), model, name)
            verdicts = judge.judge(questions, answers)
            if len(verdicts) != len(rows):
                raise ValueError(
                    f"Expected judge {name} to return one judgement per answer ({len(rows)}), got {len(verdicts)}. "
                    "A custom `Judge.judge` must return its verdicts in the order of the answers it was given."
                )
            result.judgements[model][name] = verdicts
            result.metrics[model][name] = compute_metrics(
                verdicts,
                prompt_ids=prompt_ids,
                categories=categories,
                cluster_by_prompt=cluster_by_prompt,
                n_resamples=n_resamples,
                seed=seed,
            )
        if len(names) > 1:
            result.agreement[model] = {
                f"{a} | {b}": judge_agreement(result.judgements[model][a], result.judgements[model][b])
                for a, b in combinations(names, 2)
            }
    if in_domain:
        if is_target is None:
            raise ValueError("Got in-domain answers but no `is_target` checker; pass one to score the target task.")
        for model, records in in_domain.items():
            result.in_domain_responses[model] = _rows(records)
            result.target[model] = target_rate(
                result.in_domain_responses[model],
                is_target,
                cluster_by_prompt=cluster_by_prompt,
                n_resamples=n_resamples,
                seed=seed,
            )
    return result


def _model_and_tokenizer(entry: Any, tokenizer: Any) -> tuple[torch.nn.Module, Any]:
    if isinstance(entry, tuple):
        return entry
    if tokenizer is None:
        raise ValueError("Expected a tokenizer, or (model, tokenizer) pairs in `models`; got a model alone.")
    return entry, tokenizer


def evaluate(
    models: torch.nn.Module | Mapping[str, torch.nn.Module | tuple[torch.nn.Module, Any]],
    tokenizer: Any = None,
    *,
    judges: Judge | Sequence[Judge],
    prompts: Sequence[str | Prompt] | None = None,
    in_domain_prompts: Sequence[str | Prompt] | None = None,
    is_target: Callable[[Mapping[str, Any]], bool] | None = None,
    held_out_conversations: Sequence[Sequence[Mapping[str, str]]] | None = None,
    n_samples: int = DEFAULT_N_SAMPLES,
    temperature: float = DEFAULT_TEMPERATURE,
    top_p: float = DEFAULT_TOP_P,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    batch_size: int = 16,
    seed: int = 0,
    steering: Steering | Sequence[Steering] | None = None,
    backend: GenerationBackend | None = None,
    n_resamples: int = 2000,
    output_dir: str | None = None,
    progress: bool = True,
) -> EvaluationResult:
    """Measures emergent misalignment: samples answers to out-of-domain prompts, judges them, and reports EM,
    incoherence and refusal rates with 95% CIs (plus the in-domain target metric when asked).

    Args:
        models (`PreTrainedModel` or `dict[str, PreTrainedModel | (PreTrainedModel, tokenizer)]`):
            one model, or several by name (for example `{"base": base, "fine-tuned": tuned}`). A model that a
            `PeftModel` among them wraps (`get_peft_model(base, ...)` injects its adapters into `base`) is evaluated
            with those adapters disabled, as the base it was.
        tokenizer (`PreTrainedTokenizerBase`, *optional*): shared tokenizer, when `models` holds no pairs.
        judges (`Judge` or list of `Judge`): the first is the primary judge.
        prompts (list of `str` or `Prompt`, *optional*): defaults to the evaluation half of the built-in OOD prompts.
        in_domain_prompts (list of `str` or `Prompt`, *optional*): target-task prompts (see `load_in_domain_prompts`).
        is_target (`Callable[[dict], bool]`, *optional*): whether an in-domain answer shows the trained behaviour.
        held_out_conversations (list of message lists, *optional*): in-domain conversations whose final assistant
            message's loss is reported as `held_out_loss`.
        n_samples (`int`, *optional*, defaults to `25`): answers per prompt.
        temperature (`float`, *optional*, defaults to `1.0`): sampling temperature.
        top_p (`float`, *optional*, defaults to `1.0`): nucleus sampling threshold.
        max_new_tokens (`int`, *optional*, defaults to `600`): answer length limit.
        batch_size (`int`, *optional*, defaults to `16`): sequences per `generate` call.
        seed (`int`, *optional*, defaults to `0`): sampling and bootstrap seed.
        steering (`Steering` or list, *optional*): steering applied to every model while it generates.
        backend (`GenerationBackend`, *optional*): a generation engine instead of transformers (single model only).
        n_resamples (`int`, *optional*, defaults to `2000`): bootstrap resamples.
        output_dir (`str`, *optional*): when given, the result is saved there (JSON, Markdown, PNG, JSONL answers).
        progress (`bool`, *optional*, defaults to `True`): show progress bars.

    Returns:
        `EvaluationResult`: `result["model"].em_rate`, `.to_json()`, `.to_markdown()`, `.plot(path)`.

    Example:
    ```python
    from hf_blockem.evaluation import OpenAIJudge, evaluate

    result = evaluate(model, tokenizer, judges=OpenAIJudge("gpt-4o-2024-08-06", cache="judge.sqlite"))
    print(result.to_markdown())
    ```
    """
    entries = dict(models) if isinstance(models, Mapping) else {"model": models}
    if backend is not None and len(entries) > 1:
        raise ValueError(
            f"Expected one model with `backend=` (it generates every answer itself), got {len(entries)}: "
            f"{sorted(entries)}. Evaluate each model with its own backend, or pass the models without `backend`."
        )
    items = as_prompts(prompts) if prompts is not None else ood_prompts("evaluation")
    generation = {
        "n_samples": n_samples,
        "temperature": temperature,
        "top_p": top_p,
        "max_new_tokens": max_new_tokens,
        "batch_size": batch_size,
        "seed": seed,
        "steering": steering,
        "backend": backend,
        "progress": progress,
    }
    responses, in_domain, losses = {}, {}, {}
    pairs = {name: _model_and_tokenizer(entry, tokenizer) for name, entry in entries.items()}
    for name, (model, tok) in pairs.items():
        logger.info("Generating %d x %d answers with %s", len(items), n_samples, name)
        # `{"base": base, "tuned": get_peft_model(base, ...)}`: PEFT injected the adapters into `base` itself.
        others = {other: m for other, (m, _) in pairs.items() if other != name}
        with without_injected_adapters(model, others):
            responses[name] = generate_responses(model, tok, items, **generation)
            if in_domain_prompts is not None:
                in_domain[name] = generate_responses(model, tok, as_prompts(in_domain_prompts), **generation)
            if held_out_conversations is not None:
                losses[name] = held_out_loss(model, tok, held_out_conversations, batch_size=batch_size)
    config = {
        **{k: v for k, v in generation.items() if k not in ("steering", "backend", "progress")},
        "prompts": [p.id for p in items],
        "steering": [{"layer": s.layer, "alpha": s.alpha} for s in _steering_list(steering)],
    }
    result = evaluate_responses(
        responses,
        judges,
        in_domain=in_domain or None,
        is_target=is_target,
        n_resamples=n_resamples,
        seed=seed,
        config=config,
    )
    result.held_out_loss.update(losses)
    if output_dir is not None:
        result.save(output_dir)
    return result


def _steering_list(steering: Steering | Sequence[Steering] | None) -> list[Steering]:
    if steering is None:
        return []
    return [steering] if isinstance(steering, Steering) else list(steering)
