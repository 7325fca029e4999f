"""Pixel-space text-conditioned UNet for the demo, its noise schedule and a CFG sampler.

The UNet is a diffusers `UNet2DConditionModel` restricted to what ComfyUI's SD1 UNet can
express: GroupNorm(32, ch) everywhere (all widths multiples of 32), SD1-style attention
(`attention_head_dim` = number of heads, conv projections), two layers per block, so that
`up_blocks.1.attentions.1` is the middle of three cross-attention layers as in SD1.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DConditionModel
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from .dataset import IMAGE_SIZE, from_model_range
from .textenc import encode

TEXT_DIM = 64

# 4 levels at 32/16/8/4 px. up_blocks.1 is a CrossAttnUpBlock2D at 8x8 with 64 channels, the
# layer-for-layer analogue of SD1's up_blocks.1 (second-lowest resolution, cross-attention).
# Attention only at 8x8 (and the 4x4 mid block): at 16x16 with 32 channels and 8 heads the head
# dim is 4, and CPU attention there took half the training step time.
UNET_CONFIG: dict[str, Any] = dict(
    sample_size=IMAGE_SIZE,
    in_channels=3,
    out_channels=3,
    block_out_channels=(32, 32, 64, 64),
    down_block_types=("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
    mid_block_type="UNetMidBlock2DCrossAttn",
    layers_per_block=2,
    norm_num_groups=32,
    cross_attention_dim=TEXT_DIM,
    attention_head_dim=8,
    use_linear_projection=False,
    transformer_layers_per_block=1,
)

# v-prediction: with the cosine schedule alpha_bar(999) is ~0, where an eps-model's x0 estimate
# (x - sqrt(1 - a) eps) / sqrt(a) blows up; samplers that start at t=999 (ComfyUI's do) then
# produce noise. v = sqrt(a) eps - sqrt(1 - a) x0 stays well-conditioned at every t.
PREDICTION_TYPE = "v_prediction"

SCHEDULER_CONFIG: dict[str, Any] = dict(
    num_train_timesteps=1000,
    beta_schedule="squaredcos_cap_v2",
    prediction_type=PREDICTION_TYPE,
    clip_sample=False,
)


def build_unet(config: dict[str, Any] | None = None, seed: int = 0) -> UNet2DConditionModel:
    """Freshly initialised demo UNet (config overrides merged into UNET_CONFIG)."""
    cfg = {**UNET_CONFIG, **(config or {})}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return UNet2DConditionModel(**cfg)


def train_scheduler(prediction_type: str = PREDICTION_TYPE) -> DDPMScheduler:
    """The training noise schedule (cosine, 1000 steps)."""
    return DDPMScheduler(**{**SCHEDULER_CONFIG, "prediction_type": prediction_type})


def sample_scheduler(prediction_type: str = PREDICTION_TYPE) -> DDIMScheduler:
    """DDIM on the same schedule, for sampling."""
    return DDIMScheduler(**{**SCHEDULER_CONFIG, "prediction_type": prediction_type}, set_alpha_to_one=False)


@torch.no_grad()
def sample(
    unet: UNet2DConditionModel,
    text_encoder: torch.nn.Module,
    tokenizer: Any,
    prompts: list[str],
    steps: int = 25,
    guidance: float = 3.0,
    seed: int = 0,
    scheduler: SchedulerMixin | None = None,
    batch_size: int = 64,
) -> torch.Tensor:
    """Classifier-free-guided samples in pixel space: uint8 (N, 3, 32, 32).

    The UNet is called as `unet(x, t, encoder_hidden_states=...)` on a batch ordered
    [uncond, cond], as diffusers pipelines do; the empty prompt "" is the unconditional one.
    """
    scheduler = scheduler or sample_scheduler()
    device = next(unet.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    size = unet.config.sample_size
    out: list[torch.Tensor] = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        n = len(chunk)
        cond = encode(text_encoder, tokenizer, chunk)
        uncond = encode(text_encoder, tokenizer, [""] * n)
        ctx = torch.cat([uncond, cond])
        x = torch.randn((n, unet.config.in_channels, size, size), generator=gen).to(device)
        scheduler.set_timesteps(steps)
        x = x * scheduler.init_noise_sigma
        for t in scheduler.timesteps:
            inp = scheduler.scale_model_input(torch.cat([x, x]), t)
            eps_u, eps_c = unet(inp, t, encoder_hidden_states=ctx).sample.chunk(2)
            eps = eps_u + guidance * (eps_c - eps_u)
            x = scheduler.step(eps, t, x).prev_sample
        out.append(from_model_range(x.float().cpu()))
    return torch.cat(out)


def count_params(module: torch.nn.Module) -> int:
    """Number of parameters."""
    return sum(p.numel() for p in module.parameters())
