"""The web page in a real browser: headless Chromium driven by Playwright, against the real
app and the real tiny model under uvicorn.

Debian's ``chromium`` is used (``apt-get install chromium``): Playwright's own browser
download needs the internet. Without it or Playwright the tests skip, except under ``CI``,
where they fail: CI must not pass without having looked at the page. The last screenshot is
saved as ``test-artifacts/page.png``.

``BROWSER_TEST_WEIGHTS=weights/safl.safetensors`` runs them against another checkpoint; the
README's screenshot (docs/page.png) is the shipped model's, since the tiny model reads noise.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import httpx
import pytest
from conftest import render_word
from service_support import encode, serve_in_thread, settings_for

from service import create_app

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Page

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "test-artifacts"
WORDS = ["Hello", "EXIT", "2024"]
#: Playwright's waits, in ms: a cold model's first batch on a loaded CPU can take seconds.
WAIT_MS = 30_000


def _unavailable(reason: str) -> NoReturn:
    if os.environ.get("CI"):
        pytest.fail(f"{reason}; CI is set, so the browser tests must run, not skip")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _unavailable("playwright is not installed: pip install -e '.[dev]'")
    # SAFL_CHROMIUM names the binary; else the names Debian, Ubuntu and Google give it.
    names = [os.environ.get("SAFL_CHROMIUM", ""), "chromium", "chromium-browser", "google-chrome"]
    chromium = next((found for name in names if name and (found := shutil.which(name))), None)
    if chromium is None:
        _unavailable("no Chromium found (chromium, chromium-browser, google-chrome or SAFL_CHROMIUM): apt-get install chromium")
    with sync_playwright() as pw:
        # --no-sandbox: CI containers run as root, where Chromium's sandbox refuses to start.
        browser = pw.chromium.launch(executable_path=chromium, headless=True, args=["--no-sandbox"])
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint: Path) -> Path:
    override = os.environ.get("BROWSER_TEST_WEIGHTS")
    return Path(override).resolve() if override else tiny_checkpoint


@pytest.fixture(scope="module")
def server(checkpoint: Path) -> Iterator[str]:
    with serve_in_thread(create_app(settings_for(checkpoint))) as url:
        yield url


def _crop(word: str) -> dict[str, Any]:
    """A rendered word as a Playwright file payload."""
    return {"name": f"{word}.png", "mimeType": "image/png", "buffer": encode(render_word(word, (160, 40)))}


def _api(url: str, crops: list[dict[str, Any]], key: str | None = None, **fields: str) -> list[dict[str, Any]]:
    """What the API itself answers for these crops: the tiny model's reading is no real word."""
    files = [("files", (c["name"], c["buffer"], c["mimeType"])) for c in crops]
    r = httpx.post(url + "/recognize?debug=rectified", files=files, data=fields, headers={"X-API-Key": key} if key else {}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["results"]


def _open(browser: Browser, url: str) -> tuple[Page, list[str]]:
    """The page at ``url``, and a list that collects what must stay empty: requests that
    leave the app (it must work offline), script errors and console errors (a CSP violation
    is one)."""
    page = browser.new_page(viewport={"width": 1100, "height": 800})
    problems: list[str] = []

    def route(r: Any) -> None:
        if r.request.url.startswith((url + "/", "data:", "blob:")):
            r.continue_()
        else:
            problems.append(f"request outside the app: {r.request.url}")
            r.abort()

    page.route("**/*", route)
    page.on("pageerror", lambda e: problems.append(f"script error: {e}"))
    page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
    page.goto(url + "/")
    return page, problems


def _wait_for_readings(page: Page, n: int) -> None:
    from playwright.sync_api import expect

    expect(page.locator("#results .card")).to_have_count(n, timeout=WAIT_MS)
    expect(page.locator("#results .card[aria-busy]")).to_have_count(0, timeout=WAIT_MS)


def _screenshot(page: Page) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.evaluate("document.activeElement && document.activeElement.blur()")  # no focus ring in the picture
    page.screenshot(path=str(ARTIFACTS / "page.png"), full_page=True)


def test_the_page_reads_crops_as_the_api_does(browser: Browser, server: str) -> None:
    from playwright.sync_api import expect

    page, problems = _open(browser, server)
    try:
        expect(page.locator("#model")).to_contain_text("@", timeout=WAIT_MS)  # /info answered
        assert page.locator("#key-row").is_hidden()  # no key configured, no key field

        # One crop, no options.
        crop = _crop(WORDS[0])
        page.set_input_files("#files", [crop])
        _wait_for_readings(page, 1)
        (want,) = _api(server, [crop])
        card = page.locator("#results .card")
        assert card.locator(".text").text_content() == want["text"]
        assert card.locator(".filename").text_content() == crop["name"]
        assert card.locator(".input img").evaluate("img => img.complete && img.naturalWidth") > 0
        cells = card.locator(".chars span")
        assert cells.count() == len(want["text"]) == len(want["char_confidences"])
        if cells.count():
            assert cells.first.evaluate("c => getComputedStyle(c).backgroundColor") not in ("", "rgba(0, 0, 0, 0)")
            assert "%" in (cells.first.get_attribute("title") or "")
        # The rectified crop the model read, drawn beside the input.
        assert want["rectified"].startswith("data:image/png;base64,")
        assert card.locator(".rectified").is_visible()
        assert card.locator(".rectified img").evaluate("img => img.complete && img.naturalWidth") > 0

        # Several crops in one request, with top-k alternatives.
        page.fill("#top_k", "3")
        crops = [_crop(w) for w in WORDS]
        page.set_input_files("#files", crops)
        _wait_for_readings(page, len(crops))
        want_all = _api(server, crops, top_k="3")
        assert page.locator("#results .text").all_text_contents() == [w["text"] for w in want_all]
        assert page.locator("#results .filename").all_text_contents() == [c["name"] for c in crops]
        for card, want in zip(page.locator("#results .card").all(), want_all, strict=True):
            alternatives = card.locator(".alternatives")
            assert alternatives.is_visible()
            assert alternatives.locator("code").all_text_contents() == [a["text"] or "(empty)" for a in want["alternatives"]]
            assert 1 < len(want["alternatives"]) <= 3
        expect(page.locator("#error")).to_be_empty()
        _screenshot(page)
        assert problems == []
    finally:
        page.close()


def test_the_options_go_with_the_request_and_errors_show_inline(browser: Browser, server: str) -> None:
    from playwright.sync_api import expect

    page, problems = _open(browser, server)
    try:
        crop = _crop(WORDS[0])
        page.fill("#lexicon", "alpha\nbeta\n")
        page.set_input_files("#files", [crop])
        _wait_for_readings(page, 1)
        text = page.locator("#results .text").text_content()
        assert text in ("alpha", "beta") and text == _api(server, [crop], lexicon="alpha\nbeta\n")[0]["text"]

        # A lexicon with an allowlist is refused: the page shows the service's code and message.
        page.fill("#allowlist", "0123456789")
        page.click("#again")
        refused = httpx.post(server + "/recognize", files=[("files", (crop["name"], crop["buffer"]))], data={"lexicon": "alpha", "allowlist": "0123456789"})
        assert refused.status_code == 422
        error = refused.json()["error"]
        expect(page.locator("#error code")).to_have_text(error["code"], timeout=WAIT_MS)
        expect(page.locator("#error")).to_contain_text(error["message"])
        problems[:] = [p for p in problems if "422" not in p]  # the browser logs the refusal
        assert problems == []
    finally:
        page.close()


def test_the_page_asks_for_the_api_key_and_sends_it(browser: Browser, checkpoint: Path) -> None:
    from playwright.sync_api import expect

    with serve_in_thread(create_app(settings_for(checkpoint, api_key="s3cret"))) as url:
        page, problems = _open(browser, url)
        try:
            expect(page.locator("#key-row")).to_be_visible(timeout=WAIT_MS)
            expect(page.locator("#model")).to_contain_text("API key")

            crop = _crop(WORDS[1])
            page.set_input_files("#files", [crop])
            expect(page.locator("#error code")).to_have_text("unauthorized", timeout=WAIT_MS)
            # The browser logs the 401s as console errors; they are expected here.
            problems[:] = [p for p in problems if "401" not in p]

            page.fill("#api-key", "s3cret")
            page.click("#again")
            _wait_for_readings(page, 1)
            expect(page.locator("#error")).to_be_empty()
            assert page.locator("#results .text").text_content() == _api(url, [crop], key="s3cret")[0]["text"]
            # Kept for the tab (sessionStorage), so a reload does not ask again.
            page.reload()
            assert page.input_value("#api-key") == "s3cret"
            expect(page.locator("#model")).to_contain_text("@", timeout=WAIT_MS)
            assert problems == []
        finally:
            page.close()


#: Hands the page a PNG the way a drop or a paste does: in a DataTransfer on the event.
_HAND_OVER = """([kind, name, b64]) => {
    const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
    const data = new DataTransfer();
    data.items.add(new File([bytes], name, { type: "image/png" }));
    const event = kind === "drop"
        ? new DragEvent("drop", { dataTransfer: data, bubbles: true, cancelable: true })
        : new ClipboardEvent("paste", { clipboardData: data, bubbles: true, cancelable: true });
    (kind === "drop" ? document.querySelector("#drop") : document).dispatchEvent(event);
}"""


@pytest.mark.parametrize("kind", ["drop", "paste"])
def test_a_dropped_or_pasted_crop_is_read(browser: Browser, server: str, kind: str) -> None:
    import base64

    page, problems = _open(browser, server)
    try:
        crop = _crop(WORDS[2])
        page.evaluate(_HAND_OVER, [kind, crop["name"], base64.b64encode(crop["buffer"]).decode()])
        _wait_for_readings(page, 1)
        # A pasted image is called image.png by the browser; the page numbers them instead.
        assert page.locator("#results .filename").text_content() == (crop["name"] if kind == "drop" else "pasted-1.png")
        assert page.locator("#results .text").text_content() == _api(server, [crop])[0]["text"]
        assert problems == []
    finally:
        page.close()


def test_a_file_that_is_no_image_fails_alone_in_its_card(browser: Browser, server: str) -> None:
    from playwright.sync_api import expect

    page, problems = _open(browser, server)
    try:
        crops = [_crop(WORDS[0]), {"name": "notes.png", "mimeType": "image/png", "buffer": b"hello, world\n" * 10}, _crop(WORDS[1])]
        page.set_input_files("#files", crops)
        _wait_for_readings(page, 3)
        want = _api(server, crops, per_file_errors="true")
        cards = page.locator("#results .card").all()
        assert [c.locator(".text").text_content() for c in cards] == [want[0]["text"], "—", want[2]["text"]]
        bad = cards[1].locator(".file-error")
        expect(bad).to_be_visible()
        assert bad.locator("code").text_content() == want[1]["error"]["code"] == "unsupported_image"
        assert want[1]["error"]["message"] in (bad.text_content() or "")
        assert cards[0].locator(".file-error").is_hidden() and cards[0].locator(".rectified").is_visible()
        expect(page.locator("#status")).to_contain_text("1 of 3 could not be read")
        expect(page.locator("#error")).to_be_empty()
        assert problems == []
    finally:
        page.close()
