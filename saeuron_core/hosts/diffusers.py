"""Loading diffusers pipelines and schedulers by name, and a tiny random pipeline for tries and tests.

Nothing here downloads: ``load_pipeline`` takes a local folder (``save_pretrained`` layout), a
single-file ``.safetensors`` checkpoint (with a local config folder) or ``tiny`` / ``tiny:SEED`` for a
randomly initialised SD-layout pipeline built in memory.
"""

from __future__ import annotations

import json
import os
import string
import tempfile
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError
from ..safetensors_io import PICKLE_SUFFIXES

SCHEDULERS = {
    "ddim": "DDIMScheduler",
    "ddpm": "DDPMScheduler",
    "pndm": "PNDMScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "dpmpp_2m": "DPMSolverMultistepScheduler",
    "heun": "HeunDiscreteScheduler",
    "lms": "LMSDiscreteScheduler",
    "unipc": "UniPCMultistepScheduler",
}


def set_scheduler(pipe: Any, name: str) -> None:
    """Swap ``pipe.scheduler`` for the named scheduler, built from the current scheduler's config."""
    import diffusers

    key = name.lower()
    if key not in SCHEDULERS:
        raise ConfigError(f"unknown scheduler {name!r}; expected one of {sorted(SCHEDULERS)}")
    cls = getattr(diffusers, SCHEDULERS[key])
    pipe.scheduler = cls.from_config(pipe.scheduler.config)


def generate(pipe: Any, prompts: list[str], seeds: list[int], *, steps: int, guidance_scale: float,
             height: int | None = None, width: int | None = None, output_type: str = "latent",
             negative_prompt: list[str] | None = None) -> Any:
    """One pipeline call, one CPU generator per prompt (so results do not depend on batching)."""
    return pipe(prompt=list(prompts), negative_prompt=negative_prompt, num_inference_steps=steps,
                guidance_scale=guidance_scale, height=height, width=width, output_type=output_type,
                generator=[torch.Generator(device="cpu").manual_seed(int(s)) for s in seeds])


def _write_char_tokenizer(folder: Path) -> None:
    """A valid CLIP BPE tokenizer whose tokens are single characters (plus a few merges)."""
    chars = list(string.ascii_lowercase + string.digits + ".,'!?-")
    vocab: dict[str, int] = {}
    for c in chars:
        vocab[c] = len(vocab)
    for c in chars:
        vocab[c + "</w>"] = len(vocab)
    merges = [("t", "h"), ("th", "e</w>"), ("i", "n</w>"), ("a", "n</w>")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n",
                                       encoding="utf-8")


def make_tiny_pipeline(seed: int = 0, *, hidden: int = 32, cross_dim: int = 32) -> Any:
    """A randomly initialised ``StableDiffusionPipeline`` with SD 1.x's block layout, small enough for CPU tests.

    ``up_blocks.1`` is a cross-attention up block with three attention layers, so
    ``up_blocks.1.attentions.1`` exists as in SD 1.x (here 32 channels on an 8x8 latent, 16x16 px).
    """
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(hidden, hidden * 2), norm_num_groups=min(32, hidden),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_dim, attention_head_dim=4,
    )
    # 32 GroupNorm groups like SD's VAE, so ComfyUI's VAE class can load it too.
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 32),
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=32, sample_size=16,
    )
    with tempfile.TemporaryDirectory() as tmp:
        _write_char_tokenizer(Path(tmp))
        tokenizer = CLIPTokenizer(os.path.join(tmp, "vocab.json"), os.path.join(tmp, "merges.txt"),
                                  model_max_length=77)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=cross_dim, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    ))
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_pipeline(model: str, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                  config: str | os.PathLike | None = None) -> Any:
    """``tiny``/``tiny:SEED``, a local diffusers pipeline folder or a single-file ``.safetensors`` checkpoint.

    Never downloads. A single-file checkpoint needs its component configs: ``config`` is a local
    diffusers pipeline folder of the same model family (without it only configs already in the
    Hugging Face cache can be used).
    """
    if model == "tiny" or model.startswith("tiny:"):
        seed = model.partition(":")[2] or "0"
        if not seed.isdigit():
            raise ConfigError(f"model {model!r}: expected 'tiny' or 'tiny:SEED' with an integer seed")
        pipe = make_tiny_pipeline(int(seed))
    else:
        path = Path(model)
        if path.suffix.lower() in PICKLE_SUFFIXES:
            raise ConfigError(
                f"model {model!r}: '{path.suffix}' checkpoints are pickle-based and are never loaded (unpickling "
                f"runs arbitrary code); use the .safetensors version of the checkpoint or a diffusers folder"
            )
        if path.is_file() and path.suffix.lower() == ".safetensors":
            pipe = _load_single_file(path, config)
        elif not (path / "model_index.json").is_file():
            raise ConfigError(
                f"model {model!r}: expected a local diffusers pipeline folder containing model_index.json, a "
                f"single-file .safetensors checkpoint (or 'tiny' for a random test pipeline); nothing is downloaded"
            )
        elif _pipeline_class_name(path) == "PixelDiffusionPipeline":
            from ..demo.pipeline import PixelDiffusionPipeline

            pipe = PixelDiffusionPipeline.from_pretrained(str(path), local_files_only=True, use_safetensors=True,
                                                          low_cpu_mem_usage=False)
        else:
            from diffusers import DiffusionPipeline

            pipe = DiffusionPipeline.from_pretrained(str(path), local_files_only=True, use_safetensors=True,
                                                     low_cpu_mem_usage=False,
                                                     safety_checker=None, requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
    pipe.to(device)
    if dtype is not None:
        pipe.to(dtype=dtype)
    return pipe


def _pipeline_class_name(folder: Path) -> str:
    try:
        return str(json.loads((folder / "model_index.json").read_text(encoding="utf-8")).get("_class_name", ""))
    except (OSError, ValueError, AttributeError) as exc:
        raise ConfigError(f"model {str(folder)!r}: cannot read model_index.json ({exc})") from None


def _single_file_class(config: Path | None) -> Any:
    """The pipeline class named by ``config``'s model_index.json (default ``StableDiffusionPipeline``)."""
    import diffusers

    name = "StableDiffusionPipeline"
    if config is not None:
        try:
            name = str(json.loads((config / "model_index.json").read_text(encoding="utf-8"))["_class_name"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"--config {config}: cannot read _class_name from model_index.json ({exc})") from None
    cls = getattr(diffusers, name, None)
    if cls is None or not hasattr(cls, "from_single_file"):
        raise ConfigError(f"--config {config}: pipeline class {name!r} cannot load single-file checkpoints")
    return cls


def _load_single_file(path: Path, config: str | os.PathLike | None) -> Any:
    from unittest import mock

    from diffusers.loaders.single_file_utils import SingleFileComponentError
    from diffusers.utils import logging as diffusers_logging
    from huggingface_hub import constants as hub_constants
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled

    from ..safetensors_io import read_safetensors_header

    read_safetensors_header(path)  # refuses pickles in disguise and truncated files before diffusers reads it
    config_dir = Path(config) if config is not None else None
    if config_dir is not None and not (config_dir / "model_index.json").is_file():
        raise ConfigError(f"--config {config}: expected a local diffusers pipeline folder containing model_index.json")
    cls = _single_file_class(config_dir)
    hint = ("pass --config with a local diffusers pipeline folder of the same model family (e.g. an SD 1.5 folder "
            "for an SD 1.x checkpoint); nothing is downloaded")
    verbosity, bars_on = diffusers_logging.get_verbosity(), diffusers_logging.is_progress_bar_enabled()
    try:
        # Offline mode for the hub client: without it diffusers retries a failed local config lookup online.
        # Its warnings and progress bars are silenced: on failure the error below says what to do.
        diffusers_logging.set_verbosity_error()
        diffusers_logging.disable_progress_bar()
        with mock.patch.object(hub_constants, "HF_HUB_OFFLINE", True):
            return cls.from_single_file(str(path), config=str(config_dir) if config_dir else None,
                                        local_files_only=True, safety_checker=None, requires_safety_checker=False)
    except (LocalEntryNotFoundError, OfflineModeIsEnabled, HfHubHTTPError) as exc:
        raise ConfigError(f"model {str(path)!r}: the component configs of this checkpoint are not available "
                          f"offline ({type(exc).__name__}); {hint}") from None
    except (SingleFileComponentError, KeyError, RuntimeError, ValueError, OSError) as exc:
        where = f" with the configs of {config_dir}" if config_dir else ""
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"model {str(path)!r}: could not load this single-file checkpoint{where} ({detail}); "
                          f"check that it is a Stable Diffusion checkpoint and {hint}") from None
    finally:
        diffusers_logging.set_verbosity(verbosity)
        if bars_on:
            diffusers_logging.enable_progress_bar()
