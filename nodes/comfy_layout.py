"""Where a diffusers hook point lives in ComfyUI's UNet or DiT, and block calls built from ComfyUI's state.

Pure torch: nothing here imports ComfyUI. The node pack passes in ComfyUI's ``unet_config``,
``transformer_options`` and ``model_sampling`` and gets back what to patch and a
:class:`~saeuron_core.hosts.hooks.BlockCall` that the same erasers and recorders as in diffusers consume.

ComfyUI's ``output_block_patch`` (with ``transformer_options["block"] == ("output", n + 1)``) sees
exactly the output of ``output_blocks[n]``; that equals the attention layer's output unless an
upsampler follows it in the same block or it is the last block. Those cases (and down and middle
blocks) need an object patch on the ``SpatialTransformer`` itself, and so does an SAE that reads a block's
residual update (the object patch sees the block's input).

DiT models (FLUX, SD3/MMDiT) take block replacements: ``transformer_options["patches_replace"]["dit"]``
with ``("double_block", i)`` (diffusers ``transformer_blocks.i``) and, for FLUX, ``("single_block", i)``
(diffusers ``single_transformer_blocks.i``, whose tokens are ``[text, image]``: only the image tokens are read).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable, Literal, Optional

import torch
from torch import Tensor

from saeuron_core.errors import ConfigError
from saeuron_core.hosts.hooks import BlockCall, edit_block, from_tokens, to_tokens

_HOOK = re.compile(r"^(?:unet\.)?(?:(down_blocks|up_blocks)\.(\d+)\.attentions\.(\d+)|mid_block\.attentions\.0)$")


@dataclass(frozen=True)
class ComfyTarget:
    """``kind`` output_patch: patch at ``block``; object_patch: wrap the module at ``module_path``;
    dit_patch: replace the DiT block ``block`` (``("double_block", i)`` or ``("single_block", i)``)."""

    hook_point: str
    kind: Literal["output_patch", "object_patch", "dit_patch"]
    module_path: str
    channels: int
    block: Optional[tuple[str, int]] = None


def _as_list(value: Any, n: int) -> list[int]:
    return list(value) if isinstance(value, (list, tuple)) else [int(value)] * n


def comfy_targets(unet_config: dict[str, Any]) -> dict[str, ComfyTarget]:
    """Every cross-attention hook point of a ComfyUI UNet, by its diffusers name."""
    mult = list(unet_config["channel_mult"])
    levels = len(mult)
    ch = int(unet_config["model_channels"])
    nrb = _as_list(unet_config["num_res_blocks"], levels)
    depth_in = list(unet_config.get("transformer_depth") or [])
    depth_out = list(unet_config.get("transformer_depth_output") or [])
    targets: dict[str, ComfyTarget] = {}
    n, k = 1, 0
    for level in range(levels):
        for i in range(nrb[level]):
            if k < len(depth_in) and depth_in[k] > 0:
                name = f"down_blocks.{level}.attentions.{i}"
                targets[name] = ComfyTarget(name, "object_patch", f"diffusion_model.input_blocks.{n}.1", ch * mult[level])
            n, k = n + 1, k + 1
        n += 1 if level < levels - 1 else 0  # the downsampler has an input block of its own
    if unet_config.get("transformer_depth_middle", 0) and unet_config.get("transformer_depth_middle", 0) > 0:
        targets["mid_block.attentions.0"] = ComfyTarget("mid_block.attentions.0", "object_patch",
                                                        "diffusion_model.middle_block.1", ch * mult[-1])
    rev_nrb = list(reversed(nrb))
    depth_out_rev = list(reversed(depth_out))  # ComfyUI pops from the end while building output blocks
    total_out = sum(r + 1 for r in rev_nrb)
    n = 0
    for x in range(levels):
        level = levels - 1 - x
        for i in range(rev_nrb[x] + 1):
            has_attn = depth_out_rev[n] > 0 if n < len(depth_out_rev) else False
            if has_attn:
                name = f"up_blocks.{x}.attentions.{i}"
                upsampled = i == rev_nrb[x] and level > 0
                path = f"diffusion_model.output_blocks.{n}.1"
                if not upsampled and n + 1 < total_out:
                    targets[name] = ComfyTarget(name, "output_patch", path, ch * mult[level], ("output", n + 1))
                else:
                    targets[name] = ComfyTarget(name, "object_patch", path, ch * mult[level])
            n += 1
    return targets


_DIT_HOOK = re.compile(r"^(?:transformer\.)?(transformer_blocks|single_transformer_blocks)\.(\d+)$")


def comfy_dit_target(hook_point: str, arch: Literal["flux", "mmdit"], n_double: int, n_single: int, width: int,
                     d_in: Optional[int] = None) -> ComfyTarget:
    """The ComfyUI block replacement for a diffusers DiT hook point (checked against the SAE width ``d_in``)."""
    match = _DIT_HOOK.match(hook_point or "")
    kinds = "'transformer_blocks.N'" + (" or 'single_transformer_blocks.N'" if arch == "flux" else "")
    if not match:
        raise ConfigError(f"hook point {hook_point!r} is not a block of this {arch.upper()} model; it can be hooked "
                          f"at {kinds}")
    stack, index = match.group(1), int(match.group(2))
    if stack == "single_transformer_blocks" and arch != "flux":
        raise ConfigError(f"hook point {hook_point!r}: this {arch.upper()} model has no single-stream blocks")
    count = n_double if stack == "transformer_blocks" else n_single
    if index >= count:
        raise ConfigError(f"this {arch.upper()} model has no block {stack}.{index}; it has {count} {stack} "
                          f"(0 to {count - 1})")
    if d_in is not None and d_in != width:
        raise ConfigError(f"the SAE expects {d_in} channels but {stack}.{index} of this model has {width}; "
                          f"the SAE was made for another model")
    kind = "double_block" if stack == "transformer_blocks" else "single_block"
    return ComfyTarget(f"{stack}.{index}", "dit_patch", f"{kind}s.{index}", width, (kind, index))


def comfy_target(hook_point: str, unet_config: dict[str, Any], d_in: Optional[int] = None,
                 residual: bool = False) -> ComfyTarget:
    """The ComfyUI place of ``hook_point`` (checked against the SAE width ``d_in`` when given); ``residual``
    SAEs always get an object patch, which sees the block's input."""
    if not _HOOK.match(hook_point or ""):
        raise ConfigError(f"hook point {hook_point!r} is not a UNet cross-attention block; ComfyUI models can be "
                          f"hooked at 'down_blocks.I.attentions.J', 'mid_block.attentions.0' or 'up_blocks.I.attentions.J'")
    name = hook_point[len("unet."):] if hook_point.startswith("unet.") else hook_point
    try:
        targets = comfy_targets(unet_config)
    except (KeyError, TypeError, ValueError):
        raise ConfigError("this MODEL is not a UNet with the SD 1.x/2.x/SDXL block layout; the SAE cannot be placed") from None
    if name not in targets:
        raise ConfigError(f"this model has no attention block {name!r}; it has {', '.join(targets) or 'none'}")
    target = targets[name]
    if d_in is not None and d_in != target.channels:
        raise ConfigError(f"the SAE expects {d_in} channels but {name!r} of this model has {target.channels}; "
                          f"the SAE was made for another model")
    if residual and target.kind == "output_patch":
        target = ComfyTarget(name, "object_patch", target.module_path, target.channels)
    return target


def comfy_block_call(tokens: Tensor, spatial: Optional[tuple[int, int]], transformer_options: dict[str, Any],
                     timestep_of: Callable[[Tensor], Tensor], call_index: int) -> BlockCall:
    """A :class:`BlockCall` for ComfyUI block tokens ``[B, N, C]`` (``spatial``: the ``(H, W)`` grid, if known).

    The batch is ``len(cond_or_uncond)`` chunks (0 = conditional, 1 = unconditional);
    ``transformer_options["sigmas"]`` holds one chunk's sigmas, turned into timestep values by
    ``timestep_of`` (the model's ``model_sampling.timestep``).
    """
    batch = tokens.shape[0]
    chunks = list(transformer_options.get("cond_or_uncond") or [0])
    per = batch // len(chunks) if batch % len(chunks) == 0 else batch
    if per == batch:
        chunks = chunks[:1]
    is_cond = torch.tensor([c == 0 for c in chunks], dtype=torch.bool).repeat_interleave(per)
    sigmas = transformer_options.get("sigmas")
    timesteps = None
    if sigmas is not None:
        t = timestep_of(sigmas.detach()).float().flatten().cpu()
        t = t.expand(per).clone() if t.numel() == 1 else t[:per]
        timesteps = t.repeat(len(chunks))
    return BlockCall(tokens=tokens, spatial=spatial, timesteps=timesteps, is_cond=is_cond, call_index=call_index)


class ComfyBlockPatch:
    """Runs a block-call function (eraser, recorder) on a ComfyUI block.

    Usable as ``output_block_patch`` (``__call__(h, hsp, transformer_options)``), from an object patch
    (:meth:`apply`), or as a DiT block replacement (:meth:`replace_block`, with :meth:`post_input` recording the
    text length that FLUX's single blocks put in front of the image tokens). ``residual``: the function sees the
    block's update (output minus input) and its edit is added onto the output. ``ModelPatcher.clone()``
    deep-copies ``model_options``; a patch is immutable once made, so copies share it (``__deepcopy__`` returns
    ``self``) instead of duplicating the SAE and the model's sampling object.
    """

    def __init__(self, fn: Callable[[BlockCall], Optional[Tensor]], timestep_of: Callable[[Tensor], Tensor],
                 target: ComfyTarget, residual: bool = False) -> None:
        self.fn = fn
        self.timestep_of = timestep_of
        self.target = target
        self.residual = residual
        self.calls = 0
        self.text_tokens = 0
        self.previous: Optional[Callable[[dict, dict], dict]] = None  # a replacement already on this DiT block

    def __deepcopy__(self, memo: dict) -> "ComfyBlockPatch":
        return self

    def __call__(self, h: Tensor, hsp: Tensor, transformer_options: dict[str, Any]) -> tuple[Tensor, Tensor]:
        if transformer_options.get("block") != self.target.block:
            return h, hsp
        return self.apply(h, transformer_options), hsp

    def apply(self, h: Tensor, transformer_options: dict[str, Any], h_in: Optional[Tensor] = None) -> Tensor:
        """The block output ``h`` edited (``h_in``: the block's input, read by residual SAEs)."""
        out_tokens, spatial = to_tokens(h)
        in_tokens = to_tokens(h_in)[0] if self.residual and h_in is not None else None
        if self.residual and in_tokens is None:
            raise ConfigError(f"the SAE reads the residual update of {self.target.hook_point!r}, but this patch "
                              "does not see the block's input")

        def make_call(tokens: Tensor) -> BlockCall:
            call = comfy_block_call(tokens, spatial, transformer_options, self.timestep_of, self.calls)
            self.calls += 1
            return call

        new = edit_block(self.fn, out_tokens, in_tokens, make_call)
        return h if new is None else from_tokens(new, spatial, h)

    def post_input(self, args: dict[str, Any]) -> dict[str, Any]:
        """FLUX ``post_input`` patch: remembers how many text tokens lead the single blocks' sequence."""
        self.text_tokens = int(args["txt"].shape[1])
        return args

    def replace_block(self, args: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
        """``patches_replace["dit"]`` function: run the original block, then edit its image tokens."""
        skip = self.text_tokens if self.target.block and self.target.block[0] == "single_block" else 0
        # A copy of the input: FLUX's single blocks add their update to it in place.
        img_in = args["img"][:, skip:].clone() if self.residual else None
        out = self.previous(args, extra) if self.previous is not None else extra["original_block"](args)
        img_out = out["img"][:, skip:]
        new = self.apply(img_out, args.get("transformer_options") or {}, img_in)
        if new is not img_out:
            out = dict(out, img=torch.cat([out["img"][:, :skip], new], 1) if skip else new)
        return out


# -- diffusers configs -> ComfyUI configs (for loading any SD-style diffusers folder) -------------

# ComfyUI's "cosine" (with its fixed s = 0.008 and betas capped at 0.999) is diffusers' squaredcos_cap_v2;
# ComfyUI's own "squaredcos_cap_v2" branch returns a numpy array that some releases cannot use.
_BETA_SCHEDULES = {"scaled_linear": "linear", "linear": "sqrt_linear", "squaredcos_cap_v2": "cosine"}


def _per_level(value: Any, levels: int, name: str) -> list[int]:
    values = _as_list(value, levels)
    if len(values) != levels:
        raise ConfigError(f"UNet config: {name} has {len(values)} entries for {levels} levels")
    return [int(v) for v in values]


def unet_config_from_diffusers(cfg: dict[str, Any]) -> dict[str, Any]:
    """ComfyUI ``unet_config`` for a diffusers ``UNet2DConditionModel`` config with SD's block layout.

    Raises :class:`ConfigError` for what ComfyUI's UNet cannot express (GroupNorm groups other
    than 32, channel counts that are not multiples of the first level's, class/added embeddings).
    """
    channels = [int(c) for c in cfg["block_out_channels"]]
    levels = len(channels)
    if int(cfg.get("norm_num_groups", 32)) != 32:
        raise ConfigError("ComfyUI's UNet normalises with 32 groups; this UNet uses "
                          f"norm_num_groups={cfg.get('norm_num_groups')}")
    base = channels[0]
    if any(c % base for c in channels):
        raise ConfigError(f"block_out_channels {channels} are not multiples of the first level's channels")
    if cfg.get("class_embed_type") or cfg.get("addition_embed_type"):
        raise ConfigError("UNets with class or added embeddings (e.g. SDXL) are loaded by ComfyUI's own loaders")
    nrb = _per_level(cfg.get("layers_per_block", 2), levels, "layers_per_block")
    depth = _per_level(cfg.get("transformer_layers_per_block", 1), levels, "transformer_layers_per_block")
    down, up = list(cfg["down_block_types"]), list(cfg["up_block_types"])
    attn_down = [depth[i] if "CrossAttn" in down[i] else 0 for i in range(levels)]
    attn_up = [depth[levels - 1 - x] if "CrossAttn" in up[x] else 0 for x in range(levels)]
    heads = cfg.get("num_attention_heads") or cfg.get("attention_head_dim") or 8  # SD 1.x names heads head_dim
    heads_per_level = _per_level(heads, levels, "attention_head_dim")
    head_dims = {channels[i] // heads_per_level[i] for i in range(levels) if attn_down[i] or attn_up[levels - 1 - i]}
    if isinstance(heads, int):
        num_heads, num_head_channels = heads, -1
    elif len(head_dims) == 1:
        num_heads, num_head_channels = -1, head_dims.pop()
    else:
        raise ConfigError(f"ComfyUI's UNet needs one head count or one head size for all levels, got {heads}")
    mid = cfg.get("mid_block_type", "UNetMidBlock2DCrossAttn")
    return {
        "use_checkpoint": False, "image_size": int(cfg.get("sample_size") or 32), "in_channels": int(cfg["in_channels"]),
        "out_channels": int(cfg["out_channels"]), "model_channels": base, "channel_mult": [c // base for c in channels],
        "num_res_blocks": nrb, "transformer_depth": [d for i in range(levels) for d in [attn_down[i]] * nrb[i]],
        "transformer_depth_output": [d for lv in range(levels) for d in [attn_up[levels - 1 - lv]] * (nrb[lv] + 1)],
        "transformer_depth_middle": depth[-1] if mid == "UNetMidBlock2DCrossAttn" else -1,
        "context_dim": int(cfg["cross_attention_dim"]), "use_linear_in_transformer": bool(cfg.get("use_linear_projection")),
        "num_heads": num_heads, "num_head_channels": num_head_channels, "use_spatial_transformer": True,
        "legacy": False, "adm_in_channels": None, "use_temporal_attention": False, "use_temporal_resblock": False,
    }


def sampling_settings_from_scheduler(cfg: dict[str, Any]) -> dict[str, Any]:
    """ComfyUI ``sampling_settings`` for a diffusers scheduler config (discrete, 1000-step schedules)."""
    schedule = cfg.get("beta_schedule", "scaled_linear")
    if schedule not in _BETA_SCHEDULES:
        raise ConfigError(f"beta_schedule {schedule!r} has no ComfyUI equivalent; expected one of {sorted(_BETA_SCHEDULES)}")
    if int(cfg.get("num_train_timesteps", 1000)) != 1000:
        raise ConfigError("ComfyUI's discrete model sampling assumes 1000 training timesteps")
    return {"beta_schedule": _BETA_SCHEDULES[schedule], "linear_start": float(cfg.get("beta_start", 0.00085)),
            "linear_end": float(cfg.get("beta_end", 0.012))}


def vae_config_from_diffusers(cfg: dict[str, Any]) -> dict[str, Any]:
    """ComfyUI ``VAE(config=...)`` parameters for a diffusers ``AutoencoderKL`` config."""
    channels = [int(c) for c in cfg["block_out_channels"]]
    if int(cfg.get("norm_num_groups", 32)) != 32 or any(c % channels[0] for c in channels):
        raise ConfigError("ComfyUI's VAE needs norm_num_groups=32 and channels that are multiples of the first level's")
    latent = int(cfg.get("latent_channels", 4))
    return {"params": {"embed_dim": latent, "ddconfig": {
        "double_z": True, "z_channels": latent, "resolution": int(cfg.get("sample_size") or 256),
        "in_channels": int(cfg.get("in_channels", 3)), "out_ch": int(cfg.get("out_channels", 3)), "ch": channels[0],
        "ch_mult": [c // channels[0] for c in channels], "num_res_blocks": int(cfg.get("layers_per_block", 2)),
        "attn_resolutions": [], "dropout": 0.0}}}
