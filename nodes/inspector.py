"""Feature Inspector node: sample once and show where a concept's SAE features fire."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from comfy_api.latest import io, ui

from saeuron_core.errors import ConfigError
from saeuron_core.inspection import InspectRecorder
from saeuron_core.sae.library import get_concept
from saeuron_core.sae.model import TopKSAE

from .common import CATEGORY, SAE, block_target, check_sampling_choices, parse_concepts, patch_block, validation


class FeatureInspector(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        import comfy.samplers

        return io.Schema(
            node_id="SAeUronFeatureInspector",
            display_name="Feature Inspector (SAE)",
            category=CATEGORY,
            description=("Samples like a KSampler while reading the SAE at its block: outputs the decoded image with a "
                         "red heat map of where the chosen concept's features fire (averaged over the steps), that heat "
                         "map as a MASK, and a text summary of the strongest features at every step. Shows why a "
                         "concept is erased."),
            inputs=[
                io.Model.Input("model", tooltip="The model to sample (an erased model shows what is left)."),
                SAE.Input("sae", tooltip="SAE of this model's block, with its concept library."),
                io.Conditioning.Input("positive", tooltip="The prompt to inspect."),
                io.Conditioning.Input("negative", tooltip="Negative prompt (the unconditional half)."),
                io.Latent.Input("latent_image", tooltip="Starting latent (e.g. Empty Latent Image)."),
                io.Vae.Input("vae", tooltip="Decodes the result for the overlay."),
                io.String.Input("concepts", default="",
                                tooltip="Concept names from the SAE's library, comma separated; the first one is "
                                        "drawn. In the page, click to pick them from the SAE chosen in Load SAE."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, tooltip="Sampling seed."),
                io.Int.Input("steps", default=20, min=1, max=1000, tooltip="Sampling steps."),
                io.Float.Input("cfg", default=7.5, min=0.0, max=100.0, step=0.1, tooltip="Guidance scale."),
                io.Combo.Input("sampler_name", options=comfy.samplers.KSampler.SAMPLERS, tooltip="Sampler."),
                io.Combo.Input("scheduler", options=comfy.samplers.KSampler.SCHEDULERS, tooltip="Noise schedule."),
                io.Int.Input("top_features", default=8, min=1, max=64, tooltip="Features listed per step."),
            ],
            outputs=[
                io.Image.Output(display_name="overlay", tooltip="Decoded image with the concept's heat map over it."),
                io.Mask.Output(display_name="heatmap", tooltip="Where the concept fires, 0..1, at image size."),
                io.String.Output(display_name="summary", tooltip="Top features per sampling step."),
            ],
        )

    @classmethod
    def validate_inputs(cls, sampler_name: str = "euler", scheduler: str = "normal") -> bool | str:
        return validation(check_sampling_choices, sampler_name, scheduler)

    @classmethod
    def execute(cls, model: Any, sae: TopKSAE, positive: Any, negative: Any, latent_image: dict, vae: Any,
                concepts: str, seed: int, steps: int, cfg: float, sampler_name: str, scheduler: str,
                top_features: int) -> io.NodeOutput:
        from PIL import Image

        import nodes as comfy_nodes

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
        preview = ui.ImageSaveHelper.save_images(overlay[None], "saeuron_inspect", io.FolderType.temp, cls,
                                                 compress_level=1)
        return io.NodeOutput(overlay[None], heat[None].float(), summary,
                             ui={"text": [summary], "saeuron_overlay": preview})
