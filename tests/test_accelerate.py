"""Multi-process training through the real `accelerate launch` CLI: two processes on CPU (gloo),
the tiny model, an STM mask, three steps.

What a user checks after such a run: one run folder and one registry row (succeeded), every
training step recorded once (rank 0 writes metrics.jsonl alone), world size 2 in the start
record and the summary, the same masked rows on both ranks (each rank prints the sha256 of its
rows; rank 1 built them from the score cache rank 0 filled first), each rank's own RNG state in
the checkpoint, and a final adapter that loads with peft and changes the model's output.

Accelerate's `--cpu --num_processes 2` starts ONE process (multi-CPU goes through mpirun,
huggingface/accelerate#2741); `--multi_gpu` starts N processes through torchrun on any machine,
and `--device cpu` makes each of them train on CPU over gloo.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from core.jobs.metrics import (
    CheckpointRecord,
    DataRecord,
    DoneRecord,
    StartRecord,
    TrainRecord,
    of_kind,
)
from core.jobs.registry import JobRegistry
from core.jobs.runfiles import read_records
from tests.factories import TRAIN_ROWS as ROWS

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 900
MAX_STEPS = 3


def free_port() -> int:
    """A TCP port nobody listens on right now (for the main process's rendezvous)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def accelerate_cli() -> list[str]:
    """The `accelerate` console script of this interpreter's environment (or its module)."""
    script = Path(sys.executable).with_name("accelerate")
    if script.is_file():
        return [str(script)]
    return [sys.executable, "-m", "accelerate.commands.accelerate_cli"]


def run_with_timeout(cmd: list[str], env: dict[str, str], cwd: Path) -> tuple[int, str]:
    """Run `cmd` in its own process group; on timeout kill the whole group (the launcher and
    the processes torchrun started) and fail."""
    proc = subprocess.Popen(
        cmd,
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"accelerate launch ran past {TIMEOUT_S} s:\n{out[-6000:]}")
    return proc.returncode, out


def test_two_processes_write_one_run_and_train_the_same_masked_rows(tiny_model_dir, tmp_path):
    data_file = tmp_path / "train.jsonl"
    data_file.write_text("".join(json.dumps(r) + "\n" for r in ROWS), encoding="utf-8")
    runs = tmp_path / "runs"
    run = runs / "acc-run"
    env = dict(
        os.environ,
        PLENS_RUNS_DIR=str(runs),
        PLENS_CACHE_DIR=str(tmp_path / "plens-cache"),
        PYTHONPATH=str(ROOT),
        PYTHONUNBUFFERED="1",
        HF_HUB_OFFLINE="1",
        OMP_NUM_THREADS="1",
    )
    cmd = [
        *accelerate_cli(),
        "launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(free_port()),
        "-m",
        "core",
        "train",
        "--preset",
        "paper",
        "--model",
        str(tiny_model_dir),
        "--device",
        "cpu",
        "--precision",
        "fp32",
        "--data",
        str(data_file),
        "--id-col",
        "id",
        "--max-length",
        "64",
        "--batch-size",
        "2",
        "--learning-rate",
        "1e-3",
        "--max-steps",
        str(MAX_STEPS),
        "--save-every",
        "2",
        "--method",
        "stm",
        "--tau",
        "none",
        "--target-share",
        "0.5",
        "--run-dir",
        str(run),
    ]
    started = time.monotonic()
    code, out = run_with_timeout(cmd, env, tmp_path)
    seconds = time.monotonic() - started
    assert code == 0, out[-6000:]
    print(f"accelerate launch, 2 processes, {MAX_STEPS} steps: {seconds:.1f} s")

    # one run folder, one registry row, and it succeeded
    assert sorted(p.name for p in runs.iterdir() if p.is_dir()) == [run.name]
    jobs = JobRegistry(runs).list()
    assert [(j.kind, j.status, Path(j.run_dir)) for j in jobs] == [("train", "succeeded", run)]

    # rank 0 alone wrote metrics.jsonl: every record once, world size 2
    records = read_records(run)
    assert len(of_kind(records, DataRecord)) == 1
    (start,) = of_kind(records, StartRecord)
    assert (start.step, start.max_steps, start.world_size) == (0, MAX_STEPS, 2)
    assert [r.step for r in of_kind(records, TrainRecord)] == list(range(1, MAX_STEPS + 1))
    # a checkpoint every 2 steps and one at the end (transformers saves the last step too)
    assert [r.step for r in of_kind(records, CheckpointRecord)] == [2, MAX_STEPS]
    assert [r.step for r in of_kind(records, DoneRecord)] == [MAX_STEPS]
    summary = json.loads((run / "summary.json").read_text(encoding="utf-8"))
    assert summary["world_size"] == 2 and summary["final_step"] == MAX_STEPS
    assert json.loads((run / "config.json").read_text(encoding="utf-8"))["method"] == "stm"

    # the same masked rows on both ranks: each printed its digest, rank 1 from rank 0's scores
    data = of_kind(records, DataRecord)[0].fields
    assert 0.0 < data["masked_share"] < 1.0 and data["n_examples"] == len(ROWS)
    lines = re.findall(r"rank (\d)/2: training data sha256 ([0-9a-f]{64}) \((.*)\)", out)
    digests = {int(rank): digest for rank, digest, _ in lines}
    assert len(lines) == 2 and set(digests) == {0, 1}, out[-6000:]
    assert digests[0] == digests[1] == data["labels_sha256"] == summary["data"]["labels_sha256"]
    note = {int(rank): text for rank, _, text in lines}
    assert f"({len(ROWS)} from cache, 0 computed)" in note[1], note

    # progress is printed once (rank 0), not once per process
    assert out.count("run folder: ") == 1 and out.count(f"done: step {MAX_STEPS}") == 1, out
    assert out.count(f"step 1/{MAX_STEPS} ·") == 1, out
    assert f"training: step 0 of {MAX_STEPS} on 2 processes" in out, out

    # each rank saved its own RNG state into each checkpoint folder (a resume restores both)
    folders = sorted((run / "checkpoints").glob("checkpoint-*"))
    assert [p.name for p in folders] == ["checkpoint-2", f"checkpoint-{MAX_STEPS}"]
    for checkpoint in folders:
        assert (checkpoint / "trainer_state.json").is_file()
        assert {p.name for p in checkpoint.glob("rng_state*.pth")} == {
            "rng_state_0.pth",
            "rng_state_1.pth",
        }

    # the final adapter loads on the tiny model and changes its output
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    ids = torch.tensor([[1, 42, 7, 99, 5]])
    with torch.no_grad():
        before = base(input_ids=ids).logits
        tuned = PeftModel.from_pretrained(base, run / "adapter").eval()
        after = tuned(input_ids=ids).logits
    assert after.shape == before.shape and torch.isfinite(after).all()
    assert not torch.allclose(after, before)
