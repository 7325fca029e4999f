"""saeuron_core: SAE-based concept erasure for diffusion models (host-independent, plain torch).

``erase(pipe, sae, concepts, ...)`` is a context manager that erases concepts from a diffusers
pipeline or UNet; ``inspect(pipe, sae, prompt, ...)`` shows where concepts and features fire;
``learn_concept`` adds a concept to an SAE's library; ``save_concepts`` / ``load_concepts`` share concepts as small
concept files that load onto the SAE they were learned on.
"""

from typing import Any

from .concepts.learning import learn_concept
from .concepts.selection import Selection
from .erasure.eraser import ConceptEraser, erase
from .erasure.options import EraseOptions
from .errors import ConfigError, HookError, SAEFormatError, SaeuronError, StoreError
from .sae.concept_files import load_concepts, save_concepts
from .sae.files import convert, load_sae, save_sae
from .sae.library import concept_names, get_concept, remove_concept
from .sae.model import SAEConfig, TopK, TopKSAE

__all__ = ["ConceptEraser", "ConfigError", "EraseOptions", "HookError", "SAEConfig", "SAEFormatError", "SaeuronError",
           "Selection", "StoreError", "TopK", "TopKSAE", "concept_names", "convert", "erase", "get_concept", "inspect",
           "learn_concept", "load_concepts", "load_sae", "remove_concept", "save_concepts", "save_sae"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name == "inspect":  # imported on first use: it brings in PIL
        from .inspection import inspect

        return inspect
    raise AttributeError(f"module 'saeuron_core' has no attribute {name!r}")
