"""Browser end-to-end test of the main workflow: the real app, the embedded model, headless
Chromium driven by Playwright. Screenshots are kept in test-artifacts/ for people to look at.

Locally the test is skipped when Chromium is missing; in CI (CI=true) a missing browser fails.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.integration]

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def app_url(tmp_path_factory):
    if not Path(CHROMIUM).exists():
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed; scripts/setup.sh --dev installs it")
        pytest.skip("chromium not installed")
    from tests.conftest import SHARED_EMBEDDED_DIR

    port = _free_port()
    env = dict(
        os.environ,
        PLENS_CACHE_DIR=str(tmp_path_factory.mktemp("e2e-cache")),
        PLENS_EMBEDDED_DIR=str(SHARED_EMBEDDED_DIR),
        HF_HUB_OFFLINE="1",
    )
    log = open(tmp_path_factory.mktemp("e2e-log") / "streamlit.log", "w")  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", "app.py", "--server.port", str(port),
         "--server.headless", "true", "--server.address", "127.0.0.1"],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                break
        except OSError:
            time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail("streamlit did not start")
    yield f"http://127.0.0.1:{port}"
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


@pytest.fixture(scope="module")
def page(app_url):
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        pg = browser.new_page(viewport={"width": 1400, "height": 1000})
        yield pg
        browser.close()


def _shot(page, name: str) -> None:
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def test_explore_shows_heatmap_and_tau_changes_share(page, app_url):
    page.goto(f"{app_url}/explore?model=default&task=mbpp&split=train&limit=4")
    spans = page.locator("span.pl-t")
    spans.first.wait_for(timeout=240_000)
    _shot(page, "01-explore-heatmap")
    assert spans.count() > 10
    ppl = [float(v) for v in spans.evaluate_all("els => els.map(e => e.dataset.ppl)")]
    assert all(v >= 1.0 for v in ppl)
    high_before = page.locator("span.pl-t.pl-hi").count()
    assert high_before == sum(v > 2.5 for v in ppl)

    slider = page.get_by_role("slider").first
    slider.focus()
    for _ in range(30):  # τ 2.5 -> 5.5 in 0.1 steps
        page.keyboard.press("ArrowRight")
    page.wait_for_timeout(500)
    page.wait_for_function(
        f"document.querySelectorAll('span.pl-t.pl-hi').length < {high_before}", timeout=60_000
    )
    _shot(page, "02-explore-tau-moved")
    tau = float(page.get_by_test_id("stSliderThumbValue").first.inner_text())
    assert tau == pytest.approx(5.5)
    assert page.locator("span.pl-t.pl-hi").count() == sum(v > tau for v in ppl)
    # the app's own navigation is in place even on a fresh server opened on a page URL
    assert page.get_by_role("link", name="Start").count() >= 1
