"""Safetensors files read and written safely: headers validated before any tensor is read, pickles refused,
writes atomic (temp file + ``os.replace``). Used by SAE files, activation stores and training checkpoints."""

from __future__ import annotations

import json
import os
import struct
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from .errors import SAEFormatError

PICKLE_SUFFIXES = {".pt", ".pth", ".ckpt", ".bin", ".pkl", ".pickle", ".tar", ".npz", ".npy"}
MAX_HEADER_BYTES = 100 * 1024 * 1024
_ST_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
                   "U8": 1, "BOOL": 1, "U16": 2, "U32": 4, "U64": 8, "F8_E4M3": 1, "F8_E5M2": 1}


def refuse_pickle(path: Path) -> None:
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise SAEFormatError(
            f"{path}: '{path.suffix}' files are pickle-based and are never loaded (unpickling runs "
            f"arbitrary code). Expected a .safetensors SAE file or an SAE folder; convert "
            f"the checkpoint to safetensors in a trusted environment first"
        )


def read_safetensors_header(path: str | os.PathLike) -> dict[str, Any]:
    """Parse and validate a safetensors header without loading tensors.

    Raises :class:`SAEFormatError` for pickles in disguise, truncated files, oversized or
    malformed headers and tensors whose byte ranges do not fit the file.
    """
    path = Path(path)
    refuse_pickle(path)
    if not path.is_file():
        raise SAEFormatError(f"{path}: no such file")
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        # A pickle (protocol 2+) starts with 0x80 <protocol>, a torch.save zip with "PK". Only judged
        # when the bytes are not a valid safetensors header: 0x80 is also a valid first length byte.
        looks_pickled = (head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")) or head[:2] == b"PK"
        pickled = SAEFormatError(
            f"{path}: this is a pickle/zip (torch.save) checkpoint with a .safetensors name; it is "
            f"never unpickled. Expected a real safetensors file"
        )
        if len(head) < 8:
            raise pickled if looks_pickled else SAEFormatError(
                f"{path}: file is {size} bytes, too short to be safetensors (truncated?)")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER_BYTES or n > size - 8:
            raise pickled if looks_pickled else SAEFormatError(
                f"{path}: safetensors header claims {n} bytes but the file has {size - 8} after the length "
                f"field (truncated or not a safetensors file)"
            )
        raw = fh.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        if looks_pickled:
            raise pickled from None
        raise SAEFormatError(f"{path}: safetensors header is not valid JSON ({exc}); the file is corrupt") from None
    if not isinstance(header, dict):
        raise SAEFormatError(f"{path}: safetensors header is not a JSON object; the file is corrupt")
    data_len = size - 8 - n
    for name, info in header.items():
        if name == "__metadata__":
            if not isinstance(info, dict) or not all(isinstance(v, str) for v in info.values()):
                raise SAEFormatError(f"{path}: safetensors __metadata__ must map strings to strings")
            continue
        try:
            start, end = (int(v) for v in info["data_offsets"])
            numel = 1
            for dim in info["shape"]:
                numel *= int(dim)
            nbytes = numel * _ST_DTYPE_BYTES[info["dtype"]]
        except (KeyError, TypeError, ValueError):
            raise SAEFormatError(f"{path}: tensor {name!r} has a malformed header entry; the file is corrupt") from None
        if not (0 <= start <= end <= data_len) or end - start != nbytes:
            raise SAEFormatError(
                f"{path}: tensor {name!r} needs bytes {start}..{end} of a {data_len}-byte data section "
                f"(truncated or corrupt file)"
            )
    return header


def load_safetensors(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[dict[str, Tensor], dict[str, str]]:
    """Load all tensors and the metadata of a validated safetensors file."""
    header = read_safetensors_header(path)
    try:
        tensors: dict[str, Tensor] = {}
        with safe_open(str(path), framework="pt", device=str(device)) as fh:
            for name in fh.keys():
                tensors[name] = fh.get_tensor(name)
    except Exception as exc:  # safetensors raises its own error types
        raise SAEFormatError(f"{path}: could not read safetensors data ({exc})") from None
    return tensors, dict(header.get("__metadata__", {}))


def atomic_save_safetensors(tensors: dict[str, Tensor], path: str | os.PathLike,
                            metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file via a temp file + ``os.replace``: a crash leaves the old file intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write a text file atomically (temp file + ``os.replace``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
