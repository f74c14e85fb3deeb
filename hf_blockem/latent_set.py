"""The latent set: which SAE latents BLOCK-EM blocks, where they are read, and the encoder columns that compute them.

A `LatentSet` is the one artifact the trainer needs. It carries, per blocked layer (a `BlockedLayer`, see
`blocked_layer.py`), the ids of the latents in K+ and K-, the SAE encoder columns `W_enc[:, K]`, `b_enc[K]`, the
JumpReLU `threshold[K]`, `b_dec` and the input normalisation, so that z on the blocked latents is computed without the
SAE. It is stored as a single `latent_set.safetensors` file whose string metadata holds every non-tensor field, it is
validated as untrusted when loaded, and it reaches the Hub through `huggingface_hub.ModelHubMixin`.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from huggingface_hub import ModelCard, ModelHubMixin, hf_hub_download
from huggingface_hub.errors import EntryNotFoundError
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from transformers.utils.hub import extract_commit_hash

if TYPE_CHECKING:
    from transformers import PretrainedConfig

from .blocked_layer import BlockedLayer, hook_name_for_layer, is_int, layer_from_hook_name

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
LATENT_SET_FILENAME = "latent_set.safetensors"
METADATA_KEY = "blockem_latent_set"
# A latent set holds a few hundred encoder columns: its header (tensor index + JSON metadata) is a few KiB. The cap
# keeps a hostile file from making us parse an arbitrarily large JSON document.
MAX_HEADER_BYTES = 1 << 20
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle", ".npy", ".npz")
_COMMIT_RE = re.compile(r"[0-9a-f]{40}")
_DIRECTION_RE = re.compile(r"directions\.(0|[1-9][0-9]{0,5})")
_TENSOR_NAMES = ("W_enc", "b_enc", "b_dec", "threshold", "W_dec", "plus", "minus")
_REQUIRED_KEYS = ("format_version", "base_model", "base_model_revision", "d_in", "layers")
_OPTIONAL_KEYS = ("library_version", "metadata", "checksum")
_REQUIRED_LAYER_KEYS = ("layer", "hook_name", "architecture", "apply_b_dec_to_input", "normalize_activations", "sae")
_OPTIONAL_LAYER_KEYS = ("module_path",)


class LatentSetFormatError(ValueError):
    """A latent-set file or folder that hf_blockem refuses to load; the message names the problem."""


def _check_directions(directions: dict[int, torch.Tensor] | None, d_in: int) -> dict[int, torch.Tensor]:
    """Validated fp32 CPU copies of per-layer `[d_in]` misalignment directions, sorted by layer."""
    if directions is None:
        return {}
    if not isinstance(directions, dict):
        raise ValueError(
            f"Expected `directions` to be a dict {{layer: [d_in] tensor}}, got {type(directions).__name__}."
        )
    out = {}
    for layer, vector in sorted(directions.items(), key=lambda item: str(item[0])):
        if not is_int(layer) or layer < 0:
            raise ValueError(f"Expected direction layers to be ints >= 0, got {layer!r}.")
        if not isinstance(vector, torch.Tensor) or not vector.is_floating_point() or tuple(vector.shape) != (d_in,):
            got = list(vector.shape) if isinstance(vector, torch.Tensor) else type(vector).__name__
            raise ValueError(
                f"Direction at layer {layer}: expected a floating-point tensor of shape [{d_in}], got {got}."
            )
        if not torch.isfinite(vector).all() or not vector.abs().sum() > 0:
            raise ValueError(f"Direction at layer {layer}: expected finite values, not all zero.")
        out[layer] = vector.detach().to("cpu", torch.float32).clone().contiguous()
    return dict(sorted(out.items()))


def _checksum(description: dict, tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over the canonical JSON description (without the checksum) and every tensor's name, dtype, shape and bytes."""
    digest = hashlib.sha256(json.dumps(description, sort_keys=True).encode())
    for name in sorted(tensors):
        tensor = tensors[name].contiguous()
        digest.update(f"\0{name}\0{tensor.dtype}\0{list(tensor.shape)}\0".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return "sha256:" + digest.hexdigest()


def _library_version() -> str:
    try:
        from hf_blockem import __version__

        return __version__
    except ImportError:
        return "unknown"


class LatentSet(
    ModelHubMixin,
    library_name="hf_blockem",
    tags=["blockem", "emergent-misalignment", "sparse-autoencoder"],
    paper_url="https://arxiv.org/abs/2602.00767",
):
    """The SAE latents BLOCK-EM blocks during fine-tuning, at one or more decoder layers.

    Saved as one `latent_set.safetensors` (tensors + JSON string metadata); `save_pretrained`, `from_pretrained` and
    `push_to_hub` come from `huggingface_hub.ModelHubMixin`.

    Args:
        layers (`list[BlockedLayer]`): one entry per blocked decoder layer; sorted by layer index, indices unique.
        base_model (`str`): Hub id or path of the model whose activations the SAE reads.
        base_model_revision (`str`, *optional*): revision (ideally a commit) of the base model.
        d_in (`int`): residual-stream width; must equal every layer's `d_in` and the model's hidden size.
        metadata (`dict`, *optional*): free JSON-serialisable information (selection settings, judge, ...).
        directions (`dict[int, torch.Tensor]`, *optional*): per decoder layer `L`, a `[d_in]` misalignment direction
            in the residual stream at the output of layer `L` (for example the mean difference between a misaligned
            model's and the base model's activations, see `hf_blockem.diagnostics.misalignment_directions`), read by
            the rerouting diagnostics. Stored as tensors `directions.{L}`; a file without them stays format 1.

    Example:
    ```python
    >>> latent_set = LatentSet.from_sae(sae, plus=[12, 40], minus=[7], base_model="meta-llama/Llama-3.1-8B-Instruct")
    >>> latent_set.save_pretrained("my-latent-set")
    >>> latent_set = LatentSet.from_pretrained("user/my-latent-set", revision="<40-hex commit>", strict=True)
    ```
    """

    def __init__(
        self,
        layers: list[BlockedLayer],
        *,
        base_model: str,
        base_model_revision: str | None = None,
        d_in: int,
        metadata: dict | None = None,
        directions: dict[int, torch.Tensor] | None = None,
    ):
        # ModelHubMixin would write the jsonable init arguments to config.json; everything lives in the safetensors
        # metadata instead, so there is exactly one file to trust.
        self._hub_mixin_config = None
        if not layers or not all(isinstance(layer, BlockedLayer) for layer in layers):
            raise ValueError(f"Expected a non-empty list of BlockedLayer, got {layers!r}.")
        indices = [layer.layer for layer in layers]
        if len(set(indices)) != len(indices):
            raise ValueError(f"Expected each decoder layer at most once, got layers {indices}; merge their latents.")
        if not isinstance(base_model, str) or not base_model:
            raise ValueError(f"Expected `base_model` to be a non-empty Hub id or path, got {base_model!r}.")
        if base_model_revision is not None and (not isinstance(base_model_revision, str) or not base_model_revision):
            raise ValueError(
                f"Expected `base_model_revision` to be a non-empty string (ideally a commit) or None when unknown, got "
                f"{base_model_revision!r}."
            )
        if not is_int(d_in) or d_in < 1:
            raise ValueError(f"Expected `d_in` to be a positive int, got {d_in!r}.")
        for layer in layers:
            if layer.d_in != d_in:
                raise ValueError(f"Layer {layer.layer}: W_enc has d_in={layer.d_in}, the set has d_in={d_in}.")
        if metadata is not None and not isinstance(metadata, dict):
            raise ValueError(f"Expected `metadata` to be a dict, got {type(metadata).__name__}.")
        self.layers = sorted(layers, key=lambda layer: layer.layer)
        self.base_model = base_model
        self.base_model_revision = base_model_revision
        self.d_in = d_in
        self.metadata = dict(metadata or {})
        self.directions = _check_directions(directions, d_in)
        self.format_version = FORMAT_VERSION
        self.library_version = _library_version()
        self.resolved_commit: str | None = None
        self.source: str | None = None
        self.loaded_strictly = False  # set by `from_pretrained(strict=True)`: pinned commit and checksum checked
        try:
            json.dumps(self.to_dict())  # metadata, provenance dicts and module paths end up in the file's JSON
        except (TypeError, ValueError) as error:
            raise ValueError(
                f"Expected `metadata` and each layer's `sae` dict to be JSON-serialisable: {error}."
            ) from error

    @property
    def layer_indices(self) -> list[int]:
        """The blocked decoder layers, in increasing order."""
        return [layer.layer for layer in self.layers]

    @property
    def deepest_layer(self) -> int:
        """The last blocked decoder layer: base passes can stop after it."""
        return self.layers[-1].layer

    @property
    def n_latents(self) -> int:
        """Blocked latents over all layers (K+ and K-)."""
        return sum(layer.n_latents for layer in self.layers)

    def layer(self, index: int) -> BlockedLayer:
        """Returns the `BlockedLayer` for decoder layer `index`."""
        for layer in self.layers:
            if layer.layer == index:
                return layer
        raise KeyError(f"Layer {index} is not blocked by this latent set; blocked layers: {self.layer_indices}.")

    def validate_for_model(self, config: PretrainedConfig) -> None:
        """Checks that the set fits a model: `d_in` equals its hidden size and every layer exists.

        Args:
            config (`transformers.PretrainedConfig`): the model's config (multimodal configs use their text config).
        """
        text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
        hidden_size, num_layers = text_config.hidden_size, text_config.num_hidden_layers
        if hidden_size != self.d_in:
            raise ValueError(
                f"The latent set expects hidden size d_in={self.d_in} (base model {self.base_model!r}), the model has "
                f"hidden_size={hidden_size}. Use the latent set built for this model."
            )
        too_deep = [index for index in [*self.layer_indices, *self.directions] if index >= num_layers]
        if too_deep:
            raise ValueError(
                f"The latent set blocks layers {too_deep}, the model has {num_layers} decoder layers (0 to "
                f"{num_layers - 1}). Use the latent set built for this model."
            )

    @classmethod
    def from_sae(
        cls,
        sae,
        *,
        plus: list[int],
        minus: list[int] = (),
        layer: int | None = None,
        base_model: str,
        base_model_revision: str | None = None,
        sae_release: str | None = None,
        sae_id: str | None = None,
        sae_commit: str | None = None,
        statistics: dict[str, torch.Tensor] | None = None,
    ) -> LatentSet:
        """Builds a single-layer set from a SAELens `StandardSAE` or `JumpReLUSAE`.

        Args:
            sae (`sae_lens.SAE`): the SAE; its `cfg.metadata.hook_name` gives the layer unless `layer` is passed.
            plus (`list[int]`): latent ids in K+.
            minus (`list[int]`, *optional*): latent ids in K-.
            layer (`int`, *optional*): decoder-layer index, when the SAE's hook name is missing; must agree with it.
            base_model (`str`): Hub id or path of the model the SAE reads.
            base_model_revision (`str`, *optional*): its revision.
            sae_release (`str`, *optional*): SAELens release or Hub repo of the SAE.
            sae_id (`str`, *optional*): SAE id within the release.
            sae_commit (`str`, *optional*): the SAE's source commit (SAELens `from_pretrained` takes no revision).
            statistics (`dict[str, torch.Tensor]`, *optional*): per-latent `[n]` values ordered plus then minus.

        Returns:
            `LatentSet`
        """
        from sae_lens import JumpReLUSAE, StandardSAE

        architecture = sae.cfg.architecture()
        if not isinstance(sae, (StandardSAE, JumpReLUSAE)):
            raise ValueError(
                f"Expected a SAELens StandardSAE or JumpReLUSAE, got {type(sae).__name__} (architecture "
                f"{architecture!r}). A column subset reproduces ReLU and JumpReLU latents exactly but not TopK / "
                "BatchTopK ones (the top-k set depends on all latents); training SAEs must be converted to inference "
                "SAEs first."
            )
        hook_name = sae.cfg.metadata.hook_name
        if hook_name is not None:
            hooked_layer = layer_from_hook_name(hook_name)
            if layer is not None and layer != hooked_layer:
                raise ValueError(
                    f"`layer`={layer} disagrees with the SAE's hook {hook_name!r} (layer {hooked_layer})."
                )
            layer = hooked_layer
        elif layer is None:
            raise ValueError("The SAE has no `cfg.metadata.hook_name`: pass `layer=` (the decoder-layer index).")
        ids = list(plus) + list(minus)
        index = torch.tensor(ids, dtype=torch.long)
        if ids and (min(ids) < 0 or max(ids) >= sae.cfg.d_sae):
            raise ValueError(
                f"Expected latent ids in [0, {sae.cfg.d_sae}), got {[i for i in ids if not 0 <= i < sae.cfg.d_sae]}."
            )
        provenance = {
            "release": sae_release,
            "sae_id": sae_id,
            "commit": sae_commit,
            "d_sae": sae.cfg.d_sae,
            "architecture": architecture,
            "hook_name": hook_name,
            "dtype": sae.cfg.dtype,
            "model_name": sae.cfg.metadata.model_name,
        }
        blocked = BlockedLayer(
            layer=layer,
            plus=list(plus),
            minus=list(minus),
            W_enc=sae.W_enc.detach()[:, index],
            b_enc=sae.b_enc.detach()[index],
            b_dec=sae.b_dec.detach(),
            threshold=sae.threshold.detach()[index] if architecture == "jumprelu" else None,
            apply_b_dec_to_input=bool(sae.cfg.apply_b_dec_to_input),
            normalize_activations=sae.cfg.normalize_activations,
            architecture=architecture,
            hook_name=hook_name_for_layer(layer),
            W_dec=sae.W_dec.detach()[index],
            sae={k: v for k, v in provenance.items() if v is not None},
            statistics={k: torch.as_tensor(v) for k, v in (statistics or {}).items()},
        )
        return cls([blocked], base_model=base_model, base_model_revision=base_model_revision, d_in=sae.cfg.d_in)

    @classmethod
    def concatenate(cls, latent_sets: list[LatentSet], *, metadata: dict | None = None) -> LatentSet:
        """Combines sets on different layers of the same base model into one multi-layer set.

        Args:
            latent_sets (`list[LatentSet]`): sets with equal `base_model`, `base_model_revision` and `d_in`.
            metadata (`dict`, *optional*): defaults to the union of the parts' metadata (later sets win).

        Returns:
            `LatentSet`
        """
        if not latent_sets:
            raise ValueError("Expected at least one LatentSet to concatenate, got none.")
        first = latent_sets[0]
        for other in latent_sets[1:]:
            mine = (first.base_model, first.base_model_revision, first.d_in)
            theirs = (other.base_model, other.base_model_revision, other.d_in)
            if mine != theirs:
                raise ValueError(
                    f"Expected sets of one base model (base_model, revision, d_in) = {mine}, got {theirs}. Latent sets "
                    "of different models cannot be blocked together."
                )
        if metadata is None:
            metadata = {k: v for latent_set in latent_sets for k, v in latent_set.metadata.items()}
        layers = [layer for latent_set in latent_sets for layer in latent_set.layers]
        directions = {k: v for latent_set in latent_sets for k, v in latent_set.directions.items()}
        return cls(
            layers,
            base_model=first.base_model,
            base_model_revision=first.base_model_revision,
            d_in=first.d_in,
            metadata=metadata,
            directions=directions,
        )

    def to_dict(self) -> dict[str, Any]:
        """The JSON-serialisable description stored in the file's metadata (everything but the tensors)."""
        return {
            "format_version": self.format_version,
            "library_version": _library_version(),
            "base_model": self.base_model,
            "base_model_revision": self.base_model_revision,
            "d_in": self.d_in,
            "layers": [layer.to_dict() for layer in self.layers],
            "metadata": self.metadata,
        }

    def __repr__(self) -> str:
        layers = ", ".join(
            f"L{layer.layer}: |K+|={len(layer.plus)} |K-|={len(layer.minus)} ({layer.architecture})"
            for layer in self.layers
        )
        revision = f"@{self.base_model_revision}" if self.base_model_revision else ""
        return f"LatentSet(base_model={self.base_model}{revision}, d_in={self.d_in}, layers=[{layers}])"

    def generate_model_card(self, *args, **kwargs) -> ModelCard:
        """The repo's card (what the latents are, the SAE and its commit, selection figures, usage); see
        `hf_blockem.latent_set_card`. `save_pretrained(..., model_card_kwargs={"repo_id": ...})` names the repo."""
        from .latent_set_card import latent_set_model_card

        return latent_set_model_card(self, **kwargs)

    def layer_tensors(self) -> dict[str, torch.Tensor]:
        """Every blocked layer's tensors under their names in the file (`layers.L.W_enc`, `layers.L.plus`, ...)."""
        return {name: t for layer in self.layers for name, t in layer._tensors().items()}

    def blocking_checksum(self) -> str:
        """The checksum `save_pretrained` writes, without the library version and the directions: it changes exactly
        when what the penalty computes changes (keys the base-activation cache)."""
        description = self.to_dict()
        description.pop("library_version", None)
        return _checksum(description, self.layer_tensors())

    def _save_pretrained(self, save_directory: Path) -> None:
        tensors = self.layer_tensors()
        tensors.update({f"directions.{layer}": vector for layer, vector in self.directions.items()})
        description = self.to_dict()
        description["checksum"] = _checksum(description, tensors)
        save_file(
            tensors, str(Path(save_directory) / LATENT_SET_FILENAME), metadata={METADATA_KEY: json.dumps(description)}
        )

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | Path,
        *,
        revision: str | None = None,
        token: str | bool | None = None,
        cache_dir: str | Path | None = None,
        force_download: bool = False,
        local_files_only: bool = False,
        strict: bool = False,
        filename: str = LATENT_SET_FILENAME,
        subfolder: str | None = None,
    ) -> LatentSet:
        """Loads a latent set from a Hub repo, a local folder or a `.safetensors` file, validating it as untrusted.

        Overrides `ModelHubMixin.from_pretrained` only to never read a `config.json`: in the base class a repo's
        config.json is turned into constructor arguments, which an untrusted repo must not control.

        Args:
            pretrained_model_name_or_path (`str` or `Path`): Hub repo id, local folder or file.
            revision (`str`, *optional*): branch, tag or commit on the Hub.
            token, cache_dir, force_download, local_files_only: as in `huggingface_hub.hf_hub_download`.
            strict (`bool`, *optional*, defaults to `False`): require a 40-hex commit `revision` for Hub repos, a
                checksum in the file and the base model's revision in its metadata. The checksum catches files
                changed after they were written, not a hostile author (who can recompute it): the pinned commit is
                what ties the set to the version you reviewed.
            filename (`str`, *optional*, defaults to `"latent_set.safetensors"`): file name inside the repo/folder.
            subfolder (`str`, *optional*): folder inside the repo/folder, for example `"latent_set"` in a blocked
                checkpoint's repo (relative, no `..`).

        Returns:
            `LatentSet`, with `source` and (for Hub repos) `resolved_commit` set.
        """
        return cls._from_pretrained(
            model_id=str(pretrained_model_name_or_path),
            revision=revision,
            cache_dir=cache_dir,
            force_download=force_download,
            local_files_only=local_files_only,
            token=token,
            strict=strict,
            filename=filename,
            subfolder=subfolder,
        )

    @classmethod
    def _from_pretrained(
        cls,
        *,
        model_id: str,
        revision: str | None,
        cache_dir: str | Path | None,
        force_download: bool,
        local_files_only: bool,
        token: str | bool | None,
        strict: bool = False,
        filename: str = LATENT_SET_FILENAME,
        subfolder: str | None = None,
    ) -> LatentSet:
        if subfolder is not None:
            parts = subfolder.replace("\\", "/").split("/")
            if subfolder.startswith(("/", "\\")) or any(part in ("", ".", "..") for part in parts):
                raise LatentSetFormatError(
                    f"Expected `subfolder` to be a relative path without '.', '..' or empty parts, got {subfolder!r}."
                )
        if "/" in filename or "\\" in filename or ".." in filename or not filename.endswith(".safetensors"):
            raise LatentSetFormatError(
                f"Expected a plain '*.safetensors' file name without path separators or '..', got {filename!r}."
            )
        resolved_commit = None
        if os.path.isfile(model_id):
            path = model_id
        elif os.path.isdir(model_id):
            path = os.path.join(model_id, *(subfolder.split("/") if subfolder else ()), filename)
            if not os.path.isfile(path):
                found = sorted(name for name in os.listdir(model_id) if name.endswith(PICKLE_SUFFIXES))
                hint = f" Found {found}: hf_blockem loads safetensors only and never unpickles." if found else ""
                where = f"{model_id!r}" + (f" (subfolder {subfolder!r})" if subfolder else "")
                raise LatentSetFormatError(f"No {filename!r} in folder {where}.{hint}")
        else:
            if strict and (revision is None or not _COMMIT_RE.fullmatch(revision)):
                raise LatentSetFormatError(
                    f"strict=True needs `revision` to be a 40-hex commit, got {revision!r}: pin the latent set to the "
                    "commit you reviewed."
                )
            try:
                path = hf_hub_download(
                    model_id,
                    filename,
                    subfolder=subfolder,
                    revision=revision,
                    cache_dir=cache_dir,
                    force_download=force_download,
                    local_files_only=local_files_only,
                    token=token,
                )
            except EntryNotFoundError as error:
                raise LatentSetFormatError(
                    f"No {filename!r} in repo {model_id!r} at revision {revision or 'main'} (or, offline, not in the "
                    "local cache): hf_blockem loads safetensors only (no .bin/.pt/.pkl) and needs a file written by "
                    "`LatentSet.save_pretrained`."
                ) from error
            # The Hub cache keeps each download under `snapshots/<commit>/`.
            resolved_commit = extract_commit_hash(path, None)
        if path.endswith(PICKLE_SUFFIXES) or not path.endswith(".safetensors"):
            raise LatentSetFormatError(
                f"Expected a '.safetensors' file, got {path!r}: hf_blockem loads safetensors only."
            )
        latent_set = _load_file(path, strict=strict)
        latent_set.resolved_commit = resolved_commit
        latent_set.source = model_id
        latent_set.loaded_strictly = strict
        return latent_set


def _read_description(path: str) -> dict:
    """Checks the safetensors header by hand before safetensors parses it, and returns our JSON description."""
    size = os.path.getsize(path)
    with open(path, "rb") as file:
        prefix = file.read(8)
        if len(prefix) < 8:
            raise LatentSetFormatError(
                f"{path}: {size} bytes is too short for a safetensors file (8-byte header size)."
            )
        header_size = int.from_bytes(prefix, "little")
        if header_size > MAX_HEADER_BYTES:
            raise LatentSetFormatError(
                f"{path}: safetensors header of {header_size} bytes exceeds the {MAX_HEADER_BYTES}-byte cap for latent "
                "sets; the file is corrupt or not a latent set."
            )
        if header_size > size - 8:
            raise LatentSetFormatError(f"{path}: header size {header_size} is larger than the file ({size} bytes).")
        raw = file.read(header_size)
    try:
        header = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as error:
        raise LatentSetFormatError(f"{path}: safetensors header is not UTF-8 ({error}).") from error
    except (json.JSONDecodeError, RecursionError) as error:
        raise LatentSetFormatError(f"{path}: safetensors header is not JSON ({error}).") from error
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(metadata, dict) or METADATA_KEY not in metadata:
        raise LatentSetFormatError(
            f"{path}: no {METADATA_KEY!r} entry in the safetensors metadata; not a file written by "
            "`LatentSet.save_pretrained`."
        )
    try:
        description = json.loads(metadata[METADATA_KEY])
    except (TypeError, json.JSONDecodeError, RecursionError) as error:
        raise LatentSetFormatError(f"{path}: metadata {METADATA_KEY!r} is not valid JSON ({error}).") from error
    if not isinstance(description, dict):
        raise LatentSetFormatError(
            f"{path}: metadata {METADATA_KEY!r} must be a JSON object, got {type(description).__name__}."
        )
    return description


def _check_keys(where: str, found: dict, required: tuple, optional: tuple) -> None:
    missing = [key for key in required if key not in found]
    if missing:
        raise LatentSetFormatError(f"{where}: missing required metadata keys {missing}.")
    unknown = sorted(set(found) - set(required) - set(optional))
    if unknown:
        logger.warning(
            "%s: dropping unknown metadata keys %s (written by a newer hf_blockem? upgrade it).", where, unknown
        )
        for key in unknown:
            del found[key]


def _load_file(path: str, *, strict: bool) -> LatentSet:
    description = _read_description(path)
    # The checksum covers the file as written, including keys this version does not know and drops below.
    as_written = copy.deepcopy(description)
    checksum = as_written.pop("checksum", None)
    version = description.get("format_version")
    if not is_int(version) or version < 1:
        raise LatentSetFormatError(f"{path}: expected an integer format_version >= 1, got {version!r}.")
    if version > FORMAT_VERSION:
        raise LatentSetFormatError(
            f"{path}: format_version {version} is newer than the supported {FORMAT_VERSION}; upgrade hf_blockem."
        )
    _check_keys(path, description, _REQUIRED_KEYS, _OPTIONAL_KEYS)
    if not isinstance(description["layers"], list) or not description["layers"]:
        raise LatentSetFormatError(f"{path}: expected 'layers' to be a non-empty list, got {description['layers']!r}.")
    try:
        tensors = load_file(path)
    except SafetensorError as error:
        raise LatentSetFormatError(f"{path}: not a valid safetensors file ({error}).") from error

    used, layers = set(), []
    for entry in description["layers"]:
        if not isinstance(entry, dict):
            raise LatentSetFormatError(f"{path}: expected each layer entry to be an object, got {entry!r}.")
        where = f"{path} layer {entry.get('layer')!r}"
        _check_keys(where, entry, _REQUIRED_LAYER_KEYS, _OPTIONAL_LAYER_KEYS)
        if not is_int(entry["layer"]) or not isinstance(entry["sae"], dict) or not is_int(entry["sae"].get("d_sae")):
            raise LatentSetFormatError(
                f"{where}: expected an int 'layer' and an 'sae' object with an int 'd_sae', got layer "
                f"{entry['layer']!r} and sae {entry['sae']!r}."
            )
        prefix = f"layers.{entry['layer']}."
        values = {
            name[len(prefix) :]: t
            for name, t in tensors.items()
            if name.startswith(prefix)
            and (name[len(prefix) :] in _TENSOR_NAMES or name[len(prefix) :].startswith("statistics."))
        }
        used.update(prefix + name for name in values)
        for name in ("W_enc", "b_enc", "b_dec", "plus", "minus"):
            if name not in values:
                raise LatentSetFormatError(f"{where}: missing tensor {prefix + name!r}.")
        for name, tensor in values.items():
            is_ids = name in ("plus", "minus")
            expected = torch.int64 if is_ids else torch.float32
            if tensor.dtype != expected or (is_ids and tensor.ndim != 1):
                raise LatentSetFormatError(
                    f"{where}: expected tensor {prefix + name!r} to be {'1-D latent ids of ' if is_ids else ''}"
                    f"{expected}, got {tensor.dtype} of shape {list(tensor.shape)}."
                )
        statistics = {k[len("statistics.") :]: v for k, v in values.items() if k.startswith("statistics.")}
        try:
            layers.append(
                BlockedLayer(
                    layer=entry["layer"],
                    plus=values["plus"].tolist(),
                    minus=values["minus"].tolist(),
                    W_enc=values["W_enc"],
                    b_enc=values["b_enc"],
                    b_dec=values["b_dec"],
                    threshold=values.get("threshold"),
                    apply_b_dec_to_input=entry["apply_b_dec_to_input"],
                    normalize_activations=entry["normalize_activations"],
                    architecture=entry["architecture"],
                    hook_name=entry["hook_name"],
                    module_path=entry.get("module_path"),
                    W_dec=values.get("W_dec"),
                    sae=entry["sae"],
                    statistics=statistics,
                )
            )
        except ValueError as error:
            raise LatentSetFormatError(f"{path}: {error}") from error
    directions = {}
    for name, tensor in tensors.items():
        match = _DIRECTION_RE.fullmatch(name)
        if match is None:
            if name.startswith("directions."):
                raise LatentSetFormatError(
                    f"{path}: expected direction tensors named 'directions.<layer>', got {name!r}."
                )
            continue
        if tensor.dtype != torch.float32:
            raise LatentSetFormatError(f"{path}: expected tensor {name!r} to be torch.float32, got {tensor.dtype}.")
        directions[int(match.group(1))] = tensor
        used.add(name)
    unused = sorted(set(tensors) - used)
    if unused:
        logger.warning("%s: ignoring unexpected tensors %s (written by a newer hf_blockem? upgrade it).", path, unused)
    try:
        latent_set = LatentSet(
            layers,
            base_model=description["base_model"],
            base_model_revision=description["base_model_revision"],
            d_in=description["d_in"],
            metadata=description.get("metadata") or {},
            directions=directions,
        )
    except ValueError as error:
        raise LatentSetFormatError(f"{path}: {error}") from error
    if strict and latent_set.base_model_revision is None:
        raise LatentSetFormatError(
            f"{path}: strict=True needs the revision of the base model the latents were found on, the file records "
            "none. Ask its author for a set saved with `base_model_revision=` (a commit), or load it without strict."
        )
    # The checksum is checked last so that a malformed file is reported by its specific defect.
    if checksum is None and strict:
        raise LatentSetFormatError(f"{path}: strict=True needs a checksum in the metadata, the file has none.")
    if checksum is not None:
        expected = _checksum(as_written, tensors)
        if checksum != expected:
            raise LatentSetFormatError(
                f"{path}: checksum mismatch (stored {checksum}, computed {expected}); the file was modified."
            )
    latent_set.library_version = description.get("library_version", "unknown")
    return latent_set
