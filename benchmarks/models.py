"""The model shapes, inputs and concept entries the eraser benchmarks build (random weights, real configs)."""

from __future__ import annotations

from typing import Any

import torch

from saeuron_core.sae.library import ConceptData

SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32, act_fn="silu", center_input_sample=False,
    flip_sin_to_cos=True, freq_shift=0, downsample_padding=1, mid_block_scale_factor=1, norm_eps=1e-5,
)
SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816, norm_num_groups=32, act_fn="silu", flip_sin_to_cos=True,
    freq_shift=0,
)
# ComfyUI's description of SD 1.5's UNet (what its model detection produces for an SD 1.5 checkpoint).
SD15_COMFY_CONFIG = {
    "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True, "legacy": False,
    "adm_in_channels": None, "in_channels": 4, "model_channels": 320, "num_res_blocks": [2, 2, 2, 2],
    "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0], "channel_mult": [1, 2, 4, 4], "transformer_depth_middle": 1,
    "use_linear_in_transformer": False, "context_dim": 768,
    "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
    "use_temporal_attention": False, "use_temporal_resblock": False,
}
# ComfyUI's description of the tiny pipeline's UNet (quick mode).
TINY_UNET_CONFIG = {
    "use_checkpoint": False, "image_size": 8, "out_channels": 4, "use_spatial_transformer": True, "legacy": False,
    "adm_in_channels": None, "in_channels": 4, "model_channels": 32, "num_res_blocks": [2, 2],
    "transformer_depth": [1, 1, 0, 0], "channel_mult": [1, 2], "transformer_depth_middle": 1,
    "use_linear_in_transformer": False, "context_dim": 32, "transformer_depth_output": [1, 1, 1, 0, 0, 0],
    "use_temporal_attention": False, "use_temporal_resblock": False,
}
# Quick mode: the same code paths on tiny models.
TINY_SDXL_UNET = dict(
    sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(32, 64),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2), attention_head_dim=(2, 4), cross_attention_dim=32,
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=32 + 6 * 8, norm_num_groups=32,
)
FEATURES_PER_CONCEPT = 3
TIMESTEP = 500


def build_unet(config: dict[str, Any], seed: int = 0) -> Any:
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(**config).eval().requires_grad_(False)


def sd_inputs(config: dict[str, Any], latent: int, text_dim: int, *, sdxl: bool, pooled: int = 1280) -> dict[str, Any]:
    g = torch.Generator().manual_seed(1)
    inputs = {"sample": torch.randn(2, 4, latent, latent, generator=g), "timestep": torch.tensor(TIMESTEP),
              "encoder_hidden_states": torch.randn(2, 77, text_dim, generator=g), "return_dict": False}
    if sdxl:
        inputs["added_cond_kwargs"] = {"text_embeds": torch.randn(2, pooled, generator=g),
                                       "time_ids": torch.tensor([[latent * 8, latent * 8, 0, 0, latent * 8,
                                                                  latent * 8]] * 2, dtype=torch.float32)}
    return inputs


def concept_data(name: str, feats: list[int], mu: list[float], thr: list[float], n_buckets: int = 50) -> ConceptData:
    m = len(feats)
    return ConceptData(name=name, bucket_width=1000 / n_buckets, max_timestep=1000,
                       feature_ids=torch.tensor(feats, dtype=torch.long).expand(n_buckets, m).clone(),
                       scores=torch.linspace(1.0, 0.5, m).expand(n_buckets, m).clone(),
                       mu=torch.tensor(mu).expand(n_buckets, m).clone(),
                       threshold=torch.tensor(thr).expand(n_buckets, m).clone(),
                       n_selected=torch.full((n_buckets,), min(FEATURES_PER_CONCEPT, m), dtype=torch.long),
                       observed=torch.ones(n_buckets, dtype=torch.bool), info={"benchmark": True})
