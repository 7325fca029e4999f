"""Eraser overhead per UNet call: no hook vs ablate (1 and 10 concepts) vs replace.

Diffusers ``UNet2DConditionModel`` with SD 1.5's config (64x64 latent) and SDXL's config (128x128
latent, with SDXL's added text/time conditioning), random weights, batch 2 (CFG), and the same SD 1.5
model built through ComfyUI's own classes (ModelPatcher + the Concept Eraser node, timed per model
call through ComfyUI's sampler). The SAE is 1280 -> 20480, k 32, random weights; its concepts are
real library entries (``add_concept`` of ``ConceptData``) whose features are the ones that actually
fire on the hooked block's activations, with SAeUron's threshold (mean activation over all tokens).

Sections ``flux`` and ``sdxl_block``: one block with a *residual* SAE (it reads the block's update, output minus
input, and its edit is added onto the output), as the public FLUX and SDXL-Turbo SAEs hook: a diffusers
``FluxTransformerBlock`` at FLUX.1's width (3072 channels, 4096 image + 512 text tokens, batch 1, SAE 3072 -> 12288)
and a ``Transformer2DModel`` shaped like SDXL's ``down_blocks.2.attentions.1`` (1280 channels, 10 layers, 32x32
tokens, batch 2, SAE 1280 -> 5120 k 10), random weights; block call with and without the eraser hook, the hook's
own work on the recorded call, and the SAE FLOPs of the touched tokens against the block's and the model's FLOPs.

    python -m benchmarks.eraser_overhead [--quick] [--only sd15,sdxl,comfy,flux,sdxl_block] [--reps N]
        [--sdxl-reps N] [--block-reps N] [--flux-image-tokens N] [--flux-text-tokens N] [--sdxl-block-side N]
"""

from __future__ import annotations

import argparse
import gc
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from benchmarks.common import (NO_PAUSE, Pauser, add_common_args, best_ratio, emit, encode_flops, fmt_s, interleaved,
                               machine_line, matmul_gflops, median, paired_ratio, setup_threads, sparse_decode_flops,
                               spread, table, timed)
from saeuron_core.erasure.eraser import ConceptEraser
from saeuron_core.hosts.hooks import BlockCall, BlockHook, edit_block, to_tokens
from saeuron_core.sae.library import ConceptData, add_concept
from saeuron_core.sae.model import SAEConfig, TopKSAE

ROOT = Path(__file__).resolve().parents[1]

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
# Quick mode: the same code paths on tiny models.
TINY_SDXL_UNET = dict(
    sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(32, 64),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2), attention_head_dim=(2, 4), cross_attention_dim=32,
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=32 + 6 * 8, norm_num_groups=32,
)

GATED = "ablate, 1 concept, gated"
VARIANTS = ("no hook", "ablate, 1 concept", "ablate, 10 concepts", "replace, 1 concept", GATED)
# The gated variant edits concept0 only in images where concept1's features (its detector) cover at least
# this share of the tokens; on the benchmark's input the gate is open, so it pays for reading and editing.
GATE = 0.05
FEATURES_PER_CONCEPT = 3
N_CONCEPTS = 10
TIMESTEP = 500


class Case:
    """One model: how to call it, where to hook, and the SAE size."""

    def __init__(self, label: str, unet: Any, hook_point: str, inputs: dict[str, Any], d_in: int, n_latents: int,
                 k: int) -> None:
        self.label, self.unet, self.hook_point, self.inputs = label, unet, hook_point, inputs
        self.d_in, self.n_latents, self.k = d_in, n_latents, k

    def __call__(self) -> Any:
        with torch.no_grad():
            return self.unet(**self.inputs)


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


def capture(case: Case) -> BlockCall:
    """One real call of the hooked block (the no-hook output), for concept building and eraser-only timing."""
    seen: list[BlockCall] = []
    with BlockHook(case.unet, case.hook_point, lambda call: seen.append(call), cfg_layout="uncond_cond"):
        case()
    return seen[0]


def concept_data(name: str, feats: list[int], mu: list[float], thr: list[float], n_buckets: int = 50) -> ConceptData:
    m = len(feats)
    return ConceptData(name=name, bucket_width=1000 / n_buckets, max_timestep=1000,
                       feature_ids=torch.tensor(feats, dtype=torch.long).expand(n_buckets, m).clone(),
                       scores=torch.linspace(1.0, 0.5, m).expand(n_buckets, m).clone(),
                       mu=torch.tensor(mu).expand(n_buckets, m).clone(),
                       threshold=torch.tensor(thr).expand(n_buckets, m).clone(),
                       n_selected=torch.full((n_buckets,), min(FEATURES_PER_CONCEPT, m), dtype=torch.long),
                       observed=torch.ones(n_buckets, dtype=torch.bool), info={"benchmark": True})


def make_sae(case: Case, call: BlockCall) -> TopKSAE:
    """Random SAE centred on the block's activations, with 10 library concepts built from its firing features."""
    torch.manual_seed(2)
    sae = TopKSAE(SAEConfig(d_in=case.d_in, n_latents=case.n_latents, k=case.k, hook_point=case.hook_point)).eval()
    tokens = call.tokens.reshape(-1, case.d_in).float()
    with torch.no_grad():
        sae.b_dec.copy_(tokens.mean(0))
        code = sae.encode(tokens)
    values, ids = code.values.flatten().double(), code.indices.flatten()
    active = values > 0
    count = torch.bincount(ids[active], minlength=case.n_latents)
    total = torch.zeros(case.n_latents, dtype=torch.float64).index_add_(0, ids, values)
    order = count.argsort(descending=True)
    per = FEATURES_PER_CONCEPT + 1  # the last candidate is scored but not selected, as in a real entry
    for c in range(N_CONCEPTS):
        feats = order[c * per:(c + 1) * per].tolist()
        mu = [float(total[f] / tokens.shape[0]) for f in feats]          # mean activation on the concept
        thr = [float(total[f] / tokens.shape[0]) for f in feats]         # mean activation over all tokens
        add_concept(sae, concept_data(f"concept{c}", feats, mu, thr))
    return sae


def erasers(sae: TopKSAE) -> dict[str, ConceptEraser]:
    names = [f"concept{c}" for c in range(N_CONCEPTS)]
    return {"ablate, 1 concept": ConceptEraser(sae, names[:1], "ablate"),
            "ablate, 10 concepts": ConceptEraser(sae, names, "ablate"),
            "replace, 1 concept": ConceptEraser(sae, names[:1], "replace"),
            GATED: ConceptEraser(sae, names[:1], "ablate", min_coverage=GATE, detect_with={names[0]: names[1]})}


def with_hook(case: Case, fn: Callable) -> Callable[[], Any]:
    hook = BlockHook(case.unet, case.hook_point, fn, cfg_layout="uncond_cond")

    def run() -> Any:
        with hook:
            return case()
    return run


def edited_fraction(eraser: ConceptEraser, call: BlockCall) -> float:
    out = eraser(call)
    return 0.0 if out is None else float((out != call.tokens).any(-1).float().mean())


def measure_diffusers(case: Case, reps: int, gflops: float, pauser: Pauser, log: bool, warmup: int = 1) -> str:
    call = capture(case)  # also the first warm-up call
    sae = make_sae(case, call)
    setup = median([timed(lambda: erasers(sae)) for _ in range(3)])
    made = erasers(sae)
    fns = {"no hook": case, **{name: with_hook(case, e) for name, e in made.items()}}
    cpu: dict[str, list[float]] = {}
    times = interleaved(fns, reps, warmup=warmup, pauser=pauser, log=log, cpu=cpu)
    # The eraser alone on the captured block call: the same work without the UNet's noise around it.
    alone_fns = {"SAE encode, all tokens": lambda: sae.encode(call.tokens),
                 **{name: (lambda e=e: e(call)) for name, e in made.items()}}
    with torch.no_grad():
        alone = interleaved(alone_fns, max(reps, 7), warmup=1, pauser=pauser)
    gflops = max(gflops, matmul_gflops(512, case.d_in, case.n_latents))
    tokens = call.tokens.shape[0] * call.tokens.shape[1]
    floor_encode = encode_flops(tokens, case.d_in, case.n_latents) / (gflops * 1e9)
    floor_decode = sparse_decode_flops(tokens, case.d_in, case.k) / (gflops * 1e9)
    base = median(times["no hook"])
    rows = []
    for name in VARIANTS:
        t = median(times[name])
        if name == "no hook":
            rows.append([name, fmt_s(t), fmt_s(median(cpu[name])), "1.000", "1.000", "1.000", "-", "-", "-", "-",
                         f"{spread(times[name]):.1f}%"])
            continue
        floor = floor_encode + (floor_decode if name.startswith("ablate") else 0.0)
        own = median(alone[name])
        rows.append([name, fmt_s(t), fmt_s(median(cpu[name])), f"{paired_ratio(times, name, 'no hook'):.3f}",
                     f"{paired_ratio(cpu, name, 'no hook'):.3f}", f"{best_ratio(times, name, 'no hook'):.3f}",
                     f"{fmt_s(own)} ({1 + own / base:.3f}x)",
                     f"{100 * edited_fraction(made[name], call):.1f}%", fmt_s(floor), f"{own / floor:.2f}x",
                     f"{spread(times[name]):.1f}%"])
    rows.append(["(SAE encode, all tokens)", "-", "-", "-", "-", "-", fmt_s(median(alone["SAE encode, all tokens"])),
                 "-", fmt_s(floor_encode), f"{median(alone['SAE encode, all tokens']) / floor_encode:.2f}x", "-"])
    title = (f"Eraser overhead per UNet call: {case.label}, hook {case.hook_point} ({tokens} tokens = batch 2 x "
             f"{call.tokens.shape[1]}), SAE {case.d_in}->{case.n_latents} k={case.k}, {reps} interleaved reps, "
             f"{warmup} warm-up round")
    headers = ["variant", "wall / call (median)", "process CPU / call (median)", "wall ratio to no hook (paired)",
               "CPU ratio to no hook (paired)", "best-of ratio (min / min)",
               "eraser alone, wall (1 + its share of a no-hook call)",
               "tokens edited", "floor (encode+decode)", "eraser alone / floor", "wall spread"]
    note = (f"\nEraser set-up (once per sampling run): {fmt_s(setup)} for all {len(made)} erasers. The gated eraser "
            f"edits concept0 only where concept1's features (its detector) cover >= {GATE:.0%} of an image's tokens. "
            f"Floors use the best "
            f"fp32 matmul rate measured in this run: {gflops:.1f} GFLOP/s.\n")
    return table(title, headers, rows) + note


# -- ComfyUI path -------------------------------------------------------------------------------

def start_comfy(tmp: Path) -> Any:
    sys.path.insert(0, str(ROOT / "tests"))
    import comfy_host

    return comfy_host.start(tmp)


def comfy_model(diffusers_unet: Any, unet_config: dict[str, Any]) -> Any:
    """A ComfyUI ModelPatcher (its SD15 class, a ``supported_models_base.BASE``) with the diffusers UNet's weights."""
    import comfy.model_patcher
    import comfy.supported_models
    import comfy.utils

    config = dict(unet_config, dtype=torch.float32)
    model = comfy.supported_models.SD15(dict(config)).get_model({}, device="cpu")
    mapping = comfy.utils.unet_to_diffusers(dict(config))
    converted = {"diffusion_model." + mapping[k]: v for k, v in diffusers_unet.state_dict().items() if k in mapping}
    missing, unexpected = model.load_state_dict(converted, strict=False)
    missing = [k for k in missing if k.startswith("diffusion_model.")]
    if missing or unexpected:
        raise RuntimeError(f"weights did not map onto ComfyUI's UNet: {missing[:5]} {unexpected[:5]}")
    model.eval().requires_grad_(False)
    cpu = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)


def measure_comfy(pack: Any, patcher: Any, sae: TopKSAE, latent: int, text_dim: int, steps: int, reps: int,
                  label: str, pauser: Pauser, log: bool) -> str:
    import comfy.sample

    g = torch.Generator().manual_seed(3)
    positive = [[torch.randn(1, 77, text_dim, generator=g), {}]]
    negative = [[torch.randn(1, 77, text_dim, generator=g), {}]]
    noise = torch.randn(1, 4, latent, latent, generator=g)
    empty = torch.zeros(1, 4, latent, latent)
    from comfy_host import node_class

    node = node_class("SAeUronConceptEraser")  # a V3 node (comfy_api.latest): execute() returns a NodeOutput

    def erase(*args: Any, **kwargs: Any) -> Any:
        return node.execute(patcher, sae, *args, **kwargs).args[0]

    names = [f"concept{c}" for c in range(N_CONCEPTS)]
    models = {"no hook": patcher,
              "ablate, 1 concept": erase(names[0], "ablate", 1.0, 0.0, 1.0, "both"),
              "ablate, 10 concepts": erase(", ".join(names), "ablate", 1.0, 0.0, 1.0, "both"),
              "replace, 1 concept": erase(names[0], "replace", 1.0, 0.0, 1.0, "both"),
              GATED: erase(names[0], "ablate", 1.0, 0.0, 1.0, "both", min_coverage=GATE,
                           detect_with=f"{names[0]}={names[1]}")}

    # Per model call = the time between consecutive step callbacks (euler: one model call per step); the
    # first step of each sample, which also pays for loading/patching that clone, is left out.
    per_call: dict[str, list[float]] = {name: [] for name in models}
    cpu_call: dict[str, list[float]] = {name: [] for name in models}

    def sampler(name: str, model: Any) -> Callable[[], Any]:
        def run() -> Any:
            stamps: list[tuple[float, float]] = []
            with torch.inference_mode():
                result = comfy.sample.sample(model, noise, steps, 5.0, "euler", "normal", positive, negative, empty,
                                             disable_pbar=True, seed=0, callback=lambda *a: stamps.append(
                                                 (time.perf_counter(), time.process_time())))
            per_call[name].extend(b[0] - a[0] for a, b in zip(stamps, stamps[1:]))
            cpu_call[name].extend(b[1] - a[1] for a, b in zip(stamps, stamps[1:]))
            return result
        return run

    interleaved({name: sampler(name, m) for name, m in models.items()}, reps, warmup=0, pauser=pauser, log=log)
    base = median(per_call["no hook"])
    rows = []
    for name in VARIANTS:
        t = median(per_call[name])
        ratio = "1.000" if name == "no hook" else f"{paired_ratio(per_call, name, 'no hook'):.3f}"
        cpu_ratio = "1.000" if name == "no hook" else f"{paired_ratio(cpu_call, name, 'no hook'):.3f}"
        rows.append([name, fmt_s(t), fmt_s(median(cpu_call[name])), ratio, cpu_ratio,
                     f"{best_ratio(per_call, name, 'no hook'):.3f}",
                     "-" if name == "no hook" else fmt_s(t - base), f"{spread(per_call[name]):.1f}%"])
    title = (f"Eraser overhead per model call through ComfyUI: {label} (ComfyUI's SD15 model class, ModelPatcher, "
             f"Concept Eraser node, comfy.sample.sample euler/normal, cfg 5 = batch 2), {reps} interleaved samples of "
             f"{steps} steps per variant, timed between step callbacks ({steps - 1} model calls per sample)")
    return table(title, ["variant", "wall / model call (median)", "process CPU / model call (median)",
                         "wall ratio to no hook (paired)", "CPU ratio to no hook (paired)",
                         "best-of ratio (min / min)", "wall overhead",
                         "wall spread"], rows)


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
    headers = ["variant", "block call, wall (median)", "block call, process CPU (median)",
               "wall ratio to no hook (paired)", "CPU ratio to no hook (paired)", "best-of ratio (min / min)",
               "tokens touched (full encode)", "tokens edited", "hook's own work, wall (median)",
               "own work / no-hook block call", "own work / model call (est.)", "SAE GFLOP this call",
               "SAE FLOPs / block FLOPs", "SAE FLOPs / model-call FLOPs", "floor (SAE FLOPs / matmul rate)",
               "own work / floor", "wall spread"]
    note = (f"\nBlock FLOPs {block_flops / 1e9:.1f} GFLOP per call ({n_tokens} tokens in the hooked stream); "
            f"{case.model_label}: {model_flops / 1e12:.3f} TFLOP per call (both counted by torch.utils.flop_counter on "
            f"meta-device copies: matmuls, convolutions, attention). 'model call (est.)' = the measured "
            f"no-hook block call x model FLOPs / block FLOPs = {fmt_s(model_time)}. SAE FLOPs: the pre-filter "
            f"(2 x {n_tokens} tokens x {slots} selected features x {d}) + the full encode of the touched tokens "
            f"(2 x m x {d} x {n_lat}) + the sparse decode (2 x m x {slots} x {d}). The concept's features have a "
            f"positive pre-activation on {CONCEPT_SHARE:.0%} of the tokens each, every other latent on "
            f"{BASE_SHARE:.0%}. Floors use the best fp32 matmul rate measured in this run: {gflops:.1f} GFLOP/s. "
            f"Load average (1 min) {load_before[0]:.2f} before, {load_after[0]:.2f} after.\n")
    return table(title, headers, rows) + note


def _hooked(case: BlockCase, eraser: ConceptEraser) -> Any:
    with BlockHook(case.host, case.hook_point, eraser, cfg_layout=case.cfg_layout, residual=True):
        return case()


# -- main ---------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> str:
    parser = add_common_args(argparse.ArgumentParser(description=__doc__.split("\n\n")[0]))
    parser.add_argument("--only", default="sd15,comfy,sdxl,flux,sdxl_block",
                        help="comma-separated: sd15, comfy, sdxl, flux, sdxl_block")
    parser.add_argument("--block-reps", type=int, default=None, help="reps for the flux and sdxl_block sections")
    parser.add_argument("--flux-image-tokens", type=int, default=None, help="image tokens of the FLUX block (4096)")
    parser.add_argument("--flux-text-tokens", type=int, default=None, help="text tokens of the FLUX block (512)")
    parser.add_argument("--sdxl-block-side", type=int, default=None,
                        help="token grid side of the SDXL block (32: 1024 px)")
    parser.add_argument("--sdxl-reps", type=int, default=None, help="reps for SDXL (one call can take a minute)")
    parser.add_argument("--comfy-steps", type=int, default=None, help="sampling steps per timed ComfyUI sample")
    parser.add_argument("--comfy-reps", type=int, default=None, help="timed ComfyUI samples per variant")
    parser.add_argument("--log", action="store_true", help="print every sample to stderr (always on without --quick)")
    args = parser.parse_args(argv)
    threads = setup_threads(args)
    args.log = args.log or not args.quick
    only = {s.strip() for s in args.only.split(",") if s.strip()}
    reps = args.reps or (2 if args.quick else 5)
    pauser = Pauser(args.pause_pid) if args.pause_pid else NO_PAUSE
    out = [f"{machine_line()}\n"]
    emit(out[0])
    with pauser:
        gflops = matmul_gflops(*((64, 64, 1024) if args.quick else (512, 1280, 20480)))
    line = f"measured fp32 matmul rate (SAE-encode shape): {gflops:.1f} GFLOP/s with {threads} threads\n"
    out.append(line)
    emit(line)
    tmp = Path(tempfile.mkdtemp(prefix="saeuron-bench-"))
    try:
        if only & {"sd15", "comfy"}:
            if args.quick:
                from saeuron_core.hosts.diffusers import make_tiny_pipeline

                unet = make_tiny_pipeline(seed=0).unet.eval().requires_grad_(False)
                case = Case("tiny SD1.5-layout UNet (quick)", unet, "up_blocks.1.attentions.1",
                            sd_inputs({}, 8, 32, sdxl=False), d_in=32, n_latents=256, k=8)
            else:
                unet = build_unet(SD15_UNET)
                case = Case("SD1.5-size UNet (diffusers, random weights), 64x64 latent", unet,
                            "up_blocks.1.attentions.1", sd_inputs(SD15_UNET, 64, 768, sdxl=False),
                            d_in=1280, n_latents=20480, k=32)
            if "sd15" in only:
                with pauser:
                    text = measure_diffusers(case, reps, gflops, pauser, args.log)
                out.append(text)
                emit(text)
            if "comfy" in only:
                pack = start_comfy(tmp)
                if args.quick:
                    from comfy_host import TINY_UNET_CONFIG
                    comfy_cfg, label, latent, text_dim = TINY_UNET_CONFIG, "tiny SD1.5-layout model (quick)", 8, 32
                else:
                    comfy_cfg, label, latent, text_dim = SD15_COMFY_CONFIG, "SD1.5-size, 64x64 latent", 64, 768
                patcher = comfy_model(case.unet, comfy_cfg)
                with pauser:
                    sae = make_sae(case, capture(case))
                    text = measure_comfy(pack, patcher, sae, latent, text_dim, args.comfy_steps or 3,
                                         args.comfy_reps or (reps if args.quick else 2), label, pauser, args.log)
                out.append(text)
                emit(text)
                del patcher, sae
            del case, unet
            gc.collect()
        if "sdxl" in only:
            if args.quick:
                case = Case("tiny SDXL-layout UNet (quick)", build_unet(TINY_SDXL_UNET), "up_blocks.0.attentions.1",
                            sd_inputs({}, 8, 32, sdxl=True, pooled=32), d_in=64, n_latents=256, k=8)
            else:
                case = Case("SDXL-size UNet (diffusers, random weights), 128x128 latent", build_unet(SDXL_UNET),
                            "up_blocks.0.attentions.1", sd_inputs(SDXL_UNET, 128, 2048, sdxl=True),
                            d_in=1280, n_latents=20480, k=32)
            with pauser:
                # One SDXL call at 128x128 takes minutes on 2 CPU cores: fewer reps, and the capture call
                # is the only warm-up.
                text = measure_diffusers(case, args.sdxl_reps or (reps if args.quick else 2), gflops, pauser, args.log,
                                         warmup=1 if args.quick else 0)
            out.append(text)
            emit(text)
        block_reps = args.block_reps or (2 if args.quick else 3)
        if "flux" in only:
            case = flux_case(args.flux_image_tokens or (64 if args.quick else 4096),
                             args.flux_text_tokens or (8 if args.quick else 512), args.quick)
            with pauser:
                text = measure_block(case, block_reps, gflops, pauser, args.log, warmup=1 if args.quick else 0)
            out.append(text)
            emit(text)
            del case
            gc.collect()
        if "sdxl_block" in only:
            case = sdxl_block_case(args.sdxl_block_side or (8 if args.quick else 32), args.quick)
            with pauser:
                text = measure_block(case, block_reps, gflops, pauser, args.log, warmup=1 if args.quick else 0)
            out.append(text)
            emit(text)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return "\n".join(out)


if __name__ == "__main__":
    main()
