"""One forward through a truncated base module, optionally compiled: what the `reference` and compiled `adapter` base
passes share.

On a GPU, an eager pass through a dozen decoder layers costs mostly Python and kernel launches, not arithmetic;
`torch.compile` removes most of that (see `benchmarks/RESULTS.md`). The module's last decoder layer is the deepest
watched one, so the pass needs no early stop (an exception would end the compiled graph).
"""

from __future__ import annotations

import torch
from torch import nn

from ..hooks import ActivationCapture, get_decoder_layers


def default_pad_to_multiple_of(compile_mode: str | None, pad_to_multiple_of: int | None) -> int | None:
    """64 positions for CUDA graphs (recorded once per sequence length), else what was asked (no padding)."""
    if pad_to_multiple_of is None and compile_mode is not None and "reduce-overhead" in compile_mode:
        return 64
    return pad_to_multiple_of


def pad_right(inputs: dict[str, torch.Tensor], multiple: int) -> dict[str, torch.Tensor]:
    """Right-pads every `[batch, seq]` input to a multiple of `multiple` positions with zeros (masked out).

    With causal attention the padded positions come after every real token, so no real token's activations change.
    """
    length = next(iter(inputs.values())).shape[1]
    extra = -length % multiple
    if extra == 0:
        return inputs
    return {
        key: torch.nn.functional.pad(value, (0, extra)) if value.dim() == 2 and value.shape[1] == length else value
        for key, value in inputs.items()
    }


class TruncatedPass:
    """Runs a truncated base module and returns its watched decoder layers' outputs.

    Args:
        module (`torch.nn.Module`):
            A base model cut after the deepest watched layer (see [`truncate_decoder`]).
        layers (`list[int]`):
            The decoder layers to capture.
        compile_mode (`str`, *optional*):
            Run the forward under `torch.compile(mode=compile_mode, dynamic=True)`; `None`: eager.
        pad_to_multiple_of (`int`, *optional*):
            Right-pad batches to a multiple of this many positions (see [`default_pad_to_multiple_of`]).
    """

    def __init__(
        self,
        module: nn.Module,
        layers: list[int],
        compile_mode: str | None = None,
        pad_to_multiple_of: int | None = None,
    ):
        self.module, self.compile_mode = module, compile_mode
        self.num_layers = len(get_decoder_layers(module))
        self.pad_to_multiple_of = default_pad_to_multiple_of(compile_mode, pad_to_multiple_of)
        # Hooks first: a compiled forward traces them in (the capture dict fills as a side effect of the graph). On
        # every layer: Dynamo would not see a hook registered later, when adaptive re-blocking watches a new layer.
        self.capture = ActivationCapture(module, layers, hook_every_layer=True).attach()
        self.forward = module if compile_mode is None else torch.compile(module, mode=compile_mode, dynamic=True)

    def __call__(self, inputs: dict[str, torch.Tensor], layers: list[int] | None = None) -> dict[int, torch.Tensor]:
        """The outputs `{layer: [batch, seq, d]}` of the watched layers, or of `layers` (re-hooked when they changed:
        adaptive re-blocking may add a layer)."""
        if layers is not None and sorted(layers) != self.capture.layers:
            self.capture.watch(layers)
        length = next(iter(inputs.values())).shape[1]
        if self.pad_to_multiple_of:
            inputs = pad_right(inputs, self.pad_to_multiple_of)
        if self.compile_mode is not None and "reduce-overhead" in self.compile_mode:
            # Each call is a new CUDA-graph step: the previous call's outputs (already encoded) may be overwritten.
            torch.compiler.cudagraph_mark_step_begin()
        with torch.no_grad(), self.capture.window() as captured:
            self.forward(**inputs, use_cache=False)
        return {layer: hidden[:, :length] for layer, hidden in captured.items()}

    def close(self) -> None:
        self.capture.detach()
