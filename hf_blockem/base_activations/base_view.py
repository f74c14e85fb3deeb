"""The base model inside a PEFT model, as a separate truncated module that shares its weights.

The adapters-off base pass runs the trained model itself with its adapters switched off, so it cannot be compiled
apart from the training forward. This view can: its modules are shallow copies of the PEFT model's own, with every
tuner layer replaced by (a copy of) the base layer it wraps and every `modules_to_save` wrapper by its original module,
cut after the deepest blocked layer. The parameters and buffers are the PEFT model's own objects (each copy shares its
original's tables of them): no memory is copied, the frozen base weights it reads are the ones the trained model uses,
and moving the trained model to another device or dtype moves them for the view too.
"""

from __future__ import annotations

import copy
from collections import OrderedDict

from torch import nn

from .reference import truncate_decoder

# Per-instance hook tables of `nn.Module`: a copy starts without the trained model's hooks (the trainer's capture
# hooks included), and what is registered on the copy stays off the trained model.
_HOOK_TABLES = (
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_backward_hooks",
    "_backward_pre_hooks",
)


def frozen_base_view(peft_model: nn.Module, num_layers: int) -> nn.Module:
    """A truncated base model (no LM head, no final norm) that shares `peft_model`'s base weights.

    Args:
        peft_model (`peft.PeftModel`):
            The PEFT model being trained, unsharded.
        num_layers (`int`):
            Decoder layers to keep (the deepest blocked layer + 1).

    Returns:
        `torch.nn.Module`: in eval mode; its decoder-layer outputs are those of `peft_model` with adapters disabled.
    """
    view = _base_copy(peft_model.get_base_model())
    # The cut changes the config's layer count: the copy gets its own config (the layers keep the shared one, which
    # says nothing about the layer count that they read).
    view.config = copy.deepcopy(view.config)
    base = getattr(view, "base_model", view)
    if base is not view:
        base.config = view.config
    view = truncate_decoder(view, num_layers)
    return view.eval()


def _base_copy(module: nn.Module) -> nn.Module:
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.other import AuxiliaryTrainingWrapper

    if isinstance(module, BaseTunerLayer):
        return _base_copy(module.get_base_layer())
    if isinstance(module, AuxiliaryTrainingWrapper):
        return _base_copy(module.original_module)
    if "forward" in vars(module):
        raise ValueError(
            f"Cannot build a separate base pass for a {type(module).__name__} whose `forward` was replaced on the "
            "instance (accelerate's device-map hooks or another patch): the copy would run the original module. "
            "Leave `base_activations_compile` unset to run the base pass inside the trained model."
        )
    clone = copy.copy(module)  # shares `_parameters` and `_buffers` with the original: a later `.to()` reaches both
    clone._modules = {name: None if child is None else _base_copy(child) for name, child in module._modules.items()}
    for table in _HOOK_TABLES:
        setattr(clone, table, OrderedDict())
    return clone
