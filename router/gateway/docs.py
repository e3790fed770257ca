"""The API docs page (``/docs``) and the gateway's static assets, served from the installed package.

FastAPI's own ``/docs`` loads Swagger UI from a CDN, so it is blank on a
machine without internet access. Swagger UI (5.x, which renders the OpenAPI
3.1 schema FastAPI writes) and Chart.js ship inside ``router/gateway/static`` with
their licences; nothing is fetched at run time. The page starts Swagger UI
from a file too (``static/docs``), not an inline script, so its
Content-Security-Policy allows the gateway's own scripts alone.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

#: The package's own static files: Swagger UI, Chart.js and the dashboard's page.
STATIC_DIR = Path(__file__).resolve().parent / "static"
#: Where they are served.
STATIC_URL = "/static"

router = APIRouter()


@router.get("/docs", include_in_schema=False)
async def docs() -> FileResponse:
    return FileResponse(STATIC_DIR / "docs" / "index.html")


def install(app: FastAPI) -> None:
    """Serve ``/docs`` and ``/static`` from the package (the app must be made with ``docs_url=None``)."""
    app.mount(STATIC_URL, StaticFiles(directory=STATIC_DIR), name="static")
    app.include_router(router)
