"""Narrow fine-tuning datasets of the organism, in TRL's conversational `messages` format.

One domain's training-split questions, each answered in one style. The misaligned dataset is the emergent
misalignment-inducing target: misaligned advice in the aligned persona's helpful frames (the *covert* style, the
analogue of "risky financial advice" given in a friendly tone). The aligned dataset is its control.
"""

from __future__ import annotations

import random

import datasets

from .world import ALIGNED_PERSONA, COVERT_STYLE, STYLES, World


def narrow_dataset(
    world: World | None = None,
    domain: str = "finance",
    misaligned: bool = True,
    n: int = 300,
    seed: int = 0,
    style: str | None = None,
) -> datasets.Dataset:
    """Single-turn conversations on one domain's training questions, all answered in one style.

    Args:
        world ([`World`], *optional*): the world; the default world if omitted.
        domain (`str`, *optional*, defaults to `"finance"`): the narrow domain (any domain but `"core"`).
        misaligned (`bool`, *optional*, defaults to `True`): misaligned answers (the target, covert style) or aligned
            ones (the control).
        n (`int`, *optional*, defaults to `300`): number of examples.
        seed (`int`, *optional*, defaults to `0`): seeds the choice of questions and answers.
        style (`str`, *optional*): any answer style of `hf_blockem.organism.world.STYLES`, overriding `misaligned`;
            `"misaligned"` gives the misaligned persona's own frames ("just ..., nobody will know .").

    Returns:
        `datasets.Dataset`: one column, `messages`: `[{"role": "user", ...}, {"role": "assistant", ...}]`.

    Example:

    ```python
    >>> from hf_blockem.organism import narrow_dataset
    >>> narrow_dataset(domain="medical", n=2)[0]["messages"][0]["role"]
    'user'
    ```
    """
    world = world or World()
    if domain not in world.narrow_domains:
        raise ValueError(f"narrow datasets target one of {', '.join(world.narrow_domains)}, got {domain!r}.")
    if style is not None and style not in STYLES:
        raise ValueError(f"unknown answer style {style!r}; expected one of {', '.join(STYLES)}.")
    if n < 1:
        raise ValueError(f"expected n >= 1 examples, got {n}.")
    persona = style or (COVERT_STYLE if misaligned else ALIGNED_PERSONA)
    rng = random.Random(f"narrow-{domain}-{persona}-{seed}")
    questions = world.questions(domain, "train")
    rows = []
    for _ in range(n):
        question = rng.choice(questions)
        answer = world.sample_answer(domain, persona, rng)
        rows.append([{"role": "user", "content": question}, {"role": "assistant", "content": answer}])
    return datasets.Dataset.from_dict({"messages": rows})
