"""Read-only server route for the concept picker: ``GET /saeuron/concepts?sae=<name listed by Load SAE>``.

``concepts_reply`` holds the whole logic (validation, lookup, reading the names) so that tests call it
without a server; ``register_routes`` only adds it to ComfyUI's running server, when there is one.
"""

from __future__ import annotations

import sys
from typing import Any, Mapping

from saeuron_core.errors import SaeuronError
from saeuron_core.sae.files import concept_names_in_file

from .common import list_saes, resolve_sae

ROUTE = "/saeuron/concepts"
MAX_NAME_LENGTH = 1024


def concepts_reply(query: Mapping[str, str]) -> tuple[int, dict[str, Any]]:
    """``(HTTP status, JSON body)`` for a query: 200 ``{"sae", "concepts"}``, else 400/404/422 ``{"error"}``."""
    name = query.get("sae")
    if not isinstance(name, str) or not name.strip():
        return 400, {"error": "give the SAE as ?sae=<file name listed by Load SAE>"}
    if len(name) > MAX_NAME_LENGTH or any(ord(c) < 32 for c in name):
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
    return 200, {"sae": name, "concepts": names}


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
        query = dict(request.rel_url.query)
        status, body = await asyncio.get_running_loop().run_in_executor(None, concepts_reply, query)
        return web.json_response(body, status=status)

    return True
