"""ComfyUI entry point: this folder is a custom-node pack when cloned into ``ComfyUI/custom_nodes/``."""

import os
import sys

# Make ``saeuron_core`` importable when the pack is not pip-installed. Appended, not prepended,
# so that ComfyUI's own top-level modules (``nodes``, ``server``...) always win.
_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.append(_HERE)

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS, WEB_DIRECTORY  # noqa: E402

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
