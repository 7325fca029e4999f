import ast
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


UNSAFE = re.compile(r"pickle\.loads?\(|allow_pickle=True|weights_only=False|torch\.load\b(?!\()|"
                    r"from torch(\.serialization)? import .*\bload\b|torch\.serialization\.load\b")


def pickle_routes(text: str) -> list[str]:
    """Ways ``text`` could unpickle: any ``torch.load`` call without a literal ``weights_only=True`` (on its line and
    as a keyword), ``pickle.load(s)``, ``allow_pickle=True``, or ``torch.load`` taken without calling it."""
    found = [line.strip() for line in text.splitlines()
             if UNSAFE.search(line) or ("torch.load(" in line and "weights_only=True" not in line)]
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load" \
                and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch" \
                and not any(kw.arg == "weights_only" and isinstance(kw.value, ast.Constant) and kw.value.value is True
                            for kw in node.keywords):
            found.append(ast.unparse(node))
    return found


def test_pickle_rule_allows_only_weights_only_torch_load():
    assert not pickle_routes('x = torch.load(path, weights_only=True, map_location="cpu")')
    for unsafe in ("torch.load(path)", "torch.load(path, weights_only=False)", "torch.load(path,\n  map_location='cpu')",
                   "torch.load(path, weights_only=flag)  # weights_only=True", "f = torch.load",
                   "from torch import load", "pickle.loads(data)", "np.load(p, allow_pickle=True)",
                   "torch.load(path, map_location='cpu')  # weights_only=True"):
        assert pickle_routes(unsafe), unsafe


def test_no_pickle_loading_outside_tests():
    """Outside tests the only unpickling is ``torch.load(..., weights_only=True)`` (SDLens ``state_dict.pth``)."""
    files = [p for p in ROOT.rglob("*.py") if not {".venv", ".hosts", "tests"} & set(p.relative_to(ROOT).parts)]
    offenders = {str(p.relative_to(ROOT)): found for p in files if (found := pickle_routes(p.read_text()))}
    assert not offenders


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
