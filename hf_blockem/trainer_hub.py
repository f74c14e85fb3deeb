"""The Hub side of the BLOCK-EM trainers: run files in `output_dir`, the model card, provenance in the trainer
state, and pushes that fail without stopping training (helpers in `hf_blockem.run_files` and `hf_blockem.push`)."""

from __future__ import annotations

import logging
import os
import shutil
from concurrent.futures import Future
from functools import partial
from pathlib import Path
from typing import Any

from .hooks import unwrap_model
from .model_card import model_card_from_trainer
from .push import PushFailure, record_push_failure, report_push_failures
from .run_files import (
    DIAGNOSTICS_PLOT_NAME,
    LatentSetProvenance,
    blockem_config,
    read_card_extras,
    write_blockem_files,
)

logger = logging.getLogger(__name__)


class BlockEMHubMixin:
    """Trainer methods that keep the latent set, `blockem_config.json` and the card in `output_dir` and on the Hub.

    Mixed into [`BlockEMTrainerMixin`]; expects `self.latent_set` and `self._blockem_base` to exist when
    `_blockem_hub_setup` runs.
    """

    @property
    def blockem_push_failures(self) -> list[PushFailure]:
        """Hub pushes that failed so far (training went on and the local files are complete); see `hf_blockem.push`."""
        # Lazily created: `init_hf_repo` runs inside `Trainer.__init__`, before the mixin's own set-up.
        return self.__dict__.setdefault("_blockem_push_failures", [])

    def _blockem_hub_setup(self) -> None:
        self.add_callback(LatentSetProvenance.from_latent_set(self.latent_set, self.args.latent_set_revision))
        self._blockem_update_config()
        self._blockem_card_kwargs: dict[str, Any] = {}
        self._blockem_push_jobs: list[tuple[Future, str]] = []
        self._blockem_license: str | None = None
        self._blockem_card_written = False

    def _blockem_update_config(self) -> None:
        """`blockem_config.json` (and the card built from it) for the set blocked now; re-run after latents are added."""
        self._blockem_config = blockem_config(self.args, self.latent_set, base_model=self._blockem_base_model_id())
        # "auto" resolves at run time: record what actually produced z_base.
        self._blockem_config["base_activations_source"] = type(self._blockem_base).__name__

    def _blockem_base_model_id(self) -> str | None:
        peft_config = getattr(self.model, "peft_config", None)
        if peft_config:
            return next(iter(peft_config.values())).base_model_name_or_path or None
        return getattr(unwrap_model(self.model).config, "_name_or_path", None) or None

    def _blockem_sync_provenance(self) -> None:
        # On resume the Trainer restores the callback saved with the checkpoint: say so if the set has changed since.
        current = LatentSetProvenance.from_latent_set(self.latent_set, self.args.latent_set_revision)
        for callback in self.callback_handler.callbacks:
            if isinstance(callback, LatentSetProvenance):
                if (callback.source, callback.resolved_commit) != (current.source, current.resolved_commit):
                    logger.warning(
                        "The checkpoint was trained with latent set %s, this run blocks %s: the recorded provenance "
                        "now names the latter. Pin `latent_set_revision` to a commit to resume with the same set.",
                        callback.reference,
                        current.reference,
                    )
                callback.__dict__.update(vars(current))

    def _blockem_base_model_license(self) -> str | None:
        # Like transformers' TrainingSummary: the base model's license, looked up once, never fatal (offline runs).
        base_model = self._blockem_config.get("base_model")
        if self._blockem_license is None and base_model and not os.path.isdir(base_model):
            from huggingface_hub import constants, model_info

            if not constants.HF_HUB_OFFLINE:
                try:
                    card_data = model_info(base_model, token=self.args.hub_token).card_data
                    self._blockem_license = (card_data.get("license") if card_data else None) or ""
                except Exception as error:  # any Hub or network failure: the card just has no license
                    logger.info("No license for %s from the Hub: %s", base_model, error)
                    self._blockem_license = ""
        return self._blockem_license or None

    def _blockem_write_card(self, directory: str, **card_kwargs) -> None:
        directory = Path(directory)
        plot = card_kwargs.get("diagnostics_plot")
        if plot and Path(plot).is_file() and Path(plot).resolve() != (directory / DIAGNOSTICS_PLOT_NAME).resolve():
            # The card links the plot by its path in the repo, so it must be uploaded with the folder.
            shutil.copyfile(plot, directory / DIAGNOSTICS_PLOT_NAME)
            card_kwargs["diagnostics_plot"] = DIAGNOSTICS_PLOT_NAME
        card_kwargs = {**read_card_extras(directory), **card_kwargs}
        card_kwargs.setdefault("license", self._blockem_base_model_license())
        card = model_card_from_trainer(self, self._blockem_config, **card_kwargs)
        card.save(directory / "README.md")

    def _blockem_write_run_files(self, directory: str) -> None:
        """Latent set, `blockem_config.json` and the card into `directory`, on the process that saves."""
        if not self.args.should_save:
            return
        os.makedirs(directory, exist_ok=True)
        write_blockem_files(directory, self.latent_set, self._blockem_config)
        # After the weights: PEFT rewrites README.md on every adapter save.
        self._blockem_write_card(directory, **self._blockem_card_kwargs)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        super().save_model(output_dir, _internal_call=_internal_call)
        self._blockem_write_run_files(output_dir if output_dir is not None else self.args.output_dir)

    def _save_checkpoint(self, model, trial) -> None:
        self._blockem_sync_provenance()
        # Into output_dir itself, before the Trainer pushes it: with hub_strategy="every_save" only standard files are
        # copied out of the checkpoint folder. While the previous push still uploads output_dir, the Trainer leaves
        # the weights there alone and skips this push; so do we, or that commit could carry a newer card or a
        # half-written latent set next to older weights.
        if not self._blockem_uploading_output_dir():
            self._blockem_write_run_files(self.args.output_dir)
        super()._save_checkpoint(model, trial)

    def _blockem_uploading_output_dir(self) -> bool:
        push = getattr(self, "push_in_progress", None)
        return self.args.push_to_hub and not self.args.hub_always_push and push is not None and not push.is_done()

    def create_model_card(
        self,
        model_name: str | None = None,
        dataset_name: str | list[str] | None = None,
        tags: str | list[str] | None = None,
        *,
        language: str | list[str] | None = None,
        license: str | None = None,
        dataset: str | list[str] | None = None,
        evaluations: list[dict] | None = None,
        diagnostics: dict[str, Any] | None = None,
        diagnostics_plot: str | None = None,
        **kwargs,
    ) -> None:
        """Writes the BLOCK-EM model card to `output_dir/README.md` (see `hf_blockem.model_card`).

        Replaces the Trainer's and TRL's cards so that `push_to_hub` uploads weights, latent set and card in one
        commit. Accepts both families' arguments; the ones below are remembered for the cards written later.

        Args:
            model_name, dataset_name, tags, language, license, dataset: as in `Trainer.create_model_card`.
            evaluations (`list[dict]`, *optional*): EM evaluations (see `generate_blocked_model_card`).
            diagnostics (`dict`, *optional*): a flat diagnostics summary.
            diagnostics_plot (`str`, *optional*): a PNG file; copied into `output_dir`.
        """
        if not self.is_world_process_zero():
            return
        given = dict(
            model_name=model_name,
            datasets=dataset_name or dataset,
            tags=tags,
            language=language,
            license=license,
            evaluations=evaluations,
            diagnostics=diagnostics,
            diagnostics_plot=diagnostics_plot,
        )
        self._blockem_card_kwargs.update({key: value for key, value in given.items() if value is not None})
        os.makedirs(self.args.output_dir, exist_ok=True)
        self._blockem_write_card(self.args.output_dir, **self._blockem_card_kwargs)
        self._blockem_card_written = True

    def _blockem_push_failed(self, what: str, error: BaseException) -> None:
        record_push_failure(
            self.blockem_push_failures,
            what,
            error,
            output_dir=self.args.output_dir,
            repo_id=getattr(self, "hub_model_id", None)
            or self.args.hub_model_id
            or Path(self.args.output_dir).absolute().name,
            private=self.args.hub_private_repo,
            revision=self.args.hub_revision,
        )

    def _blockem_push_ended(self, job: Future, what: str) -> None:
        if not job.cancelled() and job.exception() is not None:
            self._blockem_push_failed(what, job.exception())

    def _blockem_collect_push_failures(self) -> None:
        # The Trainer's background pushes are futures whose errors it never looks at.
        pending = []
        for job, what in self.__dict__.get("_blockem_push_jobs", []):
            if job.done():
                self._blockem_push_ended(job, what)
            else:
                pending.append((job, what))
        self._blockem_push_jobs = pending

    def _blockem_report_pushes(self) -> None:
        self._blockem_collect_push_failures()
        report_push_failures(self.blockem_push_failures)

    def init_hf_repo(self, token: str | None = None, private: bool | None = None) -> None:
        try:
            super().init_hf_repo(token=token, private=private)
        except Exception as error:  # a Hub that is down must not stop training; the failure is recorded
            self.hub_model_id = self.args.hub_model_id or Path(self.args.output_dir).absolute().name
            self.push_in_progress = None
            self._blockem_push_failed("create repo", error)

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        self._blockem_collect_push_failures()
        what = f"checkpoint push at step {self.state.global_step}"
        try:
            super()._push_from_checkpoint(checkpoint_folder)
        except Exception as error:  # the upload itself runs in the background; this catches its set-up
            self._blockem_push_failed(what, error)
        seen = {id(job) for job, _ in self._blockem_push_jobs}
        push = getattr(self, "push_in_progress", None)
        for job in push.jobs if push is not None else []:
            if id(job) not in seen:
                self._blockem_push_jobs.append((job, what))

    def push_to_hub(self, *args, **kwargs):
        """`Trainer.push_to_hub`, except that a failing upload is logged and recorded instead of raised.

        Weights, latent set, `blockem_config.json` and card are written to `output_dir` first (a failure there is
        raised), then uploaded in one commit; on failure the warning names the `blockem push` command to retry.
        """
        self._blockem_card_written = False
        try:
            result = super().push_to_hub(*args, **kwargs)
        except Exception as error:
            if not self._blockem_card_written:
                raise  # saving locally failed, before any upload: that must not pass silently
            self._blockem_push_failed("push_to_hub", error)
            return None
        if isinstance(result, Future):
            # push_to_hub(blocking=False) after training: no later report looks at this future, so its failure is
            # recorded and logged, with the command to push again, when the upload ends.
            result.add_done_callback(partial(self._blockem_push_ended, what="push_to_hub"))
        return result
