"""Benchmark: Explore's live answer, a 256-token greedy answer streamed token by token.

Target (issue 24): a 256-token greedy answer in under 60 s on 2 quiet cores with the embedded
model (SmolLM2-135M-Instruct, float32 on the CPU). Streams answers to MBPP train prompts with
`core.model.generation.stream_response` (what the page runs) at each thread count, in rotating
order over rounds, and reports per thread count: the time to the first token (prefill), decoding
tokens/s, and the time a 256-token answer takes (measured when an answer reaches 256 tokens,
else first token + 255 tokens at the answer's measured rate, marked "estimated"). The load
average before and after is printed: with other work running the machine is not quiet,
and the result says so.

    .venv/bin/python bench/bench_live_generation.py [--threads 1,2] [--rounds 2]
        [--max-new-tokens 256] [--long]

`--long` asks for a long answer (LONG_PROMPT) so that the 256 tokens are timed, not estimated.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.machine import cpu_name  # noqa: E402
from core.data.tasks import load_task  # noqa: E402
from core.fmt import duration, num  # noqa: E402
from core.model.generation import GenerationConfig, stream_response  # noqa: E402
from core.model.loading import load_model  # noqa: E402

TARGET_S = 60.0
#: A request whose greedy answer runs past 256 tokens, so the target is timed, not extrapolated
#: (MBPP's answers end at about 110 tokens).
LONG_PROMPT = (
    "Write a Python class BankAccount with methods deposit, withdraw, transfer, statement and "
    "add_interest, each with a docstring and input checks, and then unit tests for every method."
)


def one_answer(lm, prompt: str, config: GenerationConfig, threads: int) -> dict[str, float]:
    """Stream one answer; its first-token time, tokens, decoding rate and total seconds."""
    started = time.perf_counter()
    marks: list[float] = []
    answer = stream_response(
        lm,
        prompt,
        config,
        threads=threads,
        on_update=lambda text, n: marks.append(time.perf_counter()),
    )
    total = time.perf_counter() - started
    first = marks[0] - started if marks else total
    rate = (len(marks) - 1) / (marks[-1] - marks[0]) if len(marks) > 1 else 0.0
    return {"first": first, "tokens": answer.n_tokens, "rate": rate, "total": total}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument(
        "--long",
        action="store_true",
        help="time a request whose answer reaches the token limit instead of MBPP prompts",
    )
    args = parser.parse_args()
    threads = [int(t) for t in args.threads.split(",")]
    load = os.getloadavg()
    lm = load_model("default", device="cpu", dtype="float32")
    prompts = [ex.prompt for ex in load_task("mbpp", split="train", limit=args.rounds).examples]
    if args.long:
        prompts = [LONG_PROMPT]
    config = GenerationConfig(max_new_tokens=args.max_new_tokens)
    one_answer(lm, prompts[0], GenerationConfig(max_new_tokens=4), threads[0])  # warm-up
    results: dict[int, list[dict[str, float]]] = {t: [] for t in threads}
    for r in range(args.rounds):
        order = threads[r % len(threads) :] + threads[: r % len(threads)]
        for t in order:
            res = one_answer(lm, prompts[r % len(prompts)], config, t)
            results[t].append(res)
            print(
                f"round {r + 1}, {t} thread(s): {res['tokens']} tokens in {num(res['total'], 3)} s "
                f"(first token {num(res['first'], 3)} s, {num(res['rate'], 3)} tokens/s)",
                flush=True,
            )
    after = os.getloadavg()
    print()
    print(
        f"machine: {cpu_name()}, {os.cpu_count()} cores; {date.today().isoformat()}; "
        f"load average {num(load[0], 2)} before, {num(after[0], 2)} after"
    )
    busy = max(load[0], after[0]) > 1.5
    print(
        "the machine was NOT quiet (load average above 1.5): an upper bound"
        if busy
        else "the machine was quiet"
    )
    print(
        f"\n| torch threads | first token (s) | tokens/s | {args.max_new_tokens}-token answer (s) | target < {duration(TARGET_S)} |"
    )
    print("|---:|---:|---:|---:|---|")
    for t in threads:
        rows = results[t]
        first = statistics.median(r["first"] for r in rows)
        rate = statistics.median(r["rate"] for r in rows)
        full = [r["total"] for r in rows if r["tokens"] >= args.max_new_tokens]
        est = statistics.median(full) if full else first + (args.max_new_tokens - 1) / rate
        note = "" if full else " (estimated)"
        verdict = "met" if est < TARGET_S else "not met"
        print(f"| {t} | {num(first, 3)} | {num(rate, 3)} | {num(est, 3)}{note} | {verdict} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
