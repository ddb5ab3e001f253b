"""Where a run forgot: which tokens of the drift probes moved, read from a run's saved rounds.

A drift task's round (`core.eval.drift`, saved in `<run>/eval/step-N.json`) keeps, per probe
item, the base model's answer ids and per answer token the KL(base ‖ tuned) and the change in the
token's log-probability. This module turns that into what the "Where it forgot" page shows:

- `drift_steps`, `load_round`, `drift_tasks`, `drift_items`: the rounds with drift, one task's
  items checked (an item whose per-token lists do not line up is left out with a note);
- `item_table`: the items sorted by mean token KL (largest first), with top-1 agreement and the
  Δ NLL of the base's answer;
- `token_frame` and the aggregates `by_category`, `by_position`, `by_domain`: mean token KL per
  token category (`core.scoring.analytics.token_category`), per position bucket in the answer and
  per probe domain, and each category's share of the probe's KL mass, each with a 95% bootstrap
  interval over probe items (`core.stats.paired_interval` on per-item (numerator, denominator)
  sums: the KL is itself a paired measure, base and tuned model on the same tokens);
- `token_alternatives`: for ONE item, the base and the tuned model's top-k next tokens at every
  answer position (two forward passes of one sequence; the base's logits come from the same
  model with its adapter disabled, as in the rounds), and `item_alternatives`, which finds the
  round's weights (the checkpoint of that step, the final adapter, or the adapter an evaluation
  job used), loads them once per process (`TUNED_SLOT`) and checks the recomputed KL against the
  saved one;
- `high_ppl_share`: the share of a run's training response tokens whose base perplexity exceeds
  τ, as far as the run folder records it (an STM or random-control run's masked share is exactly
  that share; a ground-truth run borrows it from a masked run on the same data, same model, same
  token count, and says so), and `drift_share_table`: that share against the OOD KL at each run's
  last drift round, with its interval, across runs.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from core.errors import LensError
from core.eval.scorers import SuiteResult, TaskResult
from core.eval.suites import DRIFT
from core.io import file_stamp, read_json
from core.jobs.runfiles import (
    eval_round_path,
    eval_round_steps,
)
from core.masking import DEFAULT_TAU
from core.scoring.analytics import CATEGORIES, token_category
from core.stats import Interval, paired_interval

#: Alternatives shown per token (base and tuned).
TOP_K = 5
#: The OOD drift task of the built-in suites (the cross-run scatter's y).
OOD_TASK = "ood_drift"
#: What each built-in drift task measures on (a user's probe file, "drift:NAME", is its prompts).
PROBE_LABELS = {
    "ood_drift": "OOD prompts (ARC-Easy, GSM8K, MMLU, TriviaQA)",
    "target_drift": "held-out prompts of the training task",
    "text_drift": "LAMBADA passages (plain text)",
}
#: Position buckets in the answer, 0-based [start, end) (None: open-ended), doubling in width.
POSITION_BUCKETS: tuple[tuple[int, int | None], ...] = (
    (0, 4),
    (4, 8),
    (8, 16),
    (16, 32),
    (32, 64),
    (64, 128),
    (128, None),
)
#: Columns of `item_table`.
ITEM_COLUMNS = ["id", "domain", "tokens", "kl", "top1", "dnll", "kl_max"]
#: The recomputed KL may differ from the saved one by this much (nats) before the page says the
#: weights it found may not be the ones the round evaluated (saved values keep 6 decimals; other
#: devices or kernels move the last digits).
KL_TOLERANCE = 2e-3


def probe_label(task: str) -> str:
    """What a drift task's items are ("OOD prompts (...)", or "prompts of NAME")."""
    return PROBE_LABELS.get(task, f"prompts of {task.removeprefix('drift:')}")


# --------------------------------------------------------------------------------------------
# Rounds
# --------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=16)
def _read_round(path: str, stamp: tuple[int, int]) -> SuiteResult | str:
    """One saved round (cached per file version), or why it cannot be read."""
    data = read_json(path)
    if not isinstance(data, dict):
        return "not readable JSON"
    try:
        return SuiteResult.from_dict(data)
    except (TypeError, KeyError, ValueError) as exc:
        return f"not an evaluation result ({type(exc).__name__})"


def round_version(run_dir: str | Path, step: int) -> tuple[int, int] | None:
    """The saved round's (modification time ns, size): a cache key that changes with the file."""
    return file_stamp(eval_round_path(run_dir, step))


def load_round(run_dir: str | Path, step: int) -> SuiteResult:
    """The saved round of `step` (LensError when it is missing or unreadable)."""
    path = eval_round_path(run_dir, step)
    stamp = file_stamp(path)
    if stamp is None:
        raise LensError(f"Run '{Path(run_dir).name}' has no saved evaluation round at step {step}.")
    result = _read_round(str(path), stamp)
    if isinstance(result, str):
        raise LensError(f"The round of step {step} ({path.name}) is {result}.")
    return result


@functools.lru_cache(maxsize=256)
def _drift_steps(run_dir: str, stamps: tuple[tuple[int, tuple[int, int]], ...]) -> tuple[int, ...]:
    steps = []
    for step, stamp in stamps:
        result = _read_round(str(eval_round_path(run_dir, step)), stamp)
        if not isinstance(result, str) and drift_tasks(result):
            steps.append(step)
    return tuple(steps)


def drift_steps(run_dir: str | Path) -> list[int]:
    """The steps whose saved round holds at least one drift task with per-item details."""
    stamps = tuple(
        (step, stamp)
        for step in eval_round_steps(run_dir)
        if (stamp := file_stamp(eval_round_path(run_dir, step))) is not None
    )
    return list(_drift_steps(str(run_dir), stamps)) if stamps else []


def drift_tasks(result: SuiteResult) -> list[TaskResult]:
    """A round's drift tasks that carry per-item details, target first."""
    found = [t for t in result.tasks if t.scorer == DRIFT and t.details]
    return sorted(found, key=lambda t: t.role != "target")


# --------------------------------------------------------------------------------------------
# Items
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DriftItem:
    """One probe item of a round: the base's answer ids and its per-token KL and Δ log-prob."""

    id: str
    domain: str
    ids: tuple[int, ...]
    kl: np.ndarray = field(repr=False)
    dlp: np.ndarray = field(repr=False)
    agree: int = 0
    nll_base_sum: float = 0.0
    nll_tuned_sum: float = 0.0

    @property
    def tokens(self) -> int:
        """Answer tokens (the teacher-forced ones drift is measured on)."""
        return len(self.ids)

    @property
    def mean_kl(self) -> float:
        """Mean token KL(base ‖ tuned), nats."""
        return float(self.kl.mean()) if self.tokens else 0.0

    @property
    def top1(self) -> float:
        """Share of answer tokens where both models' most likely next token is the same."""
        return self.agree / self.tokens if self.tokens else float("nan")

    @property
    def dnll(self) -> float:
        """Δ NLL of the base's answer per token (tuned − base; < 0: the tuned model grew more
        sure of the base's own answer)."""
        return (self.nll_tuned_sum - self.nll_base_sum) / self.tokens if self.tokens else 0.0


def _finite_list(value: Any, n: int) -> np.ndarray | None:
    if not isinstance(value, list) or len(value) != n:
        return None
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        return None
    return arr if arr.ndim == 1 and np.isfinite(arr).all() else None


def drift_items(task: TaskResult) -> tuple[list[DriftItem], list[str]]:
    """A drift task's items with their per-token values, and notes on the items left out (their
    lists missing or not lining up). LensError when no item is usable."""
    items: list[DriftItem] = []
    bad: list[str] = []
    for k, d in enumerate(task.details):
        if not isinstance(d, dict):
            bad.append(f"#{k}")
            continue
        ids = d.get("ids")
        if not isinstance(ids, list) or not ids or not all(isinstance(i, int) for i in ids):
            bad.append(str(d.get("id", f"#{k}")))
            continue
        kl, dlp = (
            _finite_list(d.get("token_kl"), len(ids)),
            _finite_list(d.get("token_dlp"), len(ids)),
        )
        if kl is None or dlp is None:
            bad.append(str(d.get("id", f"#{k}")))
            continue
        try:
            agree = int(d.get("agree", 0))
            nll_base, nll_tuned = (
                float(d.get("nll_base_sum", 0.0)),
                float(d.get("nll_tuned_sum", 0.0)),
            )
        except (TypeError, ValueError):
            bad.append(str(d.get("id", f"#{k}")))
            continue
        items.append(
            DriftItem(
                str(d.get("id", f"#{k}")),
                str(d.get("domain") or task.task),
                tuple(ids),
                kl,
                dlp,
                agree,
                nll_base,
                nll_tuned,
            )
        )
    if not items:
        raise LensError(
            f"'{task.name}' has no item with per-token drift (ids, token_kl and token_dlp of one "
            "length): the round was saved before the per-token view, or the file is damaged."
        )
    notes = []
    if bad:
        shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
        notes.append(
            f"{len(bad)} item(s) of '{task.name}' left out: their per-token lists are "
            f"missing or do not line up ({shown})."
        )
    return items, notes


def item_table(items: Sequence[DriftItem]) -> pd.DataFrame:
    """One row per item (`ITEM_COLUMNS`): id, domain, answer tokens, mean token KL, top-1
    agreement (0-1), Δ NLL of the base's answer per token and the largest token KL; sorted by
    mean KL, largest first (ties by id)."""
    rows = [
        {
            "id": it.id,
            "domain": it.domain,
            "tokens": it.tokens,
            "kl": it.mean_kl,
            "top1": it.top1,
            "dnll": it.dnll,
            "kl_max": float(it.kl.max()),
        }
        for it in items
    ]
    frame = pd.DataFrame(rows, columns=ITEM_COLUMNS)
    return frame.sort_values(["kl", "id"], ascending=[False, True], kind="stable").reset_index(
        drop=True
    )


# --------------------------------------------------------------------------------------------
# Aggregates over a probe
# --------------------------------------------------------------------------------------------

TextsFn = Callable[[Sequence[int]], list[str]]


def bucket_label(start: int, end: int | None) -> str:
    """A position bucket as a reader counts answer tokens (1-based): "1–4", "129+"."""
    return f"{start + 1}+" if end is None else f"{start + 1}–{end}"


def _bucket_of(positions: np.ndarray) -> np.ndarray:
    out = np.zeros(positions.shape, dtype=np.int64)
    for b, (start, _) in enumerate(POSITION_BUCKETS):
        out[positions >= start] = b
    return out


def token_frame(items: Sequence[DriftItem], texts: TextsFn) -> pd.DataFrame:
    """One row per answer token of every item: item (index), domain, position (0-based), token
    id, its text (`texts` decodes ids), category, KL and Δ log-prob."""
    if not items:
        return pd.DataFrame(
            columns=[
                "item",
                "domain",
                "position",
                "token_id",
                "text",
                "category",
                "kl",
                "dlp",
                "bucket",
            ]
        )
    ids = np.concatenate([np.asarray(it.ids, dtype=np.int64) for it in items])
    unique, inverse = np.unique(ids, return_inverse=True)
    decoded = texts([int(i) for i in unique])
    cats = np.array([token_category(t) for t in decoded], dtype=object)
    positions = np.concatenate([np.arange(it.tokens) for it in items])
    return pd.DataFrame(
        {
            "item": np.repeat(np.arange(len(items)), [it.tokens for it in items]),
            "domain": np.repeat(
                np.array([it.domain for it in items], dtype=object), [it.tokens for it in items]
            ),
            "position": positions,
            "token_id": ids,
            "text": np.array(decoded, dtype=object)[inverse],
            "category": cats[inverse],
            "kl": np.concatenate([it.kl for it in items]),
            "dlp": np.concatenate([it.dlp for it in items]),
            "bucket": _bucket_of(positions),
        }
    )


def _ratio(nums: np.ndarray, dens: np.ndarray) -> Interval:
    """The pooled ratio sum(nums) / sum(dens) with its 95% bootstrap interval over items (the
    items resampled; `paired_interval` against an all-zero base gives the value's interval)."""
    pairs = list(zip(nums.tolist(), dens.tolist(), strict=True))
    return paired_interval([(0.0, d) for _, d in pairs], pairs)


def _per_item(
    frame: pd.DataFrame, mask: np.ndarray, column: str | None, n_items: int
) -> np.ndarray:
    """Per item, the sum of `column` (the count when None) over the rows in `mask`."""
    items = frame["item"].to_numpy()[mask]
    weights = None if column is None else frame[column].to_numpy(dtype=np.float64)[mask]
    return np.bincount(items, weights=weights, minlength=n_items).astype(np.float64)


def _interval_columns(prefix: str, interval: Interval) -> dict[str, Any]:
    return {
        prefix: interval.estimate,
        f"{prefix}_low": interval.low,
        f"{prefix}_high": interval.high,
    }


def by_category(frame: pd.DataFrame) -> pd.DataFrame:
    """Per token category (`CATEGORIES`, zeros kept): its tokens and share of the probe's tokens,
    its mean token KL and its share of the probe's KL mass, each with a 95% bootstrap interval
    over items (columns kl, kl_low, kl_high, kl_share, kl_share_low, kl_share_high, reason)."""
    n_items = int(frame["item"].max()) + 1 if len(frame) else 0
    everything = np.ones(len(frame), dtype=bool)
    total_kl = _per_item(frame, everything, "kl", n_items)
    rows = []
    for category in CATEGORIES:
        mask = (frame["category"] == category).to_numpy()
        count = _per_item(frame, mask, None, n_items)
        mass = _per_item(frame, mask, "kl", n_items)
        mean = _ratio(mass, count)
        share = _ratio(mass, total_kl)
        rows.append(
            {
                "category": category,
                "tokens": int(mask.sum()),
                "token_share": float(mask.mean()) if len(frame) else float("nan"),
                **_interval_columns("kl", mean),
                **_interval_columns("kl_share", share),
                "items": int((count > 0).sum()),
                "reason": mean.reason or share.reason,
            }
        )
    return pd.DataFrame(rows)


def by_position(frame: pd.DataFrame) -> pd.DataFrame:
    """Mean token KL per position bucket of the answer (`POSITION_BUCKETS`, only buckets some
    item reaches), with a 95% bootstrap interval over items."""
    n_items = int(frame["item"].max()) + 1 if len(frame) else 0
    rows = []
    for b, (start, end) in enumerate(POSITION_BUCKETS):
        mask = (frame["bucket"] == b).to_numpy()
        if not mask.any():
            continue
        count = _per_item(frame, mask, None, n_items)
        mean = _ratio(_per_item(frame, mask, "kl", n_items), count)
        rows.append(
            {
                "bucket": bucket_label(start, end),
                "start": start,
                "tokens": int(mask.sum()),
                "items": int((count > 0).sum()),
                **_interval_columns("kl", mean),
                "reason": mean.reason,
            }
        )
    return pd.DataFrame(
        rows, columns=["bucket", "start", "tokens", "items", "kl", "kl_low", "kl_high", "reason"]
    )


def by_domain(items: Sequence[DriftItem]) -> pd.DataFrame:
    """Pooled mean token KL per probe domain (ARC-Easy, GSM8K, ... for the OOD probe), with a
    95% bootstrap interval over the domain's items, in order of first appearance."""
    order = list(dict.fromkeys(it.domain for it in items))
    rows = []
    for domain in order:
        chosen = [it for it in items if it.domain == domain]
        mass = np.array([float(it.kl.sum()) for it in chosen])
        count = np.array([float(it.tokens) for it in chosen])
        mean = _ratio(mass, count)
        rows.append(
            {
                "domain": domain,
                "items": len(chosen),
                "tokens": int(count.sum()),
                **_interval_columns("kl", mean),
                "reason": mean.reason,
            }
        )
    return pd.DataFrame(
        rows, columns=["domain", "items", "tokens", "kl", "kl_low", "kl_high", "reason"]
    )


def probe_kl(items: Sequence[DriftItem]) -> Interval:
    """The probe's pooled mean token KL with its 95% bootstrap interval over items."""
    mass = np.array([float(it.kl.sum()) for it in items])
    count = np.array([float(it.tokens) for it in items])
    return _ratio(mass, count)


# --------------------------------------------------------------------------------------------
# The training data's high-perplexity share, and drift across runs
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HighShare:
    """The share of a run's training response tokens whose base perplexity exceeds `tau`
    (`data`), and the same share among the tokens the loss was computed on (`trained`): None
    where the run folder does not record it (`reason` says why; `source` how it is known)."""

    tau: float
    data: float | None
    trained: float | None
    source: str = ""
    reason: str = ""


def _tau_of(run: Any) -> float:
    for value in (run.data_record.get("tau"), run.config.get("tau")):
        if isinstance(value, int | float) and math.isfinite(value) and value > 0:
            return float(value)
    return DEFAULT_TAU


def _recorded_share(run: Any, tau: float) -> float | None:
    """The data share above `tau` a run's own "data" record gives: an explicit
    `high_ppl_share`, or an STM / random-control run's masked share (mask mode high or random:
    exactly the tokens with ppl > τ, per example the same count for random)."""
    data = run.data_record
    explicit = data.get("high_ppl_share")
    if isinstance(explicit, int | float) and float(data.get("high_ppl_tau", tau)) == tau:
        return float(explicit)
    mask = str(data.get("mask") or "")
    share = data.get("masked_share")
    if (
        run.method in ("stm", "random")
        and mask.startswith(("high", "random"))
        and isinstance(share, int | float)
    ):
        return float(share)
    return None


def _same_data(a: Any, b: Any) -> bool:
    """Two runs trained on the same examples under the same model and tokenization."""
    keys = ("source", "n_examples", "n_response_tokens")
    da, db = a.data_record, b.data_record
    same_model = str(a.config.get("model") or "default") == str(b.config.get("model") or "default")
    return same_model and all(da.get(k) is not None and da.get(k) == db.get(k) for k in keys)


def high_ppl_share(run: Any, others: Sequence[Any] = ()) -> HighShare:
    """The training data's share of response tokens with base perplexity > τ for `run` (a
    `core.study.runs.RunView`; τ = its tau, else the default), from what its folder records; a
    run without it borrows the share of a run among `others` with the same data (same source,
    example and response-token counts, same model) and the same τ."""
    tau = _tau_of(run)
    data = run.data_record
    if not data:
        why = (
            "an evaluation-only run: no training data"
            if run.method == "base"
            else 'its metrics hold no "data" record (training had not started or an older writer)'
        )
        return HighShare(tau, None, None, reason=why)
    own = _recorded_share(run, tau)
    if own is not None:
        trained = 0.0 if run.method == "stm" else None  # STM masks every token above τ
        if run.method == "gt" and data.get("mask") in ("none", None):
            trained = own  # ground truth trains every response token
        how = (
            "its STM mask: exactly the tokens with ppl > τ"
            if run.method == "stm"
            else "its random-control mask: per example as many tokens as STM masks at τ"
        )
        return HighShare(tau, own, trained, source=how)
    twin = next(
        (
            o
            for o in others
            if o.run_id != run.run_id
            and _same_data(run, o)
            and _tau_of(o) == tau
            and _recorded_share(o, tau) is not None
        ),
        None,
    )
    if twin is not None:
        share = _recorded_share(twin, tau)
        trained = share if run.method == "gt" and data.get("mask") in ("none", None) else None
        return HighShare(
            tau,
            share,
            trained,
            source=f"run {twin.run_id} ({twin.label}): same data, model and token count",
        )
    if run.method == "gt":
        why = (
            "ground-truth training does not score its data, and no masked run on the same "
            "data records the share"
        )
    elif run.method in ("low", "percentile"):
        why = f"a {run.method} run records the share it masked, not the share above τ"
    else:
        why = "its data record does not give the share above τ"
    return HighShare(tau, None, None, reason=why)


@functools.lru_cache(maxsize=512)
def _last_kl(run_dir: str, step: int, version: Any, task: str) -> tuple[Interval | None, str]:
    """A round's `task` probe KL with its interval, or why there is none (cached per file
    version, so the cross-run table reads each round once)."""
    try:
        found = next((t for t in drift_tasks(load_round(run_dir, step)) if t.name == task), None)
        if found is None:
            return None, f"no '{task}' in its last drift round (step {step})."
        return probe_kl(drift_items(found)[0]), ""
    except LensError as exc:
        return None, str(exc)


#: Columns of `drift_share_table`.
SHARE_COLUMNS = [
    "run",
    "label",
    "method",
    "step",
    "kl",
    "kl_low",
    "kl_high",
    "n",
    "tau",
    "data_share",
    "trained_share",
    "source",
    "reason",
]


def drift_share_table(runs: Sequence[Any], task: str = OOD_TASK) -> tuple[pd.DataFrame, list[str]]:
    """Per run with a drift round after its first: the `task` probe's mean token KL at its last
    drift round (with its 95% interval over items) beside its training data's high-ppl share
    (`high_ppl_share`); and one note per run left out, saying why."""
    rows, notes = [], []
    for run in runs:
        name = f"{run.label} · {run.run_id}"
        steps = drift_steps(run.run_dir)
        rounds = eval_round_steps(run.run_dir)
        if not steps:
            notes.append(f"{name}: no drift round.")
            continue
        if steps[-1] == rounds[0]:
            notes.append(f"{name}: only step {steps[-1]} evaluated (the base model: no drift).")
            continue
        kl, problem = _last_kl(
            str(run.run_dir), steps[-1], round_version(run.run_dir, steps[-1]), task
        )
        if kl is None:
            notes.append(f"{name}: {problem}")
            continue
        share = high_ppl_share(run, runs)
        rows.append(
            {
                "run": run.run_id,
                "label": run.label,
                "method": run.method,
                "step": steps[-1],
                "kl": kl.estimate,
                "kl_low": kl.low,
                "kl_high": kl.high,
                "n": kl.n,
                "tau": share.tau,
                "data_share": share.data,
                "trained_share": share.trained,
                "source": share.source,
                "reason": share.reason,
            }
        )
    return pd.DataFrame(rows, columns=SHARE_COLUMNS), notes
