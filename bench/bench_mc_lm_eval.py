"""Multiple-choice scoring side by side with lm-evaluation-harness, on the same items.

For each task (ARC-Easy validation, ARC-Challenge validation, a seeded MMLU subset) this writes
the items Perplexity Lens evaluates to a local JSONL, an offline lm-eval YAML task over that
file with lm-eval's own prompt format (ARC: "Question: {q}\\nAnswer:" + " {choice}"; MMLU: the
subject line, lettered choices, "Answer:" + " A".. " D"), then scores both ways with the same
model in this process and prints acc, acc_norm, per-item agreement and seconds.

lm-eval is not a project dependency: install it anywhere importable, e.g.
    .venv/bin/python -m pip install --target /tmp/lmeval_pkgs --no-deps lm-eval==0.4.13 \\
        evaluate jsonlines sqlitedict pytablewriter word2number more_itertools ...
    PYTHONPATH=/tmp/lmeval_pkgs .venv/bin/python bench/bench_mc_lm_eval.py --mmlu 300

Seconds: ours is `run_suite` on the `plain` format; lm-eval's is `simple_evaluate` on the already
loaded model (its HFLM wrapper), both after the model is loaded, same dtype, same threads.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.eval.runner import run_suite  # noqa: E402
from core.eval.scorers import _mc_question, select_examples  # noqa: E402
from core.eval.suites import tasks_suite  # noqa: E402
from core.model.loading import load_model  # noqa: E402

YAML = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
output_type: multiple_choice
test_split: test
doc_to_text: "{text}"
doc_to_choice: {choice}
doc_to_target: gold
metric_list:
  - metric: acc
  - metric: acc_norm
"""
# lm-eval's own templates (arc_easy.yaml / arc_challenge.yaml; mmlu's default, zero-shot, with
# the subject line that is its `description`)
ARC_TEXT = "Question: {{question}}\\nAnswer:"
ARC_CHOICE = '"{{choices}}"'
MMLU_TEXT = (
    "The following are multiple choice questions (with answers) about {{subject}}.\\n\\n"
    "{{question}}\\nA. {{choices[0]}}\\nB. {{choices[1]}}\\nC. {{choices[2]}}\\n"
    "D. {{choices[3]}}\\nAnswer:"
)
MMLU_CHOICE = '["A", "B", "C", "D"]'


def write_task(folder: Path, name: str, spec: object) -> int:
    """The items of `spec` as JSONL plus an lm-eval YAML over them; returns the item count."""
    examples = select_examples(spec)
    rows = []
    for ex in examples:
        row = {"id": ex.id, "question": _mc_question(ex), "choices": ex.meta["choices"]}
        row["gold"] = int(ex.meta["gold_index"])
        if "subject" in ex.meta:
            row["subject"] = str(ex.meta["subject"]).replace("_", " ")
        rows.append(row)
    data = folder / f"{name}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    text, choice = (MMLU_TEXT, MMLU_CHOICE) if spec.task == "mmlu" else (ARC_TEXT, ARC_CHOICE)
    yaml = YAML.format(name=name, path=data, text=text, choice=choice)
    (folder / f"{name}.yaml").write_text(yaml, encoding="utf-8")
    return len(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--mmlu", type=int, default=300, help="seeded MMLU items")
    parser.add_argument("--limit", type=int, default=None, help="items per ARC task (all)")
    parser.add_argument("--batch-size", type=int, default=16, help="lm-eval's batch size")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    lm = load_model(args.model, device="cpu", dtype="float32")
    names = {
        "arc_easy:validation": args.limit,
        "arc_challenge:validation": args.limit,
        "mmlu": args.mmlu,
    }
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for task_name, n in names.items():
            suite = tasks_suite([task_name], limit=n, mc_format="plain")
            [spec] = suite.specs()
            yaml_name = "plens_" + task_name.replace(":", "_")
            count = write_task(folder, yaml_name, spec)
            started = time.perf_counter()
            ours = run_suite(lm, suite).tasks[0]
            ours_s = time.perf_counter() - started
            hflm = HFLM(pretrained=lm.model, tokenizer=lm.tokenizer, batch_size=args.batch_size)
            started = time.perf_counter()
            result = lm_eval.simple_evaluate(
                model=hflm,
                tasks=[yaml_name],
                task_manager=TaskManager(include_path=str(folder), include_defaults=False),
                log_samples=True,
                verbosity="ERROR",
            )
            theirs_s = time.perf_counter() - started
            metrics = result["results"][yaml_name]
            samples = result["samples"][yaml_name]
            their_pred = {
                int(s["doc_id"]): int(
                    max(range(len(s["filtered_resps"])), key=lambda i: s["filtered_resps"][i][0])
                )
                for s in samples
            }
            # lm-eval's acc_norm pick: log-likelihood over the characters of each choice
            letters = json.loads(MMLU_CHOICE) if spec.task == "mmlu" else None
            their_norm = {}
            for s in samples:
                lls = [r[0] for r in s["filtered_resps"]]
                chars = [len(c) for c in (letters or s["doc"]["choices"])]
                norm = [ll / n for ll, n in zip(lls, chars, strict=True)]
                their_norm[int(s["doc_id"])] = max(range(len(norm)), key=lambda i: norm[i])
            agree = sum(their_pred[i] == d["pred"] for i, d in enumerate(ours.details))
            agree_norm = sum(their_norm[i] == d["pred_norm"] for i, d in enumerate(ours.details))
            rows.append(
                {
                    "task": task_name,
                    "n": count,
                    "ours_acc": ours.metrics["acc"],
                    "lm_eval_acc": metrics["acc,none"],
                    "ours_acc_norm": ours.metrics["acc_norm"],
                    "lm_eval_acc_norm": metrics["acc_norm,none"],
                    "same_pick": agree / count,
                    "same_pick_norm": agree_norm / count,
                    "ours_s": ours_s,
                    "lm_eval_s": theirs_s,
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    import importlib.metadata as md

    print(
        f"\n{date.today()} · {platform.processor() or platform.machine()} · "
        f"torch threads {torch.get_num_threads()} · lm-eval {md.version('lm_eval')} · {lm.display_name}"
    )
    print(
        "| task | n | acc (ours / lm-eval) | acc_norm (ours / lm-eval) | same pick (acc / acc_norm) | s (ours / lm-eval) | speed |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['task']} | {r['n']} | {r['ours_acc']:.4f} / {r['lm_eval_acc']:.4f} | "
            f"{r['ours_acc_norm']:.4f} / {r['lm_eval_acc_norm']:.4f} | "
            f"{100 * r['same_pick']:.1f}% / {100 * r['same_pick_norm']:.1f}% | "
            f"{r['ours_s']:.1f} / {r['lm_eval_s']:.1f} | {r['lm_eval_s'] / r['ours_s']:.2f}x |"
        )


if __name__ == "__main__":
    main()
