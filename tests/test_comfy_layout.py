"""Diffusers hook points -> ComfyUI blocks, checked against ComfyUI's own diffusers key map."""

import comfy_host
import pytest

from saeuron_core.errors import ConfigError

SD15 = {"model_channels": 320, "num_res_blocks": [2, 2, 2, 2], "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
        "channel_mult": [1, 2, 4, 4], "transformer_depth_middle": 1,
        "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0]}
SD2 = dict(SD15, use_linear_in_transformer=True, context_dim=1024)
SDXL = {"model_channels": 320, "num_res_blocks": [2, 2, 2], "transformer_depth": [0, 0, 2, 2, 10, 10],
        "channel_mult": [1, 2, 4], "transformer_depth_middle": 10,
        "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10]}



@pytest.fixture(scope="module")
def layout(comfy):
    """The pack's nodes/comfy_layout.py as ComfyUI imported it (the pack's ``nodes`` is not importable by name)."""
    return comfy_host.pack_module("nodes.comfy_layout")


@pytest.mark.parametrize("config", [SD15, SD2, SDXL], ids=["sd15", "sd2", "sdxl"])
def test_targets_match_comfyuis_key_map(layout, config):
    import comfy.utils

    key_map = comfy.utils.unet_to_diffusers(dict(config))
    targets = layout.comfy_targets(config)
    expected = {k.rsplit(".proj_in.weight", 1)[0] for k in key_map if k.endswith(".proj_in.weight")}
    assert set(targets) == expected
    for name, target in targets.items():
        assert "diffusion_model." + key_map[name + ".proj_in.weight"][: -len(".proj_in.weight")] == target.module_path


def test_sd15_object_and_output_patches(layout):
    t = layout.comfy_targets(SD15)
    assert (t["up_blocks.1.attentions.1"].kind, t["up_blocks.1.attentions.1"].block) == ("output_patch", ("output", 5))
    assert t["up_blocks.1.attentions.1"].module_path == "diffusion_model.output_blocks.4.1"
    assert t["up_blocks.1.attentions.1"].channels == 1280
    assert t["up_blocks.1.attentions.2"].kind == "object_patch"  # an upsampler follows it
    assert t["up_blocks.3.attentions.2"].kind == "object_patch"  # the last block
    assert t["mid_block.attentions.0"].kind == "object_patch" and t["down_blocks.0.attentions.0"].channels == 320
    assert layout.comfy_targets(SDXL)["up_blocks.0.attentions.1"].channels == 1280


def test_errors_name_what_exists(layout):
    with pytest.raises(ConfigError, match="no attention block 'up_blocks.0.attentions.0'; it has down_blocks"):
        layout.comfy_target("up_blocks.0.attentions.0", SD15)
    with pytest.raises(ConfigError, match="not a UNet cross-attention block"):
        layout.comfy_target("up_blocks.1.resnets.0", SD15)
    with pytest.raises(ConfigError, match="expects 640 channels but 'up_blocks.1.attentions.1' of this model has 1280"):
        layout.comfy_target("unet.up_blocks.1.attentions.1", SD15, d_in=640)
