"""Other patches compose with the eraser in the real ComfyUI host: a LoRA file loaded by the stock
*LoraLoaderModelOnly* and FreeU_V2 keep working on every kind of block the eraser patches (an object patch on
the block, an output-block patch, a residual SAE, a FLUX block replacement), whatever the order of the nodes and
whatever ran before."""

from __future__ import annotations

import pytest
import torch
from conftest import HOOK
from safetensors.torch import save_file
from test_comfy_nodes import host, run, sae_at, sample  # noqa: F401  (host is a fixture)
from test_dit import dit_sae, models  # noqa: F401  (models is a fixture)


# (hook point, residual SAE) -> what the eraser does there on the tiny SD UNet
UNET_CASES = {
    "object patch": ("down_blocks.0.attentions.1", False),
    "output patch": (HOOK, False),
    "last block": ("up_blocks.1.attentions.2", False),
    "residual": (HOOK, True),
}
# four weights inside each block, by their diffusers names (the LoRA names them as kohya's trainer does)
UNET_WEIGHTS = ["transformer_blocks.0.attn1.to_q", "transformer_blocks.0.attn1.to_k",
                "transformer_blocks.0.attn2.to_v", "transformer_blocks.0.ff.net.2"]


def write_lora(folder, name: str, shapes: dict[str, tuple[int, int]], rank: int = 4, seed: int = 0) -> str:
    """A rank-``rank`` LoRA file (``lora_up``/``lora_down``/``alpha`` per weight) in ComfyUI's loras folder."""
    import folder_paths

    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for key, (out_features, in_features) in shapes.items():
        tensors[f"{key}.lora_down.weight"] = torch.randn(rank, in_features, generator=gen) * 0.5
        tensors[f"{key}.lora_up.weight"] = torch.randn(out_features, rank, generator=gen) * 0.5
        tensors[f"{key}.alpha"] = torch.tensor(float(rank))
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / name))
    folder_paths.add_model_folder_path("loras", str(folder))
    return name


def with_lora(model, lora_name: str):
    import nodes as comfy_nodes

    return comfy_nodes.LoraLoaderModelOnly().load_lora_model_only(model, lora_name, 1.0)[0]


def with_freeu(model):
    import nodes as comfy_nodes

    return comfy_nodes.NODE_CLASS_MAPPINGS["FreeU_V2"]().patch(model, 1.3, 1.4, 0.9, 0.2)[0]


def erase(model, sae, strength: float):
    return run(None, "SAeUronConceptEraser", model, sae, "cat", "ablate", strength, 0.0, 1.0, "both")[0]


class WeightProbe:
    """The weight a module of the shared model runs with, read at every call during sampling."""

    def __init__(self, patcher, path: str) -> None:
        self.module = patcher.model.get_submodule(path)
        self.seen: list[torch.Tensor] = []

    def __enter__(self) -> "WeightProbe":
        self.handle = self.module.register_forward_pre_hook(
            lambda module, args: self.seen.append(module.weight.detach().clone()))
        return self

    def __exit__(self, *exc) -> None:
        self.handle.remove()

    def last(self) -> torch.Tensor:
        assert self.seen, "the probed module never ran"
        return self.seen[-1]


@pytest.fixture(scope="module")
def unet_loras(host, tmp_path_factory):
    """One LoRA file per UNet block of the cases, on four weights inside that block."""
    import comfy.utils

    unet = host["pipe"].unet
    folder = tmp_path_factory.mktemp("loras")
    mapping = comfy.utils.unet_to_diffusers(host["model"].model.model_config.unet_config)
    files = {}
    for block in {hook for hook, _ in UNET_CASES.values()}:
        shapes = {"lora_unet_" + f"{block}.{w}".replace(".", "_"): tuple(unet.get_submodule(f"{block}.{w}").weight.shape)
                  for w in UNET_WEIGHTS}
        comfy_path = "diffusion_model." + mapping[f"{block}.{UNET_WEIGHTS[0]}.weight"].rsplit(".", 1)[0]
        files[block] = (write_lora(folder, block.replace(".", "-") + ".safetensors", shapes), comfy_path)
    return files


@pytest.mark.parametrize("case", list(UNET_CASES))
def test_a_lora_on_an_erased_block_is_kept_in_either_order_and_after(host, unet_loras, case):
    """An eraser at strength 0 plus a LoRA gives the LoRA's picture bit for bit (LoRA first or eraser first); a
    LoRA-only graph run after the eraser graphs gives its picture alone; the plain model stays plain."""
    import comfy.model_management

    hook_point, residual = UNET_CASES[case]
    lora_name, probed = unet_loras[hook_point]
    sae, model = sae_at(host, hook_point, residual), host["model"]
    comfy.model_management.unload_all_models()
    original = model.model.get_submodule(probed).weight.detach().clone()
    plain = sample(host, model)
    lora = with_lora(model, lora_name)
    with WeightProbe(model, probed) as probe:
        alone = sample(host, lora)
    lora_weight = probe.last()
    assert not torch.equal(lora_weight, original)
    assert (alone - plain).abs().max() > 0.05  # the LoRA changes the picture
    comfy.model_management.unload_all_models()
    for idle in (erase(lora, sae, 0.0), with_lora(erase(model, sae, 0.0), lora_name)):
        with WeightProbe(model, probed) as probe:
            assert torch.equal(sample(host, idle), alone)
        torch.testing.assert_close(probe.last(), lora_weight, rtol=0, atol=0)
    assert torch.equal(sample(host, lora), alone)  # the LoRA-only graph after the eraser graphs
    assert torch.equal(sample(host, model), plain)
    comfy.model_management.unload_all_models()


@pytest.mark.parametrize("case", list(UNET_CASES))
def test_a_lora_survives_an_erasing_eraser(host, unet_loras, case):
    """Erasing for real: the block still runs with the LoRA's weights, so the picture differs from the erased one
    without the LoRA, in both orders alike."""
    import comfy.model_management

    hook_point, residual = UNET_CASES[case]
    lora_name, probed = unet_loras[hook_point]
    sae, model = sae_at(host, hook_point, residual), host["model"]
    comfy.model_management.unload_all_models()
    with WeightProbe(model, probed) as probe:
        sample(host, with_lora(model, lora_name))
    lora_weight = probe.last()
    erased = sample(host, erase(model, sae, 10.0))
    assert not torch.equal(erased, sample(host, model))
    lora_first, eraser_first = erase(with_lora(model, lora_name), sae, 10.0), with_lora(erase(model, sae, 10.0), lora_name)
    with WeightProbe(model, probed) as probe:
        both = sample(host, lora_first)
    torch.testing.assert_close(probe.last(), lora_weight, rtol=0, atol=0)
    assert (both - erased).abs().max() > 0.05
    assert torch.equal(sample(host, eraser_first), both)
    comfy.model_management.unload_all_models()


@pytest.mark.parametrize("case", ["object patch", "output patch"])
def test_freeu_and_the_eraser_both_apply(host, case):
    """FreeU_V2 patches the output blocks too (the same slot as output-patched erasers): each patch still applies
    with the other one on the MODEL, in both orders."""
    hook_point, residual = UNET_CASES[case]
    sae, model = sae_at(host, hook_point, residual), host["model"]
    plain, freeu = sample(host, model), sample(host, with_freeu(model))
    assert not torch.equal(plain, freeu)
    assert torch.equal(sample(host, erase(with_freeu(model), sae, 0.0)), freeu)
    assert torch.equal(sample(host, with_freeu(erase(model, sae, 0.0))), freeu)
    erased = sample(host, erase(model, sae, 10.0))
    both = sample(host, erase(with_freeu(model), sae, 10.0))
    assert not torch.equal(both, erased) and not torch.equal(both, freeu) and not torch.equal(erased, plain)
    assert torch.equal(sample(host, with_freeu(erase(model, sae, 10.0))), both)


@pytest.mark.parametrize("hook_point", ["transformer_blocks.1", "single_transformer_blocks.0"])
def test_a_lora_on_an_erased_flux_block_is_kept(models, tmp_path, hook_point):
    """A FLUX block replacement leaves the block's weights to ComfyUI: the LoRA applies with the eraser."""
    import comfy.model_management

    import nodes as comfy_nodes

    patcher = models["flux"][1]
    stack, index = hook_point.split(".")
    block = f"diffusion_model.{'double_blocks' if stack == 'transformer_blocks' else 'single_blocks'}.{index}"
    weights = ["img_attn.qkv", "img_mlp.0", "img_mlp.2", "img_attn.proj"] if stack == "transformer_blocks" else \
        ["linear1", "linear2", "modulation.lin", "norm.query_norm"]
    shapes = {}
    for w in weights:
        module = patcher.model.get_submodule(f"{block}.{w}")
        if isinstance(module, torch.nn.Linear):
            shapes[f"{block}.{w}"] = tuple(module.weight.shape)
    lora_name = write_lora(tmp_path / "loras", f"flux-{index}-{stack}.safetensors", shapes)
    probed = next(iter(shapes))
    torch.manual_seed(4)
    pos = [[torch.randn(1, 7, 32), {"pooled_output": torch.randn(1, 16)}]]
    neg = [[torch.randn(1, 7, 32), {"pooled_output": torch.randn(1, 16)}]]

    def flux_sample(model):
        with torch.inference_mode():
            return comfy_nodes.common_ksampler(model, 0, 3, 3.0, "euler", "simple", pos, neg,
                                               {"samples": torch.zeros(1, 4, 8, 8)})[0]["samples"]

    sae = dit_sae(32, hook_point)
    comfy.model_management.unload_all_models()
    plain = flux_sample(patcher)
    lora = with_lora(patcher, lora_name)
    with WeightProbe(patcher, probed) as probe:
        alone = flux_sample(lora)
    assert not torch.allclose(alone, plain)
    for idle in (erase(lora, sae, 0.0), with_lora(erase(patcher, sae, 0.0), lora_name)):
        with WeightProbe(patcher, probed) as again:
            assert torch.equal(flux_sample(idle), alone)
        torch.testing.assert_close(again.last(), probe.last(), rtol=0, atol=0)
    erased = flux_sample(erase(patcher, sae, 10.0))
    assert not torch.equal(flux_sample(erase(lora, sae, 10.0)), erased)
    assert torch.equal(flux_sample(lora), alone) and torch.equal(flux_sample(patcher), plain)
    comfy.model_management.unload_all_models()


def test_a_lora_stack_and_a_model_merge_compose_with_an_object_patched_eraser(host, unet_loras, tmp_path):
    """Two LoRAs on the erased block (a stack) and ModelMergeSimple with another UNet, each on either side of an
    idle eraser: the pictures of the same graph without the eraser, bit for bit."""
    import comfy.model_management
    import comfy_host
    from saeuron_core.hosts.tiny_pipeline import make_tiny_pipeline

    import nodes as comfy_nodes

    hook_point, residual = UNET_CASES["object patch"]
    sae, model = sae_at(host, hook_point, residual), host["model"]
    first, _ = unet_loras[hook_point]
    unet = host["pipe"].unet
    second = write_lora(tmp_path / "loras", "second.safetensors",
                        {"lora_unet_" + f"{hook_point}.{w}".replace(".", "_"):
                         tuple(unet.get_submodule(f"{hook_point}.{w}").weight.shape) for w in UNET_WEIGHTS[:2]}, seed=1)
    other = comfy_host.tiny_model(make_tiny_pipeline(seed=1).unet)
    merge = comfy_nodes.NODE_CLASS_MAPPINGS["ModelMergeSimple"]()
    comfy.model_management.unload_all_models()
    stack = with_lora(with_lora(model, first), second)
    merged = merge.merge(model, other, 0.5)[0]
    expected = {"stack": sample(host, stack), "merge": sample(host, merged)}
    assert not torch.equal(expected["stack"], sample(host, with_lora(model, first)))
    assert not torch.equal(expected["merge"], sample(host, model))
    graphs = {"stack": [with_lora(with_lora(erase(model, sae, 0.0), first), second),
                        with_lora(erase(with_lora(model, first), sae, 0.0), second),
                        erase(stack, sae, 0.0)],
              "merge": [merge.merge(erase(model, sae, 0.0), other, 0.5)[0], erase(merged, sae, 0.0)]}
    for name, variants in graphs.items():
        for variant in variants:
            assert torch.equal(sample(host, variant), expected[name]), name
    comfy.model_management.unload_all_models()
