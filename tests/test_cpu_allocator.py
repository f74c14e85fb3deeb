"""The `blockem` program keeps freed CPU memory, so CPU training steps stop page-faulting through their activations."""

import importlib.metadata
import json
import subprocess
import sys
import textwrap

import pytest

# A few training steps of a small Llama in a fresh process; prints the minor page faults per step after the first.
WORKLOAD = textwrap.dedent(
    """
    import json, resource, sys, torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from hf_blockem.cpu_allocator import keep_freed_cpu_memory

    accepted = keep_freed_cpu_memory() if sys.argv[1] == "tuned" else None
    torch.manual_seed(0)
    torch.set_num_threads(1)
    config = LlamaConfig(
        vocab_size=64, hidden_size=128, intermediate_size=512, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4,
    )
    model = LlamaForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters())
    x = torch.randint(0, 64, (32, 96))

    def step():
        model(input_ids=x, labels=x).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        return model.lm_head.weight.detach().clone()

    step()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(3):
        weight = step()
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 3
    print(json.dumps({"accepted": accepted, "faults": faults, "checksum": weight.double().sum().item()}))
    """
)


def _run(mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", WORKLOAD, mode], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc thresholds exist on Linux only")
def test_kept_memory_cuts_page_faults_and_changes_no_arithmetic():
    plain, tuned = _run("plain"), _run("tuned")
    if not tuned["accepted"]:
        pytest.skip("this C library does not take glibc's mallopt thresholds")
    assert tuned["faults"] < plain["faults"] / 3, (plain, tuned)
    assert tuned["checksum"] == plain["checksum"]  # the same training, bit for bit


def test_the_blockem_console_script_goes_through_run():
    # `hf_blockem.cli:run` keeps freed memory and then runs `main`; the library itself never touches the allocator.
    (script,) = [ep for ep in importlib.metadata.entry_points(group="console_scripts") if ep.name == "blockem"]
    assert script.value == "hf_blockem.cli:run"
