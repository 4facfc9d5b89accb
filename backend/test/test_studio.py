"""The studio page in a real headless Chromium (Debian's chromium + chromium-driver), against a
real server with the tiny model, in local and S3 mode, with API keys on.

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
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

API_KEY = "studio-api-key-0123456789abcdef"
WAIT_SECONDS = 120


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


@pytest.fixture(params=["local", "s3"])
def studio_server(
    request: pytest.FixtureRequest, make_settings: Any, tiny_klein: Path
) -> Iterator[str]:
    overrides: dict[str, Any] = {
        "local_model_id": str(tiny_klein),
        "local_device": "cpu",
        "api_keys": API_KEY,
        "url_signing_secret": TEST_SIGNING_SECRET,
    }
    if request.param == "s3":
        overrides.update(s3_settings(request, serve_from_cloud=True))
    with serve(create_app(make_settings(**overrides))) as base_url:
        wait_until(lambda: httpx.get(f"{base_url}/ready").status_code == 200, timeout=60)
        yield base_url


def _wait(driver: WebDriver, condition: Any) -> Any:
    return WebDriverWait(driver, WAIT_SECONDS, poll_frequency=0.1).until(condition)


def _loaded_images(driver: WebDriver, selector: str) -> list[int]:
    """naturalWidth of each image under `selector` (0 until it has loaded)."""
    script = "return [...document.querySelectorAll(arguments[0])].map(i => i.naturalWidth);"
    return driver.execute_script(script, selector)


def _api(base_url: str) -> httpx.Client:
    return httpx.Client(base_url=base_url, headers={"X-API-Key": API_KEY}, timeout=30)


def test_the_studio_flow_in_a_real_browser(
    browser: WebDriver, studio_server: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    browser.get(f"{studio_server}/studio/")
    assert browser.title == "Character studio"
    browser.find_element(By.ID, "api-key").send_keys(API_KEY)
    browser.find_element(By.CSS_SELECTOR, "#key-form button").click()
    stored = browser.execute_script("return sessionStorage.getItem('mv.apiKey');")
    assert stored == API_KEY

    # A bad input: the error shape, shown with the field it names.
    browser.find_element(By.ID, "generate").click()
    error = _wait(browser, lambda d: d.find_element(By.ID, "error").is_displayed() and d)
    box = error.find_element(By.ID, "error")
    assert box.text.startswith("ValidationError:")
    fields = [item.text for item in box.find_elements(By.CSS_SELECTOR, ".field-error")]
    assert any(text.startswith("body.character_description:") for text in fields)

    # Generate 2: thumbnails appear, each a loaded image of at most 512 px.
    browser.find_element(By.ID, "description").send_keys("a silver robot with a red shield")
    Select(browser.find_element(By.ID, "count")).select_by_visible_text("2")
    browser.find_element(By.ID, "seed").send_keys("7")
    browser.find_element(By.ID, "generate").click()
    widths = _wait(
        browser,
        lambda d: (w := _loaded_images(d, "#candidates img")) and len(w) == 2 and all(w) and w,
    )
    assert all(0 < width <= 512 for width in widths)
    assert not browser.find_element(By.ID, "error").is_displayed()
    screenshot = (
        os.environ.get("STUDIO_SCREENSHOT") if request.node.callspec.id == "local" else None
    )
    browser.save_screenshot(screenshot or str(tmp_path / "studio.png"))
    cards = browser.find_elements(By.CSS_SELECTOR, "#candidates .card")
    picked_id, deleted_id = (card.get_attribute("data-image-id") for card in cards)

    # Open full size: the link works on its own (signed or presigned), no key needed.
    full_size = cards[0].find_element(By.TAG_NAME, "a").get_attribute("href")
    with httpx.Client(follow_redirects=True, timeout=30) as anonymous:
        opened = anonymous.get(full_size)
    assert opened.status_code == 200
    assert opened.headers["content-type"] == "image/png"

    # Pick the first into a new job: the job lists it, with its thumbnail.
    browser.find_element(By.ID, "job-id").send_keys("studio-job")
    cards[0].find_element(By.CSS_SELECTOR, "button.pick").click()
    _wait(browser, lambda d: (w := _loaded_images(d, "#job-references img")) and all(w))
    with _api(studio_server) as api:
        job = api.get("/api/mv/jobs/studio-job").json()
    assert [asset["image_id"] for asset in job["assets"]] == [picked_id]

    # More of the picked character: a turnaround sheet made from it, with progress; each
    # result says its view and the reference it came from, and can be picked into the job.
    cards[0].find_element(By.CSS_SELECTOR, "button.more").click()
    _wait(browser, lambda d: d.find_element(By.ID, "more-panel").is_displayed())
    Select(browser.find_element(By.ID, "more-kind")).select_by_value("turnaround")
    browser.find_element(By.ID, "more-generate").click()
    derived = _wait(
        browser,
        lambda d: (w := _loaded_images(d, "#derived img")) and len(w) == 4 and all(w) and w,
    )
    assert all(0 < width <= 512 for width in derived)
    captions = [
        card.find_element(By.CSS_SELECTOR, ".actions span").text
        for card in browser.find_elements(By.CSS_SELECTOR, "#derived .card")
    ]
    views = ["front", "three_quarter", "side", "back"]
    assert captions == [f"{view} · from {picked_id[:8]}" for view in views]
    assert "images in" in browser.find_element(By.ID, "status").text
    side = browser.find_elements(By.CSS_SELECTOR, "#derived .card")[2]
    side_id = side.get_attribute("data-image-id")
    side.find_element(By.CSS_SELECTOR, "button.pick").click()
    _wait(browser, lambda d: len(_loaded_images(d, "#job-references img")) == 2)
    with _api(studio_server) as api:
        job = api.get("/api/mv/jobs/studio-job").json()
        assert sorted(asset["image_id"] for asset in job["assets"]) == sorted([picked_id, side_id])
        made = api.get(f"/api/mv/character_references/{side_id}/metadata").json()
    assert made["reference_image_ids"] == [picked_id] and made["view"] == "side"

    # Delete the other candidate: its card goes, and so does the image.
    cards[1].find_element(By.CSS_SELECTOR, "button.delete").click()
    _wait(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#candidates .card")) == 1)
    with _api(studio_server) as api:
        assert api.get(f"/api/mv/character_references/{deleted_id}/metadata").status_code == 404
        assert api.get(f"/api/mv/character_references/{picked_id}/metadata").status_code == 200
    with contextlib.suppress(Exception):
        browser.execute_script("sessionStorage.clear();")
