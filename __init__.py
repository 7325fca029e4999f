"""ComfyUI entry point: this folder is a custom-node pack when placed in ``ComfyUI/custom_nodes/``.

The nodes use ComfyUI's V3 schema (``comfy_api.latest``) and are registered through ``comfy_entrypoint``;
they are built only when ComfyUI calls it, so importing the pack elsewhere stays cheap.
"""

import os
import sys

# Make ``saeuron_core`` importable when the pack is not pip-installed. Appended, not prepended,
# so that ComfyUI's own top-level modules (``nodes``, ``server``...) always win.
_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.append(_HERE)

# The page extensions (concept picker, inspector preview, ...), relative to this folder.
WEB_DIRECTORY = "./nodes/web"


async def comfy_entrypoint():
    """ComfyUI's V3 entry point: the pack's ``ComfyExtension``."""
    from .nodes.extension import SAeUronExtension

    return SAeUronExtension()


__all__ = ["WEB_DIRECTORY", "comfy_entrypoint"]
