"""The Generate and Train forms fit the machine: they open on the CPU preset without a CUDA GPU
(the paper's with one), carry the sidebar's "first N" into the job, show an estimate of the
job's time and what it rests on, and hide or disable the settings that do not apply."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from core.cli import build_parser
from core.datagen.config import GenDataConfig
from core.study import estimates
from core.training.config import TrainConfig
from tests.factories import write_generation_run, write_training_run

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def runs_root(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    root = tmp_path / "runs"
    root.mkdir()
    monkeypatch.setenv("PLENS_RUNS_DIR", str(root))
    monkeypatch.setattr(estimates, "has_cuda", lambda: False)
    return root


def open_page(page: str, **params: str) -> AppTest:
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=60)
    at.query_params.update(kind="task", task="mbpp", split="train", limit="6", **params)
    at.run()
    at.switch_page(page)
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def command(at: AppTest, prefix: str) -> list[str]:
    [code] = [c.value for c in at.code if c.value.startswith(prefix)]
    return shlex.split(code)[3:]


def estimate_caption(at: AppTest) -> str:
    [text] = [c.value for c in at.caption if c.value.startswith("Estimated time:")]
    return text


def test_generate_opens_on_the_cpu_preset_with_the_sidebars_first_n(runs_root):
    at = open_page("pages/generate.py")
    assert at.selectbox(key="gen_preset").value == "cpu-quick"
    config = GenDataConfig.from_args(build_parser().parse_args(command(at, "python -m core gen")))
    assert (config.preset, config.limit, config.n_samples) == ("cpu-quick", 6, 4)
    text = estimate_caption(at)
    assert "6 prompts × 4 samples × at most 192 tokens" in text
    assert "the rate of the benchmark machine" in text  # nothing measured here yet, and it says so

    estimates.has_cuda = lambda: True  # restored by the fixture's monkeypatch
    at = open_page("pages/generate.py")
    assert at.selectbox(key="gen_preset").value == "paper"
    config = GenDataConfig.from_args(build_parser().parse_args(command(at, "python -m core gen")))
    assert (config.preset, config.limit, config.n_samples) == ("paper", 6, 32)


def test_generate_estimate_rests_on_a_run_measured_here(runs_root):
    write_generation_run(runs_root)
    at = open_page("pages/generate.py")
    text = estimate_caption(at)
    assert "at 48 tokens/s, measured on this machine (1 earlier run of default on the CPU" in text
    # 6 x 4 x 192 tokens at 48 tokens/s x 1.25 overhead, samples filling half their limit
    assert text.startswith("Estimated time: about 1m00s (up to 2m00s).")


def test_generate_disables_ranking_where_there_is_one_answer(runs_root):
    at = open_page("pages/generate.py")
    assert not at.selectbox(key="gen_selection").disabled
    at.radio(key="gen_kind").set_value("rephrase").run()
    assert at.selectbox(key="gen_selection").disabled
    assert at.selectbox(key="gen_convention").disabled
    assert at.number_input(key="gen_n_cpu-quick").disabled
    at.radio(key="gen_kind").set_value("self_output").run()
    at.number_input(key="gen_n_cpu-quick").set_value(1).run()
    assert at.selectbox(key="gen_selection").disabled


def test_train_opens_on_the_cpu_preset_and_evaluation_settings_follow_evaluation(runs_root):
    at = open_page("pages/train.py")
    assert at.selectbox(key="train_preset").value == "cpu-quick"
    config = TrainConfig.from_args(build_parser().parse_args(command(at, "python -m core train")))
    assert (config.preset, config.limit, config.eval_every) == ("cpu-quick", 6, None)
    # evaluation off: no suite to pick, and the form says so
    assert not [s for s in at.selectbox if s.label == "Evaluation suite"]
    assert any(c.value.startswith("Evaluation is off: no suite runs") for c in at.caption)
    at.number_input(key="eval_every-cpu-quick").set_value(1).run()
    assert at.selectbox(key="eval_suite-cpu-quick").value == "during"
    assert any(
        c.value == "The **during** suite runs at step 0, every 1 steps and at the end."
        for c in at.caption
    )
    config = TrainConfig.from_args(build_parser().parse_args(command(at, "python -m core train")))
    assert config.eval_every == 1 and config.eval_suite == {"suite": "during", "limit": None}


def test_train_estimate_rests_on_a_run_measured_here(runs_root):
    at = open_page("pages/train.py")
    assert "the rate of the benchmark machine" in estimate_caption(at)
    write_training_run(runs_root)
    at = open_page("pages/train.py")
    text = estimate_caption(at)
    # 6 examples, batch 8, 2 epochs: 2 steps at the 16 s a step measured in the run folder
    assert text.startswith("Estimated time: about 32s.")
    assert "2 steps of 8 at 16 s per step, measured on this machine (1 earlier run" in text


def test_train_disables_epochs_when_max_steps_decides(runs_root):
    at = open_page("pages/train.py")
    assert not at.number_input(key="epochs-cpu-quick").disabled
    at.number_input(key="steps-cpu-quick").set_value(3).run()
    assert at.number_input(key="epochs-cpu-quick").disabled
    assert "2 steps" not in estimate_caption(at) and "3 steps of 8" in estimate_caption(at)
