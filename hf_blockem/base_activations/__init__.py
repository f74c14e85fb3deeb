"""Where z_base, the base model's activations of the blocked latents, comes from during training.

Every source implements `z_base(model, capture, inputs, mask) -> {layer: [n_masked, n_latents]}` (fp32, no grad):

- `"adapter"` ([`AdapterBaseActivations`]): the trained PEFT model with its adapters disabled, stopped after the
  deepest blocked layer. Exact for LoRA, no extra memory.
- `"reference"` ([`ReferenceBaseActivations`]): a frozen copy of the base model loaded from its Hub id or path and cut
  after the deepest blocked layer (about (L+1)/N of the model's decoder). For full fine-tuning.
- `"cache"` ([`CachedBaseActivations`]): z_base precomputed once for the whole training set, |K| floats per token,
  read from the collated batch. Near-zero cost per step.
- `"auto"`: `"cache"` when the training set is map-style and seen more than once, else `"adapter"` for PEFT models
  and `"reference"` for full fine-tuning.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sized
from pathlib import Path

import torch

from ..fingerprints import weights_fingerprint
from ..hooks import ActivationCapture, unwrap_model
from .adapter import AdapterBaseActivations, peft_model_of
from .cache import BaseActivationCache, CachedBaseActivations, CachedZBaseCollator, cache_key
from .reference import ReferenceBaseActivations, load_truncated_reference, truncate_decoder
from .source import CACHED_Z_BASE_KEY, BaseActivations, OnTheFlyBaseActivations

logger = logging.getLogger(__name__)

__all__ = [
    "CACHED_Z_BASE_KEY",
    "AdapterBaseActivations",
    "BaseActivationCache",
    "BaseActivations",
    "CachedBaseActivations",
    "CachedZBaseCollator",
    "OnTheFlyBaseActivations",
    "ReferenceBaseActivations",
    "default_cache_dir",
    "load_truncated_reference",
    "resolve_base_activations",
    "truncate_decoder",
]


def resolve_base_activations(trainer, capture: ActivationCapture) -> BaseActivations:
    """Builds the source of base activations that `trainer.args.base_activations` asks for.

    For `"cache"` this runs the precomputation pass (or loads a matching cache from disk); the caller wraps its data
    collator with `CachedBaseActivations.wrap_collator`.

    Args:
        trainer ([`~transformers.Trainer`]):
            A BLOCK-EM trainer after `Trainer.__init__` (its `args`, `model`, `latent_set`, `train_dataset`,
            `data_collator`, `processing_class` and `accelerator` are read).
        capture ([`ActivationCapture`]):
            The trained model's capture hooks (attached while the cache is built).

    Returns:
        [`BaseActivations`]
    """
    args, model = trainer.args, trainer.model
    mode = args.base_activations
    is_peft = peft_model_of(model) is not None
    if mode == "auto":
        mode = "cache" if _seen_more_than_once(trainer) else ("adapter" if is_peft else "reference")
        logger.info("base_activations='auto' resolved to %r", mode)
    if mode == "adapter":
        return _adapter(trainer)
    if mode == "reference":
        source = _reference(trainer)
        source.module  # noqa: B018 - load now, so that a missing base model is reported before training starts
        return source
    if mode == "cache":
        fallback = _adapter(trainer) if is_peft else _reference(trainer)
        if isinstance(fallback, ReferenceBaseActivations):
            fallback.check()  # loaded only when the cache is built (and released after)
        return _cached(trainer, capture, fallback)
    raise ValueError(f"base_activations must be one of 'auto', 'adapter', 'reference', 'cache', received {mode!r}.")


def _seen_more_than_once(trainer) -> bool:
    dataset, args = trainer.train_dataset, trainer.args
    if dataset is None or not isinstance(dataset, Sized) or isinstance(dataset, torch.utils.data.IterableDataset):
        return False
    if args.max_steps > 0:
        samples_per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
        return args.max_steps * samples_per_step > len(dataset)
    return args.num_train_epochs > 1


def _pass_options(args) -> dict:
    """How the truncated base pass runs (see [`TruncatedPass`]): the same for the reference and the adapter view."""
    return {
        "compile_mode": getattr(args, "base_activations_compile", None),
        "pad_to_multiple_of": getattr(args, "base_activations_pad_to_multiple_of", None),
    }


def _adapter(trainer) -> AdapterBaseActivations:
    return AdapterBaseActivations(trainer.latent_set, trainer.model, **_pass_options(trainer.args))


def _reference(trainer) -> ReferenceBaseActivations:
    args, latent_set = trainer.args, trainer.latent_set
    inner = unwrap_model(trainer.model)
    name = getattr(args, "base_model_name_or_path", None)
    revision = getattr(args, "base_model_revision", None)
    if name is None:
        name, revision = latent_set.base_model, revision or latent_set.base_model_revision
    prepare = None
    accelerator = trainer.accelerator
    if getattr(trainer, "is_deepspeed_enabled", False):
        from trl.models.utils import prepare_deepspeed

        def prepare(module):
            return prepare_deepspeed(module, accelerator)
    elif getattr(trainer, "is_fsdp_enabled", False):
        from trl.models.utils import prepare_fsdp

        def prepare(module):
            return prepare_fsdp(module, accelerator)
    elif accelerator.num_processes > 1:

        def prepare(module):
            return accelerator.prepare_model(module, evaluation_mode=True)

    source = ReferenceBaseActivations(
        latent_set,
        name,
        revision,
        dtype=getattr(inner, "dtype", None),
        device=args.device,
        attn_implementation=getattr(getattr(inner, "config", None), "_attn_implementation", None),
        token=getattr(args, "hub_token", None),
        prepare=prepare,
        **_pass_options(args),
    )
    return source


def default_cache_dir(dataset, output_dir: str) -> Path:
    """Beside the dataset's own cache files when it has some (reused by every run on that dataset), else under
    `output_dir` in a folder whose leading `_` keeps it out of Hub pushes."""
    files = getattr(dataset, "cache_files", None)
    if files:
        return Path(files[0]["filename"]).parent / "blockem_base_activations"
    return Path(output_dir) / "_blockem_base_activations"


def _cached(trainer, capture: ActivationCapture, fallback) -> CachedBaseActivations:
    dataset = trainer.train_dataset
    if dataset is None or not isinstance(dataset, Sized) or isinstance(dataset, torch.utils.data.IterableDataset):
        raise ValueError(
            "base_activations='cache' precomputes base activations for the whole training set, so it needs a "
            f"map-style training dataset; received {type(dataset).__name__}. Use 'adapter' (PEFT) or 'reference'."
        )
    return CachedBaseActivations(trainer.latent_set, fallback, lambda: _load_or_build(trainer, capture, fallback))


def _load_or_build(trainer, capture: ActivationCapture, fallback):
    args, model, latent_set, dataset = trainer.args, trainer.model, trainer.latent_set, trainer.train_dataset
    collator = trainer.data_collator
    if isinstance(collator, CachedZBaseCollator):
        collator = collator.collator
    # Collate exactly as the training dataloader does (same columns, same padding / packing), unshuffled.
    import datasets

    rows = dataset
    if isinstance(dataset, datasets.Dataset):
        rows = trainer._remove_unused_columns(dataset, description="training")
    else:
        collator = trainer._get_collator_with_removed_columns(collator, description="training")

    if isinstance(fallback, ReferenceBaseActivations):
        module = fallback.module
        identity = {
            "name_or_path": fallback.name_or_path,
            "revision": fallback.revision,
            "weights": fallback.weights_fingerprint,
        }
    else:
        module = unwrap_model(model)
        identity = {
            "name_or_path": getattr(module.config, "_name_or_path", None),
            "revision": None,
            # Adapters are trainable and disabled in the base pass: only the frozen weights make the base.
            "weights": weights_fingerprint(module, only_frozen=True),
        }
    config = getattr(module, "config", None)
    identity.update(
        commit=getattr(config, "_commit_hash", None),
        dtype=str(getattr(module, "dtype", None)),
        attn_implementation=getattr(config, "_attn_implementation", None),
    )
    key = cache_key(
        latent_set=latent_set,
        model=identity,
        dataset=dataset,
        tokenizer=trainer.processing_class,
        max_length=getattr(args, "max_length", None),
        packing={
            name: getattr(args, name, None)
            for name in ("packing", "packing_strategy", "padding_free", "pad_to_multiple_of")
        },
    )
    directory = getattr(args, "base_activations_cache_dir", None) or default_cache_dir(dataset, args.output_dir)
    path = BaseActivationCache.paths(directory, key)[0]
    accelerator = trainer.accelerator
    # One writer. Unsharded, the main process builds and writes first; the others then find the file and load it (a
    # process that cannot see it, e.g. on another node without shared storage, builds its own copy). Sharded (FSDP,
    # DeepSpeed), every forward gathers parameters from all processes: all build together, the main process writes.
    sharded = getattr(trainer, "is_fsdp_enabled", False) or getattr(trainer, "is_deepspeed_enabled", False)
    with contextlib.nullcontext() if sharded else accelerator.main_process_first():
        cache, built = BaseActivationCache.load(directory, key), False
        if sharded and accelerator.num_processes > 1:
            # All processes must take the same branch, or the ones that build wait forever for the others.
            found = torch.tensor([cache is not None], dtype=torch.int32, device=accelerator.device)
            if not bool(accelerator.gather(found).all()):
                cache = None
        if cache is None:
            loader = torch.utils.data.DataLoader(
                rows, batch_size=args.per_device_eval_batch_size, shuffle=False, collate_fn=collator
            )
            with _attached(capture):
                cache = BaseActivationCache.build(
                    fallback,
                    model,
                    capture,
                    loader,
                    device=args.device,
                    progress=accelerator.is_local_main_process and not args.disable_tqdm,
                )
            built = True
            if accelerator.is_main_process:
                cache.save(directory, key)
                logger.info("Saved BLOCK-EM base activations of %d sequences to %s", len(cache), path)
    if sharded:
        accelerator.wait_for_everyone()  # the file is complete before any process goes on
    if isinstance(fallback, ReferenceBaseActivations):
        fallback.release()  # reloaded only if an uncached batch (an eval set) needs it
    return cache, built, key, path


class _attached:
    """Attaches a capture for the duration of a block unless it already is."""

    def __init__(self, capture: ActivationCapture):
        self.capture, self.owned = capture, False

    def __enter__(self):
        self.owned = not self.capture.attached
        if self.owned:
            self.capture.attach()
        return self.capture

    def __exit__(self, *exc):
        if self.owned:
            self.capture.detach()
