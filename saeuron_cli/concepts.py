"""``saeuron concepts``: share concepts as concept files. ``export`` writes some of an SAE's concepts to one small
file, ``import`` adds concept files to their SAE (written as a new SAE file), ``list`` shows what a file holds."""

from __future__ import annotations

import argparse
from pathlib import Path

from saeuron_core.errors import ConfigError

from .common import Parser

NAME = "concepts"


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Add ``concepts`` with its ``export``, ``import`` and ``list`` commands."""
    c = sub.add_parser(NAME, help="share concepts as small concept files: export, import, list")
    actions = c.add_subparsers(dest="concepts_action", metavar="{export,import,list}", required=True,
                               parser_class=Parser)
    e = actions.add_parser("export", help="write some of an SAE's concepts to a concept file")
    e.add_argument("sae", help="SAE file or folder holding the concepts")
    e.add_argument("names", nargs="+", metavar="NAME", help="concept to export (one or more)")
    e.add_argument("-o", "--out", required=True, help="concept file to write (.safetensors)")
    i = actions.add_parser("import", help="add concept files to the SAE they were learned on; write a new SAE file")
    i.add_argument("sae", help="SAE file or folder the concepts were learned on")
    i.add_argument("files", nargs="+", metavar="FILE", help="concept file (one or more)")
    i.add_argument("-o", "--out", required=True, help="SAE file to write (.safetensors), with the concepts added")
    i.add_argument("--replace", action="store_true", help="replace concepts the SAE already has of the same name")
    li = actions.add_parser("list", help="show a concept file's concepts, how they were learned and their SAE")
    li.add_argument("file")


def _export(a: argparse.Namespace) -> int:
    from saeuron_core.sae.concept_files import save_concepts
    from saeuron_core.sae.files import load_sae

    sae = load_sae(a.sae)
    path = save_concepts(sae, a.names, a.out, source=a.sae)
    print(f"exported {', '.join(repr(n) for n in dict.fromkeys(n.strip() for n in a.names))} "
          f"({path.stat().st_size / 1024:.1f} KB) -> {path}")
    return 0


def _import(a: argparse.Namespace) -> int:
    from saeuron_core.sae.concept_files import load_concepts
    from saeuron_core.sae.files import load_sae, save_sae
    from saeuron_core.sae.library import concept_names

    if not a.out.endswith(".safetensors"):
        raise ConfigError(f"--out {a.out}: expected a path ending in .safetensors")
    sae = load_sae(a.sae)
    added = [name for path in a.files for name in load_concepts(sae, path, replace=a.replace)]
    save_sae(sae, Path(a.out))  # only once every file was read and added: an error writes nothing
    print(f"added {', '.join(map(repr, added))}; the SAE now knows: {', '.join(concept_names(sae))} -> {a.out}")
    return 0


def _list(a: argparse.Namespace) -> int:
    from saeuron_core.sae.concept_files import describe_concepts, describe_sae_source

    info = describe_concepts(a.file)
    print(f"{info['path']}\n  SAE:       {describe_sae_source(info['sae'])}\n  identity:  {info['sae_identity']}\n"
          f"  concepts:  {', '.join(info['concepts'])}")
    for name, facts in info["concepts"].items():
        kind = f"{facts['kind']}; " if facts.get("kind") else ""
        print(f"    {name}: {kind}learned from {facts.get('learned', 'not recorded')}; "
              f"model {facts.get('model_family', 'unknown')}")
    return 0


def run(a: argparse.Namespace) -> int:
    """Run the chosen ``concepts`` command."""
    return {"export": _export, "import": _import, "list": _list}[a.concepts_action](a)
