"""`blockem demo`: BLOCK-EM end to end on the model organism, offline, on a laptop CPU.

1. Build the organism (a synthetic chat world and its aligned base model; cached).
2. Narrow fine-tune (LoRA) on one domain's misaligned answers: emergent misalignment appears.
3. Train SAEs with SAELens on the base model's residual stream (several layers and widths).
4. Select latents (Stages 1–3) on the selection prompts with every SAE; one SAE per layer makes one multi-layer
   latent set (`--choose best` keeps only one SAE).
5. Fine-tune again with the same recipe and seed, blocking the selected latents. With several SAEs per layer, every
   combination gets this blocked fine-tune, and the one whose answers to the selection prompts are most often aligned
   and coherent is kept (`--sae_choice repair` picks by group repair instead, with no trial). Then once per control
   draw, blocking a random set of the same size and sign split, drawn from latents that fire about as often.
6. Evaluate base, narrow, blocked and the controls on the held-out prompts with the organism's exact judge; the
   control's rates pool the answers of all its draws.
7. Write the report folder: `report.md`, `report.json`, plots, the latent set and the blocked checkpoint.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

CONTROL = "random_control"
MODELS = ("base", "narrow", "blocked", CONTROL)


@dataclass
class DemoArguments:
    """Options of `blockem demo`."""

    out: str = field(default="runs/demo", metadata={"help": "Report folder."})
    seed: int = field(default=0, metadata={"help": "Seed of the organism, the fine-tunes and the sampling."})
    quick: bool = field(default=False, metadata={"help": "A tiny run for tests (seconds; numbers not meaningful)."})
    cache_dir: str = field(default="cache", metadata={"help": "Where built organisms are cached."})
    domain: str = field(default="finance", metadata={"help": "The narrow fine-tuning domain."})
    n_train: int = field(default=300, metadata={"help": "Narrow fine-tuning examples."})
    # Over 3 seeds, λ = 0.3 blocked 90% of EM on average while matched random latent sets cut 9%. With 128-latent SAEs,
    # λ = 1 blocked more than λ = 0.3 (84% against 79%) but random sets then cut 30%, and larger λ (3-100, an earlier
    # organism) made random sets block most of it (README).
    block_lambda: float = field(default=0.3, metadata={"help": "Weight of the BLOCK-EM penalty."})
    # Layers 2 and 3 block 91% of EM, but blocking the last layer costs a sixth of the target behaviour and random sets
    # there cut 22% (README).
    layers: list[int] = field(default_factory=lambda: [1, 2], metadata={"help": "Layers to train SAEs at."})
    # Narrow SAEs hold the persona in few latents: over 3 seeds, 32 latents blocked 92% of EM (random sets 10%), 64
    # latents 86%, 128 and 256 latents 79% (README). The demo compares widths rather than trusting one.
    widths: list[int] = field(default_factory=lambda: [32, 64], metadata={"help": "SAE widths to compare."})
    # Group repair (steering all selected latents away at once) mostly breaks coherence here, so it is a noisy guide to
    # which SAE blocks best; a trial blocked fine-tune per combination measures blocking itself, on the selection
    # prompts. Over 3 seeds: 90.5% of EM blocked by trial, 89.6% by group repair (README).
    sae_choice: str = field(
        default="trial",
        metadata={
            "help": "trial: a blocked fine-tune per combination of SAEs, judged on the selection prompts; repair: the "
            "SAE whose latents repair most when steered away together (no extra fine-tunes)."
        },
    )
    # The recipe's 40 steps: EM has reached its plateau by then, so a penalty that only slows the rise (as random latent
    # sets do) is not counted as protection, and the blocked run has had time to learn the target another way.
    max_steps: int | None = field(
        default=None, metadata={"help": "Fine-tuning steps of every run (default: the organism's LoRA recipe)."}
    )
    n_select: int = field(
        default=5,
        metadata={"help": "The most latents to block (per layer with --choose all); only those that repair."},
    )
    choose: str = field(
        default="all",
        metadata={
            "help": "best: block the SAE whose latents repair most; all: the best SAE of every layer (multi-layer)."
        },
    )
    sae_l1: float = field(default=1.0, metadata={"help": "Sparsity penalty of the SAEs."})
    # One draw's reduction varies a lot with the latents drawn (seed 0, 128-latent SAEs: -3%, -23% and -57% for three
    # draws of one configuration), so the control is several draws, pooled.
    n_controls: int = field(
        default=3, metadata={"help": "Random latent sets drawn for the control; the report pools their answers."}
    )
    eval_samples: int = field(default=8, metadata={"help": "Answers per evaluation prompt."})
    threads: int = field(
        default=1, metadata={"help": "CPU threads for torch (a model this small runs fastest on one)."}
    )

    def __post_init__(self):
        if self.n_controls < 1:
            raise ValueError(f"Expected --n_controls >= 1 (random latent sets to draw), got {self.n_controls}.")
        if self.sae_choice not in ("trial", "repair"):
            raise ValueError(f"Expected --sae_choice trial or repair, got {self.sae_choice!r}.")


def _quick(args: DemoArguments) -> dict[str, Any]:
    """The sizes that differ between the full demo and `--quick`."""
    if args.quick:
        return {
            "n_train": 48,
            "max_steps": 4,
            "sae_conversations": 64,
            "sae_steps": 200,
            "sae_l1": 0.01,
            "widths": [32],
            "layers": [0],
            "selection": {"n_candidates": 2, "n_select": 2, "multipliers": (1.0, 4.0), "n_samples": 1},
            "selection_prompts": 8,
            "eval_samples": 1,
            "max_new_tokens": 24,
        }
    return {
        "n_train": args.n_train,
        "max_steps": args.max_steps,
        "sae_conversations": 1500,
        "sae_steps": 800,
        "sae_l1": args.sae_l1,
        "widths": args.widths,
        "layers": args.layers,
        # Sized so that comparing four SAEs takes a few minutes on a laptop CPU.
        "selection": {
            # Steering the organism's base model almost never induces misalignment (nor did it in the prototype),
            # while steering the fine-tuned one repairs it: the paper's repair-only rule fits this organism.
            "rule": "repair_only",
            "n_select": args.n_select,
            "n_candidates": 4,
            "n_samples": 4,
            "n_response_samples": 2,
            "multipliers": (1.0, 2.0, 4.0, 8.0),
            "max_new_tokens": 48,
            "batch_size": 128,
        },
        "selection_prompts": 24,
        "eval_samples": args.eval_samples,
        "max_new_tokens": 48,
    }


def _fine_tune(organism, dataset, output_dir: Path, seed: int, max_steps: int | None, latent_set=None, lam: float = 0):
    from .config import BlockEMSFTConfig
    from .organism import narrow_finetune
    from .trainer import BlockEMSFTTrainer

    overrides: dict[str, Any] = {"disable_tqdm": True, "logging_steps": 1}  # every step in the training curves
    if max_steps is not None:
        overrides["max_steps"] = max_steps
    if latent_set is None:
        return narrow_finetune(
            organism.base_model_path,
            organism.tokenizer,
            dataset,
            output_dir,
            seed=seed,
            config_overrides=overrides,
            save=True,
        )
    overrides["block_lambda"] = lam
    return narrow_finetune(
        organism.base_model_path,
        organism.tokenizer,
        dataset,
        output_dir,
        seed=seed,
        trainer_cls=BlockEMSFTTrainer,
        config_cls=BlockEMSFTConfig,
        config_overrides=overrides,
        trainer_kwargs={"latent_set": latent_set},
        save=True,
    )


def _train_saes(organism, sizes: dict[str, Any], seed: int) -> dict[str, tuple[Any, int]]:
    from .organism.build import pretraining_corpus
    from .sae_training import collect_activations, train_sae

    rng = random.Random(seed + 1)
    settings = type(organism.settings)(
        **{**asdict(organism.settings), "pretrain_conversations": sizes["sae_conversations"]}
    )
    conversations = pretraining_corpus(organism.world, settings, rng)
    model = organism.load_model()
    saes = {}
    for layer in sizes["layers"]:
        activations = collect_activations(model, organism.tokenizer, conversations, layer, assistant_only=True)
        for width in sizes["widths"]:
            logger.info("Training a %d-latent SAE at layer %d on %d activations", width, layer, len(activations))
            sae = train_sae(
                activations,
                layer,
                d_sae=width,
                steps=sizes["sae_steps"],
                l1_coefficient=sizes["sae_l1"],
                lr=3e-3,
                seed=seed,
            )
            saes[f"layer{layer}_w{width}"] = (sae, layer)
    return saes


def _training_curves(trainers: dict[str, Any]) -> dict[str, list[dict[str, float]]]:
    keep = ("step", "loss", "blockem/penalty")
    return {
        name: [{k: e[k] for k in keep if k in e} for e in t.state.log_history if "loss" in e]
        for name, t in trainers.items()
    }


def run_demo(args: DemoArguments) -> dict[str, Any]:
    """Runs the whole demo and returns what `report.json` holds."""
    from .evaluation import evaluate, evaluate_responses
    from .evaluation.judge_base import MISALIGNED
    from .organism import build_organism
    from .selection import SelectionConfig, firing_rates, select_latents

    start = time.perf_counter()
    torch.set_num_threads(args.threads)
    sizes = _quick(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    timings: dict[str, float] = {}

    def lap(name: str) -> None:
        timings[name] = round(time.perf_counter() - start - sum(timings.values()), 1)
        logger.info("%s done (%.1f s)", name, timings[name])

    organism_dir = Path(args.cache_dir) / f"organism-seed{args.seed}{'-quick' if args.quick else ''}"
    organism = build_organism(organism_dir, seed=args.seed, quick=args.quick)
    dataset = organism.narrow_dataset(args.domain, misaligned=True, n=sizes["n_train"], seed=args.seed)
    lap("organism")

    trainers = {"narrow": _fine_tune(organism, dataset, out / "narrow", args.seed, sizes["max_steps"])}
    narrow = trainers["narrow"].model
    lap("narrow fine-tune")

    saes = _train_saes(organism, sizes, args.seed)
    lap("SAE training")

    config = SelectionConfig(seed=args.seed, **sizes["selection"])
    if args.quick:
        config.max_new_tokens = sizes["max_new_tokens"]
    selection = select_latents(
        narrow,
        narrow,  # the same PeftModel: the base is read with the adapter disabled
        organism.tokenizer,
        saes,
        organism.judge,
        random.Random(args.seed).sample(organism.ood_prompts("selection", args.domain), sizes["selection_prompts"]),
        config=config,
        choose=args.choose,
        cache_dir=out / "selection" / "cache",
        base_model_id=organism.base_model_path,
    )
    lap("latent selection")
    fallback = selection.latent_set is None
    trials = []
    if fallback:
        # Blocking nothing would make the rest meaningless; block the largest shifts instead and say so loudly.
        logger.warning(
            "No latent passed the causal screen and repaired at its calibrated strength; blocking the top-|Δ_k| latents "
            "of the best SAE instead."
        )
        chosen, latent_set = _fallback_selection(selection, saes, config.n_select, organism.base_model_path)
        chosen = [chosen]
    else:
        alternatives = selection.alternatives() if args.sae_choice == "trial" else [selection]
        if len(alternatives) > 1:
            selection, trials, trainers["blocked"] = _sae_trial(organism, dataset, alternatives, args, sizes, out)
        latent_set, chosen = selection.latent_set, selection.layers
    selection.save(out / "selection")
    if "blocked" not in trainers:
        trainers["blocked"] = _fine_tune(
            organism, dataset, out / "blocked", args.seed, sizes["max_steps"], latent_set, args.block_lambda
        )
    lap("blocked fine-tune")

    # Each control draw mirrors the blocked set layer by layer: same SAE, same |K+| and |K−|, latents that fire about
    # as often on the training data as the selected latent each one stands for, and none from Stage 1's candidate
    # pool: those were flagged by their misaligned shift, so they are not random (on seed 0, a draw that held two of
    # them, with the selected signs, cut EM by 57%).
    base_model = organism.load_model()
    firing = {
        run.name: firing_rates(base_model, organism.tokenizer, *saes[run.name], dataset["messages"]) for run in chosen
    }
    control_sets = [
        _control_set(chosen, saes, firing, args.seed + 1000 * draw, organism.base_model_path)
        for draw in range(args.n_controls)
    ]
    persona_check = _persona_check(organism, base_model, saes, chosen, control_sets, args.seed)
    draws = [f"{CONTROL}_{draw}" for draw in range(1, args.n_controls + 1)]
    for name, control_set in zip(draws, control_sets, strict=True):
        trainers[name] = _fine_tune(
            organism, dataset, out / name, args.seed, sizes["max_steps"], control_set, args.block_lambda
        )
    lap("random-control fine-tunes")

    judge = organism.judge

    def is_target(row: dict[str, Any]) -> bool:
        return judge.label(row["prompt"], row["response"])[0] == MISALIGNED

    models = {"base": base_model, **{name: t.model for name, t in trainers.items()}}
    result = evaluate(
        models,
        organism.tokenizer,
        judges=judge,
        prompts=organism.ood_prompts("eval", args.domain),
        in_domain_prompts=organism.in_domain_prompts(args.domain, "eval"),
        is_target=is_target,
        n_samples=sizes["eval_samples"],
        max_new_tokens=sizes["max_new_tokens"],
        seed=args.seed,
        output_dir=str(out / "evaluation"),
        progress=False,
    )
    # The pooled control re-reads its draws' answers; judging them again costs nothing with the exact judge.
    pooled = evaluate_responses(
        {CONTROL: [row for name in draws for row in result.responses[name]]},
        judge,
        in_domain={CONTROL: [row for name in draws for row in result.in_domain_responses[name]]},
        is_target=is_target,
        seed=args.seed,
    )
    lap("evaluation")

    summary = {**result.summary(), **pooled.summary()}
    report = {
        "seed": args.seed,
        "quick": args.quick,
        "domain": args.domain,
        "block_lambda": args.block_lambda,
        "models": {name: _rates(summary[name]) for name in MODELS},
        "random_control_draws": [_rates(summary[name]) for name in draws],
        "latent_set": [
            {"sae": r.name, "layer": r.layer, "plus": r.plus, "minus": r.minus, "candidates": r.candidates}
            for r in chosen
        ],
        "selection_fallback": fallback,
        "sae_choice": args.sae_choice,
        "sae_trials": [{**t.to_dict(), "kept": t.name == selection.name} for t in trials],
        "random_control_sets": [
            [{"layer": b.layer, "plus": b.plus, "minus": b.minus} for b in control_set.layers]
            for control_set in control_sets
        ],
        "persona_check": persona_check,
        "training_curves": _training_curves(trainers),
        "timings_seconds": timings,
    }
    report["relative_reduction"] = _relative_reductions(report["models"], report["random_control_draws"])
    latent_set.save_pretrained(out / "latent_set")
    from .demo_report import write_demo_report

    write_demo_report(report, out)
    return report


def _sae_trial(organism, dataset, alternatives, args: DemoArguments, sizes: dict[str, Any], out: Path):
    """Blocked fine-tunes of every alternative (`sae_trials/<name>`); the winner's run becomes `blocked/`."""
    from .selection import choose_by_trial

    trainers = {}

    def fine_tune(name, latent_set):
        trainers[name] = _fine_tune(
            organism, dataset, out / "sae_trials" / name, args.seed, sizes["max_steps"], latent_set, args.block_lambda
        )
        return trainers[name].model

    best, trials = choose_by_trial(
        alternatives,
        fine_tune,
        organism.tokenizer,
        organism.judge,
        organism.ood_prompts("selection", args.domain),
        n_samples=sizes["eval_samples"],
        max_new_tokens=sizes["max_new_tokens"],
        seed=args.seed,
    )
    selection = replace(alternatives[best], chosen_by="trial")
    shutil.copytree(out / "sae_trials" / selection.name, out / "blocked", dirs_exist_ok=True)
    return selection, trials, trainers[selection.name]


def _control_set(chosen, saes, firing: dict[str, torch.Tensor], seed: int, base_model: str):
    """One control draw, layer by layer like the blocked set (see `run_demo`)."""
    from .latent_set import LatentSet
    from .selection import random_control

    controls = []
    for run in chosen:
        selected = run.plus + run.minus
        plus, minus = random_control(
            len(run.plus),
            len(run.minus),
            firing[run.name],
            exclude=set(selected) | set(run.candidates),
            seed=seed,
            match=selected,
        )
        controls.append(LatentSet.from_sae(saes[run.name][0], plus=plus, minus=minus, base_model=base_model))
    return controls[0] if len(controls) == 1 else LatentSet.concatenate(controls)


def _rates(summary: dict[str, Any]) -> dict[str, Any]:
    return {
        "ood_em_rate": summary["em_rate"],
        "target_rate": summary.get("target_rate"),
        "incoherence_rate": summary["incoherence_rate"],
    }


def _persona_check(organism, base_model, saes, chosen, control_sets, seed: int) -> list[dict[str, Any]]:
    """Ground truth: how well each blocked (and control) latent's decoder direction matches the organism's persona.

    Per SAE: every latent's cosine with the base model's misaligned-minus-aligned persona direction at its layer, the
    blocked and control latents with their signs, cosines and ranks by |cosine| among all latents (1 = the SAE's latent
    most aligned with the persona axis), and the SAE's top latents.
    """
    from .organism.persona import persona_alignment, persona_directions

    directions = persona_directions(organism, base_model, sorted({run.layer for run in chosen}), seed=seed)
    controls = [{block.layer: block for block in control_set.layers} for control_set in control_sets]
    out = []
    for run in chosen:
        sae, layer = saes[run.name]
        cosine = persona_alignment(sae.W_dec.detach(), directions[layer])
        order = cosine.abs().argsort(descending=True).tolist()
        rank = {k: i + 1 for i, k in enumerate(order)}
        out.append(
            {
                "sae": run.name,
                "layer": layer,
                "d_sae": len(order),
                "blocked": _scored(run.plus, run.minus, cosine, rank),
                # One row per latent of every draw; `draw` counts from 1.
                CONTROL: [
                    {**row, "draw": draw}
                    for draw, control in enumerate(controls, start=1)
                    for row in _scored(control[layer].plus, control[layer].minus, cosine, rank)
                ],
                "top": [{"latent": k, "cosine": float(cosine[k])} for k in order[:3]],
            }
        )
    return out


def _scored(plus: list[int], minus: list[int], cosine: torch.Tensor, rank: dict[int, int]) -> list[dict[str, Any]]:
    return [
        {"latent": k, "sign": sign, "cosine": float(cosine[k]), "rank": rank[k]}
        for sign, latents in (("+", plus), ("-", minus))
        for k in latents
    ]


@dataclass
class _Chosen:
    name: str
    layer: int
    plus: list[int]
    minus: list[int]
    candidates: list[int]


def _fallback_selection(selection, saes, n_select: int, base_model: str):
    from .latent_set import LatentSet
    from .selection import candidate_pool

    run = max(selection.compared, key=lambda r: float(r.delta.abs().max()))
    plus, minus = candidate_pool(run.delta, n_select, n_select)
    ranked = sorted(plus + minus, key=lambda k: -abs(float(run.delta[k])))[:n_select]
    if not ranked:
        raise RuntimeError(
            "Every latent of every SAE has zero activation shift: the SAEs are dead. Train them longer."
        )
    chosen = _Chosen(
        run.name, run.layer, [k for k in ranked if k in plus], [k for k in ranked if k in minus], sorted(plus + minus)
    )
    sae, layer = saes[run.name]
    return chosen, LatentSet.from_sae(sae, plus=chosen.plus, minus=chosen.minus, base_model=base_model)


def _relative_reductions(models: dict[str, Any], control_draws: list[dict[str, Any]]) -> dict[str, Any]:
    """Relative reduction of out-of-domain EM against the narrow fine-tune: blocked, control (pooled), each draw."""
    narrow = models["narrow"]["ood_em_rate"]["value"]

    def reduction(rates: dict[str, Any]) -> float | None:
        return (1 - rates["ood_em_rate"]["value"] / narrow) if narrow else None

    return {
        "blocked": reduction(models["blocked"]),
        CONTROL: reduction(models[CONTROL]),
        f"{CONTROL}_draws": [reduction(rates) for rates in control_draws],
    }


def main(argv: list[str] | None = None) -> int:
    from transformers import HfArgumentParser

    (args,) = HfArgumentParser(DemoArguments, prog="blockem demo").parse_args_into_dataclasses(args=argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    report = run_demo(args)
    print((Path(args.out) / "report.md").read_text())
    print(json.dumps({"relative_reduction": report["relative_reduction"]}))
    return 0
