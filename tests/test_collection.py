import json

import pytest
import torch
from conftest import HOOK

from saeuron_core.data.collection import CollectConfig, collect_activations, read_prompts
from saeuron_core.data.store import ActivationStore
from saeuron_core.errors import ConfigError, StoreError
from saeuron_core.hosts.hooks import pipeline_hook

PROMPTS = ["a red cat", "a blue dog", "a green tree"]


def cfg(**over):
    base = dict(hook_point=HOOK, steps=4, guidance_scale=5.0, seeds=[0, 1], batch_size=2, rows_per_shard=6)
    base.update(over)
    return CollectConfig(**base)


def shards_equal(a: ActivationStore, b: ActivationStore) -> None:
    assert [s.__dict__ for s in a.shards] == [s.__dict__ for s in b.shards]
    for i in range(len(a.shards)):
        (acts_a, rows_a), (acts_b, rows_b) = a.load_shard(i), b.load_shard(i)
        assert torch.equal(acts_a, acts_b)
        assert rows_a.keys() == rows_b.keys() and all(torch.equal(rows_a[k], rows_b[k]) for k in rows_a)


def test_rows_timesteps_and_manifest(tiny_pipe, tmp_path):
    store = collect_activations(tiny_pipe, PROMPTS, tmp_path / "s", cfg(), progress=False)
    assert store.complete and store.d_in == 32
    rows = store.rows()
    assert store.n_rows == len(PROMPTS) * 2 * 4  # prompts x seeds x steps, conditional half only
    assert store.n_tokens == store.n_rows * 64
    assert set(rows["row_cond"].tolist()) == {1}
    expected_t = set(tiny_pipe.scheduler.timesteps.float().tolist())
    assert set(rows["row_timestep"].tolist()) == expected_t
    pairs = {(int(p), int(s)) for p, s in zip(rows["row_prompt"], rows["row_seed"])}
    assert pairs == {(p, s) for p in range(3) for s in (0, 1)}
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert manifest["prompts"] == PROMPTS and manifest["items_done"] == 6 and manifest["config"]["steps"] == 4
    assert store.load_shard(0)[0].dtype == torch.float16


def test_activations_equal_a_direct_run(tiny_pipe, tmp_path):
    store = collect_activations(tiny_pipe, PROMPTS, tmp_path / "s", cfg(dtype="float32"), progress=False)
    seen = []
    with pipeline_hook(tiny_pipe, HOOK, lambda call: seen.append(call.tokens[call.is_cond][0].clone())):
        tiny_pipe(prompt=[PROMPTS[1]], num_inference_steps=4, guidance_scale=5.0, output_type="latent",
                  generator=[torch.Generator().manual_seed(1)])
    acts = torch.cat([store.load_shard(i)[0] for i in range(len(store.shards))])
    rows = store.rows()
    for step in range(4):
        r = int(((rows["row_prompt"] == 1) & (rows["row_seed"] == 1) & (rows["row_step"] == step)).nonzero())
        torch.testing.assert_close(acts[r * 64:(r + 1) * 64], seen[step], atol=1e-5, rtol=1e-5)


def test_both_halves_every_n_and_subsampling(tiny_pipe, tmp_path):
    store = collect_activations(tiny_pipe, PROMPTS[:2], tmp_path / "s",
                                cfg(halves="both", every_n_steps=2, tokens_per_map=10, seeds=[0]), progress=False)
    rows = store.rows()
    assert store.n_rows == 2 * 2 * 2  # prompts x recorded steps (0, 2) x halves
    assert sorted(set(rows["row_step"].tolist())) == [0, 2]
    assert sorted(set(rows["row_cond"].tolist())) == [0, 1]
    assert store.n_tokens == store.n_rows * 10


def test_interrupted_collection_resumes_to_the_same_store(tiny_pipe, tmp_path):
    full = collect_activations(tiny_pipe, PROMPTS, tmp_path / "full", cfg(), progress=False)

    def stop(info):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        collect_activations(tiny_pipe, PROMPTS, tmp_path / "part", cfg(), progress=False, on_shard=stop)
    partial = ActivationStore(tmp_path / "part")
    assert not partial.complete and 0 < len(partial.shards) < len(full.shards)
    resumed = collect_activations(tiny_pipe, PROMPTS, tmp_path / "part", cfg(), progress=False)
    assert resumed.complete
    shards_equal(full, resumed)


def test_other_settings_on_existing_store_refused(tiny_pipe, tmp_path):
    collect_activations(tiny_pipe, PROMPTS, tmp_path / "s", cfg(), progress=False)
    with pytest.raises(StoreError, match="other settings"):
        collect_activations(tiny_pipe, PROMPTS, tmp_path / "s", cfg(steps=5), progress=False)


def test_euler_scheduler_records_float_timesteps(fresh_tiny_pipe, tmp_path):
    store = collect_activations(fresh_tiny_pipe, PROMPTS[:1], tmp_path / "s", cfg(scheduler="euler", seeds=[0]),
                                progress=False)
    assert store.n_rows == 4 and len(set(store.rows()["row_timestep"].tolist())) == 4


def test_bad_settings_and_prompt_files(tiny_pipe, tmp_path):
    with pytest.raises(ConfigError, match="unknown scheduler"):
        collect_activations(tiny_pipe, PROMPTS, tmp_path / "s", cfg(scheduler="warp"), progress=False)
    with pytest.raises(ConfigError, match="steps must be >= 1"):
        collect_activations(tiny_pipe, PROMPTS, tmp_path / "s", cfg(steps=0), progress=False)
    (tmp_path / "p.txt").write_text("# only a comment\n\n")
    with pytest.raises(ConfigError, match="no prompts"):
        read_prompts(tmp_path / "p.txt")
    (tmp_path / "p.json").write_text('{"a": 1}')
    with pytest.raises(ConfigError, match="JSON list"):
        read_prompts(tmp_path / "p.json")
    (tmp_path / "ok.txt").write_text("a cat\n# skip\n\n a dog \n")
    assert read_prompts(tmp_path / "ok.txt") == ["a cat", "a dog"]
