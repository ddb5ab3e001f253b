"""Resume equivalence under SIGKILL, on the tiny model: one training run is killed while its data
is prepared, in the middle of a step, while a checkpoint is written, during an evaluation round
and during the final one, and resumed after each kill with the same command; it must end as an uninterrupted run of
the same config does: the same final step, every step's records once in metrics.jsonl, no
checkpoint left corrupt, and the same adapter weights. (bench/bench_kill_resume.py does the same
at 20 random moments; tests/kill_resume.py is the harness.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from core.jobs.runfiles import read_metrics
from tests import kill_resume as kr

pytestmark = pytest.mark.integration

#: The moments the run is killed at, in order (tests/kill_resume.py names them).
KILLS = ("data", "step:3", "checkpoint:4", "eval:6", "eval:8")


def test_a_run_killed_four_times_and_resumed_ends_as_an_uninterrupted_one(tiny_model_dir, tmp_path):
    env = dict(os.environ, PLENS_RUNS_DIR=str(tmp_path / "runs"), PYTHONPATH=str(kr.ROOT))
    config = kr.write_config(tmp_path / "cfg", str(tiny_model_dir))
    reference, run = tmp_path / "reference", tmp_path / "killed"
    log = tmp_path / "attempts.log"
    # the uninterrupted run, beside the killed one
    ref_cmd = [sys.executable, "-m", "tests.kill_resume", "--", *kr.train_argv(config, reference)]
    with open(tmp_path / "reference.log", "wb") as out:
        ref = subprocess.Popen(ref_cmd, cwd=kr.ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        argv = kr.train_argv(config, run)
        for moment in KILLS:
            code = kr.attempt(argv, moment, env=env, log=log)
            assert code == -9, (
                f"the attempt to kill at {moment} ended with {code}:\n" + (log.read_text()[-3000:])
            )
            if moment == "checkpoint:4":  # the half-written checkpoint is not under its name
                assert not (run / "checkpoints" / "checkpoint-4").exists()
                assert (run / "checkpoints" / ".staging" / "checkpoint-4").is_dir()
                assert (run / "checkpoints" / "checkpoint-2" / "trainer_state.json").is_file()
            if moment == "eval:6":  # the round's results written, its records not
                assert (run / "eval" / "step-6.json").is_file()
                assert not any(r["step"] == 6 for r in read_metrics(run) if r["kind"] == "eval")
            if moment == "eval:8":  # the final round: every step trained, the run not done
                assert (run / "checkpoints" / "checkpoint-8" / "trainer_state.json").is_file()
                assert not (run / "summary.json").exists()
        assert kr.attempt(argv, env=env, log=log) == 0, log.read_text()[-3000:]
        assert ref.wait(timeout=900) == 0, (tmp_path / "reference.log").read_text()[-3000:]
    finally:
        if ref.poll() is None:
            ref.kill()
            ref.wait()

    assert kr.check_run(run, reference) == []
    records = read_metrics(run)
    assert [r["step"] for r in records if r["kind"] == "train"] == list(range(1, 9))
    assert sorted({r["step"] for r in records if r["kind"] == "eval"}) == [0, 3, 6, 8]
    # the last attempt resumed from the final step's checkpoint and trained nothing more
    assert [r["step"] for r in records if r["kind"] == "start"] == [0, 2, 2, 4, 8]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["final_step"] == 8 and summary["resumed_from"] == "checkpoint-8"
    assert kr.corrupt_checkpoints(run) == []
    assert sorted(p.name for p in (run / "checkpoints").iterdir() if p.is_dir()) == [
        "checkpoint-6",
        "checkpoint-8",
    ]
