"""Benchmark: Self-Output sampling, batched vs one sample at a time (tokens per second, N = 8).

Modes, all sampling the same MBPP train prompts with the same settings (T 0.7, top-p 0.95):

- one at a time (the baseline): one `generate_responses` call per sample, N = 1. To keep a
  round short it draws `--baseline-samples` samples per prompt; its tokens/s is a rate, so the
  count does not favour either side.
- expanded P x N: one call per P prompts with `num_return_sequences=N` and
  `share_prefill=False`, i.e. `generate` expands every prompt N times before the prefill (the
  code before the shared prefill).
- shared P x N: what `core.datagen.run` runs: each prompt is prefilled once, its KV cache copied N
  times, then P x N sequences are decoded together.

Only real generated tokens count: up to and including the end-of-turn token, none of the
padding a finished row gets while the rest of its batch runs on. Rounds rotate the order of the
modes so load changes on a shared machine hit all of them; medians are reported, with the
spread over rounds. Tokens per CPU-second of this process (`time.process_time`) are shown too:
with one thread they are far less sensitive to other processes' load than wall time.

    .venv/bin/python bench/bench_generation.py [--n 8] [--prompts 4] [--prompt-batch 1,2,4]
        [--max-new-tokens 64] [--threads 1] [--rounds 3] [--baseline-samples 2]
    .venv/bin/python bench/bench_generation.py --threads 1,2 --prompt-batch 2 --no-expanded
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

from core.data.tasks import load_task  # noqa: E402
from core.model.encoding import encode_prompt  # noqa: E402
from core.model.generation import (
    Generation,
    GenerationConfig,
    generate_responses,
    set_torch_threads,
)
from core.model.loading import load_model  # noqa: E402


def real_tokens(gens: list[Generation]) -> int:
    """Generated tokens up to and including the end-of-turn token."""
    return sum(g.n_tokens + int(g.finished) for g in gens)


def one_at_a_time(lm, prompts: list[str], k: int, max_new_tokens: int, seed: int) -> int:
    """`k` single-sample calls per prompt; returns the real tokens generated."""
    tokens = 0
    for p, prompt in enumerate(prompts):
        for s in range(k):
            config = GenerationConfig(
                max_new_tokens=max_new_tokens, do_sample=True, seed=seed + 100 * p + s
            )
            tokens += real_tokens(generate_responses(lm, [prompt], config, batch_size=1)[0])
    return tokens


def batched(
    lm, prompts: list[str], n: int, max_new_tokens: int, seed: int, batch: int, share: bool
) -> int:
    """One call per `batch` prompts with N samples each; returns the real tokens generated."""
    config = GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=True, num_return_sequences=n, seed=seed
    )
    out = generate_responses(lm, prompts, config, batch_size=batch, share_prefill=share)
    return sum(real_tokens(gens) for gens in out)


def run_modes(lm, prompts: list[str], args: argparse.Namespace, threads: int) -> None:
    """All modes for `args.rounds` rounds at `threads` torch threads; prints the table."""
    set_torch_threads(threads)
    batches = [int(b) for b in args.prompt_batch.split(",")]
    modes: list[tuple[str, object]] = [("one at a time", None)]
    if not args.no_expanded:
        modes.append((f"expanded {batches[-1]} x {args.n}", (batches[-1], False)))
    modes += [(f"shared {b} x {args.n}", (b, True)) for b in batches]
    wall: dict[str, list[float]] = {name: [] for name, _ in modes}
    cpu: dict[str, list[float]] = {name: [] for name, _ in modes}
    tokens_of: dict[str, list[int]] = {name: [] for name, _ in modes}
    loads: list[float] = []
    for r in range(args.rounds):
        shift = r % len(modes)
        for name, spec in modes[shift:] + modes[:shift]:
            t0, c0 = time.perf_counter(), time.process_time()
            if spec is None:
                tokens = one_at_a_time(lm, prompts, args.baseline_samples, args.max_new_tokens, r)
            else:
                batch, share = spec
                tokens = batched(lm, prompts, args.n, args.max_new_tokens, r, batch, share)
            seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
            wall[name].append(tokens / seconds)
            cpu[name].append(tokens / cpu_seconds)
            tokens_of[name].append(tokens)
            loads.append(os.getloadavg()[0])
            print(
                f"  {threads} thr, round {r + 1}, {name:16}: {tokens} tokens in {seconds:.1f}s "
                f"({tokens / seconds:.1f}/s wall, {tokens / cpu_seconds:.1f}/s cpu), "
                f"load {loads[-1]:.1f}",
                flush=True,
            )

    base_wall = statistics.median(wall["one at a time"])
    base_cpu = statistics.median(cpu["one at a time"])
    print(
        f"\n{threads} thread(s); load average (1 min) {min(loads):.1f}-{max(loads):.1f} "
        f"during the rounds"
    )
    print(
        "| mode | tokens per round | tokens/s wall (median; range) | ratio | "
        "tokens per CPU-s | ratio |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for name, _ in modes:
        w, c = statistics.median(wall[name]), statistics.median(cpu[name])
        print(
            f"| {name} | {'/'.join(map(str, tokens_of[name]))} | {w:.1f} "
            f"({min(wall[name]):.1f}-{max(wall[name]):.1f}) | {w / base_wall:.2f}x | "
            f"{c:.1f} | {c / base_cpu:.2f}x |"
        )
    # the same-round ratio of the best shared mode, to show its spread
    best = max((name for name, _ in modes if name.startswith("shared")), key=lambda n: wall[n])
    per_round = [b / s for b, s in zip(wall[best], wall["one at a time"], strict=True)]
    print(
        f"{best} vs one at a time, per round: " + ", ".join(f"{x:.2f}x" for x in per_round) + "\n",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=8, help="samples per prompt")
    parser.add_argument("--prompts", type=int, default=4, help="MBPP train prompts")
    parser.add_argument(
        "--prompt-batch", default="1,2,4", help="prompts per batched call (comma list)"
    )
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--threads", default="1", help="torch threads (comma list: 1,2)")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--baseline-samples", type=int, default=2, help="per prompt, per round")
    parser.add_argument("--no-expanded", action="store_true", help="skip the expanded mode")
    args = parser.parse_args()

    lm = load_model("default", device="cpu", dtype=args.dtype)
    prompts = [ex.prompt for ex in load_task("mbpp", "train", limit=args.prompts).examples]
    lengths = [len(encode_prompt(lm.tokenizer, p)) for p in prompts]
    print(
        f"{date.today()} · {platform.processor() or platform.machine()} · "
        f"{os.cpu_count()} cores · torch {torch.__version__} · {args.dtype} · "
        "embedded SmolLM2-135M-Instruct"
    )
    print(
        f"N={args.n}, {args.prompts} MBPP train prompts (~{min(lengths)}-{max(lengths)} prompt "
        f"tokens), <= {args.max_new_tokens} new tokens, T=0.7, top-p 0.95, {args.rounds} rounds, "
        f"baseline {args.baseline_samples} samples per prompt per round\n",
        flush=True,
    )
    batched(lm, prompts[:1], 2, 8, 0, 1, True)  # warm-up
    for threads in (int(t) for t in args.threads.split(",")):
        run_modes(lm, prompts, args, threads)


if __name__ == "__main__":
    main()
