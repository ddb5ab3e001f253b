"""The protocol's token-loss arms (issue #21 part 4): what each arm trains, each arm against STM
paired over seeds and items on synthetic finished runs, the tables of results.md, the report and
the Reproduce page, and runs labelled by their loss on the Compare frontier."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from core.errors import LensError
from core.eval.compare import paired_items
from core.eval.scorers import SuiteResult
from core.io import write_json_atomic
from core.jobs.runfiles import CONFIG_JSON, eval_round_path
from core.stats import hierarchical_interval
from core.study.protocol import (
    ARMS,
    CPU_ARMS,
    LOSS_ARMS,
    REPORT_HTML,
    RESULTS_JSON,
    ProtocolConfig,
    aggregate,
    arm_specs,
    paired_table,
    results_markdown,
    train_config,
    write_protocol_report,
)
from core.study.protocol import recorded as protocol_recorded
from core.study.runs import load_run, runs_display_table, runs_table
from core.training.config import TrainConfig
from core.viz.compare_charts import drift_frontier_chart, frontier_chart
from tests.eval_runs import (
    BASE,
    BASE_DRIFT,
    DRIFT_TASKS,
    TASKS,
    later,
    later_drift,
    make_eval_run,
)

LOSS_DEFAULTS = {f.name: f.default for f in dataclasses.fields(TrainConfig)}


def test_every_loss_arm_trains_its_loss_with_the_default_parameters():
    config = ProtocolConfig(tau=3.0)
    arms = arm_specs(config)
    assert set(ARMS) == set(arms) and set(LOSS_ARMS) <= set(ARMS)
    for loss in ("soft_stm", "dft", "eaft", "kl", "asft"):
        cfg = train_config(config, arms[loss], seed=1)
        assert (cfg["method"], cfg["loss"], cfg["task"], cfg["seed"]) == ("gt", loss, "mbpp", 1)
        for name in ("loss_temperature", "eaft_alpha", "eaft_k", "kl_beta", "asft_alpha"):
            assert cfg[name] == LOSS_DEFAULTS[name]
        assert TrainConfig.from_dict(cfg).loss == loss  # what the job reads back
        assert arms[loss].label.startswith("ground truth + ")
    both = train_config(config, arms["stm_kl"], seed=0)
    assert (both["method"], both["tau"], both["loss"]) == ("stm", 3.0, "kl")
    # labels say what is combined, with the parameters the arm trains with
    assert arms["kl"].label == f"ground truth + KL β={LOSS_DEFAULTS['kl_beta']:g}"
    assert arms["stm_kl"].label == f"STM τ=3 + KL β={LOSS_DEFAULTS['kl_beta']:g}"
    assert arms["eaft"].label == "ground truth + EAFT α=1, K=20"
    assert len({a.label for a in arms.values()}) == len(arms)
    # the paper's arms train plain nll, as before
    for key in ("gt", "stm", "stm_share", "random", "self_output"):
        assert train_config(config, arms[key], seed=0)["loss"] == "nll"


def test_presets_and_help_list_the_arms(capsys):
    assert ProtocolConfig.from_preset("cpu").methods == list(CPU_ARMS)
    assert CPU_ARMS == ("gt", "stm", "random", "self_output")  # the recorded cpu results hold
    assert ProtocolConfig.from_preset("paper").methods == list(ARMS)
    from core.cli import build_parser

    parser = build_parser()
    with pytest.raises(SystemExit):
        parser.parse_args(["protocol", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for key in ARMS:
        assert f"{key} = " in text
    config = ProtocolConfig.from_args(parser.parse_args(["protocol", "--methods", "gt,stm_kl"]))
    assert config.methods == ["gt", "stm_kl"]


@pytest.mark.parametrize("methods", ["gt,stm+kl", "gt,nll", "gt,kl,kl"])
def test_bad_arm_names_are_one_line_errors(methods):
    with pytest.raises(LensError) as caught:
        ProtocolConfig.from_preset("cpu", methods=methods)
    assert "\n" not in str(caught.value)
    assert "Unknown arm" in str(caught.value) or "named twice" in str(caught.value)


# --------------------------------------------------------------------------- synthetic runs

#: arm -> (evaluation step whose values its run ends at, loss): STM moves least, KL less than
#: ground truth; per seed the end moves one step further
ARM_ENDS = {
    "gt": (4, "nll"),
    "stm": (1, "nll"),
    "random": (3, "nll"),
    "kl": (2, "kl"),
    "stm_kl": (1, "kl"),
}


def _protocol_runs(root: Path, seeds=(0, 1), drift: bool = False) -> tuple[ProtocolConfig, list]:
    """A finished protocol of ground truth, STM, the random control, KL and STM + KL over
    `seeds`, each run with saved step-0 and end rounds (no model)."""
    config = ProtocolConfig.from_preset("cpu", methods=list(ARM_ENDS), seeds=list(seeds))
    arms = arm_specs(config)
    runs = []
    for arm, (end, loss) in ARM_ENDS.items():
        for seed in seeds:
            rid = f"protocol-cpu-{arm}-s{seed}"
            method = arms[arm].overrides["method"]
            rounds = (
                {0: BASE_DRIFT, 4: later_drift(end + seed)}
                if drift
                else {0: BASE, 4: later(end + seed)}
            )
            tasks = DRIFT_TASKS if drift else TASKS
            folder = make_eval_run(root, rid, rounds, method=method, seed=seed, tasks=tasks)
            saved = json.loads((folder / CONFIG_JSON).read_text())
            (folder / CONFIG_JSON).write_text(json.dumps({**saved, "loss": loss, "kl_beta": 0.1}))
            runs.append(
                {
                    "arm": arm,
                    "label": arms[arm].label,
                    "seed": seed,
                    "run": rid,
                    "status": "succeeded",
                }
            )
    return config, runs


@pytest.fixture
def runs_root(tmp_path, monkeypatch):
    root = tmp_path / "runs"
    root.mkdir()
    monkeypatch.setenv("PLENS_RUNS_DIR", str(root))
    monkeypatch.setattr(
        protocol_recorded, "CPU_PROTOCOL_JSON", tmp_path / "no-recorded-protocol.json"
    )
    return root


def _round(root: Path, rid: str, step: int) -> SuiteResult:
    return SuiteResult.from_dict(json.loads(eval_round_path(root / rid, step).read_text()))


def test_each_arm_against_stm_is_paired_over_seeds_and_items(runs_root):
    config, runs = _protocol_runs(runs_root)
    results = aggregate(config, runs, [], 1.0)
    rows = results["paired_stm"]
    # the loss arms against STM; ground truth and the random control have their own sections
    assert {r["arm"] for r in rows} == {"kl", "stm_kl"}
    assert {r["against"] for r in rows} == {"STM τ=2.5"}
    assert {r["arm"] for r in results["paired"]} == {"stm", "random", "kl", "stm_kl"}
    row = next(r for r in rows if r["arm"] == "kl" and r["task"] == "mbpp_ppl")
    assert row["metric"] == "nll" and row["seeds"] == 2 and row["role"] == "target"
    pairs = [
        paired_items(
            _round(runs_root, f"protocol-cpu-stm-s{s}", 4).task("mbpp_ppl"),
            _round(runs_root, f"protocol-cpu-kl-s{s}", 4).task("mbpp_ppl"),
            "nll",
        )
        for s in (0, 1)
    ]
    direct = hierarchical_interval([p[0] for p in pairs], [p[1] for p in pairs])
    assert row["interval"]["estimate"] == pytest.approx(direct.estimate)
    assert (row["interval"]["low"], row["interval"]["high"]) == pytest.approx(
        (direct.low, direct.high)
    )
    # KL ended two steps further than STM: its target NLL is lower (it learned more)
    assert row["interval"]["high"] < 0
    assert any(
        f.startswith("ground truth + KL β=0.1 vs STM τ=2.5, mbpp_ppl nll (target, 2 seed(s)")
        for f in results["paired_stm_findings"]
    )
    # STM + KL ended where STM did: no detectable difference on the target
    same = next(r for r in rows if r["arm"] == "stm_kl" and r["task"] == "mbpp_ppl")
    assert same["interval"]["estimate"] == pytest.approx(0.0)

    # the tables: one row per arm, each cell the change with its interval and verdict
    against_stm = {r["arm"]: r for r in paired_table(rows)}
    kl = against_stm["ground truth + KL β=0.1"]
    assert kl["against"] == "STM τ=2.5" and kl["seeds"] == "2"
    cell = kl["mbpp_ppl nll, nats (target)"]
    assert cell.startswith(f"{direct.estimate:+.2f} [") and cell.endswith("] better")
    assert "arc_easy acc, points" in kl
    against_gt = {r["arm"]: r for r in paired_table(results["paired"])}
    assert against_gt["STM τ=2.5"]["against"] == "ground truth"

    markdown = results_markdown(results)
    assert "## Each arm against ground truth, paired over seeds and items" in markdown
    assert "## Each arm against STM, paired over seeds and items" in markdown
    assert "| ground truth + KL β=0.1 | STM τ=2.5 | 2 |" in markdown
    assert "| STM τ=2.5 | ground truth | 2 |" in markdown
    report = write_protocol_report(results, [r["run"] for r in runs], runs_root / "r.html")
    html = report.read_text()
    assert "Each arm against ground truth, paired over seeds and items" in html
    assert "Each arm against STM, paired over seeds and items" in html
    assert "Against STM: ground truth + KL β=0.1 vs STM τ=2.5" in html


def test_no_stm_arm_no_comparison_with_it(runs_root):
    config, runs = _protocol_runs(runs_root, seeds=(0,))
    config = dataclasses.replace(config, methods=["gt", "kl"])
    runs = [r for r in runs if r["arm"] in ("gt", "kl")]
    results = aggregate(config, runs, [], 1.0)
    assert results["paired_stm"] == [] and results["paired_stm_findings"] == []
    assert "Each arm against STM" not in results_markdown(results)


def test_the_reproduce_page_shows_both_tables(runs_root):
    config, runs = _protocol_runs(runs_root, drift=True)
    folder = runs_root / "protocol-cpu"
    folder.mkdir()
    write_json_atomic(folder / CONFIG_JSON, config.to_dict())
    results = aggregate(config, runs, [], 1.0)
    write_json_atomic(folder / RESULTS_JSON, results)
    at = AppTest.from_file("../pages/protocol.py", default_timeout=60).run()
    assert not at.exception, [e.value for e in at.exception]
    tables = [d.value for d in at.dataframe if "against" in d.value.columns]
    assert [set(t["against"]) for t in tables] == [{"ground truth"}, {"STM τ=2.5"}]
    vs_stm = tables[1].set_index("arm")
    assert list(vs_stm.index) == ["ground truth + KL β=0.1", "STM τ=2.5 + KL β=0.1"]
    assert vs_stm.loc["ground truth + KL β=0.1", "ood_drift token KL, nats"].endswith("worse")
    texts = " ".join(m.value for m in at.markdown)
    assert "Each arm against STM, paired over seeds and items" in texts
    assert not (folder / REPORT_HTML).exists()  # the page shows what results.json holds


def test_runs_are_labelled_by_their_loss_on_the_frontiers(runs_root):
    _protocol_runs(runs_root, seeds=(1,), drift=True)
    runs = [load_run(runs_root / f"protocol-cpu-{a}-s1") for a in ("gt", "kl", "stm_kl")]
    assert [r.loss for r in runs] == ["nll", "kl", "kl"]
    assert [r.label for r in runs] == [
        "gt seed 1",
        "gt + kl β=0.1 seed 1",
        "stm τ=2.5 + kl β=0.1 seed 1",
    ]
    table = runs_table(runs)
    assert list(table["loss"]) == ["nll", "kl", "kl"]
    assert list(runs_display_table(table)["loss"]) == ["nll", "kl", "kl"]
    fig = frontier_chart(table)
    names = {t.name: t.marker.symbol for t in fig.data if t.meta and t.meta.get("role") == "line"}
    assert names == {"gt": "circle", "gt + kl": "x", "stm + kl": "x"}
    from core.study.runs import drift_table

    drift = drift_frontier_chart(table, drift_table(runs))
    shown = {t.name for t in drift.data if t.meta and t.meta.get("role") == "line"}
    assert shown == {"gt", "gt + kl", "stm + kl"}
    # a run made before token losses: no loss in its config, read as nll, labelled as before
    old = make_eval_run(runs_root, "old", {0: BASE, 4: later(2)}, method="stm")
    assert load_run(old).loss == "nll" and load_run(old).label == "stm τ=2.5"
    [point] = [t for t in frontier_chart(runs_table([load_run(old)])).data if t.meta]
    assert point.name == "stm" and point.marker.symbol == "circle"
