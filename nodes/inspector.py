"""Feature Inspector node: sample once and show where a concept's SAE features fire."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from saeuron_core.errors import ConfigError
from saeuron_core.inspection import InspectRecorder
from saeuron_core.sae import TopKSAE
from saeuron_core.scoring import get_concept

from .common import CATEGORY, block_target, parse_concepts, patch_block


class FeatureInspector:
    DESCRIPTION = ("Samples like a KSampler while reading the SAE at its block: outputs the decoded image with a red "
                   "heat map of where the chosen concept's features fire (averaged over the steps), that heat map as a "
                   "MASK, and a text summary of the strongest features at every step. Shows why a concept is erased.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("IMAGE", "MASK", "STRING")
    RETURN_NAMES = ("overlay", "heatmap", "summary")
    OUTPUT_TOOLTIPS = ("Decoded image with the concept's heat map over it.",
                       "Where the concept fires, 0..1, at image size.",
                       "Top features per sampling step.")
    FUNCTION = "inspect"

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        import comfy.samplers

        return {"required": {
            "model": ("MODEL", {"tooltip": "The model to sample (an erased model shows what is left)."}),
            "sae": ("SAE", {"tooltip": "SAE of this model's block, with its concept library."}),
            "positive": ("CONDITIONING", {"tooltip": "The prompt to inspect."}),
            "negative": ("CONDITIONING", {"tooltip": "Negative prompt (the unconditional half)."}),
            "latent_image": ("LATENT", {"tooltip": "Starting latent (e.g. Empty Latent Image)."}),
            "vae": ("VAE", {"tooltip": "Decodes the result for the overlay."}),
            "concepts": ("STRING", {"default": "", "tooltip": "Concept names from the SAE's library, comma separated; "
                                                             "the first one is drawn. In the page, click to pick "
                                                             "them from the SAE chosen in Load SAE."}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF, "tooltip": "Sampling seed."}),
            "steps": ("INT", {"default": 20, "min": 1, "max": 1000, "tooltip": "Sampling steps."}),
            "cfg": ("FLOAT", {"default": 7.5, "min": 0.0, "max": 100.0, "step": 0.1, "tooltip": "Guidance scale."}),
            "sampler_name": (comfy.samplers.KSampler.SAMPLERS, {"tooltip": "Sampler."}),
            "scheduler": (comfy.samplers.KSampler.SCHEDULERS, {"tooltip": "Noise schedule."}),
            "top_features": ("INT", {"default": 8, "min": 1, "max": 64, "tooltip": "Features listed per step."}),
        }}

    def inspect(self, model: Any, sae: TopKSAE, positive: Any, negative: Any, latent_image: dict, vae: Any,
                concepts: str, seed: int, steps: int, cfg: float, sampler_name: str, scheduler: str,
                top_features: int) -> dict[str, Any]:
        import nodes as comfy_nodes
        from PIL import Image

        target = block_target(model, sae)
        names = parse_concepts(concepts)
        if not names:
            raise ConfigError(f"choose a concept to inspect; this SAE knows: {', '.join(sorted(sae.concepts)) or 'none'}")
        recorder = InspectRecorder(sae, {name: get_concept(sae, name) for name in names}, top_features)
        patched = patch_block(model, sae, recorder, target)
        samples = comfy_nodes.common_ksampler(patched, seed, steps, cfg, sampler_name, scheduler, positive, negative,
                                              latent_image, denoise=1.0)[0]
        decoded = vae.decode(samples["samples"])[:1]
        pixels = (decoded[0].clamp(0, 1).cpu().numpy() * 255).round().astype("uint8")
        result = recorder.result("", Image.fromarray(pixels))
        heat = result.heatmap(names[0])
        overlay = torch.from_numpy(np.asarray(result.overlay(names[0]), dtype=np.float32) / 255.0)
        summary = result.summary()
        # A temp preview, like Preview Image's, shown on this node by nodes/web/inspector_preview.js. Not under
        # "images": API clients read those from /history as the graph's saved outputs.
        preview = comfy_nodes.PreviewImage().save_images(overlay[None], filename_prefix="saeuron_inspect")["ui"]["images"]
        return {"ui": {"text": [summary], "saeuron_overlay": preview},
                "result": (overlay[None], heat[None].float(), summary)}
