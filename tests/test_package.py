import ast
import fnmatch
import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def requirement_names(lines) -> dict[str, str]:
    """``{normalized distribution name: requirement}`` of requirement strings (comments and blanks skipped)."""
    reqs = [line.split("#")[0].strip() for line in lines]
    return {re.sub(r"[-_.]+", "-", re.split(r"[<>=!~ \[;]", r)[0]).lower(): r for r in reqs if r}


def test_pyproject_metadata():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    project = meta["project"]
    assert project["name"] == "comfyui-saeuron"
    assert project["scripts"]["saeuron"] == "saeuron_cli:main"
    deps = requirement_names(project["dependencies"])
    assert deps["torch"] == "torch>=2.1"  # permissive: ComfyUI users bring their own torch
    extras = project["optional-dependencies"]
    # the library's pipelines, the CLI and the demo need diffusers; the nodes never import it
    assert "diffusers" not in deps and "diffusers" in requirement_names(extras["diffusers"])
    assert "comfyui-saeuron[diffusers]" in extras["test"]  # the tests run the library on diffusers pipelines
    for extra in extras.values():
        assert all(r == "torch>=2.1" for name, r in requirement_names(extra).items() if name == "torch")
    assert {"PublisherId", "DisplayName"} <= set(meta["tool"]["comfy"])


# Modules the ComfyUI host provides to the nodes (ComfyUI itself, and aiohttp, which its server runs on).
HOST_MODULES = {"comfy", "comfy_api", "comfy_extras", "folder_paths", "nodes", "server", "execution", "aiohttp"}
DISTRIBUTION = {"PIL": "pillow"}  # import name -> distribution name, where they differ


def _module_file(name: str) -> Path | None:
    path = ROOT.joinpath(*name.split("."))
    for candidate in (path / "__init__.py", path.with_suffix(".py")):
        if candidate.is_file():
            return candidate
    return None


def _imports(name: str, file: Path, *, module_level_only: bool) -> set[str]:
    """Absolute names imported by module ``name``: at module level, or anywhere in it."""
    package = name if file.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(file.read_text())
    nodes = []
    todo = list(tree.body) if module_level_only else [tree]
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            nodes.append(node)
        if module_level_only:
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                continue
            if isinstance(node, (ast.If, ast.Try, ast.With)):
                todo += [n for field in ("body", "orelse", "handlers", "finalbody") for n in getattr(node, field, [])]
            elif isinstance(node, ast.ExceptHandler):
                todo += node.body
        else:
            todo += list(ast.iter_child_nodes(node))
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
            continue
        base = node.module or ""
        if node.level:
            parts = package.split(".")[: len(package.split(".")) - node.level + 1]
            base = ".".join(parts + ([node.module] if node.module else []))
        found |= {base} | {f"{base}.{a.name}" for a in node.names}
    return found


def third_party_imports_of_the_nodes() -> set[str]:
    """Top-level names of what ComfyUI loads with the pack: every import in ``__init__.py`` and ``nodes/``, and
    the module-level imports of the ``saeuron_core`` modules (and their packages) those reach."""
    todo = [("nodes", ROOT / "__init__.py")] + [(f"nodes.{p.stem}", p) for p in (ROOT / "nodes").glob("*.py")]
    seen, external = set(), set()
    while todo:
        name, file = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        for imported in _imports(name, file, module_level_only=name.startswith("saeuron_core")):
            top = imported.split(".")[0]
            if top in ("nodes", "saeuron_core"):
                parts = imported.split(".")
                for i in range(1, len(parts) + 1):  # importing a.b.c runs a and a.b first
                    if (found := _module_file(".".join(parts[:i]))) is not None:
                        todo.append((".".join(parts[:i]), found))
            elif top not in sys.stdlib_module_names and top != "__future__":
                external.add(top)
    assert "saeuron_core.sae.files" in seen and "nodes.eraser" in seen  # the walk found its way
    return external - HOST_MODULES


def test_dependencies_are_what_the_nodes_import():
    """[project] dependencies, which the Comfy registry records, are exactly what the nodes load (torch included,
    as the library needs it); requirements.txt (hand installs into ComfyUI) is the same list without torch."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    deps = requirement_names(project["dependencies"])
    imported = {DISTRIBUTION.get(m, m).lower() for m in third_party_imports_of_the_nodes()}
    assert set(deps) == imported
    requirements = requirement_names((ROOT / "requirements.txt").read_text().splitlines())
    assert requirements == {name: r for name, r in deps.items() if name != "torch"}


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


def project_files() -> list[str]:
    """The files a commit would ship: tracked, plus new ones git does not ignore."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True)
    if listed.returncode != 0:
        pytest.skip("not a git checkout")
    return sorted({f for f in listed.stdout.decode().split("\0") if f and (ROOT / f).is_file()})


def comfyignore_patterns() -> list[str]:
    lines = [line.strip() for line in (ROOT / ".comfyignore").read_text().splitlines()]
    patterns = [line for line in lines if line and not line.startswith("#")]
    # The subset of gitignore syntax that ignored() below reads the same way as comfy-cli's pathspec.
    for p in patterns:
        assert p.startswith("/") and not p.startswith("!") and "**" not in p and not set("?[]\\") & set(p), p
    return patterns


def ignored(path: str, patterns: list[str]) -> bool:
    """Whether ``comfy node pack`` leaves ``path`` out: an anchored pattern matches that path or a folder above it
    (one ending in / only folders); * matches within one path part."""
    parts = path.split("/")
    for pattern in patterns:
        segments = pattern.strip("/").split("/")
        folder_only = pattern.endswith("/")
        if len(parts) < len(segments) + folder_only:
            continue
        if all(fnmatch.fnmatchcase(part, seg) for part, seg in zip(parts, segments)):
            return True
    return False


def test_ignore_rule_reads_anchored_folders_and_globs():
    patterns = ["/tests/", "/demo_assets/*.json", "/BENCHMARKS.md"]
    assert ignored("tests/test_x.py", patterns) and ignored("demo_assets/gates.json", patterns)
    assert ignored("BENCHMARKS.md", patterns)
    assert not ignored("demo_assets/model/unet/config.json", patterns) and not ignored("nodes/tests.py", patterns)
    assert not ignored("docs/BENCHMARKS.md", patterns)


def test_registry_archive_leaves_out_development_files_and_keeps_what_runs():
    """.comfyignore: the archive (`comfy node pack`) has the nodes, the library, the example workflows and the demo
    files they load, and no tests, benchmarks, scripts, documentation images, demo evaluation or command line."""
    import comfy_host

    patterns = comfyignore_patterns()
    files = project_files()
    packed = [f for f in files if not ignored(f, patterns)]
    for left_out in ("tests/", "benchmarks/", "scripts/", "docs/", "saeuron_demo/", "saeuron_cli/"):
        assert any(f.startswith(left_out) for f in files) and not any(f.startswith(left_out) for f in packed)
    needed = {"__init__.py", "LICENSE", "README.md", "pyproject.toml", "requirements.txt"}
    needed |= {f for f in files if f.split("/")[0] in ("nodes", "saeuron_core", "example_workflows")}
    needed |= {f for f in files if f.startswith("demo_assets/model/")}  # Load Diffusers Model "saeuron-demo"
    shipped_concepts = comfy_host.plain_pack_module("demo_files").DEMO_CONCEPTS
    for workflow in (ROOT / "example_workflows").glob("*.json"):
        for node in json.loads(workflow.read_text())["nodes"]:
            if node["type"] == "SAeUronLoadSAE":  # copied into models/sae as the README says
                name = node["widgets_values"][0]
                assert name.startswith("saeuron-demo"), (workflow.name, name)
                needed.add("demo_assets/sae" + name.removeprefix("saeuron-demo"))
            if node["type"] == "SAeUronLoadConcepts":  # offered by the pack from demo_assets/concepts/
                needed.add("demo_assets/" + shipped_concepts[node["widgets_values"][0]])
    assert {"demo_assets/sae.safetensors", "demo_assets/model/unet/diffusion_pytorch_model.safetensors",
            "demo_assets/concepts/outline-64.safetensors"} <= needed
    assert needed <= set(files)
    assert not needed - set(packed), sorted(needed - set(packed))
    assert sum((ROOT / f).stat().st_size for f in packed) < 20e6


def test_comfy_registry_compatibility_and_publish_workflow():
    """requires-comfyui says which ComfyUI the V3 nodes need; .github/workflows/publish.yml publishes with the
    registry's action on a pyproject.toml change on main."""
    comfy = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["comfy"]
    assert re.fullmatch(r"(>=|==|~=)\d+\.\d+\.\d+(,\s*<\d+\.\d+\.\d+)?", comfy["requires-comfyui"])
    workflow = (ROOT / ".github" / "workflows" / "publish.yml").read_text()
    lines = [line.rstrip() for line in workflow.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    assert all("\t" not in line for line in lines)
    top = [line.split(":")[0] for line in lines if not line.startswith(" ")]
    assert top == ["name", "on", "permissions", "jobs"]
    text = "\n".join(lines)
    assert re.search(r"^  push:\n    branches:\n      - main\n    paths:\n      - \"pyproject.toml\"$", text, re.M)
    assert re.search(r"uses: Comfy-Org/publish-node-action@\S+", text)
    assert "personal_access_token: ${{ secrets.REGISTRY_ACCESS_TOKEN }}" in text


# A path on the machine that wrote the file: under work, root, tmp or home at the top of its file system.
MACHINE_PATH = re.compile(r"(?<![\w.~-])/(?:work|root|tmp|home)(?:/|\b)")


def test_machine_path_rule():
    # written as "/" "name" so that this file does not hold what it looks for
    for bad in ("/" "work/main/x", "see /" "tmp", '"/' 'root/.cache"', "cd /" "home/me"):
        assert MACHINE_PATH.search(bad), bad
    for good in ("../shared/hosts", "https://example.com/home/x", "tests/tmp/x", "~/work", "a/workflows/b", "/"):
        assert not MACHINE_PATH.search(good), good


def test_no_machine_paths_in_files_or_safetensors_metadata():
    """Files made to be shared record names, never the writer's directories: no tracked text file and no shipped
    safetensors file's metadata (e.g. an SAE's training source) holds an absolute machine path."""
    from saeuron_core.safetensors_io import read_safetensors_header

    found = []
    for name in project_files():
        path = ROOT / name
        if name.endswith(".safetensors"):
            metadata = read_safetensors_header(path).get("__metadata__", {})
            found += [f"{name} metadata {k}: {m.group()}" for k, v in metadata.items() if (m := MACHINE_PATH.search(v))]
            continue
        data = path.read_bytes()
        if b"\0" in data:
            continue  # binary (images)
        text = data.decode("utf-8", errors="replace")
        found += [f"{name}:{text.count(chr(10), 0, m.start()) + 1}: {m.group()}" for m in MACHINE_PATH.finditer(text)]
    assert not found


def test_trained_sae_records_names_of_its_store_and_model(capsys, tmp_path):
    """``saeuron train`` writes the store's and the model's folder names into the SAE, not their paths."""
    from cli_helpers import run_cli, tiny_model

    from saeuron_core.sae.files import load_sae

    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\na dog\n")
    store = tmp_path / "data" / "acts"
    code, _, err = run_cli(capsys, "collect", "--model", tiny_model(), "--prompts", prompts, "--out", store, "--steps", "2",
                           "--batch-size", "2")
    assert code == 0, err
    manifest = json.loads((store / "manifest.json").read_text())
    manifest["config"]["model"] = str(tmp_path / "pipelines" / "my-model")  # as if collected from that folder
    (store / "manifest.json").write_text(json.dumps(manifest))
    out = tmp_path / "s.safetensors"
    code, _, err = run_cli(capsys, "train", "--store", store.resolve(), "--out", out, "--expansion-factor", "2",
                           "--k", "4", "--steps", "2", "--batch-size", "32")
    assert code == 0, err
    source = load_sae(out).training_summary["source"]
    assert source["store"] == "acts" and source["model"] == "my-model"
