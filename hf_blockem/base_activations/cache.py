"""Precomputed base activations (`base_activations="cache"`).

One pass before training runs the base model (adapters off, or the truncated reference) over the whole tokenised
training set, under no-grad and in large batches, and keeps z_base on the latent-set columns only: |K| floats per
token instead of d_in. Training then reads them instead of running a base forward.

Content addressing. Each sequence is stored under a hash of its token ids (and its position ids when the batch
carries them, as padding-free packing does), so the cache does not depend on the order, batching or padding side of
the training batches: it survives shuffling and resuming mid-epoch. The collator of the trainer is wrapped so that
each collated batch gets its `[batch, seq, |K|]` z_base on the CPU, off the GPU's critical path; a batch with an
unknown sequence (an eval set, a collator that changed) gets none and falls back to the on-the-fly source.

Staleness. The file is keyed on everything that changes its content or its coverage: the base weights (name,
revision, commit, dtype and a fingerprint of the weights themselves), the latent set (its checksum and commit), the
dataset (fingerprint and length), the tokeniser, `max_length` and packing. A different key is a different file, so a
changed key recomputes. Files: `blockem-base-activations-<key>.safetensors` (tensors) and `.json` (the full key).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ..atomic_write import atomic_write, write_json_atomic
from ..fingerprints import tokenizer_fingerprint
from ..hooks import ActivationCapture
from ..latent_set import LatentSet
from .source import CACHED_Z_BASE_KEY, BaseActivations, OnTheFlyBaseActivations

logger = logging.getLogger(__name__)

CACHE_FORMAT_VERSION = 1
CACHE_PREFIX = "blockem-base-activations-"
_NOT_MODEL_INPUTS = ("labels", "shift_labels", "completion_mask", "assistant_masks")


# ---- sequences -------------------------------------------------------------------------------------------------


def sequence_spans(
    input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None
) -> list[tuple[int, int, int]]:
    """The sequences of a collated batch as `(row, start, end)`, in row-major order.

    A sequence is a maximal run of attended positions (any padding side); with position ids, a position id of 0 also
    starts a new sequence (padding-free packing puts several sequences in one row).
    """
    rows, length = input_ids.shape
    valid = attention_mask.bool().cpu() if attention_mask is not None else torch.ones(rows, length, dtype=torch.bool)
    start = valid.clone()
    start[:, 1:] &= ~valid[:, :-1]
    if position_ids is not None:
        start |= valid & (position_ids.cpu() == 0)
    # Vectorised, since the collator runs this on every training batch: a sequence ends at the first position after
    # its start that is padding or starts another sequence, or at the end of its row. In row-major flat indices the
    # end of row r is (r + 1) * length, so a search over the sorted boundaries never crosses into the next row.
    row_ends = torch.arange(1, rows + 1) * length
    boundaries = torch.cat([(~valid | start).flatten().nonzero().flatten(), row_ends]).sort().values
    begins = start.flatten().nonzero().flatten()
    ends = boundaries[torch.searchsorted(boundaries, begins, right=True)]
    row_of = begins // length
    return list(
        zip(row_of.tolist(), (begins - row_of * length).tolist(), (ends - row_of * length).tolist(), strict=True)
    )


def sequence_digest(input_ids: torch.Tensor, position_ids: torch.Tensor | None = None) -> bytes:
    """16-byte content address of one sequence: its token ids, and its position ids when given."""
    digest = hashlib.blake2b(input_ids.to("cpu", torch.int64).numpy().tobytes(), digest_size=16)
    if position_ids is not None:
        digest.update(b"positions")
        digest.update(position_ids.to("cpu", torch.int64).numpy().tobytes())
    return digest.digest()


def _span_digests(batch: dict[str, Any]) -> list[tuple[int, int, int, bytes]]:
    input_ids, position_ids = batch["input_ids"], batch.get("position_ids")
    return [
        (
            row,
            begin,
            end,
            sequence_digest(input_ids[row, begin:end], None if position_ids is None else position_ids[row, begin:end]),
        )
        for row, begin, end in sequence_spans(input_ids, batch.get("attention_mask"), position_ids)
    ]


# ---- the key -------------------------------------------------------------------------------------------------


def dataset_fingerprint(dataset) -> str:
    """A `datasets.Dataset`'s own fingerprint, else a hash of every row's `input_ids` (and `position_ids`)."""
    fingerprint = getattr(dataset, "_fingerprint", None)
    if isinstance(fingerprint, str):
        return f"datasets:{fingerprint}"
    digest = hashlib.sha256()
    for index in range(len(dataset)):
        row = dataset[index]
        for name in ("input_ids", "position_ids"):
            if name in row:
                digest.update(name.encode() + torch.as_tensor(row[name], dtype=torch.int64).numpy().tobytes())
    return "sha256:" + digest.hexdigest()


def cache_key(
    *,
    latent_set: LatentSet,
    model: dict[str, Any],
    dataset,
    tokenizer=None,
    max_length: int | None = None,
    packing: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Everything that changes the content or the coverage of a cache, as a JSON-serialisable dict.

    Args:
        latent_set ([`LatentSet`]): the blocked latents.
        model (`dict`): the base model's identity: name or path, revision, commit, dtype, weights fingerprint.
        dataset: the tokenised training set.
        tokenizer (*optional*): the tokeniser (or processor).
        max_length (`int`, *optional*): truncation length.
        packing (`dict`, *optional*): packing / padding-free settings.
    """
    return {
        "format_version": CACHE_FORMAT_VERSION,
        "latent_set": {
            "checksum": latent_set.blocking_checksum(),
            "source": getattr(latent_set, "source", None),
            "resolved_commit": latent_set.resolved_commit,
        },
        "model": model,
        "dataset": {"fingerprint": dataset_fingerprint(dataset), "rows": len(dataset)},
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "max_length": max_length,
        "packing": packing or {},
    }


def key_digest(key: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()


# ---- the cache -------------------------------------------------------------------------------------------------


class BaseActivationCache:
    """z_base of the blocked latents for every token of a set of sequences, addressed by sequence content.

    Args:
        digests (`list[bytes]`): one content address per sequence (see [`sequence_digest`]).
        starts (`torch.Tensor`): `[n_sequences]` row of each sequence's first token in `z`.
        lengths (`torch.Tensor`): `[n_sequences]` token counts.
        z (`torch.Tensor`): `[n_tokens, |K|]` fp32, columns ordered by blocked layer, then `plus`, then `minus`.
    """

    def __init__(self, digests: list[bytes], starts: torch.Tensor, lengths: torch.Tensor, z: torch.Tensor):
        self.z = z
        self._index = {d: (int(s), int(n)) for d, s, n in zip(digests, starts.tolist(), lengths.tolist(), strict=True)}
        self._digests, self._starts, self._lengths = digests, starts, lengths

    def __len__(self) -> int:
        return len(self._index)

    @property
    def n_latents(self) -> int:
        """Cached latents per token (every blocked layer's, in latent-set order)."""
        return self.z.shape[1]

    def lookup(self, batch: dict[str, Any]) -> torch.Tensor | None:
        """`[batch, seq, |K|]` fp32 z_base for a collated CPU batch (0 on padding), or `None` if a sequence is unknown."""
        input_ids = batch["input_ids"]
        out = torch.zeros(*input_ids.shape, self.n_latents, dtype=torch.float32)
        for row, begin, end, digest in _span_digests(batch):
            hit = self._index.get(digest)
            if hit is None or hit[1] != end - begin:
                return None
            out[row, begin:end] = self.z[hit[0] : hit[0] + hit[1]]
        return out

    # ---- building ----

    @classmethod
    def build(
        cls,
        source: OnTheFlyBaseActivations,
        model: nn.Module,
        capture: ActivationCapture,
        batches,
        device: torch.device | str,
        progress: bool = False,
    ) -> BaseActivationCache:
        """Runs `source` over collated `batches` and keeps z_base of every token of every distinct sequence.

        Args:
            source ([`OnTheFlyBaseActivations`]): the base pass (adapters off or the truncated reference).
            model (`torch.nn.Module`): the trained model (used by the adapter source).
            capture ([`ActivationCapture`]): its capture hooks, attached.
            batches (iterable of `dict`): collated CPU batches (the trainer's collator over the unshuffled dataset).
            device: where the base pass runs.
            progress (`bool`): show a progress bar.
        """
        from tqdm.auto import tqdm

        layers = source.latent_set.layers
        digests, starts, lengths, chunks = [], [], [], []
        seen: set[bytes] = set()
        offset = 0
        for batch in tqdm(batches, desc="BLOCK-EM base activations", disable=not progress):
            mask = torch.zeros(batch["input_ids"].shape, dtype=torch.bool)
            for row, begin, end, digest in _span_digests(batch):
                if digest in seen:
                    continue
                seen.add(digest)
                mask[row, begin:end] = True
                digests.append(digest)
                starts.append(offset)
                lengths.append(end - begin)
                offset += end - begin
            if not mask.any():
                continue
            inputs = {
                key: value.to(device) if isinstance(value, torch.Tensor) else value
                for key, value in batch.items()
                if key not in _NOT_MODEL_INPUTS
            }
            z = source.z_base(model, capture, inputs, mask.to(device))
            # Masked tokens come out in row-major order, the order in which the spans were appended above.
            chunks.append(torch.cat([z[blocked.layer] for blocked in layers], dim=1).cpu())
        n_latents = sum(blocked.n_latents for blocked in layers)
        z = torch.cat(chunks) if chunks else torch.zeros(0, n_latents)
        return cls(digests, torch.tensor(starts, dtype=torch.int64), torch.tensor(lengths, dtype=torch.int64), z)

    # ---- files ----

    @staticmethod
    def paths(directory: str | os.PathLike, key: dict[str, Any]) -> tuple[Path, Path]:
        """The cache's tensor file and key file in `directory` for `key`."""
        stem = Path(directory) / f"{CACHE_PREFIX}{key_digest(key)[:24]}"
        return stem.with_suffix(".safetensors"), stem.with_suffix(".json")

    def save(self, directory: str | os.PathLike, key: dict[str, Any]) -> Path:
        """Writes the tensors and the key file, each atomically (a reader never sees half a file)."""
        tensors_path, key_path = self.paths(directory, key)
        tensors_path.parent.mkdir(parents=True, exist_ok=True)
        digests = torch.frombuffer(bytearray(b"".join(self._digests)), dtype=torch.uint8).reshape(-1, 16)
        tensors = {"digests": digests, "starts": self._starts, "lengths": self._lengths, "z": self.z.contiguous()}
        atomic_write(tensors_path, lambda path: save_file(tensors, path, metadata={"key_digest": key_digest(key)}))
        description = {"key": key, "key_digest": key_digest(key), "sequences": len(self), "tokens": len(self.z)}
        write_json_atomic(key_path, description)
        return tensors_path

    @classmethod
    def load(cls, directory: str | os.PathLike, key: dict[str, Any]) -> BaseActivationCache | None:
        """The cache stored for exactly `key` in `directory`, or `None` if there is none or it does not match."""
        tensors_path, key_path = cls.paths(directory, key)
        if not (tensors_path.is_file() and key_path.is_file()):
            return None
        digest = key_digest(key)
        try:
            description = json.loads(key_path.read_text())
            stored_key = json.loads(json.dumps(description["key"]))
            if description.get("key_digest") != digest or stored_key != json.loads(json.dumps(key, default=str)):
                logger.warning("Stale BLOCK-EM base-activation cache %s (its key differs): recomputing.", key_path)
                return None
            with safe_open(str(tensors_path), framework="pt") as f:
                if (f.metadata() or {}).get("key_digest") != digest:
                    logger.warning("BLOCK-EM cache %s does not belong to its key file: recomputing.", tensors_path)
                    return None
                tensors = {name: f.get_tensor(name) for name in ("digests", "starts", "lengths", "z")}
        except (OSError, ValueError, KeyError, json.JSONDecodeError) as error:
            logger.warning("Unreadable BLOCK-EM base-activation cache %s (%s): recomputing.", tensors_path, error)
            return None
        digests = [bytes(row) for row in tensors["digests"].tolist()]
        return cls(digests, tensors["starts"], tensors["lengths"], tensors["z"].float())


# ---- the source and its collator -----------------------------------------------------------------------------


class CachedZBaseCollator:
    """Wraps a data collator: adds the cached z_base of each batch under `CACHED_Z_BASE_KEY` when every sequence is
    in the cache (as the int32 view of the fp32 values, so that input preparation moves it to the device untouched).

    The first batch (or pickling for dataloader workers) triggers the precomputing pass of its source, so the cache
    is built with the collator and model that training actually uses, once, when training starts.
    """

    def __init__(self, collator: Callable, source: CachedBaseActivations):
        self.collator, self._source, self._cache = collator, source, None

    @property
    def cache(self) -> BaseActivationCache:
        if self._cache is None:
            self._cache = self._source.cache
        return self._cache

    def __call__(self, features):
        batch = self.collator(features)
        z = self.cache.lookup(batch) if "input_ids" in batch else None
        if z is not None:
            batch[CACHED_Z_BASE_KEY] = z.view(torch.int32)
        return batch

    def __getstate__(self):
        # Dataloader workers get the finished cache, never the trainer behind the source.
        return {"collator": self.collator, "_source": None, "_cache": self.cache}

    def __getattr__(self, name: str):
        # Code that inspects the collator (e.g. `data_collator.tokenizer`) still sees the wrapped one.
        if name in ("collator", "_source", "_cache"):
            raise AttributeError(name)
        return getattr(self.collator, name)


class CachedBaseActivations(BaseActivations):
    """Base activations read from a [`BaseActivationCache`], with an on-the-fly fallback for unknown sequences.

    Args:
        latent_set ([`LatentSet`]): the blocked latents.
        fallback ([`OnTheFlyBaseActivations`]): used for batches the cache does not cover (eval sets).
        prepare (`callable`): returns `(cache, built, key, path)`: loads a matching cache or builds and saves one.
            Called once, on first use.

    Attributes:
        cache ([`BaseActivationCache`]), built (`bool`: this process computed it rather than loading it), key
        (`dict`, see [`cache_key`]), path (`Path` of the tensor file), misses (`int`: batches that needed the
        fallback).
    """

    mode = "cache"

    def __init__(
        self,
        latent_set,
        fallback: OnTheFlyBaseActivations,
        prepare: Callable[[], tuple[BaseActivationCache, bool, dict[str, Any], Path]],
    ):
        super().__init__(latent_set)
        self.fallback, self._prepare = fallback, prepare
        self._state: tuple[BaseActivationCache, bool, dict[str, Any], Path] | None = None
        self.misses = 0
        self._warned = False

    def _ready(self):
        if self._state is None:
            self._state = self._prepare()
        return self._state

    @property
    def cache(self) -> BaseActivationCache:
        return self._ready()[0]

    @property
    def built(self) -> bool:
        return self._ready()[1]

    @property
    def key(self) -> dict[str, Any]:
        return self._ready()[2]

    @property
    def path(self) -> Path:
        return self._ready()[3]

    def wrap_collator(self, collator: Callable) -> CachedZBaseCollator:
        if isinstance(collator, CachedZBaseCollator):
            collator = collator.collator
        return CachedZBaseCollator(collator, self)

    def z_base(self, model, capture, inputs, mask):
        cached = inputs.get(CACHED_Z_BASE_KEY)
        if cached is None:
            self.misses += 1
            if model.training and not self._warned:
                self._warned = True
                logger.warning(
                    "A training batch holds sequences that are not in the BLOCK-EM base-activation cache (or the "
                    "trainer's data collator was replaced after the trainer was built); computing its base "
                    "activations on the fly. Expected every training batch to come through the cache collator."
                )
            return self.fallback.z_base(model, capture, inputs, mask)
        z = cached.view(torch.float32)[mask]
        sizes = [blocked.n_latents for blocked in self.latent_set.layers]
        return {
            blocked.layer: part for blocked, part in zip(self.latent_set.layers, z.split(sizes, dim=1), strict=True)
        }
