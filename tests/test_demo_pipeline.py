"""The pixel-space demo pipeline: saved, loaded through the core's one loading path, sampled like the reference
sampler, hooked like SD."""

from __future__ import annotations

import torch

from saeuron_demo.dataset import from_model_range
from saeuron_demo.model import build_unet, sample, sample_scheduler
import pytest

from saeuron_demo.pipeline import PIPELINE_CLASSES, PixelDiffusionPipeline, load_demo_pipeline, write_model_index
from saeuron_demo.textenc import build_text_encoder, build_tokenizer
from saeuron_core.errors import ConfigError
from saeuron_core.hosts.diffusers import generate, load_pipeline
from saeuron_core.hosts.hooks import pipeline_hook

PROMPTS = ["a star in stripes style", "a ring in noise style"]


def _save_random_demo(folder) -> None:
    tok = build_tokenizer()
    pipe = PixelDiffusionPipeline(unet=build_unet(seed=1), text_encoder=build_text_encoder(tok, seed=1), tokenizer=tok,
                                  scheduler=sample_scheduler())
    pipe.save_pretrained(str(folder), safe_serialization=True)
    write_model_index(str(folder))


def test_load_by_folder_and_match_reference_sampler(tmp_path) -> None:
    _save_random_demo(tmp_path / "demo")
    pipe = load_demo_pipeline(tmp_path / "demo")
    assert isinstance(pipe, PixelDiffusionPipeline)
    assert isinstance(load_pipeline(tmp_path / "demo", pipeline_classes=PIPELINE_CLASSES), PixelDiffusionPipeline)
    x = generate(pipe, PROMPTS[:1], [7], steps=4, guidance_scale=3.0, output_type="latent").images
    ref = sample(pipe.unet, pipe.text_encoder, pipe.tokenizer, PROMPTS[:1], steps=4, guidance=3.0, seed=7)
    assert torch.equal(from_model_range(x), ref)
    pil = generate(pipe, PROMPTS, [7, 8], steps=2, guidance_scale=3.0, output_type="pil").images
    assert [im.size for im in pil] == [(32, 32), (32, 32)]
    # One generator per prompt: an image does not depend on what else is in the batch.
    alone = generate(pipe, PROMPTS[1:], [8], steps=2, guidance_scale=3.0, output_type="latent").images
    both = generate(pipe, PROMPTS, [7, 8], steps=2, guidance_scale=3.0, output_type="latent").images
    assert torch.allclose(alone[0], both[1], atol=1e-5)


def test_the_core_loads_a_pipeline_of_a_class_outside_diffusers_only_when_given_it(tmp_path) -> None:
    _save_random_demo(tmp_path / "demo")
    with pytest.raises(ConfigError, match="names the pipeline class 'PixelDiffusionPipeline', which is not a "
                                          "diffusers pipeline$"):
        load_pipeline(tmp_path / "demo")
    with pytest.raises(ConfigError, match=r"not a diffusers pipeline or one of \['OtherPipeline'\]"):
        load_pipeline(tmp_path / "demo", pipeline_classes={"OtherPipeline": PixelDiffusionPipeline})


def test_hook_sees_uncond_then_cond_rows(tmp_path) -> None:
    _save_random_demo(tmp_path / "demo")
    pipe = load_demo_pipeline(tmp_path / "demo")
    seen = []
    with pipeline_hook(pipe, "up_blocks.1.attentions.1", lambda call: seen.append(call) and None):
        generate(pipe, PROMPTS, [0, 1], steps=2, guidance_scale=3.0, negative_prompt=["", ""])
    assert len(seen) == 2
    call = seen[0]
    assert call.tokens.shape == (4, 64, 64) and call.spatial == (8, 8)
    assert call.is_cond.tolist() == [False, False, True, True]
    assert call.timesteps is not None and call.timesteps.shape == (4,)
    # Without CFG only conditional rows are computed.
    seen.clear()
    with pipeline_hook(pipe, "up_blocks.1.attentions.1", lambda call: seen.append(call) and None):
        generate(pipe, PROMPTS, [0, 1], steps=1, guidance_scale=1.0)
    assert seen[0].is_cond.tolist() == [True, True]
