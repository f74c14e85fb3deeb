"""`blockem evaluate`: measure emergent misalignment of a model (optionally with a PEFT adapter) with one or more
judges, from the command line or a YAML config (`--config eval.yaml`; command-line flags override the file).

Example:
```bash
blockem evaluate --model Qwen/Qwen2.5-7B-Instruct --adapter ./my-adapter --judge openai:gpt-4o-2024-08-06
blockem evaluate --config eval.yaml --n_samples 50
```
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from ..chat_template_variables import parse_template_variables, with_template_variables
from .generation import DEFAULT_MAX_NEW_TOKENS, DEFAULT_TEMPERATURE, DEFAULT_TOP_P
from .harness import DEFAULT_N_SAMPLES, evaluate
from .prompts import Prompt, load_core_misalignment, load_first_plot_questions, ood_prompts

logger = logging.getLogger(__name__)


@dataclass
class EvaluateArguments:
    """Arguments of `blockem evaluate`.

    > Parameters that control the model under evaluation

    Args:
        model (`str`): Hub id or local path of the chat model.
        adapter (`str`, *optional*): Hub id or local path of a PEFT adapter to load on the model.
        revision (`str`, *optional*): revision (branch, tag or commit) of the model.
        tokenizer (`str`, *optional*): tokenizer to use instead of the model's (for example the adapter's folder).
        dtype (`str`, *optional*, defaults to `"auto"`): weights dtype (`auto`, `float32`, `bfloat16`, `float16`).
        device (`str`, *optional*): device to run on; defaults to CUDA when available.
        name (`str`, *optional*): the model's name in the report; defaults to the model (and adapter) path.

    > Parameters that control the prompts and sampling

        prompts (`list[str]`, *optional*, defaults to `["builtin:evaluation"]`): prompt sets, each
            `builtin:evaluation|selection|all`, `first_plot:PATH_OR_URL` or `core_misalignment:PATH_OR_URL`.
        in_domain (`str`, *optional*): JSONL of held-out in-domain conversations; their final assistant message's
            loss is reported as the in-domain target metric.
        n_samples (`int`, *optional*, defaults to `25`): answers per prompt.
        temperature, top_p, max_new_tokens, batch_size, seed: sampling settings.

    > Parameters that control the judges

        judge (`list[str]`): one or more of `openai:MODEL` (OpenAI-compatible endpoint), `local:MODEL_ID_OR_PATH`
            (a local Hugging Face chat model) and `organism:DIR` (the exact judge of a model organism); the first is
            the primary judge.
        judge_base_url (`str`, *optional*): endpoint of the `openai:` judges (defaults to `$OPENAI_BASE_URL`, then
            OpenAI). The API key is read from `$OPENAI_API_KEY`.
        judge_mode (`str`, *optional*, defaults to `"0-100"`): `0-100` (aligned + coherent) or `rubric` (1–5 grade).
        judge_max_concurrency (`int`, *optional*, defaults to `8`): requests in flight per `openai:` judge.
        judge_split_numbers (`str`, *optional*, defaults to `"refuse"`): what an `openai:` judge does when its
            tokenizer writes numbers digit by digit: `refuse` (an error) or `prefill` (read the digits by prefilling
            the reply, on vLLM and SGLang); see `OpenAIJudge`.
        judge_cache (`str`, *optional*): SQLite judgement cache; defaults to `OUTPUT_DIR/judgements.sqlite`.
        chat_template_kwargs (`str`, *optional*): a JSON object of chat-template variables set for every rendering
            of the evaluated model's and the local judges' templates (see `hf_blockem.chat_template_variables`), e.g.
            `{"enable_thinking": false}` so that Qwen3 answers without reasoning first.
        output_dir (`str`, *optional*, defaults to `"blockem-eval"`): where result.json, result.md, quadrant.png and
            the answers go.
    """

    model: str = field(metadata={"help": "Hub id or local path of the chat model to evaluate."})
    judge: list[str] = field(
        metadata={
            "help": "Judges: `openai:MODEL`, `local:MODEL_ID_OR_PATH` and/or `organism:DIR` (the exact judge of a "
            "model organism); the first is the primary judge."
        }
    )
    adapter: str | None = field(default=None, metadata={"help": "Hub id or local path of a PEFT adapter."})
    revision: str | None = field(default=None, metadata={"help": "Revision of the model (branch, tag or commit)."})
    tokenizer: str | None = field(default=None, metadata={"help": "Tokenizer to use instead of the model's."})
    dtype: str = field(default="auto", metadata={"help": "Weights dtype: auto, float32, bfloat16 or float16."})
    device: str | None = field(default=None, metadata={"help": "Device; defaults to CUDA when available."})
    name: str | None = field(default=None, metadata={"help": "The model's name in the report."})
    prompts: list[str] = field(
        default_factory=lambda: ["builtin:evaluation"],
        metadata={
            "help": "Prompt sets: builtin:evaluation|selection|all, first_plot:PATH_OR_URL, "
            "core_misalignment:PATH_OR_URL."
        },
    )
    in_domain: str | None = field(
        default=None, metadata={"help": "JSONL of held-out in-domain conversations (held-out loss is reported)."}
    )
    n_samples: int = field(default=DEFAULT_N_SAMPLES, metadata={"help": "Answers per prompt."})
    temperature: float = field(default=DEFAULT_TEMPERATURE, metadata={"help": "Sampling temperature (0: greedy)."})
    top_p: float = field(default=DEFAULT_TOP_P, metadata={"help": "Nucleus sampling threshold."})
    max_new_tokens: int = field(default=DEFAULT_MAX_NEW_TOKENS, metadata={"help": "Answer length limit."})
    batch_size: int = field(default=16, metadata={"help": "Sequences per generate call."})
    seed: int = field(default=0, metadata={"help": "Sampling and bootstrap seed."})
    judge_base_url: str | None = field(default=None, metadata={"help": "Endpoint of the openai: judges."})
    judge_mode: str = field(default="0-100", metadata={"help": "0-100 (aligned + coherent) or rubric (1-5)."})
    judge_max_concurrency: int = field(default=8, metadata={"help": "Requests in flight per openai: judge."})
    judge_split_numbers: str = field(
        default="refuse",
        metadata={
            "choices": ["refuse", "prefill"],
            "help": "openai: judges whose tokenizer writes numbers digit by digit: refuse (an error) or prefill (read "
            "the digits by prefilling the reply; vLLM and SGLang).",
        },
    )
    judge_cache: str | None = field(
        default=None, metadata={"help": "SQLite judgement cache (default: OUTPUT_DIR/judgements.sqlite)."}
    )
    chat_template_kwargs: str | None = field(
        default=None,
        metadata={
            "help": "Chat-template variables (JSON) for every rendering by the model and the local judges, e.g. "
            "'{\"enable_thinking\": false}' for Qwen3."
        },
    )
    output_dir: str = field(default="blockem-eval", metadata={"help": "Where the report and answers are written."})


def make_parser():
    from trl import TrlParser  # HfArgumentParser plus `--config file.yaml` with command-line overrides

    return TrlParser(EvaluateArguments, prog="blockem evaluate")


def load_prompt_specs(specs: list[str]) -> list[Prompt]:
    prompts: list[Prompt] = []
    for spec in specs:
        kind, _, location = spec.partition(":")
        if kind == "builtin":
            prompts += ood_prompts(location or "evaluation")
        elif kind == "first_plot":
            prompts += load_first_plot_questions(location)
        elif kind == "core_misalignment":
            prompts += load_core_misalignment(location)
        else:
            raise ValueError(
                f"Expected a prompt set builtin:SPLIT, first_plot:PATH_OR_URL or core_misalignment:PATH_OR_URL, "
                f"got {spec!r}."
            )
    return prompts


def load_model(path: str, *, revision: str | None, dtype: str, device: str, adapter: str | None = None):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, revision=revision, dtype=dtype).to(device)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    return model.eval()


def build_judges(args: EvaluateArguments, cache, device: str) -> list:
    from transformers import AutoTokenizer

    from .local_judge import LocalJudge
    from .openai_judge import OpenAIJudge

    variables = parse_template_variables(args.chat_template_kwargs)
    judges = []
    for spec in args.judge:
        kind, _, name = spec.partition(":")
        if kind == "openai" and name:
            judges.append(
                OpenAIJudge(
                    name,
                    args.judge_base_url,
                    max_concurrency=args.judge_max_concurrency,
                    mode=args.judge_mode,
                    split_numbers=args.judge_split_numbers,
                    cache=cache,
                )
            )
        elif kind == "organism" and name:  # the exact judge of a model organism built in folder `name`
            from ..organism import load_organism

            judges.append(load_organism(name).judge)
        elif kind == "local" and name:
            model = load_model(name, revision=None, dtype=args.dtype, device=device)
            tokenizer = with_template_variables(AutoTokenizer.from_pretrained(name), variables)
            judges.append(LocalJudge(model, tokenizer, name=name, mode=args.judge_mode, cache=cache))
        else:
            raise ValueError(
                f"Expected a judge `openai:MODEL`, `local:MODEL_ID_OR_PATH` or `organism:DIR`, got {spec!r}."
            )
    return judges


def _held_out_conversations(path: str) -> list[list[dict[str, str]]]:
    """Conversations ending in an assistant message, from a JSONL file in conversational or prompt/completion form."""
    conversations = []
    for line in Path(path).expanduser().read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        if "messages" in row:
            messages = list(row["messages"])
        else:
            prompt, completion = row["prompt"], row["completion"]
            messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
            messages += [{"role": "assistant", "content": completion}] if isinstance(completion, str) else completion
        while messages and messages[-1]["role"] != "assistant":
            messages.pop()
        if messages:
            conversations.append(messages)
    return conversations


def main(argv: list[str] | None = None) -> int:
    """Runs `blockem evaluate`; prints the Markdown table and writes the report to `--output_dir`."""
    import torch
    from transformers import AutoTokenizer

    from .cache import JudgementCache
    from .metrics import held_out_loss

    (args,) = make_parser().parse_args_and_config(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    output_dir = Path(args.output_dir)
    cache = JudgementCache(args.judge_cache or output_dir / "judgements.sqlite")
    judges = build_judges(args, cache, device)
    prompts = load_prompt_specs(args.prompts)
    model = load_model(args.model, revision=args.revision, dtype=args.dtype, device=device, adapter=args.adapter)
    tokenizer = AutoTokenizer.from_pretrained(
        args.tokenizer or args.model, revision=None if args.tokenizer else args.revision
    )
    variables = parse_template_variables(args.chat_template_kwargs)
    tokenizer = with_template_variables(tokenizer, variables)
    name = args.name or (f"{args.model}+{args.adapter}" if args.adapter else args.model)
    result = evaluate(
        {name: (model, tokenizer)},
        judges=judges,
        prompts=prompts,
        n_samples=args.n_samples,
        temperature=args.temperature,
        top_p=args.top_p,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        seed=args.seed,
    )
    if args.in_domain is not None:
        conversations = _held_out_conversations(args.in_domain)
        result.held_out_loss[name] = held_out_loss(model, tokenizer, conversations, batch_size=args.batch_size)
    result.config.update({"model": args.model, "adapter": args.adapter, "revision": args.revision})
    result.config["chat_template_kwargs"] = variables
    result.save(output_dir)
    print(result.to_markdown())
    print(f"Report written to {output_dir}/ (result.json, result.md, quadrant.png, responses_*.jsonl)")
    return 0
