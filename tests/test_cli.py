"""The CLI as a user runs it: outputs, and one-line errors with non-zero exit codes."""

import json
import os
import subprocess
import sys
from pathlib import Path

from core.cli import main

ROOT = Path(__file__).resolve().parents[1]


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_score_user_data_writes_one_row_per_example(tiny_model_dir, tmp_path, capsys):
    data = _write_jsonl(
        tmp_path / "d.jsonl",
        [
            {"prompt": "Add.", "response": "def add(a, b):\n    return a + b"},
            {"prompt": "Hi", "response": "Hello!"},
            {"prompt": "Empty", "response": "  "},
        ],
    )
    out = tmp_path / "scores.jsonl"
    code = main(["score", "--model", str(tiny_model_dir), "--data", str(data), "--out", str(out)])
    assert code == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == ["row-1", "row-2"]
    for r in rows:
        assert len(r["tokens"]) == len(r["token_ids"]) == len(r["response_mask"])
        assert sum(r["response_mask"]) == len(r["logprob"]) == len(r["ppl"])
        assert r["seq_ppl"] > 1
    err = capsys.readouterr().err
    assert "1 empty rows skipped" in err


def test_bad_inputs_exit_nonzero_with_one_line(tiny_model_dir, tmp_path, capsys):
    data = _write_jsonl(tmp_path / "d.jsonl", [{"question": "q", "answer": "a"}])
    good = _write_jsonl(tmp_path / "good.jsonl", [{"prompt": "q", "response": "a"}])
    cases = [
        (
            [
                "score",
                "--model",
                "no/such-model-here",
                "--data",
                str(good),
                "--out",
                str(tmp_path / "o"),
            ],
            "hub",
        ),
        (
            [
                "score",
                "--model",
                str(tiny_model_dir),
                "--data",
                str(tmp_path / "missing.jsonl"),
                "--out",
                str(tmp_path / "o"),
            ],
            "not found",
        ),
        (
            [
                "score",
                "--model",
                str(tiny_model_dir),
                "--data",
                str(data),
                "--out",
                str(tmp_path / "o"),
            ],
            "prompt",
        ),
        (
            [
                "score",
                "--model",
                str(tiny_model_dir),
                "--task",
                "nosuchtask",
                "--out",
                str(tmp_path / "o"),
            ],
            "Unknown task",
        ),
    ]
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        for argv, needle in cases:
            assert main(argv) == 2, argv
            err = capsys.readouterr().err.strip().splitlines()
            assert err[-1].startswith("error: ") and needle.lower() in err[-1].lower(), err
    finally:
        del os.environ["HF_HUB_OFFLINE"]
    assert not (tmp_path / "o").exists(), "a failed run must not leave an output file"


def test_cli_process_prints_no_traceback(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "core",
            "score",
            "--model",
            "/does/not/exist",
            "--task",
            "mbpp",
            "--out",
            str(tmp_path / "x.jsonl"),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: Unknown model")


def test_output_piped_into_a_reader_that_leaves_is_not_an_error(tmp_path):
    """`python -m core tasks | head -1`: the reader closes the pipe before the command writes;
    that ends the command quietly, not with "error: unexpected BrokenPipeError"."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    read, write = os.pipe()
    os.close(read)  # the reader is gone before the command writes a line
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "core", "tasks"],
            stdout=write,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
            env=env,
            timeout=120,
        )
    finally:
        os.close(write)
    assert proc.returncode == 0, proc.stderr
    assert "unexpected" not in proc.stderr and "Traceback" not in proc.stderr


def test_help_lists_subcommands():
    proc = subprocess.run(
        [sys.executable, "-m", "core", "--help"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert proc.returncode == 0
    for name in ("score", "tasks", "models", "mask"):
        assert name in proc.stdout


def test_inputs_that_used_to_end_in_unexpected_errors_give_one_line_reasons(
    tiny_model_dir, tmp_path, capsys
):
    """Each of these once printed "unexpected <Exception>: ..."; each must name the problem,
    exit 2, and leave what the user had alone."""
    from transformers import BertConfig, BertModel

    good = _write_jsonl(tmp_path / "good.jsonl", [{"prompt": "q", "response": "a b c"}])
    gguf = tmp_path / "broken.gguf"
    gguf.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\xff" * 64)
    bert = tmp_path / "bert"
    BertModel(
        BertConfig(
            vocab_size=64,
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
        )
    ).save_pretrained(bert)
    binary = tmp_path / "scores.bin.jsonl"
    binary.write_bytes(bytes(range(256)) * 8)
    folder = tmp_path / "existing-folder"
    folder.mkdir()
    (folder / "keep.txt").write_text("mine")
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    score = ["score", "--model", str(tiny_model_dir), "--data", str(good)]
    cases = [
        ([*score, "--top-k", "-1", "--out", str(tmp_path / "o.jsonl")], "top_k must be"),
        (
            [
                "score",
                "--model",
                str(gguf),
                "--data",
                str(good),
                "--out",
                str(tmp_path / "o.jsonl"),
            ],
            "not a readable GGUF model file",
        ),
        (
            [
                "score",
                "--model",
                str(bert),
                "--data",
                str(good),
                "--out",
                str(tmp_path / "o.jsonl"),
            ],
            "not a causal language model",
        ),
        ([*score, "--out", str(folder)], "is a folder"),
        ([*score, "--out", str(blocker / "sub" / "o.jsonl")], "cannot create the folder"),
        (["mask", "--scores", str(binary), "--out", str(tmp_path / "m")], "binary file"),
    ]
    for argv, reason in cases:
        code = main(argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2, (argv, err)
        assert err[-1].startswith("error:") and reason in err[-1], (argv, err)
        assert "unexpected" not in err[-1]
    assert (folder / "keep.txt").read_text() == "mine" and blocker.read_text() == "not a folder"
    assert not (tmp_path / "o.jsonl").exists() and not (tmp_path / "m").exists()


def test_train_refuses_a_bad_eval_suite_with_one_line_before_any_work(capsys):
    """A broken --eval-suite once became a suite named '{bad json' and the run trained without
    evaluation; each of these must stop at once, exit 2, and leave no job behind."""
    from core.jobs.runfiles import runs_dir

    train = ["train", "--task", "mbpp", "--limit", "4", "--max-steps", "1"]
    cases = [
        (
            [*train, "--eval-every", "1", "--eval-suite", "{bad json"],
            "argument --eval-suite: '{bad json' is not valid JSON",
        ),
        ([*train, "--eval-every", "1", "--eval-suite", "nosuch"], "Unknown evaluation suite"),
        (
            [*train, "--eval-every", "1", "--eval-suite", '{"suite": "tiny", "limt": 3}'],
            "got the key 'limt'",
        ),
        (
            [*train, "--eval-every", "1", "--eval-suite", '{"suite": "tiny", "limit": 0}'],
            "limit must be a whole number >= 1, got 0",
        ),
        ([*train, "--eval-suite", "tiny"], "add --eval-every N"),
    ]
    for argv, reason in cases:
        try:
            code = main(argv)
        except SystemExit as exc:  # argparse's own errors exit from the parser
            code = exc.code
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2, (argv, err)
        assert len(err) == 1 and err[0].startswith("error: ") and reason in err[0], (argv, err)
    assert not runs_dir().exists() or not any(runs_dir().iterdir())


def test_eval_and_train_check_model_device_and_dtype_before_a_job_exists(
    tiny_model_dir, tmp_path, capsys
):
    """These once registered a job (and a run folder) and failed only when it loaded the model."""
    import torch

    from core.jobs.runfiles import runs_dir

    not_a_model = tmp_path / "notes"
    not_a_model.mkdir()
    ev = ["eval", "--suite", "tiny", "--limit", "1"]
    tr = ["train", "--task", "mbpp", "--limit", "4", "--max-steps", "1"]
    cases = [
        ([*ev, "--model", str(not_a_model)], "is a folder but has no config.json"),
        ([*ev, "--model", str(tmp_path / "gone")], "Unknown model"),
        ([*ev, "--model", str(tiny_model_dir), "--dtype", "float8"], "Unknown dtype 'float8'"),
        ([*ev, "--model", str(tiny_model_dir), "--device", "gpu"], "Unknown device 'gpu'"),
        ([*tr, "--model", str(not_a_model)], "is a folder but has no config.json"),
    ]
    if not torch.cuda.is_available():
        cases.append(([*tr, "--model", str(tiny_model_dir), "--device", "cuda"], "no CUDA GPU"))
    for argv, reason in cases:
        code = main(argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1, (argv, err)
        assert err[0].startswith("error: ") and reason in err[0], (argv, err)
    assert not runs_dir().exists() or not any(runs_dir().iterdir())
