"""A real headless Chromium for tests that drive the studio as a person would: Debian's ``chromium`` and
``chromium-driver`` packages, driven by Selenium.

``make install`` installs the two packages (``make browser``: apt-get, as root); ``chromium()`` installs them
itself when they are missing and the tests run as root on a Debian/Ubuntu machine, and otherwise fails saying
what to install. ``TUNEVEC_CHROMIUM`` / ``TUNEVEC_CHROMEDRIVER`` point at other binaries. Playwright's own browser
download is not used (it needs the internet at test time).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

PACKAGES = ("chromium", "chromium-driver")
WINDOW = (1440, 900)  # a laptop screen


def _binaries() -> tuple[str | None, str | None]:
    browser = (
        os.environ.get("TUNEVEC_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    )
    driver = os.environ.get("TUNEVEC_CHROMEDRIVER") or shutil.which("chromedriver")
    return browser, driver


def ensure_chromium() -> tuple[str, str]:
    """The Chromium and chromedriver binaries, installed with apt-get first if missing and allowed."""
    browser, driver = _binaries()
    if browser and driver:
        return browser, driver
    if os.geteuid() == 0 and shutil.which("apt-get"):
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        for cmd in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", *PACKAGES]):
            done = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if done.returncode != 0:
                pytest.fail(f"`{' '.join(cmd)}` failed ({done.returncode}):\n{done.stderr[-2000:]}")
        browser, driver = _binaries()
    if not (browser and driver):
        pytest.fail(
            "the studio's browser tests need Chromium and its driver: `sudo apt-get install chromium "
            "chromium-driver` (or `make browser`), or set TUNEVEC_CHROMIUM and TUNEVEC_CHROMEDRIVER"
        )
    return browser, driver


@contextlib.contextmanager
def chromium() -> Iterator[Any]:
    """A headless Chromium window of a laptop's size, its console log kept, its clipboard usable."""
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    browser, driver_path = ensure_chromium()
    options = Options()
    options.binary_location = browser
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                f"--window-size={WINDOW[0]},{WINDOW[1]}", "--disable-extensions", "--no-first-run"):  # fmt: skip
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        # the page's own viewport, exactly a laptop's (the window size includes the browser's own frame)
        driver.execute_cdp_cmd(
            "Emulation.setDeviceMetricsOverride",
            {"width": WINDOW[0], "height": WINDOW[1], "deviceScaleFactor": 1, "mobile": False},
        )
        driver.set_script_timeout(30)
        yield driver
    finally:
        driver.quit()


def console_errors(driver: Any, allowed: Callable[[dict], bool] = lambda e: False) -> list[dict]:
    """SEVERE entries of the page's console since the last call (JavaScript errors, failed requests)."""
    return [e for e in driver.get_log("browser") if e["level"] == "SEVERE" and not allowed(e)]


def wait_for(what: str, check: Callable[[], Any], timeout: float = 60, every: float = 0.2) -> Any:
    """``check()``'s first truthy value; fails naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last_exc: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = check()
            if value:
                return value
        except Exception as exc:  # the element may not be there yet
            last_exc = exc
        time.sleep(every)
    raise AssertionError(
        f"timed out after {timeout:.0f}s waiting for {what}" + (f" ({last_exc})" if last_exc else "")
    )


def screenshot(driver: Any, path: Path, full_page: bool = True) -> Path:
    """A PNG of the page (the whole page, not only the window, when ``full_page``)."""
    import base64

    path.parent.mkdir(parents=True, exist_ok=True)
    if full_page:
        size = driver.execute_script(
            "return [document.documentElement.scrollWidth, document.documentElement.scrollHeight]"
        )
        shot = driver.execute_cdp_cmd(
            "Page.captureScreenshot",
            {
                "format": "png",
                "captureBeyondViewport": True,
                "clip": {"x": 0, "y": 0, "width": size[0], "height": size[1], "scale": 1},
            },
        )
        path.write_bytes(base64.b64decode(shot["data"]))
    else:
        driver.save_screenshot(str(path))
    return path
