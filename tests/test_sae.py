import pytest
import torch

from saeuron_core.errors import ConfigError
from saeuron_core.sae.model import SAEConfig, TopKSAE, dtype_from_name, fvu


def make_sae(d=16, n=64, k=4, seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    sae = TopKSAE(SAEConfig(d_in=d, n_latents=n, k=k))
    with torch.no_grad():
        sae.encoder.bias.normal_(0, 0.1)
        sae.b_dec.normal_(0, 0.5)
    return sae.to(dtype)


def reference(sae, x):
    """Dense implementation of the formulas, independent of the module's code paths."""
    we, be = sae.encoder.weight.double(), sae.encoder.bias.double()
    wd, bd = sae.W_dec.double(), sae.b_dec.double()
    pre = torch.relu((x.double() - bd) @ we.T + be)
    vals, idx = pre.topk(sae.k, dim=-1)
    dense = torch.zeros_like(pre).scatter_(-1, idx, vals)
    return vals, idx, dense @ wd + bd


def test_encode_decode_match_dense_reference():
    sae = make_sae()
    x = torch.randn(3, 7, 16)
    code = sae.encode(x)
    ref_vals, ref_idx, ref_recon = reference(sae, x)
    assert code.values.shape == (3, 7, 4) and code.indices.shape == (3, 7, 4)
    torch.testing.assert_close(code.values.sort(-1).values.double(), ref_vals.sort(-1).values, atol=1e-5, rtol=1e-5)
    assert torch.equal(code.indices.sort(-1).values, ref_idx.sort(-1).values)
    torch.testing.assert_close(sae(x).double(), ref_recon, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sae.dense_codes(x).double() @ sae.W_dec.double() + sae.b_dec.double(), ref_recon,
                               atol=1e-5, rtol=1e-5)


def test_decode_is_sparse_gather_with_k_rows():
    sae = make_sae()
    values = torch.tensor([[2.0, 0.0, 1.0, 0.5]])
    indices = torch.tensor([[3, 9, 60, 0]])
    expected = 2.0 * sae.W_dec[3] + 1.0 * sae.W_dec[60] + 0.5 * sae.W_dec[0] + sae.b_dec
    torch.testing.assert_close(sae.decode(values, indices)[0], expected)
    torch.testing.assert_close(sae.decode(values, indices, bias=False)[0], expected - sae.b_dec)


@pytest.mark.parametrize("sae_dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_mixed_dtypes_convert_at_the_boundary(sae_dtype, x_dtype):
    sae = make_sae(dtype=sae_dtype)
    # Inputs built from encoder directions, so top-k is well separated and no near-tie flips in low precision.
    idx = torch.randint(0, 64, (50, 2))
    x = (3 * sae.encoder.weight.detach().float()[idx].sum(1) + sae.b_dec.detach().float()).to(x_dtype)
    out = sae(x)
    assert out.dtype == x_dtype and out.shape == x.shape
    assert sae.encode(x).values.dtype == sae_dtype
    # The same (rounded) weights in fp32 on the same (rounded) input. Low precision may flip a
    # near-tie in top-k; tokens whose selected latents agree must agree closely.
    sae32 = make_sae()
    sae32.load_state_dict({k: v.float() for k, v in sae.state_dict().items()})
    ref = sae32(x.float())
    same = (sae.encode(x).indices.sort(-1).values == sae32.encode(x.float()).indices.sort(-1).values).all(-1)
    assert same.float().mean() >= 0.9
    rel = ((out.float() - ref).norm(dim=-1) / ref.norm(dim=-1))[same].max()
    assert rel < (1e-6 if sae_dtype == x_dtype == torch.float32 else 1e-2)


def test_decoder_rows_unit_norm_and_parallel_gradient_removed():
    sae = make_sae()
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(64))
    x = torch.randn(32, 16)
    fvu(x, sae.decode(*sae.encode(x))).backward()
    sae.remove_gradient_parallel_to_decoder_directions()
    parallel = (sae.W_dec.grad * sae.W_dec).sum(dim=1)
    assert parallel.abs().max() < 1e-6
    assert sae.W_dec.grad.abs().sum() > 0


def test_wrong_width_is_a_clear_error():
    sae = make_sae()
    sae.config.hook_point = "up_blocks.1.attentions.1"
    with pytest.raises(ConfigError, match=r"expects activations with 16 channels.*up_blocks\.1\.attentions\.1.*got"):
        sae.encode(torch.randn(2, 1280))


@pytest.mark.parametrize("bad", [dict(d_in=0, n_latents=4, k=1), dict(d_in=4, n_latents=4, k=5),
                                 dict(d_in=4, n_latents=-1, k=1), dict(d_in=4.5, n_latents=8, k=1)])
def test_bad_config_rejected(bad):
    with pytest.raises(ConfigError):
        SAEConfig(**bad)


def test_dtype_names():
    assert dtype_from_name("bf16") is torch.bfloat16
    assert dtype_from_name("float16") is torch.float16
    with pytest.raises(ConfigError, match="unsupported dtype"):
        dtype_from_name("int8")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    sae = make_sae()
    x = torch.randn(64, 16)
    gpu = sae.to("cuda")
    torch.testing.assert_close(gpu(x.cuda()).cpu(), make_sae()(x), atol=1e-4, rtol=1e-4)


def test_the_sae_follows_the_denoiser_only_where_one_device_holds_each():
    """``kept_beside`` moves nothing when the module is offloaded (meta weights) or the SAE is already there."""
    sae = TopKSAE(SAEConfig(d_in=8, n_latents=16, k=2))
    before = [p for p in sae.parameters()]
    offloaded = torch.nn.Linear(4, 4, device="meta")
    with sae.kept_beside(offloaded) as inside:
        assert inside is sae and {p.device.type for p in sae.parameters()} == {"cpu"}
    with sae.kept_beside(torch.nn.Linear(4, 4)) as inside:
        assert inside is sae
    assert [p for p in sae.parameters()] == before and sae.on_device(torch.device("cpu")) is sae


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_an_sae_spread_over_two_devices_computes_where_the_activations_are():
    """ComfyUI's lowvram may leave part of the SAE offloaded: it is streamed to the activations, not cached."""
    sae = make_sae()
    x = torch.randn(64, 16)
    sae.encoder.to("cuda")  # W_dec and b_dec stay on the CPU
    moved = sae.on_device(torch.device("cuda", torch.cuda.current_device()))
    assert moved is not sae and {p.device.type for p in moved.parameters()} == {"cuda"}
    assert sae.W_dec.device.type == "cpu"
    torch.testing.assert_close(moved(x.cuda()).cpu(), make_sae()(x), atol=1e-4, rtol=1e-4)
