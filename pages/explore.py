"""Explore: token perplexity of ground-truth vs model-generated responses, example by example
(heatmaps side by side, per-token spike plot) and across the dataset (the paper's Table 1,
distributions, share above τ, token categories).

All scores come from background tasks (components.session); widget changes only re-slice
their cached results and never re-score. Everything that scales with the dataset (the example
table, search, summary, dataset analytics of every source) reads the score store's columns
(`TokenScores`); a `ScoredExample` record is built only for the example on screen. The table
shows one page of `PAGE_SIZE` rows; filtering and sorting run on the whole set. URL state: ?tau= (shared with other pages), ?ex= (the
selected example), ?gen= (generation settings) and ?view= (the open tab).

What does not need Streamlit (the filter and sort, the summary line, the analytics tab's source
filters, token frame and tables as shown) is `core.scoring.explore`; this page caches it and
keeps the widgets.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import streamlit as st

from components.layout import fit_columns
from components.live_generation import live_answer
from components.session import (
    Selection,
    background_result,
    background_runner,
    current_model,
    scores_or_wait,
    sidebar_selection,
    url_tau,
)
from core import fmt
from core.data.records import Example, ScoredExample
from core.datagen.live import LiveResult, verdict_line
from core.datagen.store import (
    GenerationStore,
    StoredGeneration,
    answers_by_settings,
    answers_signature,
    file_data_key,
    generate_and_store,
    generation_key,
    list_generated_sets,
    score_answers_by_settings,
    score_generated_sets,
    settings_label,
    task_data_key,
)
from core.errors import LensError
from core.jobs.background import DONE, BackgroundTask
from core.model.generation import GenerationConfig, decode_settings, encode_settings
from core.model.loading import MODEL_SLOT, LoadedModel, resolve_device, resolve_dtype
from core.scoring.analytics import (
    example_columns,
    example_shares,
    scores_signature,
    seq_ppl_ticks,
    share_vs_tau,
)
from core.scoring.cache import ScoreCache
from core.scoring.explore import (
    SORTS,
    above_table_display,
    count_cut,
    coverage_text,
    cut_label,
    dataset_stats,
    drop_cut,
    filter_examples,
    keep_shared,
    page_holding,
    search_texts,
    seq_ppl_caption,
    sequence_table_display,
    shared_by_default,
    shared_ids,
    source_examples,
    summary_line,
    token_frame,
    truncated_note,
)
from core.scoring.tokens import TokenScores
from core.viz.charts import (
    category_share_chart,
    plotly_config,
    ppl_cdf,
    ppl_histogram,
    seq_ppl_box,
    share_vs_tau_chart,
    source_label,
    spike_plot,
)
from core.viz.heatmap import render_token_heatmap

TAU_RANGE = (1.0, 20.0)
TABS = ("Examples", "GT vs generated", "Dataset analytics")
MAX_HEATMAP_TOKENS = 3000
PAGE_SIZE = 50  # rows of the example table on one page
# Paper, Table 1 (Llama-3-8B-Instruct): sequence perplexity mean (variance) per data source.
PAPER_TABLE_1 = {
    "mbpp": "GT 4.83 (7.04) · Rephrase 1.69 (0.16) · Self-Output 1.16 (0.01)",
    "math": "GT 2.45 (0.81) · Rephrase 2.11 (9.28) · Self-Output 1.34 (0.03)",
}


# ------------------------------------------------------------------------------------------
# Background work: one helper for every task on this page
# ------------------------------------------------------------------------------------------


def _loaded_model(sel: Selection) -> LoadedModel | None:
    lm = MODEL_SLOT.current
    if lm is None or lm.name != sel.model:
        return None
    try:
        device = resolve_device(sel.device)
        dtype = resolve_dtype(sel.dtype, device)
    except LensError:
        return None
    return lm if lm.device == device and lm.dtype == dtype else None


def model_or_wait(sel: Selection) -> LoadedModel | None:
    """The selected model if it is loaded; otherwise load it in the background (None meanwhile)."""
    lm = _loaded_model(sel)
    if lm is not None:
        return lm
    key = f"load-model:{sel.model}|{sel.device}|{sel.dtype}"
    runner = background_runner()
    task = runner.get(key)
    if task is not None and task.status == DONE:
        runner.forget(key)  # it was loaded, then another model took the slot: load it again
    # The task returns nothing, so a finished task never keeps an evicted model alive.
    background_result(key, f"Loading {sel.model}", lambda task: (current_model(sel), None)[1])
    return None


# ------------------------------------------------------------------------------------------
# URL state: tau, example, generation settings
# ------------------------------------------------------------------------------------------


def tau_slider() -> float:
    """τ slider kept in sync with ?tau= (shared with the other pages)."""
    tau_url = url_tau()
    if st.session_state.get("tau_slider") != tau_url:
        st.session_state["tau_slider"] = tau_url

    def on_change() -> None:
        st.query_params["tau"] = f"{st.session_state['tau_slider']:g}"

    tau = st.slider(
        "τ: token-perplexity threshold",
        TAU_RANGE[0],
        max(TAU_RANGE[1], tau_url),  # a larger τ from the URL (the masking studio) is kept
        step=0.1,
        key="tau_slider",
        on_change=on_change,
        help="Tokens with perplexity > τ are underlined in the heatmaps and counted as "
        "'above τ'; Selective Token Masking drops them from the loss. Paper default: 2.5.",
    )
    st.query_params["tau"] = f"{tau:g}"
    return float(tau)


def selected_example_id(ids: Sequence[str], data_label: str) -> str:
    """?ex= if it names an example, else the first one (with an error for an unknown id)."""
    wanted = st.query_params.get("ex")
    if wanted is None or wanted == "":
        chosen = ids[0]
    elif wanted in ids:
        chosen = wanted
    else:
        st.error(
            f"No example with id '{wanted}' in {data_label}; showing '{ids[0]}' instead.",
            icon=":material/error:",
        )
        chosen = ids[0]
    st.query_params["ex"] = chosen
    return chosen


def _set_example(ex_id: str) -> None:
    st.query_params["ex"] = ex_id


def example_navigator(ids: Sequence[str], current: str, seq: dict[str, float], key: str) -> None:
    """Jump-to-id picker (type to search) with previous / next buttons; all write ?ex=."""
    if st.session_state.get(key) != current:
        st.session_state[key] = current
    pos = ids.index(current)
    # wide enough buttons for "Previous" at 1280 px (a narrower one read "Prev…")
    c1, c2, c3 = st.columns([4.6, 1.2, 1.2], vertical_alignment="bottom")
    c1.selectbox(
        "Example (type an id to jump)",
        ids,
        key=key,
        format_func=lambda i: f"{i}  ·  seq ppl {seq[i]:.2f}",
        on_change=lambda: _set_example(st.session_state[key]),
    )
    c2.button(
        "Previous",
        key=f"{key}:prev",
        icon=":material/chevron_left:",
        disabled=pos == 0,
        on_click=_set_example,
        args=(ids[max(pos - 1, 0)],),
        width="stretch",
    )
    c3.button(
        "Next",
        key=f"{key}:next",
        icon=":material/chevron_right:",
        disabled=pos == len(ids) - 1,
        on_click=_set_example,
        args=(ids[min(pos + 1, len(ids) - 1)],),
        width="stretch",
    )


def url_settings() -> GenerationConfig:
    """Generation settings from ?gen= (defaults, with a warning, if malformed)."""
    try:
        return decode_settings(st.query_params.get("gen"))
    except LensError as exc:
        st.warning(str(exc))
        return GenerationConfig()


# ------------------------------------------------------------------------------------------
# Derived frames (cached per selection + tau; never re-score)
# ------------------------------------------------------------------------------------------


@st.cache_data(show_spinner=False, max_entries=8)
def cached_example_columns(sig: str, _scores: TokenScores) -> pd.DataFrame:
    """The τ-independent columns of the example table, once per selection (`sig`)."""
    return example_columns(_scores)


def cached_example_table(sig: str, tau: float, scores: TokenScores) -> pd.DataFrame:
    """`core.scoring.analytics.example_table` from the columns: the cached τ-independent
    columns plus each example's share > τ (vectorised, a few ms at 10k examples)."""
    table = cached_example_columns(sig, scores).copy()
    table.insert(4, "share > τ", example_shares(scores, tau))
    return table


@st.cache_data(show_spinner=False, max_entries=8)
def search_index(sig: str, _scores: TokenScores) -> pd.Series:
    """Lower-cased prompt + response text per example, for the text search."""
    return search_texts(_scores)


@st.cache_data(show_spinner=False, max_entries=32)
def cached_dataset_stats(sig: str, tau: float, _groups: dict[str, TokenScores]) -> dict:
    """Table 1, share above τ and category shares of the groups."""
    return dataset_stats(_groups, tau)


@st.cache_data(show_spinner=False, max_entries=8)
def cached_token_frame(sig: str, _groups: dict[str, TokenScores]) -> pd.DataFrame:
    """Source and perplexity of every response token (what the histogram and CDF read)."""
    return token_frame(_groups)


@st.cache_data(show_spinner=False, max_entries=32)
def tau_curves(sig: str, _groups: dict[str, TokenScores]) -> pd.DataFrame:
    """Share above τ on a log grid of τ (the '% masked vs τ' curve)."""
    return share_vs_tau(_groups, np.geomspace(1.05, 1000, 120))


@st.cache_data(show_spinner=False, ttl=60)
def data_key_of(kind: str, task: str, split: str, data_path: str) -> str:
    """The data key generated sets are filed under (see core.generated)."""
    if kind == "task":
        return task_data_key(task, split)
    return file_data_key(data_path)


# ------------------------------------------------------------------------------------------
# Generated responses: on-demand answers and stored generated sets, scored in the background
# ------------------------------------------------------------------------------------------


def generation_task_key(sel: Selection, example: Example, config: GenerationConfig) -> str:
    """Runner key of the on-demand generation for one example and settings."""
    model = f"{sel.model}|{sel.device}|{sel.dtype}"
    return "generate:" + generation_key(model, example.id, example.prompt, config)


def generation_task(
    sel: Selection, example: Example, config: GenerationConfig, start: bool, restart: bool = False
) -> LiveResult | None:
    """The model's answer to one example, streamed onto the page while it is generated (a Stop
    button ends it), then stored, scored and checked against the task's verifier
    (`components.live_generation`); None while running or if not started."""
    return live_answer(
        generation_task_key(sel, example, config),
        f"Generating an answer to {example.id}",
        load=lambda: current_model(sel),
        example=example,
        config=config,
        task=sel.task if sel.kind == "task" else None,
        start=start,
        restart=restart,
    )


def batch_task_key(sel: Selection, config: GenerationConfig) -> str:
    """Runner key of the batch generation for the selection and settings (one at a time)."""
    return f"generate-batch:{sel.key()}:{encode_settings(config)}"


def batch_generation_task(
    sel: Selection, examples: Sequence[Example], config: GenerationConfig, start: bool
) -> Any:
    """Generate (or reuse) answers for many examples in the background, saving as it goes."""

    def work(task: BackgroundTask) -> int:
        task.message = f"loading {sel.model}"
        lm = current_model(sel)
        task.message = f"generating ({settings_label(config)})"
        return len(generate_and_store(lm, examples, config, progress=task.progress))

    label = f"Generating answers for {len(examples)} examples"
    return background_result(batch_task_key(sel, config), label, work, start=start)


def scored_generations(
    sel: Selection, gt: Sequence[Example], found: dict[str, list[StoredGeneration]]
) -> dict[str, TokenScores] | None:
    """Every stored answer for the examples on screen, scored, grouped by settings."""
    by_settings = answers_by_settings(found, list(gt))
    if not by_settings:
        return {}
    sig = answers_signature(by_settings)

    def work(task: BackgroundTask) -> dict[str, TokenScores]:
        return score_answers_by_settings(current_model(sel), by_settings, cache=ScoreCache())

    return background_result(
        f"score-generated:{sel.key()}:{sig}", "Scoring generated answers", work
    )


def scored_sets(
    sel: Selection, lm: LoadedModel, gt: Sequence[Example], problems: list[str]
) -> dict[str, TokenScores] | None:
    """The newest stored Self-Output / Rephrase set of each kind made by this model from this
    data, matched to the examples on screen and scored (None while scoring)."""
    try:
        key = data_key_of(sel.kind, sel.task, sel.split, sel.data_path)
    except OSError as exc:
        problems.append(f"cannot read the data file for generated sets: {exc}")
        return {}
    newest = {}
    for gset in list_generated_sets(key, model_fingerprint=lm.fingerprint, problems=problems):
        newest.setdefault(gset.kind, gset)
    if not newest:
        return {}
    shown = list(gt)
    names = ",".join(f"{g.name}@{g.created}" for g in newest.values())

    def work(task: BackgroundTask) -> dict[str, TokenScores]:
        return score_generated_sets(current_model(sel), newest, shown, cache=ScoreCache())

    return background_result(f"score-sets:{sel.key()}:{names}", "Scoring generated datasets", work)


# ------------------------------------------------------------------------------------------
# Page
# ------------------------------------------------------------------------------------------


def show_heatmap(example: ScoredExample, tau: float, *, show_prompt: bool = True) -> None:
    """The token heatmap of one scored example."""
    st.html(
        render_token_heatmap(
            example, tau=tau, show_prompt=show_prompt, max_tokens=MAX_HEATMAP_TOKENS
        )
    )


def _signature(gt: TokenScores) -> str:
    """`scores_signature` of the ground truth, once per scores object."""
    sig = _SIGNATURES.get(gt)
    if sig is None:
        sig = _SIGNATURES[gt] = scores_signature({"ground_truth": gt})
    return sig


_SIGNATURES: weakref.WeakKeyDictionary[TokenScores, str] = weakref.WeakKeyDictionary()


def _turn_page(step: int, n_pages: int) -> None:
    page = int(st.session_state.get("explore_page", 1)) + step
    st.session_state["explore_page"] = min(max(page, 1), n_pages)


def examples_tab(sel: Selection, gt: TokenScores, tau: float, current: str) -> None:
    """Browse: filter / sort / search the examples (on the whole set's columns), one page of
    the table at a time, pick one, see its heatmap."""
    sig = _signature(gt)
    table = cached_example_table(sig, tau, gt)
    seq_map = dict(zip(table["id"], table["seq ppl"], strict=True))

    c1, c2, c3 = st.columns([3, 3, 2])
    query = c1.text_input(
        "Search prompt and response text",
        placeholder="e.g. lambda, import, for i in",
        key="explore_search",
    )
    stops = seq_ppl_ticks(table["seq ppl"].to_numpy(dtype=np.float64))
    if len(stops) > 1:
        lo, hi = c2.select_slider(
            "Sequence perplexity range (log-spaced stops)",
            options=stops,
            value=(stops[0], stops[-1]),
            format_func=lambda v: f"{v:g}",
            key="explore_range",
        )
    else:
        lo, hi = -math.inf, math.inf
    sort = c3.selectbox("Sort", list(SORTS), key="explore_sort")

    texts = search_index(sig, gt) if query.strip() else None
    view = filter_examples(table, lo, hi, texts=texts, query=query, sort=sort)

    n_pages = max(1, math.ceil(len(view) / PAGE_SIZE))
    view_key = (query.strip().lower(), lo, hi, sort)
    if st.session_state.get("explore_view") != view_key:  # a new filter or order: page 1
        if "explore_view" in st.session_state:
            st.session_state["explore_page"] = 1
        st.session_state["explore_view"] = view_key
    if "explore_page" not in st.session_state:  # open on the page that holds ?ex=
        st.session_state["explore_page"] = page_holding(view["id"].tolist(), current, PAGE_SIZE)
    if not 1 <= st.session_state["explore_page"] <= n_pages:  # the filter left fewer pages
        st.session_state["explore_page"] = min(
            max(int(st.session_state["explore_page"]), 1), n_pages
        )
    page = int(st.session_state["explore_page"])
    shown = view.iloc[(page - 1) * PAGE_SIZE : page * PAGE_SIZE]
    st.session_state["explore_table_ids"] = shown["id"].tolist()

    def on_select() -> None:
        rows = st.session_state["explore_table"].selection.rows
        ids_on_page = st.session_state.get("explore_table_ids", [])
        if rows and rows[0] < len(ids_on_page):
            _set_example(ids_on_page[rows[0]])

    first = (page - 1) * PAGE_SIZE + 1
    st.caption(
        f"{len(view):,} of {len(table):,} examples match"
        + (f" · rows {first:,}–{first + len(shown) - 1:,}" if len(view) > PAGE_SIZE else "")
        + " · click a row to open it · **Sort** orders the whole set, a column header this page"
    )
    if view.empty:
        st.info("No example matches the search and the perplexity range.")
    else:
        st.dataframe(
            shown,
            key="explore_table",
            on_select=on_select,
            selection_mode="single-row",
            hide_index=True,
            width="stretch",
            height=min(38 + 35 * len(shown), 320),
            # every column in view at 1280 px: the id pinned, the prompt capped (hover a cell
            # for all of it), short headers with the long names as help
            column_config={
                "id": st.column_config.TextColumn("id", width="small", pinned=True),
                "prompt": st.column_config.TextColumn(
                    "prompt", width=300, help="hover a cell for the whole prompt"
                ),
                "seq ppl": st.column_config.NumberColumn("seq ppl", format="%.2f"),
                "tokens": st.column_config.NumberColumn("tokens", format="%d"),
                "share > τ": st.column_config.ProgressColumn(
                    f"share > τ={tau:g}",
                    min_value=0.0,
                    max_value=1.0,
                    format="percent",
                    width=130,
                    help=f"share of the response's tokens with ppl > τ = {tau:g}",
                ),
                "max token ppl": st.column_config.NumberColumn(
                    "max ppl", format="%.3g", help="the largest token perplexity in the response"
                ),
                "truncated": st.column_config.CheckboxColumn(
                    "cut", help="truncated to the model's context length"
                ),
            },
        )
    if n_pages > 1:
        p1, p2, p3, _ = st.columns([1.5, 1.6, 1.5, 3.4], vertical_alignment="bottom")
        p1.button(
            "Previous page",
            key="explore_page_prev",
            icon=":material/chevron_left:",
            disabled=page == 1,
            on_click=_turn_page,
            args=(-1, n_pages),
            width="stretch",
        )
        p2.number_input(f"Page (of {n_pages:,})", 1, n_pages, step=1, key="explore_page")
        p3.button(
            "Next page",
            key="explore_page_next",
            icon=":material/chevron_right:",
            disabled=page == n_pages,
            on_click=_turn_page,
            args=(1, n_pages),
            width="stretch",
        )
    ids = table["id"].tolist()
    example_navigator(ids, current, seq_map, key="ex_pick_browse")
    show_heatmap(gt.example(ids.index(current)), tau)


def generation_form(config: GenerationConfig) -> GenerationConfig | None:
    """Settings form; returns the new settings when submitted (None otherwise). The decoding
    choice sits above the form, so choosing greedy greys out the sampling-only fields at once
    (a widget inside a form only takes effect on submit)."""
    st.markdown(
        "**Generate the model's own answer** to this prompt (streams here as it is "
        "generated, can be stopped, and is checked against the task's tests)"
    )
    mode = st.radio(
        "Decoding",
        ["greedy", "sampled"],
        index=int(config.do_sample),
        horizontal=True,
        key="generation_decoding",
        help="Greedy is deterministic (what evaluation uses); sampling uses temperature, "
        "top_p and seed (the paper's Self-Output sampled at T 0.7, top-p 0.95).",
    )
    greedy = mode == "greedy"
    sampling_only = "sampling only: greedy decoding ignores it" if greedy else "sampling only"
    with st.form("generation_form"):
        c = st.columns(4)
        max_new = c[0].number_input("max_new_tokens", 1, 4096, config.max_new_tokens, step=32)
        temperature = c[1].number_input(
            "temperature",
            0.05,
            2.0,
            float(config.temperature),
            0.05,
            help=sampling_only,
            disabled=greedy,
        )
        top_p = c[2].number_input(
            "top_p", 0.05, 1.0, float(config.top_p), 0.05, help=sampling_only, disabled=greedy
        )
        seed = c[3].number_input(
            "seed", 0, 2**31 - 1, config.seed, help=sampling_only, disabled=greedy
        )
        submitted = st.form_submit_button("Generate", type="primary", icon=":material/bolt:")
    if not submitted:
        return None
    try:
        return GenerationConfig(
            max_new_tokens=int(max_new),
            do_sample=not greedy,
            temperature=float(temperature),
            top_p=float(top_p),
            seed=int(seed),
        )
    except LensError as exc:
        st.error(str(exc))
        return None


def source_column(example: ScoredExample, title: str, tau: float, note: str = "") -> None:
    """One source's heading (with a note) and heatmap; the prompt is shown once above."""
    st.markdown(f"**{title}**" + (f" · :gray[{note}]" if note else ""))
    show_heatmap(example, tau, show_prompt=False)


def compare_tab(sel: Selection, gt: TokenScores, tau: float, current: str, lm: LoadedModel) -> None:
    """The same prompt answered by the ground truth, the model itself and any generated sets."""
    ids = list(gt.ids)
    seq = dict(zip(ids, gt.seq_ppl().tolist(), strict=True))
    example_navigator(ids, current, seq, key="ex_pick_compare")
    truth = gt.example(ids.index(current))  # the one record this tab builds
    source = truth.to_example()
    with st.expander("Prompt", expanded=True):
        st.code(source.prompt, language=None, wrap_lines=True)

    config = url_settings()
    submitted = generation_form(config)
    if submitted is not None:
        config = submitted
        st.query_params["gen"] = encode_settings(config)
    store = GenerationStore()
    stored = store.find(lm.cache_key, source, config)
    others = [
        g
        for g in store.for_example(lm.cache_key, source.id, source.prompt)
        if g.settings != config.to_dict()
    ]
    if others:
        cols = st.columns([2] + [2] * min(len(others), 4) + [max(1, 6 - len(others))])
        cols[0].caption("Also stored for this example:")
        for col, g in zip(cols[1:], others[:4], strict=False):
            col.button(
                g.label,
                key=f"show-gen:{g.label}",
                on_click=_set_settings,
                args=(encode_settings(g.config),),
            )

    key = generation_task_key(sel, source, config)
    started = submitted is not None or stored is not None or background_runner().get(key)
    result = generation_task(
        sel, source, config, start=bool(started), restart=submitted is not None
    )
    generated = check = None
    if result is not None and result.stopped:
        stored = None
        st.markdown("**Model's own answer** · :gray[stopped]")
        st.code(result.text or "(nothing yet)", language=None, wrap_lines=True)
        st.info(
            f"Stopped after {fmt.count(result.n_tokens)} tokens, so it was not kept, scored or "
            "checked. Press **Generate** to start again."
        )
    elif result is not None:
        stored, generated, check = result.stored, result.scored, result.check
        if result.tokens_per_s is not None:
            st.caption(
                f"Generated {fmt.count(result.n_tokens)} tokens in {fmt.duration(result.seconds)} "
                f"({fmt.num(result.tokens_per_s, 3)} tokens/s)."
            )
        if generated is None and stored is not None:
            st.warning(
                f"The model's answer {stored.text[:60]!r} is empty or only whitespace, so there "
                "is nothing to score. Try sampling or more new tokens."
            )
    elif not started:
        st.info(
            f"No answer generated yet with these settings ({settings_label(config)}). "
            "Press **Generate**: it runs in the background and is kept for next time."
        )

    problems: list[str] = []
    sets = scored_sets(sel, lm, source_examples(gt), problems)
    for problem in problems:
        st.warning(f"Skipped a generated dataset: {problem}")
    columns: list[tuple[str, ScoredExample, str]] = [("ground_truth", truth, "")]
    if generated is not None and stored is not None:
        note = settings_label(stored.config)
        if not stored.finished:
            note += " · stopped at max_new_tokens (cut off)"
        if check is not None:  # the task's verifier: "passes its tests" / "fails its tests"
            note += f" · {verdict_line(check, generated.seq_ppl, truth.seq_ppl) or check.label}"
        columns.append(("generated", generated, note))
    for kind, scores in (sets or {}).items():
        if current in scores.ids:  # one record: the answer on screen
            match = scores.example(scores.ids.index(current))
            columns.append((kind, match, "stored generated set"))

    titles = {"ground_truth": "Ground truth", "generated": "Model's own answer"}
    for start in range(0, len(columns), 2):
        row = st.columns(2, gap="medium")
        for col, (kind, example, note) in zip(row, columns[start : start + 2], strict=False):
            with col:
                source_column(example, titles.get(kind, source_label(kind)), tau, note)
    if len(columns) > 1:
        st.plotly_chart(
            spike_plot({kind: ex for kind, ex, _ in columns}, tau=tau),
            config=plotly_config(f"spike_plot_{current}"),
        )
        answers = [
            (titles.get(kind, source_label(kind)), ex.seq_ppl) for kind, ex, _ in columns[1:]
        ]
        st.caption(seq_ppl_caption(truth.seq_ppl, answers))


def _set_settings(value: str) -> None:
    st.query_params["gen"] = value


def analytics_tab(sel: Selection, gt: TokenScores, tau: float, lm: LoadedModel) -> None:
    """Dataset-level comparison of ground truth (its columns) and every generated source."""
    store = GenerationStore()
    examples = source_examples(gt)
    found = store.for_examples(lm.cache_key, examples)
    generated = scored_generations(sel, examples, found)
    problems: list[str] = []
    sets = scored_sets(sel, lm, examples, problems)
    for problem in problems:
        st.warning(f"Skipped a generated dataset: {problem}")
    if generated is None or sets is None:
        st.caption("Generated sources appear here once they are scored.")
    groups: dict[str, TokenScores] = {"ground_truth": gt}
    groups.update(generated or {})
    groups.update(sets or {})

    generation_panel(sel, examples, found)

    left, right = st.columns(2)
    n_cut = count_cut(groups)
    if n_cut and left.toggle(
        cut_label(n_cut),
        value=True,
        help="A cut-off answer ends with an end-of-turn token that the chat template added, not "
        "the model; it is usually extremely surprising to the model and inflates the sequence "
        "perplexity. The paper keeps only complete, correct generations.",
    ):
        groups = drop_cut(groups)
    shared = shared_ids(groups)
    shared_only = len(groups) > 1 and right.toggle(
        f"Compare on shared examples only ({fmt.count(len(shared))} of {fmt.count(len(gt))})",
        value=shared_by_default(len(shared), len(gt)),
        key="explore_shared_only",
        help="Keep only examples that every source has, so the sources are compared on the "
        "same prompts (generated answers usually exist for a subset). On by default only when "
        "at least half of the examples are shared.",
    )
    if shared_only:
        groups = keep_shared(groups, shared)
    if not any(len(group) for group in groups.values()):
        st.info("No examples in common between the sources yet.")
        return
    coverage = coverage_text(groups, len(gt), shared_only)

    sig = scores_signature(groups)
    stats = cached_dataset_stats(sig, tau, groups)
    st.subheader("Sequence perplexity per data source")
    left, right = st.columns([3, 2])
    with left:
        table = stats["table"]
        st.caption(coverage)
        st.dataframe(
            sequence_table_display(table, stats["above"], tau),
            hide_index=True,
            width="stretch",
        )
        truncated = truncated_note(table)
        if truncated:
            st.caption(truncated)
        st.caption(
            "Like the paper's Table 1: mean (population variance) of per-example sequence "
            "perplexity, exp(mean NLL of the response tokens, end-of-turn included), scored by "
            f"{lm.display_name}."
        )
        if sel.kind == "task" and sel.task in PAPER_TABLE_1:
            st.caption(
                f"Paper, Llama-3-8B-Instruct on {sel.task.upper()}: {PAPER_TABLE_1[sel.task]}."
            )
    with right:
        st.plotly_chart(seq_ppl_box(groups), config=plotly_config("sequence_ppl_box"))

    st.subheader("Token perplexity distribution")
    frame = cached_token_frame(sig, groups)
    left, right = st.columns(2)
    left.plotly_chart(ppl_histogram(frame, tau=tau), config=plotly_config("token_ppl_histogram"))
    right.plotly_chart(ppl_cdf(frame, tau=tau), config=plotly_config("token_ppl_cdf"))

    st.subheader(f"Tokens above τ = {fmt.tau(tau)}")
    left, right = st.columns(2)
    with left:
        above = stats["above"]
        st.caption(coverage)
        st.dataframe(
            above_table_display(above),
            hide_index=True,
            width="stretch",
            column_config=fit_columns(
                ["data source", "mean per example", "examples fully > τ"],
                pin=["data source"],
                short={"mean per example": "mean/example", "examples fully > τ": "all > τ"},
                help={
                    "mean per example": "the share above τ of each example, averaged",
                    "examples fully > τ": "examples whose every response token is above τ",
                },
            ),
        )
        st.caption(
            "STM masks exactly these tokens (ppl > τ). The paper found masking about 20–25% of "
            "response tokens works best. Examples fully above τ would carry no loss at all."
        )
    with right:
        # the markers print the table's pooled shares: the same tokens, the same rule
        at_tau = dict(zip(above["source"], above["share"], strict=True))
        st.plotly_chart(
            share_vs_tau_chart(tau_curves(sig, groups), tau, at_tau=at_tau),
            config=plotly_config("share_vs_tau"),
        )

    st.subheader("What kind of tokens are surprising?")
    st.plotly_chart(
        category_share_chart(stats["categories"]), config=plotly_config("token_categories")
    )


def generation_panel(
    sel: Selection, gt: Sequence[Example], found: dict[str, list[StoredGeneration]]
) -> None:
    """Coverage of the model's own answers, and a button to generate the missing ones."""
    config = url_settings()
    have = {ex_id for ex_id, gens in found.items() if any(g.config == config for g in gens)}
    missing = [ex for ex in gt if ex.id not in have]
    runner = background_runner()
    key = batch_task_key(sel, config)
    task = runner.get(key)
    with st.container(border=True):
        st.markdown(
            f"**Model's own answers** ({settings_label(config)}): {len(have)} of {len(gt)} "
            "examples have one. Settings come from the *GT vs generated* tab."
        )
        if task is not None and task.status != DONE:
            batch_generation_task(sel, missing, config, start=False)
        elif missing and st.button(
            f"Generate the missing {len(missing)} in the background",
            icon=":material/bolt:",
            help="Generates in chunks and saves each answer as it finishes, so nothing is lost "
            "if you leave; greedy generation on a CPU runs at a few tokens per second.",
        ):
            runner.forget(key)
            batch_generation_task(sel, missing, config, start=True)
            st.rerun()


sel = sidebar_selection()
st.title("Explore token perplexity")
st.caption(
    "Ground-truth answers are full of tokens the model finds surprising; its own answers are "
    "not. See it example by example and across the dataset."
)

wanted = st.query_params.get("ex")
run = scores_or_wait(sel, early=True, first=[wanted] if wanted else [])
if run is None:
    st.stop()
early = run.of_total is not None  # the first few examples, while the rest are scored
gt = run.scores  # columns; records are built only for the example on screen
if early and (not len(gt) or (wanted and wanted not in set(gt.ids))):
    # Nothing to show yet, or not the example the URL asks for (the task was started by another
    # page): wait for the whole selection rather than replace ?ex=. The progress above goes on.
    st.stop()
if not len(gt):
    st.warning("Nothing to show: every example was skipped (empty responses).")
    st.stop()
if early:
    st.info(
        f"Showing the first {len(gt)} of {run.of_total} examples while the rest are scored; "
        "the page completes itself. The Compare and Analytics tabs open then.",
        icon=":material/hourglass_top:",
    )

head, control = st.columns([3, 2], vertical_alignment="center")
with control:
    tau = tau_slider()
with head:
    st.markdown(summary_line(gt, tau))
    st.caption(f"{sel.model} · {sel.data_label} · {run.summary()}")
for ex_id, reason in run.skipped:
    st.caption(f"Skipped {ex_id}: {reason}")

current = selected_example_id(gt.ids, sel.data_label)
browse, compare, analytics = st.tabs(list(TABS), key="view", bind="query-params")
with browse:
    if browse.open:
        examples_tab(sel, gt, tau, current)
with compare:
    if compare.open and early:
        st.info(f"Available once all {run.of_total} examples are scored.")
    elif compare.open:
        lm = model_or_wait(sel)
        if lm is not None:
            compare_tab(sel, gt, tau, current, lm)
with analytics:
    if analytics.open and early:
        st.info(f"Available once all {run.of_total} examples are scored.")
    elif analytics.open:
        lm = model_or_wait(sel)
        if lm is not None:
            analytics_tab(sel, gt, tau, lm)
