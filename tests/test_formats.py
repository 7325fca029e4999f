import json
import struct
from pathlib import Path

import pytest
import torch
from planted import concept
from safetensors.torch import save_file

from saeuron_core.errors import SAEFormatError
from saeuron_core.sae.files import convert, describe, load_sae, save_sae
from saeuron_core.sae.library import add_concept
from saeuron_core.sae.model import SAEConfig, TopKSAE
from saeuron_core.safetensors_io import read_safetensors_header

D, N, K = 12, 48, 5


def random_sae(dtype=torch.float32):
    torch.manual_seed(1)
    sae = TopKSAE(SAEConfig(d_in=D, n_latents=N, k=K, hook_point="up_blocks.1.attentions.1", model_family="sd1"))
    with torch.no_grad():
        sae.encoder.bias.normal_()
        sae.b_dec.normal_()
    sae.training_summary = {"steps": 10, "final": {"fvu": 0.1}}
    add_concept(sae, concept("cat", {range(50): [3, 7]}))
    return sae.to(dtype)


def ref_topk_recon(x, w_enc_nd, b_enc, w_dec, b_dec, k, subtract_b_dec=True):
    """Reference encode/decode straight from the formulas (w_enc_nd is [n, d])."""
    x = x.double()
    pre = torch.relu(((x - b_dec.double()) if subtract_b_dec else x) @ w_enc_nd.double().T + b_enc.double())
    vals, idx = pre.topk(k, dim=-1)
    dense = torch.zeros_like(pre).scatter_(-1, idx, vals)
    return dense @ w_dec.double() + b_dec.double()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_native_round_trip_is_bit_exact(tmp_path, dtype):
    sae = random_sae(dtype)
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save_sae(sae, a)
    loaded = load_sae(a)
    assert loaded.dtype == dtype and loaded.source_format == "native"
    for name, tensor in sae.tensors().items():
        assert torch.equal(loaded.tensors()[name], tensor), name
    assert loaded.config == sae.config
    assert loaded.concepts == sae.concepts and loaded.training_summary == sae.training_summary
    assert loaded.extra_tensors.keys() == sae.extra_tensors.keys()
    assert all(torch.equal(t, sae.extra_tensors[name]) for name, t in loaded.extra_tensors.items())
    save_sae(loaded, b)
    # Same header (tensor layout, offsets, metadata; JSON key order may differ) and same data bytes.
    assert read_safetensors_header(a) == read_safetensors_header(b)
    data_a, data_b = a.read_bytes(), b.read_bytes()
    assert data_a[8 + struct.unpack("<Q", data_a[:8])[0]:] == data_b[8 + struct.unpack("<Q", data_b[:8])[0]:]


def test_load_with_dtype_and_describe(tmp_path):
    path = tmp_path / "s.safetensors"
    save_sae(random_sae(), path)
    assert load_sae(path, dtype=torch.bfloat16).dtype == torch.bfloat16
    info = describe(path)
    assert info["format"] == "native" and (info["d_in"], info["n_latents"], info["k"]) == (D, N, K)
    assert info["hook_point"] == "up_blocks.1.attentions.1" and info["concepts"] == ["cat"]


def write_sparsify(folder, **cfg_over):
    torch.manual_seed(2)
    folder.mkdir(parents=True)
    t = {"encoder.weight": torch.randn(N, D), "encoder.bias": torch.randn(N) * 0.1,
         "W_dec": torch.randn(N, D), "b_dec": torch.randn(D)}
    cfg = {"expansion_factor": N // D, "normalize_decoder": True, "num_latents": 0, "k": K, "batch_topk": True,
           "sample_topk": False, "input_unit_norm": False, "multi_topk": False, "d_in": D, **cfg_over}
    save_file(t, str(folder / "sae.safetensors"))
    (folder / "cfg.json").write_text(json.dumps(cfg))
    return t


def test_sparsify_import_matches_reference(tmp_path):
    folder = tmp_path / "unet.up_blocks.1.attentions.1"
    t = write_sparsify(folder)
    for path in (folder, tmp_path, folder / "sae.safetensors"):  # folder, its parent, or the weights file
        sae = load_sae(path)
        assert sae.source_format == "sparsify" and sae.config.hook_point == "up_blocks.1.attentions.1"
        assert (sae.d_in, sae.n_latents, sae.k) == (D, N, K)
    x = torch.randn(20, D)
    expected = ref_topk_recon(x, t["encoder.weight"], t["encoder.bias"], t["W_dec"], t["b_dec"], K)
    torch.testing.assert_close(sae(x).double(), expected, atol=1e-5, rtol=1e-5)
    # Importing never renormalises the decoder: the file's weights are used as they are.
    assert torch.equal(sae.W_dec, t["W_dec"])


def test_parent_folder_with_several_saes_is_ambiguous(tmp_path):
    write_sparsify(tmp_path / "unet.up_blocks.1.attentions.1")
    write_sparsify(tmp_path / "unet.up_blocks.1.attentions.2")
    with pytest.raises(SAEFormatError, match="several SAEs.*attentions.1.*attentions.2"):
        load_sae(tmp_path)


def test_sparsify_input_unit_norm_refused(tmp_path):
    write_sparsify(tmp_path / "s", input_unit_norm=True)
    with pytest.raises(SAEFormatError, match="input_unit_norm"):
        load_sae(tmp_path / "s")


def write_saelens(folder, apply_b_dec=True, arch="topk"):
    torch.manual_seed(3)
    folder.mkdir(parents=True)
    t = {"W_enc": torch.randn(D, N), "b_enc": torch.randn(N) * 0.1, "W_dec": torch.randn(N, D), "b_dec": torch.randn(D)}
    save_file(t, str(folder / "sae_weights.safetensors"))
    cfg = {"architecture": arch, "d_in": D, "d_sae": N, "k": K, "apply_b_dec_to_input": apply_b_dec,
           "normalize_activations": "none", "hook_name": "up_blocks.1.attentions.2", "dtype": "float32"}
    (folder / "cfg.json").write_text(json.dumps(cfg))
    return t


@pytest.mark.parametrize("apply_b_dec", [True, False])
def test_saelens_import_matches_reference(tmp_path, apply_b_dec):
    t = write_saelens(tmp_path / "lens", apply_b_dec)
    sae = load_sae(tmp_path / "lens")
    assert sae.source_format == "saelens" and sae.config.hook_point == "up_blocks.1.attentions.2"
    x = torch.randn(20, D)
    # SAELens TopK: hidden_pre = (x - b_dec * apply) @ W_enc + b_enc, top-k then ReLU, then @ W_dec + b_dec.
    expected = ref_topk_recon(x, t["W_enc"].T, t["b_enc"], t["W_dec"], t["b_dec"], K, subtract_b_dec=apply_b_dec)
    torch.testing.assert_close(sae(x).double(), expected, atol=1e-4, rtol=1e-4)


def test_saelens_non_topk_refused(tmp_path):
    write_saelens(tmp_path / "lens", arch="jumprelu")
    with pytest.raises(SAEFormatError, match="not a TopK SAE"):
        load_sae(tmp_path / "lens")


def test_convert_folder_to_native(tmp_path):
    t = write_sparsify(tmp_path / "unet.up_blocks.1.attentions.1")
    out = convert(tmp_path, tmp_path / "native.safetensors")
    sae = load_sae(out)
    assert sae.source_format == "native" and sae.config.extra["imported_from"] == "sparsify"
    assert torch.equal(sae.encoder.weight, t["encoder.weight"])


# -- bad inputs -------------------------------------------------------------------------

@pytest.mark.parametrize("suffix", [".pt", ".pth", ".ckpt", ".bin"])
def test_pickle_suffixes_refused_without_reading(tmp_path, suffix):
    path = tmp_path / f"sae{suffix}"
    path.write_bytes(b"\x80\x04not read")
    with pytest.raises(SAEFormatError, match="pickle-based.*never loaded.*safetensors"):
        load_sae(path)


def test_pickle_renamed_to_safetensors_refused(tmp_path):
    path = tmp_path / "evil.safetensors"
    torch.save({"W_dec": torch.zeros(2, 2)}, path)
    with pytest.raises(SAEFormatError, match="pickle/zip.*never unpickled"):
        load_sae(path)


def test_truncated_file(tmp_path):
    path = tmp_path / "s.safetensors"
    save_sae(random_sae(), path)
    data = path.read_bytes()
    for cut in (4, 60, len(data) - 10):
        path.write_bytes(data[:cut])
        with pytest.raises(SAEFormatError, match="truncated"):
            load_sae(path)


def test_garbage_header(tmp_path):
    path = tmp_path / "s.safetensors"
    path.write_bytes(struct.pack("<Q", 5) + b"{nope" + b"\x00" * 8)
    with pytest.raises(SAEFormatError, match="not valid JSON"):
        load_sae(path)


def test_huge_header_claim(tmp_path):
    path = tmp_path / "s.safetensors"
    path.write_bytes(struct.pack("<Q", 10**15) + b"{}")
    with pytest.raises(SAEFormatError, match="header claims"):
        load_sae(path)


def _native_with(tmp_path, tensors, config=None):
    path = tmp_path / "s.safetensors"
    cfg = config or {"d_in": D, "n_latents": N, "k": K}
    save_file(tensors, str(path), metadata={"saeuron_format": "1", "config": json.dumps(cfg)})
    return path


def test_missing_key(tmp_path):
    t = random_sae().tensors()
    del t["b_dec"]
    with pytest.raises(SAEFormatError, match=r"missing tensor\(s\) \['b_dec'\]"):
        load_sae(_native_with(tmp_path, {k: v.contiguous() for k, v in t.items()}))


def test_wrong_shape(tmp_path):
    t = {k: v.contiguous() for k, v in random_sae().tensors().items()}
    t["W_dec"] = torch.zeros(N, D + 1)
    with pytest.raises(SAEFormatError, match=r"'W_dec' has shape \[48, 13\], expected \[48, 12\]"):
        load_sae(_native_with(tmp_path, t))


def test_nan_weights(tmp_path):
    t = {k: v.clone().contiguous() for k, v in random_sae().tensors().items()}
    t["encoder.weight"][0, 0] = float("nan")
    with pytest.raises(SAEFormatError, match="NaN"):
        load_sae(_native_with(tmp_path, t))


def test_bad_config_metadata(tmp_path):
    t = {k: v.contiguous() for k, v in random_sae().tensors().items()}
    with pytest.raises(SAEFormatError, match="k .* must not exceed"):
        load_sae(_native_with(tmp_path, t, {"d_in": D, "n_latents": N, "k": N + 1}))


def test_plain_safetensors_without_metadata(tmp_path):
    path = tmp_path / "other.safetensors"
    save_file({"x": torch.zeros(2)}, str(path))
    with pytest.raises(SAEFormatError, match="without saeuron metadata"):
        load_sae(path)


def test_missing_path_and_unknown_folder(tmp_path):
    with pytest.raises(SAEFormatError, match="no such file"):
        load_sae(tmp_path / "nope.safetensors")
    with pytest.raises(SAEFormatError, match="not an SAE folder"):
        load_sae(tmp_path)


def test_header_length_starting_with_0x80_is_not_mistaken_for_a_pickle(tmp_path):
    sae = random_sae()
    for pad in range(0, 600, 7):  # vary the metadata so the header length takes many values
        sae.training_summary = {"note": "x" * pad}
        path = tmp_path / "s.safetensors"
        save_sae(sae, path)
        if path.read_bytes()[:1] == b"\x80":
            assert load_sae(path).training_summary == {"note": "x" * pad}
            return
    pytest.fail("no header length with a 0x80 first byte was produced")


def test_a_save_that_fails_midway_leaves_the_previous_file(tmp_path, monkeypatch):
    import saeuron_core.safetensors_io as safetensors_io

    path = tmp_path / "s.safetensors"
    sae = random_sae()
    save_sae(sae, path)
    before = path.read_bytes()

    def half_write(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors_io, "save_file", half_write)
    sae.concepts = {"new": {}}
    with pytest.raises(OSError, match="disk full"):
        save_sae(sae, path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.safetensors"]  # no temp file left behind
