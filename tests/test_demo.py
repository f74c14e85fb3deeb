"""`blockem demo --quick` end to end: organism, narrow FT, SAE, selection, blocked and control runs, evaluation."""

import json

import pytest

from hf_blockem.cli import main


def test_demo_quick_end_to_end(tmp_path):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out), "--cache_dir", str(tmp_path / "cache")]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["seed"] == 0 and report["quick"] is True
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


def test_demo_rejects_no_control_draws():
    from hf_blockem.demo import DemoArguments

    with pytest.raises(ValueError, match="n_controls >= 1"):
        DemoArguments(n_controls=0)
