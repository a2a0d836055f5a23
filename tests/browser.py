"""A real headless Chromium (Debian's chromium and chromium-driver), driven by Selenium, for
the dashboard's browser test and benchmark. ``.ci/system-packages`` installs both when
missing; where they still are, :func:`skip_reason` says so and the test is skipped."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
#: As the machine's own probe starts it: no GPU, no sandbox as root, and nothing that phones
#: home (this machine's closed network refuses those connections, many at a time).
FLAGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--window-size=1400,2000",
)


def skip_reason() -> str | None:
    """Why the browser test cannot run here, or None."""
    for path, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if shutil.which(path) is None:
            return f"{path} missing (Debian package {package}; .ci/system-packages installs it)"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium missing (pip install -e .[test])"
    return None


@contextmanager
def chrome() -> Iterator[Any]:
    """A headless Chromium with its own empty profile, quit on exit."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in FLAGS:
        options.add_argument(flag)
    with tempfile.TemporaryDirectory(prefix="mtor-chromium-") as profile:
        options.add_argument(f"--user-data-dir={profile}")
        # The driver's path is given: Selenium Manager (which downloads drivers) never runs.
        driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
        try:
            driver.set_page_load_timeout(30)
            yield driver
        finally:
            driver.quit()


def wait_for(driver: Any, script: str, timeout: float = 30.0) -> Any:
    """Run ``script`` (a JavaScript expression's ``return``) until it returns something
    truthy; return that (fails with the last value on timeout)."""
    from selenium.webdriver.support.ui import WebDriverWait

    last: list[Any] = [None]

    def check(d: Any) -> Any:
        last[0] = d.execute_script(script)
        return last[0]

    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.1).until(check)
    except Exception as exc:
        raise AssertionError(f"{script!r} still {last[0]!r} after {timeout} s") from exc
