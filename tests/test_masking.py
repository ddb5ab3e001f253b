"""Tests for core.masking: hand-checked masks, properties (hypothesis), labels, export round trip."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from core.data.records import ScoredExample
from core.errors import LensError
from core.masking import DEFAULT_TAU
from core.masking import export as masking_export
from core.masking import rules as masking_rules
from core.masking.export import (
    export_masked_dataset,
    load_masked_dataset,
    masked_rows,
    run_mask_cli,
)
from core.masking.rules import (
    IGNORE_INDEX,
    MaskConfig,
    MaskStats,
    PplIndex,
    compute_masks,
    labels_for,
    mask_stats,
    share_vs_tau_curve,
    solve_tau_for_share,
)
from tests.factories import make_example, scores_of

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# --------------------------------------------------------------------------- helpers


def from_ppl(
    ex_id: str,
    ppls: list[float] = (),  # type: ignore[assignment]
    prompt_len: int = 3,
    base_id: int = 1000,
    *,
    logprob: list[float] | None = None,
) -> ScoredExample:
    """A scored example (`make_example`) with token perplexities `ppls` (or log-probs
    `logprob`): prompt ids 1..prompt_len, response ids base_id + i (texts "t<id>")."""
    n = len(ppls) if logprob is None else len(logprob)
    return make_example(
        ex_id,
        ppls,
        [f"t{base_id + i}" for i in range(n)],
        logprob=logprob,
        prompt_tokens=[f"t{i}" for i in range(1, prompt_len + 1)],
        prompt=f"prompt {ex_id}",
        response=f"response {ex_id}",
    )


# ppl values whose exp(log(.)) round trip is exact, so "ppl == tau" really is equal
SIX = [1.0, 2.5, 4.0, 1.2, 6.0, 2.0]


@pytest.fixture
def six() -> ScoredExample:
    ex = from_ppl("six", SIX)
    assert ex.ppl_array().tolist() == SIX  # precondition for the equality cases
    return ex


# A small pool of log-probs so hypothesis produces many ties, plus arbitrary values.
TIED_LOGPROBS = [0.0, -0.1, -0.5, -math.log(2.5), -1.0, -2.0, -5.0]
logprob_value = st.one_of(
    st.sampled_from(TIED_LOGPROBS),
    st.floats(min_value=-12.0, max_value=0.0, allow_nan=False, allow_infinity=False),
)


@st.composite
def datasets_st(draw, min_examples: int = 1, max_examples: int = 6, min_len: int = 0):
    n_ex = draw(st.integers(min_examples, max_examples))
    out = []
    for i in range(n_ex):
        lps = draw(st.lists(logprob_value, min_size=min_len, max_size=25))
        prompt_len = draw(st.integers(0, 5))
        out.append(from_ppl(f"ex{i}", logprob=lps, prompt_len=prompt_len, base_id=1000 + 100 * i))
    return out


taus_st = st.floats(min_value=0.05, max_value=2e5, allow_nan=False, allow_infinity=False)


def naive_masks(examples: list[ScoredExample], cfg: MaskConfig, tau: float | None) -> list:
    """Reference per-example implementation (high/low/percentile top+bottom)."""
    out = []
    for ex in examples:
        ppl = [math.exp(-lp) for lp in ex.logprob]
        n = len(ppl)
        if cfg.mode == "high":
            out.append([p > tau for p in ppl])
        elif cfg.mode == "low":
            out.append([p < tau for p in ppl])
        else:
            k = math.floor(cfg.k_percent * n / 100.0 + 0.5)
            sign = -1 if cfg.percentile_rule == "top" else 1
            order = sorted(range(n), key=lambda j: (sign * ppl[j], j))
            chosen = set(order[:k])
            out.append([j in chosen for j in range(n)])
    return out


# --------------------------------------------------------------------------- hand-checked


def test_high_masks_strictly_greater(six):
    r = compute_masks(scores_of([six]), MaskConfig(mode="high", tau=2.5))
    assert r.tau == 2.5
    assert r.masks[0].tolist() == [False, False, True, False, True, False]


def test_low_masks_strictly_less(six):
    r = compute_masks(scores_of([six]), MaskConfig(mode="low", tau=2.5))
    assert r.masks[0].tolist() == [True, False, False, True, False, True]


def test_high_and_low_at_equal_value_leave_it_trainable(six):
    hi = compute_masks(scores_of([six]), MaskConfig(mode="high", tau=2.0)).masks[0]
    lo = compute_masks(scores_of([six]), MaskConfig(mode="low", tau=2.0)).masks[0]
    assert not hi[5] and not lo[5]
    assert (hi | lo).sum() == 5


def test_random_matches_high_count(six):
    r = compute_masks(scores_of([six]), MaskConfig(mode="random", tau=2.5, seed=3))
    assert r.masks[0].sum() == 2
    again = compute_masks(scores_of([six]), MaskConfig(mode="random", tau=2.5, seed=3))
    assert r.masks[0].tolist() == again.masks[0].tolist()


def test_random_positions_follow_documented_derivation(six):
    r = compute_masks(scores_of([six]), MaskConfig(mode="random", tau=2.5, seed=11))
    perm = masking_rules._example_rng(11, "six").permutation(6)
    expected = np.zeros(6, dtype=bool)
    expected[perm[:2]] = True
    assert r.masks[0].tolist() == expected.tolist()


@pytest.mark.parametrize(
    "rule,k,expected",
    [
        ("top", 50, [False, True, True, False, True, False]),  # 6.0, 4.0, 2.5
        ("bottom", 50, [True, False, False, True, False, True]),  # 1.0, 1.2, 2.0
        ("top", 10, [False, False, False, False, True, False]),  # 0.6 -> 1
        ("bottom", 0, [False] * 6),
        ("top", 100, [True] * 6),
        ("top", 25, [False, False, True, False, True, False]),  # 1.5 -> 2 (half up)
        ("bottom", 75, [True, True, True, True, False, True]),  # 4.5 -> 5: all but 6.0
    ],
)
def test_percentile_hand_checked(six, rule, k, expected):
    cfg = MaskConfig(mode="percentile", percentile_rule=rule, k_percent=k)
    r = compute_masks(scores_of([six]), cfg)
    assert r.tau is None
    assert r.masks[0].tolist() == expected


def test_percentile_random_count_and_determinism(six):
    cfg = MaskConfig(mode="percentile", percentile_rule="random", k_percent=50, seed=5)
    a = compute_masks(scores_of([six]), cfg).masks[0]
    b = compute_masks(scores_of([six]), cfg).masks[0]
    assert a.sum() == 3 and a.tolist() == b.tolist()


def test_percentile_ties_broken_by_position():
    ex = from_ppl("tie", [2.0, 2.0, 2.0, 2.0, 1.0])
    top = compute_masks(scores_of([ex]), MaskConfig(mode="percentile", k_percent=40)).masks[0]
    assert top.tolist() == [True, True, False, False, False]
    bottom = compute_masks(
        scores_of([ex]), MaskConfig(mode="percentile", percentile_rule="bottom", k_percent=40)
    ).masks[0]
    assert bottom.tolist() == [True, False, False, False, True]  # 1.0 first, then pos 0


def test_percentile_rounding_half_up():
    ex = from_ppl("five", [1.0, 2.0, 3.0, 4.0, 5.0])
    r = compute_masks(scores_of([ex]), MaskConfig(mode="percentile", k_percent=50))
    assert r.masks[0].sum() == 3  # 2.5 rounds up, not to even


def test_labels_hand_checked(six):
    mask = compute_masks(scores_of([six]), MaskConfig(tau=2.5)).masks[0]
    assert labels_for(six, mask) == [-100, -100, -100, 1000, 1001, -100, 1003, -100, 1005]


def test_labels_reject_wrong_mask(six):
    with pytest.raises(LensError, match="6 response tokens"):
        labels_for(six, np.zeros(5, dtype=bool))
    with pytest.raises(LensError, match="boolean"):
        labels_for(six, np.zeros(6, dtype=int))


def test_stats_and_fully_masked():
    examples = [
        from_ppl("a", [1.0, 3.0, 1.0, 1.0]),
        from_ppl("all", [5.0, 6.0]),
        from_ppl("empty", [], prompt_len=4),
        from_ppl("none", [1.0, 1.5]),
    ]
    st_ = compute_masks(scores_of(examples), MaskConfig(tau=2.5)).stats()
    assert st_.n_examples == 4
    assert st_.n_response_tokens == 8
    assert st_.n_masked == 3 and st_.n_kept == 5
    assert st_.pooled_share == pytest.approx(3 / 8)
    assert st_.per_example_n_masked.tolist() == [1, 2, 0, 0]
    share = st_.per_example_share
    assert share[0] == 0.25 and share[1] == 1.0 and math.isnan(share[2]) and share[3] == 0.0
    assert st_.n_fully_masked == 2
    assert st_.fully_masked_ids == ["all", "empty"]
    summary = st_.summary()
    assert summary["fully_masked_ids"] == ["all", "empty"]
    json.dumps(summary)
    frame = st_.per_example_frame()
    assert frame["fully_masked"].tolist() == [False, True, True, False]


def test_stats_empty_dataset():
    st_ = compute_masks(scores_of([]), MaskConfig()).stats()
    assert st_.n_examples == 0 and st_.n_masked == 0 and math.isnan(st_.pooled_share)
    assert st_.summary()["pooled_share"] is None


def test_share_vs_tau_curve_hand_checked(six):
    idx = PplIndex.from_scores(scores_of([six]))
    hi = MaskStats.share_vs_tau_curve(idx, [0.5, 1.0, 2.5, 6.0])
    assert list(hi.columns) == ["tau", "share"]
    assert hi["share"].tolist() == pytest.approx([1.0, 5 / 6, 2 / 6, 0.0])
    lo = share_vs_tau_curve(idx, [0.5, 1.0, 2.5, 6.0, 9.0], mode="low")
    assert lo["share"].tolist() == pytest.approx([0.0, 0.0, 3 / 6, 5 / 6, 1.0])
    with pytest.raises(LensError):
        share_vs_tau_curve(idx, [1.0], mode="random")


def test_target_share_resolves_tau(six):
    r = compute_masks(scores_of([six]), MaskConfig(tau=None, target_share=0.5))
    assert r.stats().n_masked == 3
    assert 2.0 <= r.tau < 2.5
    r_low = compute_masks(scores_of([six]), MaskConfig(mode="low", tau=None, target_share=0.5))
    assert r_low.stats().n_masked == 3
    r_rand = compute_masks(scores_of([six]), MaskConfig(mode="random", tau=None, target_share=0.5))
    assert r_rand.tau == r.tau and r_rand.stats().n_masked == 3


def test_solve_tau_with_ties_gets_nearest_reachable():
    ppls = np.array([2.0] * 10 + [1.0, 5.0])
    tau = solve_tau_for_share(ppls, 0.5)  # 6 requested; reachable 0, 1, 11, 12
    assert (ppls > tau).sum() == 1
    tau_all = solve_tau_for_share(ppls, 1.0)
    assert (ppls > tau_all).sum() == 12 and tau_all > 0
    tau_none = solve_tau_for_share(ppls, 0.0)
    assert (ppls > tau_none).sum() == 0
    tau_low_all = solve_tau_for_share(ppls, 1.0, mode="low")
    assert (ppls < tau_low_all).sum() == 12
    assert (ppls < solve_tau_for_share(ppls, 0.0, mode="low")).sum() == 0


def test_solve_tau_errors():
    with pytest.raises(LensError, match="no response tokens"):
        solve_tau_for_share([], 0.2)
    with pytest.raises(LensError, match="between 0 and 1"):
        solve_tau_for_share(np.ones(3), 1.5)
    with pytest.raises(LensError, match="high or low"):
        solve_tau_for_share(np.ones(3), 0.5, mode="random")
    with pytest.raises(LensError, match="NaN"):
        solve_tau_for_share(np.array([1.0, np.nan]), 0.5)


def test_solve_tau_with_infinite_ppl():
    ppls = np.array([1.0, 2.0, np.inf, np.inf])
    tau = solve_tau_for_share(ppls, 0.0)
    assert math.isfinite(tau) and (ppls > tau).sum() == 2  # inf can never be kept by high
    tau_low = solve_tau_for_share(ppls, 0.5, mode="low")
    assert math.isfinite(tau_low) and (ppls < tau_low).sum() == 2


# --------------------------------------------------------------------------- config validation


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"mode": "middle"}, "unknown mask mode"),
        ({"tau": 0.0}, "tau must be"),
        ({"tau": -1.0}, "tau must be"),
        ({"tau": float("nan")}, "tau must be"),
        ({"tau": float("inf")}, "tau must be"),
        ({"tau": "2.5"}, "tau must be a number"),
        ({"tau": None, "target_share": 1.5}, "between 0 and 1"),
        ({"tau": None, "target_share": -0.1}, "between 0 and 1"),
        ({"tau": None, "target_share": float("nan")}, "between 0 and 1"),
        ({"tau": 2.5, "target_share": 0.2}, "not both"),
        ({"tau": None}, "needs a tau or a target share"),
        ({"mode": "low", "tau": None}, "needs a tau or a target share"),
        ({"mode": "percentile", "percentile_rule": "middle"}, "unknown percentile rule"),
        ({"mode": "percentile", "k_percent": 101}, "k_percent"),
        ({"mode": "percentile", "k_percent": -1}, "k_percent"),
        ({"mode": "percentile", "tau": None, "target_share": 0.2}, "does not apply"),
        ({"seed": -1}, "seed"),
        ({"seed": 1.5}, "seed"),
    ],
)
def test_bad_config_raises_readable_error(kwargs, message):
    with pytest.raises(LensError, match=message) as info:
        MaskConfig(**kwargs)
    assert "\n" not in str(info.value)


def test_config_normalises_numpy_numbers():
    cfg = MaskConfig(tau=np.float32(2.5), seed=np.int64(3))
    assert type(cfg.tau) is float and type(cfg.seed) is int and cfg.tau == 2.5
    cfg = MaskConfig(mode="percentile", k_percent=np.float32(12.5))
    assert type(cfg.k_percent) is float
    with pytest.raises(LensError, match="tau must be a number"):
        MaskConfig(tau=True)


def test_config_defaults_and_describe():
    cfg = MaskConfig()
    assert cfg.mode == "high" and cfg.tau == DEFAULT_TAU == 2.5 and cfg.target_share is None
    assert cfg.describe() == "high, tau=2.5"
    assert MaskConfig(tau=None, target_share=0.2).describe() == "high, target share=0.2"
    assert MaskConfig(mode="percentile", k_percent=10).describe() == "percentile top 10%"


def test_index_rejects_bad_input():
    with pytest.raises(LensError, match="duplicate"):
        PplIndex(["a", "a"], [np.ones(2), np.ones(2)])
    with pytest.raises(LensError, match="'b'.*NaN"):
        PplIndex(["a", "b"], [np.ones(2), np.array([1.0, np.nan])])
    bad = from_ppl("x", [1.0, 2.0])
    bad.logprob = bad.logprob[:1]
    with pytest.raises(ValueError, match="differ in length"):
        scores_of([bad])  # the columns check it; a scores file says where (run_mask_cli)


def test_mask_arrays_are_read_only(six):
    r = compute_masks(scores_of([six]), MaskConfig())
    with pytest.raises(ValueError):
        r.masks[0][0] = True
    assert r.mask_for("six") is r.masks[0]
    with pytest.raises(LensError, match="unknown example id"):
        r.mask_for("nope")


# --------------------------------------------------------------------------- properties


@SETTINGS
@given(data=datasets_st(), taus=st.lists(taus_st, min_size=2, max_size=6))
def test_share_monotone_in_tau(data, taus):
    idx = PplIndex.from_scores(scores_of(data))
    taus = sorted(taus)
    hi = [compute_masks(idx, MaskConfig(mode="high", tau=t)).stats().n_masked for t in taus]
    lo = [compute_masks(idx, MaskConfig(mode="low", tau=t)).stats().n_masked for t in taus]
    assert all(a >= b for a, b in zip(hi, hi[1:], strict=False))
    assert all(a <= b for a, b in zip(lo, lo[1:], strict=False))
    # the curve agrees with compute_masks
    if idx.n_tokens:
        curve_hi = share_vs_tau_curve(idx, taus)["share"].to_numpy() * idx.n_tokens
        curve_lo = share_vs_tau_curve(idx, taus, "low")["share"].to_numpy() * idx.n_tokens
        assert np.allclose(curve_hi, hi) and np.allclose(curve_lo, lo)


@SETTINGS
@given(
    data=datasets_st(),
    tau=taus_st,
    k=st.floats(0, 100, allow_nan=False),
    rule=st.sampled_from(["top", "bottom"]),
)
def test_vectorised_matches_naive(data, tau, k, rule):
    idx = PplIndex.from_scores(scores_of(data))
    for cfg in (
        MaskConfig(mode="high", tau=tau),
        MaskConfig(mode="low", tau=tau),
        MaskConfig(mode="percentile", percentile_rule=rule, k_percent=k),
    ):
        got = [m.tolist() for m in compute_masks(idx, cfg).masks]
        assert got == naive_masks(data, cfg, tau)


@SETTINGS
@given(data=datasets_st(), tau=taus_st, seed=st.integers(0, 2**32), shuffle_seed=st.integers())
def test_random_matched_count_deterministic_order_independent(data, tau, seed, shuffle_seed):
    cfg = MaskConfig(mode="random", tau=tau, seed=seed)
    res = compute_masks(scores_of(data), cfg)
    high = compute_masks(scores_of(data), MaskConfig(mode="high", tau=tau))
    for m_rand, m_high in zip(res.masks, high.masks, strict=True):
        assert m_rand.sum() == m_high.sum()
    again = compute_masks(scores_of(data), cfg)
    assert all(a.tolist() == b.tolist() for a, b in zip(res.masks, again.masks, strict=True))
    shuffled = list(data)
    random.Random(shuffle_seed).shuffle(shuffled)
    res_shuffled = compute_masks(scores_of(shuffled), cfg)
    for ex in data:
        assert res.mask_for(ex.id).tolist() == res_shuffled.mask_for(ex.id).tolist()


def test_random_differs_across_seeds():
    ex = from_ppl("long", [1.0] * 100 + [10.0] * 100)
    masks = {
        tuple(compute_masks(scores_of([ex]), MaskConfig(mode="random", tau=2.5, seed=s)).masks[0])
        for s in range(5)
    }
    assert len(masks) == 5


def test_random_masks_are_nested_across_tau():
    ex = from_ppl("n", [1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 9.0, 12.0])
    prev = None
    for tau in [10.0, 5.0, 2.5, 1.2]:
        m = compute_masks(scores_of([ex]), MaskConfig(mode="random", tau=tau, seed=2)).masks[0]
        if prev is not None:
            assert not (prev & ~m).any()
        prev = m


@SETTINGS
@given(
    data=datasets_st(),
    mode=st.sampled_from(["high", "low", "random", "percentile"]),
    tau=taus_st,
    k=st.floats(0, 100, allow_nan=False),
)
def test_labels_never_train_prompt_and_follow_mask(data, mode, tau, k):
    cfg = MaskConfig(mode=mode, tau=tau, k_percent=k)
    res = compute_masks(scores_of(data), cfg)
    for ex, mask in zip(data, res.masks, strict=True):
        labels = labels_for(ex, mask)
        assert len(labels) == len(ex.token_ids)
        assert all(lab == IGNORE_INDEX for lab in labels[: ex.response_start])
        for j, m in enumerate(mask):
            pos = ex.response_start + j
            assert labels[pos] == (IGNORE_INDEX if m else ex.token_ids[pos])


def test_labels_never_train_prompt_even_with_nothing_masked():
    ex = from_ppl("p", [1.0, 1.0], prompt_len=5)
    labels = labels_for(ex, np.zeros(2, dtype=bool))
    assert labels == [-100] * 5 + [1000, 1001]


@SETTINGS
@given(
    ppls=st.lists(
        st.floats(min_value=1.0, max_value=1e6, allow_nan=False), min_size=1, max_size=200
    ),
    share=st.floats(0, 1, allow_nan=False),
    mode=st.sampled_from(["high", "low"]),
)
def test_solved_tau_reproduces_share(ppls, share, mode):
    arr = np.array(ppls)
    tau = solve_tau_for_share([arr[: len(arr) // 2], arr[len(arr) // 2 :]], share, mode)
    assert math.isfinite(tau) and tau > 0
    count = int((arr > tau).sum() if mode == "high" else (arr < tau).sum())
    # the nearest count any threshold can reach
    values = np.unique(arr)
    if mode == "high":
        reachable = {len(arr)} | {int((arr > v).sum()) for v in values}
    else:
        reachable = {0} | {int((arr <= v).sum()) for v in values}
    best = min(abs(c - share * len(arr)) for c in reachable)
    assert abs(count - share * len(arr)) == pytest.approx(best)
    if len(values) == len(arr):  # distinct values: within one token (in fact half a token)
        assert abs(count - share * len(arr)) <= 0.5 + 1e-9
    # through compute_masks and a PplIndex as well
    idx = PplIndex(["x"], [arr])
    cfg = MaskConfig(mode=mode, tau=None, target_share=share)
    assert compute_masks(idx, cfg).stats().n_masked == count


# --------------------------------------------------------------------------- export


@pytest.fixture
def small_set() -> list[ScoredExample]:
    return [
        from_ppl("a", [1.0, 3.0, 1.2, 8.0]),
        from_ppl("b", [5.0, 6.0], prompt_len=2),
        from_ppl("c", [1.0, 2.0, 2.5]),
    ]


def test_export_round_trip(tmp_path, small_set):
    import datasets

    res = compute_masks(scores_of(small_set), MaskConfig(tau=2.5))
    extra = {"model_fingerprint": "m123", "source_fingerprint": "s456"}
    out = export_masked_dataset(scores_of(small_set), res, tmp_path / "out", extra)
    assert sorted(p.name for p in out.iterdir()) == ["hf_dataset", "manifest.json", "masked.jsonl"]
    rows, manifest = load_masked_dataset(out)
    assert rows == masked_rows(scores_of(small_set), res)
    assert [r["labels"] for r in rows] == [
        labels_for(ex, m) for ex, m in zip(small_set, res.masks, strict=True)
    ]
    assert rows[0]["messages"] == [
        {"role": "user", "content": "prompt a"},
        {"role": "assistant", "content": "response a"},
    ]
    assert rows[1]["n_masked"] == 2 and rows[1]["n_response"] == 2
    assert manifest["mode"] == "high" and manifest["tau"] == 2.5
    assert manifest["model_fingerprint"] == "m123" and manifest["source_fingerprint"] == "s456"
    assert manifest["n_masked"] == 4 and manifest["n_response_tokens"] == 9
    assert manifest["pooled_share"] == pytest.approx(4 / 9)
    assert manifest["fully_masked_ids"] == ["b"] and manifest["n_fully_masked"] == 1
    assert manifest["core_version"] and manifest["created_at"]
    assert manifest == json.loads((out / "manifest.json").read_text())
    hf = datasets.load_from_disk(str(out / "hf_dataset"))
    assert hf["labels"] == [r["labels"] for r in rows]
    assert hf["input_ids"] == [r["input_ids"] for r in rows]
    assert hf["id"] == ["a", "b", "c"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left


def test_export_refuses_non_empty_dir(tmp_path, small_set):
    res = compute_masks(scores_of(small_set), MaskConfig())
    out = export_masked_dataset(scores_of(small_set), res, tmp_path / "out")
    before = (out / "manifest.json").read_text()
    other = compute_masks(scores_of(small_set), MaskConfig(mode="low"))
    with pytest.raises(LensError, match="not empty"):
        export_masked_dataset(scores_of(small_set), other, out)
    assert (out / "manifest.json").read_text() == before
    export_masked_dataset(scores_of(small_set), other, out, overwrite=True)
    assert load_masked_dataset(out)[1]["mode"] == "low"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_export_never_replaces_a_foreign_directory(tmp_path, small_set):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    res = compute_masks(scores_of(small_set), MaskConfig())
    with pytest.raises(LensError, match="not a masked export"):
        export_masked_dataset(scores_of(small_set), res, foreign, overwrite=True)
    assert (foreign / "notes.txt").read_text() == "keep me"
    file_target = tmp_path / "file"
    file_target.write_text("x")
    with pytest.raises(LensError, match="not a directory"):
        export_masked_dataset(scores_of(small_set), res, file_target)


def test_export_into_empty_existing_dir(tmp_path, small_set):
    (tmp_path / "empty").mkdir()
    res = compute_masks(scores_of(small_set), MaskConfig())
    out = export_masked_dataset(scores_of(small_set), res, tmp_path / "empty")
    assert (out / "masked.jsonl").is_file()


def test_export_failure_leaves_nothing_half_written(tmp_path, small_set, monkeypatch):
    import datasets

    res = compute_masks(scores_of(small_set), MaskConfig())
    out = export_masked_dataset(scores_of(small_set), res, tmp_path / "out")
    before = sorted(p.name for p in out.rglob("*"))

    def boom(self, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(datasets.Dataset, "save_to_disk", boom)
    with pytest.raises(LensError, match="No space left"):
        export_masked_dataset(scores_of(small_set), res, out, overwrite=True)
    with pytest.raises(LensError, match="No space left"):
        export_masked_dataset(scores_of(small_set), res, tmp_path / "fresh")
    assert sorted(p.name for p in out.rglob("*")) == before
    assert not (tmp_path / "fresh").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_export_checks_alignment_and_extra(tmp_path, small_set):
    res = compute_masks(scores_of(small_set), MaskConfig())
    with pytest.raises(LensError, match="different order"):
        export_masked_dataset(scores_of(small_set[::-1]), res, tmp_path / "o1")
    with pytest.raises(LensError, match="masks for 3"):
        export_masked_dataset(scores_of(small_set[:2]), res, tmp_path / "o2")
    rescored = [from_ppl("a", [9.0, 9.0, 9.0, 9.0]), *small_set[1:]]
    with pytest.raises(LensError, match="different scores"):
        export_masked_dataset(scores_of(rescored), res, tmp_path / "o3")
    with pytest.raises(LensError, match="clashes"):
        export_masked_dataset(scores_of(small_set), res, tmp_path / "o4", {"tau": 3})
    with pytest.raises(LensError, match="JSON"):
        export_masked_dataset(scores_of(small_set), res, tmp_path / "o5", {"x": object()})
    assert not list(tmp_path.iterdir())


def test_load_errors(tmp_path):
    with pytest.raises(LensError, match="not a masked export"):
        load_masked_dataset(tmp_path)


# --------------------------------------------------------------------------- CLI entry


def write_scores(path, examples):
    path.write_text("".join(json.dumps(ex.to_json_row()) + "\n" for ex in examples))
    return path


def test_run_mask_cli(tmp_path, small_set):
    scores = write_scores(tmp_path / "scores.jsonl", small_set)
    manifest = run_mask_cli(str(scores), str(tmp_path / "m"), MaskConfig(tau=2.5))
    assert manifest["tau"] == 2.5 and manifest["n_masked"] == 4
    assert manifest["source_fingerprint"] and manifest["conventions"] == ["prompt"]
    rows, _ = load_masked_dataset(tmp_path / "m")
    res = compute_masks(scores_of(small_set), MaskConfig(tau=2.5))
    assert rows == masked_rows(scores_of(small_set), res)
    # the default tau (the flags' errors and defaults: tests/test_mask_settings.py)
    m2 = run_mask_cli(str(scores), str(tmp_path / "m2"), MaskConfig())
    assert m2["tau"] == DEFAULT_TAU
    share = MaskConfig(mode="random", tau=None, target_share=0.5, seed=1)
    m3 = run_mask_cli(str(scores), str(tmp_path / "m3"), share)
    assert m3["target_share"] == 0.5 and m3["mode"] == "random"
    bottom = MaskConfig(mode="percentile", k_percent=50, percentile_rule="bottom")
    m4 = run_mask_cli(str(scores), str(tmp_path / "m4"), bottom)
    assert m4["tau"] is None and m4["k_percent"] == 50 and m4["percentile_rule"] == "bottom"
    with pytest.raises(LensError, match="not empty"):
        run_mask_cli(str(scores), str(tmp_path / "m"), MaskConfig(tau=2.5))


def test_run_mask_cli_file_errors(tmp_path, small_set):
    args = (str(tmp_path / "o"), MaskConfig())
    with pytest.raises(LensError, match="scores file not found"):
        run_mask_cli(str(tmp_path / "missing.jsonl"), *args)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(small_set[0].to_json_row()) + "\n{not json\n")
    with pytest.raises(LensError, match=r"bad.jsonl:2: not valid JSON"):
        run_mask_cli(str(bad), *args)
    partial = tmp_path / "partial.jsonl"
    partial.write_text(json.dumps({"id": "x", "token_ids": [1]}) + "\n")
    with pytest.raises(LensError, match=r"partial.jsonl:1: missing field\(s\) response_start"):
        run_mask_cli(str(partial), *args)
    not_obj = tmp_path / "list.jsonl"
    not_obj.write_text("[1, 2]\n")
    with pytest.raises(LensError, match="JSON object"):
        run_mask_cli(str(not_obj), *args)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(LensError, match="no scored examples"):
        run_mask_cli(str(empty), *args)
    short = small_set[0].to_json_row()
    short["logprob"] = short["logprob"][:1]
    (tmp_path / "short.jsonl").write_text(json.dumps(short) + "\n")
    with pytest.raises(LensError, match=r"short.jsonl:1: 1 log-probs for 4 response tokens"):
        run_mask_cli(str(tmp_path / "short.jsonl"), *args)
    dup = write_scores(tmp_path / "dup.jsonl", [small_set[0], small_set[0]])
    with pytest.raises(LensError, match="duplicate example id"):
        run_mask_cli(str(dup), *args)
    assert not (tmp_path / "o").exists()


def test_mask_stats_function_equals_method(small_set):
    res = compute_masks(scores_of(small_set), MaskConfig())
    assert mask_stats(res).summary() == res.stats().summary()


# --------------------------------------------------------------------------- provenance


def test_cli_score_then_mask_records_model_and_fingerprint(tiny_model_dir, tiny_lm, tmp_path):
    """The real round: `score` writes rows naming the model, `mask` puts it in the manifest."""
    from core.cli import main
    from core.data.records import Example
    from core.scoring.cache import ScoreCache
    from core.scoring.score import score_examples

    data = tmp_path / "d.jsonl"
    pairs = [("Add two numbers.", "def add(a, b):\n    return a + b"), ("Hi", "Hello there!")]
    data.write_text("".join(json.dumps({"prompt": p, "response": r}) + "\n" for p, r in pairs))
    scores = tmp_path / "scores.jsonl"
    model_args = ["--model", str(tiny_model_dir), "--device", "cpu", "--dtype", "float32"]
    assert main(["score", *model_args, "--data", str(data), "--out", str(scores)]) == 0
    rows = [json.loads(line) for line in scores.read_text().splitlines()]
    assert [r["model"] for r in rows] == [tiny_lm.cache_key] * 2
    assert tiny_lm.cache_key.endswith("|float32")

    out = tmp_path / "masked"
    assert main(["mask", "--scores", str(scores), "--tau", "2.5", "--out", str(out)]) == 0
    exported, manifest = load_masked_dataset(out)
    assert manifest["model"] == tiny_lm.cache_key
    assert manifest["source_scores_sha256"] == masking_export._file_sha256(scores)
    # the fingerprint is of the scores' content: the app, which takes the same scores from its
    # cache instead of a file, records the same value
    examples = [Example(id=f"row-{i + 1}", prompt=p, response=r) for i, (p, r) in enumerate(pairs)]
    run = score_examples(tiny_lm, examples, cache=ScoreCache())
    assert run.n_cached == 2
    assert manifest["source_fingerprint"] == masking_export.scores_fingerprint(run.scores)
    assert [r["labels"] for r in exported] == [
        labels_for(ex, m)
        for ex, m in zip(run.examples, compute_masks(run.scores, MaskConfig()).masks, strict=True)
    ]


def test_scores_fingerprint_tracks_content(small_set):
    base = masking_export.scores_fingerprint(scores_of(small_set))
    round_trip = [ScoredExample.from_dict(json.loads(json.dumps(ex.to_dict()))) for ex in small_set]
    assert masking_export.scores_fingerprint(scores_of(round_trip)) == base
    changed = [from_ppl("a", [1.0, 3.0, 1.2, 8.5]), *small_set[1:]]
    assert masking_export.scores_fingerprint(scores_of(changed)) != base
    assert masking_export.scores_fingerprint(scores_of(small_set[::-1])) != base


def test_run_mask_cli_model_field(tmp_path, small_set):
    args = (MaskConfig(),)
    plain = write_scores(tmp_path / "plain.jsonl", small_set)
    assert run_mask_cli(str(plain), str(tmp_path / "o1"), *args)["model"] is None
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text(
        "".join(
            json.dumps({**ex.to_json_row(), "model": f"m{i % 2}|float32"}) + "\n"
            for i, ex in enumerate(small_set)
        )
    )
    with pytest.raises(LensError, match="2 different models"):
        run_mask_cli(str(mixed), str(tmp_path / "o2"), *args)
    assert not (tmp_path / "o2").exists()


def test_export_gets_ordinary_permissions_and_jsonl_bytes(tmp_path, small_set):
    import os
    import stat

    res = compute_masks(scores_of(small_set), MaskConfig())
    old = os.umask(0o022)
    try:
        out = export_masked_dataset(scores_of(small_set), res, tmp_path / "out")
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    assert (out / "masked.jsonl").read_bytes() == masking_export.masked_jsonl_bytes(
        scores_of(small_set), res
    )


def test_export_to_unwritable_place_is_a_lens_error(tmp_path, small_set):
    res = compute_masks(scores_of(small_set), MaskConfig())
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(LensError, match="cannot write into"):
        export_masked_dataset(scores_of(small_set), res, blocker / "sub" / "out")
    assert blocker.read_text() == "x"
