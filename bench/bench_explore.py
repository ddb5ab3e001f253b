"""How fast the Explore page shows a 1,000-token response (target: well under a second).

A real ~1,000-token response (MBPP reference solutions joined into one answer) is scored by the
embedded model, then timed three ways:

1. Python: `render_token_heatmap` building the HTML (median of 30).
2. Browser, isolated: headless Chromium inserting that HTML into a page and laying it out and
   painting it, against the same text as a plain escaped `<pre>` (the baseline, same run).
3. In the app: a Streamlit server with the Explore page on a file holding a short and the long
   example; time from clicking "Next" (short -> long) until all heatmap token spans are in the
   DOM, against the same click towards the short example (baseline, same run). Scores come from
   the cache, as on every widget change.

Usage: .venv/bin/python bench/bench_explore.py [--port 8622] [--repeats 7]
"""

from __future__ import annotations

import argparse
import html
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.machine import cpu_name  # noqa: E402
from core.data.records import Example  # noqa: E402
from core.data.tasks import load_task  # noqa: E402
from core.model.loading import load_model  # noqa: E402
from core.scoring.score import score_examples  # noqa: E402
from core.viz.heatmap import render_token_heatmap  # noqa: E402

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TARGET_TOKENS = 1000


def long_and_short_examples(lm) -> list[Example]:
    """A short MBPP example and one whose response is about TARGET_TOKENS tokens of real code."""
    tasks = load_task("mbpp", split="train").examples
    parts, n_tokens = [], 0
    for ex in tasks:
        parts.append(ex.response.replace("\r\n", "\n"))
        n_tokens += len(lm.tokenizer(ex.response, add_special_tokens=False)["input_ids"]) + 2
        if n_tokens >= TARGET_TOKENS:
            break
    prompt = "Write Python functions for the following tasks, one after the other."
    return [
        Example(id="short", prompt=tasks[0].prompt, response=tasks[0].response),
        Example(id="long", prompt=prompt, response="\n\n".join(parts)),
    ]


def median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(1000 * (time.perf_counter() - start))
    return statistics.median(times)


_PAINT_JS = """async (markup) => {
  const root = document.getElementById('root');
  root.innerHTML = '';
  await new Promise(r => requestAnimationFrame(() => r()));
  const t0 = performance.now();
  root.innerHTML = markup;
  root.getBoundingClientRect();
  await new Promise(r => requestAnimationFrame(() => setTimeout(r, 0)));
  return performance.now() - t0;
}"""


def browser_render_ms(markup: str, repeats: int) -> float:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_content("<html><body><div id='root'></div></body></html>")
        times = [page.evaluate(_PAINT_JS, markup) for _ in range(repeats + 1)][1:]
        browser.close()
    return statistics.median(times)


def _wait_port(port: int, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError("streamlit did not start")


def in_app_ms(data: Path, n_long: int, port: int, repeats: int, cache: Path) -> tuple[float, float]:
    """Median ms from a Next/Previous click to the new heatmap: (to long, to short)."""
    from playwright.sync_api import sync_playwright

    env = dict(os.environ, PLENS_CACHE_DIR=str(cache), HF_HUB_OFFLINE="1")
    cmd = [
        sys.executable,
        "-m",
        "streamlit",
        "run",
        "app.py",
        "--server.port",
        str(port),
        "--server.headless",
        "true",
        "--server.address",
        "127.0.0.1",
        "--server.fileWatcherType",
        "none",
    ]
    server = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        _wait_port(port)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(
                f"http://127.0.0.1:{port}/explore?model=default&kind=file&data={data}"
                "&limit=2&ex=short"
            )
            page.locator("span.pl-t").first.wait_for(timeout=600_000)
            to_long, to_short = [], []
            for _ in range(repeats):
                for button, wanted, out in (
                    ("Next", n_long, to_long),
                    ("Previous", None, to_short),
                ):
                    page.wait_for_timeout(500)
                    start = time.perf_counter()
                    page.get_by_role("button", name=button).first.click()
                    if wanted is None:
                        page.wait_for_function(
                            "document.querySelectorAll('span.pl-t').length > 0 && "
                            f"document.querySelectorAll('span.pl-t').length < {n_long}"
                        )
                    else:
                        page.wait_for_function(
                            f"document.querySelectorAll('span.pl-t').length === {wanted}"
                        )
                    out.append(1000 * (time.perf_counter() - start))
            browser.close()
    finally:
        server.terminate()
        server.wait(timeout=20)
    return statistics.median(to_long), statistics.median(to_short)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8622)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()

    lm = load_model("default", device="cpu", dtype="float32")
    examples = long_and_short_examples(lm)
    scored = {ex.id: ex for ex in score_examples(lm, examples).examples}
    long = scored["long"]
    markup = render_token_heatmap(long, tau=2.5)
    plain = f"<pre>{html.escape(long.prompt + long.response)}</pre>"
    print(
        f"machine: {cpu_name()}, {os.cpu_count()} cores, "
        f"load average {os.getloadavg()[0]:.1f}, {time.strftime('%Y-%m-%d')}"
    )
    print(f"long response: {long.n_response} tokens, HTML {len(markup) / 1e3:.0f} kB")

    render = median_ms(lambda: render_token_heatmap(long, tau=2.5), 30)
    print(f"python render_token_heatmap: {render:.1f} ms")
    heat_ms = browser_render_ms(markup, args.repeats)
    pre_ms = browser_render_ms(plain, args.repeats)
    print(
        f"browser insert + layout + paint: heatmap {heat_ms:.1f} ms, plain <pre> {pre_ms:.1f} ms "
        f"(heatmap / plain = {heat_ms / pre_ms:.1f}x)"
    )

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "long.jsonl"
        data.write_text("".join(json.dumps(ex.to_dict()) + "\n" for ex in examples))
        to_long, to_short = in_app_ms(
            data, long.n_response, args.port, args.repeats, Path(tmp) / "cache"
        )
    print(
        f"in app, click to heatmap on screen: {long.n_response}-token example {to_long:.0f} ms, "
        f"{scored['short'].n_response}-token example {to_short:.0f} ms "
        f"(long / short = {to_long / to_short:.2f}x)"
    )


if __name__ == "__main__":
    main()
