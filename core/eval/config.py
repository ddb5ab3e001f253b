"""`EvalConfig`: the settings of an evaluation job (`python -m core eval`), and which adapter of
which run it evaluates."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from core.config import JobConfig
from core.config import help_meta as _help
from core.errors import LensError
from core.eval.suites import build_suite, tasks_suite
from core.io import read_json
from core.jobs.runfiles import CONFIG_JSON, SUMMARY_JSON, checkpoint_step, checkpoints, runs_dir

if TYPE_CHECKING:
    from core.eval.suites import EvalSuite

#: Values an adapter's run folder brings to the eval config (labels and colours in Runs/Compare).
RUN_KEYS = ("method", "tau", "target_share", "seed", "task")


@dataclass
class EvalConfig(JobConfig):
    """One evaluation: a model (and optionally an adapter) on a suite. The fields after
    `lm_eval_tasks` are derived from the adapter's run folder by `resolved()`."""

    COMMAND: ClassVar[str] = "eval"
    ALWAYS: ClassVar[tuple[str, ...]] = ("model", "suite")
    LABEL: ClassVar[str] = "evaluation"
    IGNORED_KEYS: ClassVar[tuple[str, ...]] = ("kind",)

    model: str = field(
        default="default",
        metadata=_help("'default' (embedded SmolLM2-135M), a Hugging Face id, a folder or .gguf"),
    )
    adapter: str | None = field(
        default=None, metadata=_help("run id, run folder or adapter folder to evaluate")
    )
    suite: str = field(default="default", metadata=_help("default, during, protocol, paper, tiny"))
    limit: int | None = field(default=None, metadata=_help("at most N examples per task"))
    device: str = field(default="auto", metadata=_help("auto, cpu, cuda, cuda:N or mps"))
    dtype: str = field(default="auto", metadata=_help("auto, float32, bfloat16 or float16"))
    lm_eval_tasks: list[str] = field(
        default_factory=list,
        metadata=_help(
            "also run this lm-evaluation-harness task as an OOD task (repeatable; needs lm-eval "
            "installed, and the name is checked before the run; a task whose data cannot be "
            "fetched is reported as skipped)",
            flag="lm_eval_task",
            repeat=True,
        ),
    )
    probes: list[str] = field(
        default_factory=list,
        metadata=_help(
            "also measure drift from the base model on your own prompts: a .txt file with one "
            "prompt a line, or .jsonl / .csv with a 'prompt' column (repeatable)",
            flag="probe",
            repeat=True,
            metavar="FILE",
        ),
    )
    tasks: list[str] = field(
        default_factory=list,
        metadata=_help(
            "instead of a suite: built-in tasks by name, comma-separated, each as task or "
            "task:split (e.g. arc_easy:validation,mmlu), on --limit items each (all without it)"
        ),
    )
    mc_format: str | None = field(
        default=None,
        metadata=_help(
            "with --tasks: the multiple-choice format (plain = lm-evaluation-harness's, chat or "
            "letter; default: each task's own)",
            choices=("plain", "chat", "letter"),
        ),
    )
    use_cache: bool = field(
        default=True, metadata=_help("read and write the base-score cache", flag="cache")
    )
    # derived from the adapter (no flags)
    step: int | None = field(default=None, metadata={"cli": False})
    evaluates: str | None = field(default=None, metadata={"cli": False})
    method: str | None = field(default=None, metadata={"cli": False})
    tau: float | None = field(default=None, metadata={"cli": False})
    target_share: float | None = field(default=None, metadata={"cli": False})
    seed: int | None = field(default=None, metadata={"cli": False})
    task: str | None = field(default=None, metadata={"cli": False})

    def __post_init__(self) -> None:
        self.lm_eval_tasks = _names(self.lm_eval_tasks)
        self.tasks = _names(self.tasks)
        self.probes = [str(Path(p).expanduser().absolute()) for p in _names(self.probes)]
        self.validate()

    def validate(self) -> None:
        """Raise `LensError` (one line) on a bad setting: empty model, unknown suite, bad limit
        or lm-eval task name."""
        if not str(self.model).strip():
            raise LensError(
                "Name a model: 'default', a Hugging Face id, a local folder or a .gguf file."
            )
        if self.tasks and self.suite != "default":
            raise LensError("Give a suite or --tasks, not both.")
        if self.mc_format and not self.tasks:
            raise LensError("--mc-format applies to --tasks (a suite declares its own formats).")
        self.eval_suite()

    def eval_suite(self) -> EvalSuite:
        """The suite this config evaluates: the named tasks, or the suite; capped at `limit`,
        plus any lm-eval tasks."""

        if self.tasks:
            chosen = tasks_suite(self.tasks, limit=self.limit, mc_format=self.mc_format)
            return build_suite(chosen, lm_eval_tasks=self.lm_eval_tasks, probes=self.probes)
        return build_suite(
            self.suite, limit=self.limit, lm_eval_tasks=self.lm_eval_tasks, probes=self.probes
        )

    def preflight(self) -> None:
        """The checks that cost no evaluation, for a run on this machine (`validate` has checked
        the suite, tasks and probe files): the model without its weights, the device and dtype,
        and every lm-eval task name. A one-line `LensError` before a job exists."""
        from core.eval.scorers import check_lm_eval_tasks  # lazy: heavy (pyarrow)
        from core.model.preflight import check_model_setting  # lazy: heavy (torch)

        check_model_setting(self.model, self.device, self.dtype)
        check_lm_eval_tasks(self.lm_eval_tasks)

    def resolved(self) -> EvalConfig:
        """With the adapter as an absolute folder, its training step, and the trained run's
        method, tau, target share, seed and task (so pages label it like that run)."""
        if self.adapter is None:
            return self

        folder = resolve_adapter_path(self.adapter)
        values: dict[str, Any] = {
            "adapter": str(folder.absolute()),
            "step": adapter_step(folder) or 1,
        }
        run = folder.parent.parent if folder.parent.name == "checkpoints" else folder.parent
        trained = read_json(run / CONFIG_JSON)
        if isinstance(trained, dict) and trained.get("method"):
            values["evaluates"] = run.name
            values.update({k: trained[k] for k in RUN_KEYS if trained.get(k) is not None})
        return replace(self, **values)

    def to_dict(self) -> dict[str, Any]:
        """The job's config.json: "kind": "eval", the settings, and the derived values known."""
        out: dict[str, Any] = {"kind": "eval", **asdict(self)}
        for key in ("lm_eval_tasks", "tasks", "mc_format"):  # only when used (older configs)
            if not out[key]:
                del out[key]
        derived = [
            f for f in type(self).__dataclass_fields__.values() if not f.metadata.get("cli", True)
        ]
        for f in derived:
            if out[f.name] is None:
                del out[f.name]
        return out

    def command_values(self) -> dict[str, Any]:
        """As the base, with the adapter named by its run id where the run is known."""
        values = super().command_values()
        if self.adapter:
            values["adapter"] = self.evaluates or self.adapter
        return values

    def describe(self) -> str:
        """Short label of an eval job for the jobs list."""
        what = self.evaluates or (Path(self.adapter).name if self.adapter else "")
        target = f"{self.model} + {what}" if self.adapter else f"{self.model} (base)"
        limit = f", limit {self.limit}" if self.limit else ""
        what_suite = f"tasks {','.join(self.tasks)}" if self.tasks else self.suite
        return f"eval {what_suite}{limit}: {target}"


def _names(values: Any) -> list[str]:
    """Task names as given, stripped, empty ones dropped."""
    return [n.strip() for n in (values or ()) if n and n.strip()]


def _adapter_root(path: str | Path) -> Path:
    """A folder given as a path, or as a run id under the runs root."""
    root = Path(path).expanduser()
    if root.exists():
        return root
    by_id = runs_dir() / str(path)
    if str(path) and "/" not in str(path) and by_id.is_dir():
        return by_id
    raise LensError(f"Adapter '{path}' does not exist (neither a folder nor a run id).")


def resolve_adapter_path(path: str | Path) -> Path:
    """The folder holding `adapter_config.json`: the path itself, a run folder's `adapter/`, or
    the newest `checkpoints/checkpoint-N/` of a run that has not finished. `path` may also be a
    run id under the runs root."""
    root = _adapter_root(path)
    candidates = [root, root / "adapter", *reversed(checkpoints(root))]
    for folder in candidates:
        if (folder / "adapter_config.json").is_file():
            return folder
    raise LensError(
        f"No adapter found in '{path}' (expected adapter_config.json there, in adapter/ or in "
        "checkpoints/checkpoint-N/)."
    )


def adapter_step(adapter: str | Path) -> int | None:
    """The training step an adapter was saved at: N for `checkpoint-N/`, a finished run's
    final step from its summary.json; None when unknown."""
    folder = resolve_adapter_path(adapter)
    step = checkpoint_step(folder)
    if step is not None:
        return step

    summary = read_json(folder.parent / SUMMARY_JSON)
    if isinstance(summary, dict) and isinstance(summary.get("final_step"), int):
        return int(summary["final_step"])
    return None


def eval_job_config(model: str = "default", **settings: Any) -> dict[str, Any]:
    """Checked, resolved settings of an "eval" job as its config.json dict (bad input raises
    `LensError` before a job exists)."""
    if "lm_eval_tasks" in settings:
        settings["lm_eval_tasks"] = list(settings["lm_eval_tasks"] or ())
    return EvalConfig(model=model, **settings).resolved().to_dict()
