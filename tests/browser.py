"""A real headless Chromium driven by Selenium (Debian's ``chromium`` and ``chromium-driver``,
which .ci/run installs), and the folder its screenshots are written to.

Selenium is pointed at both binaries, so Selenium Manager never looks for (or downloads) a
browser. Without Chromium the browser tests are skipped on a developer's machine and fail
under CI, where their absence would be a broken install.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import REPO

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver") or (
    "/usr/bin/chromedriver" if Path("/usr/bin/chromedriver").exists() else None)
# Screenshots of the pages the browser tests open (git-ignored), for a person to look at;
# RELAY_TEST_OUTPUT elsewhere.
OUTPUT = Path(os.environ.get("RELAY_TEST_OUTPUT") or REPO / ".test-output" / "screenshots")


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    if CHROMIUM is None or CHROMEDRIVER is None:
        if os.environ.get("CI"):
            pytest.fail("chromium and chromium-driver are not installed; .ci/run installs them")
        pytest.skip("chromium is not installed (apt-get install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu",
                     "--disable-dev-shm-usage", "--no-first-run", "--disable-extensions",
                     "--disable-background-networking", "--disable-sync",
                     "--disable-component-update",
                     # No DNS: every name but the loopback literal fails at once.
                     "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1"):
        options.add_argument(argument)
    # The page's console, read back by the tests: it must stay empty of errors.
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def screenshot(driver: object, name: str) -> Path:
    OUTPUT.mkdir(parents=True, exist_ok=True)
    path = OUTPUT / f"{name}.png"
    driver.save_screenshot(str(path))  # type: ignore[attr-defined]
    return path
