"""Scoring throughput: batched path vs a naive one-example-at-a-time loop vs a matmul probe.

Run: .venv/bin/python bench/bench_scoring.py [--n 64] [--dtype float32|bfloat16] [--flips]

Tokens/s counts every non-padding token that goes through the forward pass (prompt + response).
Roofline share = tokens/s x 2 x parameters / (matmul probe FLOP/s in the same dtype), the
definition in the foundation issue. The probe runs before, between and after the timed paths in
every round (`--rounds`); the share uses the highest probe and each path's fastest round. The batched path skips the output projection for prompt
positions (it only needs logits where a response token is predicted), so it does less work per
token than 2 x parameters; the share can therefore exceed what a pure forward pass would reach.
With --flips, also scores in bf16 and reports the share of response tokens whose STM mask at
tau = 2.5 differs from fp32 (what bf16 would change for a user).
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.machine import cpu_name  # noqa: E402
from core.data.tasks import load_task  # noqa: E402
from core.model.encoding import encode_pair  # noqa: E402
from core.model.loading import load_model  # noqa: E402
from core.scoring.score import score_examples  # noqa: E402
from tests.reference import score_one_reference


def matmul_probe(dtype: torch.dtype, size: int = 2048, seconds: float = 3.0) -> float:
    """Sustained FLOP/s of a square matmul in `dtype` on this CPU."""
    a = torch.randn(size, size).to(dtype)
    b = torch.randn(size, size).to(dtype)
    for _ in range(2):
        a @ b
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        n += 1
    return 2 * size**3 * n / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=64, help="MBPP train examples")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--flips", action="store_true")
    parser.add_argument("--rounds", type=int, default=2, help="timed rounds of each path")
    args = parser.parse_args()

    examples = load_task("mbpp", split="train", limit=args.n).examples
    lm = load_model("default", device="cpu", dtype=args.dtype)
    params = sum(p.numel() for p in lm.model.parameters())
    tokens = sum(len(encode_pair(lm.tokenizer, e.prompt, e.response).input_ids) for e in examples)

    # These machines are shared: the attainable FLOP/s moves during a run. The probe runs before,
    # between and after the timed paths, every round; shares use the highest probe (the
    # conservative choice) and each path its fastest round.
    probes: list[float] = []
    naive_times: list[float] = []
    batched_times: list[float] = []
    score_examples(lm, examples[:4])  # warm-up
    for _ in range(args.rounds):
        probes.append(matmul_probe(lm.dtype))
        start = time.perf_counter()
        for ex in examples:
            score_one_reference(lm, ex)
        naive_times.append(time.perf_counter() - start)
        probes.append(matmul_probe(lm.dtype))
        start = time.perf_counter()
        run = score_examples(lm, examples)
        batched_times.append(time.perf_counter() - start)
    probes.append(matmul_probe(lm.dtype))
    probe = max(probes)
    naive_s, batched_s = min(naive_times), min(batched_times)

    def row(name: str, seconds: float) -> str:
        tps = tokens / seconds
        share = tps * 2 * params / probe
        return f"| {name} | {seconds:.2f} | {tps:,.0f} | {100 * share:.0f}% | {naive_s / seconds:.2f}x |"

    print(
        f"machine: {cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; date {datetime.date.today()}"
    )
    print(
        f"model: {lm.display_name}, {params / 1e6:.1f} M params, dtype {args.dtype}; "
        f"{len(examples)} MBPP train examples, {tokens} tokens "
        f"({sum(r.n_response for r in run.examples)} response tokens)"
    )
    print(
        f"matmul probe ({args.dtype}): {probe / 1e9:.0f} GFLOP/s (highest of "
        f"{', '.join(f'{p / 1e9:.0f}' for p in probes)}); path times per round: naive "
        f"{', '.join(f'{t:.1f}' for t in naive_times)} s, batched "
        f"{', '.join(f'{t:.1f}' for t in batched_times)} s\n"
    )
    print("| path | seconds | tokens/s | roofline share | speed vs naive |")
    print("|---|---:|---:|---:|---:|")
    print(row("naive loop (one example, full logits)", naive_s))
    print(row("batched + length bucketing (score_examples)", batched_s))

    if args.flips:
        other = "bfloat16" if args.dtype == "float32" else "float32"
        lm2 = load_model("default", device="cpu", dtype=other)
        run2 = score_examples(lm2, examples)
        a = np.concatenate([r.ppl_array() for r in run.examples]) > 2.5
        b = np.concatenate([r.ppl_array() for r in run2.examples]) > 2.5
        print(
            f"\nmask flips {args.dtype} vs {other} at tau 2.5: {int((a != b).sum())} of "
            f"{a.size} response tokens ({100 * (a != b).mean():.2f}%); masked share "
            f"{100 * a.mean():.1f}% vs {100 * b.mean():.1f}%"
        )


if __name__ == "__main__":
    main()
