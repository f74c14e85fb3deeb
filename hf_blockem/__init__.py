"""hf_blockem: fine-tune chat models without emergent misalignment by blocking SAE latents (BLOCK-EM).

Public names are imported lazily, so `import hf_blockem` stays cheap (the trainers pull in TRL; SAELens is only
imported where SAEs are read).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0.dev0"

_EXPORTS = {
    "LatentSet": "hf_blockem.latent_set",
    "BlockedLayer": "hf_blockem.blocked_layer",
    "BlockEMArguments": "hf_blockem.config",
    "BlockEMConfig": "hf_blockem.config",
    "BlockEMSFTConfig": "hf_blockem.config",
    "BlockEMTrainerMixin": "hf_blockem.trainer",
    "BlockEMTrainer": "hf_blockem.trainer",
    "BlockEMSFTTrainer": "hf_blockem.trainer",
    "ActivationCapture": "hf_blockem.hooks",
    "get_decoder_layers": "hf_blockem.hooks",
    "LatentSetFormatError": "hf_blockem.latent_set",
    "BaseActivationCache": "hf_blockem.base_activations",
    "BlockEMCallback": "hf_blockem.diagnostics",
    "ProbeBatch": "hf_blockem.diagnostics",
    "probe_batch": "hf_blockem.diagnostics",
    "misalignment_directions": "hf_blockem.diagnostics",
    "load_truncated_reference": "hf_blockem.base_activations",
    "generate_blocked_model_card": "hf_blockem.model_card",
    "push_output_dir": "hf_blockem.push",
    "with_template_variables": "hf_blockem.chat_template_variables",
}

__all__ = [
    "__version__",
    "LatentSet",
    "BlockedLayer",
    "BlockEMArguments",
    "BlockEMConfig",
    "BlockEMSFTConfig",
    "BlockEMTrainerMixin",
    "BlockEMTrainer",
    "BlockEMSFTTrainer",
    "ActivationCapture",
    "get_decoder_layers",
    "LatentSetFormatError",
    "BaseActivationCache",
    "BlockEMCallback",
    "ProbeBatch",
    "probe_batch",
    "misalignment_directions",
    "load_truncated_reference",
    "generate_blocked_model_card",
    "push_output_dir",
    "with_template_variables",
]

if TYPE_CHECKING:
    from .base_activations import BaseActivationCache, load_truncated_reference
    from .blocked_layer import BlockedLayer
    from .chat_template_variables import with_template_variables
    from .config import BlockEMArguments, BlockEMConfig, BlockEMSFTConfig
    from .diagnostics import BlockEMCallback, ProbeBatch, misalignment_directions, probe_batch
    from .hooks import ActivationCapture, get_decoder_layers
    from .latent_set import LatentSet, LatentSetFormatError
    from .model_card import generate_blocked_model_card
    from .push import push_output_dir
    from .trainer import BlockEMSFTTrainer, BlockEMTrainer, BlockEMTrainerMixin


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'hf_blockem' has no attribute {name!r}")
