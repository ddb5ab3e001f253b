"""Masking studio: tune the STM threshold and see exactly which tokens leave the loss.

The heatmap here IS the training mask: every change of mode, tau or share recomputes the masks
from the cached scores (`core.masking`, vectorised over a `PplIndex` built once per scored
dataset straight from the score store's columnar `TokenScores`) and re-colours the example, so
struck-out tokens are exactly the ones that will get label -100. Nothing is re-scored on a
widget change. Only the example on screen becomes a `ScoredExample` record: the statistics,
the curve and the export (`core.masking.export` on `TokenScores`) read the columns.
"""

from dataclasses import asdict
from pathlib import Path

import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from components.loss_weights import token_losses_section
from components.session import (
    current_model,
    scores_or_wait,
    scoring_task,
    sidebar_selection,
    url_tau,
)
from core import fmt
from core.errors import LensError
from core.masking import DEFAULT_TAU
from core.masking.config import (
    DEFAULT_K_PERCENT,
    MODES,
    PERCENTILE_RULES,
    MaskCommandConfig,
    MaskConfig,
)
from core.masking.export import (
    export_masked_dataset,
    export_path,
    masked_jsonl_bytes,
    scores_fingerprint,
)
from core.masking.rules import (
    TAU_GRID,
    MaskResult,
    MaskStats,
    PplIndex,
    compute_masks,
    snap_tau,
)
from core.scoring.config import ScoreConfig
from core.scoring.score import ScoreRun
from core.scoring.tokens import TokenScores
from core.viz.charts import (
    PLOTLY_CONFIG,
    masked_share_histogram,
    masking_curve_figure,
    plotly_config,
)
from core.viz.heatmap import render_token_heatmap

MODE_LABELS = {
    "high": "High ppl (STM)",
    "low": "Low ppl",
    "random": "Random (matched)",
    "percentile": "Percentile",
}
MODE_HELP = (
    "**High ppl (STM)** masks tokens with perplexity > τ (the paper's method). **Low ppl** masks "
    "tokens with perplexity < τ. **Random** masks, in every example, as many tokens as STM would "
    "at this τ, at random positions (a control). **Percentile** masks k% of every example's "
    "response tokens: the highest-ppl, a random or the lowest-ppl ones."
)
#: the selector's own words: short enough for one row at 1280 px (the help says the rest)
MODE_BUTTONS = {**MODE_LABELS, "random": "Random"}
RULE_LABELS = {"top": "highest ppl", "random": "random", "bottom": "lowest ppl"}
KIND_LABELS = {"tau": "Set τ", "share": "Target share"}
RULE_OF_THUMB = (0.20, 0.25)
COMPARE_COLORS = {"A": "#D55E00", "B": "#8250df"}  # A: the ground-truth colour of the charts
SIDE_DEFAULTS = {  # (tau, share %, k %) of the two compared settings
    "A": (DEFAULT_TAU, 25.0, DEFAULT_K_PERCENT),
    "B": (1.5, 20.0, 10.0),
}
MAX_HEATMAP_TOKENS = 2000


def _tau_from_query() -> float:
    return snap_tau(url_tau())


@st.cache_resource(max_entries=4, show_spinner="Indexing token perplexities…")
def _ppl_indexes(run_key: str, _scores: TokenScores) -> dict[str | None, PplIndex]:
    """PplIndex of the whole run (key None) and of each data source, built once per scored run
    from its columns (no per-example records)."""
    indexes: dict[str | None, PplIndex] = {None: PplIndex.from_scores(_scores)}
    sources = list(dict.fromkeys(_scores.sources))
    for source in sources:
        if len(sources) == 1:
            indexes[source] = indexes[None]
        else:
            rows = [i for i, s in enumerate(_scores.sources) if s == source]
            indexes[source] = PplIndex.from_scores(_scores.take(rows))
    return indexes


# --------------------------------------------------------------------------- widgets


def _threshold_widget(
    side: str, mode: str, kind: str, rule: str, seed: int, compare: bool
) -> MaskConfig:
    """The one control that differs between compared settings: τ, a target share or k%."""
    tau0, share0, k0 = SIDE_DEFAULTS[side]
    suffix = f" ({side})" if compare else ""
    if mode == "percentile":
        k = st.slider(
            f"k — % of each example's response tokens to mask{suffix}",
            0.0,
            100.0,
            k0,
            1.0,
            format="%.0f%%",
            key=f"k_{side}",
        )
        return MaskConfig(mode=mode, percentile_rule=rule, k_percent=k, seed=seed)
    if kind == "share":
        share = st.slider(
            f"Target share of response tokens to mask{suffix}",
            0.0,
            100.0,
            share0,
            0.5,
            format="%.1f%%",
            key=f"share_{side}",
            help="τ is solved so that this share of all response tokens (pooled) is masked.",
        )
        return MaskConfig(mode=mode, tau=None, target_share=share / 100.0, seed=seed)
    key = f"tau_{side}"
    if key not in st.session_state:
        st.session_state[key] = _tau_from_query() if side == "A" else tau0
    tau = st.select_slider(
        f"τ — token-perplexity threshold{suffix}",
        options=TAU_GRID,
        format_func=fmt.tau,
        key=key,
        help="Log-like scale: fine steps between 1 and 10, where most tokens lie.",
    )
    return MaskConfig(mode=mode, tau=tau, seed=seed)


def _counters(
    stats: MaskStats, result: MaskResult, per_row: int, reference: MaskStats | None = None
) -> None:
    """Metric tiles; with ``reference`` (setting A), deltas show how this setting differs."""

    def delta(value: float, ref: float, unit: str = "") -> str | None:
        if reference is None or value == ref:
            return None
        if unit:  # a share: signed percentage points
            return f"{fmt.signed(value - ref, 1)}{unit}"
        change = value - ref  # a count: signed, with thousands separators
        return f"{'+' if change > 0 else '-'}{fmt.count(abs(change))}"

    ref = reference
    tiles = [
        (
            "Masked share",
            masked_share_text(stats),
            delta(100 * stats.pooled_share, 100 * ref.pooled_share, " pts") if ref else None,
            "off",
            f"Masked response tokens / all {fmt.count(stats.n_response_tokens)} response tokens, "
            "pooled over the dataset (end-of-turn token included). Prompt tokens never train.",
        ),
        (
            "Tokens masked",
            fmt.count(stats.n_masked),
            delta(stats.n_masked, ref.n_masked) if ref else None,
            "off",
            "Response tokens that get label -100: they stay in the input but carry no loss.",
        ),
        (
            "Tokens kept",
            fmt.count(stats.n_kept),
            delta(stats.n_kept, ref.n_kept) if ref else None,
            "off",
            "Response tokens that are trained on.",
        ),
        (
            "Fully masked",
            f"{fmt.count(stats.n_fully_masked)} / {fmt.count(stats.n_examples)}",
            delta(stats.n_fully_masked, ref.n_fully_masked) if ref else None,
            "inverse",
            "Examples left with no trainable token (every response token masked): they carry "
            "no loss, and some trainers drop them silently.",
        ),
        (
            "τ",
            fmt.tau(result.tau),
            None,
            "off",
            "The threshold in use (solved from the target share when one is set). "
            "Percentile mode does not use τ.",
        ),
    ]
    for start in range(0, len(tiles), per_row):
        cols = st.columns(per_row)
        for col, (label, value, d, color, help_text) in zip(
            cols, tiles[start : start + per_row], strict=False
        ):
            col.metric(label, value, d, delta_color=color, help=help_text, border=True)


def masked_share_text(stats: MaskStats) -> str:
    """The "Masked share" card's text; the curve's marker at τ prints the same."""
    return fmt.share(stats.pooled_share)


def rule_of_thumb_note(config: MaskConfig, stats: MaskStats, short: bool = False) -> str:
    """Where the masked share stands against the paper's rule of thumb (masking about 20-25%
    of response tokens works best), as a caption. The rule is about STM (mode high): only STM
    gets the green "within"; a control (low ppl, random, percentile) is told plainly how much
    it masks, with no verdict."""
    lo, hi = RULE_OF_THUMB
    share = stats.pooled_share
    band = f"{fmt.share(lo, 0)}–{fmt.share(hi, 0)}"
    if config.mode != "high":
        what = MODE_LABELS.get(config.mode, config.mode)
        return (
            f":gray[:material/science: {what} is a control: it masks {fmt.share(share)} of "
            f"response tokens. The paper's rule of thumb ({band} masked) is for STM.]"
        )
    if lo <= share <= hi:
        verdict = ":green[:material/check_circle: within]"
    elif share < lo:
        verdict = ":orange[:material/arrow_downward: below]"
    else:
        verdict = ":orange[:material/arrow_upward: above]"
    text = f"{verdict} the paper's rule of thumb: masking about {band} of response tokens"
    if not short:
        text += f" works best (Llama-3-8B on MBPP: τ = {fmt.tau(2.5)} masked {fmt.share(0.212)})"
    return text + "."


def _fully_masked_list(stats: MaskStats, scores: TokenScores, index: PplIndex) -> None:
    if not stats.n_fully_masked:
        return
    rows = [index.index_of(i) for i in stats.fully_masked_ids]
    seq_ppl, n_response = scores.seq_ppl(), scores.n_response
    with st.expander(f"{stats.n_fully_masked} examples with no trainable token"):
        st.caption("They carry no loss; some trainers drop them silently.")
        st.dataframe(
            pd.DataFrame(
                [
                    {
                        "id": scores.ids[r],
                        "response tokens": int(n_response[r]),
                        "seq ppl": fmt.num(float(seq_ppl[r])),
                        "response": scores.responses[r][:120],
                    }
                    for r in rows
                ]
            ),
            hide_index=True,
            width="stretch",
            height=min(400, 38 + 35 * stats.n_fully_masked),
        )


# --------------------------------------------------------------------------- charts


@st.cache_resource(max_entries=64, show_spinner=False)
def _curve_figure(run_key: str, mode: str, taus: tuple, _indexes: dict) -> go.Figure:
    """Share masked vs τ per source, with the current τ (and the compared one, B) marked.

    Cached per (run, mode, τ values): building a plotly figure costs far more than the curve
    itself, and the cached figure is only read (st.plotly_chart does not modify it).
    """
    return masking_curve_figure(_indexes, mode, taus, band=RULE_OF_THUMB, colors=COMPARE_COLORS)


# --------------------------------------------------------------------------- export


def _score_config(sel, out: str) -> ScoreConfig:
    """The `score` command's config that scores what the sidebar selected into `out`."""
    model = {"model": sel.model, "device": sel.device, "dtype": sel.dtype, "limit": sel.limit}
    if sel.kind == "task":
        return ScoreConfig(task=sel.task, split=sel.split, out=out, **model)
    return ScoreConfig(
        data=sel.data_path,
        prompt_col=sel.prompt_col,
        response_col=sel.response_col,
        id_col=sel.id_col or None,
        out=out,
        **model,
    )


def _default_export_name(sel, config: MaskConfig, result: MaskResult) -> str:
    data = f"{sel.task}-{sel.split}" if sel.kind == "task" else Path(sel.data_path).stem
    if config.mode == "percentile":
        rule = f"{config.percentile_rule}{config.k_percent:g}pct"
        return f"{data}-{sel.limit}-percentile-{rule}"
    return f"{data}-{sel.limit}-{config.mode}-tau{fmt.tau(result.tau).replace(',', '')}"


def _export_section(sel, run: ScoreRun, settings: list[tuple[str, MaskConfig, MaskResult]]):
    """The export form; it writes from the columns (`run.scores`), no per-example records."""
    st.subheader("Export the masked training set")
    st.caption(
        "Writes `masked.jsonl` (messages plus per-token `input_ids` and `labels`, -100 where "
        "masked or prompt), a `datasets` folder (`hf_dataset/`, for `load_from_disk`) and "
        "`manifest.json` (model, τ, mode, share, source fingerprint)."
    )
    if len(settings) > 1:
        side = st.radio("Setting to export", ["A", "B"], horizontal=True, key="export_side")
    else:
        side = "A"
    _, config, result = next(s for s in settings if s[0] == side)
    c1, c2 = st.columns([3, 1], vertical_alignment="bottom")
    name = c1.text_input(
        "Output folder",
        value=_default_export_name(sel, config, result),
        help="A name (written under the app's cache folder) or an absolute path.",
    )
    overwrite = c2.checkbox("Replace an existing export", key="export_overwrite")
    try:
        target = export_path(name)
        st.caption(f"Will write to `{target}`")
    except LensError as exc:
        st.error(str(exc))
        target = None
    buttons = st.container(horizontal=True)
    clicked = buttons.button(
        "Export", type="primary", icon=":material/save:", disabled=target is None, key="export"
    )
    buttons.download_button(
        "Download masked.jsonl",
        data=lambda: masked_jsonl_bytes(run.scores, result),
        file_name=f"{target.name if target else 'masked'}.jsonl",
        mime="application/jsonl",
        icon=":material/download:",
        on_click="ignore",
    )
    if not clicked or target is None:
        return
    try:
        with st.spinner("Writing the export…"):
            examples = run.scores
            lm = current_model(sel)
            extra = {
                "model": lm.cache_key,
                "model_name": sel.model,
                "source_fingerprint": scores_fingerprint(examples),
                "data_label": sel.data_label,
                "selection": asdict(sel),
            }
            out = export_masked_dataset(examples, result, target, extra, overwrite=overwrite)
    except LensError as exc:
        st.error(str(exc))
        return
    stats = result.stats()
    st.success(
        f"Wrote {fmt.count(stats.n_examples)} examples ({fmt.share(stats.pooled_share)} of "
        f"response tokens masked) to `{out}`",
        icon=":material/check_circle:",
    )
    st.caption("The same export from the command line:")
    scores = "scores.jsonl"
    mask = MaskCommandConfig.from_mask(config, scores=scores, out=str(out), overwrite=overwrite)
    st.code(
        _score_config(sel, scores).command() + "\n" + mask.command(),
        language="bash",
        wrap_lines=True,
    )


# --------------------------------------------------------------------------- page

sel = sidebar_selection()
st.title("Masking studio")
st.caption(
    f"{sel.model} · {sel.data_label} · struck-out tokens get label -100: they stay in the "
    "input but carry no loss. Prompt tokens are never trained on."
)

run = scores_or_wait(sel)
if run is None:
    st.stop()
if not len(run.scores):
    st.warning("Nothing to mask: every example was skipped.")
    st.stop()
scores = run.scores
task = scoring_task(sel, start=False)
run_key = f"{sel.key()}:{task.started if task else id(run)}"
indexes = _ppl_indexes(run_key, scores)
index = indexes[None]
if run.skipped:
    st.caption(f"{len(run.skipped)} examples were skipped when scoring (empty response).")

c_mode, c_kind, c_opts = st.columns([5.5, 4, 2.5], vertical_alignment="bottom")
mode = c_mode.segmented_control(
    "Mode",
    list(MODES),
    default="high",
    required=True,
    format_func=MODE_BUTTONS.get,
    key="mask_mode",
    help=MODE_HELP,
    wrap=True,  # a second row of options rather than a clipped, scrolled one
)
rule, seed, kind = "top", 0, "tau"
if mode == "percentile":
    rule = c_kind.radio(
        "Which k%",
        PERCENTILE_RULES,
        format_func=RULE_LABELS.get,
        horizontal=True,
        key="percentile_rule",
    )
else:
    kind = c_kind.radio(
        "Threshold", list(KIND_LABELS), format_func=KIND_LABELS.get, horizontal=True, key="kind"
    )
if mode == "random" or (mode == "percentile" and rule == "random"):
    seed = int(c_opts.number_input("Seed", 0, 2**31 - 1, 0, 1, key="seed"))
compare = c_opts.toggle("Compare two settings", key="compare")

sides = ["A", "B"] if compare else ["A"]
settings: list[tuple[str, MaskConfig, MaskResult]] = []
columns = st.columns(len(sides), gap="large")
for side, col in zip(sides, columns, strict=True):
    with col:
        if compare:
            st.markdown(f"##### Setting {side}")
        config = _threshold_widget(side, mode, kind, rule, seed, compare)
        settings.append((side, config, compute_masks(index, config)))
if mode != "percentile" and kind == "tau":
    st.query_params["tau"] = f"{settings[0][1].tau:g}"  # the URL keeps the exact value

all_stats = [(side, result.stats()) for side, _, result in settings]
for (side, _, result), (_, stats), col in zip(settings, all_stats, columns, strict=True):
    with col:
        reference = all_stats[0][1] if side == "B" else None
        _counters(stats, result, 3 if compare else 5, reference)
        st.caption(rule_of_thumb_note(result.config, stats, short=compare))
        _fully_masked_list(stats, scores, index)

left, right = st.columns(2)
left.plotly_chart(
    _curve_figure(
        run_key, mode, tuple(r.tau for _, _, r in settings if r.tau is not None), indexes
    ),
    config=plotly_config("masked_share_vs_tau"),
    key="curve",
)
right.plotly_chart(
    masked_share_histogram(all_stats, COMPARE_COLORS), config=PLOTLY_CONFIG, key="hist"
)

st.subheader("Which tokens leave the loss")
ids = list(index.ids)
wanted = st.query_params.get("ex")
chosen = st.selectbox(
    "Example",
    ids,
    index=ids.index(wanted) if wanted in ids else 0,
    key="example",
    help="Shared with the Explore page. The table below lists each example's masked share.",
)
st.query_params["ex"] = chosen
position = index.index_of(chosen)
example = scores.example(position)
heat_columns = st.columns(len(settings), gap="large")
for (side, _, result), col in zip(settings, heat_columns, strict=True):
    with col:
        if compare:
            st.markdown(f"**Setting {side}** · {result.config.describe()}")
        st.html(
            render_token_heatmap(
                example,
                tau=result.tau,
                masked=result.mask_at(position),
                max_tokens=MAX_HEATMAP_TOKENS,
            )
        )

with st.expander("Masked share of every example"):
    frame = pd.DataFrame({"id": ids, "response tokens": index.n_response})
    for side, stats in all_stats:
        suffix = f" {side}" if compare else ""
        frame[f"masked{suffix}"] = stats.per_example_n_masked
        frame[f"share{suffix}"] = 100 * stats.per_example_share  # percent, as fmt.share prints
        frame[f"fully masked{suffix}"] = stats.per_example_n_masked == stats.per_example_n_response
    st.dataframe(
        frame,
        hide_index=True,
        width="stretch",
        height=300,
        column_config={
            c: st.column_config.ProgressColumn(c, format="%.1f%%", min_value=0, max_value=100)
            for c in frame.columns
            if c.startswith("share")
        },
    )

token_losses_section(sel, scores, position, settings[0][2])

_export_section(sel, run, settings)
