"""`BlockEMCallback`: live rerouting diagnostics during fine-tuning, an alert, and opt-in adaptive re-blocking.

Its life follows transformers' `MoERouterHealthCallback`: hooks registered at train begin, detached statistics on a
fixed probe at every logging step, one sum-reduction across processes, flat `blockem_diag/...` metrics emitted through
the trainer's own `log()` (so they reach `log_history`, TensorBoard and W&B), hooks removed at train end.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from ..hooks import ActivationCapture, get_decoder_layers, unwrap_model
from ..latent_set import LatentSet
from ..run_files import DIAGNOSTICS_PLOT_NAME, DIAGNOSTICS_SUMMARY_NAME
from .monitors import PREFIX, pick_additions, probe_metrics, probe_sums
from .plots import diagnostics_summary, plot_diagnostics, write_summary
from .probe import ProbeBatch, probe_hidden_states

logger = logging.getLogger(__name__)


class BlockEMDiagnosticsState(TrainerCallback, ExportableState):
    """The diagnostics' history, alerts and adaptive additions, saved in `trainer_state.json` with every checkpoint and
    restored on resume (the Trainer rebuilds `ExportableState` callbacks from their JSON state).

    Args:
        history (`list[dict]`, *optional*): per logging step, `step` and the summary monitors.
        alerts (`list[int]`, *optional*): steps at which the alert fired.
        additions (`list[dict]`, *optional*): adaptive additions (`layer`, `plus`, `minus`, `step`, `reason`).
    """

    def __init__(self, history: list | None = None, alerts: list | None = None, additions: list | None = None):
        self.history = list(history or [])
        self.alerts = list(alerts or [])
        self.additions = list(additions or [])

    def state(self) -> dict[str, Any]:
        return {"args": {}, "attributes": {k: getattr(self, k) for k in ("history", "alerts", "additions")}}


class BlockEMCallback(TrainerCallback):
    r"""
    Watches for rerouting during fine-tuning: the blocked latents, the other latents of the full SAEs, and the
    residual stream's drift along misalignment directions at several layers, on a fixed probe batch.

    At every logging step it runs one no-grad forward of the probe (stopped after the deepest monitored layer), so the
    training step itself pays nothing. The base model's activations on the probe are computed once, at train begin:
    with a PEFT model its adapters are disabled; otherwise `base_model` is used when given, else the model as it is
    when training starts from step 0 (a full fine-tune resumed from a checkpoint needs `base_model`).

    With a BLOCK-EM trainer everything is available. With a plain `Trainer` / `SFTTrainer` (the reduced feature set)
    the blocked-latent monitors need `latent_set=` (nothing is blocked; they show what blocking would act on), the
    alert ignores the "blocked latents stay flat" condition unless a latent set is given, and adaptive re-blocking is
    unavailable.

    Args:
        trainer ([`~transformers.Trainer`]):
            The trainer to watch; add the callback with `trainer.add_callback(callback)`.
        probe ([`ProbeBatch`], mapping or list):
            The fixed probe: for example [`probe_batch`] of out-of-domain prompts with answers, plus a collated batch
            of training examples (a list is concatenated; see `ProbeBatch.from_inputs`).
        saes (`dict[int, sae_lens.SAE]`, *optional*):
            Full SAEs per decoder layer: their latents are ranked by drift from base (rerouting at that layer), and
            adaptive re-blocking adds latents from them.
        directions (`dict[int, torch.Tensor]`, *optional*):
            `{layer: [d_in]}` misalignment directions (see [`misalignment_directions`]); added to those stored in the
            latent set.
        latent_set ([`LatentSet`], *optional*):
            Latents to monitor when the trainer has none (plain trainers).
        layers (`list[int]`, *optional*):
            Restrict the direction monitors to these layers (default: every layer with a direction).
        base_model (`torch.nn.Module`, *optional*):
            A frozen base model for full fine-tuning (read once, at train begin).

        > Parameters that control the alert

        alert_threshold (`float`, *optional*, defaults to `0.25`):
            The alert fires when `path_drift` (the largest direction drift at a monitored layer, or the largest shift
            along the direction carried by unblocked SAE latents; 1 = the whole misaligned shift) exceeds it...
        flat_tolerance (`float`, *optional*, defaults to `0.1`):
            ...while `blocked_excess` (the penalty on the probe relative to the base scale) stays at or below this.
        top_k (`int`, *optional*, defaults to `5`):
            Top movers logged per SAE layer.

        > Parameters that control adaptive re-blocking

        adaptive (`bool`, *optional*, defaults to `False`):
            When the alert fires, block the top-scored unblocked latents of each SAE layer from the next step on
            (needs a BLOCK-EM trainer). Latents are ranked by their share of the direction drift (by |drift| where a
            layer has no direction); a positive drift joins K+, a negative one K-.
        adaptive_top_k (`int`, *optional*, defaults to `2`): latents added per layer and alert.
        adaptive_max_latents (`int`, *optional*, defaults to `8`): latents added over the whole run.
        write_plots (`bool`, *optional*, defaults to `True`):
            Write `blockem_diagnostics.png` and `blockem_diagnostics.json` to `output_dir` on save and at train end
            (the model card picks them up).
        probe_batch_size (`int`, *optional*, defaults to `32`): probe rows per forward.

    Logged metrics (`blockem_diag/...`): per blocked layer `L` and latent `k`: `layer_L/latent_k/z`, `.../z_base`,
    `.../over_base`; `layer_L/blocked_excess`, `layer_L/over_base`; per direction layer: `layer_L/direction_drift`,
    `.../direction_projection`, `.../direction_projection_base`; per SAE layer: `layer_L/unblocked_shift` and
    `layer_L/top_i/{latent,drift,score}`; overall: `blocked_excess`, `path_drift`, `alert`, `adaptive_added`,
    `n_blocked`, `n_tokens`.

    Example:
    ```python
    from hf_blockem.diagnostics import BlockEMCallback, probe_batch

    probe = probe_batch(tokenizer, ood_questions, answers)
    trainer = BlockEMSFTTrainer(model=..., args=args, train_dataset=dataset, peft_config=lora)
    trainer.add_callback(BlockEMCallback(trainer, probe, saes={12: sae}, adaptive=True))
    trainer.train()
    ```
    """

    def __init__(
        self,
        trainer,
        probe: Any,
        *,
        saes: dict[int, Any] | None = None,
        directions: dict[int, torch.Tensor] | None = None,
        latent_set: LatentSet | None = None,
        layers: list[int] | None = None,
        base_model: torch.nn.Module | None = None,
        alert_threshold: float = 0.25,
        flat_tolerance: float = 0.1,
        top_k: int = 5,
        adaptive: bool = False,
        adaptive_top_k: int = 2,
        adaptive_max_latents: int = 8,
        write_plots: bool = True,
        probe_batch_size: int = 32,
    ):
        if adaptive and not callable(getattr(trainer, "add_blocked_latents", None)):
            raise ValueError(
                f"adaptive=True adds latents to the blocked set, but {type(trainer).__name__} blocks nothing. Use "
                "BlockEMTrainer or BlockEMSFTTrainer, or set adaptive=False."
            )
        if adaptive and not saes:
            raise ValueError("adaptive=True picks the latents to add from full SAEs: pass `saes={layer: sae}`.")
        self.trainer = trainer
        self.probe = ProbeBatch.from_inputs(probe)
        self.saes = dict(saes or {})
        self.directions = dict(directions or {})
        self.latent_set = latent_set
        self.layers = None if layers is None else sorted(set(layers))
        self.base_model = base_model
        self.alert_threshold = alert_threshold
        self.flat_tolerance = flat_tolerance
        self.top_k = top_k
        self.adaptive = adaptive
        self.adaptive_top_k = adaptive_top_k
        self.adaptive_max_latents = adaptive_max_latents
        self.write_plots = write_plots
        self.probe_batch_size = probe_batch_size
        self._capture: ActivationCapture | None = None
        self._base_hidden: dict[int, torch.Tensor] = {}
        self._due = self._emitting = self._alerting = False
        if not any(isinstance(cb, BlockEMDiagnosticsState) for cb in trainer.callback_handler.callbacks):
            trainer.add_callback(BlockEMDiagnosticsState())

    # ---- what is monitored ----

    @property
    def records(self) -> BlockEMDiagnosticsState:
        """History, alerts and additions (looked up each time: the Trainer replaces the object on resume)."""
        for callback in self.trainer.callback_handler.callbacks:
            if isinstance(callback, BlockEMDiagnosticsState):
                return callback
        raise RuntimeError("The BlockEMDiagnosticsState callback was removed from the trainer; add it back.")

    def _latent_set(self) -> LatentSet | None:
        return getattr(self.trainer, "latent_set", None) or self.latent_set

    def _directions(self) -> dict[int, torch.Tensor]:
        latent_set = self._latent_set()
        directions = {**(latent_set.directions if latent_set is not None else {}), **self.directions}
        return {k: v for k, v in directions.items() if self.layers is None or k in self.layers}

    def _watched_layers(self) -> list[int]:
        latent_set = self._latent_set()
        blocked = latent_set.layer_indices if latent_set is not None else []
        return sorted({*blocked, *self.saes, *self._directions()})

    # ---- lifecycle ----

    def on_train_begin(self, args, state, control, **kwargs):
        self.remove_hooks()  # left by a run that raised: never stack a second set
        # On resume the Trainer restores ExportableState callbacks only with `restore_callback_states_from_checkpoint`;
        # the diagnostics are part of the run (the adaptive budget depends on them), so restore them regardless.
        saved = (state.stateful_callbacks or {}).get(BlockEMDiagnosticsState.__name__)
        records = self.records
        if state.global_step > 0 and isinstance(saved, dict) and not (records.history or records.additions):
            for key, value in saved.get("attributes", {}).items():
                if key in ("history", "alerts", "additions") and isinstance(value, list):
                    setattr(records, key, list(value))
        model = self.trainer.model
        layers = self._watched_layers()
        if not layers:
            raise ValueError(
                "BlockEMCallback has nothing to monitor: give it a BLOCK-EM trainer or `latent_set=`, `saes=` or "
                "`directions=` (or a latent set with stored directions)."
            )
        n_layers = len(get_decoder_layers(model))
        if layers[-1] >= n_layers:
            raise ValueError(
                f"Expected monitored layers below the model's {n_layers} decoder layers, got {layers}: the latent set, "
                "`saes=` or `directions=` were made for a deeper model. Use ones made for this model."
            )
        accelerator = self.trainer.accelerator
        shards = [self.probe.shard(i, accelerator.num_processes) for i in range(accelerator.num_processes)]
        # Shard the probe across processes only when every process gets counted tokens; else all read all of it.
        self._sharded = accelerator.num_processes > 1 and all(shard is not None for shard in shards)
        self._my_probe = shards[accelerator.process_index] if self._sharded else self.probe
        self._capture = ActivationCapture(model, layers).attach()
        try:
            self._base_hidden = self._compute_base(model, layers, state.global_step)
        except BaseException:
            self.remove_hooks()
            raise

    def _compute_base(self, model, layers: list[int], step: int) -> dict[int, torch.Tensor]:
        from ..base_activations.adapter import peft_model_of

        if self.base_model is not None:
            with ActivationCapture(self.base_model, layers) as capture:
                return probe_hidden_states(self.base_model, capture, self._my_probe, self.probe_batch_size)
        peft_model = peft_model_of(model)
        if peft_model is not None:
            with peft_model.disable_adapter():
                return probe_hidden_states(model, self._capture, self._my_probe, self.probe_batch_size)
        if step > 0:
            raise ValueError(
                f"BlockEMCallback needs the base model's activations, but training of a {type(unwrap_model(model))}"
                f" model without adapters resumes at step {step}, so the model is no longer the base. Pass "
                "`base_model=` (a frozen copy of the base model)."
            )
        return probe_hidden_states(model, self._capture, self._my_probe, self.probe_batch_size)

    def on_step_end(self, args, state, control, **kwargs):
        if control.should_log:
            self._due = True

    def on_log(self, args, state, control, logs=None, **kwargs):
        # Emitted from inside the Trainer's own log (right after its loss entry), through trainer.log: the metrics
        # then reach log_history and every reporting integration.
        if not self._due or self._emitting or self._capture is None:
            return
        self._due = False
        metrics = self.measure(state.global_step)
        self._emitting = True
        try:
            self.trainer.log(metrics)
        finally:
            self._emitting = False

    def on_save(self, args, state, control, **kwargs):
        self._write_files(args, state)

    def on_train_end(self, args, state, control, **kwargs):
        self.remove_hooks()
        self._write_files(args, state)

    def remove_hooks(self) -> None:
        """Detaches the callback's hooks from the model and drops the activations it holds.

        Runs at the end of training. The Trainer does not end a run that raises, so the BLOCK-EM trainers call it
        then; with another `Trainer`, call it after an exception to get a model that pickles and holds no probe
        activations. A later `train()` attaches the hooks again.
        """
        if self._capture is not None:
            self._capture.detach()
        self._capture = None
        self._base_hidden = {}

    # ---- one measurement ----

    def _missing_layers(self) -> list[int]:
        return [layer for layer in self._watched_layers() if layer not in self._base_hidden]

    @torch.no_grad()
    def measure(self, step: int) -> dict[str, float]:
        """Runs the probe, computes every monitor, checks the alert, and (if enabled) re-blocks. Returns the metrics."""
        missing = self._missing_layers()
        if missing:
            logger.warning("Layers %s were added after train begin; their base activations are unknown.", missing)
        latent_set = self._latent_set()
        if latent_set is not None and any(layer not in self._base_hidden for layer in latent_set.layer_indices):
            latent_set = None
        directions = {k: v for k, v in self._directions().items() if k in self._base_hidden}
        hidden = probe_hidden_states(self.trainer.model, self._capture, self._my_probe, self.probe_batch_size)
        sums = probe_sums(hidden, self._base_hidden, latent_set=latent_set, saes=self.saes, directions=directions)
        sums = self._reduce(sums)
        metrics, rerouting = probe_metrics(
            sums, latent_set=latent_set, saes=self.saes, directions=directions, top_k=self.top_k
        )
        path_drift, blocked_excess = metrics[f"{PREFIX}/path_drift"], metrics[f"{PREFIX}/blocked_excess"]
        alert = path_drift > self.alert_threshold and blocked_excess <= self.flat_tolerance
        metrics[f"{PREFIX}/alert"] = float(alert)
        records = self.records
        if alert:
            records.alerts.append(step)
            if not self._alerting:
                logger.warning(
                    "BLOCK-EM rerouting alert at step %d: drift on an unblocked path reached %.3f of the misaligned "
                    "shift (threshold %.3f) while the blocked latents stay flat (excess %.3g).",
                    step,
                    path_drift,
                    self.alert_threshold,
                    blocked_excess,
                )
        self._alerting = alert
        added = self._re_block(rerouting, metrics, step) if alert and self.adaptive else 0
        metrics[f"{PREFIX}/adaptive_added"] = float(added)
        current = self._latent_set()
        metrics[f"{PREFIX}/n_blocked"] = float(current.n_latents if current is not None else 0)
        kept = {k: v for k, v in metrics.items() if "/latent_" not in k and "/top_" not in k}
        records.history.append({"step": step, **kept})
        return metrics

    def _reduce(self, sums: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if not self._sharded:
            return sums
        flat = torch.cat([value.reshape(-1).float() for value in sums.values()])
        flat = self.trainer.accelerator.reduce(flat, reduction="sum")
        out, start = {}, 0
        for key, value in sums.items():
            out[key] = flat[start : start + value.numel()].reshape(value.shape)
            start += value.numel()
        return out

    def _re_block(self, rerouting: dict[int, dict[str, Any]], metrics: dict[str, float], step: int) -> int:
        records = self.records
        budget = self.adaptive_max_latents - sum(len(a["plus"]) + len(a["minus"]) for a in records.additions)

        def urgency(layer: int) -> float:
            keys = (f"{PREFIX}/layer_{layer}/direction_drift", f"{PREFIX}/layer_{layer}/unblocked_shift")
            return max((metrics[k] for k in keys if k in metrics), default=float("-inf"))

        order = sorted(rerouting, key=urgency, reverse=True)
        total = 0
        for layer, (plus, minus) in pick_additions(rerouting, self.adaptive_top_k, budget, order).items():
            record = self.trainer.add_blocked_latents(
                self.saes[layer],
                plus,
                minus,
                layer=layer,
                step=step,
                reason=f"rerouting alert: path drift {metrics[f'{PREFIX}/path_drift']:.3f} > {self.alert_threshold}",
            )
            records.additions.append(record)
            total += len(plus) + len(minus)
        return total

    # ---- files for the model card ----

    def _write_files(self, args, state) -> None:
        records = self.records
        if not (self.write_plots and state.is_world_process_zero and records.history):
            return
        import os

        os.makedirs(args.output_dir, exist_ok=True)
        plot_diagnostics(
            records.history,
            os.path.join(args.output_dir, DIAGNOSTICS_PLOT_NAME),
            alert_threshold=self.alert_threshold,
            alerts=records.alerts,
            additions=records.additions,
        )
        summary = diagnostics_summary(records.history, records.alerts, records.additions, self.alert_threshold)
        write_summary(summary, os.path.join(args.output_dir, DIAGNOSTICS_SUMMARY_NAME))
