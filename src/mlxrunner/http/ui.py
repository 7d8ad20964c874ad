"""The web page at `/`: a person's way to use the loaded model without writing requests by hand.

The page is plain files in `ui/` beside this module (HTML, CSS and JavaScript modules; no build step, no
framework, nothing fetched from elsewhere, so it works offline). It talks to the runner's own routes only:
`/health`, `/v1/chat/completions`, `/completion` (images, with its step stream) and `/v1/embeddings`, on the
address the page came from. The server registers it unless `--no-ui`, and never under `--mlx-engine`.
"""

from __future__ import annotations

from pathlib import Path

from aiohttp import web

UI_FOLDER = Path(__file__).with_name("ui")

# The page runs only its own scripts and styles and talks only to the runner; generated images are shown
# from blob: URLs, reference images from data: URLs.
CONTENT_SECURITY_POLICY = ("default-src 'self'; img-src 'self' blob: data:; style-src 'self'; script-src 'self'; "
                           "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'")


# Each file's type said here, not guessed from the system's MIME tables: a browser runs a module script only
# when it is served as JavaScript.
CONTENT_TYPES = {".html": "text/html", ".js": "text/javascript", ".css": "text/css"}


def file_response(path: Path, **headers: str) -> web.FileResponse:
    return web.FileResponse(path, headers={"Content-Type": f"{CONTENT_TYPES[path.suffix]}; charset=utf-8",
                                           "Cache-Control": "no-cache", **headers})


async def index(request: web.Request) -> web.FileResponse:
    return file_response(UI_FOLDER / "index.html", **{"Content-Security-Policy": CONTENT_SECURITY_POLICY})


# The files the page may load, by name: a request names one of these or gets 404 (no path is ever joined
# from what the client sent, so no "..", encoded or not, can reach outside the folder).
PAGE_FILES = {path.name: path for path in UI_FOLDER.iterdir() if path.suffix in CONTENT_TYPES}


async def page_file(request: web.Request) -> web.FileResponse:
    path = PAGE_FILES.get(request.match_info["name"])
    if path is None:
        raise web.HTTPNotFound()
    return file_response(path)


def register(app: web.Application) -> None:
    """`GET /` (the page) and `GET /ui/<file>` (its scripts and style)."""
    app.router.add_get("/", index)
    app.router.add_get("/ui/{name}", page_file)
