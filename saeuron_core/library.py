"""An SAE's concept names read cheaply: from the safetensors header only, no tensor is loaded.

Used where only the names are wanted (the ComfyUI concept picker); ``load_sae`` still validates
the whole file before anything runs.
"""

from __future__ import annotations

import json
import os

from .errors import ConfigError, SAEFormatError
from .formats import detect_format, read_safetensors_header
from .scoring import check_concept_name


def concept_names_in_file(path: str | os.PathLike) -> list[str]:
    """Sorted concept names of a native SAE file; ``[]`` for imported sparsify/SAELens folders (no library).

    Raises :class:`SAEFormatError` for files that are not native SAEs or whose library metadata is corrupt.
    """
    fmt, resolved = detect_format(path)
    if fmt != "native":
        return []
    metadata = read_safetensors_header(resolved).get("__metadata__", {})
    if "saeuron_format" not in metadata:
        raise SAEFormatError(f"{resolved}: a safetensors file without saeuron metadata; not a native SAE file")
    try:
        library = json.loads(metadata.get("concepts", "{}"))
    except json.JSONDecodeError:
        raise SAEFormatError(f"{resolved}: metadata field 'concepts' is not valid JSON; the file is corrupt") from None
    if not isinstance(library, dict):
        raise SAEFormatError(f"{resolved}: 'concepts' metadata must be a JSON object")
    for name in library:
        try:
            check_concept_name(name)
        except ConfigError as exc:
            raise SAEFormatError(f"{resolved}: concept library holds a bad name ({exc})") from None
    return sorted(library)
