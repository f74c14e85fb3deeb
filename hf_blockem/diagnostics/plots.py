"""The diagnostics over training steps: a PNG of the monitors and a flat JSON summary for the model card."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from .monitors import PREFIX

_LAYER_KEY = re.compile(rf"{PREFIX}/layer_(\d+)/(direction_drift|unblocked_shift|blocked_excess|over_base)")


def _series(history: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    points = [(entry["step"], entry[key]) for entry in history if key in entry]
    return [p[0] for p in points], [p[1] for p in points]


def plot_diagnostics(
    history: list[dict[str, Any]],
    path: str | os.PathLike,
    *,
    alert_threshold: float | None = None,
    alerts: list[int] = (),
    additions: list[dict[str, Any]] = (),
) -> Path:
    """Writes the monitors over training steps to a PNG: rerouting (direction drift per layer and the shift carried
    by unblocked latents) and the blocked latents (relative excess over base, share of tokens over base).

    Args:
        history (`list[dict]`): one entry per logging step, with `step` and `blockem_diag/...` values.
        path (`str` or `PathLike`): the PNG file.
        alert_threshold (`float`, *optional*): drawn as a horizontal line.
        alerts (`list[int]`): steps at which the alert fired (marked).
        additions (`list[dict]`): adaptive additions (`step`, `layer`, `plus`, `minus`), drawn as vertical lines.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted({key for entry in history for key in entry if _LAYER_KEY.fullmatch(key)})
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 7), sharex=True)
    for key in keys:
        layer, kind = _LAYER_KEY.fullmatch(key).groups()
        axis = top if kind in ("direction_drift", "unblocked_shift") else bottom
        style = {"direction_drift": "-", "unblocked_shift": "--", "blocked_excess": "-", "over_base": ":"}[kind]
        axis.plot(*_series(history, key), style, marker=".", label=f"layer {layer} {kind.replace('_', ' ')}")
    if alert_threshold is not None:
        top.axhline(alert_threshold, color="red", lw=0.8, ls=":", label="alert threshold")
    for step in alerts:
        top.axvline(step, color="red", lw=0.5, alpha=0.4)
    for addition in additions:
        for axis in (top, bottom):
            axis.axvline(addition["step"], color="green", lw=1.0, ls="--", alpha=0.7)
    top.set_ylabel("drift (1 = the misaligned shift)")
    top.set_title("Rerouting: direction drift per layer, shift through unblocked latents")
    bottom.set_ylabel("blocked latents")
    bottom.set_title("Blocked latents: excess over base (relative), share of tokens over base")
    bottom.set_xlabel("step (red: alerts, green dashed: adaptive additions)")
    for axis in (top, bottom):
        if axis.lines:
            axis.legend(fontsize=7, loc="best")
        axis.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def diagnostics_summary(
    history: list[dict[str, Any]], alerts: list[int], additions: list[dict[str, Any]], alert_threshold: float
) -> dict[str, Any]:
    """A flat summary for the model card: alerts, additions, and the last and peak value of each layer's monitors."""
    summary: dict[str, Any] = {
        "logging steps monitored": len(history),
        "alert threshold (path drift)": alert_threshold,
        "alerts": len(alerts),
        "first alert at step": alerts[0] if alerts else None,
        "adaptive additions": sum(len(a["plus"]) + len(a["minus"]) for a in additions),
    }
    for addition in additions:
        summary[f"added at step {addition['step']}, layer {addition['layer']}"] = (
            f"K+ {addition['plus']} K- {addition['minus']}"
        )
    keys = sorted({key for entry in history for key in entry if _LAYER_KEY.fullmatch(key)})
    for key in keys:
        _, values = _series(history, key)
        name = key[len(PREFIX) + 1 :]
        summary[f"{name} (last)"] = values[-1]
        summary[f"{name} (max)"] = max(values)
    return summary


def write_summary(summary: dict[str, Any], path: str | os.PathLike) -> Path:
    path = Path(path)
    path.write_text(json.dumps(summary, indent=1), encoding="utf-8")
    return path
