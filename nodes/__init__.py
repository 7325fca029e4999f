"""ComfyUI nodes of the pack: thin wrappers around ``saeuron_core``."""

from .eraser import ConceptEraserNode
from .inspector import FeatureInspector
from .learn import LearnConcept
from .loader import EmptyLatentForVAE, LoadDiffusersModel
from .sae_io import LoadSAE, SaveSAE

NODE_CLASS_MAPPINGS = {
    "SAeUronLoadSAE": LoadSAE,
    "SAeUronConceptEraser": ConceptEraserNode,
    "SAeUronLearnConcept": LearnConcept,
    "SAeUronSaveSAE": SaveSAE,
    "SAeUronFeatureInspector": FeatureInspector,
    "SAeUronLoadDiffusersModel": LoadDiffusersModel,
    "SAeUronEmptyLatent": EmptyLatentForVAE,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "SAeUronLoadSAE": "Load SAE",
    "SAeUronConceptEraser": "Concept Eraser (SAE)",
    "SAeUronLearnConcept": "Learn Concept (SAE)",
    "SAeUronSaveSAE": "Save SAE",
    "SAeUronFeatureInspector": "Feature Inspector (SAE)",
    "SAeUronLoadDiffusersModel": "Load Diffusers Model (any SD-style config)",
    "SAeUronEmptyLatent": "Empty Latent (sized for the VAE)",
}
# The concept picker (JS, relative to the pack's root folder, where ComfyUI resolves it).
WEB_DIRECTORY = "./nodes/web"

try:  # inside ComfyUI: make models/sae known as soon as the pack loads
    from .common import register_sae_folder

    register_sae_folder()
except ImportError:  # imported outside ComfyUI (tests, tools): folder_paths does not exist
    pass

from .routes import register_routes  # noqa: E402

register_routes()  # inside ComfyUI's server only; a no-op elsewhere
