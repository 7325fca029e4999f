"""An evaluation stopped part way resumes from its checkpoint and measures nothing twice."""

from __future__ import annotations

import json

import pytest
from cli_helpers import assert_user_error, run_cli

from saeuron_core.errors import ConfigError
from saeuron_core.sae.files import load_sae
from saeuron_core.sae.library import remove_concept
from saeuron_core.sae.model import SAEConfig, TopKSAE
from saeuron_demo.evaluation.checkpoint import Checkpoint, sae_fingerprint


def test_finished_parts_are_kept_and_not_computed_again(tmp_path) -> None:
    path = str(tmp_path / "parts.jsonl")
    calls = []

    def compute(value):
        calls.append(value)
        return {"UA": value}

    first = Checkpoint(path, {"seeds": [1, 2]})
    assert first.part("a", lambda: compute(0.5)) == {"UA": 0.5}
    assert first.part("a", lambda: compute(0.9)) == {"UA": 0.5} and calls == [0.5]
    again = Checkpoint(path, {"seeds": [1, 2]})
    assert again.done("a") and not again.done("b")
    assert again.part("a", lambda: compute(0.9)) == {"UA": 0.5} and calls == [0.5]
    assert again.part("b", lambda: compute(0.25)) == {"UA": 0.25}
    assert again.seconds() >= 0 and again.seconds(["a"]) == first.seconds(["a"])


def test_a_line_cut_short_by_a_kill_is_dropped(tmp_path) -> None:
    path = tmp_path / "parts.jsonl"
    Checkpoint(str(path), {"n": 1}).part("a", lambda: 1)
    with open(path, "a", encoding="utf-8") as f:
        f.write('{"part": "b", "seconds": 3.0, "val')
    resumed = Checkpoint(str(path), {"n": 1})
    assert resumed.done("a") and not resumed.done("b")
    assert resumed.part("b", lambda: 2) == 2
    assert [json.loads(line)["part"] for line in path.read_text().splitlines()[1:]] == ["a", "b"]


def test_another_plan_or_a_foreign_file_is_refused(tmp_path) -> None:
    path = str(tmp_path / "parts.jsonl")
    Checkpoint(path, {"seeds": [1], "concepts": ["star"]})
    with pytest.raises(ConfigError, match="made by a run with other concepts, seeds; resume it with the same"):
        Checkpoint(path, {"seeds": [2], "concepts": ["ring"]})
    (tmp_path / "other.jsonl").write_text('{"seeds": [1]}\n{"x": 1}\n')
    with pytest.raises(ConfigError, match="is not an evaluation checkpoint"):
        Checkpoint(str(tmp_path / "other.jsonl"), {"seeds": [1]})
    (tmp_path / "broken.jsonl").write_text('{"plan": {}}\nnot json\n{"part": "a"}\n')
    with pytest.raises(ConfigError, match="line 2 is not JSON"):
        Checkpoint(str(tmp_path / "broken.jsonl"), {})


def test_the_fingerprint_follows_the_weights_and_the_library() -> None:
    from saeuron_demo.assets import ASSETS, STYLE_SAE

    sae = load_sae(ASSETS / STYLE_SAE)
    before = sae_fingerprint(sae)
    assert sae_fingerprint(sae) == before
    remove_concept(sae, sorted(sae.concepts)[0])
    assert sae_fingerprint(sae) != before
    other = TopKSAE(SAEConfig(d_in=8, n_latents=16, k=2))
    assert sae_fingerprint(other) != sae_fingerprint(TopKSAE(SAEConfig(d_in=8, n_latents=16, k=2)))


@pytest.mark.slow
def test_a_stopped_eval_resumes_to_the_same_report(capsys, tmp_path) -> None:
    parts = tmp_path / "parts.jsonl"
    args = ("eval", "--quick", "--concepts", "stripes", "--checkpoint", parts)
    code, _, err = run_cli(capsys, *args, "--json", tmp_path / "whole.json")
    assert code == 0, err
    lines = parts.read_text().splitlines()
    assert [json.loads(line).get("part") for line in lines] == [
        None, "clean", "none/stripes", "negative_prompt/stripes", "ablate/stripes", "replace/stripes",
        "defaults/ablate/stripes", "defaults/replace/stripes"]
    # Stopped while writing the replace row: the rows before it are taken from the file, the rest measured again.
    parts.write_text("\n".join(lines[:5]) + "\n" + lines[5][:40])
    code, _, err = run_cli(capsys, *args, "--json", tmp_path / "resumed.json")
    assert code == 0, err
    assert "resuming from" in err and "4 parts done" in err
    # Only the node-default ablation is generated again (the tuned one was kept); both replace rows are.
    assert err.count("ablate [stripes]") == 1 and err.count("replace [stripes]") == 2
    whole, resumed = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("whole", "resumed"))
    assert resumed["seconds"] > 0
    assert {k: v for k, v in resumed.items() if k != "seconds"} == {k: v for k, v in whole.items() if k != "seconds"}
    code, _, err = run_cli(capsys, "eval", "--quick", "--concepts", "star", "--checkpoint", parts)
    assert_user_error(code, err, "was made by a run with other concepts")
