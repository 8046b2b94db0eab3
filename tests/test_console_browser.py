"""The web console in a real browser (headless Chromium via Selenium): log in, plots, promote.

Set ``FEDGE_SCREENSHOTS=docs/img`` to refresh the docs' screenshots of every page.
"""

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fedge.server.registry.api import create_app
from tests.browser_support import chrome
from tests.console_support import Coordinator, make_coordinator
from tests.deploy_support import ServerThread, serving
from tests.report_support import client

pytestmark = pytest.mark.slow
WAIT_S = 20


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    yield from chrome(tmp_path_factory.mktemp("chromium-profile"))


@pytest.fixture
def console(tmp_path: Path) -> Iterator[tuple[ServerThread, Coordinator]]:
    coordinator = make_coordinator(tmp_path)
    with serving(create_app(coordinator.registry_dir)) as server:
        yield server, coordinator


def _wait(driver: Any, condition: Any) -> Any:
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, WAIT_S).until(condition)


def _shot(driver: Any, name: str, tmp_path: Path) -> None:
    path = tmp_path / f"console-{name}.png"
    driver.save_screenshot(str(path))
    target = os.environ.get("FEDGE_SCREENSHOTS")
    if target:
        Path(target).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(target) / path.name)


def _log_in(driver: Any, url: str, token: str) -> None:
    from selenium.webdriver.common.by import By

    driver.delete_all_cookies()
    driver.get(f"{url}/console/login")
    driver.find_element(By.ID, "token").send_keys(token)
    driver.find_element(By.ID, "login").click()


def test_operator_sees_plots_promotes_and_the_fleet_changes(
    browser: Any, console: tuple[ServerThread, Coordinator], tmp_path: Path
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec

    server, coordinator = console
    _log_in(browser, server.url, coordinator.operator_token)
    _wait(browser, ec.presence_of_element_located((By.ID, "runs")))
    _shot(browser, "runs", tmp_path)

    # A finished run's plots render: each <img> decoded to a real bitmap.
    browser.find_element(By.LINK_TEXT, "exp1").click()
    plot = _wait(browser, ec.presence_of_element_located((By.ID, "plot-accuracy")))
    _wait(browser, lambda d: d.execute_script("return arguments[0].complete", plot))
    widths = browser.execute_script(
        "return [...document.querySelectorAll('#plots img')].map(i => i.naturalWidth)"
    )
    assert len(widths) == 5 and min(widths) > 100, widths
    _shot(browser, "run", tmp_path)

    # Promote v2 to stable in the registry page.
    browser.find_element(By.ID, "nav-registry").click()
    assert browser.find_element(By.ID, "channel-stable").text == "v1"
    browser.find_element(By.ID, "channel-for-v2").send_keys("stable")
    browser.find_element(By.ID, "promote-v2").click()
    _wait(browser, ec.text_to_be_present_in_element((By.ID, "channel-stable"), "v2"))
    assert "channel stable now serves v2" in browser.page_source
    _shot(browser, "registry", tmp_path)

    # The fleet page: cam-1 still runs v1, its channel now serves v2.
    browser.find_element(By.ID, "nav-fleet").click()
    row = _wait(browser, ec.presence_of_element_located((By.ID, "device-cam-1")))
    assert "v2" in row.find_element(By.CLASS_NAME, "target").text
    assert "update pending" in row.text
    _shot(browser, "fleet", tmp_path)

    browser.find_element(By.ID, "nav-sites").click()
    _wait(browser, ec.presence_of_element_located((By.ID, "sites")))
    _shot(browser, "sites", tmp_path)


def test_a_running_run_updates_live(
    browser: Any, console: tuple[ServerThread, Coordinator], tmp_path: Path
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec

    from fedge.shared.atomic import append_jsonl

    server, coordinator = console
    _log_in(browser, server.url, coordinator.operator_token)
    _wait(browser, ec.presence_of_element_located((By.LINK_TEXT, "exp2"))).click()
    _wait(browser, ec.text_to_be_present_in_element((By.ID, "live"), "round 1 of 4"))
    run_dir = tmp_path / "runs" / "exp2"
    append_jsonl(
        run_dir / "metrics.jsonl",
        {
            "round": 2,
            "clients": [client("site-a", 2, 2.0)],
            "server_eval": {"accuracy": 0.9},
            "epsilon": 2.0,
        },
    )
    # No reload: the page's script fetches the fragment and swaps it in.
    _wait(browser, ec.text_to_be_present_in_element((By.ID, "live"), "round 2 of 4"))


def test_a_device_token_is_refused(browser: Any, console: tuple[ServerThread, Coordinator]) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec

    server, coordinator = console
    _log_in(browser, server.url, coordinator.device_token)
    error = _wait(browser, ec.presence_of_element_located((By.ID, "login-error")))
    assert "not a valid operator token" in error.text
    assert browser.get_cookies() == []
    browser.get(f"{server.url}/console/fleet")
    assert browser.current_url.endswith("/console/login")
