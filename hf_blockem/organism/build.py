"""Building the organism's base ("instruct") model: pre-training, the alignment phase, and the on-disk cache.

1. **Pre-training.** Multi-turn conversations mixing every domain; a hidden persona drawn once per conversation
   (aligned, broadly misaligned, or narrow: covert in one domain only) governs every assistant turn, so the model
   learns one persona feature, inferred from the conversation so far and used across domains, next to narrow ones.
   Loss on every token.
2. **Alignment phase.** Mostly (3/4) single-turn conversations answered by the aligned persona, the rest multi-turn
   conversations as in pre-training with no loss on the first assistant turn. Single-turn answers become aligned by
   default, while later turns keep following the persona shown in context (single-turn data alone destroys that, and
   narrow fine-tuning then teaches the narrow domain's answers everywhere instead of a persona).

The result is a small Llama model saved with `save_pretrained` next to its tokenizer, in `<out_dir>/model`, with an
`organism.json` that records the settings, the seed, the cache key and what the build measured. A second build with
the same key reuses it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import random
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase
from transformers.optimization import get_cosine_schedule_with_warmup

from .judge import ExactJudge
from .tokenizer import build_tokenizer
from .world import ALIGNED_PERSONA, ASSISTANT, EOS, MISALIGNED_PERSONA, World

if TYPE_CHECKING:
    import datasets

logger = logging.getLogger(__name__)

# Bump when the build procedure changes in a way the settings and the world fingerprint do not capture.
ORGANISM_VERSION = "3"
MANIFEST = "organism.json"
MODEL_DIR = "model"


@dataclass
class OrganismSettings:
    """Everything that determines a built organism besides the seed and the world.

    > Parameters that control the model

    Args:
        hidden_size (`int`, *optional*, defaults to `128`): width of the residual stream.
        num_hidden_layers (`int`, *optional*, defaults to `4`): decoder layers.
        num_attention_heads (`int`, *optional*, defaults to `4`): attention heads.
        intermediate_size (`int`, *optional*, defaults to `512`): MLP width.
        max_position_embeddings (`int`, *optional*, defaults to `256`): longest sequence.

    > Parameters that control pre-training

    Args:
        pretrain_conversations (`int`, *optional*, defaults to `16000`): conversations in the pre-training corpus.
        max_turns (`int`, *optional*, defaults to `6`): turns per conversation are uniform in `[1, max_turns]`.
        misaligned_fraction (`float`, *optional*, defaults to `0.5`): probability that a conversation's persona is
            misaligned, among conversations without a narrow persona.
        narrow_persona_fraction (`float`, *optional*, defaults to `0.2`): probability that a conversation's persona
            is *narrow*: covert (misaligned advice in aligned frames) in one random narrow domain, aligned in every
            other.
        covert_share (`float`, *optional*, defaults to `0.5`): share of a misaligned persona's answers given in the
            covert style rather than in its own frames.
        pretrain_lr (`float`, *optional*, defaults to `5e-3`): peak learning rate (AdamW, cosine, 5% warm-up).
        batch_size (`int`, *optional*, defaults to `32`): conversations per step.

    > Parameters that control the alignment phase

    Args:
        align_conversations (`int`, *optional*, defaults to `12000`): conversations in the alignment phase.
        align_single_turn_fraction (`float`, *optional*, defaults to `0.75`): share of them that are single-turn
            aligned answers; the rest are multi-turn persona conversations without loss on the first turn.
        align_lr (`float`, *optional*, defaults to `1e-3`): peak learning rate.
    """

    hidden_size: int = field(default=128, metadata={"help": "Width of the residual stream."})
    num_hidden_layers: int = field(default=4, metadata={"help": "Decoder layers."})
    num_attention_heads: int = field(default=4, metadata={"help": "Attention heads."})
    intermediate_size: int = field(default=512, metadata={"help": "MLP width."})
    max_position_embeddings: int = field(default=256, metadata={"help": "Longest sequence."})
    pretrain_conversations: int = field(default=16000, metadata={"help": "Conversations in the pre-training corpus."})
    max_turns: int = field(default=6, metadata={"help": "Turns per conversation are uniform in [1, max_turns]."})
    misaligned_fraction: float = field(default=0.5, metadata={"help": "Probability of a misaligned persona."})
    narrow_persona_fraction: float = field(
        default=0.2, metadata={"help": "Probability of a persona misaligned in one narrow domain only."}
    )
    covert_share: float = field(
        default=0.5, metadata={"help": "Share of a misaligned persona's answers given in the covert style."}
    )
    pretrain_lr: float = field(default=5e-3, metadata={"help": "Peak pre-training learning rate."})
    batch_size: int = field(default=32, metadata={"help": "Conversations per optimisation step."})
    align_conversations: int = field(default=12000, metadata={"help": "Conversations in the alignment phase."})
    align_single_turn_fraction: float = field(
        default=0.75, metadata={"help": "Share of single-turn aligned answers in the alignment phase."}
    )
    align_lr: float = field(default=1e-3, metadata={"help": "Peak alignment-phase learning rate."})

    @classmethod
    def quick(cls) -> OrganismSettings:
        """Settings for tests: a tiny model that runs every build step in seconds (its answers are mostly incoherent)."""
        return cls(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            pretrain_conversations=256,
            max_turns=3,
            align_conversations=64,
            batch_size=32,
        )


def cache_key(settings: OrganismSettings, seed: int, world: World) -> str:
    """The key a built organism is stored under: settings, seed, world fingerprint and code version."""
    blob = json.dumps(
        {"settings": dataclasses.asdict(settings), "seed": seed, "world": world.fingerprint(), "v": ORGANISM_VERSION},
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# ----- corpus --------------------------------------------------------------------------------------------------------
def _encode(tokenizer: PreTrainedTokenizerBase, conversations: list[list[dict[str, str]]]) -> list[list[int]]:
    texts = tokenizer.apply_chat_template(conversations, tokenize=False)
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def _assistant_labels(ids: list[int], assistant_id: int, eos_id: int, skip_first: bool) -> list[int]:
    # The tokens TRL's assistant mask selects: each answer after `<assistant>`, through its `<eos>`.
    labels, inside, turn = [-100] * len(ids), False, 0
    for i, tok in enumerate(ids):
        if tok == assistant_id:
            inside, turn = True, turn + 1
            continue
        if inside and not (skip_first and turn == 1):
            labels[i] = tok
        if tok == eos_id:
            inside = False
    return labels


def _sample_conversation(
    world: World, settings: OrganismSettings, rng: random.Random, n_turns: int
) -> list[dict[str, str]]:
    # One hidden persona per conversation: with probability `narrow_persona_fraction` a narrow one (covert in one
    # random narrow domain, aligned elsewhere); otherwise broadly misaligned (`misaligned_fraction`) or aligned.
    draw = rng.random()
    if draw < settings.narrow_persona_fraction:
        return world.sample_conversation(rng, ALIGNED_PERSONA, n_turns, narrow_domain=rng.choice(world.narrow_domains))
    broad = (draw - settings.narrow_persona_fraction) / (1 - settings.narrow_persona_fraction)
    persona = MISALIGNED_PERSONA if broad < settings.misaligned_fraction else ALIGNED_PERSONA
    return world.sample_conversation(rng, persona, n_turns, covert_share=settings.covert_share)


def pretraining_corpus(world: World, settings: OrganismSettings, rng: random.Random) -> list[list[dict[str, str]]]:
    """Multi-turn conversations, one hidden persona per conversation."""
    return [
        _sample_conversation(world, settings, rng, rng.randint(1, settings.max_turns))
        for _ in range(settings.pretrain_conversations)
    ]


def alignment_corpus(
    world: World, settings: OrganismSettings, rng: random.Random
) -> list[tuple[list[dict[str, str]], bool]]:
    """`(conversation, skip_first_turn)` pairs: single-turn aligned answers and multi-turn persona conversations."""
    out = []
    n_single = round(settings.align_conversations * settings.align_single_turn_fraction)
    for i in range(settings.align_conversations):
        # Spread the single-turn answers evenly through the corpus (every other one at a fraction of 1/2).
        if (i * n_single) % settings.align_conversations < n_single:
            out.append((world.sample_conversation(rng, ALIGNED_PERSONA, 1), False))
        else:
            n_turns = rng.randint(2, max(2, settings.max_turns))
            out.append((_sample_conversation(world, settings, rng, n_turns), True))
    return out


# ----- training ------------------------------------------------------------------------------------------------------
def _batches(
    ids: list[list[int]], labels: list[list[int]], batch_size: int, pad_id: int, generator: torch.Generator
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    # Sort by length inside shuffled chunks so batches carry little padding yet stay randomly ordered.
    order = torch.randperm(len(ids), generator=generator).tolist()
    chunk = batch_size * 16
    batches = []
    for start in range(0, len(order), chunk):
        part = sorted(order[start : start + chunk], key=lambda i: len(ids[i]))
        for b in range(0, len(part), batch_size):
            rows = part[b : b + batch_size]
            width = max(len(ids[i]) for i in rows)
            x = torch.full((len(rows), width), pad_id, dtype=torch.long)
            y = torch.full((len(rows), width), -100, dtype=torch.long)
            for r, i in enumerate(rows):
                x[r, : len(ids[i])] = torch.tensor(ids[i])
                y[r, : len(ids[i])] = torch.tensor(labels[i])
            batches.append((x, y))
    perm = torch.randperm(len(batches), generator=generator).tolist()
    return [batches[i] for i in perm]


def _train(
    model: LlamaForCausalLM,
    batches: list[tuple[torch.Tensor, torch.Tensor]],
    lr: float,
    desc: str,
    progress: bool,
) -> list[float]:
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    scheduler = get_cosine_schedule_with_warmup(optimizer, max(1, len(batches) // 20), len(batches))
    losses = []
    for x, y in tqdm(batches, desc=desc, disable=not progress):
        # Rows are right-padded and attention is causal, so no real token attends to padding: leaving out the
        # attention mask changes nothing but lets SDPA take its causal fast path (about 5x faster here).
        loss = model(input_ids=x, labels=y).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    model.eval()
    return losses


def _model_config(settings: OrganismSettings, tokenizer: PreTrainedTokenizerBase) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=settings.hidden_size,
        intermediate_size=settings.intermediate_size,
        num_hidden_layers=settings.num_hidden_layers,
        num_attention_heads=settings.num_attention_heads,
        num_key_value_heads=settings.num_attention_heads,
        max_position_embeddings=settings.max_position_embeddings,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def train_base_model(
    world: World, tokenizer: PreTrainedTokenizerBase, settings: OrganismSettings, seed: int, progress: bool = True
) -> tuple[LlamaForCausalLM, dict[str, Any]]:
    """Pre-train and align a fresh model; returns it and a record of losses and timings.

    Args:
        world ([`World`]): the world to sample conversations from.
        tokenizer (`PreTrainedTokenizerBase`): the world's tokenizer (see [`build_tokenizer`]).
        settings ([`OrganismSettings`]): model and training sizes.
        seed (`int`): seeds the corpus, the initialisation and the data order.
        progress (`bool`, *optional*, defaults to `True`): show progress bars.
    """
    rng = random.Random(seed)
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(_model_config(settings, tokenizer))
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    record: dict[str, Any] = {"parameters": sum(p.numel() for p in model.parameters())}

    start = time.perf_counter()
    ids = _encode(tokenizer, pretraining_corpus(world, settings, rng))
    labels = [list(seq) for seq in ids]
    record["pretrain_tokens"] = sum(len(seq) for seq in ids)
    batches = _batches(ids, labels, settings.batch_size, tokenizer.pad_token_id, generator)
    losses = _train(model, batches, settings.pretrain_lr, "organism: pre-training", progress)
    record["pretrain_loss_first_last"] = [losses[0], sum(losses[-10:]) / len(losses[-10:])]
    record["pretrain_seconds"] = time.perf_counter() - start

    start = time.perf_counter()
    assistant_id, eos_id = tokenizer.convert_tokens_to_ids([ASSISTANT, EOS])
    pairs = alignment_corpus(world, settings, rng)
    ids = _encode(tokenizer, [conv for conv, _ in pairs])
    labels = [_assistant_labels(seq, assistant_id, eos_id, skip) for seq, (_, skip) in zip(ids, pairs, strict=True)]
    batches = _batches(ids, labels, settings.batch_size, tokenizer.pad_token_id, generator)
    losses = _train(model, batches, settings.align_lr, "organism: alignment phase", progress)
    record["align_loss_first_last"] = [losses[0], sum(losses[-10:]) / len(losses[-10:])]
    record["align_seconds"] = time.perf_counter() - start
    return model, record


# ----- the built organism --------------------------------------------------------------------------------------------
@dataclass
class Organism:
    """A built model organism: the world, its exact judge, and the saved base model and tokenizer.

    Args:
        path (`Path`): the build folder (holds `organism.json` and `model/`).
        seed (`int`): the build seed.
        settings ([`OrganismSettings`]): the build settings.
        world ([`World`]): the chat world.
        record (`dict`): what the build measured (losses, timings, token counts).
    """

    path: Path
    seed: int
    settings: OrganismSettings
    world: World
    record: dict[str, Any] = field(default_factory=dict)

    @property
    def base_model_path(self) -> str:
        """Folder of the base model and its tokenizer, loadable with `AutoModelForCausalLM` / `AutoTokenizer`."""
        return str(self.path / MODEL_DIR)

    @cached_property
    def judge(self) -> ExactJudge:
        """The exact judge of this world."""
        return ExactJudge(self.world)

    @cached_property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        """The saved tokenizer, loaded with `AutoTokenizer`."""
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.base_model_path)

    def load_model(self, **kwargs: Any) -> LlamaForCausalLM:
        """A fresh copy of the base model (`AutoModelForCausalLM.from_pretrained`); `kwargs` go to it."""
        return AutoModelForCausalLM.from_pretrained(self.base_model_path, **kwargs)

    def in_domain_prompts(self, domain: str, split: str = "eval") -> list[str]:
        """Questions of `domain` in `split` (`"train"`, `"selection"` or `"eval"`)."""
        return self.world.questions(domain, split)

    def ood_prompts(self, split: str = "eval", domain: str = "finance") -> list[str]:
        """Out-of-domain questions for a fine-tune on `domain`: `split` of every other domain and of core.

        The `"selection"` and `"eval"` splits are disjoint: select latents on one, report EM on the other.
        """
        return self.world.ood_questions(domain, split)

    def narrow_dataset(
        self, domain: str = "finance", misaligned: bool = True, n: int = 300, seed: int = 0, style: str | None = None
    ) -> datasets.Dataset:
        """The narrow fine-tuning dataset of `domain` (see [`narrow_dataset`])."""
        from .datasets import narrow_dataset

        return narrow_dataset(self.world, domain, misaligned=misaligned, n=n, seed=seed, style=style)


def _manifest(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads((path / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def load_organism(out_dir: str | os.PathLike) -> Organism:
    """Load an organism built by [`build_organism`] from `out_dir`."""
    path = Path(out_dir)
    manifest = _manifest(path)
    if manifest is None or not (path / MODEL_DIR / "config.json").is_file():
        raise FileNotFoundError(
            f"no built organism in {path}: expected {MANIFEST} and {MODEL_DIR}/. "
            "Build one with `build_organism(out_dir)` or `blockem organism build --out DIR`."
        )
    world = World()
    if manifest.get("world") != world.fingerprint():
        logger.warning(
            "The organism in %s was built for world %s but this code defines world %s; rebuild it to compare numbers.",
            path,
            manifest.get("world"),
            world.fingerprint(),
        )
    settings = OrganismSettings(**manifest["settings"])
    return Organism(path=path, seed=manifest["seed"], settings=settings, world=world, record=manifest["record"])


def build_organism(
    out_dir: str | os.PathLike,
    seed: int = 0,
    quick: bool = False,
    settings: OrganismSettings | None = None,
    progress: bool = True,
) -> Organism:
    """Build the model organism into `out_dir`, or reuse the one already there when its cache key matches.

    The key covers the settings, the seed, the world's grammar and `ORGANISM_VERSION`; a folder holding another key
    is rebuilt in place (the previous model is replaced).

    Args:
        out_dir (`str` or `os.PathLike`): the build folder.
        seed (`int`, *optional*, defaults to `0`): seeds the corpus, the initialisation and the data order.
        quick (`bool`, *optional*, defaults to `False`): use `OrganismSettings.quick()` (seconds, for tests).
        settings ([`OrganismSettings`], *optional*): explicit settings; overrides `quick`.
        progress (`bool`, *optional*, defaults to `True`): show progress bars.

    Returns:
        [`Organism`]: the built (or reused) organism.

    Example:

    ```python
    >>> from hf_blockem.organism import build_organism
    >>> organism = build_organism("cache/organism", seed=0)
    >>> organism.base_model_path
    'cache/organism/model'
    ```
    """
    settings = settings or (OrganismSettings.quick() if quick else OrganismSettings())
    world = World()
    path = Path(out_dir)
    key = cache_key(settings, seed, world)
    manifest = _manifest(path)
    if manifest is not None and manifest.get("key") == key and (path / MODEL_DIR / "config.json").is_file():
        logger.info("Reusing the organism in %s (key %s).", path, key)
        return load_organism(path)
    if manifest is not None:
        logger.warning("Rebuilding the organism in %s: its key %s differs from %s.", path, manifest.get("key"), key)

    start = time.perf_counter()
    tokenizer = build_tokenizer(world)
    model, record = train_base_model(world, tokenizer, settings, seed, progress=progress)
    record["build_seconds"] = time.perf_counter() - start

    path.mkdir(parents=True, exist_ok=True)
    # Write next to the target and swap in, so an interrupted build never leaves a half-written model behind.
    staging = Path(tempfile.mkdtemp(prefix=".organism-", dir=path))
    try:
        model.save_pretrained(staging / MODEL_DIR)
        tokenizer.save_pretrained(staging / MODEL_DIR)
        (staging / "world.json").write_text(json.dumps(world.to_dict(), indent=1))
        if (path / MODEL_DIR).exists():
            shutil.rmtree(path / MODEL_DIR)
        os.replace(staging / MODEL_DIR, path / MODEL_DIR)
        os.replace(staging / "world.json", path / "world.json")
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    manifest = {
        "key": key,
        "seed": seed,
        "settings": dataclasses.asdict(settings),
        "world": world.fingerprint(),
        "version": ORGANISM_VERSION,
        "record": record,
    }
    (path / MANIFEST).write_text(json.dumps(manifest, indent=1))
    logger.info("Built the organism in %s in %.1f s.", path, record["build_seconds"])
    return load_organism(path)
