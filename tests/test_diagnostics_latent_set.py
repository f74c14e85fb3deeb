"""What the diagnostics added to the latent set: stored misalignment directions (round trip, crafted bad files) and the
column algebra adaptive re-blocking uses (`BlockedLayer.select` / `extended`)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from hf_blockem.latent_set import LATENT_SET_FILENAME, METADATA_KEY, LatentSet, LatentSetFormatError

D_IN = 8


def sae(d_sae: int = 16, seed: int = 0):
    from sae_lens import StandardSAE, StandardSAEConfig

    torch.manual_seed(seed)
    model = StandardSAE(StandardSAEConfig(d_in=D_IN, d_sae=d_sae, apply_b_dec_to_input=True))
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0, 0.5)
    return model


def with_directions() -> LatentSet:
    part = LatentSet.from_sae(sae(), plus=[1, 4], minus=[9], layer=2, base_model="org/base")
    directions = {2: torch.randn(D_IN), 5: torch.randn(D_IN)}
    return LatentSet(part.layers, base_model="org/base", base_model_revision="v1", d_in=D_IN, directions=directions)


def test_directions_round_trip_and_concatenate(tmp_path):
    latent_set = with_directions()
    latent_set.save_pretrained(tmp_path / "set")
    loaded = LatentSet.from_pretrained(str(tmp_path / "set"), strict=True)  # the checksum covers the directions
    assert sorted(loaded.directions) == [2, 5]
    for layer, vector in latent_set.directions.items():
        assert torch.equal(loaded.directions[layer], vector)
    other = LatentSet.from_sae(sae(seed=1), plus=[3], layer=6, base_model="org/base", base_model_revision="v1")
    merged = LatentSet.concatenate([loaded, other])
    assert merged.layer_indices == [2, 6] and sorted(merged.directions) == [2, 5]


def test_directions_must_fit_the_model():
    from transformers import LlamaConfig

    config = LlamaConfig(hidden_size=D_IN, num_hidden_layers=4, num_attention_heads=2, intermediate_size=16)
    with pytest.raises(ValueError, match=r"layers \[5\]"):
        with_directions().validate_for_model(config)


def _tensors_and_description():
    latent_set = with_directions()
    tensors = latent_set.layer_tensors()
    tensors.update({f"directions.{k}": v for k, v in latent_set.directions.items()})
    return tensors, latent_set.to_dict()


BAD = {
    "fp16": (lambda t: t.update({"directions.2": t["directions.2"].half()}), "torch.float32"),
    "shape": (lambda t: t.update({"directions.2": torch.ones(D_IN + 1)}), "shape"),
    "matrix": (lambda t: t.update({"directions.2": torch.ones(2, D_IN)}), "shape"),
    "nan": (lambda t: t.update({"directions.2": torch.full((D_IN,), float("nan"))}), "finite"),
    "inf": (lambda t: t.update({"directions.5": torch.full((D_IN,), float("inf"))}), "finite"),
    "zero": (lambda t: t.update({"directions.2": torch.zeros(D_IN)}), "not all zero"),
    "name": (lambda t: t.update({"directions.two": torch.ones(D_IN)}), "directions.<layer>"),
    "leading_zero": (lambda t: t.update({"directions.02": torch.ones(D_IN)}), "directions.<layer>"),
    "negative": (lambda t: t.update({"directions.-1": torch.ones(D_IN)}), "directions.<layer>"),
    "int": (lambda t: t.update({"directions.2": torch.ones(D_IN, dtype=torch.int64)}), "torch.float32"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_crafted_bad_directions_are_refused(tmp_path, case):
    mutate, message = BAD[case]
    tensors, description = _tensors_and_description()
    mutate(tensors)
    save_file(tensors, str(tmp_path / LATENT_SET_FILENAME), metadata={METADATA_KEY: json.dumps(description)})
    with pytest.raises(LatentSetFormatError, match=message):
        LatentSet.from_pretrained(str(tmp_path))


def test_select_and_extended_reproduce_the_sae():
    full = sae()
    x = torch.randn(5, D_IN)
    with torch.no_grad():
        z = full.encode(x)
    layer = LatentSet.from_sae(full, plus=[1, 4], minus=[9, 2], layer=2, base_model="org/base").layers[0]
    addition = LatentSet.from_sae(full, plus=[7], minus=[11], layer=2, base_model="org/base").layers[0]
    merged = layer.extended(addition)
    assert merged.plus == [1, 4, 7] and merged.minus == [9, 2, 11]
    torch.testing.assert_close(merged.encode(x), z[:, merged.latent_ids])
    assert merged.signs.tolist() == [1, 1, 1, -1, -1, -1]
    part = merged.select([7], [2])
    torch.testing.assert_close(part.encode(x), z[:, [7, 2]])
    torch.testing.assert_close(part.W_dec, full.W_dec.detach()[[7, 2]])
    with pytest.raises(ValueError, match="not in this layer"):
        merged.select([3])
    other_sae = LatentSet.from_sae(sae(seed=3), plus=[5], layer=2, base_model="org/base").layers[0]
    with pytest.raises(ValueError, match="another SAE"):
        layer.extended(other_sae)
