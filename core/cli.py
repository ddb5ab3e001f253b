"""Command line: everything the app does, headless. `python -m core --help` lists subcommands.

Failures caused by the user's input or environment exit non-zero with one line on stderr
(`error: ...`), never a traceback; `--debug` shows the traceback for bug reports.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from typing import NoReturn

from core.data.sources import load_source
from core.data.tasks import TasksConfig, list_tasks
from core.datagen.config import GenDataConfig
from core.datagen.run import preflight
from core.errors import LensError
from core.eval.config import EvalConfig
from core.io import app_root, output_path, write_bytes_atomic, write_jsonl_atomic
from core.jobs.cluster import (
    BACKENDS,
    LOCAL,
    BackendConfig,
    check_setting,
    current_setting,
    make_setting,
    save_setting,
)
from core.jobs.registry import Job, JobRegistry, JobsConfig, run_job_process
from core.jobs.runfiles import log_tail, read_metrics, run_progress, runs_dir
from core.jobs.state import live_state
from core.masking.config import MaskCommandConfig
from core.model.config import ModelsConfig
from core.scoring.config import ScoreConfig
from core.study.report_config import ReportConfig
from core.study.sweep import SweepConfig, submit_sweep, wait_for
from core.training.config import TrainConfig

EXIT_USER_ERROR = 2


def _progress_printer(label: str) -> Callable[[int, int], None]:
    start = time.monotonic()

    def report(done: int, total: int) -> None:
        elapsed = time.monotonic() - start
        print(f"\r{label}: {done}/{total} ({elapsed:.0f}s)", end="", file=sys.stderr, flush=True)
        if done >= total:
            print(file=sys.stderr)

    return report


def _add_submit_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--submit", action="store_true", help="queue as a background job and return")
    _add_backend_args(p, "with --submit: ")


def _add_backend_args(p: argparse.ArgumentParser, prefix: str = "") -> None:
    p.add_argument(
        "--backend",
        default=None,
        choices=BACKENDS,
        help=f"{prefix}where the job runs (default: the saved setting, see `backend`)",
    )
    p.add_argument(
        "--ray-address",
        default=None,
        help="with --backend ray: the Ray dashboard address (default $PLENS_RAY_ADDRESS, "
        "else the saved one, else http://127.0.0.1:8265)",
    )
    p.add_argument(
        "--slurm-partition",
        default=None,
        help="with --backend slurm: the SLURM partition (default $PLENS_SLURM_PARTITION, else "
        "the saved one, else the cluster's default partition)",
    )


def _where(args: argparse.Namespace) -> dict[str, str | None]:
    """The submit call's backend keywords from `--backend` / `--ray-address` /
    `--slurm-partition` (either address flag alone implies its backend)."""
    ray, partition = args.ray_address, args.slurm_partition
    backend = args.backend or ("ray" if ray else "slurm" if partition else None)
    if (ray and backend != "ray") or (partition and backend != "slurm"):
        raise LensError(
            "--ray-address goes with --backend ray and --slurm-partition with --backend slurm."
        )
    return {"backend": backend, "address": ray or partition}


def _runs_here(args: argparse.Namespace) -> bool:
    """Whether the job runs on this machine (in the foreground, or queued locally), so that its
    model and device can be checked here before it exists. A command without --submit (sweep)
    always queues."""
    if not getattr(args, "submit", True):
        return True

    where = _where(args)
    return current_setting(runs_dir(), where["backend"], where["address"]).name == LOCAL


def _queue(
    registry: JobRegistry,
    kind: str,
    config: dict,
    device: str,
    label: str,
    args: argparse.Namespace,
) -> int:
    """`--submit`: queue the job, unless the same one is already queued or running (then that
    one: `JobRegistry.submit_once`). Its id on stdout, where it stands on stderr."""
    job, new = registry.submit_once(kind, config, device=device, label=label, **_where(args))
    return _queued(job, new)


def _queued(job: Job, new: bool) -> int:
    print(job.id)
    if not new:
        print(f"the same {job.kind} job is already {job.status}; not queued again", file=sys.stderr)
    print(f"job {job.id} is {job.status}: `python -m core jobs show {job.id}`", file=sys.stderr)
    return 0


def cmd_score(args: argparse.Namespace) -> int:
    """Score every response token of a dataset and write one JSON object per example."""
    from core.model.loading import load_model  # lazy: heavy (torch)
    from core.scoring.cache import ScoreCache  # lazy: heavy (pyarrow; keeps --help fast)
    from core.scoring.legacy import legacy_score_note  # lazy: heavy (pyarrow)
    from core.scoring.score import score_examples  # lazy: heavy (pyarrow)

    config = ScoreConfig.from_args(args)
    output_path(config.out)  # a folder, or a folder that cannot be made: say so before any work
    note = legacy_score_note() if config.cache else None
    if note:
        print(f"note: {note}", file=sys.stderr)
    dataset = load_source(**config.source_kwargs())
    print(dataset.report.summary(), file=sys.stderr)
    lm = load_model(config.model, device=config.device, dtype=config.dtype)
    for note in lm.warnings:
        print(f"warning: {note}", file=sys.stderr)
    run = score_examples(
        lm,
        dataset.examples,
        convention=config.convention,
        top_k=config.top_k,
        max_length=config.max_length,
        cache=ScoreCache() if config.cache else None,
        progress=_progress_printer("scoring"),
        source=config.source,
    )
    for note in run.warnings:
        print(f"warning: {note}", file=sys.stderr)
    # `model` (fingerprint|dtype) lets `mask` record which model's perplexities it thresholded
    rows = ({**ex.to_json_row(), "model": lm.cache_key} for ex in run.examples)
    count = write_jsonl_atomic(config.out, rows)
    print(f"{run.summary()}; wrote {count} rows to {config.out}", file=sys.stderr)
    return 0


def cmd_tasks(args: argparse.Namespace) -> int:
    """List the built-in tasks."""
    TasksConfig.from_args(args)
    for spec in list_tasks():
        mirror = (
            f"  (format {spec.mc_format}: lm-eval {spec.lm_eval_task})" if spec.mc_format else ""
        )
        print(
            f"{spec.name:14} {'/'.join(spec.splits):16} {spec.scorer:16} {spec.title} "
            f"[{spec.license}]{mirror}"
        )
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    """Prepare the embedded model cache, or describe a model."""
    from core.model.loading import (  # lazy: heavy (torch)
        load_model,
        model_summary_json,
        prepare_embedded_model,
    )

    config = ModelsConfig.from_args(args)
    if config.action == "prepare":
        start = time.monotonic()
        folder = prepare_embedded_model()
        print(
            f"embedded model ready in {folder} ({time.monotonic() - start:.1f}s)", file=sys.stderr
        )
        return 0
    lm = load_model(config.model, device=config.device, dtype=config.dtype)
    print(model_summary_json(lm))
    return 0


def cmd_mask(args: argparse.Namespace) -> int:
    """Turn a scores file into a masked training set (JSONL + datasets folder + manifest)."""
    from core.masking.export import run_mask_cli  # lazy: heavy (pandas, pyarrow)

    config = MaskCommandConfig.from_args(args)
    manifest = run_mask_cli(
        config.scores, config.out, config.mask_config(), overwrite=config.overwrite
    )
    share = manifest.get("pooled_share")
    line = f"wrote {config.out}"
    if share is not None:
        line += f" (masked {100 * share:.1f}% of response tokens)"
    print(line, file=sys.stderr)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    """Fine-tune in the foreground (registered as a job), or queue a background job (--submit)."""
    from core.training.trainer import process_rank, run_training  # lazy: heavy (torch)

    config = TrainConfig.from_args(args)
    if getattr(args, "eval_suite", None) is not None and not config.eval_every:
        raise LensError(
            "--eval-suite chooses what the evaluation rounds run; add --eval-every N "
            "(rounds at step 0, every N steps and at the end)."
        )
    if _runs_here(args):  # a mistyped model or a missing GPU: one line, before the data is built
        from core.model.preflight import check_model_setting  # lazy: heavy (torch)

        check_model_setting(config.model, config.device)
    rank, world_size = process_rank()
    if world_size > 1:  # under `accelerate launch`: rank 0 registers the job, the others only train
        if args.submit:
            raise LensError(
                "--submit queues a single-process job; under accelerate launch, train in the "
                "foreground (drop --submit)."
            )
        if not args.run_dir:
            raise LensError("Under accelerate launch, pass --run-dir: all processes share one.")
        if rank != 0:
            run_training(config, args.run_dir)
            return 0
    if args.submit:
        return _queue(
            JobRegistry(), "train", config.to_dict(), config.device, config.describe(), args
        )
    registry = JobRegistry()
    job = registry.register_foreground(
        "train",
        config.to_dict(),
        device=config.device,
        label=config.describe(),
        run_dir=args.run_dir,
    )
    print(f"job {job.id}, run folder {job.run_dir}", file=sys.stderr)
    return run_job_process(job.id, registry)


def cmd_generate(args: argparse.Namespace) -> int:
    """Make a Self-Output / Rephrase set in the foreground (as a job), or queue it (--submit)."""

    config = GenDataConfig.from_args(args)
    preflight(config)  # bad data or no verifier: one line, before a job exists
    registry = JobRegistry()
    if args.submit:
        return _queue(
            registry, "generate", config.to_dict(), config.device, config.describe(), args
        )
    job = registry.register_foreground(
        "generate",
        config.to_dict(),
        device=config.device,
        label=config.describe(),
        run_dir=args.run_dir,
    )
    print(f"job {job.id}, run folder {job.run_dir}", file=sys.stderr)
    return run_job_process(job.id, registry)


def _format_seconds(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def cmd_jobs(args: argparse.Namespace) -> int:
    """List, show, cancel or resume background jobs. A running job says what it does now (its
    state: preparing data, evaluating step k, training step k/N, final evaluation, ... with the
    time left; `run_state.json` in its run folder) on a line of its own."""

    def now_line(job: Job) -> str:
        """The job's state line, only while it runs (a job that died leaves its file behind)."""
        state = live_state(job.run_dir, job.status)
        return state.line() if state is not None else ""

    def state_dict(job: Job) -> dict | None:
        state = live_state(job.run_dir, job.status)
        return None if state is None else {**state.to_dict(), "line": state.line()}

    config = JobsConfig.from_args(args)
    registry = JobRegistry()
    if config.action == "list":
        jobs = registry.list()
        if config.as_json:
            print(json.dumps([{**j.to_dict(), "state": state_dict(j)} for j in jobs], indent=2))
            return 0
        for job in jobs:
            prog = run_progress(read_metrics(job.run_dir))
            steps = f"{prog.step}/{prog.max_steps}" if prog.max_steps else "-"
            line = now_line(job)
            message = "" if line else f"  [{job.message}]"
            print(
                f"{job.id}  {job.status:9}  {steps:>9}  {_format_seconds(job.elapsed):>8}  "
                f"{job.label}{message}  ({job.where})"
            )
            if line:
                print(f"    {line}")
        if not jobs:
            print(f"no jobs in {registry.path}", file=sys.stderr)
        return 0
    assert config.job_id is not None  # JobsConfig: every action but list names one
    if config.action == "cancel":
        job = registry.cancel(config.job_id, grace=config.grace)
    elif config.action == "resume":
        job = registry.resume(config.job_id)
    else:
        job = registry.get(config.job_id)
    prog = run_progress(read_metrics(job.run_dir))
    line = now_line(job)
    if config.as_json:
        print(
            json.dumps(
                {**job.to_dict(), "progress": prog.__dict__, "state": state_dict(job)}, indent=2
            )
        )
        return 0
    print(f"{job.id}: {job.status} ({job.message}) · {job.label}")
    print(f"run folder: {job.run_dir}")
    if job.on_cluster:
        print(f"runs on: {job.where}, as {job.engine_id or '(not handed over yet)'}")
    if prog.max_steps:
        running = job.status == "running" and prog.eta_seconds
        eta = f", ETA {_format_seconds(prog.eta_seconds)}" if running else ""
        print(f"step {prog.step}/{prog.max_steps}, last loss {prog.last_loss}{eta}")
    if line:
        print(line)
    if job.error:
        print(f"error: {job.error.splitlines()[0]}")
    if config.action == "show":
        print(f"--- last {config.lines} lines of the log ---")
        print(log_tail(job.run_dir, lines=config.lines))
    return 0


def cmd_backend(args: argparse.Namespace) -> int:
    """Show the job backend, or set it (checking that the cluster answers first)."""

    config = BackendConfig.from_args(args)
    root = runs_dir()
    if config.name is None:
        print(f"queued jobs run on {current_setting(root).describe()}")
        return 0
    setting = make_setting(config.name, config.address)
    check_setting(setting)
    path = save_setting(root, setting)
    print(f"queued jobs now run on {setting.describe()} (saved in {path})")
    return 0


def cmd_job_run(args: argparse.Namespace) -> int:
    """Internal: the body of a background job process (started by the job queue)."""

    return run_job_process(args.job_id)


def cmd_report(args: argparse.Namespace) -> int:
    """Write a self-contained HTML report of one or more runs."""
    from core.study.report import write_report  # lazy: heavy (torch)

    config = ReportConfig.from_args(args)
    output_path(config.out)
    path = write_report(**config.report_kwargs())
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB, opens offline)", file=sys.stderr)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    """Evaluate the base model, or an adapter against it (TI / BWT), on a suite: in the
    foreground (registered as a job, results in its run folder), or queued (--submit)."""

    # bad suite, limit, adapter, model, device, lm-eval task or --out: one line, before a job
    config = EvalConfig.from_args(args).resolved()
    if _runs_here(args):
        config.preflight()
    if args.out:
        output_path(args.out)
    registry = JobRegistry()
    label = config.describe()
    if args.submit:
        return _queue(registry, "eval", config.to_dict(), config.device, label, args)
    job = registry.register_foreground(
        "eval", config.to_dict(), device=config.device, label=label, run_dir=args.run_dir
    )
    print(f"job {job.id}, run folder {job.run_dir}", file=sys.stderr)
    code = run_job_process(job.id, registry)
    report = job.path / "eval.json"
    if code == 0 and args.out and report.is_file():
        out = write_bytes_atomic(args.out, report.read_bytes())
        print(f"wrote {out}", file=sys.stderr)
    return code


def cmd_sweep(args: argparse.Namespace) -> int:
    """Queue a τ sweep (one train job per τ, plus the controls, per seed); with --wait, wait
    for every run and exit non-zero when one did not succeed."""

    config = SweepConfig.from_args(args)
    if _runs_here(args):  # a mistyped model or a missing GPU: one line, before any job exists
        from core.model.preflight import check_model_setting  # lazy: heavy (torch)

        check_model_setting(config.model, config.runs()[0].device)
    registry = JobRegistry()
    jobs = submit_sweep(config, registry, **_where(args))
    print(config.describe(), file=sys.stderr)
    for job in jobs:
        print(f"{job.id}\t{job.status}\t{job.label}")
    if not args.wait:
        print("follow them with `python -m core jobs list` or on the Runs page", file=sys.stderr)
        return 0
    ended = wait_for(registry, jobs)
    for job in ended:
        print(f"{job.id}\t{job.status}\t{job.label}")
    failed = [job for job in ended if job.status != "succeeded"]
    if failed:
        print(f"error: {len(failed)} of {len(ended)} runs did not succeed", file=sys.stderr)
        return 1
    return 0


def cmd_protocol(args: argparse.Namespace) -> int:
    """The paper's protocol (every method x seeds, then the table and the report): in the
    foreground (registered as a job), or queued (--submit)."""
    from core.study.protocol import (  # lazy: heavy (pyarrow)
        ProtocolConfig,
        preflight,
        protocol_folder,
    )

    config = ProtocolConfig.from_args(args)
    preflight(config)  # unknown task or suite, bad training settings: one line, before a job
    registry = JobRegistry()
    folder = protocol_folder(config, name=args.name, run_dir=args.run_dir)
    if args.submit:
        job = registry.submit(
            "protocol",
            config.to_dict(),
            device=config.device,
            label=config.describe(),
            run_dir=folder,
            **_where(args),
        )
        return _queued(job, new=True)
    job = registry.register_foreground(
        "protocol",
        config.to_dict(),
        device=config.device,
        label=config.describe(),
        run_dir=folder,
    )
    print(f"job {job.id}, protocol folder {job.run_dir}", file=sys.stderr)
    return run_job_process(job.id, registry)


def cmd_migrate(args: argparse.Namespace) -> int:
    """Convert the project's own older file formats in place (the old files kept aside)."""
    from core.migrate import MigrateConfig, migrate  # lazy: heavy (pyarrow)

    config = MigrateConfig.from_args(args)
    report = migrate(models=config.models, dry_run=config.dry_run)
    for line in report.lines():
        print(line)
    return 0


def cmd_app(args: argparse.Namespace) -> int:
    """Serve the Streamlit app: this checkout's, or the copy installed with the wheel (`plens app`
    from any folder). The embedded model is prepared first when its package is installed, as
    `make run` does."""
    import os

    from core.model.loading import prepare_embedded_model  # lazy: heavy (torch)

    script = app_root() / "app.py"
    if not script.is_file():
        raise LensError(f"The app is missing ({script}); reinstall perplexity-lens.")
    try:
        prepare_embedded_model()
    except LensError as exc:  # the app still serves other models; it says the same on its pages
        print(f"warning: {exc}", file=sys.stderr)
    argv = [sys.executable, "-m", "streamlit", "run", str(script), "--server.port", str(args.port)]
    if args.address:
        argv += ["--server.address", args.address]
    print(
        f"Perplexity Lens at http://{args.address or '127.0.0.1'}:{args.port} (Ctrl-C stops it)",
        file=sys.stderr,
        flush=True,
    )
    if os.name != "posix":  # pragma: no cover - no exec there that keeps the console
        import subprocess

        return subprocess.call(argv)
    os.execv(sys.executable, argv)  # the server takes this process over: Ctrl-C goes to it


class OneLineParser(argparse.ArgumentParser):
    """An argument parser whose errors (unknown flag, bad value) are one line, exit code 2."""

    def error(self, message: str) -> NoReturn:
        """Print `error: <message> (see <prog> --help)` and exit 2."""
        self.exit(EXIT_USER_ERROR, f"error: {message} (see `{self.prog} --help`)\n")


def build_parser(prog: str = "python -m core") -> argparse.ArgumentParser:
    """The argument parser of `python -m core` (and of `plens`, the same under its own name)."""
    parser = OneLineParser(
        prog=prog,
        description="Perplexity Lens: token-perplexity scoring, masking, training and evaluation.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "score",
        help="score response tokens of a task or data file",
        description="Give one data source: --task, --data or --hub-dataset.",
    )
    ScoreConfig.add_arguments(p)
    p.set_defaults(func=cmd_score)

    p = sub.add_parser("tasks", help="list built-in tasks")
    TasksConfig.add_arguments(p)
    p.set_defaults(func=cmd_tasks)

    p = sub.add_parser("models", help="prepare the embedded model or describe a model")
    ModelsConfig.add_arguments(p)
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("report", help="write an offline HTML report of runs")
    ReportConfig.add_arguments(p)
    p.set_defaults(func=cmd_report)

    p = sub.add_parser(
        "mask",
        help="apply selective token masking to a scores file",
        description="Modes high, low and random threshold at --tau or at the tau that masks "
        "--target-share (--share) of the response tokens; percentile masks --k-percent of "
        "every example's.",
    )
    MaskCommandConfig.add_arguments(p)
    p.set_defaults(func=cmd_mask)

    from core.migrate import MigrateConfig  # lazy: heavy (pyarrow)
    from core.study.protocol import ProtocolConfig  # lazy: heavy (pyarrow)

    p = sub.add_parser(
        "train",
        help="fine-tune with GT, STM or a control mask (foreground; --submit queues a job)",
        description="Settings come from --preset (paper, cpu-quick), then --config, then flags. "
        "Several GPUs: accelerate launch -m core train ... --run-dir DIR",
    )
    TrainConfig.add_arguments(p)
    p.add_argument("--run-dir", default=None, help="run folder (default: a new one under runs/)")
    _add_submit_args(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "generate",
        help="make a Self-Output or Rephrase training set (foreground; --submit queues a job)",
        description="Settings come from --preset (paper, cpu-quick), then --config, then flags. "
        "A run folder that already holds part of the run resumes it.",
    )
    GenDataConfig.add_arguments(p)
    p.add_argument("--run-dir", default=None, help="run folder (default: a new one under runs/)")
    _add_submit_args(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("jobs", help="list, show, cancel or resume background jobs")
    JobsConfig.add_arguments(p)
    p.set_defaults(func=cmd_jobs)

    p = sub.add_parser("eval", help="evaluate a model or an adapter on a suite (TI / BWT)")
    EvalConfig.add_arguments(p)
    p.add_argument("--out", default=None, help="write the full results as JSON here")
    p.add_argument("--run-dir", default=None, help="run folder (default: a new one under runs/)")
    _add_submit_args(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser(
        "protocol",
        help="reproduce the paper's protocol: GT, STM, random control and Self-Output x seeds, "
        "then a table with 95%% CIs and a report",
        description="Settings come from --preset (cpu: the embedded model on 2 CPU cores in "
        "about an hour; paper: the paper's sizes for a GPU), then flags. Re-running with the "
        "same --run-dir reuses finished runs and resumes the rest.",
    )
    ProtocolConfig.add_arguments(p)
    p.add_argument(
        "--name",
        default=None,
        help="protocol folder under the runs folder (default: protocol-<preset>); the same name "
        "again reuses its finished runs",
    )
    p.add_argument("--run-dir", default=None, help="protocol folder path (instead of --name)")
    _add_submit_args(p)
    p.set_defaults(func=cmd_protocol)

    p = sub.add_parser(
        "sweep",
        help="queue a τ sweep: one training run per τ, plus ground truth and the random control",
        description="Every run is a train job of the queue (or the cluster of --backend), like a "
        "run from the Train page; the Compare page reads them as a sweep.",
    )
    SweepConfig.add_arguments(p)
    p.add_argument("--wait", action="store_true", help="wait until every run has ended")
    _add_backend_args(p)
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser(
        "backend",
        help="show or set where queued jobs run: the local queue, a Ray cluster or SLURM",
        description="Kept in <runs folder>/backend.json (the app's Home page sets the same); "
        "$PLENS_JOB_BACKEND and $PLENS_RAY_ADDRESS / $PLENS_SLURM_PARTITION override it.",
    )
    BackendConfig.add_arguments(p)
    p.set_defaults(func=cmd_backend)

    p = sub.add_parser(
        "migrate",
        help="convert the project's own older files (score cache, job registry, run folders)",
        description="Converts in place what an older version wrote, once; each old file is kept "
        "as <name>.migrated. A second run finds nothing to do.",
    )
    MigrateConfig.add_arguments(p)
    p.set_defaults(func=cmd_migrate)

    p = sub.add_parser("app", help="serve the app in the browser (from any folder)")
    p.add_argument("--port", type=int, default=8501, help="port to serve on (default 8501)")
    p.add_argument(
        "--address",
        default=None,
        help="address to bind (default 127.0.0.1, this machine only; 0.0.0.0 shares it)",
    )
    p.set_defaults(func=cmd_app)

    p = sub.add_parser("job-run", help="(internal) run a queued job in this process")
    p.add_argument("job_id")
    p.set_defaults(func=cmd_job_run)
    return parser


def plens() -> int:
    """The `plens` console script (pyproject.toml): `python -m core` under its installed name."""
    return main(prog="plens")


def main(argv: list[str] | None = None, prog: str = "python -m core") -> int:
    """Entry point; returns the exit code."""
    parser = build_parser(prog)
    try:
        args = parser.parse_args(argv)
    except LensError as exc:  # a flag's value that its parser rejects with a reason
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    if getattr(args, "submit", True) is False and (
        getattr(args, "backend", None)
        or getattr(args, "ray_address", None)
        or getattr(args, "slurm_partition", None)
    ):
        print(
            "error: --backend, --ray-address and --slurm-partition choose where a queued job "
            "runs; add --submit",
            file=sys.stderr,
        )
        return EXIT_USER_ERROR
    try:
        return int(args.func(args) or 0)
    except LensError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `... | head`: the reader left; not an error of ours
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no error at exit
        return 0
    except Exception as exc:  # noqa: BLE001 - last line of defence: one line, not a traceback
        if args.debug:
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        print(
            f"error: unexpected {type(exc).__name__}: {first} (rerun with --debug)", file=sys.stderr
        )
        return 1
