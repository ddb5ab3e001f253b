"""AppTest smoke tests of the Runs and Compare pages on hand-made run folders."""

import pytest
from streamlit.testing.v1 import AppTest

from tests.test_report import _make_run


@pytest.fixture
def runs_env(tmp_path, monkeypatch):
    root = tmp_path / "runs"
    monkeypatch.setenv("PLENS_RUNS_DIR", str(root))
    base = {"mbpp": ("pass@1", 0.20, "target"), "gsm8k": ("acc", 0.10, "ood")}
    _make_run(root, "gt1", "gt", None, None,
              {0: base, 4: {"mbpp": ("pass@1", 0.25, "target"), "gsm8k": ("acc", 0.05, "ood")}},
              {0: (0.0, 0.0), 4: (-50.0, 25.0)})  # fmt: skip
    _make_run(root, "stm1", "stm", 2.5, 0.3,
              {0: base, 4: {"mbpp": ("pass@1", 0.22, "target"), "gsm8k": ("acc", 0.10, "ood")}},
              {0: (0.0, 0.0), 4: (0.0, 10.0)})  # fmt: skip
    return root


def test_runs_page_draws_a_chart_per_metric(runs_env):
    at = AppTest.from_file("../pages/runs.py", default_timeout=60).run()
    assert not at.exception
    charts = at.get("plotly_chart")
    assert len(charts) == 4  # loss, mbpp (target), gsm8k (OOD), BWT
    assert "gt1" in at.dataframe[0].value["run"].tolist()


def test_compare_page_table_and_report(runs_env):
    at = AppTest.from_file("../pages/compare.py", default_timeout=60).run()
    assert not at.exception
    table = at.dataframe[0].value.set_index("run")
    assert table.loc["gt1", "BWT"] == -50.0 and table.loc["stm1", "TI"] == 10.0
    build = next(b for b in at.button if b.label == "Build report")
    build.click().run()
    assert not at.exception
    assert any("Report ready" in s.value for s in at.success)


def test_compare_page_without_runs_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("PLENS_RUNS_DIR", str(tmp_path / "empty"))
    at = AppTest.from_file("../pages/compare.py", default_timeout=60).run()
    assert not at.exception
    assert any("No runs yet" in i.value for i in at.info)
