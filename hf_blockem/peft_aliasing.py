"""Telling a base model from the PEFT model built on it, when they are the same weights.

`get_peft_model(base, config)` and `PeftModel.from_pretrained(base, path)` inject their adapter layers into `base`
itself: afterwards `base` computes *with* the adapters. Code handed `(base, peft_model)` as "the base model and the
fine-tuned one" would read the fine-tuned model twice (activation shifts of exactly zero, a base evaluation that is
really the fine-tune's). The base is then the PEFT model with its adapters disabled.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping

import torch

logger = logging.getLogger(__name__)


def shares_adapted_weights(model: torch.nn.Module, peft_model: torch.nn.Module) -> bool:
    """Whether `model` is (part of) the model `peft_model` wraps, so that it runs with `peft_model`'s adapters."""
    if model is peft_model or not callable(getattr(peft_model, "disable_adapter", None)):
        return False
    get_base_model = getattr(peft_model, "get_base_model", None)
    if callable(get_base_model) and get_base_model() is model:
        return True
    adapted = {id(p) for p in peft_model.parameters()}
    return any(id(p) in adapted for p in model.parameters())


def resolve_base_model(base_model: torch.nn.Module, misaligned_model: torch.nn.Module) -> torch.nn.Module:
    """`misaligned_model` when `base_model` is the model its adapters were injected into, else `base_model`.

    Every reader of a (base, misaligned) pair treats `base_model is misaligned_model` as "the PEFT model with its
    adapters off"; this turns the aliased pair into that case.
    """
    if shares_adapted_weights(base_model, misaligned_model):
        logger.info(
            "The base model is the model the misaligned PeftModel's adapters were injected into: reading the base "
            "as the PeftModel with its adapters disabled."
        )
        return misaligned_model
    return base_model


@contextlib.contextmanager
def reading_base(base_model: torch.nn.Module, misaligned_model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """The module to run as the base: `base_model`, or the misaligned `PeftModel` with its adapters disabled when
    `base_model` is that model or the model its adapters were injected into (see [`resolve_base_model`])."""
    base_model = resolve_base_model(base_model, misaligned_model)
    if base_model is misaligned_model and callable(getattr(misaligned_model, "disable_adapter", None)):
        with misaligned_model.disable_adapter():
            yield misaligned_model
    else:
        yield base_model


@contextlib.contextmanager
def without_injected_adapters(model: torch.nn.Module, others: Mapping[str, torch.nn.Module]) -> Iterator[None]:
    """Runs `model` as itself when a PEFT model among `others` has injected its adapters into it."""
    owner = next((peft for peft in others.values() if shares_adapted_weights(model, peft)), None)
    if owner is None:
        yield
        return
    with owner.disable_adapter():
        yield
