"""Generate data: make Self-Output and Rephrase training sets as background jobs, follow them,
and browse the generated sets with their provenance.

Generation runs in a job process (core.gendata via core.jobs): reloading or closing the page
never stops it. The followed job lives in the URL (`?job=...`); its view polls the run folder
every few seconds in a fragment and never blocks the page.
"""

import pandas as pd
import streamlit as st

from components.jobs_view import (
    backend_caption,
    fmt_seconds,
    job_header,
    job_log,
    job_picker,
    job_registry,
    jobs_table,
    watched_job,
)
from components.session import (
    NO_FILE,
    load_dataset_cached,
    missing_data_message,
    sidebar_selection,
)
from core.datagen.config import (
    CONVENTIONS,
    DEFAULT_REPHRASE_TEMPLATE,
    PRESETS,
    SELECTIONS,
    VERIFIERS,
    GenDataConfig,
)
from core.datagen.run import generation_progress, preflight
from core.datagen.store import list_generated_sets
from core.errors import LensError
from core.fmt import count, share
from core.jobs.registry import FAILED, SUCCEEDED
from core.jobs.runfiles import read_metrics
from core.study.estimates import (
    Estimate,
    device_note,
    estimate_generation,
    preset_for_device,
    runs_key,
)

POLL_SECONDS = 2.0
KIND_LABELS = {
    "self_output": "Self-Output: sample N answers, keep a correct one",
    "rephrase": "Rephrase: rewrite the ground truth in the model's words",
}
SELECTION_LABELS = {
    "lowest": "Lowest perplexity (paper)",
    "random": "Random correct sample",
    "highest": "Highest perplexity (control)",
}
CONVENTION_LABELS = {
    "response_only": "Response only (paper, for ranking)",
    "prompt": "Prompt-conditioned (as STM)",
}
VERIFY_LABELS = {
    "auto": "Task's own check (MBPP asserts, GSM8K number, MATH boxed)",
    "code": "Run code against the task's asserts (sandbox)",
    "number": "Final number matches the reference's",
    "boxed": "\\boxed{} answer matches the reference's",
    "none": "No check: keep every sample",
}
sel = sidebar_selection()
registry = job_registry()

st.title("Generate data")
st.caption(
    "Make the model's own training data to compare with the ground truth: **Self-Output** samples "
    "N answers per training prompt and keeps the lowest-perplexity correct one; **Rephrase** "
    "shows the model the reference answer and keeps its own rewrite when it is still correct. "
    "Prompts with no correct answer are dropped and counted. Jobs run in the background and "
    "resume where they stopped."
)


def _pct(value: float | None) -> str:
    return "" if value is None else share(value)


@st.cache_data(show_spinner=False, max_entries=64)
def _estimate(config: dict, n_prompts: int | None, root: str, stamp: str) -> Estimate:
    """The form's time estimate from the run folders under `root` (read again when `stamp`,
    their fingerprint, changes)."""
    return estimate_generation(GenDataConfig.from_dict(config), n_prompts, root=root)


def _n_prompts(limit: int | None) -> int | None:
    """Prompts the job will generate for (the sidebar's data cut at `limit`), when known."""
    try:
        n = len(load_dataset_cached(sel).examples)
    except LensError:
        return None
    if limit and limit <= sel.limit:
        return min(n, limit)
    if n < sel.limit:  # the sidebar's selection already holds every row
        return min(n, limit) if limit else n
    return None


def _data_values() -> dict:
    """The sidebar's data as config values."""
    if sel.kind == "task":
        return {"task": sel.task, "split": sel.split, "data": None}
    if not sel.data_path:
        raise LensError(missing_data_message(sel) or NO_FILE)
    return {
        "task": None,
        "data": sel.data_path,
        "prompt_col": sel.prompt_col,
        "response_col": sel.response_col,
        "id_col": sel.id_col or None,
    }


def launch_form() -> None:
    """Settings, the equivalent CLI command and the Start button."""
    with st.container(border=True):
        st.subheader("New generation job")
        c1, c2 = st.columns([2, 1])
        kind = c1.radio(
            "Kind", list(KIND_LABELS), format_func=KIND_LABELS.get, key="gen_kind", horizontal=True
        )
        fitting = preset_for_device(sel.device)
        preset = c2.selectbox(
            "Preset",
            list(PRESETS),
            index=list(PRESETS).index(fitting),
            key="gen_preset",
            help="**paper**: N=32, T=0.7, top-p 0.95, up to 512 new tokens (for a GPU). "
            "**cpu-quick**: N=4, 192 tokens, 2 prompts per batch: sized for 2 CPU cores. The "
            f"form opens on **{fitting}**: {device_note(sel.device)}.",
        )
        base = GenDataConfig.from_preset(preset)
        st.caption(
            f"Data: **{sel.data_label.split(' (first')[0]}** from the sidebar, first "
            f"{count(sel.limit)} · scoring model **{sel.model}**"
        )
        c1, c2, c3, c4 = st.columns(4)
        limit = c1.number_input(
            "Prompts (first N, 0 = all)",
            0,
            100000,
            sel.limit,
            key=f"gen_limit_{sel.limit}",
            help="The sidebar's selection (its 'Examples (first N)').",
        )
        if base.limit and int(limit) != base.limit:
            c1.caption(f"The {preset} preset is sized for {count(base.limit)} prompts.")
        rephrase = kind == "rephrase"
        n_samples = c2.number_input(
            "Samples per prompt (N)",
            1,
            256,
            base.n_samples,
            key=f"gen_n_{preset}",
            disabled=rephrase,
            help="Rephrase writes one answer per prompt.",
        )
        max_new = c3.number_input(
            "Max new tokens", 1, 4096, base.max_new_tokens, key=f"gen_max_{preset}"
        )
        prompt_batch = c4.number_input(
            "Prompts per batch",
            1,
            64,
            base.prompt_batch,
            key=f"gen_batch_{preset}",
            help="Each prompt brings its N samples: the batch is prompts × N sequences.",
        )
        c1, c2, c3, c4 = st.columns(4)
        temperature = c1.number_input("Temperature", 0.05, 2.0, base.temperature, 0.05, key="gen_t")
        top_p = c2.number_input("Top-p", 0.05, 1.0, base.top_p, 0.05, key="gen_top_p")
        seed = c3.number_input("Seed", 0, 2**31 - 1, base.seed, key="gen_seed")
        teacher = c4.text_input(
            "Teacher model (optional)",
            key="gen_teacher",
            placeholder="none: the model generates",
            help="Distillation: this model generates; the sidebar model still ranks samples.",
        ).strip()
        one_answer = rephrase or int(n_samples) == 1
        nothing_to_rank = (
            "Rephrase writes one answer per prompt: there is nothing to choose among."
            if rephrase
            else "One sample per prompt: there is nothing to choose among."
        )
        c1, c2, c3 = st.columns(3)
        verify = c1.selectbox(
            "Correctness check", VERIFIERS, format_func=VERIFY_LABELS.get, key="gen_verify"
        )
        selection = c2.selectbox(
            "Label among correct samples",
            SELECTIONS,
            format_func=SELECTION_LABELS.get,
            disabled=one_answer,
            help=nothing_to_rank if one_answer else None,
            key="gen_selection",
        )
        convention = c3.selectbox(
            "Perplexity for ranking",
            CONVENTIONS,
            format_func=CONVENTION_LABELS.get,
            disabled=one_answer,
            help=(nothing_to_rank + " Its perplexity is still recorded.") if one_answer else None,
            key="gen_convention",
        )
        template = DEFAULT_REPHRASE_TEMPLATE
        if kind == "rephrase":
            template = st.text_area(
                "Rephrase prompt template ({instruction} and {reference} are filled in)",
                DEFAULT_REPHRASE_TEMPLATE,
                height=130,
                key="gen_template",
            )
        name = st.text_input(
            "Set name (optional)", key="gen_name", placeholder="default: <kind>-<data>-<model>-vN"
        ).strip()
        try:
            config = GenDataConfig.from_preset(
                preset,
                kind=kind,
                model=sel.model,
                device=sel.device,
                dtype=sel.dtype,
                teacher=teacher or None,
                limit=int(limit) or None,
                n_samples=int(n_samples),
                max_new_tokens=int(max_new),
                prompt_batch=int(prompt_batch),
                temperature=float(temperature),
                top_p=float(top_p),
                seed=int(seed),
                verify=verify,
                selection=selection,
                convention=convention,
                template=template,
                name=name or None,
                **_data_values(),
            )
        except LensError as exc:
            st.error(str(exc))
            return
        st.caption(_estimate(config.to_dict(), _n_prompts(config.limit), *runs_key()).text())
        st.caption("Same job from the command line:")
        st.code(config.command(submit=True), language="bash")
        start = st.button("Start generation", type="primary", icon=":material/auto_awesome:")
        backend_caption(registry)
        if start:
            try:
                n = preflight(config)
                job, new = registry.submit_once(
                    "generate", config.to_dict(), device=config.device, label=config.describe()
                )
            except LensError as exc:
                st.error(str(exc))
                return
            st.query_params["job"] = job.id
            if new:
                st.toast(f"Job {job.id} queued: {n} prompts.")
            else:
                st.toast(f"The same generation is already {job.status} (job {job.id}).")
            st.rerun()


def generation_jobs() -> list:
    """Generation jobs of the registry, newest first."""
    return [j for j in registry.list() if j.kind == "generate"]


def jobs_frame(jobs: list) -> pd.DataFrame:
    """One row per job: status, prompts done, kept, acceptance rate, elapsed."""
    rows = []
    for job in jobs:
        prog = generation_progress(read_metrics(job.run_dir))
        total = prog.get("total")
        rows.append(
            {
                "job": job.id,
                "status": job.status,
                "progress": (prog["done"] / total) if total else 0.0,
                "prompts": f"{count(prog['done'])}/{count(total)}" if total else "",
                "kept": prog.get("kept"),
                "accepted": _pct(prog.get("acceptance_rate")),
                "elapsed": fmt_seconds(job.elapsed),
                "run": job.label,
                "where": job.where,
                "now": job.message,
            }
        )
    return pd.DataFrame(rows)


def jobs_list() -> None:
    """Generation jobs, refreshed every few seconds; reruns the page when jobs appear."""
    jobs_table(
        generation_jobs,
        jobs_frame,
        state_key="gen_job_ids",
        empty="No generation jobs yet. Start one above, or with `python -m core generate`.",
        column_config={
            "progress": st.column_config.ProgressColumn("progress", min_value=0.0, max_value=1.0)
        },
    )


def job_view(job_id: str) -> None:
    """Status, progress, counts, log tail and actions of one generation job."""

    @st.fragment(run_every=POLL_SECONDS)
    def view() -> None:
        job = watched_job(registry, job_id, "gen_view_status")
        if job is None:
            return
        prog = generation_progress(read_metrics(job.run_dir))
        job_header(registry, job, key_prefix="g-", resume_note="finished prompts are kept.")
        total = prog.get("total")
        if total:
            st.progress(
                min(1.0, prog["done"] / total),
                text=f"{count(prog['done'])} of {count(total)} prompts done",
            )
        if prog.get("samples"):
            c1, c2, c3, c4 = st.columns(4)
            c1.metric("Prompts kept", count(prog.get("kept", 0)))
            c2.metric("Dropped (no correct sample)", count(prog.get("dropped", 0)))
            c3.metric("Samples correct", _pct(prog.get("acceptance_rate")))
            c4.metric("Tokens generated", count(prog.get("tokens", 0)))
        if job.status == FAILED:
            st.error(job.error.splitlines()[0] if job.error else "failed")
        if job.status == SUCCEEDED and prog.get("set"):
            st.success(f"Done: wrote `{prog['set']}`. It is listed below and in the sidebar.")
        job_log(job, lines=30)

    view()


def sets_section() -> None:
    """Generated sets with their provenance, and a preview of one."""
    st.subheader("Generated sets")
    problems: list[str] = []
    sets = list_generated_sets(problems=problems)
    for problem in problems:
        st.warning(f"Skipped a generated set: {problem}")
    if not sets:
        st.info("No generated sets yet.")
        return
    rows = []
    for s in sets:
        p = s.provenance
        rows.append(
            {
                "set": s.name,
                "kind": s.kind,
                "examples": s.n_examples,
                "data": s.data_key,
                "generated by": s.model,
                "N": s.settings.get("num_return_sequences"),
                "accepted": _pct(p.get("acceptance_rate")),
                "kept / prompts": f"{count(p['n_kept'])}/{count(p['n_done'])}"
                if "n_kept" in p
                else "",
                "label": (p.get("scoring") or {}).get("selection", ""),
                "seed": p.get("seed", s.settings.get("seed")),
                "time": fmt_seconds(p.get("wall_seconds")),
                "created": s.created,
            }
        )
    st.dataframe(pd.DataFrame(rows), hide_index=True, width="stretch")
    names = [s.name for s in sets]
    wanted = st.query_params.get("set")
    chosen = st.selectbox(
        "Preview", names, index=names.index(wanted) if wanted in names else 0, key="gen_preview"
    )
    st.query_params["set"] = chosen
    gset = sets[names.index(chosen)]
    st.caption(gset.note)
    try:
        examples = gset.load_examples()
    except LensError as exc:
        st.error(str(exc))
        return
    preview = [
        {
            "id": ex.id,
            "prompt": ex.prompt,
            "response": ex.response,
            "ppl": (ex.meta.get("gendata") or {}).get("ppl"),
            "correct / samples": "{}/{}".format(
                (ex.meta.get("gendata") or {}).get("n_correct", ""),
                (ex.meta.get("gendata") or {}).get("n_samples", ""),
            ),
        }
        for ex in examples[:100]
    ]
    st.dataframe(
        pd.DataFrame(preview),
        hide_index=True,
        width="stretch",
        column_config={"ppl": st.column_config.NumberColumn("ppl", format="%.3f")},
    )
    st.caption(
        f"{count(len(examples))} examples (first 100 shown). Use it as data: choose **Generated set** in "
        f"the sidebar, or train on `{gset.path}`."
    )
    with st.expander("manifest.json"):
        st.code((gset.path / "manifest.json").read_text(encoding="utf-8"), language="json")


launch_form()
st.subheader("Generation jobs")
jobs_list()
chosen_job = job_picker([j for j in registry.list(refresh=False) if j.kind == "generate"])
if chosen_job:
    job_view(chosen_job)
sets_section()
