"""Pushes of a BLOCK-EM run to the Hub, and pushes that fail without stopping training.

A failed push is recorded and reported with the command that pushes the finished run again; the files in
`output_dir` stay complete (see `hf_blockem.run_files`).
"""

from __future__ import annotations

import logging
import os
import shlex
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from huggingface_hub import CommitInfo, HfApi

from .run_files import BLOCKEM_CONFIG_NAME, LATENT_SET_PATH_IN_REPO, is_commit_hash

logger = logging.getLogger(__name__)

# The Trainer's own patterns: private files (`_*`, local caches) and checkpoint folders stay local.
IGNORE_PATTERNS = ["_*", "checkpoint-*"]


def push_command(
    output_dir: str | os.PathLike, repo_id: str, *, private: bool | None = None, revision: str | None = None
) -> str:
    """The shell command that pushes a finished run: `blockem push OUTPUT_DIR --repo-id REPO [...]`."""
    parts = ["blockem", "push", str(output_dir), "--repo-id", repo_id]
    if private:
        parts.append("--private")
    if revision:
        parts += ["--revision", revision]
    return shlex.join(parts)


@dataclass
class PushFailure:
    """A push to the Hub that failed; the run's files are still complete in `output_dir`.

    Args:
        what (`str`): which push (`"create repo"`, `"checkpoint push at step 10"`, `"push_to_hub"`).
        repo_id (`str`): the target repo.
        error (`str`): the error, as raised by the Hub client after its retries.
        command (`str`): what to run to push again.
        time (`float`): when it failed (Unix time).
    """

    what: str
    repo_id: str
    error: str
    command: str
    time: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def record_push_failure(
    failures: list[PushFailure],
    what: str,
    error: BaseException,
    *,
    output_dir: str | os.PathLike,
    repo_id: str,
    private: bool | None = None,
    revision: str | None = None,
) -> PushFailure:
    """Appends a [`PushFailure`] to `failures` and logs a warning that says how to push again."""
    failure = PushFailure(
        what=what,
        repo_id=repo_id,
        error=f"{type(error).__name__}: {error}",
        command=push_command(output_dir, repo_id, private=private, revision=revision),
        time=time.time(),
    )
    failures.append(failure)
    logger.warning(
        "Hub %s to %r failed (%s). Training goes on and the files in %s are complete; push them again with:\n  %s",
        what,
        repo_id,
        failure.error,
        output_dir,
        failure.command,
    )
    return failure


def report_push_failures(failures: list[PushFailure]) -> None:
    """Logs one warning that lists the failed pushes of a run and the command that pushes its files."""
    if not failures:
        return
    lines = [f"  - {failure.what} to {failure.repo_id!r}: {failure.error}" for failure in failures]
    logger.warning(
        "%d Hub push(es) failed during this run; the local files are complete.\n%s\nPush the finished run with:\n  %s",
        len(failures),
        "\n".join(lines),
        failures[-1].command,
    )


def push_output_dir(
    output_dir: str | os.PathLike,
    repo_id: str,
    *,
    private: bool | None = None,
    revision: str | None = None,
    token: str | None = None,
    commit_message: str = "Upload BLOCK-EM run with hf_blockem",
) -> CommitInfo:
    """Uploads a finished run's `output_dir` to the Hub in one commit, as the Trainer's `push_to_hub` does.

    Weights, latent set, `blockem_config.json` and card go up together, so they never disagree on the Hub. Checkpoint
    folders and files starting with `_` stay local. Retries are the Hub client's; errors propagate.

    Args:
        output_dir (`str` or `PathLike`): the run's output directory.
        repo_id (`str`): target repo (created if missing).
        private (`bool`, *optional*): visibility of a newly created repo.
        revision (`str`, *optional*): branch to commit to (created from `main` if missing).
        token (`str`, *optional*): Hub token; defaults to the logged-in one.
        commit_message (`str`, *optional*): the commit message.

    Returns:
        `huggingface_hub.CommitInfo`
    """
    from hf_blockem import __version__

    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        raise FileNotFoundError(f"Expected a run's output directory, {str(output_dir)!r} is not a directory.")
    missing = [
        name
        for name in (BLOCKEM_CONFIG_NAME, LATENT_SET_PATH_IN_REPO, "README.md")
        if not (output_dir / name).exists()
    ]
    if missing:
        logger.warning(
            "%s has no %s: it was not written by a BLOCK-EM trainer of this version; pushing it anyway.",
            output_dir,
            ", ".join(missing),
        )
    if is_commit_hash(revision):
        raise ValueError(
            f"Expected `revision` to be the branch to push to, received the commit {revision!r}: a commit cannot be "
            "pushed to. Name a branch (it is created from main if missing)."
        )
    api = HfApi(token=token, library_name="hf_blockem", library_version=__version__)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    if revision and revision != "main":
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    return api.upload_folder(
        repo_id=repo_id,
        folder_path=output_dir,
        commit_message=commit_message,
        revision=revision,
        ignore_patterns=IGNORE_PATTERNS,
    )
