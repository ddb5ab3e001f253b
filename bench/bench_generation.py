"""Benchmark: Self-Output sampling, batched vs one sample at a time (tokens per second, N = 8).

Baseline ("one at a time"): for each prompt, N separate `generate_responses` calls with one
sample each. Batched (what `core.gendata` does): one call per `prompt_batch` prompts with
`num_return_sequences=N`, i.e. prompt_batch x N sequences decoded together. Both sample the same
prompts with the same settings; only tokens actually generated (up to and excluding the
end-of-turn token) count. Rounds alternate the two modes so load changes on a shared machine hit
both; the medians are reported.

    .venv/bin/python bench/bench_generation.py [--n 8] [--prompts 2] [--max-new-tokens 64]
        [--threads 1] [--dtype float32] [--rounds 2]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from core.generation import GenerationConfig, generate_responses  # noqa: E402
from core.models import load_model  # noqa: E402
from core.tasks import load_task  # noqa: E402


def one_at_a_time(lm, prompts: list[str], n: int, max_new_tokens: int, seed: int) -> int:
    """N single-sample calls per prompt; returns the tokens generated."""
    tokens = 0
    for p, prompt in enumerate(prompts):
        for k in range(n):
            config = GenerationConfig(
                max_new_tokens=max_new_tokens, do_sample=True, seed=seed + 100 * p + k
            )
            tokens += generate_responses(lm, [prompt], config, batch_size=1)[0][0].n_tokens
    return tokens


def batched(lm, prompts: list[str], n: int, max_new_tokens: int, seed: int, batch: int) -> int:
    """One call per `batch` prompts with N samples each; returns the tokens generated."""
    config = GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=True, num_return_sequences=n, seed=seed
    )
    out = generate_responses(lm, prompts, config, batch_size=batch)
    return sum(g.n_tokens for gens in out for g in gens)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=8, help="samples per prompt")
    parser.add_argument("--prompts", type=int, default=2, help="MBPP train prompts")
    parser.add_argument("--prompt-batch", type=int, default=2, help="prompts per batched call")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    lm = load_model("default", device="cpu", dtype=args.dtype)
    prompts = [ex.prompt for ex in load_task("mbpp", "train", limit=args.prompts).examples]
    batched(lm, prompts[:1], 2, 8, 0, 1)  # warm-up

    rates: dict[str, list[float]] = {"one at a time": [], "batched": []}
    for r in range(args.rounds):
        for mode in ("one at a time", "batched") if r % 2 == 0 else ("batched", "one at a time"):
            t0 = time.perf_counter()
            if mode == "batched":
                tokens = batched(lm, prompts, args.n, args.max_new_tokens, r, args.prompt_batch)
            else:
                tokens = one_at_a_time(lm, prompts, args.n, args.max_new_tokens, r)
            seconds = time.perf_counter() - t0
            rates[mode].append(tokens / seconds)
            print(f"round {r + 1} {mode:13}: {tokens} tokens in {seconds:.1f}s", flush=True)

    single = statistics.median(rates["one at a time"])
    fast = statistics.median(rates["batched"])
    load = os.getloadavg()[0]
    print(
        f"\n{date.today()} · {platform.processor() or platform.machine()} · "
        f"{os.cpu_count()} cores · load {load:.1f} · torch {torch.__version__} · "
        f"{args.threads} thread(s) · {args.dtype} · embedded SmolLM2-135M-Instruct"
    )
    print(
        f"N={args.n}, {args.prompts} MBPP prompts, {args.prompt_batch} per batched call, "
        f"<= {args.max_new_tokens} new tokens, T=0.7, top-p 0.95, {args.rounds} rounds"
    )
    print(f"one at a time: {single:.1f} tokens/s (median)")
    print(f"batched:       {fast:.1f} tokens/s (median)")
    print(f"ratio:         {fast / single:.2f}x")


if __name__ == "__main__":
    main()
