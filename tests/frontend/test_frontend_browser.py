"""The demo page in a real headless Chromium: ``streamlit run frontend.py`` against a running server."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import running_server
from support import wait_until

from policy_server.gateway.app import build_app
from policy_server.net import free_port
from policy_server.settings import Settings

REPO = Path(__file__).resolve().parents[2]
ARTIFACT = REPO / "artifacts" / "frontend.png"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-quic"]
KEY = "browser-key"


def wait_healthy(url: str, process: subprocess.Popen[bytes], log: Path, timeout_s: float = 60) -> None:
    def healthy() -> bool:
        if process.poll() is not None:
            pytest.fail(f"streamlit exited with {process.returncode}:\n{log.read_text(errors='replace')[-3000:]}")
        try:
            return httpx.get(f"{url}/_stcore/health", timeout=2).status_code == 200
        except httpx.TransportError:
            return False  # not listening yet

    wait_until(healthy, timeout_s, 0.2, lambda: f"streamlit not healthy:\n{log.read_text(errors='replace')[-3000:]}")


@pytest.fixture()
def urls(tmp_path: Path) -> Iterator[tuple[str, str]]:
    """The bundled example served (local backend), and the demo page pointed at it."""
    app = build_app(Settings(schema_path=REPO / "schema.yaml", backend="local", gateway_metrics_port=0,
                             api_key=KEY, seed=0))
    with running_server(app) as server_url:
        port = free_port()
        env = {**os.environ, "POLICY_SERVER_URL": server_url, "POLICY_SERVER_API_KEY": KEY}
        log = tmp_path / "streamlit.log"
        cmd = [sys.executable, "-m", "streamlit", "run", "frontend.py", "--server.headless", "true",
               "--server.port", str(port), "--server.address", "127.0.0.1",
               "--browser.gatherUsageStats", "false", "--server.fileWatcherType", "none"]
        with log.open("wb") as out:
            process = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            url = f"http://127.0.0.1:{port}"
            wait_healthy(url, process, log)
            yield server_url, url
        finally:
            process.terminate()
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)


def test_the_page_predicts_in_a_real_browser(urls: tuple[str, str], tmp_path: Path) -> None:
    server_url, demo_url = urls
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: install the Debian package with `apt-get install -y chromium` "
                    "(.ci/packages.txt lists it)")
    try:
        from playwright.sync_api import expect, sync_playwright
    except ImportError:
        pytest.fail("playwright is missing: `pip install -r requirements.txt` (never `playwright install`)")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1100})
            page.goto(demo_url)
            coordinates = page.get_by_label("coordinates_0")
            expect(coordinates).to_be_visible(timeout=30_000)
            coordinates.fill("3")
            coordinates.press("Tab")
            page.get_by_text("is_up_free", exact=True).click()
            expect(page.get_by_role("checkbox", name="is_up_free")).to_be_checked()
            page.get_by_role("button", name="Predict").click()
            expect(page.get_by_text("Predicted action")).to_be_visible(timeout=30_000)
            values = page.get_by_test_id("stMetricValue")
            expect(values).to_have_count(3)
            action, probability, version = (v.strip() for v in values.all_inner_texts())
            expect(page.locator("[data-testid='stVegaLiteChart'] canvas, [data-testid='stVegaLiteChart'] svg")
                   .first).to_be_visible(timeout=30_000)
            page.wait_for_timeout(500)  # the chart's first paint
            shot = page.screenshot(full_page=True)
        finally:
            browser.close()
    sent = {"id": 0, "coordinates_0": 3, "coordinates_1": 0} | {
        f"{kind}_{side}_{what}": False for side in ("up", "right", "down", "left")
        for kind, what in (("has", "neighbour"), ("is", "free"))
    } | {"is_up_free": True}
    expected = httpx.post(f"{server_url}/distribution", json=sent, headers={"access-token": KEY}).json()
    name = action.split(" ")[0]
    assert action == f"{name} ({['up', 'right', 'down', 'left'].index(name)})" and version == "0", (action, version)
    assert probability == f"{expected['probabilities'][name]:.3f}"  # the page sent the values typed in
    for path in (ARTIFACT, tmp_path / "frontend.png"):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(shot)
        assert path.stat().st_size > 10_000 and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
