"""Read-only server route for the concept picker: ``GET /saeuron/concepts?sae=<name listed by Load SAE>``, and for an
SAE that comes through Load Concepts nodes ``&concepts=<file listed by Load Concepts>`` (repeated, or a comma list):
the names in the SAE and in those files.

``concepts_reply`` holds the whole logic (validation, lookup, reading the names) so that tests call it
without a server; ``register_routes`` only adds it to ComfyUI's running server, when there is one.
"""

from __future__ import annotations

import sys
from typing import Any, Mapping, Union

from saeuron_core.errors import SaeuronError
from saeuron_core.sae.concept_files import concept_file_names
from saeuron_core.sae.files import concept_names_in_file

from .common import list_saes, resolve_sae
from .concepts import CONCEPTS_FOLDER, list_concept_files, resolve_concept_file

ROUTE = "/saeuron/concepts"
MAX_NAME_LENGTH = 1024


Reply = tuple[int, dict[str, Any]]


def _bad_name(name: Any) -> bool:
    return not isinstance(name, str) or len(name) > MAX_NAME_LENGTH or any(ord(c) < 32 for c in name)


def _file_concepts(value: Union[str, list, None]) -> Union[Reply, dict[str, list[str]]]:
    """``{file: concept names}`` of the concept files a query names, or the error reply."""
    values = [] if value is None else list(value) if isinstance(value, (list, tuple)) else [value]
    if any(_bad_name(v) for v in values):
        return 400, {"error": "a concept file name is too long or holds control characters"}
    listed = list_concept_files()
    names = [n for v in values for n in ([v] if v in listed else [p.strip() for p in v.split(",") if p.strip()])]
    out: dict[str, list[str]] = {}
    for name in dict.fromkeys(names):
        # As for SAEs, only names the Load Concepts widget lists are looked up.
        if name not in listed:
            return 404, {"error": f"concept file {name!r} is not in the {CONCEPTS_FOLDER} model folders"}
        try:
            path = resolve_concept_file(name)
        except SaeuronError:
            return 404, {"error": f"concept file {name!r} is not inside the {CONCEPTS_FOLDER} model folders"}
        try:
            out[name] = concept_file_names(path)
        except SaeuronError as exc:
            return 422, {"error": f"cannot read the concepts of {name!r}: {str(exc).replace(path, name)}"}
    return out


def concepts_reply(query: Mapping[str, Any]) -> Reply:
    """``(HTTP status, JSON body)`` for a query: 200 ``{"sae", "concepts"}`` (and ``"files"``: the names each concept
    file adds, when the query names some), else 400/404/422 ``{"error"}``."""
    name = query.get("sae")
    if not isinstance(name, str) or not name.strip():
        return 400, {"error": "give the SAE as ?sae=<file name listed by Load SAE>"}
    if _bad_name(name):
        return 400, {"error": "the SAE name is too long or holds control characters"}
    # Only names the Load SAE widget lists are looked up, so nothing outside the sae folders is ever opened.
    if name not in list_saes():
        return 404, {"error": f"SAE {name!r} is not in the sae model folders"}
    try:
        path = resolve_sae(name)
    except SaeuronError:  # e.g. a link inside the folder that points outside it
        return 404, {"error": f"SAE {name!r} is not inside the sae model folders"}
    try:
        names = concept_names_in_file(path)
    except SaeuronError as exc:
        # The server's folders are not the page's business: name the file as the page knows it.
        return 422, {"error": f"cannot read the concepts of {name!r}: {str(exc).replace(path, name)}"}
    files = _file_concepts(query.get("concepts"))
    if isinstance(files, tuple):
        return files
    if not files:
        return 200, {"sae": name, "concepts": names}
    added = {n for found in files.values() for n in found}
    return 200, {"sae": name, "concepts": sorted(set(names) | added), "files": files}


def register_routes() -> bool:
    """Add the route to ComfyUI's ``PromptServer``; ``False`` when no server is running (tests, tools)."""
    server = sys.modules.get("server")  # ComfyUI's main.py imports it before loading custom nodes
    instance = getattr(getattr(server, "PromptServer", None), "instance", None)
    if instance is None:
        return False
    if any(getattr(r, "path", None) == ROUTE for r in instance.routes):
        return True  # already added (the pack's node list was asked for again)
    import asyncio

    from aiohttp import web

    @instance.routes.get(ROUTE)
    async def saeuron_concepts(request: web.Request) -> web.Response:
        query: dict[str, Any] = dict(request.rel_url.query)
        query["concepts"] = request.rel_url.query.getall("concepts", [])  # repeated: one file each
        status, body = await asyncio.get_running_loop().run_in_executor(None, concepts_reply, query)
        return web.json_response(body, status=status)

    return True
