"""Untrusted latent-set files: every crafted bad file is refused with an error that names its problem."""

import json
import logging
import pickle

import pytest
import torch
from safetensors.torch import load_file, save_file

from hf_blockem.blocked_layer import BlockedLayer
from hf_blockem.latent_set import (
    LATENT_SET_FILENAME,
    MAX_HEADER_BYTES,
    METADATA_KEY,
    LatentSet,
    LatentSetFormatError,
    _checksum,
)

D_IN = 8


def good_set() -> LatentSet:
    """A two-layer set (JumpReLU at layer 2, ReLU at layer 0) built without SAELens, with fixed random values."""
    generator = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=generator)

    jump = BlockedLayer(
        layer=2,
        plus=[4, 1],
        minus=[9],
        W_enc=rand(D_IN, 3),
        b_enc=rand(3),
        b_dec=rand(D_IN),
        threshold=rand(3).abs(),
        apply_b_dec_to_input=True,
        normalize_activations="none",
        architecture="jumprelu",
        hook_name="blocks.2.hook_resid_post",
        W_dec=rand(3, D_IN),
        sae={"d_sae": 16, "release": "r"},
        statistics={"delta": rand(3)},
    )
    relu = BlockedLayer(
        layer=0,
        plus=[3],
        minus=[],
        W_enc=rand(D_IN, 1),
        b_enc=rand(1),
        b_dec=rand(D_IN),
        threshold=None,
        apply_b_dec_to_input=False,
        normalize_activations="layer_norm",
        architecture="standard",
        hook_name="blocks.0.hook_resid_post",
        sae={"d_sae": 16},
    )
    return LatentSet([jump, relu], base_model="org/base", base_model_revision="main", d_in=D_IN, metadata={"k": 1})


def parts():
    latent_set = good_set()
    tensors = latent_set.layer_tensors()
    return tensors, latent_set.to_dict()


def write(tmp_path, tensors, description, *, raw_metadata=None):
    metadata = {METADATA_KEY: json.dumps(description)} if raw_metadata is None else raw_metadata
    save_file(tensors, str(tmp_path / LATENT_SET_FILENAME), metadata=metadata)
    return tmp_path


def jump_layer(description):
    return next(entry for entry in description["layers"] if entry["layer"] == 2)


def set_tensor(name, value):
    def mutate(tensors, description):
        tensors[name] = value(tensors[name]) if callable(value) else value

    return mutate


def set_key(key, value, *, layer=False):
    def mutate(tensors, description):
        target = jump_layer(description) if layer else description
        if value is DELETE:
            del target[key]
        else:
            target[key] = value

    return mutate


DELETE = object()


def drop_tensor(name):
    def mutate(tensors, description):
        del tensors[name]

    return mutate


def ids(plus, minus, dtype=torch.int64):
    def mutate(tensors, description):
        tensors["layers.2.plus"] = torch.tensor(plus, dtype=dtype)
        tensors["layers.2.minus"] = torch.tensor(minus, dtype=dtype)
        n = len(plus) + len(minus)
        for name, shape in [("W_enc", (D_IN, n)), ("b_enc", (n,)), ("threshold", (n,)), ("W_dec", (n, D_IN))]:
            tensors[f"layers.2.{name}"] = torch.ones(shape)
        tensors["layers.2.statistics.delta"] = torch.ones(n)

    return mutate


def with_nan(value):
    def replace(tensor):
        tensor = tensor.clone()
        tensor.view(-1)[1] = value
        return tensor

    return replace


BAD_FILES = {
    # metadata: required keys and versions
    "missing base_model": (set_key("base_model", DELETE), r"missing required metadata keys \['base_model'\]"),
    "missing base revision": (
        set_key("base_model_revision", DELETE),
        r"missing required metadata keys \['base_model_revision'\]",
    ),
    "empty base revision": (set_key("base_model_revision", ""), "non-empty string .* or None when unknown, got ''"),
    "missing format_version": (set_key("format_version", DELETE), "integer format_version >= 1, got None"),
    "newer format_version": (set_key("format_version", 2), "format_version 2 is newer.*upgrade hf_blockem"),
    "missing hook_name": (set_key("hook_name", DELETE, layer=True), r"missing required metadata keys \['hook_name'\]"),
    "missing architecture": (set_key("architecture", DELETE, layer=True), r"keys \['architecture'\]"),
    "missing apply_b_dec": (set_key("apply_b_dec_to_input", DELETE, layer=True), r"keys \['apply_b_dec_to_input'\]"),
    "missing normalization": (set_key("normalize_activations", DELETE, layer=True), r"\['normalize_activations'\]"),
    "missing d_sae": (set_key("sae", {"release": "r"}, layer=True), "'sae' object with an int 'd_sae'"),
    "no layers": (set_key("layers", []), "'layers' to be a non-empty list"),
    "metadata not an object": (set_key("metadata", [1, 2]), "`metadata` to be a dict, got list"),
    "base_model not a string": (set_key("base_model", 3), "`base_model` to be a non-empty Hub id"),
    "apply_b_dec not bool": (set_key("apply_b_dec_to_input", "yes", layer=True), "apply_b_dec_to_input to be a bool"),
    "topk architecture": (
        set_key("architecture", "topk", layer=True),
        "got 'topk'. TopK-style SAEs cannot be blocked",
    ),
    "stateful normalization": (
        set_key("normalize_activations", "expected_average_only_in", layer=True),
        "Fold stateful normalisations",
    ),
    "hook name of another layer": (
        set_key("hook_name", "blocks.5.hook_resid_post", layer=True),
        "expected hook_name 'blocks.2.hook_resid_post', got 'blocks.5.hook_resid_post'",
    ),
    "set d_in disagrees": (set_key("d_in", 16), "W_enc has d_in=8, the set has d_in=16"),
    "standard with threshold": (set_key("architecture", "standard", layer=True), "'standard' SAE needs no threshold"),
    # tensors: presence, dtype, shape, values
    "jumprelu without threshold": (drop_tensor("layers.2.threshold"), "'jumprelu' SAE needs a threshold tensor"),
    "missing b_enc": (drop_tensor("layers.2.b_enc"), "missing tensor 'layers.2.b_enc'"),
    "int W_enc": (set_tensor("layers.2.W_enc", lambda t: t.to(torch.int32)), "'layers.2.W_enc' to be torch.float32"),
    "fp16 b_dec": (set_tensor("layers.2.b_dec", lambda t: t.half()), "'layers.2.b_dec' to be torch.float32"),
    "float latent ids": (ids([4.0, 1.0], [9.0], torch.float32), "1-D latent ids of torch.int64, got torch.float32"),
    "2-D latent ids": (ids([4, 1], [[9]]), r"1-D latent ids of torch.int64, got torch.int64 of shape \[1, 1\]"),
    "W_enc transposed": (set_tensor("layers.2.W_enc", lambda t: t.T.contiguous()), r"W_enc of shape \[3, 3\]"),
    "b_enc wrong shape": (set_tensor("layers.2.b_enc", torch.ones(4)), r"b_enc of shape \[3\].*got \[4\]"),
    "b_dec wrong shape": (set_tensor("layers.2.b_dec", torch.ones(7)), r"b_dec of shape \[8\].*got \[7\]"),
    "threshold wrong shape": (set_tensor("layers.2.threshold", torch.ones(3, 1)), r"threshold of shape \[3\]"),
    "W_dec wrong shape": (set_tensor("layers.2.W_dec", torch.ones(3, 7)), r"W_dec of shape \[3, 8\]"),
    "statistic wrong shape": (set_tensor("layers.2.statistics.delta", torch.ones(2)), r"'delta'\] of shape \[3\]"),
    "NaN in W_enc": (set_tensor("layers.2.W_enc", with_nan(float("nan"))), "W_enc contains NaN or Inf"),
    "Inf in threshold": (set_tensor("layers.2.threshold", with_nan(float("inf"))), "threshold contains NaN or Inf"),
    # latent ids
    "duplicate ids": (ids([4, 4], [9]), r"duplicate latent ids \[4\]"),
    "id >= d_sae": (ids([4, 16], [9]), "latent ids must be < d_sae=16, got 16"),
    "negative id": (ids([4, -1], [9]), r"ints >= 0, got \[-1\]"),
    "id in K+ and K-": (ids([4, 9], [9]), r"latents \[9\] are in both K\+ and K-"),
    "empty K": (ids([], []), "at least one latent in K\\+ or K-"),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_crafted_bad_file_is_refused(tmp_path, case):
    mutate, match = BAD_FILES[case]
    tensors, description = parts()
    mutate(tensors, description)
    write(tmp_path, tensors, description)
    with pytest.raises(LatentSetFormatError, match=match):
        LatentSet.from_pretrained(tmp_path)


def test_crafted_files_start_from_a_good_one(tmp_path):
    tensors, description = parts()
    loaded = LatentSet.from_pretrained(write(tmp_path, tensors, description))
    assert loaded.to_dict() == good_set().to_dict()


def raw_file(tmp_path, data: bytes):
    (tmp_path / LATENT_SET_FILENAME).write_bytes(data)
    return tmp_path


def header(obj) -> bytes:
    text = json.dumps(obj).encode()
    return len(text).to_bytes(8, "little") + text


RAW_FILES = {
    "shorter than 8 bytes": (b"\x01\x02\x03", "too short for a safetensors file"),
    "header over the cap": ((MAX_HEADER_BYTES + 1).to_bytes(8, "little") + b"{}", "exceeds the 1048576-byte cap"),
    "header longer than file": ((100).to_bytes(8, "little") + b"{}", "header size 100 is larger than the file"),
    "header not UTF-8": ((4).to_bytes(8, "little") + b"\xff\xfe\xfd\xfc", "header is not UTF-8"),
    "header not JSON": ((5).to_bytes(8, "little") + b"{abc}", "header is not JSON"),
    "header without our metadata": (header({"__metadata__": {"format": "pt"}}), "not a file written by"),
    "metadata not JSON": (header({"__metadata__": {METADATA_KEY: "{not json"}}), "is not valid JSON"),
    "metadata not an object": (header({"__metadata__": {METADATA_KEY: "[1, 2]"}}), "must be a JSON object, got list"),
    "tensor offsets out of range": (
        header(
            {
                "__metadata__": {METADATA_KEY: json.dumps(parts()[1])},
                "layers.2.b_enc": {"dtype": "F32", "shape": [3], "data_offsets": [0, 1200]},
            }
        )
        + b"\0" * 12,
        "not a valid safetensors file",
    ),
}


@pytest.mark.parametrize("case", list(RAW_FILES))
def test_crafted_raw_bytes_are_refused(tmp_path, case):
    data, match = RAW_FILES[case]
    with pytest.raises(LatentSetFormatError, match=match):
        LatentSet.from_pretrained(raw_file(tmp_path, data))


def test_folder_without_latent_set(tmp_path):
    with pytest.raises(LatentSetFormatError, match="No 'latent_set.safetensors' in folder"):
        LatentSet.from_pretrained(tmp_path)


@pytest.mark.parametrize("name", ["pytorch_model.bin", "latents.pt", "sae.pth", "x.ckpt", "y.pkl", "z.npy", "w.npz"])
def test_pickle_formats_are_refused(tmp_path, name):
    (tmp_path / name).write_bytes(pickle.dumps({"W_enc": [1.0]}))
    with pytest.raises(LatentSetFormatError, match=rf"Found \['{name}'\]: hf_blockem loads safetensors only"):
        LatentSet.from_pretrained(tmp_path)
    with pytest.raises(LatentSetFormatError, match="safetensors only"):
        LatentSet.from_pretrained(tmp_path / name)


@pytest.mark.parametrize(
    "filename", ["../latent_set.safetensors", "sub/latent_set.safetensors", "a\\b.safetensors", "x.bin"]
)
def test_filenames_with_paths_are_refused(tmp_path, filename):
    good_set().save_pretrained(tmp_path / "sub")
    with pytest.raises(LatentSetFormatError, match="without path separators or '..'"):
        LatentSet.from_pretrained(tmp_path / "sub", filename=filename)


@pytest.mark.parametrize("revision", [None, "main", "v1.0", "0123abc", "G" * 40])
def test_strict_needs_a_commit_revision(revision):
    with pytest.raises(LatentSetFormatError, match=f"40-hex commit, got {revision!r}"):
        LatentSet.from_pretrained("org/latents", revision=revision, strict=True, local_files_only=True)


def test_strict_needs_a_checksum(tmp_path):
    tensors, description = parts()  # `to_dict` carries no checksum
    write(tmp_path, tensors, description)
    assert LatentSet.from_pretrained(tmp_path).n_latents == 4
    with pytest.raises(LatentSetFormatError, match="strict=True needs a checksum"):
        LatentSet.from_pretrained(tmp_path, strict=True)


def test_strict_needs_the_base_model_revision(tmp_path):
    unpinned = good_set()
    unpinned.base_model_revision = None  # "unknown": accepted, but not when the user asked for a reviewed set
    unpinned.save_pretrained(tmp_path)
    assert LatentSet.from_pretrained(tmp_path).base_model_revision is None
    with pytest.raises(LatentSetFormatError, match="strict=True needs the revision of the base model"):
        LatentSet.from_pretrained(tmp_path, strict=True)


def saved_parts(tmp_path):
    good_set().save_pretrained(tmp_path)
    path = str(tmp_path / LATENT_SET_FILENAME)
    from safetensors import safe_open

    with safe_open(path, "pt") as file:
        description = json.loads(file.metadata()[METADATA_KEY])
    return load_file(path), description


def test_checksum_mismatch_on_tampered_tensor(tmp_path):
    tensors, description = saved_parts(tmp_path)
    tensors["layers.2.W_enc"][0, 0] += 1e-3  # still a perfectly valid file: only the checksum can tell
    write(tmp_path, tensors, description)
    with pytest.raises(LatentSetFormatError, match="checksum mismatch"):
        LatentSet.from_pretrained(tmp_path)


def test_checksum_mismatch_on_tampered_metadata(tmp_path):
    tensors, description = saved_parts(tmp_path)
    jump_layer(description)["apply_b_dec_to_input"] = False
    write(tmp_path, tensors, description)
    with pytest.raises(LatentSetFormatError, match="checksum mismatch"):
        LatentSet.from_pretrained(tmp_path)


def test_unknown_keys_and_tensors_are_dropped_with_a_warning(tmp_path, caplog):
    tensors, description = saved_parts(tmp_path)
    description.pop("checksum")
    description["future_field"] = 1
    jump_layer(description)["future_layer_field"] = "x"
    tensors["layers.2.future_tensor"] = torch.ones(2)
    # A newer writer computes the checksum over what it wrote, unknown keys included.
    description["checksum"] = _checksum(description, tensors)
    write(tmp_path, tensors, description)
    with caplog.at_level(logging.WARNING, logger="hf_blockem.latent_set"):
        loaded = LatentSet.from_pretrained(tmp_path, strict=True)
    assert loaded.to_dict() == good_set().to_dict()
    messages = " ".join(record.getMessage() for record in caplog.records)
    assert "dropping unknown metadata keys ['future_field']" in messages
    assert "dropping unknown metadata keys ['future_layer_field']" in messages
    assert "ignoring unexpected tensors ['layers.2.future_tensor']" in messages
