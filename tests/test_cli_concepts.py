"""CLI: learn-concept, remove-concept, erase, inspect, info's concept lines, single-file checkpoints."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_helpers import assert_user_error, run_cli, tiny_model
from conftest import HOOK
from PIL import Image
from safetensors.torch import save_file

from saeuron_core.errors import ConfigError
from saeuron_core.hosts.diffusers import load_pipeline
from saeuron_core.hosts.tiny_pipeline import make_tiny_pipeline
from saeuron_core.sae.files import load_sae, save_sae
from saeuron_core.sae.library import ConceptData, add_concept, concept_names, get_concept
from saeuron_core.sae.model import SAEConfig, TopKSAE

STEPS = "4"






def px(path):
    with Image.open(path) as im:
        return torch.from_numpy(np.asarray(im.convert("RGB")).astype(np.int64))


def random_sae(d_in=32):
    torch.manual_seed(0)
    return TopKSAE(SAEConfig(d_in=d_in, n_latents=128, k=8, hook_point=HOOK, model_family="tiny"))


def fake_concept(name="cat", n_latents=128):
    nb, m = 50, 4
    return ConceptData(name=name, bucket_width=20.0, max_timestep=1000,
                       feature_ids=torch.arange(m).repeat(nb, 1) % n_latents, scores=torch.ones(nb, m),
                       mu=torch.ones(nb, m), threshold=torch.zeros(nb, m), n_selected=torch.full((nb,), 2),
                       observed=torch.ones(nb, dtype=torch.bool))


@pytest.fixture()
def files(tmp_path):
    (tmp_path / "pos.txt").write_text("a cat\na red cat\n")
    (tmp_path / "neg.txt").write_text("a dog\na green tree\n")
    save_sae(random_sae(), tmp_path / "s.safetensors")
    return tmp_path


def learn(capsys, files, name="cat", *extra):
    return run_cli(capsys, "learn-concept", files / "s.safetensors", "--concept", name, "--positive", files / "pos.txt",
                   "--negative", files / "neg.txt", "--model", tiny_model(), "--steps", STEPS, *extra)


@pytest.fixture()
def learned(capsys, files):
    code, out, err = learn(capsys, files)
    assert code == 0, err
    return files


def test_learn_concept_in_place_and_info(capsys, files):
    before = load_sae(files / "s.safetensors")
    # A random SAE has few concept-specific features: SAeUron's own selection (no specificity floor) takes 3.
    code, out, err = learn(capsys, files, "cat", "--min-specificity", "0")
    assert code == 0, err
    assert f"learned concept 'cat': 3 selected features per timestep" in out and str(files / "s.safetensors") in out
    assert "t=" in out.splitlines()[1]
    sae = load_sae(files / "s.safetensors")
    assert concept_names(sae) == ["cat"]
    assert get_concept(sae, "cat").info["steps"] == 4
    for name, tensor in before.tensors().items():  # weights are untouched
        assert torch.equal(tensor, sae.tensors()[name])
    code, out, _ = run_cli(capsys, "info", files / "s.safetensors")
    assert code == 0
    assert "concepts:    cat" in out
    line = next(x for x in out.splitlines() if x.strip().startswith("cat: "))
    assert "4/50 timestep buckets observed" in line and "t=" in line
    code, out, _ = run_cli(capsys, "info", "--json", files / "s.safetensors")
    details = json.loads(out)["concept_details"]["cat"]
    assert details["observed_buckets"] == 4 and len(details["selected"]) == 3


def test_second_concept_keeps_the_first_and_out_leaves_the_source(capsys, learned):
    first = get_concept(load_sae(learned / "s.safetensors"), "cat")
    out_path = learned / "copy.safetensors"
    code, out, err = learn(capsys, learned, "red things", "--quantile", "0.9", "--seeds", "0,1", "--out", out_path,
                           "--min-specificity", "0")
    assert code == 0, err
    assert concept_names(load_sae(learned / "s.safetensors")) == ["cat"]
    sae = load_sae(out_path)
    assert concept_names(sae) == ["cat", "red things"]
    again = get_concept(sae, "cat")
    for field in ("feature_ids", "scores", "mu", "threshold", "n_selected", "observed"):
        assert torch.equal(getattr(first, field), getattr(again, field)), field
    assert get_concept(sae, "red things").info["selection"] == {"top_n": None, "quantile": 0.9, "min_specificity": 0.0}


def test_learn_concept_on_a_sparsify_folder(capsys, files):
    folder = files / "unet.up_blocks.1.attentions.1"
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in random_sae().tensors().items()}, str(folder / "sae.safetensors"))
    (folder / "cfg.json").write_text(json.dumps({"d_in": 32, "num_latents": 128, "k": 8}))
    args = ["learn-concept", folder, "--concept", "cat", "--positive", files / "pos.txt", "--negative",
            files / "neg.txt", "--model", tiny_model(), "--steps", STEPS]
    assert_user_error(*run_cli(capsys, *args)[::2], "is a sparsify folder, which is never modified; pass --out")
    assert_user_error(*run_cli(capsys, *args, "--out", files / "n.st")[::2], "ending in .safetensors")
    code, _, err = run_cli(capsys, *args, "--out", files / "n.safetensors")
    assert code == 0, err
    assert concept_names(load_sae(files / "n.safetensors")) == ["cat"]
    assert sorted(p.name for p in folder.iterdir()) == ["cfg.json", "sae.safetensors"]


def test_remove_concept(capsys, learned):
    sae = load_sae(learned / "s.safetensors")
    add_concept(sae, fake_concept("dog"))
    save_sae(sae, learned / "s.safetensors")
    assert_user_error(*run_cli(capsys, "remove-concept", learned / "s.safetensors", "--concept", "cow")[::2],
                      "unknown concept 'cow'; this SAE knows: 'cat', 'dog'")
    code, out, err = run_cli(capsys, "remove-concept", learned / "s.safetensors", "--concept", "cat",
                             "--out", learned / "r.safetensors")
    assert code == 0, err
    assert "remaining: dog" in out
    assert concept_names(load_sae(learned / "r.safetensors")) == ["dog"]
    assert not any(k.startswith("concepts.cat") for k in load_sae(learned / "r.safetensors").extra_tensors)
    code, out, _ = run_cli(capsys, "remove-concept", learned / "s.safetensors", "--concept", "dog")
    assert code == 0 and concept_names(load_sae(learned / "s.safetensors")) == ["cat"]


def erase_args(files, *extra, prompts=("a cat", "a red cat")):
    args = ["erase", "--model", tiny_model(), "--sae", files / "s.safetensors", "--concept", "cat", "--steps", STEPS,
            "--seed", "1", "--out", files / "grid.png"]
    for p in prompts:
        args += ["--prompt", p]
    return [*args, *extra]


@pytest.mark.parametrize("extra", [["--strength", "2"], ["--method", "replace", "--cfg", "cond", "--end", "0.8"]])
def test_erase_writes_a_before_after_grid(capsys, learned, extra):
    code, out, err = run_cli(capsys, *erase_args(learned, *extra))
    assert code == 0, err
    assert "wrote 2 before/after pairs (32x32 px" in out and str(learned / "grid.png") in out
    grid = px(learned / "grid.png")
    assert grid.shape == (2 * 16, 2 * 16, 3)  # 2 prompts x (before | after) of 16 px images
    assert not torch.equal(grid[:, :16], grid[:, 16:])


def test_erase_strength_zero_changes_nothing(capsys, learned):
    code, _, err = run_cli(capsys, *erase_args(learned, "--strength", "0", prompts=("a cat", "a red cat", "a dog")))
    assert code == 0, err
    grid = px(learned / "grid.png")
    assert grid.shape == (3 * 16, 2 * 16, 3)
    assert torch.equal(grid[:, :16], grid[:, 16:])


def test_inspect_command(capsys, learned):
    code, out, err = run_cli(capsys, "inspect", "--model", tiny_model(), "--sae", learned / "s.safetensors", "--prompt",
                             "a red cat", "--concept", "cat", "--steps", STEPS, "--top", "3", "--out",
                             learned / "o.png")
    assert code == 0, err
    steps = [line for line in out.splitlines() if line.startswith("step")]
    assert len(steps) == 4 and all("cat:" in s for s in steps)
    assert "wrote heat map of 'cat'" in out
    assert px(learned / "o.png").shape == (16, 16, 3)
    code, out, err = run_cli(capsys, "inspect", "--model", tiny_model(), "--sae", learned / "s.safetensors", "--prompt",
                             "a red cat", "--steps", "2", "--out", learned / "plain.png")
    assert code == 0, err
    assert "image (no concept given)" in out and len(out.splitlines()) == 3


def test_user_errors_exit_2_with_one_line(capsys, learned):
    f = learned
    assert_user_error(*run_cli(capsys, *erase_args(f, "--strength", "101"))[::2], "strength must be between 0 and 100")
    assert_user_error(*run_cli(capsys, *erase_args(f, "--method", "replace", "--strength", "1.5"))[::2],
                      "between 0 and 1 for method 'replace'")
    assert_user_error(*run_cli(capsys, *erase_args(f, "--strength", "nan"))[::2], "strength")
    assert_user_error(*run_cli(capsys, *erase_args(f, "--start", "0.9", "--end", "0.1"))[::2], "start <= end")
    assert_user_error(*run_cli(capsys, *erase_args(f, "--concept", "dog"))[::2], "unknown concept 'dog'; this SAE knows: 'cat'")
    assert_user_error(*run_cli(capsys, *erase_args(f, "--min-coverage", "2"))[::2], "min_coverage must be between 0 and 1")
    assert_user_error(*run_cli(capsys, *erase_args(f, "--min-coverage", "0.1", "--detect-with", "cat=cat (d)"))[::2],
                      "unknown concept 'cat (d)'; this SAE knows: 'cat'")
    assert_user_error(*run_cli(capsys, *erase_args(f, "--detect-with", "cat"))[::2], "--detect-with takes CONCEPT=ENTRY")
    assert_user_error(*run_cli(capsys, "inspect", "--model", tiny_model(), "--sae", f / "s.safetensors", "--prompt", "a cat",
                               "--concept", "dog", "--out", f / "o.png")[::2], "unknown concept 'dog'")
    assert_user_error(*run_cli(capsys, *erase_args(f, "--out", f / "grid.jpg"))[::2], "ending in .png")
    assert_user_error(*run_cli(capsys, "erase", "--model", tiny_model(), "--sae", f / "s.safetensors", "--concept", "cat",
                               "--out", f / "g.png")[::2], "required: --prompt")
    assert_user_error(*run_cli(capsys, *erase_args(f, "--method", "zap"))[::2], "invalid choice")
    assert_user_error(*run_cli(capsys, "learn-concept", f / "s.safetensors", "--concept", "x", "--positive", f / "pos.txt",
                               "--negative", f / "neg.txt", "--model", tiny_model(), "--top-n", "2", "--quantile", "0.9")[::2],
                      "not allowed with argument")
    for bad in (["--top-n", "0"], ["--quantile", "1.5"], ["--min-specificity", "1"], ["--peak-specificity", "-0.5"]):
        assert_user_error(*run_cli(capsys, "learn-concept", f / "s.safetensors", "--concept", "x", "--positive",
                                   f / "pos.txt", "--negative", f / "neg.txt", "--model", tiny_model(), *bad)[::2],
                          "must be")
    assert_user_error(*run_cli(capsys, "learn-concept", f / "s.safetensors", "--concept", "x", "--positive",
                               f / "none.txt", "--negative", f / "neg.txt", "--model", tiny_model())[::2], "cannot read prompts")
    # An SAE for a 16-channel block on the 32-channel tiny model.
    wide = random_sae(d_in=16)
    add_concept(wide, fake_concept("cat"))
    save_sae(wide, f / "wide.safetensors")
    mismatch = "the SAE expects 16 channels but 'up_blocks.1.attentions.1' of this model has 32"
    assert_user_error(*run_cli(capsys, "erase", "--model", tiny_model(), "--sae", f / "wide.safetensors", "--concept", "cat",
                               "--prompt", "a cat", "--out", f / "g.png")[::2], mismatch)
    assert_user_error(*run_cli(capsys, "inspect", "--model", tiny_model(), "--sae", f / "wide.safetensors", "--prompt", "a cat",
                               "--out", f / "g.png")[::2], mismatch)
    assert_user_error(*run_cli(capsys, "learn-concept", f / "wide.safetensors", "--concept", "x", "--positive",
                               f / "pos.txt", "--negative", f / "neg.txt", "--model", tiny_model())[::2], mismatch)
    assert not (f / "g.png").exists() and not (f / "grid.png").exists()


# -- single-file checkpoints ------------------------------------------------------------------

def _unet_to_ldm(sd, layers=2):
    """diffusers UNet keys -> original SD ``model.diffusion_model.*`` keys (any number of levels)."""
    fixed = [("time_embed.0.", "time_embedding.linear_1."), ("time_embed.2.", "time_embedding.linear_2."),
             ("input_blocks.0.0.", "conv_in."), ("out.0.", "conv_norm_out."), ("out.2.", "conv_out."),
             ("middle_block.1.", "mid_block.attentions.0."), ("middle_block.0.", "mid_block.resnets.0."),
             ("middle_block.2.", "mid_block.resnets.1.")]
    resnet = [("in_layers.0.", "norm1."), ("in_layers.2.", "conv1."), ("out_layers.0.", "norm2."),
              ("out_layers.3.", "conv2."), ("emb_layers.1.", "time_emb_proj."), ("skip_connection.", "conv_shortcut.")]
    out = {}
    for key, value in sd.items():
        parts = key.split(".")
        new = key
        if parts[0] in ("down_blocks", "up_blocks"):
            i, kind, j, rest = int(parts[1]), parts[2], int(parts[3]), ".".join(parts[4:])
            if parts[0] == "down_blocks":
                slot = {"resnets": f"{(layers + 1) * i + j + 1}.0", "attentions": f"{(layers + 1) * i + j + 1}.1",
                        "downsamplers": f"{(layers + 1) * (i + 1)}.0.op"}[kind]
                new = f"input_blocks.{slot}.{rest}".replace("op.conv.", "op.")
            else:
                has_attn = any(k.startswith(f"up_blocks.{i}.attentions.") for k in sd)
                slot = {"resnets": f"{(layers + 1) * i + j}.0", "attentions": f"{(layers + 1) * i + j}.1",
                        "upsamplers": f"{(layers + 1) * i + layers}.{2 if has_attn else 1}"}[kind]
                new = f"output_blocks.{slot}.{rest}"
        else:
            for sd_prefix, hf_prefix in fixed:
                if key.startswith(hf_prefix):
                    new = sd_prefix + key[len(hf_prefix):]
                    break
        if ".resnets." in key:
            for sd_part, hf_part in resnet:
                new = new.replace("." + hf_part, "." + sd_part)
        out["model.diffusion_model." + new] = value
    return out


def _vae_to_ldm(sd, levels=2):
    out = {}
    for key, value in sd.items():
        new = key
        for i in range(levels):
            new = (new.replace(f"encoder.down_blocks.{i}.resnets.", f"encoder.down.{i}.block.")
                   .replace(f"encoder.down_blocks.{i}.downsamplers.0.", f"encoder.down.{i}.downsample.")
                   .replace(f"decoder.up_blocks.{i}.resnets.", f"decoder.up.{levels - 1 - i}.block.")
                   .replace(f"decoder.up_blocks.{i}.upsamplers.0.", f"decoder.up.{levels - 1 - i}.upsample."))
        for hf, ldm in [("mid_block.resnets.0.", "mid.block_1."), ("mid_block.resnets.1.", "mid.block_2."),
                        ("mid_block.attentions.0.", "mid.attn_1."), ("conv_shortcut", "nin_shortcut"),
                        ("conv_norm_out", "norm_out"), ("attn_1.group_norm.", "attn_1.norm."),
                        ("attn_1.to_q.", "attn_1.q."), ("attn_1.to_k.", "attn_1.k."), ("attn_1.to_v.", "attn_1.v."),
                        ("attn_1.to_out.0.", "attn_1.proj_out.")]:
            new = new.replace(hf, ldm)
        if ".attn_1." in new and new.endswith("weight") and ".norm." not in new:
            value = value[:, :, None, None]  # the original VAE attention uses 1x1 convolutions
        out["first_stage_model." + new] = value
    return out


def write_single_file(pipe, path):
    """The tiny pipeline's weights in the original SD 1.x single-file layout."""
    ckpt = {**_unet_to_ldm(pipe.unet.state_dict()), **_vae_to_ldm(pipe.vae.state_dict()),
            **{f"cond_stage_model.transformer.text_model.{k}": v for k, v in pipe.text_encoder.state_dict().items()}}
    save_file({k: v.contiguous() for k, v in ckpt.items()}, str(path))


def test_single_file_checkpoint_with_local_config(capsys, tmp_path, learned):
    pipe = make_tiny_pipeline(0)
    pipe.save_pretrained(str(tmp_path / "cfg"), safe_serialization=True)
    write_single_file(pipe, tmp_path / "tiny.safetensors")
    loaded = load_pipeline(str(tmp_path / "tiny.safetensors"), config=str(tmp_path / "cfg"))
    for name in ("unet", "vae", "text_encoder"):
        ref, got = getattr(pipe, name).state_dict(), getattr(loaded, name).state_dict()
        assert ref.keys() == got.keys(), name
        assert all(torch.equal(ref[k], got[k].reshape(ref[k].shape)) for k in ref), name
    code, _, err = run_cli(capsys, *erase_args(learned, "--out", learned / "a.png"))
    assert code == 0, err
    code, _, err = run_cli(capsys, *erase_args(learned, "--out", learned / "b.png", "--model", tmp_path / "tiny.safetensors",
                                               "--config", tmp_path / "cfg"))
    assert code == 0, err
    a, b = px(learned / "a.png"), px(learned / "b.png")
    assert torch.equal(a[:, :16], b[:, :16])  # before: bit-identical generations
    assert (a - b).abs().max() <= 1  # after: float rounding in the erased run may flip a pixel by one level


def test_single_file_errors(capsys, tmp_path, learned):
    (tmp_path / "m.ckpt").write_bytes(b"\x80\x02")
    base = ["inspect", "--sae", learned / "s.safetensors", "--prompt", "a cat", "--out", tmp_path / "o.png"]
    assert_user_error(*run_cli(capsys, *base, "--model", tmp_path / "m.ckpt")[::2],
                      "'.ckpt' checkpoints are pickle-based and are never loaded")
    assert "safetensors" in str(pytest.raises(ConfigError, load_pipeline, str(tmp_path / "m.ckpt")).value)
    torch.save({"a": torch.zeros(1)}, tmp_path / "renamed.safetensors")
    assert_user_error(*run_cli(capsys, *base, "--model", tmp_path / "renamed.safetensors")[::2], "never unpickled")
    save_file({"unrelated": torch.zeros(2)}, str(tmp_path / "x.safetensors"))
    assert_user_error(*run_cli(capsys, *base, "--model", tmp_path / "x.safetensors")[::2],
                      "not available offline (LocalEntryNotFoundError); pass --config with a local diffusers "
                      "pipeline folder of the same model family")
    assert_user_error(*run_cli(capsys, *base, "--model", tmp_path / "x.safetensors", "--config", tmp_path)[::2],
                      "containing model_index.json")
    make_tiny_pipeline(0).save_pretrained(str(tmp_path / "cfg"), safe_serialization=True)
    capsys.readouterr()  # save_pretrained's progress bar
    assert_user_error(*run_cli(capsys, *base, "--model", tmp_path / "x.safetensors", "--config", tmp_path / "cfg")[::2],
                      "could not load this single-file checkpoint with the configs of")
    assert not (tmp_path / "o.png").exists()


@pytest.mark.slow
def test_installed_script(files):
    """The installed ``saeuron`` script end to end (one process per command)."""
    exe = Path(sys.executable).with_name("saeuron")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "saeuron_core"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run([*cmd, "learn-concept", str(files / "s.safetensors"), "--concept", "cat", "--positive",
                        str(files / "pos.txt"), "--negative", str(files / "neg.txt"), "--model", tiny_model(), "--steps", "3",
                        "--min-specificity", "0"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("learned concept 'cat': 3 selected features per timestep")
    assert "learn cat" not in p.stderr  # no progress bar when stderr is not a terminal
    assert concept_names(load_sae(files / "s.safetensors")) == ["cat"]
    p = subprocess.run([*cmd, "remove-concept", str(files / "s.safetensors"), "--concept", "nope"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 2 and p.stderr.strip() == "error: unknown concept 'nope'; this SAE knows: 'cat'"


def test_learn_concept_library_learns_several_from_one_file(capsys, files):
    spec = {"cat": {"positive": ["a cat", "a red cat"], "negative": ["a dog", "a green tree"]},
            "dog": {"positive": ["a dog"], "negative": ["a cat", "a green tree"]}}
    (files / "lib.json").write_text(json.dumps(spec))
    code, out, err = run_cli(capsys, "learn-concept", files / "s.safetensors", "--library", files / "lib.json",
                             "--model", tiny_model(), "--steps", STEPS)
    assert code == 0, err
    assert "learned concept 'cat'" in out and "learned concept 'dog'" in out
    sae = load_sae(files / "s.safetensors")
    assert concept_names(sae) == ["cat", "dog"]
    assert get_concept(sae, "dog").info["positive"] == ["a dog"]
    # Specificity against each negative prompt as well: recorded with the concept.
    code, out, err = run_cli(capsys, "learn-concept", files / "s.safetensors", "--library", files / "lib.json",
                             "--model", tiny_model(), "--steps", STEPS, "--min-specificity", "0", "--peak-specificity", "0")
    assert code == 0, err
    assert get_concept(load_sae(files / "s.safetensors"), "cat").info["selection"]["peak_specificity"] == 0.0


@pytest.mark.parametrize("content, extra, message", [
    ("{not json", [], "not valid JSON"),
    ("[]", [], "expected a non-empty object"),
    ('{"cat": {"positive": ["a cat"]}}', [], "concept 'cat' needs 'positive' and 'negative' lists"),
    ('{"cat": {"positive": ["a cat"], "negative": ["a dog"]}}', ["--concept", "cat"], "--library replaces"),
])
def test_learn_concept_library_errors(capsys, files, content, extra, message):
    (files / "lib.json").write_text(content)
    code, _, err = run_cli(capsys, "learn-concept", files / "s.safetensors", "--library", files / "lib.json",
                           "--model", tiny_model(), "--steps", STEPS, *extra)
    assert_user_error(code, err, message)


def test_learn_concept_needs_a_concept_or_a_library(capsys, files):
    code, _, err = run_cli(capsys, "learn-concept", files / "s.safetensors", "--model", tiny_model())
    assert_user_error(code, err, "give --concept, --positive and --negative")
