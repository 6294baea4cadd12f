"""The web page at ``/`` as HTTP sees it: served by the app, self-contained, outside the API key.

What it does in a browser is tests/test_browser.py.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from service_support import metric, settings_for

from service import create_app
from service.page import ASSETS

pytestmark = pytest.mark.anyio

# An absolute or protocol-relative URL in an attribute, a CSS url() or an @import: the page
# must need nothing but the app (no CDN, no web font), so it works offline.
_EXTERNAL = re.compile(r"""(?:src|href|action)\s*=\s*["']?\s*(?:[a-z][a-z0-9+.-]*:)?//|url\(\s*["']?\s*(?:[a-z][a-z0-9+.-]*:)?//|@import|https?://""", re.I)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def _client(checkpoint: Path, **settings: Any) -> httpx.AsyncClient:
    # No lifespan: the page needs no model, so none is loaded.
    app = create_app(settings_for(checkpoint, **settings))
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://testserver")


@pytest.fixture
async def client(tiny_checkpoint: Path) -> AsyncIterator[httpx.AsyncClient]:
    async with _client(tiny_checkpoint) as c:
        yield c


async def test_root_serves_the_page(client: httpx.AsyncClient) -> None:
    r = await client.get("/")
    assert r.status_code == 200
    assert r.headers["content-type"] == "text/html; charset=utf-8"
    html = r.text
    assert html.startswith("<!doctype html>")
    for element in ('id="files"', 'type="file"', "multiple", 'id="allowlist"', 'id="blocklist"', 'id="lexicon"', 'id="top_k"', 'id="api-key"'):
        assert element in html, element
    for control in re.findall(r'<(?:input|textarea)[^>]*\bid="([^"]+)"', html):
        assert f'for="{control}"' in html, f"#{control} has no <label for>"
    head = await client.head("/")
    assert head.status_code == 200 and head.headers["content-type"] == r.headers["content-type"] and not head.content


async def test_the_page_refers_only_to_its_own_assets(client: httpx.AsyncClient) -> None:
    page = await client.get("/")
    linked = re.findall(r'(?:src|href)="([^"]+)"', page.text)
    assert sorted(linked) == sorted(f"static/{name}" for name in ASSETS), linked
    texts = {"index.html": page.text} | {name: (await client.get(f"/static/{name}")).text for name in ASSETS}
    for name, text in texts.items():
        found = _EXTERNAL.search(text)
        assert found is None, f"{name} refers to something outside the app: {found.group(0)!r}"
    # The browser enforces it too.
    assert "default-src 'self'" in page.headers["content-security-policy"]


def test_the_external_url_check_finds_them() -> None:
    for ref in ('<script src="https://cdn.example/x.js">', "<link href='//cdn.example/x.css'>", "src: url(//fonts.example/a.woff2)", '@import "x.css";'):
        assert _EXTERNAL.search(ref), ref
    for ref in ('<script src="static/page.js">', 'fetch("recognize?debug=rectified")', "img.src = result.rectified; // a data: URL"):
        assert not _EXTERNAL.search(ref), ref


@pytest.mark.parametrize("name", sorted(ASSETS))
async def test_assets_have_their_content_types(client: httpx.AsyncClient, name: str) -> None:
    r = await client.get(f"/static/{name}")
    assert r.status_code == 200 and r.content
    assert r.headers["content-type"] == ASSETS[name]
    assert r.headers["x-content-type-options"] == "nosniff"


async def test_only_the_listed_assets_are_served(client: httpx.AsyncClient) -> None:
    for path in ("/static/index.html", "/static/../page.py", "/static/%2e%2e/page.py", "/static/", "/page.py"):
        r = await client.get(path)
        assert r.status_code == 404, path
        assert r.json()["error"]["code"] == "not_found"


async def test_the_page_is_not_in_the_api_schema(client: httpx.AsyncClient) -> None:
    paths = (await client.get("/openapi.json")).json()["paths"]
    assert "/" not in paths and not any(p.startswith("/static/") for p in paths)


async def test_the_page_needs_no_api_key_but_the_api_does(tiny_checkpoint: Path) -> None:
    async with _client(tiny_checkpoint, api_key="s3cret") as client:
        assert (await client.get("/")).status_code == 200
        for name in ASSETS:
            assert (await client.get(f"/static/{name}")).status_code == 200
        assert (await client.get("/info")).json()["error"]["code"] == "unauthorized"
        assert (await client.post("/recognize")).status_code == 401


async def test_page_and_docs_requests_are_counted_by_their_route(client: httpx.AsyncClient) -> None:
    # The page's routes sit in an included router and the offline docs' assets under a mount:
    # both were counted as route="unmatched", the bucket of scanners' 404s.
    docs = (await client.get("/docs")).text
    asset = re.search(r'src="(/static-offline-docs/[^"]+)"', docs)
    assert asset, "the offline docs page links no asset of its own"
    paths = ["/", "/static/page.js", "/static/page.css", asset.group(1), "/openapi.json", "/static/nope.js"]
    statuses = [(await client.get(p)).status_code for p in paths]
    text = (await client.get("/metrics")).text
    assert statuses == [200, 200, 200, 200, 200, 404]
    for route in ("/", "/static/page.js", "/static/page.css", "/static-offline-docs/{path}", "/openapi.json", "/docs"):
        assert metric(text, "safl_request_duration_seconds_count", route=route, status="200") == 1, route
    assert metric(text, "safl_request_duration_seconds_count", route="unmatched") == 1  # /static/nope.js only
