"""The one-command paper protocol: statistics, plan, bad settings, and a whole (tiny) run."""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from core.errors import LensError
from core.stats import mean_ci
from core.study.protocol import (
    PARTIAL_JSON,
    REPORT_HTML,
    RESULTS_JSON,
    RESULTS_MD,
    ProtocolConfig,
    arm_specs,
    compare_to_gt,
    findings,
    load_protocol,
    run_protocol,
    train_config,
)
from tests.factories import sweep_row, tiny_protocol_config

ROOT = Path(__file__).resolve().parents[1]


def test_mean_ci_is_the_student_t_interval():
    values = [1.0, 2.0, 4.0]
    stat = mean_ci(values)
    assert stat["n"] == 3
    assert stat["mean"] == pytest.approx(statistics.mean(values))
    assert stat["sd"] == pytest.approx(statistics.stdev(values))
    # t(0.975, 2 df) = 4.303
    assert stat["ci95"] == pytest.approx(4.303 * statistics.stdev(values) / math.sqrt(3))
    assert mean_ci([5.0]) == {"n": 1, "mean": 5.0, "sd": None, "ci95": None}
    assert mean_ci([None, float("nan")])["mean"] is None


def _arm(label, measure, values):
    return {
        "label": label,
        "seeds": list(range(len(values))),
        "failed": [],
        "measures": {measure: mean_ci(values)},
    }


def test_findings_read_the_intervals_not_the_paper():
    gt = _arm("ground truth", "ood_nll_easy_Δ%", [10.0, 11.0, 12.0])
    stm = _arm("STM τ=2.5", "ood_nll_easy_Δ%", [1.0, 2.0, 1.5])
    rnd = _arm("random", "ood_nll_easy_Δ%", [9.0, 12.0, 11.0])
    worse = _arm("low", "ood_nll_easy_Δ%", [30.0, 31.0, 32.0])
    assert compare_to_gt(stm, gt, "ood_nll_easy_Δ%") == "lower"
    assert compare_to_gt(rnd, gt, "ood_nll_easy_Δ%") == "overlap"
    assert compare_to_gt(worse, gt, "ood_nll_easy_Δ%") == "higher"
    text = findings({"arms": {"gt": gt, "stm": stm, "random": rnd, "low": worse}})
    assert any(t.startswith("STM τ=2.5") and "better than ground truth" in t for t in text)
    assert any(t.startswith("random") and "indistinguishable" in t for t in text)
    assert any(t.startswith("low") and "worse than ground truth" in t for t in text)


def _row(arm, task, estimate, low, high, higher=True, role="ood", against="the base model"):
    interval = {"estimate": estimate, "low": low, "high": high, "n": 100, "method": "test"}
    return {
        "arm": arm,
        "label": {"gt": "ground truth", "stm": "STM"}[arm],
        "against": against,
        "task": task,
        "role": role,
        "metric": "acc" if higher else "nll",
        "seeds": 1,
        "higher_is_better": higher,
        "interval": interval,
    }


def test_headline_says_forgetting_only_where_an_interval_excludes_zero():
    from core.study.protocol import headline

    results = {
        "paired_base": [
            _row("gt", "arc_easy", -6.0, -9.0, -3.0),  # GT lost 6 points: detectable
            _row("gt", "gsm8k_ppl", 0.05, -0.01, 0.11, higher=False),  # within noise
            _row("gt", "mbpp_ppl", -0.3, -0.4, -0.2, higher=False, role="target"),
        ],
        "paired": [
            _row("stm", "arc_easy", 4.0, 1.0, 7.0, against="ground truth"),
            _row("stm", "gsm8k_ppl", 0.02, -0.03, 0.07, higher=False, against="ground truth"),
        ],
    }
    lines = headline(results)
    assert lines[0].startswith(
        "Benchmarks: ground-truth fine-tuning made the model detectably worse"
    )
    assert "arc_easy acc" in lines[0] and "gsm8k_ppl" not in lines[0]
    assert lines[1] == (
        "STM: forgot less than ground truth on arc_easy acc; no detectable difference from "
        "ground truth on 1 benchmark task(s)."
    )
    results["paired_base"][0] = _row("gt", "arc_easy", -2.0, -5.0, 1.0)  # now within noise
    assert headline(results)[0].startswith(
        "Benchmarks: ground-truth fine-tuning caused no detectable out-of-domain loss"
    )
    assert headline({"paired_base": []}) == [
        "No per-item results yet: nothing can be said with an interval."
    ]


def _drift_row(arm, metric, estimate, low, high, against="the base model"):
    row = _row(
        arm, "ood_drift", estimate, low, high, higher=metric == "top1_agree", against=against
    )
    return {**row, "metric": metric, "drift": True}


def test_the_headline_leads_with_drift_and_tells_sharpening_from_moving_away():
    from core.study.protocol import headline

    results = {
        "paired_base": [
            _drift_row("gt", "kl", 0.176, 0.163, 0.189),
            _drift_row("gt", "top1_agree", -15.7, -17.0, -14.1),
            _drift_row("gt", "dnll", 0.15, 0.12, 0.18),
            _row("gt", "arc_easy", -2.0, -5.0, 1.0),
        ],
        "paired": [
            _drift_row("stm", "kl", -0.091, -0.102, -0.080, against="ground truth"),
            _drift_row("stm", "top1_agree", 7.4, 6.0, 8.9, against="ground truth"),
            _drift_row("stm", "dnll", -0.23, -0.27, -0.19, against="ground truth"),
            _row("stm", "arc_easy", 1.0, -1.0, 3.0, against="ground truth"),
        ],
    }
    lines = headline(results)
    assert lines[0].startswith("Drift (ood_drift, 1 seed(s)): ground-truth fine-tuning moved")
    assert "token KL +0.176 [+0.163, +0.189] nats" in lines[0]
    assert "top-1 agreement -15.7 [-17.0, -14.1] points" in lines[0]
    assert lines[1].startswith("STM drifted less than ground truth on ood_drift")
    assert "sharpening toward them" in lines[1]  # its Δ NLL fell: it kept the base's answers
    assert lines[2].startswith("Benchmarks: ground-truth fine-tuning caused no detectable")
    # an interval that reaches zero is no verdict
    results["paired"][0] = _drift_row("stm", "kl", -0.01, -0.03, 0.01, against="ground truth")
    assert "no detectable difference in drift" in headline(results)[1]
    # the gain side: each arm's target change against the base model, with its verdict
    results["paired_base"].append(
        _row("stm", "mbpp_ppl", 0.40, 0.34, 0.47, higher=False, role="target")
    )
    target = [line for line in headline(results) if line.startswith("Target (mbpp_ppl nll")]
    assert target == [
        "Target (mbpp_ppl nll, against the base model): STM +0.40 [+0.34, +0.47] nats (worse)."
    ]
    # an arm that trained on far fewer examples than ground truth gets a caveat
    results["arms"] = {
        "gt": {"label": "ground truth", "measures": {"train examples": {"mean": 64}}},
        "self_output": {"label": "Self-Output", "measures": {"train examples": {"mean": 5}}},
    }
    assert "Self-Output trained on 5 examples against ground truth's 64" in " ".join(
        headline(results)
    )
    # STM against the random control (as many tokens masked): its own sentence
    results["paired_random"] = [
        _drift_row("stm", "kl", -0.05, -0.08, -0.02, against="the random control")
    ]
    assert any(
        line.startswith("STM drifted less than the random control on ood_drift")
        for line in headline(results)
    )
    # with enough runs, the headline says whether drift ranks the runs as ARC-Easy does
    from core.study.agreement import drift_agreement

    def run(arm, seed, kl, end):
        return {
            "arm": arm,
            "label": arm,
            "seed": seed,
            "measures": {
                "ood:ood_drift:kl": kl,
                "ood:arc_easy:acc": end,
                "ood:arc_easy:acc:Δ%": 100 * (end - 0.6) / 0.6,
            },
        }

    runs = [
        run("gt", 0, 0.2, 0.57),
        run("gt", 1, 0.15, 0.58),
        run("stm", 0, 0.08, 0.6),
        run("stm", 1, 0.07, 0.605),
    ]
    results["agreement"] = drift_agreement(runs[:3])
    assert not any("rank-correlate" in line for line in headline(results))  # 3 runs: too few
    results["agreement"] = drift_agreement(runs)
    assert headline(results)[-1].startswith("Over 4 runs, drift and ARC-Easy loss rank-correlate")


def test_arms_train_what_the_paper_compares():
    config = ProtocolConfig(tau=3.0, target_share=0.2)
    arms = arm_specs(config)
    stm = train_config(config, arms["stm"], seed=1)
    share = train_config(config, arms["stm_share"], seed=1)
    rnd = train_config(config, arms["random"], seed=2)
    gt = train_config(config, arms["gt"], seed=0)
    so = train_config(config, arms["self_output"], seed=0, data="/sets/so-v1")
    assert (stm["method"], stm["tau"], stm["target_share"]) == ("stm", 3.0, None)
    assert (share["method"], share["tau"], share["target_share"]) == ("stm", None, 0.2)
    assert (rnd["method"], rnd["tau"], rnd["mask_seed"], rnd["seed"]) == ("random", 3.0, 2, 2)
    assert gt["method"] == "gt" and gt["task"] == "mbpp" and gt["split"] == "train"
    assert so["method"] == "gt" and so["data"] == "/sets/so-v1" and so["task"] is None
    # every arm evaluates at step 0 and at its end only, on the same suite
    assert {c["eval_suite"] for c in (stm, share, rnd, gt, so)} == {"protocol"}
    assert all(c["eval_every"] >= 10**6 for c in (stm, gt, so))


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"methods": "gt,dpo"}, "Unknown arm"),
        ({"seeds": "0,0"}, "seed is named twice"),
        ({"target_share": 1.5}, "between 0 and 1"),
        ({"seeds": "a,b"}, "integers"),
    ],
)
def test_bad_settings_are_one_line_errors(overrides, message):
    with pytest.raises(LensError, match=message):
        ProtocolConfig.from_preset("cpu", **overrides)


def test_cli_rejects_bad_input_before_any_job(tmp_path):
    env = {"PLENS_CACHE_DIR": str(tmp_path), "PATH": "/usr/bin:/bin"}
    for args, reason in (
        (["--task", "nosuch"], "Unknown task"),
        (["--suite", "nosuch"], "Unknown evaluation suite"),
        (["--learning-rate", "-1"], "learning_rate"),
        (["--seeds", "0,x"], "Seeds must be integers"),
        (["--methods", "gt,dpo"], "Unknown arm"),
    ):
        out = subprocess.run(
            [sys.executable, "-m", "core", "protocol", *args],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert out.returncode == 2, out.stderr
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:") and reason in lines[0]
    runs = tmp_path / "runs"  # no job was registered, no run folder made
    assert not runs.exists() or not [p for p in runs.iterdir() if p.is_dir()]


def test_cli_flags_reach_the_config():
    from core.cli import build_parser
    from core.study.protocol import ProtocolConfig

    args = build_parser().parse_args(
        ["protocol", "--seeds", "0,1,2", "--methods", "gt,stm", "--limit", "none", "--tau", "3"]
    )
    config = ProtocolConfig.from_args(args)
    assert (config.seeds, config.methods, config.limit, config.tau) == (
        [0, 1, 2],
        ["gt", "stm"],
        None,
        3.0,
    )


def test_tiny_protocol_end_to_end_then_resumes(tiny_model_dir, tmp_path):
    """GT, STM and Self-Output x 2 seeds on the tiny random model: every run trains in its own
    process, the table has both seeds with intervals, the random model keeps no Self-Output
    sample (so that arm is skipped with its reason), the report is written, and a second call
    reuses every finished run."""
    from core.jobs.runfiles import runs_dir
    from core.study.runs import list_runs

    config = tiny_protocol_config(
        tiny_model_dir,
        methods=["gt", "stm_share", "self_output"],
        seeds=[0, 1],
        gen_samples=2,
        gen_max_new_tokens=8,
        gen_prompt_batch=4,
    )
    from core.jobs.state import Phase, StateReporter, read_state

    folder = runs_dir() / "proto"
    said: list[str] = []
    results = run_protocol(config, folder, status=StateReporter(folder, said.append))
    # the job's state: k of N runs finished, which arm and seed runs, then the aggregation
    assert "0 of 6 runs finished · running the Self-Output data generation" in said[0]
    assert any(m.startswith("0 of 4 runs finished · running ground truth, seed 0") for m in said)
    assert any(
        m.startswith("3 of 4 runs finished · running STM 25% masked, seed 1") and "left" in m
        for m in said
    )
    assert read_state(folder).phase == Phase.PROTOCOL
    assert said[-1].startswith("4 of 4 runs finished · running the aggregation and the report")
    # partial results as runs finished: the last one written covers 3 of the 4 runs
    partial = json.loads((folder / PARTIAL_JSON).read_text())
    assert partial["partial"]["finished"] == 3 and partial["partial"]["planned"] == 4
    assert set(partial["arms"]) == {"gt", "stm_share"} and "paired" not in partial

    assert set(results["arms"]) == {"gt", "stm_share"}
    for key in ("gt", "stm_share"):
        arm = results["arms"][key]
        assert arm["seeds"] == [0, 1] and not arm["failed"]
        loss = arm["measures"]["final loss"]
        assert loss["n"] == 2 and loss["ci95"] is not None
    assert results["arms"]["gt"]["measures"]["masked %"]["mean"] == 0
    # a random model finds every token surprising: τ is solved for the 25% share
    assert results["arms"]["stm_share"]["measures"]["masked %"]["mean"] == pytest.approx(25, abs=3)
    assert any(n.startswith("Self-Output skipped") for n in results["notes"])

    # each arm against ground truth on the same items, over both seeds
    paired = {(p["task"], p["metric"]): p for p in results["paired"] if p["arm"] == "stm_share"}
    assert ("mbpp_ppl", "nll") in paired and paired[("mbpp_ppl", "nll")]["seeds"] == 2
    nll = paired[("mbpp_ppl", "nll")]["interval"]
    assert nll["method"].startswith("hierarchical") and nll["low"] <= nll["estimate"] <= nll["high"]
    assert all(p["metric"] != "nll_easy" for p in results["paired"])  # STM lowers it by design
    assert any(
        f.startswith("STM 25% masked vs ground truth, mbpp_ppl nll")
        for f in results["paired_findings"]
    )
    # each arm against its own step-0 round (the base model), over both seeds: the same
    # hierarchical interval as computed here from the stored per-item rounds
    from core.eval.compare import paired_items
    from core.eval.scorers import SuiteResult
    from core.jobs.runfiles import eval_round_path, eval_round_steps
    from core.stats import hierarchical_interval

    base_rows = {(p["arm"], p["task"]): p for p in results["paired_base"]}
    row = base_rows[("gt", "mbpp_ppl")]
    assert row["against"] == "the base model" and row["metric"] == "nll" and row["seeds"] == 2
    pairs = []
    for seed in (0, 1):
        run_dir = runs_dir() / f"proto-gt-s{seed}"
        steps = eval_round_steps(run_dir)
        first, last = (
            SuiteResult.from_dict(json.loads(eval_round_path(run_dir, s).read_text()))
            for s in (steps[0], steps[-1])
        )
        pairs.append(paired_items(first.task("mbpp_ppl"), last.task("mbpp_ppl"), "nll"))
    direct = hierarchical_interval([p[0] for p in pairs], [p[1] for p in pairs])
    assert row["interval"]["estimate"] == pytest.approx(direct.estimate)
    assert (row["interval"]["low"], row["interval"]["high"]) == pytest.approx(
        (direct.low, direct.high)
    )
    assert any(
        f.startswith("ground truth vs the base model, mbpp_ppl nll")
        for f in results["paired_base_findings"]
    )
    table = (folder / RESULTS_MD).read_text()
    assert "## In short" in table and "against the base model" in table
    assert "| ground truth | 2 |" in table and "| STM 25% masked | 2 |" in table
    assert "paired over seeds and items" in table
    assert "mbpp_ppl nll Δ% (target)" in table and "OOD easy-token NLL Δ%" in table
    saved = json.loads((folder / RESULTS_JSON).read_text())
    assert saved["report"] == str(folder / REPORT_HTML)
    html = (folder / REPORT_HTML).read_text()
    assert "Protocol summary" in html and "ground truth" in html
    ids = {r.run_id for r in list_runs(runs_dir())}
    assert {f"proto-{a}-s{s}" for a in ("gt", "stm_share") for s in (0, 1)} <= ids
    assert "proto" not in ids  # the protocol folder is not a model run

    view = load_protocol(folder)  # what the app's page reads
    assert view.finished_runs() == [f"proto-{a}-s{s}" for s in (0, 1) for a in ("gt", "stm_share")]
    steps = "\n".join(view.progress_lines(50))
    assert "Self-Output skipped" in steps and "[4/4] done in" in steps
    assert view.current_log() == ("proto-stm_share-s1", runs_dir() / "proto-stm_share-s1")
    assert "done: step" in (runs_dir() / "proto-stm_share-s1" / "log.txt").read_text()

    again = run_protocol(config, folder)
    assert all(r.get("reused") for r in again["runs"])
    assert again["arms"]["gt"]["measures"] == results["arms"]["gt"]["measures"]
    with pytest.raises(LensError, match="other settings"):
        run_protocol(dataclasses.replace(config, tau=3.0), folder)


def test_sweep_verdict_names_only_settings_whose_ood_interval_shows_a_loss(tmp_path):
    from core.study.protocol import load_cpu_sweep, sweep_table, sweep_verdict

    rows = [sweep_row("center", -2.8, 0.7), sweep_row("lr3e-4", -7.0, -2.1)]
    verdict = sweep_verdict(rows)
    assert verdict["forgetting"] == {"lr3e-4": ["arc_easy acc"]}  # the target gain is no loss
    assert verdict["text"].startswith(
        "Ground truth forgets detectably out of domain in: lr3e-4 (arc_easy acc). That is 1 of "
        "2 settings tried"
    )
    none = sweep_verdict(rows[:1])
    assert not none["forgetting"] and none["text"].startswith("No setting of the sweep (1 tried)")
    table = sweep_table(rows)
    assert table[0]["arc_easy acc"] == "-1.05 [-2.80, +0.70]"  # includes zero: no star
    assert table[1]["arc_easy acc"] == "-4.55 [-7.00, -2.10]*"
    assert table[1]["learning_rate"] == "0.0001"
    path = tmp_path / "sweep.json"
    assert load_cpu_sweep(path) is None  # missing
    path.write_text("{not json")
    assert load_cpu_sweep(path) is None  # unreadable: no crash
    path.write_text(json.dumps({"rows": rows}))
    assert load_cpu_sweep(path)["rows"][1]["setting"] == "lr3e-4"


def test_the_summary_table_shows_drift_and_leaves_out_columns_no_arm_measured():
    from core.study.protocol import FORGETTING, OOD_DRIFT, summary_table

    def arm(label, kl):
        return {
            "label": label,
            "seeds": [0, 1, 2],
            "failed": [],
            "measures": {
                OOD_DRIFT: mean_ci(kl),
                FORGETTING: mean_ci([None, None, None]),
                "BWT": mean_ci([-1.0, 0.5, 0.2]),
            },
        }

    rows = summary_table(
        {
            "arms": {
                "gt": arm("ground truth", [0.17, 0.13, 0.15]),
                "stm": arm("STM", [0.08, 0.11, 0.09]),
            }
        }
    )
    assert rows[0]["OOD drift (token KL)"].startswith("0.150 ± ")
    assert rows[1]["OOD drift (token KL)"].startswith("0.093 ± ")
    assert "OOD easy-token NLL Δ%" not in rows[0] and "BWT" in rows[0]
