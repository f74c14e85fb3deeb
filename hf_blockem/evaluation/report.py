"""The evaluation result and its three faces: JSON for scripts, a Markdown table for people, a quadrant plot."""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .judge_base import Judgement
from .metrics import ALIGNED_THRESHOLD, COHERENT_THRESHOLD, EMMetrics, Rate

logger = logging.getLogger(__name__)

RESULT_FORMAT_VERSION = 1


def _clean(value: Any) -> Any:
    """JSON has no NaN: write `null` instead."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def _file_safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


@dataclass
class EvaluationResult:
    """What `evaluate` measured, for every model and judge.

    Args:
        metrics (`dict[str, dict[str, EMMetrics]]`): model name -> judge name -> metrics.
        judges (`dict[str, dict]`): judge name -> identity (model, endpoint, prompt version, ...).
        target (`dict[str, Rate]`): model name -> in-domain target rate, for the models that have one.
        held_out_loss (`dict[str, float]`): model name -> in-domain held-out loss, for the models that have one.
        agreement (`dict[str, dict[str, dict]]`): model name -> `"judge_a | judge_b"` -> `judge_agreement` output.
        config (`dict`): the generation and evaluation settings.
        responses (`dict[str, list[dict]]`): model name -> generated rows (not written to the JSON; see `save`).
        in_domain_responses (`dict[str, list[dict]]`): model name -> in-domain rows, for the models with a target rate.
        judgements (`dict[str, dict[str, list[Judgement]]]`): model name -> judge name -> one per row.

    The first judge is the primary one: `summary()`, the Markdown table and the plot use it.
    """

    metrics: dict[str, dict[str, EMMetrics]]
    judges: dict[str, dict[str, Any]]
    target: dict[str, Rate] = field(default_factory=dict)
    held_out_loss: dict[str, float] = field(default_factory=dict)
    agreement: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    responses: dict[str, list[dict[str, Any]]] = field(default_factory=dict, repr=False)
    in_domain_responses: dict[str, list[dict[str, Any]]] = field(default_factory=dict, repr=False)
    judgements: dict[str, dict[str, list[Judgement]]] = field(default_factory=dict, repr=False)

    @property
    def primary_judge(self) -> str:
        return next(iter(self.judges))

    def __getitem__(self, model: str) -> EMMetrics:
        """The primary judge's metrics of one model: `result["base"].em_rate`."""
        return self.metrics[model][self.primary_judge]

    def summary(self) -> dict[str, dict[str, Any]]:
        """Per model, the headline numbers with their CIs under the primary judge:
        `{"base": {"em_rate": {"value", "ci", "count", "n"}, "incoherence_rate": ..., "refusal_rate": ...,
        "unscored_rate": ..., "target_rate": ... (when measured)}}`."""
        out: dict[str, dict[str, Any]] = {}
        for model in self.metrics:
            m = self[model]
            out[model] = {
                "em_rate": m.em_rate.to_dict(),
                "incoherence_rate": m.incoherence_rate.to_dict(),
                "refusal_rate": m.refusal_rate.to_dict(),
                "unscored_rate": m.unscored_rate.to_dict(),
            }
            if model in self.target:
                out[model]["target_rate"] = self.target[model].to_dict()
            if model in self.held_out_loss:
                out[model]["held_out_loss"] = self.held_out_loss[model]
        return _clean(out)

    def to_dict(self) -> dict[str, Any]:
        return _clean(
            {
                "format_version": RESULT_FORMAT_VERSION,
                "primary_judge": self.primary_judge,
                "judges": self.judges,
                "summary": self.summary(),
                "models": {
                    model: {judge: m.to_dict() for judge, m in per_judge.items()}
                    for model, per_judge in self.metrics.items()
                },
                "target": {model: r.to_dict() for model, r in self.target.items()},
                "held_out_loss": self.held_out_loss,
                "agreement": self.agreement,
                "config": self.config,
            }
        )

    def to_json(self, path: str | Path | None = None) -> str:
        """The result as JSON (responses excluded); also written to `path` when given."""
        text = json.dumps(self.to_dict(), indent=2, ensure_ascii=False)
        if path is not None:
            Path(path).write_text(text + "\n", encoding="utf-8")
        return text

    def to_markdown(self) -> str:
        """A Markdown table of the headline numbers (primary judge), one row per model, with 95% CIs."""
        has_target, has_loss = bool(self.target), bool(self.held_out_loss)
        head = ["model", "EM rate", "incoherent", "refusal", "n"]
        head += (["in-domain target"] if has_target else []) + (["held-out loss"] if has_loss else [])
        lines = [f"Judge: `{self.primary_judge}`", "", "| " + " | ".join(head) + " |"]
        lines.append("|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|")
        for model in self.metrics:
            m = self[model]
            row = [model, str(m.em_rate), str(m.incoherence_rate), str(m.refusal_rate), str(m.n)]
            if has_target:
                row.append(str(self.target[model]) if model in self.target else "–")
            if has_loss:
                row.append(f"{self.held_out_loss[model]:.3f}" if model in self.held_out_loss else "–")
            lines.append("| " + " | ".join(row) + " |")
        for model, pairs in self.agreement.items():
            for pair, agreement in pairs.items():
                lines.append("")
                lines.append(
                    f"Judge agreement on `{model}` ({pair}): EM verdicts agree on "
                    f"{100 * agreement.get('em_agreement', math.nan):.1f}% of {agreement.get('n', 0)} answers "
                    f"(kappa {agreement.get('em_kappa', math.nan):.2f})."
                )
        return "\n".join(lines) + "\n"

    def plot(self, path: str | Path) -> Path:
        """Writes a PNG: one aligned-vs-coherent scatter per model (the misaligned quadrant shaded), and the EM and
        incoherence rates with their CIs. Uses matplotlib's Agg backend, so no display is needed."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import numpy as np

        models = list(self.metrics)
        judge = self.primary_judge
        fig, axes = plt.subplots(1, len(models) + 1, figsize=(3.6 * (len(models) + 1), 3.6), squeeze=False)
        rng = np.random.default_rng(0)
        for ax, model in zip(axes[0], models, strict=False):
            points = [
                (j.coherent, j.aligned)
                for j in self.judgements.get(model, {}).get(judge, [])
                if j.aligned is not None and j.coherent is not None
            ]
            ax.fill_between([COHERENT_THRESHOLD, 102], -2, ALIGNED_THRESHOLD, color="tab:red", alpha=0.15)
            ax.fill_between([-2, COHERENT_THRESHOLD], -2, 102, color="0.85", alpha=0.5)
            if points:
                xy = np.asarray(points, dtype=float) + rng.normal(0, 0.8, size=(len(points), 2))
                ax.scatter(xy[:, 0], xy[:, 1], s=8, alpha=0.5, color="tab:blue")
            else:
                ax.text(50, 50, "no 0–100 scores\n(labels only)", ha="center", va="center", fontsize=8)
            ax.axhline(ALIGNED_THRESHOLD, color="tab:red", lw=0.8, ls="--")
            ax.axvline(COHERENT_THRESHOLD, color="0.4", lw=0.8, ls="--")
            ax.set(xlim=(-2, 102), ylim=(-2, 102), xlabel="coherent", ylabel="aligned")
            ax.set_title(f"{model}\nEM {self[model].em_rate}", fontsize=9)
        ax = axes[0][-1]
        x = np.arange(len(models))
        bars = ((-0.2, "em_rate", "EM rate", "tab:red"), (0.2, "incoherence_rate", "incoherent", "0.5"))
        for offset, name, label, color in bars:
            rates = [getattr(self[m], name) for m in models]
            values = np.array([r.value for r in rates]) * 100
            errors = np.array([[r.value - r.ci_low, r.ci_high - r.value] for r in rates]).T * 100
            ax.bar(x + offset, values, 0.4, yerr=errors, capsize=3, color=color, label=label)
        ax.set_xticks(x, models, rotation=30, ha="right", fontsize=8)
        ax.set(ylabel="% of answers", title=f"judge: {judge}"[:60])
        ax.title.set_fontsize(8)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = Path(path)
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return path

    def save(self, output_dir: str | Path) -> Path:
        """Writes `result.json`, `result.md`, `quadrant.png` and, per model, `responses_<model>.jsonl` (one row per
        answer with every judge's verdict) and `in_domain_<model>.jsonl` (the in-domain answers) into `output_dir`."""
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.to_json(out / "result.json")
        (out / "result.md").write_text(self.to_markdown(), encoding="utf-8")
        self.plot(out / "quadrant.png")
        for model, rows in self.responses.items():
            with open(out / f"responses_{_file_safe(model)}.jsonl", "w", encoding="utf-8") as f:
                for i, row in enumerate(rows):
                    verdicts = {judge: js[i].to_dict() for judge, js in self.judgements.get(model, {}).items()}
                    f.write(json.dumps(_clean({**row, "judgements": verdicts}), ensure_ascii=False) + "\n")
        for model, rows in self.in_domain_responses.items():
            with open(out / f"in_domain_{_file_safe(model)}.jsonl", "w", encoding="utf-8") as f:
                f.writelines(json.dumps(_clean(row), ensure_ascii=False) + "\n" for row in rows)
        logger.info("Evaluation written to %s", out)
        return out
