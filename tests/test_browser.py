"""The report in a real browser: headless Chromium renders it with no console message and draws its plots.

Chromium is Debian's `chromium` package (`.ci/run` installs it). Without it the tests skip, except under
CI=true, where they fail: CI cannot pass them silently.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vqgen.core.report.figures import TEST, TRAIN

pytest.importorskip("matplotlib")

CHROMIUM = next((shutil.which(name) for name in ("chromium", "chromium-browser") if shutil.which(name)), None)


@pytest.fixture
def browser() -> str:
    if CHROMIUM is None:
        if os.environ.get("CI") == "true":
            pytest.fail("chromium is not installed, so the report was not checked in a browser (.ci/run installs it)")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    return CHROMIUM


def render(browser: str, page: Path, shot: Path, size: tuple[int, int] = (1250, 1500)) -> list[str]:
    """Screenshot `page` into `shot`; return the console messages the page produced (errors, failed loads)."""
    result = subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
         f"--user-data-dir={shot.parent / 'chromium-profile'}", f"--window-size={size[0]},{size[1]}",
         "--enable-logging=stderr", "--v=0", f"--screenshot={shot}", page.as_uri()],
        capture_output=True, text=True, timeout=180)
    assert shot.is_file(), f"chromium wrote no screenshot (exit {result.returncode}): {result.stderr[-2000:]}"
    return [line for line in result.stderr.splitlines() if ":CONSOLE" in line]


def inked(shot: Path) -> float:
    """The share of the screenshot's pixels that are not (near) white."""
    grey = Image.open(shot).convert("L")
    return sum(grey.histogram()[:240]) / (grey.width * grey.height)


def pixels_near(shot: Path, colour: str, tolerance: int = 40) -> int:
    """How many pixels are within `tolerance` (each channel) of the hex `colour`."""
    target = np.array([int(colour[i:i + 2], 16) for i in (1, 3, 5)])
    pixels = np.asarray(Image.open(shot).convert("RGB"), dtype=np.int16)  # (H, W, 3)
    return int((np.abs(pixels - target) <= tolerance).all(axis=-1).sum())


def test_report_renders_without_console_messages(browser, tiny_run, tmp_path):
    from vqgen.core.report.page import write_report

    page = write_report(tiny_run, tmp_path / "report.html")
    shot = tmp_path / "report.png"
    assert render(browser, page, shot) == []
    assert inked(shot) > 0.05                                               # not a blank page
    assert pixels_near(shot, TRAIN) > 200 and pixels_near(shot, TEST) > 50  # the curves were drawn


def test_the_check_sees_a_script_error_and_a_blank_page(browser, tmp_path):
    """The test above can fail: a page with a script error, or one that shows nothing, is caught. (A failed
    load does not reach Chromium's console log: `test_report.py` checks that nothing is loaded from elsewhere.)"""
    cases = {
        "error": "<p>text</p><script>undefined_function();</script>",
        "logged": "<p>text</p><script>console.error('plot missing');</script>",
        "blank": "",
    }
    for name, body in cases.items():
        page = tmp_path / f"{name}.html"
        page.write_text(f"<!DOCTYPE html><html><head><link rel='icon' href='data:,'></head><body>{body}</body></html>")
        messages = render(browser, page, tmp_path / f"{name}.png")
        if name == "error":
            assert any("undefined_function is not defined" in m for m in messages), messages
        elif name == "logged":
            assert any("plot missing" in m for m in messages), messages
        else:
            assert messages == [] and inked(tmp_path / f"{name}.png") < 0.001
