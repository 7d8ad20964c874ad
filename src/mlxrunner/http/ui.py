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


async def index(request: web.Request) -> web.FileResponse:
    return web.FileResponse(UI_FOLDER / "index.html", headers={"Content-Security-Policy": CONTENT_SECURITY_POLICY,
                                                              "Cache-Control": "no-cache"})


def register(app: web.Application) -> None:
    """`GET /` (the page) and `GET /ui/<file>` (its scripts and style)."""
    app.router.add_get("/", index)
    app.router.add_static("/ui/", UI_FOLDER)
