"""Server routes of the web extension: ``POST /freespeed/preview`` answers the canvas's schedule preview
from the Python schedules (``core.preview``).  Registered when a ComfyUI server is running."""
from __future__ import annotations

import sys

from ..core.preview import preview
from .hooks import logger


def register(routes) -> None:
    from aiohttp import web

    @routes.post("/freespeed/preview")
    async def freespeed_preview(request):
        try:
            body = await request.json()
        except Exception:
            body = {}
        body = body if isinstance(body, dict) else {}
        return web.json_response(preview(body.get("type", ""), body.get("widgets"), body.get("steps")))


_registered: list = []


def register_with_server() -> None:
    """Register the routes once on the running ComfyUI server, if there is one."""
    try:
        server = sys.modules.get("server")     # only a running ComfyUI has imported it (never import it here)
        inst = getattr(getattr(server, "PromptServer", None), "instance", None)
        if inst is not None and inst not in _registered:
            register(inst.routes)
            _registered.append(inst)
    except Exception:          # no server (tests, scripts) or an older host: the canvas shows no preview
        logger.debug("FreeSpeed: preview route not registered", exc_info=True)
