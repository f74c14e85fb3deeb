"""The demo's report folder: `report.json`, `report.md` and its plots."""

from __future__ import annotations

import json
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
            "**No latent passed the causal screen on this seed: the blocked run uses the largest activation "
            "shifts instead (uncalibrated).**",
        ]
    blocked = "; ".join(
        f"{s['sae']} (decoder layer {s['layer']}): K+ = {s['plus']}, K− = {s['minus']}" for s in report["latent_set"]
    )
    control = "; ".join(
        f"layer {s['layer']}: K+ = {s['plus']}, K− = {s['minus']}" for s in report["random_control_set"]
    )
    lines += [
        "",
        "Change of out-of-domain EM relative to narrow FT: "
        + ", ".join(f"{k.replace('_', ' ')} {-v:+.0%}" if v is not None else f"{k} –" for k, v in reductions.items()),
        "",
        f"Blocked latents: {blocked}. Random control (same SAE, sizes and signs, latents matched on firing rate): {control}.",
        "",
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
