"""The Hub side of a run: files in output_dir, one-commit pushes, push failures, strict revisions, `blockem push`.

Real huggingface_hub and transformers code runs up to the socket. The only fake is `FakeHub` below, a local HTTP
server at the network edge that answers the few Hub endpoints an upload uses (create repo, branch, YAML validation,
preupload, commit), records what each commit carried, and can answer a commit with 412 (a conflicting commit). The
unreachable Hub is a closed local port.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import re
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from test_trainer import lora_model, make_trainer, pad_collator, tiny_latent_set, token_dataset
from tiny_models import tiny_sae, trainer_args
from transformers import TrainerCallback

from hf_blockem import BlockEMConfig, BlockEMTrainer, LatentSet
from hf_blockem.hub_cli import main as push_main
from hf_blockem.hub_cli import make_parser
from hf_blockem.push import push_command
from hf_blockem.run_files import (
    BLOCKEM_CONFIG_NAME,
    LATENT_SET_PATH_IN_REPO,
    LatentSetProvenance,
    check_strict_latent_set,
)

# ---- FAKE at the network edge: a local server that answers like the Hub ------------------------------------------


COMMIT_OID = "c" * 40


class FakeHub:
    def __init__(self, fail_commits_with: int | None = None, preupload_gate: threading.Event | None = None):
        self.fail_commits_with = fail_commits_with
        self.preupload_gate = preupload_gate  # when set, uploads wait for it: a slow Hub while training goes on
        self.commits: list[dict] = []  # {"repo_id", "revision", "message", "files": {path: bytes}}
        self.repos: list[dict] = []
        self.branches: list[tuple[str, str]] = []
        self.requests: list[tuple[str, str]] = []
        self.validated: list[dict] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep pytest output clean
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    chunks = []
                    while True:
                        size = int(self.rfile.readline().strip(), 16)
                        if size == 0:
                            self.rfile.readline()
                            return b"".join(chunks)
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _send(self, status: int, payload) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                hub.requests.append(("GET", self.path))
                self._send(404, {"error": "Repository not found"})

            def do_POST(self):
                hub.requests.append(("POST", self.path))
                body = self._body()
                path = self.path.split("?")[0]
                if path == "/api/repos/create":
                    payload = json.loads(body)
                    repo_id = f"{payload.get('organization') or 'user'}/{payload['name']}"
                    hub.repos.append({"repo_id": repo_id, **payload})
                    return self._send(200, {"url": f"{hub.endpoint}/{repo_id}", "name": repo_id})
                if match := re.fullmatch(r"/api/models/([^/]+/[^/]+)/branch/(.+)", path):
                    hub.branches.append((match.group(1), match.group(2)))
                    return self._send(200, {})
                if path == "/api/validate-yaml":  # the client asks the Hub to validate README.md's metadata
                    hub.validated.append(json.loads(body))
                    return self._send(200, {"errors": [], "warnings": []})
                if re.fullmatch(r"/api/models/[^/]+/[^/]+/preupload/.+", path):
                    if hub.preupload_gate is not None:
                        hub.preupload_gate.wait(timeout=60)
                    files = json.loads(body)["files"]
                    modes = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]
                    return self._send(200, {"files": modes, "commitOid": COMMIT_OID})
                if match := re.fullmatch(r"/api/models/([^/]+/[^/]+)/commit/(.+)", path):
                    if hub.fail_commits_with is not None:
                        message = "A commit has happened since. Please refresh and try again."
                        return self._send(hub.fail_commits_with, {"error": message})
                    commit = {"repo_id": match.group(1), "revision": match.group(2), "files": {}}
                    for line in body.decode().splitlines():
                        entry = json.loads(line)
                        if entry["key"] == "header":
                            commit["message"] = entry["value"]["summary"]
                        elif entry["key"] == "file":
                            commit["files"][entry["value"]["path"]] = base64.b64decode(entry["value"]["content"])
                    hub.commits.append(commit)
                    url = f"{hub.endpoint}/{match.group(1)}/commit/{COMMIT_OID}"
                    return self._send(200, {"commitUrl": url, "commitOid": COMMIT_OID, "pullRequestUrl": None})
                self._send(404, {"error": f"fake Hub: no route for {path}"})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FakeHub:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


def use_endpoint(monkeypatch, endpoint: str) -> None:
    """Points the real huggingface_hub (and transformers' shared HfApi) at `endpoint`, online, with a dummy token."""
    import huggingface_hub.constants
    import transformers.utils.hub

    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(transformers.utils.hub, "_hf_api", None)  # rebuilt on first use with the new endpoint
    monkeypatch.setenv("HF_TOKEN", "hf_fake_token_for_tests")


@pytest.fixture
def fake_hub(monkeypatch):
    with FakeHub() as hub:
        use_endpoint(monkeypatch, hub.endpoint)
        yield hub


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]  # closed when the block ends: connections are refused


RUN_FILES = (
    "adapter_model.safetensors",
    "adapter_config.json",
    "README.md",
    BLOCKEM_CONFIG_NAME,
    LATENT_SET_PATH_IN_REPO,
)


def _hub_trainer(tmp_path, **overrides):
    defaults = dict(
        push_to_hub=True,
        hub_model_id="user/blocked-run",
        hub_strategy="every_save",
        save_strategy="steps",
        save_steps=1,
        max_steps=2,
    )
    return make_trainer(tmp_path, lora_model(), **{**defaults, **overrides})


def _assert_run_files(folder: Path, latent_set: LatentSet | None = None) -> None:
    for name in RUN_FILES:
        assert (folder / name).is_file(), name
    loaded = LatentSet.from_pretrained(folder / "latent_set")
    if latent_set is not None:
        assert [layer.plus for layer in loaded.layers] == [layer.plus for layer in latent_set.layers]
    config = json.loads((folder / BLOCKEM_CONFIG_NAME).read_text())
    assert config["block_lambda"] == 1.0 and config["latent_set"]["layers"][0]["minus"] == [7, 12]
    readme = (folder / "README.md").read_text()
    assert "blockem" in readme and "## What BLOCK-EM did here" in readme  # ours, not PEFT's or the Trainer's card


# ---- output_dir and one-commit pushes -------------------------------------------------------------------------


def test_every_save_uploads_weights_latent_set_config_and_card_in_one_commit(tmp_path, fake_hub):
    trainer = _hub_trainer(tmp_path)
    trainer.train()
    out = Path(trainer.args.output_dir)
    _assert_run_files(out, trainer.latent_set)
    _assert_run_files(out / "checkpoint-2")  # checkpoints are self-contained too
    assert fake_hub.commits, fake_hub.requests
    for commit in fake_hub.commits:
        assert commit["repo_id"] == "user/blocked-run"
        assert set(RUN_FILES) <= set(commit["files"])  # never weights without their latent set and card
        assert not any(path.startswith(("checkpoint-", "_")) for path in commit["files"])
        card = commit["files"]["README.md"].decode()
        assert card.startswith("---\n") and "library_name: peft" in card
    assert fake_hub.validated  # the client had the (fake) Hub validate the card's YAML before committing
    assert trainer.blockem_push_failures == []

    # The Trainer's own end-of-training push: one commit, with the card regenerated after PEFT's adapter save.
    commits_before = len(fake_hub.commits)
    trainer.push_to_hub(evaluations=[{"model": "after", "em_rate": 0.02, "em_rate_ci": [0.01, 0.04], "judge": "j"}])
    assert len(fake_hub.commits) == commits_before + 1
    final = fake_hub.commits[-1]["files"]
    assert set(RUN_FILES) <= set(final)
    assert "em_rate" in final["README.md"].decode() and "2.0%" in final["README.md"].decode()
    # evaluations given once stay in later cards
    trainer.save_model()
    assert "2.0%" in (out / "README.md").read_text()


def test_slow_upload_commits_the_card_and_latent_set_of_the_weights_it_carries(tmp_path, monkeypatch):
    # The step-1 upload is still waiting on the Hub while steps 2 and 3 save, and step 2 blocks more latents. The
    # Trainer skips those pushes and leaves the weights in output_dir alone; the run files there must stay those of
    # step 1 too, or the one commit would pair step-1 weights with the step-3 latent set and card.
    gate = threading.Event()

    class BlockMoreThenReleaseTheHub(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 2:
                trainer.add_blocked_latents(tiny_sae(seed=3), plus=[2, 4], minus=[6], layer=0)

        def on_save(self, args, state, control, **kwargs):
            if state.global_step == args.max_steps:
                gate.set()

    with FakeHub(preupload_gate=gate) as hub:
        use_endpoint(monkeypatch, hub.endpoint)
        trainer = _hub_trainer(tmp_path, max_steps=3, base_activations="adapter")
        trainer.add_callback(BlockMoreThenReleaseTheHub())
        trainer.train()
    out = Path(trainer.args.output_dir)
    assert [commit["message"] for commit in hub.commits] == ["Training in progress, step 1"]
    committed = hub.commits[0]["files"]
    step1, step3 = out / "checkpoint-1", out / "checkpoint-3"
    assert committed["adapter_model.safetensors"] == (step1 / "adapter_model.safetensors").read_bytes()
    for name in ("README.md", LATENT_SET_PATH_IN_REPO):
        assert (step1 / name).read_bytes() != (step3 / name).read_bytes(), name  # step 2 changed them
    for name in ("README.md", BLOCKEM_CONFIG_NAME, LATENT_SET_PATH_IN_REPO):
        assert committed[name] == (step1 / name).read_bytes(), name
    # output_dir catches up with the next save.
    trainer.save_model()
    assert (out / LATENT_SET_PATH_IN_REPO).read_bytes() == (step3 / LATENT_SET_PATH_IN_REPO).read_bytes()


def test_failed_push_after_training_without_blocking_is_recorded_when_it_ends(tmp_path, monkeypatch, caplog):
    with FakeHub(fail_commits_with=412) as hub:
        use_endpoint(monkeypatch, hub.endpoint)
        trainer = _hub_trainer(tmp_path, hub_strategy="end", save_strategy="no")
        trainer.train()
        with caplog.at_level(logging.WARNING, logger="hf_blockem"):
            job = trainer.push_to_hub(blocking=False)
            assert "412" in str(job.exception(timeout=60))
            deadline = time.monotonic() + 10  # the record is written by the upload's thread, just after the future
            while not trainer.blockem_push_failures and time.monotonic() < deadline:
                time.sleep(0.05)
    assert [failure.what for failure in trainer.blockem_push_failures] == ["push_to_hub"]
    assert f"blockem push {trainer.args.output_dir} --repo-id user/blocked-run" in caplog.text


@pytest.mark.parametrize(
    "status",
    # 412: a concurrent commit moved the branch. 503: the Hub is down; the client retries each commit with
    # backoff (about 45 s in all here) before it gives up, hence slow.
    [412, pytest.param(503, marks=pytest.mark.slow)],
    ids=["conflict", "server_error"],
)
def test_failing_commit_does_not_stop_training_and_is_reported(tmp_path, monkeypatch, caplog, status):
    with FakeHub(fail_commits_with=status) as hub:
        use_endpoint(monkeypatch, hub.endpoint)
        trainer = _hub_trainer(tmp_path, max_steps=3)
        with caplog.at_level(logging.WARNING, logger="hf_blockem"):
            trainer.train()
            assert trainer.push_to_hub() is None  # recorded, not raised
    assert trainer.state.global_step == 3
    _assert_run_files(Path(trainer.args.output_dir), trainer.latent_set)
    failures = trainer.blockem_push_failures
    assert any(f.what.startswith("checkpoint push") for f in failures) and failures[-1].what == "push_to_hub"
    assert all(str(status) in f.error for f in failures)
    command = f"blockem push {trainer.args.output_dir} --repo-id user/blocked-run"
    assert failures[0].command == command
    assert command in caplog.text and "failed during this run" in caplog.text


def test_unreachable_hub_leaves_training_and_files_intact_and_is_reported(tmp_path, monkeypatch, caplog):
    # Connection refused: creating the repo fails at once; the checkpoint upload fails in the background while
    # training goes on (the client's first request, YAML validation of the card, is not retried).
    use_endpoint(monkeypatch, f"http://127.0.0.1:{_closed_port()}")
    with caplog.at_level(logging.WARNING, logger="hf_blockem"):
        trainer = _hub_trainer(tmp_path, hub_strategy="every_save")
        trainer.train()
    assert trainer.state.global_step == 2
    out = Path(trainer.args.output_dir)
    _assert_run_files(out, trainer.latent_set)
    whats = [f.what for f in trainer.blockem_push_failures]
    assert whats[0] == "create repo" and any(w.startswith("checkpoint push") for w in whats)
    assert "Connect" in trainer.blockem_push_failures[-1].error
    assert f"blockem push {out} --repo-id user/blocked-run" in caplog.text


# ---- provenance and strict revisions ------------------------------------------------------------------------------


def _hub_cache_with_latent_set(tmp_path, monkeypatch) -> str:
    """A latent set in a Hub-cache layout (as a download leaves it), read offline through the real client."""
    import huggingface_hub.constants

    commit = "b" * 40
    cache = tmp_path / "hub-cache"
    snapshot = cache / "models--org--latents" / "snapshots" / commit
    tiny_latent_set().save_pretrained(snapshot)
    (cache / "models--org--latents" / "refs").mkdir()
    (cache / "models--org--latents" / "refs" / "main").write_text(commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    return commit


def _trainer_from_config(tmp_path, **overrides) -> BlockEMTrainer:
    """A trainer that loads its latent set from `args.latent_set` (a Hub repo id), as a script does."""
    config = trainer_args(tmp_path, save_strategy="steps", save_steps=1, latent_set="org/latents", **overrides)
    return BlockEMTrainer(
        model=lora_model(), args=BlockEMConfig(**config), train_dataset=token_dataset(), data_collator=pad_collator
    )


def test_resolved_commit_recorded_in_trainer_state_output_dir_and_card_and_survives_resume(
    tmp_path, monkeypatch, caplog
):
    commit = _hub_cache_with_latent_set(tmp_path, monkeypatch)
    trainer = _trainer_from_config(tmp_path, latent_set_revision=commit, latent_set_strict=True)
    trainer.train()
    out = Path(trainer.args.output_dir)
    state = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["stateful_callbacks"]["LatentSetProvenance"]["args"]["resolved_commit"] == commit
    config = json.loads((out / BLOCKEM_CONFIG_NAME).read_text())["latent_set"]
    assert config["reference"] == f"org/latents@{commit}" and config["strict"] is True
    card = (out / "README.md").read_text()
    assert f"org/latents@{commit}" in card and f'revision="{commit}", strict=True' in card
    saved = LatentSet.from_pretrained(str(out / "latent_set"))  # the copy in the run folder (and its Hub repo)
    assert saved.metadata["loaded_from"] == {"reference": f"org/latents@{commit}", "resolved_commit": commit}
    assert torch.equal(saved.layers[0].W_enc, trainer.latent_set.layers[0].W_enc)

    # Resume: the provenance callback is restored from the checkpoint, with no "unknown callback" warning.
    resumed = _trainer_from_config(tmp_path, max_steps=3, latent_set_revision=commit, latent_set_strict=True)
    with caplog.at_level(logging.WARNING):
        resumed.train(resume_from_checkpoint=str(out / "checkpoint-2"))
    assert "not included in current configuration" not in caplog.text
    assert "this run blocks" not in caplog.text  # same set as the checkpoint
    state = json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())
    assert state["stateful_callbacks"]["LatentSetProvenance"]["args"]["resolved_commit"] == commit


def test_strict_mode_refuses_unpinned_latent_sets(tmp_path, monkeypatch):
    _hub_cache_with_latent_set(tmp_path, monkeypatch)
    with pytest.raises(ValueError, match="40-hex commit"):
        _trainer_from_config(tmp_path, latent_set_revision="main", latent_set_strict=True)
    with pytest.raises(ValueError, match="built in memory"):
        make_trainer(tmp_path, lora_model(), latent_set_strict=True)
    # An object passes only if it was itself loaded strictly: strict mode is not bypassed by loading it first.
    loose = LatentSet.from_pretrained("org/latents", revision="main")
    with pytest.raises(ValueError, match="'org/latents' loaded without it"):
        make_trainer(tmp_path, lora_model(), latent_set=loose, latent_set_strict=True)
    pinned = LatentSet.from_pretrained("org/latents", revision="b" * 40, strict=True)
    assert make_trainer(tmp_path, lora_model(), latent_set=pinned, latent_set_strict=True).latent_set is pinned
    # Not strict: a branch is fine, and the commit it resolved to is still recorded.
    trainer = _trainer_from_config(tmp_path)
    assert trainer._blockem_config["latent_set"]["resolved_commit"] == "b" * 40
    check_strict_latent_set(str(tmp_path), None, strict=True)  # local folders: the checksum is checked on load


def test_provenance_callback_state_round_trips():
    callback = LatentSetProvenance("org/latents@" + "b" * 40, "org/latents", "main", "b" * 40)
    restored = LatentSetProvenance(**callback.state()["args"])
    assert restored.state() == callback.state()


# ---- blockem push -----------------------------------------------------------------------------------------------


def _finished_run(tmp_path) -> Path:
    trainer = make_trainer(tmp_path, lora_model(), save_strategy="steps", save_steps=2, max_steps=2)
    trainer.train()
    trainer.save_model()
    (Path(trainer.args.output_dir) / "_private_cache").mkdir()
    return Path(trainer.args.output_dir)


def test_blockem_push_uploads_a_finished_run_in_one_commit(tmp_path, fake_hub, capsys):
    out = _finished_run(tmp_path)
    assert push_main([str(out), "--repo-id", "user/run", "--private", "--revision", "dev"]) == 0
    assert fake_hub.repos[-1]["repo_id"] == "user/run" and fake_hub.repos[-1].get("visibility") == "private"
    assert fake_hub.branches == [("user/run", "dev")]
    (commit,) = fake_hub.commits
    assert commit["revision"] == "dev" and set(RUN_FILES) <= set(commit["files"])
    assert not any(p.startswith(("checkpoint-", "_")) for p in commit["files"])
    assert commit["files"][LATENT_SET_PATH_IN_REPO] == (out / LATENT_SET_PATH_IN_REPO).read_bytes()
    assert "Pushed" in capsys.readouterr().out


def test_blockem_push_failure_exits_1_and_keeps_files(tmp_path, monkeypatch, capsys):
    out = _finished_run(tmp_path)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with FakeHub(fail_commits_with=412) as hub:
        use_endpoint(monkeypatch, hub.endpoint)
        assert push_main([str(out), "--repo-id", "user/run"]) == 1
    assert "412" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert push_main([str(tmp_path / "missing"), "--repo-id", "user/run"]) == 1
    assert push_main([str(out), "--repo-id", "user/run", "--revision", "a" * 40]) == 1  # a commit is no branch


def test_push_command_is_what_the_cli_parses(tmp_path):
    command = push_command(tmp_path / "my run", "user/run", private=True, revision="dev")
    import shlex

    argv = shlex.split(command)
    assert argv[:2] == ["blockem", "push"]
    args, extra = make_parser().parse_args_into_dataclasses(args=argv[2:])
    assert (extra.output_dir, args.repo_id, args.private, args.revision) == (
        str(tmp_path / "my run"),
        "user/run",
        True,
        "dev",
    )


# ---- the real Hub (opt-in) ------------------------------------------------------------------------------------


@pytest.mark.skipif(
    not (os.environ.get("HF_TOKEN") and os.environ.get("BLOCKEM_HUB_TESTS") == "1"),
    reason="pushes to the real Hub: set HF_TOKEN and BLOCKEM_HUB_TESTS=1",
)
def test_real_hub_push_and_pull_latent_set(tmp_path, monkeypatch):
    import uuid

    import huggingface_hub.constants
    from huggingface_hub import HfApi

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    api = HfApi()
    repo_id = f"{api.whoami()['name']}/blockem-test-{uuid.uuid4().hex[:8]}"
    latent_set = tiny_latent_set()
    try:
        latent_set.push_to_hub(repo_id, private=True)
        commit = api.list_repo_commits(repo_id)[0].commit_id
        loaded = LatentSet.from_pretrained(repo_id, revision=commit, strict=True, cache_dir=tmp_path)
        assert loaded.resolved_commit == commit and loaded.layers[0].plus == latent_set.layers[0].plus
        assert (
            "BLOCK-EM latent set" in (Path(api.hf_hub_download(repo_id, "README.md", cache_dir=tmp_path))).read_text()
        )
    finally:
        api.delete_repo(repo_id, missing_ok=True)
