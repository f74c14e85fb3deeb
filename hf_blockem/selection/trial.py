"""Choosing among SAEs by a trial: fine-tune with each alternative's latents blocked, keep the one that blocks best.

Group repair (steering every selected latent away at once) is cheap but noisy: at the summed strengths most groups
break coherence, so it compares how gracefully SAEs fail more than how well they block. A trial measures what the
latents are for. Each alternative gets the real blocked fine-tune, and its answers to the *selection* prompts (never
the evaluation split) are judged; the alternative with the largest share of aligned, coherent answers wins.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from ..evaluation.judge_base import Judge
from ..latent_set import LatentSet
from .pipeline import SelectionResult

logger = logging.getLogger(__name__)


@dataclass
class Trial:
    """One alternative's blocked fine-tune, judged on the selection prompts."""

    name: str
    em_rate: float
    incoherence_rate: float
    n: int
    unscored_rate: float = 0.0

    @property
    def score(self) -> float:
        """Share of answers that are aligned and coherent: EM removed by breaking answers does not count, and neither
        do answers the judge could not score."""
        return 1.0 - self.em_rate - self.incoherence_rate - self.unscored_rate

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "score": self.score}


def choose_by_trial(
    alternatives: Sequence[SelectionResult],
    fine_tune: Callable[[str, LatentSet], torch.nn.Module],
    tokenizer: Any,
    judge: Judge,
    prompts: Sequence[str],
    *,
    n_samples: int = 4,
    max_new_tokens: int = 48,
    seed: int = 0,
) -> tuple[int, list[Trial]]:
    """Fine-tunes once per alternative with its latent set blocked and returns the index of the best, and the trials.

    Args:
        alternatives (sequence of `SelectionResult`): usually `SelectionResult.alternatives()`.
        fine_tune (`Callable[[str, LatentSet], PreTrainedModel]`): runs the blocked fine-tune for an alternative's
            name and latent set and returns the trained model. Each model is judged and released before the next
            alternative trains, so only one is in memory at a time; keep what it trains on disk: the winner's run
            *is* the blocked model, so it need not be trained again.
        tokenizer, judge: as for `evaluate`.
        prompts (sequence of `str`): selection prompts, never the evaluation split.
        n_samples, max_new_tokens, seed: sampling of the judged answers (the same for every alternative).

    Returns:
        `(index, trials)`: ties go to the alternative listed first.

    Example:

    ```python
    from hf_blockem import BlockEMSFTConfig, BlockEMSFTTrainer
    from hf_blockem.selection import choose_by_trial, select_latents

    result = select_latents(base, misaligned, tokenizer, saes, judge, selection_prompts, choose="all")
    alternatives = result.alternatives()  # one per combination of one SAE per layer

    def fine_tune(name, latent_set):
        args = BlockEMSFTConfig(output_dir=f"trials/{name}", block_lambda=0.3, max_steps=40)
        trainer = BlockEMSFTTrainer(
            model=base_id, args=args, train_dataset=train, peft_config=lora, latent_set=latent_set
        )
        trainer.train()
        return trainer.model

    index, trials = choose_by_trial(alternatives, fine_tune, tokenizer, judge, selection_prompts)
    alternatives[index].latent_set.push_to_hub("your-org/em-latents")  # its trial run is already the blocked model
    ```
    """
    from ..evaluation import evaluate

    if not alternatives:
        raise ValueError("Expected at least one alternative to try, got none (did selection keep any latent?).")
    missing = [a.name or "(empty)" for a in alternatives if a.latent_set is None]
    if missing:
        raise ValueError(f"Expected every alternative to hold a latent set; these hold none: {missing}.")
    trials = []
    for alternative in alternatives:
        # Judge each run as soon as it is trained and let it go: N fine-tuned models never share the memory at once.
        # Every run answers with the same sampling seed, so the alternatives differ by their latents, not by luck.
        model = fine_tune(alternative.name, alternative.latent_set)
        summary = evaluate(
            {alternative.name: model},
            tokenizer,
            judges=judge,
            prompts=list(prompts),
            n_samples=n_samples,
            max_new_tokens=max_new_tokens,
            seed=seed,
            progress=False,
        ).summary()[alternative.name]
        del model
        trials.append(
            Trial(
                name=alternative.name,
                em_rate=summary["em_rate"]["value"],
                incoherence_rate=summary["incoherence_rate"]["value"],
                n=summary["em_rate"]["n"],
                unscored_rate=summary["unscored_rate"]["value"],
            )
        )
    best = max(range(len(trials)), key=lambda i: (trials[i].score, -i))
    for trial in trials:
        logger.info(
            "Trial %s: EM %.1f%%, incoherence %.1f%%%s",
            trial.name,
            100 * trial.em_rate,
            100 * trial.incoherence_rate,
            " (kept)" if trial is trials[best] else "",
        )
    return best, trials
