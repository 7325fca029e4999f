"""ComfyUI nodes of the pack (V3 schema): thin wrappers around ``saeuron_core``.

Importing this package needs nothing from ComfyUI; ``nodes.extension`` (which does) lists the nodes.
"""
