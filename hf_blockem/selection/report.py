"""The selection report: `report.json`, `report.md` and PNG plots (Δ_k ranking, induce / repair screen, α sweeps)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .pipeline import LayerSelection, SelectionResult


def _plot_layer(run: LayerSelection, output_dir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    files = []
    selected = {c.candidate.latent for c in run.selected}
    base, mis = run.baseline["base"], run.baseline["misaligned"]

    order = torch.argsort(run.delta.abs(), descending=True)[:20].tolist()
    fig, ax = plt.subplots(figsize=(7, 3.2))
    colors = ["tab:red" if k in selected else "tab:gray" for k in order]
    ax.bar(range(len(order)), [float(run.delta[k]) for k in order], color=colors)
    ax.set_xticks(range(len(order)), [str(k) for k in order], rotation=90, fontsize=7)
    ax.axhline(0, color="black", linewidth=0.5)
    ax.set(xlabel="latent", ylabel="Δ_k (misaligned − base)", title=f"{run.name}: largest activation shifts")
    fig.tight_layout()
    name = f"{run.name}_shifts.png"
    fig.savefig(output_dir / name, dpi=120)
    plt.close(fig)
    files.append(name)

    if run.screen:
        fig, ax = plt.subplots(figsize=(7, 3.2))
        labels = [f"{r.candidate.latent}{'+' if r.candidate.sign > 0 else '−'}" for r in run.screen]
        x = range(len(run.screen))
        ax.bar([i - 0.2 for i in x], [r.induction(base) for r in run.screen], width=0.4, label="induction (base)")
        ax.bar([i + 0.2 for i in x], [r.repair_gain(mis) for r in run.screen], width=0.4, label="repair (misaligned)")
        ax.set_xticks(list(x), labels, rotation=90, fontsize=7)
        ax.axhline(0, color="black", linewidth=0.5)
        ax.set(ylabel="Δ EM rate", title=f"{run.name}: induce / repair screen")
        ax.legend(fontsize=7)
        fig.tight_layout()
        name = f"{run.name}_screen.png"
        fig.savefig(output_dir / name, dpi=120)
        plt.close(fig)
        files.append(name)

    if run.calibrations:
        fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.2), sharex=True)
        for c in run.calibrations:
            label = f"{c.candidate.latent}{'+' if c.candidate.sign > 0 else '−'}"
            style = "-" if c.candidate.latent in selected else ":"
            measured = c.multipliers[: len(c.repair)]  # the sweep stops after the first strength over the budget
            left.plot(measured, [r.em_rate for r in c.repair], style, marker="o", markersize=3, label=label)
            right.plot(measured, [r.incoherence_rate for r in c.repair], style, marker="o", markersize=3)
        first = run.calibrations[0]
        label = f"budget (+{first.budget:.0%})" if first.relative else f"budget ({first.budget:.0%})"
        right.axhline(first.incoherence_limit(mis), color="tab:red", linestyle="--", linewidth=1, label=label)
        left.axhline(mis.em_rate, color="black", linewidth=0.5)
        left.set(xscale="log", xlabel="repair strength (× typical activation)", ylabel="EM rate (misaligned model)")
        right.set(xscale="log", xlabel="repair strength (× typical activation)", ylabel="incoherence rate")
        left.legend(fontsize=6, ncol=2)
        right.legend(fontsize=7)
        fig.suptitle(f"{run.name}: α sweeps (solid: selected)")
        fig.tight_layout()
        name = f"{run.name}_alpha_sweeps.png"
        fig.savefig(output_dir / name, dpi=120)
        plt.close(fig)
        files.append(name)
    return files


def _markdown(result: SelectionResult, plots: dict[str, list[str]]) -> str:
    lines = ["# Latent selection report", ""]
    if result.latent_set is None:
        lines += ["**No latent was selected**: no candidate repaired misalignment within the incoherence budget.", ""]
    if result.compared:
        lines += [
            "## SAEs compared",
            "",
            "Kept by a trial blocked fine-tune of every combination, judged on the selection prompts; group repair is "
            "shown for comparison."
            if result.chosen_by == "trial"
            else f"Kept by group repair ({'the best SAE per layer' if result.choose == 'all' else 'the best SAE'}).",
            "",
            "| SAE | layer | width | group repair (Δ aligned & coherent share) | kept |",
            "|---|---|---|---|---|",
        ]
        kept = {r.name for r in result.layers}
        for run in result.compared:
            lines.append(
                f"| {run.name} | {run.layer} | {run.d_sae} | {run.group_repair_gain:+.3f} | "
                f"{'yes' if run.name in kept else ''} |"
            )
        lines.append("")
    for run in result.compared or result.layers:
        base, mis = run.baseline["base"], run.baseline["misaligned"]
        lines += [
            f"## {run.name} (decoder layer {run.layer}, {run.d_sae} latents)",
            "",
            f"Selection prompts: base EM {base.em_rate:.1%}, misaligned EM {mis.em_rate:.1%} "
            f"({mis.n} answers each). Rule: `{run.rule_used}`.",
            "",
            f"Selected: K+ = {run.plus}, K− = {run.minus}. Steering all of them away at their calibrated strengths: "
            f"EM {mis.em_rate:.1%} → {run.group_repair.em_rate:.1%}, incoherence {mis.incoherence_rate:.1%} → "
            f"{run.group_repair.incoherence_rate:.1%}."
            if run.group_repair is not None
            else "Selected: nothing.",
            "",
            f"Stage 2 (steering at {run.screen[0].multiplier if run.screen else '–'} × typical activation):",
            "",
            "| latent | sign | Δ_k | induction on base (Δ EM) | repair on misaligned (Δ EM) | incoherence when repairing |",
            "|---|---|---|---|---|---|",
            *[
                f"| {r.candidate.latent} | {'+' if r.candidate.sign > 0 else '−'} | {r.candidate.delta:+.4f} | "
                f"{r.induction(base):+.3f} | {r.repair_gain(mis):+.3f} | {r.repair.incoherence_rate:.1%} |"
                for r in run.screen
            ],
            "",
            "Stage 3 (calibration of the shortlist):",
            "",
            "| latent | sign | Δ_k | calibrated strength (× act.) | α | repair efficiency | induction |",
            "|---|---|---|---|---|---|---|",
        ]
        for c in run.calibrations:
            mark = " **(selected)**" if c in run.selected else ""
            lines.append(
                f"| {c.candidate.latent}{mark} | {'+' if c.candidate.sign > 0 else '−'} | {c.candidate.delta:+.4f} | "
                f"{c.repair_multiplier} | {c.alpha:.3f} | {c.repair_efficiency(mis):+.3f} | {c.induction(base):+.3f} |"
            )
        lines += [""] + [f"![{name}]({name})" for name in plots.get(run.name, [])] + [""]
    return "\n".join(lines)


def write_report(result: SelectionResult, output_dir: Path) -> Path:
    output_dir.mkdir(parents=True, exist_ok=True)
    plots = {run.name: _plot_layer(run, output_dir) for run in result.compared or result.layers}
    (output_dir / "report.json").write_text(json.dumps(result.to_dict(), indent=2))
    (output_dir / "report.md").write_text(_markdown(result, plots))
    if result.latent_set is not None:
        result.latent_set.save_pretrained(output_dir / "latent_set")
    return output_dir
