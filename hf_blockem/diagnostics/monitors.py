"""The monitors: statistics of the trained model's probe activations against the base model's (pure functions).

Every monitor is split in two: `probe_sums` returns *sums* over the probe's tokens (so that processes holding
different shards of the probe add theirs up in one collective), and `probe_metrics` turns the summed totals into the
flat `blockem_diag/...` metrics. On one process `probe_metrics(probe_sums(...))` is the direct computation.

Units. Per blocked latent k: mean z_θ,k, mean z_base,k and the share of tokens where s_k (z_θ,k − z_base,k) > 0.
Per blocked layer: `blocked_excess`, Σ_t Σ_k ReLU(s_k (z_θ − z_base))² / Σ_t Σ_k z_base² (the penalty on the probe,
relative to the base scale; 0 while blocking holds). Per monitored layer L with a direction d_L: `direction_drift`,
mean_t ⟨h_θ − h_base, d_L⟩ / ‖d_L‖² (0 at the base model, about 1 at the misaligned model). Per layer with a full SAE:
each latent's drift mean_t (z_θ,k − z_base,k); where d_L is known, its `score` drift_k · ⟨W_dec,k, d_L⟩ / ‖d_L‖² (its
share of `direction_drift`, positive when it pushes towards misalignment), and `unblocked_shift`, the sum of the
scores of the latents that are not blocked.
"""

from __future__ import annotations

from typing import Any

import torch

from ..latent_set import LatentSet

PREFIX = "blockem_diag"
TOKEN_CHUNK = 2048  # probe tokens a full SAE encodes at once: bounds its [rows, d_sae] activations


def probe_sums(
    hidden: dict[int, torch.Tensor],
    base_hidden: dict[int, torch.Tensor],
    *,
    latent_set: LatentSet | None = None,
    saes: dict[int, Any] | None = None,
    directions: dict[int, torch.Tensor] | None = None,
    token_chunk: int = TOKEN_CHUNK,
) -> dict[str, torch.Tensor]:
    """Sums over the probe's tokens of every monitored quantity.

    Args:
        hidden (`dict[int, torch.Tensor]`): `{layer: [n_tokens, d_in]}` activations of the trained model.
        base_hidden (`dict[int, torch.Tensor]`): the base model's, on the same tokens.
        latent_set ([`LatentSet`], *optional*): the blocked latents.
        saes (`dict[int, sae_lens.SAE]`, *optional*): full SAEs per layer, for rerouting among their latents.
        directions (`dict[int, torch.Tensor]`, *optional*): `{layer: [d_in]}` misalignment directions.
        token_chunk (`int`, *optional*, defaults to `TOKEN_CHUNK`): the most tokens a full SAE encodes at once, so
            that its `[tokens, d_sae]` activations never exist for the whole probe.

    Returns:
        `dict[str, torch.Tensor]`: fp32 sums, keyed by quantity; `"n_tokens"` counts the tokens.
    """
    any_layer = next(iter(hidden.values()))
    sums = {"n_tokens": torch.tensor(float(any_layer.shape[0]), device=any_layer.device)}
    for blocked in latent_set.layers if latent_set is not None else []:
        z, z_base = blocked.encode(hidden[blocked.layer]), blocked.encode(base_hidden[blocked.layer])
        signed = (z - z_base) * blocked.signs.to(z.device)
        key = f"blocked/{blocked.layer}"
        sums[f"{key}/z"], sums[f"{key}/z_base"] = z.sum(0), z_base.sum(0)
        sums[f"{key}/over"] = (signed > 0).float().sum(0)
        sums[f"{key}/excess"] = torch.relu(signed).square().sum()
        sums[f"{key}/base_sq"] = z_base.square().sum()
    for layer, sae in (saes or {}).items():
        sums[f"sae/{layer}/drift"] = _sae_drift_sum(sae, hidden[layer], base_hidden[layer], token_chunk).to(
            any_layer.device
        )
    for layer, direction in (directions or {}).items():
        if layer not in hidden:
            continue
        d = direction.to(hidden[layer].device, torch.float32)
        scale = d.dot(d)
        sums[f"direction/{layer}/projection"] = (hidden[layer] @ d).sum() / scale
        sums[f"direction/{layer}/projection_base"] = (base_hidden[layer] @ d).sum() / scale
    return sums


def probe_metrics(
    sums: dict[str, torch.Tensor],
    *,
    latent_set: LatentSet | None = None,
    saes: dict[int, Any] | None = None,
    directions: dict[int, torch.Tensor] | None = None,
    top_k: int = 5,
) -> tuple[dict[str, float], dict[int, dict[str, Any]]]:
    """Flat metrics from summed totals, and per SAE layer the ranked candidates for adaptive re-blocking.

    Returns:
        `(metrics, rerouting)`: `metrics` maps `blockem_diag/...` keys to floats (among them `blocked_excess`, the
        largest over blocked layers, and `path_drift`, the largest `direction_drift` or `unblocked_shift`: drift on
        paths the penalty does not cover); `rerouting[layer]` has `drift` (`[d_sae]`), `score` (`[d_sae]`, by which
        latents are ranked) and `blocked` (the ids blocked at that layer).
    """
    n = float(sums["n_tokens"])
    metrics: dict[str, float] = {f"{PREFIX}/n_tokens": n}
    excess = []
    for blocked in latent_set.layers if latent_set is not None else []:
        key, out = f"blocked/{blocked.layer}", f"{PREFIX}/layer_{blocked.layer}"
        z, z_base, over = (sums[f"{key}/{name}"].tolist() for name in ("z", "z_base", "over"))
        for j, latent in enumerate(blocked.latent_ids):
            metrics[f"{out}/latent_{latent}/z"] = z[j] / n
            metrics[f"{out}/latent_{latent}/z_base"] = z_base[j] / n
            metrics[f"{out}/latent_{latent}/over_base"] = over[j] / n
        base_sq = float(sums[f"{key}/base_sq"])
        relative = float(sums[f"{key}/excess"]) / base_sq if base_sq > 0 else 0.0
        metrics[f"{out}/blocked_excess"] = relative
        metrics[f"{out}/over_base"] = sum(over) / (n * blocked.n_latents)
        excess.append(relative)
    paths = []
    for layer in sorted(directions or {}):
        if f"direction/{layer}/projection" not in sums:
            continue
        projection = float(sums[f"direction/{layer}/projection"]) / n
        projection_base = float(sums[f"direction/{layer}/projection_base"]) / n
        metrics[f"{PREFIX}/layer_{layer}/direction_projection"] = projection
        metrics[f"{PREFIX}/layer_{layer}/direction_projection_base"] = projection_base
        metrics[f"{PREFIX}/layer_{layer}/direction_drift"] = projection - projection_base
        paths.append(projection - projection_base)
    rerouting: dict[int, dict[str, Any]] = {}
    for layer, sae in sorted((saes or {}).items()):
        drift = sums[f"sae/{layer}/drift"].float().cpu() / n
        blocked_ids = _blocked_ids(latent_set, layer)
        direction = (directions or {}).get(layer)
        if direction is not None:
            d = direction.float().cpu()
            alignment = sae.W_dec.detach().float().cpu() @ d / d.dot(d)
            score = drift * alignment
            unblocked = torch.ones_like(score, dtype=torch.bool)
            unblocked[blocked_ids] = False
            shift = float(score[unblocked].sum())
            metrics[f"{PREFIX}/layer_{layer}/unblocked_shift"] = shift
            paths.append(shift)
        else:
            score = drift.abs()
        ranked = score.clone()
        ranked[blocked_ids] = -float("inf")
        order = torch.argsort(ranked, descending=True)[:top_k].tolist()
        for i, latent in enumerate(order):
            metrics[f"{PREFIX}/layer_{layer}/top_{i}/latent"] = float(latent)
            metrics[f"{PREFIX}/layer_{layer}/top_{i}/drift"] = float(drift[latent])
            metrics[f"{PREFIX}/layer_{layer}/top_{i}/score"] = float(score[latent])
        rerouting[layer] = {"drift": drift, "score": score, "blocked": blocked_ids}
    metrics[f"{PREFIX}/blocked_excess"] = max(excess, default=0.0)
    metrics[f"{PREFIX}/path_drift"] = max(paths, default=0.0)
    return metrics, rerouting


def _sae_encode(sae: Any, x: torch.Tensor) -> torch.Tensor:
    params = next(sae.parameters())
    return sae.encode(x.to(params.device, params.dtype)).float()


@torch.no_grad()
def _sae_drift_sum(sae: Any, hidden: torch.Tensor, base_hidden: torch.Tensor, token_chunk: int) -> torch.Tensor:
    """Σ_t (z_θ − z_base) `[d_sae]` (fp32), encoding `token_chunk` tokens at a time (float64 running sum)."""
    if token_chunk < 1:
        raise ValueError(f"Expected token_chunk >= 1, got {token_chunk}.")
    total = None
    for start in range(0, max(hidden.shape[0], 1), token_chunk):  # an empty shard still gives zeros [d_sae]
        rows = slice(start, start + token_chunk)
        drift = (_sae_encode(sae, hidden[rows]) - _sae_encode(sae, base_hidden[rows])).sum(0, dtype=torch.float64)
        total = drift if total is None else total + drift
    return total.float()


def _blocked_ids(latent_set: LatentSet | None, layer: int) -> list[int]:
    if latent_set is None or layer not in latent_set.layer_indices:
        return []
    return latent_set.layer(layer).latent_ids


def pick_additions(
    rerouting: dict[int, dict[str, Any]], top_k: int, budget: int, order: list[int] | None = None
) -> dict[int, tuple[list[int], list[int]]]:
    """The latents adaptive re-blocking adds: per SAE layer the `top_k` best-scored unblocked latents with a positive
    score, at most `budget` in all; a latent whose drift is positive goes to K+, negative to K-.

    Args:
        rerouting (`dict`): from [`probe_metrics`].
        top_k (`int`): the most latents added per layer.
        budget (`int`): the most latents added in all.
        order (`list[int]`, *optional*): the layers to serve first (default: ascending).

    Returns:
        `dict[int, tuple[list[int], list[int]]]`: `{layer: (plus, minus)}`, layers without additions left out.
    """
    additions = {}
    for layer in order if order is not None else sorted(rerouting):
        if budget <= 0:
            break
        info = rerouting[layer]
        score = info["score"].clone()
        score[info["blocked"]] = -float("inf")
        chosen = [k for k in torch.argsort(score, descending=True)[: min(top_k, budget)].tolist() if score[k] > 0]
        chosen = [k for k in chosen if info["drift"][k] != 0]
        if chosen:
            additions[layer] = (
                [k for k in chosen if info["drift"][k] > 0],
                [k for k in chosen if info["drift"][k] < 0],
            )
            budget -= len(chosen)
    return additions
