"""Browser pages of another origin calling the HTTP API (`--cors-origin`): preflights answered
without an API key, answers (errors included) readable by the allowed origin only, no CORS
header at all without the flag. Checked with raw HTTP and in a real headless Chromium, whose
page is served from a second port (another origin) and calls Volley with `fetch`."""

from __future__ import annotations

import asyncio
import functools
import http.server
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
import websockets
from conftest import ROOT, VolleyProcess, copy_shipped_models, free_port, serving
from playwright.sync_api import sync_playwright
from vision_scenes import encode, scene_image

CHROMIUM = Path("/usr/bin/chromium")
KEY = "page-key-0123456789"
TIMEOUT = 30
FRAUD_REQUEST = {
    "inputs": [{"name": "features", "datatype": "FP32", "shape": [1, 17], "data": [0.0] * 17}]
}


@pytest.fixture(scope="module")
def pages(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """Two static sites on loopback, each its own origin: 'allowed' and 'other'."""
    folder = tmp_path_factory.mktemp("site")
    (folder / "app.html").write_text("<!doctype html><title>app</title><p>app</p>")
    (folder / "street.jpg").write_bytes(encode(scene_image(501, (320, 240), 2.0).image, ".jpg"))
    handler = functools.partial(_QuietHandler, directory=str(folder))
    servers = {name: http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
               for name in ("allowed", "other")}  # fmt: skip
    for site in servers.values():
        threading.Thread(target=site.serve_forever, daemon=True).start()
    yield {name: f"http://127.0.0.1:{site.server_port}" for name, site in servers.items()}
    for site in servers.values():
        site.shutdown()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def volley(
    tmp_path_factory: pytest.TempPathFactory, pages: dict[str, str]
) -> Iterator[VolleyProcess]:
    base = tmp_path_factory.mktemp("cors")
    keys = base / "keys.yaml"
    keys.write_text(f"keys:\n  - {{name: page, key: {KEY}, scope: infer}}\n")
    flags = ("--cors-origin", pages["allowed"], "--api-keys", str(keys))
    with serving(copy_shipped_models(base), *flags) as proc:
        yield proc


def preflight(url: str, origin: str, method: str = "POST") -> requests.Response:
    headers = {
        "Origin": origin,
        "Access-Control-Request-Method": method,
        "Access-Control-Request-Headers": "authorization, content-type",
    }
    return requests.options(url, headers=headers, timeout=TIMEOUT)


def test_a_preflight_from_the_allowed_origin_is_answered_without_a_key(
    volley: VolleyProcess, pages: dict[str, str]
) -> None:
    for path in ("/v2/models/fraud/infer", "/v2/models/detect/infer", "/v2/models/fraud"):
        answer = preflight(volley.url + path, pages["allowed"])
        assert answer.status_code == 204, (path, answer.text)
        assert answer.headers["access-control-allow-origin"] == pages["allowed"]
        assert "POST" in answer.headers["access-control-allow-methods"]
        allowed = answer.headers["access-control-allow-headers"]
        assert "authorization" in allowed and "content-type" in allowed
    refused = preflight(volley.url + "/v2/models/fraud/infer", pages["other"])
    assert refused.status_code == 403 and "may not call" in refused.json()["error"]
    assert "access-control-allow-origin" not in refused.headers


def test_answers_name_the_allowed_origin_only(volley: VolleyProcess, pages: dict[str, str]) -> None:
    auth = {"Authorization": f"Bearer {KEY}"}
    infer = volley.url + "/v2/models/fraud/infer"
    for origin, expected in ((pages["allowed"], pages["allowed"]), (pages["other"], None)):
        headers = {**auth, "Origin": origin}
        answered = requests.post(infer, json=FRAUD_REQUEST, headers=headers, timeout=TIMEOUT)
        control = requests.get(volley.url + "/v2/models/fraud", headers=headers, timeout=TIMEOUT)
        keyless = {"Origin": origin}
        no_key = requests.post(infer, json=FRAUD_REQUEST, headers=keyless, timeout=TIMEOUT)
        assert (answered.status_code, control.status_code, no_key.status_code) == (200, 200, 401)
        for answer in (answered, control, no_key):  # the fast path, FastAPI, an error
            assert answer.headers.get("access-control-allow-origin") == expected, answer.url
        if expected:
            assert (
                "inference-header-content-length"
                in answered.headers["access-control-expose-headers"]
            )
    plain = requests.post(infer, json=FRAUD_REQUEST, headers=auth, timeout=TIMEOUT)
    assert plain.status_code == 200 and "access-control-allow-origin" not in plain.headers


def test_without_the_flag_no_cors_header_is_sent(tmp_path: Path, pages: dict[str, str]) -> None:
    with serving(copy_shipped_models(tmp_path)) as proc:
        asked = preflight(proc.url + "/v2/models/fraud/infer", pages["allowed"])
        answered = requests.post(proc.url + "/v2/models/fraud/infer", json=FRAUD_REQUEST,
                                 headers={"Origin": pages["allowed"]}, timeout=TIMEOUT)  # fmt: skip
    assert answered.status_code == 200
    for answer in (asked, answered):
        assert not any(h.startswith("access-control-") for h in answer.headers), answer.headers


def test_an_origin_that_is_not_one_stops_the_server_at_once() -> None:
    run = subprocess.run(
        [sys.executable, "-m", "server", "serve", "--cors-origin", "app.example/x",
         "--model-repository", str(ROOT / "models"), "--http-port", str(free_port())],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert run.returncode == 2 and "is not an origin" in run.stderr, run.stderr


def test_a_websocket_from_another_origin_is_refused(
    volley: VolleyProcess, pages: dict[str, str]
) -> None:
    """Browsers apply no CORS to WebSockets: the server checks the Origin itself."""
    url = f"ws://{volley.http}/v2/models/detect/stream?api_key={KEY}"

    async def handshake(origin: str | None) -> int:
        try:
            async with websockets.connect(url, origin=origin, open_timeout=TIMEOUT):
                return 101
        except websockets.InvalidStatus as refused:
            return refused.response.status_code

    for origin, status in (
        (None, 101),  # not a browser
        (f"http://{volley.http}", 101),  # the server's own page (/camera)
        (pages["allowed"], 101),
        (pages["other"], 403),
        ("http://evil.example", 403),
    ):
        assert asyncio.run(handshake(origin)) == status, origin


FETCHES = """async ([volley, key]) => {
    const auth = {Authorization: `Bearer ${key}`};
    const image = await (await fetch('/street.jpg')).blob();
    const detect = await fetch(`${volley}/v2/models/detect/infer?score_threshold=0.3`, {
        method: 'POST', body: image, headers: {...auth, 'Content-Type': 'image/jpeg'}});
    const fraud = await fetch(`${volley}/v2/models/fraud/infer`, {method: 'POST',
        headers: {...auth, 'Content-Type': 'application/json'},
        body: JSON.stringify({inputs: [{name: 'features', datatype: 'FP32', shape: [1, 17],
                                        data: Array(17).fill(0)}]})});
    const wrongKey = await fetch(`${volley}/v2/models/fraud`,
                                 {headers: {Authorization: 'Bearer wrong'}});
    return {detect: [detect.status, await detect.json()],
            fraud: [fraud.status, await fraud.json()],
            wrongKey: [wrongKey.status, await wrongKey.json()]};
}"""

REFUSED_FETCH = """async ([volley, key]) => {
    try {
        await fetch(`${volley}/v2/models/fraud`, {headers: {Authorization: `Bearer ${key}`}});
        return 'read';
    } catch (error) {
        return `refused: ${error.name}`;
    }
}"""


def test_a_page_of_the_allowed_origin_calls_volley_from_chromium(
    volley: VolleyProcess, pages: dict[str, str]
) -> None:
    """The browser enforces CORS: the allowed page reads detections, fraud scores and a 401's
    message; a page of another origin cannot read anything."""
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: install Debian's chromium (apt-get install chromium)")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        try:
            page = browser.new_page()
            page.goto(pages["allowed"] + "/app.html")
            got = page.evaluate(FETCHES, [volley.url, KEY])
            page.goto(pages["other"] + "/app.html")
            refused = page.evaluate(REFUSED_FETCH, [volley.url, KEY])
        finally:
            browser.close()
    status, doc = got["detect"]
    assert status == 200 and doc["width"] == 640 and doc["detections"], got["detect"]
    status, doc = got["fraud"]
    assert status == 200 and {o["name"] for o in doc["outputs"]} == {"score", "is_fraud"}
    assert got["wrongKey"][0] == 401 and "error" in got["wrongKey"][1]
    assert refused == "refused: TypeError"
