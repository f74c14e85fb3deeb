"""LatentSet: exact encoding against real SAELens SAEs, construction, multi-layer sets, Hub round trips."""

import json
import os

import pytest
import torch
from sae_lens import JumpReLUSAE, JumpReLUSAEConfig, StandardSAE, StandardSAEConfig, TopKSAE, TopKSAEConfig
from safetensors import safe_open
from transformers import LlamaConfig

from hf_blockem.blocked_layer import BlockedLayer, hook_name_for_layer, layer_from_hook_name
from hf_blockem.latent_set import (
    LATENT_SET_FILENAME,
    METADATA_KEY,
    LatentSet,
    LatentSetFormatError,
)

D_IN, D_SAE = 32, 128
PLUS, MINUS = [3, 77, 5, 120], [9, 64]


def make_sae(architecture="standard", *, apply_b_dec_to_input=True, normalize="none", hook="blocks.2.hook_resid_post"):
    torch.manual_seed(0)
    kwargs = {"d_in": D_IN, "d_sae": D_SAE, "apply_b_dec_to_input": apply_b_dec_to_input}
    kwargs["normalize_activations"] = normalize
    if architecture == "standard":
        sae = StandardSAE(StandardSAEConfig(**kwargs))
    elif architecture == "jumprelu":
        sae = JumpReLUSAE(JumpReLUSAEConfig(**kwargs))
    else:
        sae = TopKSAE(TopKSAEConfig(k=8, **kwargs))
    sae.cfg.metadata.hook_name = hook
    with torch.no_grad():
        # Non-trivial biases so that b_dec subtraction and b_enc both matter; scale keeps ~half the latents active.
        sae.W_enc.normal_(0, D_IN**-0.5)
        sae.W_dec.normal_(0, 0.1)
        sae.b_enc.normal_(0, 0.5)
        sae.b_dec.normal_(0, 1.0)
        if architecture == "jumprelu":
            sae.threshold.uniform_(0.0, 1.5)
    return sae


def inputs(dtype=torch.float32):
    generator = torch.Generator().manual_seed(1)
    return (torch.randn(4, 16, D_IN, generator=generator) * 2 + 0.5).to(dtype)


def test_hook_names():
    assert hook_name_for_layer(12) == "blocks.12.hook_resid_post"
    assert layer_from_hook_name("blocks.12.hook_resid_post") == 12
    # resid_pre of layer L is the output of layer L-1
    assert layer_from_hook_name("blocks.12.hook_resid_pre") == 11
    with pytest.raises(ValueError, match="embedding output"):
        layer_from_hook_name("blocks.0.hook_resid_pre")
    for name in ["blocks.3.hook_mlp_out", "blocks.3.attn.hook_z", "model.layers.3", "blocks.x.hook_resid_post"]:
        with pytest.raises(ValueError, match="residual-stream hook"):
            layer_from_hook_name(name)


@pytest.mark.parametrize("architecture", ["standard", "jumprelu"])
@pytest.mark.parametrize("apply_b_dec_to_input", [True, False])
@pytest.mark.parametrize("normalize", ["none", "constant_norm_rescale", "layer_norm"])
def test_from_sae_encode_equals_full_sae(architecture, apply_b_dec_to_input, normalize):
    sae = make_sae(architecture, apply_b_dec_to_input=apply_b_dec_to_input, normalize=normalize)
    blocked = LatentSet.from_sae(sae, plus=PLUS, minus=MINUS, base_model="tiny").layers[0]
    x = inputs()
    z = blocked.encode(x)
    with torch.no_grad():
        expected = sae.encode(x)[..., PLUS + MINUS]
    assert z.dtype == torch.float32 and z.shape == (4, 16, len(PLUS + MINUS))
    # Same operations in the same order as SAELens. The product over the chosen columns may sum in another order than
    # over all of them (bit-identical on Intel Xeon's kernels, a few fp32 ulps apart on AMD EPYC's).
    torch.testing.assert_close(z, expected, rtol=1e-6, atol=1e-6)
    assert 0.2 < (z > 0).float().mean() < 0.9, "the test must exercise both active and inactive latents"
    if architecture == "jumprelu":
        # Some latents have a positive pre-activation but are gated off by their threshold.
        with torch.no_grad():
            pre = sae.process_sae_in(x) @ sae.W_enc[:, PLUS + MINUS] + sae.b_enc[PLUS + MINUS]
        gated = (pre > 0) & (pre <= sae.threshold[PLUS + MINUS])
        assert gated.sum() >= 10 and (z[gated] == 0).all()


def test_encode_half_precision_input_and_gradient():
    sae = make_sae("jumprelu")
    blocked = LatentSet.from_sae(sae, plus=PLUS, minus=MINUS, base_model="tiny").layers[0]
    x = inputs(torch.bfloat16)
    z = blocked.encode(x)
    assert z.dtype == torch.float32
    with torch.no_grad():
        # SAELens also casts the input to fp32 first (up to the column-product rounding above).
        torch.testing.assert_close(z, sae.encode(x)[..., PLUS + MINUS], rtol=1e-6, atol=1e-6)
    # The penalty back-propagates through encode into the activations.
    x = inputs().requires_grad_()
    blocked.encode(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    # Parameters are cached per device, not copied per call.
    assert len(blocked._device_cache) == 1
    blocked.encode(inputs())
    assert len(blocked._device_cache) == 1


def test_from_sae_contents_and_provenance():
    sae = make_sae("jumprelu", hook="blocks.3.hook_resid_pre")
    delta = torch.arange(6, dtype=torch.float32)
    latent_set = LatentSet.from_sae(
        sae,
        plus=PLUS,
        minus=MINUS,
        base_model="org/model",
        base_model_revision="abc",
        sae_release="release",
        sae_id="layer_3",
        sae_commit="c" * 40,
        statistics={"delta": delta},
    )
    blocked = latent_set.layers[0]
    assert blocked.layer == 2 and blocked.hook_name == "blocks.2.hook_resid_post"  # resid_pre of 3 == output of 2
    assert blocked.latent_ids == PLUS + MINUS and blocked.n_latents == 6 and blocked.d_in == D_IN
    assert torch.equal(blocked.signs, torch.tensor([1.0, 1, 1, 1, -1, -1]))
    assert torch.equal(blocked.W_enc, sae.W_enc[:, PLUS + MINUS].detach())
    assert torch.equal(blocked.W_dec, sae.W_dec[PLUS + MINUS].detach())
    assert torch.equal(blocked.threshold, sae.threshold[PLUS + MINUS].detach())
    assert torch.equal(blocked.statistics["delta"], delta)
    assert blocked.sae == {
        "release": "release",
        "sae_id": "layer_3",
        "commit": "c" * 40,
        "d_sae": D_SAE,
        "architecture": "jumprelu",
        "hook_name": "blocks.3.hook_resid_pre",
        "dtype": "float32",
    }
    # The set owns copies: later changes to the SAE do not leak into it.
    before = blocked.b_dec.clone()
    with torch.no_grad():
        sae.b_dec.add_(1.0)
    assert torch.equal(blocked.b_dec, before)
    assert latent_set.base_model_revision == "abc" and latent_set.d_in == D_IN and latent_set.n_latents == 6


def test_from_sae_refusals():
    with pytest.raises(ValueError, match="TopK"):
        LatentSet.from_sae(make_sae("topk"), plus=[1], base_model="tiny")
    with pytest.raises(ValueError, match="residual-stream hook"):
        LatentSet.from_sae(make_sae(hook="blocks.2.hook_mlp_out"), plus=[1], base_model="tiny")
    with pytest.raises(ValueError, match="disagrees"):
        LatentSet.from_sae(make_sae(), plus=[1], layer=5, base_model="tiny")
    with pytest.raises(ValueError, match="pass `layer=`"):
        LatentSet.from_sae(make_sae(hook=None), plus=[1], base_model="tiny")
    assert LatentSet.from_sae(make_sae(hook=None), plus=[1], layer=4, base_model="tiny").layer_indices == [4]
    with pytest.raises(ValueError, match=r"latent ids in \[0, 128\)"):
        LatentSet.from_sae(make_sae(), plus=[1, 128], base_model="tiny")
    with pytest.raises(ValueError, match="both K"):
        LatentSet.from_sae(make_sae(), plus=[1, 2], minus=[2], base_model="tiny")
    with pytest.raises(ValueError, match="at least one latent"):
        LatentSet.from_sae(make_sae(), plus=[], base_model="tiny")
    with pytest.raises(ValueError, match="integer latent ids"):
        LatentSet.from_sae(make_sae(), plus=[1.5], base_model="tiny")
    with pytest.raises(ValueError, match="normalize_activations"):
        LatentSet.from_sae(make_sae(normalize="expected_average_only_in"), plus=[1], base_model="tiny")


BASE = {"base_model": "m", "base_model_revision": "r" * 40}


def multi_layer_set():
    sets = [
        LatentSet.from_sae(make_sae("jumprelu", hook="blocks.3.hook_resid_post"), plus=[1, 2], minus=[3], **BASE),
        LatentSet.from_sae(make_sae("standard", hook="blocks.1.hook_resid_post"), plus=[4], **BASE),
    ]
    sets[0].metadata["selection"] = {"domain": "medical"}
    return LatentSet.concatenate(sets)


def test_concatenate_and_accessors():
    latent_set = multi_layer_set()
    assert latent_set.layer_indices == [1, 3] and latent_set.deepest_layer == 3 and latent_set.n_latents == 4
    assert latent_set.layer(3).minus == [3] and latent_set.metadata == {"selection": {"domain": "medical"}}
    with pytest.raises(KeyError, match=r"blocked layers: \[1, 3\]"):
        latent_set.layer(2)
    assert repr(latent_set) == (
        f"LatentSet(base_model=m@{'r' * 40}, d_in=32, "
        "layers=[L1: |K+|=1 |K-|=0 (standard), L3: |K+|=2 |K-|=1 (jumprelu)])"
    )
    with pytest.raises(ValueError, match="at most once"):
        LatentSet.concatenate([latent_set, latent_set])
    other = LatentSet.from_sae(make_sae(hook="blocks.5.hook_resid_post"), plus=[1], base_model="another")
    with pytest.raises(ValueError, match="one base model"):
        LatentSet.concatenate([latent_set, other])


def test_constructor_validation():
    blocked = make_sae_layer()
    with pytest.raises(ValueError, match="d_in=16"):
        LatentSet([blocked], base_model="m", d_in=16)
    with pytest.raises(ValueError, match="JSON-serialisable"):
        LatentSet([blocked], base_model="m", d_in=D_IN, metadata={"x": torch.zeros(1)})
    with pytest.raises(ValueError, match="non-empty list of BlockedLayer"):
        LatentSet([], base_model="m", d_in=D_IN)
    with pytest.raises(ValueError, match="non-empty Hub id"):
        LatentSet([blocked], base_model="", d_in=D_IN)
    blocked.sae["handle"] = torch.zeros(1)
    with pytest.raises(ValueError, match="`sae` dict to be JSON-serialisable"):
        LatentSet([blocked], base_model="m", d_in=D_IN)


def make_sae_layer() -> BlockedLayer:
    return LatentSet.from_sae(make_sae(), plus=[1], base_model="m").layers[0]


def test_validate_for_model():
    latent_set = multi_layer_set()
    config = LlamaConfig(hidden_size=D_IN, num_hidden_layers=4, num_attention_heads=4, intermediate_size=64)
    latent_set.validate_for_model(config)
    with pytest.raises(ValueError, match=r"d_in=32 .* hidden_size=64"):
        latent_set.validate_for_model(LlamaConfig(hidden_size=64, num_hidden_layers=4, num_attention_heads=4))
    with pytest.raises(ValueError, match=r"blocks layers \[3\], the model has 3 decoder layers"):
        latent_set.validate_for_model(LlamaConfig(hidden_size=D_IN, num_hidden_layers=3, num_attention_heads=4))


def assert_same(a: LatentSet, b: LatentSet):
    assert a.to_dict() == b.to_dict()
    for x, y in zip(a.layers, b.layers, strict=True):
        for name in ("W_enc", "b_enc", "b_dec", "threshold", "W_dec"):
            tx, ty = getattr(x, name), getattr(y, name)
            assert (tx is None and ty is None) or torch.equal(tx, ty), name
        assert x.statistics.keys() == y.statistics.keys()
        assert all(torch.equal(x.statistics[k], y.statistics[k]) for k in x.statistics)
        assert torch.equal(x.encode(inputs()), y.encode(inputs()))


def test_round_trip_single_layer(tmp_path):
    sae = make_sae("jumprelu", normalize="constant_norm_rescale", apply_b_dec_to_input=False)
    stats = {"delta": torch.linspace(-1, 1, 6), "alpha": torch.ones(6)}
    latent_set = LatentSet.from_sae(
        sae,
        plus=PLUS,
        minus=MINUS,
        base_model="m",
        base_model_revision="r" * 40,
        statistics=stats,
        sae_commit="c" * 40,
    )
    latent_set.save_pretrained(tmp_path)
    # One tensor file and the card; no config.json, nothing pickled.
    assert sorted(os.listdir(tmp_path)) == ["README.md", LATENT_SET_FILENAME]
    card = (tmp_path / "README.md").read_text()
    assert "library_name: hf_blockem" in card and "emergent-misalignment" in card
    with safe_open(tmp_path / LATENT_SET_FILENAME, "pt") as file:
        description = json.loads(file.metadata()[METADATA_KEY])
    assert description["format_version"] == 1 and description["checksum"].startswith("sha256:")
    loaded = LatentSet.from_pretrained(tmp_path, strict=True)
    assert_same(latent_set, loaded)
    assert loaded.source == str(tmp_path) and loaded.resolved_commit is None
    # A direct path to the file works too.
    assert_same(latent_set, LatentSet.from_pretrained(tmp_path / LATENT_SET_FILENAME))


def test_round_trip_multi_layer(tmp_path):
    latent_set = multi_layer_set()
    latent_set.save_pretrained(tmp_path)
    loaded = LatentSet.from_pretrained(tmp_path)
    assert_same(latent_set, loaded)
    assert loaded.layer_indices == [1, 3] and loaded.layer(1).threshold is None


def test_never_unpickles(tmp_path, monkeypatch):
    import pickle

    def refuse(*args, **kwargs):
        raise AssertionError("unpickling attempted")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    latent_set = multi_layer_set()
    latent_set.save_pretrained(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(pickle.dumps({"evil": 1}))
    (tmp_path / "config.json").write_text(json.dumps({"base_model": "injected", "strict": False}))
    loaded = LatentSet.from_pretrained(tmp_path)
    assert loaded.base_model == "m"  # config.json is never read


def _hf_cache(tmp_path, commit: str) -> str:
    snapshot = tmp_path / "models--org--latents" / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (tmp_path / "models--org--latents" / "refs").mkdir()
    (tmp_path / "models--org--latents" / "refs" / "main").write_text(commit)
    return snapshot


def test_load_from_hub_cache_offline(tmp_path):
    commit = "0123456789abcdef0123456789abcdef01234567"
    latent_set = multi_layer_set()
    latent_set.save_pretrained(_hf_cache(tmp_path, commit))
    loaded = LatentSet.from_pretrained("org/latents", cache_dir=tmp_path, local_files_only=True)
    assert_same(latent_set, loaded)
    assert loaded.resolved_commit == commit and loaded.source == "org/latents"
    pinned = LatentSet.from_pretrained(
        "org/latents", revision=commit, cache_dir=tmp_path, local_files_only=True, strict=True
    )
    assert pinned.resolved_commit == commit


def test_hub_repo_without_latent_set(tmp_path):
    snapshot = _hf_cache(tmp_path, "f" * 40)
    (snapshot / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(
        LatentSetFormatError, match="No 'latent_set.safetensors' in repo 'org/latents'.*safetensors only"
    ):
        LatentSet.from_pretrained("org/latents", cache_dir=tmp_path, local_files_only=True)


def test_load_from_a_subfolder_locally_and_from_the_hub_cache(tmp_path):
    # A blocked checkpoint's repo keeps its latent set in `latent_set/` (see hf_blockem.run_files).
    commit = "89abcdef0123456789abcdef0123456789abcdef"
    latent_set = multi_layer_set()
    latent_set.save_pretrained(tmp_path / "run" / "latent_set")
    assert_same(latent_set, LatentSet.from_pretrained(tmp_path / "run", subfolder="latent_set"))
    latent_set.save_pretrained(_hf_cache(tmp_path, commit) / "latent_set")
    loaded = LatentSet.from_pretrained(
        "org/latents", subfolder="latent_set", cache_dir=tmp_path, local_files_only=True
    )
    assert_same(latent_set, loaded)
    assert loaded.resolved_commit == commit
    # Each of these paths holds a valid set, so only the check on `subfolder` stops the load.
    for where in (tmp_path / "elsewhere", tmp_path / "run" / "a" / "b", tmp_path / "run"):
        latent_set.save_pretrained(where)
    for bad in ("../elsewhere", str(tmp_path / "elsewhere"), "a//b", "."):
        with pytest.raises(LatentSetFormatError, match="relative path without '.', '..' or empty parts"):
            LatentSet.from_pretrained(tmp_path / "run", subfolder=bad)
    with pytest.raises(LatentSetFormatError, match="subfolder 'nothing'"):
        LatentSet.from_pretrained(tmp_path / "run", subfolder="nothing")
