"""Drop-in trainers that add the BLOCK-EM penalty: `BlockEMTrainerMixin`, `BlockEMTrainer`, `BlockEMSFTTrainer`."""

from __future__ import annotations

import contextlib
import copy
import logging
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel, Trainer
from transformers.training_args import ParallelMode
from trl import SFTTrainer

from .base_activations import CACHED_Z_BASE_KEY, CachedBaseActivations, resolve_base_activations
from .hooks import ActivationCapture, get_decoder_layers, tokens_at_mask, unwrap_model
from .latent_set import LATENT_SET_FILENAME, LatentSet
from .penalty import block_penalty_sum, loss_token_mask
from .run_files import LATENT_SET_SUBFOLDER, check_strict_latent_set
from .trainer_hub import BlockEMHubMixin

logger = logging.getLogger(__name__)

_NOT_MODEL_INPUTS = ("labels", "shift_labels", "completion_mask", "assistant_masks")


def load_latent_set(
    latent_set: str | LatentSet | None, revision: str | None = None, token=None, strict: bool = False
) -> LatentSet:
    """A `LatentSet` from an object, a local folder or a Hub repo id; `strict` requires a pinned commit."""
    check_strict_latent_set(latent_set, revision, strict)
    if isinstance(latent_set, LatentSet):
        return latent_set
    if latent_set is None:
        raise ValueError(
            "BLOCK-EM needs a latent set, received none: set `latent_set` in the config (a Hub repo id or a local "
            "folder written by `LatentSet.save_pretrained`) or pass `latent_set=` to the trainer."
        )
    if not isinstance(latent_set, str):
        raise TypeError(f"latent_set must be a repo id, a path or a LatentSet, received {type(latent_set).__name__}.")
    return LatentSet.from_pretrained(latent_set, revision=revision, token=token, strict=strict)


class BlockEMTrainerMixin(BlockEMHubMixin):
    r"""
    Adds the BLOCK-EM penalty to any [`~transformers.Trainer`] subclass.

    `loss = loss_SFT + λ · L_block`, where `L_block` sums, over the latents of the latent set, the squared amount by
    which the trained model's latent activation moved past the base model's in the misaligned direction, on every
    token that carries the SFT loss (see `hf_blockem.penalty`). The base activations come from the same model with
    its PEFT adapters disabled, under no-grad, with the forward stopped after the deepest blocked layer.

    Compose it in front of the trainer class: `class MyTrainer(BlockEMTrainerMixin, MyBaseTrainer)`. The arguments
    object must carry the fields of [`BlockEMConfig`] (any `TrainingArguments` subclass combined with
    `BlockEMArguments` does).

    Args:
        latent_set ([`LatentSet`] or `str`, *optional*):
            Overrides `args.latent_set`.
        *args, **kwargs:
            Passed on to the wrapped trainer.

    Logged metrics (token-weighted means over the micro-batches and processes between two logs, so that they do not
    depend on how a step is split into micro-batches and processes; eval ones prefixed with `eval_`):
        `blockem/penalty` (L_block per loss token, before λ), `blockem/penalty_relative` (the same divided by the
        mean squared base activation of the blocked latents: comparable across models), `blockem/lambda`, and per
        layer `L` and latent id `k`: `blockem/layer_L/penalty`, `blockem/layer_L/latent_k/z`, `.../z_base` (mean
        activations) and `.../over_base` (share of tokens on which the latent moved past base in the misaligned
        direction).
    """

    def __init__(self, *args, latent_set: LatentSet | str | None = None, **kwargs):
        # The latent set first: a wrong repo id or a refused file then fails in seconds, before the Trainer loads the
        # model (maybe a 7B download) and tokenises the dataset.
        given_args = kwargs["args"] if "args" in kwargs else (args[1] if len(args) > 1 else None)
        early = _configured_latent_set(given_args, latent_set) if hasattr(given_args, "latent_set") else None
        super().__init__(*args, **kwargs)
        for name in ("block_lambda", "base_activations"):
            if not hasattr(self.args, name):
                raise TypeError(
                    f"{type(self).__name__} needs BLOCK-EM training arguments (field `{name}` is missing from "
                    f"{type(self.args).__name__}): use BlockEMConfig or BlockEMSFTConfig instead."
                )
        self.latent_set = early if early is not None else _configured_latent_set(self.args, latent_set)
        inner = unwrap_model(self.model)
        self.latent_set.validate_for_model(inner.config)
        self._blockem_capture = ActivationCapture(self.model, self.latent_set.layer_indices)
        self._blockem_base = resolve_base_activations(self, self._blockem_capture)
        if isinstance(self._blockem_base, CachedBaseActivations):
            # Each collated batch then carries its precomputed z_base (see hf_blockem.base_activations.cache).
            self.data_collator = self._blockem_base.wrap_collator(self.data_collator)
        self._blockem_metrics: dict[str, defaultdict[str, list[float]]] = {
            "train": defaultdict(list),
            "eval": defaultdict(list),
        }
        # The weight of each value above (its micro-batch's loss tokens, over all processes): see `log`.
        self._blockem_metric_weights: dict[str, defaultdict[str, list[float]]] = {
            "train": defaultdict(list),
            "eval": defaultdict(list),
        }
        # Micro-batch sums not yet read back from the device: (totals, [(layer, latent ids)], lambda) each.
        self._blockem_pending: dict[str, list[tuple[torch.Tensor, list, float]]] = {"train": [], "eval": []}
        if self.latent_set.resolved_commit is not None:
            logger.info("Blocking latent set %s@%s", self.latent_set.source, self.latent_set.resolved_commit)
        self._blockem_hub_setup()

    # ---- hooks: registered once per train()/evaluate(), always removed ----

    @contextlib.contextmanager
    def _blockem_hooks(self) -> Iterator[ActivationCapture]:
        capture = self._blockem_capture
        if capture.attached:  # already inside train() or evaluate()
            yield capture
            return
        capture.attach()
        try:
            yield capture
        finally:
            capture.detach()

    def train(self, *args, **kwargs):
        from .diagnostics.callback import BlockEMCallback

        ddp = self.args.parallel_mode == ParallelMode.DISTRIBUTED and not (
            self.is_deepspeed_enabled or self.is_fsdp_enabled
        )
        check_ddp_checkpointing(self.args, isinstance(self.model, PreTrainedModel), ddp)
        try:
            with self._blockem_hooks():
                output = super().train(*args, **kwargs)
        finally:
            # A run that raises never reaches on_train_end, where the diagnostics callback removes its hooks.
            for callback in self.callback_handler.callbacks:
                if isinstance(callback, BlockEMCallback):
                    callback.remove_hooks()
        self._blockem_report_pushes()
        return output

    def evaluate(self, *args, **kwargs):
        with self._blockem_hooks():
            return super().evaluate(*args, **kwargs)

    # ---- the loss ----

    def current_block_lambda(self) -> float:
        """λ at the current optimizer step, after the linear warm-up."""
        lam, warmup = float(self.args.block_lambda), int(self.args.block_warmup_steps)
        if warmup > 0:
            lam *= min(1.0, self.state.global_step / warmup)
        return lam

    def _penalty_denominator(self, inputs: dict[str, Any], num_items_in_batch) -> torch.Tensor | float:
        # Mirror what the cross-entropy loss is divided by, so that gradient accumulation and data parallelism
        # scale both terms alike (Trainer.training_step and Trainer.compute_loss apply the same rules).
        scaled = getattr(self, "loss_is_scaled_for_ga", None)
        if scaled is None:
            scaled = (self.model_accepts_loss_kwargs and num_items_in_batch is not None) or (
                self.compute_loss_func is not None
            )
        if scaled and num_items_in_batch is not None:
            denominator = num_items_in_batch
            if self.args.average_tokens_across_devices:
                tp_size = self.get_tp_size() if hasattr(self, "get_tp_size") else 1
                denominator = denominator / max(1, self.accelerator.num_processes // tp_size)
            return torch.as_tensor(denominator, dtype=torch.float32).clamp(min=1)
        labels = inputs.get("shift_labels", inputs["labels"][..., 1:])
        return (labels != -100).sum().float().clamp(min=1)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs.get("labels")
        if labels is None:
            raise ValueError(
                "BLOCK-EM applies its penalty on the tokens that carry the loss, but the batch has no `labels`. "
                f"Received keys {sorted(inputs)}; use a data collator that produces labels."
            )
        mask = loss_token_mask(
            labels,
            attention_mask=inputs.get("attention_mask"),
            position_ids=inputs.get("position_ids"),
            input_ids=inputs.get("input_ids"),
            bos_token_id=getattr(unwrap_model(model).config, "bos_token_id", None),
            exclude_first_token=self.args.block_exclude_first_token,
        )
        model_inputs = {k: v for k, v in inputs.items() if k not in _NOT_MODEL_INPUTS}
        # A cached z_base rides in the batch for the base-activation source; the trained model must not see it.
        inputs = {k: v for k, v in inputs.items() if k != CACHED_Z_BASE_KEY}
        with self._blockem_hooks() as capture:
            z_base = self._blockem_base.z_base(model, capture, model_inputs, mask)
            with capture.window() as hidden:
                result = super().compute_loss(
                    model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
                )
            self._check_gradient_path(model, capture, hidden)
        loss, outputs = result if return_outputs else (result, None)

        penalty_sum = loss.new_zeros((), dtype=torch.float32)
        stats = []
        for blocked in self.latent_set.layers:
            z = blocked.encode(tokens_at_mask(hidden[blocked.layer], mask))
            layer_sum = block_penalty_sum(z, z_base[blocked.layer], blocked.signs_on(z.device))
            penalty_sum = penalty_sum + layer_sum.to(penalty_sum.device)  # layers may sit on other devices
            stats.append((blocked, z.detach(), z_base[blocked.layer], layer_sum.detach()))

        lam = self.current_block_lambda()
        loss = loss + (lam * penalty_sum / self._penalty_denominator(inputs, num_items_in_batch)).to(loss.dtype)
        self._record_blockem_metrics(stats, mask, lam)
        return (loss, outputs) if return_outputs else loss

    def _check_gradient_path(self, model, capture: ActivationCapture, hidden: dict[int, torch.Tensor]) -> None:
        # A hook inside a reentrant checkpoint sees a tensor computed under no-grad: the penalty would silently
        # train nothing. Complain only when something trainable feeds the layer, so that its output must have a
        # gradient (LoRA on later layers only cannot move the blocked latents, and leaves nothing to train here).
        if not (model.training and torch.is_grad_enabled()):
            return
        for layer, tensor in hidden.items():
            if not tensor.requires_grad and any(p.requires_grad for p in _parameters_feeding(model, layer)):
                raise RuntimeError(
                    f"The activation captured at decoder layer {layer} has no gradient path, so the BLOCK-EM "
                    "penalty would not train anything. This happens with reentrant gradient checkpointing when "
                    "the checkpoint wraps the layer's hooks. Set `gradient_checkpointing_kwargs="
                    '{"use_reentrant": False}` (or turn gradient checkpointing off).'
                )

    # ---- metrics ----

    def _record_blockem_metrics(self, stats, mask: torch.Tensor, lam: float) -> None:
        # One vector of sums per micro-batch, kept on the device: reading it now (`.tolist()`) would stall the CPU on
        # the GPU every step, before the backward is queued. `log` reads every pending vector in one go.
        parts = [mask.sum().float().reshape(1)]
        layout = []
        for blocked, z, z_base, layer_sum in stats:
            over = ((z - z_base) * blocked.signs_on(z.device) > 0).float()
            parts += [layer_sum.float().reshape(1), z_base.square().sum().reshape(1)]
            parts += [z.sum(0), z_base.sum(0), over.sum(0)]
            layout.append((blocked.layer, list(blocked.latent_ids)))
        totals = torch.cat([part.to(mask.device, torch.float32) for part in parts])
        mode = "train" if self.model.training else "eval"
        self._blockem_pending[mode].append((totals, layout, lam))

    def _blockem_flush_metrics(self, mode: str) -> None:
        """Reads the pending micro-batch sums of `mode`, summed over processes, into the logged metric lists."""
        pending = self._blockem_pending[mode]
        if not pending:
            return
        # One collective for all of them (every process records the same micro-batches, so the layouts agree).
        flat = torch.cat([totals for totals, _, _ in pending])
        values = self.accelerator.gather(flat.unsqueeze(0)).sum(0).tolist()
        entries, offset = [], 0
        for totals, layout, lam in pending:
            entries.append((values[offset : offset + totals.numel()], layout, lam))
            offset += totals.numel()
        pending.clear()
        for totals, layout, lam in entries:
            self._blockem_add_metrics(mode, totals, layout, lam)

    def _blockem_add_metrics(self, mode: str, totals: list[float], layout, lam: float) -> None:
        n_tokens = totals[0]
        if n_tokens == 0:
            return
        metrics, weights = self._blockem_metrics[mode], self._blockem_metric_weights[mode]

        def add(key: str, value: float, weight: float = n_tokens) -> None:
            metrics[key].append(value)
            weights[key].append(weight)

        penalty, base_scale, i = 0.0, 0.0, 1
        for layer, latent_ids in layout:
            n = len(latent_ids)
            layer_sum, base_sq = totals[i], totals[i + 1]
            z_sum, zb_sum, over_sum = (
                totals[i + 2 : i + 2 + n],
                totals[i + 2 + n : i + 2 + 2 * n],
                totals[i + 2 + 2 * n : i + 2 + 3 * n],
            )
            i += 2 + 3 * n
            penalty, base_scale = penalty + layer_sum, base_scale + base_sq
            prefix = f"blockem/layer_{layer}"
            add(f"{prefix}/penalty", layer_sum / n_tokens)
            for j, latent in enumerate(latent_ids):
                add(f"{prefix}/latent_{latent}/z", z_sum[j] / n_tokens)
                add(f"{prefix}/latent_{latent}/z_base", zb_sum[j] / n_tokens)
                add(f"{prefix}/latent_{latent}/over_base", over_sum[j] / n_tokens)
        add("blockem/penalty", penalty / n_tokens)
        # Weighted by its own denominator: the window's value is then sum(penalty) / sum(z_base²).
        add("blockem/penalty_relative", penalty / base_scale if base_scale > 0 else 0.0, base_scale)
        add("blockem/lambda", lam)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "train" if self.model.training else "eval"
        self._blockem_flush_metrics(mode)
        # Token-weighted, like the Trainer's loss: (1 process x batch 8) and (2 processes x batch 2 x accumulation 2)
        # log the same values, whatever the micro-batches' token counts.
        weights = self._blockem_metric_weights[mode]
        metrics = {
            key: _weighted_mean(values, weights.get(key)) for key, values in self._blockem_metrics[mode].items()
        }
        metrics = {key: value for key, value in metrics.items() if value is not None}
        if mode == "eval":
            metrics = {f"eval_{key}": value for key, value in metrics.items()}
        logs.update(metrics)
        self._blockem_metrics[mode].clear()
        weights.clear()
        super().log(logs, start_time)

    # ---- adaptive re-blocking: latents added during training (see hf_blockem.diagnostics) ----

    def add_blocked_latents(
        self,
        source: Any,
        plus: list[int] = (),
        minus: list[int] = (),
        *,
        layer: int | None = None,
        step: int | None = None,
        reason: str | None = None,
    ) -> dict[str, Any]:
        """Blocks more latents from the next optimizer step on (adaptive re-blocking).

        The latents join the blocked set at `layer` (a new layer is added to the capture, so a set can grow from one
        layer to several), the penalty includes them from the next `compute_loss`, and the addition is recorded in
        `latent_set.metadata["adaptive_additions"]`, so that the latent set saved with checkpoints, in `output_dir`
        and on the Hub says what was added and when. Resuming from a checkpoint re-applies its additions.

        Args:
            source (`sae_lens.SAE` or [`BlockedLayer`]):
                Where the encoder columns come from: the SAE reading `layer`, or a `BlockedLayer` holding the latents.
            plus (`list[int]`): latent ids to add to K+ (penalised when z_θ > z_base).
            minus (`list[int]`, *optional*): latent ids to add to K- (penalised when z_θ < z_base).
            layer (`int`, *optional*): decoder-layer index; defaults to the SAE's hook layer or the BlockedLayer's.
            step (`int`, *optional*): the step recorded with the addition; defaults to the current global step.
            reason (`str`, *optional*): why (recorded with the addition).

        Returns:
            `dict`: the record appended to `metadata["adaptive_additions"]`.
        """
        from .blocked_layer import BlockedLayer

        if isinstance(source, BlockedLayer):
            addition = source.select(list(plus), list(minus))
        else:
            addition = LatentSet.from_sae(
                source, plus=list(plus), minus=list(minus), layer=layer, base_model=self.latent_set.base_model
            ).layers[0]
        if layer is not None and addition.layer != layer:
            raise ValueError(
                f"Expected `layer` to be the layer the source reads ({addition.layer}), got {layer}: omit `layer`, or "
                "pass the SAE (or BlockedLayer) of the layer you mean."
            )
        record = {
            "layer": addition.layer,
            "plus": addition.plus,
            "minus": addition.minus,
            "step": int(self.state.global_step if step is None else step),
            "reason": reason,
        }
        self._blockem_apply_addition(addition, record)
        return record

    def _blockem_apply_addition(self, addition, record: dict[str, Any]) -> None:
        mode = getattr(self._blockem_base, "mode", "")
        if mode == "cache":
            raise ValueError(
                "Adaptive re-blocking needs base activations of the added latents, but base_activations resolved to "
                "'cache' (z_base precomputed for the original latents only). Set base_activations='adapter' (PEFT) "
                "or 'reference' (full fine-tuning) to add latents during training."
            )
        if mode == "reference" and addition.layer > self.latent_set.deepest_layer:
            raise ValueError(
                f"The reference base model is cut after layer {self.latent_set.deepest_layer}, so latents at layer "
                f"{addition.layer} cannot be added. Add latents at layers <= {self.latent_set.deepest_layer}."
            )
        layers = {blocked.layer: blocked for blocked in self.latent_set.layers}
        if addition.layer in layers:
            already = sorted(set(addition.latent_ids) & set(layers[addition.layer].latent_ids))
            if already:
                raise ValueError(f"Latents {already} are already blocked at layer {addition.layer}; add other ones.")
            layers[addition.layer] = layers[addition.layer].extended(addition)
        else:
            layers[addition.layer] = addition
        if not self.__dict__.get("_blockem_latent_set_owned"):
            # The first addition copies the set: the caller's object (maybe shared by other runs) stays unchanged.
            self.latent_set = copy.copy(self.latent_set)
            self.latent_set.metadata = copy.deepcopy(self.latent_set.metadata)
            if hasattr(self._blockem_base, "latent_set"):
                self._blockem_base.latent_set = self.latent_set
            self._blockem_latent_set_owned = True
        self.latent_set.layers = sorted(layers.values(), key=lambda blocked: blocked.layer)
        self.latent_set.metadata.setdefault("adaptive_additions", []).append(record)
        self._blockem_update_config()
        capture = self._blockem_capture
        if addition.layer not in capture.layers:
            capture.watch([*capture.layers, addition.layer])
        logger.info("Adaptive re-blocking at step %d: %s", record["step"], record)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        # Latents added during the interrupted run are in the latent set saved with the checkpoint: block them again.
        path = Path(resume_from_checkpoint) / LATENT_SET_SUBFOLDER / LATENT_SET_FILENAME
        if not path.is_file():
            return
        saved = LatentSet.from_pretrained(str(path))
        done = [(r["layer"], r["plus"], r["minus"]) for r in self.latent_set.metadata.get("adaptive_additions", [])]
        for record in saved.metadata.get("adaptive_additions", []):
            if (record["layer"], record["plus"], record["minus"]) not in done:
                addition = saved.layer(record["layer"]).select(record["plus"], record["minus"])
                self._blockem_apply_addition(addition, dict(record))


def check_ddp_checkpointing(args, plain_transformers_model: bool, ddp: bool) -> None:
    """Refuses DDP with `find_unused_parameters` and reentrant gradient checkpointing, which fails in backward.

    DDP then marks a parameter ready once per reentrant backward of its checkpoint and raises "Expected to mark a
    variable ready only once". transformers turns `find_unused_parameters` on for any model that is not a plain
    `PreTrainedModel` (a PEFT model, for one) unless `ddp_find_unused_parameters` says otherwise.

    Args:
        args: the training arguments.
        plain_transformers_model (`bool`): the trainer's model is a `PreTrainedModel` itself (not wrapped by PEFT).
        ddp (`bool`): the run is distributed with DDP (not DeepSpeed or FSDP).
    """
    reentrant = bool((args.gradient_checkpointing_kwargs or {}).get("use_reentrant", False))
    if not (ddp and args.gradient_checkpointing and reentrant):
        return
    find_unused = args.ddp_find_unused_parameters
    if find_unused is None:
        find_unused = not plain_transformers_model
    if find_unused:
        raise ValueError(
            "Expected non-reentrant gradient checkpointing under DDP with find_unused_parameters, got "
            "`gradient_checkpointing_kwargs={'use_reentrant': True}` with find_unused_parameters on (transformers' "
            "choice for PEFT models): DDP would fail in backward, marking LoRA weights ready twice. Set "
            "`gradient_checkpointing_kwargs={'use_reentrant': False}` (TRL's default), or "
            "`ddp_find_unused_parameters=False` if every trainable parameter is used in every step."
        )


def _configured_latent_set(args, latent_set: LatentSet | str | None) -> LatentSet:
    """The trainer's `latent_set=` argument, or else the one the config names, loaded with the config's options."""
    return load_latent_set(
        latent_set if latent_set is not None else args.latent_set,
        revision=args.latent_set_revision,
        token=getattr(args, "hub_token", None),
        strict=getattr(args, "latent_set_strict", False),
    )


def _parameters_feeding(model, layer: int) -> Iterator[torch.nn.Parameter]:
    """The parameters decoder layer `layer`'s output depends on: layers 0 to `layer`, the input embeddings, and a PEFT
    prompt encoder (prompt and prefix tuning)."""
    from .base_activations.adapter import peft_model_of

    for module in get_decoder_layers(model)[: layer + 1]:
        yield from module.parameters()
    embeddings = unwrap_model(model).get_input_embeddings()
    if embeddings is not None:
        yield from embeddings.parameters()
    prompt_encoder = getattr(peft_model_of(model), "prompt_encoder", None)
    if prompt_encoder is not None:
        yield from prompt_encoder.parameters()


def _weighted_mean(values: list[float], weights: list[float] | None) -> float | None:
    if not values:
        return None
    if weights is None or len(weights) != len(values) or sum(weights) <= 0:
        return sum(values) / len(values)
    return sum(v * w for v, w in zip(values, weights, strict=True)) / sum(weights)


class BlockEMTrainer(BlockEMTrainerMixin, Trainer):
    """[`~transformers.Trainer`] with the BLOCK-EM penalty. Takes a [`BlockEMConfig`] as `args`."""


class BlockEMSFTTrainer(BlockEMTrainerMixin, SFTTrainer):
    """TRL's [`~trl.SFTTrainer`] with the BLOCK-EM penalty. Takes a [`BlockEMSFTConfig`] as `args`.

    Example:
    ```python
    from peft import LoraConfig
    from hf_blockem import BlockEMSFTConfig, BlockEMSFTTrainer

    args = BlockEMSFTConfig(output_dir="out", latent_set="org/llama-3.1-8b-em-latents", block_lambda=100.0)
    trainer = BlockEMSFTTrainer(model="meta-llama/Llama-3.1-8B-Instruct", args=args, train_dataset=dataset,
                                peft_config=LoraConfig(r=16, target_modules="all-linear"))
    trainer.train()
    ```
    """
