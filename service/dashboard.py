"""The job dashboard: static pages served by the API; the browser fetches /v1 with the user's key.

The pages carry no data and need no auth; the data comes from the v1 API with the key the user
typed (kept in the browser's localStorage), so the dashboard sees exactly what that key may see.
"""

from pathlib import Path
from string import Template

from fastapi import APIRouter, HTTPException
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse

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


def _page(page: str, title: str) -> HTMLResponse:
    """page.html (the head, the key form, the script) around the page's own <main> from <page>.main.html."""
    shell = Template((STATIC / "page.html").read_text())
    body = shell.substitute(title=title, page=page, main=(STATIC / f"{page}.main.html").read_text().rstrip())
    # no-cache (in SECURITY_HEADERS): after an upgrade the browser revalidates instead of running an old script.
    return HTMLResponse(body, headers=SECURITY_HEADERS)


@router.get("/")
def root() -> RedirectResponse:
    return RedirectResponse("/dashboard")


@router.get("/dashboard")
def jobs_page() -> HTMLResponse:
    return _page("jobs", "jobs")


@router.get("/dashboard/compare")
def compare_page() -> HTMLResponse:
    """Runs side by side; which ones is in the query (?jobs=id,id,...), read by the page's script."""
    return _page("compare", "compare")


@router.get("/dashboard/jobs/{job_id}")
def job_page(job_id: str) -> HTMLResponse:
    return _page("job", "job")


@router.get("/dashboard/static/{name}")
def asset(name: str) -> FileResponse:
    if name not in ASSETS:
        raise HTTPException(404, f"no dashboard asset {name!r}")
    return FileResponse(STATIC / name, media_type=ASSETS[name], headers=SECURITY_HEADERS)
