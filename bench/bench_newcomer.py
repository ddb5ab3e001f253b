"""Benchmark: a newcomer's time from the README's run command to the first heatmap.

Clones this repository (its committed HEAD) into a temporary folder and, as a newcomer would,
runs `make run` there, opens the app in headless Chromium, clicks "Explore" and waits until the
token heatmap of the first MBPP example is on screen. Twice:

- cold: nothing set up (no virtualenv, no dequantized model, empty score cache; pip's own
  download cache disabled, so every package is fetched or unpacked again);
- warm: the same command again in the same clone (setup stamp, model and scores cached).

Reported per run: seconds until the server answers, and until the heatmap shows. The warm /
cold ratio is the figure to compare across machines. Screenshots go beside the printout.

Run: ``.venv/bin/python bench/bench_newcomer.py [--out DIR]`` (needs Debian's chromium).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
DEFAULT_LIMIT = 50  # the sidebar's default selection: the first 50 MBPP train examples
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_server(port: int, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"make run exited with {proc.returncode} before serving")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise SystemExit("the app did not start in time")


def first_heatmap(url: str, shot: Path, started: float) -> tuple[float, float]:
    """Seconds from `started` until the first heatmap shows, and until all of the default
    selection's examples are scored (the page's caption reads "50 scored")."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(url)
        page.get_by_test_id("stSidebarNav").get_by_role("link", name="Explore").click()
        page.locator("span.pl-t").first.wait_for(timeout=20 * 60_000)
        heatmap = time.monotonic() - started
        page.screenshot(path=str(shot))
        page.get_by_text(f"{DEFAULT_LIMIT} scored (").wait_for(timeout=20 * 60_000)
        complete = time.monotonic() - started
        page.screenshot(path=str(shot.with_name(shot.stem + "-complete.png")))
        browser.close()
    return heatmap, complete


def one_run(repo: Path, env: dict[str, str], name: str, out: Path) -> tuple[float, float, float]:
    port = free_port()
    log = open(out / f"newcomer-{name}.log", "w")  # noqa: SIM115
    started = time.monotonic()
    proc = subprocess.Popen(
        ["make", "run", f"PORT={port}"],
        cwd=repo,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        wait_for_server(port, proc, timeout=30 * 60)
        served = time.monotonic() - started
        heatmap, complete = first_heatmap(
            f"http://127.0.0.1:{port}", out / f"newcomer-{name}.png", started
        )
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
        log.close()
    return served, heatmap, complete


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "bench" / "out"), help="logs, screenshots")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="plens-newcomer-") as tmp:
        repo = Path(tmp) / "perplexity-lens"
        subprocess.run(["git", "clone", "--quiet", str(ROOT), str(repo)], check=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PLENS_", "VIRTUAL_ENV"))}
        env.update(PLENS_CACHE_DIR=str(Path(tmp) / "cache"), PIP_NO_CACHE_DIR="1")
        rows = [(name, *one_run(repo, env, name, out)) for name in ("cold", "warm")]
    print(
        f"# newcomer: `make run` -> first heatmap, {dt.date.today()}, {platform.node()}, "
        f"{os.cpu_count()} cores, Python {sys.version.split()[0]}"
    )
    print(
        f"| run | server answers (s) | first heatmap on screen (s) | all {DEFAULT_LIMIT} scored (s) |"
    )
    print("|---|---:|---:|---:|")
    for name, served, heatmap, complete in rows:
        print(f"| {name} | {served:.0f} | {heatmap:.0f} | {complete:.0f} |")
    print(f"warm / cold (first heatmap): {rows[1][2] / rows[0][2]:.2f}")


if __name__ == "__main__":
    main()
