"""The model card of a BLOCK-EM checkpoint, rendered from `model_card_template.md` with `huggingface_hub.ModelCard`.

The card is built from plain data: the run's `blockem_config.json` dict (see `hf_blockem.run_files.blockem_config`), the
Trainer's hyperparameters and log history (transformers' own `extract_hyperparameters_from_trainer` and
`parse_log_history`), and optional evaluation results and diagnostics as plain dicts, so that neither the evaluation
harness nor the diagnostics are imported here.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import math
import os
import posixpath
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

logger = logging.getLogger(__name__)

# The template lives at the repository root (one file a reader can open and edit); the package-local copy is what an
# installed wheel ships, when packaging adds one.
TEMPLATE_PATH = Path(__file__).resolve().parent.parent / "model_card_template.md"
_PACKAGED_TEMPLATE_PATH = Path(__file__).resolve().parent / "templates" / "model_card_template.md"
CARD_TAGS = ("blockem", "emergent-misalignment", "hf_blockem", "sparse-autoencoder")
CITATION = """@inproceedings{ustaomeroglu2026blockem,
  title     = {{BLOCK-EM}: Preventing Emergent Misalignment via Latent Blocking},
  author    = {Ustaomeroglu and Qu},
  booktitle = {International Conference on Machine Learning (ICML)},
  year      = {2026},
  eprint    = {2602.00767},
  archivePrefix = {arXiv},
}"""
_VERSIONED_PACKAGES = (
    "hf_blockem",
    "transformers",
    "trl",
    "peft",
    "torch",
    "datasets",
    "tokenizers",
    "huggingface_hub",
    "safetensors",
    "sae_lens",
)
# Long latent lists make unreadable tables; the full ids are in blockem_config.json and the latent set itself.
_MAX_IDS_SHOWN = 24


def library_versions() -> dict[str, str]:
    """The installed versions of hf_blockem and the libraries a BLOCK-EM run depends on (missing ones left out)."""
    versions = {}
    for name in _VERSIONED_PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    if "hf_blockem" not in versions:
        from hf_blockem import __version__

        versions["hf_blockem"] = __version__
    return versions


def _template_path(template_path: str | Path | None) -> Path:
    if template_path is not None:
        return Path(template_path)
    for path in (TEMPLATE_PATH, _PACKAGED_TEMPLATE_PATH):
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"Expected the model-card template at {TEMPLATE_PATH} or {_PACKAGED_TEMPLATE_PATH}, found neither. Pass "
        "`template_path=` or reinstall hf_blockem."
    )


def _is_hub_id(name: str | None) -> bool:
    # A local folder is no base model the Hub can link to; the Hub refuses malformed ids in `base_model`.
    return bool(name) and not os.path.isdir(name) and not os.path.isabs(name) and name.count("/") <= 1


def _ids(ids: list[int]) -> str:
    if not ids:
        return "—"
    shown = ", ".join(str(i) for i in ids[:_MAX_IDS_SHOWN])
    return shown if len(ids) <= _MAX_IDS_SHOWN else f"{shown}, … ({len(ids)} in total)"


def _percent(value: float | None) -> str:
    return "—" if value is None or not math.isfinite(value) else f"{100 * value:.1f}%"


def _rate(evaluation: dict, key: str) -> tuple[float | None, list[float] | None]:
    """A rate and its interval from `{key: x, key_ci: [lo, hi]}` or the harness's `{key: {"value": x, "ci": [..]}}`."""
    value, ci = evaluation.get(key), evaluation.get(f"{key}_ci")
    if isinstance(value, dict):
        value, ci = value.get("value"), value.get("ci", ci)
    if value is not None and not isinstance(value, (int, float)):
        raise ValueError(f"Expected evaluation[{key!r}] to be a number or {{'value', 'ci'}}, got {value!r}.")
    return (None if value is None else float(value)), ci


def judge_name(judge: Any) -> str:
    """A short name for a judge given as a string or a dict (`name`, else `model`, else its JSON)."""
    if isinstance(judge, dict):
        return str(judge.get("name") or judge.get("model") or json.dumps(judge, sort_keys=True))
    return "unnamed judge" if judge is None else str(judge)


def evaluation_results(evaluations: list[dict], model_name: str) -> list[EvalResult]:
    """The `model-index` entries of the fine-tuned ("after") model: one EM rate and one incoherence rate per judge.

    Args:
        evaluations (`list[dict]`): plain dicts with `model` (`"before"` or `"after"`), `em_rate`, `em_rate_ci`,
            `incoherence_rate`, `judge` (a name or a dict) and optionally `dataset` (the prompt set) and `n`.
        model_name (`str`): the model's name in the model index.

    Returns:
        `list[EvalResult]`
    """
    results = []
    for evaluation in evaluations:
        if not isinstance(evaluation, dict):
            raise ValueError(f"Expected each evaluation to be a dict, got {type(evaluation).__name__}.")
        if evaluation.get("model", "after") != "after":
            continue  # the model index describes this checkpoint only; the baseline goes in the body's table
        dataset = str(evaluation.get("dataset") or "emergent-misalignment-prompts")
        judge = judge_name(evaluation.get("judge"))
        for key, metric in (("em_rate", "EM rate"), ("incoherence_rate", "Incoherence rate")):
            value, _ = _rate(evaluation, key)
            if value is None:
                continue
            results.append(
                EvalResult(
                    task_type="text-generation",
                    task_name="Emergent misalignment",
                    dataset_type=dataset,
                    dataset_name=dataset,
                    metric_type=key,
                    metric_name=f"{metric} (judge: {judge})",
                    metric_value=round(value, 6),
                )
            )
    return results


def _evaluation_rows(evaluations: list[dict]) -> tuple[list[dict], list[dict]]:
    rows, judges = [], {}
    for evaluation in evaluations:
        if not isinstance(evaluation, dict):
            raise ValueError(f"Expected each evaluation to be a dict, got {type(evaluation).__name__}.")
        em, em_ci = _rate(evaluation, "em_rate")
        incoherence, _ = _rate(evaluation, "incoherence_rate")
        name = judge_name(evaluation.get("judge"))
        if isinstance(evaluation.get("judge"), dict):
            judges[name] = json.dumps(evaluation["judge"], sort_keys=True)
        rows.append(
            {
                "model": evaluation.get("model", "after"),
                "judge": name,
                "em_rate": _percent(em),
                "em_rate_ci": f"[{_percent(em_ci[0])}, {_percent(em_ci[1])}]" if em_ci else "—",
                "incoherence_rate": _percent(incoherence),
                "n": evaluation.get("n", "—"),
            }
        )
    return rows, [{"name": name, "details": f"`{details}`"} for name, details in judges.items()]


def _layer_rows(latent_set: dict) -> list[dict]:
    rows = []
    for layer in latent_set.get("layers", []):
        sae = layer.get("sae", {})
        name = " / ".join(str(sae[k]) for k in ("release", "sae_id") if sae.get(k)) or "—"
        rows.append(
            {
                "layer": layer["layer"],
                "hook_name": layer["hook_name"],
                "sae_name": name,
                "sae_commit": f"`{sae['commit']}`" if sae.get("commit") else "not recorded",
                "architecture": layer.get("architecture", "—"),
                "plus": _ids(layer.get("plus", [])),
                "minus": _ids(layer.get("minus", [])),
            }
        )
    return rows


def _format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (dict, list)):
        return f"`{json.dumps(value, sort_keys=True)}`"
    return str(value)


def generate_blocked_model_card(
    blockem_config: dict[str, Any],
    *,
    model_name: str,
    repo_id: str | None = None,
    base_model: str | None = None,
    peft: bool = False,
    datasets: list[str] | None = None,
    license: str | None = None,
    language: str | list[str] | None = None,
    tags: list[str] | None = None,
    hyperparameters: dict[str, Any] | None = None,
    training_results: list[dict] | None = None,
    eval_results: dict[str, Any] | None = None,
    evaluations: list[dict] | None = None,
    diagnostics: dict[str, Any] | None = None,
    diagnostics_plot: str | None = None,
    template_path: str | Path | None = None,
) -> ModelCard:
    """Renders the model card of a BLOCK-EM checkpoint.

    Args:
        blockem_config (`dict`): the run's BLOCK-EM settings as written to `blockem_config.json`
            ([`~hf_blockem.run_files.blockem_config`]).
        model_name (`str`): name shown in the title and the model index.
        repo_id (`str`, *optional*): Hub repo of the checkpoint, used in the loading snippet; defaults to
            `model_name`.
        base_model (`str`, *optional*): Hub id of the model that was fine-tuned; defaults to the config's.
        peft (`bool`, *optional*, defaults to `False`): whether the checkpoint is a PEFT adapter (sets
            `library_name: peft` so the Hub shows how to load it).
        datasets (`list[str]`, *optional*): Hub ids of the training data.
        license (`str`, *optional*): the license (usually the base model's).
        language (`str` or `list[str]`, *optional*): language codes.
        tags (`list[str]`, *optional*): tags added to `blockem`, `emergent-misalignment`, ....
        hyperparameters (`dict`, *optional*): as returned by transformers' `extract_hyperparameters_from_trainer`.
        training_results (`list[dict]`, *optional*): the `lines` of transformers' `parse_log_history`.
        eval_results (`dict`, *optional*): the last evaluation of `parse_log_history`.
        evaluations (`list[dict]`, *optional*): EM evaluations as plain dicts: `model` (`"before"` / `"after"`),
            `em_rate`, `em_rate_ci` (`[lo, hi]`), `incoherence_rate`, `judge` (name or dict), optionally `n` and
            `dataset`. A rate may also be `{"value": x, "ci": [lo, hi]}`. The `"after"` ones enter `model-index`.
        diagnostics (`dict`, *optional*): a flat summary of the diagnostics (metric name -> value).
        diagnostics_plot (`str`, *optional*): path *inside the repo* of a diagnostics PNG.
        template_path (`str` or `Path`, *optional*): a Jinja template to use instead of `model_card_template.md`.

    Returns:
        [`~huggingface_hub.ModelCard`]
    """
    from transformers.modelcard import make_markdown_table

    latent_set = blockem_config.get("latent_set", {})
    base_model = base_model or blockem_config.get("base_model") or latent_set.get("base_model")
    evaluations = list(evaluations or [])
    all_tags = list(dict.fromkeys([*CARD_TAGS, *(tags or [])]))
    card_data = ModelCardData(
        base_model=base_model if _is_hub_id(base_model) else None,
        library_name="peft" if peft else "transformers",
        tags=all_tags,
        datasets=list(datasets) if datasets else None,
        license=license,
        language=language,
        model_name=model_name,
        pipeline_tag="text-generation",
        eval_results=evaluation_results(evaluations, model_name) or None,
    )
    rows, judges = _evaluation_rows(evaluations)
    blockem_hyperparameters = {
        "block_lambda": blockem_config.get("block_lambda"),
        "block_warmup_steps": blockem_config.get("block_warmup_steps"),
        "base_activations": blockem_config.get("base_activations"),
        "block_exclude_first_token": blockem_config.get("block_exclude_first_token"),
        "latent_set": latent_set.get("reference"),
        "latent_set_strict": latent_set.get("strict"),
    }
    hyperparameters = {
        **(hyperparameters or {}),
        **{k: v for k, v in blockem_hyperparameters.items() if v is not None},
    }
    layers = _layer_rows(latent_set)
    return ModelCard.from_template(
        card_data,
        template_path=str(_template_path(template_path)),
        model_name=model_name,
        repo_id=repo_id or model_name,
        base_model=base_model,
        base_model_url=f"https://huggingface.co/{base_model}" if _is_hub_id(base_model) else base_model,
        datasets=list(datasets or []),
        peft=peft,
        latent_set_ref=latent_set.get("reference", "not recorded"),
        latent_set_path=latent_set.get("path_in_repo"),
        latent_set_subfolder=posixpath.dirname(latent_set.get("path_in_repo") or ""),
        latent_set_source=latent_set.get("source"),
        latent_set_commit=latent_set.get("resolved_commit"),
        n_latents=sum(
            len(layer.get("plus", [])) + len(layer.get("minus", [])) for layer in latent_set.get("layers", [])
        ),
        layer_list=", ".join(str(row["layer"]) for row in layers) or "—",
        layers=layers,
        block_lambda=_format_value(blockem_config.get("block_lambda")),
        block_warmup_steps=blockem_config.get("block_warmup_steps"),
        base_activations=blockem_config.get("base_activations"),
        base_activations_source=blockem_config.get("base_activations_source"),
        exclude_first_token="yes" if blockem_config.get("block_exclude_first_token") else "no",
        evaluations=rows,
        judges=judges,
        diagnostics=[(key, _format_value(value)) for key, value in (diagnostics or {}).items()],
        diagnostics_plot=diagnostics_plot,
        hyperparameters=[(key, _format_value(value)) for key, value in hyperparameters.items()],
        training_results=make_markdown_table(training_results) if training_results else None,
        eval_results=[(key, _format_value(value)) for key, value in (eval_results or {}).items()],
        framework_versions=sorted((blockem_config.get("library_versions") or library_versions()).items()),
        citation=CITATION,
    )


def model_card_from_trainer(
    trainer,
    blockem_config: dict[str, Any],
    *,
    model_name: str | None = None,
    datasets: str | list[str] | None = None,
    license: str | None = None,
    language: str | list[str] | None = None,
    tags: str | list[str] | None = None,
    evaluations: list[dict] | None = None,
    diagnostics: dict[str, Any] | None = None,
    diagnostics_plot: str | None = None,
) -> ModelCard:
    """The card of a trainer's run: its hyperparameters and results table from transformers' own helpers.

    Args:
        trainer ([`~transformers.Trainer`]): a BLOCK-EM trainer (any `Trainer` works).
        blockem_config (`dict`): the run's `blockem_config.json` content.
        model_name (`str`, *optional*): defaults to the last part of `hub_model_id`, else of `output_dir`.
        Other args: as in [`generate_blocked_model_card`].

    Returns:
        [`~huggingface_hub.ModelCard`]
    """
    from transformers.modelcard import extract_hyperparameters_from_trainer, parse_log_history

    args = trainer.args
    repo_id = getattr(trainer, "hub_model_id", None) or args.hub_model_id
    if model_name is None:
        model_name = (repo_id or Path(args.output_dir).name).split("/")[-1]
    _, lines, eval_results = parse_log_history(trainer.state.log_history)
    tag_list = [tags] if isinstance(tags, str) else list(tags or [])
    tag_list += list(getattr(trainer, "_tag_names", []) or [])
    tag_list += list(getattr(trainer.model, "model_tags", None) or [])
    return generate_blocked_model_card(
        blockem_config,
        model_name=model_name,
        repo_id=repo_id,
        peft=hasattr(trainer.model, "peft_config"),
        datasets=[datasets] if isinstance(datasets, str) else datasets,
        license=license,
        language=language,
        tags=tag_list,
        hyperparameters=extract_hyperparameters_from_trainer(trainer),
        training_results=lines,
        eval_results=eval_results,
        evaluations=evaluations,
        diagnostics=diagnostics,
        diagnostics_plot=diagnostics_plot,
    )
