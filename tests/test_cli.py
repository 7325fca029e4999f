import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from cli_helpers import assert_user_error, run_cli, tiny_model
from planted import concept
from safetensors.torch import save_file

from saeuron_core.sae.files import load_sae, save_sae
from saeuron_core.sae.library import add_concept
from saeuron_core.sae.model import SAEConfig, TopKSAE


@pytest.fixture()
def sae_file(tmp_path):
    path = tmp_path / "s.safetensors"
    sae = TopKSAE(SAEConfig(d_in=8, n_latents=32, k=4, hook_point="up_blocks.1.attentions.1", model_family="sd1"))
    for name in ("cat", "van gogh"):
        add_concept(sae, concept(name, {range(50): [3]}))
    save_sae(sae, path)
    return path


def test_info_text_and_json(capsys, sae_file):
    code, out, _ = run_cli(capsys, "info", str(sae_file))
    assert code == 0
    assert "format:      native" in out and "n_latents:   32" in out and "up_blocks.1.attentions.1" in out
    assert "cat, van gogh" in out
    code, out, _ = run_cli(capsys, "info", "--json", str(sae_file))
    assert code == 0 and json.loads(out)["k"] == 4


def test_convert_sparsify_folder(capsys, tmp_path):
    folder = tmp_path / "unet.up_blocks.1.attentions.2"
    folder.mkdir()
    save_file({"encoder.weight": torch.randn(32, 8), "encoder.bias": torch.zeros(32), "W_dec": torch.randn(32, 8),
               "b_dec": torch.zeros(8)}, str(folder / "sae.safetensors"))
    (folder / "cfg.json").write_text(json.dumps({"d_in": 8, "num_latents": 32, "k": 4, "expansion_factor": 4}))
    code, out, _ = run_cli(capsys, "convert", str(folder), str(tmp_path / "n.safetensors"))
    assert code == 0 and "wrote" in out
    assert load_sae(tmp_path / "n.safetensors").config.hook_point == "up_blocks.1.attentions.2"


def test_user_errors_exit_2_with_one_line(capsys, tmp_path, sae_file):
    assert_user_error(*run_cli(capsys, "info", str(tmp_path / "missing.safetensors"))[::2], "no such file")
    (tmp_path / "model.ckpt").write_bytes(b"\x80\x02")
    assert_user_error(*run_cli(capsys, "info", str(tmp_path / "model.ckpt"))[::2], "pickle-based")
    torch.save({"a": torch.zeros(1)}, tmp_path / "renamed.safetensors")
    assert_user_error(*run_cli(capsys, "info", str(tmp_path / "renamed.safetensors"))[::2], "never unpickled")
    data = sae_file.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    assert_user_error(*run_cli(capsys, "info", str(tmp_path / "cut.safetensors"))[::2], "truncated")
    assert_user_error(*run_cli(capsys, "train", "--store", str(tmp_path))[::2], "required: --out")
    assert_user_error(*run_cli(capsys, "train", "--store", str(tmp_path), "--out", "x.safetensors", "--steps", "2")[::2],
                      "not an activation store")
    assert_user_error(*run_cli(capsys, "collect", "--model", tiny_model(), "--prompts", str(tmp_path / "none.txt"),
                               "--out", str(tmp_path / "o"))[::2], "cannot read prompts")
    (tmp_path / "p.txt").write_text("a cat\n")
    assert_user_error(*run_cli(capsys, "collect", "--model", str(tmp_path), "--prompts", str(tmp_path / "p.txt"),
                               "--out", str(tmp_path / "o"))[::2], "model_index.json")
    assert_user_error(*run_cli(capsys, "collect", "--model", tiny_model(), "--prompts", "p", "--out", "o",
                               "--seeds", "a,b")[::2], "expected seeds")
    assert_user_error(*run_cli(capsys, "bogus")[::2], "invalid choice")


def _saeuron(*args, **kw):
    exe = Path(sys.executable).with_name("saeuron")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "saeuron_core"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([*cmd, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, **kw)


@pytest.mark.slow
def test_end_to_end_and_sigkill_resume(tmp_path):
    """Installed script: make a pipeline folder, collect, train; SIGKILL training and resume to the same SAE."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cat\na blue dog\na green tree\n")
    assert _saeuron("make-tiny-pipeline", str(tmp_path / "pipe")).wait() == 0
    p = _saeuron("collect", "--model", str(tmp_path / "pipe"), "--prompts", str(prompts), "--out", str(tmp_path / "st"),
                 "--steps", "6", "--seeds", "0-3", "--rows-per-shard", "12", "--guidance", "4")
    out, err = p.communicate()
    assert p.returncode == 0, err
    assert "collected 72 maps" in out

    train = ["train", "--store", str(tmp_path / "st"), "--expansion-factor", "8", "--k", "8", "--batch-size", "512",
             "--steps", "1500", "--lr", "1e-3", "--checkpoint-every", "100", "--log-every", "100"]
    p = _saeuron(*train, "--out", str(tmp_path / "a.safetensors"))
    out, err = p.communicate()
    assert p.returncode == 0, err
    assert "FVU" in out

    ckpt = tmp_path / "b.safetensors.ckpt.safetensors"
    p = _saeuron(*train, "--out", str(tmp_path / "b.safetensors"))
    deadline = time.time() + 120
    while not ckpt.exists() and time.time() < deadline and p.poll() is None:
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.communicate()
    assert p.returncode == -signal.SIGKILL, "training finished before it could be killed"
    assert not (tmp_path / "b.safetensors").exists()
    p = _saeuron(*train, "--out", str(tmp_path / "b.safetensors"))
    out, err = p.communicate()
    assert p.returncode == 0, err
    a, b = load_sae(tmp_path / "a.safetensors"), load_sae(tmp_path / "b.safetensors")
    for name, tensor in a.tensors().items():
        assert torch.equal(tensor, b.tensors()[name]), name
    p = _saeuron("info", str(tmp_path / "b.safetensors"))
    out, _ = p.communicate()
    assert "n_latents:   256" in out and "up_blocks.1.attentions.1" in out


@pytest.mark.slow
@pytest.mark.parametrize("shards_before_kill", [1, 3])
def test_sigkill_during_collection_then_resume_gives_the_same_store(tmp_path, shards_before_kill):
    from saeuron_core.data.store import ActivationStore

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(f"a {c} {o}" for c in ("red", "blue", "green") for o in ("cat", "dog", "tree")))
    args = ["collect", "--model", tiny_model(), "--prompts", str(prompts), "--steps", "6", "--seeds", "0-3",
            "--batch-size", "2", "--rows-per-shard", "12"]
    p = _saeuron(*args, "--out", str(tmp_path / "full"))
    assert p.wait() == 0
    p = _saeuron(*args, "--out", str(tmp_path / "killed"))
    deadline = time.time() + 120
    while time.time() < deadline and p.poll() is None:
        manifest = tmp_path / "killed" / "manifest.json"
        if manifest.exists() and len(json.loads(manifest.read_text())["shards"]) >= shards_before_kill:
            break
        time.sleep(0.02)
    p.send_signal(signal.SIGKILL)
    p.communicate()
    assert p.returncode == -signal.SIGKILL, "collection finished before it could be killed"
    assert _saeuron(*args, "--out", str(tmp_path / "killed")).wait() == 0
    full, resumed = ActivationStore(tmp_path / "full"), ActivationStore(tmp_path / "killed")
    assert resumed.complete and [s.__dict__ for s in full.shards] == [s.__dict__ for s in resumed.shards]
    for i in range(len(full.shards)):
        (a, ra), (b, rb) = full.load_shard(i), resumed.load_shard(i)
        assert torch.equal(a, b) and all(torch.equal(ra[k], rb[k]) for k in ra)


def test_parse_seeds_takes_lists_and_inclusive_ranges():
    from saeuron_cli import parse_seeds
    assert parse_seeds("500-503") == [500, 501, 502, 503]
    assert parse_seeds("500,501") == [500, 501]
    assert parse_seeds("7") == [7]


def test_collect_and_train_a_residual_sae(capsys, tmp_path):
    """``collect --residual`` records the block's update (output - input); the SAE trained on it says so."""
    from saeuron_core.data.store import ActivationStore

    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\na dog\n")
    stores = {}
    for name, extra in (("out", []), ("res", ["--residual"])):
        code, _, err = run_cli(capsys, "collect", "--model", tiny_model(), "--prompts", str(prompts), "--out",
                               str(tmp_path / name), "--steps", "2", "--batch-size", "2", *extra)
        assert code == 0, err
        stores[name] = ActivationStore(tmp_path / name)
    assert stores["res"].manifest["config"]["residual"] is True and stores["out"].manifest["config"]["residual"] is False
    first = {name: store.load_shard(0)[0] for name, store in stores.items()}
    assert first["res"].shape == first["out"].shape and not torch.equal(first["res"], first["out"])
    code, _, err = run_cli(capsys, "train", "--store", str(tmp_path / "res"), "--out", str(tmp_path / "r.safetensors"),
                           "--expansion-factor", "2", "--k", "4", "--steps", "2", "--batch-size", "32")
    assert code == 0, err
    assert load_sae(tmp_path / "r.safetensors").config.residual
    code, out, _ = run_cli(capsys, "info", str(tmp_path / "r.safetensors"))
    assert code == 0 and "reads its residual update" in out


def test_fields_make_options_from_a_dataclass_and_build_it_back():
    """``cli.fields.Fields``: type, choices, default and help from the dataclass; the command's flag and words win."""
    import argparse
    from dataclasses import dataclass, field
    from typing import Literal, Optional

    from saeuron_cli import parse_seeds
    from saeuron_cli.fields import Fields

    @dataclass
    class Cfg:
        name: str
        steps: int = 5
        rate: Optional[float] = None
        mode: Literal["a", "b"] = "a"
        switch: bool = False
        seeds: list[int] = field(default_factory=lambda: [0])
        scale: float = field(default=1.0, metadata={"help": "from metadata"})
        hidden: int = 7

    fields = Fields(Cfg, ("name", "steps", "rate", "mode", "switch", "seeds", "scale"), flags={"steps": "--n-steps"},
                    help={"steps": "own words"}, types={"seeds": parse_seeds})
    p = argparse.ArgumentParser(exit_on_error=False)
    fields.add_to(p)
    by_dest = {a.dest: a for a in p._actions}
    assert by_dest["n_steps"].help == "own words" and by_dest["scale"].help == "from metadata"
    assert by_dest["mode"].choices == ["a", "b"] and by_dest["rate"].type is float and by_dest["name"].required
    a = p.parse_args(["--name", "x", "--n-steps", "3", "--switch", "--seeds", "1-2", "--rate", "0.5"])
    assert fields.build(a, hidden=9) == Cfg("x", 3, 0.5, "a", True, [1, 2], 1.0, 9)
    assert fields.build(p.parse_args(["--name", "y"])) == Cfg("y")
    with pytest.raises(argparse.ArgumentError):
        p.parse_args(["--name", "x", "--mode", "c"])
    with pytest.raises(TypeError, match="no field nope"):
        Fields(Cfg, ("nope",))
    with pytest.raises(TypeError, match="no command-line type"):
        Fields(Cfg, ("seeds",)).add_to(argparse.ArgumentParser())


def test_every_eraser_option_is_offered_or_said_why_not():
    """Each EraseOptions field is a node input or a flag of erase or eval (as its metadata and the evaluation's
    replace options say), or NOT_EXPOSED gives the reason it is neither."""
    from dataclasses import fields

    from saeuron_cli import build_parser
    from saeuron_cli.erase import erase_fields
    from saeuron_cli.evaluate import replace_fields
    from saeuron_core.erasure.options import NOT_EXPOSED, EraseOptions

    names = [f.name for f in fields(EraseOptions)]
    subs = next(a for a in build_parser()._actions if a.dest == "command").choices
    node = {f.name for f in fields(EraseOptions) if "node" in f.metadata}
    erase = {*erase_fields().names, "detect_with"}  # --detect-with is read apart (repeatable pairs)
    evaluate = set(replace_fields().names)
    assert erase <= {a.dest for a in subs["erase"]._actions}
    assert {replace_fields().dest(n) for n in evaluate} <= {a.dest for a in subs["eval"]._actions}
    offered = node | erase | evaluate
    assert not offered & set(NOT_EXPOSED) and offered | set(NOT_EXPOSED) == set(names)
    assert all(NOT_EXPOSED.values())


def test_train_online_takes_collects_sampling_options():
    """The options both commands make from CollectConfig: the same defaults; two of them renamed for train."""
    from saeuron_cli import build_parser

    subs = next(a for a in build_parser()._actions if a.dest == "command").choices
    collect = {a.dest: a.default for a in subs["collect"]._actions}
    train = {a.dest: a.default for a in subs["train"]._actions}
    renamed = {"steps": "sampling_steps", "batch_size": "gen_batch_size"}
    for name in ("hook_point", "model_family", "steps", "guidance", "scheduler", "seeds", "every_n_steps", "halves",
                 "residual", "tokens_per_map", "height", "width", "batch_size", "dtype"):
        assert train[renamed.get(name, name)] == collect[name], name
