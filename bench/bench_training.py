"""Benchmark: what STM costs on top of ground-truth (GT) training, and fp32 vs bf16 steps.

With the embedded model on MBPP train examples, measured in one run:

1. data preparation: GT (encode only) vs STM (score every response token with the original
   model, empty score cache, then mask);
2. training step time (LoRA r 16 on all linear layers, batch 8, the cpu-quick preset's
   max_length) for GT vs STM labels, in fp32 and under bf16 autocast: the median wall time of
   steps 2..N from the metrics each run writes.

`--preset-check` also runs the cpu-quick preset end to end (`python -m core train --preset
cpu-quick --method stm`, as a user would) and reports its wall time, the loss at the start and
end, and the mean response NLL on 16 held-out MBPP problems before and after (does the model
change measurably?).

Run: ``.venv/bin/python bench/bench_training.py [--examples 16] [--steps 5] [--preset-check]``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench.machine import cpu_name  # noqa: E402
from core.jobs.runfiles import read_metrics  # noqa: E402
from core.model.loading import embedded_model_dir, load_model  # noqa: E402
from core.training.config import TrainConfig  # noqa: E402
from core.training.data import build_training_data  # noqa: E402
from core.training.trainer import build_trainer, cpu_has_fast_bf16  # noqa: E402


def step_times(config: TrainConfig, run_dir: Path) -> tuple[float, int]:
    """Median seconds per step (first step excluded) and trained tokens of a short run."""
    lm = load_model("default", device="cpu", dtype="float32")  # fresh weights per run
    trainer, data = build_trainer(config, run_dir, lm=lm)
    trainer.train()
    times = [r["time"] for r in read_metrics(run_dir) if r["kind"] == "train"]
    diffs = [b - a for a, b in zip(times, times[1:], strict=False)]
    return statistics.median(diffs), data.n_trainable_tokens


def matmul_gflops(dtype: torch.dtype, n: int = 1024, repeats: int = 3) -> float:
    """Square-matmul throughput in the given dtype (the roofline probe)."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    a @ b
    t0 = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return repeats * 2 * n**3 / (time.perf_counter() - t0) / 1e9


def response_nll(lm, examples) -> float:
    """Mean NLL per response token (the loss a GT fine-tune lowers)."""
    from core.scoring.score import score_examples

    run = score_examples(lm, examples)
    lps = [lp for ex in run.examples for lp in ex.logprob]
    return -sum(lps) / len(lps)


def preset_check(tmp: Path) -> dict:
    """Run the cpu-quick preset through the CLI as a user would; measure its effect."""
    from peft import PeftModel

    from core.data.tasks import load_task

    run_dir = tmp / "cpu-quick"
    start = time.time()
    done = subprocess.run(
        [sys.executable, "-m", "core", "train", "--preset", "cpu-quick", "--method", "stm"]
        + ["--run-dir", str(run_dir)],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    wall = time.time() - start
    if done.returncode != 0:
        raise SystemExit(f"cpu-quick run failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    summary = json.loads((run_dir / "summary.json").read_text())
    held_out = load_task("mbpp", split="test", limit=16).examples
    base = load_model("default", device="cpu", dtype="float32")
    before = response_nll(base, held_out)
    train_before = response_nll(base, load_task("mbpp", split="train", limit=48).examples)
    base.model = PeftModel.from_pretrained(base.model, str(run_dir / "adapter")).eval()
    after = response_nll(base, held_out)
    train_after = response_nll(base, load_task("mbpp", split="train", limit=48).examples)
    return {
        "wall_s": wall,
        "train_runtime_s": summary["train_runtime_s"],
        "steps": summary["final_step"],
        "loss_first": summary["train_loss_first"],
        "loss_last": summary["train_loss_last"],
        "masked_share": summary["data"]["masked_share"],
        "precision": summary["precision"],
        "nll_train_before": train_before,
        "nll_train_after": train_after,
        "nll_heldout_before": before,
        "nll_heldout_after": after,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=16)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument(
        "--bf16",
        choices=["auto", "yes", "no"],
        default="auto",
        help="bf16 training rows: auto = only if bf16 matmuls are not slower than fp32 here",
    )
    parser.add_argument("--preset-check", action="store_true")
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="bench-training-"))
    os.environ.setdefault("PLENS_EMBEDDED_DIR", str(embedded_model_dir()))  # reuse the model
    os.environ["PLENS_CACHE_DIR"] = str(tmp / "cache")  # empty score cache: STM pays scoring
    os.environ["PLENS_RUNS_DIR"] = str(tmp / "runs")
    quick = TrainConfig.from_preset("cpu-quick")
    base = dict(limit=args.examples, max_steps=args.steps, save_every=10_000, device="cpu")

    lm = load_model("default", device="cpu", dtype="float32")
    prep = {}
    for method in ("gt", "stm"):
        config = TrainConfig.from_preset("cpu-quick", method=method, **base)
        t0 = time.perf_counter()
        data = build_training_data(config, lm)
        prep[method] = (time.perf_counter() - t0, data)
    del lm

    fp32_gflops, bf16_gflops = matmul_gflops(torch.float32), matmul_gflops(torch.bfloat16, n=256)
    use_bf16 = args.bf16 == "yes" or (args.bf16 == "auto" and bf16_gflops >= fp32_gflops)
    rows = []
    precisions = ["fp32", "bf16"] if use_bf16 else ["fp32"]
    for precision in precisions:
        for method in ("gt", "stm"):
            config = TrainConfig.from_preset(
                "cpu-quick", method=method, precision=precision, **base
            )
            sec, trained = step_times(config, tmp / f"run-{method}-{precision}")
            rows.append((method, precision, sec, trained))

    stm_data = prep["stm"][1]
    print(f"## bench_training: {args.examples} MBPP train examples, embedded model")
    print()
    print(
        f"machine: {cpu_name()}, {os.cpu_count()} cores, fast bf16 (AMX/AVX512-BF16): "
        f"{'yes' if cpu_has_fast_bf16() else 'no'}, torch {torch.__version__}, "
        f"threads {torch.get_num_threads()}, {dt.date.today().isoformat()}; matmul probe "
        f"fp32 {fp32_gflops:.0f} GFLOP/s, bf16 {bf16_gflops:.1f} GFLOP/s"
        f"{'' if use_bf16 else ' (bf16 training rows skipped: slower than fp32 here)'}; "
        f"LoRA r {quick.lora_r} all-linear, batch {quick.batch_size}, max_length "
        f"{quick.max_length}, median of steps 2..{args.steps}"
    )
    print()
    print("| data preparation | seconds | vs GT |")
    print("|---|---:|---:|")
    gt_prep = prep["gt"][0]
    for method, (sec, _data) in prep.items():
        print(
            f"| {method} ({'encode' if method == 'gt' else 'score + mask'}) | {sec:.1f} | "
            f"{sec / gt_prep:.1f}x |"
        )
    print()
    print(
        f"STM at tau 2.5 masks {100 * stm_data.masked_share:.1f}% of "
        f"{stm_data.n_response_tokens} response tokens; "
        f"{stm_data.n_fully_masked} examples have no trainable token."
    )
    print()
    print("| labels | precision | s / step | trained tokens | vs GT fp32 |")
    print("|---|---|---:|---:|---:|")
    gt_fp32 = rows[0][2]
    for method, precision, sec, trained in rows:
        print(f"| {method} | {precision} | {sec:.2f} | {trained} | {sec / gt_fp32:.2f}x |")
    if args.preset_check:
        res = preset_check(tmp)
        print()
        print(
            "cpu-quick preset end to end (`python -m core train --preset cpu-quick --method stm`):"
        )
        print()
        print(
            "| wall s | train s | steps | precision | loss first 3 -> last 3 | "
            "NLL train 48 before -> after | NLL held-out 16 before -> after |"
        )
        print("|---:|---:|---:|---|---|---|---|")
        print(
            f"| {res['wall_s']:.0f} | {res['train_runtime_s']:.0f} | {res['steps']} | "
            f"{res['precision']} | {res['loss_first']:.3f} -> {res['loss_last']:.3f} | "
            f"{res['nll_train_before']:.3f} -> {res['nll_train_after']:.3f} | "
            f"{res['nll_heldout_before']:.3f} -> {res['nll_heldout_after']:.3f} |"
        )


if __name__ == "__main__":
    main()
