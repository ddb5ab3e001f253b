"""Where it forgot: which tokens moved. For one run, round and drift probe, the probe items by
token KL from the base model; one item's answer tokens coloured by KL (or by the change of
their log-probability), whose hover adds both models' top-5 once a background pass computed
them; drift by token category, position and domain across the probe; and the training data's
high-perplexity share beside OOD drift across runs."""

import functools

import pandas as pd
import streamlit as st

from components.session import background_runner, ensure_app_navigation, task_result
from core.errors import LensError
from core.jobs.background import DONE, RUNNING, BackgroundTask
from core.scoring.analytics import token_category
from core.study.drift import (
    TOP_K,
    by_category,
    by_domain,
    by_position,
    drift_items,
    drift_share_table,
    drift_steps,
    drift_tasks,
    high_ppl_share,
    item_table,
    load_round,
    probe_kl,
    probe_label,
    round_version,
    token_frame,
)
from core.study.drift_tokens import (
    item_alternatives,
    load_tokenizer,
    round_weights,
    token_texts,
)
from core.study.runs import list_runs
from core.viz.charts import plotly_config
from core.viz.drift import (
    COLOR_MODES,
    KL,
    SHARE_AXES,
    category_chart,
    category_share_chart,
    domain_chart,
    kl_scale_top,
    position_chart,
    render_drift_tokens,
    share_scatter,
)
from core.viz.run_charts import figure_notes

PAGE_ROWS = 7
ITEM_PX = 112  # the table's item column: the numbers beside it stay in view at 1280 px

ensure_app_navigation()
st.title("Where it forgot")
st.caption(
    "Which tokens moved: drift from the base model on the base model's own answers to each "
    "probe's prompts. Pick a run, a round and a probe; items are sorted by mean token "
    "KL(base ‖ tuned). Hover a token for its KL, both models' probability of it and their top-5."
)

try:
    runs = list_runs()
except LensError as exc:
    st.error(str(exc))
    st.stop()
with_drift = {run.run_id: (run, steps) for run in runs if (steps := drift_steps(run.run_dir))}
if not with_drift:
    st.info(
        "No run has drift rounds yet. Drift is measured by every built-in suite's `ood_drift`, "
        "`target_drift` and `text_drift` tasks: train with evaluation on (**Train** page) or "
        "evaluate an adapter on the **Runs** page."
    )
    st.stop()

query = st.query_params
ids = list(with_drift)
wanted_run = query.get("run")
c1, c2, c3, c4 = st.columns([3, 1.1, 2.4, 1.8])
run_id = c1.selectbox(
    "Run",
    ids,
    index=ids.index(wanted_run) if wanted_run in ids else 0,
    key="drift-run",
    format_func=lambda r: f"{with_drift[r][0].label} · {r}",
)
if wanted_run and wanted_run not in ids:
    st.caption(f"Run '{wanted_run}' (from the link) has no drift rounds: showing another run.")
run, steps = with_drift[run_id]
same_run = wanted_run == run_id
wanted_step = query.get("step") if same_run else None
step = c2.selectbox(
    "Round (step)",
    steps,
    key=f"drift-step-{run_id}",
    index=steps.index(int(wanted_step))
    if wanted_step in {str(s) for s in steps}
    else len(steps) - 1,
    help="Evaluation rounds with drift; step 0 is the base model itself (no drift).",
)
try:
    result = load_round(run.run_dir, step)
except LensError as exc:
    st.error(str(exc))
    st.stop()
tasks = {t.name: t for t in drift_tasks(result)}
names = list(tasks)
wanted_probe = query.get("probe", "ood_drift")
probe = c3.selectbox(
    "Probe",
    names,
    key=f"drift-probe-{run_id}-{step}",
    index=names.index(wanted_probe) if wanted_probe in names else 0,
    format_func=lambda n: f"{n} · {probe_label(n)}",
)
modes = list(COLOR_MODES)
mode = c4.radio(
    "Colour tokens by",
    modes,
    format_func=COLOR_MODES.get,
    key="drift-color",
    index=modes.index(query.get("color", KL)) if query.get("color") in modes else 0,
    help="Token KL(base ‖ tuned) on a log scale, or the change of the base token's "
    "log-probability (red: the tuned model lost confidence in it).",
)
task = tasks[probe]
try:
    items, item_notes = drift_items(task)
except LensError as exc:
    st.query_params.update({"run": run_id, "step": str(step), "probe": probe, "color": mode})
    st.error(str(exc))
    st.stop()
for note in item_notes:
    st.warning(note, icon=":material/warning:")
table = item_table(items)
order = table["id"].tolist()
by_id = {it.id: it for it in items}
wanted_item = query.get("item") if same_run else None
item_key = f"drift-item-{run_id}-{step}-{probe}"


def _pick_row(key: str, target: str, rows: list[str]) -> None:
    """A click on a table row shows that item (a callback: runs before the script)."""
    picked = st.session_state[key].selection.rows
    if picked:
        st.session_state[target] = rows[picked[0]]


model = str(run.config.get("model") or "default")
tokenizer, token_problem = None, ""
try:
    tokenizer = load_tokenizer(model)
    token_texts(tokenizer, sorted({i for it in items for i in it.ids}))  # every id decodes
except LensError as exc:
    tokenizer, token_problem = None, str(exc)
    st.warning(f"Token texts unavailable, ids shown instead: {token_problem}")


def texts(ids: list[int]) -> list[str]:
    """The tokens' texts (their ids when the run's tokenizer is not available)."""
    return token_texts(tokenizer, ids) if tokenizer is not None else [f"⟨{i}⟩" for i in ids]


view, picker = st.columns([1.1, 1], gap="medium")
with picker:
    if st.session_state.get(item_key) not in order:  # first visit: the URL's item, else the top
        st.session_state[item_key] = wanted_item if wanted_item in order else order[0]
    pages = max(1, -(-len(table) // PAGE_ROWS))
    pick, turn = st.columns([3, 1]) if pages > 1 else (st.container(), None)
    item_id = pick.selectbox(
        "Probe item (largest KL first)",
        order,
        key=item_key,
        format_func=lambda i: f"{i} · KL {by_id[i].mean_kl:.3f}",
    )
    page = 1
    if turn is not None:
        page = int(
            turn.number_input(
                f"Page of {pages}", 1, pages, 1, key=f"drift-page-{run_id}-{step}-{probe}"
            )
        )
    rows = table.iloc[(page - 1) * PAGE_ROWS : page * PAGE_ROWS]
    shown = pd.DataFrame(
        {
            "item": [
                ("▶ " if i == item_id else "") + i.removeprefix(f"{d}/")
                for i, d in zip(rows["id"], rows["domain"], strict=True)
            ],
            "domain": rows["domain"],
            "KL": rows["kl"],
            "top-1": 100 * rows["top1"],
            "Δ NLL": rows["dnll"].round(3) + 0.0,
        }  # + 0.0: no "-0.000"
    )
    table_key = f"drift-table-{run_id}-{step}-{probe}-{page}"
    st.dataframe(
        shown,
        hide_index=True,
        width="stretch",
        height=35 * (len(shown) + 1) + 3,
        key=table_key,
        selection_mode="single-row",
        on_select=functools.partial(_pick_row, table_key, item_key, rows["id"].tolist()),
        column_config={
            "item": st.column_config.TextColumn(
                width=ITEM_PX, help="probe item id (its domain prefix in the next column)"
            ),
            "domain": st.column_config.TextColumn(width=76),
            "KL": st.column_config.NumberColumn(
                format="%.3f", width=52, help="mean token KL(base ‖ tuned), nats"
            ),
            "top-1": st.column_config.NumberColumn(
                format="%.0f%%",
                width=48,
                help="answer tokens whose most likely next token is still the base's",
            ),
            "Δ NLL": st.column_config.NumberColumn(
                format="%+.3f",
                width=58,
                help="Δ NLL of the base's answer, nats/token (< 0: more sure of it)",
            ),
        },
    )
    st.caption(
        f"{len(table)} items of {probe_label(probe)} at step {step}; click a row to show it."
    )
st.query_params.update(
    {"run": run_id, "step": str(step), "probe": probe, "item": item_id, "color": mode}
)

item = by_id[item_id]
with view:
    weights = round_weights(run.run_dir, step, result)
    key = f"drift-top:{run.run_dir}:{step}:{probe}:{item_id}:{round_version(run.run_dir, step)}"
    runner = background_runner()
    bg = runner.get(key)
    if bg is None:

        def work(
            task: BackgroundTask,
            rid: str = str(run.run_dir),
            name: str = model,
            at: int = step,
            which: str = probe,
            wanted: str = item_id,
        ) -> object:  # the choice bound now: a rerun may change the page's names meanwhile
            def early(partial: object) -> None:
                task.partial = partial

            def status(text: str) -> None:
                task.message = text

            return item_alternatives(
                rid, name, at, which, wanted, k=TOP_K, on_prompt=early, status=status
            )

        bg = runner.start(key, f"Top-{TOP_K} of {item_id}", work)
    # what the pass has so far (its status, error or Retry are drawn under the view)
    found = bg.result if bg.status == DONE else bg.partial if bg.status == RUNNING else None
    hovers = found.hovers() if found is not None else None
    if hovers is not None:
        pending = ""
    elif found is not None and found.note and not weights.kind:
        pending = f"top-{TOP_K}: not available ({weights.reason})"
    elif bg.status == "failed":
        pending = f"top-{TOP_K}: failed (see below)"
    else:
        pending = f"base vs tuned top-{TOP_K}: computing…"
    answer = texts(list(item.ids))
    categories = None if token_problem else [token_category(t) for t in answer]
    facts = [
        ("", item.id),
        ("domain", item.domain),
        ("tokens", str(item.tokens)),
        ("mean KL", f"{item.mean_kl:.3f} nats"),
        ("top-1", f"{100 * item.top1:.0f}%"),
        ("Δ NLL", f"{item.dnll:+.3f}"),
    ]
    plain = found.plain_text if found is not None else probe == "text_drift"
    st.html(
        render_drift_tokens(
            answer,
            item.kl,
            item.dlp,
            mode=mode,
            top=kl_scale_top([float(it.kl.max()) for it in items]),
            hovers=hovers,
            pending=pending,
            facts=facts,
            categories=categories,
            prompt=None if found is None or plain else found.prompt,
            prompt_label="prompt the base model answered",
            right_column=None,
        )
    )
    task_result(bg, early=True)  # progress while it runs; its one-line error and Retry if it failed
    if found is not None and found.note:
        st.caption(f":material/info: {found.note}")
    elif hovers is not None:
        st.caption(f"Top-{TOP_K} from {found.weights}: hover a token.")
    if plain and found is not None:
        st.caption("Plain-text passage: drift is measured on every token after the first.")


@st.cache_data(show_spinner="Drift across the probe…", max_entries=16)
def aggregates(
    run_dir: str, step: int, probe: str, version: object, model: str, with_texts: bool
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """By category, by position and by domain for one probe of one round (cached per file)."""
    found = next(t for t in drift_tasks(load_round(run_dir, step)) if t.name == probe)
    chosen, _ = drift_items(found)
    if with_texts:
        tok = load_tokenizer(model)
        frame = token_frame(chosen, lambda ids: token_texts(tok, ids))
    else:
        frame = token_frame(chosen, lambda ids: ["" for _ in ids])
    return by_category(frame), by_position(frame), by_domain(chosen)


def chart(name: str, fig: object) -> None:
    """One chart under a stable key, then its notes as a caption."""
    st.plotly_chart(fig, key=f"drift-chart-{name}", config=plotly_config(f"drift_{name}"))
    notes = figure_notes(fig)
    if notes:
        st.caption("  \n".join(notes))


overall = probe_kl(items)
st.subheader(f"Across the probe: {probe} at step {step}")
interval = (
    f"[{overall.low:.3f}, {overall.high:.3f}]" if overall.low is not None else f"({overall.reason})"
)
st.caption(
    f"{len(items)} items, {sum(it.tokens for it in items)} answer tokens; mean token KL "
    f"{overall.estimate:.3f} nats {interval}. Error bars: 95% bootstrap intervals over probe "
    "items. Token categories: numbers, symbols, words and whitespace."
)
categories_frame, positions_frame, domains_frame = aggregates(
    str(run.run_dir), step, probe, round_version(run.run_dir, step), model, not token_problem
)
a, b = st.columns(2)
with a:
    if token_problem:
        st.caption("By token category: needs the token texts (see above).")
    else:
        chart("category", category_chart(categories_frame))
with b:
    if not token_problem:
        chart("category-share", category_share_chart(categories_frame))
a, b = st.columns(2)
with a:
    chart("position", position_chart(positions_frame))
with b:
    chart("domain", domain_chart(domains_frame))

st.subheader("Training data and drift across runs")
share = high_ppl_share(run, runs)
a, b = st.columns([1, 2], gap="medium")
with a:
    st.markdown(f"**{run.label} · {run.run_id}**")
    if share.data is None:
        st.info(
            f"High-perplexity share of the training data (ppl > τ = {share.tau:g}): not "
            f"recorded: {share.reason}."
        )
    else:
        st.markdown(
            f"**{100 * share.data:.1f}%** of the training data's response tokens have "
            f"base perplexity > τ = {share.tau:g}."
        )
        if share.trained is None:
            st.markdown(
                "Among the tokens trained on (loss): not exact for this method (a random "
                "control masks random positions)."
            )
        else:
            st.markdown(
                f"**{100 * share.trained:.1f}%** of the tokens trained on (loss) are "
                "above τ" + (" (STM masks all of them)." if share.trained == 0 else ".")
            )
        st.caption(f"From {share.source}.")
with b:
    shares, left_out = drift_share_table(runs)
    axes = list(SHARE_AXES)
    wanted_axis = query.get("share", "trained")
    axis = st.radio(
        "x: the high-ppl share of",
        axes,
        horizontal=True,
        key="drift-share-axis",
        index=axes.index(wanted_axis) if wanted_axis in axes else 0,
        format_func=lambda x: {
            "trained": "the tokens trained on (loss)",
            "data": "the training data",
        }[x],
    )
    st.query_params["share"] = axis
    chart("share", share_scatter(shares, axis, current=run.run_id))
    if left_out:
        st.caption("Not in the scatter: " + " ".join(left_out))
