"""An SAE's weights as read from any file: checked (present, a float dtype, finite) and built into a
:class:`TopKSAE`, with errors that name the file. Shared by the native format and the importers."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from ..errors import ConfigError, SAEFormatError
from .model import SAEConfig, TopKSAE, dtype_name

CORE_TENSORS = ("encoder.weight", "encoder.bias", "W_dec", "b_dec")
SAE_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)  # what SAE weights may be stored in


def check_tensors(path: Path, tensors: dict[str, Tensor], names: tuple[str, ...]) -> None:
    missing = [name for name in names if name not in tensors]
    if missing:
        raise SAEFormatError(f"{path}: missing tensor(s) {missing}; an SAE file needs {list(names)}")
    for name in names:
        t = tensors[name]
        if t.dtype not in SAE_DTYPES:
            raise SAEFormatError(f"{path}: tensor {name!r} has dtype {dtype_name(t.dtype)}; expected a float tensor "
                                 f"({', '.join(map(dtype_name, SAE_DTYPES))})")
        if not torch.isfinite(t).all():
            raise SAEFormatError(f"{path}: tensor {name!r} contains NaN or infinite values")


def build_sae(path: Path, config: SAEConfig, tensors: dict[str, Tensor], device: str | torch.device,
           dtype: torch.dtype | None) -> TopKSAE:
    try:
        sae = TopKSAE.from_tensors(config, tensors, device=device, dtype=dtype)
    except ConfigError as exc:
        raise SAEFormatError(f"{path}: {exc}") from None
    for name, t in sae.tensors().items():  # finite in the file's dtypes, but also in the SAE's one?
        if not torch.isfinite(t).all():
            raise SAEFormatError(f"{path}: tensor {name!r} has values beyond the range of {dtype_name(sae.dtype)}")
    return sae
