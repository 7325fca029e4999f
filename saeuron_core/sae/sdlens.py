"""Read-only import of SDLens / sdxl-unbox SAEs (the public SDXL-Turbo SAEs and the FLUX.1 block-18 SAE).

Layout: a folder per block, e.g. ``unet.down_blocks.2.attentions.1_k10_hidden5120_auxk256_bs4096_lr0.0001/final/``,
holding ``config.json`` (``n_dirs_local``, ``d_model``, ``k``, ``auxk``, ...) and ``state_dict.pth`` (a
``torch.save`` of ``encoder.weight [n, d]``, ``decoder.weight [d, n]``, ``pre_bias [d]``, ``latent_bias [n]`` and a
``stats_last_nonzero [n]`` buffer, bare or under a ``"state_dict"`` key). ``mean.pt`` is not needed and not read.

Their SAE encodes ``relu(topk(W_enc (x - pre_bias) + latent_bias))`` and decodes ``W_dec z + pre_bias``. That is
:class:`TopKSAE` exactly with ``encoder.bias = latent_bias``, ``b_dec = pre_bias`` and ``W_dec = decoder.weight.T``
(ReLU and top-k commute up to which zero entries are kept, and zeros decode to nothing). Both published SAEs read
the block's update (output minus input) and add their edits onto the output: imported SAEs are ``residual``.

``state_dict.pth`` is a pickle. It is read only through torch's weights-only unpickler, which builds tensors and
plain containers and refuses any other object without running it; the result must then be exactly the tensors above.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

from ..errors import SAEFormatError
from .files import _build, _check_tensors, _checked_hook, _int_field, _read_cfg
from .model import SAEConfig, TopKSAE

CONFIG, WEIGHTS = "config.json", "state_dict.pth"
_BUFFERS = ("stats_last_nonzero",)  # training statistics saved with the weights; shape [n], ignored
_HOOK_KEYS = ("hook_point", "hook_name", "block", "position")
_BLOCK = re.compile(r"^(down_blocks|up_blocks|mid_block|transformer_blocks|single_transformer_blocks)(\.\d+|\.[a-z_]+)*$")
_COMFY_FLUX = {"double_blocks": "transformer_blocks", "single_blocks": "single_transformer_blocks"}


def is_sdlens_folder(folder: Path) -> bool:
    """Whether ``folder`` holds an SDLens SAE (``config.json`` next to ``state_dict.pth``)."""
    return (folder / CONFIG).is_file() and (folder / WEIGHTS).is_file()


def sdlens_folder(path: Path) -> Optional[Path]:
    """The folder holding the SAE files: ``path`` itself or its ``final/`` sub-folder; ``None`` if neither."""
    for folder in (path, path / "final"):
        if is_sdlens_folder(folder):
            return folder
    return None


def normalize_hook_point(name: str) -> str:
    """``unet.down_blocks.2.attentions.1`` -> ``down_blocks.2.attentions.1``; ``transformer.transformer_blocks.18``
    (or ComfyUI's ``double_blocks.18``) -> ``transformer_blocks.18``; ``""`` when ``name`` names no known block."""
    name = name.strip()
    for prefix in ("unet.", "transformer."):
        if name.startswith(prefix):
            name = name[len(prefix):]
    head, _, rest = name.partition(".")
    if head in _COMFY_FLUX:
        name = f"{_COMFY_FLUX[head]}.{rest}"
    return name if _BLOCK.match(name) else ""


def _run_name(folder: Path) -> str:
    return folder.parent.name if folder.name == "final" else folder.name


def hook_from_folder_name(folder: Path) -> str:
    """The block named by the run folder (``final/``'s parent), e.g. ``unet.up_blocks.0.attentions.1_k10_...``."""
    return normalize_hook_point(re.split(r"_k\d", _run_name(folder), maxsplit=1)[0])


def model_family(hook_point: str) -> str:
    """``flux`` for a transformer block (the published DiT SAE), ``sdxl`` for a UNet block."""
    return "flux" if "transformer_blocks" in hook_point else "sdxl"


def read_state_dict(path: Path) -> dict[str, Tensor]:
    """Unpickle ``path`` with the weights-only unpickler; only a dict of named tensors is accepted."""
    try:
        data = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as exc:  # UnpicklingError for a forbidden object; zip/EOF/runtime errors for damage
        kind = type(exc).__name__
        if kind == "UnpicklingError":
            named = re.search(r"GLOBAL ([\w.]+)", str(exc))
            raise SAEFormatError(
                f"{path}: holds objects other than tensors ({named.group(1) if named else 'not a tensor'}); "
                f"refused without running them: the weights-only unpickler builds only tensors and plain containers"
            ) from None
        raise SAEFormatError(f"{path}: not a readable torch.save file ({kind}: {str(exc)[:200]}); "
                             f"the file is damaged or of another kind") from None
    if isinstance(data, dict) and set(data) == {"state_dict"}:
        data = data["state_dict"]
    if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in data.items()):
        raise SAEFormatError(f"{path}: expected a dict of named tensors (optionally under 'state_dict'), "
                             f"got {type(data).__name__} holding other values")
    return dict(data)


def _check_shapes(path: Path, tensors: dict[str, Tensor], d: int, n: int) -> None:
    expected = {"encoder.weight": (n, d), "decoder.weight": (d, n), "pre_bias": (d,), "latent_bias": (n,)}
    stray = sorted(set(tensors) - set(expected) - set(_BUFFERS))
    if stray:
        raise SAEFormatError(f"{path}: unexpected tensor(s) {stray}; an SDLens SAE holds {sorted(expected)} "
                             f"and {list(_BUFFERS)}")
    _check_tensors(path, tensors, tuple(expected))
    for name, shape in {**expected, **{b: (n,) for b in _BUFFERS}}.items():
        if name in tensors and tuple(tensors[name].shape) != shape:
            raise SAEFormatError(f"{path}: {name!r} has shape {list(tensors[name].shape)}, expected {list(shape)} "
                                 f"(config.json: d_model={d}, n_dirs_local={n})")


def load_sdlens(folder: Path, device: str | torch.device = "cpu", dtype: Optional[torch.dtype] = None,
                hook_point: Optional[str] = None) -> TopKSAE:
    """Import the SDLens SAE in ``folder`` as a residual :class:`TopKSAE` with the file's values unchanged.

    The block comes from ``hook_point`` if given, else from ``config.json``, else from the folder name.
    """
    cfg_path, weights = folder / CONFIG, folder / WEIGHTS
    cfg = _read_cfg(cfg_path)
    d, n, k = (_int_field(cfg_path, cfg, key) for key in ("d_model", "n_dirs_local", "k"))
    named = next((cfg[key] for key in _HOOK_KEYS if isinstance(cfg.get(key), str) and cfg[key]), None)
    if hook_point is not None:
        hook = _checked_hook(folder, hook_point)
    else:
        hook = _checked_hook(cfg_path, named) if named else hook_from_folder_name(folder)
    if not hook:
        raise SAEFormatError(
            f"{folder}: this SDLens SAE does not say which block it reads (neither config.json nor the folder name "
            f"names one); give it: --hook-point transformer_blocks.18 (saeuron info/convert), hook_point=... "
            f"(load_sae), or name the folder like transformer.transformer_blocks.18 or unet.up_blocks.0.attentions.1"
        )
    tensors = read_state_dict(weights)
    _check_shapes(weights, tensors, d, n)
    converted = {"encoder.weight": tensors["encoder.weight"], "encoder.bias": tensors["latent_bias"],
                 "W_dec": tensors["decoder.weight"].T.contiguous(), "b_dec": tensors["pre_bias"]}
    config = SAEConfig(d_in=d, n_latents=n, k=k, hook_point=hook, model_family=model_family(hook),
                       normalize_decoder=False, residual=True,
                       extra={"imported_from": "sdlens", "source_cfg": cfg, "source_folder": _run_name(folder)})
    sae = _build(weights, config, converted, device, dtype)
    sae.source_format = "sdlens"
    return sae

