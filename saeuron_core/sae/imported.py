"""Read-only importers of other projects' SAE folders: EleutherAI sparsify / SAeUron (``cfg.json`` +
``sae.safetensors``), SAELens TopK (``cfg.json`` + ``sae_weights.safetensors``) and SDLens / sdxl-unbox (the public
SDXL-Turbo SAEs and the FLUX.1 block-18 SAE).

SDLens / sdxl-unbox layout: a folder per block, e.g. ``unet.down_blocks.2.attentions.1_k10_hidden5120_auxk256_bs4096_lr0.0001/final/``,
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

import json
import re
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor

from ..errors import SAEFormatError
from ..safetensors_io import load_safetensors
from .model import SAEConfig, TopKSAE
from .tensors import CORE_TENSORS, build_sae, check_tensors

CONFIG, WEIGHTS = "config.json", "state_dict.pth"
# Each imported folder format: the config file and the weights file that sit together in the SAE's folder.
FOLDER_FORMATS = {"sparsify": ("cfg.json", "sae.safetensors"), "saelens": ("cfg.json", "sae_weights.safetensors"),
                  "sdlens": (CONFIG, WEIGHTS)}
_BUFFERS = ("stats_last_nonzero",)  # training statistics saved with the weights; shape [n], ignored
_HOOK_KEYS = ("hook_point", "hook_name", "block", "position")
_BLOCK = re.compile(r"^(down_blocks|up_blocks|mid_block|transformer_blocks|single_transformer_blocks)(\.\d+|\.[a-z_]+)*$")
_COMFY_FLUX = {"double_blocks": "transformer_blocks", "single_blocks": "single_transformer_blocks"}


def read_cfg(path: Path) -> dict[str, Any]:
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SAEFormatError(f"{path}: cannot read {path.name} ({exc})") from None
    if not isinstance(cfg, dict):
        raise SAEFormatError(f"{path}: {path.name} must hold a JSON object")
    return cfg


def int_field(path: Path, cfg: dict[str, Any], *keys: str) -> int:
    for key in keys:
        value = cfg.get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    raise SAEFormatError(f"{path}: {path.name} needs an integer {' or '.join(keys)}")


def _hook_from_folder(folder: Path) -> str:
    name = folder.name
    return name[len("unet."):] if name.startswith("unet.") else (name if "." in name else "")


def load_sparsify(folder: Path, device: str | torch.device, dtype: torch.dtype | None) -> TopKSAE:
    cfg_path, weights = folder / "cfg.json", folder / "sae.safetensors"
    cfg = read_cfg(cfg_path)
    if cfg.get("input_unit_norm"):
        raise SAEFormatError(
            f"{cfg_path}: input_unit_norm=true SAEs normalise each token before encoding; this is not "
            f"supported (expected input_unit_norm false, as in the published SAeUron SAEs)"
        )
    tensors, _ = load_safetensors(weights, device="cpu")
    check_tensors(weights, tensors, CORE_TENSORS)
    d_in = int_field(cfg_path, cfg, "d_in")
    n = cfg.get("num_latents") or 0
    if not isinstance(n, int) or n <= 0:
        n = d_in * int_field(cfg_path, cfg, "expansion_factor")
    config = SAEConfig(d_in=d_in, n_latents=n, k=int_field(cfg_path, cfg, "k"),
                       hook_point=_hook_from_folder(folder), model_family=str(cfg.get("model_family", "")),
                       normalize_decoder=bool(cfg.get("normalize_decoder", True)),
                       extra={"imported_from": "sparsify", "source_cfg": cfg})
    sae = build_sae(weights, config, tensors, device, dtype)
    sae.source_format = "sparsify"
    return sae


def load_saelens(folder: Path, device: str | torch.device, dtype: torch.dtype | None) -> TopKSAE:
    cfg_path, weights = folder / "cfg.json", folder / "sae_weights.safetensors"
    cfg = read_cfg(cfg_path)
    arch = str(cfg.get("architecture", "topk")).lower()
    act = cfg.get("activation_fn") or cfg.get("activation_fn_str") or ""
    if arch != "topk" and act != "topk":
        raise SAEFormatError(f"{cfg_path}: SAELens architecture {arch!r} is not a TopK SAE; only TopK SAEs are supported")
    norm = cfg.get("normalize_activations", "none") or "none"
    if norm != "none":
        raise SAEFormatError(f"{cfg_path}: normalize_activations={norm!r} is not supported (expected 'none')")
    k = cfg.get("k")
    if k is None and isinstance(cfg.get("activation_fn_kwargs"), dict):
        k = cfg["activation_fn_kwargs"].get("k")
    if not isinstance(k, int) or isinstance(k, bool):
        raise SAEFormatError(f"{cfg_path}: cfg.json needs an integer k (or activation_fn_kwargs.k)")
    tensors, _ = load_safetensors(weights, device="cpu")
    check_tensors(weights, tensors, ("W_enc", "b_enc", "W_dec", "b_dec"))
    d_in, n = int_field(cfg_path, cfg, "d_in"), int_field(cfg_path, cfg, "d_sae")
    w_enc = tensors["W_enc"]
    if tuple(w_enc.shape) != (d_in, n):
        raise SAEFormatError(f"{weights}: 'W_enc' has shape {list(w_enc.shape)}, expected {[d_in, n]}")
    b_enc = tensors["b_enc"]
    if not cfg.get("apply_b_dec_to_input", True):
        # W(x - b_dec) + b' == W x + b_enc  with  b' = b_enc + W b_dec: fold so one encode formula fits.
        b_enc = b_enc + tensors["b_dec"].to(w_enc.dtype) @ w_enc
    converted = {"encoder.weight": w_enc.T.contiguous(), "encoder.bias": b_enc,
                 "W_dec": tensors["W_dec"], "b_dec": tensors["b_dec"]}
    config = SAEConfig(d_in=d_in, n_latents=n, k=k, hook_point=str(cfg.get("hook_name", "") or ""),
                       model_family=str(cfg.get("model_name", "") or ""), normalize_decoder=False,
                       extra={"imported_from": "saelens", "source_cfg": cfg})
    sae = build_sae(weights, config, converted, device, dtype)
    sae.source_format = "saelens"
    return sae


def checked_hook(folder: Path, hook_point: str) -> str:
    hook = normalize_hook_point(hook_point)
    if not hook:
        raise SAEFormatError(f"{folder}: hook point {hook_point!r} is not a block this SAE can read; expected a "
                             f"diffusers block path such as up_blocks.1.attentions.1 or transformer_blocks.18")
    return hook


# -- which format a folder holds ------------------------------------------------------------------------

def holds_format(folder: Path, fmt: str) -> bool:
    """Whether ``folder`` itself holds the files of the imported format ``fmt`` (see ``FOLDER_FORMATS``)."""
    return all((Path(folder) / name).is_file() for name in FOLDER_FORMATS[fmt])


def sae_folder_format(folder: str | Path) -> Optional[str]:
    """The imported format whose files ``folder`` itself holds: ``sparsify`` (``cfg.json`` + ``sae.safetensors``),
    ``saelens`` (``cfg.json`` + ``sae_weights.safetensors``) or ``sdlens`` (``config.json`` + ``state_dict.pth``),
    in that order; ``None`` for any other folder."""
    return next((fmt for fmt in FOLDER_FORMATS if holds_format(Path(folder), fmt)), None)


# -- SDLens / sdxl-unbox ----------------------------------------------------------------------------------

def is_sdlens_folder(folder: Path) -> bool:
    """Whether ``folder`` holds an SDLens SAE (``config.json`` next to ``state_dict.pth``)."""
    return holds_format(folder, "sdlens")


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
    check_tensors(path, tensors, tuple(expected))
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
    cfg = read_cfg(cfg_path)
    d, n, k = (int_field(cfg_path, cfg, key) for key in ("d_model", "n_dirs_local", "k"))
    named = next((cfg[key] for key in _HOOK_KEYS if isinstance(cfg.get(key), str) and cfg[key]), None)
    if hook_point is not None:
        hook = checked_hook(folder, hook_point)
    else:
        hook = checked_hook(cfg_path, named) if named else hook_from_folder_name(folder)
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
    sae = build_sae(weights, config, converted, device, dtype)
    sae.source_format = "sdlens"
    return sae

