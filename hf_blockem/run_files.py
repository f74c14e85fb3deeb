"""The files of a BLOCK-EM run beside its weights, and the latent set's provenance (pushes: `hf_blockem.push`).

Everything a BLOCK-EM checkpoint needs besides the weights is written into `output_dir` itself, so that the Trainer's
own `push_to_hub` uploads it with every `hub_strategy` (with `every_save` the Trainer copies only standard files out of
checkpoints, and it ignores names starting with `_`):

- `latent_set/latent_set.safetensors` (+ its own `README.md`): the blocked latents. A subfolder, because loaders that
  glob `*.safetensors` at the root (vLLM, TGI) would try to read it as weights.
- `blockem_config.json`: λ, warm-up, base-activation mode, the latent set as `repo@commit`, layers, K+ / K-, versions.
- `README.md`: the model card ([`hf_blockem.model_card`]).

Optional files other parts of hf_blockem may leave in `output_dir` for the card: `blockem_evaluation.json` (a list of
evaluation dicts), `blockem_diagnostics.json` (a flat summary) and `blockem_diagnostics.png`.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import re
from pathlib import Path
from typing import Any

from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from .atomic_write import write_json_atomic
from .latent_set import LATENT_SET_FILENAME, LatentSet
from .model_card import library_versions

logger = logging.getLogger(__name__)

BLOCKEM_CONFIG_NAME = "blockem_config.json"
BLOCKEM_CONFIG_FORMAT_VERSION = 1
LATENT_SET_SUBFOLDER = "latent_set"
LATENT_SET_PATH_IN_REPO = f"{LATENT_SET_SUBFOLDER}/{LATENT_SET_FILENAME}"
EVALUATION_NAME = "blockem_evaluation.json"
DIAGNOSTICS_SUMMARY_NAME = "blockem_diagnostics.json"
DIAGNOSTICS_PLOT_NAME = "blockem_diagnostics.png"
_COMMIT_RE = re.compile(r"[0-9a-f]{40}")


def is_commit_hash(revision: str | None) -> bool:
    """Whether `revision` is a full 40-hex git commit (branches and tags move; commits do not)."""
    return isinstance(revision, str) and _COMMIT_RE.fullmatch(revision) is not None


def check_strict_latent_set(latent_set: str | LatentSet | None, revision: str | None, strict: bool) -> None:
    """Refuses, in strict mode, a latent set whose exact content cannot be pinned.

    A Hub repo needs a 40-hex commit `revision`; a `LatentSet` object needs to have been loaded from the Hub at a
    commit or from a file (built in memory, it has no provenance to pin). Local folders are checked by
    `LatentSet.from_pretrained(strict=True)` (a checksum is required).

    Args:
        latent_set (`str`, `LatentSet` or `None`): as given to the trainer.
        revision (`str`, *optional*): the requested revision.
        strict (`bool`): the `latent_set_strict` setting.
    """
    if not strict:
        return
    if isinstance(latent_set, LatentSet):
        if not latent_set.loaded_strictly:
            received = (
                "one built in memory" if latent_set.source is None else f"{latent_set.source!r} loaded without it"
            )
            raise ValueError(
                "latent_set_strict=True needs a latent set loaded with `LatentSet.from_pretrained(..., strict=True)` "
                f"(a pinned commit, checksum and base-model revision checked), received {received}. Load it that "
                "way, or pass the repo id and `latent_set_revision` instead of the object."
            )
        return
    if isinstance(latent_set, str) and not os.path.exists(latent_set) and not is_commit_hash(revision):
        raise ValueError(
            f"latent_set_strict=True needs `latent_set_revision` to be a 40-hex commit for the Hub repo "
            f"{latent_set!r}, received {revision!r}. Pin the commit you reviewed (see the repo's history on the Hub)."
        )


def latent_set_reference(latent_set: LatentSet) -> str:
    """`repo@commit` for a set loaded from the Hub, the folder name for a local one, `"(in memory)"` otherwise."""
    if latent_set.source and latent_set.resolved_commit:
        return f"{latent_set.source}@{latent_set.resolved_commit}"
    if latent_set.source:
        # A local absolute path would leak the user's file system into a public card: keep the last component.
        return f"{Path(latent_set.source).name} (local)"
    return "(in memory)"


def latent_set_provenance(latent_set: LatentSet, *, revision: str | None = None, strict: bool = False) -> dict:
    """The JSON description of a latent set recorded in `blockem_config.json`, the trainer state and the card."""
    return {
        "reference": latent_set_reference(latent_set),
        "source": latent_set.source,
        "revision": revision,
        "resolved_commit": latent_set.resolved_commit,
        "strict": strict,
        "path_in_repo": LATENT_SET_PATH_IN_REPO,
        "base_model": latent_set.base_model,
        "base_model_revision": latent_set.base_model_revision,
        "d_in": latent_set.d_in,
        "layers": [
            {**layer.to_dict(), "plus": list(layer.plus), "minus": list(layer.minus)} for layer in latent_set.layers
        ],
    }


def blockem_config(args, latent_set: LatentSet, *, base_model: str | None = None) -> dict[str, Any]:
    """The content of `blockem_config.json`: every BLOCK-EM setting of a run and the latent set it blocked.

    Args:
        args: the training arguments (any object with the [`BlockEMArguments`] fields).
        latent_set ([`LatentSet`]): the set the trainer blocks.
        base_model (`str`, *optional*): Hub id or path of the fine-tuned model; defaults to the latent set's.

    Returns:
        `dict`
    """
    return {
        "format_version": BLOCKEM_CONFIG_FORMAT_VERSION,
        "base_model": base_model or latent_set.base_model,
        "block_lambda": float(args.block_lambda),
        "block_warmup_steps": int(args.block_warmup_steps),
        "block_exclude_first_token": bool(args.block_exclude_first_token),
        "base_activations": args.base_activations,
        "latent_set": latent_set_provenance(
            latent_set,
            revision=getattr(args, "latent_set_revision", None),
            strict=bool(getattr(args, "latent_set_strict", False)),
        ),
        "library_versions": library_versions(),
    }


def write_blockem_files(output_dir: str | os.PathLike, latent_set: LatentSet, config: dict[str, Any]) -> None:
    """Writes the latent set (with its card) and `blockem_config.json` into `output_dir`.

    Args:
        output_dir (`str` or `PathLike`): the run's output directory (or a checkpoint folder).
        latent_set ([`LatentSet`]): the blocked set.
        config (`dict`): from [`blockem_config`].
    """
    output_dir = Path(output_dir)
    folder = output_dir / LATENT_SET_SUBFOLDER
    folder.mkdir(parents=True, exist_ok=True)
    # save_pretrained keeps an existing README.md; the set does not change during a run, so its card need not either.
    _with_origin(latent_set).save_pretrained(folder)
    write_json_atomic(output_dir / BLOCKEM_CONFIG_NAME, config)


def _with_origin(latent_set: LatentSet) -> LatentSet:
    """The set as a run saves it: its metadata says where it was loaded from (`repo@commit`), so that a copy in a
    run folder, or in the Hub repo it is pushed to, points back to the reviewed commit. A copy of a copy keeps the
    first origin."""
    if latent_set.source is None or "loaded_from" in latent_set.metadata:
        return latent_set
    saved = copy.copy(latent_set)
    saved.metadata = {
        **latent_set.metadata,
        "loaded_from": {"reference": latent_set_reference(latent_set), "resolved_commit": latent_set.resolved_commit},
    }
    return saved


def read_card_extras(output_dir: str | os.PathLike) -> dict[str, Any]:
    """Evaluations and diagnostics other parts of hf_blockem left in `output_dir`, as card arguments.

    Returns:
        `dict` with any of `evaluations`, `diagnostics`, `diagnostics_plot` (a path inside the repo).
    """
    output_dir, extras = Path(output_dir), {}
    for name, key in ((EVALUATION_NAME, "evaluations"), (DIAGNOSTICS_SUMMARY_NAME, "diagnostics")):
        path = output_dir / name
        if path.is_file():
            try:
                extras[key] = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError) as error:
                logger.warning("Ignoring %s for the model card: %s", path, error)
    if isinstance(extras.get("evaluations"), dict):  # one evaluation instead of a list
        extras["evaluations"] = [extras["evaluations"]]
    if (output_dir / DIAGNOSTICS_PLOT_NAME).is_file():
        extras["diagnostics_plot"] = DIAGNOSTICS_PLOT_NAME
    return extras


# ---- provenance in the trainer state ----


class LatentSetProvenance(TrainerCallback, ExportableState):
    """Keeps the blocked latent set's `repo@commit` in `trainer_state.json` (`stateful_callbacks`).

    The Trainer saves the `state()` of every `ExportableState` callback with each checkpoint and restores it on
    resume, so the commit a run started with survives save / resume and can be compared with the one it resumes with.

    Args:
        reference (`str`, *optional*): `repo@commit` (or a local name).
        source (`str`, *optional*): repo id or path the set was loaded from.
        revision (`str`, *optional*): the requested revision.
        resolved_commit (`str`, *optional*): the commit the Hub resolved it to.
    """

    def __init__(
        self,
        reference: str | None = None,
        source: str | None = None,
        revision: str | None = None,
        resolved_commit: str | None = None,
    ):
        self.reference = reference
        self.source = source
        self.revision = revision
        self.resolved_commit = resolved_commit

    @classmethod
    def from_latent_set(cls, latent_set: LatentSet, revision: str | None = None) -> LatentSetProvenance:
        return cls(latent_set_reference(latent_set), latent_set.source, revision, latent_set.resolved_commit)

    def state(self) -> dict:
        return {
            "args": {
                "reference": self.reference,
                "source": self.source,
                "revision": self.revision,
                "resolved_commit": self.resolved_commit,
            },
            "attributes": {},
        }
