"""The project's own scripts: building and checking the demo and writing the example workflows.

Each runs as a module from the repository root with the package installed (``pip install -e ".[diffusers]"``),
e.g. ``python -m scripts.erase_demo`` or ``python -m scripts.make_workflows``; they hold no library code (that is in
``saeuron_core`` and ``nodes``).
"""
