"""Fuzzing the SAE loaders: damaged files end in a clear error, never a crash, a hang or a silent load."""

import json
import os
import struct

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from planted import concept
from safetensors.torch import save_file

from saeuron_core.errors import SaeuronError
from saeuron_core.sae.files import load_sae, save_sae
from saeuron_core.sae.library import add_concept
from saeuron_core.sae.model import SAEConfig, TopKSAE

FUZZ = settings(max_examples=int(os.environ.get("SAEURON_FUZZ_EXAMPLES", "150")), deadline=2000, suppress_health_check=[HealthCheck.function_scoped_fixture])


def native_bytes(tmp_path_factory=None) -> bytes:
    torch.manual_seed(0)
    sae = TopKSAE(SAEConfig(d_in=8, n_latents=16, k=2, hook_point="up_blocks.1.attentions.1"))
    add_concept(sae, concept("cat", {range(50): [3]}))
    import tempfile
    from pathlib import Path

    path = Path(tempfile.mkdtemp()) / "s.safetensors"
    save_sae(sae, path)
    return path.read_bytes()


ORIGINAL = native_bytes()
REFERENCE = None


def same_as_original(sae: TopKSAE) -> bool:
    global REFERENCE
    if REFERENCE is None:
        import tempfile
        from pathlib import Path

        p = Path(tempfile.mkdtemp()) / "o.safetensors"
        p.write_bytes(ORIGINAL)
        REFERENCE = load_sae(p)
    return (all(torch.equal(a, b) for a, b in zip(sae.tensors().values(), REFERENCE.tensors().values()))
            and sae.config == REFERENCE.config and sae.concepts == REFERENCE.concepts)


def load_or_error(path) -> None:
    """The loader either refuses with a SaeuronError or returns exactly the original SAE."""
    try:
        sae = load_sae(path)
    except SaeuronError as exc:
        assert str(exc) and "Traceback" not in str(exc)
        return
    assert same_as_original(sae), "a damaged file loaded silently"


@FUZZ
@given(cut=st.integers(min_value=0, max_value=len(ORIGINAL) - 1))
def test_truncated_native_files(tmp_path_factory, cut):
    path = tmp_path_factory.mktemp("t") / "s.safetensors"
    path.write_bytes(ORIGINAL[:cut])
    with pytest.raises(SaeuronError):
        load_sae(path)


@FUZZ
@given(position=st.integers(min_value=0, max_value=len(ORIGINAL) * 8 - 1))
def test_bit_flips_anywhere_in_native_files(tmp_path_factory, position):
    data = bytearray(ORIGINAL)
    data[position // 8] ^= 1 << (position % 8)
    path = tmp_path_factory.mktemp("f") / "s.safetensors"
    path.write_bytes(bytes(data))
    load_or_error(path)


@FUZZ
@given(header=st.binary(max_size=300), length=st.one_of(st.none(), st.integers(0, 2**64 - 1)))
def test_garbage_and_huge_headers(tmp_path_factory, header, length):
    n = len(header) if length is None else length
    path = tmp_path_factory.mktemp("h") / "s.safetensors"
    path.write_bytes(struct.pack("<Q", n) + header + b"\x00" * 16)
    with pytest.raises(SaeuronError):
        load_sae(path)


json_values = st.recursive(st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=True) |
                           st.text(max_size=20), lambda c: st.lists(c, max_size=4) |
                           st.dictionaries(st.text(max_size=8), c, max_size=4), max_leaves=12)


@FUZZ
@given(field=st.sampled_from(["config", "training", "concepts", "saeuron_format"]), value=json_values,
       raw=st.booleans())
def test_metadata_garbage(tmp_path_factory, field, value, raw):
    import tempfile
    from pathlib import Path

    from saeuron_core.sae.files import CORE_TENSORS, content_digest
    from saeuron_core.safetensors_io import load_safetensors

    src = Path(tempfile.mkdtemp()) / "o.safetensors"
    src.write_bytes(ORIGINAL)
    tensors, metadata = load_safetensors(src)
    metadata[field] = str(value)[:200] if raw else json.dumps(value)
    metadata["sha256"] = content_digest(tensors, metadata)  # a well-formed file with bad contents
    path = tmp_path_factory.mktemp("m") / "s.safetensors"
    save_file(tensors, str(path), metadata=metadata)
    try:
        sae = load_sae(path)
    except SaeuronError:
        return
    # Accepted only if the field still describes a usable SAE: check the SAE works end to end.
    assert set(sae.tensors()) == set(CORE_TENSORS) and isinstance(sae.concepts, dict)
    sae(torch.randn(3, sae.d_in))


@FUZZ
@given(dtype=st.sampled_from([torch.int32, torch.int64, torch.uint8, torch.bool]),
       name=st.sampled_from(["encoder.weight", "encoder.bias", "W_dec", "b_dec"]))
def test_wrong_dtype_tensors(tmp_path_factory, dtype, name):
    folder = tmp_path_factory.mktemp("d") / "unet.up_blocks.1.attentions.1"
    folder.mkdir()
    t = {"encoder.weight": torch.randn(16, 8), "encoder.bias": torch.zeros(16), "W_dec": torch.randn(16, 8),
         "b_dec": torch.zeros(8)}
    t[name] = t[name].to(dtype)
    save_file(t, str(folder / "sae.safetensors"))
    (folder / "cfg.json").write_text(json.dumps({"d_in": 8, "num_latents": 16, "k": 2}))
    with pytest.raises(SaeuronError, match="expected a float tensor"):
        load_sae(folder)


@FUZZ
@given(cfg=st.dictionaries(st.sampled_from(["d_in", "num_latents", "k", "expansion_factor", "input_unit_norm",
                                            "d_sae", "architecture", "apply_b_dec_to_input"]), json_values, max_size=6),
       lens=st.booleans(), shape=st.tuples(st.integers(1, 20), st.integers(1, 20)))
def test_imported_folders_with_garbage_cfg_and_shapes(tmp_path_factory, cfg, lens, shape):
    folder = tmp_path_factory.mktemp("i") / "sae"
    folder.mkdir()
    n, d = shape
    if lens:
        save_file({"W_enc": torch.randn(d, n), "b_enc": torch.zeros(n), "W_dec": torch.randn(n, d),
                   "b_dec": torch.zeros(d)}, str(folder / "sae_weights.safetensors"))
    else:
        save_file({"encoder.weight": torch.randn(n, d), "encoder.bias": torch.zeros(n), "W_dec": torch.randn(n, d),
                   "b_dec": torch.zeros(d)}, str(folder / "sae.safetensors"))
    (folder / "cfg.json").write_text(json.dumps(cfg))
    try:
        sae = load_sae(folder)
    except SaeuronError:
        return
    assert (sae.n_latents, sae.d_in) == (n, d)  # accepted only when the cfg really describes the weights
    assert torch.isfinite(sae(torch.randn(2, d))).all()


def test_nan_filled_files_are_refused(tmp_path):
    t = {"encoder.weight": torch.full((16, 8), float("nan")), "encoder.bias": torch.zeros(16),
         "W_dec": torch.randn(16, 8), "b_dec": torch.zeros(8)}
    (tmp_path / "x").mkdir()
    save_file(t, str(tmp_path / "x" / "sae.safetensors"))
    (tmp_path / "x" / "cfg.json").write_text(json.dumps({"d_in": 8, "num_latents": 16, "k": 2}))
    with pytest.raises(SaeuronError, match="NaN"):
        load_sae(tmp_path / "x")
