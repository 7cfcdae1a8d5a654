"""The browser camera page (`GET /camera`) in real headless Chromium with a fake camera.

Chromium plays a video of synthetic digit scenes as its camera; the page streams the frames over
the WebSocket to the `detect` pipeline of the shipped repository and draws the boxes it gets back.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from conftest import copy_shipped_models, serving
from fake_camera import write_y4m
from metrics_scrape import scrape, total
from playwright.sync_api import sync_playwright

CHROMIUM = Path("/usr/bin/chromium")
WIDTH, HEIGHT = 320, 240
RESULTS_WANTED = 5
WAIT_MS = 60_000  # a 2-core machine runs the browser, the server and the detector


def chromium_args(video: Path) -> list[str]:
    return [
        "--use-fake-device-for-media-stream",
        "--use-fake-ui-for-media-stream",
        f"--use-file-for-fake-video-capture={video}",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--no-first-run",
        "--disable-sync",
    ]


def test_camera_page_streams_frames_and_draws_boxes(tmp_path: Path) -> None:
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: install Debian's chromium (apt-get install chromium)")
    video = write_y4m(tmp_path / "camera.y4m", size=(WIDTH, HEIGHT))
    repository = copy_shipped_models(tmp_path)
    with serving(repository) as server, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=chromium_args(video))
        try:
            page = browser.new_page()
            problems: list[str] = []
            page.on("pageerror", lambda error: problems.append(f"uncaught: {error}"))
            page.on(
                "console",
                lambda m: problems.append(f"console: {m.text}") if m.type == "error" else None,
            )
            page.goto(f"{server.url}/camera?model=detect")
            try:
                page.wait_for_function(
                    """n => window.volley && volley.processed >= n && volley.boxesDrawn > 0
                           && volley.lastDetections.length > 0""",
                    arg=RESULTS_WANTED,
                    timeout=WAIT_MS,
                )
            except Exception as error:
                state = page.evaluate("JSON.stringify(window.volley)")
                status = page.locator("#status").text_content()
                raise AssertionError(
                    f"{error}\nstate={state}\nstatus={status}\n{problems}\n{server.log()[-3000:]}"
                ) from error
            state = page.evaluate("window.volley")
            screenshot = tmp_path / "camera-page.png"
            page.screenshot(path=str(screenshot))
        finally:
            browser.close()
        samples = scrape(f"http://127.0.0.1:{server.metrics_port}/metrics")

    assert not problems, problems
    assert state["connected"] is True
    assert state["lastSize"] == [WIDTH, HEIGHT]
    for detection in state["lastDetections"]:
        x1, y1, x2, y2 = detection["box"]
        assert -1 <= x1 < x2 <= WIDTH + 1 and -1 <= y1 < y2 <= HEIGHT + 1, detection
        assert detection["class_name"] in {str(digit) for digit in range(10)}, detection
        assert detection["class_id"] == int(detection["class_name"]), detection
        assert 0 < detection["score"] <= 1, detection
    assert state["boxesDrawn"] >= len(state["lastDetections"])
    assert state["errors"] == 0, state
    latency = state["latencyMs"]
    assert isinstance(latency, int | float) and math.isfinite(latency) and latency > 0, latency
    png = screenshot.read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 20_000, len(png)
    assert total(samples, "volley_frames_total", model="detect", outcome="processed") > 0
