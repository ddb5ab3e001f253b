"""What the cluster-backend tests (tests/test_cluster.py: Ray, tests/test_slurm.py: SLURM) share:
4 training rows, a 2-step training config on the tiny model, the backend variables a test
clears, a free port and a polling wait."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from core.training.config import TrainConfig

ROWS = [
    {"prompt": "Square a number.", "response": "def square(x):\n    return x * x"},
    {"prompt": "What is 7 times 8?", "response": "7 times 8 is 56."},
    {"prompt": "Capital of France?", "response": "The capital of France is Paris."},
    {"prompt": "Add two numbers.", "response": "def add(a, b):\n    return a + b"},
]
BACKEND_ENV_VARS = ("PLENS_JOB_BACKEND", "PLENS_RAY_ADDRESS", "PLENS_SLURM_PARTITION")


def write_rows(path: Path) -> Path:
    """`ROWS` as a JSONL training file."""
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS), encoding="utf-8")
    return path


def train_config(model_dir, data_file, **overrides: Any) -> dict:
    """A training job's config: the tiny model on `data_file`, 2 steps unless overridden."""
    return TrainConfig.from_preset(
        "paper",
        **{
            "model": str(model_dir),
            "device": "cpu",
            "task": None,
            "data": str(data_file),
            "max_length": 48,
            "batch_size": 2,
            "learning_rate": 1e-3,
            "precision": "fp32",
            "max_steps": 2,
            **overrides,
        },
    ).to_dict()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    """The first truthy value of `predicate()` within `timeout` seconds (AssertionError after)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")
