"""Time estimates of the Train and Generate forms (core.study.estimates): rates measured from
this machine's run folders, the benchmark machine's as a labelled fallback, the preset that fits
the machine."""

from __future__ import annotations

import json

import pytest

from core.datagen.config import GenDataConfig
from core.study import estimates
from core.study.estimates import estimate_generation, estimate_training, preset_for_device
from core.training.config import TrainConfig
from tests.factories import write_generation_run, write_training_run


@pytest.fixture
def cpu_only(monkeypatch):
    monkeypatch.setattr(estimates, "has_cuda", lambda: False)


def test_the_preset_follows_the_machine(monkeypatch):
    monkeypatch.setattr(estimates, "has_cuda", lambda: False)
    assert preset_for_device("auto") == "cpu-quick"
    assert preset_for_device("cuda") == "paper"  # asked for explicitly
    monkeypatch.setattr(estimates, "has_cuda", lambda: True)
    assert preset_for_device("auto") == "paper"
    assert preset_for_device("cpu") == "cpu-quick"


def test_training_rate_and_evaluation_rounds_come_from_this_machines_runs(tmp_path, cpu_only):
    folder = write_training_run(tmp_path)
    run = estimates.measure_training_run(folder, json.loads((folder / "config.json").read_text()))
    assert run.seconds_per_sequence == pytest.approx(2.0)  # 16 s per step of 8; eval gaps ignored
    assert run.eval_rounds == {"during:None": [pytest.approx(30.0), pytest.approx(56.0)]}

    config = TrainConfig.from_preset("cpu-quick", device="auto")  # 48 examples, 2 epochs
    estimate = estimate_training(config, 48, root=tmp_path)
    assert estimate.measured_here
    assert estimate.seconds == pytest.approx(12 * 16.0)
    assert estimate.text().startswith("Estimated time: about 3m12s.")
    assert "12 steps of 8 at 16 s per step, measured on this machine (1 earlier run" in (
        estimate.basis
    )

    with_eval = TrainConfig.from_preset(
        "cpu-quick", device="auto", eval_every=4, eval_suite={"suite": "during", "limit": None}
    )
    estimate = estimate_training(with_eval, 48, root=tmp_path)
    # rounds at step 0, 4, 8 and 12: 4 of the median 43 s measured
    assert estimate.seconds == pytest.approx(12 * 16.0 + 4 * 43.0)
    assert "Plus 4 evaluation rounds of about 43s each (median of 2 measured here)" in (
        estimate.basis
    )


def test_training_without_runs_falls_back_to_the_benchmark_machine_and_says_so(tmp_path, cpu_only):
    write_training_run(tmp_path, finetune="full")  # another fine-tuning: not comparable
    config = TrainConfig.from_preset("cpu-quick", device="auto")
    estimate = estimate_training(config, 48, root=tmp_path)
    assert not estimate.measured_here
    assert "benchmark machine" in estimate.basis and "no training run has been measured" in (
        estimate.basis
    )
    assert estimate.seconds == pytest.approx(96 * 23.5 / 8)  # 12 steps x 8 at 23.5 s a step
    assert estimate.high == pytest.approx(96 * 36 / 8)
    assert "(up to 7m12s)" in estimate.text()

    other = TrainConfig.from_preset("cpu-quick", device="auto", model="some/model")
    estimate = estimate_training(other, 48, root=tmp_path)
    assert estimate.seconds is None
    assert estimate.text().startswith("Estimated time: not known yet. 12 steps of 8: no run of")


def test_a_longer_max_length_scales_the_measured_rate_and_says_so(tmp_path, cpu_only):
    write_training_run(tmp_path)  # max_length 320
    config = TrainConfig.from_preset("cpu-quick", device="auto", max_length=640)
    estimate = estimate_training(config, 48, root=tmp_path)
    assert estimate.seconds == pytest.approx(12 * 32.0)
    assert "scaled from max_length 320 to 640" in estimate.basis


def test_generation_estimate_from_measured_tokens_per_second(tmp_path, cpu_only):
    write_generation_run(tmp_path)
    config = GenDataConfig.from_preset("cpu-quick", device="auto", task="mbpp", limit=10)
    estimate = estimate_generation(config, 10, root=tmp_path)
    # 768 tokens in 16 s = 48 tokens/s; wall 20 s / 16 s; samples used half their limit
    most = 10 * 4 * 192 / 48 * 1.25
    assert estimate.measured_here
    assert estimate.high == pytest.approx(most)
    assert estimate.seconds == pytest.approx(most / 2)
    assert "at 48 tokens/s, measured on this machine (1 earlier run of default on the CPU)" in (
        estimate.basis
    )
    assert "added 25% there" in estimate.basis and "used 50% of their token limit" in (
        estimate.basis
    )


def test_generation_without_runs_uses_the_benchmark_rate_labelled(tmp_path, cpu_only):
    config = GenDataConfig.from_preset("cpu-quick", device="auto", task="mbpp")
    estimate = estimate_generation(config, 8, root=tmp_path)
    assert not estimate.measured_here and "benchmark machine" in estimate.basis
    assert estimate.high == pytest.approx(8 * 4 * 192 / (5062 / 240))
    teacher = GenDataConfig.from_preset("cpu-quick", device="auto", task="mbpp", teacher="t/x")
    assert estimate_generation(teacher, 8, root=tmp_path).seconds is None
