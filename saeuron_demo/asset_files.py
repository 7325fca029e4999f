"""The JSON files of chosen erasure settings (per-concept strengths, gates), read and checked.

The shipped ones live in ``demo_assets/`` (:mod:`.assets`); ``saeuron eval`` and the sweep script read
and write files of the same forms. Nothing here imports the evaluation, so both can use it.
"""

from __future__ import annotations

import json
from typing import Any

from saeuron_core.errors import ConfigError


def read_json(path: str) -> Any:
    """A JSON file's content; a ConfigError naming the file when it cannot be read or parsed."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except OSError as e:
        raise ConfigError(f"cannot read {path}: {e.strerror}") from None
    except ValueError as e:  # bad JSON or bad UTF-8
        raise ConfigError(f"{path} is not JSON ({e})") from None


def load_concept_strengths(path: str) -> dict[str, float]:
    """A JSON file ``{concept: strength}`` (as ``sweep_demo_eval.py --per-concept-out`` writes), checked."""
    data = read_json(path)
    if not isinstance(data, dict) or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                             for v in data.values()):
        raise ConfigError(f"{path} must hold an object {{concept: strength}} with numbers")
    return {str(k): float(v) for k, v in data.items()}


def load_gates(path: str) -> tuple[dict[str, float], dict[str, str]]:
    """A JSON file ``{concept: {"min_coverage": share, "detect_with": entry}}`` (``detect_with`` optional), checked;
    returns ``(min_coverage_of, detect_with)``."""
    data = read_json(path)
    form = f'{path} must hold an object {{concept: {{"min_coverage": share, "detect_with": entry}}}}'
    if not isinstance(data, dict):
        raise ConfigError(form)
    coverage, detect = {}, {}
    for concept, gate in data.items():
        share = gate.get("min_coverage") if isinstance(gate, dict) else None
        entry = gate.get("detect_with", "") if isinstance(gate, dict) else None
        if not isinstance(share, (int, float)) or isinstance(share, bool) or not 0.0 <= share <= 1.0 \
                or not isinstance(entry, str) or set(gate) - {"min_coverage", "detect_with"}:
            raise ConfigError(f"{form}; {concept!r} has {gate!r} (min_coverage between 0 and 1)")
        coverage[str(concept)] = float(share)
        if entry:
            detect[str(concept)] = entry
    return coverage, detect
