"""`blockem demo --quick` end to end: organism, narrow FT, SAE, selection, blocked and control runs, evaluation."""

import json
from pathlib import Path

import pytest

from hf_blockem.cli import main


def test_demo_quick_end_to_end(tmp_path):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out), "--cache_dir", str(tmp_path / "cache")]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["seed"] == 0 and report["quick"] is True and report["sae_choice"] == "trial"
    # Quick mode's untrained organism selects nothing, so the demo falls back to the largest shifts and skips the trial
    # (tests/test_selection_trial.py covers the trial).
    assert report["selection_fallback"] is True and report["sae_trials"] == []
    assert set(report["models"]) == {"base", "narrow", "blocked", "random_control"}
    for model in report["models"].values():
        for metric in ("ood_em_rate", "target_rate", "incoherence_rate"):
            rate = model[metric]
            assert 0.0 <= rate["ci"][0] <= rate["value"] <= rate["ci"][1] <= 1.0
    blocked = {(s["layer"], k) for s in report["latent_set"] for k in s["plus"] + s["minus"]}
    draws = [
        {(s["layer"], k) for s in layers for k in s["plus"] + s["minus"]} for layers in report["random_control_sets"]
    ]
    assert blocked and len(draws) == 3  # the default --n_controls
    assert all(len(control) == len(blocked) and not blocked & control for control in draws)
    # No control latent comes from Stage 1's candidate pool (the latents flagged by their shift).
    candidates = {(s["layer"], k) for s in report["latent_set"] for k in s["candidates"]}
    assert blocked <= candidates and not any(control & candidates for control in draws)
    assert any("blockem/penalty" in e for e in report["training_curves"]["blocked"])
    # The control's rates pool the answers of its draws: counts and sizes add up exactly.
    assert len(report["random_control_draws"]) == 3 == len(report["relative_reduction"]["random_control_draws"])
    for metric in ("ood_em_rate", "target_rate", "incoherence_rate"):
        pooled = report["models"]["random_control"][metric]
        assert pooled["n"] == sum(d[metric]["n"] for d in report["random_control_draws"])
        assert pooled["count"] == sum(d[metric]["count"] for d in report["random_control_draws"])
    # The ground-truth check scores exactly the blocked and control latents, each ranked among its SAE's latents.
    checked = {(c["layer"], r["latent"]) for c in report["persona_check"] for r in c["blocked"]}
    assert checked == blocked
    for draw, control in enumerate(draws, start=1):
        rows = [(c["layer"], r) for c in report["persona_check"] for r in c["random_control"] if r["draw"] == draw]
        assert {(layer, r["latent"]) for layer, r in rows} == control
    for check in report["persona_check"]:
        ranks = [r["rank"] for r in check["blocked"] + [r for r in check["random_control"] if r["draw"] == 1]]
        assert len(set(ranks)) == len(ranks) and all(1 <= r <= check["d_sae"] for r in ranks)
        assert abs(check["top"][0]["cosine"]) >= max(abs(r["cosine"]) for r in check["blocked"])
    assert "Ground truth" in (out / "report.md").read_text()
    names = ("report.md", "rates.png", "training_curves.png", "selection/report.md", "evaluation/result.json")
    for name in (*names, "evaluation/in_domain_random_control_3.jsonl"):
        assert (out / name).stat().st_size > 0
    from hf_blockem import LatentSet

    assert LatentSet.from_pretrained(out / "latent_set").layer_indices == [s["layer"] for s in report["latent_set"]]


def test_demo_rejects_bad_arguments():
    from hf_blockem.demo import DemoArguments

    with pytest.raises(ValueError, match="n_controls >= 1"):
        DemoArguments(n_controls=0)
    with pytest.raises(ValueError, match="trial or repair, got 'best'"):
        DemoArguments(sae_choice="best")


def test_demo_trial_keeps_the_winners_run_as_the_blocked_model(tmp_path):
    """The demo's SAE trial with real blocked fine-tunes (quick organism and SAEs): one run per alternative, and the
    winner's adapter is the one in `blocked/`."""
    from hf_blockem.demo import DemoArguments, _Chosen, _quick, _sae_trial, _train_saes
    from hf_blockem.latent_set import LatentSet
    from hf_blockem.organism import build_organism
    from hf_blockem.selection import SelectionResult

    args = DemoArguments(quick=True, out=str(tmp_path / "demo"))
    sizes = _quick(args)
    organism = build_organism(tmp_path / "organism", seed=0, quick=True, progress=False)
    dataset = organism.narrow_dataset("finance", misaligned=True, n=sizes["n_train"], seed=0)
    ((name, (sae, layer)),) = _train_saes(organism, sizes, seed=0).items()
    alternatives = [
        SelectionResult(
            latent_set=LatentSet.from_sae(sae, plus=plus, minus=minus, base_model=organism.base_model_path),
            layers=[_Chosen(f"{name}_{i}", layer, plus, minus, plus + minus)],
        )
        for i, (plus, minus) in enumerate([([0, 1], [2]), ([3], [4, 5])])
    ]
    out = Path(args.out)
    selection, trials, trainer = _sae_trial(organism, dataset, alternatives, args, sizes, out)
    assert [t.name for t in trials] == [f"{name}_0", f"{name}_1"]
    kept = max(trials, key=lambda t: t.score)
    assert selection.name == kept.name and trainer.args.output_dir == str(out / "sae_trials" / kept.name)
    assert selection.chosen_by == "trial" and all(a.chosen_by == "group_repair" for a in alternatives)
    assert any("blockem/penalty" in e for e in trainer.state.log_history)
    for trial in trials:
        assert (out / "sae_trials" / trial.name / "adapter_model.safetensors").is_file()
    adapter = "adapter_model.safetensors"
    assert (out / "blocked" / adapter).read_bytes() == (out / "sae_trials" / kept.name / adapter).read_bytes()
