"""Does a protocol fan out on a Ray cluster? One protocol, timed on the local queue and on Ray.

The same small protocol (a randomly initialised 4-layer llama with the embedded tokenizer; the
ground-truth, STM, STM-25% and random-mask arms, one seed, the `tiny` suite) runs three times,
each in a fresh runs folder, so nothing is reused:

1. `local`: the local queue (arms one after another in child processes), torch's default
   threads;
2. `local-1t`: the same with OMP_NUM_THREADS=1 (what each Ray job gets below);
3. `ray`: a protocol job on a single-node Ray head started here on 127.0.0.1 with `--num-cpus`
   equal to the machine's cores; every arm is a Ray job asking for one CPU, so they run side by
   side, each with OMP_NUM_THREADS=1.

It prints the wall time of each and the ratios, and (with --markdown) the table for
docs/BENCHMARKS.md.

    python bench/bench_cluster.py [--arms gt,stm,stm_share,random] [--markdown]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.machine import cpu_name  # noqa: E402

RAY = Path(sys.executable).with_name("ray")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_model(folder: Path) -> Path:
    """A 4-layer, 128-wide llama with the embedded model's tokenizer, saved as a model folder."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from core.model.loading import prepare_embedded_model

    tok = AutoTokenizer.from_pretrained(prepare_embedded_model())
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def protocol_args(model: Path, arms: str, folder: Path) -> list[str]:
    return [
        "protocol",
        "--model",
        str(model),
        "--methods",
        arms,
        "--seeds",
        "0",
        "--limit",
        "32",
        "--max-length",
        "128",
        "--epochs",
        "2",
        "--batch-size",
        "4",
        "--learning-rate",
        "1e-3",
        "--suite",
        "tiny",
        "--device",
        "cpu",
        "--run-dir",
        str(folder),
    ]


def run_local(model: Path, arms: str, root: Path, threads: int | None) -> float:
    env = dict(os.environ, PLENS_RUNS_DIR=str(root / "runs"), PLENS_JOB_BACKEND="local")
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    started = time.monotonic()
    out = subprocess.run(
        [sys.executable, "-m", "core", *protocol_args(model, arms, root / "runs" / "proto")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    took = time.monotonic() - started
    if out.returncode != 0:
        raise SystemExit(f"local protocol failed: {out.stderr[-2000:]}")
    return took


def run_ray(model: Path, arms: str, root: Path, cpus: int) -> tuple[float, float]:
    """(wall time of the protocol job on Ray, overlap: summed arm time / wall time of the arms)."""
    port, dash, client = _free_port(), _free_port(), _free_port()
    address = f"http://127.0.0.1:{dash}"
    start = [
        str(RAY),
        "start",
        "--head",
        "--node-ip-address",
        "127.0.0.1",
        "--port",
        str(port),
        "--dashboard-host",
        "127.0.0.1",
        "--dashboard-port",
        str(dash),
        "--ray-client-server-port",
        str(client),
        "--num-cpus",
        str(cpus),
        "--disable-usage-stats",
        "--temp-dir",
        tempfile.mkdtemp(prefix="plray-", dir="/tmp"),
    ]
    subprocess.run(
        start, check=True, capture_output=True, env=dict(os.environ, RAY_USAGE_STATS_ENABLED="0")
    )
    try:
        from core.jobs.cluster import RayEngine
        from core.jobs.registry import SUCCEEDED, JobRegistry

        deadline = time.monotonic() + 60
        while True:
            try:
                RayEngine(address).client.list_jobs()
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(1)
        env = dict(os.environ, PLENS_RUNS_DIR=str(root / "runs"), OMP_NUM_THREADS="1")
        started = time.monotonic()
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "core",
                *protocol_args(model, arms, root / "runs" / "proto"),
                "--submit",
                "--backend",
                "ray",
                "--ray-address",
                address,
            ],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        job_id = out.stdout.strip().splitlines()[-1]
        os.environ["PLENS_RUNS_DIR"] = str(root / "runs")
        registry = JobRegistry(root / "runs")
        job = registry.wait(job_id, timeout=3600, poll=1.0)
        took = time.monotonic() - started
        if job.status != SUCCEEDED:
            raise SystemExit(f"ray protocol {job.status}: {job.error[:2000]}")
        arms_jobs = [j for j in registry.list() if j.kind == "train"]
        busy = sum((j.finished or 0) - (j.started or 0) for j in arms_jobs)
        span = max(j.finished or 0 for j in arms_jobs) - min(j.started or 0 for j in arms_jobs)
        return took, busy / span if span > 0 else 1.0
    finally:
        subprocess.run([str(RAY), "stop", "--force"], capture_output=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arms", default="gt,stm,stm_share,random")
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args()
    cpus = os.cpu_count() or 2
    with tempfile.TemporaryDirectory(prefix="plens-bench-cluster-") as tmp:
        base = Path(tmp)
        model = build_model(base / "model")
        times = {}
        times["local"] = run_local(model, args.arms, base / "local", None)
        print(f"local (default threads): {times['local']:.1f} s", flush=True)
        times["local-1t"] = run_local(model, args.arms, base / "local1", 1)
        print(f"local (1 thread): {times['local-1t']:.1f} s", flush=True)
        times["ray"], overlap = run_ray(model, args.arms, base / "ray", cpus)
        print(f"ray ({cpus} CPUs, 1 per arm): {times['ray']:.1f} s, arms overlap {overlap:.2f}x")
    result = {
        "machine": f"{cpu_name()}, {cpus} cores",
        "date": date.today().isoformat(),
        "arms": args.arms,
        "seconds": {k: round(v, 1) for k, v in times.items()},
        "speedup_vs_local": round(times["local"] / times["ray"], 2),
        "speedup_vs_local_1t": round(times["local-1t"] / times["ray"], 2),
        "arm_overlap": round(overlap, 2),
    }
    print(json.dumps(result, indent=2))
    if args.markdown:
        print("\n| run | wall time (s) | local / this |")
        print("|---|---:|---:|")
        for key in ("local", "local-1t", "ray"):
            print(f"| {key} | {times[key]:.1f} | {times['local'] / times[key]:.2f} |")


if __name__ == "__main__":
    main()
