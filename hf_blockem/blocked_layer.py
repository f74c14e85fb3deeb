"""One blocked layer of a latent set: its latents, the SAE encoder columns and input processing that compute them,
and the SAELens hook-name convention that places it.

`BlockedLayer.encode` computes z on the blocked latents exactly as the SAELens SAE does for those columns, in fp32.
Hook-point convention (SAELens): `blocks.L.hook_resid_post` is the output of Hugging Face decoder layer `L`, which is
`output_hidden_states[L + 1]`.
"""

from __future__ import annotations

import dataclasses
import operator
import re
from dataclasses import dataclass, field
from typing import Any

import torch

ARCHITECTURES = ("standard", "jumprelu")
# Normalisations SAELens computes from the input alone. "expected_average_only_in" and "covariance_whitening" need
# state that SAELens folds into the weights (`fold_activation_norm_scaling_factor`, `fold_activation_whitening`).
NORMALIZATIONS = ("none", "constant_norm_rescale", "layer_norm")
_HOOK_RE = re.compile(r"blocks\.(\d+)\.hook_resid_(post|pre)")
_STAT_NAME_RE = re.compile(r"[A-Za-z0-9_]+")


def hook_name_for_layer(layer: int) -> str:
    """Returns the SAELens hook name of the output of decoder layer `layer`: `"blocks.{layer}.hook_resid_post"`."""
    return f"blocks.{layer}.hook_resid_post"


def layer_from_hook_name(name: str) -> int:
    """Returns the Hugging Face decoder-layer index whose output a SAELens residual hook reads.

    `blocks.L.hook_resid_post` is the output of layer `L`. `blocks.L.hook_resid_pre` (L >= 1) is the input of layer `L`,
    which is the same tensor as the output of layer `L - 1`, so it maps to `L - 1`.

    Args:
        name (`str`):
            A SAELens hook name.

    Returns:
        `int`: the decoder-layer index `L` such that the hook reads `output_hidden_states[L + 1]`.
    """
    match = _HOOK_RE.fullmatch(name)
    if match is None:
        raise ValueError(
            f"Expected a residual-stream hook 'blocks.L.hook_resid_post' or 'blocks.L.hook_resid_pre', got {name!r}. "
            "BLOCK-EM reads decoder-layer outputs only: use an SAE trained on the residual stream."
        )
    layer, kind = int(match.group(1)), match.group(2)
    if kind == "post":
        return layer
    if layer == 0:
        raise ValueError(
            "Expected 'blocks.L.hook_resid_pre' with L >= 1, got 'blocks.0.hook_resid_pre' (the embedding output, "
            "which is no decoder layer's output). Use an SAE on a later layer."
        )
    return layer - 1


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def as_latent_ids(values, where: str) -> list[int]:
    """Latent ids as Python ints; accepts NumPy / 0-d torch integers (via `operator.index`), refuses floats and bools."""
    ids = []
    for value in values:
        try:
            if isinstance(value, bool):
                raise TypeError
            ids.append(operator.index(value))
        except TypeError:
            raise ValueError(f"{where}: expected integer latent ids, got {value!r}.") from None
    return ids


@dataclass(eq=False)
class BlockedLayer:
    """The blocked latents of one SAE at one decoder layer, with the encoder columns that compute them.

    Columns of every per-latent tensor are ordered `plus` then `minus`.

    Args:
        layer (`int`): Hugging Face decoder-layer index `L`; the hook reads the output of `model.layers[L]`.
        plus (`list[int]`): SAE latent ids in K+ (penalised when z_theta > z_base).
        minus (`list[int]`): SAE latent ids in K- (penalised when z_theta < z_base).
        W_enc (`torch.Tensor`): `[d_in, n]` encoder columns.
        b_enc (`torch.Tensor`): `[n]` encoder biases.
        b_dec (`torch.Tensor`): `[d_in]` decoder bias (subtracted from the input when `apply_b_dec_to_input`).
        threshold (`torch.Tensor` or `None`): `[n]` JumpReLU thresholds; `None` for ReLU SAEs.
        apply_b_dec_to_input (`bool`): whether the SAE subtracts `b_dec` before encoding.
        normalize_activations (`str`): one of `"none"`, `"constant_norm_rescale"`, `"layer_norm"`.
        architecture (`str`): `"standard"` (ReLU) or `"jumprelu"`.
        hook_name (`str`): SAELens hook name, `"blocks.{L}.hook_resid_post"`.
        module_path (`str`, *optional*): Hugging Face module path, e.g. `"model.layers.12"`.
        W_dec (`torch.Tensor`, *optional*): `[n, d_in]` decoder rows of the chosen latents (steering, diagnostics).
        sae (`dict`): provenance of the SAE (release or repo, sae_id, commit, d_sae, ...).
        statistics (`dict[str, torch.Tensor]`): optional per-latent `[n]` values (e.g. `"delta"`, `"alpha"`).

    Tensors are stored as fp32 on CPU; treat them as read-only (`encode` caches copies per device).
    """

    layer: int
    plus: list[int]
    minus: list[int]
    W_enc: torch.Tensor
    b_enc: torch.Tensor
    b_dec: torch.Tensor
    threshold: torch.Tensor | None
    apply_b_dec_to_input: bool
    normalize_activations: str
    architecture: str
    hook_name: str
    module_path: str | None = None
    W_dec: torch.Tensor | None = None
    sae: dict = field(default_factory=dict)
    statistics: dict[str, torch.Tensor] = field(default_factory=dict)
    _device_cache: dict = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self):
        if not is_int(self.layer) or self.layer < 0:
            raise ValueError(f"Expected `layer` to be an int >= 0, got {self.layer!r}.")
        self.plus = as_latent_ids(self.plus, f"Layer {self.layer} K+")
        self.minus = as_latent_ids(self.minus, f"Layer {self.layer} K-")
        ids = self.plus + self.minus
        if not ids:
            raise ValueError(f"Layer {self.layer}: expected at least one latent in K+ or K-, got none.")
        bad = [i for i in ids if i < 0]
        if bad:
            raise ValueError(f"Layer {self.layer}: expected latent ids to be ints >= 0, got {bad}.")
        both = sorted(set(self.plus) & set(self.minus))
        if both:
            raise ValueError(f"Layer {self.layer}: latents {both} are in both K+ and K-; each latent needs one sign.")
        if len(set(ids)) != len(ids):
            duplicates = sorted({i for i in ids if ids.count(i) > 1})
            raise ValueError(f"Layer {self.layer}: duplicate latent ids {duplicates}; list each latent once.")
        d_sae = self.sae.get("d_sae")
        if d_sae is not None and max(ids) >= d_sae:
            raise ValueError(f"Layer {self.layer}: latent ids must be < d_sae={d_sae}, got {max(ids)}.")
        if self.architecture not in ARCHITECTURES:
            raise ValueError(
                f"Layer {self.layer}: expected architecture in {ARCHITECTURES}, got {self.architecture!r}. TopK-style "
                "SAEs cannot be blocked: a subset of their columns does not reproduce the top-k selection."
            )
        if self.normalize_activations not in NORMALIZATIONS:
            raise ValueError(
                f"Layer {self.layer}: expected normalize_activations in {NORMALIZATIONS}, got "
                f"{self.normalize_activations!r}. Fold stateful normalisations into the SAE weights first (SAELens "
                "`fold_activation_norm_scaling_factor`)."
            )
        if not isinstance(self.apply_b_dec_to_input, bool):
            raise ValueError(
                f"Layer {self.layer}: expected apply_b_dec_to_input to be a bool, got {self.apply_b_dec_to_input!r}."
            )
        if self.hook_name != hook_name_for_layer(self.layer):
            raise ValueError(
                f"Layer {self.layer}: expected hook_name {hook_name_for_layer(self.layer)!r}, got {self.hook_name!r}."
            )
        if (self.threshold is None) != (self.architecture == "standard"):
            expected = "no threshold" if self.architecture == "standard" else "a threshold tensor"
            raise ValueError(f"Layer {self.layer}: a {self.architecture!r} SAE needs {expected}.")
        tensors = {"W_enc": self.W_enc, "b_enc": self.b_enc, "b_dec": self.b_dec, "threshold": self.threshold}
        tensors.update({"W_dec": self.W_dec, **{f"statistics[{k!r}]": v for k, v in self.statistics.items()}})
        tensors = {name: tensor for name, tensor in tensors.items() if tensor is not None}
        for name, tensor in tensors.items():
            if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
                kind = tensor.dtype if isinstance(tensor, torch.Tensor) else type(tensor).__name__
                raise ValueError(f"Layer {self.layer}: expected {name} to be a floating-point tensor, got {kind}.")
        n, d_in = len(ids), self.W_enc.shape[0] if self.W_enc.ndim == 2 else 0
        shapes = {"W_enc": (d_in, n), "b_enc": (n,), "b_dec": (d_in,), "threshold": (n,), "W_dec": (n, d_in)}
        for name, tensor in tensors.items():
            expected = shapes.get(name, (n,))  # statistics are per latent
            if tuple(tensor.shape) != expected or d_in < 1:
                raise ValueError(
                    f"Layer {self.layer}: expected {name} of shape {list(expected)} (W_enc is [d_in, n] with n={n} "
                    f"latents), got {list(tensor.shape)}."
                )
            if not torch.isfinite(tensor).all():
                raise ValueError(
                    f"Layer {self.layer}: {name} contains NaN or Inf values; expected finite SAE weights. Check the SAE "
                    "it was built from (a diverged training run?) and build the latent set again."
                )
        bad_names = [k for k in self.statistics if not _STAT_NAME_RE.fullmatch(k)]
        if bad_names:
            raise ValueError(f"Layer {self.layer}: statistic names must match [A-Za-z0-9_]+, got {bad_names}.")
        # fp32 copies on CPU: the set owns its tensors and never aliases the SAE's parameters.
        for name in ("W_enc", "b_enc", "b_dec", "threshold", "W_dec"):
            if getattr(self, name) is not None:
                setattr(self, name, getattr(self, name).detach().to("cpu", torch.float32).clone().contiguous())
        self.statistics = {k: v.detach().to("cpu", torch.float32).clone() for k, v in self.statistics.items()}

    @property
    def latent_ids(self) -> list[int]:
        """K+ then K-, the order of the encoder columns."""
        return self.plus + self.minus

    @property
    def n_latents(self) -> int:
        """Blocked latents at this layer (K+ and K-)."""
        return len(self.plus) + len(self.minus)

    @property
    def d_in(self) -> int:
        """Width of the residual stream the encoder reads."""
        return self.W_enc.shape[0]

    @property
    def signs(self) -> torch.Tensor:
        """`[n]` fp32: +1 for K+ latents, -1 for K- latents."""
        return torch.tensor([1.0] * len(self.plus) + [-1.0] * len(self.minus))

    def signs_on(self, device: torch.device) -> torch.Tensor:
        """[`signs`] on `device`, copied there once (the penalty needs them every step)."""
        key = ("signs", device)
        if key not in self._device_cache:
            self._device_cache[key] = self.signs.to(device)
        return self._device_cache[key]

    def _params(self, device: torch.device) -> tuple[torch.Tensor, ...]:
        if device not in self._device_cache:
            self._device_cache[device] = tuple(
                None if t is None else t.to(device) for t in (self.W_enc, self.b_enc, self.b_dec, self.threshold)
            )
        return self._device_cache[device]

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Computes z on the blocked latents exactly as the SAELens SAE does for these columns, in fp32.

        Args:
            x (`torch.Tensor`): `[..., d_in]` residual-stream activations, any dtype and device.

        Returns:
            `torch.Tensor`: `[..., n]` fp32 activations on `x.device`, columns ordered `plus` then `minus`.
        """
        W_enc, b_enc, b_dec, threshold = self._params(x.device)
        # 1) cast to fp32 (SAELens `process_sae_in` casts to the SAE dtype)
        x = x.to(torch.float32)
        # 2) stateless input normalisation, same operations as SAELens `_setup_activation_normalization`
        if self.normalize_activations == "constant_norm_rescale":
            x = x * ((self.d_in**0.5) / x.norm(dim=-1, keepdim=True))
        elif self.normalize_activations == "layer_norm":
            x = x - x.mean(dim=-1, keepdim=True)
            x = x / (x.std(dim=-1, keepdim=True) + 1e-5)
        # 3) subtract the decoder bias if the SAE does
        if self.apply_b_dec_to_input:
            x = x - b_dec
        # 4) pre-activations of the chosen columns
        hidden_pre = x @ W_enc + b_enc
        # 5) ReLU, then for JumpReLU zero every unit whose pre-activation is <= its threshold
        z = torch.relu(hidden_pre)
        if threshold is not None:
            z = z * (hidden_pre > threshold).to(z.dtype)
        return z

    def to_dict(self) -> dict[str, Any]:
        """The JSON-serialisable (non-tensor) description of the layer, as stored in the file's metadata."""
        return {
            "layer": self.layer,
            "hook_name": self.hook_name,
            "module_path": self.module_path,
            "architecture": self.architecture,
            "apply_b_dec_to_input": self.apply_b_dec_to_input,
            "normalize_activations": self.normalize_activations,
            "sae": dict(self.sae),
        }

    def _tensors(self) -> dict[str, torch.Tensor]:
        prefix = f"layers.{self.layer}."
        tensors = {"W_enc": self.W_enc, "b_enc": self.b_enc, "b_dec": self.b_dec, "threshold": self.threshold}
        tensors.update({"W_dec": self.W_dec, "plus": torch.tensor(self.plus, dtype=torch.int64)})
        tensors["minus"] = torch.tensor(self.minus, dtype=torch.int64)
        tensors.update({f"statistics.{k}": v for k, v in self.statistics.items()})
        return {prefix + k: v for k, v in tensors.items() if v is not None}

    def select(self, plus: list[int], minus: list[int] = ()) -> BlockedLayer:
        """The same SAE's columns for a subset of this layer's latents, with the given signs.

        Args:
            plus (`list[int]`): latent ids (all in this layer) to put in K+.
            minus (`list[int]`, *optional*): latent ids (all in this layer) to put in K-.
        """
        position = {latent: i for i, latent in enumerate(self.latent_ids)}
        missing = [k for k in [*plus, *minus] if k not in position]
        if missing:
            raise ValueError(
                f"Layer {self.layer}: latents {missing} are not in this layer (it has {self.latent_ids})."
            )
        index = torch.tensor([position[k] for k in [*plus, *minus]], dtype=torch.long)
        return dataclasses.replace(
            self,
            plus=list(plus),
            minus=list(minus),
            W_enc=self.W_enc[:, index],
            b_enc=self.b_enc[index],
            threshold=None if self.threshold is None else self.threshold[index],
            W_dec=None if self.W_dec is None else self.W_dec[index],
            statistics={k: v[index] for k, v in self.statistics.items()},
        )

    def extended(self, other: BlockedLayer) -> BlockedLayer:
        """This layer's latents followed by `other`'s (same layer and SAE), columns re-ordered plus then minus.

        Statistics present in only one of the two are dropped (the other latents have no value for them).
        """
        same = ("layer", "architecture", "apply_b_dec_to_input", "normalize_activations", "hook_name")
        differ = [name for name in same if getattr(self, name) != getattr(other, name)]
        if differ or not torch.equal(self.b_dec, other.b_dec):
            raise ValueError(
                f"Layer {self.layer}: cannot extend with latents of another SAE (differs in {differ or ['b_dec']}); "
                "add latents read by the same SAE at the same layer."
            )
        n_plus, o_plus = len(self.plus), len(other.plus)
        order = [*range(n_plus), *range(self.n_latents, self.n_latents + o_plus)]
        order += [*range(n_plus, self.n_latents), *range(self.n_latents + o_plus, self.n_latents + other.n_latents)]
        index = torch.tensor(order, dtype=torch.long)

        def cat(a, b, dim=0):
            return None if a is None or b is None else torch.cat([a, b], dim=dim).index_select(dim, index)

        keys = sorted(set(self.statistics) & set(other.statistics))
        return dataclasses.replace(
            self,
            plus=self.plus + other.plus,
            minus=self.minus + other.minus,
            W_enc=cat(self.W_enc, other.W_enc, dim=1),
            b_enc=cat(self.b_enc, other.b_enc),
            threshold=cat(self.threshold, other.threshold),
            W_dec=cat(self.W_dec, other.W_dec),
            statistics={k: cat(self.statistics[k], other.statistics[k]) for k in keys},
        )
