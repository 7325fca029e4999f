import copy
import math

import pytest
import torch
from conftest import HOOK

from saeuron_core.data.collection import CollectConfig, collect_activations
from saeuron_core.errors import ConfigError
from saeuron_core.sae.files import load_sae
from saeuron_core.sae.model import SAEConfig, TopKSAE, fvu
from saeuron_core.training.sources import StoreSource, TensorSource
from saeuron_core.training.step import TrainStep
from saeuron_core.training.trainer import TrainConfig, geometric_median, lr_at, train_sae


def planted(d=64, m=128, n=40000, active=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    dictionary = torch.nn.functional.normalize(torch.randn(m, d, generator=g), dim=1)
    idx = torch.argsort(torch.rand(n, m, generator=g), dim=1)[:, :active]
    coef = torch.rand(n, active, generator=g) * 2 + 0.5
    x = torch.einsum("nk,nkd->nd", coef, dictionary[idx]) + 0.01 * torch.randn(n, d, generator=g) + 0.3
    return dictionary, x


def test_recovers_a_planted_sparse_dictionary(tmp_path):
    dictionary, x = planted()
    config = TrainConfig(n_latents=256, k=4, batch_size=512, steps=1000, lr=3e-3, log_every=100,
                         dead_tokens_threshold=50_000)
    result = train_sae(TensorSource(x), config, out=tmp_path / "sae.safetensors", progress=False)
    sae = load_sae(tmp_path / "sae.safetensors")
    with torch.no_grad():
        assert fvu(x, sae(x)) < 0.05
    best_cos = (dictionary @ sae.W_dec.T).max(dim=1).values
    assert (best_cos > 0.9).float().mean() >= 0.9
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(256))
    assert [h["step"] for h in result.history] == list(range(100, 1001, 100))
    assert result.history[-1]["fvu"] < result.history[0]["fvu"]
    assert sae.training_summary["steps"] == 1000 and sae.training_summary["final"]["l0"] <= 4


def test_geometric_median_ignores_outliers():
    pts = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [1000.0, 1000.0]])
    med = geometric_median(pts)
    assert med.norm() < 2 and pts.mean(0).norm() > 200


def test_lr_schedule():
    assert lr_at(0, 100, 1.0, 10, 0.0) == pytest.approx(0.1)
    assert lr_at(9, 100, 1.0, 10, 0.0) == pytest.approx(1.0)
    assert lr_at(100, 100, 1.0, 10, 0.1) == pytest.approx(0.1)
    assert lr_at(55, 100, 1.0, 10, 0.0) == pytest.approx(0.5)


def test_auxk_runs_for_dead_latents():
    _, x = planted(n=4096)
    result = train_sae(TensorSource(x), TrainConfig(n_latents=512, k=2, batch_size=256, steps=40, lr=1e-3,
                                                    log_every=10, dead_tokens_threshold=512), progress=False)
    assert any(h["dead_frac"] > 0 and h["auxk"] > 0 for h in result.history)


def dense_reference_grads(sae, x, since_fired, config):
    """The loss and gradients of a step by plain autograd through the dense pre-activations."""
    sae.set_decoder_norm_to_unit_norm()
    pre = sae.pre_acts(x)
    values, indices = pre.topk(sae.k, dim=-1)
    recon = sae.decode(values, indices)
    total_var = (x - x.mean(0)).pow(2).sum()
    loss = (recon - x).pow(2).sum() / total_var
    dead = since_fired > config.dead_tokens_threshold
    n_dead = int(dead.sum())
    if n_dead:
        aux_values, aux_indices = pre.masked_fill(~dead, -math.inf).topk(min(sae.d_in // 2, n_dead), dim=-1)
        residual = (x - recon).detach()
        scale = min(n_dead / (sae.d_in // 2), 1.0)
        aux = scale * (sae.decode(aux_values, aux_indices, bias=False) - residual).pow(2).sum() / total_var
        loss = loss + config.auxk_alpha * aux
    loss.backward()
    sae.remove_gradient_parallel_to_decoder_directions()
    return float(loss.detach()), {name: p.grad.clone() for name, p in sae.named_parameters()}


@pytest.mark.parametrize("select_dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("n_dead", [0, 50, 128])
def test_sparse_step_matches_dense_autograd(select_dtype, n_dead):
    """TrainStep's hand-written sparse gradients (and so its update) are autograd's, AuxK included."""
    torch.manual_seed(0)
    sae = TopKSAE(SAEConfig(d_in=16, n_latents=128, k=4))
    with torch.no_grad():
        sae.encoder.bias.normal_(0, 0.1)
        sae.b_dec.normal_()
    x = torch.randn(64, 16)
    since = torch.zeros(128, dtype=torch.long)
    since[:n_dead] = 100
    config = TrainConfig(steps=1, dead_tokens_threshold=10, select_dtype=select_dtype, grad_clip=1e9)
    ref = copy.deepcopy(sae)
    ref_loss, ref_grads = dense_reference_grads(ref, x, since, config)
    torch.optim.SGD(ref.parameters(), lr=0.1).step()  # (Adam's first step is about sign(grad): SGD shows more)

    step = TrainStep(sae, torch.optim.SGD(sae.parameters(), lr=0.1), since.clone(), config)
    metrics = step(x, 0.1)
    assert metrics["loss"] == pytest.approx(ref_loss, rel=1e-6)
    assert (metrics["auxk"] > 0) == (n_dead > 0)
    for name, param in sae.named_parameters():
        torch.testing.assert_close(param.grad, ref_grads[name], rtol=1e-5, atol=1e-7, msg=name)
    for (name, param), ref_param in zip(sae.named_parameters(), ref.parameters()):
        torch.testing.assert_close(param, ref_param, rtol=1e-5, atol=1e-6, msg=name)


@pytest.fixture(scope="module")
def store(tiny_pipe, tmp_path_factory):
    folder = tmp_path_factory.mktemp("store")
    prompts = ["a red cat", "a blue dog", "a green tree", "a tall house"]
    config = CollectConfig(hook_point=HOOK, steps=5, guidance_scale=5.0, seeds=[0, 1, 2], batch_size=4,
                           rows_per_shard=10)
    return collect_activations(tiny_pipe, prompts, folder, config, progress=False)


def test_interrupted_training_resumes_to_the_same_weights(store, tmp_path):
    config = TrainConfig(expansion_factor=4, k=8, batch_size=128, steps=60, lr=1e-3, checkpoint_every=20,
                         log_every=10, dead_tokens_threshold=2000)
    src = StoreSource(store, group_size=2)
    full = train_sae(src, config, checkpoint=tmp_path / "a.ckpt.safetensors", progress=False, hook_point=HOOK)

    def stop(step, metrics):
        if step == 47:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_sae(src, config, checkpoint=tmp_path / "b.ckpt.safetensors", progress=False, on_step=stop, hook_point=HOOK)
    resumed = train_sae(src, config, checkpoint=tmp_path / "b.ckpt.safetensors", progress=False, hook_point=HOOK)
    for name, tensor in full.sae.tensors().items():
        assert torch.equal(tensor, resumed.sae.tensors()[name]), name
    assert full.history == resumed.history
    assert resumed.sae.config.hook_point == HOOK


def test_resume_with_other_settings_refused(store, tmp_path):
    ckpt = tmp_path / "c.ckpt.safetensors"
    train_sae(StoreSource(store), TrainConfig(expansion_factor=2, k=4, batch_size=128, steps=3), checkpoint=ckpt,
              progress=False)
    with pytest.raises(ConfigError, match="other training settings"):
        train_sae(StoreSource(store), TrainConfig(expansion_factor=2, k=5, batch_size=128, steps=3), checkpoint=ckpt,
                  progress=False)


def test_store_batches_cover_each_token_once_per_epoch(store):
    src = StoreSource(store, group_size=2)
    per_epoch = src.batches_per_epoch(64)
    batches = src.iter_batches(64, seed=3)
    seen = torch.cat([next(batches) for _ in range(per_epoch)])
    assert seen.shape[0] <= store.n_tokens and seen.shape[0] > store.n_tokens - 64 * len(store.shards)
    assert torch.unique(seen, dim=0).shape[0] == seen.shape[0]
    later = list(zip(range(3), src.iter_batches(64, seed=3, start_batch=5)))
    again = src.iter_batches(64, seed=3)
    for _ in range(5):
        next(again)
    for _, b in later:
        assert torch.equal(b, next(again))


def test_bad_training_settings(store):
    with pytest.raises(ConfigError, match="steps or epochs"):
        train_sae(StoreSource(store), TrainConfig(), progress=False)
    with pytest.raises(ConfigError, match="lr must be"):
        train_sae(StoreSource(store), TrainConfig(steps=1, lr=5.0), progress=False)
    with pytest.raises(ConfigError, match="must not exceed"):
        train_sae(StoreSource(store), TrainConfig(steps=1, n_latents=4, k=8), progress=False)
