"""Load Diffusers Model node: any local SD-style diffusers folder as ComfyUI MODEL, CLIP and VAE.

ComfyUI's own loaders recognise the standard checkpoints (SD 1.x, SD 2.x, SDXL, ...). This node
builds ComfyUI's own model classes from a diffusers folder's configs instead, so small or custom
UNets (the project's demo model, test pipelines, fine-tunes with other widths) load too.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from comfy_api.latest import io

from saeuron_core.errors import ConfigError
from saeuron_core.safetensors_io import load_safetensors

from .comfy_layout import sampling_settings_from_scheduler, unet_config_from_diffusers, vae_config_from_diffusers
from .common import CATEGORY, check_choice, path_in_folder, validation
from .demo_files import shipped_pipeline, shipped_pipeline_names

FOLDER = "diffusers"


def list_pipelines() -> list[str]:
    import folder_paths

    found = []
    for root in folder_paths.get_folder_paths(FOLDER):
        if os.path.isdir(root):
            found += [name for name in sorted(os.listdir(root)) if os.path.isfile(os.path.join(root, name, "model_index.json"))]
    return found + [name for name in shipped_pipeline_names() if name not in found]


def _resolve(name: str) -> Path:
    import folder_paths

    for root in folder_paths.get_folder_paths(FOLDER):
        path = Path(path_in_folder(root, name, "model name", FOLDER))
        if (path / "model_index.json").is_file():
            return path
    shipped = shipped_pipeline(name)
    if shipped is not None:
        return shipped
    raise ConfigError(f"no diffusers pipeline folder {name!r} in models/diffusers")


def _json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: cannot read ({exc})") from None


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ConfigError(f"{folder}: no .safetensors weights (pickle-based .bin files are never loaded)")
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        tensors.update(load_safetensors(f)[0])
    return tensors


def load_unet(path: Path) -> Any:
    import comfy.latent_formats
    import comfy.model_base
    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models_base
    import comfy.utils

    unet_cfg = unet_config_from_diffusers(_json(path / "unet" / "config.json"))
    sched = _json(path / "scheduler" / "scheduler_config.json")
    vae_cfg = _json(path / "vae" / "config.json") if (path / "vae" / "config.json").is_file() else {}
    prediction = sched.get("prediction_type", "epsilon")
    if prediction not in ("epsilon", "v_prediction"):
        raise ConfigError(f"prediction_type {prediction!r} is not supported (expected epsilon or v_prediction)")
    # latent_channels is read by newer ComfyUI releases (e.g. to size empty latents); pixel-space
    # models (no vae/) have the UNet's own channel count and scale 1.
    latent_format = type("DiffusersLatent", (comfy.latent_formats.LatentFormat,),
                         {"scale_factor": float(vae_cfg.get("scaling_factor", 1.0)),
                          "latent_channels": int(unet_cfg.get("in_channels", 4))})
    extra = {k: unet_cfg.pop(k) for k in ("num_heads", "num_head_channels")}
    model_type = comfy.model_base.ModelType.EPS if prediction == "epsilon" else comfy.model_base.ModelType.V_PREDICTION
    config_cls = type("DiffusersUNet", (comfy.supported_models_base.BASE,), {
        "unet_config": {}, "unet_extra_config": extra, "latent_format": latent_format,
        "sampling_settings": sampling_settings_from_scheduler(sched),
        "model_type": lambda self, state_dict, prefix="": model_type})
    load_device = comfy.model_management.get_torch_device()
    dtype = comfy.model_management.unet_dtype()
    model_config = config_cls(dict(unet_cfg, dtype=dtype))
    model = model_config.get_model({}, device=comfy.model_management.unet_offload_device())
    mapping = comfy.utils.unet_to_diffusers(dict(model_config.unet_config))
    state = {"diffusion_model." + mapping[k]: v for k, v in _weights(path / "unet").items() if k in mapping}
    missing, _ = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k.startswith("diffusion_model.")]
    if missing:
        raise ConfigError(f"{path / 'unet'}: weights do not fit the config ({len(missing)} missing, e.g. {missing[0]})")
    model.to(dtype)
    return comfy.model_patcher.ModelPatcher(model, load_device=load_device,
                                            offload_device=comfy.model_management.unet_offload_device())


def load_clip(path: Path) -> Any:
    import functools

    import comfy.sd
    import comfy.sd1_clip
    import comfy.supported_models_base
    from transformers import CLIPTokenizer

    config_path = path / "text_encoder" / "config.json"
    cfg = _json(config_path)
    tok = CLIPTokenizer.from_pretrained(str(path / "tokenizer"))
    special = {"start": tok.bos_token_id, "end": tok.eos_token_id, "pad": tok.pad_token_id or tok.eos_token_id}
    sd_tokenizer = functools.partial(comfy.sd1_clip.SDTokenizer, tokenizer_path=str(path / "tokenizer"),
                                     embedding_size=int(cfg["hidden_size"]))

    def tokenizer_cls(embedding_directory: Any = None, tokenizer_data: Any = None) -> Any:
        # ComfyUI passes tokenizer_data (e.g. a checkpoint's embedded tokenizer settings) since 2024.
        return comfy.sd1_clip.SD1Tokenizer(embedding_directory=embedding_directory, tokenizer_data=tokenizer_data or {},
                                           tokenizer=sd_tokenizer)

    # Newer transformers drop the "text_model." level in key names; ComfyUI's CLIP keeps it.
    state = {(k if k.startswith("text_model.") else "text_model." + k): v
             for k, v in _weights(path / "text_encoder").items()}
    # A plain CLIPTextModel has no text projection: its pooled output is then the text model's own, not one through
    # a projection left uninitialised.
    projected = any(k.endswith("text_projection.weight") for k in state)
    clip_model = functools.partial(comfy.sd1_clip.SDClipModel, textmodel_json_config=str(config_path),
                                   special_tokens=special, return_projected_pooled=projected)
    clip_cls = functools.partial(comfy.sd1_clip.SD1ClipModel, clip_model=clip_model)
    with torch.no_grad():  # ComfyUI's CLIP init writes to parameters
        clip = comfy.sd.CLIP(comfy.supported_models_base.ClipTarget(tokenizer_cls, clip_cls))
    key = "text_model.embeddings.token_embedding.weight"
    rows = clip.cond_stage_model.state_dict()[f"clip_l.transformer.{key}"].shape[0]
    if key in state and state[key].shape[0] < rows:  # some ComfyUI versions fix CLIP's vocabulary at 49408
        state[key] = torch.cat([state[key], state[key].new_zeros(rows - state[key].shape[0], state[key].shape[1])])
    result = clip.load_sd(state)
    missing = [k for k in result.missing_keys if "text_projection" not in k and "logit_scale" not in k]
    if missing:
        raise ConfigError(f"{path / 'text_encoder'}: weights do not fit ComfyUI's CLIP ({missing[0]} missing)")
    return clip


def pixel_space_vae(channels: int) -> Any:
    """A ComfyUI ``VAE`` for pixel-space models: decode maps [-1, 1] to [0, 1] images and encode back."""
    import comfy.model_management
    import comfy.sd

    class PixelSpaceVAE(comfy.sd.VAE):
        def __init__(self) -> None:  # nothing to load: no autoencoder weights
            self.latent_channels = channels
            self.downscale_ratio = self.upscale_ratio = 1
            self.output_device = comfy.model_management.intermediate_device()

        def decode(self, samples_in: torch.Tensor) -> torch.Tensor:
            return ((samples_in.float() + 1.0) / 2.0).clamp(0.0, 1.0).movedim(1, -1).to(self.output_device)

        def encode(self, pixel_samples: torch.Tensor) -> torch.Tensor:
            return (pixel_samples[..., :channels].float() * 2.0 - 1.0).movedim(-1, 1).to(self.output_device)

        def decode_tiled(self, samples: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            return self.decode(samples)

        def encode_tiled(self, pixel_samples: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            return self.encode(pixel_samples)

    return PixelSpaceVAE()


def load_vae(path: Path) -> Any:
    """ComfyUI VAE from ``vae/``; for a pixel-space model (no ``vae/``) a pass-through one."""
    import comfy.diffusers_convert
    import comfy.sd

    if not (path / "vae").is_dir():
        unet_cfg = _json(path / "unet" / "config.json")
        return pixel_space_vae(int(unet_cfg.get("in_channels", 3)))
    cfg = _json(path / "vae" / "config.json")
    levels = len(cfg["block_out_channels"])
    # ComfyUI's diffusers->LDM key conversion assumes SD's 4 levels when it reverses the decoder's
    # up blocks; shifting the indices makes it reverse a VAE with fewer levels correctly.
    shift = 4 - levels
    sd = {}
    for key, value in _weights(path / "vae").items():
        if key.startswith("decoder.up_blocks."):
            _, _, index, rest = key.split(".", 3)
            key = f"decoder.up_blocks.{int(index) + shift}.{rest}"
        sd[key] = value
    vae = comfy.sd.VAE(sd=comfy.diffusers_convert.convert_vae_state_dict(sd), config=vae_config_from_diffusers(cfg))
    vae.downscale_ratio = vae.upscale_ratio = 2 ** (len(cfg["block_out_channels"]) - 1)
    vae.latent_channels = int(cfg.get("latent_channels", 4))
    return vae


class EmptyLatentForVAE(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SAeUronEmptyLatent",
            display_name="Empty Latent (sized for the VAE)",
            category=CATEGORY,
            description=("An empty latent sized for the given VAE (its channel count and downscale factor), e.g. 3 "
                         "channels at full resolution for a pixel-space model, 4 channels at 1/8 for SD 1.x. ComfyUI's "
                         "Empty Latent Image always makes SD's 4-channel 1/8 latent."),
            inputs=[
                io.Vae.Input("vae", tooltip="The VAE that will decode the result; it sets channels and scale."),
                io.Int.Input("width", default=512, min=8, max=8192, step=8, tooltip="Image width in pixels."),
                io.Int.Input("height", default=512, min=8, max=8192, step=8, tooltip="Image height in pixels."),
                io.Int.Input("batch_size", default=1, min=1, max=4096, tooltip="Images per batch."),
            ],
            outputs=[io.Latent.Output(
                tooltip="Zeros of shape [batch, channels, height / downscale, width / downscale].")],
        )

    @classmethod
    def execute(cls, vae: Any, width: int, height: int, batch_size: int) -> io.NodeOutput:
        scale = int(getattr(vae, "downscale_ratio", 8))
        if width % scale or height % scale:
            raise ConfigError(f"width and height must be multiples of the VAE's downscale factor {scale}, "
                              f"got {width}x{height}")
        channels = int(getattr(vae, "latent_channels", 4))
        return io.NodeOutput({"samples": torch.zeros(batch_size, channels, height // scale, width // scale)})


class LoadDiffusersModel(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SAeUronLoadDiffusersModel",
            display_name="Load Diffusers Model (any SD-style config)",
            category=CATEGORY,
            description=("Loads a local diffusers pipeline folder from models/diffusers (UNet, CLIP text encoder, "
                         "VAE) with ComfyUI's own model classes, built from the folder's configs, so small or custom "
                         "SD-style models load too. Standard checkpoints load with ComfyUI's Load Checkpoint as "
                         "usual."),
            inputs=[io.Combo.Input("model_path", options=list_pipelines(),
                                   tooltip="A folder in models/diffusers holding model_index.json, unet/, "
                                           "text_encoder/, tokenizer/, scheduler/ and vae/ (safetensors weights); "
                                           "without vae/ the model works in pixel space.")],
            outputs=[io.Model.Output(tooltip="The diffusion model."), io.Clip.Output(tooltip="The text encoder."),
                     io.Vae.Output(tooltip="The autoencoder.")],
        )

    @classmethod
    def validate_inputs(cls, model_path: str = "") -> bool | str:
        return validation(check_choice, "model_path", model_path, list_pipelines())

    @classmethod
    def execute(cls, model_path: str) -> io.NodeOutput:
        path = _resolve(model_path)
        return io.NodeOutput(load_unet(path), load_clip(path), load_vae(path))
