import json
import os

import torch

from hf_blockem.organism.build import MANIFEST
from hf_blockem.organism.cli import main

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def test_build_command_builds_then_reuses(tmp_path, capsys):
    torch.set_num_threads(min(torch.get_num_threads(), 2))
    out = tmp_path / "organism"
    assert main(["build", "--out", str(out), "--seed", "3", "--quick", "--no_progress"]) == 0
    first = json.loads(capsys.readouterr().out)
    assert first["seed"] == 3 and os.path.isfile(os.path.join(first["base_model_path"], "config.json"))
    assert json.loads((out / MANIFEST).read_text())["seed"] == 3
    assert main(["build", "--out", str(out), "--seed", "3", "--quick", "--no_progress"]) == 0
    assert json.loads(capsys.readouterr().out)["record"] == first["record"]  # reused, not rebuilt


def test_usage_and_unknown_action(capsys):
    assert main([]) == 0
    assert "blockem organism build" in capsys.readouterr().out
    assert main(["train"]) == 2
    assert "unknown action 'train'" in capsys.readouterr().err
