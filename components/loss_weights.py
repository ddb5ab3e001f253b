"""The Masking studio's "Token losses" section (issue #21 part 3): see what each token loss
weights before training.

For the example on screen: each loss's per-token weight side by side (`render_weight_heatmaps`)
and the response tokens over base probability × top-K entropy coloured by one loss's weight
(`weight_scatter`); for the whole selection, each loss's effective-token share Σw/N, over every
response token and under setting A's mask (`share_table`). The weights are computed by the
functions the trainer calls (`core.masking.weights`), at step 0: the selected model is the base
a run starts from, so p_θ = p_base and the KL terms are 0.

EAFT needs the entropy of the top-K distribution (K = 20 by default) while the scores keep the
scoring setting's top-k (often 5). The example on screen then gets one top-K scoring pass in a
background task (the score store keeps it: the next visit reads it); the whole selection uses
the stored top-k, labelled as such, until the user asks for the top-K pass of every example.

The section is a lazy expander (`?token_losses=true` opens it): nothing is computed, and no
pass started, while it is closed.
"""

from __future__ import annotations

import weakref

import numpy as np
import streamlit as st

from components.session import (
    Selection,
    background_runner,
    current_model,
    show_task_status,
    wait_for,
)
from core import fmt
from core.data.records import Example
from core.jobs.background import DONE, FAILED, RUNNING, BackgroundTask
from core.masking.rules import MaskResult
from core.masking.weights import (
    KL_LOSSES,
    LOSS_NAMES,
    ONLINE_LOSSES,
    SHARE_FORMULA,
    BaseTokens,
    WeightParams,
    loss_weights,
    share_table,
)
from core.scoring.cache import ScoreCache
from core.scoring.score import score_examples
from core.scoring.tokens import TokenScores
from core.viz.charts import plotly_config
from core.viz.loss_weights import render_weight_heatmaps, weight_scatter

SECTION_KEY = "token_losses"
SECTION_LABEL = "Token losses: what each loss weights, before training"
MAX_PANEL_TOKENS = 600
INTRO = (
    "Each token loss's weight w on every response token, computed by the functions training "
    "calls (`core.masking.weights`), **at step 0**: the selected model is the base a run starts "
    "from, so p_θ = p_base. dft, eaft and asft weigh by the model being trained: their weights "
    "move as it trains; soft_stm's never do. kl and asft also add a KL(base ‖ θ) term, 0 at "
    "step 0 (a fresh adapter is the base). The mask (above) and the loss combine: a token the "
    "mask leaves out counts 0."
)
DEFAULTS = WeightParams()

#: per scores object: {(where the top-k comes from, K): BaseTokens of the whole selection}
_SELECTION_BASE: weakref.WeakKeyDictionary[TokenScores, dict] = weakref.WeakKeyDictionary()


def token_losses_section(
    sel: Selection, scores: TokenScores, position: int, mask: MaskResult
) -> None:
    """The section, in its own lazy expander: `scores` the selection's, `position` the
    example on screen, `mask` setting A's masks of `scores`."""
    box = st.expander(
        SECTION_LABEL,
        key=SECTION_KEY,
        icon=":material/balance:",
        on_change="rerun",
        bind="query-params",
    )
    if not box.open:
        return
    with box:
        _section(sel, scores, position, mask)


def _params() -> tuple[WeightParams, bool]:
    c1, c2, c3, c4 = st.columns([1, 1, 1, 2.4], vertical_alignment="bottom")
    temperature = c1.number_input(
        "soft_stm T",
        min_value=0.05,
        max_value=100.0,
        value=DEFAULTS.temperature,
        step=0.25,
        key="lw_temperature",
        help="w = p_base(y)^(1/T): a larger T flattens the weights toward 1 (`--loss-temperature`).",
    )
    alpha = c2.number_input(
        "EAFT α",
        min_value=0.0,
        max_value=10.0,
        value=DEFAULTS.eaft_alpha,
        step=0.25,
        key="lw_alpha",
        help="w = (H_topK / ln K)^α (`--eaft-alpha`); α = 0 gives every token 1.",
    )
    k = c3.number_input(
        "EAFT K",
        min_value=2,
        max_value=1000,
        value=DEFAULTS.eaft_k,
        step=1,
        key="lw_k",
        help="The top-K logits whose entropy EAFT takes (`--eaft-k`).",
    )
    apply_mask = c4.toggle(
        "Apply setting A's mask",
        value=True,
        key="lw_mask",
        help="Under a mask (STM's τ, a control) the tokens it leaves out count 0, as in training "
        "with `--method stm --loss …`. Off: the loss alone, on every response token.",
    )
    return WeightParams(float(temperature), float(alpha), int(k)), apply_mask


def _examples(scores: TokenScores, rows: list[int]) -> list[Example]:
    return [
        Example(id=scores.ids[r], prompt=scores.prompts[r], response=scores.responses[r])
        for r in rows
    ]


def _top_k_task(
    sel: Selection, scores: TokenScores, rows: list[int], k: int, key: str, start: bool
) -> BackgroundTask | None:
    """The background task scoring `rows` of `scores` with the top-`k` (the score store keeps
    the result as its own scoring setting), started when `start` and not there yet."""
    runner = background_runner()
    task = runner.get(key)
    if task is not None or not start:
        return task
    examples = _examples(scores, rows)
    convention = scores.conventions[rows[0]]

    def work(task: BackgroundTask) -> TokenScores:
        task.message = f"loading model {sel.model}"
        lm = current_model(sel)
        task.message = f"top-{k} of {fmt.count(len(examples))} examples"
        run = score_examples(
            lm,
            examples,
            convention=convention,
            top_k=k,
            cache=ScoreCache(),
            progress=task.progress,
            source=scores.sources[rows[0]],
        )
        return run.scores

    what = "the example on screen" if len(rows) == 1 else f"{fmt.count(len(rows))} examples"
    return runner.start(key, f"Top-{k} of {what}", work)


def _aligned(result: TokenScores, scores: TokenScores, rows: list[int]) -> bool:
    """Whether a top-k pass has the same examples and response tokens as `rows` of `scores`."""
    if tuple(result.ids) != tuple(scores.ids[r] for r in rows):
        return False
    lengths = np.diff(scores.offsets)[rows]
    return bool(np.array_equal(np.diff(result.offsets), lengths))


def _task_key(sel: Selection, scores: TokenScores, k: int, what: str) -> str:
    return f"lw-topk:{sel.key()}:{scores.conventions[0]}:{k}:{what}"


def _example_top(
    sel: Selection, scores: TokenScores, position: int, k: int
) -> tuple[np.ndarray, str, BackgroundTask | None]:
    """The example's top-k log-probs for EAFT, what they are, and a task still running."""
    start, stop = int(scores.offsets[position]), int(scores.offsets[position + 1])
    stored = scores.top_logprobs[start:stop]
    width = scores.top_ids.shape[1]
    if width >= k:
        return stored, f"EAFT: top-{k} entropy from the stored top-{width}.", None
    key = _task_key(sel, scores, k, f"ex:{scores.ids[position]}")
    task = _top_k_task(sel, scores, [position], k, key, start=True)
    if task is not None and task.status == DONE and _aligned(task.result, scores, [position]):
        return (
            task.result.top_logprobs,
            f"EAFT: top-{k} entropy from one top-{k} pass of this example (kept in the score "
            "store; the other losses read the stored scores).",
            None,
        )
    approx = (
        f"EAFT needs the top-{k}; the stored scores keep the top-{width}, so EAFT here is its "
        f"K = {width} weight (marked approximate)"
    )
    if task is not None and task.status == FAILED:
        show_task_status(task)
        return stored, approx + ": the top-" + str(k) + " pass failed.", None
    if task is not None and task.status == DONE:
        return stored, approx + ": the top-" + str(k) + " pass did not line up.", None
    return stored, approx + f" until the top-{k} pass of this example is done.", task


def _selection_base(
    sel: Selection, scores: TokenScores, k: int
) -> tuple[BaseTokens, str, BackgroundTask | None]:
    """The whole selection's base tokens for the shares, what their entropy is, and the top-k
    pass of every example (None until the user asks for it; not needed when the stored top-k
    is wide enough, then also None)."""
    width = scores.top_ids.shape[1]
    memo = _SELECTION_BASE.setdefault(scores, {})
    if ("stored", k) not in memo:
        memo["stored", k] = BaseTokens.from_scores(scores.logprob, scores.top_logprobs, k)
    if width >= k:
        return memo["stored", k], f"EAFT: top-{k} entropy from the stored top-{width}.", None
    rows = list(range(len(scores)))
    task = _top_k_task(sel, scores, rows, k, _task_key(sel, scores, k, "all"), start=False)
    if task is not None and task.status == DONE and _aligned(task.result, scores, rows):
        tag = ("pass", k, task.started)
        if tag not in memo:
            memo[tag] = BaseTokens.from_scores(scores.logprob, task.result.top_logprobs, k)
        return memo[tag], f"EAFT: top-{k} entropy of every example (a top-{k} pass).", task
    note = (
        f"EAFT over the selection is approximate: the stored scores keep the top-{width}, so its "
        f"share here is EAFT's at K = {width}, not {k}."
    )
    return memo["stored", k], note, task


def _offer_top_k_pass(
    sel: Selection, scores: TokenScores, k: int, task: BackgroundTask | None
) -> BackgroundTask | None:
    """The button that computes the top-k of every example (when the stored top-k is too
    narrow and no such pass is done or running); the pass if it runs."""
    if scores.top_ids.shape[1] >= k or (task is not None and task.status == DONE):
        return None
    if task is not None and task.status == RUNNING:
        return task
    if task is not None and task.status == FAILED:
        show_task_status(task)
    rows = list(range(len(scores)))
    key = _task_key(sel, scores, k, "all")
    if st.button(
        f"Compute the top-{k} of all {fmt.count(len(rows))} examples",
        key="lw_all",
        icon=":material/calculate:",
        help=f"One scoring pass of every example with the top-{k} log-probs, in the "
        "background; the score store keeps them, so it is done once per model and data.",
    ):
        background_runner().forget(key)
        return _top_k_task(sel, scores, rows, k, key, start=True)
    return None


def _section(sel: Selection, scores: TokenScores, position: int, mask: MaskResult) -> None:
    st.caption(INTRO)
    params, apply_mask = _params()
    k = params.eaft_k
    start, stop = int(scores.offsets[position]), int(scores.offsets[position + 1])
    example = scores.example(position)
    top, example_note, running = _example_top(sel, scores, position, k)
    base = BaseTokens.from_scores(scores.logprob[start:stop], top, k)
    weights = loss_weights(base, params)
    masked = mask.mask_at(position) if apply_mask else None
    mask_text = mask.config.describe()
    st.caption(f":material/info: {example_note} Hover a token for its weight, p_base and entropy.")
    if running is not None:
        show_task_status(running)
    st.html(
        render_weight_heatmaps(
            example,
            list(weights.values()),
            base,
            masked=masked,
            max_tokens=MAX_PANEL_TOKENS,
            subtitle=f"mask: {mask_text}" if apply_mask else "no mask",
        )
    )

    chosen = st.segmented_control(
        "Colour the scatter by",
        LOSS_NAMES,
        default="soft_stm",
        required=True,
        key="lw_scatter",
        help="The loss whose weight colours the tokens (the panels' scale).",
    )
    step0 = " (at step 0)" if chosen in ONLINE_LOSSES else ""
    st.plotly_chart(
        weight_scatter(
            base,
            weights[chosen],
            example.response_tokens,
            masked=masked,
            title=f"{weights[chosen].label}{step0}: this example's tokens, base probability × "
            "entropy",
        ),
        config=plotly_config(f"loss_weights_{chosen}"),
        key="lw_scatter_chart",
    )

    selection, selection_note, all_task = _selection_base(sel, scores, k)
    all_weights = loss_weights(selection, params)
    st.markdown(
        f"**Effective-token share of the selection**: {fmt.count(len(scores))} examples, "
        f"{fmt.count(len(selection))} response tokens",
        help=f"{SHARE_FORMULA}: the `weight_share` a run logs. At step 0 for "
        f"{', '.join(ONLINE_LOSSES)}; {', '.join(KL_LOSSES)} add a KL term, 0 at step 0.",
    )
    table = share_table(all_weights, mask.flat, f"mask A ({mask_text})")
    st.dataframe(table, hide_index=True, width="stretch")
    st.caption(f"{selection_note} Σw/N = {SHARE_FORMULA}.")
    all_running = _offer_top_k_pass(sel, scores, k, all_task)
    if all_running is not None:
        show_task_status(all_running)
    if running is not None or all_running is not None:
        wait_for(running if running is not None else all_running)
