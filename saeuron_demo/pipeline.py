"""A diffusers pipeline for the pixel-space demo model (UNet + CLIP text encoder, no VAE).

It takes the same call arguments as ``StableDiffusionPipeline`` that the project uses (prompt,
negative_prompt, num_inference_steps, guidance_scale, height, width, output_type, generator) and
batches the UNet input ``[uncond, cond]`` the same way, so hooks, collection, scoring and the
eraser treat it exactly like an SD pipeline.
"""

from __future__ import annotations

import os
from typing import Any, Optional, Union

import numpy as np
import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput
from PIL import Image

PIPELINE_CLASS = "PixelDiffusionPipeline"


class PixelDiffusionPipeline(DiffusionPipeline):
    """Text-to-image in pixel space: the UNet denoises RGB in [-1, 1] directly."""

    model_cpu_offload_seq = "text_encoder->unet"

    def __init__(self, unet: Any, text_encoder: Any, tokenizer: Any, scheduler: Any) -> None:
        super().__init__()
        self.register_modules(unet=unet, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler)
        self._guidance_scale = 1.0

    @property
    def do_classifier_free_guidance(self) -> bool:
        return self._guidance_scale > 1.0

    def _encode(self, prompts: list[str]) -> torch.Tensor:
        ids = self.tokenizer(prompts, padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids
        return self.text_encoder(ids.to(self.text_encoder.device)).last_hidden_state

    @torch.no_grad()
    def __call__(
        self,
        prompt: Union[str, list[str]],
        negative_prompt: Optional[Union[str, list[str]]] = None,
        num_inference_steps: int = 25,
        guidance_scale: float = 3.0,
        height: Optional[int] = None,
        width: Optional[int] = None,
        output_type: str = "pil",
        generator: Optional[Union[torch.Generator, list[torch.Generator]]] = None,
        return_dict: bool = True,
    ) -> Any:
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        n = len(prompts)
        negatives = [""] * n if negative_prompt is None else (
            [negative_prompt] * n if isinstance(negative_prompt, str) else list(negative_prompt))
        if len(negatives) != n:
            raise ValueError(f"got {len(negatives)} negative prompts for {n} prompts")
        size = int(self.unet.config.sample_size)
        height, width = height or size, width or size
        if height % 8 or width % 8:
            raise ValueError(f"height and width must be multiples of 8 (got {height}x{width})")
        self._guidance_scale = float(guidance_scale)
        device, dtype = self.unet.device, self.unet.dtype

        ctx = self._encode(prompts)
        if self.do_classifier_free_guidance:
            ctx = torch.cat([self._encode(negatives), ctx])
        shape = (n, int(self.unet.config.in_channels), height, width)
        gens = generator if isinstance(generator, list) else [generator] * n
        if len(gens) != n:
            raise ValueError(f"got {len(gens)} generators for {n} prompts")
        x = torch.stack([torch.randn(shape[1:], generator=g) for g in gens]).to(device, dtype)
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        x = x * self.scheduler.init_noise_sigma
        step_kwargs = {"generator": generator} if "generator" in _step_params(self.scheduler) else {}
        for t in self.progress_bar(self.scheduler.timesteps):
            inp = torch.cat([x, x]) if self.do_classifier_free_guidance else x
            inp = self.scheduler.scale_model_input(inp, t)
            eps = self.unet(inp, t, encoder_hidden_states=ctx.to(dtype)).sample
            if self.do_classifier_free_guidance:
                eps_u, eps_c = eps.chunk(2)
                eps = eps_u + self._guidance_scale * (eps_c - eps_u)
            x = self.scheduler.step(eps, t, x, **step_kwargs).prev_sample
        images: Any = x.float()
        if output_type == "pil":
            arr = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
            images = [Image.fromarray(a) for a in arr]
        elif output_type == "np":
            images = ((images.clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).cpu().numpy().astype(np.float32)
        elif output_type == "pt":
            images = (images.clamp(-1, 1) + 1) / 2
        elif output_type != "latent":  # pixel space: the "latent" is the [-1, 1] image itself
            raise ValueError(f"output_type {output_type!r}: expected 'pil', 'np', 'pt' or 'latent'")
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)


#: the demo's pipeline classes by the name a model_index.json gives (``load_pipeline(..., pipeline_classes=)``)
PIPELINE_CLASSES: dict[str, type] = {PIPELINE_CLASS: PixelDiffusionPipeline}


def load_demo_pipeline(folder: str | os.PathLike, **options: Any) -> Any:
    """A demo model folder (or any diffusers pipeline folder) through the core's one loading path."""
    from saeuron_core.hosts.diffusers import load_pipeline

    return load_pipeline(folder, pipeline_classes=PIPELINE_CLASSES, **options)


def _step_params(scheduler: Any) -> set[str]:
    import inspect

    return set(inspect.signature(scheduler.step).parameters)


def write_model_index(folder: str) -> None:
    """Write the ``model_index.json`` that makes a demo model folder loadable as a diffusers pipeline."""
    import json

    import diffusers

    with open(os.path.join(folder, "scheduler", "scheduler_config.json"), encoding="utf-8") as f:
        scheduler_cls = json.load(f).get("_class_name", "DDIMScheduler")
    index = {
        "_class_name": PIPELINE_CLASS,
        "_diffusers_version": diffusers.__version__,
        "unet": ["diffusers", "UNet2DConditionModel"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", scheduler_cls],
    }
    with open(os.path.join(folder, "model_index.json"), "w", encoding="utf-8") as f:
        json.dump(index, f, indent=2)
