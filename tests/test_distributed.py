"""torchrun on CPU (gloo): 2 ranks give the same SAE as 1 process with twice the batch; multi-rank collection.

The 2-rank runs are real ``torchrun`` launches (``python -m torch.distributed.run``) of this file as
a script (``worker`` below), each rank with one thread, on a free port. Single-process references
run in the test process, also with one thread.

Why the 2-rank and 1-process weights agree only to a tolerance: both compute the same sums over
the same 2B rows, but the 2-rank run adds two B-row partial sums (all-reduce) where one process
sums 2B rows at once, so results differ in the last float32 bits (~1e-7 relative) from the first
step on, and Adam and the TopK selection carry that along. Measured here after 300 steps: weights
within 5e-7, logged losses within 1e-7 relative, dead-latent counters equal. The tolerances
(weights 2e-5, losses 1e-5 relative) leave a 40x margin over that and still fail on the mistakes
that matter: a per-rank mean in the FVU denominator moves the losses by 2e-2 and the weights by
2e-2, rank-local dead-latent counters change the counters (and through AuxK the losses by 1.5e-2),
and even gradients averaged instead of summed over ranks (which Adam almost absorbs: it is scale-invariant but for eps and clipping)
move the weights by 1e-4.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cli_helpers import tiny_model

from saeuron_core.data.store import STORE_FORMAT, ActivationStore, ShardWriter
from saeuron_core.training.sources import StoreSource
from saeuron_core.training.trainer import TrainConfig, train_sae

HERE = Path(__file__).resolve()
D_IN = 32


def train_config(batch_size: int) -> TrainConfig:
    return TrainConfig(n_latents=128, k=8, batch_size=batch_size, steps=300, lr=2e-3, warmup_steps=20,
                       checkpoint_every=50, log_every=10, dead_tokens_threshold=1024, seed=0)


# -- helpers ------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*args: str, nproc: int = 2, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "SAEURON_TEST_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--nnodes", "1",
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=HERE.parent)
    assert proc.returncode == 0, f"torchrun failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


@pytest.fixture()
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def write_synthetic_store(folder: Path, *, shards: int = 12, tokens: int = 1000, dtype=torch.float16) -> ActivationStore:
    """A store of planted sparse data (3 of 16 unit directions per token), written like a collected one.

    Far fewer directions than latents, so latents die and AuxK is exercised.
    """
    g = torch.Generator().manual_seed(0)
    dictionary = torch.nn.functional.normalize(torch.randn(16, D_IN, generator=g), dim=1)
    writer = ShardWriter(folder, {"format": STORE_FORMAT, "version": 1, "config": {}, "prompts": [], "d_in": D_IN,
                                  "shards": [], "items_done": 0, "items_total": shards, "complete": False})
    for s in range(shards):
        idx = torch.argsort(torch.rand(tokens, 16, generator=g), dim=1)[:, :3]
        coef = torch.rand(tokens, 3, generator=g) * 2 + 0.5
        x = torch.einsum("nk,nkd->nd", coef, dictionary[idx]) + 0.02 * torch.randn(tokens, D_IN, generator=g) + 0.3
        writer.add(x.to(dtype), prompt=s, seed=0, step=0, timestep=0.0, cond=True)
        writer.flush(s + 1)
    writer.manifest["complete"] = True
    writer.write_manifest()
    return ActivationStore(folder)


# -- the torchrun worker (this file run as a script) ----------------------------------------

def worker(task: str, *args: str) -> None:
    torch.set_num_threads(1)
    from saeuron_core.data import distributed

    info, _ = distributed.init_from_env("cpu")
    try:
        if task == "train":
            _train_worker(Path(args[0]), Path(args[1]), int(args[2]), int(args[3]), info)
        else:
            raise SystemExit(f"unknown task {task}")
    finally:
        distributed.shutdown()


class _Stop(Exception):
    pass


def _train_worker(store_dir: Path, out: Path, batch_size: int, stop_at: int, info) -> None:
    config = train_config(batch_size)
    source = StoreSource(ActivationStore(store_dir), group_size=2)
    ckpt = out / "ckpt.safetensors"

    def stop(step, metrics):
        if step == stop_at:
            raise _Stop

    try:
        train_sae(source, config, checkpoint=ckpt, progress=False, on_step=stop)
    except _Stop:
        pass
    if info.is_main:
        shutil.copy(ckpt, out / f"ckpt_{stop_at}.safetensors")
    from saeuron_core.data import distributed

    distributed.barrier(info)
    result = train_sae(source, config, checkpoint=ckpt, out=out / "sae.safetensors", progress=False)
    from safetensors.torch import save_file

    save_file({**{k: v.contiguous() for k, v in result.sae.tensors().items()},
               "since_fired": result.tokens_since_fired}, str(out / f"rank{info.rank}.safetensors"))
    (out / f"rank{info.rank}.json").write_text(json.dumps(result.history))


if __name__ == "__main__":
    worker(*sys.argv[1:])


# -- tests ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def synthetic_store(tmp_path_factory):
    return write_synthetic_store(tmp_path_factory.mktemp("synthetic"))


def assert_same_run(a: dict, b: dict, hist_a: list, hist_b: list, *, atol: float) -> None:
    for name in ("encoder.weight", "encoder.bias", "W_dec", "b_dec"):
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=atol, msg=name)
    assert [h["step"] for h in hist_a] == [h["step"] for h in hist_b]
    for ha, hb in zip(hist_a, hist_b):
        for key in ("loss", "fvu", "auxk", "l0", "lr"):
            assert ha[key] == pytest.approx(hb[key], rel=1e-5, abs=1e-7), (ha["step"], key)
        assert ha["dead_frac"] == hb["dead_frac"], ha["step"]


def test_two_ranks_train_like_one_process_with_twice_the_batch(synthetic_store, tmp_path, one_thread):
    """World size 2 x batch 128/2 == 1 process x batch 128; identical state on both ranks; 2-rank ckpt -> 1 rank."""
    from safetensors.torch import load_file

    out = tmp_path / "w2"
    out.mkdir()
    torchrun(str(HERE), "train", str(synthetic_store.folder), str(out), "128", "150")
    ranks = [load_file(str(out / f"rank{r}.safetensors")) for r in range(2)]
    histories = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    # Every rank holds the same global state, bit for bit: weights, dead-latent counters, logged metrics.
    for name in ranks[0]:
        assert torch.equal(ranks[0][name], ranks[1][name]), name
    assert histories[0] == histories[1]
    assert any(h["dead_frac"] > 0 for h in histories[0]) and any(h["auxk"] > 0 for h in histories[0])

    source = StoreSource(synthetic_store, group_size=2)
    reference = train_sae(source, train_config(128), progress=False)
    ref = {**reference.sae.tensors(), "since_fired": reference.tokens_since_fired}
    assert torch.equal(ranks[0]["since_fired"], ref["since_fired"])
    assert_same_run(ranks[0], ref, histories[0], reference.history, atol=2e-5)
    assert reference.history[-1]["fvu"] < 0.5 * reference.history[0]["fvu"]
    saved = load_file(str(out / "sae.safetensors"))  # written by rank 0 only, the same weights
    assert torch.equal(saved["W_dec"], ranks[0]["W_dec"])

    # The checkpoint rank 0 wrote at step 150 of the 2-rank run holds only global state: resume it with 1 process.
    ckpt = tmp_path / "from_w2.ckpt.safetensors"
    shutil.copy(out / "ckpt_150.safetensors", ckpt)
    resumed = train_sae(source, train_config(128), checkpoint=ckpt, progress=False)
    assert resumed.history[:15] == histories[0][:15]  # the first half is the 2-rank run's own log
    assert_same_run(resumed.sae.tensors(), ranks[0], resumed.history, histories[0], atol=2e-5)
    assert torch.equal(resumed.tokens_since_fired, ranks[0]["since_fired"])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_rank_slices_of_the_global_stream_read_each_shard_once(tmp_path, dtype, monkeypatch):
    store = write_synthetic_store(tmp_path / "s", shards=6, tokens=300, dtype=dtype)
    opened: list[tuple[int, str]] = []
    load, mmap = ActivationStore.load_shard, ActivationStore.mmap_shard
    monkeypatch.setattr(ActivationStore, "load_shard", lambda self, i: (opened.append((i, "load")), load(self, i))[1])
    monkeypatch.setattr(ActivationStore, "mmap_shard", lambda self, i: (opened.append((i, "mmap")), mmap(self, i))[1])
    per_epoch = store.batches_per_epoch(100, 2)
    whole = [b for _, b in zip(range(per_epoch), store.iter_batches(100, seed=1, group_size=2))]
    assert sorted(i for i, how in opened) == list(range(6)) and {how for _, how in opened} == {"load"}
    halves = []
    for rank in range(2):
        opened.clear()
        halves.append([b for _, b in zip(range(per_epoch), store.iter_batches(100, seed=1, group_size=2, rank=rank,
                                                                             world_size=2))])
        assert sorted(i for i, how in opened) == list(range(6)) and {how for _, how in opened} == {"mmap"}
    for b, h0, h1 in zip(whole, *halves):
        assert h0.shape == (50, D_IN) and torch.equal(torch.cat([h0, h1]), b)
    # resuming mid-stream gives the same rank slices
    later = store.iter_batches(100, seed=1, group_size=2, start_batch=3, rank=1, world_size=2)
    assert torch.equal(next(later), halves[1][3])
    from saeuron_core.errors import ConfigError

    with pytest.raises(ConfigError, match="divisible"):
        next(store.iter_batches(100, rank=0, world_size=3))


def test_tensor_source_rank_slices():
    from saeuron_core.training.sources import TensorSource

    src = TensorSource(torch.randn(1000, 8))
    whole = src.iter_batches(64, seed=2, start_batch=20)
    parts = [src.iter_batches(64, seed=2, start_batch=20, rank=r, world_size=4) for r in range(4)]
    for _ in range(5):
        assert torch.equal(torch.cat([next(p) for p in parts]), next(whole))


# -- collection -------------------------------------------------------------------------------

PROMPTS = ["a red cat", "a blue dog", "a green tree"]


def collect_cfg(**over):
    from conftest import HOOK

    from saeuron_core.data.collection import CollectConfig

    base = dict(hook_point=HOOK, steps=3, guidance_scale=5.0, seeds=[0, 1, 2], batch_size=2, rows_per_shard=4,
                dtype="float32")
    base.update(over)
    return CollectConfig(**base)


def rows_by_key(store: ActivationStore) -> dict[tuple, torch.Tensor]:
    out = {}
    for i in range(len(store.shards)):
        acts, rows = store.load_shard(i)
        offsets = rows["row_offset"].tolist()
        for r in range(len(offsets) - 1):
            key = tuple(int(rows[f][r]) for f in ("row_prompt", "row_seed", "row_step", "row_cond"))
            assert key not in out, f"row {key} recorded twice"
            out[key] = acts[offsets[r]:offsets[r + 1]]
    return out


def assert_same_rows(a: ActivationStore, b: ActivationStore) -> None:
    ra, rb = rows_by_key(a), rows_by_key(b)
    assert ra.keys() == rb.keys()
    for key in ra:
        torch.testing.assert_close(ra[key], rb[key], rtol=1e-5, atol=1e-5, msg=str(key))


@pytest.fixture(scope="module")
def one_rank_store(tiny_pipe, tmp_path_factory):
    from saeuron_core.data.collection import collect_activations

    return collect_activations(tiny_pipe, PROMPTS, tmp_path_factory.mktemp("c1") / "s", collect_cfg(), progress=False)


class _Interrupt(Exception):
    pass


def _stop_after_first_shard(info):
    raise _Interrupt


def test_two_rank_collection_resumes_and_matches_one_rank(tiny_pipe, one_rank_store, tmp_path):
    """Ranks given explicitly (as independent jobs would): rank 1 is interrupted and resumed."""
    from saeuron_core.data.collection import collect_activations

    out = tmp_path / "s"
    with pytest.raises(_Interrupt):
        collect_activations(tiny_pipe, PROMPTS, out, collect_cfg(), progress=False, rank=1, world_size=2,
                            on_shard=_stop_after_first_shard)
    partial = ActivationStore(out)
    assert not partial.complete and len(partial.shards) == 1 and partial.shards[0].file.startswith("shard_r0001_")
    store0 = collect_activations(tiny_pipe, PROMPTS, out, collect_cfg(), progress=False, rank=0, world_size=2)
    assert not store0.complete  # rank 1 still owes chunks
    store = collect_activations(tiny_pipe, PROMPTS, out, collect_cfg(), progress=False, rank=1, world_size=2)
    assert store.complete and store.manifest["items_done"] == 9
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] and sorted(s["file"] for s in manifest["shards"]) == \
        sorted(p.name for p in out.glob("shard_*.safetensors"))
    assert {s["file"][:12] for s in manifest["shards"]} == {"shard_r0000_", "shard_r0001_"}
    assert_same_rows(store, one_rank_store)
    # a completed store is returned as is, whatever the number of ranks
    assert collect_activations(tiny_pipe, PROMPTS, out, collect_cfg(), progress=False).complete


def test_interrupted_two_rank_store_resumed_by_one_process(tiny_pipe, one_rank_store, tmp_path):
    from saeuron_core.data.collection import collect_activations

    out = tmp_path / "s"
    for rank in (0, 1):
        with pytest.raises(_Interrupt):
            collect_activations(tiny_pipe, PROMPTS, out, collect_cfg(), progress=False, rank=rank, world_size=2,
                                on_shard=_stop_after_first_shard)
    store = collect_activations(tiny_pipe, PROMPTS, out, collect_cfg(), progress=False)
    assert store.complete
    assert_same_rows(store, one_rank_store)


def test_single_process_store_resumed_by_two_ranks(tiny_pipe, one_rank_store, tmp_path):
    from saeuron_core.data.collection import collect_activations

    out = tmp_path / "s"
    with pytest.raises(_Interrupt):
        collect_activations(tiny_pipe, PROMPTS, out, collect_cfg(), progress=False, on_shard=_stop_after_first_shard)
    assert "layout" not in json.loads((out / "manifest.json").read_text())
    for rank in (1, 0):
        store = collect_activations(tiny_pipe, PROMPTS, out, collect_cfg(), progress=False, rank=rank, world_size=2)
    assert store.complete and store.shards[0].file == "shard_000000.safetensors"
    assert_same_rows(store, one_rank_store)
    from saeuron_core.errors import StoreError

    with pytest.raises(StoreError, match="other settings"):
        collect_activations(tiny_pipe, PROMPTS, out, collect_cfg(steps=4), progress=False, rank=0, world_size=2)


def test_cli_collect_as_independent_jobs(capsys, tmp_path, one_rank_store):
    """`saeuron collect --rank R --world-size W`: jobs that never talk to each other (e.g. a SLURM array)."""
    from saeuron_cli import main

    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    args = ["collect", "--model", tiny_model(), "--prompts", str(prompts), "--out", str(tmp_path / "s"), "--steps", "3",
            "--guidance", "5", "--seeds", "0-2", "--batch-size", "2", "--rows-per-shard", "4", "--dtype", "float32"]
    assert main([*args, "--rank", "1", "--world-size", "2"]) == 0
    assert "rank 1 of 2 done; store 4 of 9 items so far" in capsys.readouterr().out
    assert main([*args, "--rank", "0", "--world-size", "2"]) == 0
    assert "store complete: 27 maps" in capsys.readouterr().out
    assert_same_rows(ActivationStore(tmp_path / "s"), one_rank_store)
    assert main([*args, "--rank", "0"]) == 2
    assert "both --rank and --world-size" in capsys.readouterr().err


# -- online mode ------------------------------------------------------------------------------

def test_online_training_writes_only_checkpoints(tiny_pipe, tmp_path):
    from saeuron_core.data.online import OnlineSource

    source = OnlineSource(tiny_pipe, PROMPTS, collect_cfg(), buffer_tokens=512)
    assert source.d_in == 32 and source.generated_items == 0  # read from the block, nothing generated
    halves = [source.iter_batches(64, seed=0, rank=r, world_size=2) for r in range(2)]
    b0, b1 = next(halves[0]), next(halves[1])
    assert b0.shape == b1.shape == (32, 32) and not torch.equal(b0, b1)
    config = TrainConfig(n_latents=64, k=4, batch_size=64, steps=30, lr=2e-3, log_every=10, checkpoint_every=10)
    result = train_sae(source, config, checkpoint=tmp_path / "ckpt.safetensors", out=tmp_path / "sae.safetensors",
                       progress=False)
    assert result.history[-1]["fvu"] < result.history[0]["fvu"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.safetensors", "sae.safetensors"]
    assert source.batches_per_epoch(64) == 9 * 3 * 64 // 64


def test_cli_train_needs_store_or_online(capsys, tmp_path):
    from saeuron_cli import main

    assert main(["train", "--out", str(tmp_path / "a.safetensors"), "--steps", "2"]) == 2
    assert "--store STORE, or --online" in capsys.readouterr().err
    assert main(["train", "--online", "--model", tiny_model(), "--out", str(tmp_path / "a.safetensors"), "--steps", "2"]) == 2
    assert "--model and --prompts are required" in capsys.readouterr().err


# -- real torchrun launches of the CLI ------------------------------------------------------------

@pytest.mark.slow
def test_torchrun_cli_collect_train_and_online(tmp_path, one_rank_store):
    """`torchrun -m saeuron_cli collect/train` with 2 ranks: same rows as 1 rank, one report line."""
    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    common = ["--model", tiny_model(), "--prompts", str(prompts)]
    proc = torchrun("-m", "saeuron_cli", "collect", *common, "--out", str(tmp_path / "s"), "--steps", "3",
                    "--guidance", "5", "--seeds", "0-2", "--batch-size", "2", "--rows-per-shard", "4",
                    "--dtype", "float32", "--hook-point", "up_blocks.1.attentions.1")
    assert proc.stdout.count("collected 27 maps") == 1, proc.stdout
    store = ActivationStore(tmp_path / "s")
    assert store.complete
    assert_same_rows(store, one_rank_store)

    proc = torchrun("-m", "saeuron_cli", "train", "--store", str(tmp_path / "s"), "--out",
                    str(tmp_path / "sae.safetensors"), "--n-latents", "64", "--k", "4", "--batch-size", "64",
                    "--steps", "20", "--lr", "1e-3", "--log-every", "10")
    assert proc.stdout.count("trained 64 latents") == 1 and "on 2 ranks" in proc.stdout, proc.stdout

    proc = torchrun("-m", "saeuron_cli", "train", "--online", *common, "--out", str(tmp_path / "on.safetensors"),
                    "--sampling-steps", "3", "--seeds", "0-2", "--gen-batch-size", "2", "--buffer-tokens", "256",
                    "--n-latents", "64", "--k", "4", "--batch-size", "64", "--steps", "10", "--log-every", "5")
    assert proc.stdout.count("trained 64 latents") == 1, proc.stdout
    assert sorted(p.name for p in tmp_path.glob("on.*")) == ["on.safetensors", "on.safetensors.ckpt.safetensors"]
