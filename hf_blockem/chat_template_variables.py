"""Fixing chat-template variables on a tokenizer: `enable_thinking=False` for Qwen3 and other reasoning models.

`apply_chat_template(messages, enable_thinking=False)` turns a Qwen3 model's reasoning off for one call, but the
evaluation harness, the selection probes, Stage 1 and the judges each render conversations themselves. A copy of the
tokenizer whose template starts by setting the variables renders every conversation that way, wherever it is used.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from typing import Any

_LITERALS = (bool, int, float, str, type(None))


def _jinja_literal(name: str, value: Any) -> str:
    if not isinstance(value, _LITERALS):
        raise ValueError(
            f"Expected chat-template variables with a boolean, number, string or null value, got {name}={value!r} "
            f"({type(value).__name__})."
        )
    if value is None:
        return "none"
    try:  # JSON true / false / numbers / strings are Jinja literals too
        return json.dumps(value, ensure_ascii=False, allow_nan=False)
    except ValueError as err:
        raise ValueError(f"Expected a finite number for chat-template variable {name}, got {value!r}.") from err


def with_template_variables(tokenizer: Any, variables: Mapping[str, Any] | None) -> Any:
    """A copy of `tokenizer` whose chat template renders as `apply_chat_template(..., **variables)` would.

    The variables are set at the top of the template (a named-variants template gets them in every variant), so they
    hold for every rendering, including the ones `hf_blockem` and TRL make, and override a value passed per call.

    Args:
        tokenizer (`PreTrainedTokenizerBase`): a tokenizer with a chat template; it is not modified.
        variables (`Mapping[str, Any]`, *optional*): for example `{"enable_thinking": False}`. With none, `tokenizer`
            itself is returned.

    Example:

    ```python
    >>> tokenizer = with_template_variables(AutoTokenizer.from_pretrained("Qwen/Qwen3-8B"), {"enable_thinking": False})
    >>> tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    '<|im_start|>user\\nhi<|im_end|>\\n<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n'
    ```
    """
    if not variables:
        return tokenizer
    template = getattr(tokenizer, "chat_template", None)
    if template is None:
        raise ValueError(
            f"Expected a tokenizer with a chat template to set {sorted(variables)} on, got {type(tokenizer).__name__} "
            "without one."
        )
    for name in variables:
        if not str(name).isidentifier():
            raise ValueError(f"Expected chat-template variable names that are identifiers, got {name!r}.")
    header = "".join(f"{{%- set {name} = {_jinja_literal(name, value)} %}}" for name, value in variables.items())
    bound = copy.deepcopy(tokenizer)
    if isinstance(template, Mapping):
        bound.chat_template = {key: header + text for key, text in template.items()}
    else:
        bound.chat_template = header + template
    return bound


def parse_template_variables(value: str | Mapping[str, Any] | None) -> dict[str, Any] | None:
    """`--chat_template_kwargs` of the command lines: a JSON object (or a mapping, from a YAML config)."""
    if value is None or isinstance(value, Mapping):
        return dict(value) if value else None
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as err:
        raise ValueError(
            f"Expected --chat_template_kwargs as a JSON object such as '{{\"enable_thinking\": false}}', got {value!r}."
        ) from err
    if not isinstance(parsed, dict):
        raise ValueError(f"Expected --chat_template_kwargs as a JSON object, got {value!r}.")
    return parsed or None
