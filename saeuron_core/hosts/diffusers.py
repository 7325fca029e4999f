"""Loading diffusers pipelines and schedulers by name.

Nothing here downloads: ``load_pipeline`` takes a local folder (``save_pretrained`` layout) or a single-file
``.safetensors`` checkpoint (with a local config folder).
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
from collections.abc import Iterator, Mapping
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


def load_pipeline(model: str | os.PathLike, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                  config: str | os.PathLike | None = None,
                  pipeline_classes: Mapping[str, type] | None = None) -> Any:
    """A local diffusers pipeline folder or a single-file ``.safetensors`` checkpoint, never downloaded.

    A folder's ``model_index.json`` names its pipeline class: one of diffusers' own or, for a pipeline defined
    elsewhere, one of ``pipeline_classes`` (class name to class). A single-file checkpoint needs its component
    configs: ``config`` is a local diffusers pipeline folder of the same model family (without it only configs
    already in the Hugging Face cache can be used).
    """
    path = Path(model)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise ConfigError(
            f"model {str(model)!r}: '{path.suffix}' checkpoints are pickle-based and are never loaded (unpickling "
            f"runs arbitrary code); use the .safetensors version of the checkpoint or a diffusers folder"
        )
    if path.is_file() and path.suffix.lower() == ".safetensors":
        pipe = _load_single_file(path, config)
    elif not (path / "model_index.json").is_file():
        raise ConfigError(
            f"model {str(model)!r}: expected a local diffusers pipeline folder containing model_index.json or a "
            f"single-file .safetensors checkpoint; nothing is downloaded"
        )
    else:
        cls = _pipeline_class(path, pipeline_classes or {})
        accepts = inspect.signature(cls.__init__).parameters
        no_checker = {"safety_checker": None, "requires_safety_checker": False} \
            if "requires_safety_checker" in accepts else {}
        with quiet_loading():
            pipe = cls.from_pretrained(str(path), local_files_only=True, use_safetensors=True,
                                       low_cpu_mem_usage=False, **no_checker)
    pipe.set_progress_bar_config(disable=True)
    pipe.to(device)
    if dtype is not None:
        pipe.to(dtype=dtype)
    return pipe


@contextlib.contextmanager
def quiet_loading() -> Iterator[None]:
    """Silence diffusers' and transformers' loading warnings and progress bars (a command's output stays its own)."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    logs = (diffusers_logging, transformers_logging)
    saved = [(log, log.get_verbosity(), log.is_progress_bar_enabled()) for log in logs]
    try:
        for log, _, _ in saved:
            log.set_verbosity_error()
            log.disable_progress_bar()
        yield
    finally:
        for log, verbosity, bars_on in saved:
            log.set_verbosity(verbosity)
            if bars_on:
                log.enable_progress_bar()


def _pipeline_class(folder: Path, pipeline_classes: Mapping[str, type]) -> type:
    """The class ``folder``'s model_index.json names, from ``pipeline_classes`` or diffusers."""
    import diffusers

    try:
        name = json.loads((folder / "model_index.json").read_text(encoding="utf-8")).get("_class_name", "")
    except (OSError, ValueError, AttributeError) as exc:
        raise ConfigError(f"model {str(folder)!r}: cannot read model_index.json ({exc})") from None
    cls = pipeline_classes.get(name) if isinstance(name, str) else None
    if cls is None and isinstance(name, str) and name.isidentifier():
        cls = getattr(diffusers, name, None)
    if not (isinstance(cls, type) and issubclass(cls, diffusers.DiffusionPipeline)):
        known = f" or one of {sorted(pipeline_classes)}" if pipeline_classes else ""
        raise ConfigError(f"model {str(folder)!r}: its model_index.json names the pipeline class {name!r}, which "
                          f"is not a diffusers pipeline{known}")
    return cls


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
    try:
        # Offline mode for the hub client: without it diffusers retries a failed local config lookup online.
        # Its warnings are silenced too: on failure the error below says what to do.
        with quiet_loading(), mock.patch.object(hub_constants, "HF_HUB_OFFLINE", True):
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
