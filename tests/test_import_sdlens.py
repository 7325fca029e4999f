"""SDLens / sdxl-unbox SAE folders (the public SDXL-Turbo SAEs and the FLUX.1 block-18 SAE): import, convert, erase,
and the weights-only unpickler that is the one way ``state_dict.pth`` is read."""

import json
import os
from pathlib import Path

import pytest
import torch
from cli_helpers import assert_user_error, run_cli
from conftest import HOOK
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import saeuron_core as sc
from saeuron_core.errors import SAEFormatError, SaeuronError
from saeuron_core.hosts.diffusers import generate
from saeuron_core.sae.files import convert, describe, load_sae

SDXL_RUN = "unet.down_blocks.2.attentions.1_k10_hidden5120_auxk256_bs4096_lr0.0001"  # as published, scaled down
D, N, K = 64, 320, 10


def write_sdlens(run: Path, d: int = D, n: int = N, k: int = K, *, final: bool = True, wrap: bool = True,
                 seed: int = 0, **cfg_over) -> dict:
    """A folder in the published layout: ``config.json``, ``state_dict.pth`` (``torch.save``), ``mean.pt``."""
    g = torch.Generator().manual_seed(seed)
    folder = run / "final" if final else run
    folder.mkdir(parents=True)
    sd = {"encoder.weight": torch.randn(n, d, generator=g) / d ** 0.5,
          # decoder columns not unit-norm on purpose: the import must keep the values as they are
          "decoder.weight": torch.randn(d, n, generator=g) * torch.rand(n, generator=g) * 2,
          "pre_bias": torch.randn(d, generator=g), "latent_bias": torch.randn(n, generator=g) * 0.1,
          "stats_last_nonzero": torch.randint(0, 100, (n,), generator=g)}
    torch.save({"state_dict": sd} if wrap else sd, folder / "state_dict.pth")
    cfg = {"n_dirs_local": n, "d_model": d, "k": k, "auxk": 256, "dead_steps_threshold": 2441, **cfg_over}
    (folder / "config.json").write_text(json.dumps(cfg))
    torch.save(torch.randn(d, generator=g), folder / "mean.pt")
    return sd


def reference(x: torch.Tensor, sd: dict, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """SDLens's TopK from its formulas: ``relu(topk(W_enc (x - pre_bias) + latent_bias))``, ``W_dec z + pre_bias``."""
    x = x.double()
    pre = (x - sd["pre_bias"].double()) @ sd["encoder.weight"].double().T + sd["latent_bias"].double()
    vals, idx = pre.topk(k, dim=-1)
    z = torch.zeros_like(pre).scatter_(-1, idx, torch.relu(vals))
    return z, z @ sd["decoder.weight"].double().T + sd["pre_bias"].double()


def assert_matches(sae, sd, k, d=D):
    x = torch.randn(50, d) * 2
    z, recon = reference(x, sd, k)
    torch.testing.assert_close(sae(x).double(), recon, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sae.dense_codes(x).double(), z, atol=1e-5, rtol=1e-5)


# -- import and convert ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("wrap", [True, False])
def test_sdxl_layout_matches_the_reference_topk(tmp_path, wrap):
    sd = write_sdlens(tmp_path / SDXL_RUN, wrap=wrap)
    run = tmp_path / SDXL_RUN
    # the run folder, its final/, their parent (one SAE there), or the weights file itself
    for path in (run, run / "final", tmp_path, run / "final" / "state_dict.pth"):
        sae = load_sae(path)
        assert sae.source_format == "sdlens" and (sae.d_in, sae.n_latents, sae.k) == (D, N, K)
        assert sae.config.hook_point == "down_blocks.2.attentions.1" and sae.config.residual
        assert sae.config.model_family == "sdxl" and not sae.config.normalize_decoder
    assert_matches(sae, sd, K)
    assert torch.equal(sae.W_dec, sd["decoder.weight"].T) and torch.equal(sae.b_dec, sd["pre_bias"])
    assert torch.equal(sae.encoder.weight, sd["encoder.weight"]) and torch.equal(sae.encoder.bias, sd["latent_bias"])


def test_flux_layout_block_from_folder_name_config_or_caller(tmp_path):
    d, n, k = 48, 192, 16  # FLUX's 3072 -> 12288 (x4), scaled down
    sd = write_sdlens(tmp_path / "transformer.transformer_blocks.18", d, n, k, final=False, wrap=False, auxk_coef=1 / 32)
    sae = load_sae(tmp_path / "transformer.transformer_blocks.18")
    assert (sae.config.hook_point, sae.config.model_family, sae.config.residual) == ("transformer_blocks.18", "flux", True)
    assert_matches(sae, sd, k, d)

    # As downloaded (antoniomari/SAE_flux_18): the folder does not name the block, and neither does config.json.
    write_sdlens(tmp_path / "SAE_flux_18", d, n, k, final=False, wrap=False)
    with pytest.raises(SAEFormatError, match=r"SAE_flux_18: .*does not say which block.*--hook-point"):
        load_sae(tmp_path / "SAE_flux_18")
    for given in ("transformer_blocks.18", "transformer.transformer_blocks.18", "double_blocks.18"):  # ComfyUI's name
        assert load_sae(tmp_path / "SAE_flux_18", hook_point=given).config.hook_point == "transformer_blocks.18"
    with pytest.raises(SAEFormatError, match="not a block"):
        load_sae(tmp_path / "SAE_flux_18", hook_point="layer 18")
    write_sdlens(tmp_path / "named", d, n, k, final=False, hook_point="transformer.transformer_blocks.18")
    assert load_sae(tmp_path / "named").config.hook_point == "transformer_blocks.18"


def test_converted_native_file_keeps_values_block_and_residual(tmp_path):
    sd = write_sdlens(tmp_path / SDXL_RUN)
    imported = load_sae(tmp_path / SDXL_RUN)
    out = convert(tmp_path / SDXL_RUN, tmp_path / "down21.safetensors")
    native = load_sae(out)
    assert native.source_format == "native" and native.config == imported.config
    assert native.config.residual and native.config.extra["imported_from"] == "sdlens"
    assert all(torch.equal(native.tensors()[name], t) for name, t in imported.tensors().items())
    assert_matches(native, sd, K)
    flux = tmp_path / "SAE_flux_18"
    write_sdlens(flux, 48, 192, 16, final=False)
    assert load_sae(convert(flux, tmp_path / "f.safetensors", hook_point="transformer_blocks.18")).config.hook_point \
        == "transformer_blocks.18"
    info = describe(tmp_path / SDXL_RUN)
    assert (info["format"], info["residual"], info["hook_point"]) == ("sdlens", True, "down_blocks.2.attentions.1")


def test_parent_with_the_four_published_blocks_asks_which(tmp_path):
    for block in ("down_blocks.2.attentions.1", "mid_block.attentions.0", "up_blocks.0.attentions.0",
                  "up_blocks.0.attentions.1"):
        write_sdlens(tmp_path / f"unet.{block}_k10_hidden5120_auxk256_bs4096_lr0.0001")
    with pytest.raises(SAEFormatError, match="several SAEs.*down_blocks.2.*mid_block.*up_blocks.0"):
        load_sae(tmp_path)
    assert load_sae(tmp_path / f"unet.mid_block.attentions.0_k10_hidden5120_auxk256_bs4096_lr0.0001").config.hook_point \
        == "mid_block.attentions.0"


# -- the weights-only unpickler ------------------------------------------------------------------------------------

class Payload:
    """Runs ``call(*args)`` when unpickled by a full unpickler."""

    def __init__(self, call, *args):
        self.call, self.args = call, args

    def __reduce__(self):
        return self.call, self.args


class Custom:
    """A plain class instance: not a tensor."""

    def __init__(self):
        self.weight = torch.zeros(2)


def _payloads(marker: Path):
    return {"os.system": Payload(os.system, f"touch {marker}"), "open": Payload(open, str(marker), "w")}


@pytest.mark.parametrize("how", ["os.system", "open"])
def test_pth_with_code_is_refused_and_never_run(tmp_path, how):
    marker = tmp_path / "ran"
    sd = write_sdlens(tmp_path / SDXL_RUN)
    weights = tmp_path / SDXL_RUN / "final" / "state_dict.pth"
    torch.save({"state_dict": {**sd, "encoder.weight": _payloads(marker)[how]}}, weights)
    torch.load(weights, weights_only=False)  # the test would notice: a full unpickler runs the payload
    assert marker.exists()
    marker.unlink()
    with pytest.raises(SAEFormatError, match=r"state_dict.pth: holds objects other than tensors .*refused without"):
        load_sae(tmp_path / SDXL_RUN)
    with pytest.raises(SAEFormatError):
        convert(tmp_path / SDXL_RUN, tmp_path / "out.safetensors")
    assert not marker.exists() and not (tmp_path / "out.safetensors").exists()


@pytest.mark.parametrize("value", [Custom(), os.getcwd, Custom], ids=["instance", "function", "class"])
def test_pth_with_other_objects_is_refused(tmp_path, value):
    sd = write_sdlens(tmp_path / SDXL_RUN)
    torch.save({**sd, "decoder.weight": value}, tmp_path / SDXL_RUN / "final" / "state_dict.pth")
    with pytest.raises(SAEFormatError, match=r"state_dict.pth: holds objects other than tensors"):
        load_sae(tmp_path / SDXL_RUN)


@pytest.mark.parametrize("change, message", [
    (lambda sd: sd.pop("latent_bias"), r"missing tensor\(s\) \['latent_bias'\]"),
    (lambda sd: sd.update(pre_bias=torch.zeros(D + 1)), r"'pre_bias' has shape \[65\], expected \[64\]"),
    (lambda sd: sd.update({"decoder.weight": torch.zeros(N, D)}), r"'decoder.weight' has shape \[320, 64\]"),
    (lambda sd: sd.update({"encoder.weight": torch.full((N, D), float("nan"))}), "NaN or infinite"),
    (lambda sd: sd.update(latent_bias=torch.full((N,), float("inf"))), "NaN or infinite"),
    (lambda sd: sd.update(pre_bias=torch.zeros(D, dtype=torch.int64)), "expected a float tensor"),
    (lambda sd: sd.update(extra=torch.zeros(3)), r"unexpected tensor\(s\) \['extra'\]"),
    (lambda sd: sd.update(stats_last_nonzero=torch.zeros(3)), r"'stats_last_nonzero' has shape \[3\]"),
    (lambda sd: sd.update(k=10), "expected a dict of named tensors"),
])
def test_bad_state_dicts_are_refused(tmp_path, change, message):
    sd = write_sdlens(tmp_path / SDXL_RUN)
    change(sd)
    torch.save({"state_dict": sd}, tmp_path / SDXL_RUN / "final" / "state_dict.pth")
    with pytest.raises(SAEFormatError, match=message):
        load_sae(tmp_path / SDXL_RUN)


def test_damaged_files_and_other_pickle_routes(tmp_path):
    write_sdlens(tmp_path / SDXL_RUN)
    final = tmp_path / SDXL_RUN / "final"
    data = (final / "state_dict.pth").read_bytes()
    (final / "state_dict.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(SAEFormatError, match="not a readable torch.save file"):
        load_sae(final)
    (final / "state_dict.pth").write_bytes(b"")
    with pytest.raises(SAEFormatError, match="not a readable torch.save file"):
        load_sae(final)
    (final / "config.json").write_text(json.dumps({"n_dirs_local": N, "k": K}))
    with pytest.raises(SAEFormatError, match="config.json needs an integer d_model"):
        load_sae(final)
    # Everything else pickled stays closed: mean.pt, a state_dict.pth without config.json, a renamed pickle.
    for path in (final / "mean.pt", tmp_path / "state_dict.pth", tmp_path / "sae.ckpt"):
        torch.save({"w": torch.zeros(1)}, path)
        with pytest.raises(SAEFormatError, match="pickle-based.*never loaded"):
            load_sae(path)
    torch.save({"w": torch.zeros(1)}, tmp_path / "renamed.safetensors")
    with pytest.raises(SAEFormatError, match="never unpickled"):
        load_sae(tmp_path / "renamed.safetensors")


FUZZ = settings(max_examples=int(os.environ.get("SAEURON_FUZZ_EXAMPLES", "150")), deadline=None,  # first call warms up
                suppress_health_check=[HealthCheck.function_scoped_fixture])


@FUZZ
@given(data=st.data())
def test_fuzzed_state_dict_loads_or_is_refused(tmp_path_factory, data):
    """Bit flips and cuts anywhere in ``state_dict.pth``, garbage in ``config.json``: a clean refusal or an SAE of
    the configured shape that runs; never another exception (torch's zip has no checksum, so flipped tensor bytes
    may load as other values, as in any imported folder)."""
    run = tmp_path_factory.mktemp("f") / "unet.up_blocks.1.attentions.1"
    write_sdlens(run, 8, 32, 4, final=False)
    raw = bytearray((run / "state_dict.pth").read_bytes())
    for _ in range(data.draw(st.integers(1, 4))):
        raw[data.draw(st.integers(0, len(raw) - 1))] ^= 1 << data.draw(st.integers(0, 7))
    (run / "state_dict.pth").write_bytes(bytes(raw[: data.draw(st.sampled_from([len(raw), len(raw) // 3, 30]))]))
    cfg = json.loads((run / "config.json").read_text())
    if data.draw(st.booleans()):
        key = data.draw(st.sampled_from(["d_model", "n_dirs_local", "k", "hook_point"]))
        cfg[key] = data.draw(st.one_of(st.integers(-2, 40), st.text(max_size=5), st.none(), st.floats()))
    (run / "config.json").write_text(json.dumps(cfg))
    try:
        sae = load_sae(run)
    except SaeuronError as exc:
        assert str(exc)
        return
    assert (sae.d_in, sae.n_latents) == (cfg["d_model"], cfg["n_dirs_local"]) and sae.config.residual
    assert sae(torch.randn(3, sae.d_in)).shape == (3, sae.d_in)


# -- CLI ---------------------------------------------------------------------------------------------------------

def test_cli_info_and_convert(capsys, tmp_path):
    write_sdlens(tmp_path / SDXL_RUN)
    code, out, _ = run_cli(capsys, "info", tmp_path / SDXL_RUN)
    assert code == 0 and "sdlens" in out and "down_blocks.2.attentions.1 (reads its residual update" in out
    code, out, _ = run_cli(capsys, "info", "--json", tmp_path / SDXL_RUN / "final")
    assert code == 0 and json.loads(out)["residual"] is True
    code, out, _ = run_cli(capsys, "convert", tmp_path / SDXL_RUN, tmp_path / "n.safetensors")
    assert code == 0 and load_sae(tmp_path / "n.safetensors").config.residual
    write_sdlens(tmp_path / "flux" / "SAE_flux_18", 48, 192, 16, final=False)
    assert_user_error(*run_cli(capsys, "info", tmp_path / "flux" / "SAE_flux_18")[::2], "--hook-point")
    assert_user_error(*run_cli(capsys, "convert", tmp_path / "flux", tmp_path / "f.safetensors")[::2],
                      "does not say which block")
    code, out, _ = run_cli(capsys, "convert", "--hook-point", "transformer_blocks.18", tmp_path / "flux",
                           tmp_path / "f.safetensors")
    assert code == 0 and load_sae(tmp_path / "f.safetensors").config.model_family == "flux"
    code, out, _ = run_cli(capsys, "info", "--hook-point", "double_blocks.18", tmp_path / "flux")
    assert code == 0 and "transformer_blocks.18" in out
    assert_user_error(*run_cli(capsys, "info", "--hook-point", "up_blocks.0.attentions.1",
                               tmp_path / "f.safetensors")[::2], "carries its own hook point")
    torch.save({"state_dict": {"encoder.weight": Custom()}}, tmp_path / SDXL_RUN / "final" / "state_dict.pth")
    assert_user_error(*run_cli(capsys, "convert", tmp_path / SDXL_RUN, tmp_path / "x.safetensors")[::2],
                      "holds objects other than tensors")


# -- erasure on a matching tiny model ------------------------------------------------------------------------------

def test_imported_residual_sae_erases_on_the_tiny_pipeline(tmp_path, tiny_pipe):
    """The tiny SD pipeline's ``up_blocks.1.attentions.1`` is 32 wide: an SDLens SAE for it, read from its folder."""
    write_sdlens(tmp_path / f"unet.{HOOK}_k8_hidden128_auxk256_bs4096_lr0.0001", 32, 128, 8, seed=3)
    sae = load_sae(tmp_path)
    assert sae.config.hook_point == HOOK and sae.config.residual
    sc.learn_concept(tiny_pipe, sae, "cat", ["a cat", "a small cat"], ["a dog", "a house"], steps=10,
                     guidance_scale=5.0, scheduler="ddim", min_specificity=0.0, progress=False)

    def latents():
        return generate(tiny_pipe, ["a cat", "a dog"], [0, 1], steps=4, guidance_scale=5.0).images

    base = latents()
    with sc.erase(tiny_pipe, sae, ["cat"], strength=0.0):
        assert torch.equal(latents(), base)
    with sc.erase(tiny_pipe, sae, ["cat"], strength=20.0):
        erased = latents()
    assert not torch.allclose(erased, base)
    assert torch.equal(latents(), base)  # hooks gone on exit
    native = load_sae(sc.save_sae(sae, tmp_path / "learned.safetensors"))  # concept and residual flag kept
    with sc.erase(tiny_pipe, native, ["cat"], strength=20.0):
        assert torch.equal(latents(), erased)


# -- ComfyUI: the Load SAE node lists and loads such folders --------------------------------------------------------

def test_load_sae_node_lists_sdlens_folders(comfy):
    import comfy_host

    models = comfy_host._STATE["models"] / "sae"
    write_sdlens(models / SDXL_RUN)
    write_sdlens(models / "SAE_flux_18", 48, 192, 16, final=False)
    names = comfy_host.pack_module("nodes.common").list_saes()
    assert {f"{SDXL_RUN}/final", "SAE_flux_18"} <= set(names)
    loaded = comfy_host.node_class("SAeUronLoadSAE").execute(f"{SDXL_RUN}/final").args[0]
    assert loaded.source_format == "sdlens" and loaded.config.residual
    with pytest.raises(SaeuronError, match="does not say which block"):
        comfy_host.node_class("SAeUronLoadSAE").execute("SAE_flux_18")
