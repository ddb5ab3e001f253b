"""What a drift round costs, against the 570-question ARC-Easy round, in one run.

On the embedded model (or --model), in this process and with the same threads:

1. the base model's greedy answers to the probes (a one-off per model and template: cached);
2. the ARC-Easy validation round (all 570 questions, lm-eval's `plain` format, `mc_loglik`);
3. a drift round on each probe with a LoRA adapter on the model: what every round after step
   0 pays, the tuned pass only, the base's side read from the summaries the base round kept
   (`core.eval.base_summary`);
4. for comparison, the OOD probe's round the way it ran before those summaries: the reference
   pass with the adapter disabled plus the tuned pass.

Prints a Markdown table and writes JSON (--out). The target of issue #20: the OOD probe's round
at most a third of the ARC-Easy round's time.

    .venv/bin/python bench/bench_drift.py --out /tmp/drift_bench.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import replace
from datetime import date
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.machine import cpu_name  # noqa: E402
from core.eval.base_summary import BaseSummaryCache  # noqa: E402
from core.eval.drift import ProbeAnswerCache, score_drift  # noqa: E402
from core.eval.probes import PROBE_OOD, PROBE_TEXT, load_probe  # noqa: E402
from core.eval.runner import run_suite  # noqa: E402
from core.eval.suites import tasks_suite  # noqa: E402
from core.model.loading import load_model  # noqa: E402


def lora(lm):  # noqa: ANN001, ANN201
    """`lm` with a LoRA adapter (r 16 on all linear layers, as the cpu preset trains)."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear")
    model = get_peft_model(lm.model, config)
    model.eval()
    return replace(lm, model=model)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--ood", type=int, default=200, help="OOD probe items")
    parser.add_argument("--text", type=int, default=100, help="text probe items")
    parser.add_argument("--target", type=int, default=60, help="MBPP held-out prompts")
    parser.add_argument("--tokens", type=int, default=64, help="answer tokens per prompt")
    parser.add_argument("--arc", type=int, default=None, help="ARC-Easy questions (all: 570)")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument(
        "--answers",
        type=Path,
        default=None,
        help="the base answers' cache file to reuse (default: a fresh one, so they are generated)",
    )
    args = parser.parse_args()

    lm = load_model(args.model, device="cpu", dtype="float32")
    cache = ProbeAnswerCache(args.answers or Path(tempfile.mkdtemp()) / "answers.sqlite")
    summaries = BaseSummaryCache(Path(tempfile.mkdtemp()) / "drift_base.sqlite")
    probes = {
        "ood_drift": load_probe(PROBE_OOD, n=args.ood),
        "text_drift": load_probe(PROBE_TEXT, n=args.text),
        "target_drift": load_probe("mbpp", "test", args.target),
    }
    rows = []
    for name, probe in probes.items():
        t0 = time.perf_counter()
        metrics, details, _ = score_drift(
            lm,
            probe,
            max_new_tokens=args.tokens,
            is_base=True,
            answer_cache=cache,
            summary_cache=summaries,
        )
        rows.append(
            {
                "what": f"{name}: base answers + base round + summaries (one-off, cached)",
                "items": len(details),
                "tokens": sum(d["tokens"] for d in details),
                "seconds": time.perf_counter() - t0,
            }
        )
        print(rows[-1], flush=True)
    t0 = time.perf_counter()
    arc = run_suite(lm, tasks_suite(["arc_easy:validation"], limit=args.arc)).tasks[0]
    arc_s = time.perf_counter() - t0
    rows.append(
        {
            "what": "ARC-Easy round (mc_loglik, plain)",
            "items": arc.n,
            "tokens": None,
            "seconds": arc_s,
        }
    )
    print(rows[-1], flush=True)
    tuned = lora(lm)
    two_pass = [("ood_drift", probes["ood_drift"], True)]
    for name, probe, both in [(n, p, False) for n, p in probes.items()] + two_pass:
        t0 = time.perf_counter()
        metrics, details, _ = score_drift(
            tuned,
            probe,
            max_new_tokens=args.tokens,
            is_base=False,
            answer_cache=cache,
            summary_cache=summaries,
            one_pass=not both,  # both: the round as it ran before the base summaries
        )
        seconds = time.perf_counter() - t0
        how = "reference + tuned pass (before)" if both else "tuned pass + base summaries"
        rows.append(
            {
                "what": f"{name}: drift round, {how}",
                "items": len(details),
                "tokens": sum(d["tokens"] for d in details),
                "seconds": seconds,
                "vs_arc": seconds / arc_s,
                "kl": metrics["kl"],
            }
        )
        print(rows[-1], flush=True)
    result = {
        "date": date.today().isoformat(),
        "cpu": cpu_name(),
        "threads": torch.get_num_threads(),
        "model": lm.display_name,
        "answer_tokens": args.tokens,
        "rows": rows,
    }
    print(f"{result['date']} · {result['cpu']} · {result['threads']} threads · {result['model']}")
    print("| what | items | answer tokens | seconds | vs ARC-Easy round |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        ratio = f"{r['vs_arc']:.2f}x" if "vs_arc" in r else ""
        tokens = "" if r["tokens"] is None else str(r["tokens"])
        print(f"| {r['what']} | {r['items']} | {tokens} | {r['seconds']:.1f} | {ratio} |")
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
