"""The browser playground: a static page at `/playground` (no API key; every call it makes sends one)
and `GET /models/{name}/schema`, the parameter schema its form is generated from.

The 3D viewer (`@google/model-viewer`) is installed from npm next to this file (`npm ci`, run by
`make` and the Docker build) and served from node_modules; the page never loads from a CDN.
"""

from __future__ import annotations

import logging
from pathlib import Path

from fastapi import APIRouter, Depends
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse

from pipeline.registry import TASKS
from server import segmind
from server.gateway import ApiError, Gateway

log = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent
PAGES = {name: HERE / name for name in ("index.html", "app.js", "style.css")}
VENDOR = {"model-viewer.min.js": HERE / "node_modules/@google/model-viewer/dist/model-viewer.min.js"}
INSTALL_HINT = "run `make playground` (npm ci in server/playground)"


def build_router(gateway: Gateway) -> APIRouter:
    router = APIRouter(route_class=segmind.SegmindRoute)

    @router.get("/", include_in_schema=False)
    async def root() -> RedirectResponse:
        return RedirectResponse("/playground")

    @router.get("/playground", include_in_schema=False)  # a page, not an API: see the README
    async def page() -> FileResponse:
        return FileResponse(PAGES["index.html"], headers={"Cache-Control": "no-cache"})

    @router.get("/playground/vendor/{name}", include_in_schema=False)
    async def vendor(name: str) -> FileResponse:
        path = VENDOR.get(name)
        if path is None:
            raise ApiError(404, "Not found")
        if not path.is_file():
            log.error("playground: %s is missing; %s", path, INSTALL_HINT)
            raise ApiError(404, f"{name} is not installed on the server: {INSTALL_HINT}")
        return FileResponse(path)

    @router.get("/playground/{name}", include_in_schema=False)
    async def static(name: str) -> FileResponse:
        if name not in PAGES:
            raise ApiError(404, "Not found")
        return FileResponse(PAGES[name], headers={"Cache-Control": "no-cache"})

    @router.get(
        "/models/{name}/schema",
        tags=["server"],
        summary="A model's parameter schema (JSON Schema) and which parameters carry a mask image",
        dependencies=[Depends(segmind.require_key(gateway))],
    )
    async def schema(name: str) -> JSONResponse:
        spec = TASKS.get(name)
        if spec is None:
            raise ApiError(404, f"Unknown model '{name}'. Served models: {', '.join(TASKS)}")
        return JSONResponse(
            {"name": name, "mask_params": list(spec.mask_params), "schema": spec.params.model_json_schema()}
        )

    return router
