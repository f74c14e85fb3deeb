"""Padding a batch with any chat tokenizer, including those that ship without a pad token (Llama 3 Instruct)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any


@contextlib.contextmanager
def padding(tokenizer: Any, side: str | None = None) -> Iterator[int]:
    """Lets `tokenizer(..., padding=True)` pad, on `side` if given; yields the pad token id.

    A tokenizer without a pad token pads with its EOS token for the duration (the attention mask hides the padding, so
    which token fills it does not matter). The pad token and the padding side are restored on exit.

    Args:
        tokenizer: a Hugging Face tokenizer.
        side (`str`, *optional*): `"left"` (generation, last-position reads) or `"right"`.

    Raises:
        `ValueError`: the tokenizer has neither a pad token nor an EOS token.
    """
    pad_token, padding_side = tokenizer.pad_token, tokenizer.padding_side
    if pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(
                f"Expected the tokenizer ({type(tokenizer).__name__}) to have a pad or an EOS token to pad batches "
                "with, got neither. Set `tokenizer.pad_token`."
            )
        tokenizer.pad_token = tokenizer.eos_token
    try:
        if side is not None:
            tokenizer.padding_side = side
        yield tokenizer.pad_token_id
    finally:
        if pad_token is None:  # only undo what was done: setting a token re-registers it with the backend
            tokenizer.pad_token = None
        tokenizer.padding_side = padding_side
