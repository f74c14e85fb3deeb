"""`blockem demo --quick` end to end: organism, narrow FT, SAE, selection, blocked and control runs, evaluation."""

import json

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
    control = {(s["layer"], k) for s in report["random_control_set"] for k in s["plus"] + s["minus"]}
    assert blocked and len(control) == len(blocked) and not blocked & control
    assert any("blockem/penalty" in e for e in report["training_curves"]["blocked"])
    # The ground-truth check scores exactly the blocked and control latents, each ranked among its SAE's latents.
    checked = {(c["layer"], r["latent"]) for c in report["persona_check"] for r in c["blocked"]}
    checked_control = {(c["layer"], r["latent"]) for c in report["persona_check"] for r in c["random_control"]}
    assert checked == blocked and checked_control == control
    for check in report["persona_check"]:
        ranks = [r["rank"] for r in check["blocked"] + check["random_control"]]
        assert len(set(ranks)) == len(ranks) and all(1 <= r <= check["d_sae"] for r in ranks)
        assert abs(check["top"][0]["cosine"]) >= max(abs(r["cosine"]) for r in check["blocked"])
    assert "Ground truth" in (out / "report.md").read_text()
    for name in ("report.md", "rates.png", "training_curves.png", "selection/report.md", "evaluation/result.json"):
        assert (out / name).stat().st_size > 0
    from hf_blockem import LatentSet

    assert LatentSet.from_pretrained(out / "latent_set").layer_indices == [s["layer"] for s in report["latent_set"]]
