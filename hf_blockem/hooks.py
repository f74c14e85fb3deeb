"""Where the residual stream is read: decoder-layer resolution and scoped activation capture.

Hook-point convention (the one SAELens uses): `blocks.L.hook_resid_post` is the *output* of Hugging Face decoder
layer `L`, which is `output_hidden_states[L + 1]`. Every capture here reads the output of `layers[L]`.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable, Iterator

import torch
from torch import nn

logger = logging.getLogger(__name__)

# Attribute names under which wrappers keep the module they wrap: DDP / DeepSpeed (`module`), FSDP1
# (`_fsdp_wrapped_module`), `torch.compile` (`_orig_mod`).
_WRAPPER_ATTRIBUTES = ("_orig_mod", "module", "_fsdp_wrapped_module")
# Preferred names of the decoder-layer list, tried before the generic search (Llama/Qwen/Mistral/Gemma: `layers`,
# GPT-2: `h`, MPT and others: `blocks`).
_LAYER_LIST_NAMES = ("layers", "h", "blocks", "block", "decoder_layers")


def unwrap_model(model: nn.Module) -> nn.Module:
    """Returns the Hugging Face model inside DDP, FSDP1, DeepSpeed, `torch.compile` and PEFT wrappers."""
    seen = set()
    while id(model) not in seen:
        seen.add(id(model))
        for attribute in _WRAPPER_ATTRIBUTES:
            inner = getattr(model, attribute, None)
            if isinstance(inner, nn.Module):
                model = inner
                break
        else:
            get_base_model = getattr(model, "get_base_model", None)  # PeftModel -> the transformers model
            if callable(get_base_model) and get_base_model() is not model:
                model = get_base_model()
    return model


def _num_hidden_layers(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    if config is None:
        return None
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    return getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", None)


def find_decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """Finds the list of decoder layers of a causal LM, through any wrapper.

    Args:
        model (`torch.nn.Module`):
            A transformers causal LM, possibly wrapped by PEFT, DDP, FSDP, DeepSpeed or `torch.compile`.

    Returns:
        `tuple[str, torch.nn.ModuleList]`: the module path of the layer list relative to the unwrapped model (for
        example `"model.layers"` or `"transformer.h"`) and the list itself.
    """
    inner = unwrap_model(model)
    n_layers = _num_hidden_layers(inner)
    candidates = [
        (name, module)
        for name, module in inner.named_modules()
        if isinstance(module, nn.ModuleList) and len(module) > 0 and (n_layers is None or len(module) == n_layers)
    ]
    if not candidates:
        raise ValueError(
            f"Could not find the decoder layers of {type(inner).__name__}: expected an `nn.ModuleList` of "
            f"{n_layers if n_layers is not None else 'config.num_hidden_layers'} layers, found none. Pass a causal "
            "language model from transformers (or a PEFT / DDP / FSDP / compiled wrapper of one)."
        )
    named = [c for c in candidates if c[0].rsplit(".", 1)[-1] in _LAYER_LIST_NAMES]
    # The outermost match is the decoder's own list; deeper lists of the same length are unlikely but possible.
    name, layers = min(named or candidates, key=lambda c: c[0].count("."))
    return name, layers


def get_decoder_layers(model: nn.Module) -> nn.ModuleList:
    """Returns the `nn.ModuleList` of decoder layers of a causal LM, through any wrapper."""
    return find_decoder_layers(model)[1]


def decoder_layer_path(model: nn.Module, layer: int) -> str:
    """The Hugging Face module path of decoder layer `layer`, for example `"model.layers.12"`."""
    name, layers = find_decoder_layers(model)
    check_layer_index(layer, len(layers))
    return f"{name}.{layer}"


def check_layer_index(layer: int, n_layers: int) -> None:
    if not 0 <= layer < n_layers:
        raise ValueError(
            f"Layer {layer} is out of range: the model has {n_layers} decoder layers, so a hook layer must be in "
            f"[0, {n_layers - 1}] (SAELens `blocks.L.hook_resid_post` reads the output of decoder layer L). Use a "
            "latent set made for this model."
        )


def hidden_state_of(output) -> torch.Tensor:
    """The hidden state in a decoder layer's output: a tensor (transformers >= 5) or the first item of a tuple."""
    return output if isinstance(output, torch.Tensor) else output[0]


def tokens_at_mask(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """`hidden[mask]`: the activations `[n_tokens, d]` of the tokens a `[batch, seq]` mask selects.

    Prompt-learning adapters (PEFT prompt tuning, p-tuning) prepend virtual tokens inside the model's forward, so a
    decoder layer sees `seq + n_virtual` positions; the batch's real tokens are the last `seq` of them.
    """
    extra = hidden.shape[1] - mask.shape[1]
    if extra < 0 or hidden.shape[0] != mask.shape[0]:
        raise ValueError(
            f"Expected decoder-layer activations of shape [{mask.shape[0]}, >= {mask.shape[1]}, d] for a token mask "
            f"of shape {list(mask.shape)}, received {list(hidden.shape)}. The hooked module must be a decoder layer "
            "of the model that ran on this batch."
        )
    # `device_map` splits a model across devices: the layer's output need not be where the batch started.
    return hidden[:, extra:][mask.to(hidden.device)]


class StopForward(Exception):
    """Raised by a capture hook to end a forward pass once the deepest layer it needs has run."""


class ActivationCapture:
    """Reads the output of some decoder layers, only inside an explicit capture window.

    Hooks are registered once (`attach`) and removed by `detach` (or on leaving the `with` block); between the two
    they cost one flag check per layer call. Inside `window()` the first output of each watched layer is kept and
    every later call of the same layer is ignored, so a forward that gradient checkpointing re-runs during backward,
    or an extra forward inside the window, never overwrites what the training forward produced.

    Args:
        model (`torch.nn.Module`):
            The model whose decoder layers to watch (wrappers are resolved).
        layers (`Iterable[int]`):
            Decoder-layer indices whose outputs to capture.
        hook_every_layer (`bool`, *optional*, defaults to `False`):
            Register a hook on every decoder layer, each keeping its output only while its layer is watched, so that
            `watch` can change the watched layers without registering hooks. Needed under `torch.compile`: Dynamo
            does not guard on module hooks, so a hook registered after compiling would never run, whereas a change
            of the watched set (a value the compiled hooks read) recompiles.

    Example:
    ```python
    with ActivationCapture(model, [4, 8]) as capture:
        with capture.window() as captured:
            model(**batch)
        hidden_4 = captured[4]  # == model(**batch, output_hidden_states=True).hidden_states[5]
    ```
    """

    def __init__(self, model: nn.Module, layers: Iterable[int], hook_every_layer: bool = False):
        self.model = model
        self.hook_every_layer = hook_every_layer
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._modules: dict[int, nn.Module] = {}
        self._captured: dict[int, torch.Tensor] | None = None
        self._stop_after: int | None = None
        self.watch(layers)

    @property
    def attached(self) -> bool:
        """Whether the hooks are registered on the model."""
        return bool(self._handles)

    def watch(self, layers: Iterable[int]) -> None:
        """Sets the watched layers; attached hooks follow (with `hook_every_layer`) or are registered again."""
        layers = sorted(set(int(layer) for layer in layers))
        if not layers:
            raise ValueError("ActivationCapture needs at least one layer index, received none.")
        attached = self.attached
        if attached and not self.hook_every_layer:
            self.detach()
        if attached and self.hook_every_layer:
            for layer in layers:
                check_layer_index(layer, len(self._modules))
        # A tuple: compiled hooks guard on its value.
        self.layers, self._watched = layers, tuple(layers)
        if attached and not self.hook_every_layer:
            self.attach()

    def attach(self) -> ActivationCapture:
        """Registers the forward hooks (idempotent) and returns the capture; `detach` removes them."""
        if self._handles:
            return self
        decoder_layers = get_decoder_layers(self.model)
        for layer in self.layers:
            check_layer_index(layer, len(decoder_layers))
        try:
            for layer in range(len(decoder_layers)) if self.hook_every_layer else self.layers:
                self._handles.append(decoder_layers[layer].register_forward_hook(self._make_hook(layer)))
                self._modules[layer] = decoder_layers[layer]
        except BaseException:
            self.detach()
            raise
        return self

    def module(self, layer: int) -> nn.Module:
        """The decoder layer a watched index is hooked on (resolved once, at `attach`)."""
        if layer not in self._modules:
            raise KeyError(f"Layer {layer} is not watched by this (attached) capture; watched: {self.layers}.")
        return self._modules[layer]

    def detach(self) -> None:
        """Removes every hook and drops any captured activation (safe to call twice)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._modules.clear()
        self._captured = None

    def __enter__(self) -> ActivationCapture:
        return self.attach()

    def __exit__(self, *exc) -> None:
        self.detach()

    def _make_hook(self, layer: int):
        def hook(module, args, output):
            captured = self._captured
            if captured is None or layer in captured or layer not in self._watched:
                return None
            captured[layer] = hidden_state_of(output)
            if self._stop_after is not None and layer >= self._stop_after:
                raise StopForward
            return None

        return hook

    @contextlib.contextmanager
    def window(self, stop_after_last: bool = False) -> Iterator[dict[int, torch.Tensor]]:
        """Opens a capture window; yields the dict that fills with `{layer: hidden_state}`.

        Args:
            stop_after_last (`bool`, *optional*, defaults to `False`):
                End the forward once the deepest watched layer has run (the rest of the model, LM head included,
                is skipped). The `StopForward` it raises is swallowed at the end of the window.
        """
        if not self._handles:
            raise RuntimeError("ActivationCapture.window() needs attached hooks: call attach() or use `with`.")
        if self._captured is not None:
            raise RuntimeError(
                "ActivationCapture windows cannot be nested: a window is already open on layers "
                f"{self.layers}. Close it (leave its `with` block) before opening another."
            )
        captured: dict[int, torch.Tensor] = {}
        self._captured = captured
        self._stop_after = self.layers[-1] if stop_after_last else None
        try:
            yield captured
        except StopForward:
            pass
        finally:
            self._captured = None
            self._stop_after = None
        missing = [layer for layer in self.layers if layer not in captured]
        if missing:
            raise RuntimeError(
                f"The forward pass inside the capture window never reached decoder layer(s) {missing}; expected "
                f"outputs of layers {self.layers}. Run the model's forward inside `window()`."
            )


def run_until_layer(capture: ActivationCapture, model: nn.Module, **inputs) -> dict[int, torch.Tensor]:
    """Runs `model(**inputs)` only as far as the deepest watched layer and returns the captured hidden states."""
    with capture.window(stop_after_last=True) as captured:
        model(**inputs)
    return captured


@contextlib.contextmanager
def eval_mode(model: nn.Module, modules: list[nn.Module] | None = None) -> Iterator[nn.Module]:
    """Puts every submodule in eval mode (no dropout) and restores each one's own flag afterwards.

    Args:
        model (`torch.nn.Module`): the model.
        modules (`list[torch.nn.Module]`, *optional*): `list(model.modules())`, when the caller keeps it, so that a
            per-step use does not walk the module tree each time.
    """
    modules = list(model.modules()) if modules is None else modules
    flags = [module.training for module in modules]
    for module in modules:
        module.training = False
    try:
        yield model
    finally:
        for module, flag in zip(modules, flags, strict=True):
            module.training = flag


@torch.no_grad()
def iter_masked_hidden_states(
    model: nn.Module,
    capture: ActivationCapture,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
) -> Iterator[dict[int, torch.Tensor]]:
    """Runs `model` batch by batch up to the deepest watched layer and yields `{layer: hidden[token_mask]}`.

    The read-only pass every analysis shares (activation shifts, diagnostics probes, SAE training data): no grad,
    eval mode (no dropout), the forward stopped after the deepest layer of `capture`, only the tokens that count kept.

    Args:
        model (`torch.nn.Module`): the model `capture` is attached to.
        capture ([`ActivationCapture`]): attached hooks on the layers to read.
        batches (iterable of `(input_ids, attention_mask, token_mask)`): CPU or device tensors `[batch, seq]`;
            batches without a counted token are skipped.
    """
    device = next(model.parameters()).device
    with eval_mode(model):
        for input_ids, attention_mask, token_mask in batches:
            mask = token_mask.to(device).bool()
            if not mask.any():
                continue
            hidden = run_until_layer(
                capture,
                model,
                input_ids=input_ids.to(device),
                attention_mask=attention_mask.to(device),
                use_cache=False,
            )
            yield {layer: tokens_at_mask(value, mask) for layer, value in hidden.items()}
