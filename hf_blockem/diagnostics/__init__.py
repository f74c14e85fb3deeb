"""Rerouting diagnostics for BLOCK-EM fine-tuning: `BlockEMCallback`, its probe, its monitors and its plots.

- `probe.py`: the fixed probe batch and its forward (stopped after the deepest monitored layer).
- `directions.py`: misalignment directions per layer (misaligned − base mean activations), stored with a latent set.
- `monitors.py`: the statistics (blocked latents, drift of the full SAE's other latents, drift along directions) as
  sums over tokens, reduced across processes, then turned into flat `blockem_diag/...` metrics.
- `callback.py`: the `TrainerCallback` (hooks, logging through the trainer's `log()`, alert, adaptive re-blocking).
- `plots.py`: the PNG over training steps and the JSON summary the model card reads.
"""

from .callback import BlockEMCallback, BlockEMDiagnosticsState
from .directions import misalignment_directions
from .monitors import pick_additions, probe_metrics, probe_sums
from .plots import diagnostics_summary, plot_diagnostics
from .probe import ProbeBatch, probe_batch, probe_hidden_states

__all__ = [
    "BlockEMCallback",
    "BlockEMDiagnosticsState",
    "ProbeBatch",
    "diagnostics_summary",
    "misalignment_directions",
    "pick_additions",
    "plot_diagnostics",
    "probe_batch",
    "probe_hidden_states",
    "probe_metrics",
    "probe_sums",
]
