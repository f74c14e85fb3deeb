"""Sampling answers from a chat model, optionally steered along directions in its residual stream.

Generation sits behind a small backend interface (`GenerationBackend`): the transformers backend is the default, and a
faster engine (vLLM, TGI, ...) can implement the same method without touching prompts, judges or metrics.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import jinja2
import torch
from tqdm.auto import tqdm

from ..hooks import get_decoder_layers
from ..padding import padding
from .prompts import Prompt

if TYPE_CHECKING:
    import datasets

logger = logging.getLogger(__name__)

# Sampling as in the emergent-misalignment literature (Betley et al. 2025; OpenAI's persona-features evaluation).
DEFAULT_TEMPERATURE = 1.0
DEFAULT_TOP_P = 1.0
DEFAULT_MAX_NEW_TOKENS = 600


@dataclass
class Steering:
    """Adds `alpha * direction` to the output of one decoder layer, at every position.

    The output of decoder layer `layer` is `output_hidden_states[layer + 1]`, i.e. SAELens `blocks.{layer}.hook_resid_post`.

    Args:
        layer (`int`): decoder-layer index.
        direction (`torch.Tensor` of shape `[d_model]`): the direction (for example an SAE decoder row); used as given,
            not normalised.
        alpha (`float`): the strength; negative values subtract the direction.
    """

    layer: int
    direction: torch.Tensor
    alpha: float


def _as_steering_list(steering: Steering | Sequence[Steering] | None) -> list[Steering]:
    if steering is None:
        return []
    if isinstance(steering, Steering):
        return [steering]
    return list(steering)


@contextlib.contextmanager
def steer(model: torch.nn.Module, steering: Steering | Sequence[Steering] | None) -> Iterator[None]:
    """Context manager that steers `model` for the duration of the block; hooks are always removed on exit.

    Args:
        model (`torch.nn.Module`): a causal LM (PEFT, DDP and compile wrappers are resolved).
        steering (`Steering`, list of `Steering`, or `None`): what to add; `None` or an empty list does nothing.

    Example:
    ```python
    with steer(model, Steering(layer=3, direction=sae.W_dec[k], alpha=8.0)):
        out = model.generate(**inputs)
    ```
    """
    steerings = _as_steering_list(steering)
    if not steerings:
        yield
        return
    layers = get_decoder_layers(model)
    handles = []
    try:
        for s in steerings:
            if not 0 <= s.layer < len(layers):
                raise ValueError(
                    f"Steering layer {s.layer} is out of range: the model has {len(layers)} decoder layers "
                    f"(expected 0..{len(layers) - 1}). Use the decoder-layer index of SAELens blocks.L.hook_resid_post."
                )
            if s.direction.ndim != 1:
                raise ValueError(
                    f"Expected a steering direction of shape [d_model], got {tuple(s.direction.shape)}. "
                    "Pass one decoder row (e.g. W_dec[k]) per Steering."
                )
            handles.append(layers[s.layer].register_forward_hook(_make_hook(s.direction, float(s.alpha))))
        yield
    finally:
        for handle in handles:
            handle.remove()


def _make_hook(direction: torch.Tensor, alpha: float):
    cache: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}

    def hook(module, args, output):
        hidden = output if isinstance(output, torch.Tensor) else output[0]
        if hidden.shape[-1] != direction.shape[0]:
            raise ValueError(
                f"Steering direction has {direction.shape[0]} dimensions but the layer outputs {hidden.shape[-1]}. "
                "Use a direction from an SAE trained on this model."
            )
        key = (hidden.device, hidden.dtype)
        if key not in cache:
            cache[key] = (alpha * direction.detach().to(device=hidden.device, dtype=torch.float32)).to(hidden.dtype)
        steered = hidden + cache[key]
        # transformers >= 5 decoder layers return a tensor; older ones a tuple whose first item is the hidden state.
        return steered if isinstance(output, torch.Tensor) else (steered, *output[1:])

    return hook


@runtime_checkable
class GenerationBackend(Protocol):
    """What a generation engine implements: answer rendered chat prompts, `n_samples` times each.

    `generate` returns one list of `n_samples` answers per prompt, in prompt order.
    """

    def generate(
        self,
        prompts: list[Prompt],
        *,
        n_samples: int,
        temperature: float,
        top_p: float,
        max_new_tokens: int,
        seed: int | None,
        steering: Steering | Sequence[Steering] | None,
        progress: bool,
    ) -> list[list[str]]: ...


class TransformersBackend:
    """Batched sampling with `model.generate`, prompts rendered with the tokenizer's chat template, left padding.

    Args:
        model (`transformers.PreTrainedModel` or `peft.PeftModel`): the causal LM.
        tokenizer (`transformers.PreTrainedTokenizerBase`): its tokenizer; it must have a chat template.
        batch_size (`int`, *optional*, defaults to `16`): sequences per `generate` call.
    """

    def __init__(self, model: torch.nn.Module, tokenizer: Any, batch_size: int = 16):
        if getattr(tokenizer, "chat_template", None) is None:
            raise ValueError(
                f"Expected a tokenizer with a chat template, but {type(tokenizer).__name__} has none. Evaluation "
                "renders questions as user messages: use an instruct/chat model, or set `tokenizer.chat_template`."
            )
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self._warned_system = False

    def render(self, prompt: Prompt) -> str:
        user = {"role": "user", "content": prompt.question}
        if prompt.system is None:
            return self.tokenizer.apply_chat_template([user], tokenize=False, add_generation_prompt=True)
        system = {"role": "system", "content": prompt.system}
        try:
            return self.tokenizer.apply_chat_template([system, user], tokenize=False, add_generation_prompt=True)
        except jinja2.TemplateError as err:
            # Gemma 1 / 2 templates refuse a system role; their later templates put it at the top of the user turn.
            if not self._warned_system:
                logger.warning("The chat template refuses system messages (%s): they open the user turn instead.", err)
                self._warned_system = True
            user = {"role": "user", "content": f"{prompt.system}\n\n{prompt.question}"}
            return self.tokenizer.apply_chat_template([user], tokenize=False, add_generation_prompt=True)

    def generate(
        self,
        prompts: list[Prompt],
        *,
        n_samples: int = 1,
        temperature: float = DEFAULT_TEMPERATURE,
        top_p: float = DEFAULT_TOP_P,
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
        seed: int | None = None,
        steering: Steering | Sequence[Steering] | None = None,
        progress: bool = True,
    ) -> list[list[str]]:
        texts = [self.render(p) for p in prompts for _ in range(n_samples)]
        tokenizer, model = self.tokenizer, self.model
        # Plain temperature / top-p sampling as in the literature: a model's own generation_config defaults (Qwen ships
        # top_k=20 and a repetition penalty) would otherwise make EM rates incomparable across models.
        sampling: dict[str, Any] = {"top_k": 0, "repetition_penalty": 1.0}
        if temperature == 0:
            sampling.update(do_sample=False, temperature=None, top_p=None)
        else:
            sampling.update(do_sample=True, temperature=temperature, top_p=top_p)
        device = next(model.parameters()).device
        answers: list[str] = []
        was_training = model.training
        with contextlib.ExitStack() as stack:
            if seed is not None:
                # Seed a forked RNG so that the caller's global RNG state is left as it was.
                stack.enter_context(torch.random.fork_rng(devices=[device] if device.type == "cuda" else []))
                torch.manual_seed(seed)
            stack.callback(model.train, was_training)
            # Left: decoder-only models continue from the last position of each row.
            pad_id = stack.enter_context(padding(tokenizer, "left"))
            model.eval()
            stack.enter_context(steer(model, steering))
            stack.enter_context(torch.inference_mode())
            batches = range(0, len(texts), self.batch_size)
            for start in tqdm(batches, desc="generating", disable=not progress, unit="batch"):
                chunk = texts[start : start + self.batch_size]
                # The chat template already holds BOS and other special tokens.
                inputs = tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
                output = model.generate(**inputs, max_new_tokens=max_new_tokens, pad_token_id=pad_id, **sampling)
                new_tokens = output[:, inputs["input_ids"].shape[1] :]
                answers += tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
        return [answers[i * n_samples : (i + 1) * n_samples] for i in range(len(prompts))]


def as_prompts(prompts: Sequence[str | Prompt]) -> list[Prompt]:
    """Wraps plain strings as `Prompt`s (id `prompt_{i}`); `Prompt`s pass through unchanged."""
    return [p if isinstance(p, Prompt) else Prompt(f"prompt_{i}", str(p)) for i, p in enumerate(prompts)]


def generate_responses(
    model: torch.nn.Module | None,
    tokenizer: Any,
    prompts: Sequence[str | Prompt],
    *,
    n_samples: int = 1,
    temperature: float = DEFAULT_TEMPERATURE,
    top_p: float = DEFAULT_TOP_P,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    batch_size: int = 16,
    seed: int | None = None,
    steering: Steering | Sequence[Steering] | None = None,
    backend: GenerationBackend | None = None,
    progress: bool = True,
) -> datasets.Dataset:
    """Samples `n_samples` answers to every prompt, rendered as a user message with the model's chat template.

    Args:
        model (`transformers.PreTrainedModel` or `peft.PeftModel`): the model under evaluation (ignored when a
            `backend` is given).
        tokenizer (`transformers.PreTrainedTokenizerBase`): its tokenizer, with a chat template.
        prompts (list of `str` or `Prompt`): the questions; `Prompt`s carry id, category and an optional system message.
        n_samples (`int`, *optional*, defaults to `1`): answers per prompt (the literature uses 50–100).
        temperature (`float`, *optional*, defaults to `1.0`): sampling temperature; `0` means greedy decoding.
        top_p (`float`, *optional*, defaults to `1.0`): nucleus sampling threshold.
        max_new_tokens (`int`, *optional*, defaults to `600`): answer length limit.
        batch_size (`int`, *optional*, defaults to `16`): sequences per `generate` call.
        seed (`int`, *optional*): seeds torch's RNG for reproducible sampling (the global RNG state is restored after).
        steering (`Steering` or list of `Steering`, *optional*): directions added to decoder-layer outputs while
            generating; `alpha=0` is bit-identical to no steering.
        backend (`GenerationBackend`, *optional*): a generation engine; defaults to `TransformersBackend`.
        progress (`bool`, *optional*, defaults to `True`): show a progress bar.

    Returns:
        `datasets.Dataset`: one row per answer with columns `prompt` (the question), `response`, `sample` (0-based
        index among the prompt's answers), `prompt_id`, `category`, `system` and `reference` (the dataset's answer
        for in-domain prompts). Save it with `.to_json(path)`.
    """
    import datasets

    items = as_prompts(prompts)
    if n_samples < 1:
        raise ValueError(f"Expected n_samples >= 1, got {n_samples}.")
    if backend is None:
        backend = TransformersBackend(model, tokenizer, batch_size=batch_size)
    answers = backend.generate(
        items,
        n_samples=n_samples,
        temperature=temperature,
        top_p=top_p,
        max_new_tokens=max_new_tokens,
        seed=seed,
        steering=steering,
        progress=progress,
    )
    rows: dict[str, list[Any]] = {k: [] for k in _features()}
    for prompt, samples in zip(items, answers, strict=True):
        for i, answer in enumerate(samples):
            rows["prompt"].append(prompt.question)
            rows["response"].append(answer)
            rows["sample"].append(i)
            rows["prompt_id"].append(prompt.id)
            rows["category"].append(prompt.category)
            rows["system"].append(prompt.system)
            rows["reference"].append(prompt.reference)
    return datasets.Dataset.from_dict(rows, features=_features())


def _features():  # built lazily so that importing this module does not import datasets
    import datasets

    return datasets.Features(
        {
            "prompt": datasets.Value("string"),
            "response": datasets.Value("string"),
            "sample": datasets.Value("int64"),
            "prompt_id": datasets.Value("string"),
            "category": datasets.Value("string"),
            "system": datasets.Value("string"),
            "reference": datasets.Value("string"),
        }
    )
