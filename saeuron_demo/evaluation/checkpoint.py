"""Finished parts of a long evaluation kept on disk (``saeuron eval --checkpoint``), so that a run
stopped part way (hours on a CPU) resumes where it stopped and measures nothing twice.

The file is JSON lines: first the run's plan (settings, methods, concepts, the SAEs' fingerprints),
then one line per finished part with its value and the seconds it took. A line cut short by a kill
is ignored; a plan that differs from the file's is refused, so parts of different runs never mix.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from typing import Any, Callable, Sequence

import torch

from saeuron_core.errors import ConfigError
from saeuron_core.sae.concept_files import sae_identity
from saeuron_core.sae.model import TopKSAE


def sae_fingerprint(sae: TopKSAE) -> str:
    """SHA-256 of the SAE's identity (weights and config) and of its whole concept library."""
    h = hashlib.sha256(sae_identity(sae).encode())
    h.update(json.dumps(sae.concepts, sort_keys=True, default=str).encode())
    for name, t in sorted(sae.extra_tensors.items()):
        if name.startswith("concepts."):
            h.update(f"|{name}|".encode())
            h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _read_lines(path: str) -> list[dict[str, Any]]:
    """The file's JSON lines; a last line cut short (the run was killed while writing it) is dropped."""
    with open(path, encoding="utf-8") as f:
        lines = [line for line in f.read().split("\n") if line.strip()]
    out = []
    for i, line in enumerate(lines):
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break
            raise ConfigError(f"{path} is not an evaluation checkpoint: line {i + 1} is not JSON") from None
    if not out or not isinstance(out[0], dict) or "plan" not in out[0]:
        raise ConfigError(f"{path} is not an evaluation checkpoint from 'saeuron eval --checkpoint'")
    return out


class Checkpoint:
    """The finished parts of one evaluation run, kept in the JSON-lines file ``path``."""

    def __init__(self, path: str, plan: dict[str, Any]) -> None:
        self.path = path
        self.plan = json.loads(json.dumps(plan))
        self.parts: dict[str, dict[str, Any]] = {}
        if os.path.exists(path) and os.path.getsize(path) > 0:
            lines = _read_lines(path)
            if lines[0]["plan"] != self.plan:
                differ = sorted(k for k in set(lines[0]["plan"]) | set(self.plan)
                                if lines[0]["plan"].get(k) != self.plan.get(k))
                raise ConfigError(f"the checkpoint {path} was made by a run with other {', '.join(differ)}; resume "
                                  f"it with the same options, or give another --checkpoint file")
            self.parts = {line["part"]: line for line in lines[1:] if isinstance(line, dict) and "part" in line}
            with open(path, "w", encoding="utf-8") as f:  # drop a line cut short before appending after it
                f.writelines(json.dumps(line) + "\n" for line in [lines[0], *self.parts.values()])
        else:
            self._append({"plan": self.plan})

    def _append(self, line: dict[str, Any]) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(line) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def done(self, key: str) -> bool:
        """Whether the part ``key`` is finished."""
        return key in self.parts

    def part(self, key: str, compute: Callable[[], Any]) -> Any:
        """The value of the part ``key``: the kept one if it is finished, else ``compute()`` kept."""
        if key not in self.parts:
            t0 = time.perf_counter()
            value = json.loads(json.dumps(compute()))
            line = {"part": key, "seconds": time.perf_counter() - t0, "value": value}
            self._append(line)
            self.parts[key] = line
        return self.parts[key]["value"]

    def seconds(self, keys: Sequence[str] = ()) -> float:
        """Seconds the finished parts took (``keys``: only those), whichever session computed them."""
        return sum(line["seconds"] for k, line in self.parts.items() if not keys or k in keys)


class NoCheckpoint(Checkpoint):
    """Every part computed, nothing kept (a run without ``--checkpoint``)."""

    def __init__(self) -> None:  # noqa: D107 - nothing on disk
        self.parts = {}

    def _append(self, line: dict[str, Any]) -> None:
        pass
