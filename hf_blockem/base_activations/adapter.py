"""Base activations from the trained PEFT model with its adapters disabled (`base_activations="adapter"`).

With LoRA the model with adapters disabled *is* the base model, bit for bit in fp32, so this costs a partial forward
without any extra weights in memory: run under no-grad and in eval mode (no dropout), and stopped right after
the deepest blocked layer (the LM head never runs).
"""

from __future__ import annotations

import contextlib
import logging
import weakref
from collections.abc import Iterator

import torch
from torch import nn

from ..hooks import ActivationCapture, eval_mode, run_until_layer, unwrap_model
from .base_view import frozen_base_view
from .source import OnTheFlyBaseActivations
from .truncated_pass import TruncatedPass, default_pad_to_multiple_of

logger = logging.getLogger(__name__)


def peft_model_of(model: nn.Module):
    """The `PeftModel` inside accelerate / DDP / compile wrappers, or `None`."""
    from peft import PeftModel

    seen = set()
    while id(model) not in seen:
        seen.add(id(model))
        if isinstance(model, PeftModel):
            return model
        model = getattr(model, "_orig_mod", None) or getattr(model, "module", None) or model
    return None


class AdapterBaseActivations(OnTheFlyBaseActivations):
    """Base activations from the trained PEFT model with its adapters disabled.

    Args:
        latent_set ([`LatentSet`]):
            The blocked latents.
        model (`torch.nn.Module`):
            The PEFT model being trained (possibly wrapped); refused if it has no adapters.
        compile_mode (`str`, *optional*):
            Run the base pass through a separate truncated module that shares the PEFT model's base weights (see
            [`frozen_base_view`]), under `torch.compile(mode=compile_mode, dynamic=True)`. `None` (the default): the
            trained model itself runs eagerly with its adapters switched off. Sharded models (FSDP, ZeRO-3) always
            take the eager path.
        pad_to_multiple_of (`int`, *optional*):
            With `compile_mode`, right-pad batches to a multiple of this many positions (64 with `"reduce-overhead"`).
    """

    mode = "adapter"

    def __init__(
        self, latent_set, model: nn.Module, compile_mode: str | None = None, pad_to_multiple_of: int | None = None
    ):
        super().__init__(latent_set)
        self.compile_mode = compile_mode
        self.pad_to_multiple_of = default_pad_to_multiple_of(compile_mode, pad_to_multiple_of)
        if peft_model_of(model) is None:
            raise ValueError(
                "base_activations='adapter' reads the base model by disabling PEFT adapters, but the model is a "
                f"{type(unwrap_model(model)).__name__} without adapters. Train with PEFT (for example pass "
                "`peft_config=LoraConfig(...)` to the trainer), or use base_activations='reference' (a frozen base "
                "model loaded from `base_model_name_or_path`) for full fine-tuning."
            )

        # Per-step work must not walk the module tree: what the base pass needs of the model is looked up once per
        # model object (the Trainer may hand over a wrapped model after the first steps).
        self._layout: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        # PEFT model -> compiled pass through its base view (built on first use, after the model reached its device).
        self._passes: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._warned_sharded = False

    def _model_layout(self, model: nn.Module) -> tuple[list[nn.Module], list[nn.Module], bool]:
        if model not in self._layout:
            from peft.tuners.tuners_utils import BaseTunerLayer

            modules = list(model.modules())
            tuner_layers = [m for m in modules if isinstance(m, BaseTunerLayer)]
            self._layout[model] = (modules, tuner_layers, is_sharded(model))
        return self._layout[model]

    def hidden_states(
        self, model: nn.Module, capture: ActivationCapture, inputs: dict[str, torch.Tensor]
    ) -> dict[int, torch.Tensor]:
        modules, tuner_layers, sharded = self._model_layout(model)
        if self.compile_mode is not None and not sharded:
            return self._compiled_pass(model)(inputs, self.latent_set.layer_indices)
        if self.compile_mode is not None and not self._warned_sharded:
            self._warned_sharded = True
            logger.warning(
                "base_activations_compile=%r is not applied to a sharded model (FSDP or ZeRO-3): the base pass runs "
                "eagerly inside it, so that every gathered parameter is released.",
                self.compile_mode,
            )
        with torch.no_grad(), adapters_disabled(peft_model_of(model), tuner_layers), eval_mode(model, modules):
            if not sharded:
                return run_until_layer(capture, model, **inputs, use_cache=False)
            # FSDP and ZeRO-3 gather each module's parameters before its forward and release them after it: a forward
            # cut short by an exception leaves them gathered and the next backward reduces the wrong gradients.
            with capture.window() as captured:
                model(**inputs, use_cache=False)
            return captured

    def _compiled_pass(self, model: nn.Module) -> TruncatedPass:
        peft_model = peft_model_of(model)
        compiled = self._passes.get(peft_model)
        depth = self.latent_set.deepest_layer + 1
        if compiled is None or compiled.num_layers < depth:  # not built yet, or a deeper layer was added
            if compiled is not None:
                compiled.close()
            view = frozen_base_view(peft_model, depth)
            compiled = TruncatedPass(view, self.latent_set.layer_indices, self.compile_mode, self.pad_to_multiple_of)
            self._passes[peft_model] = compiled
        return compiled


@contextlib.contextmanager
def adapters_disabled(peft_model, tuner_layers: list[nn.Module]) -> Iterator[None]:
    """`PeftModel.disable_adapter()` for LoRA-style tuners, without its per-call status walk over the whole model.

    PEFT's context manager computes the model's adapter status (every module, with reprs) on each entry, which
    cost ~10 ms per step on a tiny model here, more than the base pass itself. LoRA-style layers skip their adapters
    while their `_disable_adapters` flag is set, which is all the base pass needs (it runs under no-grad, so the
    trainable flags PEFT also toggles do not matter). Prompt-learning and adaption-prompt tuners, and layers without
    that flag, go through PEFT's own context manager.
    """
    config = peft_model.peft_config[peft_model.active_adapter]
    fast = (
        tuner_layers
        and not config.is_prompt_learning
        and not config.is_adaption_prompt
        and all(hasattr(layer, "_disable_adapters") for layer in tuner_layers)
    )
    if not fast:
        with peft_model.disable_adapter():
            yield
        return
    previous = [layer._disable_adapters for layer in tuner_layers]
    for layer in tuner_layers:
        layer._disable_adapters = True
    try:
        yield
    finally:
        for layer, flag in zip(tuner_layers, previous, strict=True):
            layer._disable_adapters = flag


def is_sharded(model: nn.Module) -> bool:
    """Whether FSDP (1 or 2) or DeepSpeed ZeRO-3 manages `model`'s parameters (their hooks must see every forward end)."""
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel

    return any(isinstance(module, (FSDPModule, FullyShardedDataParallel)) for module in model.modules()) or any(
        hasattr(param, "ds_id") for param in model.parameters()
    )
