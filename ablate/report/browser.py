"""Headless Chromium for the report's tests and ``ablate bench report``: the system browser
(Debian's ``chromium`` and ``chromium-driver``), driven by Selenium, never a downloaded one.

:func:`missing` says why no browser can be driven here (None when one can); :func:`chromium`
starts one (a context manager) with the browser console captured; :func:`load_report` opens a
report's ``index.html`` from ``file://`` and times it until the page says it is drawn.
"""
from __future__ import annotations

import contextlib
import shutil
import time
from pathlib import Path
from typing import Any, Iterator, Optional

INSTALL = "apt-get install -y chromium chromium-driver"
BINARIES = ("chromium", "chromium-browser", "google-chrome")


def _which(names: tuple[str, ...]) -> Optional[str]:
    for name in names:
        found = shutil.which(name)
        if found:
            return found
    return None


def missing() -> Optional[str]:
    """Why headless Chromium cannot be driven here (naming the install), or None."""
    if _which(BINARIES) is None:
        return f"no Chromium on PATH; install it with `{INSTALL}`"
    if shutil.which("chromedriver") is None:
        return f"no chromedriver on PATH; install it with `{INSTALL}`"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed; `pip install -e \".[test]\"`"
    return None


@contextlib.contextmanager
def chromium(width: int = 1400, height: int = 1000) -> Iterator[Any]:
    """A headless Chromium WebDriver (system binary and driver; the console log kept at every
    level), quit on exit. Raises RuntimeError with :func:`missing`'s reason when there is none."""
    why = missing()
    if why:
        raise RuntimeError(why)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = _which(BINARIES)
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--no-first-run", "--disable-extensions", "--disable-background-networking",
                f"--window-size={width},{height}"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=opts)
    try:
        driver.set_page_load_timeout(60)
        yield driver
    finally:
        driver.quit()


def wait_for(driver: Any, script: str, timeout: float = 10.0) -> Any:
    """Poll ``return <script>`` until it is truthy; its value, or TimeoutError naming it."""
    end = time.monotonic() + timeout
    while True:
        value = driver.execute_script("return " + script)
        if value:
            return value
        if time.monotonic() > end:
            raise TimeoutError(f"page: `{script}` still false after {timeout:.0f} s")
        time.sleep(0.02)


def load_report(driver: Any, index: Path, hash_: str = "") -> float:
    """Open ``index`` (``file://``, with ``#hash_``) and wait until the page has drawn its first
    view; return the milliseconds from navigation start to drawn, as the page measured them."""
    driver.get("about:blank")  # a new document even when only the #hash differs from the last
    driver.get(Path(index).resolve().as_uri() + (f"#{hash_}" if hash_ else ""))
    return float(wait_for(driver, "document.body.getAttribute('data-ready') && window.ABLATE_READY_MS", 30))
