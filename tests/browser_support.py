"""A headless Chromium driven by Selenium, installed from Debian when missing and root."""

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--window-size=1280,1000",
]


def _binaries() -> tuple[str | None, str | None]:
    return shutil.which("chromium"), shutil.which("chromedriver")


def ensure_chromium() -> tuple[str, str]:
    """Paths of chromium and chromedriver; apt-get installs them when root, else skip.

    Playwright's own browser download is not reachable from CI, Debian's packages are.
    """
    browser, driver = _binaries()
    if browser and driver:
        return browser, driver
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        pytest.skip(
            "browser tests need chromium and chromedriver (apt-get install chromium "
            "chromium-driver); not root or no apt-get here, so they were not installed"
        )
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (
        ["apt-get", "update"],
        ["apt-get", "install", "-y", "--no-install-recommends", "chromium", "chromium-driver"],
    ):
        done = subprocess.run(command, capture_output=True, text=True, timeout=900, env=env)
        if done.returncode != 0:
            pytest.fail(f"{' '.join(command)} failed:\n{done.stderr[-2000:]}")
    browser, driver = _binaries()
    assert browser and driver, "apt-get installed chromium but its binaries are not on PATH"
    return browser, driver


def chrome(profile: Path) -> Iterator[Any]:
    """A headless Chromium WebDriver with its own profile folder; always quit."""
    webdriver = pytest.importorskip("selenium.webdriver", reason="pip install selenium")
    browser, driver_path = ensure_chromium()
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in [*FLAGS, f"--user-data-dir={profile}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()
