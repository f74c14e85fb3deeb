"""Base activations from a frozen, truncated copy of the base model (`base_activations="reference"`).

For full fine-tuning the trained weights drift from the base, so the base must be kept apart. It is loaded again from
its Hub id or path (never deep-copied from the trained model: that would copy a model that may already be sharded,
and `deepcopy` of a ZeRO-3 model fails), and only the layers the penalty reads are built: the config is cut to
`deepest blocked layer + 1` decoder layers before loading, so deeper layers are never materialised, and the model is
loaded without LM head (`AutoModel`) with its final norm replaced by the identity. It is a real, shorter module: FSDP
and ZeRO-3 gather its weights through its own `forward`.
"""

from __future__ import annotations

import contextlib
import logging

import torch
from torch import nn

from ..fingerprints import weights_fingerprint
from ..hooks import ActivationCapture, check_layer_index, find_decoder_layers
from .source import OnTheFlyBaseActivations
from .truncated_pass import TruncatedPass, default_pad_to_multiple_of

logger = logging.getLogger(__name__)

# Names of the final norm of a decoder stack (Llama / Qwen / Mistral / Gemma, GPT-2, OPT, GPT-NeoX).
_FINAL_NORM_NAMES = ("norm", "ln_f", "final_layer_norm", "final_layernorm")
_NOT_MODEL_INPUTS = ("labels", "shift_labels", "completion_mask", "assistant_masks")


def _text_config(config):
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def truncate_config(config, num_layers: int):
    """Cuts a model config to its first `num_layers` decoder layers (in place) and returns it."""
    text_config = _text_config(config)
    total = getattr(text_config, "num_hidden_layers", None)
    if total is None:
        raise ValueError(
            f"Cannot truncate a {type(config).__name__}: expected a `num_hidden_layers` field, found none. Use "
            "base_activations='adapter' (PEFT) or 'cache'."
        )
    check_layer_index(num_layers - 1, total)
    text_config.num_hidden_layers = num_layers
    # Per-layer lists (sliding / full attention patterns) must match the layer count or config validation fails.
    for name in ("layer_types", "block_types"):
        values = getattr(text_config, name, None)
        if isinstance(values, (list, tuple)) and len(values) == total:
            setattr(text_config, name, list(values)[:num_layers])
    return config


def truncate_decoder(model: nn.Module, num_layers: int) -> nn.Module:
    """Keeps only the first `num_layers` decoder layers of a transformers base model and drops its final norm.

    Works on an already-built model (the copy is cut in place); `load_truncated_reference` builds a cut model without
    ever allocating the deeper layers.

    Args:
        model (`torch.nn.Module`):
            A transformers base model (`AutoModel`) or causal LM; for a causal LM the LM head is dropped too and the
            inner base model is returned.
        num_layers (`int`):
            How many decoder layers to keep (the deepest blocked layer + 1).

    Returns:
        `torch.nn.Module`: the truncated base model, whose decoder-layer outputs are those of the full model.
    """
    base = getattr(model, "base_model", model)
    name, layers = find_decoder_layers(base)
    check_layer_index(num_layers - 1, len(layers))
    parent_name, _, attribute = name.rpartition(".")
    parent = base.get_submodule(parent_name) if parent_name else base
    if len(layers) > num_layers:
        setattr(parent, attribute, nn.ModuleList(list(layers)[:num_layers]))
        truncate_config(base.config, num_layers)
    for norm in _FINAL_NORM_NAMES:
        if isinstance(getattr(parent, norm, None), nn.Module):
            setattr(parent, norm, nn.Identity())
    return base


def load_truncated_reference(
    name_or_path: str,
    num_layers: int,
    revision: str | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    attn_implementation: str | None = None,
    token: str | bool | None = None,
) -> nn.Module:
    """Loads the first `num_layers` decoder layers of a causal LM, without LM head and final norm, frozen.

    Args:
        name_or_path (`str`):
            Hub id or local path of the base model.
        num_layers (`int`):
            Decoder layers to build (the deepest blocked layer + 1).
        revision (`str`, *optional*):
            Branch, tag or commit on the Hub.
        dtype (`torch.dtype`, *optional*):
            Parameter dtype (the trained model's, so that base and trained activations are computed alike).
        device (`torch.device` or `str`, *optional*):
            Where to put the module.
        attn_implementation (`str`, *optional*):
            Attention implementation (the trained model's).
        token (`str` or `bool`, *optional*):
            Hub token.

    Returns:
        `torch.nn.Module`: a frozen, eval-mode base model with `num_layers` decoder layers.
    """
    from transformers import AutoConfig, AutoModel

    config = AutoConfig.from_pretrained(name_or_path, revision=revision, token=token)
    truncate_config(config, num_layers)
    kwargs = {"dtype": dtype} if dtype is not None else {}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    # The checkpoint's deeper layers and LM head have no place in the cut model: transformers reports them as unused
    # weights, which is expected here.
    model = AutoModel.from_pretrained(name_or_path, config=config, revision=revision, token=token, **kwargs)
    model = truncate_decoder(model, num_layers)
    model.requires_grad_(False).eval()
    return model.to(device) if device is not None else model


class ReferenceBaseActivations(OnTheFlyBaseActivations):
    """Base activations from a frozen base model cut after the deepest blocked layer.

    The module is loaded on first use (or passed in), so a trainer whose base activations come from a complete cache
    never holds it.

    Args:
        latent_set ([`LatentSet`]):
            The blocked latents.
        name_or_path (`str`, *optional*):
            Hub id or path of the base model; defaults to `latent_set.base_model`.
        revision (`str`, *optional*):
            Its revision; defaults to `latent_set.base_model_revision` when `name_or_path` is not given.
        dtype, device, attn_implementation, token:
            Passed to [`load_truncated_reference`].
        prepare (`callable`, *optional*):
            Applied to the loaded module, e.g. `accelerator.prepare_model(m, evaluation_mode=True)` when distributed.
        module (`torch.nn.Module`, *optional*):
            An already truncated reference (see [`truncate_decoder`]); skips loading.
        compile_mode (`str`, *optional*):
            Run the reference's forward under `torch.compile(mode=compile_mode, dynamic=True)`, e.g. `"default"` or
            `"reduce-overhead"` (CUDA graphs). An eager pass of a few layers is mostly kernel launches on a GPU;
            compiled, it costs far less. `None` (the default) runs it eagerly.
        pad_to_multiple_of (`int`, *optional*):
            Right-pad each batch to a multiple of this many positions before the pass (and cut the activations back).
            Causal attention keeps the real tokens' activations unchanged, and a few lengths cover every batch:
            CUDA graphs are recorded once per length. Defaults to 64 with `"reduce-overhead"`, else no padding.
    """

    mode = "reference"

    def __init__(
        self,
        latent_set,
        name_or_path: str | None = None,
        revision: str | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        attn_implementation: str | None = None,
        token: str | bool | None = None,
        prepare=None,
        module: nn.Module | None = None,
        compile_mode: str | None = None,
        pad_to_multiple_of: int | None = None,
    ):
        super().__init__(latent_set)
        self.compile_mode = compile_mode
        self.pad_to_multiple_of = default_pad_to_multiple_of(compile_mode, pad_to_multiple_of)
        if name_or_path is None:
            name_or_path, revision = latent_set.base_model, revision or latent_set.base_model_revision
        self.name_or_path, self.revision = name_or_path, revision
        self._load_kwargs = dict(dtype=dtype, device=device, attn_implementation=attn_implementation, token=token)
        self._prepare = prepare
        self._module: nn.Module | None = None
        self._pass: TruncatedPass | None = None
        self.weights_fingerprint: str | None = None
        if module is not None:
            self._set_module(module)

    @property
    def num_layers(self) -> int:
        return self.latent_set.deepest_layer + 1

    @property
    def loaded(self) -> bool:
        return self._module is not None

    @property
    def module(self) -> nn.Module:
        """The truncated reference (loaded on first access)."""
        if self._module is None:
            logger.info(
                "Loading the base model %s (first %d layers) as the reference", self.name_or_path, self.num_layers
            )
            with self._reporting_load_errors():
                module = load_truncated_reference(
                    self.name_or_path, self.num_layers, revision=self.revision, **self._load_kwargs
                )
            self.latent_set.validate_for_model(_text_config(module.config))
            self._set_module(module)
        return self._module

    def check(self) -> None:
        """Reads the base model's config (cheap), so that a wrong id or path fails before training, not during."""
        from transformers import AutoConfig

        with self._reporting_load_errors():
            config = AutoConfig.from_pretrained(
                self.name_or_path, revision=self.revision, token=self._load_kwargs["token"]
            )
        self.latent_set.validate_for_model(_text_config(config))

    @contextlib.contextmanager
    def _reporting_load_errors(self):
        try:
            yield
        except (OSError, ValueError) as error:
            raise ValueError(
                f"base_activations={self.mode!r} loads the base model from {self.name_or_path!r} (revision "
                f"{self.revision or 'main'}) as a frozen reference and could not: {error} Set "
                "`base_model_name_or_path` (and `base_model_revision`) in the config to the base model's Hub id "
                "or local folder, or train with PEFT adapters (base_activations='adapter' reads the base model "
                "by disabling them)."
            ) from error

    def _set_module(self, module: nn.Module) -> None:
        # Fingerprinted before any sharding: DTensor / ZeRO-3 parameters cannot be read whole afterwards.
        self.weights_fingerprint = weights_fingerprint(module)
        if self._prepare is not None:
            module = self._prepare(module)
        self._module = module
        self._pass = TruncatedPass(module, self.latent_set.layer_indices, self.compile_mode, self.pad_to_multiple_of)

    def release(self) -> None:
        """Drops the module (and its hooks); it is loaded again if needed."""
        if self._pass is not None:
            self._pass.close()
        self._module, self._pass = None, None

    def hidden_states(
        self, model: nn.Module, capture: ActivationCapture, inputs: dict[str, torch.Tensor]
    ) -> dict[int, torch.Tensor]:
        self.module  # noqa: B018 - loads it on first use
        # The deepest watched layer is the module's last one: no early stop is needed.
        inputs = {key: value for key, value in inputs.items() if key not in _NOT_MODEL_INPUTS}
        return self._pass(inputs, self.latent_set.layer_indices)
