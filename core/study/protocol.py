"""The paper's protocol in one command: every method, several seeds, one table, one report.

`python -m core protocol` (or a "protocol" job from the app) runs, on one model and one target
task (MBPP, the fixed train / held-out split of `core.data.tasks`):

1. Self-Output data: one generation run (`core.datagen.run`, seed 0) over the training prompts,
   checked by the task's verifier; the kept answers become a training set. With no correct
   sample at all, the Self-Output arm is reported as skipped, with the reason.
2. Training arms, each once per seed, as `python -m core train` subprocesses (separate
   processes: memory is returned between runs, and a killed arm leaves the others intact):
   ground truth (``gt``), STM at τ (``stm``, default τ = 2.5), STM at the τ that masks a target
   share of response tokens (``stm_share``, default 25%), the random-mask control with as many
   masked tokens as STM at τ (``random``), and Self-Output (``self_output``).
   Each arm evaluates the protocol's suite at step 0 (the base model: the same cached result for
   every arm with the embedded model) and at its last step, through `core.training.callbacks`.
3. Aggregation: per arm, the mean over seeds and a 95% confidence interval (Student t, n - 1
   degrees of freedom) of the target change, each out-of-domain score, BWT and the change of the
   out-of-domain reference NLL (all tokens, and the base-easy tokens as a diagnostic); then the
   paired comparisons, over seeds and then the same evaluation items (hierarchical bootstrap):
   each arm's end against its own step 0 (the forgetting it causes) and against ground truth
   (whether it forgets less), with a plain-words headline. Written to `results.json` and
   `results.md` in the protocol folder; then `report.html` over all the runs.

Everything is resumable: a run folder that already holds a finished run is reused, a partial
one resumes from its last checkpoint, the generation resumes from its candidates file. Run
folders are `<runs_dir()>/<protocol id>-<arm>-s<seed>`, so the Runs and Compare pages show them
beside every other run; the protocol folder itself holds `config.json` (kind "protocol"),
`results.*`, `report.html` and `log.txt` of its subprocesses' output.

Two presets: ``cpu`` (the embedded model on 2 CPU cores in about 80 minutes: ground truth, STM,
the random control and Self-Output, 3 seeds each, one epoch in the setting where the CPU sweep
saw ground truth forget, forgetting read from drift; docs/BENCHMARKS.md, "Paper protocol") and
``paper`` (the paper's settings for a GPU: every arm, all 400 training problems, lr 2e-5, 3
epochs, N = 32 samples of up to 512 tokens, the full ``paper`` suite). Every setting is also a
flag.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from core.config import JobConfig
from core.config import help_meta as _help
from core.errors import LensError
from core.eval.drift import DRIFT_LABELS
from core.eval.suites import DRIFT
from core.io import app_root
from core.jobs.metrics import EvalSummaryRecord, latest
from core.jobs.runfiles import StatusFn
from core.jobs.state import Phase, RunState, StateReporter
from core.masking import DEFAULT_TAU
from core.stats import mean_ci
from core.study.agreement import agreement_sentence, drift_agreement

PROTOCOL_KIND = "protocol"
ARMS = ("gt", "stm", "stm_share", "random", "self_output")
#: The arms the cpu preset runs (stm_share on request: 3 more runs).
CPU_ARMS = ("gt", "stm", "random", "self_output")
RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"
REPORT_HTML = "report.html"
#: results over the runs finished so far, rewritten as each run finishes (means and intervals
#: over the seeds done; no paired comparisons), until results.json replaces it
PARTIAL_JSON = "results-partial.json"
PROGRESS_TXT = "progress.txt"
GENERATION_DIR = "self-output-generation"
# Evaluate at step 0 and at the end only (EvalCallback evaluates every N steps, N beyond any run).
EVAL_AT_START_AND_END = 1_000_000

# The forgetting signals a small model still shows: mean relative change (%) of the
# out-of-domain reference NLL on the tokens the base model found easy, and on all tokens.
FORGETTING = "ood_nll_easy_Δ%"
OOD_NLL = "ood_nll_Δ%"
#: The OOD probe's mean token KL(base || tuned) at the end of a run (core/eval/drift.py).
OOD_DRIFT = "ood:ood_drift:kl"


PRESETS: dict[str, dict[str, Any]] = {
    # The embedded model on 2 CPU cores in about an hour (docs/BENCHMARKS.md, "Paper protocol"):
    # the setting of the CPU sweep (bench/bench_cpu_forgetting.py, docs/cpu_forgetting.json) in
    # which ground truth moved ARC-Easy most (LoRA r 16, lr 1e-3, 64 MBPP problems), one epoch
    # so that 3 seeds of 4 arms fit; forgetting is read from drift from the base model.
    "cpu": {},
    # The paper's setting (METHOD.md) for a GPU: LoRA on all linear layers, lr 2e-5, 3 epochs,
    # cosine, the whole training split, N = 32 samples of up to 512 tokens at T 0.7 / top-p 0.95.
    "paper": {
        "methods": list(ARMS),
        "train_preset": "paper",
        "limit": None,
        "max_length": 1024,
        "epochs": 3.0,
        "learning_rate": 2e-5,
        "suite": "paper",
        "seeds": [0, 1, 2],
        "gen_samples": 32,
        "gen_max_new_tokens": 512,
        "gen_prompt_batch": 8,
    },
}


def _parse_ints(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise LensError(f"Seeds must be integers, comma-separated (got {text!r}).") from None


@dataclass
class ProtocolConfig(JobConfig):
    """Everything one protocol run needs; defaults are the ``cpu`` preset."""

    COMMAND: ClassVar[str] = "protocol"
    PRESETS: ClassVar[dict[str, dict[str, Any]]] = PRESETS
    DEFAULT_PRESET: ClassVar[str] = "cpu"
    LABEL: ClassVar[str] = "protocol"
    PRESET_NOUN: ClassVar[str] = "protocol preset"
    IGNORED_KEYS: ClassVar[tuple[str, ...]] = ("kind",)

    preset: str = field(default="cpu", metadata=_help("cpu (embedded model, 2 cores) or paper"))
    model: str = field(default="default", metadata=_help("model to fine-tune and evaluate"))
    device: str = field(default="auto", metadata=_help("auto, cpu, cuda, cuda:N or mps"))
    precision: str = field(default="auto", metadata=_help("training precision: auto, fp32, bf16"))
    task: str = field(default="mbpp", metadata=_help("target task (its train split is trained)"))
    methods: list[str] = field(
        default_factory=lambda: list(CPU_ARMS),
        metadata=_help("arms, comma-separated: gt, stm, stm_share, random, self_output"),
    )
    seeds: list[int] = field(
        default_factory=lambda: [0, 1, 2],
        metadata=_help(
            "training seeds, comma-separated (each one runs every arm again)", parse=_parse_ints
        ),
    )
    tau: float = field(
        default=DEFAULT_TAU, metadata=_help("STM threshold of the stm and random arms")
    )
    target_share: float = field(
        default=0.25, metadata=_help("share of response tokens the stm_share arm masks")
    )
    # training (the train preset's values, then these)
    train_preset: str = field(default="cpu-quick", metadata=_help("core.training.trainer preset"))
    limit: int | None = field(default=64, metadata=_help("training examples (none = all)"))
    max_length: int = field(default=256, metadata=_help("tokens per training example"))
    epochs: float = field(default=1.0, metadata=_help("passes over the training data"))
    learning_rate: float = field(default=1e-3, metadata=_help("peak learning rate"))
    batch_size: int = field(default=8, metadata=_help("examples per step"))
    lora_r: int = field(default=16, metadata=_help("LoRA rank"))
    finetune: str = field(default="lora", metadata=_help("lora, dora or full"))
    # evaluation
    suite: str = field(default="protocol", metadata=_help("evaluation suite (core.eval.runner)"))
    eval_limit: int | None = field(
        default=None, metadata=_help("at most N examples per evaluation task")
    )
    # Self-Output generation
    gen_samples: int = field(default=4, metadata=_help("Self-Output samples per prompt"))
    gen_max_new_tokens: int = field(default=160, metadata=_help("longest Self-Output sample"))
    gen_prompt_batch: int = field(default=8, metadata=_help("prompts sampled together"))
    gen_temperature: float = field(default=0.7, metadata=_help("sampling temperature"))
    gen_top_p: float = field(default=0.95, metadata=_help("nucleus top-p"))
    threads: int | None = field(
        default=None, metadata=_help("torch CPU threads for generation (none = default)")
    )

    def __post_init__(self) -> None:
        if isinstance(self.methods, str):
            self.methods = [m.strip() for m in self.methods.split(",") if m.strip()]
        if isinstance(self.seeds, str | int):
            self.seeds = _parse_ints(str(self.seeds))
        self.seeds = [int(s) for s in self.seeds]
        self.validate()

    def command(
        self, *, submit: bool = False, extra: Sequence[str] = (), name: str | None = None
    ) -> str:
        """The `python -m core protocol ...` command of this config (and a non-default
        protocol folder `name`)."""
        if name and name != f"protocol-{self.preset}":
            extra = [*extra, "--name", name]
        return super().command(submit=submit, extra=extra)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form, with "kind": "protocol" (so run listings can tell it apart)."""
        return {"kind": PROTOCOL_KIND, **asdict(self)}

    def validate(self) -> None:
        """Raise `LensError` with one line on a bad setting."""
        unknown = [m for m in self.methods if m not in ARMS]
        checks = [
            (not unknown, f"Unknown arm(s) {', '.join(unknown)} (use {', '.join(ARMS)})."),
            (bool(self.methods), "Name at least one arm."),
            (len(set(self.methods)) == len(self.methods), "An arm is named twice."),
            (bool(self.seeds), "Name at least one seed."),
            (len(set(self.seeds)) == len(self.seeds), "A seed is named twice."),
            (self.tau > 0, "tau must be positive."),
            (0 < self.target_share < 1, "target_share must be between 0 and 1."),
            (self.limit is None or self.limit >= 1, "limit must be at least 1."),
            (self.epochs > 0, "epochs must be positive."),
            (self.batch_size >= 1, "batch_size must be at least 1."),
            (self.gen_samples >= 1, "gen_samples must be at least 1."),
            (self.eval_limit is None or self.eval_limit >= 1, "eval_limit must be at least 1."),
        ]
        for ok, message in checks:
            if not ok:
                raise LensError(message)

    def describe(self) -> str:
        """One line for logs and the jobs list."""
        model = "embedded SmolLM2-135M" if self.model == "default" else self.model
        return (
            f"protocol {self.preset}: {self.task}, {', '.join(self.methods)} x "
            f"{len(self.seeds)} seed(s), suite {self.suite}, {model}"
        )


# --------------------------------------------------------------------------- plan


@dataclass(frozen=True)
class Arm:
    """One method of the protocol: its key (run folder part), label and training settings."""

    key: str
    label: str
    overrides: dict[str, Any]


def arm_specs(config: ProtocolConfig) -> dict[str, Arm]:
    """The training overrides of every arm (Self-Output's data folder is added later)."""
    tau = f"{config.tau:g}"
    share = f"{100 * config.target_share:g}%"
    return {
        "gt": Arm("gt", "ground truth", {"method": "gt"}),
        "stm": Arm("stm", f"STM τ={tau}", {"method": "stm", "tau": config.tau}),
        "stm_share": Arm(
            "stm_share",
            f"STM {share} masked",
            {"method": "stm", "tau": None, "target_share": config.target_share},
        ),
        "random": Arm(
            "random", f"random mask (as many as τ={tau})", {"method": "random", "tau": config.tau}
        ),
        "self_output": Arm("self_output", "Self-Output", {"method": "gt"}),
    }


def train_config(
    config: ProtocolConfig, arm: Arm, seed: int, data: str | None = None
) -> dict[str, Any]:
    """The `core.training.config.TrainConfig` (as a dict) of one arm and seed."""
    from core.training.config import TrainConfig

    values: dict[str, Any] = {
        "model": config.model,
        "device": config.device,
        "precision": config.precision,
        "limit": config.limit,
        "max_length": config.max_length,
        "epochs": config.epochs,
        "learning_rate": config.learning_rate,
        "batch_size": config.batch_size,
        "lora_r": config.lora_r,
        "lora_alpha": 2 * config.lora_r,
        "finetune": config.finetune,
        "seed": seed,
        "mask_seed": seed,
        "eval_every": EVAL_AT_START_AND_END,
        "eval_suite": {"suite": config.suite, "limit": config.eval_limit}
        if config.eval_limit
        else config.suite,
        **arm.overrides,
    }
    if data is not None:
        values.update(task=None, split=None, data=data, limit=None)
    else:
        values.update(task=config.task, split=_train_split(config.task))
    return TrainConfig.from_preset(config.train_preset, **values).to_dict()


def _train_split(task: str) -> str:
    """The split an arm trains on: "train" where the task has one (MBPP's fixed split)."""
    from core.data.tasks import get_task

    spec = get_task(task)
    return "train" if "train" in spec.splits else spec.default_split


def preflight(config: ProtocolConfig) -> None:
    """Check every setting the protocol will use (task, suite, each arm's training config, the
    generation config), so bad input fails with one line before any job exists."""
    from core.eval.suites import suite_from_config

    arms = arm_specs(config)
    for key in config.methods:
        cfg = train_config(config, arms[key], config.seeds[0])
        suite_from_config(cfg["eval_suite"], config.task)
    if "self_output" in config.methods:
        from core.datagen.config import GenDataConfig
        from core.datagen.run import preflight as generation_preflight

        generation_preflight(GenDataConfig.from_dict(generation_config(config)))


def generation_config(config: ProtocolConfig) -> dict[str, Any]:
    """The `core.datagen.config.GenDataConfig` (as a dict) of the Self-Output data."""
    from core.datagen.config import GenDataConfig

    return GenDataConfig.from_preset(
        "cpu-quick" if config.preset == "cpu" else "paper",
        kind="self_output",
        model=config.model,
        device=config.device,
        task=config.task,
        split=_train_split(config.task),
        limit=config.limit,
        n_samples=config.gen_samples,
        max_new_tokens=config.gen_max_new_tokens,
        prompt_batch=config.gen_prompt_batch,
        temperature=config.gen_temperature,
        top_p=config.gen_top_p,
        seed=0,
        threads=config.threads,
    ).to_dict()


def protocol_folder(
    config: ProtocolConfig, *, name: str | None = None, run_dir: str | Path | None = None
) -> Path:
    """Where a protocol lives: `run_dir`, else `<runs_dir()>/<name>` (default
    ``protocol-<preset>``), so running the same command again resumes it. A folder that holds
    a protocol with other settings is refused (one line) before anything runs."""
    from core.io import read_json
    from core.jobs.runfiles import CONFIG_JSON, runs_dir

    if run_dir and name:
        raise LensError("Give --name or --run-dir, not both.")
    if name is not None and (not name.strip() or "/" in name or name.startswith(".")):
        raise LensError(f"--name must be a plain folder name, got {name!r}.")
    folder = (
        Path(run_dir).expanduser().absolute()
        if run_dir
        else runs_dir() / (name or f"protocol-{config.preset}")
    )
    saved = read_json(folder / CONFIG_JSON)
    if isinstance(saved, dict):
        if saved.get("kind") != PROTOCOL_KIND:
            raise LensError(f"{folder} holds another kind of run; pick another --name.")
        if ProtocolConfig.from_dict(saved).to_dict() != config.to_dict():
            raise LensError(
                f"{folder} holds a protocol with other settings; pick another --name "
                "(or the same settings to resume it)."
            )
    return folder


def run_id(protocol_dir: Path, arm: str, seed: int) -> str:
    """Run folder name of one arm and seed."""
    return f"{protocol_dir.name}-{arm}-s{seed}"


# --------------------------------------------------------------------------- running


def _say(folder: Path, message: str, status: StatusFn | None = None) -> None:
    """A progress line: printed, appended to the folder's progress file (what the app shows,
    in the foreground too) and set as the job's status message."""
    line = f"[{time.strftime('%H:%M:%S')}] {message}"
    print(line, flush=True)
    with open(folder / PROGRESS_TXT, "a", encoding="utf-8") as fh:
        fh.write(line + "\n")
    if status and not isinstance(status, StateReporter):  # a reporter gets typed states instead
        status(message)


def protocol_eta(
    durations: Sequence[float], planned: int, finished: int, current_elapsed: float | None
) -> float | None:
    """Seconds left in a protocol: the runs not finished at the mean measured duration of the
    finished ones, less what the running one has already spent (None before any finished)."""
    if not durations:
        return None
    mean = sum(durations) / len(durations)
    left = max(0, planned - finished)
    if current_elapsed is None or left == 0:
        return mean * left
    return mean * (left - 1) + max(0.0, mean - current_elapsed)


def _run_seconds(run_dir: Path) -> float | None:
    """How long a finished run took (its summary's wall time)."""
    from core.io import read_json
    from core.jobs.runfiles import SUMMARY_JSON

    summary = read_json(run_dir / SUMMARY_JSON)
    wall = summary.get("wall_time_s") if isinstance(summary, dict) else None
    return float(wall) if wall is not None else None


def _report(
    reporter: StateReporter | None,
    finished: int,
    planned: int,
    detail: str,
    durations: Sequence[float],
    started: float,
) -> None:
    """The protocol's state: k of N runs finished, what runs now, the time left."""
    if reporter is not None:
        eta = protocol_eta(durations, planned, finished, 0.0 if finished < planned else None)
        reporter.report(RunState(Phase.PROTOCOL, done=finished, total=planned, unit="runs",
                                 detail=detail, elapsed_s=time.monotonic() - started,
                                 eta_s=eta))  # fmt: skip


def write_partial_results(
    config: ProtocolConfig, folder: Path, runs: Sequence[dict[str, Any]], planned: int
) -> dict[str, Any] | None:
    """Results over the runs finished so far (means and 95% intervals over the seeds done, no
    paired comparisons), written to `PARTIAL_JSON` with how many of how many runs they cover;
    None (and nothing written) before any run finished."""
    from core.io import write_json_atomic

    done = [r for r in runs if r.get("status") == "succeeded"]
    if not done:
        return None
    ended = [r for r in runs if "status" in r]  # on a cluster some are still running
    partial = aggregate(config, ended, [], 0.0, paired=False)
    partial["partial"] = {"finished": len(done), "planned": planned,
                          "runs": [r["run"] for r in done]}  # fmt: skip
    write_json_atomic(folder / PARTIAL_JSON, partial)
    return partial


def _run_cli(args: list[str], log_path: Path) -> int:
    """`python -m core ARGS` in a child process, its output appended to `log_path`. The child is
    stopped when this process is (cancel, Ctrl-C)."""
    from core.jobs.registry import PROJECT_ROOT, core_process_env

    env = core_process_env()
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "core", *args],
            cwd=PROJECT_ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            return proc.wait()
        finally:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


def _last_error(log_path: Path) -> str:
    """The child's one-line reason (its last `error:` line), else its last line."""
    from core.jobs.runfiles import log_tail

    lines = [line.strip() for line in log_tail(log_path.parent, 200).splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    return (errors or lines or ["no output"])[-1]


def _finished(run_dir: Path) -> bool:
    from core.io import read_json
    from core.jobs.runfiles import SUMMARY_JSON

    return isinstance(read_json(run_dir / SUMMARY_JSON), dict)


def _generated_set(gen_dir: Path) -> str | None:
    """The set folder a finished generation run wrote (its "done" record)."""
    from core.jobs.metrics import DoneRecord, of_kind
    from core.jobs.runfiles import read_records

    done = [r for r in of_kind(read_records(gen_dir), DoneRecord) if r.fields.get("set")]
    return str(done[-1].fields["set"]) if done else None


def _existing_set(gen_dir: Path) -> str | None:
    """The set a finished generation run wrote, if it is still there (a protocol reuses it)."""
    found = _generated_set(gen_dir)
    return found if found and Path(found).is_dir() else None


def _generation_span(folder: Path) -> list[tuple[float, float]]:
    """(first, last) record time of the Self-Output generation run, if any."""
    from core.jobs.runfiles import read_metrics

    times = [float(r["time"]) for r in read_metrics(folder / GENERATION_DIR) if "time" in r]
    return [(min(times), max(times))] if times else []


def _self_output_data(
    config: ProtocolConfig, folder: Path, status: StatusFn | None
) -> tuple[str | None, str]:
    """Generate (or reuse) the Self-Output set; returns (set folder or None, note)."""
    from core.io import write_json_atomic

    gen_dir = folder / GENERATION_DIR
    found = _existing_set(gen_dir)
    if found:
        return found, f"Self-Output set reused: {found}"
    gen_dir.mkdir(parents=True, exist_ok=True)
    cfg_path = gen_dir / "protocol-generate.json"
    write_json_atomic(cfg_path, generation_config(config))
    _say(folder, "Self-Output: generating training data", status)
    started = time.monotonic()
    code = _run_cli(
        ["generate", "--config", str(cfg_path), "--run-dir", str(gen_dir)], gen_dir / "log.txt"
    )
    found = _generated_set(gen_dir)
    if code != 0 or not found:
        reason = _last_error(gen_dir / "log.txt")
        return None, f"Self-Output skipped: generation ended with {code} ({reason})"
    return found, f"Self-Output set generated in {time.monotonic() - started:.0f} s: {found}"


@dataclass
class ClusterTarget:
    """Where a protocol on a cluster submits its arms: the registry and a backend setting."""

    registry: Any  # core.jobs.registry.JobRegistry
    backend: str
    address: str | None


def _cluster_jobs(
    config: ProtocolConfig,
    folder: Path,
    arms: dict[str, Arm],
    target: ClusterTarget,
    status: StatusFn | None,
) -> tuple[list[dict[str, Any]], list[str]]:
    """Every arm and seed as a cluster job at once (the engine runs as many side by side as it
    has resources for), the Self-Output generation beside them and its arm once its data
    exists; returns (runs, notes) like the local loop. A cancelled or failed protocol job
    cancels the child jobs it left running."""
    from core.jobs.registry import FINAL_STATUSES, SUCCEEDED
    from core.jobs.runfiles import runs_dir

    registry = target.registry
    where = {"backend": target.backend, "address": target.address}
    notes: list[str] = []
    submitted: dict[str, dict[str, Any]] = {}  # child job id -> its runs entry
    runs: list[dict[str, Any]] = []
    total = len(config.seeds) * len(config.methods)

    def submit_arm(arm: Arm, seed: int, data: str | None) -> None:
        rid = run_id(folder, arm.key, seed)
        run_dir = runs_dir() / rid
        entry = {"arm": arm.key, "label": arm.label, "seed": seed, "run": rid}
        runs.append(entry)
        if _finished(run_dir):
            entry.update(status="succeeded", reused=True)
            _say(folder, f"{arm.label}, seed {seed}: already finished", status)
            return
        cfg = train_config(config, arm, seed, data)
        job = registry.submit("train", cfg, device=config.device, run_dir=run_dir,
                              label=f"{folder.name}: {arm.label}, seed {seed}", **where)  # fmt: skip
        entry.update(job=job.id, submitted=time.time())
        submitted[job.id] = entry
        _say(
            folder,
            f"{arm.label}, seed {seed}: job {job.id} on the cluster, training ({rid})",
            status,
        )

    gen_job = None
    so_data: str | None = None
    if "self_output" in config.methods:
        gen_dir = folder / GENERATION_DIR
        so_data = _existing_set(gen_dir)
        if so_data:
            notes.append(f"Self-Output set reused: {so_data}")
        else:
            gen_dir.mkdir(parents=True, exist_ok=True)
            gen_job = registry.submit("generate", generation_config(config), device=config.device,
                                      run_dir=gen_dir, label=f"{folder.name}: Self-Output data",
                                      **where)  # fmt: skip
            _say(folder, f"Self-Output: generating training data as job {gen_job.id}", status)
    try:
        for seed in config.seeds:
            for key in config.methods:
                if key != "self_output":
                    submit_arm(arms[key], seed, None)
        if gen_job is not None:
            done = registry.wait(gen_job.id, poll=2.0)
            found = _generated_set(folder / GENERATION_DIR)
            if done.status == SUCCEEDED and found:
                so_data = found
                notes.append(f"Self-Output set generated on the cluster: {found}")
            else:
                reason = (done.error or done.status).splitlines()[0]
                notes.append(
                    f"Self-Output skipped: generation job {done.id} {done.status} ({reason})"
                )
            _say(folder, notes[-1], status)
        if so_data:
            for seed in config.seeds:
                submit_arm(arms["self_output"], seed, so_data)
        waiting = dict(submitted)
        while waiting:
            registry.refresh()  # one look at the engine per pass, not one per job
            for job_id in list(waiting):
                job = registry.get(job_id, refresh=False)
                if job.status not in FINAL_STATUSES:
                    continue
                entry = waiting.pop(job_id)
                entry["seconds"] = (job.finished or time.time()) - entry.pop("submitted")
                if job.status == SUCCEEDED and _finished(runs_dir() / entry["run"]):
                    entry["status"] = "succeeded"
                    _say(folder, f"{entry['label']}, seed {entry['seed']}: done", status)
                    try:  # the table so far, as each run finishes
                        write_partial_results(config, folder, runs, total)
                    except Exception as exc:  # noqa: BLE001 - never stops the protocol
                        print(f"partial results not written: {exc}", flush=True)
                else:
                    entry.update(status="failed", error=(job.error or job.status).splitlines()[0])
                    _say(folder, f"{entry['label']}, seed {entry['seed']}: {job.status} "
                                 f"({entry['error']})", status)  # fmt: skip
            if waiting:
                if isinstance(status, StateReporter):
                    status.report(RunState(Phase.PROTOCOL, done=total - len(waiting),
                                           total=total, unit="runs",
                                           detail=f"{len(waiting)} on the cluster"))  # fmt: skip
                elif status:
                    status(f"{total - len(waiting)} of {total} runs finished on the cluster")
                time.sleep(2.0)
    except BaseException:  # cancelled or failed: leave no orphan on the cluster
        for job_id in [*submitted, *([gen_job.id] if gen_job else [])]:
            try:
                if registry.get(job_id, refresh=False).active:
                    registry.cancel(job_id, wait=False)
            except LensError:
                pass
        raise
    return runs, notes


def run_protocol(
    config: ProtocolConfig,
    folder: str | Path,
    *,
    status: StatusFn | None = None,
    cluster: ClusterTarget | None = None,
) -> dict[str, Any]:
    """Run (or resume) the protocol in `folder`; returns the results also written there.

    Locally every arm and seed trains in turn in a child process; with `cluster`, all of them
    are submitted as jobs at once and run side by side on the cluster.

    Raises `LensError` when no arm produced a run; an arm that failed for some seeds is
    reported with the failures and the seeds that did finish.
    """
    from core.io import read_json, write_json_atomic
    from core.jobs.runfiles import CONFIG_JSON, runs_dir

    folder = protocol_folder(config, run_dir=folder)
    folder.mkdir(parents=True, exist_ok=True)
    if read_json(folder / CONFIG_JSON) is None:
        write_json_atomic(folder / CONFIG_JSON, config.to_dict())
    started = time.monotonic()
    _say(folder, config.describe(), status)
    reporter = status if isinstance(status, StateReporter) else None
    arms = arm_specs(config)
    if cluster is not None:
        runs, notes = _cluster_jobs(config, folder, arms, cluster, status)
        return _conclude(config, folder, runs, notes, started, status)
    notes: list[str] = []
    data: dict[str, str | None] = {}
    planned = len(config.seeds) * len(config.methods)
    if "self_output" in config.methods:
        _report(reporter, 0, planned, "the Self-Output data generation", [], started)
        data["self_output"], note = _self_output_data(config, folder, status)
        notes.append(note)
        _say(folder, note, status)
    plan = [
        (arms[key], seed)
        for seed in config.seeds
        for key in config.methods
        if key != "self_output" or data.get("self_output")
    ]
    runs: list[dict[str, Any]] = []
    durations: list[float] = []  # measured seconds of each finished run: the ETA's pace
    for i, (arm, seed) in enumerate(plan, start=1):
        rid = run_id(folder, arm.key, seed)
        run_dir = runs_dir() / rid
        entry = {"arm": arm.key, "label": arm.label, "seed": seed, "run": rid}
        if _finished(run_dir):
            _say(folder, f"[{i}/{len(plan)}] {arm.label}, seed {seed}: already finished", status)
            runs.append({**entry, "status": "succeeded", "reused": True})
            took = _run_seconds(run_dir)
            durations.extend([took] if took else [])
            continue
        _report(reporter, i - 1, len(plan), f"{arm.label}, seed {seed}", durations, started)
        if i > 1:
            try:  # the table so far, as each run finishes (clearly partial on the page)
                write_partial_results(config, folder, runs, len(plan))
            except Exception as exc:  # noqa: BLE001 - partial results never stop the protocol
                print(f"partial results not written: {exc}", flush=True)
        cfg = train_config(config, arm, seed, data.get(arm.key))
        run_dir.mkdir(parents=True, exist_ok=True)
        cfg_path = run_dir / "protocol-train.json"
        write_json_atomic(cfg_path, cfg)
        _say(folder, f"[{i}/{len(plan)}] {arm.label}, seed {seed}: training ({rid})", status)
        t0 = time.monotonic()
        code = _run_cli(
            ["train", "--config", str(cfg_path), "--run-dir", str(run_dir)], run_dir / "log.txt"
        )
        took = time.monotonic() - t0
        if code == 0 and _finished(run_dir):
            runs.append({**entry, "status": "succeeded", "seconds": took})
            durations.append(took)
            _say(folder, f"[{i}/{len(plan)}] done in {took:.0f} s", status)
        else:
            reason = _last_error(run_dir / "log.txt")
            runs.append({**entry, "status": "failed", "seconds": took, "error": reason})
            _say(folder, f"[{i}/{len(plan)}] failed ({code}): {reason}", status)
    return _conclude(config, folder, runs, notes, started, status)


def _conclude(
    config: ProtocolConfig,
    folder: Path,
    runs: list[dict[str, Any]],
    notes: list[str],
    started: float,
    status: StatusFn | None,
) -> dict[str, Any]:
    """Aggregate the finished runs, write results.json / results.md and the report."""
    from core.io import write_json_atomic
    from core.jobs.runfiles import runs_dir

    finished = [r["run"] for r in runs if r["status"] == "succeeded"]
    if not finished:
        raise LensError(f"No protocol run finished; see the logs under {runs_dir()}.")
    _say(folder, f"aggregating {len(finished)} run(s)", status)
    if isinstance(status, StateReporter):
        status.report(RunState(Phase.PROTOCOL, done=len(finished), total=len(runs), unit="runs",
                               detail="the aggregation and the report"))  # fmt: skip
    results = aggregate(
        config, runs, notes, time.monotonic() - started, spans=_generation_span(folder)
    )
    write_json_atomic(folder / RESULTS_JSON, results)
    markdown = results_markdown(results)
    (folder / RESULTS_MD).write_text(markdown, encoding="utf-8")
    _say(folder, "writing the report", status)
    write_protocol_report(results, finished, folder / REPORT_HTML)
    results["report"] = str(folder / REPORT_HTML)
    write_json_atomic(folder / RESULTS_JSON, results)
    print(markdown, flush=True)
    _say(folder, f"protocol finished in {time.monotonic() - started:.0f} s: {folder}", status)
    return results


def run_measures(run: Any) -> dict[str, float | None]:
    """What the protocol compares for one run (a `core.study.runs.RunView`): relative changes (%)
    from its step-0 (base) evaluation to its last one, plus BWT, TI and training facts."""
    from core.eval.compare import relative_change

    frame = run.eval_frame()
    out: dict[str, float | None] = {}
    if not frame.empty:
        base, tuned = run.scores_at("base"), run.scores_at("last")
        roles = run.roles()
        for (task, metric), value in tuned.items():
            role = roles.get(task, "ood")
            if metric in ("kl", "top1_agree") and task.endswith("_drift"):
                out[f"{role}:{task}:{metric}"] = value  # 0 / 1 at the base: no relative change
                continue
            keep = metric in ("acc", "pass@1", "exact_match") or (
                metric in ("nll", "nll_easy") and task.endswith("_ppl")
            )
            if not keep:
                continue
            out[f"{role}:{task}:{metric}"] = value
            out[f"{role}:{task}:{metric}:Δ%"] = relative_change(value, base.get((task, metric)))
    last_summary = latest(run.records, EvalSummaryRecord) or EvalSummaryRecord()
    out["BWT"] = last_summary.bwt
    out["TI"] = last_summary.ti
    out[FORGETTING] = last_summary.nll_easy_change
    ood_nll = [v for k, v in out.items() if k.startswith("ood:") and k.endswith(":nll:Δ%")]
    ood_nll = [v for v in ood_nll if v is not None]
    out[OOD_NLL] = sum(ood_nll) / len(ood_nll) if ood_nll else None
    out["masked %"] = None if run.masked_share is None else 100 * run.masked_share
    data = run.data_record
    out["train examples"] = data.get("n_examples")
    out["final loss"] = run.summary.get("train_loss_last")
    out["train s"] = run.train_seconds
    return out


def aggregate(
    config: ProtocolConfig,
    runs: Sequence[dict[str, Any]],
    notes: Sequence[str],
    seconds: float,
    spans: Sequence[tuple[float, float]] = (),
    *,
    paired: bool = True,
) -> dict[str, Any]:
    """Per-arm means and 95% CIs over seeds, and the per-run measures behind them (`paired`:
    also the paired comparisons over seeds and items, the slow part).

    `seconds` is this call's wall time; `span_s` in the result is the time from the first
    start to the last end of the runs (and `spans`, e.g. the generation), whichever call of a
    resumed protocol made them."""
    from core.study.runs import load_run

    per_run = []
    spans = list(spans)
    for entry in runs:
        if entry["status"] != "succeeded":
            per_run.append({**entry, "measures": {}})
            continue
        view = load_run(entry["run"])
        per_run.append({**entry, "measures": run_measures(view)})
        end, wall = view.summary.get("finished"), view.summary.get("wall_time_s")
        if end is not None and wall is not None:
            spans.append((float(end) - float(wall), float(end)))
    arms: dict[str, Any] = {}
    for key in config.methods:
        rows = [r for r in per_run if r["arm"] == key and r["measures"]]
        failed = [r for r in per_run if r["arm"] == key and r["status"] != "succeeded"]
        if not rows and not failed:
            continue
        names = sorted({m for r in rows for m in r["measures"]})
        arms[key] = {
            "label": next(r["label"] for r in [*rows, *failed]),
            "seeds": [r["seed"] for r in rows],
            "failed": [{"seed": r["seed"], "error": r.get("error", "")} for r in failed],
            "measures": {m: mean_ci([r["measures"].get(m) for r in rows]) for m in names},
        }
    results = {
        "config": config.to_dict(),
        "arms": arms,
        "runs": per_run,
        "notes": list(notes),
        "wall_time_s": seconds,
        "span_s": max(e for _, e in spans) - min(b for b, _ in spans) if spans else None,
        "finished": time.time(),
    }
    results["findings"] = findings(results)
    if not paired:
        return results
    results["paired"] = paired_with_gt(config, per_run)
    results["paired_findings"] = paired_findings(results["paired"])
    results["paired_base"] = paired_with_base(config, per_run)
    results["paired_base_findings"] = paired_findings(results["paired_base"])
    results["paired_random"] = paired_with_random(config, per_run)
    results["paired_random_findings"] = paired_findings(results["paired_random"])
    results["agreement"] = drift_agreement(per_run)
    return results


#: Task metrics compared item by item: accuracies (higher is better), the full-token reference
#: NLL (lower is better; not the easy-token NLL, which STM lowers by construction), and drift from
#: the base model (core/eval/drift.py): token KL (lower is less drift), top-1 agreement with the
#: base (higher is less drift) and the change in NLL of the base's own answers (lower: the model
#: kept or sharpened the base's behaviour).
PAIRED_METRICS = {
    "acc": True,
    "pass@1": True,
    "exact_match": True,
    "nll": False,
    "kl": False,
    "top1_agree": True,
    "dnll": False,
}
#: The drift metrics each drift task is compared on, in the order findings list them.
DRIFT_PAIRED = ("kl", "top1_agree", "dnll")


def _round(run_dir: Path, which: str = "last") -> Any | None:
    """The first (step 0: the base model) or last evaluation round's full result of a run
    (None for runs without per-item results: made before they were kept, or never evaluated)."""
    from core.eval.scorers import SuiteResult
    from core.io import read_json
    from core.jobs.runfiles import eval_round_path, eval_round_steps

    steps = eval_round_steps(run_dir)
    if not steps or (which == "first" and len(steps) < 2):
        return None
    data = read_json(eval_round_path(run_dir, steps[0] if which == "first" else steps[-1]))
    return SuiteResult.from_dict(data) if isinstance(data, dict) else None


def _rounds(per_run: Sequence[dict[str, Any]], which: str) -> dict[tuple[str, int], Any]:
    """(arm, seed) -> that run's first or last evaluation round, for the runs that finished."""
    from core.study.runs import resolve_run_dir

    out: dict[tuple[str, int], Any] = {}
    for entry in per_run:
        if entry["status"] == "succeeded":
            result = _round(resolve_run_dir(entry["run"]), which)
            if result is not None:
                out[(entry["arm"], int(entry["seed"]))] = result
    return out


def _paired_rows(
    arm: str,
    label: str,
    against: str,
    reference: dict[int, Any],
    results: dict[int, Any],
) -> list[dict[str, Any]]:
    """Task by task, `results` (seed -> SuiteResult) against `reference` on the same items: a
    hierarchical bootstrap over the seeds both have, then items paired by id."""
    from core.eval.compare import paired_items
    from core.stats import hierarchical_interval

    seeds = sorted(s for s in results if s in reference)
    if not seeds:
        return []
    rows = []
    for task in reference[seeds[0]].tasks:
        if task.scorer == DRIFT:
            metrics: tuple[str, ...] = DRIFT_PAIRED
        else:
            metrics = ("nll" if task.scorer == "ref_ppl" else task.primary,)
        for metric in metrics:
            if metric not in PAIRED_METRICS:
                continue
            pairs = [
                paired_items(reference[s].task(task.name), results[s].task(task.name), metric)
                for s in seeds
            ]
            if any(p is None or not p[0] for p in pairs):
                continue
            higher = PAIRED_METRICS[metric]
            interval = hierarchical_interval(
                [p[0] for p in pairs], [p[1] for p in pairs], scale=100.0 if higher else 1.0
            )
            rows.append(
                {
                    "arm": arm,
                    "label": label,
                    "against": against,
                    "task": task.name,
                    "role": task.role,
                    "metric": metric,
                    "drift": task.scorer == DRIFT,
                    "seeds": len(seeds),
                    "higher_is_better": higher,
                    "interval": interval.to_dict(),
                }
            )
    return rows


def _labels(per_run: Sequence[dict[str, Any]]) -> dict[str, str]:
    return {entry["arm"]: entry["label"] for entry in per_run}


def paired_with_gt(
    config: ProtocolConfig, per_run: Sequence[dict[str, Any]]
) -> list[dict[str, Any]]:
    """Each arm against ground truth at the end of training, task by task, on the same items:
    a hierarchical bootstrap over seeds (arm seed s paired with ground-truth seed s) and then
    items (paired by id). Accuracies in points, the reference NLL in nats."""
    finals, labels = _rounds(per_run, "last"), _labels(per_run)
    gt = {s: r for (a, s), r in finals.items() if a == "gt"}
    out: list[dict[str, Any]] = []
    for arm in config.methods:
        if arm != "gt":
            mine = {s: r for (a, s), r in finals.items() if a == arm}
            out += _paired_rows(arm, labels.get(arm, arm), "ground truth", gt, mine)
    return out


def paired_with_random(
    config: ProtocolConfig, per_run: Sequence[dict[str, Any]]
) -> list[dict[str, Any]]:
    """The STM arms against the random control (as many tokens masked, at random) at the end of
    training, seed by seed then item by item: whether *which* tokens STM masks matters, beyond
    how many. Empty when the protocol has no random arm."""
    finals, labels = _rounds(per_run, "last"), _labels(per_run)
    control = {s: r for (a, s), r in finals.items() if a == "random"}
    out: list[dict[str, Any]] = []
    if not control:
        return out
    for arm in config.methods:
        if arm in ("stm", "stm_share"):
            mine = {s: r for (a, s), r in finals.items() if a == arm}
            out += _paired_rows(arm, labels.get(arm, arm), "the random control", control, mine)
    return out


def paired_with_base(
    config: ProtocolConfig, per_run: Sequence[dict[str, Any]]
) -> list[dict[str, Any]]:
    """Each arm at the end of training against the base model (its own step-0 round), task by
    task on the same items, over seeds then items: the forgetting (OOD) and the gain (target)
    each arm causes."""
    firsts, finals, labels = _rounds(per_run, "first"), _rounds(per_run, "last"), _labels(per_run)
    out: list[dict[str, Any]] = []
    for arm in config.methods:
        base = {s: r for (a, s), r in firsts.items() if a == arm}
        mine = {s: r for (a, s), r in finals.items() if a == arm}
        out += _paired_rows(arm, labels.get(arm, arm), "the base model", base, mine)
    return out


def paired_findings(paired: Sequence[dict[str, Any]]) -> list[str]:
    """One sentence per arm and task: the change against ground truth (or the base model) with
    its interval over seeds and items, "better" / "worse" only when the interval excludes
    zero."""
    from core.stats import Interval

    lines = []
    for row in paired:
        unit = " points" if row["higher_is_better"] else " nats"
        interval = Interval(**row["interval"])
        digits = (3 if row["metric"] == "kl" else 2) if unit == " nats" else 1
        text = interval.describe(unit, digits=digits, higher_is_better=row["higher_is_better"])
        lines.append(
            f"{row['label']} vs {row.get('against', 'ground truth')}, {row['task']} "
            f"{metric_name(row['metric'], row.get('drift', False))} ({row['role']}, "
            f"{row['seeds']} seed(s) × {interval.n} items): {text}."
        )
    return lines


def metric_name(metric: str, drift: bool = False) -> str:
    """A paired row's metric as a reader names it (drift metrics by their label)."""
    return DRIFT_LABELS.get(metric, metric) if drift else metric


def _verdict(row: dict[str, Any]) -> str:
    from core.stats import Interval

    return Interval(**row["interval"]).verdict(row["higher_is_better"])


def _drift_sentence(rows: Sequence[dict[str, Any]]) -> str:
    """ "token KL +0.176 [+0.163, +0.189] nats, top-1 agreement -15.7 [...] points, ..." for
    the drift rows of one arm and task."""
    from core.stats import Interval

    parts = []
    for row in rows:
        unit = " points" if row["higher_is_better"] else " nats"
        digits = (3 if row["metric"] == "kl" else 2) if unit == " nats" else 1
        interval = Interval(**row["interval"])
        if interval.estimate is None:
            continue
        text = f"{interval.estimate:+.{digits}f}"
        if interval.low is not None and interval.high is not None:
            text += f" [{interval.low:+.{digits}f}, {interval.high:+.{digits}f}]"
        short = {"kl": "token KL", "top1_agree": "top-1 agreement", "dnll": "Δ NLL of its answers"}
        parts.append(f"{short.get(row['metric'], row['metric'])} {text}{unit}")
    return ", ".join(parts)


def _drift_headline(results: dict[str, Any]) -> list[str]:
    """The verdict on drift from the base model (the OOD probe; the sharper forgetting signal at
    CPU scale): how far ground truth drifted, and which arms drifted less or more than it."""
    base_rows = [
        r for r in results.get("paired_base") or [] if r.get("drift") and r["role"] == "ood"
    ]
    gt_rows = [
        r
        for r in [*(results.get("paired") or []), *(results.get("paired_random") or [])]
        if r.get("drift") and r["role"] == "ood"
    ]
    out = []
    for task in dict.fromkeys(r["task"] for r in base_rows if r["arm"] == "gt"):
        mine = [r for r in base_rows if r["arm"] == "gt" and r["task"] == task]
        seeds = mine[0]["seeds"]
        out.append(
            f"Drift ({task}, {seeds} seed(s)): ground-truth fine-tuning moved the model away from "
            f"the base model's own answers by {_drift_sentence(mine)} (95% intervals over seeds "
            "and probe items)."
        )
    groups = dict.fromkeys((r["arm"], r["against"], r["task"]) for r in gt_rows)
    for arm, against, task in groups:
        rows = [r for r in gt_rows if (r["arm"], r["against"], r["task"]) == (arm, against, task)]
        kl = next((r for r in rows if r["metric"] == "kl"), None)
        if kl is not None:
            verdict = _verdict(kl)
            word = {
                "better": f"drifted less than {against}",
                "worse": f"drifted more than {against}",
            }.get(verdict, f"showed no detectable difference in drift from {against}")
            sharpened = next((r for r in rows if r["metric"] == "dnll"), None)
            tail = ""
            if sharpened is not None and _verdict(sharpened) == "better":
                tail = (
                    f" It kept the base model's own answers more likely than {against} did, "
                    "so part of its remaining KL is sharpening toward them, not moving away."
                )
            out.append(
                f"{rows[0]['label']} {word} on {task} (vs {against}: "
                f"{_drift_sentence(rows)}).{tail}"
            )
    return out


def short_headline(results: dict[str, Any]) -> list[str]:
    """The headline for a summary (the Start page): drift on the out-of-domain probe only, the
    benchmarks, the target, caveats and the agreement; the other probes' sentences stay on the
    Reproduce page and in the report."""
    other = ("text_drift", "target_drift")
    return [line for line in headline(results) if not any(p in line for p in other)]


def _small_arm_notes(results: dict[str, Any]) -> list[str]:
    """A caveat for each arm that trained on under a quarter of ground truth's examples (e.g.
    Self-Output when few problems have a verified answer): little training, little forgetting."""
    arms = results.get("arms") or {}

    def examples(key: str) -> float | None:
        stat = (arms.get(key) or {}).get("measures", {}).get("train examples") or {}
        return stat.get("mean")

    gt = examples("gt")
    out = []
    for key, arm in arms.items():
        mine = examples(key)
        if key != "gt" and gt and mine is not None and mine < gt / 4:
            out.append(
                f"{arm['label']} trained on {mine:.0f} examples against ground truth's "
                f"{gt:.0f}: its small drift and kept accuracy say little about the method."
            )
    return out


def _target_headline(results: dict[str, Any]) -> list[str]:
    """The gain side, per target task: each arm's change against the base model ("learned the
    target" or "lost ground on it" only where the interval excludes zero), so that less
    forgetting bought by learning less reads as such."""
    rows = [
        r for r in results.get("paired_base") or [] if r["role"] == "target" and not r.get("drift")
    ]
    out = []
    for task in dict.fromkeys(r["task"] for r in rows):
        parts = []
        for row in (r for r in rows if r["task"] == task):
            words = {"better": "better", "worse": "worse"}.get(
                _verdict(row), "no detectable change"
            )
            parts.append(f"{row['label']} {_drift_sentence([row]).split(' ', 1)[-1]} ({words})")
        metric = metric_name(rows[0]["metric"])
        out.append(f"Target ({task} {metric}, against the base model): " + "; ".join(parts) + ".")
    return out


def headline(results: dict[str, Any]) -> list[str]:
    """What a stakeholder reads first, from the paired intervals (over seeds and items): how far
    each arm drifted from the base model (the verdict), then the benchmark view: did ground truth
    forget out of domain, and did each other arm forget less than it."""
    drift = _drift_headline(results)
    base_rows = [
        r for r in results.get("paired_base") or [] if r["role"] == "ood" and not r.get("drift")
    ]
    if not base_rows and not drift:
        return ["No per-item results yet: nothing can be said with an interval."]
    out = list(drift)
    gt = [r for r in base_rows if r["arm"] == "gt"]
    if gt:
        worse = [f"{r['task']} {r['metric']}" for r in gt if _verdict(r) == "worse"]
        better = [f"{r['task']} {r['metric']}" for r in gt if _verdict(r) == "better"]
        if worse:
            out.append(
                "Benchmarks: ground-truth fine-tuning made the model detectably worse out of "
                "domain on " + ", ".join(worse) + " (95% interval over items and seeds excludes "
                "zero): there is forgetting to prevent."
            )
        else:
            out.append(
                "Benchmarks: ground-truth fine-tuning caused no detectable out-of-domain loss on "
                f"the benchmark tasks here (no interval excludes a loss; {len(gt)} tasks), so "
                "on benchmarks no arm can be shown to forget less in this setting."
            )
        if better:
            out.append("It improved " + ", ".join(better) + ".")
    paired = [r for r in results.get("paired") or [] if not r.get("drift")]
    for arm in dict.fromkeys(r["arm"] for r in paired):
        rows = [r for r in paired if r["arm"] == arm and r["role"] == "ood"]
        if not rows:
            continue
        label = rows[0]["label"]
        less = [f"{r['task']} {r['metric']}" for r in rows if _verdict(r) == "better"]
        more = [f"{r['task']} {r['metric']}" for r in rows if _verdict(r) == "worse"]
        parts = []
        if less:
            parts.append("forgot less than ground truth on " + ", ".join(less))
        if more:
            parts.append("forgot more than ground truth on " + ", ".join(more))
        same = len(rows) - len(less) - len(more)
        if same:
            parts.append(f"no detectable difference from ground truth on {same} benchmark task(s)")
        out.append(f"{label}: " + "; ".join(parts) + ".")
    out += _target_headline(results)
    out += _small_arm_notes(results)
    agreement = results.get("agreement")
    if agreement and len(agreement.get("runs", [])) >= 4:
        out.append(agreement_sentence(agreement))
    return out


#: The CPU sweep of ground truth's settings (bench/bench_cpu_forgetting.py --write): what the
#: cpu preset can show on the embedded model, with machine and date (in the wheel too: `app_root`).
CPU_SWEEP_JSON = app_root() / "docs" / "cpu_forgetting.json"


def sweep_verdict(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Which swept settings make ground truth forget detectably out of domain (an OOD paired
    interval against the base model below zero, in the metric's bad direction), and a sentence
    saying so. `rows` as in `bench/bench_cpu_forgetting.py`: "setting" and "paired" (task metric
    -> interval dict with "role" and "higher_is_better")."""
    from core.stats import Interval

    forgetting: dict[str, list[str]] = {}
    fields = set(Interval.__dataclass_fields__)
    for row in rows:
        for name, stat in (row.get("paired") or {}).items():
            if stat.get("role") != "ood":
                continue
            interval = Interval(**{k: v for k, v in stat.items() if k in fields})
            if interval.verdict(bool(stat.get("higher_is_better", True))) == "worse":
                forgetting.setdefault(str(row["setting"]), []).append(name)
    if not rows:
        text = "No setting of the sweep has finished yet."
    elif forgetting:
        text = (
            "Ground truth forgets detectably out of domain in: "
            + "; ".join(f"{key} ({', '.join(names)})" for key, names in forgetting.items())
            + f". That is {len(forgetting)} of {len(rows)} settings tried, each on one seed "
            "with an interval over items only: with several settings and tasks, one can exclude "
            "zero by chance, so more seeds of that setting are the confirmation."
        )
    else:
        text = (
            f"No setting of the sweep ({len(rows)} tried) made ground truth forget detectably "
            "out of domain: every OOD interval against the base model includes zero or shows a "
            "gain, so on this model and budget the protocol cannot show STM preventing "
            "forgetting; it can only bound it."
        )
    return {"forgetting": forgetting, "text": text}


def sweep_table(rows: Sequence[dict[str, Any]]) -> list[dict[str, str]]:
    """The sweep as table rows of text: the factors, then each task's paired change against
    the base model as "estimate [low, high]" (accuracies in points, NLL in nats; a starred
    cell's interval excludes zero)."""
    out = []
    for row in rows:
        cells: dict[str, str] = {}
        for key, value in row.items():
            if key == "paired":
                continue
            cells[key] = (
                "-" if value is None else f"{value:.3g}" if isinstance(value, float) else str(value)
            )
        for name, stat in (row.get("paired") or {}).items():
            est, low, high = stat.get("estimate"), stat.get("low"), stat.get("high")
            if est is None or low is None or high is None:
                cells[name] = "-"
                continue
            star = "*" if low > 0 or high < 0 else ""
            cells[name] = f"{est:+.2f} [{low:+.2f}, {high:+.2f}]{star}"
        out.append(cells)
    return out


def load_cpu_sweep(path: Path | None = None) -> dict[str, Any] | None:
    """The recorded CPU sweep (None when the file is missing or unreadable)."""
    from core.io import read_json

    data = read_json(path or CPU_SWEEP_JSON)
    return data if isinstance(data, dict) and isinstance(data.get("rows"), list) else None


#: The cpu preset's protocol as run on the project's machine (bench/record_protocol.py): its
#: results.json plus machine, date and time, which the Start and Reproduce pages show as the
#: recorded measurement beside any protocol run on the user's machine.
CPU_PROTOCOL_JSON = app_root() / "docs" / "cpu_protocol.json"


def load_cpu_protocol(path: Path | None = None) -> dict[str, Any] | None:
    """The recorded cpu-preset protocol (None when the file is missing or unreadable)."""
    from core.io import read_json

    data = read_json(path or CPU_PROTOCOL_JSON)
    ok = isinstance(data, dict) and isinstance(data.get("arms"), dict) and "machine" in data
    return data if ok else None


def _interval(stat: dict[str, Any]) -> tuple[float, float] | None:
    if stat.get("mean") is None:
        return None
    half = stat.get("ci95") or 0.0
    return stat["mean"] - half, stat["mean"] + half


def compare_to_gt(arm: dict[str, Any], gt: dict[str, Any], measure: str) -> str | None:
    """'lower' / 'higher' when the arm's 95% CI lies wholly below / above ground truth's,
    'overlap' when they overlap, None when either is missing or has a single seed."""
    a, g = arm["measures"].get(measure, {}), gt["measures"].get(measure, {})
    if not a or not g or a.get("ci95") is None or g.get("ci95") is None:
        return None
    ia, ig = _interval(a), _interval(g)
    if ia is None or ig is None:
        return None
    if ia[1] < ig[0]:
        return "lower"
    if ia[0] > ig[1]:
        return "higher"
    return "overlap"


def findings(results: dict[str, Any]) -> list[str]:
    """One sentence per arm on what the paper predicts (less out-of-domain forgetting than
    ground truth), read off the 95% CIs; the paper's claim is not assumed."""
    arms = results["arms"]
    gt = arms.get("gt")
    out: list[str] = []
    if gt is None:
        return ["No ground-truth arm: nothing to compare against."]
    if all(len(arm["seeds"]) < 2 for arm in arms.values()):
        return [
            "One seed per arm: no spread over seeds to compare here; the paired comparisons "
            "over the evaluation items carry the verdicts."
        ]
    target = next((m for m in gt["measures"] if m.startswith("target:") and "nll:Δ%" in m), None)
    for key, arm in arms.items():
        if key == "gt":
            continue
        for measure, what, better in (
            (FORGETTING, "out-of-domain NLL on base-easy tokens (forgetting)", "lower"),
            (OOD_NLL, "out-of-domain NLL on all tokens", "lower"),
            ("BWT", "BWT", "higher"),
            (target, "target reference NLL", "lower"),
        ):
            if measure is None:
                continue
            verdict = compare_to_gt(arm, gt, measure)
            a = arm["measures"].get(measure, {}).get("mean")
            g = gt["measures"].get(measure, {}).get("mean")
            if verdict is None or a is None or g is None:
                continue
            if verdict == "overlap":
                word = "indistinguishable from ground truth (95% CIs overlap)"
            else:
                word = (
                    f"{'better' if verdict == better else 'worse'} than ground truth "
                    "(95% CIs apart)"
                )
            out.append(f"{arm['label']}: {what} {a:+.2f} vs {g:+.2f}: {word}.")
    return out


def _fmt_stat(stat: dict[str, Any] | None, digits: int = 2) -> str:
    if not stat or stat.get("mean") is None:
        return "-"
    text = f"{stat['mean']:+.{digits}f}" if digits else f"{stat['mean']:.0f}"
    if stat.get("ci95") is not None:
        text += f" ± {stat['ci95']:.{digits}f}"
    return text


def measure_label(measure: str) -> str:
    """Column title of a measure: "mbpp_ppl nll Δ% (target)", "OOD easy-token NLL Δ%", ..."""
    if measure == FORGETTING:
        return "OOD easy-token NLL Δ%"
    if measure == OOD_NLL:
        return "OOD NLL Δ%"
    if measure == OOD_DRIFT:
        return "OOD drift (token KL)"
    parts = measure.split(":")
    if len(parts) >= 3 and parts[0] in ("target", "ood"):
        text = " ".join(parts[1:]).replace(" Δ%", " Δ%")
        return f"{text} (target)" if parts[0] == "target" else text
    return measure


def summary_table(results: dict[str, Any], detail: bool = False) -> list[dict[str, str]]:
    """Rows of the protocol table: one per arm, mean ± 95% CI half-width over seeds.

    The summary has the masked share, each target change, the two out-of-domain NLL signals,
    BWT, TI and the final training loss; `detail` has the change of every task and metric."""
    measures: list[str] = []
    for arm in results["arms"].values():
        for m in arm["measures"]:
            if m not in measures:
                measures.append(m)

    def order(m: str) -> tuple[int, str]:
        head = ("masked %", "target:", FORGETTING, OOD_NLL, "BWT", "TI", "ood:")
        return next((i for i, h in enumerate(head) if m.startswith(h)), len(head)), m

    if detail:
        shown = [m for m in sorted(measures, key=order) if ":" in m and m.endswith("Δ%")]
    else:
        changes = [m for m in sorted(measures, key=order) if m.startswith("target:")]
        changes = [m for m in changes if m.endswith("Δ%")]
        shown = ["masked %", *changes, OOD_DRIFT, FORGETTING, OOD_NLL, "BWT", "TI", "final loss"]
        # a suite without drift (or without OOD reference NLLs) has no such column
        measured = {
            m
            for arm in results["arms"].values()
            for m, stat in arm["measures"].items()
            if (stat or {}).get("mean") is not None
        }
        optional = (OOD_DRIFT, FORGETTING, OOD_NLL)
        shown = [m for m in shown if m not in optional or m in measured]
    rows = []
    for arm in results["arms"].values():
        row = {"arm": arm["label"], "seeds": str(len(arm["seeds"]))}
        for m in shown:
            stat = arm["measures"].get(m)
            text = _fmt_stat(stat, 3 if m in ("final loss", OOD_DRIFT) else 2)
            plain = m in ("masked %", "final loss", OOD_DRIFT)
            row[measure_label(m)] = text.lstrip("+") if plain else text
        if arm["failed"]:
            row["seeds"] += f" ({len(arm['failed'])} failed)"
        rows.append(row)
    return rows


def _markdown_table(rows: list[dict[str, str]]) -> list[str]:
    if not rows:
        return []
    head = list(rows[0])
    for row in rows[1:]:
        head += [k for k in row if k not in head]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    return lines + ["| " + " | ".join(row.get(k, "-") for k in head) + " |" for row in rows]


def results_markdown(results: dict[str, Any]) -> str:
    """The protocol's table, findings and notes as Markdown."""
    rows = summary_table(results)
    cfg = results["config"]
    lines = [
        f"# Protocol results ({cfg['preset']} preset, {cfg['task']} target, "
        f"{len(cfg['seeds'])} seed(s))",
        "",
        "Mean ± 95% CI half-width over seeds (Student t). Δ% is the relative change from the "
        "step-0 (base model) evaluation to the end of training. OOD easy-token NLL Δ%: mean "
        "change of the out-of-domain reference NLL on the tokens the base model found easy; "
        "OOD NLL Δ%: the same on all tokens (> 0: the model got worse there, i.e. forgot). The "
        "± here is the spread over training seeds only (none with one seed): the evaluation "
        "items are fixed, so ± 0.00 means every seed gave the same score, not that the score "
        "is exact. The paired sections below add the items' sampling error.",
        "",
    ]
    lines += _markdown_table(rows)
    lines += ["", "Change (%) of every task and metric:", ""]
    lines += _markdown_table(summary_table(results, detail=True))
    lines += ["", "## Findings", ""]
    lines += [f"- {f}" for f in results["findings"]] or ["- (none)"]
    lines += ["", "## In short", ""] + [f"- {h}" for h in headline(results)]
    lines += ["", "## Each arm against the base model, paired over seeds and items", ""]
    lines += [
        "The end of training against the same run's step-0 round (the base model) on the same "
        "items: out-of-domain tasks show the forgetting, the target the gain.",
        "",
    ]
    lines += [f"- {f}" for f in results.get("paired_base_findings") or []] or [
        "- (no per-item results: runs made before they were kept)"
    ]
    paired = results.get("paired_findings") or []
    lines += ["", "## Each arm against ground truth, paired over seeds and items", ""]
    lines += [
        "Hierarchical bootstrap (seeds, then the same evaluation items on both sides), 95%. "
        '"Better" / "worse" only where the interval excludes zero; otherwise the change '
        "this design could detect is given.",
        "",
    ]
    lines += [f"- {f}" for f in paired] or [
        "- (no per-item results: runs made before they were kept)"
    ]
    if results.get("paired_random_findings"):
        lines += ["", "## STM against the random control (as many tokens masked at random)", ""]
        lines += [f"- {f}" for f in results["paired_random_findings"]]
    if results.get("agreement"):
        lines += ["", "## Drift against ARC-Easy, run by run", ""]
        lines += [f"- {agreement_sentence(results['agreement'])}"]
    if results["notes"]:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in results["notes"]]
    failed = [r for r in results["runs"] if r["status"] != "succeeded"]
    if failed:
        lines += ["", "## Failed runs", ""]
        lines += [f"- {r['run']}: {r.get('error', '')}" for r in failed]
    span = results.get("span_s")
    lines += [""]
    if span is not None:
        lines.append(f"Time from the first run's start to the last run's end: {span / 60:.1f} min.")
    lines.append(f"Wall time of the call that wrote this: {results['wall_time_s'] / 60:.1f} min.")
    return "\n".join(lines) + "\n"


def write_protocol_report(results: dict[str, Any], run_ids: Sequence[str], out: Path) -> Path:
    """The report of all the protocol's runs, opened by its summary table and findings."""
    import pandas as pd

    from core.study.report import write_report

    intro = " ".join(headline(results))
    intro += " Protocol summary: mean ± 95% CI over seeds. " + " ".join(results["findings"])
    if results.get("paired_base_findings"):
        intro += " Against the base model: " + " ".join(results["paired_base_findings"])
    if results.get("paired_findings"):
        intro += " Paired over seeds and items: " + " ".join(results["paired_findings"])
    return write_report(
        run_ids,
        out,
        title="Perplexity Lens: paper protocol",
        notes=intro,
        tables=[
            ("Protocol summary", pd.DataFrame(summary_table(results))),
            ("Change (%) of every task and metric", pd.DataFrame(summary_table(results, True))),
        ],
    )


# --------------------------------------------------------------------------- CLI and job


def run_job(job: Any, registry: Any) -> None:
    """Entry point of a "protocol" job process (see `core.jobs.registry.run_job_process`)."""
    config = ProtocolConfig.from_dict(job.config)

    # the protocol's state (k of N runs finished, the arm and seed running, the time left):
    # run_state.json in the protocol folder, the status line and the log
    status = StateReporter(job.path, lambda message: registry.set_message(job.id, message))
    cluster = None
    if getattr(job, "on_cluster", False):  # its arms go to the same cluster, all at once
        cluster = ClusterTarget(registry, job.backend, job.engine_address)
    run_protocol(config, job.path, status=status, cluster=cluster)


# --------------------------------------------------------------------------- reading (app)


@dataclass
class ProtocolView:
    """One protocol folder as the app shows it: settings, progress, results."""

    folder: Path
    config: ProtocolConfig
    results: dict[str, Any] | None

    @property
    def name(self) -> str:
        """The folder name (what `--name` takes)."""
        return self.folder.name

    def planned_runs(self) -> list[str]:
        """Run ids of every arm and seed (Self-Output's only once its data exists or while it
        may still be generated)."""
        return [run_id(self.folder, key, seed) for seed in self.config.seeds
                for key in self.config.methods]  # fmt: skip

    def finished_runs(self) -> list[str]:
        """Planned runs whose training finished."""
        from core.jobs.runfiles import runs_dir

        return [r for r in self.planned_runs() if _finished(runs_dir() / r)]

    def durations(self) -> list[float]:
        """Measured seconds of each finished run (their summaries' wall time)."""
        from core.jobs.runfiles import runs_dir

        found = [_run_seconds(runs_dir() / r) for r in self.finished_runs()]
        return [d for d in found if d]

    def partial_results(self) -> dict[str, Any] | None:
        """The results over the runs finished so far (`PARTIAL_JSON`), while no final results
        exist; None otherwise."""
        from core.io import read_json

        if self.results is not None:
            return None
        found = read_json(self.folder / PARTIAL_JSON)
        return found if isinstance(found, dict) and found.get("arms") else None

    def eta(self, state: RunState | None, now: float | None = None) -> float | None:
        """Seconds left: the unfinished runs at the finished runs' mean duration, less what the
        running one has spent since the job's `state` said it started (None before any run
        finished)."""
        now = time.time() if now is None else now
        running = state is not None and state.phase == Phase.PROTOCOL and bool(state.detail)
        return protocol_eta(self.durations(), len(self.planned_runs()),
                            len(self.finished_runs()),
                            now - state.time if running and state else None)  # fmt: skip

    def progress_lines(self, n: int = 20) -> list[str]:
        """The last `n` progress lines (one per step the protocol took)."""
        try:
            lines = (self.folder / PROGRESS_TXT).read_text(encoding="utf-8").splitlines()
        except OSError:
            return []
        return lines[-n:]

    def current_log(self) -> tuple[str, Path] | None:
        """(name, folder) of the step running now, by the latest progress line: the
        Self-Output generation or a training run (whose log.txt the children write)."""
        from core.jobs.runfiles import runs_dir

        for line in reversed(self.progress_lines(200)):
            if "generating training data" in line:
                return "Self-Output generation", self.folder / GENERATION_DIR
            match = line.rsplit("training (", 1)
            if len(match) == 2 and match[1].endswith(")"):
                rid = match[1][:-1]
                return rid, runs_dir() / rid
        return None


def load_protocol(folder: str | Path) -> ProtocolView:
    """Read a protocol folder (LensError when it is not one)."""
    from core.io import read_json
    from core.jobs.runfiles import CONFIG_JSON

    path = Path(folder)
    saved = read_json(path / CONFIG_JSON)
    if not isinstance(saved, dict) or saved.get("kind") != PROTOCOL_KIND:
        raise LensError(f"{path} is not a protocol folder.")
    results = read_json(path / RESULTS_JSON)
    return ProtocolView(path, ProtocolConfig.from_dict(saved), results if results else None)


def list_protocols() -> list[ProtocolView]:
    """Every protocol folder under the runs root, newest first (unreadable ones skipped)."""
    from core.jobs.runfiles import runs_dir

    found = []
    for path in sorted(runs_dir().iterdir(), key=lambda p: p.stat().st_mtime, reverse=True):
        if path.is_dir():
            try:
                found.append(load_protocol(path))
            except LensError:
                continue
    return found
