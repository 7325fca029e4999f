"""ComfyUI nodes of the pack: thin wrappers around ``saeuron_core``."""

from .eraser import ConceptEraserNode
from .learn import LearnConcept
from .sae_io import LoadSAE, SaveSAE

NODE_CLASS_MAPPINGS = {
    "SAeUronLoadSAE": LoadSAE,
    "SAeUronConceptEraser": ConceptEraserNode,
    "SAeUronLearnConcept": LearnConcept,
    "SAeUronSaveSAE": SaveSAE,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "SAeUronLoadSAE": "Load SAE",
    "SAeUronConceptEraser": "Concept Eraser (SAE)",
    "SAeUronLearnConcept": "Learn Concept (SAE)",
    "SAeUronSaveSAE": "Save SAE",
}

try:  # inside ComfyUI: make models/sae known as soon as the pack loads
    from .common import register_sae_folder

    register_sae_folder()
except ImportError:  # imported outside ComfyUI (tests, tools): folder_paths does not exist
    pass
