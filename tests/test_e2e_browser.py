"""Browser end-to-end test of the whole workflow on the real app, the embedded model and headless
Chromium driven by Playwright, in the order a user goes:

Start (pick the default model and MBPP) -> Explore (heatmap, τ highlights) -> Masking studio
(τ changes the masked share) -> Train (a tiny job with evaluation every step) -> Runs (the live
charts gain points, drift from the base model among them) -> Where it forgot (the tokens that
moved, with base vs tuned top-5) -> Compare & report (download a self-contained HTML report) -> Reproduce
the paper (the protocol's launch form and command).

The tests share one app server and one browser page and run in file order, one step handing the
next what it made; each also runs alone (`-k compare`): fixtures make the selection, start the
tiny training job and wait for it, when no earlier step did. Screenshots of every step go to $PLENS_ARTIFACTS_DIR (default tests/artifacts/) for people to look at.
Locally the test is skipped when Chromium is missing; in CI (CI=true) a missing browser fails.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.integration]

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = Path(os.environ.get("PLENS_ARTIFACTS_DIR") or ROOT / "tests" / "artifacts")
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
N_EXAMPLES = 4  # sidebar "Examples (first N)": what Explore, the studio and training use
MAX_STEPS = 2  # training steps; evaluation runs at step 0 (base model) and after every step
SLOW = 240_000  # ms: model loading, scoring and training on 2 busy CPU cores
JOB = 600_000  # ms: the whole training job (three evaluation rounds, two steps)

# What each plotly chart of the Runs page drew, by chart key (`runs-chart-<name>`, the
# `st-key-...` class of its container): the points of its runs' lines, how many lines and how many
# interval bands (the builders' `meta.role`). `_fullData` holds the decoded arrays plotly drew.
CHART_POINTS_JS = """() => {
  const out = {};
  document.querySelectorAll('[class*="st-key-runs-chart-"]').forEach(box => {
    const key = [...box.classList].find(c => c.startsWith('st-key-')).slice(7);
    const plot = box.querySelector('.js-plotly-plot');
    const traces = plot ? (plot._fullData || []) : [];
    const role = r => traces.filter(t => ((t._input || t).meta || {}).role === r);
    out[key] = {
      points: role('line').reduce((n, t) => n + ((t.x || []).length), 0),
      lines: role('line').length,
      bands: role('band').length,
    };
  });
  return out;
}"""


def _free_port() -> int:
    wanted = os.environ.get("PLENS_E2E_PORT")  # a fixed port when the machine is shared
    if wanted:
        return int(wanted)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def app_env() -> dict:
    """The environment the app server runs in (its runs folder: where a test reads a job)."""
    return {}


@pytest.fixture(scope="module")
def app_url(tmp_path_factory, app_env):
    """The app served by `streamlit run app.py` with its own cache and runs folders; only the
    dequantized embedded model is shared with the other tests."""
    if not Path(CHROMIUM).exists():
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed; scripts/setup.sh --dev installs it")
        pytest.skip("chromium not installed")
    from tests.conftest import SHARED_EMBEDDED_DIR

    port = _free_port()
    env = dict(
        os.environ,
        PLENS_CACHE_DIR=str(tmp_path_factory.mktemp("e2e-cache")),
        PLENS_RUNS_DIR=str(tmp_path_factory.mktemp("e2e-runs")),
        PLENS_EMBEDDED_DIR=str(SHARED_EMBEDDED_DIR),
        HF_HUB_OFFLINE="1",
    )
    app_env.update(env)
    log_path = tmp_path_factory.mktemp("e2e-log") / "streamlit.log"
    log = open(log_path, "w")  # noqa: SIM115
    proc = subprocess.Popen(
        [
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
        ],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
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
    # jobs run in their own process groups and outlive the server: cancel what is still running
    _stop_jobs(env)
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shutil.copy(log_path, ARTIFACTS / "streamlit.log")
    for run in Path(env["PLENS_RUNS_DIR"]).glob("*/metrics.jsonl"):  # to read after a failure
        for name in ("metrics.jsonl", "log.txt"):
            if (run.parent / name).exists():
                shutil.copy(run.parent / name, ARTIFACTS / f"run-{run.parent.name}-{name}")


def _stop_jobs(env: dict) -> None:
    """Cancel any job the app started that is still queued or running (a failed test)."""
    subprocess.run(
        [
            sys.executable,
            "-c",
            "from core.jobs.registry import JobRegistry\n"
            "r = JobRegistry()\n"
            "[r.cancel(j.id) for j in r.list() if j.active]",
        ],
        cwd=ROOT,
        env=env,
        timeout=60,
        check=False,
    )


@pytest.fixture(scope="module")
def page(app_url):
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        context = browser.new_context(viewport={"width": 1400, "height": 1800})
        context.set_default_timeout(30_000)
        pg = context.new_page()
        yield pg
        context.close()
        browser.close()


@pytest.fixture(scope="module")
def workflow() -> dict:
    """What one step hands to the next (the id of the training job)."""
    return {}


SELECTION = f"?model=default&kind=task&task=mbpp&limit={N_EXAMPLES}"


@pytest.fixture
def selected(page, app_url) -> None:
    """The Start page's selection (default model, MBPP, the first N examples), through the URL
    when this test runs without the Start step before it."""
    if "task=mbpp" not in page.url:
        page.goto(f"{app_url}/{SELECTION}")
        page.get_by_role("heading", name="Perplexity Lens", exact=True).wait_for(timeout=SLOW)


@pytest.fixture
def training_job(page, selected, workflow) -> str:
    """The tiny training job's id: the Train step's, or one started here from the Train form."""
    if "job" not in workflow:
        _launch_training(page, workflow)
    return workflow["job"]


def _jobs(env: dict) -> dict[str, dict]:
    """The app's jobs as its registry reads them (reconciled): id -> kind, status, device."""
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            "import json\nfrom core.jobs.registry import JobRegistry\n"
            "print(json.dumps({j.id: {'kind': j.kind, 'status': j.status, 'device': j.device}"
            " for j in JobRegistry().list()}))",
        ],
        cwd=ROOT,
        env=env,
        timeout=60,
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout)


def _job_status(env: dict, job_id: str) -> str:
    return _jobs(env)[job_id]["status"]


@pytest.fixture
def finished_job(training_job, app_env) -> str:
    """The tiny training job, once it has succeeded."""
    deadline = time.time() + JOB / 1000
    while (status := _job_status(app_env, training_job)) in ("queued", "running"):
        assert time.time() < deadline, f"job {training_job} still {status}"
        time.sleep(5)
    assert status == "succeeded", f"job {training_job} {status}"
    return training_job


def _shot(page, name: str) -> None:
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def _no_errors(page) -> None:
    """What a user would notice at once: an error box or a Python traceback."""
    from playwright.sync_api import expect

    expect(page.get_by_test_id("stException")).to_have_count(0)
    expect(page.get_by_test_id("stAlertContentError")).to_have_count(0)


def _open(page, title: str, heading: str) -> None:
    """Click a page in the app's navigation and wait for its title."""
    page.get_by_test_id("stSidebarNav").get_by_role("link", name=title).click()
    page.get_by_role("heading", name=heading, exact=True).wait_for(timeout=60_000)


def _wait_for_charts(page, n: int) -> None:
    """Until `n` plotly charts have drawn (not just their placeholders)."""
    page.wait_for_function(
        "n => document.querySelectorAll('[data-testid=\"stPlotlyChart\"] .main-svg').length >= n",
        arg=n,
        timeout=60_000,
    )


def _wait_until_idle(page) -> None:
    """Until the app's current rerun has finished: no running indicator, no stale (greyed) element.

    A rerun updates the page top to bottom, so a tile near the top can show the new τ while
    the heatmap below it is still the previous run's."""
    page.wait_for_function(
        '() => !document.querySelector(\'[data-testid="stStatusWidgetRunningIcon"],'
        ' [data-testid="stStatusWidgetRunningManIcon"], [data-stale="true"]\')',
        timeout=60_000,
    )


def _expect_text(locator, text: str) -> None:
    from playwright.sync_api import expect

    expect(locator).to_contain_text(text, timeout=30_000)


def _metric(page, label: str) -> str:
    tile = page.get_by_test_id("stMetric").filter(has_text=label)
    return tile.get_by_test_id("stMetricValue").inner_text().strip()


def test_start_picks_default_model_and_mbpp(page, app_url):
    page.goto(app_url)
    page.get_by_role("heading", name="Perplexity Lens", exact=True).wait_for(timeout=60_000)
    sidebar = page.get_by_test_id("stSidebar")
    model = sidebar.get_by_role("textbox").first
    model.fill("default")
    model.press("Enter")
    sidebar.get_by_test_id("stSelectbox").filter(has_text="Task").click()
    page.get_by_role("option", name="MBPP", exact=True).click()
    limit = sidebar.get_by_label("Examples (first N)")
    limit.fill(str(N_EXAMPLES))
    limit.press("Enter")
    page.get_by_text(f"MBPP (train): {N_EXAMPLES} examples").wait_for()
    page.get_by_test_id("stDataFrame").first.wait_for()  # the task catalogue
    _shot(page, "01-start-selection")
    _no_errors(page)
    assert "model=default" in page.url and "task=mbpp" in page.url


def test_explore_shows_heatmap_and_tau_changes_highlights(page, selected):
    _open(page, "Explore", "Explore token perplexity")
    # the selection made on the Start page carries over to the next page
    assert page.get_by_test_id("stSidebar").get_by_label("Examples (first N)").input_value() == (
        str(N_EXAMPLES)
    )
    spans = page.locator("span.pl-t")
    spans.first.wait_for(timeout=SLOW)
    _shot(page, "02-explore-heatmap")
    _no_errors(page)
    assert spans.count() > 10
    ppl = [float(v) for v in spans.evaluate_all("els => els.map(e => e.dataset.ppl)")]
    assert all(v >= 1.0 for v in ppl)
    high_before = page.locator("span.pl-t.pl-hi").count()
    assert high_before == sum(v > 2.5 for v in ppl)

    slider = page.get_by_role("slider").first
    slider.focus()
    for _ in range(30):  # τ 2.5 -> 5.5 in 0.1 steps
        page.keyboard.press("ArrowRight")
    page.wait_for_function(
        f"document.querySelectorAll('span.pl-t.pl-hi').length < {high_before}", timeout=60_000
    )
    _wait_until_idle(page)
    _shot(page, "03-explore-tau-moved")
    tau = float(page.get_by_test_id("stSliderThumbValue").first.inner_text())
    assert tau == pytest.approx(5.5)
    expected = sum(v > tau for v in ppl)
    # the thumb shows 5.5 before the last rerun has redrawn the heatmap: wait for that redraw
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    with contextlib.suppress(PlaywrightTimeout):
        page.wait_for_function(
            f"document.querySelectorAll('span.pl-t.pl-hi').length === {expected}", timeout=30_000
        )
    assert page.locator("span.pl-t.pl-hi").count() == expected


def _studio_state(page) -> tuple[float, int, int, float, int, list[float]]:
    """(masked share %, tokens masked, tokens kept, τ, struck-out tokens, heatmap ppl)."""
    share = float(_metric(page, "Masked share").rstrip("%"))
    masked = int(_metric(page, "Tokens masked").replace(",", ""))
    kept = int(_metric(page, "Tokens kept").replace(",", ""))
    tau = float(_metric(page, "τ"))
    spans = page.locator("span.pl-t")
    struck = page.locator("span.pl-t.pl-m").count()
    ppl = [float(v) for v in spans.evaluate_all("els => els.map(e => e.dataset.ppl)")]
    return share, masked, kept, tau, struck, ppl


def test_masking_studio_tau_changes_masked_share(page, selected):
    _open(page, "Masking studio", "Masking studio")
    page.get_by_test_id("stMetric").filter(has_text="Masked share").wait_for(timeout=SLOW)
    page.locator("span.pl-t").first.wait_for()
    _wait_for_charts(page, 2)  # share vs τ, masked share per example
    share0, masked0, kept0, tau0, struck0, ppl0 = _studio_state(page)
    _shot(page, "04-masking-studio")
    _no_errors(page)
    assert tau0 == pytest.approx(2.5)  # the paper's default
    assert 0 < share0 < 100
    assert share0 == pytest.approx(100 * masked0 / (masked0 + kept0), abs=0.05)
    assert struck0 == sum(v > tau0 for v in ppl0)  # the heatmap strikes exactly ppl > τ

    share_text0 = _metric(page, "Masked share")  # read before the slider moves, not after
    slider = page.get_by_role("slider").first
    slider.focus()
    for _ in range(20):  # τ 2.5 -> 4.5 on the studio's grid (0.1 steps between 2 and 10)
        page.keyboard.press("ArrowRight")
    page.wait_for_function(
        "() => [...document.querySelectorAll('[data-testid=\"stMetric\"]')].some(m => "
        "m.innerText.includes('Masked share') && !m.innerText.includes("
        f"'{share_text0}'))",
        timeout=60_000,
    )
    page.wait_for_function(
        "() => [...document.querySelectorAll('[data-testid=\"stMetric\"]')].some(m => "
        "/^τ\\s*4.5$/m.test(m.innerText))",
        timeout=60_000,
    )
    page.wait_for_function(
        f"() => document.querySelectorAll('span.pl-t.pl-m').length < {struck0}", timeout=60_000
    )
    _wait_until_idle(page)
    _wait_for_charts(page, 2)
    share1, masked1, kept1, tau1, struck1, ppl1 = _studio_state(page)
    _shot(page, "05-masking-tau-moved")
    _no_errors(page)
    assert tau1 == pytest.approx(4.5)
    assert share1 < share0 and masked1 < masked0  # a higher τ masks fewer tokens
    assert masked1 + kept1 == masked0 + kept0  # same response tokens, split differently
    assert ppl1 == ppl0 and struck1 == sum(v > tau1 for v in ppl1) < struck0
    assert "tau=4.5" in page.url  # a reload or a shared link keeps τ


def test_train_launches_a_tiny_job(page, selected, workflow):
    _launch_training(page, workflow)


def _launch_training(page, workflow: dict) -> None:
    """Fill the Train form for the tiny job (cpu-quick, two steps, evaluation every step),
    check its command and start it; the job's id goes into `workflow`."""
    _fill_train_form(page)
    _shot(page, "06-train-form")
    _no_errors(page)
    page.get_by_role("button", name="Start training").click()
    workflow["job"] = _job_in_url(page)
    status = page.get_by_test_id("stMarkdownContainer").filter(
        has_text=re.compile(r"\b(queued|running)\b")
    )
    status.first.wait_for(timeout=60_000)
    page.get_by_role("button", name=re.compile("Cancel")).wait_for()
    _shot(page, "07-train-job-started")
    _no_errors(page)


def _job_in_url(page, other_than: set[str] | frozenset[str] = frozenset()) -> str:
    """The job a page selected after its Start button (the URL keeps it); one not in
    `other_than` (the Train page selects the newest job on its own, e.g. an earlier test's)."""
    deadline = time.time() + 60
    while time.time() < deadline:
        found = re.search(r"[?&]job=([^&]+)", page.url)
        if found and found.group(1) not in other_than:
            return found.group(1)
        page.wait_for_timeout(250)
    raise AssertionError(f"no new job in the URL {page.url}")


def _fill_train_form(page, max_steps: int = MAX_STEPS) -> None:
    """The Train form of the tiny job (cpu-quick, `max_steps` steps, evaluation every step),
    with its command checked."""
    _open(page, "Train", "Train")
    page.get_by_test_id("stSelectbox").filter(has_text="Preset").click()
    page.get_by_role("option", name="cpu-quick", exact=True).click()
    page.get_by_text(f"the sidebar selects the first {N_EXAMPLES}").wait_for()
    page.get_by_text("Hyperparameters").click()
    for label, value in (
        ("Max steps", max_steps),
        ("Batch size", 2),
        ("Max tokens / example", 128),
        ("Evaluate every N steps", 1),
        ("Examples per eval task", 2),  # two items: the fewest a paired interval needs
    ):
        box = page.get_by_label(label, exact=True)
        box.fill(str(value))
        box.press("Enter")
    command = page.get_by_test_id("stCode").filter(has_text="python -m core train").first
    for flag in (
        f"--limit {N_EXAMPLES}",
        f"--max-steps {max_steps}",
        "--max-length 128",
        "--eval-every 1",
        '"suite": "during"',
    ):
        _expect_text(command, flag)


def test_runs_live_charts_gain_points(page, training_job):
    _open(page, "Runs", "Runs")
    _wait_for_charts(page, 1)
    target, bwt, loss = "runs-chart-target", "runs-chart-bwt", "runs-chart-loss"

    def points() -> dict[str, dict[str, int]]:
        return page.evaluate(CHART_POINTS_JS)

    def wait_until(condition: str, timeout: int) -> None:
        page.wait_for_function(
            f"() => {{ const p = ({CHART_POINTS_JS})(); const n = k => (p[k] || {{}}).points "
            f"|| 0; return {condition}; }}",
            timeout=timeout,
        )

    first = points()
    # evaluation runs at steps 0..MAX_STEPS, the loss at 1..MAX_STEPS: the job is not done yet,
    # and the page is never reloaded, so every new point below is the live update
    assert first.get(target, {}).get("points", 0) < MAX_STEPS + 1
    assert first.get(loss, {}).get("points", 0) < MAX_STEPS
    # the next point comes with the next evaluation round: on 2 busy cores that can take as long
    # as the job's own allowance
    wait_until(f"n('{target}') > {first.get(target, {}).get('points', 0)}", JOB)
    _shot(page, "08-runs-live-growing")
    _no_errors(page)
    wait_until(f"n('{target}') === {MAX_STEPS + 1} && n('{loss}') === {MAX_STEPS}", JOB)
    _wait_until_idle(page)
    final = points()
    # the top rows: the target's change vs step 0 with its paired band, BWT, drift from the base
    # model on the OOD and the target probes (each with its band over probe items), the loss
    ood, tgt = "runs-chart-ood-drift", "runs-chart-target-drift"
    assert list(final)[:5] == [target, bwt, ood, tgt, loss]
    assert final[target] == {"points": MAX_STEPS + 1, "lines": 1, "bands": 1}
    assert final[ood] == {"points": MAX_STEPS + 1, "lines": 1, "bands": 1}
    assert final[tgt] == {"points": MAX_STEPS + 1, "lines": 1, "bands": 1}
    assert final[loss] == {"points": MAX_STEPS, "lines": 1, "bands": 0}
    captions = page.get_by_test_id("stCaptionContainer")
    # the drift table of the latest round, with its intervals and how to read it
    page.get_by_text("Drift from the base model at the latest round").wait_for()
    assert captions.filter(has_text="sharpening toward").count() >= 1
    if final[bwt]["lines"]:  # BWT needs an out-of-domain accuracy the base model is above chance on
        assert final[bwt] == {"points": MAX_STEPS + 1, "lines": 1, "bands": 1}
    else:  # two ARC-Easy items cannot show that: the chart says why instead of drawing nothing
        assert captions.filter(has_text="no BWT. BWT ").count() == 1
    # then each task's change (a band for every reference NLL), then one picked raw metric
    tasks = {k: v for k, v in final.items() if k.startswith("runs-chart-task-")}
    assert {"runs-chart-task-mbpp_ppl", "runs-chart-task-gsm8k_ppl"} <= set(tasks)
    assert all(v["lines"] == 1 for v in tasks.values())
    assert tasks["runs-chart-task-mbpp_ppl"]["bands"] == 1
    assert final["runs-chart-metric"]["lines"] == 1 and len(final) == 5 + len(tasks) + 1
    assert captions.filter(has_text=re.compile(r"step 2: [-+]\d\.\d{3} \[")).count() >= 1
    assert not captions.filter(has_text=re.compile(r"\bnan\b", re.I)).count()
    page.get_by_test_id("stDataFrame").get_by_text("succeeded").wait_for(state="attached")
    _shot(page, "09-runs-done")
    _no_errors(page)


def test_where_it_forgot_shows_the_tokens_that_moved(page, finished_job):
    _open(page, "Where it forgot", "Where it forgot")
    # the run just trained, its last round and the OOD probe's largest-KL item by default: the
    # base model's own answer, every token coloured by how far its distribution moved
    tokens = page.locator(".pd-root span.pl-t[data-kl]")
    tokens.first.wait_for(timeout=SLOW)
    kls = [float(k) for k in tokens.evaluate_all("els => els.map(e => e.dataset.kl)")]
    assert kls and all(k >= 0 for k in kls) and max(kls) > 0
    # base vs tuned top-5 arrive from a background task and fill every token's hover
    page.wait_for_function(
        "() => [...document.querySelectorAll('.pd-root span.pl-t[data-kl]')]"
        ".every(s => (s.dataset.tip || '').includes('p of this token: base'))",
        timeout=SLOW,
    )
    # the probe-wide view: drift by token category, position and domain
    page.get_by_role("heading", name=re.compile(r"^Across the probe")).wait_for()
    page.locator('[class*="st-key-drift-chart-"] .main-svg').first.wait_for(timeout=60_000)
    _wait_until_idle(page)
    _shot(page, "10-where-it-forgot")
    _no_errors(page)


def test_train_page_shows_the_job_succeeded(page, training_job):
    _open(page, "Train", "Train")
    page.get_by_text(re.compile(r"^Done in .*loss")).wait_for(timeout=JOB)
    _shot(page, "10-train-job-done")
    _no_errors(page)


def test_compare_exports_a_self_contained_report(page, finished_job):
    _open(page, "Compare & report", "Compare runs")
    _wait_for_charts(page, 1)
    # one run: the frontier draws its point with both intervals, or says why it cannot
    page.get_by_test_id("stCaptionContainer").filter(
        has_text=re.compile("A comparison needs a second run|not drawn, no (TI|BWT)")
    ).first.wait_for()
    _wait_until_idle(page)
    _shot(page, "11-compare-single-run")
    _no_errors(page)
    page.get_by_role("tab", name="Report").click()
    page.get_by_role("button", name="Build report").click()
    button = page.get_by_role("button", name="Download report.html")
    button.wait_for(timeout=SLOW)
    _shot(page, "11b-compare-report-ready")
    _no_errors(page)
    with page.expect_download() as info:
        button.click()
    path = ARTIFACTS / "report.html"
    info.value.save_as(path)
    html = path.read_text(encoding="utf-8")
    assert finished_job in html  # the run trained above is in the report
    assert re.search(r"plotly\.js v\d", html)  # plotly.js itself is inlined ...
    assert html.count("Plotly.newPlot(") >= 2  # ... and draws the report's charts
    # self-contained: nothing is fetched from anywhere when the file is opened
    assert not re.search(r"<script[^>]*\ssrc=", html, re.I)
    assert not re.search(r"<link[^>]+href=[\"']?(https?:)?//", html, re.I)
    assert not re.search(r"@import\s+url\([\"']?https?:", html, re.I)

    # and it draws offline: every network request from the opened file is refused
    report = page.context.new_page()
    report.route(re.compile(r"^https?://"), lambda route: route.abort())
    report.goto(path.as_uri())
    report.wait_for_function(
        "document.querySelectorAll('.js-plotly-plot .main-svg').length >= 2", timeout=60_000
    )
    assert report.get_by_text(finished_job).count() >= 1
    _shot(report, "12-report-offline")
    report.close()


def test_reproduce_page_offers_the_protocol_with_its_command(page, selected):
    _open(page, "Reproduce the paper", "Reproduce the paper")
    # no protocol has run in this app's runs folder: the launch form is open, with the command
    _expect_text(page.get_by_test_id("stCode").first, "python -m core protocol --preset cpu")
    page.get_by_text("No protocol yet").wait_for()
    _shot(page, "13-reproduce-the-paper")
    _no_errors(page)


# Every label, button, option and tab of the main area and the sidebar whose text does not fit
# its box: its own text overflows a box that hides the overflow (an ellipsis, "Prev…"), or an
# ancestor that hides or scrolls the overflow cuts it off ("Percentil" in a scrolled selector).
# Tables, charts, code and the token heatmaps are checked apart (below) or are drawn on purpose.
TRUNCATED_LABELS_JS = """() => {
  const skip = '[data-testid="stDataFrame"], [data-testid="stPlotlyChart"], [data-testid="stCode"],'
    + ' pre, .pl-root, .pd-root, svg, [data-testid="stMarkdownContainer"] table';
  const shown = el => {
    for (let e = el; e; e = e.parentElement) {
      const s = getComputedStyle(e);
      if (s.display === 'none' || s.visibility === 'hidden' || e.hidden) return false;
    }
    const r = el.getBoundingClientRect();
    return r.width > 0 && r.height > 0;
  };
  const out = [];
  const roots = document.querySelectorAll('[data-testid="stMain"], [data-testid="stSidebar"]');
  for (const root of roots) {
    for (const el of root.querySelectorAll('*')) {
      const text = [...el.childNodes].filter(n => n.nodeType === 3)
        .map(n => n.textContent).join('').trim();
      if (!text || el.closest(skip) || !shown(el)) continue;
      const s = getComputedStyle(el);
      let why = null;
      if (s.overflowX !== 'visible' && el.scrollWidth > el.clientWidth + 1) {
        why = `text ${el.scrollWidth}px in a ${el.clientWidth}px box`;
      } else {
        const range = document.createRange();
        range.selectNodeContents(el);
        const t = range.getBoundingClientRect();
        for (let a = el.parentElement; a && a !== root.parentElement; a = a.parentElement) {
          if (!['hidden', 'clip', 'auto', 'scroll'].includes(getComputedStyle(a).overflowX)) continue;
          const b = a.getBoundingClientRect();
          if (t.right > b.right + 1 || t.left < b.left - 1) {
            why = `text at ${Math.round(t.left)}-${Math.round(t.right)}px cut by a box at `
              + `${Math.round(b.left)}-${Math.round(b.right)}px`;
            break;
          }
        }
      }
      if (why) {
        const widget = el.closest('[data-testid^="st"]');
        out.push({text: el.textContent.trim().slice(0, 80), why,
                  widget: widget && widget.getAttribute('data-testid')});
      }
    }
  }
  return out;
}"""

# Code and log boxes whose lines run past the box (they should wrap), and tables that scroll
# sideways, with how many pixels they hide.
OVERFLOW_JS = """() => {
  const main = document.querySelector('[data-testid="stMain"]');
  const over = el => el.scrollWidth - el.clientWidth;
  return {
    code: [...main.querySelectorAll('[data-testid="stCode"] pre')]
      .filter(p => p.offsetParent && over(p) > 1).map(p => p.textContent.trim().slice(0, 80)),
    tables: [...main.querySelectorAll('[data-testid="stDataFrame"] .dvn-scroller')]
      .filter(s => s.offsetParent && over(s) > 1).map(over),
  };
}"""

# The pages of the main workflow, in order: (navigation title, heading, what to wait for).
LAYOUT_PAGES = [
    ("Start", "Perplexity Lens", '[data-testid="stDataFrame"]'),
    ("Explore", "Explore token perplexity", "span.pl-t"),
    ("Masking studio", "Masking studio", "span.pl-t"),
    ("Generate data", "Generate data", None),
    ("Train", "Train", None),
    ("Runs", "Runs", None),
    ("Where it forgot", "Where it forgot", None),
    ("Compare & report", "Compare runs", None),
    ("Reproduce the paper", "Reproduce the paper", None),
]


@pytest.mark.parametrize("width,height", [(1280, 720), (1920, 1080)])
def test_layout_fits_the_screen_no_label_is_cut_off(page, app_url, width, height):
    """Every page of the workflow at 1280×720 (a laptop) and 1920×1080: no label, button,
    option or tab is cut off, and no code or log box hides the end of its lines. Runs alone too
    (`-k layout`): it opens the app with the workflow's selection itself."""
    page.set_viewport_size({"width": width, "height": height})
    try:
        if "task=" not in page.url:
            page.goto(f"{app_url}/{SELECTION}")
            page.get_by_role("heading", name="Perplexity Lens", exact=True).wait_for(timeout=SLOW)
        problems = {}
        for title, heading, ready in LAYOUT_PAGES:
            page.get_by_test_id("stSidebarNav").get_by_role("link", name=title).click()
            page.get_by_role("heading", name=heading, exact=True).wait_for(timeout=SLOW)
            if ready:
                page.locator(ready).first.wait_for(timeout=SLOW)
            _wait_until_idle(page)
            page.wait_for_timeout(1000)  # fonts and the last layout pass
            cut = page.evaluate(TRUNCATED_LABELS_JS)
            overflow = page.evaluate(OVERFLOW_JS)
            name = re.sub(r"\W+", "-", title.lower()).strip("-")
            _shot(page, f"layout-{width}x{height}-{name}")
            # and the whole page: the main area scrolls inside the window, so a window as tall
            # as the page shows all of it (at the same width, so the same layout)
            tall = page.evaluate(
                "() => document.querySelector('[data-testid=\"stMain\"]').scrollHeight"
            )
            page.set_viewport_size({"width": width, "height": min(int(tall) + 40, 8000)})
            page.wait_for_timeout(1000)
            _shot(page, f"layout-{width}-whole-{name}")
            page.set_viewport_size({"width": width, "height": height})
            if cut or overflow["code"]:
                problems[title] = {"labels": cut, "code": overflow["code"]}
        assert not problems, problems
    finally:
        page.set_viewport_size({"width": 1400, "height": 1800})


# The text of every row a Streamlit dataframe shows (glide-data-grid keeps an accessible table
# of its visible cells beside the canvas it draws).
TABLE_ROWS_JS = """el => [...el.querySelectorAll('tr')]
  .map(r => [...r.querySelectorAll('td, th')].map(c => c.textContent.trim()).join(' | '))"""


def _queue_rows(page, ids: set[str]) -> list[str]:
    """The Train page's job table rows of the jobs `ids`, once it lists all of them."""
    table = page.get_by_test_id("stDataFrame").first
    deadline = time.time() + SLOW / 1000
    while time.time() < deadline:
        rows = [r for r in table.evaluate(TABLE_ROWS_JS) if any(i in r for i in ids)]
        if len(rows) == len(ids):
            return sorted(rows)
        page.wait_for_timeout(1000)
    raise AssertionError(f"the job table never listed {sorted(ids)}: {rows}")


def _cancel_jobs(env: dict, ids: set[str]) -> None:
    subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys\nfrom core.jobs.registry import JobRegistry\nr = JobRegistry()\n"
            "[r.cancel(i) for i in sys.argv[1:] if r.get(i).active]",
            *sorted(ids),
        ],
        cwd=ROOT,
        env=env,
        timeout=120,
        check=False,
    )


def test_two_browsers_send_the_same_form_at_once_and_get_one_job(page, app_url, app_env):
    """Two people send the same Train form at the same moment while a third reloads the Runs
    page: one job is queued and both are shown it. One of them then sends another form: it
    waits, since the device runs one job at a time, and both browsers list the same queue."""
    before = set(_jobs(app_env))
    contexts = [
        page.context.browser.new_context(viewport={"width": 1400, "height": 1800}) for _ in range(3)
    ]
    new: set[str] = set()
    try:
        a, b, watcher = (c.new_page() for c in contexts)
        for p in (a, b, watcher):
            p.set_default_timeout(30_000)
            p.goto(f"{app_url}/{SELECTION}")
            p.get_by_role("heading", name="Perplexity Lens", exact=True).wait_for(timeout=SLOW)
        for p in (a, b):
            _fill_train_form(p, max_steps=MAX_STEPS + 1)  # not the workflow's job
        _open(watcher, "Runs", "Runs")
        at = a.evaluate("() => Date.now()") + 1500
        for p in (a, b):  # both buttons clicked by the pages' own clocks, at the same moment
            p.get_by_role("button", name="Start training").evaluate(
                "(el, at) => setTimeout(() => el.click(), at - Date.now())", at
            )
        watcher.reload()
        shown = {_job_in_url(a, before), _job_in_url(b, before)}
        new = set(_jobs(app_env)) - before
        assert len(new) == 1 and shown == new, (shown, new)
        note = "The same training job is already"  # what the second sender is told
        for _ in range(60):
            if a.get_by_text(note).count() + b.get_by_text(note).count() == 1:
                break
            a.wait_for_timeout(500)
        else:
            raise AssertionError("neither browser was told the job was already queued")
        watcher.get_by_role("heading", name="Runs", exact=True).wait_for(timeout=SLOW)
        _shot(a, "two-browsers-a")
        _shot(b, "two-browsers-b")

        steps = b.get_by_label("Max steps", exact=True)  # the form is still open
        steps.fill(str(MAX_STEPS + 2))
        steps.press("Enter")
        command = b.get_by_test_id("stCode").filter(has_text="python -m core train").first
        _expect_text(command, f"--max-steps {MAX_STEPS + 2}")
        b.get_by_role("button", name="Start training").click()
        _job_in_url(b, before | new)
        jobs = _jobs(app_env)
        new = set(jobs) - before
        assert len(new) == 2, new
        running = [i for i, j in jobs.items() if j["status"] == "running" and j["device"] == "cpu"]
        assert len(running) <= 1, running  # one job at a time on the device
        assert {jobs[i]["status"] for i in new} <= {"queued", "running"}
        assert "queued" in {jobs[i]["status"] for i in new}

        rows_a, rows_b = _queue_rows(a, new), _queue_rows(b, new)
        _shot(a, "two-browsers-queue-a")
        _shot(b, "two-browsers-queue-b")

        def queue(rows: list[str]) -> list[tuple[str, str]]:
            """(job, status) of each row, in the table's order."""
            out = []
            for row in rows:
                word = re.search(r"\b(queued|running)\b", row)
                out.append((next(i for i in new if i in row), word and word.group(1)))
            return out

        assert queue(rows_a) == queue(rows_b)
        assert {s for _, s in queue(rows_a)} == {"queued", "running"}, rows_a
        for p in (a, b, watcher):
            _no_errors(p)
    finally:
        _cancel_jobs(app_env, new)
        for c in contexts:
            c.close()
