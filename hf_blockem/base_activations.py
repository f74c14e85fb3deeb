"""Where the base model's activations come from during training.

This version has one source, `"adapter"`: the model being trained, with its PEFT adapters disabled, run under no-grad
and in eval mode (no dropout), stopped right after the deepest blocked layer. With LoRA that *is* the base model, bit
for bit in fp32, and it costs a partial forward without any extra weights in memory.
"""

from __future__ import annotations

import torch
from torch import nn

from .hooks import ActivationCapture, eval_mode, run_until_layer, unwrap_model


def _peft_model(model: nn.Module):
    """The `PeftModel` inside accelerate / DDP / compile wrappers, or `None`."""
    from peft import PeftModel

    seen = set()
    while id(model) not in seen:
        seen.add(id(model))
        if isinstance(model, PeftModel):
            return model
        model = getattr(model, "_orig_mod", None) or getattr(model, "module", None) or model
    return None


class AdapterBaseActivations:
    """Base activations from the trained PEFT model with its adapters disabled."""

    mode = "adapter"

    def hidden_states(
        self, model: nn.Module, capture: ActivationCapture, inputs: dict[str, torch.Tensor]
    ) -> dict[int, torch.Tensor]:
        peft_model = _peft_model(model)
        with torch.no_grad(), peft_model.disable_adapter(), eval_mode(model):
            return run_until_layer(capture, model, **inputs, use_cache=False)


def resolve_base_activations(mode: str, model: nn.Module) -> AdapterBaseActivations:
    """Picks the source of base activations for `mode` (`"auto"` or `"adapter"`) and checks it fits the model."""
    if mode in ("auto", "adapter"):
        if _peft_model(model) is None:
            raise ValueError(
                f"base_activations={mode!r} reads the base model by disabling PEFT adapters, but the model is a "
                f"{type(unwrap_model(model)).__name__} without adapters. Train with PEFT (for example pass "
                "`peft_config=LoraConfig(...)` to the trainer); full fine-tuning needs a frozen reference model, "
                "which this version does not provide yet."
            )
        return AdapterBaseActivations()
    raise ValueError(f"base_activations must be 'auto' or 'adapter', received {mode!r}.")
