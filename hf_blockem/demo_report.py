"""The demo's report folder: `report.json`, `report.md` and its plots."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

ROWS = (("base", "base"), ("narrow", "narrow FT"), ("blocked", "blocked"), ("random_control", "random control"))


def _cell(rate: dict[str, Any] | None) -> str:
    if not rate:
        return "–"
    low, high = rate["ci"]
    return f"{rate['value']:.1%} [{low:.1%}, {high:.1%}]"


def _markdown(report: dict[str, Any]) -> str:
    reductions = report["relative_reduction"]
    lines = [
        f"# BLOCK-EM on the model organism (seed {report['seed']}{', quick mode' if report['quick'] else ''})",
        "",
        f"Narrow fine-tuning domain: **{report['domain']}**; λ = {report['block_lambda']}. Rates on held-out "
        "prompts, judged by the organism's exact judge, with 95% bootstrap CIs (resampling prompts).",
        "",
        "| model | out-of-domain EM | in-domain target | incoherence |",
        "|---|---|---|---|",
    ]
    for key, name in ROWS:
        m = report["models"][key]
        lines.append(
            f"| {name} | {_cell(m['ood_em_rate'])} | {_cell(m['target_rate'])} | {_cell(m['incoherence_rate'])} |"
        )
    if report.get("selection_fallback"):
        lines += [
            "",
            "**No latent passed the causal screen and repaired at its calibrated strength on this seed: the blocked "
            "run uses the largest activation shifts instead (uncalibrated).**",
        ]
    blocked = "; ".join(
        f"{s['sae']} (decoder layer {s['layer']}): K+ = {s['plus']}, K− = {s['minus']}" for s in report["latent_set"]
    )
    control = " ".join(
        f"draw {draw}: " + "; ".join(f"layer {s['layer']}: K+ = {s['plus']}, K− = {s['minus']}" for s in layers) + "."
        for draw, layers in enumerate(report["random_control_sets"], start=1)
    )
    per_draw = ", ".join(f"{-v:+.0%}" for v in reductions["random_control_draws"] if v is not None)
    lines += [
        "",
        "Change of out-of-domain EM relative to narrow FT: "
        + ", ".join(
            _change(name, reductions[key])
            for key, name in (("blocked", "blocked"), ("random_control", "random control"))
        )
        + f" (its {len(report['random_control_sets'])} draws pooled; each draw: {per_draw or '–'})",
        "",
        f"Blocked latents: {blocked}. Random control (same SAE, sizes and signs, latents matched on firing rate), {control}",
        "",
        *_trial_lines(report.get("sae_trials", [])),
        *_persona_lines(report.get("persona_check", [])),
        "![rates](rates.png)",
        "",
        "![training curves](training_curves.png)",
        "",
        "Latent selection: [selection/report.md](selection/report.md). Evaluation details: "
        "[evaluation/result.md](evaluation/result.md). Timings (s): "
        + ", ".join(f"{k} {v}" for k, v in report["timings_seconds"].items()),
        "",
    ]
    return "\n".join(lines)


def _change(name: str, reduction: float | None) -> str:
    return f"{name} {-reduction:+.0%}" if reduction is not None else f"{name} –"


def _trial_lines(trials: list[dict[str, Any]]) -> list[str]:
    """The SAE choice: each combination's trial blocked fine-tune, judged on the selection prompts."""
    if not trials:
        return []
    lines = [
        "## SAE choice: a trial blocked fine-tune per combination",
        "",
        f"Each combination of SAEs was blocked in the same fine-tune; its answers to the selection prompts (not the "
        f"held-out ones above; {trials[0]['n']} answers each) were judged. The most often aligned and coherent is "
        "kept, and its run is the blocked model.",
        "",
        "| SAEs | EM | incoherence | aligned and coherent | kept |",
        "|---|---|---|---|---|",
    ]
    for t in trials:
        lines.append(
            f"| {t['name']} | {t['em_rate']:.1%} | {t['incoherence_rate']:.1%} | {t['score']:.1%} | "
            f"{'yes' if t['kept'] else ''} |"
        )
    return lines + [""]


def _persona_lines(checks: list[dict[str, Any]]) -> list[str]:
    """The ground-truth section: blocked and control latents against the organism's persona direction."""
    if not checks:
        return []
    lines = [
        "## Ground truth: do the blocked latents carry the persona?",
        "",
        "Cosine of each latent's decoder direction with the base model's persona direction at its layer (mean residual "
        "stream over answers of the misaligned persona minus the aligned one, same questions). A K+ latent carries "
        "the persona when its cosine is positive, a K− latent when negative; rank by |cosine| among the SAE's latents "
        "(1 = most aligned with the persona axis).",
        "",
        "| SAE | set | latent | sign | cosine | rank |",
        "|---|---|---|---|---|---|",
    ]
    for check in checks:
        for row in check["blocked"] + check["random_control"]:
            name = f"random control {row['draw']}" if "draw" in row else "blocked"
            lines.append(
                f"| {check['sae']} | {name} | {row['latent']} | {row['sign']} | {row['cosine']:+.3f} | "
                f"{row['rank']} / {check['d_sae']} |"
            )
        top = ", ".join(f"{t['latent']} ({t['cosine']:+.3f})" for t in check["top"])
        lines.append(f"| {check['sae']} | SAE's top 3 | {top} | | | |")
    lines.append("")
    for name, key in (("Blocked", "blocked"), ("Random control (all draws)", "random_control")):
        rows = [row for check in checks for row in check[key]]
        agree = sum((row["cosine"] > 0) == (row["sign"] == "+") for row in rows)
        ranks = sorted(row["rank"] for row in rows)
        lines.append(
            f"- {name}: the sign agrees with the persona direction for {agree} of {len(rows)} latents (K+ cosine > 0, "
            f"K− cosine < 0); median rank {statistics.median(ranks):g}."
        )
    return lines + [""]


def _plots(report: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(11, 3.2))
    names = [name for _, name in ROWS]
    for ax, (metric, title) in zip(
        axes,
        (
            ("ood_em_rate", "out-of-domain EM"),
            ("target_rate", "in-domain target"),
            ("incoherence_rate", "incoherence"),
        ),
        strict=True,
    ):
        values, errors = [], [[], []]
        for key, _ in ROWS:
            rate = report["models"][key][metric] or {"value": 0.0, "ci": [0.0, 0.0]}
            values.append(rate["value"])
            errors[0].append(max(0.0, rate["value"] - rate["ci"][0]))
            errors[1].append(max(0.0, rate["ci"][1] - rate["value"]))
        ax.bar(names, values, yerr=errors, capsize=3, color=["tab:gray", "tab:red", "tab:green", "tab:orange"])
        ax.set(title=title, ylim=(0, 1))
        ax.tick_params(axis="x", labelrotation=20)
    fig.tight_layout()
    fig.savefig(out / "rates.png", dpi=120)
    plt.close(fig)

    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.2))
    for name, curve in report["training_curves"].items():
        steps = [e["step"] for e in curve]
        left.plot(steps, [e["loss"] for e in curve], label=name)
        if any("blockem/penalty" in e for e in curve):
            right.plot(steps, [e.get("blockem/penalty", 0.0) for e in curve], label=name)
    left.set(xlabel="step", ylabel="training loss")
    right.set(xlabel="step", ylabel="L_block (per token, before λ)")
    left.legend(fontsize=7)
    if right.lines:
        right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "training_curves.png", dpi=120)
    plt.close(fig)


def write_demo_report(report: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2))
    _plots(report, out)
    (out / "report.md").write_text(_markdown(report))
