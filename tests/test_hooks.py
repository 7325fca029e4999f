import pytest
import torch
from conftest import HOOK

from saeuron_core.errors import HookError
from saeuron_core.hosts.hooks import BlockHook, pipeline_hook, to_tokens


def run(pipe, prompts, guidance, steps=3, seeds=None):
    seeds = seeds or list(range(len(prompts)))
    return pipe(prompt=prompts, num_inference_steps=steps, guidance_scale=guidance, output_type="latent",
                generator=[torch.Generator().manual_seed(s) for s in seeds]).images


def no_hooks_left(model):
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_hook_sees_exactly_the_module_output(tiny_pipe):
    module = tiny_pipe.unet.get_submodule(HOOK)
    inputs, raw, seen = [], [], []
    h1 = module.register_forward_pre_hook(lambda m, a, kw: inputs.append((a, kw)), with_kwargs=True)
    h2 = module.register_forward_hook(lambda m, a, out: raw.append(out[0].detach().clone()))
    try:
        with pipeline_hook(tiny_pipe, HOOK, lambda call: seen.append(call)):
            run(tiny_pipe, ["a cat"], guidance=1.0, steps=2)
    finally:
        h1.remove()
        h2.remove()
    assert len(seen) == len(raw) == 2
    for (args, kwargs), out, call in zip(inputs, raw, seen):
        b, c, h, w = out.shape
        assert call.spatial == (h, w) and call.tokens.shape == (b, h * w, c)
        assert torch.equal(call.tokens, out.permute(0, 2, 3, 1).reshape(b, h * w, c))
        with torch.no_grad():  # a manual forward of the block on the same inputs
            manual = module(*args, **kwargs)[0]
        torch.testing.assert_close(to_tokens(manual)[0], call.tokens, rtol=1e-5, atol=1e-6)


def test_timesteps_and_cfg_halves_are_labelled(tiny_pipe):
    seen = []
    with pipeline_hook(tiny_pipe, HOOK, lambda call: seen.append(call)):
        # Same seed for both prompts: the unconditional rows then see identical inputs.
        run(tiny_pipe, ["a red cat", "a blue dog"], guidance=5.0, steps=3, seeds=[7, 7])
    expected_t = tiny_pipe.scheduler.timesteps.float()
    assert [c.call_index for c in seen] == [0, 1, 2]
    for call, t in zip(seen, expected_t):
        assert torch.equal(call.timesteps, torch.full((4,), float(t)))
        assert call.is_cond.tolist() == [False, False, True, True]
    # At the first call both items have the same latents: only the prompt differs between rows.
    uncond, cond = seen[0].tokens[~seen[0].is_cond], seen[0].tokens[seen[0].is_cond]
    assert torch.allclose(uncond[0], uncond[1], atol=1e-6)
    assert not torch.allclose(cond[0], cond[1], atol=1e-3)


def test_without_cfg_every_row_is_conditional(tiny_pipe):
    seen = []
    with pipeline_hook(tiny_pipe, HOOK, lambda call: seen.append(call)):
        run(tiny_pipe, ["a cat", "a dog"], guidance=1.0, steps=2)
    assert all(c.is_cond.tolist() == [True, True] and c.tokens.shape[0] == 2 for c in seen)


def test_identity_and_replacement(tiny_pipe):
    unet = tiny_pipe.unet
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    base = run(tiny_pipe, ["a cat"], guidance=3.0)
    with pipeline_hook(tiny_pipe, HOOK, lambda call: call.tokens.clone()):
        same = run(tiny_pipe, ["a cat"], guidance=3.0)
    assert torch.equal(base, same)
    with pipeline_hook(tiny_pipe, HOOK, lambda call: torch.zeros_like(call.tokens)):
        changed = run(tiny_pipe, ["a cat"], guidance=3.0)
    assert not torch.allclose(base, changed)
    after = run(tiny_pipe, ["a cat"], guidance=3.0)
    assert torch.equal(base, after)
    assert no_hooks_left(unet)
    assert all(torch.equal(before[k], v) for k, v in unet.state_dict().items())


def test_hooks_removed_on_exception(tiny_pipe):
    def boom(call):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        with pipeline_hook(tiny_pipe, HOOK, boom):
            run(tiny_pipe, ["a cat"], guidance=3.0, steps=1)
    assert no_hooks_left(tiny_pipe.unet)


def test_bad_return_shape_and_bad_path(tiny_pipe):
    with pytest.raises(HookError, match="returned shape"):
        with pipeline_hook(tiny_pipe, HOOK, lambda call: call.tokens[:, :3]):
            run(tiny_pipe, ["a cat"], guidance=1.0, steps=1)
    assert no_hooks_left(tiny_pipe.unet)
    with pytest.raises(HookError, match=r"'up_blocks\.1\.attentions' has no child '7'"):
        BlockHook(tiny_pipe.unet, "up_blocks.1.attentions.7", lambda c: None)


def test_bare_unet_call_with_explicit_layout(tiny_pipe):
    unet = tiny_pipe.unet
    seen = []
    sample = torch.randn(4, 4, 8, 8)
    context = torch.randn(4, 77, 32)
    with BlockHook(unet, HOOK, lambda call: seen.append(call), cfg_layout="cond_uncond"), torch.no_grad():
        unet(sample, torch.tensor([10, 20, 30, 40]), encoder_hidden_states=context)
    assert seen[0].timesteps.tolist() == [10.0, 20.0, 30.0, 40.0]
    assert seen[0].is_cond.tolist() == [True, True, False, False]
