"""saeuron_core: SAE-based concept erasure for diffusion models (host-independent, plain torch)."""

from .errors import ConfigError, HookError, SAEFormatError, SaeuronError, StoreError
from .formats import convert, load_sae, save_sae
from .sae import SAEConfig, TopK, TopKSAE

__all__ = ["ConfigError", "HookError", "SAEFormatError", "SaeuronError", "StoreError", "SAEConfig", "TopK",
           "TopKSAE", "convert", "load_sae", "save_sae"]
__version__ = "0.1.0"
