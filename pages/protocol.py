"""Reproduce the paper: launch the whole protocol (every method x seeds, one table with 95%
confidence intervals, one report) as a background job, follow it, and present its results.

The protocol runs in a job process (core.protocol via core.jobs), so closing or reloading the
page never stops it; the followed protocol lives in the URL (`?protocol=NAME`). Its progress
view polls the run folders in a fragment and never blocks the page.
"""

import pandas as pd
import streamlit as st

from components.jobs_view import (
    STATUS_BADGES,
    backend_caption,
    current_state,
    fmt_seconds,
    job_header,
    job_log,
    job_registry,
    state_bar,
)
from components.layout import key_table
from components.session import ensure_app_navigation
from core.errors import LensError
from core.fmt import count
from core.jobs.registry import Job, jobs_by_run
from core.jobs.runfiles import log_tail
from core.jobs.state import Phase, RunState
from core.study.protocol import (
    ARMS,
    PAIRED_TABLES,
    PRESETS,
    REPORT_HTML,
    ProtocolConfig,
    ProtocolView,
    arm_specs,
    headline,
    list_protocols,
    load_cpu_protocol,
    load_cpu_sweep,
    load_protocol,
    paired_table,
    preflight,
    probe_items,
    protocol_folder,
    summary_table,
    sweep_table,
)

POLL_SECONDS = 3.0
PRESET_LABELS = {
    "cpu": "cpu: the embedded model on 2 CPU cores, 4 arms x 3 seeds, about an hour",
    "paper": "paper: the paper's sizes (all 400 problems, lr 2e-5, 3 epochs, N = 32) for a GPU",
}

ensure_app_navigation()
registry = job_registry()

st.title("Reproduce the paper")
st.caption(
    "One click runs the paper's comparison on MBPP: ground truth, STM at τ and at the τ that "
    "masks a target share, the random-mask control, Self-Output and the token losses the "
    "trainers ship (soft STM, DFT, EAFT, KL, ASFT, STM + KL), each with one or more seeds, "
    "evaluated on the target and out-of-domain tasks at step 0 and at the end. The result is a "
    "table with 95% confidence intervals, a reading of each method against ground truth, and a "
    "report. It runs in the background and resumes where it stopped."
)


recorded = load_cpu_protocol()
if recorded is not None:
    with st.expander(
        "The cpu preset as run on the project's machine", expanded=not list_protocols()
    ):
        recorded_config = ProtocolConfig.from_dict(recorded["config"])
        for line in headline(recorded):
            st.markdown(f"- {line}")
        key_table(pd.DataFrame(summary_table(recorded)))
        st.caption(
            f"{recorded_config.describe()}; {recorded['machine']}, {recorded['date']}"
            + (f"; {recorded['note']}" if recorded.get("note") else "")
            + ". Mean ± 95% CI over seeds; the sentences above use intervals paired over seeds "
            'and items (docs/cpu_protocol.json, docs/BENCHMARKS.md "Paper protocol").'
        )

sweep = load_cpu_sweep()
with st.expander("What the cpu preset can show on the embedded model", expanded=False):
    if sweep is None:
        st.caption("No recorded sweep (docs/cpu_forgetting.json; bench/bench_cpu_forgetting.py).")
    else:
        st.markdown(sweep["text"])
        key_table(pd.DataFrame(sweep_table(sweep["rows"])))
        st.caption(
            f"Ground truth alone, one seed, each setting against the base model on the same "
            f"items of the `{sweep['suite']}` suite (paired 95% bootstrap interval; accuracy in "
            f"points, reference NLL in nats; * = the interval excludes zero). "
            f"{sweep['model']}, {sweep['machine']}, {sweep['date']}."
        )


def _start(config: ProtocolConfig, name: str) -> None:
    """Queue the protocol job (a callback: runs before the script)."""
    try:
        folder = protocol_folder(config, name=name)
        registry.submit(
            "protocol",
            config.to_dict(),
            device=config.device,
            label=config.describe(),
            run_dir=folder,
        )
    except LensError as exc:
        st.session_state["protocol_start_error"] = str(exc)
        return
    st.query_params["protocol"] = folder.name


with st.expander("Start a protocol", expanded=not list_protocols()):
    c1, c2 = st.columns([2, 1])
    preset = c1.selectbox(
        "Preset", list(PRESETS), format_func=PRESET_LABELS.get, key="protocol-preset"
    )
    model = c2.text_input(
        "Model",
        "default",
        key="protocol-model",
        help="'default' (the embedded SmolLM2-135M), a Hugging Face id or a local folder",
    )
    defaults = ProtocolConfig.from_preset(preset)
    labels = {key: arm.label for key, arm in arm_specs(defaults).items()}
    methods = st.multiselect(
        "Methods",
        list(ARMS),
        default=defaults.methods,
        format_func=labels.get,
        key="protocol-methods",
    )
    c1, c2, c3, c4 = st.columns(4)
    seeds = c1.text_input(
        "Seeds",
        ",".join(map(str, defaults.seeds)),
        key="protocol-seeds",
        help="comma-separated; each seed runs every arm again (the time grows with it)",
    )
    tau = c2.number_input("τ (STM, random)", 1.01, 1000.0, defaults.tau, 0.1, key="protocol-tau")
    share = c3.slider(
        "Share masked (STM share arm)",
        0.05,
        0.6,
        defaults.target_share,
        0.01,
        key="protocol-share",
    )
    name = c4.text_input(
        "Name",
        f"protocol-{preset}",
        key="protocol-name",
        help="Folder under the runs folder; the same name with the same settings resumes it.",
    )
    try:
        config = ProtocolConfig.from_preset(
            preset,
            model=model.strip() or "default",
            methods=methods,
            seeds=seeds,
            tau=tau,
            target_share=share,
        )
        preflight(config)
        folder = protocol_folder(config, name=name.strip())
    except LensError as exc:
        st.error(str(exc))
    else:
        st.caption("Equivalent command (runs in the foreground; add `--submit` to queue it):")
        st.code(config.command(name=folder.name), language="bash", wrap_lines=True)
        st.button(
            "Start protocol",
            type="primary",
            icon=":material/play_arrow:",
            on_click=_start,
            args=(config, folder.name),
            key="protocol-start",
        )
        backend_caption(registry)
    if st.session_state.get("protocol_start_error"):
        st.error(st.session_state.pop("protocol_start_error"))

protocols = list_protocols()
if not protocols:
    st.info("No protocol yet. Start one above, or run `make protocol` in a terminal.")
    st.stop()

names = [p.name for p in protocols]
wanted = st.query_params.get("protocol")
chosen = st.selectbox(
    "Protocol", names, index=names.index(wanted) if wanted in names else 0, key="protocol-pick"
)
st.query_params["protocol"] = chosen


def _job_of(folder_name: str):
    jobs = [j for j in registry.list() if j.kind == "protocol" and j.path.name == folder_name]
    return jobs[0] if jobs else None


def progress_text(view: ProtocolView, job: Job | None, state: RunState | None) -> str:
    """ "2 of 6 runs finished · running STM τ=2.5, seed 1 · 41m12s elapsed · about 40m left
    (the finished runs took 20m06s on average)"."""
    planned, finished = view.planned_runs(), view.finished_runs()
    text = f"{count(len(finished))} of {count(len(planned))} runs finished"
    active = job is not None and job.active
    if active and state is not None and state.phase == Phase.PROTOCOL and state.detail:
        text += f" · running {state.detail}"
    if active and job is not None and job.elapsed:
        text += f" · {fmt_seconds(job.elapsed)} elapsed"
    durations = view.durations()
    left = view.eta(state) if active else None
    if left is not None and durations:
        mean = sum(durations) / len(durations)
        text += (
            f" · about {fmt_seconds(left)} left (the finished runs took "
            f"{fmt_seconds(mean)} on average)"
        )
    elif active and len(finished) < len(planned):
        text += " · time left: known once the first run finishes"
    return text


@st.fragment(run_every=POLL_SECONDS)
def show_progress(name: str) -> None:
    """Status, finished runs, the running run's own state and the log while the protocol
    runs; stops polling once done."""
    view = load_protocol(next(p.folder for p in protocols if p.name == name))
    job = _job_of(name)
    planned, finished = view.planned_runs(), view.finished_runs()
    state = current_state(view.folder, job) if job is not None else None
    if job is not None:
        job_header(
            registry,
            job,
            key_prefix="protocol-",
            resume_note="finished runs are kept",
            show_state=False,
        )
    else:
        st.caption(view.config.describe())
    st.progress(len(finished) / max(1, len(planned)), text=progress_text(view, job, state))
    current = view.current_log() if job is not None and job.active else None
    if current is not None:  # what the running arm does now: its own state and time left
        runs_jobs = jobs_by_run(registry.list())
        state_bar(current[1], runs_jobs.get(current[1].name), prefix=f"{current[0]}: ")
    if job is not None and job.active:
        left, right = st.columns(2)
        left.caption("Protocol steps")
        left.code("\n".join(view.progress_lines(15)) or "(starting)", language=None)
        if current is not None:
            right.caption(f"Log of {current[0]} (last 15 lines)")
            right.code(log_tail(current[1], lines=15) or "(starting)", language=None)
    elif view.results is None and job is not None:
        st.warning(f"{STATUS_BADGES.get(job.status, job.status)}: {job.error or job.message}")
        job_log(job, lines=30)
    if job is not None and not job.active and st.session_state.get("protocol-was-active"):
        st.session_state["protocol-was-active"] = False
        st.rerun(scope="app")  # draw the results below
    st.session_state["protocol-was-active"] = bool(job and job.active)


show_progress(chosen)

view = load_protocol(next(p.folder for p in protocols if p.name == chosen))


@st.fragment(run_every=POLL_SECONDS * 5)
def show_partial(folder_name: str) -> None:
    """The results table over the runs finished so far, labelled partial, while the protocol
    runs (`results-partial.json`, rewritten as each run finishes)."""
    partial = load_protocol(next(p.folder for p in protocols if p.name == folder_name))
    found = partial.partial_results()
    if found is None:
        return
    done = found.get("partial") or {}
    st.subheader("Partial results")
    st.info(
        f"**Partial:** {count(done.get('finished'))} of {count(done.get('planned'))} runs "
        "finished. Means and 95% intervals over the seeds finished so far (an arm with one seed "
        "has no interval yet); they change as more runs finish. The paired comparisons and the "
        "report come when every run has finished.",
        icon=":material/hourglass_top:",
    )
    key_table(pd.DataFrame(summary_table(found)))  # the arm stays in view
    lines = found.get("findings") or []
    if lines:
        st.markdown("**Reading against ground truth so far** (means over the seeds finished)")
        for line in lines:
            st.markdown(f"- {line}")


if view.results is None:
    show_partial(chosen)
    st.stop()

results = view.results
st.subheader("Results")
ood_items = probe_items(results)
st.caption(
    "Mean ± 95% confidence half-width over seeds (Student t). OOD drift is the mean token "
    "KL(base ‖ tuned) on the base model's own answers to "
    f"{f'{ood_items} ' if ood_items else ''}out-of-domain prompts (0 = the "
    "base model's behaviour; higher = further from it). Δ% is the relative change from the base "
    "model (step 0) to the end of training; OOD easy-token NLL Δ% > 0 means the model got worse "
    "at out-of-domain tokens it already predicted well, OOD NLL Δ% at all of them."
)
key_table(pd.DataFrame(summary_table(results)))  # the arm stays in view
with st.expander("Change (%) of every task and metric"):
    key_table(pd.DataFrame(summary_table(results, detail=True)))
st.markdown(
    "**In short** (paired intervals over items and seeds; drift from the base model first, "
    "the benchmarks after)"
)
for line in headline(results):
    st.markdown(f"- {line}")
if results.get("paired_base_findings"):
    with st.expander("Each arm against the base model, task by task"):
        for line in results["paired_base_findings"]:
            st.markdown(f"- {line}")
st.markdown("**Reading against ground truth** (means over seeds)")
for line in results.get("findings") or ["(nothing to compare)"]:
    st.markdown(f"- {line}")
if results.get("paired_findings"):
    st.markdown(
        "**Each arm against ground truth, paired over seeds and items** (hierarchical "
        'bootstrap, 95%: "better" / "worse" only where the interval excludes zero)'
    )
    for line in results["paired_findings"]:
        st.markdown(f"- {line}")
for key, heading in PAIRED_TABLES:  # each arm against ground truth, then against STM
    rows = paired_table(results.get(key) or [])
    if rows:
        st.markdown(
            f"**{heading}** (95% interval over seeds and items; "
            '"better" / "worse" for the arm, only where it excludes zero)'
        )
        key_table(pd.DataFrame(rows))
if results.get("paired_stm_findings"):
    with st.expander("Each arm against STM, task by task"):
        for line in results["paired_stm_findings"]:
            st.markdown(f"- {line}")
for note in results.get("notes", []):
    st.caption(note)
failed = [r for r in results.get("runs", []) if r.get("status") != "succeeded"]
if failed:
    st.warning("Failed runs: " + "; ".join(f"{r['run']}: {r.get('error', '')}" for r in failed))
if results.get("span_s") is not None:
    st.caption(
        f"From the first run's start to the last run's end: {fmt_seconds(results['span_s'])}."
    )
report = view.folder / REPORT_HTML
if report.is_file():
    st.download_button(
        "Download the report (HTML, opens offline)",
        report.read_bytes(),
        file_name=f"{view.name}-report.html",
        mime="text/html",
        icon=":material/download:",
        key="protocol-report",
    )
finished_ids = [r["run"] for r in results.get("runs", []) if r.get("status") == "succeeded"]
# a plain link (relative to this page's URL): st.page_link needs the app's navigation, which a
# page run on its own (AppTest) does not have
st.markdown(
    f":material/compare_arrows: [Open these runs on Compare & report](compare?cmp={','.join(finished_ids)})"
)
