"""Paired intervals over items (core.stats): they cover a known effect at about their level,
say "no detectable difference" when the interval holds zero, are reproducible, resample pooled
metrics as sums, and never return NaN for too few items."""

from __future__ import annotations

import numpy as np
import pytest

from core.stats import hierarchical_interval, mean_of_paired_interval, paired_interval


def _paired_accuracies(rng, n: int, p_base: float, p_tuned: float, rho: float = 0.6):
    """Correlated 0/1 outcomes on the same n items (a shared item difficulty)."""
    difficulty = rng.normal(size=n)
    noise_b, noise_t = rng.normal(size=n), rng.normal(size=n)
    from statistics import NormalDist

    cut_b, cut_t = NormalDist().inv_cdf(1 - p_base), NormalDist().inv_cdf(1 - p_tuned)
    latent_b = np.sqrt(rho) * difficulty + np.sqrt(1 - rho) * noise_b
    latent_t = np.sqrt(rho) * difficulty + np.sqrt(1 - rho) * noise_t
    return (latent_b > cut_b).astype(float), (latent_t > cut_t).astype(float)


def test_the_interval_covers_a_known_accuracy_drop_about_95_percent_of_the_time():
    rng = np.random.default_rng(7)
    true_drop = (0.45 - 0.55) * 100  # points
    hits, excluded_zero = 0, 0
    trials = 200
    for trial in range(trials):
        base, tuned = _paired_accuracies(rng, 300, 0.55, 0.45)
        # the truth for this finite design is the population change
        interval = paired_interval(base, tuned, scale=100, n_boot=1000, seed=trial)
        hits += interval.low <= true_drop <= interval.high
        excluded_zero += interval.verdict() == "worse"
    assert 0.90 <= hits / trials <= 0.99
    assert excluded_zero / trials > 0.8  # a 10-point drop on 300 items is usually detected


def test_no_effect_reads_no_detectable_difference_with_the_detectable_size():
    rng = np.random.default_rng(3)
    base, tuned = _paired_accuracies(rng, 40, 0.5, 0.5)
    interval = paired_interval(base, tuned, scale=100, seed=1)
    assert interval.low < 0 < interval.high
    assert interval.verdict() == "no detectable difference"
    assert interval.detectable is not None and interval.detectable > 5  # n=40 cannot see 5 points
    assert "no detectable difference (detectable at n=40" in interval.describe(" points")
    assert paired_interval(base, tuned, scale=100, seed=1) == interval  # seeded: reproducible


def test_pooled_nll_is_resampled_as_sums_and_relative_changes_are_percent():
    base = [(10.0, 5), (2.0, 1), (30.0, 10)]  # (summed NLL, tokens): pooled 42/16
    tuned = [(12.0, 5), (2.0, 1), (36.0, 10)]  # pooled 50/16
    interval = paired_interval(base, tuned, relative=True, seed=0)
    assert interval.estimate == pytest.approx(100 * (50 / 16 - 42 / 16) / (42 / 16))
    assert interval.low <= interval.estimate <= interval.high


def test_too_few_items_and_a_zero_base_say_so_instead_of_nan():
    one = paired_interval([1.0], [0.0], scale=100)
    assert one.estimate == -100 and one.low is None and "too few" in one.reason
    zero = paired_interval([0.0, 0.0, 0.0], [1.0, 0.0, 1.0], relative=True)
    assert zero.estimate is None and "base value is 0" in zero.reason
    assert paired_interval([], []).reason == "no items"
    assert "too few" in one.describe(" points")


def test_seeds_and_items_together_widen_the_interval():
    rng = np.random.default_rng(11)
    base_by_seed, tuned_by_seed = [], []
    for shift in (-0.12, 0.0, 0.12):  # the seed itself moves the tuned accuracy
        b, t = _paired_accuracies(rng, 200, 0.5, 0.45 + shift)
        base_by_seed.append(b)
        tuned_by_seed.append(t)
    both = hierarchical_interval(base_by_seed, tuned_by_seed, scale=100, n_boot=500, seed=0)
    # the same items pooled as if they were one run: blind to how much the seed moves things
    pooled = paired_interval(
        np.concatenate(base_by_seed), np.concatenate(tuned_by_seed), scale=100, n_boot=500, seed=0
    )
    assert both.estimate == pytest.approx(pooled.estimate)
    assert (both.high - both.low) > 1.5 * (pooled.high - pooled.low)
    assert both.method.startswith("hierarchical")


def test_the_mean_change_over_tasks_resamples_each_task():
    rng = np.random.default_rng(5)
    tasks = [_paired_accuracies(rng, 150, 0.6, 0.5), _paired_accuracies(rng, 150, 0.4, 0.4)]
    interval = mean_of_paired_interval(tasks, seed=0)
    per_task = [100 * (t.mean() - b.mean()) / b.mean() for b, t in tasks]
    assert interval.estimate == pytest.approx(np.mean(per_task))
    assert interval.low < interval.estimate < interval.high


def test_tuned_vs_base_carries_paired_intervals_per_task_and_for_ti_and_bwt():
    from core.eval.compare import compare_results
    from core.eval.scorers import SuiteResult, TaskResult
    from core.eval.suites import CODE_EXEC, MC_LOGLIK, EvalSuite, EvalTaskSpec

    suite = EvalSuite(
        "s",
        "",
        target=(EvalTaskSpec("mbpp", "mbpp", CODE_EXEC, n=80),),
        ood=(EvalTaskSpec("arc", "arc_easy", MC_LOGLIK, n=80),),
    )
    rng = np.random.default_rng(0)
    code_b, code_t = _paired_accuracies(rng, 80, 0.3, 0.5)
    arc_b, arc_t = _paired_accuracies(rng, 80, 0.6, 0.35)

    def result(code, arc) -> SuiteResult:
        tasks = [
            TaskResult(
                "mbpp",
                "mbpp",
                CODE_EXEC,
                "target",
                "pass@1",
                {"pass@1": code.mean()},
                80,
                0.0,
                [{"id": f"m{i}", "passed": bool(v)} for i, v in enumerate(code)],
            ),
            TaskResult(
                "arc",
                "arc_easy",
                MC_LOGLIK,
                "ood",
                "acc",
                {"acc": arc.mean()},
                80,
                0.0,
                [{"id": f"a{i}", "pred": 0, "gold": 0 if v else 1} for i, v in enumerate(arc)],
            ),
        ]
        return SuiteResult("s", suite.fingerprint(), "m", None, tasks, 0.0)

    c = compare_results(result(code_b, arc_b), result(code_t, arc_t), suite)
    arc = c.per_task["arc"]["delta_interval"]
    assert arc["estimate"] == pytest.approx(100 * (arc_t.mean() - arc_b.mean()))
    assert arc["high"] < 0  # a 25-point drop on 80 items is detected
    assert c.bwt_interval["estimate"] == pytest.approx(c.bwt)
    assert c.bwt_interval["high"] < 0
    assert c.ti_interval["estimate"] == pytest.approx(c.ti)
    record = c.summary_record(step=3)
    assert record["bwt_low"] == c.bwt_interval["low"] and record["ti_high"] == c.ti_interval["high"]


def test_a_task_at_chance_shows_its_chance_level_and_stays_out_of_bwt():
    from core.eval.compare import compare_results
    from core.eval.scorers import SuiteResult, TaskResult
    from core.eval.suites import MC_LOGLIK, EvalSuite, EvalTaskSpec

    suite = EvalSuite(
        "s",
        "",
        target=(),
        ood=(
            EvalTaskSpec("easy", "arc_easy", MC_LOGLIK, n=120),
            EvalTaskSpec("hard", "arc_challenge", MC_LOGLIK, n=120),
        ),
    )
    rng = np.random.default_rng(2)

    def task(name: str, p: float) -> TaskResult:
        right = rng.random(120) < p
        details = [
            {
                "id": f"{name}{i}",
                "pred": 0,
                "gold": 0 if ok else 1,
                "pred_norm": 0,
                "ll": [0.0, -1.0, -2.0, -3.0],
            }
            for i, ok in enumerate(right)
        ]
        return TaskResult(
            name, name, MC_LOGLIK, "ood", "acc", {"acc": right.mean()}, 120, 0.0, details
        )

    def result() -> SuiteResult:
        return SuiteResult(
            "s", suite.fingerprint(), "m", None, [task("easy", 0.6), task("hard", 0.25)], 0.0
        )

    c = compare_results(result(), result(), suite)
    assert c.per_task["hard"]["chance"] == pytest.approx(0.25)
    assert c.per_task["hard"]["at_chance"] and not c.per_task["easy"]["at_chance"]
    assert c.bwt_tasks == ["easy"]
    assert any("hard" in note and "chance (0.250)" in note for note in c.notes)
