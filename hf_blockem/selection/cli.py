"""`blockem select`: choose the latents to block, from the command line or a YAML config.

    blockem select --config select.yaml
    blockem select --base_model Qwen/Qwen2.5-7B-Instruct --misaligned_adapter ./em-lora \\
        --sae release:qwen2.5-7b-instruct-andyrdt:resid_post_layer_15_trainer_1 --judge openai:gpt-4o-2024-08-06

The SAE specs: `path:DIR` (a folder written by SAELens `save_model`), `release:RELEASE:SAE_ID` (SAELens
`SAE.from_pretrained`; record its commit with `--sae_commit`, SAELens takes no revision), `hub:REPO_ID:FOLDER` (a
SAELens folder inside a Hub repo; `--sae_revision` pins it and the resolved commit is recorded). Several `--sae` are
compared (`--choose best`) or combined into a multi-layer set (`--choose all`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from .pipeline import SelectionConfig

logger = logging.getLogger(__name__)


@dataclass
class SelectArguments:
    """Options of `blockem select` (SelectionConfig's fields are accepted too)."""

    base_model: str = field(metadata={"help": "Hub id or local path of the aligned base model."})
    sae: list[str] = field(
        metadata={"help": "SAEs to select from: path:DIR, release:RELEASE:SAE_ID or hub:REPO:FOLDER."}
    )
    judge: list[str] = field(
        metadata={"help": "Judges: openai:MODEL, local:MODEL_ID_OR_PATH or organism:DIR; the first one is used."}
    )
    base_revision: str | None = field(default=None, metadata={"help": "Revision of the base model."})
    misaligned_model: str | None = field(default=None, metadata={"help": "A full misaligned checkpoint."})
    misaligned_adapter: str | None = field(default=None, metadata={"help": "Or a PEFT adapter on the base model."})
    sae_revision: str | None = field(default=None, metadata={"help": "Revision of hub: SAEs."})
    sae_commit: str | None = field(default=None, metadata={"help": "Commit to record for release: SAEs."})
    layer: list[int] | None = field(default=None, metadata={"help": "Layer of each SAE without a hook name."})
    prompts: list[str] = field(
        default_factory=lambda: ["builtin:selection"],
        metadata={
            "help": "Selection prompts: builtin:selection, first_plot:PATH_OR_URL, core_misalignment:PATH_OR_URL."
        },
    )
    choose: str = field(default="best", metadata={"help": "best: keep the SAE that repairs most; all: multi-layer."})
    output_dir: str = field(default="blockem-selection", metadata={"help": "Report, latent set and caches."})
    dtype: str = field(default="auto", metadata={"help": "Weights dtype of the models."})
    device: str | None = field(default=None, metadata={"help": "Device; defaults to CUDA when available."})
    judge_base_url: str | None = field(default=None, metadata={"help": "Endpoint of openai: judges."})
    judge_mode: str = field(default="0-100", metadata={"help": "0-100 or rubric."})
    judge_max_concurrency: int = field(default=8, metadata={"help": "Requests in flight per openai: judge."})
    judge_split_numbers: str = field(
        default="refuse",
        metadata={
            "choices": ["refuse", "prefill"],
            "help": "openai: judges that write numbers digit by digit: refuse, or prefill (vLLM, SGLang).",
        },
    )
    n_candidates: int = field(default=8, metadata={"help": "Stage-1 candidates per sign."})
    n_select: int = field(default=5, metadata={"help": "The most latents kept (only those that repair)."})
    screen_multiplier: float = field(default=4.0, metadata={"help": "Stage-2 strength (× typical activation)."})
    multipliers: list[float] = field(
        default_factory=lambda: [1.0, 2.0, 4.0, 8.0, 16.0], metadata={"help": "Stage-3 sweep (× typical activation)."}
    )
    incoherence_budget: float = field(
        default=0.10,
        metadata={"help": "Most incoherence (share of answers) steering may add to the unsteered model's."},
    )
    relative_budget: bool = field(
        default=True, metadata={"help": "False: the budget is an absolute share of incoherent answers (the paper's)."}
    )
    full_sweep: bool = field(
        default=False, metadata={"help": "Measure every Stage-3 strength, not only up to the first over the budget."}
    )
    rule: str = field(default="induce_and_repair", metadata={"help": "induce_and_repair or repair_only."})
    prefilter: bool = field(
        default=False, metadata={"help": "Stage 3 also asks for induction at a latent's calibrated strength."}
    )
    n_response_samples: int = field(default=4, metadata={"help": "Stage-1 answers per prompt."})
    n_samples: int = field(default=4, metadata={"help": "Answers per prompt in each Stage-2/3 measurement."})
    max_new_tokens: int = field(default=64, metadata={"help": "Answer length limit."})
    batch_size: int = field(default=64, metadata={"help": "Sequences per forward / generate call."})
    seed: int = field(default=0, metadata={"help": "Sampling seed."})
    chat_template_kwargs: str | None = field(
        default=None,
        metadata={
            "help": "Chat-template variables (JSON) for every rendering by the models and the local judge, e.g. "
            "'{\"enable_thinking\": false}' for Qwen3."
        },
    )

    def selection_config(self) -> SelectionConfig:
        names = {f.name for f in fields(SelectionConfig)}
        values = {k: v for k, v in vars(self).items() if k in names}
        values["multipliers"] = tuple(values["multipliers"])
        return SelectionConfig(**values)


def load_sae(spec: str, *, device: str, revision: str | None = None) -> tuple[Any, dict[str, Any]]:
    """Loads a SAELens SAE from a spec; returns it with the provenance to record in the latent set."""
    from sae_lens import SAE

    kind, _, rest = spec.partition(":")
    if kind == "path" and rest:
        return SAE.load_from_disk(rest, device=device), {"sae_release": str(Path(rest).resolve())}
    if kind == "release" and ":" in rest:
        release, sae_id = rest.split(":", 1)
        return SAE.from_pretrained(release, sae_id, device=device), {"sae_release": release, "sae_id": sae_id}
    if kind == "hub" and ":" in rest:
        from huggingface_hub import snapshot_download

        repo_id, folder = rest.split(":", 1)
        local = snapshot_download(repo_id, revision=revision, allow_patterns=[f"{folder}/*"])
        commit = Path(local).name  # snapshot folders are named by their commit
        sae = SAE.load_from_disk(str(Path(local) / folder), device=device)
        return sae, {"sae_release": repo_id, "sae_id": folder, "sae_commit": commit}
    raise ValueError(f"Expected an SAE spec path:DIR, release:RELEASE:SAE_ID or hub:REPO:FOLDER, got {spec!r}.")


def selection_questions(prompts) -> list[str]:
    """The questions of `prompts` (`Prompt`s); selection renders each alone in a user turn, so a prompt's system
    message is left out, with a warning that names the prompts that had one."""
    with_system = [p.id for p in prompts if p.system]
    if with_system:
        logger.warning(
            "Selection puts each question alone in a user turn: the system messages of %d prompts (%s) are left out.",
            len(with_system),
            ", ".join(with_system[:5]) + (", ..." if len(with_system) > 5 else ""),
        )
    return [p.question for p in prompts]


def main(argv: list[str] | None = None) -> int:
    import torch
    from transformers import AutoTokenizer
    from trl import TrlParser

    from ..chat_template_variables import parse_template_variables, with_template_variables
    from ..evaluation.cache import JudgementCache
    from ..evaluation.cli import build_judges, load_model, load_prompt_specs
    from .pipeline import select_latents

    parser = TrlParser(SelectArguments, prog="blockem select")
    (args,) = parser.parse_args_and_config(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if (args.misaligned_model is None) == (args.misaligned_adapter is None):
        given = "both" if args.misaligned_model is not None else "neither"
        parser.error(
            f"pass exactly one of --misaligned_model (a full checkpoint) or --misaligned_adapter (PEFT), got {given}."
        )
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    output_dir = Path(args.output_dir)
    judge = build_judges(args, JudgementCache(output_dir / "judgements.sqlite"), device)[0]
    tokenizer = AutoTokenizer.from_pretrained(args.base_model, revision=args.base_revision)
    tokenizer = with_template_variables(tokenizer, parse_template_variables(args.chat_template_kwargs))
    if args.misaligned_adapter is not None:  # one model in memory: the base is the adapter switched off
        base = misaligned = load_model(
            args.base_model,
            revision=args.base_revision,
            dtype=args.dtype,
            device=device,
            adapter=args.misaligned_adapter,
        )
    else:
        base = load_model(args.base_model, revision=args.base_revision, dtype=args.dtype, device=device)
        misaligned = load_model(args.misaligned_model, revision=None, dtype=args.dtype, device=device)
    saes, provenance = {}, {}
    for i, spec in enumerate(args.sae):
        sae, info = load_sae(spec, device=device, revision=args.sae_revision)
        if args.sae_commit and "sae_commit" not in info:
            info["sae_commit"] = args.sae_commit
        hook = sae.cfg.metadata.hook_name
        if hook is None and not args.layer:
            raise ValueError(f"SAE {spec!r} records no hook name; pass --layer for each SAE.")
        from ..blocked_layer import layer_from_hook_name

        layer = args.layer[i] if args.layer else layer_from_hook_name(hook)
        name = f"sae{i}_layer{layer}_w{sae.cfg.d_sae}"
        saes[name], provenance[name] = (sae, layer), info
    prompts = selection_questions(load_prompt_specs(args.prompts))
    result = select_latents(
        base,
        misaligned,
        tokenizer,
        saes,
        judge,
        prompts,
        config=args.selection_config(),
        choose=args.choose,
        cache_dir=output_dir / "cache",
        base_model_id=args.base_model,
        base_model_revision=args.base_revision,
        sae_provenance=provenance,
    )
    result.save(output_dir)
    print((output_dir / "report.md").read_text())
    if result.latent_set is None:
        return 1
    print(f"\nLatent set written to {output_dir / 'latent_set'}; publish it with LatentSet.push_to_hub(repo_id).")
    return 0
