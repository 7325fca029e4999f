"""The pack's ``ComfyExtension``: its nodes, the ``sae`` and ``sae_concepts`` model folders and the concept route."""

from __future__ import annotations

from comfy_api.latest import ComfyExtension, io

from .common import register_model_folder, register_sae_folder
from .concepts import CONCEPTS_FOLDER, LoadConcepts, SaveConcepts
from .eraser import ConceptEraser
from .inspector import FeatureInspector
from .learn import LearnConcept
from .loader import EmptyLatentForVAE, LoadDiffusersModel
from .routes import register_routes
from .sae_io import LoadSAE, SaveSAE

NODES: list[type[io.ComfyNode]] = [LoadSAE, LoadConcepts, ConceptEraser, LearnConcept, SaveSAE, SaveConcepts,
                                   FeatureInspector, LoadDiffusersModel, EmptyLatentForVAE]


class SAeUronExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        # ComfyUI 0.3.x calls only this when it loads the pack (not on_load), so the folder and route are set here.
        register_sae_folder()
        register_model_folder(CONCEPTS_FOLDER)
        register_routes()  # inside ComfyUI's server only; a no-op in-process
        return NODES
