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
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

from benchmarks.common import (NO_PAUSE, Pauser, add_common_args, best_ratio, emit, encode_flops, fmt_s, interleaved,
                               machine_line, matmul_gflops, median, paired_ratio, setup_threads, sparse_decode_flops,
                               spread, table, comfy_test_host, timed)
from benchmarks.models import (FEATURES_PER_CONCEPT, SD15_COMFY_CONFIG, SD15_UNET, SDXL_UNET, TINY_SDXL_UNET,
                               TINY_UNET_CONFIG, build_unet, concept_data, sd_inputs)
from benchmarks.residual_blocks import flux_case, measure_block, sdxl_block_case
from saeuron_core.erasure.eraser import ConceptEraser
from saeuron_core.hosts.hooks import BlockCall, BlockHook
from saeuron_core.sae.library import add_concept
from saeuron_core.sae.model import SAEConfig, TopKSAE


GATED = "ablate, 1 concept, gated"
VARIANTS = ("no hook", "ablate, 1 concept", "ablate, 10 concepts", "replace, 1 concept", GATED)
# The gated variant edits concept0 only in images where concept1's features (its detector) cover at least
# this share of the tokens; on the benchmark's input the gate is open, so it pays for reading and editing.
GATE = 0.05
N_CONCEPTS = 10


class Case:
    """One model: how to call it, where to hook, and the SAE size."""

    def __init__(self, label: str, unet: Any, hook_point: str, inputs: dict[str, Any], d_in: int, n_latents: int,
                 k: int) -> None:
        self.label, self.unet, self.hook_point, self.inputs = label, unet, hook_point, inputs
        self.d_in, self.n_latents, self.k = d_in, n_latents, k

    def __call__(self) -> Any:
        with torch.no_grad():
            return self.unet(**self.inputs)


def capture(case: Case) -> BlockCall:
    """One real call of the hooked block (the no-hook output), for concept building and eraser-only timing."""
    seen: list[BlockCall] = []
    with BlockHook(case.unet, case.hook_point, lambda call: seen.append(call), cfg_layout="uncond_cond"):
        case()
    return seen[0]


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
    """The ComfyUI host the tests use (ComfyUI 0.3.64 in ``.hosts/``) with the pack loaded; see ``comfy_test_host``."""
    return comfy_test_host().start(tmp)


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
    node = comfy_test_host().node_class("SAeUronConceptEraser")  # a V3 node (comfy_api.latest): execute() returns a NodeOutput

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


# -- main ---------------------------------------------------------------------------------------

def sd15_sections(args: argparse.Namespace, only: set[str], reps: int, gflops: float, pauser: Pauser,
                  tmp: Path) -> list[str]:
    """The SD1.5 sections: the diffusers UNet (``sd15``) and the same model through ComfyUI (``comfy``)."""
    out = []
    if args.quick:
        from saeuron_core.hosts.tiny_pipeline import make_tiny_pipeline

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
    return out


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
            out += sd15_sections(args, only, reps, gflops, pauser, tmp)
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
