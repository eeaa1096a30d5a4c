"""The job dashboard: static pages served by the API; the browser fetches /v1 with the user's key.

The pages carry no data and need no auth; the data comes from the v1 API with the key the user
typed (kept in the browser's localStorage), so the dashboard sees exactly what that key may see.
"""

from pathlib import Path

from fastapi import APIRouter, HTTPException
from fastapi.responses import FileResponse, RedirectResponse

STATIC = Path(__file__).parent / "static"
# Served by name from this list only: no path from the URL ever reaches the filesystem.
ASSETS = {"dashboard.js": "text/javascript", "dashboard.css": "text/css"}

# The pages load only their own script and style and talk only to this API; no page may frame them
# (clickjacking). Images are fetched as blobs, hence blob: for img-src.
SECURITY_HEADERS = {"Content-Security-Policy": "default-src 'self'; img-src 'self' blob: data:; object-src 'none'; "
                                               "base-uri 'none'; frame-ancestors 'none'; form-action 'self'",
                    "X-Frame-Options": "DENY", "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
                    "Cache-Control": "no-cache"}

# Out of the OpenAPI document: these are pages for people, not API.
router = APIRouter(include_in_schema=False)


def _page(name: str) -> FileResponse:
    # no-cache: after an upgrade the browser revalidates instead of running an old script.
    return FileResponse(STATIC / name, media_type="text/html", headers=SECURITY_HEADERS)


@router.get("/")
def root() -> RedirectResponse:
    return RedirectResponse("/dashboard")


@router.get("/dashboard")
def jobs_page() -> FileResponse:
    return _page("index.html")


@router.get("/dashboard/jobs/{job_id}")
def job_page(job_id: str) -> FileResponse:
    return _page("job.html")


@router.get("/dashboard/static/{name}")
def asset(name: str) -> FileResponse:
    if name not in ASSETS:
        raise HTTPException(404, f"no dashboard asset {name!r}")
    return FileResponse(STATIC / name, media_type=ASSETS[name], headers=SECURITY_HEADERS)
