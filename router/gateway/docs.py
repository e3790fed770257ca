"""The API docs page (``/docs``) and the gateway's static assets, served from the installed package.

FastAPI's own ``/docs`` loads Swagger UI from a CDN, so it is blank on a
machine without internet access. Swagger UI (5.x, which renders the OpenAPI
3.1 schema FastAPI writes) and Chart.js ship inside ``router/gateway/static`` with
their licences; nothing is fetched at run time.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

#: The package's own static files: Swagger UI, Chart.js and the dashboard's page.
STATIC_DIR = Path(__file__).resolve().parent / "static"
#: Where they are served.
STATIC_URL = "/static"

router = APIRouter()


@router.get("/docs", include_in_schema=False)
async def docs() -> HTMLResponse:
    return get_swagger_ui_html(
        openapi_url="/openapi.json",
        title="llamas — API",
        swagger_js_url=f"{STATIC_URL}/swagger-ui/swagger-ui-bundle.js",
        swagger_css_url=f"{STATIC_URL}/swagger-ui/swagger-ui.css",
        swagger_favicon_url=f"{STATIC_URL}/swagger-ui/favicon-32x32.png",
    )


def install(app: FastAPI) -> None:
    """Serve ``/docs`` and ``/static`` from the package (the app must be made with ``docs_url=None``)."""
    app.mount(STATIC_URL, StaticFiles(directory=STATIC_DIR), name="static")
    app.include_router(router)
