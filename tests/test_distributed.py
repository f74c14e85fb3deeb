"""Two real processes (torchrun, gloo on CPU) against one: same loss, same gradients, same reduced metrics.

`tests/distributed_worker.py` trains one plain-SGD step (lr 1, so the update is minus the gradient) on exactly 8
examples: 2 processes x per-device batch 2 x accumulation 2 against 1 process x batch 8, for every source of base
activations that runs on CPU. The comparison is exact up to the order of fp32 summation.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from distributed_worker import case_name, run_case
from safetensors.torch import load_file
from tiny_models import tiny_model

TESTS = Path(__file__).parent
MODES = ("adapter", "reference", "cache")
LOSS_KWARGS = (True, False)  # False: equal-length sequences, where per-micro-batch means are exact
TOLERANCE = 1e-5  # relative to each tensor's scale, fp32
LAUNCH_TIMEOUT_S = 240  # generous: two processes import torch, transformers, TRL and PEFT on shared cores


def distributed_case(mode: str, accepts_loss_kwargs: bool, **extra) -> dict:
    return dict(mode=mode, batch=2, accumulation=2, accepts_loss_kwargs=accepts_loss_kwargs, **extra)


def single_case(case: dict) -> dict:
    single = {**case, "batch": 8, "accumulation": 1}
    single.pop("fsdp", None)  # one process: nothing to shard, the same reference run
    single.pop("zero", None)
    return single


DDP_CASES = [distributed_case(mode, accepts) for mode in MODES for accepts in LOSS_KWARGS] + [
    # transformers keeps DDP's find_unused_parameters on for a PEFT model even with checkpointing: non-reentrant
    # checkpointing must still give the same step. Reentrant checkpointing works only without find_unused_parameters
    # (the combination is refused with a clear error, see test_trainer).
    distributed_case("adapter", True, gradient_checkpointing=True),
    distributed_case("adapter", True, gradient_checkpointing="reentrant", ddp_find_unused_parameters=False),
    # Micro-batches without a single loss token (6 of 8 examples masked): a finite 0 penalty, no hang even when DDP
    # expects a gradient for every parameter, and the same step as one process.
    distributed_case("adapter", True, masked_examples=6, ddp_find_unused_parameters=False),
]
# FSDP2 only: accelerate's FSDP1 plugin refuses to initialise without an accelerator device ("There are currently no
# available devices found"), so FSDP1 cannot run on CPU (checked with accelerate 1.15 and torch 2.13).
FSDP_CASES = [distributed_case(mode, True, fsdp="2") for mode in MODES] + [
    distributed_case("adapter", False, fsdp="2")  # per-micro-batch means: equal-length sequences
]
# 2 processes x per-device batch 4 (no accumulation), with and without the penalty: the difference is the penalty's
# gradient alone.
TWO_TIMES_FOUR = dict(mode="adapter", batch=4, accumulation=1)
PENALTY_ALONE_CASES = [
    {**TWO_TIMES_FOUR, "accepts_loss_kwargs": accepts, **penalty}
    for accepts in LOSS_KWARGS
    for penalty in ({}, {"block_lambda": 0.0})
]
ZERO_STAGES = (2, 3)
ZERO_CASES = [distributed_case(mode, True, zero=stage) for stage in ZERO_STAGES for mode in MODES]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(cases: list[dict], out: Path, base_dir: str) -> subprocess.CompletedProcess:
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--master_addr=127.0.0.1",
        f"--master_port={free_port()}",
        str(TESTS / "distributed_worker.py"),
        "--out",
        str(out),
        "--base-dir",
        base_dir,
        "--cases",
        json.dumps(cases),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    # The worker imports the test helpers (tests/) and the library from the checkout.
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), str(TESTS.parent), env.get("PYTHONPATH", "")])
    return subprocess.run(
        command, cwd=TESTS, env=env, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S, check=False
    )


def launch_ok(cases: list[dict], out: Path, base_dir: str) -> None:
    result = launch(cases, out, base_dir)
    assert result.returncode == 0, f"torchrun failed:\n{result.stdout[-4000:]}\n{result.stderr[-8000:]}"


def read_result(out: Path, case: dict) -> tuple[dict, dict[str, torch.Tensor]]:
    name = case_name(case)
    return json.loads((out / f"{name}.json").read_text()), load_file(str(out / f"{name}.safetensors"))


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("base") / "tiny-llama"
    tiny_model("llama").save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def distributed_run(tmp_path_factory, base_dir) -> Path:
    # One launch for every case: starting two processes costs more than all the training steps together.
    out = tmp_path_factory.mktemp("distributed")
    # FSDP cases last: the FSDP settings they leave in the process environment would wrap later cases' models.
    launch_ok(DDP_CASES + PENALTY_ALONE_CASES + FSDP_CASES, out, base_dir)
    return out


@pytest.fixture(scope="module")
def zero_runs(tmp_path_factory, base_dir) -> Path:
    pytest.importorskip("deepspeed", reason="DeepSpeed is installed by `make test-slow`")
    out = tmp_path_factory.mktemp("zero")
    for stage in ZERO_STAGES:  # one launch per stage: accelerate keeps one DeepSpeed plugin per process
        launch_ok([case for case in ZERO_CASES if case["zero"] == stage], out, base_dir)
    return out


@pytest.fixture(scope="module")
def single_runs(tmp_path_factory, base_dir):
    out = tmp_path_factory.mktemp("single")
    cache: dict[str, dict] = {}

    def get(case: dict) -> dict:
        name = case_name(single_case(case))
        if name not in cache:
            cache[name] = run_case(single_case(case), out, base_dir)
        return cache[name]

    return get


def assert_updates_close(expected: dict[str, torch.Tensor], actual: dict[str, torch.Tensor]) -> None:
    assert expected.keys() == actual.keys()
    for name in expected:
        scale = max(1.0, expected[name].abs().max().item())
        torch.testing.assert_close(actual[name], expected[name], rtol=0, atol=TOLERANCE * scale, msg=name)


def assert_same_step(single: dict, distributed: dict, updates: dict[str, torch.Tensor]) -> None:
    assert distributed["world_size"] == 2 and single["world_size"] == 1
    assert distributed["loss"] == pytest.approx(single["loss"], rel=TOLERANCE)
    assert_updates_close(single["updates"], updates)
    # The penalty did contribute, and its metrics, reduced over both processes, are the single process's.
    assert single["metrics"]["blockem/penalty"] > 0.01
    assert distributed["metrics"].keys() == single["metrics"].keys()
    for key, value in single["metrics"].items():
        # abs: a latent's mean activation near 0 (0.008) sums in another order over two processes (1.1e-7 on AMD EPYC).
        assert distributed["metrics"][key] == pytest.approx(value, rel=TOLERANCE, abs=3e-7), key


def assert_cache_built_together(distributed: dict) -> None:
    # Sharded (FSDP, DeepSpeed), every forward is a collective: both processes build together, one of them writes.
    main, other = distributed["processes"]
    assert main["cache_built"] and other["cache_built"]
    assert main["cache_digest"] == other["cache_digest"]
    assert main["cache_misses"] == other["cache_misses"] == 0
    assert len([name for name in distributed["cache_files"] if name.endswith(".safetensors")]) == 1


@pytest.mark.parametrize("case", DDP_CASES, ids=case_name)
def test_two_processes_match_one(distributed_run, single_runs, case):
    distributed, updates = read_result(distributed_run, case)
    assert "MULTI_CPU" in distributed["distributed_type"]
    assert_same_step(single_runs(case), distributed, updates)
    # DDP tolerates one grad-enabled forward per backward: every base pass must run without grad. Adapters off
    # runs one per micro-batch, the reference has a model of its own, the cache runs one pass before training (on
    # the process that writes it: 8 examples, one evaluation batch) and none during.
    base_passes = {"adapter": [2, 2], "reference": [0, 0], "cache": [1, 0]}[case["mode"]]
    for process, expected in zip(distributed["processes"], base_passes, strict=True):
        assert process["forwards_with_grad"] == case["accumulation"]
        assert process["forwards_without_grad"] == expected


@pytest.mark.parametrize("accepts_loss_kwargs", LOSS_KWARGS)
def test_two_processes_times_batch_4_match_one_and_so_does_the_penalty_alone(
    distributed_run, single_runs, accepts_loss_kwargs
):
    cases = [case for case in PENALTY_ALONE_CASES if case["accepts_loss_kwargs"] == accepts_loss_kwargs]
    (with_penalty, updates), (_, updates_ce) = (read_result(distributed_run, case) for case in cases)
    single, single_ce = (single_runs(case) for case in cases)
    assert_same_step(single, with_penalty, updates)
    penalty_alone = {name: updates[name] - updates_ce[name] for name in updates}
    expected = {name: single["updates"][name] - single_ce["updates"][name] for name in single["updates"]}
    assert max(value.abs().max().item() for value in expected.values()) > 1e-4  # the penalty does contribute
    assert_updates_close(expected, penalty_alone)


@pytest.mark.parametrize("accepts_loss_kwargs", LOSS_KWARGS)
def test_two_processes_write_one_cache_and_read_it_both(distributed_run, accepts_loss_kwargs):
    distributed, _ = read_result(distributed_run, distributed_case("cache", accepts_loss_kwargs))
    main, other = distributed["processes"]
    assert main["cache_built"] and not other["cache_built"]  # one writer; the other process loaded its file
    assert main["cache_digest"] == other["cache_digest"]
    assert main["cache_misses"] == other["cache_misses"] == 0
    assert len([name for name in distributed["cache_files"] if name.endswith(".safetensors")]) == 1


@pytest.mark.parametrize("case", FSDP_CASES, ids=case_name)
def test_fsdp2_two_processes_match_one(distributed_run, single_runs, case):
    # accelerate enables FSDP only on accelerator devices; the worker lifts that one check (see
    # `allow_fsdp_on_cpu`) so that torch's FSDP2 runs on CPU with gloo through the Trainer's own preparation.
    distributed, updates = read_result(distributed_run, case)
    assert distributed["fsdp_enabled"] and distributed["sharded_parameters"] > 0
    assert_same_step(single_runs(case), distributed, updates)
    for process in distributed["processes"]:
        assert process["forwards_with_grad"] == case["accumulation"]
    if case["mode"] == "cache":
        assert_cache_built_together(distributed)


@pytest.mark.slow
@pytest.mark.parametrize("case", ZERO_CASES, ids=case_name)
def test_deepspeed_zero_two_processes_match_one(zero_runs, single_runs, case):
    # DeepSpeed runs on its CPU accelerator with gloo here. ZeRO-2 partitions gradients and optimizer state, ZeRO-3
    # the parameters too; the frozen reference is partitioned the way TRL prepares reference models.
    distributed, updates = read_result(zero_runs, case)
    assert distributed["deepspeed_enabled"]
    assert (distributed["sharded_parameters"] > 0) == (case["zero"] == 3)
    assert_same_step(single_runs(case), distributed, updates)
    for process in distributed["processes"]:
        assert process["forwards_with_grad"] == case["accumulation"]
    if case["mode"] == "cache":
        assert_cache_built_together(distributed)  # ZeRO-2 too: the library treats any DeepSpeed run as sharded


def test_gpu_smoke_latent_set_is_the_one_saelens_builds(tmp_path):
    # benchmarks/gpu_smoke.py loads this file where SAELens is missing (the GPU image); it must not drift from the
    # set the CPU tests build, or the GPU rows would test another set.
    from safetensors import safe_open
    from test_trainer import tiny_latent_set

    tiny_latent_set().save_pretrained(tmp_path)
    built, committed = tmp_path / "latent_set.safetensors", TESTS.parent / "benchmarks/gpu/tiny_latent_set.safetensors"
    with safe_open(str(built), "pt") as a, safe_open(str(committed), "pt") as b:
        assert a.metadata() == b.metadata()
        assert sorted(a.keys()) == sorted(b.keys())
        for key in a.keys():
            assert torch.equal(a.get_tensor(key), b.get_tensor(key)), key
