"""The studio page in a real headless Chromium (Debian's chromium + chromium-driver), against a
real server with the tiny model, in local and S3 mode, with API keys (two owners) on.

The page is not instrumented: where a test needs to see what the page did (the event stream it
opened, the requests it sent), a script the test adds before the page's own records it.

STUDIO_SCREENSHOT=<path> saves a screenshot of the candidate grid there (the README's).
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from conftest import TEST_SIGNING_SECRET, s3_settings, wait_until
from live_server import serve
from main import create_app
from test_principals import AUDIENCE, ISSUER, JwksServer, token

CHROMIUM = shutil.which("chromium")
CHROMEDRIVER = shutil.which("chromedriver")
if CHROMIUM is None or CHROMEDRIVER is None:
    pytest.skip(
        "needs Debian's chromium and chromium-driver (apt-get install -y chromium chromium-driver)",
        allow_module_level=True,
    )

from selenium import webdriver  # noqa: E402  (only once the browser is known to be there)
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.remote.webdriver import WebDriver  # noqa: E402
from selenium.webdriver.remote.webelement import WebElement  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

ALICE_KEY = "studio-alice-key-0123456789abcdef"
BOB_KEY = "studio-bob-key-0123456789abcdef"
WAIT_SECONDS = 120
UNDO_SECONDS = 6  # the studio's UNDO_MS
CHARACTERS_PAGE = 8  # the studio's CHARACTERS_PAGE
LONG_SEED = 4294967000  # ten digits

# What the page does with its event streams and requests, recorded before its script runs.
RECORDER = """
(() => {
  const seen = (window.studioSeen = { streams: [], events: [], fetches: [] });
  const NativeEventSource = window.EventSource;
  window.EventSource = class extends NativeEventSource {
    constructor(url, init) {
      super(url, init);
      seen.streams.push(url);
      for (const name of ["queued", "progress", "succeeded", "failed", "canceled"]) {
        this.addEventListener(name, () => seen.events.push(name));
      }
    }
  };
  const nativeFetch = window.fetch;
  window.fetch = (input, init) => {
    seen.fetches.push([(init && init.method) || "GET", String(input)]);
    return nativeFetch(input, init);
  };
})();
"""
# An event stream that cannot be opened (a proxy that refuses it): the browser closes it.
REFUSED_STREAM = """
window.EventSource = class extends EventTarget {
  static CLOSED = 2;
  constructor(url) {
    super();
    window.studioSeen.streams.push(url);
    this.readyState = 2;
    setTimeout(() => this.dispatchEvent(new Event("error")), 0);
  }
  close() {}
};
"""


@pytest.fixture(scope="module")
def browser() -> Iterator[WebDriver]:
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in (
        "--headless=new",
        "--no-sandbox",  # CI runs as root
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1280,1100",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
    ):
        options.add_argument(argument)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def page(browser: WebDriver) -> Iterator[WebDriver]:
    """The browser, recording what its pages do, with a clean session storage after."""
    with _before_page_scripts(browser, RECORDER):
        yield browser
    with contextlib.suppress(Exception):
        browser.execute_script("sessionStorage.clear();")


@contextlib.contextmanager
def _before_page_scripts(browser: WebDriver, *sources: str) -> Iterator[None]:
    """Run `sources` in every page, before the page's own scripts, until the block ends."""
    added = [
        browser.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": source})
        for source in sources
    ]
    try:
        yield
    finally:
        for script in added:
            browser.execute_cdp_cmd("Page.removeScriptToEvaluateOnNewDocument", script)


@contextlib.contextmanager
def _studio(make_settings: Any, **overrides: Any) -> Iterator[str]:
    """A live server of `overrides`; its base URL once /ready has settled."""
    with serve(create_app(make_settings(**overrides))) as base_url:
        wait_until(lambda: "loading" not in httpx.get(f"{base_url}/ready").text, timeout=60)
        yield base_url


@pytest.fixture(params=["local", "s3", "s3-ministack"])
def studio_server(
    request: pytest.FixtureRequest, make_settings: Any, tiny_klein: Path
) -> Iterator[str]:
    overrides: dict[str, Any] = {
        "local_model_id": str(tiny_klein),
        "local_device": "cpu",
        "api_keys": f"alice:{ALICE_KEY},bob:{BOB_KEY}",
        "url_signing_secret": TEST_SIGNING_SECRET,
    }
    if request.param == "s3":
        overrides.update(s3_settings(request, serve_from_cloud=True, server="moto"))
    elif request.param == "s3-ministack":  # presigned URLs checked as S3 checks them
        overrides.update(s3_settings(request, serve_from_cloud=True, server="ministack"))
    with _studio(make_settings, **overrides) as base_url:
        yield base_url


def _wait(driver: WebDriver, condition: Any) -> Any:
    return WebDriverWait(driver, WAIT_SECONDS, poll_frequency=0.1).until(condition)


def _loaded_images(driver: WebDriver, selector: str) -> list[int]:
    """naturalWidth of each image under `selector` (0 until it has loaded)."""
    script = "return [...document.querySelectorAll(arguments[0])].map(i => i.naturalWidth);"
    return driver.execute_script(script, selector)


def _api(base_url: str, key: str = ALICE_KEY) -> httpx.Client:
    return httpx.Client(base_url=base_url, headers={"X-API-Key": key}, timeout=30)


def _seen(driver: WebDriver) -> dict[str, list[Any]]:
    return driver.execute_script("return window.studioSeen;")


def _text(driver: WebDriver, element_id: str) -> str:
    return driver.find_element(By.ID, element_id).text


def _shown(driver: WebDriver, element_id: str) -> bool:
    return driver.find_element(By.ID, element_id).is_displayed()


def _sign_in(driver: WebDriver, credential: str) -> None:
    driver.find_element(By.ID, "credential").send_keys(credential)
    driver.find_element(By.ID, "sign-in-button").click()


def _card_ids(driver: WebDriver, grid: str) -> list[str]:
    # in one script: the grid may re-render between two calls
    script = "return [...document.querySelectorAll(arguments[0])].map(c => c.dataset.imageId);"
    return driver.execute_script(script, f"#{grid} .card")


def _captions(driver: WebDriver, grid: str) -> list[str]:
    # textContent: an ellipsis cuts what is drawn, not the text
    script = "return [...document.querySelectorAll(arguments[0])].map(c => c.textContent);"
    return driver.execute_script(script, f"#{grid} .card .caption")


def _inside(driver: WebDriver, inner: WebElement, outer: WebElement) -> bool:
    script = """
      const [a, b] = [arguments[0].getBoundingClientRect(), arguments[1].getBoundingClientRect()];
      return a.left >= b.left && a.right <= b.right && a.top >= b.top && a.bottom <= b.bottom;
    """
    return driver.execute_script(script, inner, outer)


def _line_count(driver: WebDriver, element: WebElement) -> int:
    """How many lines the element's text is laid out on."""
    script = """
      const range = document.createRange();
      range.selectNodeContents(arguments[0]);
      return new Set([...range.getClientRects()].map(r => Math.round(r.top))).size;
    """
    return driver.execute_script(script, element)


def _generate(driver: WebDriver, description: str, count: int, seed: int | None = None) -> None:
    driver.find_element(By.ID, "description").clear()
    driver.find_element(By.ID, "description").send_keys(description)
    Select(driver.find_element(By.ID, "count")).select_by_visible_text(str(count))
    driver.find_element(By.ID, "seed").clear()
    if seed is not None:
        driver.find_element(By.ID, "seed").send_keys(str(seed))
    driver.find_element(By.ID, "generate").click()


def _newest_ids(base_url: str, key: str, limit: int) -> list[str]:
    with _api(base_url, key) as api:
        page = api.get("/api/mv/character_references", params={"limit": limit}).json()
    return [item["id"] for item in page["items"]]


def test_the_studio_flow_in_a_real_browser(
    page: WebDriver, studio_server: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    page.get(f"{studio_server}/studio/")
    assert page.title == "Character studio"
    _wait(page, lambda d: "sign in" in _text(d, "who"))

    # Nothing to warn about: this server can generate.
    assert not _shown(page, "ready-banner")
    # The description's placeholder reads as an example, drawn lighter, not as typed text.
    description = page.find_element(By.ID, "description")
    assert description.get_attribute("placeholder").startswith("e.g. ")
    placeholder_style = page.execute_script(
        "const s = getComputedStyle(arguments[0], '::placeholder');"
        "return [s.fontStyle, Number(s.opacity)];",
        description,
    )
    assert placeholder_style[0] == "italic" and placeholder_style[1] < 1

    # A wrong key is refused, said so, and not kept.
    _sign_in(page, "not-a-key-of-this-server")
    _wait(page, lambda d: "refused" in _text(d, "who"))
    assert "kept" not in _text(page, "who")
    assert page.execute_script("return sessionStorage.getItem('mv.credential');") is None
    _sign_in(page, ALICE_KEY)
    _wait(page, lambda d: _text(d, "who") == "signed in with an API key")

    # A bad input: each field named once, by its label, and marked; the message not repeated.
    page.find_element(By.ID, "generate").click()
    _wait(page, lambda d: _shown(d, "error"))
    box = _text(page, "error")
    fields = [item.text for item in page.find_elements(By.CSS_SELECTOR, "#error .field-error")]
    assert fields == ["Description: String should have at least 1 character"]
    assert box.count("String should have at least 1 character") == 1
    assert "body.character_description" not in box
    assert description.get_attribute("aria-invalid") == "true"

    # Generate 2 with a long seed: thumbnails appear, each a loaded image of at most 512 px,
    # progress came over the event stream (no polling), and every card keeps its buttons.
    _generate(page, "a silver robot with a red shield", 2, seed=LONG_SEED)
    widths = _wait(
        page,
        lambda d: (w := _loaded_images(d, "#candidates img")) and len(w) == 2 and all(w) and w,
    )
    assert all(0 < width <= 512 for width in widths)
    assert not _shown(page, "error")
    assert description.get_attribute("aria-invalid") is None
    seen = _seen(page)
    assert len(seen["streams"]) == 1 and "/events?" in seen["streams"][0]
    assert "progress" in seen["events"] and seen["events"][-1] == "succeeded"
    polled = [url for method, url in seen["fetches"] if "/character_reference_jobs/" in url]
    assert polled == []
    assert _captions(page, "candidates") == [f"seed {LONG_SEED}", f"seed {LONG_SEED + 1}"]
    cards = page.find_elements(By.CSS_SELECTOR, "#candidates .card")
    for card in cards:
        assert _line_count(page, card.find_element(By.CLASS_NAME, "caption")) == 1
        for action in card.find_elements(By.CSS_SELECTOR, ".actions button"):
            assert _inside(page, action, card), action.text
    screenshot = (
        os.environ.get("STUDIO_SCREENSHOT") if request.node.callspec.id == "local" else None
    )
    page.save_screenshot(screenshot or str(tmp_path / "studio.png"))
    picked_id = _card_ids(page, "candidates")[0]

    # Open full size: the link works on its own (signed or presigned), no key needed.
    full_size = cards[0].find_element(By.TAG_NAME, "a").get_attribute("href")
    with httpx.Client(follow_redirects=True, timeout=30) as anonymous:
        opened = anonymous.get(full_size)
    assert opened.status_code == 200
    assert opened.headers["content-type"] == "image/png"

    # The job id field's pattern is one the browser applies.
    job_id = page.find_element(By.ID, "job-id")
    job_id.send_keys("not a job id!")
    assert page.execute_script("return arguments[0].validity.patternMismatch;", job_id)
    job_id.clear()
    job_id.send_keys("studio-job")
    assert not page.execute_script("return arguments[0].validity.patternMismatch;", job_id)

    # Pick the first into a new job: the job shows it, labelled as the gallery labels it, and
    # "your jobs" lists the job.
    cards[0].find_element(By.CSS_SELECTOR, "button.pick").click()
    _wait(page, lambda d: (w := _loaded_images(d, "#job-references img")) and all(w))
    assert _captions(page, "job-references") == [f"seed {LONG_SEED}"]
    _wait(page, lambda d: "studio-job" in _text(d, "jobs"))
    with _api(studio_server) as api:
        job = api.get("/api/mv/jobs/studio-job").json()
    assert [asset["image_id"] for asset in job["assets"]] == [picked_id]

    # More of the picked character: a turnaround sheet made from it, with progress; each
    # result says its view and the reference it came from, and can be picked into the job.
    cards[0].find_element(By.CSS_SELECTOR, "button.more").click()
    _wait(page, lambda d: _shown(d, "more-panel"))
    Select(page.find_element(By.ID, "more-kind")).select_by_value("turnaround")
    page.find_element(By.ID, "more-generate").click()
    derived = _wait(
        page,
        lambda d: (w := _loaded_images(d, "#derived img")) and len(w) == 4 and all(w) and w,
    )
    assert all(0 < width <= 512 for width in derived)
    views = ["front", "three_quarter", "side", "back"]
    assert _captions(page, "derived") == [f"{view} · from {picked_id[:8]}" for view in views]
    assert "images in" in _text(page, "status")
    side = page.find_elements(By.CSS_SELECTOR, "#derived .card")[2]
    side_id = side.get_attribute("data-image-id")
    side.find_element(By.CSS_SELECTOR, "button.pick").click()
    _wait(page, lambda d: len(_loaded_images(d, "#job-references img")) == 2)
    with _api(studio_server) as api:
        job = api.get("/api/mv/jobs/studio-job").json()
        assert sorted(asset["image_id"] for asset in job["assets"]) == sorted([picked_id, side_id])
        made = api.get(f"/api/mv/character_references/{side_id}/metadata").json()
    assert made["reference_image_ids"] == [picked_id] and made["view"] == "side"
    references = _captions(page, "job-references")
    assert sorted(references) == sorted([f"seed {LONG_SEED}", f"side · seed {made['seed']}"])
    assert not any("/" in caption for caption in references)

    # Your characters, newest first, a page at a time: 2 + 4 + 4 images.
    _generate(page, "a copper robot with a blue cape", 4)
    _wait(page, lambda d: len(_loaded_images(d, "#candidates img")) == 4)
    newest = _newest_ids(studio_server, ALICE_KEY, 100)
    assert len(newest) == 10
    _wait(page, lambda d: _card_ids(d, "characters") == newest[:CHARACTERS_PAGE])
    page.find_element(By.ID, "characters-more").click()
    _wait(page, lambda d: _card_ids(d, "characters") == newest)
    assert not _shown(page, "characters-more")

    # A reload keeps the sign-in, the characters and the jobs.
    page.refresh()
    _wait(page, lambda d: _card_ids(d, "characters") == newest[:CHARACTERS_PAGE])
    assert _text(page, "who") == "signed in with an API key"
    assert _shown(page, "characters-more")
    _wait(page, lambda d: "studio-job" in _text(d, "jobs"))

    # Delete the newest, then undo: its cards go, come back, and it was never deleted.
    deleted_id = newest[0]
    first = page.find_element(By.CSS_SELECTOR, f'#characters .card[data-image-id="{deleted_id}"]')
    first.find_element(By.CSS_SELECTOR, "button.delete").click()
    _wait(page, lambda d: deleted_id not in _card_ids(d, "characters"))
    assert _shown(page, "toast") and "Deleted seed" in _text(page, "toast")
    page.find_element(By.ID, "undo").click()
    _wait(page, lambda d: deleted_id in _card_ids(d, "characters"))
    assert not _shown(page, "toast")
    with _api(studio_server) as api:
        assert api.get(f"/api/mv/character_references/{deleted_id}/metadata").status_code == 200

    # Delete without undo: once the toast has gone, so has the image.
    again = page.find_element(By.CSS_SELECTOR, f'#characters .card[data-image-id="{deleted_id}"]')
    again.find_element(By.CSS_SELECTOR, "button.delete").click()
    _wait(page, lambda d: not _shown(d, "toast"))
    with _api(studio_server) as api:
        wait_until(
            lambda: (
                api.get(f"/api/mv/character_references/{deleted_id}/metadata").status_code == 404
            ),
            timeout=UNDO_SECONDS,
        )
        assert api.get(f"/api/mv/character_references/{picked_id}/metadata").status_code == 200
    _wait(page, lambda d: _card_ids(d, "characters") == [i for i in newest if i != deleted_id][:8])

    # Another owner sees none of it.
    page.find_element(By.ID, "sign-out").click()
    _sign_in(page, BOB_KEY)
    _wait(page, lambda d: _shown(d, "characters-empty"))
    assert _card_ids(page, "characters") == []
    assert _text(page, "jobs") == ""


def test_the_studio_polls_when_the_event_stream_cannot_be_opened(
    page: WebDriver, make_settings: Any, tiny_klein: Path
) -> None:
    settings = {"local_model_id": str(tiny_klein), "local_device": "cpu"}
    with (
        _before_page_scripts(page, REFUSED_STREAM),
        _studio(make_settings, **settings) as base_url,
    ):
        page.get(f"{base_url}/studio/")
        _wait(page, lambda d: _text(d, "who") == "this server needs no sign-in")
        assert not page.find_element(By.ID, "credential").is_displayed()
        _generate(page, "a silver robot with a red shield", 1, seed=3)
        _wait(page, lambda d: (w := _loaded_images(d, "#candidates img")) and all(w))
        seen = _seen(page)
        assert len(seen["streams"]) == 1
        status_polls = [
            url
            for method, url in seen["fetches"]
            if method == "GET" and "/character_reference_jobs/" in url
        ]
        assert status_polls and all("/events" not in url for url in status_polls)
        assert "1 candidate in" in _text(page, "status")


def test_a_server_that_cannot_generate_says_so_on_load(page: WebDriver, make_settings: Any) -> None:
    # What plain `make run` gives on a machine without the model (or without CUDA).
    settings = {"local_model_id": "some-org/a-model-nobody-cached"}
    with _studio(make_settings, **settings) as base_url:
        readiness = httpx.get(f"{base_url}/ready").json()
        assert readiness["status"] == "not ready"
        page.get(f"{base_url}/studio/")
        _wait(page, lambda d: _shown(d, "ready-banner"))
        banner = _text(page, "ready-banner")
        assert banner.startswith("Generation cannot run on this server yet:")
        problems = [item.text for item in page.find_elements(By.CSS_SELECTOR, "#ready-problems li")]
        assert problems == readiness["problems"]
        assert not page.find_element(By.ID, "generate").get_attribute("disabled")


def test_signing_in_with_a_pasted_token(
    page: WebDriver, make_settings: Any, tiny_klein: Path
) -> None:
    with JwksServer() as jwks:
        settings = {
            "local_model_id": str(tiny_klein),
            "local_device": "cpu",
            "auth_jwks_url": jwks.url,
            "auth_issuer": ISSUER,
            "auth_audience": AUDIENCE,
            "url_signing_secret": TEST_SIGNING_SECRET,
        }
        with _studio(make_settings, **settings) as base_url:
            carol = token(sub="carol")
            made = httpx.post(
                f"{base_url}/api/mv/generate_character_reference",
                json={"character_description": "a tin robot", "num_images": 1, "seed": 5},
                headers={"Authorization": f"Bearer {carol}"},
                timeout=60,
            )
            assert made.status_code == 200, made.text
            page.get(f"{base_url}/studio/")
            _wait(page, lambda d: "sign in" in _text(d, "who"))

            _sign_in(page, token(sub="carol", aud="another-service"))
            _wait(page, lambda d: _text(d, "who").startswith("token refused: "))
            assert page.execute_script("return sessionStorage.getItem('mv.credential');") is None

            _sign_in(page, carol)
            _wait(page, lambda d: _text(d, "who") == "signed in as carol")
            expected = [image["id"] for image in made.json()["images"]]
            _wait(page, lambda d: _card_ids(d, "characters") == expected)
            assert _captions(page, "characters") == ["seed 5"]
