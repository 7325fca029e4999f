"""Eraser overhead on one block with a *residual* SAE, as the public FLUX and SDXL-Turbo SAEs hook: a FLUX.1-width
double block and an SDXL ``down_blocks.2.attentions.1``-shaped block (sections ``flux`` and ``sdxl_block`` of
:mod:`benchmarks.eraser_overhead`, which describes them)."""

from __future__ import annotations

import os
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from benchmarks.common import (Pauser, best_ratio, encode_flops, fmt_s, interleaved, matmul_gflops, median,
                               paired_ratio, spread, table)
from saeuron_core.erasure.eraser import ConceptEraser
from saeuron_core.hosts.hooks import BlockCall, BlockHook, edit_block, to_tokens
from saeuron_core.sae.library import add_concept
from saeuron_core.sae.model import SAEConfig, TopKSAE
from benchmarks.models import FEATURES_PER_CONCEPT, SDXL_UNET, TIMESTEP, TINY_SDXL_UNET, concept_data, sd_inputs


# -- residual SAEs on DiT and SDXL blocks (one block, as the public FLUX and SDXL-Turbo SAEs hook) ------------

# FLUX.1 (dev/schnell) transformer, for counting the FLOPs of a whole model call on the meta device.
FLUX_MODEL = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                  num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                  axes_dims_rope=[16, 56, 56])
TINY_FLUX_MODEL = dict(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=32,
                       num_attention_heads=2, joint_attention_dim=64, pooled_projection_dim=16, guidance_embeds=True,
                       axes_dims_rope=[8, 12, 12])
# The public FLUX SAE (antoniomari/SAE_flux_18: 3072 -> 12288 on transformer_blocks.18) does not state its k in
# anything read here (../shared/notes/public-saes.md, sdxl-unbox's model_interfaces.py): 64 is assumed.
FLUX_SAE_K = 64
# SDLens / sdxl-unbox SDXL-Turbo SAEs: 1280 -> 5120, k 10, residual, on down_blocks.2.attentions.1 (and three more).
SDXL_SAE = dict(n_latents=5120, k=10)
# Random SAE weights: every latent's bias is set so that its pre-activation is positive on BASE_SHARE of the block's
# tokens (a trained TopK SAE's pre-activations are mostly negative), and the concept's features on CONCEPT_SHARE each.
BASE_SHARE = 0.01
CONCEPT_SHARE = 0.05
BLOCK_VARIANTS = ("no hook", "ablate, 1 concept (3 features)")


class BlockHost(nn.Module):
    """A stand-in denoiser holding one block at its real dotted path (``transformer_blocks.18``), so that a
    :class:`BlockHook` on it records each call's timestep and hooks the block exactly as inside the whole model."""

    def __init__(self, path: str, block: nn.Module) -> None:
        super().__init__()
        first, *rest = path.split(".")
        node: nn.Module = nn.ModuleDict()
        setattr(self, first, node)
        for part in rest[:-1]:
            node[part] = nn.ModuleDict()
            node = node[part]
        node[rest[-1]] = block
        self.path = path

    def forward(self, hidden_states: Tensor, timestep: Tensor, **kwargs: Any) -> Any:
        return self.get_submodule(self.path)(hidden_states=hidden_states, **kwargs)


class BlockCase:
    """One block of a model: its host, inputs, CFG layout, SAE size and the FLOPs of the whole model call."""

    def __init__(self, label: str, make_block: Callable[[], nn.Module], path: str, inputs: dict[str, Any],
                 cfg_layout: str, d_in: int, n_latents: int, k: int, model_label: str,
                 model_flops: Callable[[], float]) -> None:
        self.label, self.inputs, self.cfg_layout = label, inputs, cfg_layout
        self.make_block, self.host = make_block, BlockHost(path, make_block())
        self.d_in, self.n_latents, self.k = d_in, n_latents, k
        self.model_label, self.model_flops = model_label, model_flops

    @property
    def hook_point(self) -> str:
        return self.host.path

    def __call__(self) -> Any:
        with torch.no_grad():
            return self.host(**self.inputs)

    def block_flops(self) -> float:
        """FLOPs of one block call, counted on a meta-device copy as the whole model is (on the CPU, attention runs
        in a fused kernel that the flop counter does not see)."""
        with torch.device("meta"):
            host = BlockHost(self.hook_point, self.make_block())
        inputs = _meta(self.inputs)
        return counted_flops(lambda: host(**inputs))


def _meta(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.to("meta") if value.dim() else value
    if isinstance(value, dict):
        return {k: _meta(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return tuple(_meta(v) for v in value)
    return value


def counted_flops(fn: Callable[[], Any]) -> float:
    """FLOPs of ``fn()`` as torch's flop counter sees them: matmuls, convolutions and attention (elementwise ops,
    norms and softmax are not counted)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.no_grad():
        fn()
    return float(counter.get_total_flops())


def flux_model_flops(config: dict[str, Any], n_img: int, n_txt: int) -> Callable[[], float]:
    """FLOPs of one FLUX transformer call (batch 1, guidance-distilled: no unconditional half), counted on a
    meta-device copy of the whole model (no weights are made)."""
    def count() -> float:
        from diffusers import FluxTransformer2DModel

        with torch.device("meta"):
            model = FluxTransformer2DModel(**config)
        inputs = dict(hidden_states=torch.zeros(1, n_img, config["in_channels"], device="meta"),
                      encoder_hidden_states=torch.zeros(1, n_txt, config["joint_attention_dim"], device="meta"),
                      pooled_projections=torch.zeros(1, config["pooled_projection_dim"], device="meta"),
                      timestep=torch.ones(1, device="meta"), guidance=torch.ones(1, device="meta"),
                      img_ids=flux_ids(n_img, 0)[1], txt_ids=torch.zeros(n_txt, 3), return_dict=False)
        return counted_flops(lambda: model(**inputs))
    return count


def unet_model_flops(config: dict[str, Any], latent: int, text_dim: int, pooled: int) -> Callable[[], float]:
    """FLOPs of one SDXL UNet call (batch 2: CFG), counted on a meta-device copy of the whole UNet."""
    def count() -> float:
        from diffusers import UNet2DConditionModel

        with torch.device("meta"):
            unet = UNet2DConditionModel(**config)
        inputs = _meta(sd_inputs(config, latent, text_dim, sdxl=True, pooled=pooled))
        return counted_flops(lambda: unet(**inputs))
    return count


def flux_ids(n_img: int, n_txt: int) -> tuple[Tensor, Tensor]:
    """FLUX's position ids: text tokens at 0, image tokens on their (row, column) grid."""
    side = int(round(n_img ** 0.5))
    if side * side != n_img:
        raise SystemExit(f"--flux-image-tokens must be a square number, got {n_img}")
    img = torch.zeros(side, side, 3)
    img[..., 1] = torch.arange(side, dtype=torch.float32)[:, None]
    img[..., 2] = torch.arange(side, dtype=torch.float32)[None, :]
    return torch.zeros(n_txt, 3), img.reshape(-1, 3)


def flux_case(n_img: int, n_txt: int, quick: bool) -> BlockCase:
    """One diffusers ``FluxTransformerBlock`` with random weights at FLUX.1's width (24 heads x 128 = 3072), hooked
    at ``transformer_blocks.18`` as the public FLUX SAE; batch 1 (FLUX.1-dev/schnell: no unconditional half)."""
    from diffusers.models.transformers.transformer_flux import FluxPosEmbed, FluxTransformerBlock

    config = TINY_FLUX_MODEL if quick else FLUX_MODEL
    heads, head_dim = config["num_attention_heads"], config["attention_head_dim"]
    dim = heads * head_dim

    def make_block() -> nn.Module:
        torch.manual_seed(0)
        return FluxTransformerBlock(dim, heads, head_dim).eval().requires_grad_(False)
    g = torch.Generator().manual_seed(1)
    txt_ids, img_ids = flux_ids(n_img, n_txt)
    cos, sin = FluxPosEmbed(10000, config["axes_dims_rope"])(torch.cat([txt_ids, img_ids]))
    inputs = dict(hidden_states=torch.randn(1, n_img, dim, generator=g),
                  encoder_hidden_states=torch.randn(1, n_txt, dim, generator=g),
                  temb=torch.randn(1, dim, generator=g), image_rotary_emb=(cos, sin),
                  timestep=torch.tensor(float(TIMESTEP)))
    label = (f"tiny FLUX-layout double block (quick), {dim} channels" if quick else
             f"FLUX-size double block (diffusers FluxTransformerBlock, random weights, {heads} heads x {head_dim} = "
             f"{dim} channels)")
    label += f", batch 1, {n_img} image + {n_txt} text tokens"
    return BlockCase(label, make_block, "transformer_blocks.18", inputs, "none", d_in=dim,
                     n_latents=(256 if quick else 12288), k=(8 if quick else FLUX_SAE_K),
                     model_label="FLUX.1 transformer (19 double + 38 single blocks)" if not quick
                     else "tiny FLUX transformer", model_flops=flux_model_flops(config, n_img, n_txt))


def sdxl_block_case(side: int, quick: bool) -> BlockCase:
    """A diffusers ``Transformer2DModel`` built as SDXL's UNet builds ``down_blocks.2.attentions.1`` (1280 channels,
    20 heads x 64, 10 transformer layers, cross-attention to 2048-wide text, linear projections), random weights,
    batch 2 (CFG)."""
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    channels, heads, layers, text_dim = (64, 4, 2, 32) if quick else (1280, 20, 10, 2048)

    def make_block() -> nn.Module:
        torch.manual_seed(0)
        return Transformer2DModel(num_attention_heads=heads, attention_head_dim=channels // heads,
                                  in_channels=channels, num_layers=layers, cross_attention_dim=text_dim,
                                  norm_num_groups=32, use_linear_projection=True).eval().requires_grad_(False)
    g = torch.Generator().manual_seed(1)
    inputs = dict(hidden_states=torch.randn(2, channels, side, side, generator=g),
                  encoder_hidden_states=torch.randn(2, 77, text_dim, generator=g),
                  timestep=torch.tensor(float(TIMESTEP)), return_dict=False)
    latent = side * 4  # down_blocks.2 runs at a quarter of the latent's side
    label = (f"tiny SDXL-layout residual block (quick), {channels} channels, {layers} layers" if quick else
             f"SDXL residual block (diffusers Transformer2DModel as SDXL's down_blocks.2.attentions.1: {channels} "
             f"channels, {heads} heads, {layers} transformer layers, random weights)")
    label += f", batch 2 (CFG) x {side}x{side} tokens ({latent * 8} px)"
    unet_config = TINY_SDXL_UNET if quick else SDXL_UNET
    return BlockCase(label, make_block, "down_blocks.2.attentions.1", inputs, "uncond_cond", d_in=channels,
                     n_latents=(256 if quick else SDXL_SAE["n_latents"]), k=(4 if quick else SDXL_SAE["k"]),
                     model_label=("tiny SDXL-layout UNet" if quick else f"SDXL UNet, {latent}x{latent} latent"),
                     model_flops=unet_model_flops(unet_config, latent, text_dim, 32 if quick else 1280))


def residual_sae(case: BlockCase, update: Tensor) -> tuple[TopKSAE, list[int]]:
    """Random residual SAE centred on the block's update, biases set so that each latent's pre-activation is positive
    on ``BASE_SHARE`` of the tokens (the concept's 4 candidate features: ``CONCEPT_SHARE``), with one library concept
    (3 selected features of 4, every timestep bucket; SAeUron's threshold: mean activation over all tokens)."""
    torch.manual_seed(2)
    sae = TopKSAE(SAEConfig(d_in=case.d_in, n_latents=case.n_latents, k=case.k, hook_point=case.hook_point,
                            residual=True)).eval().requires_grad_(False)
    tokens = update.reshape(-1, case.d_in).float()
    n = tokens.shape[0]
    feats = torch.randperm(case.n_latents, generator=torch.Generator().manual_seed(3))[:FEATURES_PER_CONCEPT + 1]
    with torch.no_grad():
        sae.b_dec.copy_(tokens.mean(0))
        pre = F.linear(tokens - sae.b_dec, sae.encoder.weight)                       # [n, n_latents]
        share = torch.full((case.n_latents,), BASE_SHARE)
        share[feats] = CONCEPT_SHARE
        rank = (n - (share * n).round().clamp(min=1)).long()                         # k-th smallest, 0-based
        sorted_pre = pre.sort(dim=0).values
        sae.encoder.bias.copy_(-sorted_pre.gather(0, rank[None, :]).squeeze(0))
        del pre, sorted_pre
        code = sae.encode(tokens)
    values, ids = code.values.flatten().double(), code.indices.flatten()
    total = torch.zeros(case.n_latents, dtype=torch.float64).index_add_(0, ids, values)
    mean_act = [float(total[f] / n) for f in feats.tolist()]
    add_concept(sae, concept_data("concept0", feats.tolist(), mean_act, mean_act))
    return sae, feats.tolist()


BLOCK_HEADERS = ["variant", "block call, wall (median)", "block call, process CPU (median)",
                 "wall ratio to no hook (paired)", "CPU ratio to no hook (paired)", "best-of ratio (min / min)",
                 "tokens touched (full encode)", "tokens edited", "hook's own work, wall (median)",
                 "own work / no-hook block call", "own work / model call (est.)", "SAE GFLOP this call",
                 "SAE FLOPs / block FLOPs", "SAE FLOPs / model-call FLOPs", "floor (SAE FLOPs / matmul rate)",
                 "own work / floor", "wall spread"]


def measure_block(case: BlockCase, reps: int, gflops: float, pauser: Pauser, log: bool, warmup: int) -> str:
    load_before = os.getloadavg()
    seen: list[BlockCall] = []
    with BlockHook(case.host, case.hook_point, lambda call: seen.append(call), cfg_layout=case.cfg_layout,
                   residual=True):
        case()  # also the first warm-up call
    call = seen[0]
    update = call.tokens
    in_tokens = to_tokens(case.inputs["hidden_states"])[0]
    out_tokens = in_tokens + update
    rows_n, tokens_per_row, d = update.shape
    n_tokens = rows_n * tokens_per_row
    sae, _ = residual_sae(case, update)
    eraser = ConceptEraser(sae, ["concept0"], "ablate")
    slots = int(eraser.sel_valid.sum(1).max())

    def make_call(tokens: Tensor) -> BlockCall:
        return BlockCall(tokens=tokens, spatial=call.spatial, timesteps=call.timesteps, is_cond=call.is_cond,
                         call_index=0)

    # Which tokens the eraser touches (gets the full encode) and which it edits, on this very call.
    touched: list[int] = []
    plain_pre_acts = sae.pre_acts
    sae.pre_acts = lambda x: (touched.append(x.reshape(-1, d).shape[0]), plain_pre_acts(x))[1]  # type: ignore
    with torch.no_grad():
        new_out = edit_block(eraser, out_tokens, in_tokens, make_call)
    sae.pre_acts = plain_pre_acts  # type: ignore
    m = sum(touched)
    edited = 0.0 if new_out is None else float((new_out != out_tokens).any(-1).float().mean())

    fns = {"no hook": case,
           BLOCK_VARIANTS[1]: lambda: _hooked(case, eraser)}
    cpu: dict[str, list[float]] = {}
    times = interleaved(fns, reps, warmup=warmup, pauser=pauser, log=log, cpu=cpu)
    # The hook's own work on the recorded block call: the update (output - input), the eraser on it, the edit added
    # onto the output; and a full SAE encode of every token for comparison.
    alone_fns = {"hook": lambda: edit_block(eraser, out_tokens, in_tokens, make_call),
                 "encode": lambda: sae.encode(update)}
    with torch.no_grad():
        alone = interleaved(alone_fns, max(reps, 5), warmup=1, pauser=pauser)
    gflops = max(gflops, matmul_gflops(512, d, case.n_latents))
    model_flops, block_flops = case.model_flops(), case.block_flops()
    load_after = os.getloadavg()

    n_lat = case.n_latents
    flops_eraser = 2.0 * n_tokens * slots * d + encode_flops(m, d, n_lat) + 2.0 * m * slots * d
    flops_all = encode_flops(n_tokens, d, n_lat)
    base = median(times["no hook"])
    model_time = base * model_flops / block_flops

    def sae_cells(own: float, flops: float) -> list[str]:
        floor = flops / (gflops * 1e9)
        return [fmt_s(own), f"{own / base:.2%}", f"{own / model_time:.3%}", f"{flops / 1e9:.3g}",
                f"{flops / block_flops:.2%}", f"{flops / model_flops:.3%}", fmt_s(floor), f"{own / floor:.2f}x"]

    rows = [["no hook", fmt_s(base), fmt_s(median(cpu["no hook"])), "1.000", "1.000", "1.000", "-", "-", "-", "-",
             "-", "-", "-", "-", "-", "-", f"{spread(times['no hook']):.1f}%"]]
    name = BLOCK_VARIANTS[1]
    rows.append([name, fmt_s(median(times[name])), fmt_s(median(cpu[name])),
                 f"{paired_ratio(times, name, 'no hook'):.3f}", f"{paired_ratio(cpu, name, 'no hook'):.3f}",
                 f"{best_ratio(times, name, 'no hook'):.3f}", f"{m / n_tokens:.1%}", f"{edited:.1%}",
                 *sae_cells(median(alone["hook"]), flops_eraser), f"{spread(times[name]):.1f}%"])
    rows.append(["(SAE encode, all tokens)", "-", "-", "-", "-", "-", "100%", "-",
                 *sae_cells(median(alone["encode"]), flops_all), "-"])
    title = (f"Residual eraser per block call: {case.label}, hook {case.hook_point}, residual SAE "
             f"{d}->{n_lat} k={case.k}, {reps} interleaved reps, {warmup} warm-up round")
    note = (f"\nBlock FLOPs {block_flops / 1e9:.1f} GFLOP per call ({n_tokens} tokens in the hooked stream); "
            f"{case.model_label}: {model_flops / 1e12:.3f} TFLOP per call (both counted by torch.utils.flop_counter on "
            f"meta-device copies: matmuls, convolutions, attention). 'model call (est.)' = the measured "
            f"no-hook block call x model FLOPs / block FLOPs = {fmt_s(model_time)}. SAE FLOPs: the pre-filter "
            f"(2 x {n_tokens} tokens x {slots} selected features x {d}) + the full encode of the touched tokens "
            f"(2 x m x {d} x {n_lat}) + the sparse decode (2 x m x {slots} x {d}). The concept's features have a "
            f"positive pre-activation on {CONCEPT_SHARE:.0%} of the tokens each, every other latent on "
            f"{BASE_SHARE:.0%}. Floors use the best fp32 matmul rate measured in this run: {gflops:.1f} GFLOP/s. "
            f"Load average (1 min) {load_before[0]:.2f} before, {load_after[0]:.2f} after.\n")
    return table(title, BLOCK_HEADERS, rows) + note


def _hooked(case: BlockCase, eraser: ConceptEraser) -> Any:
    with BlockHook(case.host, case.hook_point, eraser, cfg_layout=case.cfg_layout, residual=True):
        return case()


