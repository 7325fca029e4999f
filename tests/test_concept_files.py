"""Concept files (``saeuron_core/sae/concept_files.py``) and ``saeuron concepts``: a concept exported from the shipped
style SAE and imported into that SAE without it is the same library entry and erases the same, bit for bit; files
for another SAE, damaged or tampered files are refused with one clear error, and nothing is written or added."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_helpers import assert_user_error, run_cli
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from safetensors.torch import save_file

import saeuron_core as sc
from saeuron_core.erasure.eraser import ConceptEraser
from saeuron_core.errors import ConfigError, SAEFormatError, SaeuronError
from saeuron_core.hosts.hooks import BlockCall
from saeuron_core.sae.concept_files import (concept_file_names, describe_concepts, load_concepts, sae_identity,
                                            save_concepts)
from saeuron_core.sae.files import content_digest, load_sae, save_sae
from saeuron_core.sae.library import concept_names, get_concept, remove_concept
from saeuron_core.sae.model import SAEConfig
from saeuron_core.safetensors_io import load_safetensors

ASSETS = Path(__file__).resolve().parents[1] / "demo_assets"
STYLES = ASSETS / "sae-styles.safetensors"
NAME = "stripes"
FIELDS = ("feature_ids", "scores", "mu", "threshold", "n_selected", "observed")
FUZZ = settings(max_examples=int(os.environ.get("SAEURON_FUZZ_EXAMPLES", "60")), deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """``(folder, concept file with stripes, style SAE file without stripes)``."""
    folder = tmp_path_factory.mktemp("concepts")
    save_concepts(load_sae(STYLES), [NAME], folder / "stripes.safetensors", source=str(STYLES))
    without = load_sae(STYLES)
    remove_concept(without, NAME)
    save_sae(without, folder / "without.safetensors")
    return folder, folder / "stripes.safetensors", folder / "without.safetensors"


def entry_tensors(sae, name=NAME):
    key = sae.concepts[name]["key"]
    return {f: sae.extra_tensors[f"concepts.{key}.{f}"] for f in FIELDS}


def probes(sae, name=NAME):
    """``(timestep, tokens [1, N, d])`` at a few timesteps: one token per selected feature, built from its encoder
    row to fire above its threshold, then two background tokens (``b_dec``)."""
    data = get_concept(sae, name)
    w, bias, b_dec = sae.encoder.weight.detach(), sae.encoder.bias.detach(), sae.b_dec.detach()
    out = []
    for t in (50.0, 310.0, 590.0, 870.0):
        ids, thresholds = data.selected_at(t)
        rows = [b_dec + w[f] * ((2 * thr + 1 - bias[f]) / w[f].dot(w[f])) for f, thr in zip(ids, thresholds)]
        out.append((t, torch.stack([*rows, b_dec, b_dec])[None]))
    return out


def call_for(x, t):
    return BlockCall(tokens=x, spatial=None, timesteps=torch.full((x.shape[0],), t),
                     is_cond=torch.ones(x.shape[0], dtype=torch.bool), call_index=0)


def rewrite(path, dest, edit, fix_checksum):
    """``dest``: ``path`` with ``edit(tensors, metadata)`` applied, its checksum recomputed or left stale."""
    tensors, metadata = load_safetensors(path)
    edit(tensors, metadata)
    if fix_checksum:
        metadata["sha256"] = content_digest(tensors, metadata)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(dest), metadata=metadata)
    return dest


def key_of(metadata, name=NAME):
    return json.loads(metadata["concepts"])[name]["key"]


def set_first(field, value):
    def edit(t, m):
        t[f"concepts.{key_of(m)}.{field}"].view(-1)[0] = value
    return edit


def entry_edit(change):
    def edit(t, m):
        library = json.loads(m["concepts"])
        change(library[NAME])
        m["concepts"] = json.dumps(library)
    return edit


# -- the library -------------------------------------------------------------------------------------

def test_export_then_import_gives_the_same_entry_and_the_same_erasure(exported):
    _, path, without_path = exported
    original, restored = load_sae(STYLES), load_sae(without_path)
    assert NAME not in restored.concepts and sae_identity(restored) == sae_identity(original)
    assert load_concepts(restored, path) == [NAME]
    assert concept_names(restored) == concept_names(original)
    assert restored.concepts[NAME] == original.concepts[NAME]
    for field, want in entry_tensors(original).items():
        got = entry_tensors(restored)[field]
        assert got.dtype == want.dtype and torch.equal(got, want), field
    for method in ("ablate", "replace"):
        want_eraser, got_eraser = (ConceptEraser(s, [NAME], method, strength=1.0) for s in (original, restored))
        for t, x in probes(original):
            want, got = want_eraser(call_for(x, t)), got_eraser(call_for(x, t))
            assert want is not None and not torch.equal(want, x), (method, t)  # the probe is erased
            assert torch.equal(got, want), (method, t)


def test_the_file_is_small_and_describes_itself(exported):
    _, path, _ = exported
    assert path.stat().st_size < STYLES.stat().st_size / 10
    assert concept_file_names(path) == [NAME]
    info = describe_concepts(path)
    assert info["sae_identity"] == sae_identity(load_sae(STYLES))
    assert info["sae"] == {"file": "sae-styles.safetensors", "model_family": "saeuron-demo",
                           "hook_point": "up_blocks.1.attentions.2", "d_in": 64, "n_latents": 1024, "k": 8,
                           "training": {"steps": 3000, "tokens": 12288000, "fvu": 0.0469, "model": "model"}}
    facts = info["concepts"][NAME]
    assert facts["model_family"] == "saeuron-demo" and "25 steps" in facts["learned"] and "positive" in facts["learned"]
    metadata = load_safetensors(path)[1]
    assert str(ASSETS) not in json.dumps(metadata)  # no path of the machine that wrote it
    assert json.loads(metadata["concepts"])[NAME]["info"] == load_sae(STYLES).concepts[NAME]["info"]


def test_the_summary_says_the_kind_when_the_info_does(tmp_path):
    sae = load_sae(STYLES)
    sae.concepts[NAME]["info"].update(kind="style\x1b[2J", model_family="demo")
    facts = describe_concepts(save_concepts(sae, [NAME], tmp_path / "c.safetensors"))["concepts"][NAME]
    assert facts["kind"] == "style[2J" and facts["model_family"] == "demo"  # printable text only
    assert "kind" not in describe_concepts(save_concepts(sae, ["solid"], tmp_path / "d.safetensors"))["concepts"]["solid"]


def test_identity_is_of_the_weights_and_config_only():
    sae = load_sae(STYLES)
    before = sae_identity(sae)
    remove_concept(sae, "solid")
    assert sae_identity(sae) == before
    moved = load_sae(STYLES)
    moved.config = SAEConfig(**{**moved.config.to_dict(), "hook_point": "up_blocks.1.attentions.1"})
    assert sae_identity(moved) != before
    with torch.no_grad():
        sae.b_dec[0] += 1e-3
    assert sae_identity(sae) != before


def test_names_the_sae_has_are_replaced_only_when_asked(exported):
    _, path, _ = exported
    sae = load_sae(STYLES)
    with pytest.raises(ConfigError, match=r"already has 'stripes'; to replace it with the file's, load with replace"):
        load_concepts(sae, path)
    assert load_concepts(sae, path, replace=True) == [NAME]
    assert torch.equal(entry_tensors(sae)["mu"], entry_tensors(load_sae(STYLES))["mu"])


def test_a_file_for_another_sae_is_refused_naming_both(exported):
    _, path, _ = exported
    other = load_sae(ASSETS / "sae.safetensors")
    before = dict(other.concepts)
    with pytest.raises(ConfigError) as info:
        load_concepts(other, path)
    message = str(info.value)
    assert sae_identity(load_sae(STYLES))[:12] in message and sae_identity(other)[:12] in message
    assert "sae-styles.safetensors: saeuron-demo SAE at up_blocks.1.attentions.2" in message and "\n" not in message
    assert other.concepts == before


BAD = {
    "tensor byte changed": (set_first("mu", 0.123), False, "do not match the file's checksum"),
    "metadata edited": (entry_edit(lambda e: e.update(bucket_width=25.0)), False, "do not match the file's checksum"),
    "identity edited": (lambda t, m: m.update(sae_identity="0" * 64), False, "do not match the file's checksum"),
    "checksum removed": (lambda t, m: m.pop("sha256"), False, "has no checksum"),
    "entry invalid": (set_first("threshold", float("nan")), True, "concept 'stripes', field 'threshold': must be"),
    "entry field unknown": (entry_edit(lambda e: e.update(treshold=3)), True, "unknown field(s) ['treshold']"),
    "feature beyond the SAE": (set_first("feature_ids", 5000), True, "field 'feature_ids': names feature 5000"),
    "stray tensor": (lambda t, m: t.update({"concepts.gone_1.mu": torch.zeros(2)}), True,
                     "tensor 'concepts.gone_1.mu' belongs to no concept"),
    "other tensor": (lambda t, m: t.update({"W_dec": torch.zeros(2)}), True, "tensor 'W_dec' belongs to no concept"),
    "format marker": (lambda t, m: m.update(saeuron_concepts="2"), True, "format version '2' is not supported"),
    "no format marker": (lambda t, m: m.pop("saeuron_concepts"), True, "not a concept file"),
    "identity not hex": (lambda t, m: m.update(sae_identity="abc"), True, "'sae_identity' must be 64 hex digits"),
    "library not JSON": (lambda t, m: m.update(concepts="{"), True, "'concepts' is not valid JSON"),
    "summary with control text": (lambda t, m: m.update(summary=json.dumps({NAME: {"learned": "\x1b[2J"}})), True,
                                  "must map names to short printable strings"),
}


@pytest.mark.parametrize("case", BAD)
def test_damaged_and_tampered_files_are_refused(exported, tmp_path, case):
    edit, fix, message = BAD[case]
    _, path, without_path = exported
    bad = rewrite(path, tmp_path / "bad.safetensors", edit, fix)
    sae = load_sae(without_path)
    with pytest.raises(SAEFormatError) as info:
        load_concepts(sae, bad)
    assert str(info.value).startswith(f"{bad}: ") and message in str(info.value), str(info.value)
    assert NAME not in sae.concepts


def test_truncated_files_and_sae_files_are_refused(exported, tmp_path):
    _, path, without_path = exported
    data = path.read_bytes()
    for cut in (0, 7, 100, len(data) // 2, len(data) - 1):
        (tmp_path / "cut.safetensors").write_bytes(data[:cut])
        with pytest.raises(SAEFormatError):
            load_concepts(load_sae(without_path), tmp_path / "cut.safetensors")
    with pytest.raises(SAEFormatError, match="an SAE file, not a concept file"):
        load_concepts(load_sae(without_path), STYLES)
    with pytest.raises(SAEFormatError, match="never loaded"):
        load_concepts(load_sae(without_path), tmp_path / "stripes.pt")


def test_saving_refuses_unknown_and_no_concepts(tmp_path):
    sae = load_sae(STYLES)
    with pytest.raises(ConfigError, match="unknown concept 'horse'; this SAE knows: 'checkerboard'"):
        save_concepts(sae, [NAME, "horse"], tmp_path / "c.safetensors")
    with pytest.raises(ConfigError, match="name at least one concept"):
        save_concepts(sae, [], tmp_path / "c.safetensors")
    with pytest.raises(ConfigError, match="must end in .safetensors"):
        save_concepts(sae, [NAME], tmp_path / "c.bin")
    assert not list(tmp_path.iterdir())


def test_the_package_exports_them(exported):
    _, path, without_path = exported
    sae = sc.load_sae(without_path)
    assert sc.load_concepts(sae, path) == [NAME] and sc.save_concepts is save_concepts


_ORIGINAL: dict = {}


def _exported_bytes() -> bytes:
    if "bytes" not in _ORIGINAL:
        import tempfile

        path = Path(tempfile.mkdtemp()) / "stripes.safetensors"
        save_concepts(load_sae(STYLES), [NAME], path)
        _ORIGINAL["bytes"] = path.read_bytes()
        _ORIGINAL["without"] = load_sae(STYLES)
        remove_concept(_ORIGINAL["without"], NAME)
    return _ORIGINAL["bytes"]


@FUZZ
@given(flips=st.lists(st.integers(min_value=0, max_value=len(_exported_bytes()) * 8 - 1), min_size=1, max_size=3))
def test_random_bit_flips_are_refused_or_change_nothing(tmp_path_factory, flips):
    data = bytearray(_exported_bytes())
    for position in flips:
        data[position // 8] ^= 1 << (position % 8)
    path = tmp_path_factory.mktemp("flip") / "c.safetensors"
    path.write_bytes(bytes(data))
    sae = load_sae(STYLES)
    remove_concept(sae, NAME)
    try:
        load_concepts(sae, path)
    except SaeuronError as exc:
        assert str(exc) and "\n" not in str(exc)
        assert NAME not in sae.concepts
        return
    original = load_sae(STYLES)  # flips that cancel out (the same bit twice) leave the file as it was
    assert sae.concepts[NAME] == original.concepts[NAME]
    assert all(torch.equal(entry_tensors(sae)[f], entry_tensors(original)[f]) for f in FIELDS)


# -- saeuron concepts ----------------------------------------------------------------------------------

def pixels(path):
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def erase_grid(capsys, sae, out):
    code, _, err = run_cli(capsys, "erase", "--model", ASSETS / "model", "--sae", sae, "--concept", NAME,
                           "--prompt", "a star in stripes style", "--steps", "4", "--seed", "1", "--out", out)
    assert code == 0, err
    return pixels(out)


def test_cli_export_import_erases_as_the_original(capsys, tmp_path):
    code, out, err = run_cli(capsys, "remove-concept", STYLES, "--concept", NAME, "--out", tmp_path / "without.safetensors")
    assert code == 0, err
    code, out, err = run_cli(capsys, "concepts", "export", STYLES, NAME, "-o", tmp_path / "stripes.safetensors")
    assert code == 0, err
    assert "exported 'stripes'" in out and str(tmp_path / "stripes.safetensors") in out
    code, out, err = run_cli(capsys, "concepts", "import", tmp_path / "without.safetensors",
                             tmp_path / "stripes.safetensors", "-o", tmp_path / "restored.safetensors")
    assert code == 0, err
    assert "added 'stripes'" in out
    assert concept_names(load_sae(tmp_path / "restored.safetensors")) == concept_names(load_sae(STYLES))
    want = erase_grid(capsys, STYLES, tmp_path / "want.png")
    got = erase_grid(capsys, tmp_path / "restored.safetensors", tmp_path / "got.png")
    half = want.shape[1] // 2
    assert not np.array_equal(want[:, :half], want[:, half:])  # the erasure changed the picture
    assert np.array_equal(got, want)


def test_cli_list(capsys, exported):
    _, path, _ = exported
    code, out, err = run_cli(capsys, "concepts", "list", path)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == str(path)
    assert lines[1].split(":", 1)[1].strip().startswith("sae-styles.safetensors: saeuron-demo SAE at up_blocks.1")
    assert lines[2].split()[-1] == sae_identity(load_sae(STYLES))
    assert lines[3].split(":", 1)[1].strip() == NAME
    assert lines[4].strip().startswith("stripes: learned from 8 positive and 56 negative prompts, 25 steps")


def test_cli_refusals_are_one_line_and_write_nothing(capsys, exported, tmp_path):
    _, path, without_path = exported
    out = tmp_path / "out.safetensors"
    other = ASSETS / "sae.safetensors"
    code, _, err = run_cli(capsys, "concepts", "import", other, path, "-o", out)
    assert_user_error(code, err, "these concepts were learned on another SAE (identity ")
    assert sae_identity(load_sae(STYLES))[:12] in err and sae_identity(load_sae(other))[:12] in err
    cases = {"damaged": (set_first("mu", 0.5), False, "do not match the file's checksum"),
             "tampered": (entry_edit(lambda e: e.update(max_timestep=0)), True, "field 'max_timestep'"),
             "stray": (lambda t, m: t.update({"x": torch.zeros(1)}), True, "tensor 'x' belongs to no concept"),
             "marker": (lambda t, m: m.update(saeuron_concepts="9"), True, "version '9' is not supported")}
    for name, (edit, fix, message) in cases.items():
        bad = rewrite(path, tmp_path / f"{name}.safetensors", edit, fix)
        assert_user_error(*run_cli(capsys, "concepts", "import", without_path, bad, "-o", out)[::2], message)
        assert_user_error(*run_cli(capsys, "concepts", "list", bad)[::2], message)
    (tmp_path / "cut.safetensors").write_bytes(path.read_bytes()[:-10])
    assert_user_error(*run_cli(capsys, "concepts", "import", without_path, tmp_path / "cut.safetensors", "-o", out)[::2],
                      "truncated")
    # The second file's concept is already there after the first: nothing is written.
    assert_user_error(*run_cli(capsys, "concepts", "import", without_path, path, path, "-o", out)[::2],
                      "already has 'stripes'; to replace it with the file's, load with replace on ('saeuron concepts "
                      "import --replace'")
    assert_user_error(*run_cli(capsys, "concepts", "import", without_path, path, "-o", tmp_path / "out.bin")[::2],
                      "expected a path ending in .safetensors")
    assert_user_error(*run_cli(capsys, "concepts", "export", STYLES, "horse", "-o", out)[::2], "unknown concept 'horse'")
    assert_user_error(*run_cli(capsys, "concepts", "import", STYLES, tmp_path / "nope.safetensors", "-o", out)[::2],
                      "no such file")
    assert_user_error(*run_cli(capsys, "concepts")[::2], "required: {export,import,list}")
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # nor a temp file
    code, _, err = run_cli(capsys, "concepts", "import", without_path, path, path, "--replace", "-o", out)
    assert code == 0, err
    assert NAME in load_sae(out).concepts
