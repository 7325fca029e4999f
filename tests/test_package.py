import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_pyproject_metadata():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    project = meta["project"]
    assert project["name"] == "comfyui-saeuron"
    assert project["scripts"]["saeuron"] == "saeuron_core.cli:main"
    deps = {re.split(r"[<>=!~ ]", d)[0]: d for d in project["dependencies"]}
    assert {"torch", "diffusers", "safetensors", "numpy", "tqdm"} <= set(deps)
    assert deps["torch"] == "torch>=2.1"  # permissive: ComfyUI users bring their own torch
    assert "test" in project["optional-dependencies"]
    assert {"PublisherId", "DisplayName"} <= set(meta["tool"]["comfy"])


def test_root_is_a_light_comfyui_custom_node_folder():
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('saeuron_pack', r'{ROOT / '__init__.py'}',"
        f" submodule_search_locations=[r'{ROOT}'])\n"
        "mod = importlib.util.module_from_spec(spec); sys.modules['saeuron_pack'] = mod; spec.loader.exec_module(mod)\n"
        # V3: ComfyUI calls comfy_entrypoint, and only when no NODE_CLASS_MAPPINGS is exported
        "assert callable(mod.comfy_entrypoint) and not hasattr(mod, 'NODE_CLASS_MAPPINGS')\n"
        "assert mod.WEB_DIRECTORY == './nodes/web'\n"
        # torch is ComfyUI's own; nothing else heavy, and no ComfyUI module, at import time
        "heavy = [m for m in ('diffusers', 'transformers', 'comfy', 'folder_paths', 'PIL') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "assert sys.path[0] != r'" + str(ROOT) + "'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd="/")


def test_core_never_imports_comfyui():
    pattern = re.compile(r"^\s*(import|from)\s+(comfy|comfy_extras|folder_paths|nodes|server|execution)\b", re.M)
    offenders = [p.name for p in (ROOT / "saeuron_core").rglob("*.py") if pattern.search(p.read_text())]
    assert not offenders


def test_no_pickle_loading_outside_tests():
    pattern = re.compile(r"torch\.load\(|pickle\.loads?\(|allow_pickle=True")
    files = [p for p in ROOT.rglob("*.py") if not {".venv", ".hosts", "tests"} & set(p.relative_to(ROOT).parts)]
    assert not [p for p in files if pattern.search(p.read_text())]


def test_comfy_registry_metadata():
    """What the Comfy registry and ComfyUI-Manager read: [tool.comfy] and a [project] with a licence file."""
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    comfy = meta["tool"]["comfy"]
    assert comfy["PublisherId"] and comfy["DisplayName"] and isinstance(comfy["includes"], list)
    assert comfy["Icon"].startswith("https://") and (ROOT / "docs" / comfy["Icon"].rsplit("/docs/", 1)[1]).is_file()
    assert (ROOT / comfy["web"]).is_dir() and any((ROOT / comfy["web"]).glob("*.js"))
    assert (ROOT / meta["project"]["license"]["file"]).is_file()
    assert meta["project"]["urls"]["Repository"].startswith("https://")


def test_tracked_tree_is_small():
    """What a user downloads: no training state or rejected candidates, under 40 MB in all."""
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True)
    if listed.returncode != 0:
        pytest.skip("not a git checkout")
    files = [ROOT / f for f in listed.stdout.decode().split("\0") if f]
    assert sum(f.stat().st_size for f in files if f.is_file()) < 40e6
    assert not [f for f in files if f.is_file() and f.stat().st_size > 10e6]
