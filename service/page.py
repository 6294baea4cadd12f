"""The web page at ``/``: drop, paste or pick crops and see what the model read.

The page is three hand-written files in ``service/static`` served by the app itself, so it
works where the server has no internet: no CDN, no web font, no build step. They are read
with ``importlib.resources``, which finds them in a checkout and in an installed wheel alike.
The page holds no data, so it is not behind the API key; the calls it makes are.
"""

from __future__ import annotations

from functools import cache
from importlib.resources import files

from fastapi import APIRouter, Response

#: Asset name -> content type. A fixed list rather than a ``{name}`` route: a path
#: parameter could be steered at other files of the package, and each asset stays a
#: route of its own, so the latency histogram labels it by path instead of "unmatched".
ASSETS: dict[str, str] = {"page.css": "text/css; charset=utf-8", "page.js": "text/javascript; charset=utf-8"}

#: The browser itself refuses anything outside the app (a forgotten external URL fails
#: visibly in development instead of leaking requests in use); ``data:`` and ``blob:`` are
#: the rectified crops and the previews of the user's own files.
_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; object-src 'none'; base-uri 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    # Revalidate each time: after an upgrade the page and its script must not be mixed versions.
    "Cache-Control": "no-cache",
}

router = APIRouter(include_in_schema=False)


@cache
def _read(name: str) -> bytes:
    return files("service").joinpath("static", name).read_bytes()


def _asset(name: str, media_type: str) -> Response:
    return Response(_read(name), media_type=media_type, headers=_HEADERS)


# HEAD as GET, like the probes: uptime monitors that HEAD the root see the page is up.
@router.api_route("/", methods=["GET", "HEAD"])
async def index() -> Response:
    """The recognition page."""
    return _asset("index.html", "text/html; charset=utf-8")


def _add_asset_route(name: str, media_type: str) -> None:
    async def asset() -> Response:
        return _asset(name, media_type)

    router.add_api_route(f"/static/{name}", asset, methods=["GET", "HEAD"], name=f"static_{name}")


for _name, _type in ASSETS.items():
    _add_asset_route(_name, _type)
