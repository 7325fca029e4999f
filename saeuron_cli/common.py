"""What several commands share: the one-line error contract, seed lists, the model, generation and gate
options, and checks on output paths and concept names."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Optional

from saeuron_core.errors import ConfigError

if TYPE_CHECKING:
    from saeuron_core.sae.model import TopKSAE

SEEDS_HELP = "'0,1,2' or '0-9'"
IMPORT_HOOK_HELP = "block of an imported folder that does not name it (e.g. transformer_blocks.18)"
OWN_HOOK_HELP = "default: the SAE's own hook point"


class Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line ``error: ...`` and exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]  # argparse prints usage + exits 2
        raise SystemExit(fail(f"{self.prog}: {message}"))


def fail(message: str) -> int:
    """Print ``error: MESSAGE`` to stderr and return the user-error exit status, 2."""
    print(f"error: {message}", file=sys.stderr)
    return 2


def parse_seeds(text: str) -> list[int]:
    """Seeds from the command line: "0,1,2" or the inclusive range "0-9"."""
    try:
        if "-" in text and "," not in text:
            lo, hi = (int(v) for v in text.split("-", 1))
            return list(range(lo, hi + 1))
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seeds like '0,1,2' or '0-9', got {text!r}") from None


def add_model_args(p: argparse.ArgumentParser) -> None:
    """``--model``, ``--config`` (for a single-file checkpoint) and ``--device``."""
    p.add_argument("--model", required=True, help="local diffusers pipeline folder (the demo model's "
                                                  "included) or single-file .safetensors checkpoint (with --config)")
    p.add_argument("--config", default=None, help="for a single-file checkpoint: a local diffusers pipeline folder "
                                                  "of the same model family giving the component configs")
    p.add_argument("--device", default="cpu")


def load_model(model: str, **options: Any) -> Any:
    """``load_pipeline`` that also knows the demo's pipeline class, so every command opens the demo model too."""
    from saeuron_demo.pipeline import load_demo_pipeline

    return load_demo_pipeline(model, **options)


def add_generation_args(p: argparse.ArgumentParser) -> None:
    """``--seed``, ``--steps``, ``--guidance``, ``--scheduler``, ``--height``, ``--width`` of one generation."""
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--scheduler", default=None, help="default: the pipeline's own")
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)


def add_gate_args(p: argparse.ArgumentParser) -> None:
    """``--min-coverage``, ``--min-coverage-of``, ``--detect-with`` (read back by :func:`gate_args`)."""
    p.add_argument("--min-coverage", type=float, default=0.0,
                   help="erase a concept only in images where its features fire on at least this share (0-1) of "
                        "the hooked feature map (0: everywhere they fire)")
    p.add_argument("--min-coverage-of", action="append", default=[], metavar="CONCEPT=SHARE",
                   help="one concept's own min coverage (repeatable)")
    p.add_argument("--detect-with", action="append", default=[], metavar="CONCEPT=ENTRY",
                   help="the library entry whose features read CONCEPT's coverage for the gate (repeatable; "
                        "default: its own)")


def gate_args(a: argparse.Namespace) -> tuple[dict[str, float], dict[str, str]]:
    """``(min_coverage_of, detect_with)`` from the options :func:`add_gate_args` adds."""
    from saeuron_core.assignments import parse_assignments

    return parse_assignments(a.min_coverage_of, "--min-coverage-of", "CONCEPT=SHARE", float), detect_with_arg(a)


def detect_with_arg(a: argparse.Namespace) -> dict[str, str]:
    """``--detect-with CONCEPT=ENTRY`` (repeatable) as ``{concept: entry}``."""
    from saeuron_core.assignments import parse_assignments

    return parse_assignments(a.detect_with, "--detect-with", "CONCEPT=ENTRY")


def png_out(out: str) -> Path:
    """``--out`` of a command that writes a PNG image (refused unless it ends in .png)."""
    if not out.lower().endswith(".png"):
        raise ConfigError(f"--out {out}: expected a path ending in .png")
    return Path(out)


def concept_output(sae_path: str, out: Optional[str]) -> Path:
    """Where learn-/remove-concept write: ``out``, or the SAE itself when it is a native file."""
    from saeuron_core.sae.files import detect_format

    fmt, resolved = detect_format(sae_path)
    if out is None:
        if fmt != "native":
            raise ConfigError(f"{sae_path} is a {fmt} folder, which is never modified; pass --out NEW.safetensors to "
                              f"write a native SAE file with the concept library")
        return resolved
    if not out.endswith(".safetensors"):
        raise ConfigError(f"--out {out}: expected a path ending in .safetensors")
    return Path(out)


def check_concepts(sae: "TopKSAE", names: Iterable[str]) -> None:
    """Unknown (or broken) library entries fail here, before the model loads."""
    from saeuron_core.sae.library import get_concept

    for name in names:
        get_concept(sae, name)
